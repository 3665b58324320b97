//! The context as a tar stream: written straight from the files to the SSH
//! channel, never to a temporary archive, so memory stays flat whatever the
//! size of the context.
//!
//! Headers are GNU tar headers built with the `tar` crate, but the writing is
//! our own so that we control buffering (large reads, one copy), can tell a
//! file that shrank mid-read from a broken pipe, and produce the same bytes
//! for the same tree: entries in walk order, uid/gid 0 and no user names (as
//! the docker CLI sends them), mtimes in whole seconds, gzip with a zero
//! header timestamp. Names and link targets longer than 100 bytes use GNU
//! long-name records, which Docker's Go tar reader understands.
//!
//! [`tar_stream`] runs the writer on a blocking thread and hands out chunks
//! through a small bounded channel: when the network is slower than the disk
//! the writer blocks, and dropping the receiver stops it with
//! [`ContextError::StreamClosed`].

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::write::GzEncoder;
use tar::{EntryType, Header};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

use super::ContextError;
use super::ignore::go_clean;
use super::walk::{Entry, EntryKind};

/// Read buffer for file contents.
const COPY_BUF: usize = 256 * 1024;
/// Output buffer in front of the compressor or the channel.
const OUT_BUF: usize = 128 * 1024;
/// Chunks in flight between the writer thread and the reader.
const STREAM_DEPTH: usize = 4;
const BLOCK: usize = 512;

/// The chunks of a [`tar_stream`]; an `Err` item means the archive is broken.
pub type TarChunks = mpsc::Receiver<io::Result<Vec<u8>>>;
/// The writer of a [`tar_stream`]: its stats, or the error with its path.
pub type TarTask = JoinHandle<Result<TarStats, ContextError>>;

/// How the tar stream is compressed on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compression {
    #[default]
    None,
    /// gzip at the fastest level: the builder only needs `tar -z` (or
    /// docker) to read it.
    Gzip,
    /// zstd at level 3 on every core of this machine: smaller than gzip
    /// and several times faster; the builder needs `zstd` or `tar --zstd`.
    Zstd,
}

impl Compression {
    /// The name used in settings, reports and the sync protocol.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// zstd's level for the context: its default, which compresses better than
/// gzip's fastest level at several times its speed.
const ZSTD_LEVEL: i32 = 3;

/// A file that exists only in memory (a generated Dockerfile, a manifest),
/// added after the walked entries. `name` is relative to the context, like
/// [`Entry::rel`], and lands under the same prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraFile {
    pub name: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

/// What went into an archive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TarStats {
    /// Regular files, extra files included.
    pub files: u64,
    /// Directories of the context (not the prefix's own).
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of file content read.
    pub content_bytes: u64,
    /// Bytes of archive produced, after compression.
    pub bytes_out: u64,
}

/// Writes `entries` (in the order given, normally a walk's) and then `extra`
/// as one tar archive under `prefix` (`""` or for example `"context/"`; the
/// prefix's directories are written first). The output is buffered here;
/// `out` receives large writes and a final flush.
pub fn write_tar<W: Write>(
    entries: &[Entry],
    extra: &[ExtraFile],
    prefix: &str,
    compression: Compression,
    out: W,
) -> Result<TarStats, ContextError> {
    write_tar_progress(
        entries,
        extra,
        prefix,
        compression,
        out,
        Arc::new(AtomicU64::new(0)),
    )
}

/// [`write_tar`], adding the bytes of file content read so far to `content`
/// (before compression), so that a progress bar can compare them with the
/// planned total.
fn write_tar_progress<W: Write>(
    entries: &[Entry],
    extra: &[ExtraFile],
    prefix: &str,
    compression: Compression,
    out: W,
    content: Arc<AtomicU64>,
) -> Result<TarStats, ContextError> {
    let prefix = normalize_prefix(prefix)?;
    check_extra_names(entries, extra)?;
    let mut writer = TarWriter::new(out, compression)?;
    writer.content = content;
    let mut dir = String::new();
    for part in prefix.split('/').filter(|p| !p.is_empty()) {
        dir.push_str(part);
        dir.push('/');
        writer.header(
            dir.as_bytes(),
            EntryType::Directory,
            0o755,
            0,
            0,
            None,
            Path::new(&dir),
        )?;
    }
    for entry in entries {
        writer.entry(&prefix, entry)?;
    }
    for file in extra {
        writer.extra(&prefix, file)?;
    }
    let stats = writer.finish()?;
    debug!(?stats, "wrote the context archive");
    Ok(stats)
}

