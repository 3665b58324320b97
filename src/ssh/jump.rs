//! Jump host specifications: `[user@]host[:port]`, as in `jump:` and
//! OpenSSH's `ProxyJump`.
//!
//! The chain itself is made by [`super::Session::connect`]: each hop is a
//! session of its own and the next one runs over its `direct-tcpip` channel.

use std::fmt;

/// One hop of a jump chain, as written in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JumpHost {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    /// Key files for this hop (from `~/.ssh/config`); empty means the builder's.
    pub identity_files: Vec<std::path::PathBuf>,
}

impl JumpHost {
    /// Parses `[user@]host[:port]`, `[user@][v6addr]:port` or
    /// `ssh://[user@]host[:port]`.
    pub fn parse(s: &str) -> Result<JumpHost, String> {
        let s = s.trim();
        let s = s.strip_prefix("ssh://").unwrap_or(s).trim_end_matches('/');
        if s.is_empty() {
            return Err("an empty jump host".into());
        }
        let (user, hostport) = match s.rsplit_once('@') {
            Some((u, h)) if !u.is_empty() => (Some(u.to_string()), h),
            Some(_) => return Err(format!("`{s}` has an empty user name")),
            None => (None, s),
        };
        let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
            let (h, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("`{s}`: unclosed `[`"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(parse_port(p, s)?),
                None if after.is_empty() => None,
                None => return Err(format!("`{s}` is not `[user@]host[:port]`")),
            };
            (h.to_string(), port)
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => (h.to_string(), Some(parse_port(p, s)?)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() || host.contains(char::is_whitespace) || host.contains(',') {
            return Err(format!("`{s}` is not `[user@]host[:port]`"));
        }
        Ok(JumpHost {
            user,
            host,
            port,
            identity_files: Vec::new(),
        })
    }

    /// Parses a `ProxyJump` value: hops separated by commas.
    pub fn parse_chain(s: &str) -> Result<Vec<JumpHost>, String> {
        s.split(',').map(JumpHost::parse).collect()
    }
}

fn parse_port(p: &str, whole: &str) -> Result<u16, String> {
    p.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("`{whole}`: `{p}` is not a TCP port"))
}

impl fmt::Display for JumpHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            write!(f, "{}", self.host)?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

impl serde::Serialize for JumpHost {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_jump_specs() {
        let table: &[(&str, Option<&str>, &str, Option<u16>)] = &[
            ("bastion", None, "bastion", None),
            (
                "ops@bastion.corp:2222",
                Some("ops"),
                "bastion.corp",
                Some(2222),
            ),
            ("ssh://ops@10.0.0.1:22", Some("ops"), "10.0.0.1", Some(22)),
            ("[::1]:2200", None, "::1", Some(2200)),
            ("me@[fe80::1]", Some("me"), "fe80::1", None),
            (
                "first.last@corp.com@gw",
                Some("first.last@corp.com"),
                "gw",
                None,
            ),
        ];
        for (input, user, host, port) in table {
            let j = JumpHost::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(j.user.as_deref(), *user, "{input}");
            assert_eq!(j.host, *host, "{input}");
            assert_eq!(j.port, *port, "{input}");
            assert_eq!(JumpHost::parse(&j.to_string()).unwrap(), j);
        }
        for bad in ["", "@host", "host:0", "host:ssh", "[::1", "a b"] {
            assert!(JumpHost::parse(bad).is_err(), "{bad}");
        }
        let chain = JumpHost::parse_chain("a@one:2201,two").unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1].host, "two");
    }
}
