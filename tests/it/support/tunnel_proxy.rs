//! HTTP CONNECT and SOCKS5 proxies on loopback, written from RFC 9110 §9.3.6,
//! RFC 1928 and RFC 1929, independently of absconda's client side.
//!
//! Each accepted tunnel is recorded (its destination and whether the client
//! authenticated), so tests can prove the SSH connection went through it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use base64::Engine as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Http,
    Socks5,
}

pub struct TunnelProxy {
    pub port: u16,
    pub kind: Kind,
    credentials: Option<(String, String)>,
    log: Arc<Mutex<Vec<String>>>,
}

impl TunnelProxy {
    /// Starts a proxy; with `credentials`, every tunnel needs them.
    pub fn start(kind: Kind, credentials: Option<(&str, &str)>) -> TunnelProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let credentials = credentials.map(|(u, p)| (u.to_string(), p.to_string()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (creds, l) = (credentials.clone(), log.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let (creds, l) = (creds.clone(), l.clone());
                std::thread::spawn(move || {
                    let _ = match kind {
                        Kind::Http => http(conn, creds.as_ref(), &l),
                        Kind::Socks5 => socks5(conn, creds.as_ref(), &l),
                    };
                });
            }
        });
        TunnelProxy {
            port,
            kind,
            credentials,
            log,
        }
    }

    /// The URL absconda is given (with the proxy's credentials).
    pub fn url(&self) -> String {
        let scheme = match self.kind {
            Kind::Http => "http",
            Kind::Socks5 => "socks5",
        };
        match &self.credentials {
            Some((u, p)) => format!("{scheme}://{u}:{p}@127.0.0.1:{}", self.port),
            None => format!("{scheme}://127.0.0.1:{}", self.port),
        }
    }

    /// `host:port` of every tunnel opened, in order; refused ones as `refused host:port`.
    pub fn tunnels(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

fn pipe(client: TcpStream, upstream: TcpStream) {
    let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    let (mut c, mut u) = (client, upstream);
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut u2);
        let _ = u2.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut u, &mut c);
    let _ = c.shutdown(std::net::Shutdown::Write);
    let _ = t.join();
}

fn http(
    conn: TcpStream,
    creds: Option<&(String, String)>,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or("").to_string(),
    );
    let mut auth = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("proxy-authorization")
        {
            auth = Some(v.trim().to_string());
        }
    }
    assert!(
        reader.buffer().is_empty(),
        "client sent data before the tunnel was up"
    );
    let mut conn = conn;
    if method != "CONNECT" {
        conn.write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")?;
        return Ok(());
    }
    if let Some((u, p)) = creds {
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        );
        if auth.as_deref() != Some(want.as_str()) {
            log.lock().unwrap().push(format!("refused {target}"));
            conn.write_all(
                b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n",
            )?;
            return Ok(());
        }
    }
    let upstream = match TcpStream::connect(&target) {
        Ok(u) => u,
        Err(_) => {
            conn.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")?;
            return Ok(());
        }
    };
    log.lock().unwrap().push(target);
    conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    pipe(conn, upstream);
    Ok(())
}

fn socks5(
    mut conn: TcpStream,
    creds: Option<&(String, String)>,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut head = [0u8; 2];
    conn.read_exact(&mut head)?;
    assert_eq!(head[0], 5);
    let mut methods = vec![0u8; head[1] as usize];
    conn.read_exact(&mut methods)?;
    let want = if creds.is_some() { 2 } else { 0 };
    if !methods.contains(&want) {
        conn.write_all(&[5, 0xff])?;
        return Ok(());
    }
    conn.write_all(&[5, want])?;
    let mut authed = true;
    if let Some((u, p)) = creds {
        let mut b = [0u8; 2];
        conn.read_exact(&mut b)?;
        let mut user = vec![0u8; b[1] as usize];
        conn.read_exact(&mut user)?;
        let mut l = [0u8; 1];
        conn.read_exact(&mut l)?;
        let mut pass = vec![0u8; l[0] as usize];
        conn.read_exact(&mut pass)?;
        authed = user == u.as_bytes() && pass == p.as_bytes();
        conn.write_all(&[1, if authed { 0 } else { 1 }])?;
    }
    if !authed {
        log.lock().unwrap().push("refused (bad credentials)".into());
        return Ok(());
    }
    let mut req = [0u8; 4];
    conn.read_exact(&mut req)?;
    let host = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            conn.read_exact(&mut a)?;
            std::net::Ipv4Addr::from(a).to_string()
        }
        3 => {
            let mut l = [0u8; 1];
            conn.read_exact(&mut l)?;
            let mut name = vec![0u8; l[0] as usize];
            conn.read_exact(&mut name)?;
            String::from_utf8(name).unwrap()
        }
        4 => {
            let mut a = [0u8; 16];
            conn.read_exact(&mut a)?;
            format!("[{}]", std::net::Ipv6Addr::from(a))
        }
        _ => return Ok(()),
    };
    let mut port = [0u8; 2];
    conn.read_exact(&mut port)?;
    let target = format!("{host}:{}", u16::from_be_bytes(port));
    let upstream = match TcpStream::connect(&target) {
        Ok(u) => u,
        Err(_) => {
            conn.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0])?;
            return Ok(());
        }
    };
    log.lock().unwrap().push(target);
    conn.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 0])?;
    pipe(conn, upstream);
    Ok(())
}
