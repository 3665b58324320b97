//! Faults of the lease supervisor itself: killed, out of memory, a reboot.
//! The client notices, the build fails as a lost builder, and whatever the
//! dead lease left (a run folder with a registry login) is swept by the
//! next lease and reported by `remote health` until then.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, DOCKER_CLI, docker, registry};
use crate::support::sshd::{SSHD, Sshd};
use crate::support::wait_until;

fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return hits;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(md) = p.symlink_metadata() else {
            continue;
        };
        if md.is_dir() {
            hits.extend(files_containing(&p, needle));
        } else if md.is_file()
            && std::fs::read(&p).is_ok_and(|d| d.windows(needle.len()).any(|w| w == needle))
        {
            hits.push(p);
        }
    }
    hits
}

/// Processes whose command line holds every one of `needles`.
pub fn pids_with(needles: &[&str]) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if needles.iter().all(|n| cmd.contains(n)) {
            pids.push(pid);
        }
    }
    pids
}

/// The builder's docker with a `push` that waits until the test lets it go
/// (or its folder is gone with the test).
fn gated_docker(p: &Project) -> PathBuf {
    let gate = p.dir.path().join("gate");
    std::fs::create_dir_all(&gate).unwrap();
    let wrapper = p.dir.path().join("gated-docker");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = push ]; then\n  : > '{g}/pushing'\n  while [ -d '{g}' ] && [ ! -e '{g}/go' ]; do sleep 0.1; done\nfi\nexec {DOCKER_CLI} \"$@\"\n",
            g = gate.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = std::fs::read_to_string(&p.config).unwrap();
    std::fs::write(
        &p.config,
        config.replace(
            &format!("docker: {DOCKER_CLI}\n"),
            &format!("docker: {}\n", wrapper.display()),
        ),
    )
    .unwrap();
    gate
}

#[test]
fn a_supervisor_killed_during_the_push_fails_the_build_and_leaves_no_login() {
    crate::require!(SSHD, "dockerd", "docker-registry");
    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    let mut p = Project::new(&sshd);
    p.with_registry_credentials(reg);
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nCOPY x /x\n"));
    p.file("x", "x\n");
    let gate = gated_docker(&p);
    let ws = p.workspace.display().to_string();

    let mut child = p
        .cmd()
        .args(["build", "--remote-builder", "local", "--context"])
        .arg(&p.context)
        .args([
            "--repository",
            &format!("{}/killed/sup", reg.addr),
            "--tag",
            "t",
            "--push",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the push started", Duration::from_secs(120), || {
        gate.join("pushing").exists()
    });
    let login = p.run_folders()[0].join(".docker/config.json");
    assert!(login.exists(), "the login is in the run folder");
    let sup = pids_with(&["absconda-lease", &ws]);
    assert_eq!(sup.len(), 1, "one supervisor: {sup:?}");
    // SAFETY: kill(2) of the supervisor this test started through sshd.
    unsafe { libc::kill(sup[0], libc::SIGKILL) };

    wait_until("the client gave up", Duration::from_secs(30), || {
        child.try_wait().unwrap().is_some()
    });
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("lease supervisor"), "{}", text(&out));
    assert!(reg.tags("killed/sup").is_empty(), "nothing was pushed");

    // Until the next lease, `remote health` reports the leftover.
    let health = p
        .cmd()
        .args(["remote", "health", "local", "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&health.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&health)));
    let runs = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "runs")
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(runs["status"], "warn", "{report}");

    // The next build's lease sweeps it, and stops the orphaned push.
    let out = p.build("killed/next", &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(p.run_folders().is_empty(), "{:?}", p.run_folders());
    wait_until(
        "the orphaned push was stopped",
        Duration::from_secs(10),
        || pids_with(&[&gate.display().to_string()]).is_empty(),
    );
    let _ = std::fs::write(gate.join("go"), "");
    let hits = files_containing(p.dir.path(), reg.password.as_bytes());
    assert!(hits.is_empty(), "the password is on disk in {hits:?}");
    let report: serde_json::Value = serde_json::from_slice(
        &p.cmd()
            .args(["remote", "health", "local", "--json"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "runs" && c["status"] == "ok"),
        "{report}"
    );
}
