//! Incremental, content-addressed sync of the build context: send only what
//! changed since the last build on this builder.
//!
//! Sending the whole context on every build is what makes remote Docker
//! builds slow over a laptop's uplink (docker/compose#2090,
//! moby/moby#32853). So the builder keeps a persistent copy of each
//! context under `<workspace>/contexts/<key>/tree`, and every build brings
//! that copy up to date and runs `docker build` on it (the run folder's
//! `context` is a symlink to it, for `-f context/Dockerfile`; the lease's
//! cleanup of the run folder never touches the copy, and a Dockerfile
//! outside the context still lands in the run folder as before). Copies no
//! build used for `cache_ttl` (30 days) are removed by the next sync on that
//! builder, and [`store`] evicts the least recently synced ones beyond
//! `cache_max`.
//!
//! - The key is a hash of this machine's id, a random id of this
//!   installation (kept in the local cache folder, so machines cloned with
//!   one `/etc/machine-id` still differ), the canonical local path of the
//!   context and the builder's name: never the folder's basename, which is
//!   how docker/buildx#2552 served one project's files to another.
//! - [`manifest`]: every entry with type, mode, size, mtime, symlink target
//!   and SHA-256; [`cache`]: the client's stat cache (only changed files are
//!   hashed again) and the manifest the builder holds; [`plan`]: deletions,
//!   `chmod`s and entries to send; [`stream`]: the tar stream, with
//!   nanosecond mtimes; [`script`]: the sh program that applies them with
//!   tar and checks the result.
//! - [`store`]: one content store per workspace; every copy's files are
//!   hard links into it, the client first asks which of the files it would
//!   send the builder lacks, and the tar stream carries only that content
//!   plus one hard-link header per file. `cache_max` and `cache_ttl` bound
//!   it.
//! - Each build sends one tar stream of the added and changed entries, after
//!   a few lines carrying the deletions. The copy is marked dirty while it
//!   changes and clean (with the manifest hash) only after the builder's
//!   listing matched the one predicted here; with `--verify` every file is
//!   hashed again on the builder too. A copy that is dirty, unknown to this
//!   machine, or changed since it was marked clean gets a full send into a
//!   fresh copy. A delta whose result does not match is followed at once by
//!   a full send, in the same build.
//!
//! A build sends the sync's command together with the lease request: the
//! builder starts it once the lease script has made the run folder (see
//! [`script::after_lease`]), so the copy's state arrives with the lease;
//! the compression is chosen from the docker probe, which runs meanwhile,
//! before anything is sent; and `docker build` is started beside the
//! request, waiting on the builder until the copy is marked clean with the
//! manifest sent (see [`crate::remote::build_after_sync`]). A no-change
//! rebuild so waits for about four round trips after the SSH handshake:
//! the channels opening, the lease with the copy's state, the request with
//! the build, and the release.
//!
//! BuildKit keeps its own copy of a local context, keyed on the path given
//! to `docker build`, and trusts a file whose size, mode and mtime (to the
//! nanosecond) did not change. Building from the copy's own path, with the
//! local mtimes restored to the nanosecond, makes that copy incremental too
//! and keeps it from serving another context's file, or an older version of
//! a file rewritten within the same second (see [`stream`]).

pub mod cache;
pub mod manifest;
pub mod plan;
pub mod script;
pub mod store;
pub mod stream;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::debug;

use crate::config::Builder;
use crate::context::{self, Compression, ContextError, Entry, ExtraFile};
use crate::report::Reporter;
use crate::ssh::exec::{ExitStatus, LINE_LIMIT, RemoteProcess, STDERR_LIMIT, keep_tail};
use crate::ssh::{Session, SshError};
use crate::util::canonical;

use cache::{LocalCache, Scanned};
use manifest::{Kind, Manifest};
use plan::Plan;
use script::{CopyState, Request, TarMode};

/// How long the builder may take to report its copy (it may wait for the
/// copy's lock and list a large tree first).
const STATE_TIMEOUT: Duration = Duration::from_secs(300);
/// The most of the builder's listing of its copy read to explain a
/// mismatch (about 150 bytes an entry).
const LISTING_LIMIT: usize = 64 << 20;
/// Tar chunks handed to the channel.
const CHUNK: usize = 256 * 1024;

/// Everything that can go wrong in a sync.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error("the context sync on `{builder}` failed: {message}")]
    Remote { builder: String, message: String },
    #[error("`{builder}` did not report the state of its copy of the context within {}s", after.as_secs())]
    Timeout { builder: String, after: Duration },
}

