//! Bringing a builder up and down: start the VM if needed, wait until it can
//! build, stop it when asked.
//!
//! "Ready" means three things in a row, with backoff and one deadline
//! (`ready_timeout`), never a fixed sleep: the cloud says RUNNING, an SSH
//! handshake succeeds with the host key verified, and docker answers. A host
//! key failure ends the wait at once: it is never retried.
//!
//! A fresh cloud builder's host key is in no `known_hosts` yet, and its
//! address changes at every start. Rather than trust it on first use,
//! absconda asks the cloud which keys the VM holds (GCE guest attributes,
//! the EC2 console output) when the key is unknown, connects only if the
//! server's key is one of them, and then records it in `known_hosts`, so the
//! next connection is plainly known. A key the cloud does not report is
//! refused like any wrong host key. A VM absconda just booted may not have
//! published its keys yet: then it waits for them, within `ready_timeout`.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::access::Access;
use crate::build::{self, ssh_target};
use crate::cloud::azure::{Azure, AzureSettings};
use crate::cloud::ec2::{Ec2, Ec2Instance, Ec2Settings};
use crate::cloud::gce::{AddressKind, Gce, GceSettings};
use crate::cloud::retry::Backoff;
use crate::cloud::{CloudError, InstanceInfo, Provider, Status};
use crate::config::{AddressSetting, Builder, ProviderKind};
use crate::remote::SelfStop;
use crate::report::{Phase, Reporter};
use crate::ssh::known_hosts::{HostKeyPolicy, KnownHosts, Pin, Verdict};
use crate::ssh::{Session, SshError};
use crate::state::StateFile;

/// The cloud a builder lives in.
pub enum Cloud {
    Gce(Gce),
    Ec2(Ec2),
    Azure(Azure),
}

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(
        "builder `{builder}` is {status}; start it with `absconda remote start {builder}`, or set `auto_start: true`"
    )]
    NotRunning { builder: String, status: String },
    #[error("the instance of builder `{builder}` no longer exists ({status})")]
    Gone { builder: String, status: String },
    #[error("builder `{builder}` was not ready within {}s ({waiting_for})", after.as_secs())]
    NotReady {
        builder: String,
        after: Duration,
        waiting_for: String,
        #[source]
        last: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error(
        "builder `{builder}` has no address: the cloud reports none and the config sets no `host`"
    )]
    NoAddress { builder: String },
    #[error("builder `{builder}` has no `host` in the config")]
    NoHost { builder: String },
    #[error("builder `{builder}` is an always-on SSH host: absconda never stops it")]
    AlwaysOn { builder: String },
}

/// The builder presented a host key that the cloud does not report for its
/// VM: someone else may be answering at its address.
///
/// The unknown-key refusal is kept as the cause, so the exit code is the
/// host key one (4).
#[derive(Debug, thiserror::Error)]
#[error(
    "the host key of builder `{builder}` ({algorithm} {fingerprint}) differs from what the cloud reports for its VM in the {reported_by} ({reported}); refusing to connect, since someone else may be answering at its address"
)]
pub struct CloudHostKeyMismatch {
    pub builder: String,
    pub algorithm: String,
    pub fingerprint: String,
    /// `guest attributes` or `console output`.
    pub reported_by: &'static str,
    /// The fingerprints the cloud reports, comma-separated.
    pub reported: String,
    #[source]
    pub refused: SshError,
}

