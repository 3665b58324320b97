//! Builders made by `remote provision`: where they are and how to trust them.
//!
//! A provisioned builder's config usually has no `host:` — its address is
//! only known after Terraform made the machine — so every command that
//! connects to a builder asks [`endpoint`] instead of reading `host` itself:
//! the config's `host` when set (it always wins), else the address
//! `provision` saved in the state file. The host keys saved with it are
//! pinned for that address, so a provisioned builder needs neither
//! trust-on-first-use nor a `known_hosts` entry: the module's
//! `host_key_fingerprints` output, or, when that is empty for a `gcp` or
//! `aws` builder (a VM makes its keys at first boot, after Terraform is
//! done), the keys the cloud reports once the VM has published them (GCE
//! guest attributes, EC2 console output). When there are none, the
//! builder's `host_key_policy` applies as for any host.
//!
//! The state's `address` is `host:port` (`[v6]:port` for IPv6); a bare host
//! means port 22.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::config::Builder;
use crate::report::Reporter;
use crate::ssh::known_hosts::Pin;
use crate::ssh::{Session, SshError, Target};
use crate::state::{BuilderState, State, StateError, StateFile};

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("builder `{builder}` is already provisioned (since {at}, at `{address}`)")]
    AlreadyProvisioned {
        builder: String,
        at: DateTime<Utc>,
        address: String,
    },
    #[error("builder `{builder}` is not provisioned: the state file `{}` has no record of it and there is no Terraform state for it", state.display())]
    NotProvisioned {
        builder: String,
        state: std::path::PathBuf,
    },
    #[error(
        "builder `{builder}` has no `host` and is not provisioned, so absconda does not know where it is"
    )]
    NoAddress { builder: String },
    #[error(
        "refusing to destroy builder `{builder}` without confirmation: stdin is not a terminal"
    )]
    NoTerminal { builder: String },
    #[error("destroy of builder `{builder}` not confirmed")]
    NotConfirmed { builder: String },
    #[error("builder `{builder}` at `{address}` did not become ready (SSH and docker) within {}s: {last}", after.as_secs())]
    NotReady {
        builder: String,
        address: String,
        after: Duration,
        last: String,
    },
    #[error("builder `{builder}` at `{address}` cannot be trusted")]
    HostKey {
        builder: String,
        address: String,
        #[source]
        source: Box<SshError>,
    },
    #[error("the Terraform working copy of builder `{builder}` is gone (`{}`); absconda cannot destroy what it no longer knows", dir.display())]
    WorkdirGone {
        builder: String,
        dir: std::path::PathBuf,
    },
    #[error("interrupted")]
    Interrupted,
}

/// What `provision` saved about a builder.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Provisioned {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub instance: Option<String>,
    pub host_key_fingerprints: Vec<String>,
    pub provisioned_at: DateTime<Utc>,
}

/// `host:port`, with brackets around an IPv6 address.
pub fn join_address(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `host:port`, `[v6]:port`, a bare host or a bare IPv6 address → host and port.
pub fn split_address(address: &str) -> (String, Option<u16>) {
    let a = address.trim();
    if let Some(rest) = a.strip_prefix('[')
        && let Some((host, after)) = rest.split_once(']')
    {
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
        return (host.to_string(), port);
    }
    match a.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(p) => (host.to_string(), Some(p)),
            Err(_) => (a.to_string(), None),
        },
        _ => (a.to_string(), None),
    }
}

impl Provisioned {
    /// The provisioned part of a builder's state, if `provision` finished.
    pub fn from_state(state: &BuilderState) -> Option<Provisioned> {
        let at = state.provisioned_at?;
        let (host, port) = split_address(state.address.as_deref()?);
        if host.is_empty() {
            return None;
        }
        Some(Provisioned {
            host,
            port: port.unwrap_or(22),
            user: state.ssh_user.clone(),
            instance: state.instance.clone(),
            host_key_fingerprints: state.host_key_fingerprints.clone(),
            provisioned_at: at,
        })
    }

    pub fn address(&self) -> String {
        join_address(&self.host, self.port)
    }
}

/// The provisioned builder `name` in a loaded state.
pub fn lookup(state: &State, name: &str) -> Option<Provisioned> {
    state.builders.get(name).and_then(Provisioned::from_state)
}