/// One sync: which builder, which context, how.
pub struct SyncJob<'a> {
    pub builder: &'a Builder,
    /// The run folder, where the copy is linked as `context`.
    pub run_dir: &'a str,
    /// What the context is on this machine (see [`identity`]).
    pub identity: String,
    pub compression: Compression,
    /// Hash every file again on the builder.
    pub verify: bool,
    /// Where the local cache lives; `None`: `$XDG_CACHE_HOME/absconda`
    /// (or `~/.cache/absconda`).
    pub cache_root: Option<PathBuf>,
}

/// What a sync did, for the summary and `--json`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SyncSummary {
    /// `delta` (only changes sent) or `full` (everything, into a fresh copy).
    pub mode: &'static str,
    /// Why the whole context was sent.
    pub reason: Option<String>,
    /// The copy's folder name on the builder (`<workspace>/contexts/<key>`).
    pub key: String,
    /// Entries (files, folders, symlinks) in the context.
    pub entries: u64,
    /// Files in the tar stream.
    pub files_sent: u64,
    /// Files linked from the builder's content store (their content was
    /// already there, or is sent once for all of them).
    pub files_linked: u64,
    /// File contents sent to the store.
    pub blobs_sent: u64,
    /// Channels that carried large new content at once, before the
    /// stream (0: the stream carried it all).
    pub upload_channels: u32,
    /// The context went to `docker build` while it arrived (a cold send).
    pub streamed: bool,
    /// Bytes of the store query (the plan's file names in the store).
    pub query_bytes: u64,
    /// Files, folders and symlinks in the tar stream.
    pub entries_sent: u64,
    /// Paths removed from the copy (topmost only).
    pub deleted: u64,
    /// Entries whose permission bits alone changed.
    pub chmod: u64,
    /// Bytes written to the channel: request lines and tar stream.
    pub bytes_sent: u64,
    /// Files hashed on this machine (the others were known from the cache).
    pub hashed_files: u64,
    pub hashed_bytes: u64,
    /// `listing` (names, types, modes, sizes, mtimes) or `sha256` (`--verify`).
    pub verified: &'static str,
    /// Whether the copy matched what was sent (a mismatch after a full send
    /// is reported as a warning, and the build goes on).
    pub matched: bool,
    /// Exchanges with the builder (2 when a delta was followed by a full send).
    pub attempts: u32,
    /// Seconds spent walking the cache and hashing.
    pub scan_seconds: f64,
    /// Seconds from opening the sync channel to the builder's verdict.
    pub transfer_seconds: f64,
    /// The copy's absolute path on the builder: `docker build` runs on it,
    /// so BuildKit's own incremental context transfer is keyed on this
    /// context alone (it keys it on the path it is given).
    pub tree: Option<String>,
}

/// This machine's id (`/etc/machine-id`), or its host name.
pub fn machine_id() -> String {
    for path in ["/etc/machine-id", "/var/lib/dbus/machine-id"] {
        if let Ok(id) = std::fs::read_to_string(path) {
            let id = id.trim();
            if !id.is_empty() {
                return id.to_string();
            }
        }
    }
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        return format!("host:{}", String::from_utf8_lossy(&buf[..end]));
    }
    "unknown-machine".into()
}

/// What identifies a context on this machine: the canonical path of its
/// folder, or (for generated-only contexts) of the files added to it.
pub fn identity(context_dir: Option<&Path>, extra_files: &[(String, PathBuf)]) -> String {
    match context_dir {
        Some(dir) => format!("dir:{}", canonical(dir).display()),
        None => {
            let mut parts: Vec<String> = extra_files
                .iter()
                .map(|(name, path)| format!("{name}={}", canonical(path).display()))
                .collect();
            parts.sort();
            format!("generated:{}", parts.join("\0"))
        }
    }
}

/// The copy's key on the builder: 32 hex digits.
pub fn copy_key(machine: &str, identity: &str, builder: &str) -> String {
    let mut h = Sha256::new();
    for part in ["absconda-context-copy-v1", machine, identity, builder] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..16])
}

/// When this machine last synced the context `identity` to `builder`, if
/// it ever did (the time its local record of the copy was written). A pool
/// sends a context to the builder that holds a copy of it.
pub fn last_synced(identity: &str, builder: &str) -> Option<std::time::SystemTime> {
    let root = cache::cache_root()?;
    let machine = format!("{}\0{}", machine_id(), cache::installation_id(Some(&root)));
    let key = copy_key(&machine, identity, builder);
    std::fs::metadata(root.join("contexts").join(format!("{key}.json")))
        .ok()?
        .modified()
        .ok()
}

