//! The client's memory of a context: which files it hashed (so that only
//! files whose size, mtime, ctime or inode changed are hashed again) and
//! which manifest the builder's copy holds.
//!
//! One JSON file per copy under `$XDG_CACHE_HOME/absconda/contexts/`
//! (default `~/.cache/absconda/contexts/`), replaced atomically (write a
//! temporary file, then rename). It is only an optimisation: a missing,
//! corrupt or outdated file costs one full send, never a wrong build, since
//! the builder checks every sync against the listing absconda predicts.
//! It is read and written while the builder's lease is held, so two builds
//! of the same context on the same builder take turns on it too.
//!
//! A file modified within two seconds of being hashed is not remembered:
//! a second write in the same timestamp tick would not change its stat
//! fingerprint (git's "racy clean" problem), so it is hashed again next time.

use std::collections::HashMap;
use std::io::Write;
use std::num::NonZeroUsize;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use super::manifest::{Kind, Manifest, ManifestEntry};
use crate::context::{ContextError, Entry, EntryKind, ExtraFile, sha256_files};

const VERSION: u32 = 1;
/// Files changed this close to the scan are hashed again next time.
const RACY_SECONDS: f64 = 2.0;

/// What identifies a file's content without reading it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatRecord {
    pub path: String,
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub ctime: i64,
    pub ctime_nsec: u32,
    pub ino: u64,
    pub dev: u64,
    #[serde(with = "super::manifest::hex32")]
    pub sha256: [u8; 32],
}

/// The cache file's content.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CacheData {
    pub version: u32,
    /// For a human reading the file: the context and the builder.
    pub context: String,
    pub builder: String,
    pub stats: Vec<StatRecord>,
    /// The manifest the builder's copy was last confirmed to hold.
    pub synced: Option<Manifest>,
    /// The manifest of a sync whose outcome we did not see (the builder
    /// may hold it if the connection broke after it finished).
    pub sent: Option<Manifest>,
}

/// The cache of one copy, and where it lives (`None`: no cache folder).
pub struct LocalCache {
    pub path: Option<PathBuf>,
    pub data: CacheData,
}

/// `$XDG_CACHE_HOME/absconda`, or `~/.cache/absconda`.
pub fn cache_root() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = xdg.or_else(|| {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .map(|h| h.join(".cache"))
    })?;
    Some(base.join("absconda"))
}

/// The name of the installation id's file in the cache folder.
const INSTALLATION_ID_FILE: &str = "installation-id";

/// A random id of this absconda installation (32 hex digits), kept in
/// `root/installation-id` and created there on first use. It goes into the
/// copy key beside the machine id, so two machines cloned from one image
/// (one `/etc/machine-id`) never share a copy on a builder. The file is
/// written whole under a temporary name and hard-linked into place, which
/// fails if it exists: two first builds at once agree on one id. Without a
/// cache folder, or when it cannot be written, the id is empty (the key
/// then rests on the machine id alone, as before).
pub fn installation_id(root: Option<&Path>) -> String {
    let Some(root) = root else {
        return String::new();
    };
    let path = root.join(INSTALLATION_ID_FILE);
    let valid = |s: &str| s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if let Ok(text) = std::fs::read_to_string(&path)
        && valid(text.trim())
    {
        return text.trim().to_string();
    }
    let fresh = hex::encode(rand::random::<[u8; 16]>());
    let created = (|| -> std::io::Result<()> {
        std::fs::create_dir_all(root)?;
        let tmp = root.join(format!(
            ".{INSTALLATION_ID_FILE}.{}.{}",
            std::process::id(),
            hex::encode(rand::random::<[u8; 4]>())
        ));
        std::fs::write(&tmp, format!("{fresh}\n"))?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Another absconda created it first, or an invalid file is in
                // the way: replace an invalid one, keep a valid one.
                let existing = std::fs::read_to_string(&path).unwrap_or_default();
                if valid(existing.trim()) {
                    return Ok(());
                }
                let tmp2 = root.join(format!(".{INSTALLATION_ID_FILE}.{}", std::process::id()));
                std::fs::write(&tmp2, format!("{fresh}\n"))?;
                std::fs::rename(&tmp2, &path)
            }
            other => other,
        }
    })();
    if let Err(e) = created {
        debug!("no installation id in `{}`: {e}", root.display());
        return String::new();
    }
    match std::fs::read_to_string(&path) {
        Ok(text) if valid(text.trim()) => text.trim().to_string(),
        _ => String::new(),
    }
}

