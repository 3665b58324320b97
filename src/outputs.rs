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