/// A sync started together with the lease request, before the lease is
/// held (see [`script::after_lease`]): the builder starts it once the lease
/// script made the run folder, and the compression is decided (from the
/// docker probe that runs meanwhile) before anything is sent.
pub struct Early {
    /// How long the builder waits for the lease.
    pub wait: Duration,
    /// `Some` once the compression is known; a dropped sender means the
    /// build stopped before the sync could send anything.
    pub compression: tokio::sync::watch::Receiver<Option<Compression>>,
    /// Told the new manifest's hash just before the request goes out, so
    /// that `docker build` can be started beside it (it waits on the
    /// builder for the copy to be marked clean with that manifest), and
    /// whether the context is streamed to it as it arrives.
    pub sending: Option<tokio::sync::oneshot::Sender<Sending>>,
    /// A cold send may be streamed into the build (see [`Sending`]).
    pub stream: bool,
}

/// What [`Early::sending`] tells the build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sending {
    pub manifest: String,
    /// A cold send: the builder feeds the context to `docker build -`
    /// through the run folder's fifo while it unpacks it into the copy.
    pub streamed: bool,
}

/// At least this share of a cold send's content must be new to the
/// builder for it to be streamed into `docker build` (the stream carries
/// all of it; the rest of the time the store's links save the bytes).
const STREAM_NEW_SHARE: f64 = 0.9;

/// Below this much new content, a stream of many entries is gzipped even
/// where `compression: auto` sends content as it is.
const SMALL_STREAM: u64 = 4 << 20;

/// Brings the builder's copy of the context up to date and links it into
/// the run folder. Must run while the builder's lease is held.
pub async fn sync_context(
    session: &Session,
    job: &SyncJob<'_>,
    entries: Vec<Entry>,
    extra: Vec<ExtraFile>,
    reporter: &dyn Reporter,
) -> Result<SyncSummary, SyncError> {
    sync_context_early(session, job, entries, extra, reporter, None).await
}

