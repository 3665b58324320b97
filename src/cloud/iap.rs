//! Google's IAP TCP forwarding, spoken natively (`tunnel: iap`).
//!
//! IAP relays a TCP connection to port 22 of a VM that may have no external
//! address. The client opens a websocket to
//! `wss://tunnel.cloudproxy.app/v4/connect?project=..&zone=..&instance=..&interface=nic0&port=22`
//! with the ADC bearer token, the `relay.tunnel.cloudproxy.app` subprotocol
//! and the `bot:iap-tunneler` origin. Every websocket message is a frame of
//! that subprotocol, tagged with a big-endian u16:
//!
//! - `CONNECT_SUCCESS_SID` (1): u32 length + the session id; the tunnel is open.
//! - `RECONNECT_SUCCESS_ACK` (2): u64, how many of our bytes the relay has
//!   after a reconnect; we resend the rest.
//! - `DATA` (4): u32 length + at most 16 KiB of the TCP stream.
//! - `ACK` (7): u64, the total of the peer's bytes received.
//!
//! A dropped websocket does not end the TCP connection behind it: the
//! client reconnects to `/v4/reconnect?sid=..&ack=..` within a while, and
//! both sides resend what the other has not acknowledged. The relay ends a
//! tunnel with a close code that says why (4033 not authorized, 4003 the
//! VM's port unreachable, 4047 no such instance, 4004 the token must be
//! renewed).
//!
//! The tunnel is handed to the SSH layer as a byte stream: one end of an
//! in-memory pipe, whose other end a task pumps to and from the websocket.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, DuplexStream};
use url::Url;

use super::gcp_auth::GcpAuth;
use super::websocket::{Incoming, WebSocket, WsError};

/// Where tunnels are opened unless `iap_endpoint:` or this variable says otherwise.
pub const DEFAULT_ENDPOINT: &str = "wss://tunnel.cloudproxy.app/v4";
pub const ENDPOINT_ENV: &str = "ABSCONDA_IAP_ENDPOINT";
pub const SUBPROTOCOL: &str = "relay.tunnel.cloudproxy.app";
pub const ORIGIN: &str = "bot:iap-tunneler";
/// The largest DATA payload.
pub const MAX_DATA: usize = 16384;
/// The range IAP connects to VMs from.
pub const IAP_RANGE: &str = "35.235.240.0/20";
pub const TUNNEL_ROLE: &str = "roles/iap.tunnelResourceAccessor";

pub const TAG_CONNECT_SUCCESS_SID: u16 = 0x0001;
pub const TAG_RECONNECT_SUCCESS_ACK: u16 = 0x0002;
pub const TAG_DATA: u16 = 0x0004;
pub const TAG_ACK: u16 = 0x0007;

pub const CLOSE_SID_UNKNOWN: u16 = 4001;
pub const CLOSE_BACKEND: u16 = 4003;
pub const CLOSE_REAUTH: u16 = 4004;
pub const CLOSE_NOT_AUTHORIZED: u16 = 4033;
pub const CLOSE_LOOKUP_FAILED: u16 = 4047;
pub const CLOSE_LOOKUP_FAILED_RECONNECT: u16 = 4051;

/// How long a dropped websocket may take to come back.
const RECONNECT_WINDOW: Duration = Duration::from_secs(60);

/// Which VM port a tunnel leads to.
#[derive(Debug, Clone)]
pub struct IapTarget {
    pub project: String,
    pub zone: String,
    pub instance: String,
    pub interface: String,
    pub port: u16,
}

/// Why a tunnel could not be opened or kept.
#[derive(Debug, thiserror::Error)]
pub enum IapError {
    #[error(
        "IAP refused the tunnel to instance `{instance}` of project `{project}`: not authorized (close code 4033{reason})"
    )]
    NotAuthorized {
        project: String,
        instance: String,
        reason: String,
    },
    #[error(
        "IAP could not connect to port {port} of instance `{instance}` (close code 4003, failed to connect to backend{reason})"
    )]
    Backend {
        instance: String,
        port: u16,
        reason: String,
    },
    #[error(
        "IAP found no instance `{instance}` in zone `{zone}` of project `{project}` (close code {code}, lookup failed{reason})"
    )]
    LookupFailed {
        project: String,
        zone: String,
        instance: String,
        code: u16,
        reason: String,
    },
    #[error("IAP closed the tunnel to instance `{instance}` with code {code}{reason}")]
    Closed {
        instance: String,
        code: String,
        reason: String,
    },
    #[error("could not open the IAP tunnel to instance `{instance}`")]
    Open {
        instance: String,
        #[source]
        source: Box<WsError>,
    },
    #[error("no credentials for the IAP tunnel to instance `{instance}`")]
    Auth {
        instance: String,
        #[source]
        source: Box<super::CloudError>,
    },
    #[error("the IAP tunnel to instance `{instance}` broke the relay protocol: {message}")]
    Protocol { instance: String, message: String },
    #[error("`{endpoint}` is not a ws:// or wss:// URL (`iap_endpoint:` or {ENDPOINT_ENV})")]
    Endpoint { endpoint: String },
}

