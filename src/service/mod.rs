//! Build services as builders: AWS CodeBuild (`provider: codebuild`) and
//! Google Cloud Build (`provider: cloudbuild`).
//!
//! A team that outgrows its own builders can send builds to a service that
//! already runs them, alone or as a pool's `overflow:` when every member is
//! busy. absconda talks to the services' REST APIs itself, as it does to the
//! clouds' compute APIs; no `aws` or `gcloud` program runs here.
//!
//! The flow is the same for both: the context (the same `.dockerignore`
//! walk as for a VM) is packed into a gzip tar, uploaded to the configured
//! bucket, a build is started that runs `docker build` with the command
//! line's flags (and `docker push` with `--push`), its log is followed while
//! it runs, and its final status becomes absconda's exit code. Ctrl-C stops
//! the build; the uploaded object is deleted in every case.
//!
//! Each build runs on a fresh machine: there is no layer cache between
//! builds unless the build brings one (`--cache-from`/`--cache-to` with
//! `type=registry`), which the summary line says.

pub mod cloudbuild;
pub mod codebuild;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::build::{BuildError, BuildReport, BuildRequest, PreparedContext};
use crate::cloud::CloudError;
use crate::config::{Builder, ProviderKind};
use crate::context::{self, Compression, ContextError, ExtraFile};
use crate::report::{Phase, Reporter};

/// Where the context object goes in the bucket.
const OBJECT_PREFIX: &str = "absconda/contexts/";
/// The Dockerfile's name in the archive when it lives outside the context
/// (or was generated).
const OUTSIDE_DOCKERFILE: &str = ".absconda.Dockerfile";
/// How often the build's status and log are asked for.
pub const POLL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("`{flag}` cannot be used with build service `{builder}`: {why}")]
    Unsupported {
        builder: String,
        flag: &'static str,
        why: &'static str,
    },
    #[error("{service} build `{id}` failed ({status}{})", phase.as_deref().map(|p| format!(" in phase {p}")).unwrap_or_default())]
    BuildFailed {
        service: &'static str,
        id: String,
        status: String,
        phase: Option<String>,
    },
    #[error("{service} build `{id}` failed while pushing ({status})")]
    PushFailed {
        service: &'static str,
        id: String,
        status: String,
    },
    /// The service ended the build for its own reasons (an internal error,
    /// stopped or cancelled by someone else, expired in its queue).
    #[error("{service} build `{id}` ended with status {status}")]
    Ended {
        service: &'static str,
        id: String,
        status: String,
    },
    #[error("{service} build `{id}` did not finish within {}s (the builder's `timeout`)", after.as_secs())]
    Timeout {
        service: &'static str,
        id: String,
        after: Duration,
    },
    #[error("cannot pack the context into `{}`", path.display())]
    Pack {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error(transparent)]
    Cloud(#[from] CloudError),
}

impl ServiceError {
    /// The exit code (see [`crate::exit`]).
    pub fn exit_code(&self) -> u8 {
        use crate::exit;
        match self {
            ServiceError::Unsupported { .. } => exit::USAGE,
            ServiceError::BuildFailed { .. } | ServiceError::Timeout { .. } => exit::BUILD_FAILED,
            ServiceError::PushFailed { .. } => exit::PUSH_FAILED,
            ServiceError::Ended { .. } | ServiceError::Cloud(_) => exit::CLOUD,
            ServiceError::Pack { .. } | ServiceError::Context(_) => exit::FAILURE,
        }
    }
}

/// The context, packed: a gzip tar on disk (removed when dropped), with the
/// context at its root.
pub struct Package {
    pub path: PathBuf,
    pub size: u64,
    /// `-f` for docker, relative to the archive's root.
    pub dockerfile: String,
    pub files: u64,
    pub content_bytes: u64,
}

impl Drop for Package {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Package {
    /// A name for the object: unique per build.
    pub fn object_name(&self) -> String {
        format!(
            "{OBJECT_PREFIX}{}-{:016x}.tar.gz",
            chrono::Utc::now().format("%Y%m%dT%H%M%S"),
            rand::random::<u64>()
        )
    }