/// [`sync_context`], started with the lease request when `early` is given.
pub async fn sync_context_early(
    session: &Session,
    job: &SyncJob<'_>,
    entries: Vec<Entry>,
    extra: Vec<ExtraFile>,
    reporter: &dyn Reporter,
    mut early: Option<Early>,
) -> Result<SyncSummary, SyncError> {
    let builder = &job.builder.name;
    let t = Instant::now();
    let (key, mut cache, scanned) = {
        let root = job.cache_root.clone().or_else(cache::cache_root);
        let identity = job.identity.clone();
        let name = builder.clone();
        tokio::task::spawn_blocking(move || {
            let machine = format!(
                "{}\0{}",
                machine_id(),
                cache::installation_id(root.as_deref())
            );
            let key = copy_key(&machine, &identity, &name);
            let cache = LocalCache::load(root.as_deref(), &key);
            let scanned = cache::scan(entries, extra, &cache.data.stats)?;
            Ok::<_, ContextError>((key, cache, scanned))
        })
        .await
        .map_err(|e| SyncError::Remote {
            builder: builder.clone(),
            message: format!("hashing the context panicked: {e}"),
        })??
    };
    cache.data.context = job.identity.clone();
    cache.data.builder = builder.clone();
    let new = &scanned.manifest;
    let new_hash = new.hash();
    let expected_listing = new.listing_hash();
    let mut summary = SyncSummary {
        key: key.clone(),
        entries: new.entries.len() as u64,
        hashed_files: scanned.hashed_files,
        hashed_bytes: scanned.hashed_bytes,
        scan_seconds: t.elapsed().as_secs_f64(),
        ..SyncSummary::default()
    };
    debug!(%key, entries = summary.entries, hashed = scanned.hashed_files, "context scanned");

    let t = Instant::now();
    let mut force_full: Option<String> = None;
    // After content that failed its hash, the next attempt sends every
    // file's content again instead of linking what the store holds.
    let mut bypass_store = false;
    let mut compression = job.compression;
    loop {
        summary.attempts += 1;
        // A copy this key never held may be another copy of exactly this
        // manifest (a fresh checkout of content the workspace has built),
        // unless this attempt must send everything.
        let seek = (force_full.is_none() && !bypass_store).then_some(new_hash.as_str());
        let mut command = script::command(&job.builder.workspace, &key, job.run_dir, seek);
        if let (Some(e), 1) = (&early, summary.attempts) {
            command = script::after_lease(job.run_dir, e.wait.as_secs() + 60, &command);
        }
        let mut p = session.exec("the context sync", &command).await?;
        debug!("sync channel open");
        let mut buf = Vec::new();
        let mut stderr = Vec::new();
        let line = loop {
            let line = tokio::time::timeout(STATE_TIMEOUT, p.reader.line(&mut buf, &mut stderr))
                .await
                .map_err(|_| SyncError::Timeout {
                    builder: builder.clone(),
                    after: STATE_TIMEOUT,
                })?;
            // Said every second while the lease is not yet held.
            if line.as_deref() != Some("waiting") {
                break line;
            }
        };
        let state = match line.as_deref().and_then(CopyState::parse) {
            Some(s) => s,
            None if p.reader.overlong() => {
                return Err(SyncError::Remote {
                    builder: builder.clone(),
                    message: format!(
                        "the builder sent a line longer than {} where it reports its copy; absconda reads no more",
                        crate::util::human_bytes(LINE_LIMIT as u64)
                    ),
                });
            }
            None => {
                let _ = p
                    .reader
                    .drain(|_, d| keep_tail(&mut stderr, d, STDERR_LIMIT))
                    .await;
                return Err(remote_error(builder, line.as_deref(), &stderr));
            }
        };
        debug!(?state, "the builder's copy");

        let (base, reason, rebooted) = choose_base(&state, &cache, new, force_full.take());
        // A copy changed on the builder may have changed its files in
        // place, and so the store's content they link: send it all again,
        // which replaces that content in the store too.
        if matches!(&state, CopyState::Clean { recorded_listing, current_listing, .. }
            if recorded_listing != current_listing)
        {
            bypass_store = true;
        }
        let mut plan = match base {
            Some(b) => Plan::delta(b, new),
            None => Plan::full(new),
        };
        let base_hash = base.map(Manifest::hash);
        summary.mode = if base_hash.is_some() { "delta" } else { "full" };
        summary.reason = reason;
        let verify_plan = (job.verify || rebooted).then(|| new.verify_plan());
        summary.verified = if verify_plan.is_some() {
            "sha256"
        } else {
            "listing"
        };

        // Remember what is about to be sent before sending it: if the
        // connection breaks after the builder finished, the next build
        // still recognises the copy.
        let stats_changed = cache.data.stats != scanned.stats;
        if base_hash.as_deref() != Some(new_hash.as_str()) || stats_changed {
            cache.data.stats = scanned.stats.clone();
            if base_hash.as_deref() != Some(new_hash.as_str()) {
                cache.data.sent = Some(new.clone());
            }
            save(&mut cache).await;
        }

        let mut sending = None;
        let mut may_stream = false;
        if let Some(mut e) = early.take() {
            may_stream = e.stream;
            match e.compression.wait_for(Option::is_some).await {
                Ok(c) => compression = c.unwrap_or(compression),
                Err(_) => {
                    return Err(SyncError::Remote {
                        builder: builder.clone(),
                        message: "the build stopped before the context was sent".into(),
                    });
                }
            }
            sending = e.sending.take();
        }

        let auto_compression = matches!(
            job.builder.compression,
            crate::config::CompressionSetting::Auto
        );
        store::no_file_chmods(&mut plan, new);
        let wanted = store::wanted(&scanned, &plan);
        let needed = if wanted.is_empty() {
            None
        } else if bypass_store {
            Some(wanted.iter().map(|w| w.variant.clone()).collect())
        } else {
            store::query(
                session,
                &job.builder.workspace,
                &key,
                (job.builder.cache_max, job.builder.cache_ttl),
                &wanted,
                // Lines of hex names: gzip halves them, for next to no work
                // (also where the content goes zstd: the query speaks gzip).
                if wanted.len() >= 32 && (auto_compression || compression != Compression::None) {
                    Compression::Gzip
                } else {
                    compression
                },
                builder,
            )
            .await?
            .map(|(needed, bytes)| {
                summary.query_bytes += bytes;
                summary.bytes_sent += bytes;
                needed
            })
        };

        // A cold send of content the builder has not seen goes to `docker
        // build` while it arrives, when the build waits beside the sync.
        let all_bytes = planned_bytes(&plan, new);
        let new_bytes = match &needed {
            Some(needed) => store::new_content(new, &plan, &wanted, needed),
            None => all_bytes,
        };
        let stream_cold = may_stream
            && sending.is_some()
            && base_hash.is_none()
            && !plan.send.is_empty()
            && all_bytes > 0
            && new_bytes as f64 >= all_bytes as f64 * STREAM_NEW_SHARE;

        // A stream of little content and many entries (links into the
        // store for content the builder holds: about 1.5 KiB of headers a
        // file) shrinks several times gzipped, for next to no work, also
        // where `auto` sends content as it is (loopback).
        let compression = if compression == Compression::None
            && auto_compression
            && new_bytes < SMALL_STREAM
            && plan.send.len() >= 32
        {
            Compression::Gzip
        } else {
            compression
        };
        let tar_mode = if plan.send.is_empty() {
            TarMode::None
        } else {
            match compression {
                Compression::Gzip => TarMode::Gzip,
                Compression::Zstd => TarMode::Zstd,
                Compression::None => TarMode::Plain,
            }
        };
        summary.entries_sent = plan.send.len() as u64;
        summary.files_sent = plan
            .send
            .iter()
            .filter(|i| matches!(new.entries[**i].kind, Kind::File { .. }))
            .count() as u64;
        summary.deleted = plan.delete.len() as u64;
        summary.chmod = plan.chmod.len() as u64;
        let content = Arc::new(AtomicU64::new(0));
        let mut planned = all_bytes;
        let streamed = if stream_cold {
            let (entries, extra) = scanned.tar_inputs(&plan.send);
            let (then, links) = match &needed {
                Some(needed) => store::stream_links(&scanned, &wanted, needed, &new_hash),
                None => (Vec::new(), Vec::new()),
            };
            let measured = tokio::task::spawn_blocking(move || {
                context::archive_len(&entries, &extra).map(|n| (n, entries, extra))
            })
            .await
            .map_err(|e| SyncError::Remote {
                builder: builder.clone(),
                message: format!("measuring the context archive panicked: {e}"),
            })??;
            Some((measured, then, links))
        } else {
            None
        };
        // Large new content goes over several channels at once, into the
        // store, before the stream: one channel has only the window sshd
        // grants it in flight, which caps it on a long link.
        let mut needed = needed;
        if streamed.is_none()
            && tar_mode != TarMode::None
            && let Some(n) = needed.as_mut()
        {
            let channels =
                store::upload_channels(job.builder.upload_channels, session.on_loopback());
            let uploads = store::parallel_uploads(&scanned, &wanted, n, channels);
            if !uploads.is_empty() {
                let count = uploads.len();
                let already = summary.bytes_sent;
                let sent = AtomicU64::new(already);
                let t = Instant::now();
                let (stored, bytes) = store::put_parallel(
                    session,
                    &job.builder.workspace,
                    uploads,
                    compression,
                    (&sent, &content),
                    &|total, done| {
                        reporter.upload_progress(total);
                        reporter.upload_content(done, all_bytes);
                    },
                )
                .await;
                debug!(
                    channels = count,
                    stored = stored.len(),
                    bytes,
                    seconds = t.elapsed().as_secs_f64(),
                    "parallel upload"
                );
                summary.bytes_sent = already + bytes;
                summary.blobs_sent += stored.len() as u64;
                summary.upload_channels = count as u32;
                n.retain(|v| !stored.contains(v));
            }
        }
        let stream_len = streamed.as_ref().map(|((n, _, _), _, _)| *n);
        let request = Request {
            base: base_hash.as_deref(),
            new_manifest: &new_hash,
            tar: tar_mode,
            expected_listing: &expected_listing,
            delete: &plan.delete,
            chmod: &plan.chmod,
            verify: verify_plan.as_ref(),
            stream: stream_len,
        }
        .encode();
        let tar = match (&needed, tar_mode, streamed) {
            (_, TarMode::None, _) => None,
            (_, _, Some(((first_len, entries, extra), then, links))) => {
                summary.blobs_sent = links.len() as u64;
                summary.streamed = true;
                Some(context::two_archives_stream(
                    entries,
                    extra,
                    first_len,
                    then,
                    links,
                    compression,
                    CHUNK,
                    content.clone(),
                ))
            }
            (None, _, None) => Some(scanned_tar(&scanned, &plan, compression, &content)),
            (Some(needed), _, None) => {
                let t = store::tar_inputs(&scanned, &plan, &wanted, needed, &new_hash);
                planned = content.load(Ordering::Relaxed) + t.content_bytes;
                summary.files_linked = t.links.len() as u64;
                summary.blobs_sent += t.blobs_sent;
                Some(store::tar_stream(t, compression, CHUNK, content.clone()))
            }
        };
        debug!(
            delete = plan.delete.len(),
            chmod = plan.chmod.len(),
            send = plan.send.len(),
            "sending the request"
        );
        if let Some(tell) = sending.take() {
            let _ = tell.send(Sending {
                manifest: new_hash.clone(),
                streamed: stream_len.is_some(),
            });
        }
        let done = match exchange(
            &mut p,
            &mut buf,
            &mut stderr,
            request,
            tar,
            summary.bytes_sent,
            (&content, planned),
            reporter,
            builder,
        )
        .await
        {
            // A store file evicted by another build between the query and
            // the link: ask again, into a fresh copy.
            Err(SyncError::Remote { message, .. }) if needed.is_some() && summary.attempts < 2 => {
                force_full = Some(format!(
                    "linking from the builder's store failed ({message})"
                ));
                continue;
            }
            done => done?,
        };
        summary.bytes_sent += done.bytes;
        summary.tree = done.tree.or(summary.tree.take());
        match done.outcome {
            Outcome::Clean => {
                summary.matched = true;
                cache.data.synced = Some(new.clone());
                cache.data.sent = None;
                if base_hash.as_deref() != Some(new_hash.as_str()) {
                    save(&mut cache).await;
                }
                break;
            }
            Outcome::Stale if summary.attempts < 2 => {
                force_full = Some("the builder's copy changed while this build waited".into());
            }
            Outcome::Mismatch(what)
                if (base_hash.is_some() || needed.is_some()) && summary.attempts < 2 =>
            {
                // What failed may be the store's content: send it all again.
                bypass_store = true;
                force_full = Some(format!(
                    "the updated copy did not match the manifest ({what})"
                ));
            }
            Outcome::Mismatch(what) => {
                let detail = explain_mismatch(session, job, &key, new).await;
                reporter.info(&format!(
                    "warning: the builder's copy of the context differs from what was sent ({what}){detail}; \
                     building from it anyway, as --no-incremental would; the next build sends the whole context again"
                ));
                cache.data.sent = None;
                save(&mut cache).await;
                break;
            }
            Outcome::Stale => {
                return Err(SyncError::Remote {
                    builder: builder.clone(),
                    message: "the builder's copy kept changing under the lease".into(),
                });
            }
        }
    }
    summary.transfer_seconds = t.elapsed().as_secs_f64();
    Ok(summary)
}