impl LocalCache {
    /// Loads the cache of copy `key` under `root` (see [`cache_root`]);
    /// anything unreadable counts as empty.
    pub fn load(root: Option<&Path>, key: &str) -> LocalCache {
        let path = root.map(|r| r.join("contexts").join(format!("{key}.json")));
        let data = path
            .as_deref()
            .and_then(|p| match std::fs::read(p) {
                Ok(bytes) => match serde_json::from_slice::<CacheData>(&bytes) {
                    Ok(d) if d.version == VERSION => Some(d),
                    Ok(d) => {
                        debug!(version = d.version, path = %p.display(), "ignoring a sync cache of another version");
                        None
                    }
                    Err(e) => {
                        warn!(path = %p.display(), error = %e, "ignoring an unreadable sync cache");
                        None
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    warn!(path = %p.display(), error = %e, "cannot read the sync cache");
                    None
                }
            })
            .unwrap_or_default();
        LocalCache { path, data }
    }

    /// Writes the cache atomically. Failing to is not an error for the
    /// build (the next one sends more), so it is only logged.
    pub fn save(&mut self) {
        self.data.version = VERSION;
        let Some(path) = &self.path else {
            return;
        };
        if let Err(e) = write_atomically(path, &self.data) {
            warn!(path = %path.display(), error = %e, "cannot write the sync cache; the next build may send more than needed");
        }
    }

    /// The manifest the builder says it holds, if we know it.
    pub fn manifest_with_hash(&self, hash: &str) -> Option<&Manifest> {
        [self.data.synced.as_ref(), self.data.sent.as_ref()]
            .into_iter()
            .flatten()
            .find(|m| m.hash() == hash)
    }
}

fn write_atomically(path: &Path, data: &CacheData) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("cache"),
        std::process::id()
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(&mut file);
        serde_json::to_writer(&mut w, data)?;
        w.flush()?;
        drop(w);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Where the content of a manifest entry comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A walked file, folder or symlink (or a file added from elsewhere).
    Entry(Entry),
    /// A file that exists only in memory.
    Extra(ExtraFile),
    /// A parent folder of an added file that the walk did not list.
    Parent,
}

/// A scanned context: its manifest, and for each entry where it comes from.
pub struct Scanned {
    pub manifest: Manifest,
    /// Aligned with `manifest.entries`.
    pub sources: Vec<Source>,
    /// Stat records to remember for the next scan.
    pub stats: Vec<StatRecord>,
    pub hashed_files: u64,
    pub hashed_bytes: u64,
}

impl Scanned {
    /// The tar inputs for the entries at `indices` (in manifest order).
    pub fn tar_inputs(&self, indices: &[usize]) -> (Vec<Entry>, Vec<ExtraFile>) {
        let mut entries = Vec::new();
        let mut extra = Vec::new();
        for &i in indices {
            match &self.sources[i] {
                Source::Entry(e) => entries.push(e.clone()),
                Source::Extra(x) => extra.push(x.clone()),
                Source::Parent => {
                    let m = &self.manifest.entries[i];
                    entries.push(Entry {
                        rel: m.path.clone(),
                        abs: PathBuf::new(),
                        kind: EntryKind::Dir,
                        mode: m.mode,
                        mtime: 0,
                        mtime_nsec: 0,
                        ino: 0,
                        dev: 0,
                    });
                }
            }
        }
        (entries, extra)
    }
}

/// Builds the manifest of `entries` and `extra`, hashing only the files
/// whose stat fingerprint is not in `previous`. Blocking: run it on a
/// blocking thread.
pub fn scan(
    entries: Vec<Entry>,
    extra: Vec<ExtraFile>,
    previous: &[StatRecord],
) -> Result<Scanned, ContextError> {
    scan_at(entries, extra, previous, SystemTime::now())
}

