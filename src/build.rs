//! The build pipeline: orchestration only.
//!
//! walk the context → connect → take the lease (and probe docker) → stream
//! the context → `docker build` → `docker push` → release. Everything after
//! the connection runs in channels of one SSH session. Cleanup of what we
//! created on the builder is the lease supervisor's job (see
//! [`crate::remote`]): it runs when we release the lease, when the user
//! presses Ctrl-C, and when the connection dies.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::{Builder, BuildkitSetting, CompressionSetting};
use crate::context::{self, Compression, ContextError, DockerIgnore, ExtraFile};
use crate::registry::{self, Credentials, CredentialsError};
use crate::remote::{self, ProbeReport, SelfStop};
use crate::report::{Phase, Reporter};
use crate::ssh::exec::{ExitStatus, RemoteProcess};
use crate::ssh::{Session, SshError, Target};

/// What to build, from the command line.
#[derive(Debug, Clone, Default)]
pub struct BuildRequest {
    /// The context folder; `None` sends only the generated files.
    pub context_dir: Option<PathBuf>,
    /// The Dockerfile on disk; ignored when `generated_dockerfile` is set.
    pub dockerfile: PathBuf,
    /// A Dockerfile made by absconda (from an environment file), sent as `Dockerfile`.
    pub generated_dockerfile: Option<String>,
    /// More files to put into the context (`name in context`, local path).
    pub extra_files: Vec<(String, PathBuf)>,
    /// Full image references (`repository:tag`).
    pub images: Vec<String>,
    pub build_args: Vec<String>,
    pub labels: Vec<String>,
    pub target: Option<String>,
    pub platform: Option<String>,
    pub network: Option<String>,
    pub no_cache: bool,
    pub pull: bool,
    pub push: bool,
    /// How long to wait for another build's lease.
    pub remote_wait: Duration,
    /// Send only what changed since the last build of this context on this
    /// builder, which keeps a copy (see [`crate::sync`]).
    pub incremental: bool,
    /// With `incremental`: hash every file of the builder's copy again.
    pub verify: bool,
    pub add_hosts: Vec<String>,
    pub shm_size: Option<String>,
    pub ulimits: Vec<String>,
    /// `--progress quiet`: `docker build --quiet`.
    pub quiet: bool,
    /// `--output`: the result streamed back to this machine.
    pub output: Option<crate::outputs::OutputSpec>,
    /// `--ssh`: the agent forwarded to the `docker build` channel.
    pub ssh: Option<crate::secrets::SshForward>,
    pub cache_from: Vec<String>,
    pub cache_to: Vec<String>,
    /// `--secret`s, with their values read on this machine.
    pub secrets: Vec<crate::secrets::BuildSecret>,
    /// `--build-context`s: folders synced like the context, or images and URLs.
    pub build_contexts: Vec<crate::named_contexts::NamedContext>,
}

/// What happened, for the summary line and `--json`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BuildReport {
    pub builder: String,
    pub images: Vec<String>,
    pub pushed: bool,
    pub buildkit: bool,
    pub compression: String,
    /// Files in the tar stream (with the incremental sync: the changed ones).
    pub files_sent: u64,
    /// Bytes of file content in the context.
    pub context_bytes: u64,
    /// Bytes that crossed the network for the context (after compression).
    pub bytes_sent: u64,
    /// Seconds per phase, in order.
    pub phases: Vec<(Phase, f64)>,
    pub total_seconds: f64,
    /// What the incremental sync did; `None` with `--no-incremental`.
    pub sync: Option<crate::sync::SyncSummary>,
    /// The built image's id (`sha256:…` of its config), as `--iidfile` writes it.
    pub image_id: Option<String>,
    /// The pushed manifest digest of every image reference.
    pub digests: std::collections::BTreeMap<String, String>,
    /// The pool `builder` was chosen from, when the build named a pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// For a pool: seconds spent waiting for a free builder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_seconds: Option<f64>,
    /// What the sync of each `--build-context` folder did.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub build_contexts: std::collections::BTreeMap<String, crate::sync::SyncSummary>,
    /// On a build service: the minutes it bills, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub billed_seconds: Option<f64>,
    /// A remark for the end of the summary line (a build service's caching).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl BuildReport {
    /// `sent 1.2 MiB (34 files) · connect 0.3s · … · total 16.1s`
    pub fn summary(&self) -> String {
        let mut parts = vec![match &self.sync {
            Some(s) if s.mode == "delta" => format!(
                "sent {} (incremental: {} changed file{}, {} deleted; {} of content)",
                human_bytes(self.bytes_sent),
                s.files_sent,
                if s.files_sent == 1 { "" } else { "s" },
                s.deleted,
                human_bytes(self.context_bytes)
            ),
            Some(s) => format!(
                "sent {} ({} files, {} of content; full sync: {})",
                human_bytes(self.bytes_sent),
                self.files_sent,
                human_bytes(self.context_bytes),
                s.reason.as_deref().unwrap_or("requested")
            ),
            None => format!(
                "sent {} ({} files, {} of content)",
                human_bytes(self.bytes_sent),
                self.files_sent,
                human_bytes(self.context_bytes)
            ),
        }];
        for (phase, secs) in &self.phases {
            parts.push(format!("{} {:.1}s", phase.name(), secs));
        }
        parts.push(format!("total {:.1}s", self.total_seconds));
        let mut digests: Vec<&String> = self.digests.values().collect();
        digests.dedup();
        match digests.as_slice() {
            [] => {}
            [one] => parts.push(format!("digest {one}")),
            _ => parts.push(
                self.digests
                    .iter()
                    .map(|(image, d)| format!("{image}@{d}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        }
        if let Some(note) = &self.note {
            parts.push(note.clone());
        }
        parts.join(" · ")
    }

    fn record(&mut self, phase: Phase, took: Duration) {
        self.phases.push((phase, took.as_secs_f64()));
    }
}

use crate::util::canonical;
pub use crate::util::human_bytes;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error("the Dockerfile `{}` does not exist", path.display())]
    NoDockerfile { path: PathBuf },
    #[error("the context `{}` is not a folder", path.display())]
    NoContext { path: PathBuf },
    #[error(transparent)]
    Ssh(Box<SshError>),
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error("the builder `{builder}` is busy: {holder} holds it, and it was not released within {}s", waited.as_secs())]
    LeaseTimeout {
        builder: String,
        holder: String,
        waited: Duration,
    },
    #[error("could not set up the workspace `{workspace}` on `{builder}`: {message}")]
    Workspace {
        builder: String,
        /// The SSH user, who must be able to write there.
        user: String,
        workspace: String,
        message: String,
    },
    #[error("sending the context to `{builder}` failed: {message}")]
    Upload { builder: String, message: String },
    #[error("docker on `{builder}` is not usable: {message}")]
    Docker {
        builder: String,
        /// The SSH user, who must be allowed to use docker.
        user: String,
        message: String,
    },
    #[error("`docker build` failed on `{builder}` ({status})")]
    DockerBuild { builder: String, status: ExitStatus },
    #[error(
        "`docker login` to `{registry}` failed on `{builder}` with credentials from {source_name}: {message}"
    )]
    Login {
        builder: String,
        registry: String,
        source_name: String,
        message: String,
    },
    #[error("`docker push {image}` failed on `{builder}` ({status})")]
    DockerPush {
        builder: String,
        image: String,
        status: ExitStatus,
    },
    #[error("the build on `{builder}` did not finish within {}s (`timeout`)", after.as_secs())]
    Timeout { builder: String, after: Duration },
    #[error("interrupted")]
    Interrupted,
    #[error(
        "the lease supervisor on `{builder}` went away during the build (killed, out of memory or a reboot): the build is abandoned"
    )]
    LeaseLost { builder: String },
    #[error(
        "build secrets and `--ssh` need BuildKit, but builder `{builder}` uses the legacy builder"
    )]
    SecretsNeedBuildKit { builder: String },
    #[error(transparent)]
    Output(#[from] crate::outputs::OutputError),
    #[error("cannot use the registry cache on `{builder}`: {message}")]
    Cache { builder: String, message: String },
    #[error("could not store the build secrets on `{builder}`: {message}")]
    Secrets { builder: String, message: String },
    #[error(
        "`--build-context` needs `docker build` with the buildx plugin, but `docker build` on `{builder}` ({docker}) does not take `--build-context`: {missing}"
    )]
    BuildContextUnsupported {
        builder: String,
        /// The builder's docker (path and server version).
        docker: String,
        missing: BuildxGap,
    },
}

