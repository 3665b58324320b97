//! `--build-context`: named folders are synced to their own copy on the
//! builder (with their own `.dockerignore`) and handed to `docker build` as
//! `--build-context NAME=<copy>`; a builder whose `docker build` does not
//! take `--build-context` (no buildx plugin) is refused before anything is
//! sent.
//!
//! The machine the tests run on has dockerd 20.10 and docker CLIs without
//! the buildx plugin (and no network to fetch it), so no test here runs a
//! build that uses a named context end to end on the docker side.

use std::path::{Path, PathBuf};
use std::time::Duration;

use absconda::build::{acquire_lease, ssh_target};
use absconda::context::Compression;
use absconda::named_contexts::{docker_args, parse_all, prepare, sync};
use absconda::report::Silent;
use absconda::ssh::Session;

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, docker};
use crate::support::sshd::{SSHD, Sshd};

fn write(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

/// Every file under `root`, relative path → content.
fn files(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(root).unwrap().display().to_string();
                out.push((rel, std::fs::read_to_string(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_folder_gets_its_own_copy_with_its_own_dockerignore() {
    if !crate::support::require(SSHD) {
        return;
    }
    let sshd = Sshd::start(None);
    let p = Project::with_builder(&sshd, "");
    let lib = p.dir.path().join("lib folder");
    write(&lib, "a.txt", "alpha\n");
    write(&lib, "sub/b.txt", "beta\n");
    write(&lib, "sub/skip.tmp", "ignored\n");
    write(&lib, ".dockerignore", "**/*.tmp\n");
    // The main context's ignore file does not apply to the named folder.
    write(&p.context, ".dockerignore", "*.txt\n");

    let file = absconda::config::load(Some(&p.config)).unwrap();
    let builder = file.builder("local").unwrap();
    let target = ssh_target(&builder, builder.host.as_deref().unwrap());
    let session = Session::connect(&target).await.unwrap();
    let lease = acquire_lease(&session, &builder, Duration::from_secs(30), None, &Silent)
        .await
        .unwrap();
    let cache = p.dir.path().join("cache");
    let specs = vec![
        format!("lib={}", lib.display()),
        format!("base=docker-image://{BASE_IMAGE}"),
    ];
    let named = parse_all(&specs).unwrap();

    let walk = |named: Vec<_>| async move {
        tokio::task::spawn_blocking(move || prepare(&named))
            .await
            .unwrap()
            .unwrap()
    };
    let prepared = walk(named.clone()).await;
    let synced = sync(
        &session,
        &builder,
        prepared,
        Compression::Gzip,
        false,
        Some(cache.clone()),
        &Silent,
    )
    .await
    .unwrap();
    assert_eq!(synced.len(), 1, "only the folder is synced");
    let tree = PathBuf::from(&synced[0].tree);
    let contexts = std::fs::canonicalize(p.workspace.join("contexts")).unwrap();
    assert!(
        std::fs::canonicalize(&tree).unwrap().starts_with(&contexts),
        "{}",
        tree.display()
    );
    assert_eq!(
        files(&tree),
        [
            (".dockerignore".to_string(), "**/*.tmp\n".to_string()),
            ("a.txt".into(), "alpha\n".into()),
            ("sub/b.txt".into(), "beta\n".into()),
        ]
    );
    assert_eq!(synced[0].summary.mode, "full");
    assert_eq!(
        docker_args(&named, &synced),
        [
            "--build-context".to_string(),
            format!("lib={}", synced[0].tree),
            "--build-context".into(),
            format!("base=docker-image://{BASE_IMAGE}"),
        ]
    );

    // The next build sends only what changed, into the same copy.
    write(&lib, "a.txt", "alpha 2\n");
    let again = sync(
        &session,
        &builder,
        walk(named.clone()).await,
        Compression::Gzip,
        false,
        Some(cache),
        &Silent,
    )
    .await
    .unwrap();
    assert_eq!(again[0].tree, synced[0].tree);
    assert_eq!(again[0].summary.mode, "delta");
    assert_eq!(again[0].summary.files_sent, 1);
    assert_eq!(
        std::fs::read_to_string(tree.join("a.txt")).unwrap(),
        "alpha 2\n"
    );
    assert!(lease.release(Duration::from_secs(30)).await);
    session.close().await;
}

#[test]
fn a_builder_without_buildx_is_refused_before_anything_is_sent() {
    crate::require!(SSHD, "dockerd");
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::with_builder(&sshd, "    buildkit: on\n");
    p.file("Dockerfile", "FROM base\nCOPY --from=lib a.txt /a.txt\n");
    let lib = p.dir.path().join("lib");
    write(&lib, "a.txt", "alpha\n");
    for spec in [
        format!("lib={}", lib.display()),
        format!("base=docker-image://{BASE_IMAGE}"),
    ] {
        let out = p.build("named/app", &["--build-context", &spec]);
        assert_eq!(out.status.code(), Some(9), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(
                "caused by: `--build-context` needs `docker build` with the buildx plugin"
            ) && err.contains(
                "does not take `--build-context`: the docker-buildx plugin is not installed"
            ) && err.contains("hint: install the docker-buildx plugin on the builder")
                && err.contains("docker-buildx-plugin"),
            "{err}"
        );
        // Nothing sent: no copy of the context or of the named folder.
        let copies = std::fs::read_dir(p.workspace.join("contexts"))
            .map(|rd| rd.count())
            .unwrap_or(0);
        assert_eq!(copies, 0);
        assert!(p.run_folders().is_empty());
    }
    // Set to the legacy builder: a different reason, a different fix.
    let p = Project::with_builder(&sshd, "    buildkit: off\n");
    p.file("Dockerfile", "FROM base\n");
    let out = p.build(
        "named/legacy",
        &[
            "--build-context",
            &format!("base=docker-image://{BASE_IMAGE}"),
        ],
    );
    assert_eq!(out.status.code(), Some(9), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the legacy builder (`buildkit: off`)")
            && err.contains("hint: remove `buildkit: off`"),
        "{err}"
    );
}

#[test]
fn bad_build_context_specs_are_usage_errors() {
    crate::require!(SSHD);
    let sshd = Sshd::start(None);
    let p = Project::new(&sshd);
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
    for (spec, says) in [
        ("lib", "expected `NAME=DIR`"),
        ("lib=/does/not/exist", "is not a folder"),
        ("lib=oci-layout:///x", "`oci-layout://` is not supported"),
    ] {
        let out = p.build("named/bad", &["--build-context", spec]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{spec}: {err}");
    }
}
