//! OpenSSH client configuration (`~/.ssh/config`), read natively.
//!
//! Only what decides where and how absconda connects is honoured; the rest is
//! ignored, as OpenSSH ignores options for features it does not use.
//! The rules follow `ssh_config(5)`: for each option the first value found
//! wins (except `IdentityFile` and `CertificateFile`, which accumulate);
//! `Host` patterns take `*`, `?` and `!` negation; `Match host`, `Match
//! originalhost`, `Match user`, `Match localuser` and `Match all` are
//! evaluated; `Include` reads further files (relative paths are under
//! `~/.ssh`, wildcards in the file name); `%h %n %p %r %u %d %%` are expanded.
//!
//! No option may run a program: `ProxyCommand`, `Match exec` and
//! `LocalCommand` are refused with the native replacement.

use std::path::{Path, PathBuf};

/// What `~/.ssh/config` says about one host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostConfig {
    pub host_name: Option<String>,
    pub user: Option<String>,
    pub port: Option<u16>,
    pub identity_files: Vec<PathBuf>,
    pub identities_only: Option<bool>,
    pub identity_agent: Option<String>,
    pub certificate_files: Vec<PathBuf>,
    /// `ProxyJump` as written (`none` means no jump).
    pub proxy_jump: Option<String>,
    pub user_known_hosts_file: Option<PathBuf>,
    pub host_key_alias: Option<String>,
    /// `yes` or `accept-new` (`no`/`off` are refused when read).
    pub strict_host_key_checking: Option<String>,
    pub connect_timeout: Option<u64>,
    pub server_alive_interval: Option<u64>,
    pub server_alive_count_max: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum SshConfigError {
    #[error("could not read `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{}` line {line}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

#[derive(Debug, Clone)]
enum Cond {
    All,
    Host(Vec<String>),
    Match(Vec<(String, Vec<String>)>),
}

#[derive(Debug, Clone)]
struct Opt {
    key: String,
    args: Vec<String>,
    path: PathBuf,
    line: usize,
}

#[derive(Debug, Clone)]
struct Block {
    cond: Cond,
    opts: Vec<Opt>,
}

/// A parsed configuration file with its `Include`s read in.
#[derive(Debug, Clone, Default)]
pub struct SshConfig {
    blocks: Vec<Block>,
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

fn local_user() -> String {
    std::env::var("USER").unwrap_or_else(|_| "root".into())
}

fn expand_tilde(s: &str) -> PathBuf {
    if s == "~" {
        return home();
    }
    match s.strip_prefix("~/") {
        Some(rest) => home().join(rest),
        None => PathBuf::from(s),
    }
}

/// Splits a line into words, honouring double quotes and `key=value`.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut has) = (false, false);
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                has = true;
            }
            c if !quoted && (c.is_whitespace() || (c == '=' && out.is_empty())) => {
                if has {
                    out.push(std::mem::take(&mut cur));
                    has = false;
                }
            }
            c => {
                cur.push(c);
                has = true;
            }
        }
    }
    if has {
        out.push(cur);
    }
    out
}