/// Streams the archive of [`write_tar`] as chunks of `chunk` bytes (the last
/// one shorter) through a bounded channel, so at most a few chunks are in
/// memory at once. Must be called inside a tokio runtime.
///
/// The receiver yields `Err` as its last item when the writer failed, so a
/// consumer never mistakes a truncated archive for a whole one; the join
/// handle gives the error with its path, or the stats. Dropping the receiver
/// stops the writer with [`ContextError::StreamClosed`].
pub fn tar_stream(
    entries: Vec<Entry>,
    extra: Vec<ExtraFile>,
    prefix: String,
    compression: Compression,
    chunk: usize,
) -> (TarChunks, TarTask) {
    tar_stream_counting(
        entries,
        extra,
        prefix,
        compression,
        chunk,
        Arc::new(AtomicU64::new(0)),
    )
}

/// [`tar_stream`], counting the bytes handed to the channel in `sent`.
pub(crate) fn tar_stream_counting(
    entries: Vec<Entry>,
    extra: Vec<ExtraFile>,
    prefix: String,
    compression: Compression,
    chunk: usize,
    sent: Arc<AtomicU64>,
) -> (TarChunks, TarTask) {
    spawn_tar(
        entries,
        extra,
        prefix,
        compression,
        chunk,
        sent,
        Arc::new(AtomicU64::new(0)),
    )
}

/// [`tar_stream`], adding the bytes of file content read so far (before
/// compression) to `content`: what an upload's progress bar counts.
pub fn tar_stream_with_progress(
    entries: Vec<Entry>,
    extra: Vec<ExtraFile>,
    prefix: String,
    compression: Compression,
    chunk: usize,
    content: Arc<AtomicU64>,
) -> (TarChunks, TarTask) {
    spawn_tar(
        entries,
        extra,
        prefix,
        compression,
        chunk,
        Arc::new(AtomicU64::new(0)),
        content,
    )
}

fn spawn_tar(
    entries: Vec<Entry>,
    extra: Vec<ExtraFile>,
    prefix: String,
    compression: Compression,
    chunk: usize,
    sent: Arc<AtomicU64>,
    content: Arc<AtomicU64>,
) -> (TarChunks, TarTask) {
    spawn_writer(chunk, sent, move |out| {
        write_tar_progress(&entries, &extra, &prefix, compression, out, content)
    })
}

/// Runs `write` on a blocking thread into a [`ChannelWriter`] of `chunk`
/// bytes a chunk, counting what it hands out in `sent`. A failed archive
/// ends the stream with an `Err` item, so no reader takes a cut archive for
/// a whole one.
fn spawn_writer(
    chunk: usize,
    sent: Arc<AtomicU64>,
    write: impl FnOnce(ChannelWriter) -> Result<TarStats, ContextError> + Send + 'static,
) -> (TarChunks, TarTask) {
    let chunk = chunk.max(BLOCK);
    let (tx, rx) = mpsc::channel(STREAM_DEPTH);
    let handle = tokio::task::spawn_blocking(move || {
        let out = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(chunk),
            chunk,
            sent,
        };
        let result = write(out);
        if let Err(error) = &result
            && !matches!(error, ContextError::StreamClosed { .. })
        {
            // Tell the reader the stream is broken; it may be gone already.
            let _ = tx.blocking_send(Err(io::Error::other(error_chain(error))));
        }
        result
    });
    (rx, handle)
}

/// A hard link in the archive: `name` (relative, like [`Entry::rel`]) is
/// another name of `target`, which the unpacking side resolves from the
/// folder it unpacks into. The sync links a copy's files to the builder's
/// content store this way, with one header and no content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HardLink {
    pub name: String,
    pub target: String,
}

/// [`tar_stream_with_progress`] without a prefix, with `links` written
/// after `entries` and `extra` (so every folder they need exists by then).
pub fn tar_stream_with_links(
    entries: Vec<Entry>,
    extra: Vec<ExtraFile>,
    links: Vec<HardLink>,
    compression: Compression,
    chunk: usize,
    content: Arc<AtomicU64>,
) -> (TarChunks, TarTask) {
    spawn_writer(chunk, Arc::new(AtomicU64::new(0)), move |out| {
        write_tar_links(&entries, &extra, &links, compression, out, content)
    })
}

/// [`write_tar`] without a prefix, then `links` (blocking).
pub fn write_tar_links<W: Write>(
    entries: &[Entry],
    extra: &[ExtraFile],
    links: &[HardLink],
    compression: Compression,
    out: W,
    content: Arc<AtomicU64>,
) -> Result<TarStats, ContextError> {
    check_extra_names(entries, extra)?;
    let mut writer = TarWriter::new(out, compression)?;
    writer.content = content;
    for entry in entries {
        writer.entry("", entry)?;
    }
    for file in extra {
        writer.extra("", file)?;
    }
    writer.links(links)?;
    let stats = writer.finish()?;
    debug!(?stats, links = links.len(), "wrote the context archive");
    Ok(stats)
}

