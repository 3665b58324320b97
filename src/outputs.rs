//! What a build leaves on this machine: `--iidfile`, `--metadata-file`.
//!
//! Files are written atomically (a temporary name in the same folder, then a
//! rename), so a pipeline reading them never sees half a file, and a failed
//! build leaves the previous file untouched.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::build::BuildReport;

#[derive(Debug, thiserror::Error)]
#[error("could not write `{}`", path.display())]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// A temporary name next to `path`, unique to this process.
pub fn temp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.absconda-{}-{:08x}.part",
        std::process::id(),
        rand::random::<u32>()
    ))
}

/// Writes `data` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), WriteError> {
    let err = |source| WriteError {
        path: path.to_path_buf(),
        source,
    };
    let tmp = temp_name(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// docker's `--metadata-file` JSON: `containerimage.digest` is the pushed
/// manifest digest (the image id when nothing was pushed),
/// `containerimage.config.digest` the image id, `image.name` every reference.
pub fn metadata(report: &BuildReport) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    let pushed = report.images.iter().find_map(|i| report.digests.get(i));
    if let Some(d) = pushed.or(report.image_id.as_ref()) {
        m.insert("containerimage.digest".into(), d.clone().into());
    }
    if let Some(id) = &report.image_id {
        m.insert("containerimage.config.digest".into(), id.clone().into());
    }
    m.insert("image.name".into(), report.images.join(",").into());
    serde_json::Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("iid");
        std::fs::write(&p, "old").unwrap();
        write_atomic(&p, b"sha256:new").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "sha256:new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let bad = dir.path().join("missing/iid");
        assert!(write_atomic(&bad, b"x").is_err());
    }

    #[test]
    fn metadata_keys_are_dockers() {
        let mut r = BuildReport {
            images: vec!["r/a:v1".into(), "r/a:latest".into()],
            image_id: Some("sha256:id".into()),
            ..Default::default()
        };
        let m = metadata(&r);
        assert_eq!(m["containerimage.digest"], "sha256:id");
        assert_eq!(m["image.name"], "r/a:v1,r/a:latest");
        r.digests.insert("r/a:v1".into(), "sha256:man".into());
        let m = metadata(&r);
        assert_eq!(m["containerimage.digest"], "sha256:man");
        assert_eq!(m["containerimage.config.digest"], "sha256:id");
    }
}

/// What `--output` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputKind {
    /// The image's files unpacked into a folder.
    Local,
    /// An archive written as one file: `tar`, `oci` or `docker`.
    Archive(String),
}

/// `--output type=local,dest=DIR`, `type=tar,dest=FILE`, or `DIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSpec {
    pub kind: OutputKind,
    pub dest: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("`--output {spec}`: {message}")]
    Spec { spec: String, message: String },
    #[error("`--output`: `{}` exists and is not an empty folder", path.display())]
    NotEmpty { path: PathBuf },
    #[error(transparent)]
    Write(#[from] WriteError),
}

impl OutputSpec {
    pub fn parse(spec: &str) -> Result<OutputSpec, OutputError> {
        let bad = |message: &str| OutputError::Spec {
            spec: spec.to_string(),
            message: message.to_string(),
        };
        if !spec.contains('=') {
            if spec == "-" {
                return Err(bad("writing to stdout is not supported; give `dest=FILE`"));
            }
            return Ok(OutputSpec {
                kind: OutputKind::Local,
                dest: PathBuf::from(spec),
            });
        }
        let mut kind = None;
        let mut dest = None;
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("type", v)) => kind = Some(v.to_string()),
                Some(("dest", v)) => dest = Some(v.to_string()),
                _ => return Err(bad("use `type=local|tar|oci|docker,dest=PATH`")),
            }
        }
        let dest = dest.ok_or_else(|| bad("`dest=PATH` is missing"))?;
        if dest == "-" {
            return Err(bad("writing to stdout is not supported; give `dest=FILE`"));
        }
        let kind = match kind.as_deref() {
            None | Some("local") => OutputKind::Local,
            Some(t @ ("tar" | "oci" | "docker")) => OutputKind::Archive(t.to_string()),
            Some(_) => return Err(bad("the type must be `local`, `tar`, `oci` or `docker`")),
        };
        Ok(OutputSpec {
            kind,
            dest: PathBuf::from(dest),
        })
    }

    /// The `--output` the builder's docker gets: the archive on its stdout
    /// (a `local` output travels as a tar and is unpacked here).
    pub fn remote_arg(&self) -> String {
        match &self.kind {
            OutputKind::Local => "type=tar,dest=-".into(),
            OutputKind::Archive(t) => format!("type={t},dest=-"),
        }
    }

    /// Refuses a destination that would have to be overwritten piecemeal.
    pub fn check_dest(&self) -> Result<(), OutputError> {
        if self.kind == OutputKind::Local
            && let Ok(mut rd) = std::fs::read_dir(&self.dest)
            && rd.next().is_some()
        {
            return Err(OutputError::NotEmpty {
                path: self.dest.clone(),
            });
        }
        Ok(())
    }
}

