//! The walk over the context folder: the exact list of entries Docker would
//! put in the build context, in a deterministic order.
//!
//! It follows Docker's walkers (buildkit's fsutil `filterFS.Walk`): each path
//! is matched with its parent directory's per-pattern results; an excluded
//! directory is entered only when an exception (`!pattern`) could re-include
//! something below it, and it is then listed only if something inside it is
//! (so `dir/` arrives as a directory only as needed). Unlike fsutil we decide
//! "could re-include" per pattern and per directory instead of entering every
//! excluded directory as soon as one exception has a wildcard, so a huge
//! ignored `node_modules` is not read because of `!**/*.go` elsewhere when no
//! pattern can reach into it; the result is the same, only faster. (The
//! classic builder's walker enters an excluded folder only for an exception
//! that starts with its literal path, so it can send less than BuildKit; we
//! send what BuildKit sends, and the builder's Docker applies the ignore file
//! again in any case.)
//!
//! Symlinks are listed as symlinks (with their target, even one outside the
//! context) and never followed; sockets, fifos and devices are skipped with
//! a warning; every file that is sent is opened once here, as `docker build`
//! does, so an unreadable file fails before any byte goes over the network.
//! The result is sorted by the bytes of the relative path, which puts every
//! directory before its contents and lets an incremental sync merge two walks
//! in one pass; size, mtime, inode and device are kept for that sync's cache.

use std::borrow::Cow;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use super::ContextError;
use super::ignore::{DockerIgnore, MatchInfo, go_clean};

/// What an entry is. Directories carry no size; symlinks carry their target
/// exactly as stored (possibly absolute or pointing outside the context).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    File { size: u64 },
    Dir,
    Symlink { target: PathBuf },
}

/// One file, directory or symlink of the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the context, `/`-separated, no leading or trailing
    /// `/`; any UTF-8 (spaces, quotes, newlines...) is kept byte for byte.
    pub rel: String,
    /// Where to read it on this machine.
    pub abs: PathBuf,
    pub kind: EntryKind,
    /// Permission bits, including setuid/setgid/sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub ino: u64,
    pub dev: u64,
}

impl Entry {
    /// Content size for files, 0 otherwise.
    pub fn size(&self) -> u64 {
        match self.kind {
            EntryKind::File { size } => size,
            _ => 0,
        }
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.kind, EntryKind::Dir)
    }
}

/// Lists the context folder as Docker would send it. `always_include` names
/// context-relative paths (the Dockerfile, the ignore file) that are sent even
/// when `.dockerignore` excludes them; those that do not exist, or lie outside
/// the context, are skipped.
pub fn walk(
    context_dir: &Path,
    ignore: &DockerIgnore,
    always_include: &[&str],
) -> Result<Vec<Entry>, ContextError> {
    walk_counting(context_dir, ignore, always_include).map(|(entries, _)| entries)
}

/// The walk, plus the number of directories it had to read (tests use it to
/// show that ignored trees are not entered).
pub(crate) fn walk_counting(
    context_dir: &Path,
    ignore: &DockerIgnore,
    always_include: &[&str],
) -> Result<(Vec<Entry>, usize), ContextError> {
    let meta = fs::metadata(context_dir).map_err(|source| ContextError::Stat {
        path: context_dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(ContextError::NotADirectory {
            path: context_dir.to_path_buf(),
        });
    }
    let mut always: Vec<String> = always_include
        .iter()
        .map(|p| go_clean(p.trim_start_matches('/')))
        .filter(|p| p != "." && p != ".." && !p.starts_with("../"))
        .collect();
    always.sort();
    always.dedup();

    let mut walker = Walker {
        ignore,
        always,
        entries: Vec::new(),
        pending: Vec::new(),
        dirs_read: 0,
    };
    let mut stack = vec![DirTask {
        abs: context_dir.to_path_buf(),
        rel: String::new(),
        info: MatchInfo::default(),
        pending: None,
        lossy: false,
        excluded: false,
    }];
    while let Some(task) = stack.pop() {
        walker.read_dir(task, &mut stack)?;
    }
    let Walker {
        mut entries,
        dirs_read,
        ..
    } = walker;
    entries.sort_unstable_by(|a, b| a.rel.cmp(&b.rel));
    debug!(
        entries = entries.len(),
        dirs_read,
        context = %context_dir.display(),
        "walked the build context"
    );
    Ok((entries, dirs_read))
}

/// A directory still to be read.
struct DirTask {
    abs: PathBuf,
    rel: String,
    /// The directory's own per-pattern match results, for its children.
    info: MatchInfo,
    /// Nearest excluded ancestor (this directory included) not listed yet;
    /// it is listed as soon as something below it is.
    pending: Option<usize>,
    /// Some component of the path is not UTF-8.
    lossy: bool,
    excluded: bool,
}

/// An excluded directory that was entered anyway, waiting to be listed.
struct Pending {
    entry: Option<Entry>,
    parent: Option<usize>,
}

struct Walker<'a> {
    ignore: &'a DockerIgnore,
    always: Vec<String>,
    entries: Vec<Entry>,
    pending: Vec<Pending>,
    dirs_read: usize,
}