/// Which manifest the builder's copy holds (if it can be trusted), why
/// not, and whether the builder rebooted since it was checked.
fn choose_base<'a>(
    state: &CopyState,
    cache: &'a LocalCache,
    new: &'a Manifest,
    force_full: Option<String>,
) -> (Option<&'a Manifest>, Option<String>, bool) {
    if let Some(reason) = force_full {
        return (None, Some(reason), false);
    }
    match state {
        CopyState::None => (
            None,
            Some("first build of this context on this builder".into()),
            false,
        ),
        CopyState::Dirty => (
            None,
            Some("the builder's copy was left unfinished by an interrupted sync".into()),
            false,
        ),
        CopyState::Clean {
            manifest,
            recorded_listing,
            current_listing,
            rebooted,
        } => {
            if recorded_listing != current_listing {
                return (
                    None,
                    Some("the builder's copy was changed outside absconda".into()),
                    false,
                );
            }
            // Another copy that holds exactly what is about to be sent
            // (see [`script::command`]): nothing to send.
            let known = cache
                .manifest_with_hash(manifest)
                .or_else(|| (*manifest == new.hash()).then_some(new));
            match known {
                Some(m) => (Some(m), None, *rebooted),
                None => (
                    None,
                    Some("this machine has no record of the builder's copy".into()),
                    false,
                ),
            }
        }
    }
}

