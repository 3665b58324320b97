//! An HTTP stand-in in front of moto for CodeBuild's build status.
//!
//! moto's CodeBuild records `StartBuild` but runs nothing, and its
//! `BatchGetBuilds` reports every build `SUCCEEDED` the first time it is
//! asked. This server sits where the AWS endpoint is and forwards every
//! request to moto unchanged (moto checks the signatures), except that it
//! keeps the `StartBuild` requests it saw (the body absconda sent), and
//! rewrites `BatchGetBuilds` answers: `IN_PROGRESS` until the test sets a
//! final status, then that status (with a failed phase for `FAILED`, and a
//! run of 61.5 s).
//! `StopBuild` is forwarded and counted.

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use super::ws_server;

#[derive(Default)]
struct Shared {
    started: Vec<serde_json::Value>,
    build_ids: Vec<String>,
    stopped: Vec<String>,
    /// `(buildStatus, failed phase)` once the test ends the build.
    outcome: Option<(String, Option<String>)>,
    polls: usize,
    /// `METHOD path?query` of every request.
    requests: Vec<String>,
}

pub struct CodeBuildGate {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
}

impl CodeBuildGate {
    pub fn start(upstream: SocketAddr) -> CodeBuildGate {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the CodeBuild gate");
        let addr = listener.local_addr().expect("address");
        let shared = Arc::new(Mutex::new(Shared::default()));
        let sh = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let sh = sh.clone();
                std::thread::spawn(move || serve(conn, upstream, &sh));
            }
        });
        CodeBuildGate { addr, shared }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `StartBuild` request bodies, in order.
    pub fn started(&self) -> Vec<serde_json::Value> {
        self.shared.lock().unwrap().started.clone()
    }

    /// The ids moto gave the builds.
    pub fn build_ids(&self) -> Vec<String> {
        self.shared.lock().unwrap().build_ids.clone()
    }

    pub fn stopped(&self) -> Vec<String> {
        self.shared.lock().unwrap().stopped.clone()
    }

    /// `METHOD path?query` of every request, in order.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().unwrap().requests.clone()
    }

    pub fn polls(&self) -> usize {
        self.shared.lock().unwrap().polls
    }

    /// Builds run again until the next [`CodeBuildGate::finish`].
    pub fn reopen(&self) {
        self.shared.lock().unwrap().outcome = None;
    }

    /// Ends the builds with `status` (`SUCCEEDED`, `FAILED`, …).
    pub fn finish(&self, status: &str, failed_phase: Option<&str>) {
        self.shared.lock().unwrap().outcome =
            Some((status.to_string(), failed_phase.map(str::to_string)));
    }
}

fn serve(conn: TcpStream, upstream: SocketAddr, sh: &Mutex<Shared>) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut w = conn;
    let Some(up) = ws_server::read_upgrade(&mut reader) else {
        return;
    };
    let length: usize = up
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    sh.lock()
        .unwrap()
        .requests
        .push(format!("{} {}", up.method, up.target));
    let target = up.header("x-amz-target").unwrap_or_default().to_string();
    let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if target.ends_with(".StartBuild") {
        sh.lock().unwrap().started.push(request.clone());
    }
    if target.ends_with(".StopBuild") {
        let id = request["id"].as_str().unwrap_or_default().to_string();
        sh.lock().unwrap().stopped.push(id);
    }
    let Some((head, answer)) = forward(upstream, &up, &body) else {
        return;
    };
    let answer = if target.ends_with(".StartBuild") {
        let v: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
        if let Some(id) = v["build"]["id"].as_str() {
            sh.lock().unwrap().build_ids.push(id.to_string());
        }
        answer
    } else if target.ends_with(".BatchGetBuilds") && head.starts_with("HTTP/1.1 200") {
        let mut v: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
        let mut s = sh.lock().unwrap();
        s.polls += 1;
        if let Some(builds) = v["builds"].as_array_mut() {
            for b in builds {
                match &s.outcome {
                    None => {
                        b["buildStatus"] = "IN_PROGRESS".into();
                        b["buildComplete"] = false.into();
                        b["currentPhase"] = "BUILD".into();
                    }
                    Some((status, phase)) => {
                        b["buildStatus"] = status.as_str().into();
                        b["buildComplete"] = true.into();
                        // moto's end time is random; this build ran 61.5 s
                        // (epoch seconds, as the JSON protocol sends them).
                        b["startTime"] = 1_700_000_000.0.into();
                        b["endTime"] = 1_700_000_061.5.into();
                        if let (Some(phase), Some(phases)) = (phase, b["phases"].as_array_mut()) {
                            for p in phases {
                                if p["phaseType"] == phase.as_str() {
                                    p["phaseStatus"] = "FAILED".into();
                                }
                            }
                        }
                    }
                }
            }
        }
        serde_json::to_vec(&v).unwrap()
    } else {
        answer
    };
    let status_line = head.lines().next().unwrap_or("HTTP/1.1 502 Bad Gateway");
    let mut out = format!("{status_line}\r\n");
    for line in head.lines().skip(1) {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("content-length")
            || lower.starts_with("connection")
            || lower.starts_with("transfer-encoding")
            || line.is_empty()
        {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        answer.len()
    ));
    let _ = w.write_all(out.as_bytes());
    let _ = w.write_all(&answer);
}

/// Sends the request to moto; its answer's head and (de-chunked) body.
fn forward(
    upstream: SocketAddr,
    up: &ws_server::Upgrade,
    body: &[u8],
) -> Option<(String, Vec<u8>)> {
    let mut conn = TcpStream::connect(upstream).ok()?;
    let mut req = format!("{} {} HTTP/1.1\r\n", up.method, up.target);
    for (k, v) in &up.headers {
        if !k.eq_ignore_ascii_case("connection") {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    req.push_str("Connection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).ok()?;
    conn.write_all(body).ok()?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut rest = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        rest = dechunk(&rest);
    }
    Some((head, rest))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&data[..eol])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}