impl Walker<'_> {
    fn read_dir(&mut self, task: DirTask, stack: &mut Vec<DirTask>) -> Result<(), ContextError> {
        let read = match fs::read_dir(&task.abs) {
            Ok(read) => read,
            // Docker ignores what it cannot read inside an excluded folder,
            // and a folder removed while we walk is simply gone.
            Err(e) if task.excluded && e.kind() == io::ErrorKind::PermissionDenied => {
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && !task.rel.is_empty() => {
                return Ok(());
            }
            Err(source) => {
                return Err(ContextError::ReadDir {
                    path: task.abs,
                    source,
                });
            }
        };
        self.dirs_read += 1;
        for dirent in read {
            let dirent = dirent.map_err(|source| ContextError::ReadDir {
                path: task.abs.clone(),
                source,
            })?;
            let name = dirent.file_name();
            let (name_str, lossy) = match name.to_str() {
                Some(s) => (Cow::Borrowed(s), task.lossy),
                None => (name.to_string_lossy(), true),
            };
            let rel = if task.rel.is_empty() {
                name_str.into_owned()
            } else {
                format!("{}/{}", task.rel, name_str)
            };
            let abs = task.abs.join(&name);
            let file_type = match dirent.file_type() {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(ContextError::Stat { path: abs, source }),
            };

            let (excluded, info) = self.ignore.evaluate(&rel, &task.info);
            // Below a directory entered for an exception, Docker 20.10 keeps
            // some paths that today's Docker leaves out (see ignore.rs).
            let kept_by_old_docker =
                excluded && task.excluded && self.ignore.kept_by_docker_20_10(&rel);
            let forced = self.always.binary_search(&rel).is_ok()
                || (kept_by_old_docker && !file_type.is_dir());

            if excluded && !forced {
                if file_type.is_dir() && (self.must_enter(&rel) || kept_by_old_docker) {
                    // Entered for an exception; listed only if needed.
                    let Ok(meta) = dirent.metadata() else {
                        continue;
                    };
                    let entry = make_entry(rel.clone(), abs.clone(), &meta, EntryKind::Dir);
                    self.pending.push(Pending {
                        entry: Some(entry),
                        parent: task.pending,
                    });
                    stack.push(DirTask {
                        abs,
                        rel,
                        info,
                        pending: Some(self.pending.len() - 1),
                        lossy,
                        excluded: true,
                    });
                }
                continue;
            }

            if file_type.is_socket()
                || file_type.is_fifo()
                || file_type.is_block_device()
                || file_type.is_char_device()
            {
                warn!(path = %abs.display(), "skipping a socket, fifo or device file in the build context");
                continue;
            }
            if lossy {
                return Err(ContextError::NonUtf8Name { path: abs });
            }
            let meta = match dirent.metadata() {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(ContextError::Stat { path: abs, source }),
            };
            let kind = if file_type.is_dir() {
                EntryKind::Dir
            } else if file_type.is_symlink() {
                let target = fs::read_link(&abs).map_err(|source| ContextError::ReadLink {
                    path: abs.clone(),
                    source,
                })?;
                EntryKind::Symlink { target }
            } else {
                // Fail now rather than halfway through the upload.
                if let Err(source) = fs::File::open(&abs) {
                    return Err(ContextError::Unreadable { path: abs, source });
                }
                EntryKind::File { size: meta.len() }
            };
            let is_dir = kind == EntryKind::Dir;
            self.flush_pending(task.pending);
            self.entries
                .push(make_entry(rel.clone(), abs.clone(), &meta, kind));
            if is_dir {
                stack.push(DirTask {
                    abs,
                    rel,
                    info,
                    pending: None,
                    lossy: false,
                    excluded: false,
                });
            }
        }
        Ok(())
    }

    /// Whether an excluded directory may hold something that is sent anyway:
    /// a path re-included by an exception, or an `always_include` path.
    fn must_enter(&self, dir: &str) -> bool {
        self.ignore.exceptions_may_match_below(dir)
            || self.always.iter().any(|a| {
                a.len() > dir.len() && a.starts_with(dir) && a.as_bytes()[dir.len()] == b'/'
            })
    }

    /// Lists the excluded ancestors that were waiting for a child.
    fn flush_pending(&mut self, mut slot: Option<usize>) {
        while let Some(index) = slot {
            let pending = &mut self.pending[index];
            let Some(entry) = pending.entry.take() else {
                // Already listed, and so are its ancestors.
                break;
            };
            self.entries.push(entry);
            slot = pending.parent;
        }
    }
}

