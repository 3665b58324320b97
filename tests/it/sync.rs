//! The incremental context sync against real OpenSSH sshd (and dockerd for
//! whole builds): after every sync the builder's copy equals the local
//! context, byte for byte; interrupted and tampered copies are repaired;
//! an unchanged context costs almost nothing on the wire.
//!
//! The property test is seeded: it prints its seed, and
//! `ABSCONDA_SYNC_SEED=<seed>` replays a failure.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use absconda::build::{BuildRequest, acquire_lease, prepare_context, ssh_target};
use absconda::context::{Compression, DockerIgnore, EntryKind, walk};
use absconda::report::Silent;
use absconda::ssh::Session;
use absconda::sync::{SyncJob, SyncSummary, sync_context};

use crate::support::absconda::{Project, text};
use crate::support::counting_proxy::CountingProxy;
use crate::support::docker::{BASE_IMAGE, docker};
use crate::support::netns::NetNs;
use crate::support::sshd::{SSHD, Sshd};
use crate::support::wait_until;

// ---------------------------------------------------------------------------
// Comparing trees

/// What must be equal between the local context and the builder's copy.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    /// The mtime to the nanosecond: BuildKit trusts it (see `stream.rs`).
    File {
        mode: u32,
        mtime: (i64, i64),
        sha: String,
    },
    Dir {
        mode: u32,
    },
    Link {
        target: PathBuf,
    },
}

fn sha_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The local context as Docker would see it (after `.dockerignore`).
fn local_tree(ctx: &Path) -> BTreeMap<String, Node> {
    let ignore = DockerIgnore::for_context(ctx, &ctx.join("Dockerfile")).unwrap();
    let entries = walk(ctx, &ignore, &[".dockerignore", "Dockerfile"]).unwrap();
    entries
        .into_iter()
        .map(|e| {
            let node = match e.kind {
                // The copy never keeps setuid and setgid bits.
                EntryKind::File { .. } => Node::File {
                    mode: e.mode & 0o1777,
                    mtime: (e.mtime.max(0), i64::from(e.mtime_nsec)),
                    sha: sha_hex(&std::fs::read(&e.abs).unwrap()),
                },
                EntryKind::Dir => Node::Dir {
                    mode: e.mode & 0o1777,
                },
                EntryKind::Symlink { target } => Node::Link { target },
            };
            (e.rel, node)
        })
        .collect()
}

/// The builder's copy, read straight from disk (the builder is this machine).
fn builder_tree(root: &Path) -> BTreeMap<String, Node> {
    fn visit(dir: &Path, rel: &str, out: &mut BTreeMap<String, Node>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let md = entry.path().symlink_metadata().unwrap();
            let node = if md.file_type().is_symlink() {
                Node::Link {
                    target: std::fs::read_link(entry.path()).unwrap(),
                }
            } else if md.is_dir() {
                visit(&entry.path(), &rel, out);
                Node::Dir {
                    mode: md.mode() & 0o7777,
                }
            } else {
                Node::File {
                    mode: md.mode() & 0o7777,
                    mtime: (md.mtime(), md.mtime_nsec()),
                    sha: sha_hex(&std::fs::read(entry.path()).unwrap()),
                }
            };
            out.insert(rel, node);
        }
    }
    let mut out = BTreeMap::new();
    visit(root, "", &mut out);
    out
}

fn assert_same(local: &BTreeMap<String, Node>, remote: &BTreeMap<String, Node>, what: &str) {
    if local == remote {
        return;
    }
    let mut diffs = Vec::new();
    for (k, v) in local {
        match remote.get(k) {
            None => diffs.push(format!("missing on the builder: {k:?} {v:?}")),
            Some(r) if r != v => diffs.push(format!("differs: {k:?} local {v:?} builder {r:?}")),
            _ => {}
        }
    }
    for (k, v) in remote {
        if !local.contains_key(k) {
            diffs.push(format!("extra on the builder: {k:?} {v:?}"));
        }
    }
    panic!("{what}: the builder's copy differs:\n{}", diffs.join("\n"));
}

/// `sha256sum` of every file, run on the builder through SSH (GNU
/// coreutils escapes names with `\` or newline; undone here).
async fn sha256sum_on_builder(session: &Session, tree: &Path) -> BTreeMap<String, String> {
    let cmd = absconda::shell::join([
        "sh",
        "-c",
        "cd \"$1\" && find . -type f -exec sha256sum {} +",
        "x",
        &tree.display().to_string(),
    ]);
    let out = session.output("sha256sum", &cmd, b"").await.unwrap();
    assert!(out.status.success(), "{}", out.stderr_tail());
    let mut sums = BTreeMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let (escaped, line) = match line.strip_prefix('\\') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let (hash, name) = line.split_at(64);
        let name = name.strip_prefix("  ./").unwrap();
        let name = if escaped {
            let mut out = String::new();
            let mut chars = name.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    match chars.next() {
                        Some('n') => out.push('\n'),
                        Some('r') => out.push('\r'),
                        Some('\\') => out.push('\\'),
                        other => panic!("unknown escape {other:?} in {line:?}"),
                    }
                } else {
                    out.push(c);
                }
            }
            out
        } else {
            name.to_string()
        };
        sums.insert(name, hash.to_string());
    }
    sums
}

// ---------------------------------------------------------------------------
// Random edits

const NAMES: &[&str] = &[
    "a",
    "lib",
    "src",
    "with space",
    "ünïcödé",
    "日本語",
    "new\nline",
    "-dash",
    "quote'd",
    "back\\slash",
    "x.tmp",
    "star*",
    "$(echo hi)",
    "tab\there",
    "ignored",
];

struct Editor {
    rng: StdRng,
    root: PathBuf,
    counter: u32,
    log: Vec<String>,
}

impl Editor {
    /// Every path under the root (relative), by kind.
    fn scan(&self) -> (Vec<PathBuf>, Vec<PathBuf>, Vec<PathBuf>) {
        let (mut files, mut dirs, mut links) = (Vec::new(), Vec::new(), Vec::new());
        let mut stack = vec![self.root.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let md = p.symlink_metadata().unwrap();
                let rel = p.strip_prefix(&self.root).unwrap().to_path_buf();
                if rel == Path::new("Dockerfile") || rel == Path::new(".dockerignore") {
                    continue;
                }
                if md.file_type().is_symlink() {
                    links.push(rel);
                } else if md.is_dir() {
                    stack.push(p);
                    dirs.push(rel);
                } else {
                    files.push(rel);
                }
            }
        }
        files.sort();
        dirs.sort();
        links.sort();
        (files, dirs, links)
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            None
        } else {
            Some(items[self.rng.random_range(0..items.len())].clone())
        }
    }

    fn new_name(&mut self) -> String {
        self.counter += 1;
        let base = NAMES[self.rng.random_range(0..NAMES.len())];
        // Often reuse a bare name, so that same-basename folders appear in
        // different places.
        if self.rng.random_bool(0.4) {
            base.to_string()
        } else {
            format!("{base}{}", self.counter)
        }
    }

    /// A new path in a random existing folder (or the root).
    fn new_path(&mut self, dirs: &[PathBuf]) -> PathBuf {
        let parent = if self.rng.random_bool(0.3) {
            PathBuf::new()
        } else {
            self.pick(dirs).unwrap_or_default()
        };
        loop {
            let p = parent.join(self.new_name());
            if self.root.join(&p).symlink_metadata().is_err() {
                return p;
            }
        }
    }

    fn content(&mut self) -> Vec<u8> {
        let len = match self.rng.random_range(0..10) {
            0 => 0,
            1..=6 => self.rng.random_range(1..4000),
            _ => self.rng.random_range(4000..300_000),
        };
        if self.rng.random_bool(0.5) {
            (0..len).map(|_| self.rng.random()).collect()
        } else {
            let line = b"fn main() { println!(\"hi\"); }\n";
            (0..len).map(|i| line[i % line.len()]).collect()
        }
    }

    fn set_mtime(&self, p: &Path, t: SystemTime) {
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    /// One random edit; returns what it did.
    fn edit(&mut self) {
        let (files, dirs, links) = self.scan();
        let op = self.rng.random_range(0..17);
        let r = self.root.clone();
        let what = match op {
            0 | 1 => {
                let p = self.new_path(&dirs);
                let data = self.content();
                std::fs::write(r.join(&p), &data).unwrap();
                format!("create {p:?} ({} bytes)", data.len())
            }
            2 | 3 => match self.pick(&files) {
                Some(p) => {
                    let data = self.content();
                    std::fs::write(r.join(&p), &data).unwrap();
                    format!("edit {p:?}")
                }
                None => "nothing to edit".into(),
            },
            4 => match self.pick(&files) {
                Some(p) => {
                    let old = r.join(&p).metadata().unwrap().modified().unwrap();
                    let data = self.content();
                    std::fs::write(r.join(&p), &data).unwrap();
                    let back = Duration::from_secs(self.rng.random_range(1..1_000_000));
                    self.set_mtime(&r.join(&p), old - back);
                    format!("edit {p:?} with its mtime going back {back:?}")
                }
                None => "nothing to edit".into(),
            },
            5 => match self.pick(&files) {
                Some(p) => {
                    let md = r.join(&p).metadata().unwrap();
                    let mut data = std::fs::read(r.join(&p)).unwrap();
                    if data.is_empty() {
                        return;
                    }
                    let i = self.rng.random_range(0..data.len());
                    data[i] = data[i].wrapping_add(1);
                    std::fs::write(r.join(&p), &data).unwrap();
                    self.set_mtime(&r.join(&p), md.modified().unwrap());
                    format!("edit {p:?} keeping its size and mtime")
                }
                None => "nothing to edit".into(),
            },
            6 => match self.pick(&files) {
                Some(p) => {
                    std::fs::remove_file(r.join(&p)).unwrap();
                    format!("delete {p:?}")
                }
                None => "nothing to delete".into(),
            },
            7 => match self.pick(&dirs) {
                Some(p) => {
                    std::fs::remove_dir_all(r.join(&p)).unwrap();
                    format!("delete folder {p:?}")
                }
                None => "nothing to delete".into(),
            },
            8 => {
                let all: Vec<PathBuf> = files.iter().chain(&dirs).chain(&links).cloned().collect();
                match self.pick(&all) {
                    Some(p) => {
                        let to = self.new_path(&dirs);
                        if to.starts_with(&p) {
                            return;
                        }
                        std::fs::rename(r.join(&p), r.join(&to)).unwrap();
                        format!("rename {p:?} to {to:?}")
                    }
                    None => "nothing to rename".into(),
                }
            }
            9 => {
                let file = self.rng.random_bool(0.6);
                let pool = if file { &files } else { &dirs };
                match self.pick(pool) {
                    Some(p) => {
                        let modes: &[u32] = if file {
                            &[0o644, 0o755, 0o600, 0o700, 0o444, 0o4755, 0o640]
                        } else {
                            &[0o755, 0o700, 0o750, 0o2775, 0o555]
                        };
                        let mode = modes[self.rng.random_range(0..modes.len())];
                        std::fs::set_permissions(r.join(&p), std::fs::Permissions::from_mode(mode))
                            .unwrap();
                        format!("chmod {mode:o} {p:?}")
                    }
                    None => "nothing to chmod".into(),
                }
            }
            10 => {
                let p = self.new_path(&dirs);
                let target = self.link_target(&files);
                symlink(&target, r.join(&p)).unwrap();
                format!("symlink {p:?} -> {target:?}")
            }
            11 => match self.pick(&links) {
                Some(p) => {
                    let target = self.link_target(&files);
                    std::fs::remove_file(r.join(&p)).unwrap();
                    symlink(&target, r.join(&p)).unwrap();
                    format!("retarget {p:?} -> {target:?}")
                }
                None => "no symlink to retarget".into(),
            },
            12 => match self.pick(&files) {
                Some(p) => {
                    std::fs::remove_file(r.join(&p)).unwrap();
                    std::fs::create_dir(r.join(&p)).unwrap();
                    let data = self.content();
                    std::fs::write(r.join(&p).join("inside"), data).unwrap();
                    format!("file {p:?} becomes a folder")
                }
                None => "no file to swap".into(),
            },
            13 => match self.pick(&dirs) {
                Some(p) => {
                    std::fs::remove_dir_all(r.join(&p)).unwrap();
                    let data = self.content();
                    std::fs::write(r.join(&p), data).unwrap();
                    format!("folder {p:?} becomes a file")
                }
                None => "no folder to swap".into(),
            },
            14 => match self.pick(&links) {
                Some(p) => {
                    std::fs::remove_file(r.join(&p)).unwrap();
                    std::fs::write(r.join(&p), b"was a link").unwrap();
                    format!("symlink {p:?} becomes a file")
                }
                None => "no symlink to swap".into(),
            },
            15 => {
                let p = self.new_path(&dirs);
                std::fs::create_dir(r.join(&p)).unwrap();
                format!("empty folder {p:?}")
            }
            _ => {
                let patterns = [
                    "**/*.tmp",
                    "ignored",
                    "**/ignored",
                    "!ignored/keep",
                    "lib/a*",
                ];
                let mut lines: Vec<String> = std::fs::read_to_string(r.join(".dockerignore"))
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_string)
                    .collect();
                let pat = patterns[self.rng.random_range(0..patterns.len())].to_string();
                if let Some(i) = lines.iter().position(|l| *l == pat) {
                    lines.remove(i);
                } else {
                    lines.push(pat.clone());
                }
                std::fs::write(r.join(".dockerignore"), lines.join("\n") + "\n").unwrap();
                format!(".dockerignore toggles {pat:?}")
            }
        };
        self.log.push(what);
    }

    fn link_target(&mut self, files: &[PathBuf]) -> PathBuf {
        match self.rng.random_range(0..4) {
            0 => PathBuf::from("/etc/hostname"),
            1 => PathBuf::from("dangling target"),
            _ => self.pick(files).unwrap_or_else(|| "nothing".into()),
        }
    }
}