/// Where the provisioned builder `name` listens, from the default state file:
/// `Ok(None)` when it is not provisioned. For the build command: use this
/// when the builder's config has no `host` (better: [`endpoint`], which also
/// pins the module's host keys and uses the module's `ssh_user`).
pub fn provisioned_address(name: &str) -> Result<Option<(String, u16)>, StateError> {
    let state = StateFile::default_location().load()?;
    Ok(lookup(&state, name).map(|p| (p.host, p.port)))
}

/// How to reach a builder and which host keys to accept.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub target: Target,
    /// Host key fingerprints a provisioned builder's module reported; when
    /// not empty, exactly these are accepted (the config's `host_key` still wins).
    pub pins: Vec<String>,
    /// Whether the address came from the state file.
    pub provisioned: Option<Provisioned>,
}

impl Endpoint {
    pub fn address(&self) -> String {
        join_address(&self.target.host, self.target.port)
    }

    /// How the host key is checked, for messages.
    pub fn trust(&self) -> String {
        if let Some(p) = &self.target.pin {
            format!("pinned `host_key: {}`", p.fingerprint())
        } else if !self.pins.is_empty() {
            "pinned by the Terraform module's host_key_fingerprints (or, without them, the keys the cloud reported at provisioning)".into()
        } else {
            format!("`{}`", self.target.known_hosts.display())
        }
    }
}

/// The SSH target of `builder` at `host:port` (as the build command makes it).
pub fn target_at(builder: &Builder, host: &str, port: u16) -> Target {
    Target {
        host: host.to_string(),
        port,
        user: builder.user.clone(),
        identity_files: builder.identity_files.clone(),
        certificate_files: builder.certificate_files.clone(),
        known_hosts: builder.known_hosts.clone(),
        policy: builder.host_key_policy,
        pin: builder.host_key.clone(),
        host_key_alias: builder.host_key_alias.clone(),
        connect_timeout: builder.connect_timeout,
        proxy: builder.proxy.clone(),
        jumps: builder
            .jump
            .iter()
            .map(|j| jump_target(builder, j))
            .collect(),
    }
}

/// The target of one jump host: its own address and user, the builder's
/// keys, known_hosts and host key policy.
fn jump_target(builder: &Builder, j: &crate::ssh::jump::JumpHost) -> Target {
    let user = j
        .user
        .clone()
        .unwrap_or_else(|| std::env::var("USER").unwrap_or_else(|_| "root".into()));
    let mut t = Target::new(
        &j.host,
        j.port.unwrap_or(22),
        &user,
        builder.known_hosts.clone(),
    );
    t.identity_files = if j.identity_files.is_empty() {
        builder.identity_files.clone()
    } else {
        j.identity_files.clone()
    };
    t.policy = builder.host_key_policy;
    t.connect_timeout = builder.connect_timeout;
    t
}

/// Where to connect for `builder`: its `host` when the config has one, else
/// the address `provision` saved (with the module's `ssh_user` and host keys).
pub fn endpoint(builder: &Builder, state: &State) -> Result<Endpoint, ProvisionError> {
    if let Some(host) = &builder.host {
        return Ok(Endpoint {
            target: target_at(builder, host, builder.port),
            pins: Vec::new(),
            provisioned: None,
        });
    }
    let p = lookup(state, &builder.name).ok_or_else(|| ProvisionError::NoAddress {
        builder: builder.name.clone(),
    })?;
    Ok(endpoint_at(builder, &p))
}

/// The endpoint of a provisioned builder.
pub fn endpoint_at(builder: &Builder, p: &Provisioned) -> Endpoint {
    let mut target = target_at(builder, &p.host, p.port);
    if let Some(u) = &p.user {
        target.user = u.clone();
    }
    Endpoint {
        target,
        pins: if builder.host_key.is_some() {
            Vec::new()
        } else {
            p.host_key_fingerprints.clone()
        },
        provisioned: Some(p.clone()),
    }
}

/// Connects, accepting exactly the endpoint's pinned host keys when it has
/// some. A server shows one of its keys per connection, so with several
/// pins the first attempt may present another pinned key; the connection is
/// then repeated pinned to that one. Any key outside the list is refused.
pub async fn connect(ep: &Endpoint) -> Result<Session, SshError> {
    let Some(first) = ep.pins.first() else {
        return Session::connect(&ep.target).await;
    };
    let mut target = ep.target.clone();
    target.pin = Some(Pin::Fingerprint(first.clone()));
    match Session::connect(&target).await {
        Err(SshError::PinMismatch {
            fingerprint, name, ..
        }) => {
            if ep.pins.contains(&fingerprint) {
                target.pin = Some(Pin::Fingerprint(fingerprint));
                Session::connect(&target).await
            } else {
                Err(SshError::PinMismatch {
                    name,
                    fingerprint,
                    pinned: ep.pins.join(", "),
                })
            }
        }
        other => other,
    }
}

