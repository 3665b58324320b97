//! The tar stream of a sync: the context's own writer
//! ([`crate::context::tar_stream`]) without a prefix, so the builder unpacks
//! it straight into its persistent copy.
//!
//! The writer records every file's mtime to the nanosecond (a PAX record),
//! which the copy needs: BuildKit builds from it and takes a file whose
//! size, mode and mtime did not change as unchanged, without reading it.

use std::io::Write;

use crate::context::{
    self, Compression, ContextError, Entry, ExtraFile, TarChunks, TarStats, TarTask,
};

/// Streams `entries` then `extra` as a tar archive (no prefix) in chunks of
/// `chunk` bytes. The receiver's last item is an `Err` when the writer
/// failed; dropping it stops the writer.
pub fn tar_stream(
    entries: Vec<Entry>,
    extra: Vec<ExtraFile>,
    compression: Compression,
    chunk: usize,
) -> (TarChunks, TarTask) {
    tar_stream_with_progress(
        entries,
        extra,
        compression,
        chunk,
        std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)),
    )
}

/// [`tar_stream`], counting file content read (before compression) in `content`.
pub fn tar_stream_with_progress(
    entries: Vec<Entry>,
    extra: Vec<ExtraFile>,
    compression: Compression,
    chunk: usize,
    content: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> (TarChunks, TarTask) {
    context::tar_stream_with_progress(entries, extra, String::new(), compression, chunk, content)
}

/// Writes the archive into `out` (blocking).
pub fn write(
    entries: &[Entry],
    extra: &[ExtraFile],
    compression: Compression,
    out: impl Write,
) -> Result<TarStats, ContextError> {
    context::write_tar(entries, extra, "", compression, out)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::EntryKind;
    use crate::context::{DockerIgnore, walk};
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    /// GNU tar restores every file's mtime to the nanosecond, and names,
    /// long names and symlink targets byte for byte.
    #[test]
    fn gnu_tar_restores_nanosecond_mtimes_and_exact_names() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let long = format!("{}/{}", "d".repeat(80), "f".repeat(80));
        std::fs::create_dir_all(src.join("d".repeat(80))).unwrap();
        for (name, body) in [("a b\nc", "x"), (long.as_str(), "long"), ("plain", "")] {
            std::fs::write(src.join(name), body).unwrap();
        }
        std::os::unix::fs::symlink("./odd//target/", src.join("link")).unwrap();
        std::os::unix::fs::symlink("t".repeat(150), src.join("longlink")).unwrap();
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 123_456_789);
        std::fs::File::options()
            .write(true)
            .open(src.join("plain"))
            .unwrap()
            .set_modified(t)
            .unwrap();
        let entries = walk(&src, &DockerIgnore::parse(""), &[]).unwrap();
        for compression in [Compression::None, Compression::Gzip] {
            let mut archive = Vec::new();
            let stats = write(&entries, &[], compression, &mut archive).unwrap();
            assert_eq!(stats.files, 3);
            assert_eq!(stats.bytes_out, archive.len() as u64);
            let out = dir.path().join(format!("out-{compression:?}"));
            std::fs::create_dir_all(&out).unwrap();
            let path = dir.path().join("a.tar");
            std::fs::write(&path, &archive).unwrap();
            let mut cmd = Command::new("tar");
            cmd.arg("-x").arg("-p").arg("-C").arg(&out);
            if compression == Compression::Gzip {
                cmd.arg("-z");
            }
            assert!(cmd.arg("-f").arg(&path).status().unwrap().success());
            for e in &entries {
                let got = out.join(&e.rel).symlink_metadata().unwrap();
                if let EntryKind::File { .. } = e.kind {
                    assert_eq!(
                        (got.mtime(), got.mtime_nsec() as u32),
                        (e.mtime, e.mtime_nsec),
                        "{}",
                        e.rel
                    );
                    assert_eq!(
                        std::fs::read(out.join(&e.rel)).unwrap(),
                        std::fs::read(&e.abs).unwrap()
                    );
                }
                if let EntryKind::Symlink { target } = &e.kind {
                    assert_eq!(&std::fs::read_link(out.join(&e.rel)).unwrap(), target);
                }
            }
            let plain = out.join("plain").metadata().unwrap();
            assert_eq!(plain.mtime_nsec(), 123_456_789);
        }
    }
}
