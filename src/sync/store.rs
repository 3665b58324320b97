//! The builder's content store: one per workspace, under
//! `<workspace>/store/b`, shared by every copy of every context that any
//! machine, path or user syncs to that workspace.
//!
//! A file's content lives there once per *variant*: its SHA-256 with the
//! permission bits and the nanosecond mtime the copy must show
//! (`<sha256>-<mode>-<sec>.<nsec>`), because a hard link shares its inode's
//! mode and mtime with every other name of it. Every copy's files are hard
//! links to variants, so copies of the same files (the same content with
//! the same metadata, as a copy made with `cp -a`, a cache restored by CI,
//! or the same checkout from two paths) cost their content once. A copy
//! whose files carry other mtimes gets its own variants, made on the
//! builder from the content it already holds (a reflink where the
//! filesystem has them, so the blocks are still shared): the content never
//! crosses the network twice. One python3 makes them all where the builder
//! has one; without it, a sh loop starts a `cp` a file and a `touch` an
//! mtime (busybox's touch sets whole seconds, as its tar does).
//!
//! Nothing is ever changed in place: a store file is created under a
//! temporary name, hashed with `sha256sum`, and renamed into place only
//! when the hash matches its name (a mismatch is dropped and sent again);
//! a copy's file is replaced, never written or `chmod`ed, so no build can
//! change what another copy or the store holds.
//!
//! The exchange, before the sync's tar stream (see [`super::script`]):
//! the client sends the variants the plan would send (`<variant> <size>`
//! lines), and [`QUERY`] answers `need <variant>` for those it lacks after
//! dropping store files whose size does not match their name and making
//! the missing variants it can from other variants of the same content. The
//! tar stream then carries only the needed content, under
//! `.absconda-in-<manifest>/<variant>`, and a hard link for every file
//! (to that, or to `.absconda-store-<manifest>/<variant>`, a symlink the
//! sync script puts beside the tar's output for the time of the unpacking).
//!
//! The store and the copies are bounded by `cache_max` (bytes or a percent
//! of the workspace's filesystem) and `cache_ttl`: before content arrives,
//! least recently synced copies go first, then files no copy links, never
//! the copy being synced, one a run folder links to (a build may be reading
//! it) or one a sync holds locked; a sync that would fill the disk past
//! 90 % fails with a clear message instead.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::context::{self, Compression, Entry, EntryKind, HardLink};
use crate::shell;
use crate::ssh::Session;
use crate::ssh::exec::ExitStatus;

use super::SyncError;
use super::cache::{Scanned, Source};
use super::manifest::{COPIED_MODE_BITS, Kind, Manifest};
use super::plan::Plan;

/// How much of the builder's disk the store and copies may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMax {
    Bytes(u64),
    /// Of the workspace's filesystem.
    Percent(u8),
}

impl Default for CacheMax {
    fn default() -> Self {
        CacheMax::Percent(20)
    }
}

/// The default `cache_ttl`: copies and content unused for 30 days go.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

impl CacheMax {
    /// `20%`, `50G`, `500MiB`, `1073741824`.
    pub fn parse(text: &str) -> Result<CacheMax, String> {
        let t = text.trim();
        if let Some(p) = t.strip_suffix('%') {
            return match p.trim().parse::<u8>() {
                Ok(n) if (1..=90).contains(&n) => Ok(CacheMax::Percent(n)),
                _ => Err(format!(
                    "`{text}`: a percent of the builder's disk must be from 1% to 90%"
                )),
            };
        }
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(digits);
        let n: u64 = num.parse().map_err(|_| {
            format!("`{text}`: give bytes (`20G`, `500MiB`, `1073741824`) or a percent (`20%`)")
        })?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            _ => {
                return Err(format!(
                    "`{text}`: unknown unit `{unit}` (use K, M, G or T, or a percent)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(CacheMax::Bytes)
            .ok_or_else(|| format!("`{text}` is too large"))
    }

    /// As the builder's scripts take it: `20%` or a number of bytes.
    pub fn word(&self) -> String {
        match self {
            CacheMax::Bytes(b) => b.to_string(),
            CacheMax::Percent(p) => format!("{p}%"),
        }
    }
}

/// `30d`, `12h`, `90m`, `3600s` or a number of seconds.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{text}`: give a duration such as `30d`, `12h` or `3600`"))?;
    let mult = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (use s, m, h or d)"
            ));
        }
    };
    let secs = n
        .checked_mul(mult)
        .ok_or_else(|| format!("`{text}` is too long"))?;
    if secs < 60 {
        return Err(format!("`{text}`: at least one minute"));
    }
    Ok(Duration::from_secs(secs))
}

/// The name of a variant in the store.
pub fn variant(sha256: &[u8; 32], mode: u32, mtime: i64, nsec: u32) -> String {
    format!(
        "{}-{:o}-{mtime}.{nsec:09}",
        hex::encode(sha256),
        mode & COPIED_MODE_BITS
    )
}

/// A file of the plan that goes through the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// Index into the manifest.
    pub index: usize,
    pub variant: String,
    pub size: u64,
}

/// With a store, a file whose permission bits changed is replaced by a
/// link to another variant, never `chmod`ed: its inode may be shared.
pub fn no_file_chmods(plan: &mut Plan, new: &Manifest) {
    let mut moved = false;
    plan.chmod.retain(|(_, path)| {
        let Ok(i) = new.entries.binary_search_by(|e| e.path.as_str().cmp(path)) else {
            return true;
        };
        if !matches!(new.entries[i].kind, Kind::File { .. }) {
            return true;
        }
        plan.delete.push(path.clone());
        plan.send.push(i);
        moved = true;
        false
    });
    if moved {
        plan.delete.sort();
        plan.send.sort_unstable();
        plan.send.dedup();
    }
}

/// The files of the plan that can be linked from the store: walked files
/// (not generated ones) that their owner can read, with an mtime after 1970.
pub fn wanted(scanned: &Scanned, plan: &Plan) -> Vec<Wanted> {
    let mut out = Vec::new();
    for &i in &plan.send {
        let (Some(Source::Entry(e)), Some(m)) =
            (scanned.sources.get(i), scanned.manifest.entries.get(i))
        else {
            continue;
        };
        let Kind::File { size, sha256, .. } = &m.kind else {
            continue;
        };
        if !matches!(e.kind, EntryKind::File { .. }) || e.mode & 0o400 == 0 || e.mtime < 0 {
            continue;
        }
        out.push(Wanted {
            index: i,
            variant: variant(sha256, e.mode, e.mtime, e.mtime_nsec),
            size: *size,
        });
    }
    out
}

/// The request lines of [`QUERY`].
pub fn query_request(wanted: &[Wanted]) -> Vec<u8> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(wanted.len() * 96);
    for w in wanted {
        if seen.insert(w.variant.as_str()) {
            out.extend_from_slice(format!("{} {}\n", w.variant, w.size).as_bytes());
        }
    }
    out
}

/// Parses [`QUERY`]'s answer: the variants the builder lacks.
pub fn parse_needed(stdout: &[u8]) -> Option<HashSet<String>> {
    let text = std::str::from_utf8(stdout).ok()?;
    let mut needed = HashSet::new();
    let mut done = false;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("need ") {
            needed.insert(v.to_string());
        } else if line.starts_with("done ") {
            done = true;
        }
    }
    done.then_some(needed)
}

/// Where the needed content and the links to the store are unpacked, beside
/// the copy's own entries (see the sync script).
pub fn incoming_dir(new_manifest: &str) -> String {
    format!(".absconda-in-{new_manifest}")
}
pub fn store_link(new_manifest: &str) -> String {
    format!(".absconda-store-{new_manifest}")
}

/// The file content a stream carries with a store, before compression:
/// each needed variant once, and the plan's files the store does not take.
pub fn new_content(
    new: &Manifest,
    plan: &Plan,
    wanted: &[Wanted],
    needed: &HashSet<String>,
) -> u64 {
    let linked: HashSet<usize> = wanted.iter().map(|w| w.index).collect();
    let mut seen = HashSet::new();
    let variants: u64 = wanted
        .iter()
        .filter(|w| needed.contains(&w.variant) && seen.insert(w.variant.as_str()))
        .map(|w| w.size)
        .sum();
    let others: u64 = plan
        .send
        .iter()
        .filter(|i| !linked.contains(i))
        .filter_map(|&i| match new.entries.get(i).map(|e| &e.kind) {
            Some(Kind::File { size, .. }) => Some(*size),
            _ => None,
        })
        .sum();
    variants + others
}