impl IapError {
    /// Whether trying again (the VM still booting) may help.
    pub fn is_transient(&self) -> bool {
        match self {
            // IAP answers the upgrade with 401/403 for a bad token or a
            // missing permission: waiting does not change that.
            IapError::Open { source, .. } => match &**source {
                WsError::Refused {
                    status: 401 | 403, ..
                } => false,
                WsError::Tls { source, .. } => !super::http::is_certificate_error(source),
                _ => true,
            },
            IapError::Backend { .. } | IapError::Closed { .. } => true,
            _ => false,
        }
    }

    /// The concrete next step.
    pub fn hint(&self) -> Option<String> {
        match self {
            IapError::NotAuthorized { project, .. } => Some(format!(
                "grant the account absconda runs as the IAM role `{TUNNEL_ROLE}` (IAP-secured Tunnel User) on project `{project}` or on the instance: `gcloud projects add-iam-policy-binding {project} --member=user:EMAIL --role={TUNNEL_ROLE}`"
            )),
            IapError::Backend { port, .. } => Some(format!(
                "allow IAP to reach the VM: a firewall rule on its network allowing TCP port {port} from {IAP_RANGE} (`gcloud compute firewall-rules create allow-iap-ssh --network=NETWORK --allow=tcp:{port} --source-ranges={IAP_RANGE}`), and check that sshd runs on the VM"
            )),
            IapError::Open { source, .. }
                if matches!(**source, WsError::Refused { status: 401 | 403, .. }) =>
            {
                Some(format!(
                    "check that the account absconda runs as has the IAM role `{TUNNEL_ROLE}` on the builder's project or instance"
                ))
            }
            IapError::LookupFailed { .. } => Some(
                "check the builder's `project:`, `zone:` and `instance:`, and that the VM exists (`absconda remote status`)".into(),
            ),
            _ => None,
        }
    }
}

fn reason_suffix(reason: &str) -> String {
    let r: String = reason
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    let known = [
        "not authorized",
        "failed to connect to backend",
        "failed to lookup instance",
        "lookup failed",
    ];
    if r.trim().is_empty() || known.iter().any(|k| r.trim().eq_ignore_ascii_case(k)) {
        String::new()
    } else {
        format!(": {}", r.trim())
    }
}

/// Close codes after which reconnecting cannot help.
fn is_final(code: u16) -> bool {
    matches!(
        code,
        CLOSE_NOT_AUTHORIZED
            | CLOSE_LOOKUP_FAILED
            | CLOSE_LOOKUP_FAILED_RECONNECT
            | CLOSE_SID_UNKNOWN
            | CLOSE_BACKEND
    )
}

/// An error and its causes on one line, for a warning.
pub(crate) fn chain_text(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        out.push_str(": ");
        out.push_str(&c.to_string());
        next = c.source();
    }
    out
}

/// One side of a tunnel's book-keeping.
struct Tunnel {
    target: IapTarget,
    endpoint: Url,
    auth: Arc<GcpAuth>,
    timeout: Duration,
    sid: String,
    /// Bytes of the VM's stream received, and the most we acknowledged.
    received: u64,
    acked: u64,
    /// Bytes of ours the relay confirmed, and the sent ones it has not.
    confirmed: u64,
    unconfirmed: VecDeque<Vec<u8>>,
}

/// A decoded relay frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    ConnectSuccess(Vec<u8>),
    ReconnectSuccess(u64),
    Data(Vec<u8>),
    Ack(u64),
    Other(u16),
}

