//! Host key verification against OpenSSH `known_hosts` files.
//!
//! The Python original connected with `StrictHostKeyChecking=no`, which lets
//! anyone on the path read the registry password. absconda always checks:
//! a key must be recorded in `known_hosts` (plain or hashed entries, `[host]:port`
//! for other ports, wildcards, `@revoked`), pinned in the config by fingerprint,
//! or accepted on first use when the user asked for `accept-new`. A key that
//! differs from a recorded one — even one of another algorithm when only other
//! algorithms are recorded — is refused. There is deliberately no way to turn
//! checking off.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use russh::keys::{Algorithm, HashAlg, PublicKey};
use sha1::Sha1;

/// What the user allows for a host whose key is not recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostKeyPolicy {
    /// Refuse unknown hosts (OpenSSH `StrictHostKeyChecking=yes`).
    #[default]
    Strict,
    /// Record the key of a host seen for the first time; refuse changed keys
    /// (OpenSSH `StrictHostKeyChecking=accept-new`).
    AcceptNew,
}

/// The outcome of checking one server key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Recorded at this line of the file, or pinned in the config (line 0).
    Known { line: usize },
    /// No entry for this host at all.
    Unknown,
    /// Entries exist for this host, none with this key.
    Changed {
        lines: Vec<usize>,
        recorded: Vec<String>,
    },
    /// The key is marked `@revoked`.
    Revoked { line: usize },
}

/// One parsed `known_hosts` line.
#[derive(Debug, Clone)]
struct Entry {
    line: usize,
    revoked: bool,
    cert_authority: bool,
    patterns: String,
    key: PublicKey,
}

/// A `known_hosts` file, read once.
#[derive(Debug, Clone, Default)]
pub struct KnownHosts {
    path: PathBuf,
    entries: Vec<Entry>,
}

/// The name a host is recorded under: `host`, or `[host]:port` for other ports.
pub fn host_pattern(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// `SHA256:…`, as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

impl KnownHosts {
    /// Reads `path`; a missing file is an empty one. Lines that do not parse
    /// are skipped with a debug message, as OpenSSH does.
    pub fn load(path: &Path) -> std::io::Result<KnownHosts> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        Ok(KnownHosts {
            path: path.to_path_buf(),
            entries: parse(&text),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Key algorithms recorded for `name` (a [`host_pattern`]), to be offered
    /// first in key exchange so the server proves the key we know.
    pub fn algorithms_for(&self, name: &str) -> Vec<Algorithm> {
        let mut algs = Vec::new();
        for e in self.matching(name) {
            if e.revoked || e.cert_authority {
                continue;
            }
            let alg = e.key.algorithm();
            if e.key.algorithm().is_rsa() {
                for hash in [Some(HashAlg::Sha512), Some(HashAlg::Sha256)] {
                    let a = Algorithm::Rsa { hash };
                    if !algs.contains(&a) {
                        algs.push(a);
                    }
                }
            } else if !algs.contains(&alg) {
                algs.push(alg);
            }
        }
        algs
    }

    /// Checks `key` for `name`.
    pub fn check(&self, name: &str, key: &PublicKey) -> Verdict {
        for e in &self.entries {
            if e.revoked && e.key.key_data() == key.key_data() {
                return Verdict::Revoked { line: e.line };
            }
        }
        let mut lines = Vec::new();
        let mut recorded = Vec::new();
        for e in self.matching(name) {
            if e.revoked || e.cert_authority {
                continue;
            }
            if e.key.key_data() == key.key_data() {
                return Verdict::Known { line: e.line };
            }
            lines.push(e.line);
            recorded.push(format!("{} {}", e.key.algorithm(), fingerprint(&e.key)));
        }
        if lines.is_empty() {
            Verdict::Unknown
        } else {
            Verdict::Changed { lines, recorded }
        }
    }

    /// Appends `name key` to the file, creating it (and `~/.ssh`) if needed.
    /// One `write` of one line in append mode, so concurrent writers do not
    /// interleave.
    pub fn record(&mut self, name: &str, key: &PublicKey) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            fs::create_dir_all(dir)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
            }
        }
        let encoded = key
            .to_openssh()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let mut opts = fs::OpenOptions::new();
        opts.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = opts.open(&self.path)?;
        // Make sure we start on a fresh line even if the file lacks a final newline.
        let needs_newline = fs::read(&self.path)
            .map(|b| !b.is_empty() && !b.ends_with(b"\n"))
            .unwrap_or(false);
        let line = format!(
            "{}{} {}\n",
            if needs_newline { "\n" } else { "" },
            name,
            strip_comment(&encoded)
        );
        file.write_all(line.as_bytes())?;
        file.sync_all()?;
        let next = self.entries.iter().map(|e| e.line).max().unwrap_or(0) + 1;
        self.entries.push(Entry {
            line: next,
            revoked: false,
            cert_authority: false,
            patterns: name.to_string(),
            key: key.clone(),
        });
        Ok(())
    }

    fn matching<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries
            .iter()
            .filter(move |e| host_matches(&e.patterns, name))
    }
}

