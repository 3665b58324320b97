//! `remote health`: can this builder take a build right now?
//!
//! `remote status` describes a builder; health judges it, so that a script or
//! a monitoring job can act on the exit code. Each check is `ok`, `warn`,
//! `fail` or `skip` with a detail a person can act on:
//!
//! - `ssh`: reachable, with a host key we trust (the same check a build makes)
//! - `docker`: the daemon answers `docker version`
//! - `workspace`: the SSH user can make folders in the workspace (or, before
//!   the first build, where it will be created)
//! - `disk`: free space where the workspace lives (warn above 80% used, fail
//!   above 95%: a build that fills the disk fails half-way and leaves layers)
//! - `registry`: the builder can open a TCP connection to the registry it
//!   will push to, with whichever of `nc`, bash's `/dev/tcp`, `curl` or `wget`
//!   it has (a stock builder has at least one)
//!
//! Everything after the connection runs as one POSIX sh program in one
//! channel, passed as `sh -c SCRIPT NAME ARGS…` like the scripts in
//! [`crate::remote`], every argument quoted.

use std::time::Duration;

use crate::config::Builder;
use crate::provisioned::{self, Endpoint};
use crate::shell;

/// Disk use above which the disk check warns.
pub const WARN_USED_PCT: f64 = 80.0;
/// Disk use above which the disk check fails.
pub const FAIL_USED_PCT: f64 = 95.0;
/// How long the remote checks may take in total.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the builder tries to reach the registry.
pub const REGISTRY_TIMEOUT_SECS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("builder `{builder}` is unhealthy: {}", failed.join(", "))]
    Unhealthy {
        builder: String,
        failed: Vec<String>,
    },
    #[error("`{value}` is not a registry address: use `HOST:PORT` (or `HOST` for port 443)")]
    BadRegistry { value: String },
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
    /// Not checked: not asked for, or an earlier check failed.
    Skip,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
            Level::Skip => "skip",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Level,
    pub detail: String,
}

/// Every check of one builder.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub builder: String,
    pub address: String,
    pub user: String,
    /// No check failed (warnings are healthy).
    pub healthy: bool,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn failed(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|c| c.status == Level::Fail)
            .map(|c| c.name.to_string())
            .collect()
    }
}

/// A registry as `host` and `port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryAddr {
    pub host: String,
    pub port: u16,
}

impl RegistryAddr {
    /// `HOST:PORT`, `[v6]:PORT`, or `HOST` (443); an `https://` prefix and a
    /// path (`ghcr.io/lab/app`) are tolerated.
    pub fn parse(value: &str) -> Result<RegistryAddr, HealthError> {
        let bad = || HealthError::BadRegistry {
            value: value.to_string(),
        };
        let v = value.trim();
        let v = v
            .strip_prefix("https://")
            .or_else(|| v.strip_prefix("http://"))
            .unwrap_or(v);
        let v = v.split('/').next().unwrap_or_default();
        let (host, port) = provisioned::split_address(v);
        let ok_host = !host.is_empty()
            && !host.starts_with('-')
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:_".contains(&b));
        // A colon left in the host is a bad port, unless it is an IPv6 address.
        let ok_colons = !host.contains(':') || host.parse::<std::net::Ipv6Addr>().is_ok();
        if !ok_host || !ok_colons || port == Some(0) {
            return Err(bad());
        }
        Ok(RegistryAddr {
            host,
            port: port.unwrap_or(443),
        })
    }

    pub fn display(&self) -> String {
        provisioned::join_address(&self.host, self.port)
    }
}

pub use crate::util::chain;

const HEALTH: &str = r#"
docker=$1 ws=$2 rhost=$3 rport=$4 rtimeout=$5
limit() { # limit SECS CMD… : with timeout(1) when the builder has it
  if command -v timeout >/dev/null 2>&1; then timeout "$@"; else shift; "$@"; fi
}
oneline() { tr '\n' ' ' | cut -c1-400; }
if v=$(limit 20 "$docker" version --format '{{.Server.Version}}' 2>&1) && [ -n "$v" ]; then
  printf 'docker_server=%s\n' "$v"