/// The length of the first archive of [`write_two_archives`] (before
/// compression), from the files' sizes now: nothing is read.
pub fn archive_len(entries: &[Entry], extra: &[ExtraFile]) -> Result<u64, ContextError> {
    check_extra_names(entries, extra)?;
    let mut writer = TarWriter::new(io::sink(), Compression::None)?;
    writer.dry = true;
    writer.root()?;
    for entry in entries {
        writer.entry("", entry)?;
    }
    for file in extra {
        writer.extra("", file)?;
    }
    writer.end_archive()?;
    Ok(writer.raw)
}

/// Two archives in one stream (compressed as one): `./`, then `entries`
/// and `extra` as [`write_tar`] writes them without a prefix, which must come to
/// `first_len` bytes before compression (see [`archive_len`]; a file that
/// changed size in between fails the stream), then `then` (folders) and
/// `links`. The builder can cut the first archive off at `first_len` and
/// hand it on as it is (the sync's streamed build), and unpack the second
/// beside it.
#[allow(clippy::too_many_arguments)]
pub fn write_two_archives<W: Write>(
    entries: &[Entry],
    extra: &[ExtraFile],
    first_len: u64,
    then: &[Entry],
    links: &[HardLink],
    compression: Compression,
    out: W,
    content: Arc<AtomicU64>,
) -> Result<TarStats, ContextError> {
    check_extra_names(entries, extra)?;
    let mut writer = TarWriter::new(out, compression)?;
    writer.content = content;
    writer.root()?;
    for entry in entries {
        writer.entry("", entry)?;
    }
    for file in extra {
        writer.extra("", file)?;
    }
    writer.end_archive()?;
    if writer.raw != first_len {
        return Err(ContextError::ContextChanged {
            expected: first_len,
            actual: writer.raw,
        });
    }
    for entry in then {
        writer.entry("", entry)?;
    }
    writer.links(links)?;
    let stats = writer.finish()?;
    debug!(?stats, first_len, links = links.len(), "wrote two archives");
    Ok(stats)
}

/// [`write_two_archives`] as chunks through a bounded channel, like
/// [`tar_stream_with_links`].
#[allow(clippy::too_many_arguments)]
pub fn two_archives_stream(
    entries: Vec<Entry>,
    extra: Vec<ExtraFile>,
    first_len: u64,
    then: Vec<Entry>,
    links: Vec<HardLink>,
    compression: Compression,
    chunk: usize,
    content: Arc<AtomicU64>,
) -> (TarChunks, TarTask) {
    spawn_writer(chunk, Arc::new(AtomicU64::new(0)), move |out| {
        write_two_archives(
            &entries,
            &extra,
            first_len,
            &then,
            &links,
            compression,
            out,
            content,
        )
    })
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `"context"`, `"/context/"`, `"./context"` → `"context/"`; `""` → `""`.
fn normalize_prefix(prefix: &str) -> Result<String, ContextError> {
    let cleaned = go_clean(prefix.trim_start_matches('/'));
    if cleaned == "." {
        return Ok(String::new());
    }
    if cleaned == ".." || cleaned.starts_with("../") {
        return Err(ContextError::InvalidPrefix {
            prefix: prefix.to_string(),
        });
    }
    Ok(format!("{cleaned}/"))
}

fn check_extra_names(entries: &[Entry], extra: &[ExtraFile]) -> Result<(), ContextError> {
    if extra.is_empty() {
        return Ok(());
    }
    let taken: HashSet<&str> = entries.iter().map(|e| e.rel.as_str()).collect();
    let mut seen = HashSet::new();
    for file in extra {
        let name = file.name.as_str();
        if name.is_empty()
            || name.starts_with('/')
            || go_clean(name) != name
            || name == ".."
            || name.starts_with("../")
        {
            return Err(ContextError::InvalidExtraName {
                name: name.to_string(),
            });
        }
        if taken.contains(name) || !seen.insert(name) {
            return Err(ContextError::DuplicateName {
                name: name.to_string(),
            });
        }
    }
    Ok(())
}

/// Where the archive bytes go: straight out, or through gzip.
enum Sink<W: Write> {
    Plain(BufWriter<Counting<W>>),
    Gzip(GzEncoder<BufWriter<Counting<W>>>),
    Zstd(zstd::stream::write::Encoder<'static, BufWriter<Counting<W>>>),
}

impl<W: Write> Write for Sink<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Gzip(w) => w.write(buf),
            Sink::Zstd(w) => w.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.write_all(buf),
            Sink::Gzip(w) => w.write_all(buf),
            Sink::Zstd(w) => w.write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Gzip(w) => w.flush(),
            Sink::Zstd(w) => w.flush(),
        }
    }
}