fn make_entry(rel: String, abs: PathBuf, meta: &Metadata, kind: EntryKind) -> Entry {
    Entry {
        rel,
        abs,
        kind,
        mode: meta.mode() & 0o7777,
        mtime: meta.mtime(),
        mtime_nsec: u32::try_from(meta.mtime_nsec()).unwrap_or(0),
        ino: meta.ino(),
        dev: meta.dev(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn touch(root: &Path, rel: &str, content: &str) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    fn rels(entries: &[Entry]) -> Vec<&str> {
        entries.iter().map(|e| e.rel.as_str()).collect()
    }

    fn run(root: &Path, ignore: &str, always: &[&str]) -> (Vec<Entry>, usize) {
        walk_counting(root, &DockerIgnore::parse(ignore), always).unwrap()
    }

    #[test]
    fn lists_everything_sorted_with_kinds_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(root, "a.txt", "hello");
        touch(root, "a/b/c.txt", "deep");
        fs::create_dir_all(root.join("empty")).unwrap();
        fs::set_permissions(root.join("a.txt"), fs::Permissions::from_mode(0o640)).unwrap();
        touch(root, "run.sh", "#!/bin/sh\n");
        fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        symlink("/etc/passwd", root.join("outside")).unwrap();
        symlink("a", root.join("link-to-dir")).unwrap();
        symlink("../../..", root.join("a/b/up")).unwrap();

        let (entries, _) = run(root, "", &[]);
        assert_eq!(
            rels(&entries),
            [
                "a",
                "a.txt",
                "a/b",
                "a/b/c.txt",
                "a/b/up",
                "empty",
                "link-to-dir",
                "outside",
                "run.sh"
            ]
        );
        let by = |rel: &str| entries.iter().find(|e| e.rel == rel).unwrap();
        assert_eq!(by("a.txt").kind, EntryKind::File { size: 5 });
        assert_eq!(by("a.txt").mode, 0o640);
        assert_eq!(by("run.sh").mode, 0o755);
        assert_eq!(by("empty").kind, EntryKind::Dir);
        // Symlinks are links, never followed, even out of the context.
        assert_eq!(
            by("outside").kind,
            EntryKind::Symlink {
                target: "/etc/passwd".into()
            }
        );
        assert_eq!(
            by("link-to-dir").kind,
            EntryKind::Symlink { target: "a".into() }
        );
        assert_eq!(
            by("a/b/up").kind,
            EntryKind::Symlink {
                target: "../../..".into()
            }
        );
        assert_eq!(by("a/b/c.txt").abs, root.join("a/b/c.txt"));
        assert!(by("a.txt").ino != 0 && by("a.txt").mtime > 0);
    }

    #[test]
    fn special_names_round_trip_and_special_files_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let names = [
            "with space",
            "quote'\"s",
            "$(echo pwned);x",
            "new\nline",
            "caf\u{e9} \u{1f600}",
            "back\\slash",
            "-dash",
            "tab\there",
        ];
        for name in names {
            touch(root, &format!("{name}/{name}"), name);
        }
        let _socket = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
        let (entries, _) = run(root, "", &[]);
        let mut want: Vec<String> = names
            .iter()
            .flat_map(|n| [n.to_string(), format!("{n}/{n}")])
            .collect();
        want.sort();
        assert_eq!(rels(&entries), want);
        for e in &entries {
            assert_eq!(e.abs, root.join(&e.rel));
        }
    }

    #[test]
    fn excluded_dirs_are_not_entered_without_an_exception() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for i in 0..50 {
            touch(root, &format!("node_modules/pkg{i}/index.js"), "x");
        }
        touch(root, "src/main.rs", "fn main() {}");
        touch(root, "src/keep/x.rs", "");

        // Three directories read: the root, src and src/keep.
        let (entries, dirs_read) = run(root, "node_modules", &[]);
        assert_eq!(
            rels(&entries),
            ["src", "src/keep", "src/keep/x.rs", "src/main.rs"]
        );
        assert_eq!(dirs_read, 3);

        // Exceptions that cannot reach into node_modules do not open it,
        // even with wildcards (fsutil would walk all of it here).
        let (_, dirs_read) = run(root, "node_modules\n!src/*.rs\n!*.md", &[]);
        assert_eq!(dirs_read, 3);

        // An exception inside it: entered, and only what is needed is sent.
        let (entries, dirs_read) = run(root, "node_modules\n!node_modules/pkg7/index.js", &[]);
        assert_eq!(
            rels(&entries),
            [
                "node_modules",
                "node_modules/pkg7",
                "node_modules/pkg7/index.js",
                "src",
                "src/keep",
                "src/keep/x.rs",
                "src/main.rs"
            ]
        );
        // The root, src, src/keep, node_modules and node_modules/pkg7 only.
        assert_eq!(dirs_read, 5);

        // An exception that matches nothing below: entered, nothing listed.
        let (entries, _) = run(root, "node_modules\n!node_modules/none", &[]);
        assert_eq!(
            rels(&entries),
            ["src", "src/keep", "src/keep/x.rs", "src/main.rs"]
        );

        // `**` exceptions reach everywhere.
        let (entries, _) = run(root, "*\n!**/index.js", &[]);
        assert_eq!(
            entries
                .iter()
                .filter(|e| e.rel.ends_with("index.js"))
                .count(),
            50
        );
        assert!(!rels(&entries).contains(&"src/main.rs"));
        assert!(rels(&entries).contains(&"node_modules"));

        // Docker's walkers do not evaluate a pattern on a directory when it
        // cannot change that directory's verdict (`**/pkg1*` while `*` already
        // excludes `node_modules/pkg1`), and record "no match" for it, so it
        // does not re-exclude `node_modules/pkg1/index.js`. The builder's
        // Docker keeps those files, so they must be sent.
        let (entries, _) = run(root, "*\n!**/index.js\n**/pkg1*", &[]);
        assert_eq!(
            entries
                .iter()
                .filter(|e| e.rel.ends_with("index.js"))
                .count(),
            50
        );
    }

    /// Below `node_modules`, entered for the exception, Docker 20.10 keeps
    /// what `**/node_modules` no longer reaches at its depth: sent too.
    #[test]
    fn what_docker_20_10_keeps_below_an_entered_directory_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for rel in [
            "node_modules/pkg/README.md",
            "node_modules/pkg/index.js",
            "node_modules/other/index.js",
            "node_modules/top.js",
            "src/node_modules/x.js",
            "src/main.rs",
        ] {
            touch(root, rel, rel);
        }
        let (entries, _) = run(root, "**/node_modules\n!node_modules/pkg/README.md\n", &[]);
        assert_eq!(
            rels(&entries)
                .into_iter()
                .filter(|r| !r.ends_with("node_modules")
                    && !r.ends_with("pkg")
                    && !r.ends_with("other")
                    && *r != "src")
                .collect::<Vec<_>>(),
            [
                "node_modules/other/index.js",
                "node_modules/pkg/README.md",
                "node_modules/pkg/index.js",
                "node_modules/top.js",
                "src/main.rs"
            ]
        );
        let ignore = DockerIgnore::parse("**/node_modules\n!node_modules/pkg/README.md\n");
        assert!(ignore.kept_by_docker_20_10("node_modules/pkg/index.js"));
        assert!(ignore.kept_by_docker_20_10("node_modules/top.js"));
        assert!(!ignore.kept_by_docker_20_10("src/node_modules/x.js"));
        assert!(ignore.is_excluded("node_modules/pkg/index.js"));
    }

    #[test]
    fn dockerignore_rules_in_a_real_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for rel in [
            "README.md",
            "docs/guide.md",
            "docs/keep.md",
            "keep.md",
            "build/out.o",
            "build/keep/me.txt",
            "secret.env",
            "sub/secret.env",
        ] {
            touch(root, rel, rel);
        }
        let ignore = "# comment\n*.md\n!keep.md\n/build\n!build/keep\n*.env\n";
        let (entries, _) = run(root, ignore, &[]);
        assert_eq!(
            rels(&entries),
            [
                "build",
                "build/keep",
                "build/keep/me.txt",
                "docs",
                "docs/guide.md",
                "docs/keep.md",
                "keep.md",
                "sub",
                "sub/secret.env"
            ]
        );
        let ignore = DockerIgnore::parse(ignore);
        for e in &entries {
            assert!(!ignore.is_excluded(&e.rel) || e.is_dir(), "{}", e.rel);
        }
    }

    #[test]
    fn always_include_beats_dockerignore() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(root, "Dockerfile", "FROM scratch");
        touch(root, ".dockerignore", "*");
        touch(root, "app.txt", "");
        touch(root, "build/ci/Dockerfile", "FROM scratch");
        touch(root, "build/ci/other", "");
        let (entries, _) = run(
            root,
            "*",
            &[
                "Dockerfile",
                "./.dockerignore",
                "build/ci/Dockerfile",
                "missing",
                "../x",
            ],
        );
        assert_eq!(
            rels(&entries),
            [
                ".dockerignore",
                "Dockerfile",
                "build",
                "build/ci",
                "build/ci/Dockerfile"
            ]
        );
    }

    #[test]
    fn non_utf8_names_fail_only_when_sent() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let bad = std::ffi::OsStr::from_bytes(b"bad\xffname");
        fs::write(root.join(bad), "x").unwrap();
        touch(root, "ok", "");
        let err = walk(root, &DockerIgnore::default(), &[]).unwrap_err();
        assert!(matches!(err, ContextError::NonUtf8Name { ref path } if path == &root.join(bad)));
        let (entries, _) = run(root, "bad*", &[]);
        assert_eq!(rels(&entries), ["ok"]);
    }

    #[test]
    fn missing_context_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = walk(&missing, &DockerIgnore::default(), &[]).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        touch(dir.path(), "file", "");
        let err = walk(&dir.path().join("file"), &DockerIgnore::default(), &[]).unwrap_err();
        assert!(matches!(err, ContextError::NotADirectory { .. }));
    }

    #[test]
    fn unreadable_file_names_the_path() {
        // Root reads everything: as root, run this very test again as
        // `nobody` (uid 65534), which must pass.
        if effective_uid() == 0 {
            use std::os::unix::process::CommandExt;
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "context::walk::tests::unreadable_file_names_the_path",
                    "--test-threads=1",
                ])
                .env("TMPDIR", "/tmp")
                .current_dir("/")
                .uid(65534)
                .gid(65534)
                .output()
                .expect("run the test binary as nobody");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "as nobody: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        touch(dir.path(), "locked", "x");
        fs::set_permissions(dir.path().join("locked"), fs::Permissions::from_mode(0o000)).unwrap();
        let err = walk(dir.path(), &DockerIgnore::default(), &[]).unwrap_err();
        assert!(err.to_string().contains("locked"), "{err}");
    }

    fn effective_uid() -> u32 {
        fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0)
    }
}