else
  printf 'docker_error=%s\n' "$(printf '%s' "$v" | oneline)"
fi
d=$ws
while [ ! -d "$d" ] && [ "$d" != / ]; do d=$(dirname "$d"); done
printf 'disk_dir=%s\n' "$d"
df -Pk "$d" 2>/dev/null | awk 'NR==2 { print "disk_total_kb=" $2; print "disk_avail_kb=" $4 }'
if [ -d "$ws" ]; then echo workspace_exists=1; t="$ws/.absconda-health.$$"; else t="$d/.absconda-health.$$"; fi
if out=$(mkdir "$t" 2>&1); then
  rmdir "$t"; echo workspace=writable
else
  printf 'workspace_error=%s\n' "$(printf '%s' "$out" | oneline)"
fi
n=0
for r in "$ws"/runs/*; do [ -d "$r" ] && n=$((n + 1)); done
printf 'runs=%s\n' "$n"
if [ -e "$ws/.lease" ] && ! flock -n "$ws/.lease" true 2>/dev/null; then echo lease_held=1; fi
[ -n "$rhost" ] || exit 0
if command -v nc >/dev/null 2>&1; then
  tool=nc
  out=$(limit $((rtimeout + 1)) nc -z -w "$rtimeout" "$rhost" "$rport" </dev/null 2>&1); st=$?
elif command -v bash >/dev/null 2>&1; then
  tool=bash
  out=$(limit "$rtimeout" bash -c 'exec 3<>"/dev/tcp/$1/$2"' absconda-tcp "$rhost" "$rport" 2>&1); st=$?
elif command -v curl >/dev/null 2>&1; then
  tool=curl
  out=$(curl -s -S -o /dev/null -m "$rtimeout" --connect-timeout "$rtimeout" "http://$rhost:$rport/" 2>&1); st=$?
  # Any answer, even an HTTP error or a TLS port hanging up, means the port is open.
  case $st in 6|7|28) ;; *) st=0 ;; esac
elif command -v wget >/dev/null 2>&1; then
  tool=wget
  out=$(wget -O /dev/null -T "$rtimeout" -t 1 "http://$rhost:$rport/" 2>&1); st=$?
  case $out in *"connected."*) st=0 ;; esac
else
  echo registry_tool=none
  exit 0
fi
printf 'registry_tool=%s\n' "$tool"
if [ "$st" -eq 0 ]; then
  echo registry=ok
else
  [ "$st" -eq 124 ] && out="no answer within ${rtimeout}s"
  printf 'registry_error=%s\n' "$(printf '%s' "$out" | oneline)"
fi
"#;

/// The health program for the builder.
pub fn script(docker: &str, workspace: &str, registry: Option<&RegistryAddr>) -> String {
    let (host, port) = match registry {
        Some(r) => (r.host.clone(), r.port.to_string()),
        None => (String::new(), String::new()),
    };
    shell::join([
        "sh",
        "-c",
        HEALTH,
        "absconda-health",
        docker,
        workspace,
        &host,
        &port,
        &REGISTRY_TIMEOUT_SECS.to_string(),
    ])
}

/// What the health program printed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Findings {
    pub docker_server: Option<String>,
    pub docker_error: Option<String>,
    pub disk_dir: Option<String>,
    pub disk_total_kb: Option<u64>,
    pub disk_avail_kb: Option<u64>,
    pub registry_tool: Option<String>,
    pub registry_ok: bool,
    pub registry_error: Option<String>,
    /// Run folders in the workspace, and whether a build holds the lease
    /// (then one of them is its own).
    pub runs: Option<u64>,
    pub lease_held: bool,
    /// The SSH user could make a folder in the workspace (or, before it
    /// exists, where it would be made); why not otherwise.
    pub workspace_exists: bool,
    pub workspace_writable: bool,
    pub workspace_error: Option<String>,
}

impl Findings {
    pub fn parse(text: &str) -> Findings {
        let mut f = Findings::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let v = v.trim().to_string();
            match k {
                "docker_server" => f.docker_server = Some(v),
                "docker_error" => f.docker_error = Some(v),
                "disk_dir" => f.disk_dir = Some(v),
                "disk_total_kb" => f.disk_total_kb = v.parse().ok(),
                "disk_avail_kb" => f.disk_avail_kb = v.parse().ok(),
                "registry_tool" => f.registry_tool = Some(v),
                "registry" => f.registry_ok = v == "ok",
                "registry_error" => f.registry_error = Some(v),
                "runs" => f.runs = v.parse().ok(),
                "lease_held" => f.lease_held = v == "1",
                "workspace_exists" => f.workspace_exists = v == "1",
                "workspace" => f.workspace_writable = v == "writable",
                "workspace_error" => f.workspace_error = Some(v),
                _ => {}
            }
        }
        f
    }
}

/// Judges the disk: used percentage against the thresholds.
pub fn disk_check(f: &Findings, workspace: &str) -> Check {
    let (Some(total), Some(avail)) = (f.disk_total_kb, f.disk_avail_kb) else {
        return Check {
            name: "disk",
            status: Level::Fail,
            detail: format!("could not measure the disk of `{workspace}` (`df -Pk` gave nothing)"),
        };
    };
    let used = if total == 0 {
        100.0
    } else {
        100.0 * total.saturating_sub(avail) as f64 / total as f64
    };
    let status = if used > FAIL_USED_PCT {
        Level::Fail
    } else if used > WARN_USED_PCT {
        Level::Warn
    } else {
        Level::Ok
    };
    let dir = f.disk_dir.clone().unwrap_or_else(|| workspace.to_string());
    let mut detail = format!(
        "{} free of {} ({used:.0}% used) at `{dir}`",
        crate::util::human_bytes(avail * 1024),
        crate::util::human_bytes(total * 1024)
    );
    match status {
        Level::Fail => detail.push_str(&format!(
            "; above {FAIL_USED_PCT:.0}%: builds will fail (free space, e.g. `docker system prune` and `docker builder prune` there)"
        )),
        Level::Warn => detail.push_str(&format!("; above {WARN_USED_PCT:.0}%")),
        _ => {}
    }
    Check {
        name: "disk",
        status,
        detail,
    }
}

/// Whether builds can make their folders in the workspace, with the
/// command that fixes it when they cannot.
pub fn workspace_check(f: &Findings, workspace: &str, user: &str) -> Check {
    let dir = f.disk_dir.clone().unwrap_or_else(|| "/".into());
    if f.workspace_writable {
        return Check {
            name: "workspace",
            status: Level::Ok,
            detail: if f.workspace_exists {
                format!("`{user}` can write `{workspace}`")
            } else {
                format!("`{workspace}` does not exist yet; `{user}` can create it in `{dir}`")
            },
        };
    }
    let why = f
        .workspace_error
        .as_deref()
        .filter(|e| !e.is_empty())
        .unwrap_or("no reason given");
    Check {
        name: "workspace",
        status: Level::Fail,
        detail: format!(
            "`{user}` cannot {} ({why}): run `sudo install -d -o {user} {}` on the builder, or set `workspace:` to a folder `{user}` can write",
            if f.workspace_exists {
                format!("write `{workspace}`")
            } else {
                format!("create `{workspace}` in `{dir}`")
            },
            crate::shell::quote(workspace)
        ),
    }
}

/// Run folders no build holds: a lease supervisor that was killed (or a
/// reboot) left them, maybe with a registry login in them; the next build's
/// lease removes them.
pub fn runs_check(f: &Findings, workspace: &str) -> Check {
    let left = f.runs.unwrap_or(0).saturating_sub(u64::from(f.lease_held));
    Check {
        name: "runs",
        status: if left == 0 { Level::Ok } else { Level::Warn },
        detail: if left == 0 {
            format!("no run folders left over in `{workspace}/runs`")
        } else {
            format!(
                "{left} run folder(s) in `{workspace}/runs` left by builds whose supervisor died (they may hold a registry login); the next build removes them"
            )
        },
    }
}

/// Runs every check against the builder at `ep`.
pub async fn check(builder: &Builder, ep: &Endpoint, registry: Option<&RegistryAddr>) -> Report {
    let mut checks = Vec::new();
    let skipped = |name: &'static str, why: &str| Check {
        name,
        status: Level::Skip,
        detail: why.to_string(),
    };
    let session = provisioned::connect(ep).await;
    let session = match session {
        Ok(s) => {
            checks.push(Check {
                name: "ssh",
                status: Level::Ok,
                detail: format!(
                    "`{}` answered with host key {} ({})",
                    ep.target.display(),
                    crate::ssh::known_hosts::fingerprint(s.host_key()),
                    ep.trust()
                ),
            });
            Some(s)
        }
        Err(e) => {
            checks.push(Check {
                name: "ssh",
                status: Level::Fail,
                detail: chain(&e),
            });
            None
        }
    };
    let findings = match &session {
        Some(s) => {
            let cmd = script(&builder.docker, &builder.workspace, registry);
            match tokio::time::timeout(CHECK_TIMEOUT, s.output("health checks", &cmd, b"")).await {
                Ok(Ok(out)) => Ok(Findings::parse(&out.stdout_str())),
                Ok(Err(e)) => Err(Some(chain(&e))),
                Err(_) => Err(Some(format!(
                    "the checks did not finish within {}s",
                    CHECK_TIMEOUT.as_secs()
                ))),
            }
        }
        None => Err(None),
    };
    if let Some(s) = session {
        s.close().await;
    }
    match findings {
        Err(None) => {
            let why = "not checked: no SSH connection";
            for name in ["docker", "disk", "workspace", "registry"] {
                checks.push(skipped(name, why));
            }
        }
        Err(Some(why)) => {
            checks.push(Check {
                name: "docker",
                status: Level::Fail,
                detail: why.clone(),
            });
            checks.push(skipped("disk", &why));
            checks.push(skipped("workspace", &why));
            checks.push(skipped("registry", &why));
        }
        Ok(f) => {
            checks.push(match (&f.docker_server, &f.docker_error) {
                (Some(v), _) => Check {
                    name: "docker",
                    status: Level::Ok,
                    detail: format!("`{}` talks to server {v}", builder.docker),
                },
                (None, e) => Check {
                    name: "docker",
                    status: Level::Fail,
                    detail: format!(
                        "`{} version` did not reach the daemon: {}",
                        builder.docker,
                        e.as_deref()
                            .filter(|e| !e.is_empty())
                            .unwrap_or("no answer")
                    ),
                },
            });
            checks.push(disk_check(&f, &builder.workspace));
            checks.push(runs_check(&f, &builder.workspace));
            checks.push(workspace_check(&f, &builder.workspace, &ep.target.user));
            checks.push(match registry {
                None => skipped("registry", "not checked: no --registry given"),
                Some(r) if f.registry_ok => Check {
                    name: "registry",
                    status: Level::Ok,
                    detail: format!(
                        "the builder reached `{}` (with {})",
                        r.display(),
                        f.registry_tool.as_deref().unwrap_or("?")
                    ),
                },
                Some(r)
                    if f.registry_tool.as_deref() == Some("none") || f.registry_tool.is_none() =>
                {
                    Check {
                        name: "registry",
                        status: Level::Warn,
                        detail: format!(
                            "cannot check `{}`: the builder has none of nc, bash, curl or wget",
                            r.display()
                        ),
                    }
                }
                Some(r) => Check {
                    name: "registry",
                    status: Level::Fail,
                    detail: format!(
                        "the builder cannot connect to `{}` (with {}): {}",
                        r.display(),
                        f.registry_tool.as_deref().unwrap_or("?"),
                        f.registry_error.as_deref().unwrap_or("no reason given")
                    ),
                },
            });
        }
    }
    let healthy = !checks.iter().any(|c| c.status == Level::Fail);
    Report {
        builder: builder.name.clone(),
        address: ep.address(),
        user: ep.target.user.clone(),
        healthy,
        checks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_thresholds() {
        let f = |total, avail| Findings {
            disk_total_kb: Some(total),
            disk_avail_kb: Some(avail),
            ..Default::default()
        };
        let cases = [
            (1000, 500, Level::Ok),
            (1000, 200, Level::Ok),
            (1000, 199, Level::Warn),
            // 95% used exactly is a warning, not a failure.
            (1000, 50, Level::Warn),
            (1000, 49, Level::Fail),
            (1000, 0, Level::Fail),
            (0, 0, Level::Fail),
        ];
        for (total, avail, want) in cases {
            assert_eq!(
                disk_check(&f(total, avail), "/ws").status,
                want,
                "{total} {avail}"
            );
        }
        assert_eq!(disk_check(&Findings::default(), "/ws").status, Level::Fail);
    }

    #[test]
    fn findings_parse() {
        let f = Findings::parse(
            "docker_server=24.0.7\ndisk_dir=/ws\ndisk_total_kb=2048\ndisk_avail_kb=0\nregistry_tool=bash\nregistry_error=connect: Connection refused\n",
        );
        assert_eq!(f.docker_server.as_deref(), Some("24.0.7"));
        assert_eq!(f.disk_avail_kb, Some(0));
        assert!(!f.registry_ok);
        assert_eq!(f.registry_tool.as_deref(), Some("bash"));
    }

    #[test]
    fn registry_addresses() {
        let ok = [
            ("127.0.0.1:5000", "127.0.0.1", 5000),
            ("ghcr.io", "ghcr.io", 443),
            (
                "https://registry.example:8443/v2/",
                "registry.example",
                8443,
            ),
            (
                "europe-docker.pkg.dev/proj/repo",
                "europe-docker.pkg.dev",
                443,
            ),
            ("[::1]:5000", "::1", 5000),
        ];
        for (input, host, port) in ok {
            assert_eq!(
                RegistryAddr::parse(input).unwrap(),
                RegistryAddr {
                    host: host.into(),
                    port
                },
                "{input}"
            );
        }
        for bad in [
            "",
            "host:",
            "host:port",
            "-oProxy=x:1",
            "a b:1",
            "host:99999",
        ] {
            assert!(RegistryAddr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_script_parses_in_posix_shells() {
        crate::test_support::assert_parses(HEALTH);
    }

    /// The script against this machine: a closed port fails, an open one is reached.
    #[test]
    fn the_script_reaches_open_ports_only() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap().port();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let ws = tempfile::tempdir().unwrap();
        let run = |port: u16| {
            let out = std::process::Command::new("sh")
                .args(["-c", HEALTH, "absconda-health", "/nonexistent/docker"])
                .arg(ws.path())
                .args(["127.0.0.1", &port.to_string(), "2"])
                .output()
                .unwrap();
            Findings::parse(&String::from_utf8_lossy(&out.stdout))
        };
        let f = run(open);
        assert!(f.registry_ok, "{f:?}");
        assert!(f.docker_error.is_some());
        assert!(f.disk_total_kb.is_some());
        assert!(f.workspace_writable && f.workspace_exists, "{f:?}");
        assert_eq!(std::fs::read_dir(ws.path()).unwrap().count(), 0);
        let f = run(closed);
        assert!(!f.registry_ok, "{f:?}");
        assert!(f.registry_error.is_some(), "{f:?}");
    }
}
