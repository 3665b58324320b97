//! Helpers shared by unit tests: the shells builder-side programs must run in.
//!
//! A shell missing here skips its half of a test with a message outside CI,
//! and fails the test in CI (`CI=true` or `CI=1`), so that nothing passes
//! there without having run.

use std::path::Path;
use std::process::Command;

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Finds `program` on PATH; a missing one fails in CI and is reported elsewhere.
pub fn require(program: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).exists()))
        || (program.contains('/') && Path::new(program).exists());
    if !found {
        assert!(
            !in_ci(),
            "`{program}` is required by this test and CI is set: install it (scripts/install-test-deps.sh)"
        );
        eprintln!("SKIPPED: `{program}` is not installed (this would fail in CI)");
    }
    found
}

/// The shells of stock builders that are installed: dash, busybox sh, sh.
pub fn posix_shells() -> Vec<Vec<&'static str>> {
    let mut shells = Vec::new();
    for argv in [&["dash"][..], &["busybox", "sh"], &["sh"]] {
        if require(argv[0]) {
            shells.push(argv.to_vec());
        }
    }
    shells
}

/// Asserts that every installed builder shell accepts `script` (`sh -n`).
pub fn assert_parses(script: &str) {
    for sh in posix_shells() {
        let status = Command::new(sh[0])
            .args(&sh[1..])
            .args(["-n", "-c", script])
            .status()
            .unwrap_or_else(|e| panic!("cannot start {sh:?}: {e}"));
        assert!(status.success(), "{sh:?} -n rejects:\n{script}");
    }
}

/// busybox sh and a folder under `dir` holding busybox's applets (and
/// util-linux's flock, which Debian's busybox lacks, and zstd, which
/// builders with busybox may have), to put first on PATH: the builder
/// scripts run there with busybox's tools alone. `None` (a failure in CI)
/// without busybox.
pub fn busybox_shell(dir: &std::path::Path) -> Option<(Vec<String>, String)> {
    let bb = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let Some(bb) = bb else {
        require("busybox");
        return None;
    };
    let bin = dir.join("bb-bin");
    std::fs::create_dir_all(&bin).unwrap();
    for applet in [
        "sh",
        "find",
        "stat",
        "sort",
        "sha256sum",
        "tar",
        "xargs",
        "tr",
        "cut",
        "readlink",
        "chmod",
        "rm",
        "mkdir",
        "mv",
        "ln",
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
    ] {
        let _ = std::os::unix::fs::symlink(bb, bin.join(applet));
    }
    let _ = std::os::unix::fs::symlink("/usr/bin/flock", bin.join("flock"));
    let _ = std::os::unix::fs::symlink("/usr/bin/zstd", bin.join("zstd"));
    Some((vec![bb.to_string(), "sh".into()], bin.display().to_string()))
}
