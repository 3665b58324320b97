//! The state file: what absconda knows about each builder between runs.
//!
//! `$XDG_DATA_HOME/absconda/remote-state.json` (default
//! `~/.local/share/absconda/`), versioned JSON. Every change is
//! read-modify-write under an exclusive lock on a sibling `.lock` file (with
//! a timeout), written to a temporary file, fsynced and renamed over the old
//! one — so concurrent absconda processes never lose an update and a crash
//! never leaves half a file. A file from a newer absconda is refused; a
//! corrupt one is moved aside and named in the error, never silently reset.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The schema version this absconda writes.
pub const VERSION: u32 = 1;
/// How many builds each builder's history keeps.
pub const HISTORY_LIMIT: usize = 200;
/// How long to wait for another absconda holding the lock.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("could not read or write the state file `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the state file `{}` was locked by another absconda for more than {}s", path.display(), LOCK_TIMEOUT.as_secs())]
    LockTimeout { path: PathBuf },
    #[error("the state file `{}` has schema version {found}, newer than this absconda understands ({VERSION}); upgrade absconda", path.display())]
    Newer { path: PathBuf, found: u32 },
    #[error("the state file `{}` was corrupt; it was moved to `{}` (nothing was deleted): {message}", path.display(), kept.display())]
    Corrupt {
        path: PathBuf,
        kept: PathBuf,
        message: String,
    },
}

/// One finished (or failed) build, for `remote metrics`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BuildRecord {
    pub started_at: DateTime<Utc>,
    pub seconds: f64,
    /// `success`, `failed`, `interrupted`, …
    pub outcome: String,
    pub bytes_sent: u64,
    #[serde(default)]
    pub phases: BTreeMap<String, f64>,
    /// Seconds the VM ran because of this build (start to stop), when absconda stopped it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_seconds: Option<f64>,
    /// The pool the build was sent to, when it named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// For a pool: how long the build waited for a free builder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_seconds: Option<f64>,
}

/// What absconda last knew about one builder.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BuilderState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioned_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<DateTime<Utc>>,
    #[serde(default)]
    pub builds_count: u64,
    /// Terraform outputs of a provisioned builder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_user: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_key_fingerprints: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terraform_dir: Option<PathBuf>,
    /// When absconda last started the VM (for VM-seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub vm_seconds: f64,
    #[serde(default)]
    pub history: VecDeque<BuildRecord>,
}

impl BuilderState {
    pub fn record_build(&mut self, record: BuildRecord) {
        self.builds_count += 1;
        self.last_used = Some(Utc::now());
        self.history.push_back(record);
        while self.history.len() > HISTORY_LIMIT {
            self.history.pop_front();
        }
    }

    pub fn set_status(&mut self, status: &str, address: Option<&str>) {
        self.status = Some(status.to_string());
        if let Some(a) = address {
            self.address = Some(a.to_string());
        }
        self.status_at = Some(Utc::now());
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub version: u32,
    #[serde(default)]
    pub builders: BTreeMap<String, BuilderState>,
}

impl Default for State {
    fn default() -> Self {
        State {
            version: VERSION,
            builders: BTreeMap::new(),
        }
    }
}

/// The state file at a path.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

/// `$XDG_DATA_HOME/absconda/remote-state.json`.
pub fn default_path() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("absconda").join("remote-state.json")
}

impl StateFile {
    pub fn new(path: PathBuf) -> StateFile {
        StateFile { path }
    }