/// A `host_key:` pin from the config: a fingerprint or a public key line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pin {
    Fingerprint(String),
    Key(String),
}

impl Pin {
    pub fn parse(text: &str) -> Result<Pin, String> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("SHA256:") {
            if rest.is_empty() || rest.len() > 64 {
                return Err("a fingerprint looks like `SHA256:` followed by 43 base64 characters, as `ssh-keygen -lf` prints it".into());
            }
            return Ok(Pin::Fingerprint(format!(
                "SHA256:{}",
                rest.trim_end_matches('=')
            )));
        }
        match PublicKey::from_openssh(text) {
            Ok(k) => Ok(Pin::Key(fingerprint(&k))),
            Err(_) => Err(
                "expected `SHA256:…` (from `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`) or a public key line `ssh-ed25519 AAAA…`".into(),
            ),
        }
    }

    pub fn matches(&self, key: &PublicKey) -> bool {
        let fp = fingerprint(key);
        match self {
            Pin::Fingerprint(f) | Pin::Key(f) => *f == fp,
        }
    }

    pub fn fingerprint(&self) -> &str {
        match self {
            Pin::Fingerprint(f) | Pin::Key(f) => f,
        }
    }
}

fn strip_comment(openssh: &str) -> &str {
    let mut parts = openssh.splitn(3, ' ');
    match (parts.next(), parts.next()) {
        (Some(a), Some(b)) => &openssh[..a.len() + 1 + b.len()],
        _ => openssh,
    }
}

fn parse(text: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_ascii_whitespace();
        let mut first = fields.next().unwrap_or_default();
        let (mut revoked, mut cert_authority) = (false, false);
        if first.starts_with('@') {
            match first {
                "@revoked" => revoked = true,
                "@cert-authority" => cert_authority = true,
                _ => continue,
            }
            first = fields.next().unwrap_or_default();
        }
        let (Some(kind), Some(data)) = (fields.next(), fields.next()) else {
            tracing::debug!(line = i + 1, "known_hosts: skipping malformed line");
            continue;
        };
        match PublicKey::from_openssh(&format!("{kind} {data}")) {
            Ok(key) => out.push(Entry {
                line: i + 1,
                revoked,
                cert_authority,
                patterns: first.to_string(),
                key,
            }),
            Err(e) => {
                tracing::debug!(line = i + 1, error = %e, "known_hosts: skipping unreadable key")
            }
        }
    }
    out
}

/// OpenSSH's host list semantics: comma-separated patterns, `*` and `?`
/// wildcards, `!pattern` negation (a negated match rejects the entry), and
/// hashed `|1|salt|hmac` entries.
fn host_matches(patterns: &str, name: &str) -> bool {
    let mut matched = false;
    for pat in patterns.split(',') {
        let (negated, pat) = match pat.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, pat),
        };
        let hit = if let Some(hashed) = pat.strip_prefix("|1|") {
            hashed_matches(hashed, name)
        } else {
            wildcard_matches(pat.as_bytes(), name.as_bytes())
        };
        if hit && negated {
            return false;
        }
        matched |= hit;
    }
    matched
}

fn hashed_matches(hashed: &str, name: &str) -> bool {
    let Some((salt, hash)) = hashed.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (B64.decode(salt), B64.decode(hash)) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(&salt) else {
        return false;
    };
    mac.update(name.as_bytes());
    mac.verify_slice(&hash).is_ok()
}

