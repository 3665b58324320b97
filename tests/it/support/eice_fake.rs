//! A fake EC2 Instance Connect Endpoint in front of moto.
//!
//! moto has no `DescribeInstanceConnectEndpoints`, so this server stands
//! where the EC2 endpoint is: that one action it answers itself (after
//! checking the request is signed for `ec2` with the test key), every other
//! request goes to moto unchanged (moto checks their signatures). The same
//! port serves the `openTunnel` websocket: its presigned URL's SigV4
//! signature is verified with the test credentials (service
//! `ec2-instance-connect`, only `host` signed, not expired), then binary
//! messages are relayed to and from `127.0.0.1:<remotePort>`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use super::sigv4;
use super::ws_server::{self, Upgrade};

pub const ENDPOINT_ID: &str = "eice-0123456789abcdef0";

struct Shared {
    upstream: SocketAddr,
    access_key: String,
    secret_key: String,
    region: String,
    opened: Mutex<Vec<Upgrade>>,
    refusals: Mutex<Vec<String>>,
    described: Mutex<usize>,
}

pub struct EiceFake {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl EiceFake {
    pub fn start(
        upstream: SocketAddr,
        access_key: &str,
        secret_key: &str,
        region: &str,
    ) -> EiceFake {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the EICE fake");
        let addr = listener.local_addr().expect("address");
        let shared = Arc::new(Shared {
            upstream,
            access_key: access_key.into(),
            secret_key: secret_key.into(),
            region: region.into(),
            opened: Mutex::new(Vec::new()),
            refusals: Mutex::new(Vec::new()),
            described: Mutex::new(0),
        });
        let sh = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let sh = sh.clone();
                std::thread::spawn(move || serve(conn, &sh));
            }
        });
        EiceFake { addr, shared }
    }

    /// For `api_endpoint:` (EC2, through this fake to moto).
    pub fn api_endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// For `eice_endpoint:` (in place of `wss://{DnsName}`).
    pub fn tunnel_endpoint(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub fn opened(&self) -> Vec<Upgrade> {
        self.shared.opened.lock().unwrap().clone()
    }

    pub fn refusals(&self) -> Vec<String> {
        self.shared.refusals.lock().unwrap().clone()
    }

    pub fn described(&self) -> usize {
        *self.shared.described.lock().unwrap()
    }
}