/// Why a builder's `docker build` does not take `--build-context`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildxGap {
    /// `buildkit: off` in the builder's settings.
    LegacyBuilder,
    /// `docker buildx` exists, but `docker build` is the classic command.
    NotDefault,
    /// No `docker buildx` at all.
    NoPlugin,
}

impl std::fmt::Display for BuildxGap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BuildxGap::LegacyBuilder => {
                "the builder is set to the legacy builder (`buildkit: off`)"
            }
            BuildxGap::NotDefault => "buildx is installed but `docker build` does not use it",
            BuildxGap::NoPlugin => "the docker-buildx plugin is not installed",
        })
    }
}

impl From<SshError> for BuildError {
    fn from(e: SshError) -> Self {
        BuildError::Ssh(Box::new(e))
    }
}

impl From<crate::sync::SyncError> for BuildError {
    fn from(e: crate::sync::SyncError) -> BuildError {
        match e {
            crate::sync::SyncError::Context(e) => BuildError::Context(e),
            crate::sync::SyncError::Ssh(e) => BuildError::from(e),
            crate::sync::SyncError::Remote { builder, message } => {
                BuildError::Upload { builder, message }
            }
            crate::sync::SyncError::Timeout { builder, after } => BuildError::Upload {
                builder,
                message: format!(
                    "no report on its copy of the context within {}s",
                    after.as_secs()
                ),
            },
        }
    }
}

impl BuildError {
    /// Failures that may go away when the same build runs again: the
    /// connection dropped, or the builder went away under us. A failing
    /// Dockerfile step never is.
    pub fn is_transient(&self) -> bool {
        match self {
            BuildError::Ssh(e) => matches!(
                **e,
                SshError::Lost { .. }
                    | SshError::Channel { .. }
                    | SshError::Connect { .. }
                    | SshError::ConnectTimeout { .. }
            ),
            BuildError::DockerBuild { status, .. } | BuildError::DockerPush { status, .. } => {
                *status == ExitStatus::Unknown
            }
            BuildError::Upload { .. } | BuildError::LeaseLost { .. } => true,
            _ => false,
        }
    }
}

/// The SSH target of a builder at `host`.
pub fn ssh_target(b: &Builder, host: &str) -> Target {
    crate::provisioned::target_at(b, host, b.port)
}

/// Whether the build can run on a builder whose docker `probe` describes
/// (checked before anything is sent); `Ok(true)` with BuildKit.
fn check_probe(
    builder: &Builder,
    req: &BuildRequest,
    probe: &ProbeReport,
) -> Result<bool, BuildError> {
    if probe.docker_server.is_none() {
        return Err(BuildError::Docker {
            builder: builder.name.clone(),
            user: builder.user.clone(),
            message: probe
                .docker_error
                .clone()
                .unwrap_or_else(|| format!("`{}` did not answer", builder.docker)),
        });
    }
    let buildkit = match builder.buildkit {
        BuildkitSetting::On => true,
        BuildkitSetting::Off => false,
        BuildkitSetting::Auto => probe.buildkit_available(),
    };
    if (!req.secrets.is_empty() || req.ssh.is_some()) && !buildkit {
        return Err(BuildError::SecretsNeedBuildKit {
            builder: builder.name.clone(),
        });
    }
    // A builder that cannot use the named contexts must not receive them.
    if !req.build_contexts.is_empty() && (!buildkit || !probe.build_context) {
        return Err(BuildError::BuildContextUnsupported {
            builder: builder.name.clone(),
            docker: format!(
                "`{}`, docker {}",
                builder.docker,
                probe.docker_server.as_deref().unwrap_or("unknown")
            ),
            missing: if !buildkit {
                BuildxGap::LegacyBuilder
            } else if probe.buildx {
                BuildxGap::NotDefault
            } else {
                BuildxGap::NoPlugin
            },
        });
    }
    Ok(buildkit)
}

/// How the context travels to the builder. On loopback, compressing costs
/// more CPU time than the bytes it saves take to copy: none. Elsewhere the
/// link is assumed slower than zstd on this machine's cores (hundreds of
/// MB/s): zstd when the builder can decode it, else gzip, which every
/// builder's tar reads.
pub fn choose_compression(
    setting: CompressionSetting,
    loopback: bool,
    builder_has_zstd: bool,
) -> Compression {
    let zstd_or_gzip = if builder_has_zstd {
        Compression::Zstd
    } else {
        Compression::Gzip
    };
    match setting {
        CompressionSetting::None => Compression::None,
        CompressionSetting::Gzip => Compression::Gzip,
        CompressionSetting::Zstd => zstd_or_gzip,
        CompressionSetting::Auto if loopback => Compression::None,
        CompressionSetting::Auto => zstd_or_gzip,
    }
}

/// Who holds the lease, as other users will see it while they wait.
fn holder_description() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let host = if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "unknown-host".into()
    };
    let (user, host) = (printable(&user, 64), printable(&host, 64));
    format!(
        "{user}@{host} (pid {}) since {}",
        std::process::id(),
        chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
    )
}

fn run_id() -> String {
    format!(
        "{}-{:08x}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S"),
        rand::random::<u32>()
    )
}

/// The context as it will be sent: walked entries plus in-memory files.
pub struct PreparedContext {
    pub entries: Vec<context::Entry>,
    pub extra: Vec<ExtraFile>,
    /// A Dockerfile that lives outside the context (or was generated), sent
    /// next to it as `<run>/Dockerfile`.
    pub outside_dockerfile: Option<Vec<u8>>,
    /// `-f` for docker, relative to the run folder.
    pub dockerfile_arg: String,
    pub files: u64,
    pub bytes: u64,
    /// The `--build-context` folders, walked.
    pub named: Vec<crate::named_contexts::Prepared>,
}

/// Walks the context with its `.dockerignore` (on a blocking thread).
pub async fn prepare_context(req: &BuildRequest) -> Result<PreparedContext, BuildError> {
    let req = req.clone();
    tokio::task::spawn_blocking(move || prepare_context_blocking(&req))
        .await
        .map_err(|e| BuildError::Upload {
            builder: String::new(),
            message: format!("context walk panicked: {e}"),
        })?
}

fn unreadable(path: &Path) -> impl FnOnce(std::io::Error) -> ContextError + '_ {
    move |source| ContextError::Unreadable {
        path: path.to_path_buf(),
        source,
    }
}