// ---------------------------------------------------------------------------
// The property test

fn sshd_only() -> bool {
    crate::support::require(SSHD)
}

/// A builder session with the lease held, for syncing through the library.
struct Bench {
    project: Project,
    builder: absconda::config::Builder,
    session: Session,
    cache: PathBuf,
}

async fn bench(sshd: &Sshd, extra_yaml: &str) -> Bench {
    let project = Project::with_builder(sshd, extra_yaml);
    let file = absconda::config::load(Some(&project.config)).unwrap();
    let builder = file.builder("local").unwrap();
    let target = ssh_target(&builder, builder.host.as_deref().unwrap());
    let session = Session::connect(&target).await.unwrap();
    let cache = project.dir.path().join("cache");
    Bench {
        project,
        builder,
        session,
        cache,
    }
}

impl Bench {
    async fn sync(&self, verify: bool, compression: Compression) -> SyncSummary {
        let ctx = &self.project.context;
        let req = BuildRequest {
            context_dir: Some(ctx.clone()),
            dockerfile: ctx.join("Dockerfile"),
            ..BuildRequest::default()
        };
        let prepared = prepare_context(&req).await.unwrap();
        let job = SyncJob {
            builder: &self.builder,
            run_dir: "",
            identity: absconda::sync::identity(Some(ctx), &[]),
            compression,
            verify,
            cache_root: Some(self.cache.clone()),
        };
        sync_context(
            &self.session,
            &job,
            prepared.entries,
            prepared.extra,
            &Silent,
        )
        .await
        .unwrap()
    }

    fn tree(&self) -> PathBuf {
        let contexts = self.project.workspace.join("contexts");
        let mut copies: Vec<PathBuf> = std::fs::read_dir(&contexts)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(copies.len(), 1, "{copies:?}");
        copies.pop().unwrap().join("tree")
    }