/// Receives the output stream into a temporary file next to the
/// destination; [`Receiver::finish`] puts it under its final name.
pub struct Receiver {
    spec: OutputSpec,
    tmp: PathBuf,
    file: tokio::fs::File,
    pub bytes: u64,
}

impl Receiver {
    pub async fn create(spec: &OutputSpec) -> Result<Receiver, OutputError> {
        let tmp = temp_name(&spec.dest);
        let file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|source| WriteError {
                path: tmp.clone(),
                source,
            })?;
        Ok(Receiver {
            spec: spec.clone(),
            tmp,
            file,
            bytes: 0,
        })
    }

    pub async fn write(&mut self, data: &[u8]) -> Result<(), OutputError> {
        use tokio::io::AsyncWriteExt;
        self.file
            .write_all(data)
            .await
            .map_err(|source| WriteError {
                path: self.tmp.clone(),
                source,
            })?;
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Removes the partial file.
    pub async fn abort(self) {
        drop(self.file);
        let _ = tokio::fs::remove_file(&self.tmp).await;
    }

    /// Renames the archive into place, or unpacks a `local` output into a
    /// temporary folder and renames that.
    pub async fn finish(self) -> Result<u64, OutputError> {
        let Receiver {
            spec,
            tmp,
            mut file,
            bytes,
        } = self;
        use tokio::io::AsyncWriteExt;
        let flushed = async {
            file.flush().await?;
            file.sync_all().await
        }
        .await;
        drop(file);
        let result = match flushed {
            Err(source) => Err(WriteError {
                path: tmp.clone(),
                source,
            }),
            Ok(()) => match spec.kind {
                OutputKind::Archive(_) => {
                    tokio::fs::rename(&tmp, &spec.dest)
                        .await
                        .map_err(|source| WriteError {
                            path: spec.dest.clone(),
                            source,
                        })
                }
                OutputKind::Local => {
                    let (tar, dest) = (tmp.clone(), spec.dest.clone());
                    tokio::task::spawn_blocking(move || unpack(&tar, &dest))
                        .await
                        .unwrap_or_else(|e| {
                            Err(WriteError {
                                path: spec.dest.clone(),
                                source: std::io::Error::other(e.to_string()),
                            })
                        })
                }
            },
        };
        let _ = tokio::fs::remove_file(&tmp).await;
        result.map(|()| bytes).map_err(Into::into)
    }
}

/// Unpacks `tar` into a temporary folder next to `dest`, then renames it
/// to `dest` (which may exist only as an empty folder).
fn unpack(tar: &Path, dest: &Path) -> Result<(), WriteError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WriteError { path, source }
    };
    let tmp_dir = temp_name(dest);
    let result = (|| {
        let f = std::fs::File::open(tar).map_err(err(tar))?;
        std::fs::create_dir(&tmp_dir).map_err(err(&tmp_dir))?;
        let mut archive = ::tar::Archive::new(std::io::BufReader::new(f));
        archive.set_preserve_permissions(true);
        archive.unpack(&tmp_dir).map_err(err(&tmp_dir))?;
        if dest.is_dir() {
            std::fs::remove_dir(dest).map_err(err(dest))?;
        }
        std::fs::rename(&tmp_dir, dest).map_err(err(dest))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp_dir);
    }
    result
}

#[cfg(test)]
mod output_tests {
    use super::*;

    #[test]
    fn output_specs() {
        let local = OutputSpec::parse("type=local,dest=out").unwrap();
        assert_eq!(local.kind, OutputKind::Local);
        assert_eq!(local.remote_arg(), "type=tar,dest=-");
        assert_eq!(OutputSpec::parse("out").unwrap(), local);
        let tar = OutputSpec::parse("type=tar,dest=img.tar").unwrap();
        assert_eq!(tar.remote_arg(), "type=tar,dest=-");
        assert_eq!(tar.kind, OutputKind::Archive("tar".into()));
        for bad in [
            "-",
            "type=tar,dest=-",
            "type=registry,dest=x",
            "type=tar",
            "type=tar,x=y",
        ] {
            assert!(OutputSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