/// A zstd encoder with one worker per core (the calling thread only feeds
/// it), so that compression keeps up with a fast link.
fn zstd_encoder<W: Write>(out: W) -> io::Result<zstd::stream::write::Encoder<'static, W>> {
    let mut z = zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)?;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    z.multithread(workers as u32)?;
    Ok(z)
}

/// Counts the bytes that reach the real output.
struct Counting<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct TarWriter<W: Write> {
    sink: Sink<W>,
    buf: Vec<u8>,
    stats: TarStats,
    /// File content bytes read so far, for progress.
    content: Arc<AtomicU64>,
    /// Archive bytes before compression.
    raw: u64,
    /// Counts the archive without reading files or writing anything.
    dry: bool,
}

impl<W: Write> TarWriter<W> {
    fn new(out: W, compression: Compression) -> Result<Self, ContextError> {
        let counted = BufWriter::with_capacity(
            OUT_BUF,
            Counting {
                inner: out,
                count: 0,
            },
        );
        let sink = match compression {
            Compression::None => Sink::Plain(counted),
            Compression::Gzip => Sink::Gzip(GzEncoder::new(counted, flate2::Compression::fast())),
            Compression::Zstd => {
                Sink::Zstd(zstd_encoder(counted).map_err(|e| out_error(e, Path::new("zstd")))?)
            }
        };
        Ok(TarWriter {
            sink,
            buf: vec![0; COPY_BUF],
            stats: TarStats::default(),
            content: Arc::new(AtomicU64::new(0)),
            raw: 0,
            dry: false,
        })
    }

    fn entry(&mut self, prefix: &str, entry: &Entry) -> Result<(), ContextError> {
        let mut name = Vec::with_capacity(prefix.len() + entry.rel.len() + 1);
        name.extend_from_slice(prefix.as_bytes());
        name.extend_from_slice(entry.rel.as_bytes());
        let mode = entry.mode & 0o7777;
        match &entry.kind {
            EntryKind::Dir => {
                name.push(b'/');
                self.header(
                    &name,
                    EntryType::Directory,
                    mode,
                    entry.mtime,
                    0,
                    None,
                    &entry.abs,
                )?;
                self.stats.dirs += 1;
            }
            EntryKind::Symlink { target } => {
                use std::os::unix::ffi::OsStrExt;
                self.header(
                    &name,
                    EntryType::Symlink,
                    mode,
                    entry.mtime,
                    0,
                    Some(target.as_os_str().as_bytes()),
                    &entry.abs,
                )?;
                self.stats.symlinks += 1;
            }
            EntryKind::File { .. } => {
                let unreadable = |source| ContextError::Unreadable {
                    path: entry.abs.clone(),
                    source,
                };
                // The size now, not at walk time: the header must match the
                // bytes that follow it. A dry run only measures.
                let (mut file, size) = if self.dry {
                    let size = std::fs::metadata(&entry.abs).map_err(unreadable)?.len();
                    (None, size)
                } else {
                    let file = File::open(&entry.abs).map_err(unreadable)?;
                    let size = file.metadata().map_err(unreadable)?.len();
                    (Some(file), size)
                };
                if entry.mtime >= 0 && entry.mtime_nsec != 0 {
                    let value = format!("{}.{:09}", entry.mtime, entry.mtime_nsec);
                    self.pax(&[("mtime", value.as_bytes())], &entry.abs)?;
                }
                self.header(
                    &name,
                    EntryType::Regular,
                    mode,
                    entry.mtime,
                    size,
                    None,
                    &entry.abs,
                )?;
                match &mut file {
                    Some(file) => self.copy(file, size, &entry.abs)?,
                    None => {
                        self.raw += size;
                        self.pad(size, &entry.abs)?;
                    }
                }
                self.stats.files += 1;
                self.stats.content_bytes += size;
            }
        }
        Ok(())
    }

    fn extra(&mut self, prefix: &str, file: &ExtraFile) -> Result<(), ContextError> {
        let name = format!("{prefix}{}", file.name);
        let path = PathBuf::from(&name);
        let size = file.data.len() as u64;
        self.header(
            name.as_bytes(),
            EntryType::Regular,
            file.mode & 0o7777,
            0,
            size,
            None,
            &path,
        )?;
        self.write(&file.data, &path)?;
        self.pad(size, &path)?;
        self.stats.files += 1;
        self.stats.content_bytes += size;
        Ok(())
    }