/// What the tar stream carries with a store: the plan's other entries, the
/// needed content under [`incoming_dir`], and a hard link per stored file.
pub struct StoreTar {
    pub entries: Vec<Entry>,
    pub extra: Vec<context::ExtraFile>,
    pub links: Vec<HardLink>,
    /// File content the stream carries, before compression.
    pub content_bytes: u64,
    pub blobs_sent: u64,
}

pub fn tar_inputs(
    scanned: &Scanned,
    plan: &Plan,
    wanted: &[Wanted],
    needed: &HashSet<String>,
    new_manifest: &str,
) -> StoreTar {
    let linked: HashSet<usize> = wanted.iter().map(|w| w.index).collect();
    let others: Vec<usize> = plan
        .send
        .iter()
        .copied()
        .filter(|i| !linked.contains(i))
        .collect();
    let (mut entries, extra) = scanned.tar_inputs(&others);
    let content_bytes = new_content(&scanned.manifest, plan, wanted, needed);
    let inc = incoming_dir(new_manifest);
    let st = store_link(new_manifest);
    let mut sent = HashSet::new();
    let mut blobs = Vec::new();
    let mut links = Vec::with_capacity(wanted.len());
    for w in wanted {
        let target = if needed.contains(&w.variant) {
            if sent.insert(w.variant.clone())
                && let Some(Source::Entry(e)) = scanned.sources.get(w.index)
            {
                blobs.push(blob_entry(e, format!("{inc}/{}", w.variant)));
            }
            format!("{inc}/{}", w.variant)
        } else {
            format!("{st}/{}", w.variant)
        };
        links.push(HardLink {
            name: scanned.manifest.entries[w.index].path.clone(),
            target,
        });
    }
    let blobs_sent = blobs.len() as u64;
    if !blobs.is_empty() {
        entries.push(incoming_entry(inc));
        entries.extend(blobs);
    }
    StoreTar {
        entries,
        extra,
        links,
        content_bytes,
        blobs_sent,
    }
}

/// A context file sent as store content under `rel`: with the permission
/// bits its variant names, and never a setuid or setgid bit.
fn blob_entry(e: &Entry, rel: String) -> Entry {
    Entry {
        rel,
        mode: e.mode & COPIED_MODE_BITS,
        ..e.clone()
    }
}

/// The second archive of a streamed cold send: the incoming folder and,
/// for each needed variant, a hard link to the first file of the context
/// that holds it, which the sync script then hashes and moves into the
/// store like content sent under its variant's name.
pub fn stream_links(
    scanned: &Scanned,
    wanted: &[Wanted],
    needed: &HashSet<String>,
    new_manifest: &str,
) -> (Vec<Entry>, Vec<HardLink>) {
    let inc = incoming_dir(new_manifest);
    let mut seen = HashSet::new();
    let mut links = Vec::new();
    for w in wanted {
        if needed.contains(&w.variant) && seen.insert(w.variant.as_str()) {
            links.push(HardLink {
                name: format!("{inc}/{}", w.variant),
                target: scanned.manifest.entries[w.index].path.clone(),
            });
        }
    }
    if links.is_empty() {
        return (Vec::new(), links);
    }
    (vec![incoming_entry(inc)], links)
}

/// The folder the received content lands in before it enters the store.
fn incoming_entry(rel: String) -> Entry {
    Entry {
        rel,
        abs: Default::default(),
        kind: EntryKind::Dir,
        mode: 0o700,
        mtime: 0,
        mtime_nsec: 0,
        ino: 0,
        dev: 0,
    }
}

/// Streams a [`StoreTar`].
pub fn tar_stream(
    t: StoreTar,
    compression: Compression,
    chunk: usize,
    content: Arc<AtomicU64>,
) -> (context::TarChunks, context::TarTask) {
    context::tar_stream_with_links(t.entries, t.extra, t.links, compression, chunk, content)
}

/// Files of at least this size make a send worth several channels...
pub const PARALLEL_MIN_FILE: u64 = 1 << 20;
/// ...when they add up to this much.
pub const PARALLEL_MIN_TOTAL: u64 = 16 << 20;
/// What a file costs an upload beyond its content: its tar header, and
/// hashing and renaming it on the builder.
const PER_FILE: u64 = 4 << 10;

/// The upload channels for a builder: `upload_channels:`, else 4, or 1
/// on loopback (where the channels would share the same cores that copy
/// the bytes, for no window to gain).
pub fn upload_channels(setting: Option<u8>, loopback: bool) -> usize {
    match setting {
        Some(n) => usize::from(n.max(1)),
        None if loopback => 1,
        None => 4,
    }
}

/// One parallel upload: whole files of needed content, each under its
/// variant's name, for [`PUT`].
#[derive(Debug, Default)]
pub struct Upload {
    pub entries: Vec<Entry>,
    pub variants: Vec<String>,
    pub bytes: u64,
}

/// Splits the needed content into `channels` uploads of about the same
/// size (the largest file first, each to the lightest upload), so that the
/// sync's own stream carries only links and what the store does not take.
/// Empty when one channel would do as well: fewer than two channels, or
/// less than [`PARALLEL_MIN_TOTAL`] in at least two files of
/// [`PARALLEL_MIN_FILE`] or more.
pub fn parallel_uploads(
    scanned: &Scanned,
    wanted: &[Wanted],
    needed: &HashSet<String>,
    channels: usize,
) -> Vec<Upload> {
    let mut seen = HashSet::new();
    let mut files: Vec<&Wanted> = wanted
        .iter()
        .filter(|w| needed.contains(&w.variant) && seen.insert(w.variant.as_str()))
        .collect();
    let big: Vec<u64> = files
        .iter()
        .map(|w| w.size)
        .filter(|&n| n >= PARALLEL_MIN_FILE)
        .collect();
    if channels < 2 || big.len() < 2 || big.iter().sum::<u64>() < PARALLEL_MIN_TOTAL {
        return Vec::new();
    }
    files.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.variant.cmp(&b.variant)));
    let mut uploads: Vec<Upload> = (0..channels.min(files.len()))
        .map(|_| Upload::default())
        .collect();
    let mut load = vec![0u64; uploads.len()];
    for w in files {
        let Some(Source::Entry(e)) = scanned.sources.get(w.index) else {
            continue;
        };
        let (i, _) = load
            .iter()
            .enumerate()
            .min_by_key(|(_, l)| **l)
            .expect("at least two uploads");
        load[i] += w.size + PER_FILE;
        let u = &mut uploads[i];
        u.entries.push(blob_entry(e, w.variant.clone()));
        u.variants.push(w.variant.clone());
        u.bytes += w.size;
    }
    uploads.retain(|u| !u.entries.is_empty());
    uploads
}

/// The most of [`PUT`]'s answer read (one line per stored variant).
const PUT_ANSWER_LIMIT: usize = 16 << 20;