    /// Reads `len` bytes at `offset` (a part of a multipart or resumable upload).
    pub async fn read_range(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = std::fs::File::open(&path)?;
            f.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::with_capacity(len);
            f.take(len as u64).read_to_end(&mut buf)?;
            Ok(buf)
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// Refuses the flags a service build cannot honour, each with why.
pub fn check_request(builder: &Builder, req: &BuildRequest) -> Result<(), ServiceError> {
    let refuse = |flag, why| {
        Err(ServiceError::Unsupported {
            builder: builder.name.clone(),
            flag,
            why,
        })
    };
    if req.output.is_some() {
        return refuse(
            "--output",
            "the result stays on the service; push the image instead",
        );
    }
    if req.ssh.is_some() {
        return refuse("--ssh", "the local SSH agent cannot reach the service");
    }
    if !req.secrets.is_empty() {
        return refuse(
            "--secret",
            "secret values are not sent to a service; use the service's secret store in the Dockerfile's build",
        );
    }
    if !req.build_contexts.is_empty() {
        return refuse(
            "--build-context",
            "only the main context is uploaded to the service",
        );
    }
    if !req.cache_to.is_empty() && !req.push {
        return refuse(
            "--cache-to",
            "a registry cache is written by `docker buildx build --push`: add `--push`",
        );
    }
    Ok(())
}

/// Says, without failing the build, that the uploaded context `url` could
/// not be deleted after the build.
pub(crate) fn report_delete<E: std::error::Error + Send + Sync + 'static>(
    reporter: &dyn Reporter,
    url: &str,
    deleted: Result<(), E>,
) {
    if let Err(e) = deleted {
        reporter.info(&format!(
            "could not delete the context `{url}`: {}",
            crate::exit::one_line(&anyhow::Error::new(e))
        ));
    }
}

/// Packs the walked context into a gzip tar in the temporary folder
/// (`$TMPDIR`), readable only by this user and removed with the package.
pub async fn pack(prepared: PreparedContext) -> Result<Package, ServiceError> {
    let path = std::env::temp_dir().join(format!(
        "absconda-context-{}-{:016x}.tar.gz",
        std::process::id(),
        rand::random::<u64>()
    ));
    let dockerfile = match prepared.dockerfile_arg.strip_prefix("context/") {
        Some(rel) if prepared.outside_dockerfile.is_none() => rel.to_string(),
        _ => OUTSIDE_DOCKERFILE.to_string(),
    };
    let mut extra = prepared.extra;
    if let Some(data) = prepared.outside_dockerfile {
        extra.push(ExtraFile {
            name: OUTSIDE_DOCKERFILE.into(),
            data,
            mode: 0o644,
        });
    }
    let entries = prepared.entries;
    let p = path.clone();
    let packed = tokio::task::spawn_blocking(move || -> Result<(), ServiceError> {
        let io = |source| ServiceError::Pack {
            path: p.clone(),
            source,
        };
        // Only this user may read the packed context, and never through a
        // file someone else put at the name first.
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)
                .map_err(io)?
        };
        let mut out = std::io::BufWriter::new(file);
        context::write_tar(&entries, &extra, "", Compression::Gzip, &mut out)?;
        out.flush().map_err(io)?;
        Ok(())
    })
    .await
    .map_err(|e| ServiceError::Pack {
        path: path.clone(),
        source: std::io::Error::other(e.to_string()),
    });
    let mut package = Package {
        size: 0,
        path,
        dockerfile,
        files: prepared.files,
        content_bytes: prepared.bytes,
    };
    packed??;
    let size = std::fs::metadata(&package.path)
        .map_err(|source| ServiceError::Pack {
            path: package.path.clone(),
            source,
        })?
        .len();
    package.size = size;
    Ok(package)
}

/// `docker build` (or `docker buildx build` for a registry cache export)
/// arguments for the request, after `docker`; the context is `.`.
pub fn docker_build_args(req: &BuildRequest, dockerfile: &str) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    if req.cache_to.is_empty() {
        a.push("build".into());
    } else {
        a.extend(["buildx".into(), "build".into(), "--push".into()]);
    }
    a.extend(["-f".into(), dockerfile.into()]);
    for image in &req.images {
        a.extend(["-t".into(), image.clone()]);
    }
    for (flag, values) in [
        ("--build-arg", &req.build_args),
        ("--label", &req.labels),
        ("--cache-from", &req.cache_from),
        ("--cache-to", &req.cache_to),
        ("--add-host", &req.add_hosts),
        ("--ulimit", &req.ulimits),
    ] {
        for v in values {
            a.extend([flag.into(), v.clone()]);
        }
    }
    for (flag, value) in [
        ("--target", &req.target),
        ("--platform", &req.platform),
        ("--network", &req.network),
        ("--shm-size", &req.shm_size),
    ] {
        if let Some(v) = value {
            a.extend([flag.into(), v.clone()]);
        }
    }
    if req.no_cache {
        a.push("--no-cache".into());
    }
    if req.pull {
        a.push("--pull".into());
    }
    if req.quiet {
        a.push("--quiet".into());
    }
    a.push(".".into());
    a
}

