//! The tar stream of a sync: like [`crate::context::tar_stream`], plus the
//! nanoseconds of every file's mtime in a PAX record.
//!
//! Why the nanoseconds matter: BuildKit keeps the previous build's copy of a
//! local context and, like rsync's quick check, takes a file whose size,
//! mode and mtime (in nanoseconds) did not change as unchanged, without
//! reading it. The builder's persistent copy is that local context, so its
//! mtimes must change whenever the content does. Whole seconds (all a plain
//! tar header holds) are not enough: a file rewritten with the same size in
//! the same second as the version of the previous build, which a script
//! that writes a version file and builds in a loop does all the time, would
//! keep the old content in the image. GNU tar (and bsdtar) restore the PAX
//! mtime to the nanosecond, as rsync and the docker CLI's own transfer do;
//! busybox tar ignores it and keeps whole seconds.
//!
//! Everything else is as in the context's own writer: GNU headers with the
//! names' bytes as they are (no normalisation: a symlink target must stay
//! byte for byte), GNU long-name records past 100 bytes, uid/gid 0, entries
//! in the given order, bounded memory through a small channel of chunks.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use tar::{EntryType, Header};
use tokio::sync::mpsc;

use crate::context::{
    Compression, ContextError, Entry, EntryKind, ExtraFile, TarChunks, TarStats, TarTask,
};

const BLOCK: usize = 512;
const COPY_BUF: usize = 256 * 1024;
/// Chunks in flight between the writer thread and the channel.
const DEPTH: usize = 4;

/// Streams `entries` then `extra` as a tar archive (no prefix) in chunks of
/// `chunk` bytes. The receiver's last item is an `Err` when the writer
/// failed; dropping it stops the writer.
pub fn tar_stream(
    entries: Vec<Entry>,
    extra: Vec<ExtraFile>,
    compression: Compression,
    chunk: usize,
) -> (TarChunks, TarTask) {
    let chunk = chunk.max(BLOCK);
    let (tx, rx) = mpsc::channel(DEPTH);
    let task = tokio::task::spawn_blocking(move || {
        let out = Chunks {
            tx: tx.clone(),
            buf: Vec::with_capacity(chunk),
            chunk,
            sent: 0,
        };
        let result = write(&entries, &extra, compression, out);
        if let Err(e) = &result
            && !matches!(e, ContextError::StreamClosed { .. })
        {
            let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
        }
        result
    });
    (rx, task)
}

/// Writes the archive into `out` (blocking).
pub fn write(
    entries: &[Entry],
    extra: &[ExtraFile],
    compression: Compression,
    out: impl Write,
) -> Result<TarStats, ContextError> {
    let mut w = Writer {
        sink: match compression {
            Compression::None => Sink::Plain(BufWriter::with_capacity(128 * 1024, Counted(out, 0))),
            Compression::Gzip => Sink::Gzip(GzEncoder::new(
                BufWriter::with_capacity(128 * 1024, Counted(out, 0)),
                flate2::Compression::fast(),
            )),
        },
        buf: vec![0; COPY_BUF],
        stats: TarStats::default(),
    };
    for e in entries {
        w.entry(e)?;
    }
    for f in extra {
        let path = PathBuf::from(&f.name);
        let size = f.data.len() as u64;
        w.header(
            f.name.as_bytes(),
            EntryType::Regular,
            f.mode,
            0,
            size,
            None,
            &path,
        )?;
        w.put(&f.data, &path)?;
        w.pad(size, &path)?;
        w.stats.files += 1;
        w.stats.content_bytes += size;
    }
    w.finish()
}

enum Sink<W: Write> {
    Plain(BufWriter<Counted<W>>),
    Gzip(GzEncoder<BufWriter<Counted<W>>>),
}

/// Counts the bytes that leave (after compression).
struct Counted<W>(W, u64);

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        self.1 += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

struct Writer<W: Write> {
    sink: Sink<W>,
    buf: Vec<u8>,
    stats: TarStats,
}

impl<W: Write> Writer<W> {
    fn entry(&mut self, e: &Entry) -> Result<(), ContextError> {
        let mtime = u64::try_from(e.mtime).unwrap_or(0);
        match &e.kind {
            EntryKind::Dir => {
                let mut name = e.rel.clone().into_bytes();
                name.push(b'/');
                self.header(&name, EntryType::Directory, e.mode, mtime, 0, None, &e.abs)?;
                self.stats.dirs += 1;
            }
            EntryKind::Symlink { target } => {
                use std::os::unix::ffi::OsStrExt;
                let target = target.as_os_str().as_bytes();
                let name = e.rel.as_bytes();
                self.header(
                    name,
                    EntryType::Symlink,
                    e.mode,
                    mtime,
                    0,
                    Some(target),
                    &e.abs,
                )?;
                self.stats.symlinks += 1;
            }
            EntryKind::File { .. } => {
                let unreadable = |source| ContextError::Unreadable {
                    path: e.abs.clone(),
                    source,
                };
                let mut file = File::open(&e.abs).map_err(unreadable)?;
                // The size now: the header must match the bytes that follow.
                let size = file.metadata().map_err(unreadable)?.len();
                if e.mtime >= 0 && e.mtime_nsec != 0 {
                    let value = format!("{}.{:09}", e.mtime, e.mtime_nsec);
                    self.pax(&[("mtime", value.as_bytes())], &e.abs)?;
                }
                self.header(
                    e.rel.as_bytes(),
                    EntryType::Regular,
                    e.mode,
                    mtime,
                    size,
                    None,
                    &e.abs,
                )?;
                self.copy(&mut file, size, &e.abs)?;
                self.stats.files += 1;
                self.stats.content_bytes += size;
            }
        }
        Ok(())
    }

