//! Exit codes, and turning an error chain into what the user reads.
//!
//! The codes are part of the interface (scripts and CI branch on them) and
//! are documented in the README.

use crate::build::BuildError;
use crate::cloud::CloudError;
use crate::config::ConfigError;
use crate::health::HealthError;
use crate::lifecycle::LifecycleError;
use crate::provisioned::ProvisionError;
use crate::ssh::SshError;
use crate::ssh::auth::AuthError;
use crate::ssh::exec::ExitStatus;
use crate::state::StateError;
use crate::terraform::TerraformError;

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
/// Terraform is missing, too old, or failed (`remote provision`, `remote destroy`).
pub const TERRAFORM: u8 = 10;
/// The builder's state forbids it: `provision` of a builder the state file
/// records as provisioned, `destroy` of one it does not, or another absconda
/// provisioning or destroying it right now.
pub const STATE_CONFLICT: u8 = 11;
/// An input file (`--file`, `--requirements`, `--tarball`) is missing,
/// unreadable or invalid.
pub const INPUT: u8 = 12;
/// Interrupted by Ctrl-C (after cleaning up).
pub const INTERRUPTED: u8 = 130;

/// The exit code for an error, from the most specific cause in its chain.
pub fn code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<crate::commands::multiplatform::PlatformError>()
            && e.is_usage()
        {
            return USAGE;
        }
        if cause
            .downcast_ref::<crate::registry_api::RegistryApiError>()
            .is_some()
        {
            return PUSH_FAILED;
        }
        if let Some(e) = cause.downcast_ref::<ProvisionError>() {
            return match e {
                ProvisionError::AlreadyProvisioned { .. }
                | ProvisionError::NotProvisioned { .. } => STATE_CONFLICT,
                ProvisionError::NoAddress { .. }
                | ProvisionError::NoTerminal { .. }
                | ProvisionError::NotConfirmed { .. } => USAGE,
                ProvisionError::NotReady { .. } => NOT_READY,
                ProvisionError::HostKey { .. } => HOST_KEY,
                ProvisionError::WorkdirGone { .. } => FAILURE,
                ProvisionError::Interrupted => INTERRUPTED,
            };
        }
        if let Some(e) = cause.downcast_ref::<TerraformError>() {
            return match e {
                TerraformError::NothingToProvision { .. }
                | TerraformError::NoModule { .. }
                | TerraformError::NotAModule { .. }
                | TerraformError::MissingVariable { .. }
                | TerraformError::NoPublicKey { .. }
                | TerraformError::ReachesTooFar { .. }
                | TerraformError::TooBig { .. } => USAGE,
                TerraformError::Interrupted { .. } => INTERRUPTED,
                TerraformError::Busy { .. } => STATE_CONFLICT,
                _ => TERRAFORM,
            };
        }
        if let Some(e) = cause.downcast_ref::<HealthError>() {
            return match e {
                HealthError::Unhealthy { .. } => NOT_READY,
                HealthError::BadRegistry { .. } => USAGE,
            };
        }
        if let Some(e) = cause.downcast_ref::<crate::service::ServiceError>() {
            return e.exit_code();
        }
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
                | BuildError::Upload { .. }
                | BuildError::LeaseLost { .. } => {
                    // No exit status: the connection went away under the command.
                    return UNREACHABLE;
                }
                BuildError::Login { .. } => return PUSH_FAILED,
                BuildError::Interrupted => return INTERRUPTED,
                BuildError::NoDockerfile { .. }
                | BuildError::NoContext { .. }
                | BuildError::SecretsNeedBuildKit { .. }
                | BuildError::Cache { .. }
                | BuildError::Context(
                    crate::context::ContextError::InputParentNotAFolder { .. }
                    | crate::context::ContextError::DockerfileOutside { .. },
                ) => return USAGE,
                BuildError::Output(
                    crate::outputs::OutputError::Spec { .. }
                    | crate::outputs::OutputError::NotEmpty { .. },
                ) => return USAGE,
                BuildError::Docker { .. } | BuildError::BuildContextUnsupported { .. } => {
                    return NOT_READY;
                }
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
        if cause.is::<crate::access::AccessError>()
            || cause.is::<crate::cloud::iap::IapError>()
            || cause.is::<crate::cloud::eice::EiceError>()
        {
            return UNREACHABLE;
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
        if let Some(e) = cause.downcast_ref::<crate::commands::init::InitError>() {
            return match e {
                crate::commands::init::InitError::Write { .. } => FAILURE,
                _ => USAGE,
            };
        }
        if cause.downcast_ref::<ConfigError>().is_some()
            || cause
                .downcast_ref::<crate::secrets::SecretError>()
                .is_some()
            || cause
                .downcast_ref::<crate::named_contexts::SpecError>()
                .is_some()
            || matches!(
                cause.downcast_ref::<crate::outputs::OutputError>(),
                Some(
                    crate::outputs::OutputError::Spec { .. }
                        | crate::outputs::OutputError::NotEmpty { .. }
                )
            )
        {
            return USAGE;
        }
        if let Some(e) = cause.downcast_ref::<crate::dockerfile::DockerfileError>() {
            return match e {
                crate::dockerfile::DockerfileError::InvalidOption { .. } => USAGE,
                _ => INPUT,
            };
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
    // A tunnel's refusal says more than the connect error around it.
    for cause in err.chain() {
        // Tunnel errors the wait for readiness retried arrive wrapped in
        // the SSH connect error's `io::Error`.
        let wrapped = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|e| e as &(dyn std::error::Error + 'static));
        for c in [Some(cause), wrapped].into_iter().flatten() {
            if let Some(h) = c
                .downcast_ref::<crate::cloud::iap::IapError>()
                .and_then(|e| e.hint())
                .or_else(|| {
                    c.downcast_ref::<crate::cloud::eice::EiceError>()
                        .and_then(|e| e.hint())
                })
            {
                return Some(h);
            }
        }
    }
    for cause in err.chain() {
        if let Some(h) = cause
            .downcast_ref::<crate::commands::multiplatform::PlatformError>()
            .and_then(|e| e.hint())
        {
            return Some(h);
        }
        if let Some(crate::registry_api::RegistryApiError::Unreachable { .. }) =
            cause.downcast_ref::<crate::registry_api::RegistryApiError>()
        {
            return Some(
                "the image index is written from this machine or, when it cannot reach the registry, through a builder (`index_from:` in the pool: `auto`, `client` or `builder`); check that the registry's address is reachable from one of them".into(),
            );
        }
        if let Some(crate::registry_api::RegistryApiError::Status {
            status: 401 | 403, ..
        }) = cause.downcast_ref::<crate::registry_api::RegistryApiError>()
        {
            return Some(
                "the image index is written from this machine, with this machine's credentials for the registry: set ABSCONDA_REGISTRY_USER and ABSCONDA_REGISTRY_PASSWORD (or `docker login` here, without a credential helper)".into(),
            );
        }
        if let Some(e) = cause.downcast_ref::<crate::lifecycle::CloudHostKeyMismatch>() {
            return Some(format!(
                "do not connect until you know why: compare the keys in the VM's serial console with {}; if the VM was re-created and the cloud's record is stale, pin the right key with `host_key:`",
                e.fingerprint
            ));
        }
        if let Some(e) = cause.downcast_ref::<ProvisionError>() {
            return match e {
                ProvisionError::HostKey { builder, source, .. } => Some(match &**source {
                    SshError::UnknownHostKey { fingerprint, .. } => format!(
                        "its Terraform module reported no host key fingerprints: compare {fingerprint} with the new machine's console output; if it matches, set `host_key: \"{fingerprint}\"` for the builder (or `host_key_policy: accept-new`) and check it with `absconda remote health {builder}`"
                    ),
                    SshError::HostKeyChanged { lines, known_hosts, .. } => format!(
                        "cloud addresses get reused: if `{}` line {} is about a machine that no longer exists, check the new key out of band and delete that line",
                        known_hosts.display(),
                        lines.first().copied().unwrap_or_default()
                    ),
                    _ => "the new machine presented a host key its Terraform module did not report (or `host_key:` does not pin); do not use it until you know why".into(),
                }),
                ProvisionError::AlreadyProvisioned { builder, .. } => Some(format!(
                    "`absconda remote health {builder}` checks it; `absconda remote destroy {builder}` removes it first if you want a new one"
                )),
                ProvisionError::NotProvisioned { builder, .. } => Some(format!(
                    "`absconda remote provision {builder}` creates it"
                )),
                ProvisionError::NoAddress { builder } => Some(format!(
                    "set `host:` for it, or create it with `absconda remote provision {builder}`"
                )),
                ProvisionError::NoTerminal { .. } => {
                    Some("pass `--yes` to destroy without being asked".into())
                }
                ProvisionError::NotReady { builder, .. } => Some(format!(
                    "the builder stays provisioned: `absconda remote health {builder}` shows what is wrong; `absconda remote destroy {builder}` removes it"
                )),
                ProvisionError::WorkdirGone { .. } => Some(
                    "delete the builder's resources in the cloud console (look for its instance name), then remove its entry from the state file".into(),
                ),
                _ => None,
            };
        }
        if let Some(e) = cause.downcast_ref::<TerraformError>() {
            return match e {
                TerraformError::NotFound | TerraformError::BadOverride { .. } | TerraformError::TooOld { .. } => {
                    Some(crate::terraform::INSTALL_HINT.into())
                }
                TerraformError::Failed { dir, .. } => Some(format!(
                    "fix the cause and run the command again: Terraform continues from what it already did (its state is in `{}`); `absconda remote destroy` removes what it created",
                    dir.display()
                )),
                TerraformError::NoModule { .. } => Some(
                    "set `terraform_dir:` for the builder to the Terraform module that makes it (absconda ships `infra/gcp` and `infra/aws`)".into(),
                ),
                TerraformError::MissingVariable { .. } => Some(
                    "set the key in the builder's settings, or give the variable a value in a `terraform.tfvars` file of the module".into(),
                ),
                TerraformError::NoPublicKey { .. } => Some(
                    "set `identity_file:` to the private key absconda logs in with; its `.pub` is what gets authorised".into(),
                ),
                TerraformError::Busy { .. } => Some("wait for the other absconda to finish".into()),
                _ => None,
            };
        }
        if let Some(e) = cause.downcast_ref::<StateError>() {
            return match e {
                StateError::Corrupt { path, kept, .. } => Some(format!(
                    "absconda starts a new `{}`; look at `{}` to recover what it recorded (builds, provisioned builders)",
                    path.display(),
                    kept.display()
                )),
                StateError::LockTimeout { .. } => Some(
                    "another absconda holds the state file's lock; if none runs, remove the `.lock` file next to it".into(),
                ),
                _ => None,
            };
        }
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
                SshError::AgentRefused { .. } => Some(
                    "set `AllowAgentForwarding yes` in the builder's sshd_config (and no `no-agent-forwarding` on its authorized key)".into(),
                ),
                SshError::Connect { addr, .. } | SshError::ConnectTimeout { addr, .. } => Some(format!(
                    "check that `{addr}` is reachable from here and sshd runs there; for a cloud builder, `absconda remote status NAME` shows its state"
                )),
                SshError::Proxy { source: crate::ssh::proxy::ProxyError::AuthRequired { .. }, .. } => Some(
                    "check the user and password in the builder's `proxy:` URL (`http://user:password@host:port`; %-escape `@` and `:` in them)".into(),
                ),
                SshError::Proxy { proxy, .. } => Some(format!(
                    "check that the proxy `{proxy}` runs and may connect to the builder's SSH port"
                )),
                SshError::JumpForward { hop, next, .. } => Some(format!(
                    "the jump host `{hop}` is up but could not reach `{next}`: check that it runs sshd there and that the jump host allows TCP forwarding (`AllowTcpForwarding`)"
                )),
                SshError::Auth(AuthError::OpenKey { path, .. }) => Some(format!(
                    "`chmod 600 {}` (or, where secrets can only be mounted readable by others, set ABSCONDA_ALLOW_OPEN_KEYS=1)",
                    path.display()
                )),
                SshError::Auth(AuthError::Refused { user, host, tried }) => {
                    Some(crate::hints::key_refused(user, host, tried))
                }
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
                BuildError::Workspace { workspace, user, .. } => Some(format!(
                    "create it on the builder for `{user}`: `sudo install -d -o {user} {workspace}`; or set `workspace:` to a folder `{user}` can write"
                )),
                BuildError::Docker { user, message, .. } => {
                    Some(crate::hints::docker(user, message))
                }
                BuildError::Login { registry, .. } => Some(format!(
                    "set ABSCONDA_REGISTRY_USER and ABSCONDA_REGISTRY_PASSWORD to an account (or token) that may push to `{registry}`; without them the `auths` entry for it in ~/.docker/config.json is used"
                )),
                BuildError::SecretsNeedBuildKit { .. } => Some(
                    "set `buildkit: on` (or `auto` with a docker that has BuildKit) for this builder".into(),
                ),
                BuildError::BuildContextUnsupported { missing, .. } => Some(match missing {
                    crate::build::BuildxGap::LegacyBuilder => {
                        "remove `buildkit: off` from this builder's settings (named contexts need BuildKit through buildx)".into()
                    }
                    crate::build::BuildxGap::NotDefault => {
                        "run `docker buildx install` on the builder so that `docker build` is buildx (or upgrade docker to 23+), and check that `docker build --help` lists `--build-context`".into()
                    }
                    crate::build::BuildxGap::NoPlugin => {
                        "install the docker-buildx plugin on the builder (with Docker's apt repository: `sudo apt-get install docker-buildx-plugin`; or put the `docker-buildx` binary from https://github.com/docker/buildx/releases in `/usr/local/lib/docker/cli-plugins/`) and check that `docker build --help` lists `--build-context`".into()
                    }
                }),
                BuildError::Secrets { .. } => Some(
                    "secrets are only written to a tmpfs; set `secret_dir:` to a folder the build may use, even on disk".into(),
                ),
                _ => None,
            };
        }
        if let Some(e) = cause.downcast_ref::<crate::commands::init::InitError>() {
            return crate::hints::init(e);
        }
        if let Some(e) = cause.downcast_ref::<ConfigError>() {
            return Some(crate::hints::config(e));
        }
        if let Some(CloudError::Auth { source_name, .. }) = cause.downcast_ref::<CloudError>() {
            return Some(crate::hints::cloud_auth(source_name));
        }
        if let Some(CloudError::Transport { url, source }) = cause.downcast_ref::<CloudError>()
            && crate::cloud::http::is_certificate_error(source.as_ref())
        {
            return Some(crate::hints::untrusted_certificate(url));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dockerfile::DockerfileError;
    use std::path::PathBuf;

    /// Every code in the README's table, with the first words of its line.
    fn readme_table() -> Vec<(u8, String)> {
        let readme = include_str!("../README.md");
        let section = readme
            .split("\n## Exit codes\n")
            .nth(1)
            .expect("README has an `## Exit codes` section");
        let section = section.split("\n## ").next().unwrap_or(section);
        section
            .lines()
            .filter_map(|line| {
                let mut cells = line.split('|').map(str::trim).skip(1);
                let code = cells.next()?.parse::<u8>().ok()?;
                Some((code, cells.next()?.to_string()))
            })
            .collect()
    }

    #[test]
    fn the_readme_table_lists_every_code_and_nothing_else() {
        let table = readme_table();
        let codes: Vec<u8> = table.iter().map(|(c, _)| *c).collect();
        let ours = [
            SUCCESS,
            FAILURE,
            USAGE,
            UNREACHABLE,
            HOST_KEY,
            BUILD_FAILED,
            PUSH_FAILED,
            LEASE_TIMEOUT,
            CLOUD,
            NOT_READY,
            TERRAFORM,
            STATE_CONFLICT,
            INPUT,
            INTERRUPTED,
        ];
        for code in ours {
            assert!(
                codes.contains(&code),
                "exit code {code} missing from README"
            );
        }
        for code in &codes {
            assert!(
                ours.contains(code),
                "README lists exit code {code}, absconda has none"
            );
        }
        let input = table.iter().find(|(c, _)| *c == INPUT).map(|(_, m)| m);
        assert!(
            input.is_some_and(|m| m.contains("input file")),
            "README's line for {INPUT}: {input:?}"
        );
    }

    #[test]
    fn input_file_errors_have_their_own_code() {
        let invalid = anyhow::Error::new(DockerfileError::InvalidEnvironment {
            path: PathBuf::from("environment.yaml"),
            line: Some(3),
            column: Some(1),
            reason: "YAML syntax error".into(),
        });
        assert_eq!(code(&invalid.context("generating")), INPUT);
        let missing = anyhow::Error::new(DockerfileError::Read {
            path: PathBuf::from("environment.yaml"),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert_eq!(code(&missing), INPUT);
        let option = anyhow::Error::new(DockerfileError::InvalidOption {
            option: "--env-prefix",
            value: "x".into(),
            reason: "not absolute".into(),
        });
        assert_eq!(code(&option), USAGE);
    }
}