    /// A PAX extended header for the next entry: a file's mtime to the
    /// nanosecond. BuildKit keeps the previous build's copy of a local
    /// context and takes a file whose size, mode and mtime (in nanoseconds)
    /// did not change as unchanged, without reading it; a plain header's
    /// whole seconds would let a same-size rewrite within one second keep
    /// the old content in the image. GNU tar (and bsdtar) restore the PAX
    /// mtime to the nanosecond; busybox tar keeps whole seconds.
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
        self.write(h.as_bytes(), path)?;
        self.write(&data, path)?;
        self.pad(data.len() as u64, path)
    }

    /// Copies exactly `size` bytes of `file`, then pads to a block.
    fn copy(&mut self, file: &mut File, size: u64, path: &Path) -> Result<(), ContextError> {
        let mut remaining = size;
        while remaining > 0 {
            let want = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            let n = match file.read(&mut self.buf[..want]) {
                Ok(0) => {
                    return Err(ContextError::FileChanged {
                        path: path.to_path_buf(),
                        expected: size,
                        actual: size - remaining,
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
            self.sink
                .write_all(&self.buf[..n])
                .map_err(|e| out_error(e, path))?;
            self.raw += n as u64;
            self.content.fetch_add(n as u64, Ordering::Relaxed);
            remaining -= n as u64;
        }
        self.pad(size, path)
    }

    #[allow(clippy::too_many_arguments)]
    fn header(
        &mut self,
        name: &[u8],
        kind: EntryType,
        mode: u32,
        mtime: i64,
        size: u64,
        link: Option<&[u8]>,
        path: &Path,
    ) -> Result<(), ContextError> {
        if name.len() > 100 {
            self.long_record(EntryType::GNULongName, name, path)?;
        }
        if let Some(link) = link
            && link.len() > 100
        {
            self.long_record(EntryType::GNULongLink, link, path)?;
        }
        let mut header = Header::new_gnu();
        {
            let old = header.as_old_mut();
            let n = name.len().min(100);
            old.name[..n].copy_from_slice(&name[..n]);
            if let Some(link) = link {
                let n = link.len().min(100);
                old.linkname[..n].copy_from_slice(&link[..n]);
            }
        }
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(u64::try_from(mtime).unwrap_or(0));
        header.set_size(size);
        header.set_cksum();
        self.write(header.as_bytes(), path)
    }

    /// A GNU `././@LongLink` record carrying a long name or link target.
    fn long_record(
        &mut self,
        kind: EntryType,
        data: &[u8],
        path: &Path,
    ) -> Result<(), ContextError> {
        let mut header = Header::new_gnu();
        let label = b"././@LongLink";
        header.as_old_mut().name[..label.len()].copy_from_slice(label);
        header.set_entry_type(kind);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        let size = data.len() as u64 + 1;
        header.set_size(size);
        header.set_cksum();
        self.write(header.as_bytes(), path)?;
        self.write(data, path)?;
        self.write(&[0], path)?;
        self.pad(size, path)
    }

    fn pad(&mut self, size: u64, path: &Path) -> Result<(), ContextError> {
        let rem = (size % BLOCK as u64) as usize;
        if rem != 0 {
            self.write(&[0; BLOCK][..BLOCK - rem], path)?;
        }
        Ok(())
    }

    fn write(&mut self, data: &[u8], path: &Path) -> Result<(), ContextError> {
        self.raw += data.len() as u64;
        if self.dry {
            return Ok(());
        }
        self.sink.write_all(data).map_err(|e| out_error(e, path))
    }

    /// `./`, a plain folder header: the docker CLI takes its stdin for an
    /// archive only when the first 512 bytes are a whole tar header, which
    /// a PAX or long-name record before a file is not.
    fn root(&mut self) -> Result<(), ContextError> {
        self.header(
            b"./",
            EntryType::Directory,
            0o755,
            0,
            0,
            None,
            Path::new("."),
        )
    }

    /// Ends one archive (two zero blocks) without ending the stream: a
    /// second archive may follow in the same compressed stream.
    fn end_archive(&mut self) -> Result<(), ContextError> {
        self.write(&[0; 2 * BLOCK], Path::new("end of archive"))
    }

    /// Hard links, each a header without content.
    fn links(&mut self, links: &[HardLink]) -> Result<(), ContextError> {
        for link in links {
            let path = PathBuf::from(&link.name);
            self.header(
                link.name.as_bytes(),
                EntryType::Link,
                0o644,
                0,
                0,
                Some(link.target.as_bytes()),
                &path,
            )?;
        }
        Ok(())
    }

    /// Two zero blocks end the archive; then everything is flushed.
    fn finish(mut self) -> Result<TarStats, ContextError> {
        let end = Path::new("end of archive");
        self.write(&[0; 2 * BLOCK], end)?;
        let counted = match self.sink {
            Sink::Plain(w) => w,
            Sink::Gzip(gz) => gz.finish().map_err(|e| out_error(e, end))?,
            Sink::Zstd(z) => z.finish().map_err(|e| out_error(e, end))?,
        };
        let mut counting = counted
            .into_inner()
            .map_err(|e| out_error(e.into_error(), end))?;
        counting.flush().map_err(|e| out_error(e, end))?;
        self.stats.bytes_out = counting.count;
        Ok(self.stats)
    }
}

fn out_error(source: io::Error, path: &Path) -> ContextError {
    let closed = source.kind() == io::ErrorKind::BrokenPipe
        && source
            .get_ref()
            .is_some_and(|inner| inner.is::<ReceiverGone>());
    if closed {
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

/// The marker error for "the reader of the stream dropped its end".
#[derive(Debug)]
struct ReceiverGone;

impl fmt::Display for ReceiverGone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the reader of the context stream went away")
    }
}

impl std::error::Error for ReceiverGone {}

/// Cuts the archive into chunks and hands them to the channel, blocking while
/// it is full.
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    chunk: usize,
    sent: Arc<AtomicU64>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk));
        let len = full.len() as u64;
        self.tx
            .blocking_send(Ok(full))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, ReceiverGone))?;
        self.sent.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

