//! A fake of Google's IAP TCP-forwarding relay (`tunnel.cloudproxy.app`),
//! written from the public protocol, that forwards to a real sshd.
//!
//! `/v4/connect` checks the bearer token (with `check_token`), the
//! `bot:iap-tunneler` origin, the `relay.tunnel.cloudproxy.app`
//! subprotocol and the query (`project`, `zone`, `instance`, `interface`,
//! `port`), then connects to `127.0.0.1:<port>` and answers
//! `CONNECT_SUCCESS_SID`. DATA frames go both ways; the relay ACKs what
//! it received and keeps what it sent until the client ACKs it.
//! `/v4/reconnect?sid=..&ack=..` resumes a session: `RECONNECT_SUCCESS_ACK`
//! with what the relay received, then a resend of what the client missed.
//! Faults: drop the websocket once after N bytes from the client, refuse
//! with a close code, ask for re-authentication once.

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use super::ws_server::{self, Upgrade};

type TokenCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

#[derive(Default)]
struct State {
    /// Every upgrade request, in order.
    requests: Vec<Upgrade>,
    /// Why a request was refused, for the test's messages.
    refusals: Vec<String>,
    sessions: HashMap<String, Arc<Mutex<Session>>>,
    next_sid: u64,
    close_with: Option<(u16, String)>,
    reauth_once: bool,
    drop_after: Option<u64>,
    drops: usize,
    reconnects: usize,
    refuse_all_tokens: bool,
}

struct Session {
    backend: TcpStream,
    /// Bytes from the client written to the backend.
    received: u64,
    /// Bytes sent to the client that it has not ACKed, starting at `acked`.
    unacked: Vec<u8>,
    acked: u64,
    ws: Option<TcpStream>,
}

pub struct IapFake {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

pub const PROJECT: &str = "absconda-test";
pub const ZONE: &str = "us-central1-a";

impl IapFake {
    /// Serves tunnels to instance `instance`; `check_token` says whether an
    /// `Authorization` header is valid.
    pub fn start(
        instance: &str,
        check_token: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> IapFake {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the IAP fake");
        let addr = listener.local_addr().expect("address");
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let check: TokenCheck = Arc::new(check_token);
        let instance = instance.to_string();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (st, check, instance) = (st.clone(), check.clone(), instance.clone());
                std::thread::spawn(move || serve(conn, &st, &check, &instance));
            }
        });
        IapFake { addr, state }
    }

    /// The value for `iap_endpoint:`.
    pub fn endpoint(&self) -> String {
        format!("ws://{}/v4", self.addr)
    }

    pub fn requests(&self) -> Vec<Upgrade> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn refusals(&self) -> Vec<String> {
        self.state.lock().unwrap().refusals.clone()
    }

    /// Ends every new tunnel with `code` right after the upgrade.
    pub fn close_with(&self, code: u16, reason: &str) {
        self.state.lock().unwrap().close_with = Some((code, reason.to_string()));
    }

    /// Answers every upgrade 401, as IAP does for a token it rejects.
    pub fn refuse_all_tokens(&self) {
        self.state.lock().unwrap().refuse_all_tokens = true;
    }

    /// The next connect gets close code 4004 (re-authentication required).
    pub fn reauth_once(&self) {
        self.state.lock().unwrap().reauth_once = true;
    }

    /// Drops the websocket (no close frame) once, when the client has sent
    /// more than `bytes` through one session; the next upgrade then gets
    /// close code 4004 (re-authentication required).
    pub fn drop_after(&self, bytes: u64) {
        self.state.lock().unwrap().drop_after = Some(bytes);
    }

    pub fn drops(&self) -> usize {
        self.state.lock().unwrap().drops
    }

    pub fn reconnects(&self) -> usize {
        self.state.lock().unwrap().reconnects
    }
}

fn data_frame(d: &[u8]) -> Vec<u8> {
    let mut f = vec![0, 4];
    f.extend_from_slice(&(d.len() as u32).to_be_bytes());
    f.extend_from_slice(d);
    f
}

