//! Named build contexts (`--build-context NAME=DIR|docker-image://…|https://…`).
//!
//! A local folder is synced to the builder like the main context: its own
//! persistent copy (keyed on the folder, apart from any main context of the
//! same folder), its own `.dockerignore`, only changes sent on the next
//! build. `docker build` then gets `--build-context NAME=<the copy>`. An
//! image or URL is handed through untouched. Only `docker build` with the
//! buildx plugin takes `--build-context`, so the builder is asked first (see
//! [`crate::remote::ProbeReport::build_context`]) and nothing is sent to a
//! builder that could not use it.

use std::path::{Path, PathBuf};

use crate::config::Builder;
use crate::context::{self, Compression, ContextError, DockerIgnore};
use crate::report::Reporter;
use crate::ssh::Session;
use crate::sync::{SyncError, SyncJob, SyncSummary};
use crate::util::canonical;

/// One `--build-context`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedContext {
    /// What the Dockerfile names (`FROM NAME`, `COPY --from=NAME`).
    pub name: String,
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A folder on this machine, synced to the builder.
    Dir(PathBuf),
    /// `docker-image://…` or `https://…`, given to docker as it is.
    Passthrough(String),
}

#[derive(Debug, thiserror::Error)]
#[error("`--build-context {spec}`: {message}")]
pub struct SpecError {
    pub spec: String,
    pub message: String,
}

/// Parses docker's `NAME=VALUE`.
pub fn parse(spec: &str) -> Result<NamedContext, SpecError> {
    let bad = |message: String| SpecError {
        spec: spec.to_string(),
        message,
    };
    let Some((name, value)) = spec.split_once('=') else {
        return Err(bad(
            "expected `NAME=DIR`, `NAME=docker-image://IMAGE` or `NAME=https://URL`".into(),
        ));
    };
    // Docker accepts a plain name or an image reference (to replace that
    // image in `FROM`).
    if name.is_empty()
        || name.starts_with(['-', '.', '/'])
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b))
    {
        return Err(bad(format!("`{name}` is not a valid context name")));
    }
    if value.is_empty() {
        return Err(bad("the value is empty".into()));
    }
    if value.chars().any(char::is_control) {
        return Err(bad("the value contains a control character".into()));
    }
    let source = if value.starts_with("docker-image://") || value.starts_with("https://") {
        if value.ends_with("://") {
            return Err(bad("nothing after the scheme".into()));
        }
        if value.chars().any(char::is_whitespace) {
            return Err(bad("an image or URL with whitespace".into()));
        }
        Source::Passthrough(value.to_string())
    } else if let Some((scheme, _)) = value.split_once("://") {
        return Err(bad(format!(
            "`{scheme}://` is not supported: give a folder, `docker-image://IMAGE` or `https://URL`"
        )));
    } else {
        let dir = PathBuf::from(value);
        if !dir.is_dir() {
            return Err(bad(format!("`{value}` is not a folder")));
        }
        Source::Dir(dir)
    };
    Ok(NamedContext {
        name: name.to_string(),
        source,
    })
}

/// Parses every `--build-context`; a name given twice is an error.
pub fn parse_all(specs: &[String]) -> Result<Vec<NamedContext>, SpecError> {
    let mut out: Vec<NamedContext> = Vec::new();
    for spec in specs {
        let named = parse(spec)?;
        if out.iter().any(|n| n.name == named.name) {
            return Err(SpecError {
                spec: spec.clone(),
                message: format!("the name `{}` is given twice", named.name),
            });
        }
        out.push(named);
    }
    Ok(out)
}

/// A named folder walked with its `.dockerignore`, ready to sync.
pub struct Prepared {
    pub name: String,
    pub dir: PathBuf,
    pub entries: Vec<context::Entry>,
}

/// Walks every named folder (blocking: call from a blocking thread).
pub fn prepare(named: &[NamedContext]) -> Result<Vec<Prepared>, ContextError> {
    let mut out = Vec::new();
    for n in named {
        let Source::Dir(dir) = &n.source else {
            continue;
        };
        let ignore = DockerIgnore::for_dir(dir).map_err(|source| ContextError::Unreadable {
            path: dir.clone(),
            source,
        })?;
        let entries = context::walk(dir, &ignore, &[".dockerignore"])?;
        out.push(Prepared {
            name: n.name.clone(),
            dir: dir.clone(),
            entries,
        });
    }
    Ok(out)
}

/// The sync's identity of a named folder: apart from the main context's
/// copy of the same folder, whose `.dockerignore` may differ.
pub fn identity(dir: &Path) -> String {
    format!("build-context:{}", canonical(dir).display())
}