/// Sends `uploads` at once, each on an SSH channel of its own, into the
/// store (see [`PUT`]). Returns the variants the store now holds and the
/// bytes written. An upload that fails is only logged: its content stays
/// needed, and the sync's own stream carries it.
pub async fn put_parallel(
    session: &Session,
    workspace: &str,
    uploads: Vec<Upload>,
    compression: Compression,
    progress: (&AtomicU64, &Arc<AtomicU64>),
    report: &(dyn Fn(u64, u64) + Sync),
) -> (HashSet<String>, u64) {
    use std::sync::atomic::Ordering;
    let (sent, content) = progress;
    let command = put_command(workspace, compression);
    let one = |upload: Upload| {
        let command = &command;
        async move {
            let mut p = session
                .exec("a parallel upload", command)
                .await
                .map_err(|e| e.to_string())?;
            let (rx, producer) = context::tar_stream_with_links(
                upload.entries,
                Vec::new(),
                Vec::new(),
                compression,
                super::CHUNK,
                content.clone(),
            );
            let writer = &p.writer;
            let reader = &mut p.reader;
            let mut mine = 0u64;
            let send = async {
                super::pump(writer, &[], Some(rx), |n| {
                    mine += n;
                    let total = sent.fetch_add(n, Ordering::Relaxed) + n;
                    report(total, content.load(Ordering::Relaxed));
                })
                .await
                .map_err(|e| match e {
                    super::Pumped::Archive(e) => format!("the upload's archive broke: {e}"),
                    super::Pumped::Ssh(e) => e.to_string(),
                })
            };
            let mut out = Vec::new();
            let mut err = Vec::new();
            let recv = reader.drain(|is_err, d| {
                if is_err {
                    crate::ssh::exec::keep_tail(&mut err, d, crate::ssh::exec::STDERR_LIMIT);
                } else if out.len() + d.len() <= PUT_ANSWER_LIMIT {
                    out.extend_from_slice(d);
                }
            });
            let (sent_ok, status) = tokio::join!(send, recv);
            let _ = producer.await;
            let stored: HashSet<String> = String::from_utf8_lossy(&out)
                .lines()
                .filter_map(|l| l.strip_prefix("stored "))
                .filter(|v| upload.variants.iter().any(|u| u == v))
                .map(str::to_string)
                .collect();
            if status != ExitStatus::Code(0) || sent_ok.is_err() {
                tracing::warn!(
                    %status,
                    error = ?sent_ok.err(),
                    stderr = %String::from_utf8_lossy(&err).trim(),
                    "a parallel upload failed; the sync's stream carries its content"
                );
            }
            Ok::<_, String>((stored, mine))
        }
    };
    let results = futures_util::future::join_all(uploads.into_iter().map(one)).await;
    let mut stored = HashSet::new();
    let mut bytes = 0;
    for r in results {
        match r {
            Ok((s, b)) => {
                stored.extend(s);
                bytes += b;
            }
            Err(e) => tracing::warn!(error = %e, "a parallel upload could not start"),
        }
    }
    (stored, bytes)
}

/// The put program: `sh -c PUT absconda-put <workspace> <plain|gzip|zstd>`.
pub fn put_command(workspace: &str, compression: Compression) -> String {
    shell::join([
        "sh",
        "-c",
        PUT,
        "absconda-put",
        workspace,
        match compression {
            Compression::None => "plain",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        },
    ])
}

/// Takes a tar stream of whole files named by their variant into the
/// store: unpacked into a scratch folder of its own, each file hashed and
/// renamed into the store only when the hash matches its name (anything
/// else is dropped with the folder); prints `stored <variant>` for each.
/// The store must exist (the sync's query made it and room for the
/// content).
pub const PUT: &str = r#"ws=$1 z=$2
set -f
umask 077
export LC_ALL=C
case $ws in /*) ;; *) ws=$PWD/$ws ;; esac
st=$ws/store
b=$st/b
for d in "$st" "$b"; do
  if [ -L "$d" ] || [ ! -d "$d" ]; then
    echo "error $d is not a real folder: the store is kept only in one" >&2
    exit 70
  fi
done
p=$st/p.$$
rm -rf "$p"
mkdir "$p" "$p/in" || { echo "error cannot create $p" >&2; exit 70; }
trap 'rm -rf "$p"' EXIT
tp=
case $(tar --version 2>/dev/null) in *'GNU tar'*|*bsdtar*) tp=-p ;; esac
case $z in
  zstd) { zstd -dcq || : > "$p/zstd.failed"; } | (cd "$p/in" && umask 0 && exec tar -x $tp -o -f -) ;;
  gzip) (cd "$p/in" && umask 0 && exec tar -x $tp -o -z -f -) ;;
  *) (cd "$p/in" && umask 0 && exec tar -x $tp -o -f -) ;;
esac
if [ $? != 0 ] || [ -e "$p/zstd.failed" ]; then
  echo "error the upload could not be unpacked" >&2
  exit 1
fi
(cd "$p/in" && find . -type f -exec sha256sum {} +) | while read -r h n; do
  n=${n#./}
  case $n in
    */*) ;;
    "$h"-[0-7]*-[0-9]*.[0-9]*) echo "$n" ;;
    *) echo "bad $n" >&2 ;;
  esac
done > "$p/ok"
(cd "$p/in" && xargs -r sh -c 'exec mv -f -- "$@" "$0"' "$b" < "$p/ok") ||
  { echo "error cannot move the received content into $b" >&2; exit 1; }
sed 's/^/stored /' "$p/ok"
"#;

/// The most of [`QUERY`]'s answer read (one line per needed variant).
const ANSWER_LIMIT: usize = 64 << 20;

/// Asks the builder which of `wanted` it lacks, after making room for them.
/// Returns the needed variants and the bytes written, or `None` when the
/// workspace's store cannot be used by this user.
pub async fn query(
    session: &Session,
    workspace: &str,
    key: &str,
    limits: (CacheMax, Duration),
    wanted: &[Wanted],
    compression: Compression,
    builder: &str,
) -> Result<Option<(HashSet<String>, u64)>, SyncError> {
    let mut request = query_request(wanted);
    let gzip = compression == Compression::Gzip;
    if gzip {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let _ = gz.write_all(&request);
        request = gz.finish().map_err(|e| SyncError::Remote {
            builder: builder.to_string(),
            message: format!("cannot compress the store query: {e}"),
        })?;
    }
    let cmd = query_command(workspace, key, limits, gzip);
    let out = session
        .output_limited("the content store query", &cmd, &request, ANSWER_LIMIT)
        .await?;
    let text = String::from_utf8_lossy(&out.stderr);
    let error = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("error "))
        .map(str::to_string);
    // 70: the store cannot be used here (another user's, or a symlink):
    // the sync sends the content as it did before there was a store.
    if out.status == ExitStatus::Code(70) {
        tracing::warn!(%builder, error = ?error, "the content store is not usable; sending content");
        return Ok(None);
    }
    if out.status != ExitStatus::Code(0) {
        return Err(SyncError::Remote {
            builder: builder.to_string(),
            message: error.unwrap_or_else(|| {
                format!(
                    "the content store query ended with {}: {}",
                    out.status,
                    text.trim()
                )
            }),
        });
    }
    match parse_needed(&out.stdout) {
        Some(needed) => Ok(Some((needed, request.len() as u64))),
        None => Err(SyncError::Remote {
            builder: builder.to_string(),
            message: "the content store query gave no answer".into(),
        }),
    }
}

fn minutes(ttl: Duration) -> String {
    (ttl.as_secs() / 60).max(1).to_string()
}

/// The query program.
pub fn query_command(
    workspace: &str,
    key: &str,
    limits: (CacheMax, Duration),
    gzip: bool,
) -> String {
    shell::join([
        "sh",
        "-c",
        QUERY,
        "absconda-store",
        workspace,
        key,
        &limits.0.word(),
        &minutes(limits.1),
        if gzip { "gzip" } else { "plain" },
    ])
}

/// The prune program: `all` removes every copy no build uses; `dry` lists.
pub fn prune_command(
    workspace: &str,
    limits: (CacheMax, Duration),
    all: bool,
    dry: bool,
) -> String {
    shell::join([
        "sh",
        "-c",
        PRUNE,
        "absconda-prune",
        workspace,
        &limits.0.word(),
        &minutes(limits.1),
        if all { "1" } else { "0" },
        if dry { "1" } else { "0" },
    ])
}

/// Prints `store <KiB> <blobs>`, `copies <n> <oldest epoch or ->`, `disk
/// <total KiB> <used KiB>`.
pub fn status_command(workspace: &str) -> String {
    shell::join(["sh", "-c", STATUS, "absconda-store-status", workspace])
}

/// What `remote status` shows of the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStatus {
    pub store_bytes: u64,
    pub blobs: u64,
    pub copies: u64,
    /// When the least recently used copy was last synced (seconds since 1970).
    pub oldest_use: Option<i64>,
    pub workspace_bytes: u64,
    pub disk_bytes: u64,
    pub disk_used_bytes: u64,
}