impl Cloud {
    /// The cloud client for a builder; `None` for always-on SSH hosts.
    pub fn for_builder(b: &Builder) -> Result<Option<Cloud>, CloudError> {
        let missing = |key: &str| CloudError::Config {
            message: format!("builder `{}` needs `{key}`", b.name),
        };
        crate::cloud::http::set_ca_file(b.ca_file.clone());
        match b.provider {
            ProviderKind::Ssh => Ok(None),
            ProviderKind::CodeBuild | ProviderKind::CloudBuild => Err(CloudError::Config {
                message: format!(
                    "builder `{}` is a build service (`provider: {}`): it runs builds only, with `absconda build`",
                    b.name, b.provider
                ),
            }),
            ProviderKind::Gcp => Ok(Some(Cloud::Gce(Gce::new(GceSettings {
                project: b.project.clone().ok_or_else(|| missing("project"))?,
                zone: b.zone.clone().ok_or_else(|| missing("zone"))?,
                instance: b.instance.clone().ok_or_else(|| missing("instance"))?,
                api_endpoint: b.api_endpoint.clone(),
                address: match b.address {
                    AddressSetting::External => AddressKind::External,
                    AddressSetting::Internal => AddressKind::Internal,
                },
                backoff: Backoff::default(),
            })?))),
            ProviderKind::Aws => {
                let instance = match (&b.instance_id, &b.instance) {
                    (Some(id), _) => Ec2Instance::Id(id.clone()),
                    (None, Some(name)) => Ec2Instance::Name(name.clone()),
                    (None, None) => return Err(missing("instance_id")),
                };
                Ok(Some(Cloud::Ec2(Ec2::new(Ec2Settings {
                    region: b.region.clone(),
                    instance,
                    endpoint: b.api_endpoint.clone(),
                    profile: b.profile.clone(),
                    backoff: Backoff::default(),
                })?)))
            }
            ProviderKind::Azure => Ok(Some(Cloud::Azure(Azure::new(
                AzureSettings {
                    subscription_id: b
                        .subscription_id
                        .clone()
                        .ok_or_else(|| missing("subscription_id"))?,
                    resource_group: b
                        .resource_group
                        .clone()
                        .ok_or_else(|| missing("resource_group"))?,
                    vm_name: b.vm_name.clone().ok_or_else(|| missing("vm_name"))?,
                    api_endpoint: b.api_endpoint.clone(),
                    address: match b.address {
                        AddressSetting::External => AddressKind::External,
                        AddressSetting::Internal => AddressKind::Internal,
                    },
                    backoff: Backoff::default(),
                },
                b.authority_host.as_deref(),
            )?))),
        }
    }

    pub async fn describe(&self) -> Result<InstanceInfo, CloudError> {
        match self {
            Cloud::Gce(c) => c.describe().await,
            Cloud::Ec2(c) => c.describe().await,
            Cloud::Azure(c) => c.describe().await,
        }
    }

    pub async fn start(&self) -> Result<(), CloudError> {
        match self {
            Cloud::Gce(c) => c.start().await,
            Cloud::Ec2(c) => c.start().await,
            Cloud::Azure(c) => c.start().await,
        }
    }

    pub async fn stop(&self) -> Result<(), CloudError> {
        match self {
            Cloud::Gce(c) => c.stop().await,
            Cloud::Ec2(c) => c.stop().await,
            Cloud::Azure(c) => c.stop().await,
        }
    }

    /// Where [`Cloud::host_key_fingerprints`] reads the keys, for messages.
    pub fn host_key_source(&self) -> &'static str {
        match self {
            Cloud::Gce(_) => "guest attributes",
            Cloud::Ec2(_) => "console output",
            Cloud::Azure(_) => "boot diagnostics serial log",
        }
    }

    /// The `SHA256:` fingerprints of the SSH host keys the cloud reports for
    /// the VM: the keys the GCE guest agent published as guest attributes,
    /// or the fingerprints the EC2 instance printed on its console. Empty
    /// when the VM has published none (yet). Entries absconda cannot read
    /// are left out with a warning: they can only make a key unknown, never
    /// trusted.
    pub async fn host_key_fingerprints(&self) -> Result<Vec<String>, CloudError> {
        let reported = match self {
            Cloud::Gce(c) => c.guest_host_keys().await?,
            Cloud::Ec2(c) => c.console_host_key_fingerprints().await?,
            Cloud::Azure(c) => c.serial_log_host_key_fingerprints().await?,
        };
        let mut fingerprints = Vec::new();
        for entry in reported {
            match Pin::parse(&entry) {
                Ok(pin) => {
                    let fp = pin.fingerprint().to_string();
                    if !fingerprints.contains(&fp) {
                        fingerprints.push(fp);
                    }
                }
                Err(why) => {
                    let shown: String = entry.chars().take(60).collect();
                    tracing::warn!(
                        "ignoring a host key in the {} that absconda cannot read (`{shown}`): {why}",
                        self.host_key_source()
                    );
                }
            }
        }
        Ok(fingerprints)
    }

    /// What the self-stop script checks the metadata server against.
    pub fn identity(&self, info: &InstanceInfo) -> String {
        match self {
            Cloud::Gce(c) => {
                let g = c.settings();
                format!("gce:{}/{}/{}", g.project, g.zone, g.instance)
            }
            Cloud::Ec2(_) => format!("ec2:{}", info.id),
            Cloud::Azure(c) => format!(
                "azure:{} {}",
                c.resource_id(),
                c.settings()
                    .api_endpoint
                    .as_deref()
                    .unwrap_or(crate::cloud::azure::DEFAULT_API_ENDPOINT)
                    .trim_end_matches('/')
            ),
        }
    }

    pub fn default_metadata(&self) -> &'static str {
        match self {
            Cloud::Gce(_) => "http://metadata.google.internal",
            Cloud::Ec2(_) | Cloud::Azure(_) => "http://169.254.169.254",
        }
    }
}