/// `*` and `?` wildcard matching, case-insensitive as OpenSSH's host matching.
pub fn wildcard(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.to_lowercase().chars().collect();
    let t: Vec<char> = text.to_lowercase().chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// A pattern list (`a,b,!c`): true when some pattern matches and no negated one does.
fn pattern_list(patterns: &[String], text: &str) -> bool {
    let mut hit = false;
    for pat in patterns.iter().flat_map(|p| p.split(',')) {
        if let Some(neg) = pat.strip_prefix('!') {
            if wildcard(neg, text) {
                return false;
            }
        } else if wildcard(pat, text) {
            hit = true;
        }
    }
    hit
}

impl SshConfig {
    /// Reads `path` and its includes. A missing file is an empty configuration.
    pub fn load(path: &Path) -> Result<SshConfig, SshConfigError> {
        let mut cfg = SshConfig {
            blocks: vec![Block {
                cond: Cond::All,
                opts: Vec::new(),
            }],
        };
        if path.exists() {
            cfg.read(path, 0)?;
        }
        Ok(cfg)
    }

    /// Parses text as if read from `path` (for tests).
    pub fn parse(path: &Path, text: &str) -> Result<SshConfig, SshConfigError> {
        let mut cfg = SshConfig {
            blocks: vec![Block {
                cond: Cond::All,
                opts: Vec::new(),
            }],
        };
        cfg.parse_text(path, text, 0)?;
        Ok(cfg)
    }

    fn read(&mut self, path: &Path, depth: usize) -> Result<(), SshConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| SshConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        self.parse_text(path, &text, depth)
    }

    fn parse_text(&mut self, path: &Path, text: &str, depth: usize) -> Result<(), SshConfigError> {
        let invalid = |line: usize, message: String| SshConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            message,
        };
        if depth > 16 {
            return Err(invalid(0, "`Include` nested too deeply (a loop?)".into()));
        }
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let w = words(trimmed);
            let Some((key, args)) = w.split_first() else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            match key.as_str() {
                "host" => {
                    if args.is_empty() {
                        return Err(invalid(line, "`Host` needs a pattern".into()));
                    }
                    self.blocks.push(Block {
                        cond: Cond::Host(args.to_vec()),
                        opts: Vec::new(),
                    });
                }
                "match" => {
                    let mut crit = Vec::new();
                    let mut it = args.iter();
                    while let Some(c) = it.next() {
                        let c = c.to_ascii_lowercase();
                        match c.as_str() {
                            "all" | "canonical" | "final" => crit.push((c, Vec::new())),
                            "host" | "originalhost" | "user" | "localuser" => {
                                let v = it.next().ok_or_else(|| {
                                    invalid(line, format!("`Match {c}` needs a pattern"))
                                })?;
                                crit.push((c, vec![v.clone()]));
                            }
                            "exec" => {
                                return Err(invalid(
                                    line,
                                    "`Match exec` runs a program, which absconda never does; use `Match host` or `Match user`, or set the builder's keys in absconda's config".into(),
                                ));
                            }
                            other => {
                                return Err(invalid(
                                    line,
                                    format!(
                                        "`Match {other}` is not supported (absconda reads `Match host`, `originalhost`, `user`, `localuser` and `all`)"
                                    ),
                                ));
                            }
                        }
                    }
                    self.blocks.push(Block {
                        cond: Cond::Match(crit),
                        opts: Vec::new(),
                    });
                }
                "include" => {
                    for arg in args {
                        let p = expand_tilde(arg);
                        let p = if p.is_absolute() {
                            p
                        } else {
                            home().join(".ssh").join(p)
                        };
                        for file in glob_files(&p) {
                            self.read(&file, depth + 1)?;
                        }
                    }
                }
                _ => {
                    if let Some(b) = self.blocks.last_mut() {
                        b.opts.push(Opt {
                            key,
                            args: args.to_vec(),
                            path: path.to_path_buf(),
                            line,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The names `Host` lines give literally (no wildcard, no negation),
    /// in file order: the aliases a user can name.
    pub fn aliases(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for block in &self.blocks {
            if let Cond::Host(patterns) = &block.cond {
                for p in patterns {
                    let literal = !p.contains(['*', '?', '!']);
                    if literal && !out.iter().any(|o| o.eq_ignore_ascii_case(p)) {
                        out.push(p.clone());
                    }
                }
            }
        }
        out
    }

    /// The settings for `alias` (what the user wrote as `host:`).
    /// `user` is the user absconda would log in as if the file names none.
    pub fn resolve(&self, alias: &str, user: Option<&str>) -> Result<HostConfig, SshConfigError> {
        let mut hc = HostConfig::default();
        let mut seen: Vec<String> = Vec::new();
        for block in &self.blocks {
            let applies = match &block.cond {
                Cond::All => true,
                Cond::Host(patterns) => pattern_list(patterns, alias),
                Cond::Match(crit) => crit.iter().all(|(c, v)| {
                    let pats = v.clone();
                    match c.as_str() {
                        "all" | "final" => true,
                        "canonical" => false,
                        "host" => pattern_list(
                            &pats,
                            &hc.host_name
                                .as_deref()
                                .map(|h| h.replace("%h", alias))
                                .unwrap_or_else(|| alias.to_string()),
                        ),
                        "originalhost" => pattern_list(&pats, alias),
                        "user" => pattern_list(
                            &pats,
                            hc.user.as_deref().or(user).unwrap_or(&local_user()),
                        ),
                        "localuser" => pattern_list(&pats, &local_user()),
                        _ => false,
                    }
                }),
            };
            if !applies {
                continue;
            }
            for opt in &block.opts {
                apply(&mut hc, &mut seen, opt)?;
            }
        }
        // Tokens, once everything is known.
        let original = alias.to_string();
        let host = hc
            .host_name
            .as_deref()
            .map(|h| h.replace("%h", &original).replace("%%", "%"))
            .unwrap_or_else(|| original.clone());
        hc.host_name = Some(host.clone());
        let remote_user = hc
            .user
            .clone()
            .or(user.map(str::to_string))
            .unwrap_or_else(local_user);
        let port = hc.port.unwrap_or(22).to_string();
        let expand = |s: &str| -> String {
            let mut out = String::new();
            let mut chars = s.chars();
            while let Some(c) = chars.next() {
                if c != '%' {
                    out.push(c);
                    continue;
                }
                match chars.next() {
                    Some('h') => out.push_str(&host),
                    Some('n') => out.push_str(&original),
                    Some('p') => out.push_str(&port),
                    Some('r') => out.push_str(&remote_user),
                    Some('u') => out.push_str(&local_user()),
                    Some('d') => out.push_str(&home().to_string_lossy()),
                    Some('%') => out.push('%'),
                    Some(o) => {
                        out.push('%');
                        out.push(o);
                    }
                    None => out.push('%'),
                }
            }
            out
        };
        let expand_path = |p: &PathBuf| expand_tilde(&expand(&p.to_string_lossy()));
        hc.identity_files = hc.identity_files.iter().map(expand_path).collect();
        hc.certificate_files = hc.certificate_files.iter().map(expand_path).collect();
        hc.user_known_hosts_file = hc.user_known_hosts_file.as_ref().map(expand_path);
        hc.identity_agent = hc.identity_agent.as_deref().map(|a| {
            if a.eq_ignore_ascii_case("none") || a == "SSH_AUTH_SOCK" {
                a.to_string()
            } else {
                expand_tilde(&expand(a)).to_string_lossy().into_owned()
            }
        });
        hc.host_key_alias = hc.host_key_alias.as_deref().map(expand);
        Ok(hc)
    }
}

/// Files matching `pattern` (wildcards in the file name only), sorted.
fn glob_files(pattern: &Path) -> Vec<PathBuf> {
    let name = pattern
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains(['*', '?']) {
        return if pattern.is_file() {
            vec![pattern.to_path_buf()]
        } else {
            Vec::new()
        };
    }
    let dir = pattern.parent().unwrap_or(Path::new("."));
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| wildcard(&name, &n.to_string_lossy()))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn apply(hc: &mut HostConfig, seen: &mut Vec<String>, opt: &Opt) -> Result<(), SshConfigError> {
    let invalid = |message: String| SshConfigError::Invalid {
        path: opt.path.clone(),
        line: opt.line,
        message,
    };
    let first = opt.args.first().cloned().unwrap_or_default();
    let key = opt.key.as_str();
    // Accumulating options.
    match key {
        "identityfile" => {
            hc.identity_files.push(PathBuf::from(&first));
            return Ok(());
        }
        "certificatefile" => {
            hc.certificate_files.push(PathBuf::from(&first));
            return Ok(());
        }
        _ => {}
    }
    if seen.iter().any(|s| s == key) {
        return Ok(());
    }
    seen.push(key.to_string());
    let num = |what: &str| -> Result<u64, SshConfigError> {
        first
            .parse()
            .map_err(|_| invalid(format!("`{what}` takes a number, not `{first}`")))
    };
    let yes_no = |what: &str| -> Result<bool, SshConfigError> {
        match first.to_ascii_lowercase().as_str() {
            "yes" | "true" => Ok(true),
            "no" | "false" => Ok(false),
            _ => Err(invalid(format!("`{what}` takes yes or no, not `{first}`"))),
        }
    };
    match key {
        "hostname" => hc.host_name = Some(first),
        "user" => hc.user = Some(first),
        "port" => {
            hc.port = Some(
                first
                    .parse()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| invalid(format!("`Port {first}` is not a TCP port")))?,
            )
        }
        "identitiesonly" => hc.identities_only = Some(yes_no("IdentitiesOnly")?),
        "identityagent" => hc.identity_agent = Some(first),
        "proxyjump" => hc.proxy_jump = Some(first),
        // The first file is where keys are looked up and recorded.
        "userknownhostsfile" if !first.eq_ignore_ascii_case("none") => {
            hc.user_known_hosts_file = Some(PathBuf::from(first));
        }
        "hostkeyalias" => hc.host_key_alias = Some(first),
        "stricthostkeychecking" => match first.to_ascii_lowercase().as_str() {
            "yes" | "ask" => hc.strict_host_key_checking = Some("yes".into()),
            "accept-new" => hc.strict_host_key_checking = Some("accept-new".into()),
            "no" | "off" => {
                return Err(invalid(format!(
                    "`StrictHostKeyChecking {first}` would accept any host key; absconda always checks host keys: use `accept-new` to record a new host's key on first use, or pin it with `host_key: SHA256:…` in absconda's config"
                )));
            }
            _ => {
                return Err(invalid(format!(
                    "`StrictHostKeyChecking {first}` is not a value OpenSSH knows"
                )));
            }
        },
        "connecttimeout" => hc.connect_timeout = Some(num("ConnectTimeout")?),
        "serveraliveinterval" => hc.server_alive_interval = Some(num("ServerAliveInterval")?),
        "serveralivecountmax" => hc.server_alive_count_max = Some(num("ServerAliveCountMax")?),
        "proxycommand" if !first.eq_ignore_ascii_case("none") => {
            return Err(invalid(
                "`ProxyCommand` runs a program, which absconda never does; use `ProxyJump` (or `jump:` in absconda's config) for a bastion, or `proxy: http://…` / `socks5://…` for a proxy".into(),
            ));
        }
        "localcommand" | "permitlocalcommand" | "knownhostscommand"
            if !first.eq_ignore_ascii_case("no") && !first.eq_ignore_ascii_case("none") =>
        {
            return Err(invalid(format!(
                "`{}` runs a program, which absconda never does; remove it for this host or set `ssh_config: false` for the builder",
                opt.key
            )));
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_are_the_literal_host_names() {
        let cfg = SshConfig::parse(
            Path::new("/t/config"),
            "Host *\n  User me\nHost a b\n  Port 1\nHost *.x !c.x d\nMatch host e\n  Port 2\nHost A\n",
        )
        .unwrap();
        assert_eq!(cfg.aliases(), ["a", "b", "d"]);
    }

    fn resolve(text: &str, alias: &str) -> Result<HostConfig, SshConfigError> {
        SshConfig::parse(Path::new("/t/config"), text)?.resolve(alias, None)
    }

    #[test]
    fn wildcards_and_negation() {
        for (p, t, want) in [
            ("*", "anything", true),
            ("build-?", "build-1", true),
            ("build-?", "build-12", false),
            ("*.corp.example", "a.corp.example", true),
            ("*.CORP.example", "a.corp.EXAMPLE", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
        ] {
            assert_eq!(wildcard(p, t), want, "{p} {t}");
        }
        let pats = vec!["*.corp".to_string(), "!secret.corp".to_string()];
        assert!(pattern_list(&pats, "build.corp"));
        assert!(!pattern_list(&pats, "secret.corp"));
    }

    #[test]
    fn real_world_configs() {
        // A typical corporate file: a bastion, hosts behind it, defaults last.
        let corp = r#"
# Company bastion
Host bastion
    HostName bastion.corp.example.com
    User ops
    Port 2222
    IdentityFile ~/.ssh/corp_ed25519

Host build-* !build-legacy
    HostName %h.internal.corp.example.com
    ProxyJump bastion
    User builder
    IdentitiesOnly yes

Host build-legacy
    HostName 10.1.2.3
    ProxyJump none

Match host *.internal.corp.example.com user builder
    IdentityFile ~/.ssh/%r_%h
    ServerAliveInterval 30

Host *
    User fallback
    IdentityFile ~/.ssh/id_ed25519
    ConnectTimeout 7
    ServerAliveCountMax 5
    StrictHostKeyChecking accept-new
    UserKnownHostsFile ~/.ssh/known_hosts_corp ~/.ssh/known_hosts
"#;
        let home = home();
        let b = resolve(corp, "build-7").unwrap();
        assert_eq!(
            b.host_name.as_deref(),
            Some("build-7.internal.corp.example.com")
        );
        assert_eq!(
            b.user.as_deref(),
            Some("builder"),
            "first value wins over `Host *`"
        );
        assert_eq!(b.proxy_jump.as_deref(), Some("bastion"));
        assert_eq!(b.identities_only, Some(true));
        assert_eq!(
            b.identity_files,
            vec![
                home.join(".ssh/builder_build-7.internal.corp.example.com"),
                home.join(".ssh/id_ed25519")
            ]
        );
        assert_eq!(b.server_alive_interval, Some(30));
        assert_eq!(b.server_alive_count_max, Some(5));
        assert_eq!(b.connect_timeout, Some(7));
        assert_eq!(b.strict_host_key_checking.as_deref(), Some("accept-new"));
        assert_eq!(
            b.user_known_hosts_file,
            Some(home.join(".ssh/known_hosts_corp"))
        );

        let l = resolve(corp, "build-legacy").unwrap();
        assert_eq!(l.host_name.as_deref(), Some("10.1.2.3"));
        assert_eq!(l.proxy_jump.as_deref(), Some("none"));
        assert_eq!(
            l.user.as_deref(),
            Some("fallback"),
            "negated out of `build-*`"
        );
        assert_eq!(
            l.server_alive_interval, None,
            "Match user builder does not apply"
        );

        let bastion = resolve(corp, "bastion").unwrap();
        assert_eq!(bastion.port, Some(2222));
        assert_eq!(bastion.user.as_deref(), Some("ops"));
        assert_eq!(bastion.identity_files[0], home.join(".ssh/corp_ed25519"));

        let other = resolve(corp, "example.org").unwrap();
        assert_eq!(other.host_name.as_deref(), Some("example.org"));
        assert_eq!(other.port, None);

        // `key=value`, quotes, tokens %d %u %p %n %%.
        let t = resolve(
            "Host x\n  HostName=\"real host\"\n  Port=2200\n  IdentityFile \"%d/keys/%u-%n-%p%%\"\n  HostKeyAlias %n-alias\n",
            "x",
        )
        .unwrap();
        assert_eq!(t.host_name.as_deref(), Some("real host"));
        assert_eq!(
            t.identity_files,
            vec![home.join(format!("keys/{}-x-2200%", local_user()))]
        );
        assert_eq!(t.host_key_alias.as_deref(), Some("x-alias"));
    }

    #[test]
    fn programs_and_disabled_checking_are_refused() {
        for (text, needle) in [
            ("Host x\n  ProxyCommand ssh -W %h:%p gw\n", "ProxyJump"),
            (
                "Host *\n  StrictHostKeyChecking no\n",
                "always checks host keys",
            ),
            ("Host *\n  StrictHostKeyChecking off\n", "accept-new"),
            ("Match exec \"true\"\n  User x\n", "runs a program"),
            ("Host x\n  PermitLocalCommand yes\n", "runs a program"),
        ] {
            let e = resolve(text, "x").unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
            assert!(e.contains("/t/config` line"), "{e}");
        }
        // Only for hosts they apply to.
        assert!(resolve("Host other\n  ProxyCommand nc %h %p\n", "x").is_ok());
        assert!(resolve("Host x\n  ProxyCommand none\n", "x").is_ok());
    }

    #[test]
    fn include_reads_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("conf.d")).unwrap();
        std::fs::write(d.join("conf.d/10-a.conf"), "Host a\n  HostName a.example\n").unwrap();
        std::fs::write(
            d.join("conf.d/20-b.conf"),
            "Host a b\n  HostName wrong\n  User from-b\n",
        )
        .unwrap();
        std::fs::write(d.join("conf.d/skip.txt"), "Host a\n  Port 1\n").unwrap();
        std::fs::write(
            d.join("config"),
            format!(
                "Include {}/conf.d/*.conf\nHost *\n  User default\n",
                d.display()
            ),
        )
        .unwrap();
        let cfg = SshConfig::load(&d.join("config")).unwrap();
        let a = cfg.resolve("a", None).unwrap();
        assert_eq!(a.host_name.as_deref(), Some("a.example"));
        assert_eq!(a.user.as_deref(), Some("from-b"));
        assert_eq!(a.port, None);
        let missing = SshConfig::load(&d.join("nope")).unwrap();
        assert_eq!(
            missing
                .resolve("a", Some("me"))
                .unwrap()
                .host_name
                .as_deref(),
            Some("a")
        );
    }
}