impl StoreStatus {
    pub fn parse(text: &str) -> Option<StoreStatus> {
        let mut s = StoreStatus::default();
        let mut seen = 0;
        for line in text.lines() {
            let w: Vec<&str> = line.split(' ').collect();
            match w.as_slice() {
                ["store", kb, n] => {
                    s.store_bytes = kb.parse::<u64>().ok()? * 1024;
                    s.blobs = n.parse().ok()?;
                    seen |= 1;
                }
                ["copies", n, oldest] => {
                    s.copies = n.parse().ok()?;
                    s.oldest_use = oldest.parse().ok();
                    seen |= 2;
                }
                ["disk", total, used, ws] => {
                    s.disk_bytes = total.parse::<u64>().ok()? * 1024;
                    s.disk_used_bytes = used.parse::<u64>().ok()? * 1024;
                    s.workspace_bytes = ws.parse::<u64>().ok()? * 1024;
                    seen |= 4;
                }
                _ => {}
            }
        }
        (seen == 7).then_some(s)
    }
}

/// One line of `remote prune`'s report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Pruned {
    /// A copy (its key, last sync, size in KiB).
    Copy {
        key: String,
        last_use: i64,
        kib: u64,
    },
    /// Store files no copy links (count, KiB).
    Blobs { count: u64, kib: u64 },
}

pub fn parse_pruned(text: &str) -> Vec<Pruned> {
    text.lines()
        .filter_map(|line| {
            let w: Vec<&str> = line.split(' ').collect();
            match w.as_slice() {
                ["copy", key, t, kb] => Some(Pruned::Copy {
                    key: key.to_string(),
                    last_use: t.parse().ok()?,
                    kib: kb.parse().ok()?,
                }),
                ["blobs", n, kb] => Some(Pruned::Blobs {
                    count: n.parse().ok()?,
                    kib: kb.parse().ok()?,
                }),
                _ => None,
            }
        })
        .collect()
}

/// Shared by the store's programs: where things are, and eviction.
macro_rules! store_lib {
    () => {
        r#"
export LC_ALL=C TZ=UTC0
set -f
umask 077
case $ws in /*) ;; *) ws=$PWD/$ws ;; esac
st=$ws/store
b=$st/b
prepare() {
  for d in "$ws/contexts" "$st" "$b"; do
    if [ -L "$d" ]; then
      echo "error $d is a symlink: the store is kept only in a real folder" >&2
      return 1
    fi
  done
  if ! mkdir -p "$b" "$ws/contexts" 2>/dev/null || ! chmod 700 "$st"; then
    echo "error cannot create $b as $(id -un)" >&2
    return 1
  fi
  # A query killed outright (no EXIT trap) leaves its scratch folder.
  find "$st" -mindepth 1 -maxdepth 1 \( -name 'q.*' -o -name 'p.*' \) -mmin +60 -exec rm -rf {} + 2>/dev/null
  # The sync script's sweep of old copies reads the TTL here.
  # (Under a name of its own: queries of other builds run at the same time.)
  printf '%s\n' "$ttl" > "$st/ttl.$$" && mv -f "$st/ttl.$$" "$st/ttl"
}
# Copies a build may be reading: those a run folder links to.
live() {
  find "$ws/runs" -mindepth 2 -maxdepth 2 -name context -type l -exec readlink {} \; 2>/dev/null |
    sed -n 's|.*/contexts/\([^/]*\)/tree$|\1|p' | sort -u > "$q/live"
}
# rm -rf of a copy: its folders may be read-only, never its files (links).
remove_copy() {
  rm -rf -- "$1" 2>/dev/null && return 0
  find "$1" -type d ! -perm -700 -exec chmod u+rwx {} + 2>/dev/null
  rm -rf -- "$1"
}
# Copies, least recently synced first: `<epoch> <key>`, without the
# current one and those in use.
copies_lru() {
  find "$ws/contexts" -mindepth 1 -maxdepth 1 -type d -exec stat -c '%Y %n' {} + 2>/dev/null |
    sed 's| .*/| |' | sort -n | while read -r t k; do
      [ "$k" != "$keep" ] || continue
      grep -qx -- "$k" "$q/live" && continue
      echo "$t $k"
    done
}
# Removes copy $1 unless a sync holds it (its lock is kept while it is removed).
evict_copy() {
  c=$ws/contexts/$1
  [ -d "$c" ] || return 1
  if [ -f "$c/lock" ] && [ ! -L "$c/lock" ]; then
    exec 7>>"$c/lock" || return 1
    flock -n 7 || { exec 7>&-; return 1; }
  fi
  # A sync that ended after the live list was made links its copy into its
  # run folder under this lock: look again now that it is held.
  if find "$ws/runs" -mindepth 2 -maxdepth 2 -name context -type l -exec readlink {} \; 2>/dev/null |
     sed -n 's|.*/contexts/\([^/]*\)/tree$|\1|p' | grep -qx -- "$1"; then
    exec 7>&-
    return 1
  fi
  remove_copy "$c"
  r=$?
  exec 7>&-
  return $r
}
# Store files no copy links and this sync does not want: `<name>`, from
# $1 extra `find` tests. (Lists are compared with sort | uniq: busybox has
# no join or comm, and a sh loop reads its input a byte at a time.)
unreferenced() {
  (cd "$b" && find . -type f -links 1 "$@") | sed 's|^\./||' > "$q/unref"
  if [ -s "$q/unref" ] && [ -s "$q/want" ]; then
    cut -d' ' -f1 "$q/want" > "$q/wn"
    sort "$q/unref" "$q/wn" "$q/wn" | uniq -u > "$q/unref2"
    mv -f "$q/unref2" "$q/unref"
  fi
}
drop_unreferenced() {
  unreferenced
  (cd "$b" && xargs -r rm -f -- < "$q/unref")
}
# Sets total, used (KiB of the filesystem), cache (KiB of the workspace).
measure() {
  set -- $(df -Pk "$ws" | tail -n 1)
  total=$2 used=$3 fs=$(($3 + $4))
  cache=$(du -sk "$ws" 2>/dev/null | cut -f1)
  case $max in
    *%) limit=$((total * ${max%\%} / 100)) ;;
    *) limit=$((max / 1024)) ;;
  esac
}
# Copies and content unused for the TTL go.
expire() {
  find "$ws/contexts" -mindepth 1 -maxdepth 1 -type d -mmin +"$ttl" 2>/dev/null |
    sed 's|.*/||' | while read -r k; do
      [ "$k" != "$keep" ] || continue
      grep -qx -- "$k" "$q/live" && continue
      evict_copy "$k"
    done
  unreferenced -cmin +"$ttl"
  (cd "$b" && xargs -r rm -f -- < "$q/unref")
  return 0
}
# Makes room for $1 KiB more: least recently synced copies go, then the
# files no copy links, until the cache stays under its limit; fails when
# the disk would still be more than 90 % full.
evict() {
  need=$1
  live
  expire
  while :; do
    measure
    if [ $((cache + need)) -le "$limit" ] && [ $(( (used + need) * 10 )) -le $((fs * 9)) ]; then
      return 0
    fi
    victim=$(copies_lru | head -n 1)
    if [ -n "$victim" ]; then
      evict_copy "${victim#* }" || echo "${victim#* }" >> "$q/live"
      drop_unreferenced
      continue
    fi
    drop_unreferenced
    measure
    if [ $(( (used + need) * 10 )) -gt $((fs * 9)) ]; then
      echo "error the builder's disk would be more than 90% full after receiving $need KiB ($used of $fs KiB used, the workspace takes $cache KiB, and every copy left is in use); free space on it, or lower cache_max" >&2
      return 1
    fi
    return 0
  done
}
"#
    };
}

/// The python3 program that makes the missing variants, from `$q/src`
/// lines `<sha> <variant> <size> <source>` on stdin (argv: the store, the
/// folder to make them in): a reflink where the filesystem has them
/// (`FICLONE`), else a copy in the kernel, then the mode and the mtime to
/// the nanosecond, both from the name. A file that fails is removed and
/// left for the client to send. Quoted in sh with `'`, so it has none.
macro_rules! make_variants_py {
    () => {
        r#"
import os, sys
try:
    from fcntl import ioctl
except ImportError:
    ioctl = None
FICLONE = 0x40049409
b, m = os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2])