    async fn check(&self, what: &str) {
        let local = local_tree(&self.project.context);
        let tree = self.tree();
        assert_same(&local, &builder_tree(&tree), what);
        let expected: BTreeMap<String, String> = local
            .iter()
            .filter_map(|(k, v)| match v {
                Node::File { sha, .. } => Some((k.clone(), sha.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            sha256sum_on_builder(&self.session, &tree).await,
            expected,
            "{what}: sha256sum on the builder"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_edit_sequences_keep_the_copy_identical() {
    if !sshd_only() {
        return;
    }
    let seed: u64 = std::env::var("ABSCONDA_SYNC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("property test seed: {seed} (replay with ABSCONDA_SYNC_SEED={seed})");
    let sshd = Sshd::start(None);
    let b = bench(&sshd, "").await;
    let ctx = &b.project.context;
    b.project
        .file("Dockerfile", &format!("FROM {BASE_IMAGE}\nCOPY . /ctx/\n"));
    b.project.file(".dockerignore", "**/*.tmp\n");
    let lease = acquire_lease(
        &b.session,
        &b.builder,
        Duration::from_secs(30),
        None,
        &Silent,
    )
    .await
    .unwrap();

    let mut ed = Editor {
        rng: StdRng::seed_from_u64(seed),
        root: ctx.clone(),
        counter: 0,
        log: Vec::new(),
    };
    // A starting tree, then rounds of 0-4 edits, each followed by a sync.
    for _ in 0..25 {
        ed.edit();
    }
    let first = b.sync(false, Compression::None).await;
    assert_eq!(first.mode, "full");
    b.check(&format!("seed {seed}, initial tree")).await;
    let rounds = 40;
    for round in 0..rounds {
        let before = ed.log.len();
        let edits = ed.rng.random_range(0..5);
        for _ in 0..edits {
            ed.edit();
        }
        let verify = ed.rng.random_bool(0.2);
        let compression = if ed.rng.random_bool(0.5) {
            Compression::Gzip
        } else {
            Compression::None
        };
        let s = b.sync(verify, compression).await;
        let what = format!("seed {seed}, round {round}, after {:?}", &ed.log[before..]);
        assert_eq!(s.mode, "delta", "{what}: {s:?}");
        assert!(s.matched, "{what}: {s:?}");
        if ed.log.len() == before {
            assert_eq!(s.entries_sent, 0, "{what}: nothing changed: {s:?}");
            assert!(s.bytes_sent < 4096, "{what}: {s:?}");
        }
        b.check(&what).await;
    }
    assert!(lease.release(Duration::from_secs(10)).await);
}

/// A Dockerfile generated from an environment file has no context folder:
/// its input files (from anywhere on disk) make the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_contexts_sync_their_input_files() {
    if !sshd_only() {
        return;
    }
    let sshd = Sshd::start(None);
    let b = bench(&sshd, "").await;
    let inputs = b.project.dir.path().join("inputs");
    std::fs::create_dir_all(&inputs).unwrap();
    std::fs::write(inputs.join("environment.yaml"), "name: app\n").unwrap();
    std::fs::write(inputs.join("pack.tar.gz"), random_bytes(9, 100_000)).unwrap();
    let extra = vec![
        (
            "environment.yaml".to_string(),
            inputs.join("environment.yaml"),
        ),
        ("pack.tar.gz".to_string(), inputs.join("pack.tar.gz")),
    ];
    let req = BuildRequest {
        context_dir: None,
        generated_dockerfile: Some("FROM scratch\n".into()),
        extra_files: extra.clone(),
        ..BuildRequest::default()
    };
    let sync = |verify| {
        let req = req.clone();
        let b = &b;
        let extra = extra.clone();
        async move {
            let prepared = prepare_context(&req).await.unwrap();
            let job = SyncJob {
                builder: &b.builder,
                run_dir: "",
                identity: absconda::sync::identity(None, &extra),
                compression: Compression::Gzip,
                verify,
                cache_root: Some(b.cache.clone()),
            };
            sync_context(&b.session, &job, prepared.entries, prepared.extra, &Silent)
                .await
                .unwrap()
        }
    };
    let first = sync(false).await;
    assert_eq!((first.mode, first.files_sent), ("full", 2));
    let tree = b.tree();
    assert_eq!(
        std::fs::read(tree.join("pack.tar.gz")).unwrap(),
        random_bytes(9, 100_000)
    );
    assert!(
        !tree.join("Dockerfile").exists(),
        "the Dockerfile goes to the run folder"
    );
    std::fs::write(inputs.join("environment.yaml"), "name: app2\n").unwrap();
    let second = sync(true).await;
    assert_eq!((second.mode, second.files_sent), ("delta", 1), "{second:?}");
    assert_eq!(
        std::fs::read(tree.join("environment.yaml")).unwrap(),
        b"name: app2\n"
    );
}

// ---------------------------------------------------------------------------
// Whole builds through the binary

fn services() -> bool {
    crate::support::require(SSHD) && crate::support::require("dockerd")
}

fn build_json(p: &Project, image: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--tag", "t", "--json"];
    args.extend_from_slice(extra);
    let out = p.build(image, &args);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

fn cat_in_image(image: &str, path: &str) -> Vec<u8> {
    let out = docker().run(&["run", "--rm", "--network", "none", image, "cat", path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random()).collect()
}

fn gzip_len(data: &[u8]) -> u64 {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap().len() as u64
}

fn sync_of(report: &serde_json::Value) -> &serde_json::Value {
    &report["sync"]
}

fn copies(p: &Project) -> Vec<PathBuf> {
    match std::fs::read_dir(p.workspace.join("contexts")) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn an_unchanged_rebuild_sends_almost_nothing_and_one_change_its_compressed_size() {
    if !services() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::with_builder(&sshd, "    compression: gzip\n");
    // Every byte absconda sends to the builder passes this proxy.
    let wire = CountingProxy::start("127.0.0.1:0", ([127, 0, 0, 1], sshd.port).into());
    route_through(&p, &sshd, wire.addr.port());
    let sent_by = |f: &mut dyn FnMut() -> serde_json::Value| {
        let before = wire.up();
        let r = f();
        (r, wire.up() - before)
    };
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nCOPY . /ctx/\n"));
    for i in 0..300 {
        p.file(
            &format!("src/m{}/f{i}.rs", i % 10),
            &format!("fn f{i}() {{}}\n").repeat(20),
        );
    }
    std::fs::write(p.context.join("big.bin"), random_bytes(1, 2 << 20)).unwrap();
    p.file("notes.txt", &"a compressible line of text\n".repeat(40_000));
    let image = "sync/little:t";

    let build = || build_json(&p, "sync/little", &[]);
    let (cold, bytes) = sent_by(&mut || build());
    assert_eq!(sync_of(&cold)["mode"], "full", "{cold}");
    // Not streamed by default: its layers are reused by the builds after.
    assert_eq!(sync_of(&cold)["streamed"], false, "{cold}");
    assert_eq!(
        sync_of(&cold)["reason"],
        "first build of this context on this builder"
    );
    assert!(bytes > 2 << 20, "{bytes} bytes on the wire");

    let (same, bytes) = sent_by(&mut || build());
    assert_eq!(sync_of(&same)["mode"], "delta", "{same}");
    assert!(
        bytes <= 64 * 1024,
        "no-change rebuild sent {bytes} bytes on the wire"
    );
    eprintln!("no-change rebuild: {bytes} bytes on the wire");

    // One compressible file: about its gzip size.
    let notes = "another compressible line\n".repeat(41_000);
    p.file("notes.txt", &notes);
    let (one, bytes) = sent_by(&mut || build());
    let gz = gzip_len(notes.as_bytes());
    assert_eq!(one["files_sent"], 1, "{one}");
    assert!(
        bytes <= gz + 64 * 1024 && bytes >= gz,
        "sent {bytes} bytes on the wire for a file of {gz} bytes gzipped"
    );
    eprintln!("one compressible file ({gz} bytes gzipped): {bytes} bytes on the wire");
    assert_eq!(cat_in_image(image, "/ctx/notes.txt"), notes.as_bytes());

    // One incompressible file.
    let big = random_bytes(2, 2 << 20);
    std::fs::write(p.context.join("big.bin"), &big).unwrap();
    let (_, bytes) = sent_by(&mut || build());
    let gz = gzip_len(&big);
    assert!(
        bytes <= gz + 64 * 1024 && bytes >= gz,
        "sent {bytes} bytes on the wire for a file of {gz} bytes gzipped"
    );
    eprintln!("one incompressible file ({gz} bytes gzipped): {bytes} bytes on the wire");
    assert_eq!(sha_hex(&cat_in_image(image, "/ctx/big.bin")), sha_hex(&big));
    let stderr_summary = p.build("sync/little", &["--tag", "t"]);
    let err = String::from_utf8_lossy(&stderr_summary.stderr);
    assert!(
        err.contains("incremental: 0 changed files, 0 deleted"),
        "{err}"
    );
    assert!(p.run_folders().is_empty(), "{:?}", p.run_folders());
    assert_eq!(copies(&p).len(), 1, "the copy stays after the build");
}

/// A TCP proxy that passes client→server bytes at a fixed rate, so that an
/// upload lasts long enough to be cut in the middle.
struct Throttle {
    port: u16,
    stop: Arc<AtomicBool>,
    /// Client→server bytes passed on so far.
    up: Arc<std::sync::atomic::AtomicU64>,
}

impl Throttle {
    fn start(upstream: u16, bytes_per_sec: usize) -> Throttle {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let up = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let up2 = up.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let pipe = |mut from: TcpStream, mut to: TcpStream, rate: Option<usize>| {
                    let up = up2.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            if let Some(rate) = rate {
                                up.fetch_add(n as u64, Ordering::Relaxed);
                                std::thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                        let _ = from.shutdown(std::net::Shutdown::Read);
                    });
                };
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    Some(bytes_per_sec),
                );
                pipe(server, client, None);
            }
        });
        Throttle { port, stop, up }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Points `p`'s builder at `port` on loopback (a proxy in front of
/// `sshd`), which presents sshd's host key.
fn route_through(p: &Project, sshd: &Sshd, port: u16) {
    route_through_at(p, sshd, "127.0.0.1", port);
}

/// Points `p`'s builder at `host:port` (a proxy in front of `sshd`).
fn route_through_at(p: &Project, sshd: &Sshd, host: &str, port: u16) {
    let kh = std::fs::read_to_string(&sshd.known_hosts).unwrap();
    std::fs::write(
        &sshd.known_hosts,
        format!("{kh}[{host}]:{port} {}\n", sshd.host_key_pub),
    )
    .unwrap();
    let config = std::fs::read_to_string(&p.config).unwrap();
    std::fs::write(
        &p.config,
        config
            .replace(
                &format!("host: {}\n", sshd.listen),
                &format!("host: {host}\n"),
            )
            .replace(
                &format!("port: {}\n", sshd.port),
                &format!("port: {port}\n"),
            ),
    )
    .unwrap();
}

/// `compression: auto` gzips when the builder is not on loopback: measured
/// on the wire of a link into a network namespace, 900 kB of text cost
/// less than 100 kB; on loopback the same file goes as it is.
#[test]
fn auto_compression_gzips_on_a_non_loopback_link_only() {
    if !services() {
        return;
    }
    let Some(ns) = NetNs::new() else { return };
    let d = docker();
    let sshd = Sshd::start_with(Some(&d.host), &ns.ns_ip, Some(&ns.name), "");
    let upstream = format!("{}:{}", ns.ns_ip, sshd.port).parse().unwrap();
    let body = "compressible text\n".repeat(50_000);
    let mut sent = Vec::new();
    for host in [ns.host_ip.as_str(), "127.0.0.1"] {
        let p = Project::with_builder(&sshd, "    compression: auto\n");
        let wire = CountingProxy::start(&format!("{host}:0"), upstream);
        route_through_at(&p, &sshd, host, wire.addr.port());
        p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nCOPY . /ctx/\n"));
        p.file("big.txt", &body);
        let out = p.build("sync/auto", &["--tag", "t"]);
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(cat_in_image("sync/auto:t", "/ctx/big.txt"), body.as_bytes());
        eprintln!("900 kB of text via {host}: {} bytes on the wire", wire.up());
        sent.push(wire.up());
    }
    assert!(
        sent[0] < 100_000,
        "not gzipped on a non-loopback link: {sent:?}"
    );
    assert!(sent[1] > 900_000, "gzipped on loopback: {sent:?}");
}

fn state_of(p: &Project) -> String {
    copies(p)
        .first()
        .and_then(|c| std::fs::read_to_string(c.join("state")).ok())
        .unwrap_or_default()
}

#[test]
fn an_interrupted_sync_is_detected_and_repaired_by_the_next_build() {
    if !services() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let mut p = Project::with_builder(&sshd, "    compression: none\n");
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nCOPY . /ctx/\n"));
    p.file("small.txt", "version 1\n");
    std::fs::write(p.context.join("blob.bin"), random_bytes(3, 1 << 20)).unwrap();
    build_json(&p, "sync/cut", &[]);

    // Change everything, then cut the next upload in the middle.
    let blob = random_bytes(4, 12 << 20);
    std::fs::write(p.context.join("blob.bin"), &blob).unwrap();
    p.file("small.txt", "version 2\n");
    let throttle = Throttle::start(sshd.port, 2 << 20);
    let direct = std::fs::read_to_string(&p.config).unwrap();
    let kh = std::fs::read_to_string(&sshd.known_hosts).unwrap();
    std::fs::write(
        &sshd.known_hosts,
        format!("{kh}[127.0.0.1]:{} {}\n", throttle.port, sshd.host_key_pub),
    )
    .unwrap();
    std::fs::write(
        &p.config,
        direct.replace(
            &format!("port: {}\n", sshd.port),
            &format!("port: {}\n", throttle.port),
        ),
    )
    .unwrap();
    let mut child = p
        .cmd()
        .args(["build", "--remote-builder", "local", "--context"])
        .arg(&p.context)
        .args(["--repository", "sync/cut", "--tag", "t"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the sync started", Duration::from_secs(30), || {
        state_of(&p).starts_with("v1 dirty")
    });
    // 2 MiB of the 12 MiB upload passed: at 2 MiB/s it cannot have ended.
    wait_until(
        "2 MiB of the upload passed",
        Duration::from_secs(60),
        || throttle.up.load(Ordering::Relaxed) >= 2 << 20,
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the upload ended too soon"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    drop(throttle);
    std::fs::write(&p.config, &direct).unwrap();
    // Wait until the builder noticed (its tar ends, the copy stays dirty).
    let t = Instant::now();
    wait_until("the lease was released", Duration::from_secs(30), || {
        std::fs::read_to_string(p.workspace.join(".lease-holder"))
            .is_ok_and(|h| h.trim().is_empty())
    });
    assert!(state_of(&p).starts_with("v1 dirty"), "{}", state_of(&p));
    eprintln!("builder released after {:?}", t.elapsed());

    p.env.push(("RUST_LOG".into(), "absconda=debug".into()));
    let next = build_json(&p, "sync/cut", &[]);
    assert_eq!(sync_of(&next)["mode"], "full", "{next}");
    assert_eq!(
        sync_of(&next)["reason"],
        "the builder's copy was left unfinished by an interrupted sync"
    );
    assert!(state_of(&p).starts_with("v1 clean"));
    assert_eq!(cat_in_image("sync/cut:t", "/ctx/small.txt"), b"version 2\n");
    assert_eq!(
        sha_hex(&cat_in_image("sync/cut:t", "/ctx/blob.bin")),
        sha_hex(&blob)
    );
    let tree = copies(&p)[0].join("tree");
    assert_same(
        &local_tree(&p.context),
        &builder_tree(&tree),
        "after repair",
    );
}

#[test]
fn a_copy_changed_on_the_builder_is_caught_and_repaired() {
    if !services() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::new(&sshd);
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nCOPY . /ctx/\n"));
    p.file("app.conf", "setting = original\n");
    p.file("other.txt", "other\n");
    build_json(&p, "sync/tamper", &[]);
    let tree = copies(&p)[0].join("tree");

    // Someone edits the copy on the builder, keeping the size, within the
    // second of the file's mtime (set explicitly, so that no timing decides
    // it): the fingerprint sees the nanoseconds.
    let f = tree.join("app.conf");
    let mtime = f.metadata().unwrap().modified().unwrap();
    let since = mtime.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    let same_second = if since.subsec_nanos() > 0 {
        mtime - Duration::from_nanos(1)
    } else {
        mtime + Duration::from_nanos(1)
    };
    std::fs::write(&f, "setting = tampered\n").unwrap();
    set_mtime(&f, same_second);
    let r = build_json(&p, "sync/tamper", &[]);
    assert_eq!(sync_of(&r)["mode"], "full", "{r}");
    assert_eq!(
        sync_of(&r)["reason"],
        "the builder's copy was changed outside absconda"
    );
    assert_eq!(
        cat_in_image("sync/tamper:t", "/ctx/app.conf"),
        b"setting = original\n"
    );

    // Same size and mtime: only --verify can tell, and then repairs it.
    let mtime = f.metadata().unwrap().modified().unwrap();
    std::fs::write(&f, "setting = ORIGINAL\n").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let r = build_json(&p, "sync/tamper", &["--verify"]);
    let s = sync_of(&r);
    assert_eq!(s["verified"], "sha256", "{r}");
    assert_eq!(s["attempts"], 2, "a delta, then a full send: {r}");
    assert_eq!(s["mode"], "full");
    assert!(
        s["reason"]
            .as_str()
            .unwrap()
            .contains("did not match the manifest (files)"),
        "{r}"
    );
    assert_eq!(
        cat_in_image("sync/tamper:t", "/ctx/app.conf"),
        b"setting = original\n"
    );
    assert_same(
        &local_tree(&p.context),
        &builder_tree(&tree),
        "after --verify",
    );
}

#[test]
fn contexts_with_the_same_basename_never_share_a_copy() {
    if !services() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let a = Project::new(&sshd);
    let b = Project::new(&sshd);
    // Both context folders are called `ctx`; make them share one workspace.
    std::fs::write(&b.config, std::fs::read_to_string(&a.config).unwrap()).unwrap();
    // Same name, size, mode and mtime to the nanosecond: BuildKit, which
    // reuses its previous copy of a context for files whose stat did not
    // change, must not take b's file for a's.
    let t = SystemTime::now() - Duration::from_secs(60);
    for (p, who) in [(&a, "a"), (&b, "b")] {
        p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nCOPY . /ctx/\n"));
        p.file("who.txt", who);
        set_mtime(&p.context.join("who.txt"), t);
    }
    build_json(&a, "sync/base-a", &[]);
    let rb = build_json(&b, "sync/base-b", &[]);
    assert_eq!(sync_of(&rb)["mode"], "full", "b must not reuse a's copy");
    let ra = build_json(&a, "sync/base-a", &[]);
    assert_eq!(sync_of(&ra)["mode"], "delta");
    assert_eq!(cat_in_image("sync/base-a:t", "/ctx/who.txt"), b"a");
    assert_eq!(cat_in_image("sync/base-b:t", "/ctx/who.txt"), b"b");
    assert_eq!(copies(&a).len(), 2);

    // Whole uploads too: each lands in a run folder BuildKit never saw.
    build_json(&a, "sync/base-a", &["--no-incremental"]);
    build_json(&b, "sync/base-b", &["--no-incremental"]);
    assert_eq!(cat_in_image("sync/base-b:t", "/ctx/who.txt"), b"b");
}

#[test]
fn setuid_and_setgid_bits_never_reach_the_builders_copy() {
    if !services() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::new(&sshd);
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nCOPY . /ctx/\n"));
    p.file("bin/tool", "#!/bin/sh\necho hi\n");
    p.file("shared/readme.txt", "group folder\n");
    let perm = |path: &str, mode: u32| {
        std::fs::set_permissions(p.context.join(path), std::fs::Permissions::from_mode(mode))
            .unwrap()
    };
    perm("bin/tool", 0o4755);
    perm("shared", 0o2775);
    perm("shared/readme.txt", 0o2644);
    let on_disk = |rel: &str| -> u32 {
        let copy = copies(&p)
            .into_iter()
            .next()
            .expect("a copy on the builder");
        std::fs::symlink_metadata(copy.join("tree").join(rel))
            .unwrap()
            .mode()
            & 0o7777
    };

    let first = build_json(&p, "sync/setuid", &[]);
    assert_eq!(sync_of(&first)["mode"], "full");
    assert_eq!(on_disk("bin/tool"), 0o755, "setuid bit cleared");
    assert_eq!(on_disk("shared"), 0o775, "setgid bit of a folder cleared");
    assert_eq!(on_disk("shared/readme.txt"), 0o644);
    assert!(state_of(&p).contains("clean"), "{}", state_of(&p));
    assert_eq!(
        cat_in_image("sync/setuid:t", "/ctx/bin/tool"),
        b"#!/bin/sh\necho hi\n"
    );

    // Nothing changed: the copy without the bits is what absconda expects.
    let second = build_json(&p, "sync/setuid", &[]);
    let s = sync_of(&second);
    assert_eq!(s["mode"], "delta", "{second}");
    assert_eq!(s["entries_sent"], 0, "{second}");
    assert_eq!(s["chmod"], 0, "{second}");
    assert_eq!(s["attempts"], 1, "{second}");
    assert_eq!(s["matched"], true, "{second}");

    // Setting the bit again changes nothing in the copy.
    perm("bin/tool", 0o6755);
    let third = build_json(&p, "sync/setuid", &[]);
    let s = sync_of(&third);
    assert_eq!(s["mode"], "delta", "{third}");
    assert_eq!(s["attempts"], 1, "{third}");
    assert_eq!(s["matched"], true, "{third}");
    assert_eq!(on_disk("bin/tool"), 0o755);
    assert!(state_of(&p).contains("clean"), "{}", state_of(&p));
}

/// Two installations on one machine id (two laptops cloned from one
/// image) with one context path get a copy each: while the context is
/// exactly what the first built, the second builds from that copy and
/// changes nothing in it; once it differs, the second sends into a copy of
/// its own, and the first's copy keeps the first's files.
#[test]
fn two_installations_on_one_machine_id_never_write_each_others_copy() {
    if !services() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    // One machine id (this machine's), one context path, one builder: only
    // the cache folder differs, as on two laptops cloned from one image.
    let mut p = Project::new(&sshd);
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nCOPY . /ctx/\n"));
    p.file("who.txt", "same");
    let caches = [p.dir.path().join("cache-a"), p.dir.path().join("cache-b")];
    p.env = vec![("XDG_CACHE_HOME".into(), caches[0].display().to_string())];
    let ra = build_json(&p, "sync/install-a", &[]);
    assert_eq!(copies(&p).len(), 1);
    let a_tree = sync_of(&ra)["tree"].as_str().unwrap().to_string();
    p.env = vec![("XDG_CACHE_HOME".into(), caches[1].display().to_string())];
    let rb = build_json(&p, "sync/install-b", &[]);
    assert_eq!(sync_of(&rb)["mode"], "delta", "{rb}");
    assert_eq!(sync_of(&rb)["entries_sent"], 0, "{rb}");
    assert_eq!(sync_of(&rb)["tree"], a_tree.as_str(), "{rb}");
    assert_ne!(sync_of(&rb)["key"], sync_of(&ra)["key"]);
    assert_eq!(copies(&p).len(), 1, "no copy for exactly the same files");
    let ids: Vec<String> = caches
        .iter()
        .map(|c| std::fs::read_to_string(c.join("absconda/installation-id")).unwrap())
        .collect();
    assert_eq!(ids[0].trim().len(), 32);
    assert_ne!(ids[0], ids[1]);

    p.file("who.txt", "b changed it");
    let rb = build_json(&p, "sync/install-b", &[]);
    assert_eq!(
        sync_of(&rb)["mode"],
        "full",
        "b must not change a's copy: {rb}"
    );
    assert_ne!(sync_of(&rb)["tree"], a_tree.as_str(), "{rb}");
    assert_eq!(copies(&p).len(), 2, "one copy per installation");
    assert_eq!(
        std::fs::read_to_string(Path::new(&a_tree).join("who.txt")).unwrap(),
        "same",
        "a's copy keeps a's files"
    );
    assert_eq!(
        cat_in_image("sync/install-b:t", "/ctx/who.txt"),
        b"b changed it"
    );
    // Each installation keeps its own copy up to date.
    p.env = vec![("XDG_CACHE_HOME".into(), caches[0].display().to_string())];
    let ra = build_json(&p, "sync/install-a", &[]);
    assert_eq!(sync_of(&ra)["mode"], "delta");
    assert_eq!(sync_of(&ra)["tree"], a_tree.as_str());
    assert_eq!(copies(&p).len(), 2);
}

fn set_mtime(path: &Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// A script that rewrites a version file and builds, in a loop, changes
/// the file within one second without changing its size: the builder's copy
/// must carry the mtime to the nanosecond, or BuildKit keeps the old file.
#[test]
fn a_same_size_rewrite_within_one_second_reaches_the_image() {
    if !services() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::new(&sshd);
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nCOPY . /ctx/\n"));
    let second = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    for (i, version) in ["v1", "v2", "v3"].into_iter().enumerate() {
        p.file("VERSION", version);
        set_mtime(
            &p.context.join("VERSION"),
            second + Duration::from_millis(100 * i as u64 + 100),
        );
        let r = build_json(&p, "sync/version", &[]);
        assert_eq!(
            cat_in_image("sync/version:t", "/ctx/VERSION"),
            version.as_bytes(),
            "{r}"
        );
    }
}

#[test]
fn no_incremental_streams_everything_and_an_outside_dockerfile_still_works() {
    if !services() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::new(&sshd);
    let outside = p.dir.path().join("elsewhere.Dockerfile");
    std::fs::write(
        &outside,
        format!("FROM {BASE_IMAGE}\nCOPY . /ctx/\nLABEL from=outside\n"),
    )
    .unwrap();
    p.file("x.txt", "x1");
    let df = outside.display().to_string();
    let r = build_json(&p, "sync/outside", &["--dockerfile", &df]);
    assert_eq!(sync_of(&r)["mode"], "full");
    p.file("x.txt", "x2");
    let r = build_json(&p, "sync/outside", &["--dockerfile", &df]);
    assert_eq!(sync_of(&r)["mode"], "delta");
    assert_eq!(r["files_sent"], 1);
    assert_eq!(cat_in_image("sync/outside:t", "/ctx/x.txt"), b"x2");
    // The outside Dockerfile is not part of the copy.
    assert!(!copies(&p)[0].join("tree/Dockerfile").exists());

    let state = state_of(&p);
    p.file("x.txt", "x3");
    let r = build_json(
        &p,
        "sync/outside",
        &["--dockerfile", &df, "--no-incremental"],
    );
    assert!(r["sync"].is_null(), "{r}");
    assert_eq!(cat_in_image("sync/outside:t", "/ctx/x.txt"), b"x3");
    assert_eq!(
        state_of(&p),
        state,
        "--no-incremental leaves the copy alone"
    );
}

// ---------------------------------------------------------------------------
// The content store: one per workspace, shared by every client

/// One client of the shared builder: its own context folder (its own path)
/// and its own local cache (a fresh CI runner has an empty one).
struct Client {
    ctx: PathBuf,
    cache: PathBuf,
}

impl Client {
    fn new(root: &Path, name: &str) -> Client {
        let c = Client {
            ctx: root.join(name).join("app"),
            cache: root.join(format!("cache-{name}")),
        };
        std::fs::create_dir_all(c.ctx.parent().unwrap()).unwrap();
        c
    }

    /// A checkout of `from` at this client's path: `cp -a` keeps the
    /// mtimes (a restored CI cache), `cp -r` gives new ones (a fresh clone).
    fn clone_of(root: &Path, name: &str, from: &Path, keep_mtimes: bool) -> Client {
        let c = Client::new(root, name);
        let flag = if keep_mtimes { "-a" } else { "-r" };
        let st = std::process::Command::new("cp")
            .arg(flag)
            .arg(from)
            .arg(&c.ctx)
            .status()
            .unwrap();
        assert!(st.success());
        c
    }
}

async fn sync_client(
    session: &Session,
    builder: &absconda::config::Builder,
    c: &Client,
    verify: bool,
    compression: Compression,
    run_dir: &str,
) -> Result<SyncSummary, absconda::sync::SyncError> {
    let req = BuildRequest {
        context_dir: Some(c.ctx.clone()),
        dockerfile: c.ctx.join("Dockerfile"),
        ..BuildRequest::default()
    };
    let prepared = prepare_context(&req).await.unwrap();
    let job = SyncJob {
        builder,
        run_dir,
        identity: absconda::sync::identity(Some(&c.ctx), &[]),
        compression,
        verify,
        cache_root: Some(c.cache.clone()),
    };
    sync_context(session, &job, prepared.entries, prepared.extra, &Silent).await
}

/// The copy the sync left the build: its own, or another copy that holds
/// exactly this context (a fresh checkout of content already built).
fn copy_tree(ws: &Path, s: &SyncSummary) -> PathBuf {
    match &s.tree {
        Some(t) => PathBuf::from(t),
        None => ws.join("contexts").join(&s.key).join("tree"),
    }
}

/// Whether the sync used another copy than its own.
fn shared_copy(ws: &Path, s: &SyncSummary) -> bool {
    copy_tree(ws, s) != ws.join("contexts").join(&s.key).join("tree")
}

/// The copy matches the client's context, file by file, hashed on the
/// builder too, and every file of it is a hard link into the store.
async fn check_copy(session: &Session, ctx: &Path, tree: &Path, what: &str) {
    let local = local_tree(ctx);
    assert_same(&local, &builder_tree(tree), what);
    let expected: BTreeMap<String, String> = local
        .iter()
        .filter_map(|(k, v)| match v {
            Node::File { sha, .. } => Some((k.clone(), sha.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        sha256sum_on_builder(session, tree).await,
        expected,
        "{what}: sha256sum on the builder"
    );
    for name in expected.keys() {
        let md = tree.join(name).symlink_metadata().unwrap();
        assert!(
            md.nlink() >= 2,
            "{what}: {name:?} is not linked to the store"
        );
    }
}

/// Every file in the store holds the content its name says.
fn assert_store_sound(ws: &Path) -> usize {
    let b = ws.join("store/b");
    let mut n = 0;
    for e in std::fs::read_dir(&b).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let sha = sha_hex(&std::fs::read(e.path()).unwrap());
        assert!(
            name.starts_with(&format!("{sha}-")),
            "store file {name} holds other content ({sha})"
        );
        n += 1;
    }
    n
}

fn du_kib(path: &Path) -> u64 {
    let out = std::process::Command::new("du")
        .arg("-sk")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn write_context(ctx: &Path, seed: u64, big: usize) {
    std::fs::create_dir_all(ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {BASE_IMAGE}\nCOPY . /ctx/\n"),
    )
    .unwrap();
    for i in 0..200 {
        let p = ctx.join(format!("src/m{}/f{i}.rs", i % 4));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, format!("fn f{i}_{seed}() {{}}\n").repeat(20)).unwrap();
    }
    std::fs::write(ctx.join("big.bin"), random_bytes(seed, big)).unwrap();
}

/// The random-edit property test with three clients (three paths, three
/// local caches) of one builder: each copy always matches its client's
/// context, is made of links into the one store, and a client whose
/// checkout the builder has seen sends no content at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_random_edits_from_several_clients_share_one_store() {
    if !sshd_only() {
        return;
    }
    let seed: u64 = std::env::var("ABSCONDA_SYNC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("property test seed: {seed} (replay with ABSCONDA_SYNC_SEED={seed})");
    let sshd = Sshd::start(None);
    let b = bench(&sshd, "").await;
    let ws = b.project.workspace.clone();
    let root = b.project.dir.path().join("clients");
    let first = Client::new(&root, "c0");
    std::fs::create_dir_all(&first.ctx).unwrap();
    std::fs::write(
        first.ctx.join("Dockerfile"),
        format!("FROM {BASE_IMAGE}\nCOPY . /ctx/\n"),
    )
    .unwrap();
    std::fs::write(first.ctx.join(".dockerignore"), "**/*.tmp\n").unwrap();
    let lease = acquire_lease(
        &b.session,
        &b.builder,
        Duration::from_secs(30),
        None,
        &Silent,
    )
    .await
    .unwrap();
    let mut eds = vec![Editor {
        rng: StdRng::seed_from_u64(seed),
        root: first.ctx.clone(),
        counter: 0,
        log: Vec::new(),
    }];
    for _ in 0..25 {
        eds[0].edit();
    }
    let s = sync_client(&b.session, &b.builder, &first, false, Compression::None, "")
        .await
        .unwrap();
    check_copy(&b.session, &first.ctx, &copy_tree(&ws, &s), "first client").await;
    let first_tree = copy_tree(&ws, &s);
    let mut clients = vec![first];
    // A clone with the same mtimes is exactly the first client's context:
    // it builds from that copy, sending nothing.
    let mut shared = vec![false];
    for i in 1..3 {
        let c = Client::clone_of(&root, &format!("c{i}"), &clients[0].ctx, true);
        let s = sync_client(&b.session, &b.builder, &c, false, Compression::Gzip, "")
            .await
            .unwrap();
        assert_eq!(s.mode, "delta", "{s:?}");
        assert_eq!((s.entries_sent, s.blobs_sent), (0, 0), "{s:?}");
        assert_eq!(copy_tree(&ws, &s), first_tree, "{s:?}");
        shared.push(true);
        check_copy(
            &b.session,
            &c.ctx,
            &copy_tree(&ws, &s),
            &format!("clone c{i}"),
        )
        .await;
        eds.push(Editor {
            rng: StdRng::seed_from_u64(seed.wrapping_add(i as u64)),
            root: c.ctx.clone(),
            counter: 1000 * i as u32,
            log: Vec::new(),
        });
        clients.push(c);
    }
    let mut pick = StdRng::seed_from_u64(seed ^ 0x5eed);
    for round in 0..30 {
        let i = pick.random_range(0..clients.len());
        let before = eds[i].log.len();
        for _ in 0..pick.random_range(0..5) {
            eds[i].edit();
        }
        let verify = pick.random_bool(0.2);
        let compression = if pick.random_bool(0.5) {
            Compression::Gzip
        } else {
            Compression::None
        };
        let s = sync_client(&b.session, &b.builder, &clients[i], verify, compression, "")
            .await
            .unwrap();
        let what = format!(
            "seed {seed}, round {round}, client {i}, after {:?}",
            &eds[i].log[before..]
        );
        // A client that built from another's copy makes its own at its
        // first change: a full send, of links for what the store holds.
        if !shared[i] {
            assert_eq!(s.mode, "delta", "{what}: {s:?}");
        }
        shared[i] = shared_copy(&ws, &s);
        assert!(s.matched, "{what}: {s:?}");
        check_copy(&b.session, &clients[i].ctx, &copy_tree(&ws, &s), &what).await;
    }
    // The other copies were never touched by these syncs.
    for (i, c) in clients.iter().enumerate() {
        let s = sync_client(&b.session, &b.builder, c, true, Compression::None, "")
            .await
            .unwrap();
        assert!(s.matched && s.entries_sent == 0, "client {i}: {s:?}");
        check_copy(
            &b.session,
            &c.ctx,
            &copy_tree(&ws, &s),
            &format!("end, client {i}"),
        )
        .await;
    }
    assert_store_sound(&ws);
    assert!(lease.release(Duration::from_secs(10)).await);
}

/// A fresh CI runner (new path, empty local cache) building content the
/// builder has seen sends the manifest and little more, measured on the
/// wire; ten copies of one context take about the disk of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_a_fresh_runner_sends_no_seen_content_and_ten_copies_cost_one() {
    if !sshd_only() {
        return;
    }
    let sshd = Sshd::start(None);
    let project = Project::with_builder(&sshd, "    compression: gzip\n");
    let wire = CountingProxy::start("127.0.0.1:0", ([127, 0, 0, 1], sshd.port).into());
    route_through(&project, &sshd, wire.addr.port());
    let file = absconda::config::load(Some(&project.config)).unwrap();
    let builder = file.builder("local").unwrap();
    let session = Session::connect(&ssh_target(&builder, builder.host.as_deref().unwrap()))
        .await
        .unwrap();
    let ws = project.workspace.clone();
    let root = project.dir.path().join("clients");
    let first = Client::new(&root, "c0");
    write_context(&first.ctx, 7, 8 << 20);

    let before = wire.up();
    let s = sync_client(&session, &builder, &first, false, Compression::Gzip, "")
        .await
        .unwrap();
    let cold = wire.up() - before;
    check_copy(&session, &first.ctx, &copy_tree(&ws, &s), "first").await;
    let first_sync = s.clone();
    let one = du_kib(&ws);
    let entries = s.entries;

    // The same checkout at another path builds from the first copy:
    // nothing but the question crosses the wire, and no copy is made.
    let same = Client::clone_of(&root, "same", &first.ctx, true);
    let before = wire.up();
    let s = sync_client(&session, &builder, &same, false, Compression::Gzip, "")
        .await
        .unwrap();
    let sent = wire.up() - before;
    assert_eq!(copy_tree(&ws, &s), copy_tree(&ws, &first_sync), "{s:?}");
    assert_eq!((s.mode, s.entries_sent), ("delta", 0), "{s:?}");
    assert!(sent <= 16 << 10, "{sent} bytes for an unchanged checkout");
    assert_eq!(std::fs::read_dir(ws.join("contexts")).unwrap().count(), 1);
    check_copy(&session, &same.ctx, &copy_tree(&ws, &s), "same checkout").await;

    // Checkouts of one commit each (one file apart): copies of their own.
    let mut worst = 0;
    for i in 1..10 {
        let c = Client::clone_of(&root, &format!("c{i}"), &first.ctx, true);
        std::fs::write(c.ctx.join("runner.txt"), format!("runner {i}\n")).unwrap();
        let before = wire.up();
        let s = sync_client(&session, &builder, &c, false, Compression::Gzip, "")
            .await
            .unwrap();
        let sent = wire.up() - before;
        worst = worst.max(sent);
        assert_eq!(s.blobs_sent, 1, "only runner.txt is new: {s:?}");
        assert!(!shared_copy(&ws, &s), "{s:?}");
        check_copy(&session, &c.ctx, &copy_tree(&ws, &s), &format!("copy {i}")).await;
    }
    let ten = du_kib(&ws);
    // What the manifest of these entries costs at least: a SHA-256, a
    // path, a size, a mode and an mtime each.
    let manifest: u64 = entries * (32 + 24 + 16);
    eprintln!(
        "store: cold send {cold} bytes; fresh runner at most {worst} bytes on the wire \
         for {entries} entries (manifest estimate {manifest}); workspace {one} KiB for one copy, {ten} KiB for ten"
    );
    assert!(
        worst <= manifest + (64 << 10),
        "a fresh runner sent {worst} bytes (manifest ~{manifest})"
    );
    assert!(
        ten * 10 <= one * 11,
        "ten copies take {ten} KiB, one took {one} KiB"
    );

    // A fresh clone gives every file a new mtime: the builder makes the
    // new variants from what it holds, and no content crosses the wire.
    let fresh = Client::clone_of(&root, "fresh", &first.ctx, false);
    let before = wire.up();
    let s = sync_client(&session, &builder, &fresh, false, Compression::Gzip, "")
        .await
        .unwrap();
    let sent = wire.up() - before;
    eprintln!("store: fresh clone with new mtimes sent {sent} bytes");
    assert_eq!(s.blobs_sent, 0, "{s:?}");
    assert!(sent <= manifest + (64 << 10), "{sent}");
    check_copy(&session, &fresh.ctx, &copy_tree(&ws, &s), "fresh clone").await;
    assert_store_sound(&ws);
}

/// Under a small `cache_max`, least recently synced copies and then the
/// content no copy links go, but never a copy a run folder links to (a
/// build reading it), also while other syncs run at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_a_small_cache_max_evicts_old_copies_never_live_ones() {
    if !sshd_only() {
        return;
    }
    let sshd = Sshd::start(None);
    let b = bench(&sshd, "    cache_max: 5M\n").await;
    let ws = b.project.workspace.clone();
    let root = b.project.dir.path().join("clients");
    let mk = |name: &str, seed: u64| {
        let c = Client::new(&root, name);
        write_context(&c.ctx, seed, 2 << 20);
        c
    };
    let (x, y, z) = (mk("x", 1), mk("y", 2), mk("z", 3));
    let run_x = ws.join("runs/run-x");
    std::fs::create_dir_all(&run_x).unwrap();
    let sx = sync_client(
        &b.session,
        &b.builder,
        &x,
        false,
        Compression::None,
        &run_x.display().to_string(),
    )
    .await
    .unwrap();
    let sy = sync_client(&b.session, &b.builder, &y, false, Compression::None, "")
        .await
        .unwrap();
    let sz = sync_client(&b.session, &b.builder, &z, false, Compression::None, "")
        .await
        .unwrap();
    assert!(
        copy_tree(&ws, &sx).exists(),
        "the copy a run folder links to stays"
    );
    check_copy(&b.session, &x.ctx, &copy_tree(&ws, &sx), "live copy x").await;
    assert!(
        !copy_tree(&ws, &sy).exists(),
        "the least recently used copy goes"
    );
    check_copy(&b.session, &z.ctx, &copy_tree(&ws, &sz), "z").await;
    let y_big = sha_hex(&std::fs::read(y.ctx.join("big.bin")).unwrap());
    assert!(
        !std::fs::read_dir(ws.join("store/b")).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(&y_big)),
        "content only y's copy linked goes with it"
    );

    // Two syncs at once, each with a run folder, beside the live x.
    let session2 = Session::connect(&ssh_target(&b.builder, b.builder.host.as_deref().unwrap()))
        .await
        .unwrap();
    let (v, w) = (mk("v", 4), mk("w", 5));
    for r in ["run-v", "run-w"] {
        std::fs::create_dir_all(ws.join("runs").join(r)).unwrap();
    }
    let (rv, rw) = (
        ws.join("runs/run-v").display().to_string(),
        ws.join("runs/run-w").display().to_string(),
    );
    let (sv, sw) = tokio::join!(
        sync_client(&b.session, &b.builder, &v, false, Compression::None, &rv),
        sync_client(&session2, &b.builder, &w, false, Compression::None, &rw),
    );
    let (sv, sw) = (sv.unwrap(), sw.unwrap());
    check_copy(&b.session, &v.ctx, &copy_tree(&ws, &sv), "v").await;
    check_copy(&b.session, &w.ctx, &copy_tree(&ws, &sw), "w").await;
    check_copy(&b.session, &x.ctx, &copy_tree(&ws, &sx), "live copy x").await;
    assert!(
        !copy_tree(&ws, &sz).exists(),
        "z was the oldest copy not in use"
    );
    assert_store_sound(&ws);
}

/// A store file whose content was changed on the builder is detected: by
/// its size before it is linked, or by `--verify` when the size is the
/// same; the content is sent again and the store repaired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_a_tampered_blob_is_detected_and_repaired() {
    if !sshd_only() {
        return;
    }
    let sshd = Sshd::start(None);
    let b = bench(&sshd, "").await;
    let ws = b.project.workspace.clone();
    let root = b.project.dir.path().join("clients");
    let a = Client::new(&root, "a");
    write_context(&a.ctx, 11, 64 << 10);
    sync_client(&b.session, &b.builder, &a, false, Compression::None, "")
        .await
        .unwrap();
    let big = sha_hex(&std::fs::read(a.ctx.join("big.bin")).unwrap());
    let blob = std::fs::read_dir(ws.join("store/b"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&big))
        .unwrap();
    let mtime = blob.metadata().unwrap().modified().unwrap();

    // Another size: dropped by the store query, sent again.
    std::fs::write(&blob, b"tampered").unwrap();
    let c1 = Client::clone_of(&root, "c1", &a.ctx, true);
    let s = sync_client(&b.session, &b.builder, &c1, false, Compression::None, "")
        .await
        .unwrap();
    assert_eq!(s.blobs_sent, 1, "{s:?}");
    check_copy(
        &b.session,
        &c1.ctx,
        &copy_tree(&ws, &s),
        "after a resized blob",
    )
    .await;

    // Same size and mtime: only hashing can tell; --verify does.
    let mut data = std::fs::read(&blob).unwrap();
    data[100] ^= 0xff;
    std::fs::write(&blob, &data).unwrap();
    set_mtime(&blob, mtime);
    let c2 = Client::clone_of(&root, "c2", &a.ctx, true);
    let s = sync_client(&b.session, &b.builder, &c2, true, Compression::None, "")
        .await
        .unwrap();
    assert_eq!(s.attempts, 2, "{s:?}");
    assert!(s.matched, "{s:?}");
    check_copy(
        &b.session,
        &c2.ctx,
        &copy_tree(&ws, &s),
        "after a same-size tamper",
    )
    .await;
    assert_store_sound(&ws);
}

/// A sync cut off in the middle of linking (the copy marked dirty, half of
/// its links gone, received content left unhashed beside it) is repaired
/// by the next build, and nothing of it reaches the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_a_crash_while_linking_is_repaired_by_the_next_build() {
    if !sshd_only() {
        return;
    }
    let sshd = Sshd::start(None);
    let b = bench(&sshd, "").await;
    let ws = b.project.workspace.clone();
    let root = b.project.dir.path().join("clients");
    let a = Client::new(&root, "a");
    write_context(&a.ctx, 21, 64 << 10);
    let s = sync_client(&b.session, &b.builder, &a, false, Compression::None, "")
        .await
        .unwrap();
    let dir = ws.join("contexts").join(&s.key);
    let tree = dir.join("tree");
    // What an apply killed half way leaves.
    std::fs::write(dir.join("state"), "v1 dirty\n").unwrap();
    for i in (0..200).step_by(2) {
        let _ = std::fs::remove_file(tree.join(format!("src/m{}/f{i}.rs", i % 4)));
    }
    let incoming = tree.join(format!(".absconda-in-{}", "0".repeat(64)));
    std::fs::create_dir_all(&incoming).unwrap();
    std::fs::write(
        incoming.join(format!("{}-644-1.000000000", "ab".repeat(32))),
        "never hashed",
    )
    .unwrap();
    std::fs::write(a.ctx.join("new.txt"), "a change meanwhile").unwrap();

    let s = sync_client(&b.session, &b.builder, &a, false, Compression::None, "")
        .await
        .unwrap();
    assert_eq!(s.mode, "full", "{s:?}");
    assert!(
        s.reason.as_deref().unwrap_or("").contains("interrupted"),
        "{s:?}"
    );
    assert_eq!(s.blobs_sent, 1, "only the new file's content: {s:?}");
    check_copy(&b.session, &a.ctx, &tree, "after the crash").await;
    assert_store_sound(&ws);
}

/// `remote prune --dry-run` lists what would go and removes nothing;
/// `remote prune --all` then removes it, and `remote status` shows the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_remote_prune_dry_run_lists_without_deleting() {
    if !sshd_only() {
        return;
    }
    let sshd = Sshd::start(None);
    let b = bench(&sshd, "").await;
    let ws = b.project.workspace.clone();
    let root = b.project.dir.path().join("clients");
    let a = Client::new(&root, "a");
    write_context(&a.ctx, 31, 64 << 10);
    let s = sync_client(&b.session, &b.builder, &a, false, Compression::None, "")
        .await
        .unwrap();
    let files_before = assert_store_sound(&ws);
    assert!(files_before > 0);

    let out = b
        .project
        .cmd()
        .args(["remote", "prune", "local", "--all", "--dry-run"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&format!("would remove copy {}", s.key)),
        "{said}"
    );
    assert!(copy_tree(&ws, &s).exists(), "a dry run deletes nothing");
    assert_eq!(assert_store_sound(&ws), files_before);

    let out = b
        .project
        .cmd()
        .args(["remote", "prune", "local", "--all"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(!copy_tree(&ws, &s).exists());
    assert_eq!(
        assert_store_sound(&ws),
        0,
        "no copy links anything any more"
    );

    let out = b
        .project
        .cmd()
        .args(["remote", "status", "local", "--json"])
        .output()
        .unwrap();
    let st: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(st["store"]["copies"], 0, "{st}");
    assert_eq!(st["store"]["blobs"], 0, "{st}");
}

/// A workspace whose store this user cannot use (here a symlink, which
/// the store refuses to write through) still syncs: the content is sent as
/// it was before there was a store, and nothing is written through the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_an_unusable_store_falls_back_to_sending_content() {
    if !sshd_only() {
        return;
    }
    let sshd = Sshd::start(None);
    let b = bench(&sshd, "").await;
    let ws = b.project.workspace.clone();
    let elsewhere = b.project.dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::create_dir_all(&ws).unwrap();
    symlink(&elsewhere, ws.join("store")).unwrap();
    let a = Client::new(&b.project.dir.path().join("clients"), "a");
    write_context(&a.ctx, 41, 64 << 10);
    let s = sync_client(&b.session, &b.builder, &a, false, Compression::None, "")
        .await
        .unwrap();
    assert!(s.matched, "{s:?}");
    assert_eq!((s.files_linked, s.query_bytes), (0, 0), "{s:?}");
    assert_same(
        &local_tree(&a.ctx),
        &builder_tree(&copy_tree(&ws, &s)),
        "without a store",
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
}

/// Text like a source tree's: words from a small vocabulary, in lines.
fn source_like_text(seed: u64, len: usize) -> String {
    let words = [
        "fn", "let", "match", "impl", "struct", "return", "self", ".into()", "(x)", ";", "{", "}",
        "pub", "use", "// why", "value", "error", "config",
    ];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = String::with_capacity(len + 80);
    while out.len() < len {
        let mut line = String::new();
        while line.len() < 70 {
            line.push_str(words[rng.random_range(0..words.len())]);
            line.push(' ');
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// `compression: zstd` sends fewer bytes than gzip for a compressible
/// context (counted on the wire), and a builder without `zstd` on its PATH
/// gets gzip instead, which its tar reads; both images hold the files.
#[test]
fn zstd_sends_less_than_gzip_and_falls_back_to_gzip_without_zstd() {
    if !services() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    // The same machine, with a PATH that has everything of /usr/bin but zstd.
    let bin = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir("/usr/bin").unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if !name.to_string_lossy().contains("zstd") {
            let _ = symlink(e.path(), bin.path().join(&name));
        }
    }
    std::fs::set_permissions(bin.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let no_zstd = Sshd::start_with(
        Some(&d.host),
        "127.0.0.1",
        None,
        // (sshd sets PATH itself, and root's shell profile adds to it.)
        &format!(
            "ForceCommand PATH={}:/usr/sbin:/sbin; export PATH; eval \"$SSH_ORIGINAL_COMMAND\"\n",
            bin.path().display()
        ),
    );
    let body = source_like_text(12, 3 << 20);
    let mut wire_bytes = BTreeMap::new();
    for (name, server, setting, expect) in [
        ("gzip", &sshd, "gzip", "gzip"),
        ("zstd", &sshd, "zstd", "zstd"),
        ("fallback", &no_zstd, "zstd", "gzip"),
    ] {
        let p = Project::with_builder(server, &format!("    compression: {setting}\n"));
        let wire = CountingProxy::start("127.0.0.1:0", ([127, 0, 0, 1], server.port).into());
        route_through(&p, server, wire.addr.port());
        p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nCOPY . /ctx/\n"));
        p.file("src/big.rs", &body);
        let image = format!("sync/zstd-{name}");
        for incremental in [true, false] {
            let before = wire.up();
            let mut args = Vec::new();
            if !incremental {
                args.push("--no-incremental");
            }
            let report = build_json(&p, &image, &args);
            assert_eq!(report["compression"], expect, "{name}: {report}");
            assert_eq!(
                cat_in_image(&format!("{image}:t"), "/ctx/src/big.rs"),
                body.as_bytes(),
                "{name}"
            );
            let sent = wire.up() - before;
            eprintln!("{name} (incremental: {incremental}): {sent} bytes on the wire");
            if incremental {
                wire_bytes.insert(name, sent);
            }
        }
    }
    assert!(
        wire_bytes["zstd"] < wire_bytes["gzip"] * 9 / 10,
        "zstd did not send less than gzip: {wire_bytes:?}"
    );
    assert!(
        wire_bytes["gzip"] < body.len() as u64 / 2,
        "not compressed: {wire_bytes:?}"
    );
}

/// Seconds after the SSH handshake of a `--json` build report.
fn after_handshake(report: &serde_json::Value) -> f64 {
    let connect: f64 = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p[0] == "connect")
        .map(|p| p[1].as_f64().unwrap())
        .sum();
    report["total_seconds"].as_f64().unwrap() - connect
}

/// A no-change rebuild waits for 4 round trips after the SSH handshake
/// (the opening of the channels; the lease, the probe and the copy's state
/// in one, as the lease script makes its own nonce; the request and
/// `docker build` in one; the release), counted through proxies: the same
/// rebuild through one that adds 1 s to every round trip takes at most
/// 4.25 s longer than through one that adds nothing (measured: 3.7–4.1 s,
/// the best of three). The delay is long so that docker's own variation on
/// a shared machine is a small part of a round trip.
#[test]
fn a_no_change_rebuild_waits_for_about_four_round_trips() {
    if !services() {
        return;
    }
    use crate::support::delay_proxy::DelayProxy;
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::with_builder(&sshd, "");
    let upstream = ([127, 0, 0, 1], sshd.port).into();
    let near = DelayProxy::start(upstream, Duration::ZERO);
    let rtt = Duration::from_millis(1000);
    let far = DelayProxy::start(upstream, rtt / 2);
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nCOPY . /ctx/\n"));
    for i in 0..50 {
        p.file(&format!("src/f{i}.txt"), &format!("file {i}\n"));
    }
    let direct = std::fs::read_to_string(&p.config).unwrap();
    let build = |port: u16| {
        std::fs::write(&p.config, &direct).unwrap();
        route_through(&p, &sshd, port);
        build_json(&p, "sync/rtt", &[])
    };
    build(near.addr.port());
    // Each address keeps its own docker probe: both are warm from here on.
    build(far.addr.port());
    let mut rounds = Vec::new();
    for _ in 0..3 {
        let base = build(near.addr.port());
        let slow = build(far.addr.port());
        assert_eq!(sync_of(&slow)["mode"], "delta", "{slow}");
        assert_eq!(sync_of(&slow)["files_sent"], 0, "{slow}");
        let extra = after_handshake(&slow) - after_handshake(&base);
        rounds.push(extra / rtt.as_secs_f64());
    }
    eprintln!("round trips after the handshake: {rounds:?}");
    // The smallest of three tries: the machine is shared.
    let best = rounds.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        best <= 4.25,
        "a no-change rebuild waited for {best:.1} round trips after the handshake ({rounds:?})"
    );
}

/// The docker probe runs the docker CLI only when something its answers
/// depend on changed: a wrapper in front of docker on the builder logs each
/// call; a second build asks docker nothing, and a changed docker binary
/// (here: the wrapper rewritten) is asked again.
#[test]
fn the_docker_probe_is_kept_until_docker_changes() {
    if !services() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::with_builder(&sshd, "");
    let bin = tempfile::tempdir().unwrap();
    let wrapper = bin.path().join("docker");
    let calls = bin.path().join("calls");
    let real = crate::support::docker::DOCKER_CLI;
    let write_wrapper = |comment: &str| {
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\n# {comment}\necho \"$*\" >> '{}'\nexec '{real}' \"$@\"\n",
                calls.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    write_wrapper("first");
    let config = std::fs::read_to_string(&p.config).unwrap();
    std::fs::write(
        &p.config,
        config.replace(
            &format!("    docker: {real}\n"),
            &format!("    docker: {}\n", wrapper.display()),
        ),
    )
    .unwrap();
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nCOPY . /ctx/\n"));
    p.file("a.txt", "a\n");
    let probes = || {
        std::fs::read_to_string(&calls)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("version"))
            .count()
    };
    build_json(&p, "sync/probe", &[]);
    let first = probes();
    assert!(first > 0, "the first build did not probe docker");
    build_json(&p, "sync/probe", &[]);
    assert_eq!(probes(), first, "the second build probed docker again");
    // A different docker binary (another size): asked again.
    write_wrapper("an upgraded docker binary");
    build_json(&p, "sync/probe", &[]);
    assert!(probes() > first, "a changed docker binary was not probed");
}

/// With `stream_cold: true`, a cold build streams the context into
/// `docker build -` while the builder unpacks it into its copy: docker's
/// own log says it loaded a remote (tar) context, the image holds every
/// file, the copy is complete and its files are the store's; the next
/// build reads the copy as a folder. A Dockerfile in a subfolder is found
/// inside the stream.
#[test]
fn a_cold_build_streams_the_context_into_docker_build() {
    if !services() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::with_builder(&sshd, "    stream_cold: true\n");
    p.file(
        "build/Dockerfile",
        &format!("FROM {BASE_IMAGE}\nCOPY . /ctx/\n"),
    );
    for i in 0..50 {
        p.file(&format!("src/f{i}.txt"), &format!("file {i}\n").repeat(100));
    }
    let big = random_bytes(3, 3 << 20);
    std::fs::write(p.context.join("big.bin"), &big).unwrap();
    let image = "sync/streamed:t";
    let dockerfile = p.context.join("build/Dockerfile").display().to_string();
    let args = [
        "--tag",
        "t",
        "--json",
        "--dockerfile",
        &dockerfile,
        "--progress",
        "plain",
    ];
    let out = p.build("sync/streamed", &args);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let cold: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sync_of(&cold)["mode"], "full", "{cold}");
    assert_eq!(sync_of(&cold)["streamed"], true, "{cold}");
    assert!(cold["buildkit"].is_boolean(), "{cold}");
    if cold["buildkit"] == true {
        assert!(all.contains("load remote build context"), "{all}");
    }
    assert_eq!(sha_hex(&cat_in_image(image, "/ctx/big.bin")), sha_hex(&big));
    assert_eq!(
        cat_in_image(image, "/ctx/src/f7.txt"),
        "file 7\n".repeat(100).as_bytes()
    );
    // The copy: every file, each linked from the store.
    let copy = copies(&p).pop().unwrap().join("tree");
    assert_same(
        &local_tree(&p.context),
        &builder_tree(&copy),
        "streamed copy",
    );
    let md = std::fs::metadata(copy.join("big.bin")).unwrap();
    assert_eq!(md.nlink(), 2, "the copy's file is the store's");
    assert!(p.run_folders().is_empty(), "{:?}", p.run_folders());

    let out = p.build("sync/streamed", &args);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let same: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sync_of(&same)["mode"], "delta", "{same}");
    assert_eq!(sync_of(&same)["streamed"], false, "{same}");
    if same["buildkit"] == true {
        assert!(!all.contains("load remote build context"), "{all}");
    }
}

/// A `--no-cache` cold build is streamed (nothing is reused anyway); one
/// whose Dockerfile fails stops reading the stream at once: absconda
/// reports docker's failure, and the sync still completes the copy (the
/// next build sends nothing but the change).
#[test]
fn a_streamed_build_that_fails_early_still_completes_the_copy() {
    if !services() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::with_builder(&sshd, "");
    p.file("Dockerfile", "FROM\n");
    std::fs::write(p.context.join("big.bin"), random_bytes(4, 4 << 20)).unwrap();
    let out = p.build("sync/broken", &["--tag", "t", "--no-cache", "--json"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("dockerfile parse error")
            || String::from_utf8_lossy(&out.stderr).contains("FROM requires"),
        "{}",
        text(&out)
    );
    // BuildKit names the context it read: the stream, not the folder.
    let all = text(&out);
    if all.contains("[internal]") {
        assert!(all.contains("load remote build context"), "{all}");
    }
    let copy = copies(&p).pop().unwrap();
    assert_eq!(
        state_of(&p).split(' ').nth(1),
        Some("clean"),
        "{}",
        text(&out)
    );
    assert_same(
        &local_tree(&p.context),
        &builder_tree(&copy.join("tree")),
        "copy after a failed streamed build",
    );
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nCOPY big.bin /\n"),
    );
    let fixed = build_json(&p, "sync/broken", &[]);
    assert_eq!(sync_of(&fixed)["mode"], "delta", "{fixed}");
    assert_eq!(fixed["files_sent"], 1, "{fixed}");
    assert!(p.run_folders().is_empty(), "{:?}", p.run_folders());
}

/// On loopback, where `compression: auto` sends content as it is, a fresh
/// runner's stream of links into the store (headers only) is gzipped: the
/// wire carries about the manifest, not 1.5 KiB of headers a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_a_fresh_runner_on_loopback_sends_its_links_compressed() {
    if !sshd_only() {
        return;
    }
    let sshd = Sshd::start(None);
    let project = Project::with_builder(&sshd, "    compression: auto\n");
    let wire = CountingProxy::start("127.0.0.1:0", ([127, 0, 0, 1], sshd.port).into());
    route_through(&project, &sshd, wire.addr.port());
    let file = absconda::config::load(Some(&project.config)).unwrap();
    let builder = file.builder("local").unwrap();
    let session = Session::connect(&ssh_target(&builder, builder.host.as_deref().unwrap()))
        .await
        .unwrap();
    let ws = project.workspace.clone();
    let root = project.dir.path().join("clients");
    let first = Client::new(&root, "c0");
    write_context(&first.ctx, 11, 1 << 20);
    let s = sync_client(&session, &builder, &first, false, Compression::None, "")
        .await
        .unwrap();
    let entries = s.entries;
    let fresh = Client::clone_of(&root, "c1", &first.ctx, true);
    // One file apart: a copy of its own, of links into the store.
    std::fs::write(fresh.ctx.join("runner.txt"), "runner 1\n").unwrap();
    let before = wire.up();
    let s = sync_client(&session, &builder, &fresh, false, Compression::None, "")
        .await
        .unwrap();
    let sent = wire.up() - before;
    assert_eq!(s.blobs_sent, 1, "only runner.txt is new: {s:?}");
    check_copy(&session, &fresh.ctx, &copy_tree(&ws, &s), "fresh runner").await;
    let manifest: u64 = entries * (32 + 24 + 16);
    eprintln!("fresh runner on loopback: {sent} bytes on the wire for {entries} entries");
    assert!(
        sent <= manifest + (64 << 10),
        "a fresh runner sent {sent} bytes (manifest ~{manifest})"
    );
}

/// With `upload_channels: 3`, a cold send of six new files of 1 to 6 MiB
/// goes over three channels at once, into the store, before the sync's
/// own stream: seen from sshd's side (a wrapper records what each upload
/// channel read, and every upload waits, with a deadline, until another
/// one runs beside it). The image holds every file, the copy matches and
/// links the store, no scratch folder is left, and an unchanged rebuild
/// opens no upload.
#[test]
fn large_new_content_goes_over_several_channels_at_once() {
    if !services() {
        return;
    }
    let d = docker();
    let logs = tempfile::tempdir().unwrap();
    std::fs::set_permissions(logs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let wrap = logs.path().join("wrap.sh");
    std::fs::write(
        &wrap,
        format!(
            r#"case $SSH_ORIGINAL_COMMAND in
  *absconda-put*)
    d={logs}/put.$$
    mkdir "$d" && cat > "$d/in"
    n=0
    while [ "$(ls -d {logs}/put.* | wc -l)" -lt 2 ] && [ "$n" -lt 600 ]; do
      n=$((n + 1)); sleep 0.05
    done
    [ "$(ls -d {logs}/put.* | wc -l)" -lt 2 ] || : > "$d/beside"
    eval "$SSH_ORIGINAL_COMMAND" < "$d/in" ;;
  *) eval "$SSH_ORIGINAL_COMMAND" ;;
esac
"#,
            logs = logs.path().display()
        ),
    )
    .unwrap();
    let sshd = Sshd::start_with(
        Some(&d.host),
        "127.0.0.1",
        None,
        &format!("ForceCommand . {}\n", wrap.display()),
    );
    let p = Project::with_builder(&sshd, "    upload_channels: 3\n    compression: none\n");
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nCOPY . /ctx/\n"));
    for i in 0..20 {
        p.file(&format!("src/f{i}.txt"), &format!("file {i}\n"));
    }
    let mut big = Vec::new();
    for i in 1..=6u64 {
        let data = random_bytes(40 + i, (i as usize) << 20);
        std::fs::write(p.context.join(format!("big{i}.bin")), &data).unwrap();
        big.push(data);
    }
    let image = "sync/channels:t";
    let report = build_json(&p, "sync/channels", &[]);
    assert_eq!(sync_of(&report)["mode"], "full", "{report}");
    let puts: Vec<PathBuf> = std::fs::read_dir(logs.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("put."))
        .collect();
    assert_eq!(puts.len(), 3, "uploads: {puts:?}");
    let mut carried = 0;
    for put in &puts {
        assert!(
            put.join("beside").exists(),
            "{put:?} ran while no other upload did"
        );
        let n = std::fs::metadata(put.join("in")).unwrap().len();
        assert!(n > 6 << 20, "{put:?} carried only {n} bytes");
        carried += n;
    }
    assert!(carried >= 21 << 20, "the uploads carried {carried} bytes");
    // The small files went with them: the sync's stream carries links.
    let small_in_puts = puts
        .iter()
        .filter(|put| {
            let data = std::fs::read(put.join("in")).unwrap();
            data.windows(b"file 7\n".len()).any(|w| w == b"file 7\n")
        })
        .count();
    assert_eq!(small_in_puts, 1, "src/f7.txt is in one upload");
    for (i, data) in big.iter().enumerate() {
        assert_eq!(
            sha_hex(&cat_in_image(image, &format!("/ctx/big{}.bin", i + 1))),
            sha_hex(data)
        );
    }
    assert_eq!(cat_in_image(image, "/ctx/src/f7.txt"), b"file 7\n");
    let copy = copies(&p).pop().unwrap().join("tree");
    assert_same(&local_tree(&p.context), &builder_tree(&copy), "copy");
    for i in 1..=6 {
        let md = std::fs::metadata(copy.join(format!("big{i}.bin"))).unwrap();
        assert_eq!(md.nlink(), 2, "big{i}.bin is not the store's");
    }
    assert!(assert_store_sound(&p.workspace) >= 26);
    let left: Vec<String> = std::fs::read_dir(p.workspace.join("store"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "b" && n != "ttl")
        .collect();
    assert!(left.is_empty(), "left in the store: {left:?}");

    let report = build_json(&p, "sync/channels", &[]);
    assert_eq!(sync_of(&report)["mode"], "delta", "{report}");
    let after = std::fs::read_dir(logs.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("put.")
        })
        .count();
    assert_eq!(after, 3, "an unchanged rebuild opened an upload");
}