fn u64_frame(tag: u16, n: u64) -> Vec<u8> {
    let mut f = tag.to_be_bytes().to_vec();
    f.extend_from_slice(&n.to_be_bytes());
    f
}

fn serve(conn: TcpStream, state: &Arc<Mutex<State>>, check: &TokenCheck, instance: &str) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut w = conn;
    let Some(up) = ws_server::read_upgrade(&mut reader) else {
        return;
    };
    state.lock().unwrap().requests.push(up.clone());
    let refuse = |w: &mut TcpStream, status: u16, why: String| {
        state.lock().unwrap().refusals.push(why.clone());
        ws_server::refuse(w, status, &why);
    };
    // What every tunnel request must carry.
    if up.method != "GET"
        || up.header("upgrade").map(|v| v.to_ascii_lowercase()) != Some("websocket".into())
    {
        return refuse(&mut w, 400, "not a websocket upgrade".into());
    }
    if up.header("origin") != Some("bot:iap-tunneler") {
        return refuse(&mut w, 403, format!("origin {:?}", up.header("origin")));
    }
    let protocols = up.header("sec-websocket-protocol").unwrap_or_default();
    if !protocols
        .split(',')
        .any(|p| p.trim() == "relay.tunnel.cloudproxy.app")
    {
        return refuse(&mut w, 400, format!("subprotocol {protocols:?}"));
    }
    let auth = up.header("authorization").unwrap_or_default().to_string();
    if !check(&auth) || state.lock().unwrap().refuse_all_tokens {
        return refuse(&mut w, 401, "invalid bearer token".into());
    }
    if up.param("newWebsocket").as_deref() != Some("True") {
        return refuse(&mut w, 400, "newWebsocket is not True".into());
    }
    if ws_server::accept(&mut w, &up, Some("relay.tunnel.cloudproxy.app")).is_err() {
        return;
    }
    let (close_with, reauth) = {
        let mut st = state.lock().unwrap();
        let r = st.reauth_once;
        st.reauth_once = false;
        (st.close_with.clone(), r)
    };
    if let Some((code, reason)) = close_with {
        return ws_server::close(&mut w, code, &reason);
    }
    if reauth {
        return ws_server::close(&mut w, 4004, "reauthentication required");
    }
    let session = match up.path() {
        "/v4/connect" => {
            let q = |k: &str| up.param(k).unwrap_or_default();
            if q("project") != PROJECT || q("zone") != ZONE || q("instance") != instance {
                return ws_server::close(&mut w, 4047, "failed to lookup instance");
            }
            if q("interface") != "nic0" {
                return ws_server::close(&mut w, 4000, "bad interface");
            }
            let Ok(port) = q("port").parse::<u16>() else {
                return ws_server::close(&mut w, 4000, "bad port");
            };
            let Ok(backend) = TcpStream::connect(("127.0.0.1", port)) else {
                return ws_server::close(&mut w, 4003, "failed to connect to backend");
            };
            let sid = {
                let mut st = state.lock().unwrap();
                st.next_sid += 1;
                format!("sid-{}-{}", st.next_sid, rand::random::<u32>())
            };
            let session = Arc::new(Mutex::new(Session {
                backend: backend.try_clone().expect("clone"),
                received: 0,
                unacked: Vec::new(),
                acked: 0,
                ws: Some(w.try_clone().expect("clone")),
            }));
            state
                .lock()
                .unwrap()
                .sessions
                .insert(sid.clone(), session.clone());
            let mut f = vec![0, 1];
            f.extend_from_slice(&(sid.len() as u32).to_be_bytes());
            f.extend_from_slice(sid.as_bytes());
            if ws_server::write_frame(&mut w, 0x2, &f).is_err() {
                return;
            }
            // The backend's bytes go to whichever websocket the session has.
            let s2 = session.clone();
            std::thread::spawn(move || backend_to_client(backend, &s2));
            session
        }
        "/v4/reconnect" => {
            let sid = up.param("sid").unwrap_or_default();
            let ack: u64 = up
                .param("ack")
                .and_then(|a| a.parse().ok())
                .unwrap_or(u64::MAX);
            if up.param("zone").as_deref() != Some(ZONE) {
                return ws_server::close(&mut w, 4000, "bad zone");
            }
            let Some(session) = state.lock().unwrap().sessions.get(&sid).cloned() else {
                return ws_server::close(&mut w, 4001, "sid unknown");
            };
            state.lock().unwrap().reconnects += 1;
            let mut s = session.lock().unwrap();
            if ack < s.acked || ack > s.acked + s.unacked.len() as u64 {
                drop(s);
                return ws_server::close(&mut w, 4006, "invalid ack");
            }
            let confirmed = (ack - s.acked) as usize;
            s.unacked.drain(..confirmed);
            s.acked = ack;
            let mut ok = ws_server::write_frame(&mut w, 0x2, &u64_frame(2, s.received)).is_ok();
            for chunk in s.unacked.clone().chunks(16384) {
                ok = ok && ws_server::write_frame(&mut w, 0x2, &data_frame(chunk)).is_ok();
            }
            if !ok {
                return;
            }
            s.ws = Some(w.try_clone().expect("clone"));
            drop(s);
            session
        }
        _ => return ws_server::close(&mut w, 4000, "unknown path"),
    };
    client_to_backend(reader, w, &session, state);
}