    /// A PAX extended header applying to the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])], path: &Path) -> Result<(), ContextError> {
        let mut data = Vec::new();
        for (key, value) in records {
            // "<len> <key>=<value>\n", where <len> counts itself.
            let rest = key.len() + value.len() + 3;
            let mut len = rest + 1;
            while len != rest + len.to_string().len() {
                len = rest + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {key}=").as_bytes());
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        let mut h = Header::new_ustar();
        let label = b"././@PaxHeader";
        h.as_old_mut().name[..label.len()].copy_from_slice(label);
        h.set_entry_type(EntryType::XHeader);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.put(h.as_bytes(), path)?;
        self.put(&data, path)?;
        self.pad(data.len() as u64, path)
    }

    #[allow(clippy::too_many_arguments)]
    fn header(
        &mut self,
        name: &[u8],
        kind: EntryType,
        mode: u32,
        mtime: u64,
        size: u64,
        link: Option<&[u8]>,
        path: &Path,
    ) -> Result<(), ContextError> {
        if name.len() > 100 {
            self.long(EntryType::GNULongName, name, path)?;
        }
        if let Some(link) = link
            && link.len() > 100
        {
            self.long(EntryType::GNULongLink, link, path)?;
        }
        let mut h = Header::new_gnu();
        {
            let old = h.as_old_mut();
            let n = name.len().min(100);
            old.name[..n].copy_from_slice(&name[..n]);
            if let Some(link) = link {
                let n = link.len().min(100);
                old.linkname[..n].copy_from_slice(&link[..n]);
            }
        }
        h.set_entry_type(kind);
        h.set_mode(mode & 0o7777);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        h.set_size(size);
        h.set_cksum();
        self.put(h.as_bytes(), path)
    }

    /// A GNU `././@LongLink` record carrying a long name or link target.
    fn long(&mut self, kind: EntryType, data: &[u8], path: &Path) -> Result<(), ContextError> {
        let mut h = Header::new_gnu();
        let label = b"././@LongLink";
        h.as_old_mut().name[..label.len()].copy_from_slice(label);
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        let size = data.len() as u64 + 1;
        h.set_size(size);
        h.set_cksum();
        self.put(h.as_bytes(), path)?;
        self.put(data, path)?;
        self.put(&[0], path)?;
        self.pad(size, path)
    }

    /// Copies exactly `size` bytes of `file`, then pads to a block.
    fn copy(&mut self, file: &mut File, size: u64, path: &Path) -> Result<(), ContextError> {
        let mut left = size;
        while left > 0 {
            let want = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            let n = match file.read(&mut self.buf[..want]) {
                Ok(0) => {
                    return Err(ContextError::FileChanged {
                        path: path.to_path_buf(),
                        expected: size,
                        actual: size - left,
                    });
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(ContextError::Unreadable {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            };
            let sink = &mut self.sink;
            let data = &self.buf[..n];
            match sink {
                Sink::Plain(w) => w.write_all(data),
                Sink::Gzip(w) => w.write_all(data),
            }
            .map_err(|e| out_error(e, path))?;
            left -= n as u64;
        }
        self.pad(size, path)
    }

    fn pad(&mut self, size: u64, path: &Path) -> Result<(), ContextError> {
        let rem = (size % BLOCK as u64) as usize;
        if rem != 0 {
            self.put(&[0; BLOCK][..BLOCK - rem], path)?;
        }
        Ok(())
    }

    fn put(&mut self, data: &[u8], path: &Path) -> Result<(), ContextError> {
        match &mut self.sink {
            Sink::Plain(w) => w.write_all(data),
            Sink::Gzip(w) => w.write_all(data),
        }
        .map_err(|e| out_error(e, path))
    }

    fn finish(mut self) -> Result<TarStats, ContextError> {
        let end = Path::new("end of archive");
        self.put(&[0; 2 * BLOCK], end)?;
        let buffered = match self.sink {
            Sink::Plain(w) => w,
            Sink::Gzip(gz) => gz.finish().map_err(|e| out_error(e, end))?,
        };
        let mut counted = buffered
            .into_inner()
            .map_err(|e| out_error(e.into_error(), end))?;
        counted.flush().map_err(|e| out_error(e, end))?;
        self.stats.bytes_out = counted.1;
        Ok(self.stats)
    }
}

fn out_error(source: io::Error, path: &Path) -> ContextError {
    if source.kind() == io::ErrorKind::BrokenPipe {
        ContextError::StreamClosed {
            path: path.to_path_buf(),
        }
    } else {
        ContextError::Write {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Cuts the archive into chunks for the channel, blocking while it is full.
struct Chunks {
    tx: mpsc::Sender<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    chunk: usize,
    sent: u64,
}

impl Chunks {
    fn send(&mut self) -> io::Result<()> {
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk));
        self.sent += full.len() as u64;
        self.tx.blocking_send(Ok(full)).map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the reader of the sync stream went away",
            )
        })
    }
}

impl Write for Chunks {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.chunk - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.chunk {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn pax_record_lengths_count_themselves() {
        let mut out = Vec::new();
        let mut w = Writer {
            sink: Sink::Plain(BufWriter::new(Counted(&mut out, 0))),
            buf: vec![0; 16],
            stats: TarStats::default(),
        };
        // 9 + 1 + 1 digits: the length itself crosses from 2 to 3 digits.
        let value = "9".repeat(90);
        w.pax(&[("mtime", value.as_bytes())], Path::new("x"))
            .unwrap();
        w.finish().unwrap();
        let record = &out[BLOCK..];
        let text = String::from_utf8_lossy(
            &record[..record.iter().position(|b| *b == b'\n').unwrap() + 1],
        )
        .into_owned();
        let (len, _) = text.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), text.len(), "{text:?}");
    }
}