fn wildcard_matches(pat: &[u8], s: &[u8]) -> bool {
    match pat.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| wildcard_matches(rest, &s[i..])),
        Some((b'?', rest)) => !s.is_empty() && wildcard_matches(rest, &s[1..]),
        Some((c, rest)) => s
            .split_first()
            .is_some_and(|(d, srest)| c.eq_ignore_ascii_case(d) && wildcard_matches(rest, srest)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED1: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDH4N0673+8lz5tj14CZrNA9OPGl37HV458CH8t1jVuG";
    const ED2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOXb5QvGvBPfw4Q3edOdX8AL7Wck634DBWwcFED+Hmro";
    const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBGQuaTyacL9yrdRTyz7MfxefCfdp1sFZa5aqDQ1GJhxIRmmvR4wI14oISE3SIfwuz46aOqa5JEDdP4Jypnr7ttM=";

    fn key(s: &str) -> PublicKey {
        PublicKey::from_openssh(s).unwrap()
    }

    fn hashed(name: &str, salt: &[u8]) -> String {
        let mut mac = Hmac::<Sha1>::new_from_slice(salt).unwrap();
        mac.update(name.as_bytes());
        format!(
            "|1|{}|{}",
            B64.encode(salt),
            B64.encode(mac.finalize().into_bytes())
        )
    }

    #[test]
    fn verdicts() {
        let text = format!(
            "# comment\n\
             builder.example {ED1}\n\
             [127.0.0.1]:2222 {ED1} root@x\n\
             {} {ECDSA}\n\
             *.wild.example,!bad.wild.example {ED1}\n\
             @revoked * {ED2}\n\
             garbage line\n",
            hashed("[10.0.0.5]:2200", b"0123456789abcdefghij")
        );
        let kh = KnownHosts {
            path: PathBuf::new(),
            entries: parse(&text),
        };
        let cases: Vec<(&str, &str, Verdict)> = vec![
            ("builder.example", ED1, Verdict::Known { line: 2 }),
            ("[127.0.0.1]:2222", ED1, Verdict::Known { line: 3 }),
            ("127.0.0.1", ED1, Verdict::Unknown),
            ("[10.0.0.5]:2200", ECDSA, Verdict::Known { line: 4 }),
            ("a.wild.example", ED1, Verdict::Known { line: 5 }),
            ("bad.wild.example", ED1, Verdict::Unknown),
            ("nobody.example", ED1, Verdict::Unknown),
            ("anything", ED2, Verdict::Revoked { line: 6 }),
        ];
        for (name, k, want) in cases {
            assert_eq!(kh.check(name, &key(k)), want, "{name}");
        }
        // Same algorithm, other key.
        match kh.check("builder.example", &key(ECDSA)) {
            Verdict::Changed { lines, .. } => assert_eq!(lines, vec![2]),
            v => panic!("{v:?}"),
        }
        // Other algorithm than the recorded one is a change too.
        match kh.check("[10.0.0.5]:2200", &key(ED1)) {
            Verdict::Changed { lines, recorded } => {
                assert_eq!(lines, vec![4]);
                assert!(recorded[0].starts_with("ecdsa-sha2-nistp256 SHA256:"));
            }
            v => panic!("{v:?}"),
        }
        assert_eq!(
            kh.algorithms_for("[10.0.0.5]:2200"),
            vec![key(ECDSA).algorithm()]
        );
    }

    #[test]
    fn record_then_known() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/known_hosts");
        let mut kh = KnownHosts::load(&path).unwrap();
        kh.record("[127.0.0.1]:2222", &key(ED1)).unwrap();
        let again = KnownHosts::load(&path).unwrap();
        assert_eq!(
            again.check("[127.0.0.1]:2222", &key(ED1)),
            Verdict::Known { line: 1 }
        );
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("[127.0.0.1]:2222 {ED1}\n"));
    }

    #[test]
    fn pins() {
        let fp = fingerprint(&key(ED1));
        assert!(Pin::parse(&fp).unwrap().matches(&key(ED1)));
        assert!(!Pin::parse(&fp).unwrap().matches(&key(ED2)));
        assert!(Pin::parse(ED1).unwrap().matches(&key(ED1)));
        assert!(Pin::parse("MD5:aa").is_err());
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_matches(b"*.example", b"a.example"));
        assert!(wildcard_matches(b"10.0.0.?", b"10.0.0.7"));
        assert!(!wildcard_matches(b"10.0.0.?", b"10.0.0.17"));
    }
}