/// A builder that can build now.
pub struct Ready {
    pub session: Session,
    pub address: String,
    /// absconda started the VM in this run.
    pub started_here: bool,
    pub instance: Option<InstanceInfo>,
}

/// Fills what a provisioned builder's config leaves out (its instance and
/// SSH user) from the state Terraform's outputs were saved in.
pub fn with_provisioned(b: &Builder, state: &StateFile) -> Builder {
    let mut b = b.clone();
    let Ok(s) = state.load() else {
        return b;
    };
    let Some(saved) = s.builders.get(&b.name) else {
        return b;
    };
    if saved.provisioned_at.is_some() {
        match b.provider {
            ProviderKind::Gcp if b.instance.is_none() => b.instance = saved.instance.clone(),
            ProviderKind::Aws if b.instance_id.is_none() && b.instance.is_none() => {
                b.instance_id = saved.instance.clone()
            }
            ProviderKind::Azure if b.vm_name.is_none() => b.vm_name = saved.instance.clone(),
            _ => {}
        }
    }
    b
}

/// Records what the cloud said (and, with `started`, that absconda started it).
pub fn record_status(state: &StateFile, b: &Builder, info: &InstanceInfo, started: bool) {
    let status = info.status.to_string();
    let address = info
        .address
        .as_deref()
        .map(|a| crate::provisioned::join_address(a, b.port));
    let r = state.update(|s| {
        let e = s.builders.entry(b.name.clone()).or_default();
        e.provider = Some(b.provider.to_string());
        e.set_status(&status, address.as_deref());
        if started {
            e.started_at = Some(chrono::Utc::now());
        }
    });
    if let Err(e) = r {
        tracing::warn!("could not update the state file: {e}");
    }
}