impl Write for ChannelWriter {
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
    use std::fs;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::time::Duration;

    struct Read {
        name: Vec<u8>,
        kind: EntryType,
        mode: u32,
        uid: u64,
        mtime: u64,
        link: Option<Vec<u8>>,
        data: Vec<u8>,
    }

    fn read_back(bytes: &[u8], compression: Compression) -> Vec<Read> {
        let reader: Box<dyn io::Read + '_> = match compression {
            Compression::None => Box::new(bytes),
            Compression::Gzip => Box::new(flate2::read::GzDecoder::new(bytes)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(bytes).unwrap()),
        };
        let mut archive = tar::Archive::new(reader);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let mut data = Vec::new();
                io::Read::read_to_end(&mut e, &mut data).unwrap();
                Read {
                    name: e.path_bytes().into_owned(),
                    kind: e.header().entry_type(),
                    mode: e.header().mode().unwrap(),
                    uid: e.header().uid().unwrap() + e.header().gid().unwrap(),
                    mtime: e.header().mtime().unwrap(),
                    link: e.link_name_bytes().map(|l| l.into_owned()),
                    data,
                }
            })
            .collect()
    }

    fn sample_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let long_dir = "d".repeat(90);
        let long_file = format!("{long_dir}/{}", "f".repeat(150));
        for (rel, data) in [
            ("empty.txt", "".to_string()),
            ("block.bin", "x".repeat(512)),
            ("block1.bin", "y".repeat(513)),
            ("sp ace/quo'te\"/$(x);`y`\n.txt", "hostile".to_string()),
            ("caf\u{e9}/\u{1f600}.txt", "unicode".to_string()),
            (long_file.as_str(), "long".to_string()),
        ] {
            let path = root.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, data).unwrap();
        }
        fs::set_permissions(root.join("block.bin"), fs::Permissions::from_mode(0o4751)).unwrap();
        fs::create_dir(root.join("empty-dir")).unwrap();
        fs::set_permissions(root.join("empty-dir"), fs::Permissions::from_mode(0o700)).unwrap();
        symlink("/etc/passwd", root.join("abs-link")).unwrap();
        symlink("../".repeat(60), root.join("long-link")).unwrap();
        symlink("block.bin", root.join("rel-link")).unwrap();
        dir
    }

    #[test]
    fn round_trip_preserves_names_types_modes_and_content() {
        let dir = sample_tree();
        let entries = walk(dir.path(), &DockerIgnore::default(), &[]).unwrap();
        let extra = [ExtraFile {
            name: "generated/Dockerfile".into(),
            data: b"FROM scratch\n".to_vec(),
            mode: 0o644,
        }];
        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let mut out = Vec::new();
            let stats = write_tar(&entries, &extra, "ctx/", compression, &mut out).unwrap();
            assert_eq!(stats.bytes_out, out.len() as u64);
            assert_eq!(stats.files, 7);
            assert_eq!(stats.symlinks, 3);
            assert_eq!(stats.dirs, 5);
            assert_eq!(stats.content_bytes, 512 + 513 + 7 + 7 + 4 + 13);

            let read = read_back(&out, compression);
            assert_eq!(read[0].name, b"ctx/");
            assert_eq!(read[0].kind, EntryType::Directory);
            assert_eq!(read.len(), entries.len() + 2);
            for (entry, got) in entries.iter().zip(&read[1..]) {
                let mut want = format!("ctx/{}", entry.rel).into_bytes();
                if entry.is_dir() {
                    want.push(b'/');
                }
                assert_eq!(got.name, want, "{:?}", entry.rel);
                assert_eq!(got.mode, entry.mode, "{:?}", entry.rel);
                assert_eq!(got.uid, 0);
                assert_eq!(got.mtime, entry.mtime as u64);
                match &entry.kind {
                    EntryKind::File { .. } => {
                        assert_eq!(got.kind, EntryType::Regular);
                        assert_eq!(got.data, fs::read(&entry.abs).unwrap());
                    }
                    EntryKind::Dir => assert_eq!(got.kind, EntryType::Directory),
                    EntryKind::Symlink { target } => {
                        assert_eq!(got.kind, EntryType::Symlink);
                        assert_eq!(got.link.as_deref(), Some(target.as_os_str().as_bytes()));
                    }
                }
            }
            let last = read.last().unwrap();
            assert_eq!(last.name, b"ctx/generated/Dockerfile");
            assert_eq!(last.data, b"FROM scratch\n");

            // Same tree, same bytes.
            let mut again = Vec::new();
            write_tar(&entries, &extra, "ctx", compression, &mut again).unwrap();
            assert_eq!(out, again);
        }
    }

    /// GNU tar, a reader other than the one we write with, extracts the same
    /// tree byte for byte.
    #[test]
    fn gnu_tar_extracts_the_same_tree() {
        let dir = sample_tree();
        let entries = walk(dir.path(), &DockerIgnore::default(), &[]).unwrap();
        let mut out = Vec::new();
        write_tar(&entries, &[], "", Compression::Gzip, &mut out).unwrap();
        let dest = tempfile::tempdir().unwrap();
        let archive = dest.path().join("ctx.tgz");
        fs::write(&archive, &out).unwrap();
        let into = dest.path().join("x");
        fs::create_dir(&into).unwrap();
        let status = std::process::Command::new("tar")
            .arg("-xzf")
            .arg(&archive)
            .arg("-C")
            .arg(&into)
            .status()
            .expect("GNU tar is needed by this test");
        assert!(status.success());
        let again = walk(&into, &DockerIgnore::default(), &[]).unwrap();
        assert_eq!(
            entries
                .iter()
                .map(|e| (&e.rel, &e.kind, e.mode))
                .collect::<Vec<_>>(),
            again
                .iter()
                .map(|e| (&e.rel, &e.kind, e.mode))
                .collect::<Vec<_>>()
        );
        for (a, b) in entries.iter().zip(&again) {
            if let EntryKind::File { .. } = a.kind {
                assert_eq!(fs::read(&a.abs).unwrap(), fs::read(&b.abs).unwrap());
                assert_eq!(a.mtime, b.mtime);
            }
        }
    }

    #[test]
    fn extra_names_are_checked() {
        let dir = sample_tree();
        let entries = walk(dir.path(), &DockerIgnore::default(), &[]).unwrap();
        let file = |name: &str| ExtraFile {
            name: name.into(),
            data: vec![],
            mode: 0o644,
        };
        let err = write_tar(
            &entries,
            &[file("empty.txt")],
            "",
            Compression::None,
            io::sink(),
        );
        assert!(matches!(err, Err(ContextError::DuplicateName { .. })));
        let err = write_tar(&entries, &[], "../up", Compression::None, io::sink());
        assert!(matches!(err, Err(ContextError::InvalidPrefix { .. })));
        for bad in ["", "/abs", "../up", "a/../b", "a//b"] {
            let err = write_tar(&entries, &[file(bad)], "", Compression::None, io::sink());
            assert!(
                matches!(err, Err(ContextError::InvalidExtraName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_vanished_file_is_named_and_breaks_the_stream() {
        let dir = sample_tree();
        let entries = walk(dir.path(), &DockerIgnore::default(), &[]).unwrap();
        fs::remove_file(dir.path().join("block1.bin")).unwrap();
        let err = write_tar(&entries, &[], "", Compression::None, io::sink()).unwrap_err();
        assert!(
            matches!(err, ContextError::Unreadable { ref path, .. } if path.ends_with("block1.bin"))
        );

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        runtime.block_on(async {
            let (mut rx, handle) =
                tar_stream(entries, vec![], String::new(), Compression::None, 4096);
            let mut last = None;
            while let Some(item) = rx.recv().await {
                last = Some(item);
            }
            let last = last.unwrap().unwrap_err();
            assert!(last.to_string().contains("block1.bin"), "{last}");
            assert!(matches!(
                handle.await.unwrap(),
                Err(ContextError::Unreadable { .. })
            ));
        });
    }

    /// A 64 MiB file read slowly: the writer never runs more than the
    /// channel's few chunks ahead of the reader, and the bytes arrive whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tar_stream_applies_backpressure() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 * 1024 * 1024;
        let big = fs::File::create(dir.path().join("big")).unwrap();
        big.set_len(size).unwrap(); // sparse: no disk needed
        fs::write(dir.path().join("small"), "tail").unwrap();
        let entries = walk(dir.path(), &DockerIgnore::default(), &[]).unwrap();

        let chunk = 256 * 1024;
        let sent = Arc::new(AtomicU64::new(0));
        let (mut rx, handle) = tar_stream_counting(
            entries,
            vec![],
            "context/".into(),
            Compression::None,
            chunk,
            sent.clone(),
        );
        let mut received: Vec<u8> = Vec::new();
        let mut max_ahead = 0;
        let mut reads = 0;
        while let Some(piece) = rx.recv().await {
            let piece = piece.unwrap();
            assert!(piece.len() <= chunk);
            received.extend_from_slice(&piece);
            reads += 1;
            if reads % 16 == 0 {
                // A slow network: give the writer time to run ahead if it could.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let ahead = sent
                .load(Ordering::Relaxed)
                .saturating_sub(received.len() as u64);
            max_ahead = max_ahead.max(ahead);
        }
        let stats = handle.await.unwrap().unwrap();
        assert_eq!(stats.bytes_out, received.len() as u64);
        assert_eq!(stats.content_bytes, size + 4);
        // The writer did run ahead while the reader slept (the channel
        // filled), but never by more than the channel's chunks plus the one
        // being sent: it blocked.
        assert!(max_ahead >= (2 * chunk) as u64, "max ahead {max_ahead}");
        assert!(
            max_ahead <= ((STREAM_DEPTH + 1) * chunk) as u64,
            "writer ran {max_ahead} bytes ahead"
        );
        let read = read_back(&received, Compression::None);
        let names: Vec<&[u8]> = read.iter().map(|r| r.name.as_slice()).collect();
        assert_eq!(names, [&b"context/"[..], b"context/big", b"context/small"]);
        assert_eq!(read[1].data.len() as u64, size);
        assert!(read[1].data.iter().all(|&b| b == 0));
        assert_eq!(read[2].data, b"tail");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_receiver_stops_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let big = fs::File::create(dir.path().join("big")).unwrap();
        big.set_len(256 * 1024 * 1024).unwrap();
        let entries = walk(dir.path(), &DockerIgnore::default(), &[]).unwrap();
        let (mut rx, handle) =
            tar_stream(entries, vec![], String::new(), Compression::Gzip, 64 * 1024);
        rx.recv().await.unwrap().unwrap();
        drop(rx);
        let result = tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("the writer stops soon after the reader goes")
            .expect("no panic");
        assert!(
            matches!(result, Err(ContextError::StreamClosed { ref path }) if path.ends_with("big")),
            "{result:?}"
        );
    }

    /// The first of two archives comes to exactly the length measured
    /// before, starts with a whole plain header (what the docker CLI needs
    /// to take its stdin for an archive), and a file that grew in between
    /// fails the stream instead of shifting the cut.
    #[test]
    fn two_archives_cut_where_measured_or_fail() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), "hello").unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        fs::write(dir.path().join("d/b"), vec![1u8; 1000]).unwrap();
        let entries = walk(dir.path(), &DockerIgnore::default(), &[]).unwrap();
        let extra = vec![ExtraFile {
            name: "gen".into(),
            data: b"x".to_vec(),
            mode: 0o644,
        }];
        let first = archive_len(&entries, &extra).unwrap();
        let links = vec![HardLink {
            name: "again".into(),
            target: "a".into(),
        }];
        let mut out = Vec::new();
        write_two_archives(
            &entries,
            &extra,
            first,
            &[],
            &links,
            Compression::None,
            &mut out,
            Default::default(),
        )
        .unwrap();
        let mut head = tar::Archive::new(&out[..first as usize]);
        let names: Vec<String> = head
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["./", "a", "d/", "d/b", "gen"]);
        assert_eq!(
            &out[first as usize - 1024..first as usize],
            &[0u8; 1024][..]
        );
        let mut tail = tar::Archive::new(&out[first as usize..]);
        let link = tail.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(link.header().entry_type(), EntryType::Link);
        fs::write(dir.path().join("d/b"), vec![1u8; 2000]).unwrap();
        let err = write_two_archives(
            &entries,
            &extra,
            first,
            &[],
            &links,
            Compression::None,
            io::sink(),
            Default::default(),
        )
        .unwrap_err();
        assert!(matches!(err, ContextError::ContextChanged { .. }), "{err}");
    }
}