fn scanned_tar(
    scanned: &Scanned,
    plan: &Plan,
    compression: Compression,
    content: &Arc<AtomicU64>,
) -> (context::TarChunks, context::TarTask) {
    let (entries, extra) = scanned.tar_inputs(&plan.send);
    stream::tar_stream_with_progress(entries, extra, compression, CHUNK, content.clone())
}

/// The file content the plan sends, before compression: the upload's total.
fn planned_bytes(plan: &Plan, new: &Manifest) -> u64 {
    plan.send
        .iter()
        .filter_map(|&i| match new.entries.get(i).map(|e| &e.kind) {
            Some(Kind::File { size, .. }) => Some(*size),
            _ => None,
        })
        .sum()
}

async fn save(cache: &mut LocalCache) {
    let mut owned = LocalCache {
        path: cache.path.clone(),
        data: std::mem::take(&mut cache.data),
    };
    let back = tokio::task::spawn_blocking(move || {
        owned.save();
        owned.data
    })
    .await;
    match back {
        Ok(data) => cache.data = data,
        Err(e) => tracing::warn!(error = %e, "writing the sync cache panicked"),
    }
}

enum Outcome {
    Clean,
    /// What differed: `listing`, `files`, `symlinks`.
    Mismatch(String),
    /// The copy was not in the state the delta was made for.
    Stale,
}

struct Exchanged {
    outcome: Outcome,
    bytes: u64,
    tree: Option<String>,
}

