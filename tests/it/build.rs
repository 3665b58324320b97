//! A whole build and push, checked in the registry and by running the image.

use crate::support::absconda::{Project, run_pulled, text};
use crate::support::docker::{BASE_IMAGE, docker, registry};
use crate::support::sshd::{SSHD, Sshd};

fn services() -> bool {
    crate::support::require(SSHD)
        && crate::support::require("dockerd")
        && crate::support::require("docker-registry")
        && crate::support::require("htpasswd")
}

#[test]
fn pushes_every_tag_with_the_context_minus_dockerignore() {
    if !services() {
        return;
    }
    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    let mut p = Project::new(&sshd);
    p.with_registry_credentials(reg);
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nCOPY . /app/\nCMD [\"cat\", \"/app/hello.txt\"]\n"),
    );
    p.file("hello.txt", "hello from absconda\n");
    p.file("src/main.c", "int main() { return 0; }\n");
    p.file("secret.env", "TOKEN=do-not-ship\n");
    p.file("logs/a.log", "noise\n");
    p.file("logs/keep.log", "keep me\n");
    p.file("docs/readme.md", "docs\n");
    p.file("notes.md", "root md\n");
    p.file(".dockerignore", "secret.env\nlogs\n!logs/keep.log\n*.md\n");
    std::os::unix::fs::symlink("hello.txt", p.context.join("link-to-hello")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", p.context.join("link-outside")).unwrap();

    let repo = format!("{}/team/app", reg.addr);
    let out = p.build(&repo, &["--tag", "v1", "--tag", "latest", "--push"]);
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("sent "), "summary line missing: {stderr}");
    for phase in ["connect", "lease", "upload", "build", "push"] {
        assert!(
            stderr.contains(&format!("{phase} ")),
            "phase {phase} missing in summary: {stderr}"
        );
    }

    assert_eq!(reg.tags("team/app"), ["latest", "v1"]);
    let files = reg.files("team/app", "v1");
    assert_eq!(
        files.get("app/hello.txt").map(|v| v.as_slice()),
        Some(&b"hello from absconda\n"[..])
    );
    assert!(files.contains_key("app/src/main.c"));
    assert_eq!(
        files.get("app/logs/keep.log").map(|v| v.as_slice()),
        Some(&b"keep me\n"[..])
    );
    assert!(
        files.contains_key("app/docs/readme.md"),
        "`*.md` only matches at the root"
    );
    for absent in ["app/secret.env", "app/logs/a.log", "app/notes.md"] {
        assert!(
            !files.contains_key(absent),
            "{absent} should have been ignored"
        );
    }
    // Symlinks arrive as links; the one pointing outside is not followed.
    assert!(files.contains_key("app/link-to-hello"));
    assert!(files.get("app/link-outside").is_some_and(|v| v.is_empty()));

    let run = run_pulled(d, reg, &format!("{repo}:latest"), &[]);
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "hello from absconda\n"
    );
    assert!(
        p.run_folders().is_empty(),
        "run folder left behind: {:?}",
        p.run_folders()
    );
}

#[test]
fn legacy_builder_and_buildkit_both_work() {
    if !services() {
        return;
    }
    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    for (mode, repo) in [("off", "modes/legacy"), ("on", "modes/buildkit")] {
        let mut p = Project::with_builder(&sshd, &format!("    buildkit: {mode}\n"));
        p.with_registry_credentials(reg);
        p.file(
            "Dockerfile",
            &format!("FROM {BASE_IMAGE} AS base\nARG GREETING\nRUN echo \"$GREETING\" > /greeting\nFROM base AS final\nRUN cat /greeting > /final\n"),
        );
        let full = format!("{}/{repo}", reg.addr);
        let out = p.build(
            &full,
            &[
                "--tag",
                "t",
                "--push",
                "--network",
                "none",
                "--build-arg",
                &format!("GREETING=hi {mode}"),
                "--target",
                "final",
                "--json",
            ],
        );
        assert!(out.status.success(), "{mode}: {}", text(&out));
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("--json on stdout");
        assert_eq!(report["buildkit"], mode == "on");
        let files = reg.files(repo, "t");
        assert_eq!(
            files
                .get("final")
                .map(|v| String::from_utf8_lossy(v).into_owned()),
            Some(format!("hi {mode}\n"))
        );
    }
}

#[test]
fn a_failing_dockerfile_exits_5_with_the_output() {
    if !services() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::new(&sshd);
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nRUN echo about-to-fail && exit 3\n"),
    );
    let out = p.build("127.0.0.1:1/none/app", &["--tag", "x", "--network", "none"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        all.contains("about-to-fail"),
        "build output was not streamed: {all}"
    );
    assert!(
        all.contains("error: build on builder `local` failed"),
        "{all}"
    );
    assert!(
        all.contains("`docker build` failed on `local` (exit status"),
        "{all}"
    );
    assert!(p.run_folders().is_empty());
}