/// A local file sent into the context under another name (the inputs of a
/// generated Dockerfile); read from disk while streaming, like any entry.
fn file_entry(name: &str, path: &Path) -> Result<context::Entry, ContextError> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).map_err(unreadable(path))?;
    if !md.is_file() {
        return Err(ContextError::Unreadable {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        });
    }
    Ok(context::Entry {
        rel: name.to_string(),
        abs: path.to_path_buf(),
        kind: context::EntryKind::File { size: md.len() },
        mode: md.mode() & 0o7777,
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec() as u32,
        ino: md.ino(),
        dev: md.dev(),
    })
}

fn prepare_context_blocking(req: &BuildRequest) -> Result<PreparedContext, BuildError> {
    let ctx = match &req.context_dir {
        Some(c) if !c.is_dir() => return Err(BuildError::NoContext { path: c.clone() }),
        Some(c) => Some(c.as_path()),
        None => None,
    };
    let mut always: Vec<String> = vec![".dockerignore".into()];
    let mut outside_dockerfile = None;
    let dockerfile_arg;
    let ignore_for;
    if let Some(text) = &req.generated_dockerfile {
        outside_dockerfile = Some(text.as_bytes().to_vec());
        dockerfile_arg = "Dockerfile".to_string();
        ignore_for = ctx.map(|c| c.join("Dockerfile"));
    } else {
        let df = &req.dockerfile;
        if !df.is_file() {
            return Err(BuildError::NoDockerfile { path: df.clone() });
        }
        ignore_for = Some(df.clone());
        if let Some(c) = ctx {
            context::guard::check_dockerfile(c, df)?;
        }
        match ctx.map(|c| {
            canonical(df)
                .strip_prefix(canonical(c))
                .map(Path::to_path_buf)
        }) {
            Some(Ok(rel)) => {
                let rel = rel.to_string_lossy().into_owned();
                dockerfile_arg = format!("context/{rel}");
                always.push(rel);
            }
            _ => {
                outside_dockerfile = Some(std::fs::read(df).map_err(unreadable(df))?);
                dockerfile_arg = "Dockerfile".into();
            }
        }
    }
    let mut entries = match (ctx, ignore_for) {
        (Some(ctx), Some(df)) => {
            let ignore = DockerIgnore::for_context(ctx, &df).map_err(unreadable(ctx))?;
            let always_ref: Vec<&str> = always.iter().map(String::as_str).collect();
            context::walk(ctx, &ignore, &always_ref)?
        }
        _ => Vec::new(),
    };
    // Generated inputs go in after the walk: a user's `.dockerignore` must
    // not drop them, and they replace any file of the same name.
    for (name, path) in &req.extra_files {
        if let Some(c) = ctx {
            context::guard::check_input_parents(c, name)?;
        }
        entries.retain(|e| e.rel != *name);
        entries.push(file_entry(name, path)?);
    }
    let mut files = 0;
    let mut bytes = 0;
    for e in &entries {
        if let context::EntryKind::File { size } = e.kind {
            files += 1;
            bytes += size;
        }
    }
    let named = crate::named_contexts::prepare(&req.build_contexts)?;
    Ok(PreparedContext {
        entries,
        extra: Vec::new(),
        outside_dockerfile,
        dockerfile_arg,
        files,
        bytes,
        named,
    })
}

/// A held lease: the supervisor process on the builder, and the task that
/// tells it every [`remote::LEASE_HEARTBEAT`] that we are still here.
pub struct Lease {
    process: RemoteProcess,
    pub run_dir: String,
    nonce: String,
    heartbeat: tokio::task::AbortHandle,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl Lease {
    /// Releases the lease; the supervisor kills anything still running and
    /// removes the run folder before it answers.
    pub async fn release(mut self, within: Duration) -> bool {
        self.heartbeat.abort();
        let _ = self.process.writer.eof().await;
        let mut buf = Vec::new();
        let mut err = Vec::new();
        let released = format!("{} released", self.nonce);
        let wait = async {
            while let Some(line) = self.process.reader.line(&mut buf, &mut err).await {
                if line == released {
                    return true;
                }
            }
            false
        };
        tokio::time::timeout(within, wait).await.unwrap_or(false)
    }
}

/// Builder-side text as absconda may print it: no control characters (a
/// forged holder file must not move the cursor or recolour the terminal),
/// at most `max` characters.
pub fn printable(text: &str, max: usize) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect()
}

/// Returns when the lease supervisor's channel closes: it prints nothing
/// between `acquired` and the release, so anything else means it is gone
/// (killed, out of memory, the builder rebooted) and with it the lease.
async fn lease_lost(process: &mut RemoteProcess) {
    let (mut buf, mut err) = (Vec::new(), Vec::new());
    while process.reader.line(&mut buf, &mut err).await.is_some() {}
}

/// What the build steps need of a held lease while [`lease_lost`] watches
/// its channel.
struct HeldRun {
    run_dir: String,
}

/// Takes the builder's lease, waiting for other builds up to `wait`.
pub async fn acquire_lease(
    session: &Session,
    builder: &Builder,
    wait: Duration,
    self_stop: Option<&SelfStop>,
    reporter: &dyn Reporter,
) -> Result<Lease, BuildError> {
    let run_dir = new_run_dir(builder);
    acquire_lease_at(session, builder, run_dir, wait, self_stop, reporter).await
}

/// A fresh run folder's path under the builder's workspace.
fn new_run_dir(builder: &Builder) -> String {
    format!(
        "{}/runs/{}",
        builder.workspace.trim_end_matches('/'),
        run_id()
    )
}