/// Decodes one relay frame.
pub fn decode(msg: &[u8]) -> Result<Frame, String> {
    let short = || "a frame ends early".to_string();
    let tag = u16::from_be_bytes(
        msg.get(..2)
            .ok_or_else(short)?
            .try_into()
            .map_err(|_| short())?,
    );
    let rest = &msg[2..];
    let u64_at = |b: &[u8]| -> Result<u64, String> {
        Ok(u64::from_be_bytes(
            b.get(..8)
                .ok_or_else(short)?
                .try_into()
                .map_err(|_| short())?,
        ))
    };
    let bytes = |b: &[u8]| -> Result<Vec<u8>, String> {
        let len = u32::from_be_bytes(
            b.get(..4)
                .ok_or_else(short)?
                .try_into()
                .map_err(|_| short())?,
        ) as usize;
        Ok(b.get(4..4 + len).ok_or_else(short)?.to_vec())
    };
    Ok(match tag {
        TAG_CONNECT_SUCCESS_SID => Frame::ConnectSuccess(bytes(rest)?),
        TAG_RECONNECT_SUCCESS_ACK => Frame::ReconnectSuccess(u64_at(rest)?),
        TAG_DATA => Frame::Data(bytes(rest)?),
        TAG_ACK => Frame::Ack(u64_at(rest)?),
        other => Frame::Other(other),
    })
}

pub fn data_frame(data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(6 + data.len());
    f.extend_from_slice(&TAG_DATA.to_be_bytes());
    f.extend_from_slice(&(data.len() as u32).to_be_bytes());
    f.extend_from_slice(data);
    f
}

pub fn ack_frame(total: u64) -> Vec<u8> {
    let mut f = Vec::with_capacity(10);
    f.extend_from_slice(&TAG_ACK.to_be_bytes());
    f.extend_from_slice(&total.to_be_bytes());
    f
}

/// The tunnel endpoint: `iap_endpoint:`, else `ABSCONDA_IAP_ENDPOINT`, else Google's.
pub fn endpoint(configured: Option<&str>) -> Result<Url, IapError> {
    let text = configured
        .map(str::to_string)
        .or_else(|| std::env::var(ENDPOINT_ENV).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    Url::parse(&text)
        .ok()
        .filter(|u| matches!(u.scheme(), "ws" | "wss") && u.host_str().is_some())
        .ok_or(IapError::Endpoint { endpoint: text })
}

fn join(base: &Url, leaf: &str, query: &[(&str, &str)]) -> Url {
    let mut u = base.clone();
    let path = format!("{}/{leaf}", base.path().trim_end_matches('/'));
    u.set_path(&path);
    u.set_query(None);
    u.query_pairs_mut().extend_pairs(query);
    u
}

/// Opens a tunnel to `target` and returns the local end of it.
pub async fn open(
    target: IapTarget,
    endpoint: Url,
    auth: Arc<GcpAuth>,
    timeout: Duration,
) -> Result<DuplexStream, IapError> {
    let mut t = Tunnel {
        target,
        endpoint,
        auth,
        timeout,
        sid: String::new(),
        received: 0,
        acked: 0,
        confirmed: 0,
        unconfirmed: VecDeque::new(),
    };
    let port = t.target.port.to_string();
    let url = join(
        &t.endpoint,
        "connect",
        &[
            ("project", t.target.project.as_str()),
            ("port", &port),
            ("newWebsocket", "True"),
            ("zone", &t.target.zone),
            ("instance", &t.target.instance),
            ("interface", &t.target.interface),
        ],
    );
    let mut fresh = false;
    let mut ws = loop {
        let mut ws = t.dial(&url, fresh).await?;
        match t.first_frame(&mut ws).await {
            Ok(Frame::ConnectSuccess(sid)) => {
                t.sid = String::from_utf8_lossy(&sid).into_owned();
                break ws;
            }
            Ok(_) => return Err(t.protocol("the first frame is not CONNECT_SUCCESS_SID")),
            Err(Some(CLOSE_REAUTH)) if !fresh => fresh = true,
            Err(code) => return Err(t.closed_error(code, &ws_reason(&mut ws))),
        }
    };
    tracing::debug!(instance = %t.target.instance, "IAP tunnel open");
    ws.last_reason.clear();
    let (local, remote) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        if let Err(e) = t.pump(ws.inner, remote).await {
            tracing::warn!("{}", chain_text(&e));
        }
    });
    Ok(local)
}

/// A websocket and the reason of its close frame, if it got one.
struct Ws {
    inner: WebSocket,
    last_reason: String,
}

fn ws_reason(ws: &mut Ws) -> String {
    std::mem::take(&mut ws.last_reason)
}

impl Tunnel {
    fn protocol(&self, message: &str) -> IapError {
        IapError::Protocol {
            instance: self.target.instance.clone(),
            message: message.to_string(),
        }
    }