/// [`scan`] as if it ran at `now` (which decides what is racy).
fn scan_at(
    entries: Vec<Entry>,
    extra: Vec<ExtraFile>,
    previous: &[StatRecord],
    now: SystemTime,
) -> Result<Scanned, ContextError> {
    let started = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let known: HashMap<&str, &StatRecord> = previous.iter().map(|r| (r.path.as_str(), r)).collect();

    let mut rows: Vec<(ManifestEntry, Source)> = Vec::with_capacity(entries.len() + extra.len());
    let mut stats = Vec::new();
    // Files to hash: (row index, stat record without its hash yet).
    let mut to_hash: Vec<(usize, StatRecord, bool)> = Vec::new();
    for entry in entries {
        let mode = entry.mode & 0o7777;
        let kind = match &entry.kind {
            EntryKind::Dir => Kind::Dir,
            EntryKind::Symlink { target } => {
                use std::os::unix::ffi::OsStrExt;
                Kind::Symlink {
                    target: target.as_os_str().as_bytes().to_vec(),
                }
            }
            EntryKind::File { size } => {
                let md = std::fs::symlink_metadata(&entry.abs).map_err(|source| {
                    ContextError::Unreadable {
                        path: entry.abs.clone(),
                        source,
                    }
                })?;
                let record = StatRecord {
                    path: entry.rel.clone(),
                    size: *size,
                    mtime: entry.mtime,
                    mtime_nsec: entry.mtime_nsec,
                    ctime: md.ctime(),
                    ctime_nsec: u32::try_from(md.ctime_nsec()).unwrap_or(0),
                    ino: entry.ino,
                    dev: entry.dev,
                    sha256: [0; 32],
                };
                let racy = secs(record.mtime, record.mtime_nsec) > started - RACY_SECONDS
                    || secs(record.ctime, record.ctime_nsec) > started - RACY_SECONDS;
                let cached = known.get(entry.rel.as_str()).filter(|r| {
                    let mut r = (**r).clone();
                    r.sha256 = [0; 32];
                    r == record
                });
                let sha256 = match cached {
                    Some(r) => {
                        if !racy {
                            stats.push((*r).clone());
                        }
                        r.sha256
                    }
                    None => {
                        to_hash.push((rows.len(), record, racy));
                        [0; 32]
                    }
                };
                Kind::File {
                    size: *size,
                    mtime: u64::try_from(entry.mtime).unwrap_or(0),
                    sha256,
                }
            }
        };
        rows.push((
            ManifestEntry {
                path: entry.rel.clone(),
                mode,
                kind,
            },
            Source::Entry(entry),
        ));
    }
    for file in extra {
        rows.push((
            ManifestEntry {
                path: file.name.clone(),
                mode: file.mode & 0o7777,
                kind: Kind::File {
                    size: file.data.len() as u64,
                    mtime: 0,
                    sha256: Sha256::digest(&file.data).into(),
                },
            },
            Source::Extra(file),
        ));
    }

    let paths: Vec<PathBuf> = to_hash
        .iter()
        .map(|(row, _, _)| match &rows[*row].1 {
            Source::Entry(e) => e.abs.clone(),
            _ => PathBuf::new(),
        })
        .collect();
    let threads = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
    let digests = sha256_files(&paths, threads);
    let mut hashed_bytes = 0;
    for ((row, mut record, racy), (digest, path)) in
        to_hash.into_iter().zip(digests.into_iter().zip(&paths))
    {
        let digest = digest.map_err(|source| ContextError::Unreadable {
            path: path.clone(),
            source,
        })?;
        hashed_bytes += record.size;
        if let Kind::File { sha256, .. } = &mut rows[row].0.kind {
            *sha256 = digest;
        }
        if !racy {
            record.sha256 = digest;
            stats.push(record);
        }
    }
    let hashed_files = paths.len() as u64;

    // Parents that nothing listed (files added under a new folder name).
    let mut present: std::collections::HashSet<String> =
        rows.iter().map(|(m, _)| m.path.clone()).collect();
    let mut parents = Vec::new();
    for (m, _) in &rows {
        for (i, _) in m.path.match_indices('/') {
            let parent = &m.path[..i];
            if present.insert(parent.to_string()) {
                parents.push(parent.to_string());
            }
        }
    }
    for path in parents {
        rows.push((
            ManifestEntry {
                path,
                mode: 0o755,
                kind: Kind::Dir,
            },
            Source::Parent,
        ));
    }

    rows.sort_unstable_by(|a, b| a.0.path.cmp(&b.0.path));
    if let Some(w) = rows.windows(2).find(|w| w[0].0.path == w[1].0.path) {
        return Err(ContextError::DuplicateName {
            name: w[0].0.path.clone(),
        });
    }
    stats.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    let (entries, sources): (Vec<_>, Vec<_>) = rows.into_iter().unzip();
    debug!(
        entries = entries.len(),
        hashed_files, hashed_bytes, "scanned the context for the sync"
    );
    Ok(Scanned {
        manifest: Manifest { entries },
        sources,
        stats,
        hashed_files,
        hashed_bytes,
    })
}