/// Whether the build pushes by itself (`buildx build --push`).
pub fn pushes_in_build(req: &BuildRequest) -> bool {
    !req.cache_to.is_empty()
}

/// The summary's note on caching.
pub fn cache_note(req: &BuildRequest) -> Option<String> {
    (req.cache_from.is_empty() && req.cache_to.is_empty()).then(|| {
        "no persistent layer cache on a build service: add `--cache-from type=registry,ref=REPO:cache --cache-to type=registry,ref=REPO:cache,mode=max` to reuse layers".to_string()
    })
}

/// Billed minutes of a build that ran `seconds`: whole minutes, rounded up.
pub fn billed_minutes(seconds: f64) -> f64 {
    (seconds.max(1.0) / 60.0).ceil()
}

/// Runs the build on the service `builder` names (see the module docs).
pub async fn build(
    builder: &Builder,
    req: &BuildRequest,
    prepared: PreparedContext,
    reporter: &dyn Reporter,
    cancel: &CancellationToken,
    report: &mut BuildReport,
) -> anyhow::Result<()> {
    check_request(builder, req)?;
    let started = Instant::now();
    report.builder = builder.name.clone();
    let package = pack(prepared).await?;
    report.files_sent = package.files;
    report.context_bytes = package.content_bytes;
    report.bytes_sent = package.size;
    report.note = cache_note(req);
    let result = match builder.provider {
        ProviderKind::CodeBuild => {
            codebuild::run(builder, req, &package, reporter, cancel, report).await
        }
        ProviderKind::CloudBuild => {
            cloudbuild::run(builder, req, &package, reporter, cancel, report).await
        }
        other => anyhow::bail!(
            "builder `{}` is not a build service (`provider: {other}`)",
            builder.name
        ),
    };
    tracing::debug!(took = ?started.elapsed(), "service build done");
    report.pushed = result.is_ok() && req.push;
    result
}

/// Times one phase into the report.
pub fn phase_done(report: &mut BuildReport, reporter: &dyn Reporter, phase: Phase, since: Instant) {
    let took = since.elapsed();
    reporter.phase_done(phase, took);
    report.phases.push((phase, took.as_secs_f64()));
}

/// Ctrl-C as the build pipeline reports it.
pub fn interrupted() -> anyhow::Error {
    BuildError::Interrupted.into()
}

/// A bucket or object name as a URL path segment (`/` kept).
pub fn encode_path(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_a_service_cannot_honour_are_refused_as_usage_errors() {
        let cfg = crate::config::ConfigFile::parse(
            std::path::Path::new("/x/absconda-remote.yaml"),
            "builders:\n  gb:\n    provider: cloudbuild\n    bucket: b\n    project: p\n",
        )
        .unwrap();
        let b = cfg.builder("gb").unwrap();
        assert!(check_request(&b, &BuildRequest::default()).is_ok());
        let cases = [
            (
                BuildRequest {
                    cache_to: vec!["type=registry,ref=r/c".into()],
                    ..Default::default()
                },
                "--cache-to",
            ),
            (
                BuildRequest {
                    output: Some(crate::outputs::OutputSpec::parse("type=local,dest=out").unwrap()),
                    ..Default::default()
                },
                "--output",
            ),
        ];
        for (req, flag) in cases {
            let e = check_request(&b, &req).unwrap_err();
            assert!(e.to_string().contains(&format!("`{flag}`")), "{e}");
            assert_eq!(e.exit_code(), crate::exit::USAGE);
        }
    }

    #[test]
    fn docker_arguments_and_billing() {
        let req = BuildRequest {
            images: vec!["r/a:1".into(), "r/a:latest".into()],
            target: Some("t".into()),
            no_cache: true,
            ..Default::default()
        };
        assert_eq!(
            docker_build_args(&req, "d/Dockerfile").join(" "),
            "build -f d/Dockerfile -t r/a:1 -t r/a:latest --target t --no-cache ."
        );
        assert_eq!(billed_minutes(0.2), 1.0);
        assert_eq!(billed_minutes(60.0), 1.0);
        assert_eq!(billed_minutes(61.5), 2.0);
        assert!(cache_note(&req).is_some());
        let cached = BuildRequest {
            cache_from: vec!["type=registry,ref=r/c".into()],
            ..req
        };
        assert!(cache_note(&cached).is_none());
    }
}