/// Writes the request and the tar stream, and reads the builder's verdict.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    p: &mut RemoteProcess,
    buf: &mut Vec<u8>,
    stderr: &mut Vec<u8>,
    request: Vec<u8>,
    tar: Option<(context::TarChunks, context::TarTask)>,
    already_sent: u64,
    (content, planned): (&AtomicU64, u64),
    reporter: &dyn Reporter,
    builder: &str,
) -> Result<Exchanged, SyncError> {
    let (rx, producer) = match tar {
        Some((rx, producer)) => (Some(rx), Some(producer)),
        None => (None, None),
    };
    let writer = &p.writer;
    let reader = &mut p.reader;
    let send = async {
        let mut sent = request.len() as u64;
        pump(writer, &request, rx, |n| {
            sent += n;
            reporter.upload_progress(already_sent + sent);
            reporter.upload_content(content.load(Ordering::Relaxed), planned);
        })
        .await
        .map_err(|e| match e {
            Pumped::Archive(e) => SyncError::Remote {
                builder: builder.to_string(),
                message: format!("the context archive broke: {e}"),
            },
            Pumped::Ssh(e) => e.into(),
        })?;
        Ok::<u64, SyncError>(sent)
    };
    // Read to the end rather than line by line: sshd may report the exit
    // status before the last output it read from the script.
    let recv = async {
        let mut out = std::mem::take(buf);
        let status = reader
            .drain(|is_err, d| {
                // The verdict is in the last lines: keep a bounded tail.
                if is_err {
                    keep_tail(stderr, d, STDERR_LIMIT)
                } else {
                    keep_tail(&mut out, d, STDERR_LIMIT)
                }
            })
            .await;
        (out, status)
    };
    let (sent, (out, status)) = tokio::join!(send, recv);
    let out = String::from_utf8_lossy(&out);
    let lines: Vec<&str> = out.lines().collect();
    let result = lines.iter().rev().find_map(|l| l.strip_prefix("result "));
    if let Some(producer) = producer {
        match producer.await {
            Ok(Ok(_)) => {}
            // A file that cannot be read is the user's to fix: say which.
            Ok(Err(ContextError::StreamClosed { .. })) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => {
                return Err(SyncError::Remote {
                    builder: builder.to_string(),
                    message: format!("the tar writer failed: {e}"),
                });
            }
        }
    }
    debug!(?lines, %status, "sync exchange");
    let outcome = match result {
        Some("clean") if status.success() => Outcome::Clean,
        Some("stale") => Outcome::Stale,
        Some(r) if r.starts_with("mismatch") => {
            Outcome::Mismatch(r.trim_start_matches("mismatch").trim().to_string())
        }
        _ => {
            // Our own write error explains less than the builder's stderr.
            let text = String::from_utf8_lossy(stderr);
            let message = text
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("error "))
                .map(str::to_string)
                .or_else(|| result.map(|r| r.trim_start_matches("failed ").to_string()));
            return Err(match (message, sent) {
                (Some(message), _) => SyncError::Remote {
                    builder: builder.to_string(),
                    message,
                },
                (None, Err(e)) => e,
                (None, Ok(_)) => SyncError::Remote {
                    builder: builder.to_string(),
                    message: format!("the sync script ended with {status}: {}", text.trim()),
                },
            });
        }
    };
    let bytes = match (&outcome, sent) {
        (_, Ok(n)) => n,
        (Outcome::Stale, Err(_)) => request.len() as u64,
        (_, Err(e)) => return Err(e),
    };
    let tree = lines
        .iter()
        .find_map(|l| l.strip_prefix("tree "))
        .map(str::to_string);
    Ok(Exchanged {
        outcome,
        bytes,
        tree,
    })
}

/// Why [`pump`] stopped.
enum Pumped {
    /// Reading the context for the archive failed.
    Archive(std::io::Error),
    Ssh(SshError),
}

/// Writes `head` and then an archive's chunks to a channel's stdin,
/// telling `each` the bytes of every chunk, and then closes stdin, also
/// after a failure (a file that shrank while being read): the builder's
/// tar then sees a cut archive and fails, instead of waiting for the rest
/// forever.
async fn pump(
    writer: &crate::ssh::exec::Writer,
    head: &[u8],
    rx: Option<context::TarChunks>,
    mut each: impl FnMut(u64),
) -> Result<(), Pumped> {
    let result = async {
        if !head.is_empty() {
            writer.write_all(head).await.map_err(Pumped::Ssh)?;
        }
        if let Some(mut rx) = rx {
            while let Some(chunk) = rx.recv().await {
                let chunk = chunk.map_err(Pumped::Archive)?;
                writer.write_all(&chunk).await.map_err(Pumped::Ssh)?;
                each(chunk.len() as u64);
            }
        }
        Ok(())
    }
    .await;
    let closed = writer.eof().await.map_err(Pumped::Ssh);
    result.and(closed)
}

fn remote_error(builder: &str, line: Option<&str>, stderr: &[u8]) -> SyncError {
    let text = String::from_utf8_lossy(stderr);
    let message = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("error "))
        .map(str::to_string)
        .unwrap_or_else(|| match line {
            Some(l) => format!("unexpected answer `{l}` {}", text.trim()),
            None => format!(
                "the sync script ended before reporting the copy's state: {}",
                text.trim()
            ),
        });
    SyncError::Remote {
        builder: builder.to_string(),
        message,
    }
}

