//! Exit codes, and turning an error chain into what the user reads.
//!
//! The codes are part of the interface (scripts and CI branch on them) and
//! are documented in the README.

use crate::build::BuildError;
use crate::cloud::CloudError;
use crate::config::ConfigError;
use crate::lifecycle::LifecycleError;
use crate::ssh::SshError;
use crate::ssh::auth::AuthError;
use crate::ssh::exec::ExitStatus;

pub const SUCCESS: u8 = 0;
/// Anything not listed below.
pub const FAILURE: u8 = 1;
/// Bad command line or builders file.
pub const USAGE: u8 = 2;
/// The builder could not be reached or refused our keys.
pub const UNREACHABLE: u8 = 3;
/// The builder's host key is unknown, changed, revoked or does not match the pin.
pub const HOST_KEY: u8 = 4;
/// `docker build` failed on the builder.
pub const BUILD_FAILED: u8 = 5;
/// `docker login` or `docker push` failed.
pub const PUSH_FAILED: u8 = 6;
/// Another build held the builder for longer than `--remote-wait`.
pub const LEASE_TIMEOUT: u8 = 7;
/// A cloud API call failed (credentials, permissions, quota, outage).
pub const CLOUD: u8 = 8;
/// The builder did not become ready (SSH and docker) in time, or is unhealthy.
pub const NOT_READY: u8 = 9;
/// Interrupted by Ctrl-C (after cleaning up).
pub const INTERRUPTED: u8 = 130;

/// The exit code for an error, from the most specific cause in its chain.
pub fn code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<BuildError>() {
            match e {
                BuildError::LeaseTimeout { .. } => return LEASE_TIMEOUT,
                BuildError::DockerBuild { status, .. } if *status != ExitStatus::Unknown => {
                    return BUILD_FAILED;
                }
                BuildError::DockerPush { status, .. } if *status != ExitStatus::Unknown => {
                    return PUSH_FAILED;
                }
                BuildError::DockerBuild { .. }
                | BuildError::DockerPush { .. }
                | BuildError::Upload { .. } => {
                    // No exit status: the connection went away under the command.
                    return UNREACHABLE;
                }
                BuildError::Login { .. } => return PUSH_FAILED,
                BuildError::Interrupted => return INTERRUPTED,
                BuildError::NoDockerfile { .. } | BuildError::NoContext { .. } => return USAGE,
                BuildError::Docker { .. } => return NOT_READY,
                BuildError::Ssh(e) => {
                    return if e.is_host_key() {
                        HOST_KEY
                    } else {
                        UNREACHABLE
                    };
                }
                _ => {}
            }
        }
        if let Some(e) = cause.downcast_ref::<LifecycleError>() {
            return match e {
                LifecycleError::Gone { .. } => CLOUD,
                LifecycleError::NoHost { .. } | LifecycleError::AlwaysOn { .. } => USAGE,
                _ => NOT_READY,
            };
        }
        if let Some(e) = cause.downcast_ref::<SshError>() {
            return if e.is_host_key() {
                HOST_KEY
            } else {
                UNREACHABLE
            };
        }
        if cause.downcast_ref::<AuthError>().is_some() {
            return UNREACHABLE;
        }
        if cause.downcast_ref::<ConfigError>().is_some()
            || cause
                .downcast_ref::<crate::dockerfile::DockerfileError>()
                .is_some()
        {
            return USAGE;
        }
        if let Some(e) = cause.downcast_ref::<CloudError>() {
            return match e {
                CloudError::Timeout { what, .. } if what.contains("ready") => NOT_READY,
                _ => CLOUD,
            };
        }
    }
    FAILURE
}

/// A hint for errors where we know the fix.
pub fn hint(err: &anyhow::Error) -> Option<String> {
    for cause in err.chain() {
        let ssh =
            cause
                .downcast_ref::<SshError>()
                .or_else(|| match cause.downcast_ref::<BuildError>() {
                    Some(BuildError::Ssh(e)) => Some(&**e),
                    _ => None,
                });
        if let Some(e) = ssh {
            return match e {
                SshError::UnknownHostKey { name, fingerprint, known_hosts, .. } => Some(format!(
                    "compare {fingerprint} with the key on the builder (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` there, or the cloud console's serial output); if it matches, pin it in the builder's settings with `host_key: \"{fingerprint}\"`, or set `host_key_policy: accept-new` to record `{name}` in `{}` on first use",
                    known_hosts.display()
                )),
                SshError::HostKeyChanged { lines, known_hosts, .. } => Some(format!(
                    "if the builder was re-created, check its new fingerprint out of band, then delete line {} of `{}`; otherwise someone may be intercepting the connection: do not continue",
                    lines.first().copied().unwrap_or_default(),
                    known_hosts.display()
                )),
                SshError::PinMismatch { .. } => Some(
                    "if the builder was re-created, check its new fingerprint out of band and update `host_key:`".into(),
                ),
                SshError::Connect { addr, .. } | SshError::ConnectTimeout { addr, .. } => Some(format!(
                    "check that `{addr}` is reachable from here and sshd runs there; for a cloud builder, `absconda remote status NAME` shows its state"
                )),
                SshError::Auth(AuthError::Refused { user, .. }) => Some(format!(
                    "add the public key of your `identity_file` to `~/.ssh/authorized_keys` of `{user}` on the builder, or set `identity_file:`"
                )),
                _ => None,
            };
        }
        if let Some(e) = cause.downcast_ref::<BuildError>() {
            return match e {
                BuildError::LeaseTimeout { .. } => Some(
                    "wait longer with `--remote-wait SECS`, or see who holds it with `absconda remote status NAME`".into(),
                ),
                BuildError::DockerBuild { .. } => {
                    Some("the output above shows the failing step".into())
                }
                BuildError::Workspace { workspace, .. } => Some(format!(
                    "create it on the builder for the SSH user (`sudo install -d -o USER {workspace}`) or set `workspace:` to a folder the user can write"
                )),
                BuildError::Login { .. } => Some(
                    "check ABSCONDA_REGISTRY_USER/ABSCONDA_REGISTRY_PASSWORD or the `auths` entry in ~/.docker/config.json".into(),
                ),
                _ => None,
            };
        }
        if cause.downcast_ref::<ConfigError>().is_some() {
            return Some("the README's \"Configuration\" section lists every key".into());
        }
    }
    None
}

/// The error and its causes on one line, for retry messages.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let t = cause.to_string();
        if parts.last() != Some(&t) {
            parts.push(t);
        }
    }
    parts.join(": ")
}

/// Prints `error: …`, one `caused by: …` per cause, and a hint.
pub fn report(err: &anyhow::Error) {
    let mut lines = vec![format!("error: {err}")];
    let mut last = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        // thiserror's `transparent` repeats the same message one level down.
        if text != last {
            lines.push(format!("  caused by: {text}"));
        }
        last = text;
    }
    if let Some(h) = hint(err) {
        lines.push(format!("hint: {h}"));
    }
    eprintln!("{}", lines.join("\n"));
}