/// [`acquire_lease`] for the run folder `run_dir` (which the lease script
/// creates once it holds the lease).
async fn acquire_lease_at(
    session: &Session,
    builder: &Builder,
    run_dir: String,
    wait: Duration,
    self_stop: Option<&SelfStop>,
    reporter: &dyn Reporter,
) -> Result<Lease, BuildError> {
    let cmd = remote::lease(
        &builder.workspace,
        &run_dir,
        &holder_description(),
        wait,
        self_stop,
    );
    let mut process = session.exec("the builder lease", &cmd).await?;
    // Protocol lines start with the nonce the script says first (see
    // `remote::lease`); until then, nothing counts.
    let mut nonce = String::new();
    let mut buf = Vec::new();
    let mut stderr = Vec::new();
    let mut holder = String::new();
    let deadline = tokio::time::Instant::now() + wait + Duration::from_secs(30);
    loop {
        let line = tokio::time::timeout_at(deadline, process.reader.line(&mut buf, &mut stderr))
            .await
            .map_err(|_| BuildError::LeaseTimeout {
                builder: builder.name.clone(),
                holder: holder.clone(),
                waited: wait,
            })?;
        let Some(line) = line else {
            if process.reader.overlong() {
                return Err(BuildError::Workspace {
                    builder: builder.name.clone(),
                    user: builder.user.clone(),
                    workspace: builder.workspace.clone(),
                    message: "the lease supervisor sent a line longer than 64 KiB".into(),
                });
            }
            let message = printable(String::from_utf8_lossy(&stderr).trim(), 400);
            return Err(BuildError::Workspace {
                builder: builder.name.clone(),
                user: builder.user.clone(),
                workspace: builder.workspace.clone(),
                message: if message.is_empty() {
                    "the lease supervisor exited early (is `flock` installed on the builder?)"
                        .into()
                } else {
                    message.trim_start_matches("error ").to_string()
                },
            });
        };
        if nonce.is_empty() {
            if let Some(n) = line.strip_prefix("nonce ")
                && n.len() == 64
                && n.bytes().all(|b| b.is_ascii_hexdigit())
            {
                nonce = n.to_string();
            }
            continue;
        }
        let Some(line) = line
            .strip_prefix(nonce.as_str())
            .and_then(|l| l.strip_prefix(' '))
        else {
            continue;
        };
        let text = |h: &str| printable(h.trim(), 200);
        if line == "acquired" {
            let mut beat = process.writer.stream();
            let heartbeat = tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                loop {
                    tokio::time::sleep(remote::LEASE_HEARTBEAT).await;
                    if beat.write_all(b"\n").await.is_err() || beat.flush().await.is_err() {
                        return;
                    }
                }
            })
            .abort_handle();
            return Ok(Lease {
                process,
                run_dir,
                nonce,
                heartbeat,
            });
        } else if let Some(h) = line.strip_prefix("busy ") {
            let h = text(h);
            holder = h.clone();
            reporter.info(&format!(
                "builder `{}` is busy: held by {}; waiting up to {}s (--remote-wait)",
                builder.name,
                if h.is_empty() { "another build" } else { &h },
                wait.as_secs()
            ));
        } else if let Some(n) = line.strip_prefix("queue ") {
            match n.trim().parse::<u32>() {
                Ok(0) => reporter.info(&format!("builder `{}`: next in the queue", builder.name)),
                Ok(n) => reporter.info(&format!(
                    "builder `{}`: {n} build(s) ahead in the queue",
                    builder.name
                )),
                Err(_) => {}
            }
        } else if let Some(h) = line.strip_prefix("waiting ") {
            let h = text(h);
            if !h.is_empty() && h != holder {
                holder = h.clone();
                reporter.info(&format!("builder `{}` now held by {h}", builder.name));
            }
        } else if let Some(h) = line.strip_prefix("timeout") {
            return Err(BuildError::LeaseTimeout {
                builder: builder.name.clone(),
                holder: text(h),
                waited: wait,
            });
        }
    }
}

/// For `--remote-off`: holds the builder's lease, taken without waiting,
/// after the builder checked that no build waits for it; the lease is
/// released when this is dropped. `Err` says why the builder may be in use
/// (a holder, waiters, or any doubt).
pub async fn idle_for_stop(session: &Session, builder: &Builder) -> Result<RemoteProcess, String> {
    let mut process = session
        .exec("the stop check", &remote::stop_check(&builder.workspace))
        .await
        .map_err(|e| format!("could not check its lease ({e})"))?;
    let (mut buf, mut err) = (Vec::new(), Vec::new());
    let line = tokio::time::timeout(
        Duration::from_secs(30),
        process.reader.line(&mut buf, &mut err),
    )
    .await;
    match line {
        Ok(Some(l)) if l == "idle" => Ok(process),
        Ok(Some(l)) => Err(match l.split_once(' ') {
            Some(("busy", h)) if !h.trim().is_empty() => format!("held by {}", printable(h, 200)),
            Some(("busy", _)) => "another build holds it".into(),
            Some(("waiting", n)) => format!("{} build(s) waiting for it", printable(n, 20)),
            _ => format!("its lease could not be checked ({})", printable(&l, 200)),
        }),
        Ok(None) => Err("its lease could not be checked".into()),
        Err(_) => Err("its lease could not be checked within 30s".into()),
    }
}

/// Runs `docker` probes on the builder. What docker answered last time is
/// kept in the local cache under the key the builder computes from what
/// those answers depend on (see [`remote::probe`]): while the key holds,
/// the builder runs no docker command, and the probe costs one cheap shell
/// script.
pub async fn probe(session: &Session, builder: &Builder) -> Result<ProbeReport, BuildError> {
    let kept_at = probe_cache_path(session, builder);
    let kept = kept_at.as_deref().and_then(load_probe);
    let known = kept.as_ref().map(|k| k.key.as_str()).unwrap_or("");
    let out = session
        .output(
            "probing docker",
            &remote::probe(&builder.docker, &builder.workspace, known),
            b"",
        )
        .await
        .map_err(|e| match e {
            SshError::TooMuchOutput { .. } => BuildError::Docker {
                builder: builder.name.clone(),
                user: builder.user.clone(),
                message: e.to_string(),
            },
            e => e.into(),
        })?;
    let report = ProbeReport::parse(&out.stdout_str());
    match (report.cached, kept) {
        (true, Some(kept)) => {
            tracing::debug!(builder = %builder.name, "docker probe: the kept answers hold");
            Ok(report.with_docker_of(&kept.report))
        }
        _ => {
            if let (Some(path), Some(key), Some(_)) =
                (kept_at, report.key.clone(), report.docker_server.as_ref())
            {
                let kept = KeptProbe {
                    key,
                    report: report.clone(),
                };
                tokio::task::spawn_blocking(move || save_probe(&path, &kept));
            }
            Ok(report)
        }
    }
}

/// A probe's docker answers and the key they hold under.
#[derive(serde::Serialize, serde::Deserialize)]
struct KeptProbe {
    key: String,
    report: ProbeReport,
}

