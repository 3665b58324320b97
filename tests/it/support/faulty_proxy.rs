//! A loopback HTTP proxy that breaks requests on a script.
//!
//! Sits in front of a real server (moto) and answers each incoming request
//! with the next [`Fault`] of its script, then with the `then` fault forever
//! (usually [`Fault::Pass`]). It counts requests and remembers each one's
//! `Action`, so tests can check that an error was not retried or that an
//! idempotent start made no `StartInstances` call.
//!
//! Requests are forwarded byte for byte (only `Connection` is rewritten), so
//! SigV4 signatures made for the proxy's `Host` still verify upstream. Each
//! connection carries one request and is then closed, which keeps the
//! proxy simple and makes every retry a fresh connection.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Forward to the upstream server.
    Pass,
    /// Answer with this status and a short plain-text body.
    Status(u16),
    /// 429 Too Many Requests with `Retry-After: seconds`.
    TooManyRequests { retry_after: u64 },
    /// An EC2 error document (`<Response><Errors><Error>…`).
    Ec2Error { status: u16, code: &'static str },
    /// Read the request, then reset the connection without answering.
    Reset,
    /// Answer with this status and body (an XML document the server could
    /// have sent, for states moto never shows, such as `stopping`).
    Answer { status: u16, body: String },
}

#[derive(Default)]
struct State {
    script: VecDeque<Fault>,
    then: Option<Fault>,
    actions: Vec<String>,
    /// Faults for one `Action`, whatever the script says.
    by_action: Vec<(String, Fault)>,
}

/// A running proxy; stops when dropped.
pub struct FaultyProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultyProxy {
    /// A proxy to `upstream` that passes everything until scripted.
    pub async fn start(upstream: SocketAddr) -> FaultyProxy {
        crate::support::watch();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(Mutex::new(State {
            then: Some(Fault::Pass),
            ..State::default()
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((sock, _)) = accepted else { continue };
                        connections.spawn(handle(sock, upstream, shared.clone()));
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        FaultyProxy { addr, state, task }
    }

    /// From now on: `faults` for the next requests, one each, then `then` for
    /// every later one. Resets the request log.
    pub fn script(&self, faults: impl IntoIterator<Item = Fault>, then: Fault) {
        let mut state = self.state.lock().expect("proxy state");
        state.script = faults.into_iter().collect();
        state.then = Some(then);
        state.actions.clear();
    }

    /// Every request for `action` (an EC2 `Action`) gets `fault`, before
    /// and beside the script.
    pub fn fail_action(&self, action: &str, fault: Fault) {
        let mut state = self.state.lock().expect("proxy state");
        state.by_action.retain(|(a, _)| a != action);
        state.by_action.push((action.to_string(), fault));
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received since the last [`FaultyProxy::script`], faulted or not.
    pub fn requests(&self) -> usize {
        self.state.lock().expect("proxy state").actions.len()
    }

    /// The `Action` of each request received, in order.
    pub fn actions(&self) -> Vec<String> {
        self.state.lock().expect("proxy state").actions.clone()
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(mut client: TcpStream, upstream: SocketAddr, state: Arc<Mutex<State>>) {
    let Some((head, body)) = read_request(&mut client).await else {
        return;
    };
    let action = url::form_urlencoded::parse(&body)
        .find(|(k, _)| k == "Action")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let fault = {
        let mut state = state.lock().expect("proxy state");
        state.actions.push(action.clone());
        if let Some((_, f)) = state.by_action.iter().find(|(a, _)| *a == action) {
            f.clone()
        } else {
            match state.script.pop_front() {
                Some(f) => f,
                None => state.then.clone().unwrap_or(Fault::Pass),
            }
        }
    };
    let response = match fault {
        Fault::Pass => match forward(&head, &body, upstream).await {
            Some(r) => r,
            None => canned(502, &[], "upstream failed"),
        },
        Fault::Status(status) => canned(status, &[], "injected fault"),
        Fault::TooManyRequests { retry_after } => canned(
            429,
            &[("Retry-After", retry_after.to_string())],
            "slow down",
        ),
        Fault::Ec2Error { status, code } => canned(
            status,
            &[("Content-Type", "text/xml".to_string())],
            &format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
                 <Message>injected {code}</Message></Error></Errors><RequestID>proxy</RequestID></Response>"
            ),
        ),
        Fault::Answer { status, body } => {
            canned(status, &[("Content-Type", "text/xml".to_string())], &body)
        }
        Fault::Reset => {
            // SO_LINGER 0: close sends RST instead of FIN.
            let _ = client.set_zero_linger();
            drop(client);
            return;
        }
    };
    let _ = client.write_all(&response).await;
    let _ = client.shutdown().await;
}

/// Reads one request: the head (through the blank line) and its body.
async fn read_request(sock: &mut TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(pos) = find(&buf, b"\r\n\r\n") {
            break pos + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(30), sock.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = buf[..head_end].to_vec();
    let length = header(&head, "content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((head, body))
}

/// Sends the request upstream on a fresh connection and returns its answer,
/// marked `Connection: close`.
async fn forward(head: &[u8], body: &[u8], upstream: SocketAddr) -> Option<Vec<u8>> {
    let mut up = TcpStream::connect(upstream).await.ok()?;
    up.write_all(&with_connection_close(head)).await.ok()?;
    up.write_all(body).await.ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), up.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    let head_end = find(&answer, b"\r\n\r\n")? + 4;
    let mut out = with_connection_close(&answer[..head_end]);
    out.extend_from_slice(&answer[head_end..]);
    Some(out)
}

/// The head with any `Connection`/`Keep-Alive` header replaced by `Connection: close`.
fn with_connection_close(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut lines: Vec<&str> = text
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            !lower.starts_with("connection:") && !lower.starts_with("keep-alive:")
        })
        .collect();
    lines.push("Connection: close");
    let mut out = lines.join("\r\n").into_bytes();
    out.extend_from_slice(b"\r\n\r\n");
    out
}

fn canned(status: u16, headers: &[(&str, String)], body: &str) -> Vec<u8> {
    let reason = match status {
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        400 => "Bad Request",
        _ => "Injected",
    };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    out.into_bytes()
}

fn header(head: &[u8], name: &str) -> Option<String> {
    String::from_utf8_lossy(head)
        .split("\r\n")
        .find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
