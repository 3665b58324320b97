//! HTTP CONNECT and SOCKS5 proxies, spoken natively.
//!
//! Corporate networks often let SSH out only through a proxy. absconda opens
//! the TCP connection to the proxy, asks it for a tunnel to the builder (or
//! the first jump host), and hands the tunnel to the SSH layer as its
//! transport. Both protocols are small enough to write out here: HTTP
//! `CONNECT` (RFC 9110 §9.3.6) with optional Basic credentials, and SOCKS5
//! (RFC 1928) with optional username/password authentication (RFC 1929).
//! The host name is always sent to the proxy unresolved, so names only the
//! proxy can resolve work.
//!
//! Credentials never appear in messages: [`Proxy`] displays as
//! `http://user:***@host:port`.

use std::fmt;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Which protocol the proxy speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    HttpConnect,
    Socks5,
}

/// A proxy to reach SSH servers through.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    pub kind: ProxyKind,
    pub host: String,
    pub port: u16,
    /// User name and password, if the proxy asks for them.
    pub credentials: Option<(String, String)>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Proxy({self})")
    }
}

impl fmt::Display for Proxy {
    /// The URL with the password hidden.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.kind {
            ProxyKind::HttpConnect => "http",
            ProxyKind::Socks5 => "socks5",
        };
        write!(f, "{scheme}://")?;
        if let Some((user, _)) = &self.credentials {
            write!(f, "{user}:***@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl serde::Serialize for Proxy {
    /// As the URL with the password hidden.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Proxy {
    /// Parses `http://[user:pass@]host:port` or `socks5://[user:pass@]host:port`
    /// (`socks5h://` is accepted as a synonym: names are always resolved by
    /// the proxy). The error message never contains the password.
    pub fn parse(s: &str) -> Result<Proxy, String> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            "a proxy is a URL: `http://host:port` or `socks5://host:port`".to_string()
        })?;
        let (kind, default_port) = match scheme.to_ascii_lowercase().as_str() {
            "http" => (ProxyKind::HttpConnect, 8080),
            "socks5" | "socks5h" => (ProxyKind::Socks5, 1080),
            "https" => {
                return Err("`https://` proxies are not supported: use `http://` (the SSH connection inside the tunnel is encrypted anyway) or `socks5://`".into());
            }
            other => {
                return Err(format!(
                    "`{other}://` is not a proxy protocol absconda speaks: use `http://` (HTTP CONNECT) or `socks5://`"
                ));
            }
        };
        let rest = rest.trim_end_matches('/');
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let credentials = match userinfo {
            None => None,
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                Some((percent_decode(user)?, percent_decode(pass)?))
            }
        };
        let (host, port) = split_host_port(hostport, default_port)
            .ok_or_else(|| format!("`{hostport}` is not `host:port`"))?;
        if host.is_empty() {
            return Err("the proxy URL has no host".into());
        }
        Ok(Proxy {
            kind,
            host,
            port,
            credentials,
        })
    }

    /// Opens a TCP connection to the proxy and asks it for a tunnel to
    /// `host:port`. On success the stream carries the tunnel's bytes.
    pub async fn connect(&self, host: &str, port: u16) -> Result<TcpStream, ProxyError> {
        let mut socket = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(ProxyError::Dial)?;
        let _ = socket.set_nodelay(true);
        match self.kind {
            ProxyKind::HttpConnect => self.http_connect(&mut socket, host, port).await?,
            ProxyKind::Socks5 => self.socks5_connect(&mut socket, host, port).await?,
        }
        tracing::debug!(proxy = %self, %host, port, "proxy tunnel open");
        Ok(socket)
    }

    async fn http_connect(
        &self,
        socket: &mut TcpStream,
        host: &str,
        port: u16,
    ) -> Result<(), ProxyError> {
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some((user, pass)) = &self.credentials {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
        }
        request.push_str("\r\n");
        socket
            .write_all(request.as_bytes())
            .await
            .map_err(ProxyError::Io)?;

        // Read the response head one byte at a time so that nothing after
        // it (the SSH server's banner) is consumed.
        let mut head = Vec::with_capacity(256);
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() >= 16 * 1024 {
                return Err(ProxyError::Malformed(
                    "the HTTP response head is over 16 KiB".into(),
                ));
            }
            let b = socket.read_u8().await.map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    ProxyError::Malformed("the proxy closed the connection before answering".into())
                } else {
                    ProxyError::Io(e)
                }
            })?;
            head.push(b);
        }
        let head = String::from_utf8_lossy(&head);
        let status_line = head.lines().next().unwrap_or_default().trim().to_string();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        let code: u16 = parts
            .next()
            .and_then(|c| c.parse().ok())
            .filter(|_| version.starts_with("HTTP/"))
            .ok_or_else(|| {
                ProxyError::Malformed(format!("not an HTTP response: `{status_line}`"))
            })?;
        match code {
            200..=299 => Ok(()),
            // 407 is the standard answer; some proxies (tinyproxy) send 401.
            401 | 407 => Err(ProxyError::AuthRequired {
                sent: self.credentials.is_some(),
                status: status_line,
            }),
            _ => Err(ProxyError::Refused {
                target: authority,
                reply: status_line,
            }),
        }
    }

    async fn socks5_connect(
        &self,
        socket: &mut TcpStream,
        host: &str,
        port: u16,
    ) -> Result<(), ProxyError> {
        // Greeting: the methods we can do.
        let greeting: &[u8] = if self.credentials.is_some() {
            &[5, 2, 0x00, 0x02]
        } else {
            &[5, 1, 0x00]
        };
        socket.write_all(greeting).await.map_err(ProxyError::Io)?;
        let mut reply = [0u8; 2];
        read_exact(socket, &mut reply).await?;
        if reply[0] != 5 {
            return Err(ProxyError::Malformed(format!(
                "not a SOCKS5 server (version byte {})",
                reply[0]
            )));
        }
        match reply[1] {
            0x00 => {}
            0x02 => {
                let Some((user, pass)) = &self.credentials else {
                    return Err(ProxyError::AuthRequired {
                        sent: false,
                        status: "SOCKS5 username/password required".into(),
                    });
                };
                if user.len() > 255 || pass.len() > 255 {
                    return Err(ProxyError::Malformed(
                        "SOCKS5 user names and passwords are at most 255 bytes".into(),
                    ));
                }
                let mut msg = vec![1, user.len() as u8];
                msg.extend_from_slice(user.as_bytes());
                msg.push(pass.len() as u8);
                msg.extend_from_slice(pass.as_bytes());
                socket.write_all(&msg).await.map_err(ProxyError::Io)?;
                let mut status = [0u8; 2];
                read_exact(socket, &mut status).await?;
                if status[1] != 0 {
                    return Err(ProxyError::AuthRequired {
                        sent: true,
                        status: "SOCKS5 authentication failed".into(),
                    });
                }
            }
            0xff => {
                return Err(ProxyError::AuthRequired {
                    sent: self.credentials.is_some(),
                    status: "the SOCKS5 server accepts none of the offered authentication methods"
                        .into(),
                });
            }
            m => {
                return Err(ProxyError::Malformed(format!(
                    "the SOCKS5 server chose method {m}, which was not offered"
                )));
            }
        }

        // CONNECT request.
        let mut req = vec![5, 1, 0];
        match host.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(ip)) => {
                req.push(1);
                req.extend_from_slice(&ip.octets());
            }
            Ok(std::net::IpAddr::V6(ip)) => {
                req.push(4);
                req.extend_from_slice(&ip.octets());
            }
            Err(_) => {
                if host.len() > 255 {
                    return Err(ProxyError::Malformed(format!(
                        "`{host}` is too long for SOCKS5"
                    )));
                }
                req.push(3);
                req.push(host.len() as u8);
                req.extend_from_slice(host.as_bytes());
            }
        }
        req.extend_from_slice(&port.to_be_bytes());
        socket.write_all(&req).await.map_err(ProxyError::Io)?;
        let mut head = [0u8; 4];
        read_exact(socket, &mut head).await?;
        if head[0] != 5 {
            return Err(ProxyError::Malformed("bad SOCKS5 reply".into()));
        }
        if head[1] != 0 {
            let why = match head[1] {
                1 => "general SOCKS server failure",
                2 => "connection not allowed by ruleset",
                3 => "network unreachable",
                4 => "host unreachable",
                5 => "connection refused",
                6 => "TTL expired",
                7 => "command not supported",
                8 => "address type not supported",
                _ => "unknown error",
            };
            return Err(ProxyError::Refused {
                target: format!("{host}:{port}"),
                reply: format!("SOCKS5 reply {}: {why}", head[1]),
            });
        }
        // The bound address, which we do not need.
        let skip = match head[3] {
            1 => 4,
            4 => 16,
            3 => {
                let mut len = [0u8; 1];
                read_exact(socket, &mut len).await?;
                len[0] as usize
            }
            t => return Err(ProxyError::Malformed(format!("SOCKS5 address type {t}"))),
        };
        let mut rest = vec![0u8; skip + 2];
        read_exact(socket, &mut rest).await?;
        Ok(())
    }
}