    fn closed_error(&self, code: Option<u16>, reason: &str) -> IapError {
        let reason = reason_suffix(reason);
        let t = &self.target;
        match code {
            Some(CLOSE_NOT_AUTHORIZED) => IapError::NotAuthorized {
                project: t.project.clone(),
                instance: t.instance.clone(),
                reason,
            },
            Some(CLOSE_BACKEND) => IapError::Backend {
                instance: t.instance.clone(),
                port: t.port,
                reason,
            },
            Some(c @ (CLOSE_LOOKUP_FAILED | CLOSE_LOOKUP_FAILED_RECONNECT)) => {
                IapError::LookupFailed {
                    project: t.project.clone(),
                    zone: t.zone.clone(),
                    instance: t.instance.clone(),
                    code: c,
                    reason,
                }
            }
            c => IapError::Closed {
                instance: t.instance.clone(),
                code: c.map(|c| c.to_string()).unwrap_or_else(|| "none".into()),
                reason,
            },
        }
    }

    async fn dial(&self, url: &Url, fresh: bool) -> Result<Ws, IapError> {
        if fresh {
            self.auth.forget();
        }
        let headers = self.auth.headers().await.map_err(|source| IapError::Auth {
            instance: self.target.instance.clone(),
            source: Box::new(source),
        })?;
        let bearer = headers
            .get(reqwest::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let ua = concat!("absconda/", env!("CARGO_PKG_VERSION"));
        let ws = WebSocket::connect(
            url,
            &[
                ("Authorization", bearer.as_str()),
                ("Origin", ORIGIN),
                ("User-Agent", ua),
            ],
            Some(SUBPROTOCOL),
            self.timeout,
        )
        .await
        .map_err(|source| IapError::Open {
            instance: self.target.instance.clone(),
            source: Box::new(source),
        })?;
        Ok(Ws {
            inner: ws,
            last_reason: String::new(),
        })
    }

    /// The first frame after the upgrade, or the close code that came instead.
    async fn first_frame(&self, ws: &mut Ws) -> Result<Frame, Option<u16>> {
        let got = tokio::time::timeout(self.timeout, ws.inner.recv()).await;
        match got {
            Ok(Ok(Incoming::Binary(m))) => decode(&m).map_err(|_| None),
            Ok(Ok(Incoming::Closed { code, reason })) => {
                ws.last_reason = reason;
                Err(code)
            }
            Ok(Err(_)) | Err(_) => Err(None),
        }
    }

    /// Forgets what the relay confirmed; `total` counts from the start.
    fn confirm(&mut self, total: u64) -> Result<(), IapError> {
        if total < self.confirmed {
            return Err(self.protocol("an ACK went backwards"));
        }
        let mut left = total - self.confirmed;
        while left > 0 {
            let Some(front) = self.unconfirmed.front_mut() else {
                return Err(self.protocol("an ACK confirmed more than was sent"));
            };
            if (front.len() as u64) <= left {
                left -= front.len() as u64;
                self.unconfirmed.pop_front();
            } else {
                front.drain(..left as usize);
                left = 0;
            }
        }
        self.confirmed = total;
        Ok(())
    }

    /// Opens a new websocket for the session after the old one dropped,
    /// and resends what the relay had not confirmed.
    async fn reconnect(&mut self, mut fresh: bool) -> Result<WebSocket, IapError> {
        let deadline = tokio::time::Instant::now() + RECONNECT_WINDOW;
        let mut delay = Duration::from_millis(200);
        let mut last: Option<IapError> = None;
        while tokio::time::Instant::now() < deadline {
            let ack = self.received.to_string();
            let url = join(
                &self.endpoint,
                "reconnect",
                &[
                    ("sid", self.sid.as_str()),
                    ("ack", &ack),
                    ("newWebsocket", "True"),
                    ("zone", &self.target.zone),
                ],
            );
            let attempt: Result<(), IapError> = match self.dial(&url, fresh).await {
                Ok(mut ws) => match self.first_frame(&mut ws).await {
                    Ok(Frame::ReconnectSuccess(n)) => {
                        self.confirm(n)?;
                        let mut ws = ws.inner;
                        let resend: Vec<Vec<u8>> = self.unconfirmed.iter().cloned().collect();
                        tracing::debug!(
                            confirmed = n,
                            resent = resend.iter().map(Vec::len).sum::<usize>(),
                            "IAP tunnel reconnected"
                        );
                        let mut ok = true;
                        for chunk in &resend {
                            if ws.send(&data_frame(chunk)).await.is_err() {
                                ok = false;
                                break;
                            }
                        }
                        if ok {
                            self.acked = self.received;
                            return Ok(ws);
                        }
                        Err(self.closed_error(None, "the new websocket dropped at once"))
                    }
                    Ok(_) => {
                        return Err(self.protocol(
                            "the first frame after a reconnect is not RECONNECT_SUCCESS_ACK",
                        ));
                    }
                    Err(Some(CLOSE_REAUTH)) => {
                        fresh = true;
                        continue;
                    }
                    Err(code) => {
                        let e = self.closed_error(code, &ws_reason(&mut ws));
                        if code.is_some_and(is_final) {
                            return Err(e);
                        }
                        Err(e)
                    }
                },
                Err(e @ IapError::Auth { .. }) => return Err(e),
                Err(e) => Err(e),
            };
            if let Err(e) = attempt {
                tracing::debug!("IAP reconnect failed: {e}");
                last = Some(e);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        Err(last.unwrap_or_else(|| self.closed_error(None, "could not reconnect")))
    }

    /// Moves bytes between the local pipe and the websocket until the
    /// local side closes, reconnecting the websocket when it drops.
    async fn pump(mut self, mut ws: WebSocket, remote: DuplexStream) -> Result<(), IapError> {
        let (mut rd, wr) = tokio::io::split(remote);
        let (tx, writer) = super::websocket::local_writer(wr);
        let mut buf = vec![0u8; MAX_DATA];
        let result = loop {
            tokio::select! {
                n = rd.read(&mut buf) => {
                    let n = match n {
                        Ok(0) | Err(_) => {
                            ws.close(1000).await;
                            break Ok(());
                        }
                        Ok(n) => n,
                    };
                    let chunk = buf[..n].to_vec();
                    self.unconfirmed.push_back(chunk.clone());
                    if let Err(e) = ws.send(&data_frame(&chunk)).await {
                        tracing::debug!("IAP websocket dropped while sending: {e}");
                        match self.reconnect(false).await {
                            Ok(w) => ws = w,
                            Err(e) => break Err(e),
                        }
                    }
                }
                m = ws.recv() => {
                    let fresh = match m {
                        Ok(Incoming::Binary(msg)) => {
                            match decode(&msg) {
                                Ok(Frame::Data(d)) => {
                                    self.received += d.len() as u64;
                                    if tx.send(d).is_err() {
                                        ws.close(1000).await;
                                        break Ok(());
                                    }
                                    // As gcloud does: acknowledge once more than two
                                    // frames' worth is outstanding.
                                    if self.received - self.acked > 2 * MAX_DATA as u64
                                        && ws.send(&ack_frame(self.received)).await.is_ok()
                                    {
                                        self.acked = self.received;
                                    }
                                    continue;
                                }
                                Ok(Frame::Ack(n)) => {
                                    if let Err(e) = self.confirm(n) {
                                        break Err(e);
                                    }
                                    continue;
                                }
                                Ok(Frame::Other(tag)) => {
                                    tracing::debug!(tag, "ignoring an unknown IAP frame");
                                    continue;
                                }
                                Ok(_) => break Err(self.protocol("a second connect frame")),
                                Err(m) => break Err(self.protocol(&m)),
                            }
                        }
                        Ok(Incoming::Closed { code, reason }) => {
                            tracing::debug!(?code, %reason, "IAP websocket closed");
                            match code {
                                Some(CLOSE_REAUTH) => true,
                                Some(c) if is_final(c) => break Err(self.closed_error(Some(c), &reason)),
                                _ => false,
                            }
                        }
                        Err(e) => {
                            tracing::debug!("IAP websocket failed: {e}");
                            false
                        }
                    };
                    match self.reconnect(fresh).await {
                        Ok(w) => ws = w,
                        Err(e) => break Err(e),
                    }
                }
            }
        };
        drop(tx);
        let _ = writer.await;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_decode_as_the_relay_sends_them() {
        let mut sid = vec![0, 1, 0, 0, 0, 3];
        sid.extend_from_slice(b"abc");
        assert_eq!(
            decode(&sid).unwrap(),
            Frame::ConnectSuccess(b"abc".to_vec())
        );
        let mut re = vec![0, 2];
        re.extend_from_slice(&42u64.to_be_bytes());
        assert_eq!(decode(&re).unwrap(), Frame::ReconnectSuccess(42));
        assert_eq!(
            decode(&data_frame(b"hi")).unwrap(),
            Frame::Data(b"hi".to_vec())
        );
        assert_eq!(decode(&ack_frame(7)).unwrap(), Frame::Ack(7));
        assert!(decode(&[0, 4, 0, 0, 0, 9, 1]).is_err());
        assert!(decode(&[0]).is_err());
    }

    #[test]
    fn urls_carry_the_target() {
        let base = endpoint(Some("ws://127.0.0.1:9/v4")).unwrap();
        let u = join(&base, "connect", &[("project", "p"), ("zone", "z")]);
        assert_eq!(u.as_str(), "ws://127.0.0.1:9/v4/connect?project=p&zone=z");
        assert!(endpoint(Some("https://x")).is_err());
    }
}
