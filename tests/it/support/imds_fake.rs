//! A local EC2 instance metadata service that behaves like the real one with
//! IMDSv2 required (`HttpTokens: required`), for the parts absconda and the
//! builder's self-stop script use:
//!
//! - `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds`
//!   (1–21600) returns a session token and echoes the TTL header; without
//!   the header, or with a TTL out of range, 400; a request carrying
//!   `X-Forwarded-For` (one that went through a proxy) is refused with 403;
//! - every `GET` needs `X-aws-ec2-metadata-token` with a live token, else
//!   401; then `/latest/meta-data/instance-id`,
//!   `/latest/meta-data/placement/availability-zone`,
//!   `/latest/meta-data/iam/security-credentials/` (the role's name) and
//!   `/latest/meta-data/iam/security-credentials/<role>` (the credentials
//!   document) answer, anything else 404.
//!
//! Every request is logged with what it carried, for tests to check.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The instance's zone (`placement/availability-zone`).
pub const AVAILABILITY_ZONE: &str = "eu-west-3b";

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// The TTL header of a token request.
    pub ttl: Option<String>,
    /// Whether a GET carried a live token.
    pub token_ok: bool,
    pub status: u16,
}

#[derive(Default)]
struct State {
    instance_id: String,
    role: String,
    credentials: Option<(String, String, String)>,
    tokens: Vec<(String, Instant)>,
    log: Vec<Seen>,
    next: u64,
}

pub struct ImdsFake {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl ImdsFake {
    /// An instance `instance_id` with role `role`, serving the given
    /// credentials (access key, secret, session token) when set.
    pub fn start(
        instance_id: &str,
        role: &str,
        credentials: Option<(&str, &str, &str)>,
    ) -> ImdsFake {
        crate::support::watch();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the IMDS fake");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            instance_id: instance_id.into(),
            role: role.into(),
            credentials: credentials.map(|(a, b, c)| (a.into(), b.into(), c.into())),
            ..State::default()
        }));
        let shared = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let shared = shared.clone();
                std::thread::spawn(move || serve(conn, &shared));
            }
        });
        ImdsFake { addr, state }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.state.lock().unwrap().log.clone()
    }
}

fn serve(conn: TcpStream, state: &Mutex<State>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut st = state.lock().unwrap();
    let now = Instant::now();
    st.tokens.retain(|(_, until)| *until > now);
    let mut seen = Seen {
        method: method.clone(),
        path: path.clone(),
        ttl: header("x-aws-ec2-metadata-token-ttl-seconds"),
        token_ok: false,
        status: 200,
    };
    let mut extra = Vec::new();
    let (status, body) = if method == "PUT" && path == "/latest/api/token" {
        match seen.ttl.as_deref().map(str::parse::<u64>) {
            _ if header("x-forwarded-for").is_some() => (403, String::new()),
            Some(Ok(ttl)) if (1..=21600).contains(&ttl) => {
                st.next += 1;
                let token = format!("AQAEAFake{}Token{:08}==", std::process::id(), st.next);
                st.tokens
                    .push((token.clone(), now + Duration::from_secs(ttl)));
                extra.push(format!("X-Aws-Ec2-Metadata-Token-Ttl-Seconds: {ttl}"));
                (200, token)
            }
            _ => (400, String::new()),
        }
    } else if method == "GET" || method == "HEAD" {
        let token = header("x-aws-ec2-metadata-token");
        seen.token_ok = token.is_some_and(|t| st.tokens.iter().any(|(k, _)| *k == t));
        if !seen.token_ok {
            (401, String::new())
        } else {
            let creds_dir = "/latest/meta-data/iam/security-credentials/";
            match path.as_str() {
                "/latest/meta-data/instance-id" => (200, st.instance_id.clone()),
                "/latest/meta-data/placement/availability-zone" => {
                    (200, AVAILABILITY_ZONE.to_string())
                }
                p if (p == creds_dir || p == creds_dir.trim_end_matches('/'))
                    && st.credentials.is_some() =>
                {
                    (200, st.role.clone())
                }
                p if p.strip_prefix(creds_dir) == Some(st.role.as_str()) => match &st.credentials {
                    Some((key, secret, token)) => {
                        let expires = chrono::Utc::now() + chrono::Duration::hours(6);
                        (
                                200,
                                serde_json::json!({
                                    "Code": "Success",
                                    "LastUpdated": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                                    "Type": "AWS-HMAC",
                                    "AccessKeyId": key,
                                    "SecretAccessKey": secret,
                                    "Token": token,
                                    "Expiration": expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                                })
                                .to_string(),
                            )
                    }
                    None => (404, String::new()),
                },
                _ => (404, String::new()),
            }
        }
    } else {
        (405, String::new())
    };
    seen.status = status;
    st.log.push(seen);
    drop(st);
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\nServer: EC2ws\r\n",
        body.len()
    );
    for h in extra {
        out.push_str(&h);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    let mut conn = conn;
    let _ = conn.write_all(out.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(fake: &ImdsFake, req: &str) -> String {
        use std::io::Read;
        let mut s = TcpStream::connect(fake.addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// The fake's own IMDSv2 rules: no token, no metadata.
    #[test]
    fn tokens_are_required_like_the_real_service() {
        let fake = ImdsFake::start("i-0123", "role", None);
        let get = "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(request(&fake, get).starts_with("HTTP/1.1 401"));
        let no_ttl = "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(request(&fake, no_ttl).starts_with("HTTP/1.1 400"));
        let proxied = "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n";
        assert!(request(&fake, proxied).starts_with("HTTP/1.1 403"));
        let put =
            "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n";
        let answer = request(&fake, put);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("X-Aws-Ec2-Metadata-Token-Ttl-Seconds: 60"));
        let token = answer.rsplit("\r\n\r\n").next().unwrap();
        let with = format!(
            "GET /latest/meta-data/instance-id HTTP/1.1\r\nX-aws-ec2-metadata-token: {token}\r\n\r\n"
        );
        assert!(request(&fake, &with).ends_with("\r\n\r\ni-0123"));
    }
}