async fn read_exact(socket: &mut TcpStream, buf: &mut [u8]) -> Result<(), ProxyError> {
    socket.read_exact(buf).await.map(|_| ()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ProxyError::Malformed("the proxy closed the connection mid-handshake".into())
        } else {
            ProxyError::Io(e)
        }
    })
}

/// `host:port`, `[v6]:port` or `host` (with the default port).
fn split_host_port(s: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok().filter(|p| *p > 0)?)),
        None => Some((s.to_string(), default_port)),
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "bad %-escape in the proxy's user or password".to_string())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the proxy's user or password is not UTF-8".to_string())
}

/// Why a proxy did not give us a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("could not connect to the proxy")]
    Dial(#[source] std::io::Error),
    #[error("talking to the proxy failed")]
    Io(#[source] std::io::Error),
    #[error("{}", if *sent { format!("the proxy refused the credentials ({status})") } else { format!("the proxy requires credentials ({status}): put them in the URL, `http://user:password@host:port`") })]
    AuthRequired { sent: bool, status: String },
    #[error("the proxy refused to connect to `{target}`: {reply}")]
    Refused { target: String, reply: String },
    #[error("the proxy's answer makes no sense: {0}")]
    Malformed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proxy_urls_and_hides_passwords() {
        let table = [
            ("http://proxy:3128", "http://proxy:3128", None),
            (
                "http://alice:s%40cret@proxy.corp:8080",
                "http://alice:***@proxy.corp:8080",
                Some(("alice", "s@cret")),
            ),
            ("socks5://127.0.0.1:1080", "socks5://127.0.0.1:1080", None),
            (
                "socks5h://bob:pw@[::1]:9050",
                "socks5://bob:***@[::1]:9050",
                Some(("bob", "pw")),
            ),
            ("socks5://gw", "socks5://gw:1080", None),
        ];
        for (input, shown, creds) in table {
            let p = Proxy::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(p.to_string(), shown, "{input}");
            assert_eq!(format!("{p:?}"), format!("Proxy({shown})"));
            assert_eq!(
                p.credentials
                    .as_ref()
                    .map(|(u, p)| (u.as_str(), p.as_str())),
                creds,
                "{input}"
            );
        }
        for bad in [
            "proxy:3128",
            "ftp://x:1",
            "https://x:1",
            "http://:80",
            "http://x:0",
            "http://u:p@x:notaport",
        ] {
            let e = Proxy::parse(bad).unwrap_err();
            assert!(!e.contains("p@"), "{e}");
        }
    }
}
