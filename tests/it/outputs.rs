//! `--output`: the result streamed back to this machine, compared byte for
//! byte with what docker writes locally from the same context.

use std::collections::BTreeMap;
use std::path::Path;

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, docker, registry};
use crate::support::sshd::{SSHD, Sshd};

/// Every file under `root`: relative path → (mode, content).
fn tree(root: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            if md.is_dir() {
                stack.push(e.path());
                out.insert(rel, (md.permissions().mode(), Vec::new()));
            } else {
                let content = if md.is_file() {
                    std::fs::read(e.path()).unwrap()
                } else {
                    std::fs::read_link(e.path())
                        .unwrap()
                        .display()
                        .to_string()
                        .into_bytes()
                };
                out.insert(rel, (md.permissions().mode(), content));
            }
        }
    }
    out
}

#[test]
fn local_and_tar_outputs_match_what_docker_writes_locally() {
    crate::require!(SSHD, "dockerd", "docker-registry", "htpasswd", "curl");
    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    let mut p = Project::with_builder(&sshd, "    buildkit: on\n");
    p.with_registry_credentials(reg);
    p.file(
        "Dockerfile",
        &format!(
            "FROM {BASE_IMAGE} AS build\nRUN mkdir -p /out/sub && echo built > /out/built && chmod 750 /out/sub\nFROM scratch\nCOPY --from=build /out/ /\nCOPY data/ /data/\n"
        ),
    );
    p.file("data/a.txt", "alpha\n");
    p.file("data/big.bin", &"0123456789abcdef".repeat(64 * 1024));

    // docker's own outputs from the same context.
    let local = p.dir.path().join("docker-out");
    let st = d
        .cmd()
        .env("DOCKER_BUILDKIT", "1")
        .args(["build", "--network", "none", "--output"])
        .arg(format!("type=local,dest={}", local.display()))
        .arg(&p.context)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let local_tar = p.dir.path().join("docker-out.tar");
    let st = d
        .cmd()
        .env("DOCKER_BUILDKIT", "1")
        .args(["build", "--network", "none", "--output"])
        .arg(format!("type=tar,dest={}", local_tar.display()))
        .arg(&p.context)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );

    // absconda's, through the builder, with a push at the same time.
    let dest = p.dir.path().join("absconda-out");
    let repo = format!("{}/outputs/app", reg.addr);
    let out = p.build(
        &repo,
        &[
            "--network",
            "none",
            "--push",
            "-o",
            &format!("type=local,dest={}", dest.display()),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let got = tree(&dest);
    assert!(got.contains_key("data/big.bin") && got.contains_key("built"));
    assert_eq!(got, tree(&local), "local output differs from docker's");
    assert_eq!(
        reg.tags("outputs/app"),
        ["latest"],
        "the push did not happen"
    );

    let tar_dest = p.dir.path().join("absconda-out.tar");
    let out = p.build(
        &repo,
        &[
            "--network",
            "none",
            "--output",
            &format!("type=tar,dest={}", tar_dest.display()),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read(&tar_dest).unwrap(),
        std::fs::read(&local_tar).unwrap(),
        "tar output differs from docker's"
    );
    // No temporary names left next to the outputs.
    let leftovers: Vec<String> = std::fs::read_dir(p.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_failed_build_leaves_no_output_file() {
    crate::require!(SSHD, "dockerd");
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::with_builder(&sshd, "    buildkit: on\n");
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nRUN exit 3\n"));
    let dest = p.dir.path().join("never.tar");
    let out = p.build(
        "outputs/fail",
        &[
            "--network",
            "none",
            "-o",
            &format!("type=tar,dest={}", dest.display()),
        ],
    );
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    let names: Vec<String> = std::fs::read_dir(p.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("never"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

#[test]
fn the_download_reports_progress_in_plain_lines_and_quiet_silences_it() {
    crate::require!(SSHD, "dockerd");
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::with_builder(&sshd, "    buildkit: on\n");
    p.file("Dockerfile", "FROM scratch\nCOPY data/ /data/\n");
    p.file("data/big.bin", &"0123456789abcdef".repeat(128 * 1024));

    // stderr is not a terminal here: plain lines, no bar, no cursor moves.
    let dest = p.dir.path().join("out.tar");
    let out = p.build(
        "outputs/progress",
        &["--output", &format!("type=tar,dest={}", dest.display())],
    );
    assert!(out.status.success(), "{}", text(&out));
    let size = std::fs::metadata(&dest).unwrap().len();
    assert!(size > 2 * 1024 * 1024);
    let err = String::from_utf8_lossy(&out.stderr);
    let progress: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("absconda: receiving the build output: "))
        .collect();
    assert!(!progress.is_empty(), "no progress line: {err}");
    for l in &progress {
        let rest = l.trim_start_matches("absconda: receiving the build output: ");
        let (bytes, rate) = rest
            .split_once(" received, ")
            .unwrap_or_else(|| panic!("{l}"));
        assert!(bytes.ends_with('B'), "{l}");
        assert!(rate.ends_with("B/s"), "{l}");
    }
    let done = err
        .lines()
        .find(|l| l.starts_with("absconda: received ") && l.contains(" of build output in "))
        .unwrap_or_else(|| panic!("no summary line: {err}"));
    assert!(
        done.contains(&crate_human(size)) && done.ends_with("/s)"),
        "{done}"
    );
    assert!(!err.contains('\r') && !err.contains('\u{1b}'), "{err:?}");

    // --quiet: none of it.
    let quiet_dest = p.dir.path().join("quiet.tar");
    let mut c = p.cmd();
    c.args(["--quiet", "build", "--remote-builder", "local", "--context"])
        .arg(&p.context)
        .args(["--repository", "outputs/progress", "--output"])
        .arg(format!("type=tar,dest={}", quiet_dest.display()));
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::metadata(&quiet_dest).unwrap().len(), size);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("build output"), "{err}");
}

/// Bytes as absconda writes them (`2.0 MiB`).
fn crate_human(n: u64) -> String {
    absconda::util::human_bytes(n)
}