/// Docker's server version on the builder, or why it did not answer.
pub async fn docker_version(session: &Session, docker: &str) -> Result<String, String> {
    let cmd = crate::shell::join([
        "sh",
        "-c",
        "exec \"$1\" version --format '{{.Server.Version}}'",
        "absconda-ready",
        docker,
    ]);
    match session.output("docker version", &cmd, b"").await {
        Ok(out) if out.status.success() && !out.stdout_str().trim().is_empty() => {
            Ok(out.stdout_str().trim().to_string())
        }
        Ok(out) => Err(format!(
            "`{docker} version` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', " ")
        )),
        Err(e) => Err(crate::util::chain(&e)),
    }
}

/// Waits until the builder answers SSH with a trusted host key and docker
/// answers there, retrying with backoff until `within` has passed. A host key
/// that cannot be trusted ends the wait at once: it is never retried.
pub async fn wait_ready(
    builder: &Builder,
    ep: &Endpoint,
    within: Duration,
    reporter: &dyn Reporter,
) -> Result<String, ProvisionError> {
    let started = Instant::now();
    let deadline = started + within;
    let mut delay = Duration::from_secs(1);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let try_once = async {
            let session = connect(ep).await.map_err(Attempt::Ssh)?;
            let v = docker_version(&session, &builder.docker).await;
            session.close().await;
            v.map_err(Attempt::Docker)
        };
        let outcome = tokio::select! {
            r = tokio::time::timeout(remaining.max(Duration::from_secs(1)), try_once) => r,
            _ = tokio::signal::ctrl_c() => return Err(ProvisionError::Interrupted),
        };
        let last = match outcome {
            Ok(Ok(version)) => return Ok(version),
            Ok(Err(Attempt::Ssh(e))) if e.is_host_key() => {
                return Err(ProvisionError::HostKey {
                    builder: builder.name.clone(),
                    address: ep.address(),
                    source: Box::new(e),
                });
            }
            Ok(Err(Attempt::Ssh(e))) => crate::util::chain(&e),
            Ok(Err(Attempt::Docker(m))) => m,
            Err(_) => "the attempt did not finish in time".to_string(),
        };
        if Instant::now() + delay >= deadline {
            return Err(ProvisionError::NotReady {
                builder: builder.name.clone(),
                address: ep.address(),
                after: within,
                last,
            });
        }
        if attempt == 1 || attempt.is_multiple_of(5) {
            reporter.info(&format!(
                "builder `{}` not ready yet ({last}); retrying for up to {}s more",
                builder.name,
                deadline.saturating_duration_since(Instant::now()).as_secs()
            ));
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = tokio::signal::ctrl_c() => return Err(ProvisionError::Interrupted),
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

enum Attempt {
    Ssh(SshError),
    Docker(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_table() {
        let cases: &[(&str, &str, Option<u16>)] = &[
            ("10.0.0.5:22", "10.0.0.5", Some(22)),
            ("127.0.0.1:2222", "127.0.0.1", Some(2222)),
            ("build.example", "build.example", None),
            ("[2001:db8::1]:2200", "2001:db8::1", Some(2200)),
            ("2001:db8::1", "2001:db8::1", None),
            ("host:notaport", "host:notaport", None),
        ];
        for (input, host, port) in cases {
            assert_eq!(split_address(input), (host.to_string(), *port), "{input}");
            if let Some(p) = port {
                assert_eq!(
                    split_address(&join_address(host, *p)),
                    (host.to_string(), Some(*p))
                );
            }
        }
    }

    #[test]
    fn only_a_finished_provision_counts() {
        let mut s = BuilderState {
            address: Some("10.0.0.5:2222".into()),
            ..Default::default()
        };
        assert_eq!(Provisioned::from_state(&s), None);
        s.provisioned_at = Some(Utc::now());
        let p = Provisioned::from_state(&s).unwrap();
        assert_eq!((p.host.as_str(), p.port), ("10.0.0.5", 2222));
        s.address = Some("10.0.0.6".into());
        assert_eq!(Provisioned::from_state(&s).unwrap().port, 22);
    }
}