def copy(i, o):
    if ioctl is not None:
        try:
            ioctl(o, FICLONE, i)
            return
        except OSError:
            pass
    off = 0
    if hasattr(os, "sendfile"):
        try:
            while True:
                n = os.sendfile(o, i, off, 1 << 30)
                if n == 0:
                    return
                off += n
        except OSError:
            os.ftruncate(o, 0)
            os.lseek(o, 0, os.SEEK_SET)
            off = 0
    while True:
        d = os.pread(i, 1 << 20, off)
        if not d:
            return
        off += len(d)
        while d:
            d = d[os.write(o, d):]

seen = set()
for line in sys.stdin.buffer:
    w = line.split()
    if len(w) != 4 or w[1] in seen:
        continue
    v, src = w[1], w[3]
    seen.add(v)
    f = os.path.join(m, v)
    made = False
    try:
        mode, t = v.split(b"-")[1:]
        sec, frac = t.split(b".")
        ns = int(sec) * 1000000000 + int(frac)
        i = os.open(os.path.join(b, src), os.O_RDONLY)
        try:
            o = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            made = True
            try:
                copy(i, o)
                os.fchmod(o, int(mode, 8))
                os.utime(o, ns=(ns, ns))
            finally:
                os.close(o)
        finally:
            os.close(i)
    except Exception:
        if made:
            try:
                os.unlink(f)
            except OSError:
                pass
"#
    };
}