    pub fn default_location() -> StateFile {
        StateFile::new(default_path())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> StateError {
        StateError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Reads the current state (a missing file is an empty state).
    pub fn load(&self) -> Result<State, StateError> {
        let _lock = self.lock(false)?;
        self.read()
    }

    /// Applies `f` to the state and writes the result atomically, under the lock.
    pub fn update<T>(&self, f: impl FnOnce(&mut State) -> T) -> Result<T, StateError> {
        let _lock = self.lock(true)?;
        let mut state = self.read()?;
        let out = f(&mut state);
        state.version = VERSION;
        self.write(&state)?;
        Ok(out)
    }

    fn lock(&self, exclusive: bool) -> Result<File, StateError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(|e| self.io(e))?;
        let mut lock_path = self.path.clone().into_os_string();
        lock_path.push(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| self.io(e))?;
        let deadline = Instant::now() + LOCK_TIMEOUT;
        loop {
            let got = if exclusive {
                file.try_lock()
            } else {
                file.try_lock_shared()
            };
            match got {
                Ok(()) => return Ok(file),
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5 + rand::random_range(0..20)));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(StateError::LockTimeout {
                        path: self.path.clone(),
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(self.io(e)),
            }
        }
    }

    fn read(&self) -> Result<State, StateError> {
        let text = match fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => return Err(self.io(e)),
        };
        let value: serde_json::Value = match serde_json::from_slice(&text) {
            Ok(v) => v,
            Err(e) => return Err(self.set_aside(e.to_string())),
        };
        let found = value.get("version").and_then(|v| v.as_u64());
        match found {
            Some(v) if v > u64::from(VERSION) => {
                return Err(StateError::Newer {
                    path: self.path.clone(),
                    found: v as u32,
                });
            }
            None => return Err(self.set_aside("no `version` field".into())),
            _ => {}
        }
        serde_json::from_value(value).map_err(|e| self.set_aside(e.to_string()))
    }

    fn set_aside(&self, message: String) -> StateError {
        let mut kept = self.path.clone().into_os_string();
        kept.push(format!(
            ".corrupt-{}",
            Utc::now().format("%Y%m%dT%H%M%S%.3f")
        ));
        let kept = PathBuf::from(kept);
        if let Err(e) = fs::rename(&self.path, &kept) {
            return self.io(e);
        }
        StateError::Corrupt {
            path: self.path.clone(),
            kept,
            message,
        }
    }

    fn write(&self, state: &State) -> Result<(), StateError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let data = serde_json::to_vec_pretty(state).map_err(|e| self.io(e.into()))?;
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&data)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            // Make the rename itself durable.
            File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(|e| self.io(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_round_trips_and_bounds_history() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path().join("s/remote-state.json"));
        assert_eq!(f.load().unwrap(), State::default());
        for i in 0..(HISTORY_LIMIT + 5) {
            f.update(|s| {
                s.builders
                    .entry("b".into())
                    .or_default()
                    .record_build(BuildRecord {
                        started_at: Utc::now(),
                        seconds: i as f64,
                        outcome: "success".into(),
                        bytes_sent: 1,
                        phases: BTreeMap::new(),
                        vm_seconds: None,
                        pool: None,
                        queue_seconds: None,
                    })
            })
            .unwrap();
        }
        let s = f.load().unwrap();
        assert_eq!(s.builders["b"].builds_count, (HISTORY_LIMIT + 5) as u64);
        assert_eq!(s.builders["b"].history.len(), HISTORY_LIMIT);
    }

    #[test]
    fn newer_and_corrupt_files_are_refused_not_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("remote-state.json");
        let f = StateFile::new(path.clone());
        fs::write(&path, r#"{"version": 99, "builders": {}}"#).unwrap();
        let e = f.load().unwrap_err();
        assert!(matches!(e, StateError::Newer { found: 99, .. }), "{e}");
        assert!(path.exists(), "a newer file must be left alone");

        fs::write(&path, "{ not json").unwrap();
        let e = f.update(|_| ()).unwrap_err();
        let StateError::Corrupt { kept, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(fs::read_to_string(kept).unwrap(), "{ not json");
        assert!(e.to_string().contains(&kept.display().to_string()));
    }

    /// Migration table: older documents that lack newer fields still load.
    #[test]
    fn reads_minimal_documents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("remote-state.json");
        let cases = [
            (r#"{"version": 1}"#, 0usize),
            (r#"{"version": 1, "builders": {"a": {}}}"#, 1),
            (
                r#"{"version": 1, "builders": {"a": {"status": "running", "builds_count": 3}}}"#,
                1,
            ),
        ];
        for (text, n) in cases {
            fs::write(&path, text).unwrap();
            let s = StateFile::new(path.clone()).load().unwrap();
            assert_eq!(s.builders.len(), n, "{text}");
        }
    }
}