/// Records that the builder stopped, adding the VM time since absconda started it.
pub fn record_stopped(state: &StateFile, b: &Builder) {
    let r = state.update(|s| {
        let e = s.builders.entry(b.name.clone()).or_default();
        e.set_status(&Status::Stopped.to_string(), None);
        if let Some(t) = e.started_at.take() {
            e.vm_seconds += (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0;
        }
    });
    if let Err(e) = r {
        tracing::warn!("could not update the state file: {e}");
    }
}

/// Starts (if allowed and needed) and waits until the builder can build.
pub async fn bring_up(
    b: &Builder,
    cloud: Option<&Cloud>,
    force_start: bool,
    state: &StateFile,
    reporter: &dyn Reporter,
    cancel: &CancellationToken,
) -> anyhow::Result<Ready> {
    let Some(cloud) = cloud else {
        // An always-on host: the config's `host`, or the address Terraform
        // reported when absconda provisioned it.
        let saved = if b.host.is_some() {
            crate::state::State::default()
        } else {
            state.load()?
        };
        let endpoint = crate::provisioned::endpoint(b, &saved)?;
        reporter.phase(Phase::Connect);
        let t = Instant::now();
        let session = tokio::select! {
            s = crate::provisioned::connect(&endpoint) => s?,
            _ = cancel.cancelled() => return Err(build::BuildError::Interrupted.into()),
        };
        tracing::info!(
            builder = %b.name,
            path = %session.route(),
            user = %session.user(),
            access = "key",
            "connected"
        );
        reporter.phase_done(Phase::Connect, t.elapsed());
        return Ok(Ready {
            session,
            address: endpoint.address(),
            started_here: false,
            instance: None,
        });
    };

    reporter.phase(Phase::Start);
    let t = Instant::now();
    let info = cloud.describe().await?;
    let mut started_here = false;
    match info.status {
        Status::Running | Status::Starting => {}
        Status::Stopped | Status::Stopping | Status::Unknown => {
            if !(b.auto_start || force_start) {
                record_status(state, b, &info, false);
                return Err(LifecycleError::NotRunning {
                    builder: b.name.clone(),
                    status: info.raw_status.clone(),
                }
                .into());
            }
            reporter.info(&format!(
                "builder `{}` is {}: starting it",
                b.name, info.raw_status
            ));
            tokio::select! {
                r = cloud.start() => r?,
                _ = cancel.cancelled() => return Err(build::BuildError::Interrupted.into()),
            }
            started_here = true;
        }
        Status::Gone => {
            record_status(state, b, &info, false);
            return Err(LifecycleError::Gone {
                builder: b.name.clone(),
                status: info.raw_status.clone(),
            }
            .into());
        }
    }
    reporter.phase_done(Phase::Start, t.elapsed());
    let result = wait_ready(b, cloud, state, started_here, reporter, cancel).await;
    if result.is_err() && started_here {
        // Never leave a VM we started running when we could not use it.
        reporter.info(&format!(
            "stopping builder `{}` again, since it could not be used",
            b.name
        ));
        if cloud.stop().await.is_ok() {
            record_stopped(state, b);
        }
    }
    result
}

async fn wait_ready(
    b: &Builder,
    cloud: &Cloud,
    state: &StateFile,
    started_here: bool,
    reporter: &dyn Reporter,
    cancel: &CancellationToken,
) -> anyhow::Result<Ready> {
    reporter.phase(Phase::Ready);
    let t = Instant::now();
    let deadline = tokio::time::Instant::now() + b.ready_timeout;
    let mut delay = Duration::from_millis(250);
    let mut waiting_for = "the VM to be RUNNING".to_string();
    let mut last: Option<Box<dyn std::error::Error + Send + Sync>> = None;
    let mut recorded = false;
    // Whether the VM was seen booting, started by absconda or not.
    let mut saw_booting = false;
    loop {
        let attempt = async {
            let info = cloud.describe().await?;
            match info.status {
                Status::Running => {}
                Status::Gone => {
                    return Err(anyhow::Error::from(LifecycleError::Gone {
                        builder: b.name.clone(),
                        status: info.raw_status.clone(),
                    }));
                }
                _ => {
                    saw_booting |= info.status == Status::Starting;
                    return Ok(Err((
                        format!("the VM to be RUNNING (now {})", info.raw_status),
                        None,
                    )));
                }
            }
            if !recorded {
                record_status(state, b, &info, started_here);
                recorded = true;
            }
            let Some(address) = builder_address(b, &info) else {
                return Err(LifecycleError::NoAddress {
                    builder: b.name.clone(),
                }
                .into());
            };
            // Keys of a VM that booted during this run may still be on
            // their way to the cloud: worth waiting for.
            let may_wait = started_here || saw_booting;
            let (connected, _access) =
                connect_with_access(b, cloud, &address, may_wait, reporter).await?;
            let session = match connected {
                Connected::Session(s) => *s,
                Connected::Wait(what, err) => return Ok(Err((what, err))),
            };
            match build::probe(&session, b).await {
                Ok(p) if p.docker_server.is_some() => Ok(Ok(Ready {
                    session,
                    address,
                    started_here,
                    instance: Some(info),
                })),
                Ok(p) => Ok(Err((
                    format!(
                        "docker to answer ({})",
                        p.docker_error.unwrap_or_else(|| "no answer".into())
                    ),
                    None,
                ))),
                Err(e) => Ok(Err((
                    "docker to answer".to_string(),
                    Some(Box::new(e) as _),
                ))),
            }
        };
        let outcome = tokio::select! {
            r = tokio::time::timeout_at(deadline, attempt) => r,
            _ = cancel.cancelled() => return Err(build::BuildError::Interrupted.into()),
        };
        match outcome {
            Ok(Ok(Ok(ready))) => {
                reporter.phase_done(Phase::Ready, t.elapsed());
                return Ok(ready);
            }
            Ok(Ok(Err((what, err)))) => {
                if what != waiting_for {
                    reporter.info(&format!("waiting for {what}"));
                    waiting_for = what;
                }
                if err.is_some() {
                    last = err;
                }
            }
            Ok(Err(e)) => {
                // Transient cloud errors were already retried inside the call.
                return Err(e);
            }
            Err(_) => break,
        }
        if tokio::time::Instant::now() + delay >= deadline {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => return Err(build::BuildError::Interrupted.into()),
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    Err(LifecycleError::NotReady {
        builder: b.name.clone(),
        after: b.ready_timeout,
        waiting_for,
        last,
    }
    .into())
}

/// One connection attempt of [`wait_ready`].
/// Connects once to a running cloud builder, trusting a host key the cloud
/// reports (see [`connect_trusting_cloud`]); for `remote status`.
pub async fn connect_cloud_builder(
    b: &Builder,
    cloud: &Cloud,
    address: &str,
    reporter: &dyn Reporter,
) -> anyhow::Result<(Session, Access)> {
    let (connected, access) = connect_with_access(b, cloud, address, false, reporter).await?;
    match connected {
        Connected::Session(s) => Ok((*s, access)),
        Connected::Wait(what, Some(e)) => {
            Err(anyhow::Error::from_boxed(e).context(format!("waiting for {what}")))
        }
        Connected::Wait(what, None) => Err(anyhow::anyhow!(
            "builder `{}` is not ready: waiting for {what}",
            b.name
        )),
    }
}

enum Connected {
    Session(Box<Session>),
    /// Not yet: what we wait for (stable across attempts, so it is reported
    /// once) and the error that says why.
    Wait(String, Option<Box<dyn std::error::Error + Send + Sync>>),
}

/// Puts the user's key in place the way `access:` says (OS Login, instance
/// metadata), then connects as the user that access gives.
async fn connect_with_access(
    b: &Builder,
    cloud: &Cloud,
    address: &str,
    may_wait: bool,
    reporter: &dyn Reporter,
) -> anyhow::Result<(Connected, Access)> {
    let access = crate::access::prepare(b, cloud).await?;
    let connect_timeout = crate::access::connect_timeout(b);
    let connected = if access.user == b.user && connect_timeout == b.connect_timeout {
        connect_trusting_cloud(b, cloud, address, may_wait, reporter).await?
    } else {
        let mut as_user = b.clone();
        as_user.user = access.user.clone();
        as_user.connect_timeout = connect_timeout;
        connect_trusting_cloud(&as_user, cloud, address, may_wait, reporter).await?
    };
    if let Connected::Session(s) = &connected {
        tracing::info!(
            builder = %b.name,
            path = %s.route(),
            user = %s.user(),
            access = access.mode,
            "connected"
        );
    }
    Ok((connected, access))
}

/// Connects to a cloud builder, asking the cloud for its host keys when
/// `known_hosts` does not know the key the server presents.
///
/// - Known key, or a `host_key:` pin: a plain connection; a changed,
///   revoked or wrongly pinned key is refused at once.
/// - Unknown key that the cloud reports: connect again pinned to exactly
///   that fingerprint, then record the key under the target's
///   `known_hosts` name.
/// - Unknown key, and the cloud reports others: [`CloudHostKeyMismatch`].
/// - Unknown key, and the cloud reports none: wait for them when the VM
///   booted during this run (`may_wait`); with `host_key_policy:
///   accept-new`, trust on first use as the user asked; else the plain
///   unknown-key refusal, whose hint explains `host_key` and accept-new.
///
/// With accept-new the first connection is made strict, so that the cloud
/// gets its say before anything is recorded on first use.
async fn connect_trusting_cloud(
    b: &Builder,
    cloud: &Cloud,
    address: &str,
    may_wait: bool,
    reporter: &dyn Reporter,
) -> anyhow::Result<Connected> {
    let target = ssh_target(b, address);
    let ssh_wait = |e: SshError| {
        Connected::Wait(
            format!("SSH on `{address}:{}`", b.port),
            Some(Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
        )
    };
    let mut strict = target.clone();
    strict.policy = HostKeyPolicy::Strict;
    let refused = match connect_session(b, cloud, &strict).await? {
        Ok(s) => return Ok(Connected::Session(Box::new(s))),
        Err(e @ SshError::UnknownHostKey { .. }) if target.pin.is_none() => e,
        Err(e) if e.is_host_key() => return Err(e.into()),
        Err(e) => return Ok(ssh_wait(e)),
    };
    let SshError::UnknownHostKey {
        name,
        algorithm,
        fingerprint,
        known_hosts,
    } = &refused
    else {
        return Err(refused.into());
    };
    let source = cloud.host_key_source();
    let accept_new = target.policy == HostKeyPolicy::AcceptNew;
    let reported = match cloud.host_key_fingerprints().await {
        Ok(r) => r,
        Err(e) if accept_new => {
            reporter.info(&format!(
                "could not read builder `{}`'s host keys from the cloud ({e}); trusting `{name}` on first use (host_key_policy: accept-new)",
                b.name
            ));
            Vec::new()
        }
        Err(e) => {
            return Err(anyhow::Error::from(e).context(format!(
                "could not read the host keys the cloud reports for builder `{}` ({source}), needed because `{name}` presents {algorithm} key {fingerprint}, which `{}` does not record",
                b.name,
                known_hosts.display()
            )));
        }
    };
    let presented = fingerprint.trim_end_matches('=');
    if reported.is_empty() {
        if accept_new {
            return match connect_session(b, cloud, &target).await? {
                Ok(s) => {
                    reporter.info(&format!(
                        "the cloud reports no host keys for builder `{}` yet; recorded `{name}` ({algorithm} {fingerprint}) on first use (host_key_policy: accept-new)",
                        b.name
                    ));
                    Ok(Connected::Session(Box::new(s)))
                }
                Err(e) if e.is_host_key() => Err(e.into()),
                Err(e) => Ok(ssh_wait(e)),
            };
        }
        if may_wait {
            // Named after where they should appear, so that a VM that never
            // publishes them (GCE guest attributes not enabled, an image
            // without the startup script) is easy to recognise at the deadline.
            return Ok(Connected::Wait(
                format!("the builder to publish its host keys in its {source}"),
                Some(Box::new(refused)),
            ));
        }
        tracing::debug!(builder = %b.name, "the cloud reports no host keys");
        return Err(refused.into());
    }
    if !reported.iter().any(|r| r == presented) {
        return Err(CloudHostKeyMismatch {
            builder: b.name.clone(),
            algorithm: algorithm.clone(),
            fingerprint: fingerprint.clone(),
            reported_by: source,
            reported: reported.join(", "),
            refused,
        }
        .into());
    }
    // The key the cloud vouches for: accept exactly that one. A server that
    // shows another key now is refused (PinMismatch).
    let mut pinned = target.clone();
    pinned.pin = Some(Pin::Fingerprint(presented.to_string()));
    let session = match connect_session(b, cloud, &pinned).await? {
        Ok(s) => s,
        Err(e) if e.is_host_key() => return Err(e.into()),
        Err(e) => return Ok(ssh_wait(e)),
    };
    let path = target.known_hosts.clone();
    let key = session.host_key().clone();
    let entry = name.clone();
    let written = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
        let mut known = KnownHosts::load(&path)?;
        // Another absconda may have recorded it meanwhile.
        if matches!(known.check(&entry, &key), Verdict::Known { .. }) {
            return Ok(false);
        }
        known.record(&entry, &key)?;
        Ok(true)
    })
    .await;
    match written {
        Ok(Ok(true)) => reporter.info(&format!(
            "recorded the host key of `{name}` ({algorithm} {fingerprint}) in `{}`, as reported by the cloud ({source})",
            known_hosts.display()
        )),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => reporter.info(&format!(
            "warning: the host key of `{name}` ({algorithm} {fingerprint}) matches what the cloud reports ({source}), but it could not be recorded in `{}`: {e}",
            known_hosts.display()
        )),
        Err(e) => tracing::warn!("recording the host key did not finish: {e}"),
    }
    Ok(Connected::Session(Box::new(session)))
}

/// Connects to `target` directly, or through the cloud tunnel the builder
/// asks for (`tunnel: iap|eice`). The outer error is a tunnel failure that
/// waiting will not cure (no IAM permission, no such instance); others
/// come back as an [`SshError::Connect`] that the wait for readiness retries.
async fn connect_session(
    b: &Builder,
    cloud: &Cloud,
    target: &crate::ssh::Target,
) -> anyhow::Result<Result<Session, SshError>> {
    let addr = format!("{}:{}", target.host, target.port);
    let transient = |e: Box<dyn std::error::Error + Send + Sync>| {
        Ok(Err(SshError::Connect {
            addr: addr.clone(),
            source: std::io::Error::other(e),
        }))
    };
    let (stream, route) = match (b.tunnel, cloud) {
        (Some(crate::config::Tunnel::Iap), Cloud::Gce(gce)) => {
            let s = gce.settings();
            let endpoint = crate::cloud::iap::endpoint(b.iap_endpoint.as_deref())?;
            let auth = iap_auth()?;
            let iap_target = crate::cloud::iap::IapTarget {
                project: s.project.clone(),
                zone: s.zone.clone(),
                instance: s.instance.clone(),
                interface: "nic0".into(),
                port: target.port,
            };
            match crate::cloud::iap::open(iap_target, endpoint, auth, target.connect_timeout).await
            {
                Ok(stream) => (
                    stream,
                    format!(
                        "IAP tunnel to instance `{}` ({}/{})",
                        s.instance, s.project, s.zone
                    ),
                ),
                Err(e) if e.is_transient() => return transient(Box::new(e)),
                Err(e) => return Err(e.into()),
            }
        }
        (Some(crate::config::Tunnel::Eice), Cloud::Ec2(ec2)) => {
            match crate::cloud::eice::open(
                ec2,
                b.eice_endpoint.as_deref(),
                target.port,
                target.connect_timeout,
            )
            .await
            {
                Ok(stream) => (stream, "EC2 Instance Connect Endpoint tunnel".to_string()),
                Err(e) => match e.downcast::<crate::cloud::eice::EiceError>() {
                    Ok(e @ crate::cloud::eice::EiceError::Open { .. }) if !e.is_final() => {
                        return transient(Box::new(e));
                    }
                    Ok(e) => return Err(e.into()),
                    Err(e) => return Err(e),
                },
            }
        }
        _ => return Ok(Session::connect(target).await),
    };
    let mut session =
        match Session::connect_over(target, crate::ssh::transport::boxed(stream)).await {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
    session.set_route(route);
    Ok(Ok(session))
}

/// The credentials IAP tunnels authenticate with: the ADC of the process,
/// shared by every tunnel so that tokens are fetched once.
fn iap_auth() -> anyhow::Result<std::sync::Arc<crate::cloud::gcp_auth::GcpAuth>> {
    static AUTH: std::sync::OnceLock<std::sync::Arc<crate::cloud::gcp_auth::GcpAuth>> =
        std::sync::OnceLock::new();
    if let Some(a) = AUTH.get() {
        return Ok(a.clone());
    }
    let auth = std::sync::Arc::new(crate::cloud::gcp_auth::GcpAuth::from_env()?);
    Ok(AUTH.get_or_init(|| auth).clone())
}

/// The address a cloud builder is known by: `host:`, else the cloud's
/// address, else (reached through a tunnel, with no address of its own)
/// the instance's name, under which its host key is recorded.
pub fn builder_address(b: &Builder, info: &InstanceInfo) -> Option<String> {
    b.host.clone().or_else(|| info.address.clone()).or_else(|| {
        b.tunnel?;
        b.instance.clone().or_else(|| b.instance_id.clone())
    })
}

/// Stops a cloud builder through the API and waits until it is stopped.
pub async fn stop(
    b: &Builder,
    cloud: &Cloud,
    state: &StateFile,
    reporter: &dyn Reporter,
) -> anyhow::Result<InstanceInfo> {
    reporter.phase(Phase::Stop);
    let t = Instant::now();
    cloud.stop().await?;
    let deadline = Instant::now() + b.ready_timeout;
    let mut delay = Duration::from_millis(250);
    loop {
        let info = cloud.describe().await?;
        if matches!(info.status, Status::Stopped | Status::Gone) {
            record_stopped(state, b);
            reporter.phase_done(Phase::Stop, t.elapsed());
            return Ok(info);
        }
        if Instant::now() + delay > deadline {
            return Err(CloudError::Timeout {
                what: format!("stopping builder `{}`", b.name),
                after: b.ready_timeout,
                last: None,
            }
            .into());
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The self-stop to schedule after a build, when the builder wants one.
pub fn self_stop(b: &Builder, cloud: Option<&Cloud>, ready: &Ready) -> Option<SelfStop> {
    let cloud = cloud?;
    if !b.auto_stop || b.provider == ProviderKind::Ssh {
        return None;
    }
    let info = ready.instance.as_ref()?;
    Some(SelfStop {
        delay: b.stop_delay,
        poweroff_command: b.poweroff_command.clone(),
        identity: cloud.identity(info),
        metadata: b
            .metadata_endpoint
            .clone()
            .unwrap_or_else(|| cloud.default_metadata().to_string()),
    })
}