/// Answers which variants the builder lacks (see the module doc).
pub const QUERY: &str = concat!(
    "ws=$1 key=$2 max=$3 ttl=$4 z=$5 keep=$2\n",
    store_lib!(),
    r#"
prepare || exit 70
q=$st/q.$$
rm -rf "$q"
mkdir "$q" || { echo "error cannot create $q" >&2; exit 70; }
trap 'rm -rf "$q"' EXIT
if [ "$z" = gzip ]; then gzip -dc; else cat; fi > "$q/req" ||
  { echo "error the store query was cut short" >&2; exit 2; }
# Every line `<sha256>-<mode>-<sec>.<nsec> <size>`, nothing else (a sh
# loop would read the request a byte at a time).
if grep -v -x '[0-9a-f]\{64\}-[0-7]\{1,5\}-[0-9]\{1,20\}\.[0-9]\{9\} [0-9]\{1,20\}' "$q/req" |
   head -n 1 | grep -q .; then
  echo "error refused a store name in the request" >&2
  exit 2
fi
sort -u -k1,1 "$q/req" > "$q/want"
# Present variants whose size matches their request; others are dropped.
(cd "$b" && cut -d' ' -f1 "$q/want" | xargs -r stat -c '%n %s' -- 2>/dev/null) |
  sort -k1,1 > "$q/have"
# Present with the size asked for; present with another size (dropped);
# missing: `<variant> <size>` lines wanted and not present with that size.
sort "$q/want" "$q/have" | uniq -d > "$q/ok"
sort "$q/have" "$q/ok" | uniq -u | cut -d' ' -f1 > "$q/bad"
(cd "$b" && xargs -r rm -f -- < "$q/bad")
sort "$q/want" "$q/ok" | uniq -u > "$q/miss"
kb=$(( ($(cut -d' ' -f2 "$q/miss" | tr '\n' '+') 0) / 1024 + $(wc -l < "$q/miss") ))
evict "$kb" || exit 75
# Missing variants of content the store holds under another variant are
# made here, hashed, and renamed into place.
: > "$q/src"
if [ -s "$q/miss" ]; then
  (cd "$b" && find . -type f) | sed -n 's|^\./\([0-9a-f]\{64\}\)-|\1 |p' | sort -u -k1,1 > "$q/one"
  cut -c1-64 "$q/miss" | sort -u > "$q/msha"
  cut -d' ' -f1 "$q/one" | sort "$q/msha" - | uniq -d > "$q/both"
  if [ -s "$q/both" ]; then
    # `<sha> <variant> <size> <source>` for each variant made from a source.
    grep -F -f "$q/both" "$q/one" | sed 's/^\([0-9a-f]*\) /\1-/' > "$q/srcs"
    { sed 's/^\([0-9a-f]\{64\}\)-.*/\1 0 &/' "$q/srcs"
      grep -F -f "$q/both" "$q/miss" | sed 's/^\([0-9a-f]\{64\}\)-.*/\1 1 &/'
    } | sort -k1,1 -k2,2 | while read -r h k v s; do
      if [ "$k" = 0 ]; then cur=$h src=$v
      elif [ "$h" = "$cur" ]; then echo "$h $v $s $src"; fi
    done > "$q/src"
  fi
fi
mkdir "$q/m"
# One python3 makes them all where there is one (cloud images have it);
# it fails only as a whole, and then the sh loop below makes them.
if [ ! -s "$q/src" ]; then
  :
elif command -v python3 >/dev/null 2>&1 &&
  python3 -I -S -c '"#,
    make_variants_py!(),
    r#"' "$b" "$q/m" < "$q/src" 2>/dev/null; then
  :
else
  rm -rf "$q/m" && mkdir "$q/m" || exit 70
  rl=
  cp --reflink=auto /dev/null "$q/rl" 2>/dev/null && rl=--reflink=auto
  # One `cp` a file, on every core: starting programs is what this costs.
  jobs=$(nproc 2>/dev/null || echo 2)
  case $jobs in ''|*[!0-9]*) jobs=2 ;; esac
  last= n=0
  while read -r h v s src; do
    [ "$v" != "$last" ] || continue
    last=$v
    { cp $rl -- "$b/$src" "$q/m/$v" 2>/dev/null || rm -f -- "$q/m/$v"; } &
    n=$((n + 1))
    [ $((n % (jobs * 2))) != 0 ] || wait
  done < "$q/src"
  wait
  (cd "$q/m" && find . -type f) | sed 's|^\./||' > "$q/mlist"
  # One `touch` for the files of one mtime (a checkout writes many within
  # one clock tick), and a few `chmod`s for all. A touch without
  # nanoseconds (busybox) sets whole seconds, as tar does there; a file
  # whose mtime cannot be set is dropped and sent.
  : > "$q/probe"
  ns=
  touch -c -d @1.000000001 "$q/probe" 2>/dev/null && ns=1
  stamp() {
    at=$1
    shift
    [ -n "$ns" ] || at=${at%.*}
    touch -c -d "@$at" -- "$@" 2>/dev/null || rm -f -- "$@"
  }
  stamp_all() {
    cur=
    set --
    while read -r t v; do
      if [ "$t" != "$cur" ] || [ $# -ge 200 ]; then
        [ $# = 0 ] || stamp "$cur" "$@"
        set --
        cur=$t
      fi
      set -- "$@" "$q/m/$v"
    done
    [ $# = 0 ] || stamp "$cur" "$@"
  }
  sed 's/.*-\([0-9]*\.[0-9]*\)$/\1 &/' "$q/mlist" | sort > "$q/mt"
  stamp_all < "$q/mt"
  for mode in $(sed 's/^[0-9a-f]*-\([0-7]*\)-.*/\1/' "$q/mlist" | sort -u); do
    grep "^[0-9a-f]*-$mode-" "$q/mlist" | (cd "$q/m" && xargs -r chmod "$mode" --)
  done
fi
(cd "$q/m" && find . -type f -exec sha256sum {} +) | while read -r h n; do
  n=${n#./}
  case $n in */*) continue ;; "$h"-*) echo "$n" ;; esac
done > "$q/made"
(cd "$q/m" && xargs -r sh -c 'exec mv -f -- "$@" "$0"' "$b" < "$q/made") 2>/dev/null
while read -r v s; do
  [ -f "$b/$v" ] || echo "need $v"
done < "$q/miss"
echo "done $(wc -l < "$q/miss")"
"#
);

/// `remote prune`: copies past the TTL (all copies with `--all`) that no
/// build uses, then store files no copy links, then down to `cache_max`.
pub const PRUNE: &str = concat!(
    "ws=$1 max=$2 ttl=$3 all=$4 dry=$5 keep=\n",
    store_lib!(),
    r#"
[ -d "$ws" ] || { echo "error no workspace $ws on this builder" >&2; exit 0; }
prepare || exit 70
q=$st/q.$$
rm -rf "$q"
mkdir "$q" || exit 70
trap 'rm -rf "$q"' EXIT
: > "$q/want"
live
age="-mmin +$ttl"
[ "$all" != 1 ] || age=
find "$ws/contexts" -mindepth 1 -maxdepth 1 -type d $age -exec stat -c '%Y %n' {} + 2>/dev/null |
  sed 's| .*/| |' | sort -n | while read -r t k; do
    grep -qx -- "$k" "$q/live" && continue
    echo "copy $k $t $(du -sk "$ws/contexts/$k" | cut -f1)"
    [ "$dry" = 1 ] || evict_copy "$k"
  done
unreferenced
n=$(wc -l < "$q/unref")
kb=$( (cd "$b" && xargs -r du -ck -- < "$q/unref") | tail -n 1 | cut -f1)
echo "blobs $n ${kb:-0}"
if [ "$dry" != 1 ]; then
  (cd "$b" && xargs -r rm -f -- < "$q/unref")
  evict 0 >/dev/null || true
fi
"#
);

/// The store's size and copies, for `remote status`.
pub const STATUS: &str = r#"
ws=$1
export LC_ALL=C TZ=UTC0
set -f
case $ws in /*) ;; *) ws=$PWD/$ws ;; esac
b=$ws/store/b
if [ -d "$b" ]; then
  echo "store $(du -sk "$b" | cut -f1) $(find "$b" -type f | wc -l)"
else
  echo "store 0 0"
fi
n=0 oldest=-
if [ -d "$ws/contexts" ]; then
  n=$(find "$ws/contexts" -mindepth 1 -maxdepth 1 -type d | wc -l)
  oldest=$(find "$ws/contexts" -mindepth 1 -maxdepth 1 -type d -exec stat -c '%Y' {} + | sort -n | head -n 1)
fi
echo "copies $n ${oldest:--}"
set -- $(df -Pk "${ws}" 2>/dev/null | tail -n 1)
w=$(du -sk "$ws" 2>/dev/null | cut -f1)
echo "disk ${2:-0} ${3:-0} ${w:-0}"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_parse_in_posix_shells() {
        for script in [QUERY, PRUNE, STATUS, PUT] {
            crate::test_support::assert_parses(script);
        }
    }

    /// dash with the system's tools, and busybox sh with busybox's alone.
    fn shells(dir: &std::path::Path) -> Vec<(Vec<String>, String)> {
        let mut out = vec![(vec!["dash".to_string()], "/usr/bin:/bin".to_string())];
        out.extend(crate::test_support::busybox_shell(dir));
        out
    }

    fn run(argv: &[String], path: &str, args: &[&str], stdin: &[u8]) -> std::process::Output {
        use std::io::Write;
        let mut child = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .args(args)
            .env_clear()
            .env("PATH", path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A script that refuses early reads none of it.
        let _ = child.stdin.take().unwrap().write_all(stdin);
        child.wait_with_output().unwrap()
    }

    /// Where the builder's tools are found, for the ways variants are made.
    struct Tools {
        argv: Vec<String>,
        path: String,
        /// python3 is on `path`.
        python: bool,
        /// `touch -d @sec.nsec` works (not busybox's).
        nanoseconds: bool,
    }

    /// The system's tools with dash (python3 makes the variants), the same
    /// tools without python3 (the sh loop, with GNU touch), and busybox sh
    /// with busybox's tools alone.
    fn variant_tools(dir: &std::path::Path) -> Vec<Tools> {
        let mut out = Vec::new();
        if ["/usr/bin/python3", "/bin/python3"]
            .iter()
            .any(|p| std::path::Path::new(p).exists())
        {
            out.push(Tools {
                argv: vec!["dash".into()],
                path: "/usr/bin:/bin".into(),
                python: true,
                nanoseconds: true,
            });
        } else {
            crate::test_support::require("/usr/bin/python3");
        }
        let bin = without_python(dir);
        out.push(Tools {
            argv: vec![bin.join("dash").display().to_string()],
            path: bin.display().to_string(),
            python: false,
            nanoseconds: true,
        });
        if let Some((argv, path)) = crate::test_support::busybox_shell(dir) {
            out.push(Tools {
                argv,
                path,
                python: false,
                nanoseconds: false,
            });
        }
        out
    }

    /// A folder of links to the system's tools the store's programs use,
    /// without python3.
    fn without_python(dir: &std::path::Path) -> std::path::PathBuf {
        let bin = dir.join("no-python");
        std::fs::create_dir_all(&bin).unwrap();
        for tool in [
            "dash",
            "sh",
            "find",
            "stat",
            "sort",
            "sha256sum",
            "xargs",
            "tr",
            "cut",
            "readlink",
            "chmod",
            "rm",
            "mkdir",
            "mv",
            "cat",
            "id",
            "gzip",
            "printf",
            "sed",
            "grep",
            "wc",
            "du",
            "df",
            "touch",
            "cp",
            "head",
            "tail",
            "uniq",
            "nproc",
            "flock",
        ] {
            let found = ["/usr/bin", "/bin"]
                .iter()
                .map(|d| std::path::Path::new(d).join(tool))
                .find(|p| p.exists())
                .unwrap_or_else(|| panic!("`{tool}` is not installed"));
            let _ = std::os::unix::fs::symlink(found, bin.join(tool));
        }
        bin
    }

    /// The query keeps what matches, drops a store file whose size is not
    /// its name's, makes a missing variant from another one of the same
    /// content (hashed before it is renamed in), and asks for the rest.
    #[test]
    fn the_query_reuses_repairs_and_asks() {
        use sha2::Digest;
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        for (i, tools) in variant_tools(dir.path()).iter().enumerate() {
            let (argv, path) = (&tools.argv, &tools.path);
            let ws = dir.path().join(format!("ws{i}"));
            let b = ws.join("store/b");
            std::fs::create_dir_all(&b).unwrap();
            let sha = |d: &[u8]| -> [u8; 32] { sha2::Sha256::digest(d).into() };
            let hello = sha(b"hello\n");
            let v1 = variant(&hello, 0o644, 1_700_000_000, 0);
            std::fs::write(b.join(&v1), "hello\n").unwrap();
            let v2 = variant(&hello, 0o755, 1_700_000_001, 500);
            let v3 = variant(&sha(b"other"), 0o644, 1, 0);
            let v4 = variant(&sha(b"right"), 0o644, 1, 0);
            std::fs::write(b.join(&v4), "wrong size").unwrap();
            // An mtime no file can have: that variant fails alone.
            let v5 = format!("{}-644-99999999999999999999.000000000", hex::encode(hello));
            let req = format!("{v1} 6\n{v2} 6\n{v3} 5\n{v4} 5\n{v5} 6\n");
            let ws_s = ws.display().to_string();
            let args = ["-c", QUERY, "q", &ws_s, "k", "20%", "43200", "plain"];
            let out = run(argv, path, &args, req.as_bytes());
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{argv:?}: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let needed = parse_needed(&out.stdout).unwrap();
            assert_eq!(
                needed,
                HashSet::from([v3.clone(), v4.clone(), v5.clone()]),
                "{argv:?} {path}"
            );
            assert!(!b.join(&v5).exists(), "{argv:?} {path}");
            assert!(
                !b.join(&v4).exists(),
                "{argv:?}: the wrong-sized file is dropped"
            );
            let md = std::fs::metadata(b.join(&v2)).unwrap();
            assert_eq!(md.mode() & 0o7777, 0o755, "{argv:?} {path}");
            assert_eq!(md.mtime(), 1_700_000_001, "{argv:?} {path}");
            // busybox's touch sets whole seconds, as its tar does.
            let nsec = if tools.nanoseconds { 500 } else { 0 };
            assert_eq!(md.mtime_nsec(), nsec, "{argv:?} {path}");
            assert_eq!(std::fs::read(b.join(&v2)).unwrap(), b"hello\n");
            assert!(
                !ws.join("store").read_dir().unwrap().any(|e| e
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("q."))
            );
            // A name that could lead elsewhere is refused.
            let out = run(argv, path, &args, b"../../etc/passwd 1\n");
            assert!(!out.status.success(), "{argv:?}");
        }
    }

    /// A parallel upload keeps the files whose content matches their
    /// name, with the mode and mtime the name gives, and nothing else:
    /// not a file whose hash differs, not one in a folder, and leaves no
    /// scratch folder behind; without a store it refuses.
    #[test]
    fn put_stores_only_what_its_name_says() {
        use sha2::Digest;
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let sha = |d: &[u8]| -> [u8; 32] { sha2::Sha256::digest(d).into() };
        let good = variant(&sha(b"good\n"), 0o755, 1_700_000_000, 123_456_789);
        let bad = variant(&sha(b"something else"), 0o644, 1_700_000_000, 0);
        let nested = variant(&sha(b"nested\n"), 0o644, 1_700_000_000, 0);
        let entry = |rel: &str, data: &[u8], mode: u32| {
            let f = dir.path().join(format!("src-{}", rel.replace('/', "_")));
            std::fs::write(&f, data).unwrap();
            Entry {
                rel: rel.to_string(),
                abs: f,
                kind: EntryKind::File {
                    size: data.len() as u64,
                },
                mode,
                mtime: 1_700_000_000,
                mtime_nsec: if mode == 0o755 { 123_456_789 } else { 0 },
                ino: 0,
                dev: 0,
            }
        };
        let entries = vec![
            entry(&good, b"good\n", 0o755),
            entry(&bad, b"tampered\n", 0o644),
            incoming_entry("sub".into()),
            entry(&format!("sub/{nested}"), b"nested\n", 0o644),
        ];
        for (i, (argv, path)) in shells(dir.path()).iter().enumerate() {
            for compression in [Compression::None, Compression::Gzip] {
                let ws = dir.path().join(format!("ws{i}-{compression:?}"));
                let b = ws.join("store/b");
                let mut archive = Vec::new();
                context::write_tar(&entries, &[], "", compression, &mut archive).unwrap();
                let z = if compression == Compression::Gzip {
                    "gzip"
                } else {
                    "plain"
                };
                let ws_s = ws.display().to_string();
                let args = ["-c", PUT, "p", &ws_s, z];
                let out = run(argv, path, &args, &archive);
                assert_eq!(out.status.code(), Some(70), "{argv:?}: no store yet");
                std::fs::create_dir_all(&b).unwrap();
                let out = run(argv, path, &args, &archive);
                let stdout = String::from_utf8_lossy(&out.stdout);
                assert!(
                    out.status.success(),
                    "{argv:?}: {stdout} {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert_eq!(stdout, format!("stored {good}\n"), "{argv:?}");
                let names: Vec<String> = std::fs::read_dir(&b)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                assert_eq!(names, vec![good.clone()], "{argv:?}");
                let md = std::fs::metadata(b.join(&good)).unwrap();
                assert_eq!(md.mode() & 0o7777, 0o755, "{argv:?}");
                assert_eq!(md.mtime(), 1_700_000_000, "{argv:?}");
                assert_eq!(std::fs::read(b.join(&good)).unwrap(), b"good\n");
                let left: Vec<String> = std::fs::read_dir(ws.join("store"))
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                assert_eq!(left, vec!["b".to_string()], "{argv:?}: scratch left");
                // A cut archive stores nothing and says so.
                let out = run(argv, path, &args, &archive[..archive.len() / 3]);
                assert!(!out.status.success() || out.stdout.is_empty(), "{argv:?}");
            }
        }
    }

    /// New content is split into uploads of about the same size, each
    /// file once, small ones too; content the builder has stays out, and
    /// one channel or little content in large files leaves it all to the
    /// stream.
    #[test]
    fn large_new_content_is_split_evenly_across_channels() {
        use crate::context::DockerIgnore;
        let dir = tempfile::tempdir().unwrap();
        for i in 1..=6u8 {
            std::fs::write(
                dir.path().join(format!("f{i}")),
                vec![i; usize::from(i) << 20],
            )
            .unwrap();
        }
        // The same content twice (one variant), one the builder holds,
        // and a small file.
        std::fs::write(dir.path().join("held"), vec![9u8; 3 << 20]).unwrap();
        std::fs::write(dir.path().join("small"), b"small").unwrap();
        let entries = crate::context::walk(dir.path(), &DockerIgnore::parse(""), &[]).unwrap();
        let scanned = super::super::cache::scan(entries, Vec::new(), &[]).unwrap();
        let plan = Plan::full(&scanned.manifest);
        let wanted = wanted(&scanned, &plan);
        let held = wanted.iter().find(|w| {
            w.size == 3 << 20 && {
                let path = &scanned.manifest.entries[w.index].path;
                path.ends_with("held")
            }
        });
        let needed: HashSet<String> = wanted
            .iter()
            .filter(|w| Some(*w) != held)
            .map(|w| w.variant.clone())
            .collect();
        let ups = parallel_uploads(&scanned, &wanted, &needed, 3);
        assert_eq!(ups.len(), 3);
        let mut sizes: Vec<u64> = ups.iter().map(|u| u.bytes).collect();
        sizes.sort();
        assert_eq!(
            sizes,
            vec![7 << 20, 7 << 20, (7 << 20) + 5],
            "largest first, each to the lightest; the small file too"
        );
        let mut all: Vec<&String> = ups.iter().flat_map(|u| &u.variants).collect();
        all.sort();
        let mut want: Vec<&String> = wanted
            .iter()
            .filter(|w| needed.contains(&w.variant))
            .map(|w| &w.variant)
            .collect();
        want.sort();
        want.dedup();
        assert_eq!(all, want);
        for u in &ups {
            for (e, v) in u.entries.iter().zip(&u.variants) {
                assert_eq!(&e.rel, v, "a file goes under its variant's name");
            }
        }
        assert!(parallel_uploads(&scanned, &wanted, &needed, 1).is_empty());
        let few: HashSet<String> = wanted
            .iter()
            .filter(|w| w.size <= 2 << 20)
            .map(|w| w.variant.clone())
            .collect();
        assert!(
            parallel_uploads(&scanned, &wanted, &few, 4).is_empty(),
            "3 MiB is not worth more channels"
        );
        assert_eq!(upload_channels(None, true), 1);
        assert_eq!(upload_channels(None, false), 4);
        assert_eq!(upload_channels(Some(8), true), 8);
    }

    /// Variants are made without a program start per file where python3
    /// is (none of `cp` or `touch`), and with one `cp` a file and one
    /// `touch` an mtime without it: `cp` and `touch` first on PATH count
    /// their starts. Either way every variant has its content, mode and
    /// mtime to the nanosecond.
    #[test]
    fn making_variants_starts_a_few_programs() {
        use sha2::Digest;
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("starts");
        let wrap = dir.path().join("wrap");
        std::fs::create_dir_all(&wrap).unwrap();
        for tool in ["cp", "touch"] {
            let real = ["/usr/bin", "/bin"]
                .iter()
                .map(|d| std::path::Path::new(d).join(tool))
                .find(|p| p.exists())
                .unwrap();
            let script = wrap.join(tool);
            std::fs::write(
                &script,
                format!(
                    "#!/bin/sh\necho {tool} >> '{}'\nexec '{}' \"$@\"\n",
                    log.display(),
                    real.display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        for tools in variant_tools(dir.path()) {
            if tools.argv.len() > 1 {
                continue; // busybox runs its own applets, not PATH's
            }
            // 500 files through python3; 100 without, whose starts cost.
            let (files, per_mtime) = if tools.python { (500, 50) } else { (100, 25) };
            let ws = tempfile::tempdir_in(dir.path()).unwrap();
            let b = ws.path().join("store/b");
            std::fs::create_dir_all(&b).unwrap();
            let mut req = String::new();
            let mut made = Vec::new();
            for n in 0..files {
                let content = format!("file {n}\n");
                let sha: [u8; 32] = sha2::Sha256::digest(&content).into();
                std::fs::write(b.join(variant(&sha, 0o644, 1_600_000_000, 0)), &content).unwrap();
                let mode = if n % 3 == 0 { 0o755 } else { 0o644 };
                let nsec = 123_456_789 + (n / per_mtime) as u32 * 4_000_000;
                let v = variant(&sha, mode, 1_700_000_000, nsec);
                req.push_str(&format!("{v} {}\n", content.len()));
                made.push((v, content, mode, nsec));
            }
            let _ = std::fs::remove_file(&log);
            let path = format!("{}:{}", wrap.display(), tools.path);
            let ws_s = ws.path().display().to_string();
            let args = ["-c", QUERY, "q", &ws_s, "k", "20%", "43200", "plain"];
            let out = run(&tools.argv, &path, &args, req.as_bytes());
            assert!(
                out.status.success(),
                "{path}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let needed = parse_needed(&out.stdout).unwrap();
            assert!(needed.is_empty(), "{path}: {needed:?}");
            for (v, content, mode, nsec) in &made {
                let md = std::fs::metadata(b.join(v)).unwrap();
                assert_eq!(md.mode() & 0o7777, *mode, "{path}: {v}");
                assert_eq!(md.mtime(), 1_700_000_000, "{path}: {v}");
                assert_eq!(md.mtime_nsec(), i64::from(*nsec), "{path}: {v}");
                assert_eq!(std::fs::read_to_string(b.join(v)).unwrap(), *content);
            }
            let starts = std::fs::read_to_string(&log).unwrap_or_default();
            let count = |tool: &str| starts.lines().filter(|l| *l == tool).count();
            if tools.python {
                assert_eq!((count("cp"), count("touch")), (0, 0), "{path}");
            } else {
                // A probe each, then a file each and an mtime each.
                assert_eq!(count("cp"), files + 1, "{path}");
                assert_eq!(count("touch"), files / per_mtime + 1, "{path}");
            }
            // With every variant there, nothing is started for them.
            let _ = std::fs::remove_file(&log);
            let out = run(&tools.argv, &path, &args, req.as_bytes());
            assert!(parse_needed(&out.stdout).unwrap().is_empty(), "{path}");
            assert!(!log.exists(), "{path}: {:?}", std::fs::read_to_string(&log));
        }
    }

    /// Queries of several builds at once on one workspace all answer (they
    /// once shared a temporary file, and a lost race made the store look
    /// unusable, so content was sent and not linked).
    #[test]
    fn concurrent_queries_all_answer() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir_all(ws.join("store/b")).unwrap();
        let ws_s = ws.display().to_string();
        let req = format!("{} 5\n", variant(&[3; 32], 0o644, 1, 0));
        let children: Vec<_> = (0..24)
            .map(|i| {
                use std::io::Write;
                let mut c = std::process::Command::new("dash")
                    .args([
                        "-c",
                        QUERY,
                        "q",
                        &ws_s,
                        &format!("k{i}"),
                        "20%",
                        "43200",
                        "plain",
                    ])
                    .env_clear()
                    .env("PATH", "/usr/bin:/bin")
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                c.stdin.take().unwrap().write_all(req.as_bytes()).unwrap();
                c
            })
            .collect();
        for c in children {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success() && parse_needed(&out.stdout).is_some(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// `remote prune --all` removes every copy but one a run folder links
    /// to, and then the content only the removed copies linked, in dash and
    /// in busybox sh (whose readlink takes one name).
    #[test]
    fn prune_keeps_copies_that_run_folders_link_to() {
        let dir = tempfile::tempdir().unwrap();
        for (i, (argv, path)) in shells(dir.path()).iter().enumerate() {
            let ws = dir.path().join(format!("ws{i}"));
            let b = ws.join("store/b");
            std::fs::create_dir_all(&b).unwrap();
            for (k, content) in [("live", "a"), ("old", "b"), ("other", "c")] {
                let tree = ws.join("contexts").join(k).join("tree");
                std::fs::create_dir_all(&tree).unwrap();
                let blob = b.join(format!("{k}-blob"));
                std::fs::write(&blob, content).unwrap();
                std::fs::hard_link(&blob, tree.join("f")).unwrap();
            }
            for (r, k) in [("r1", "live"), ("r2", "other")] {
                let run = ws.join("runs").join(r);
                std::fs::create_dir_all(&run).unwrap();
                let target = ws.join("contexts").join(k).join("tree");
                std::os::unix::fs::symlink(&target, run.join("context")).unwrap();
            }
            let ws_s = ws.display().to_string();
            let args = ["-c", PRUNE, "p", &ws_s, "20%", "43200", "1", "0"];
            let out = run(argv, path, &args, b"");
            assert!(
                out.status.success(),
                "{argv:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(said.contains("copy old "), "{argv:?}: {said}");
            assert!(!ws.join("contexts/old").exists(), "{argv:?}");
            assert!(ws.join("contexts/live/tree/f").exists(), "{argv:?}");
            assert!(ws.join("contexts/other/tree/f").exists(), "{argv:?}");
            assert!(!b.join("old-blob").exists(), "{argv:?}");
            assert!(b.join("live-blob").exists(), "{argv:?}");
        }
    }

    /// A sync that would fill the disk past 90 % fails with a message that
    /// says so (df is replaced here: the test must not fill the disk).
    #[test]
    fn a_sync_never_fills_the_disk_past_ninety_percent() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("fake");
        std::fs::create_dir_all(&bin).unwrap();
        let df = bin.join("df");
        std::fs::write(
            &df,
            "#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted'\necho '/dev/x 1000000 880000 120000 88% /'\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&df, std::fs::Permissions::from_mode(0o755)).unwrap();
        let ws = dir.path().join("ws").display().to_string();
        let path = format!("{}:/usr/bin:/bin", bin.display());
        let argv = vec!["dash".to_string()];
        let args = ["-c", QUERY, "q", &ws, "k", "90%", "43200", "plain"];
        let big = format!("{} 50000000\n", variant(&[1; 32], 0o644, 1, 0));
        let out = run(&argv, &path, &args, big.as_bytes());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(75), "{err}");
        assert!(err.contains("more than 90% full"), "{err}");
        let small = format!("{} 5000\n", variant(&[1; 32], 0o644, 1, 0));
        let out = run(&argv, &path, &args, small.as_bytes());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn cache_max_table() {
        for (text, want) in [
            ("20%", Ok(CacheMax::Percent(20))),
            ("1024", Ok(CacheMax::Bytes(1024))),
            ("2G", Ok(CacheMax::Bytes(2 << 30))),
            ("500MiB", Ok(CacheMax::Bytes(500 << 20))),
            ("0%", Err(())),
            ("95%", Err(())),
            ("lots", Err(())),
            ("5X", Err(())),
        ] {
            assert_eq!(CacheMax::parse(text).map_err(|_| ()), want, "{text}");
        }
        assert_eq!(CacheMax::Percent(20).word(), "20%");
        assert_eq!(parse_ttl("30d").unwrap(), DEFAULT_TTL);
        assert_eq!(parse_ttl("3600").unwrap(), Duration::from_secs(3600));
        assert!(parse_ttl("5s").is_err());
        assert!(parse_ttl("1w").is_err());
    }

    #[test]
    fn variant_names_carry_mode_and_nanoseconds() {
        let v = variant(&[0xab; 32], 0o4755, 1_700_000_000, 5);
        assert_eq!(v, format!("{}-755-1700000000.000000005", "ab".repeat(32)));
    }

    #[test]
    fn answers_and_status_parse() {
        let n = parse_needed(b"need a\nneed b\ndone 2\n").unwrap();
        assert_eq!(n.len(), 2);
        assert!(parse_needed(b"need a\n").is_none());
        let s = StoreStatus::parse("store 10 3\ncopies 2 1700000000\ndisk 100 50 12\n").unwrap();
        assert_eq!((s.store_bytes, s.blobs, s.copies), (10240, 3, 2));
        assert_eq!(s.oldest_use, Some(1_700_000_000));
        assert_eq!(
            parse_pruned("copy k 5 12\nblobs 3 4\nnoise\n"),
            vec![
                Pruned::Copy {
                    key: "k".into(),
                    last_use: 5,
                    kib: 12
                },
                Pruned::Blobs { count: 3, kib: 4 }
            ]
        );
    }
}