/// `<cache>/probes/<hash of the builder's address, user, docker and workspace>.json`
fn probe_cache_path(session: &Session, builder: &Builder) -> Option<PathBuf> {
    use sha2::{Digest, Sha256};
    let root = crate::sync::cache::cache_root()?;
    let mut h = Sha256::new();
    for part in [
        "absconda-probe-v1",
        &builder.name,
        session.addr(),
        session.user(),
        &builder.docker,
        &builder.workspace,
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    Some(
        root.join("probes")
            .join(format!("{}.json", hex::encode(&h.finalize()[..16]))),
    )
}

fn load_probe(path: &Path) -> Option<KeptProbe> {
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Best effort: a probe that is not kept is asked again next time.
fn save_probe(path: &Path, kept: &KeptProbe) {
    let Ok(data) = serde_json::to_vec(kept) else {
        return;
    };
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = crate::outputs::write_atomic(path, &data) {
        tracing::debug!(error = %e, "could not keep the docker probe");
    }
}

fn docker_build_argv(
    builder: &Builder,
    req: &BuildRequest,
    dockerfile_arg: &str,
    buildkit: bool,
    context: &str,
    extra: &[String],
) -> Vec<String> {
    let mut argv: Vec<String> = vec![
        "env".into(),
        format!("DOCKER_BUILDKIT={}", u8::from(buildkit)),
        "BUILDKIT_PROGRESS=plain".into(),
        builder.docker.clone(),
        "build".into(),
        "-f".into(),
        dockerfile_arg.into(),
    ];
    for image in &req.images {
        argv.push("--tag".into());
        argv.push(image.clone());
    }
    for a in &req.build_args {
        argv.push("--build-arg".into());
        argv.push(a.clone());
    }
    for l in &req.labels {
        argv.push("--label".into());
        argv.push(l.clone());
    }
    for (flag, values) in [("--add-host", &req.add_hosts), ("--ulimit", &req.ulimits)] {
        for v in values {
            argv.push(flag.into());
            argv.push(v.clone());
        }
    }
    if req.quiet {
        argv.push("--quiet".into());
    }
    for (flag, value) in [
        ("--target", &req.target),
        ("--platform", &req.platform),
        ("--network", &req.network),
        ("--shm-size", &req.shm_size),
    ] {
        if let Some(v) = value {
            argv.push(flag.into());
            argv.push(v.clone());
        }
    }
    if req.no_cache {
        argv.push("--no-cache".into());
    }
    if req.pull {
        argv.push("--pull".into());
    }
    if let Some(fw) = &req.ssh {
        for id in &fw.ids {
            argv.push("--ssh".into());
            argv.push(id.clone());
        }
    }
    argv.extend(extra.iter().cloned());
    argv.push(context.into());
    argv
}

/// Stores the secrets in a tmpfs folder of the run (see
/// [`remote::secrets`]) and returns the `docker build` arguments naming them.
async fn put_secrets(
    session: &Session,
    builder: &Builder,
    run_dir: &str,
    secrets: &[crate::secrets::BuildSecret],
) -> Result<Vec<String>, BuildError> {
    if secrets.is_empty() {
        return Ok(Vec::new());
    }
    let cmd = remote::secrets(
        &builder.workspace,
        run_dir,
        builder.secret_dir.as_deref().unwrap_or(""),
    );
    let out = session
        .output(
            "storing the build secrets",
            &cmd,
            &crate::secrets::tar(secrets),
        )
        .await?;
    let dir = out
        .stdout_str()
        .lines()
        .find_map(|l| l.strip_prefix("secrets=").map(str::to_string));
    match dir {
        Some(dir) if out.status.success() => Ok(crate::secrets::docker_args(secrets, &dir)),
        _ => Err(BuildError::Secrets {
            builder: builder.name.clone(),
            message: format!("{} ({})", out.stderr_tail(), out.status),
        }),
    }
}

/// Runs a command in the run folder with live output.
async fn stream(
    session: &Session,
    what: &str,
    run_dir: &str,
    argv: &[String],
    stdin: &[u8],
    reporter: &dyn Reporter,
) -> Result<(ExitStatus, Vec<u8>), BuildError> {
    let mut p = session.exec(what, &remote::run_in(run_dir, argv)).await?;
    if !stdin.is_empty() {
        p.writer.write_all(stdin).await?;
    }
    p.writer.eof().await?;
    let mut tail = Vec::new();
    let status = p
        .reader
        .drain(|is_err, d| {
            reporter.output(is_err, d);
            if is_err {
                tail.extend_from_slice(d);
                if tail.len() > 16 * 1024 {
                    tail.drain(..tail.len() - 8 * 1024);
                }
            }
        })
        .await;
    Ok((status, tail))
}

/// Runs a command in the run folder with live output, and returns its
/// status and (up to 64 KiB of) its stdout.
async fn stream_stdout(
    session: &Session,
    what: &str,
    run_dir: &str,
    argv: &[String],
    reporter: &dyn Reporter,
) -> Result<(ExitStatus, Vec<u8>), BuildError> {
    let mut p = session.exec(what, &remote::run_in(run_dir, argv)).await?;
    p.writer.eof().await?;
    let mut out = Vec::new();
    let status = p
        .reader
        .drain(|is_err, d| {
            reporter.output(is_err, d);
            if !is_err && out.len() < 64 * 1024 {
                out.extend_from_slice(d);
            }
        })
        .await;
    Ok((status, out))
}

/// Follows the `docker build` started beside the sync (see
/// [`remote::build_after_sync`]): its status and the image id it reported,
/// or `None` when it did not run because the copy was not as sent.
async fn run_started_build(
    mut p: RemoteProcess,
    nonce: &str,
    reporter: &dyn Reporter,
) -> Result<Option<(ExitStatus, Option<String>)>, BuildError> {
    p.writer.eof().await?;
    let mut said = String::new();
    let status = p
        .reader
        .drain(|is_err, d| {
            // The script's own line comes last, after docker's output.
            let text = String::from_utf8_lossy(d);
            match (is_err, text.find(nonce)) {
                (true, Some(at)) if said.is_empty() => {
                    let before = &d[..at];
                    let before = before.strip_suffix(b"\n").unwrap_or(before);
                    if !before.is_empty() {
                        reporter.output(true, before);
                    }
                    said = text[at + nonce.len()..].trim().to_string();
                }
                _ => reporter.output(is_err, d),
            }
        })
        .await;
    if said == "not-synced" {
        tracing::debug!("the early docker build found the copy not as sent; building again");
        return Ok(None);
    }
    let id = said
        .strip_prefix("iid ")
        .map(str::trim)
        .filter(|id| id.starts_with("sha256:") && id.len() == 71)
        .map(str::to_string);
    Ok(Some((status, id)))
}

/// The manifest digest `docker push` reports (`TAG: digest: sha256:… size: N`).
fn pushed_digest(output: &[u8]) -> Option<String> {
    String::from_utf8_lossy(output).lines().find_map(|l| {
        let (_, rest) = l.split_once(": digest: ")?;
        let d = rest.split_whitespace().next()?;
        (d.starts_with("sha256:") && d.len() == 71).then(|| d.to_string())
    })
}

/// The id of the image just built (`docker image inspect`).
async fn image_id(
    session: &Session,
    builder: &Builder,
    run_dir: &str,
    image: &str,
) -> Result<String, BuildError> {
    let argv: Vec<String> = vec![
        builder.docker.clone(),
        "image".into(),
        "inspect".into(),
        "--format".into(),
        "{{.Id}}".into(),
        image.into(),
    ];
    let out = session
        .output("docker image inspect", &remote::run_in(run_dir, &argv), b"")
        .await?;
    let id = out.stdout_str().trim().to_string();
    if !out.status.success() || !id.starts_with("sha256:") {
        return Err(BuildError::Docker {
            builder: builder.name.clone(),
            user: builder.user.clone(),
            message: format!(
                "`docker image inspect {image}` did not give the image id: {}",
                out.stderr_tail()
            ),
        });
    }
    Ok(id)
}

/// Runs the exporting build and streams its stdout into `spec`'s
/// destination (a temporary name until it is complete).
async fn receive_output(
    session: &Session,
    builder: &Builder,
    run_dir: &str,
    argv: &[String],
    spec: &crate::outputs::OutputSpec,
    reporter: &dyn Reporter,
) -> Result<(), BuildError> {
    use crate::ssh::exec::Event;
    let mut rx = crate::outputs::Receiver::create(spec).await?;
    let mut p = session
        .exec("docker build --output", &remote::run_in(run_dir, argv))
        .await?;
    p.writer.eof().await?;
    let mut failed = None;
    let started = Instant::now();
    let mut received: u64 = 0;
    while let Some(ev) = p.reader.next().await {
        match ev {
            Event::Stdout(d) => {
                if failed.is_none() {
                    match rx.write(&d).await {
                        Ok(()) => {
                            received += d.len() as u64;
                            reporter.download_progress(received, None);
                        }
                        Err(e) => failed = Some(e),
                    }
                }
            }
            Event::Stderr(d) => reporter.output(true, &d),
            Event::Exit(_) => {}
        }
    }
    let status = p.reader.drain(|_, _| {}).await;
    reporter.download_done(received, started.elapsed());
    if let Some(e) = failed {
        rx.abort().await;
        return Err(e.into());
    }
    if !status.success() {
        rx.abort().await;
        return Err(BuildError::DockerBuild {
            builder: builder.name.clone(),
            status,
        });
    }
    let bytes = rx.finish().await?;
    reporter.info(&format!(
        "wrote the build output to `{}` ({} received)",
        spec.dest.display(),
        human_bytes(bytes)
    ));
    Ok(())
}

/// `docker login` to each registry under a temporary `DOCKER_CONFIG` in
/// the run folder (the password through stdin); returns that folder.
async fn login(
    session: &Session,
    builder: &Builder,
    run_dir: &str,
    logins: &[Credentials],
) -> Result<String, BuildError> {
    let config_dir = format!("{run_dir}/.docker");
    for c in logins {
        let argv: Vec<String> = vec![
            "env".into(),
            format!("DOCKER_CONFIG={config_dir}"),
            builder.docker.clone(),
            "login".into(),
            "--username".into(),
            c.username.clone(),
            "--password-stdin".into(),
            c.registry.clone(),
        ];
        let stdin = format!("{}\n", c.password.expose());
        let (status, err) = stream(
            session,
            "docker login",
            run_dir,
            &argv,
            stdin.as_bytes(),
            &crate::report::Silent,
        )
        .await?;
        if !status.success() {
            return Err(BuildError::Login {
                builder: builder.name.clone(),
                registry: c.registry.clone(),
                source_name: c.source.clone(),
                message: String::from_utf8_lossy(&err).trim().to_string(),
            });
        }
        tracing::debug!(registry = %c.registry, source = %c.source, "logged in on the builder");
    }
    Ok(config_dir)
}

/// Writes a Dockerfile that is not part of the context to
/// `<run>/Dockerfile`; returns the bytes sent.
async fn put_outside_dockerfile(
    session: &Session,
    builder: &Builder,
    run_dir: &str,
    data: Option<&[u8]>,
) -> Result<u64, BuildError> {
    let Some(data) = data else {
        return Ok(0);
    };
    let cmd = crate::shell::join([
        "sh",
        "-c",
        "cat > \"$1\"",
        "absconda-put",
        &format!("{run_dir}/Dockerfile"),
    ]);
    let out = session.output("sending the Dockerfile", &cmd, data).await?;
    if !out.status.success() {
        return Err(BuildError::Upload {
            builder: builder.name.clone(),
            message: format!("writing the Dockerfile: {}", out.stderr_tail()),
        });
    }
    Ok(data.len() as u64)
}

/// Brings the builder's persistent copy of the context up to date (and
/// links it into the run folder as `context`); returns the bytes sent.
async fn sync_upload(
    session: &Session,
    job: &Job<'_>,
    run_dir: &str,
    prepared: PreparedContext,
    compression: Compression,
    report: &mut BuildReport,
) -> Result<u64, BuildError> {
    let sync_job = crate::sync::SyncJob {
        builder: job.builder,
        run_dir,
        identity: crate::sync::identity(job.req.context_dir.as_deref(), &job.req.extra_files),
        compression,
        verify: job.req.verify,
        cache_root: None,
    };
    let (summary, dockerfile_bytes) = tokio::try_join!(
        async {
            crate::sync::sync_context(
                session,
                &sync_job,
                prepared.entries,
                prepared.extra,
                job.reporter,
            )
            .await
            .map_err(BuildError::from)
        },
        put_outside_dockerfile(
            session,
            job.builder,
            run_dir,
            prepared.outside_dockerfile.as_deref()
        ),
    )?;
    report.files_sent = summary.files_sent;
    let sent = summary.bytes_sent + dockerfile_bytes;
    report.sync = Some(summary);
    Ok(sent)
}

/// Streams the prepared context into the run folder.
async fn upload(
    session: &Session,
    builder: &Builder,
    run_dir: &str,
    prepared: PreparedContext,
    compression: Compression,
    reporter: &dyn Reporter,
) -> Result<u64, BuildError> {
    put_outside_dockerfile(
        session,
        builder,
        run_dir,
        prepared.outside_dockerfile.as_deref(),
    )
    .await?;
    let mut p = session
        .exec("the context upload", &remote::upload(run_dir, compression))
        .await?;
    let planned = prepared.bytes;
    let content = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (mut rx, producer) = context::tar_stream_with_progress(
        prepared.entries,
        prepared.extra,
        "context/".into(),
        compression,
        256 * 1024,
        content.clone(),
    );
    let writer = &p.writer;
    let mut stderr = Vec::new();
    let reader = &mut p.reader;
    let send = async {
        let mut sent: u64 = 0;
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk.map_err(|e| BuildError::Upload {
                builder: builder.name.clone(),
                message: e.to_string(),
            })?;
            writer.write_all(&chunk).await?;
            sent += chunk.len() as u64;
            reporter.upload_progress(sent);
            reporter.upload_content(content.load(std::sync::atomic::Ordering::Relaxed), planned);
        }
        writer.eof().await?;
        Ok::<u64, BuildError>(sent)
    };
    let recv = reader
        .drain(|_, d| crate::ssh::exec::keep_tail(&mut stderr, d, crate::ssh::exec::STDERR_LIMIT));
    let (sent, status) = tokio::join!(send, recv);
    let produced = producer.await.map_err(|e| BuildError::Upload {
        builder: builder.name.clone(),
        message: format!("tar writer failed: {e}"),
    })?;
    produced?;
    let sent = sent?;
    if !status.success() {
        return Err(BuildError::Upload {
            builder: builder.name.clone(),
            message: format!(
                "tar on the builder ended with {status}: {}",
                String::from_utf8_lossy(&stderr).trim()
            ),
        });
    }
    Ok(sent)
}

/// One build's inputs and the things it reports to.
pub struct Job<'a> {
    pub builder: &'a Builder,
    pub req: &'a BuildRequest,
    pub self_stop: Option<&'a SelfStop>,
    pub reporter: &'a dyn Reporter,
    pub cancel: &'a CancellationToken,
}