fn secs(s: i64, ns: u32) -> f64 {
    s as f64 + f64::from(ns) / 1e9
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_installation_id_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("absconda");
        let ids: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| super::installation_id(Some(&root))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(ids[0].len(), 32, "{ids:?}");
        assert!(ids.iter().all(|id| id == &ids[0]), "{ids:?}");
        assert_eq!(super::installation_id(Some(&root)), ids[0]);
        let on_disk = std::fs::read_to_string(root.join("installation-id")).unwrap();
        assert_eq!(on_disk.trim(), ids[0]);
        // Nothing else is left in the folder.
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 1);
        // Another cache folder, another id.
        let other = dir.path().join("other");
        assert_ne!(super::installation_id(Some(&other)), ids[0]);
        // A damaged file is replaced.
        std::fs::write(root.join("installation-id"), "junk").unwrap();
        let fresh = super::installation_id(Some(&root));
        assert_eq!(fresh.len(), 32);
        assert_ne!(fresh, ids[0]);
        assert_eq!(super::installation_id(None), "");
    }

    use super::*;
    use crate::context::{DockerIgnore, walk};

    fn scan_dir(dir: &Path, previous: &[StatRecord], later: u64) -> Scanned {
        let entries = walk(dir, &DockerIgnore::parse(""), &[]).unwrap();
        let now = SystemTime::now() + std::time::Duration::from_secs(later);
        scan_at(entries, Vec::new(), previous, now).unwrap()
    }

    fn sha_of(s: &Scanned, path: &str) -> [u8; 32] {
        match s
            .manifest
            .entries
            .iter()
            .find(|e| e.path == path)
            .unwrap()
            .kind
        {
            Kind::File { sha256, .. } => sha256,
            _ => panic!("{path} is not a file"),
        }
    }

    #[test]
    fn rehashes_only_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, "one").unwrap();
        std::fs::write(dir.path().join("b"), "two").unwrap();

        let racy = scan_dir(dir.path(), &[], 0);
        assert_eq!(racy.hashed_files, 2);
        assert!(
            racy.stats.is_empty(),
            "just-written files are not remembered"
        );

        let first = scan_dir(dir.path(), &[], 10);
        assert_eq!(first.stats.len(), 2);
        let again = scan_dir(dir.path(), &first.stats, 10);
        assert_eq!(again.hashed_files, 0);
        assert_eq!(sha_of(&again, "a"), sha_of(&first, "a"));

        // Same size, mtime put back: ctime still tells.
        let mtime = std::fs::metadata(&a).unwrap().modified().unwrap();
        std::fs::write(&a, "ONE").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&a)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let third = scan_dir(dir.path(), &first.stats, 10);
        assert_eq!(third.hashed_files, 1);
        assert_eq!(
            sha_of(&third, "a"),
            <[u8; 32]>::from(Sha256::digest(b"ONE"))
        );

        // An mtime that goes backwards with a content change.
        std::fs::write(&a, "uno").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&a)
            .unwrap()
            .set_modified(mtime - std::time::Duration::from_secs(3600))
            .unwrap();
        let fourth = scan_dir(dir.path(), &third.stats, 10);
        assert_eq!(fourth.hashed_files, 1);
        assert_eq!(
            sha_of(&fourth, "a"),
            <[u8; 32]>::from(Sha256::digest(b"uno"))
        );
    }

    #[test]
    fn added_files_get_their_parent_folders() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), "x").unwrap();
        let entry = crate::context::Entry {
            rel: "deep/er/f".into(),
            abs: dir.path().join("f"),
            kind: EntryKind::File { size: 1 },
            mode: 0o644,
            mtime: 1,
            mtime_nsec: 0,
            ino: 1,
            dev: 1,
        };
        let extra = ExtraFile {
            name: "gen/Dockerfile".into(),
            data: b"FROM x\n".to_vec(),
            mode: 0o644,
        };
        let s = scan(vec![entry], vec![extra], &[]).unwrap();
        let paths: Vec<&str> = s.manifest.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["deep", "deep/er", "deep/er/f", "gen", "gen/Dockerfile"]
        );
        let (entries, extra) = s.tar_inputs(&(0..5).collect::<Vec<_>>());
        assert_eq!(entries.len(), 4);
        assert_eq!(extra.len(), 1);
    }

    #[test]
    fn cache_files_round_trip_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/key.json");
        let mut cache = LocalCache {
            path: Some(path.clone()),
            data: CacheData {
                context: "/ctx".into(),
                synced: Some(Manifest::default()),
                ..CacheData::default()
            },
        };
        cache.save();
        let back: CacheData = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back.version, VERSION);
        assert_eq!(back.context, "/ctx");
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
        assert!(
            cache
                .manifest_with_hash(&Manifest::default().hash())
                .is_some()
        );
    }
}
