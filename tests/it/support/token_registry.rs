//! A docker registry that takes only Bearer tokens (`auth: token`, as
//! Docker Hub, GHCR and most hosted registries do), with its token service:
//! the real `docker-registry` checks the tokens; the token service is ours,
//! following the Docker Registry token authentication spec (GET `realm`
//! with `service` and `scope`, Basic credentials, a JWT whose `x5c` header
//! carries the signing certificate the registry trusts). It records every
//! token request so a test can check what a client sent.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use super::{free_port, spawn_daemon, wait_until};

pub const SERVICE: &str = "absconda-token-test";
const ISSUER: &str = "absconda-test-issuer";

/// One request to the token service.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub query: Vec<(String, String)>,
    /// The Basic credentials, if any.
    pub basic: Option<(String, String)>,
    pub user_agent: String,
}

struct Signer {
    key: RsaKeyPair,
    cert_der: Vec<u8>,
}

impl Signer {
    fn token(&self, subject: &str, scopes: &[String]) -> String {
        let access: Vec<serde_json::Value> = scopes
            .iter()
            .filter_map(|s| {
                let mut parts = s.splitn(3, ':');
                let (t, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                Some(serde_json::json!({
                    "type": t, "name": name,
                    "actions": actions.split(',').collect::<Vec<_>>(),
                }))
            })
            .collect();
        let now = chrono::Utc::now().timestamp();
        let header = serde_json::json!({
            "alg": "RS256", "typ": "JWT", "x5c": [STANDARD.encode(&self.cert_der)],
        });
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": subject, "aud": SERVICE,
            "exp": now + 600, "nbf": now - 30, "iat": now,
            "jti": format!("{now}-{}", rand_hex()), "access": access,
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0u8; self.key.public_modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }
}

fn rand_hex() -> String {
    let mut b = [0u8; 8];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub struct TokenRegistry {
    pub addr: String,
    pub user: &'static str,
    pub password: &'static str,
    signer: Arc<Signer>,
    requests: Arc<Mutex<Vec<TokenRequest>>>,
    child: std::process::Child,
}

impl Drop for TokenRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pem_der(path: &Path) -> Vec<u8> {
    let text = std::fs::read_to_string(path).unwrap();
    let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(b64).unwrap()
}

impl TokenRegistry {
    pub fn start(dir: &Path) -> TokenRegistry {
        let (user, password) = ("bearer-user", "b3arer-Pa55word-91d2");
        let key = dir.join("token-key.pem");
        let cert = dir.join("token-cert.pem");
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=absconda-token-test", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::piped())
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let signer = Arc::new(Signer {
            key: RsaKeyPair::from_pkcs8(&pem_der(&key)).expect("PKCS#8 key"),
            cert_der: pem_der(&cert),
        });
        let requests = Arc::new(Mutex::new(Vec::new()));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let realm = format!("http://{}/token", listener.local_addr().unwrap());
        {
            let (signer, requests) = (signer.clone(), requests.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let (signer, requests) = (signer.clone(), requests.clone());
                    std::thread::spawn(move || serve(conn, &signer, &requests, user, password));
                }
            });
        }
        let root = dir.join("token-registry");
        std::fs::create_dir_all(root.join("data")).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {data}\nhttp:\n  addr: {addr}\nauth:\n  token:\n    realm: {realm}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {cert}\n",
            data = root.join("data").display(),
            cert = cert.display(),
        );
        std::fs::write(root.join("config.yml"), config).unwrap();
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve")
            .arg(root.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(root.join("registry.log")).unwrap());
        let child = spawn_daemon(cmd).expect("start docker-registry");
        let reg = TokenRegistry {
            addr,
            user,
            password,
            signer,
            requests,
            child,
        };
        wait_until("token registry listening", Duration::from_secs(20), || {
            reg.curl("/v2/", "*/*", None).0 == 401
        });
        reg
    }

    /// Every token request so far.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.requests.lock().unwrap().clone()
    }

    fn curl(&self, path: &str, accept: &str, token: Option<&str>) -> (u16, Vec<u8>) {
        let mut curl = Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}", "-K", "-"])
            .args(["-H", &format!("Accept: {accept}")])
            .arg(format!("http://{}{path}", self.addr))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl");
        {
            let config = match token {
                Some(t) => format!("header = \"Authorization: Bearer {t}\"\n"),
                None => String::new(),
            };
            curl.stdin
                .take()
                .unwrap()
                .write_all(config.as_bytes())
                .unwrap();
        }
        let out = curl.wait_with_output().expect("curl");
        let mut body = out.stdout;
        let pos = body.iter().rposition(|b| *b == b'\n').unwrap();
        let code = String::from_utf8_lossy(&body[pos + 1..])
            .parse()
            .unwrap_or(0);
        body.truncate(pos);
        (code, body)
    }

    /// `GET` a path of the registry's API with a token that may pull `repo`.
    pub fn api(&self, repo: &str, path: &str, accept: &str) -> (u16, Vec<u8>) {
        let token = self
            .signer
            .token("test", &[format!("repository:{repo}:pull")]);
        self.curl(path, accept, Some(&token))
    }
}

fn serve(
    mut conn: std::net::TcpStream,
    signer: &Signer,
    requests: &Mutex<Vec<TokenRequest>>,
    user: &str,
    password: &str,
) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let target = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
        .to_string();
    let mut headers = BTreeMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let query: Vec<(String, String)> = target
        .split_once('?')
        .map(|(_, q)| {
            url::form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let basic = headers
        .get("authorization")
        .and_then(|a| a.strip_prefix("Basic "))
        .and_then(|b| STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(u, p)| (u.to_string(), p.to_string()))
        });
    requests.lock().unwrap().push(TokenRequest {
        query: query.clone(),
        basic: basic.clone(),
        user_agent: headers.get("user-agent").cloned().unwrap_or_default(),
    });
    let authorised = basic
        .as_ref()
        .is_some_and(|(u, p)| u == user && p == password);
    let right_service = query.iter().any(|(k, v)| k == "service" && v == SERVICE);
    let (status, body) = if !target.starts_with("/token") || !right_service {
        (
            "400 Bad Request",
            r#"{"errors":[{"code":"BAD_REQUEST"}]}"#.to_string(),
        )
    } else if !authorised {
        (
            "401 Unauthorized",
            r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#.to_string(),
        )
    } else {
        let scopes: Vec<String> = query
            .iter()
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split(' ').map(String::from).collect::<Vec<_>>())
            .collect();
        let token = signer.token(user, &scopes);
        (
            "200 OK",
            serde_json::json!({"token": token, "access_token": token, "expires_in": 600})
                .to_string(),
        )
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}