/// The whole build on a connected session. The caller owns connecting (and
/// starting cloud VMs); this owns the lease and everything under it.
///
/// `held` is a lease the caller already took on this session (a pool takes
/// one before it commits to a builder); without it, this takes the lease,
/// waiting up to `--remote-wait`.
pub async fn build_on(
    session: &Session,
    job: &Job<'_>,
    prepared: PreparedContext,
    report: &mut BuildReport,
    held: Option<Lease>,
) -> Result<(), BuildError> {
    let Job {
        builder,
        req,
        self_stop,
        reporter,
        cancel,
    } = *job;
    // The registries to log in to: the pushed images' and the caches'.
    let mut registries: Vec<String> = Vec::new();
    if req.push
        && let Some(img) = req.images.first()
    {
        registries.push(registry::registry_of(img));
    }
    let cache_refs: Vec<String> = req
        .cache_from
        .iter()
        .chain(&req.cache_to)
        .filter_map(|s| crate::cache::registry_ref(s))
        .collect();
    for r in &cache_refs {
        let r = registry::registry_of(r);
        if !registries.contains(&r) {
            registries.push(r);
        }
    }
    let mut logins: Vec<Credentials> = Vec::new();
    for r in &registries {
        if let Some(c) = registry::lookup(r)? {
            logins.push(c);
        }
    }

    // Lease, probe and (for the incremental sync) the sync, concurrently on
    // three channels: the sync script starts on the builder as soon as the
    // lease script made the run folder, and sends its copy's state; the
    // compression is decided from the probe before anything is sent.
    reporter.phase(Phase::Lease);
    let t = Instant::now();
    let loopback = session.on_loopback();
    let run_dir = match &held {
        Some(lease) => lease.run_dir.clone(),
        None => new_run_dir(builder),
    };
    let mut prepared = prepared;
    let early_inputs = (req.incremental && req.build_contexts.is_empty()).then(|| {
        (
            std::mem::take(&mut prepared.entries),
            std::mem::take(&mut prepared.extra),
        )
    });
    let (decided, decision) = tokio::sync::watch::channel(None);
    let (buildkit_known, buildkit_rx) = tokio::sync::watch::channel(None::<bool>);
    // `docker build` starts beside the sync's request when nothing else
    // must reach the builder first (see `remote::build_after_sync`).
    let build_early = early_inputs.is_some()
        && req.secrets.is_empty()
        && req.cache_from.is_empty()
        && req.cache_to.is_empty()
        && req.ssh.is_none()
        && prepared.outside_dockerfile.is_none()
        // `docker login` runs in the run folder too, and would take the
        // slot where the lease supervisor finds the build to stop it.
        && logins.is_empty();
    let (sending, sent_manifest) = tokio::sync::oneshot::channel::<crate::sync::Sending>();
    let sending = build_early.then_some(sending);
    let stop_sync = CancellationToken::new();
    let lease_took = std::cell::Cell::new(Duration::ZERO);
    let lease_and_probe = async {
        let (lease, probe) = match held {
            Some(lease) => (Ok(lease), probe(session, builder).await),
            None => tokio::join!(
                acquire_lease_at(
                    session,
                    builder,
                    run_dir.clone(),
                    req.remote_wait,
                    self_stop,
                    reporter
                ),
                probe(session, builder)
            ),
        };
        match (&lease, &probe) {
            (Ok(_), Ok(p)) if check_probe(builder, req, p).is_ok() => {
                let c = choose_compression(builder.compression, loopback, p.zstd);
                let _ = decided.send(Some(c));
                let _ = buildkit_known.send(check_probe(builder, req, p).ok());
            }
            _ => stop_sync.cancel(),
        }
        lease_took.set(t.elapsed());
        reporter.phase_done(Phase::Lease, t.elapsed());
        if lease.is_ok() {
            reporter.phase(Phase::Upload);
        }
        (lease, probe)
    };
    let identity = crate::sync::identity(req.context_dir.as_deref(), &req.extra_files);
    let early_job = crate::sync::SyncJob {
        builder,
        run_dir: &run_dir,
        identity,
        compression: Compression::None,
        verify: req.verify,
        cache_root: None,
    };
    let early_sync = async {
        let (entries, extra) = early_inputs?;
        let early = crate::sync::Early {
            wait: req.remote_wait,
            compression: decision,
            sending,
            // Its layers are not reused by builds from the copy's folder:
            // only where asked for, or where nothing is reused anyway.
            stream: builder.stream_cold || req.no_cache,
        };
        tokio::select! {
            r = crate::sync::sync_context_early(session, &early_job, entries, extra, reporter, Some(early)) => Some(r),
            _ = stop_sync.cancelled() => None,
        }
    };
    let build_nonce = format!("{:032x}", rand::random::<u128>());
    let early_build = async {
        if !build_early {
            return None;
        }
        let (opened, sending) = tokio::join!(session.open("docker build"), sent_manifest);
        let (opened, sending) = (opened.ok()?, sending.ok()?);
        let mut rx = buildkit_rx;
        let buildkit = (*rx.wait_for(Option::is_some).await.ok()?)?;
        let extra = ["--iidfile".to_string(), ".iid".to_string()];
        // A streamed context is a tar archive: the Dockerfile is named
        // inside it, not through the run folder's link to the copy.
        let dockerfile = match sending.streamed {
            true => prepared
                .dockerfile_arg
                .strip_prefix("context/")
                .unwrap_or(&prepared.dockerfile_arg),
            false => &prepared.dockerfile_arg,
        };
        let mut argv = docker_build_argv(builder, req, dockerfile, buildkit, "", &extra);
        argv.pop();
        let cmd = remote::build_after_sync(
            &run_dir,
            &build_nonce,
            &sending.manifest,
            sending.streamed,
            builder.timeout,
            &argv,
        );
        opened.exec(&cmd).await.ok()
    };
    let ((lease, probe), early_synced, early_build) = tokio::select! {
        r = async { tokio::join!(lease_and_probe, early_sync, early_build) } => r,
        _ = cancel.cancelled() => return Err(BuildError::Interrupted),
    };
    let mut early_build = early_build;
    let mut held = lease?;
    let watch = &mut held.process;
    let lease = HeldRun {
        run_dir: held.run_dir.clone(),
    };
    report.record(Phase::Lease, lease_took.get());
    let upload_started = t + lease_took.get();

    let work = async {
        let probe = probe?;
        let buildkit = check_probe(builder, req, &probe)?;
        report.buildkit = buildkit;
        let compression = choose_compression(builder.compression, loopback, probe.zstd);
        report.compression = compression.name().into();

        let t = upload_started;
        let dockerfile_arg = prepared.dockerfile_arg.clone();
        let mut prepared = prepared;
        let named = std::mem::take(&mut prepared.named);
        report.files_sent = prepared.files;
        report.context_bytes = prepared.bytes;
        report.bytes_sent = match early_synced {
            Some(summary) => {
                let summary = summary?;
                let dockerfile_bytes = put_outside_dockerfile(
                    session,
                    builder,
                    &lease.run_dir,
                    prepared.outside_dockerfile.as_deref(),
                )
                .await?;
                report.files_sent = summary.files_sent;
                let sent = summary.bytes_sent + dockerfile_bytes;
                report.sync = Some(summary);
                sent
            }
            // (With named contexts the sync starts only once the probe
            // said the builder can use them: nothing is sent otherwise.)
            None if req.incremental => {
                sync_upload(session, job, &lease.run_dir, prepared, compression, report).await?
            }
            None => {
                upload(
                    session,
                    builder,
                    &lease.run_dir,
                    prepared,
                    compression,
                    reporter,
                )
                .await?
            }
        };
        let synced = crate::named_contexts::sync(
            session,
            builder,
            named,
            compression,
            req.verify,
            None,
            reporter,
        )
        .await?;
        for s in &synced {
            report.bytes_sent += s.summary.bytes_sent;
            report
                .build_contexts
                .insert(s.name.clone(), s.summary.clone());
        }
        let mut extra = put_secrets(session, builder, &lease.run_dir, &req.secrets).await?;
        extra.extend(crate::named_contexts::docker_args(
            &req.build_contexts,
            &synced,
        ));
        report.record(Phase::Upload, t.elapsed());
        reporter.phase_done(Phase::Upload, t.elapsed());

        reporter.phase(Phase::Build);
        let t = Instant::now();
        // BuildKit reuses its copy of the last context transferred under
        // the same path for every file whose size, mode and mtime match,
        // without reading it. The incremental sync's copy keeps its own
        // path from build to build (and nanosecond mtimes); a full upload
        // lands in a new run folder, whose absolute path is never reused
        // (the bare `context` would share that cache between all contexts).
        let context = report
            .sync
            .as_ref()
            .and_then(|s| s.tree.clone())
            .unwrap_or_else(|| {
                if lease.run_dir.starts_with('/') {
                    format!("{}/context", lease.run_dir)
                } else {
                    "context".into()
                }
            });
        if !req.cache_from.is_empty() || !req.cache_to.is_empty() {
            if !buildkit {
                return Err(BuildError::Cache {
                    builder: builder.name.clone(),
                    message: "registry caches need BuildKit".into(),
                });
            }
            extra.extend(
                crate::cache::docker_args(&req.cache_from, &req.cache_to, probe.build_cache_to)
                    .map_err(|message| BuildError::Cache {
                        builder: builder.name.clone(),
                        message,
                    })?,
            );
        }
        // Logged in under a temporary DOCKER_CONFIG in the run folder; the
        // build sees it only when it reads or writes a registry cache.
        let docker_config = if logins.is_empty() {
            None
        } else {
            Some(login(session, builder, &lease.run_dir, &logins).await?)
        };
        let mut argv = docker_build_argv(builder, req, &dockerfile_arg, buildkit, &context, &extra);
        if let (Some(dir), false) = (&docker_config, cache_refs.is_empty()) {
            argv.insert(1, format!("DOCKER_CONFIG={dir}"));
        }
        let early = match early_build.take() {
            Some(p) => run_started_build(p, &build_nonce, reporter).await?,
            _ => None,
        };
        if let Some((_, Some(id))) = &early {
            report.image_id = Some(id.clone());
        }
        let (status, _) = match &req.ssh {
            _ if early.is_some() => (
                early
                    .as_ref()
                    .map(|e| e.0.clone())
                    .unwrap_or(ExitStatus::Unknown),
                Vec::new(),
            ),
            None => {
                stream(
                    session,
                    "docker build",
                    &lease.run_dir,
                    &argv,
                    b"",
                    reporter,
                )
                .await?
            }
            Some(fw) => {
                let mut p = session
                    .exec_with_agent(
                        "docker build",
                        &remote::run_in(&lease.run_dir, &argv),
                        &fw.agent,
                    )
                    .await?;
                p.writer.eof().await?;
                let status = p.reader.drain(|is_err, d| reporter.output(is_err, d)).await;
                (status, Vec::new())
            }
        };
        if !status.success() {
            return Err(BuildError::DockerBuild {
                builder: builder.name.clone(),
                status,
            });
        }
        if let (Some(first), None) = (req.images.first(), &report.image_id) {
            report.image_id = Some(image_id(session, builder, &lease.run_dir, first).await?);
        }
        if let Some(spec) = &req.output {
            // The same build again (every step cached), exporting to stdout.
            let mut extra = extra.clone();
            extra.extend(["--output".into(), spec.remote_arg()]);
            let untagged = BuildRequest {
                images: Vec::new(),
                quiet: false,
                ssh: None,
                ..req.clone()
            };
            let mut argv = docker_build_argv(
                builder,
                &untagged,
                &dockerfile_arg,
                buildkit,
                &context,
                &extra,
            );
            if let (Some(dir), false) = (&docker_config, cache_refs.is_empty()) {
                argv.insert(1, format!("DOCKER_CONFIG={dir}"));
            }
            receive_output(session, builder, &lease.run_dir, &argv, spec, reporter).await?;
        }
        report.record(Phase::Build, t.elapsed());
        reporter.phase_done(Phase::Build, t.elapsed());

        if req.push {
            reporter.phase(Phase::Push);
            let t = Instant::now();
            let mut env: Vec<String> = vec!["env".into()];
            if let Some(dir) = &docker_config {
                env.push(format!("DOCKER_CONFIG={dir}"));
            }
            for image in &req.images {
                let mut argv = env.clone();
                argv.extend([builder.docker.clone(), "push".into(), image.clone()]);
                let (status, out) =
                    stream_stdout(session, "docker push", &lease.run_dir, &argv, reporter).await?;
                if !status.success() {
                    return Err(BuildError::DockerPush {
                        builder: builder.name.clone(),
                        image: image.clone(),
                        status,
                    });
                }
                if let Some(d) = pushed_digest(&out) {
                    report.digests.insert(image.clone(), d);
                }
            }
            report.pushed = true;
            report.record(Phase::Push, t.elapsed());
            reporter.phase_done(Phase::Push, t.elapsed());
        }
        Ok(())
    };

    let result = tokio::select! {
        r = tokio::time::timeout(builder.timeout, work) => r.unwrap_or_else(|_| Err(BuildError::Timeout {
            builder: builder.name.clone(),
            after: builder.timeout,
        })),
        _ = lease_lost(watch) => Err(BuildError::LeaseLost { builder: builder.name.clone() }),
        _ = cancel.cancelled() => Err(BuildError::Interrupted),
    };

    reporter.phase(Phase::Cleanup);
    let t = Instant::now();
    if !held.release(Duration::from_secs(30)).await {
        tracing::debug!(
            "the lease supervisor did not confirm cleanup; it cleans up when the connection closes"
        );
    }
    report.record(Phase::Cleanup, t.elapsed());
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_digest_from_docker_output() {
        let d = "sha256:4bd5e9bd0ee4ce4eb4dd1b3f8a1bfcf1e8b35d8a1ffc4b5d3a4c8f5e1a2b3c4d";
        let out = format!(
            "The push refers to repository [127.0.0.1:5000/a]\n5f70bf18a086: Pushed\nv1: digest: {d} size: 527\n"
        );
        assert_eq!(pushed_digest(out.as_bytes()).as_deref(), Some(d));
        assert_eq!(pushed_digest(b"v1: digest: sha256:short size: 1\n"), None);
        assert_eq!(pushed_digest(b""), None);
    }

    #[test]
    fn named_contexts_reach_docker_as_quoted_words_before_the_context() {
        let file = crate::config::ConfigFile::parse(
            Path::new("absconda-remote.yaml"),
            "builders:\n  b:\n    provider: ssh\n    host: h\n    user: u\n",
        )
        .unwrap();
        let builder = file.builder("b").unwrap();
        let named = crate::named_contexts::parse_all(&[
            "base=docker-image://alpine:3.20".to_string(),
            "lib=https://example.com/x.git#main".to_string(),
        ])
        .unwrap();
        let synced = [crate::named_contexts::Synced {
            name: "other".into(),
            tree: "/ws/contexts/k/tree".into(),
            summary: Default::default(),
        }];
        let mut extra = crate::named_contexts::docker_args(&named, &synced);
        extra.extend([
            "--build-context".to_string(),
            "lib2=/w s/contexts/k'$(x)/tree".to_string(),
        ]);
        let req = BuildRequest::default();
        let argv = docker_build_argv(&builder, &req, "Dockerfile", true, "/ws/ctx", &extra);
        let n = argv.len();
        assert_eq!(
            argv[n - 7..],
            [
                "--build-context",
                "base=docker-image://alpine:3.20",
                "--build-context",
                "lib=https://example.com/x.git#main",
                "--build-context",
                "lib2=/w s/contexts/k'$(x)/tree",
                "/ws/ctx",
            ]
        );
        // The shell on the builder sees every argument as one word.
        let cmd = remote::run_in("/tmp", &argv);
        assert!(
            cmd.contains("'lib2=/w s/contexts/k'\\''$(x)/tree'"),
            "{cmd}"
        );
    }

    #[test]
    fn compression_per_link_and_builder() {
        use CompressionSetting as S;
        let cases = [
            (S::Auto, true, true, Compression::None),
            (S::Auto, false, true, Compression::Zstd),
            (S::Auto, false, false, Compression::Gzip),
            (S::Zstd, true, true, Compression::Zstd),
            (S::Zstd, false, false, Compression::Gzip),
            (S::Gzip, false, true, Compression::Gzip),
            (S::None, false, true, Compression::None),
        ];
        for (setting, loopback, zstd, want) in cases {
            assert_eq!(
                choose_compression(setting, loopback, zstd),
                want,
                "{setting:?} loopback={loopback} zstd={zstd}"
            );
        }
    }

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}
