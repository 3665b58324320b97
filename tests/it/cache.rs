//! A registry cache: one build exports it (inline, in the pushed image), a
//! second build on a builder whose build cache was emptied imports it.

use std::time::Instant;

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, docker, registry};
use crate::support::sshd::{SSHD, Sshd};

#[test]
fn an_inline_cache_in_the_registry_survives_an_emptied_builder() {
    crate::require!(SSHD, "dockerd", "docker-registry", "htpasswd", "curl");
    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    let mut p = Project::with_builder(&sshd, "    buildkit: on\n");
    p.with_registry_credentials(reg);
    // A slow step whose output differs on every run: the same stamp in the
    // second image proves the step came from the cache.
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nRUN sleep 3 && cat /proc/sys/kernel/random/uuid > /stamp\n"),
    );
    let repo = format!("{}/cache/app", reg.addr);
    let cache_ref = format!("type=registry,ref={repo}:one");
    let t = Instant::now();
    let out = p.build(
        &repo,
        &[
            "-t",
            "one",
            "--push",
            "--network",
            "none",
            "--cache-to",
            "type=inline",
        ],
    );
    let first = t.elapsed();
    assert!(out.status.success(), "{}", text(&out));

    // An empty builder: no build cache, no local copy of the image.
    let _ = d.run(&["rmi", "-f", &format!("{repo}:one")]);
    let prune = d.run(&["builder", "prune", "-af"]);
    assert!(prune.status.success());

    let t = Instant::now();
    let out = p.build(
        &repo,
        &[
            "-t",
            "two",
            "--push",
            "--network",
            "none",
            "--cache-from",
            &cache_ref,
        ],
    );
    let second = t.elapsed();
    assert!(out.status.success(), "{}", text(&out));
    let log = text(&out);
    assert!(
        log.contains("CACHED") && log.contains("RUN sleep 3"),
        "no cache hit in the log: {log}"
    );
    let one = reg.files("cache/app", "one");
    let two = reg.files("cache/app", "two");
    assert!(one.get("stamp").is_some_and(|s| s.len() > 30));
    assert_eq!(one.get("stamp"), two.get("stamp"), "the step ran again");
    eprintln!("first build {first:?}, second build (cache imported) {second:?}");
}

#[test]
fn an_exported_cache_without_buildx_is_a_clear_error() {
    crate::require!(SSHD, "dockerd");
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::with_builder(&sshd, "    buildkit: on\n");
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
    let out = p.build(
        "127.0.0.1:1/cache/x",
        &[
            "--cache-to",
            "type=registry,ref=127.0.0.1:1/cache/x:c,mode=max",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not buildx") && err.contains("type=inline"),
        "{err}"
    );
}