fn client_to_backend(
    mut reader: BufReader<TcpStream>,
    ws: TcpStream,
    session: &Arc<Mutex<Session>>,
    state: &Arc<Mutex<State>>,
) {
    while let Some((opcode, payload)) = ws_server::read_frame(&mut reader) {
        match opcode {
            0x2 => {}
            0x8 => {
                // The client is done: so is the TCP connection behind it.
                let s = session.lock().unwrap();
                let _ = s.backend.shutdown(Shutdown::Both);
                break;
            }
            _ => continue,
        }
        let tag = u16::from_be_bytes([payload[0], payload[1]]);
        let mut s = session.lock().unwrap();
        match tag {
            4 => {
                let len = u32::from_be_bytes(payload[2..6].try_into().unwrap()) as usize;
                let data = &payload[6..6 + len];
                if s.backend.write_all(data).is_err() {
                    break;
                }
                s.received += len as u64;
                let received = s.received;
                let mut w = ws.try_clone().expect("clone");
                let _ = ws_server::write_frame(&mut w, 0x2, &u64_frame(7, received));
                let mut st = state.lock().unwrap();
                if st.drop_after.is_some_and(|n| received > n) {
                    st.drop_after = None;
                    st.drops += 1;
                    // The first reconnect is then told to re-authenticate,
                    // as when the token expired meanwhile.
                    st.reauth_once = true;
                    s.ws = None;
                    let _ = ws.shutdown(Shutdown::Both);
                    return;
                }
            }
            7 => {
                let n = u64::from_be_bytes(payload[2..10].try_into().unwrap());
                assert!(
                    n >= s.acked && n <= s.acked + s.unacked.len() as u64,
                    "the client ACKed {n} bytes, the relay sent {}",
                    s.acked + s.unacked.len() as u64
                );
                let confirmed = (n - s.acked) as usize;
                s.unacked.drain(..confirmed);
                s.acked = n;
            }
            other => panic!("the client sent a frame with tag {other}"),
        }
    }
    let mut s = session.lock().unwrap();
    if s.ws
        .as_ref()
        .is_some_and(|w| w.peer_addr().ok() == ws.peer_addr().ok())
    {
        s.ws = None;
    }
}

fn backend_to_client(mut backend: TcpStream, session: &Arc<Mutex<Session>>) {
    let mut buf = vec![0u8; 16384];
    loop {
        let n = match backend.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut s = session.lock().unwrap();
        s.unacked.extend_from_slice(&buf[..n]);
        if let Some(w) = s.ws.as_mut()
            && ws_server::write_frame(w, 0x2, &data_frame(&buf[..n])).is_err()
        {
            s.ws = None;
        }
    }
    let mut s = session.lock().unwrap();
    if let Some(w) = s.ws.as_mut() {
        ws_server::close(w, 1000, "backend closed");
    }
}