/// The first lines that differ between the builder's listing and ours.
async fn explain_mismatch(
    session: &Session,
    job: &SyncJob<'_>,
    key: &str,
    manifest: &Manifest,
) -> String {
    let cmd = script::listing_command(&job.builder.workspace, key);
    let Ok(out) = session
        .output_limited("listing the builder's copy", &cmd, b"", LISTING_LIMIT)
        .await
    else {
        return String::new();
    };
    if out.status != ExitStatus::Code(0) {
        return String::new();
    }
    let theirs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let ours = manifest.listing_lines();
    let diff = listing_diff(&ours, &theirs, 3);
    if diff.is_empty() {
        String::new()
    } else {
        format!(": {diff}")
    }
}

/// `expected `…`, found `…`` for up to `max` lines on each side.
fn listing_diff(ours: &[String], theirs: &[String], max: usize) -> String {
    use std::collections::HashSet;
    let a: HashSet<&String> = ours.iter().collect();
    let b: HashSet<&String> = theirs.iter().collect();
    let missing: Vec<String> = ours
        .iter()
        .filter(|l| !b.contains(l))
        .take(max)
        .map(|l| format!("`{l}`"))
        .collect();
    let extra: Vec<String> = theirs
        .iter()
        .filter(|l| !a.contains(l))
        .take(max)
        .map(|l| format!("`{l}`"))
        .collect();
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("expected {}", missing.join(", ")));
    }
    if !extra.is_empty() {
        parts.push(format!("found {}", extra.join(", ")));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_machine_path_and_builder_not_basename() {
        let k = copy_key("m1", "dir:/home/a/app", "b1");
        assert_eq!(k.len(), 32);
        assert_ne!(k, copy_key("m2", "dir:/home/a/app", "b1"));
        assert_ne!(k, copy_key("m1", "dir:/home/b/app", "b1"));
        assert_ne!(k, copy_key("m1", "dir:/home/a/app", "b2"));
        assert_eq!(k, copy_key("m1", "dir:/home/a/app", "b1"));
    }

    #[test]
    fn identity_is_the_canonical_path() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("app");
        std::fs::create_dir(&sub).unwrap();
        let via_dots = dir.path().join("app/../app");
        assert_eq!(identity(Some(&sub), &[]), identity(Some(&via_dots), &[]));
        assert!(identity(None, &[("env.yaml".into(), sub.clone())]).starts_with("generated:"));
    }

    #[test]
    fn which_copies_are_trusted() {
        let m = Manifest::default();
        let cache = LocalCache {
            path: None,
            data: cache::CacheData {
                synced: Some(m.clone()),
                ..cache::CacheData::default()
            },
        };
        let clean =
            |manifest: &str, recorded: &str, current: &str, rebooted: bool| CopyState::Clean {
                manifest: manifest.into(),
                recorded_listing: recorded.into(),
                current_listing: current.into(),
                rebooted,
            };
        let h = m.hash();
        let cases = [
            (clean(&h, "l", "l", false), None, true, false, None),
            (clean(&h, "l", "l", true), None, true, true, None),
            (
                clean(&h, "l", "changed", false),
                None,
                false,
                false,
                Some("changed outside absconda"),
            ),
            (
                clean("unknown", "l", "l", false),
                None,
                false,
                false,
                Some("no record"),
            ),
            (CopyState::Dirty, None, false, false, Some("interrupted")),
            (CopyState::None, None, false, false, Some("first build")),
            (
                clean(&h, "l", "l", false),
                Some("forced".to_string()),
                false,
                false,
                Some("forced"),
            ),
        ];
        // A copy of exactly the manifest about to be sent is a base
        // without any record of it.
        let empty = LocalCache {
            path: None,
            data: cache::CacheData::default(),
        };
        let (base, why, _) = choose_base(&clean(&h, "l", "l", false), &empty, &m, None);
        assert!(base.is_some() && why.is_none());
        let other = Manifest {
            entries: vec![manifest::ManifestEntry {
                path: "a".into(),
                mode: 0o644,
                kind: Kind::Dir,
            }],
        };
        let (base, _, _) = choose_base(&clean(&h, "l", "l", false), &empty, &other, None);
        assert!(base.is_none());
        for (state, force, delta, rebooted, reason) in cases {
            let (base, why, reboot) = choose_base(&state, &cache, &m, force);
            assert_eq!(base.is_some(), delta, "{state:?}");
            assert_eq!(reboot, rebooted, "{state:?}");
            match reason {
                Some(r) => assert!(why.as_deref().is_some_and(|w| w.contains(r)), "{why:?}"),
                None => assert!(why.is_none()),
            }
        }
    }

    #[test]
    fn diff_names_both_sides() {
        let ours = vec!["f 4755 1 1 ./a".to_string(), "f 644 1 1 ./b".to_string()];
        let theirs = vec!["f 755 1 1 ./a".to_string(), "f 644 1 1 ./b".to_string()];
        assert_eq!(
            listing_diff(&ours, &theirs, 3),
            "expected `f 4755 1 1 ./a`; found `f 755 1 1 ./a`"
        );
    }
}
