//! A minimal client-only websocket (RFC 6455), for the tunnels that carry
//! SSH to builders without a reachable address: Google's IAP TCP forwarding
//! and EC2 Instance Connect Endpoint.
//!
//! Both need only binary messages, pings and the close frame, so this is
//! the handshake and the framing over the TLS stack the HTTP clients
//! already link (tokio-rustls with the same trust roots and `ca_file:`),
//! rather than a websocket crate the static binary has no room for.
//! `ws://` is accepted for endpoint overrides on loopback, as `http://`
//! is for `api_endpoint:`.

use std::time::Duration;

use base64::Engine as _;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use url::Url;

/// The most of one message absconda accepts.
const MESSAGE_LIMIT: usize = 1 << 20;
/// The most of a handshake answer's head.
const HEAD_LIMIT: usize = 16 << 10;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why a websocket could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("`{url}` is not a ws:// or wss:// URL")]
    BadUrl { url: String },
    #[error("could not connect to `{addr}`")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with `{host}` failed")]
    Tls {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{host}` answered the websocket upgrade with HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Refused {
        host: String,
        status: u16,
        body: String,
    },
    #[error("`{host}` broke the websocket protocol: {message}")]
    Protocol { host: String, message: String },
    #[error("the websocket to `{host}` failed")]
    Io {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the websocket to `{host}` took longer than {}s", after.as_secs())]
    Timeout { host: String, after: Duration },
    #[error(transparent)]
    Roots(#[from] super::CloudError),
}

/// What the server sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Binary(Vec<u8>),
    /// A close frame (its code, if any, and reason), or the connection
    /// ending without one (`None`, empty reason).
    Closed {
        code: Option<u16>,
        reason: String,
    },
}

/// An open client websocket.
pub struct WebSocket {
    io: Box<dyn Io>,
    host: String,
    buf: Vec<u8>,
    /// Fragments of a message in progress.
    partial: Vec<u8>,
    /// Pongs owed, sent before the next write or read.
    pongs: Vec<Vec<u8>>,
    closed: bool,
}

impl std::fmt::Debug for WebSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocket")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl WebSocket {
    /// Opens `url` (ws:// or wss://) with `headers` added to the upgrade
    /// request, asking for `protocol` when given; all within `timeout`.
    pub async fn connect(
        url: &Url,
        headers: &[(&str, &str)],
        protocol: Option<&str>,
        timeout: Duration,
    ) -> Result<WebSocket, WsError> {
        let host = url.host_str().unwrap_or_default().to_string();
        match tokio::time::timeout(timeout, WebSocket::open(url, headers, protocol)).await {
            Ok(r) => r,
            Err(_) => Err(WsError::Timeout {
                host,
                after: timeout,
            }),
        }
    }

    async fn open(
        url: &Url,
        headers: &[(&str, &str)],
        protocol: Option<&str>,
    ) -> Result<WebSocket, WsError> {
        let bad = || WsError::BadUrl { url: redact(url) };
        let tls = match url.scheme() {
            "wss" => true,
            "ws" => false,
            _ => return Err(bad()),
        };
        let host = url.host_str().ok_or_else(bad)?.to_string();
        let port = url.port().unwrap_or(if tls { 443 } else { 80 });
        let addr = format!("{host}:{port}");
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let tcp = tokio::net::TcpStream::connect((bare, port))
            .await
            .map_err(|source| WsError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = if tls {
            let name =
                rustls::pki_types::ServerName::try_from(bare.to_string()).map_err(|_| bad())?;
            let connector = tokio_rustls::TlsConnector::from(super::http::tls_config()?);
            let stream = connector
                .connect(name, tcp)
                .await
                .map_err(|source| WsError::Tls {
                    host: host.clone(),
                    source,
                })?;
            Box::new(stream)
        } else {
            Box::new(tcp)
        };
        let mut ws = WebSocket {
            io,
            host: host.clone(),
            buf: Vec::new(),
            partial: Vec::new(),
            pongs: Vec::new(),
            closed: false,
        };
        let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
        let mut target = url.path().to_string();
        if let Some(q) = url.query() {
            target.push('?');
            target.push_str(q);
        }
        let host_header = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        let mut req = format!(
            "GET {target} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        );
        if let Some(p) = protocol {
            req.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
        }
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        req.push_str("\r\n");
        ws.io
            .write_all(req.as_bytes())
            .await
            .map_err(|e| ws.io_err(e))?;
        ws.io.flush().await.map_err(|e| ws.io_err(e))?;

        // The answer's head; anything after it is already websocket frames.
        let end = loop {
            if let Some(i) = find(&ws.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if ws.buf.len() > HEAD_LIMIT {
                return Err(ws.protocol("the upgrade answer's head is too long"));
            }
            if ws.fill().await? == 0 {
                return Err(ws.protocol("the connection closed during the upgrade"));
            }
        };
        let head = String::from_utf8_lossy(&ws.buf[..end]).into_owned();
        ws.buf.drain(..end);
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ws.protocol("the upgrade answer has no status line"))?;
        let fields: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let field = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if status != 101 {
            // A short, printable piece of the body says why (IAP and AWS
            // explain refusals there).
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.fill()).await;
            let body: String = String::from_utf8_lossy(&ws.buf)
                .chars()
                .filter(|c| !c.is_control())
                .take(300)
                .collect();
            return Err(WsError::Refused {
                host,
                status,
                body: body.trim().to_string(),
            });
        }
        let mut sha = Sha1::new();
        sha.update(key.as_bytes());
        sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        let want = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
        if field("sec-websocket-accept") != Some(want.as_str()) {
            return Err(ws.protocol("wrong `Sec-WebSocket-Accept` in the upgrade answer"));
        }
        if let Some(p) = protocol
            && field("sec-websocket-protocol").is_some_and(|got| got != p)
        {
            return Err(ws.protocol(&format!("the server chose a subprotocol other than `{p}`")));
        }
        Ok(ws)
    }

    fn io_err(&self, source: std::io::Error) -> WsError {
        WsError::Io {
            host: self.host.clone(),
            source,
        }
    }

    fn protocol(&self, message: &str) -> WsError {
        WsError::Protocol {
            host: self.host.clone(),
            message: message.to_string(),
        }
    }

    /// Reads more into the buffer: cancel-safe.
    async fn fill(&mut self) -> Result<usize, WsError> {
        let mut chunk = [0u8; 16 << 10];
        let n = self.io.read(&mut chunk).await.map_err(|e| WsError::Io {
            host: self.host.clone(),
            source: e,
        })?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Sends one binary message.
    pub async fn send(&mut self, data: &[u8]) -> Result<(), WsError> {
        self.flush_pongs().await?;
        self.write_frame(0x2, data).await
    }

    /// Sends a close frame with `code` (best effort).
    pub async fn close(&mut self, code: u16) {
        if !self.closed {
            self.closed = true;
            let _ = self.write_frame(0x8, &code.to_be_bytes()).await;
            let _ = self.io.shutdown().await;
        }
    }

    async fn flush_pongs(&mut self) -> Result<(), WsError> {
        while let Some(p) = self.pongs.pop() {
            self.write_frame(0xA, &p).await?;
        }
        Ok(())
    }

    async fn write_frame(&mut self, opcode: u8, payload: &[u8]) -> Result<(), WsError> {
        let frame = encode_frame(opcode, payload, rand::random());
        self.io
            .write_all(&frame)
            .await
            .map_err(|e| self.io_err(e))?;
        self.io.flush().await.map_err(|e| self.io_err(e))
    }

    /// The next message. Cancel-safe: a cancelled call loses nothing, so
    /// it can race a local read in `select!`. Pings are answered with the
    /// next send (or here, before reading on).
    pub async fn recv(&mut self) -> Result<Incoming, WsError> {
        loop {
            if !self.pongs.is_empty() {
                self.flush_pongs().await?;
            }
            match parse_frame(&self.buf).map_err(|m| self.protocol(m))? {
                None => {
                    if self.fill().await? == 0 {
                        return Ok(Incoming::Closed {
                            code: None,
                            reason: String::new(),
                        });
                    }
                }
                Some((fin, opcode, payload, used)) => {
                    self.buf.drain(..used);
                    match opcode {
                        0x0..=0x2 => {
                            if self.partial.len() + payload.len() > MESSAGE_LIMIT {
                                return Err(self.protocol("a message is larger than 1 MiB"));
                            }
                            self.partial.extend_from_slice(&payload);
                            if fin {
                                return Ok(Incoming::Binary(std::mem::take(&mut self.partial)));
                            }
                        }
                        0x8 => {
                            let code = (payload.len() >= 2)
                                .then(|| u16::from_be_bytes([payload[0], payload[1]]));
                            let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or(&[]))
                                .into_owned();
                            self.close(code.unwrap_or(1000)).await;
                            return Ok(Incoming::Closed { code, reason });
                        }
                        0x9 => self.pongs.push(payload),
                        0xA => {}
                        _ => return Err(self.protocol("unknown frame opcode")),
                    }
                }
            }
        }
    }
}

/// A masked client frame.
pub fn encode_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// One frame from the front of `buf`: (fin, opcode, unmasked payload, bytes used),
/// or `None` when it is not all there yet.
#[allow(clippy::type_complexity)]
pub fn parse_frame(buf: &[u8]) -> Result<Option<(bool, u8, Vec<u8>, usize)>, &'static str> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let fin = buf[0] & 0x80 != 0;
    if buf[0] & 0x70 != 0 {
        return Err("reserved bits set (no extension was agreed)");
    }
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (n as u64, 2),
    };
    if len > MESSAGE_LIMIT as u64 {
        return Err("a frame is larger than 1 MiB");
    }
    let mask = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    let len = len as usize;
    if buf.len() < at + len {
        return Ok(None);
    }
    let mut payload = buf[at..at + len].to_vec();
    if let Some(m) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    Ok(Some((fin, opcode, payload, at + len)))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A URL without its query (which may hold a signature), for messages.
pub fn redact(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.to_string()
}

/// Writes what a tunnel received to its local side from a task of its own,
/// so that the websocket pump never waits on the SSH session (which reads
/// and writes in one task: a pump waiting on it while it waits on the pump
/// would stop both). Returns the sender to queue data on and the task.
pub fn local_writer<W>(
    mut wr: W,
) -> (
    tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    tokio::task::JoinHandle<()>,
)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let task = tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            if wr.write_all(&d).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    (tx, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_at_every_length_form() {
        for len in [0usize, 5, 125, 126, 65535, 65536] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let frame = encode_frame(0x2, &payload, [1, 2, 3, 4]);
            assert_eq!(parse_frame(&frame[..frame.len() - 1]).unwrap(), None);
            let (fin, op, got, used) = parse_frame(&frame).unwrap().unwrap();
            assert!(fin);
            assert_eq!(op, 0x2);
            assert_eq!(got, payload);
            assert_eq!(used, frame.len());
        }
    }

    #[test]
    fn reserved_bits_and_huge_frames_are_refused() {
        assert!(parse_frame(&[0xC2, 0x00]).is_err());
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(parse_frame(&huge).is_err());
    }
}
