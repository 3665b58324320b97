//! The instance side of EC2 Instance Connect, for a loopback builder.
//!
//! On a real instance, sshd's `AuthorizedKeysCommand` asks the metadata
//! service for keys pushed with `SendSSHPublicKey` in the last 60 seconds.
//! Here the tap sits between absconda and moto (which checks the SigV4
//! signature and answers the API): every `SendSSHPublicKey` that moto
//! accepts is written to `<dir>/<InstanceOSUser>` as an authorized key with
//! `expiry-time` 60 seconds ahead, so sshd (`AuthorizedKeysFile <dir>/%u`)
//! accepts it only within the same window. Requests pass through unchanged
//! (the signature covers the Host header, so the tap keeps it as sent).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One `SendSSHPublicKey` as the tap saw it.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub at: Instant,
    pub headers: Vec<(String, String)>,
    pub body: Value,
    /// moto's HTTP status.
    pub status: u16,
}

pub struct InstanceConnectTap {
    addr: SocketAddr,
    pushed: Arc<Mutex<Vec<Pushed>>>,
}

struct Shared {
    upstream: SocketAddr,
    dir: PathBuf,
    window: Duration,
    pushed: Arc<Mutex<Vec<Pushed>>>,
}

impl InstanceConnectTap {
    /// Forwards to `upstream` (moto); keys go to `dir`, valid for `window`.
    pub fn start(upstream: SocketAddr, dir: PathBuf, window: Duration) -> InstanceConnectTap {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the tap");
        let addr = listener.local_addr().expect("tap address");
        let pushed = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::new(Shared {
            upstream,
            dir,
            window,
            pushed: pushed.clone(),
        });
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let shared = shared.clone();
                std::thread::spawn(move || serve(conn, &shared));
            }
        });
        InstanceConnectTap { addr, pushed }
    }

    /// The endpoint for `instance_connect_endpoint:`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pushed(&self) -> Vec<Pushed> {
        self.pushed.lock().unwrap().clone()
    }
}

/// One HTTP/1.1 message: head lines and body (Content-Length framed).
fn read_message(r: &mut BufReader<TcpStream>) -> Option<(Vec<String>, Vec<u8>)> {
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            break;
        }
        head.push(line);
    }
    let length = head
        .iter()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    r.read_exact(&mut body).ok()?;
    Some((head, body))
}

fn serve(conn: TcpStream, shared: &Shared) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut client = conn;
    while let Some((head, body)) = read_message(&mut reader) {
        let headers: Vec<(String, String)> = head
            .iter()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let target = headers
            .iter()
            .find(|(k, _)| k == "x-amz-target")
            .map(|(_, v)| v.clone());
        // Forward as sent, on a fresh connection that closes after the answer.
        let Ok(upstream) = TcpStream::connect(shared.upstream) else {
            return;
        };
        let mut up = upstream.try_clone().expect("clone");
        let mut request = String::new();
        request.push_str(&head[0]);
        request.push_str("\r\n");
        for line in head.iter().skip(1) {
            if !line.to_ascii_lowercase().starts_with("connection:") {
                request.push_str(line);
                request.push_str("\r\n");
            }
        }
        request.push_str("Connection: close\r\n\r\n");
        if up.write_all(request.as_bytes()).is_err() || up.write_all(&body).is_err() {
            return;
        }
        let mut up_reader = BufReader::new(upstream);
        let Some((resp_head, resp_body)) = read_message(&mut up_reader) else {
            return;
        };
        let status: u16 = resp_head[0]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if target.as_deref() == Some("AWSEC2InstanceConnectService.SendSSHPublicKey") {
            let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if status == 200 {
                authorize(shared, &json);
            }
            shared.pushed.lock().unwrap().push(Pushed {
                at: Instant::now(),
                headers: headers.clone(),
                body: json,
                status,
            });
        }
        let mut answer = String::new();
        for line in &resp_head {
            let lower = line.to_ascii_lowercase();
            if !lower.starts_with("connection:") && !lower.starts_with("content-length:") {
                answer.push_str(line);
                answer.push_str("\r\n");
            }
        }
        answer.push_str(&format!("Content-Length: {}\r\n\r\n", resp_body.len()));
        if client.write_all(answer.as_bytes()).is_err() || client.write_all(&resp_body).is_err() {
            return;
        }
    }
}

/// What the instance's `AuthorizedKeysCommand` would print for the user
/// during the window.
fn authorize(shared: &Shared, body: &Value) {
    let (Some(user), Some(key)) = (
        body["InstanceOSUser"].as_str(),
        body["SSHPublicKey"].as_str(),
    ) else {
        return;
    };
    if user.contains('/') || key.contains('\n') {
        return;
    }
    let until =
        chrono::Utc::now() + chrono::Duration::from_std(shared.window).expect("a short window");
    let line = format!("expiry-time=\"{}\" {key}\n", until.format("%Y%m%d%H%M%SZ"));
    let path = shared.dir.join(user);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the user's authorized keys");
    f.write_all(line.as_bytes())
        .expect("write an authorized key");
}