/// A named folder's copy on the builder.
#[derive(Debug, Clone)]
pub struct Synced {
    pub name: String,
    /// The copy's absolute path on the builder.
    pub tree: String,
    pub summary: SyncSummary,
}

/// Brings the builder's copy of every named folder up to date. Must run
/// while the builder's lease is held.
pub async fn sync(
    session: &Session,
    builder: &Builder,
    prepared: Vec<Prepared>,
    compression: Compression,
    verify: bool,
    cache_root: Option<PathBuf>,
    reporter: &dyn Reporter,
) -> Result<Vec<Synced>, SyncError> {
    let mut out = Vec::new();
    for p in prepared {
        let job = SyncJob {
            builder,
            run_dir: "",
            identity: identity(&p.dir),
            compression,
            verify,
            cache_root: cache_root.clone(),
        };
        // Progress of these goes to no bar: the main context's is done.
        let summary =
            crate::sync::sync_context(session, &job, p.entries, Vec::new(), &crate::report::Silent)
                .await?;
        let Some(tree) = summary.tree.clone() else {
            return Err(SyncError::Remote {
                builder: builder.name.clone(),
                message: format!(
                    "the builder did not say where its copy of the build context `{}` is",
                    p.name
                ),
            });
        };
        reporter.info(&format!(
            "build context `{}`: sent {} ({} changed file{})",
            p.name,
            crate::util::human_bytes(summary.bytes_sent),
            summary.files_sent,
            if summary.files_sent == 1 { "" } else { "s" }
        ));
        out.push(Synced {
            name: p.name,
            tree,
            summary,
        });
    }
    Ok(out)
}

/// `docker build` arguments: `--build-context NAME=VALUE` for each, in the
/// order given, folders replaced by their copies on the builder.
pub fn docker_args(named: &[NamedContext], synced: &[Synced]) -> Vec<String> {
    let mut args = Vec::new();
    for n in named {
        let value = match &n.source {
            Source::Passthrough(v) => v.clone(),
            Source::Dir(_) => match synced.iter().find(|s| s.name == n.name) {
                Some(s) => s.tree.clone(),
                None => continue,
            },
        };
        args.push("--build-context".to_string());
        args.push(format!("{}={value}", n.name));
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_forms() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        assert_eq!(
            parse(&format!("lib={d}")).unwrap(),
            NamedContext {
                name: "lib".into(),
                source: Source::Dir(dir.path().to_path_buf())
            }
        );
        for v in [
            "docker-image://alpine:3.20",
            "docker-image://reg.example:5000/a/b@sha256:0123",
            "https://example.com/repo.git#main",
        ] {
            let n = parse(&format!("docker.io/library/alpine:3={v}")).unwrap();
            assert_eq!(n.source, Source::Passthrough(v.into()));
        }
        for bad in [
            "lib",
            "=x",
            "-x=docker-image://a",
            "a b=docker-image://a",
            "lib=",
            "lib=docker-image://",
            "lib=oci-layout:///tmp/x",
            "lib=git://example.com/x",
            "lib=docker-image://a b",
            "lib=/does/not/exist",
        ] {
            assert!(parse(bad).is_err(), "{bad} should be refused");
        }
        let twice = [
            "a=docker-image://x".to_string(),
            "a=docker-image://y".to_string(),
        ];
        assert!(parse_all(&twice).is_err());
    }

    #[test]
    fn argv_replaces_folders_by_their_copies_and_is_quoted() {
        let named = vec![
            NamedContext {
                name: "lib".into(),
                source: Source::Dir("/home/me/lib".into()),
            },
            NamedContext {
                name: "base".into(),
                source: Source::Passthrough("docker-image://alpine:3.20".into()),
            },
        ];
        let synced = vec![Synced {
            name: "lib".into(),
            tree: "/srv/it's $(ws)/contexts/ab12/tree".into(),
            summary: SyncSummary::default(),
        }];
        let args = docker_args(&named, &synced);
        assert_eq!(
            args,
            [
                "--build-context",
                "lib=/srv/it's $(ws)/contexts/ab12/tree",
                "--build-context",
                "base=docker-image://alpine:3.20"
            ]
        );
        // Every argument reaches docker as one word, never run by the shell.
        let line = crate::shell::join(args.iter().map(String::as_str));
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf '%s\\n' {line}"))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{}\n", args.join("\n"))
        );
    }

    #[test]
    fn the_identity_differs_from_the_main_context() {
        let dir = tempfile::tempdir().unwrap();
        assert_ne!(
            identity(dir.path()),
            crate::sync::identity(Some(dir.path()), &[])
        );
    }
}