fn serve(conn: TcpStream, sh: &Shared) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut w = conn;
    let Some(up) = ws_server::read_upgrade(&mut reader) else {
        return;
    };
    if up
        .header("upgrade")
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
    {
        return tunnel(reader, w, up, sh);
    }
    // An EC2 API call.
    let length: usize = up
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let action = form
        .iter()
        .find(|(k, _)| k == "Action")
        .map(|(_, v)| v.as_str());
    if action == Some("DescribeInstanceConnectEndpoints") {
        let auth = up.header("authorization").unwrap_or_default();
        let scope_ok = auth.contains(&format!("Credential={}/", sh.access_key))
            && auth.contains(&format!("/{}/ec2/aws4_request", sh.region));
        *sh.described.lock().unwrap() += 1;
        if !scope_ok {
            sh.refusals
                .lock()
                .unwrap()
                .push(format!("describe signed as {auth}"));
            let body = "<Response><Errors><Error><Code>AuthFailure</Code><Message>bad signature</Message></Error></Errors></Response>";
            let _ = write!(
                w,
                "HTTP/1.1 401 Unauthorized\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            return;
        }
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<DescribeInstanceConnectEndpointsResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>fake</requestId><instanceConnectEndpointSet><item><ownerId>123456789012</ownerId><instanceConnectEndpointId>{ENDPOINT_ID}</instanceConnectEndpointId><dnsName>{ENDPOINT_ID}.0e1a2b3c.ec2-instance-connect-endpoint.{}.amazonaws.com</dnsName><state>create-complete</state></item></instanceConnectEndpointSet></DescribeInstanceConnectEndpointsResponse>",
            sh.region
        );
        let _ = write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return;
    }
    // Everything else: to moto as sent.
    let Ok(mut up_conn) = TcpStream::connect(sh.upstream) else {
        return;
    };
    let mut req = format!("{} {} HTTP/1.1\r\n", up.method, up.target);
    for (k, v) in &up.headers {
        if !k.eq_ignore_ascii_case("connection") {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    req.push_str("Connection: close\r\n\r\n");
    if up_conn.write_all(req.as_bytes()).is_err() || up_conn.write_all(&body).is_err() {
        return;
    }
    let mut answer = Vec::new();
    let _ = up_conn.read_to_end(&mut answer);
    let _ = w.write_all(&answer);
}

/// Checks the presigned URL as AWS would; `Err` says what is wrong.
fn verify(up: &Upgrade, sh: &Shared) -> Result<(), String> {
    let q: BTreeMap<String, String> = up.query().into_iter().collect();
    let get = |k: &str| q.get(k).cloned().ok_or(format!("no {k}"));
    if get("X-Amz-Algorithm")? != "AWS4-HMAC-SHA256" {
        return Err("algorithm".into());
    }
    if get("X-Amz-SignedHeaders")? != "host" {
        return Err("signed headers".into());
    }
    let cred = get("X-Amz-Credential")?;
    let parts: Vec<&str> = cred.split('/').collect();
    if parts.len() != 5
        || parts[0] != sh.access_key
        || parts[2] != sh.region
        || parts[3] != "ec2-instance-connect"
        || parts[4] != "aws4_request"
    {
        return Err(format!("credential scope {cred}"));
    }
    let date = get("X-Amz-Date")?;
    let signed_at = chrono::NaiveDateTime::parse_from_str(&date, "%Y%m%dT%H%M%SZ")
        .map_err(|e| e.to_string())?
        .and_utc();
    let expires: i64 = get("X-Amz-Expires")?.parse().map_err(|_| "expires")?;
    let age = (chrono::Utc::now() - signed_at).num_seconds();
    if !(-300..=expires).contains(&age) {
        return Err(format!("signed {age}s ago, valid for {expires}s"));
    }
    let canonical_query = q
        .iter()
        .filter(|(k, _)| *k != "X-Amz-Signature")
        .map(|(k, v)| format!("{}={}", sigv4::uri_encode(k), sigv4::uri_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let host = up.header("host").unwrap_or_default();
    let canonical = format!(
        "GET\n{}\n{canonical_query}\nhost:{host}\n\nhost\n{}",
        up.path(),
        sigv4::sha256_hex(b"")
    );
    if !date.starts_with(parts[1]) {
        return Err(format!(
            "credential scope date {} is not the signing date",
            parts[1]
        ));
    }
    let want = sigv4::signature(
        &sh.secret_key,
        &date,
        &sh.region,
        "ec2-instance-connect",
        &canonical,
    );
    if get("X-Amz-Signature")? != want {
        return Err("signature does not match".into());
    }
    Ok(())
}

fn tunnel(reader: BufReader<TcpStream>, mut w: TcpStream, up: Upgrade, sh: &Shared) {
    sh.opened.lock().unwrap().push(up.clone());
    let refuse = |w: &mut TcpStream, status: u16, why: String| {
        sh.refusals.lock().unwrap().push(why.clone());
        ws_server::refuse(w, status, &why);
    };
    if up.path() != "/openTunnel" {
        return refuse(&mut w, 404, format!("path {}", up.path()));
    }
    if let Err(why) = verify(&up, sh) {
        return refuse(&mut w, 403, why);
    }
    if up.param("instanceConnectEndpointId").as_deref() != Some(ENDPOINT_ID) {
        return refuse(&mut w, 400, "endpoint id".into());
    }
    let Some(port) = up.param("remotePort").and_then(|p| p.parse::<u16>().ok()) else {
        return refuse(&mut w, 400, "remotePort".into());
    };
    let Ok(backend) = TcpStream::connect(("127.0.0.1", port)) else {
        return refuse(&mut w, 502, "backend".into());
    };
    if ws_server::accept(&mut w, &up, None).is_err() {
        return;
    }
    let mut back_r = backend.try_clone().expect("clone");
    let mut ws_w = w.try_clone().expect("clone");
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 32768];
        loop {
            match back_r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_server::write_frame(&mut ws_w, 0x2, &buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        ws_server::close(&mut ws_w, 1000, "");
    });
    let mut reader = reader;
    let mut backend = backend;
    while let Some((opcode, payload)) = ws_server::read_frame(&mut reader) {
        match opcode {
            0x2 if backend.write_all(&payload).is_err() => break,
            0x8 => break,
            _ => {}
        }
    }
    let _ = backend.shutdown(Shutdown::Both);
    let _ = reader.get_ref().shutdown(Shutdown::Both);
    let _ = BufRead::fill_buf(&mut reader);
}
