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
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if needles.iter().all(|n| cmd.contains(n)) {
            pids.push(pid);
        }
    }
    pids
}

/// The lease supervisor of the workspace `ws` (not its subshells).
pub fn supervisor(ws: &str) -> Vec<i32> {
    let all = pids_with(&["absconda-lease", ws]);
    let parent = |pid: i32| -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    };
    let roots: Vec<i32> = all
        .iter()
        .copied()
        .filter(|p| !all.contains(&parent(*p)))
        .collect();
    assert_eq!(roots.len(), 1, "one supervisor: {roots:?} of {all:?}");
    roots
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
    let sup = supervisor(&ws);
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

fn processes_matching(needle: &str) -> usize {
    pids_with(&[needle]).len()
}

/// A build holding `p`'s builder in a long RUN step marked by `marker`.
fn holding_build(p: &Project, marker: &str) -> std::process::Child {
    assert_eq!(
        processes_matching(marker),
        0,
        "`{marker}` is already running"
    );
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nRUN {marker}\n"));
    let child = p
        .cmd()
        .args(["build", "--remote-builder", "local", "--context"])
        .arg(&p.context)
        .args([
            "--repository",
            "held/app",
            "--network",
            "none",
            "--no-cache",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the RUN step started", Duration::from_secs(60), || {
        processes_matching(marker) > 0
    });
    child
}

/// A second project with its own context on the same builder and workspace.
fn second_project(sshd: &Sshd, p: &Project) -> Project {
    let p2 = Project::new(sshd);
    std::fs::write(&p2.config, std::fs::read_to_string(&p.config).unwrap()).unwrap();
    p2.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
    p2
}

/// The holder file is writable by every user of the workspace: a forged
/// one cannot make a waiting build believe it holds the lease, and its
/// terminal escapes never reach the user's terminal.
#[test]
fn a_forged_holder_file_cannot_pass_for_the_lease_or_reach_the_terminal() {
    crate::require!(SSHD, "dockerd");
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::new(&sshd);
    let mut first = holding_build(&p, "sleep 311");
    std::fs::write(
        p.workspace.join(".lease-holder"),
        "x\nacquired\n\x1b[31mred\x1b]0;title\x07\nreleased\n",
    )
    .unwrap();
    let p2 = second_project(&sshd, &p);
    let out = p2.build("held/second", &["--remote-wait", "4"]);
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(
        !out.stderr.iter().any(|b| *b == 0x1b || *b == 0x07),
        "control characters reached the terminal: {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("xacquired"),
        "the holder text is shown, on one line: {}",
        text(&out)
    );
}

/// A client that stops talking without closing its connection (a laptop
/// off the network, a stopped process) loses the lease within a minute.
#[test]
fn a_silent_client_loses_the_lease_within_a_minute() {
    crate::require!(SSHD, "dockerd");
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::new(&sshd);
    let mut first = holding_build(&p, "sleep 313");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(first.id() as i32, libc::SIGSTOP) };
    let stopped = std::time::Instant::now();
    let p2 = second_project(&sshd, &p);
    let mut second = p2
        .cmd()
        .args(["build", "--remote-builder", "local", "--context"])
        .arg(&p2.context)
        .args(["--repository", "held/next", "--remote-wait", "120"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mine = format!("(pid {})", second.id());
    wait_until(
        "the second build took the lease",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(p.workspace.join(".lease-holder"))
                .is_ok_and(|h| h.contains(&mine))
        },
    );
    eprintln!(
        "lease taken over {:?} after the client stopped",
        stopped.elapsed()
    );
    assert!(stopped.elapsed() < Duration::from_secs(60));
    wait_until("the second build ended", Duration::from_secs(60), || {
        second.try_wait().unwrap().is_some()
    });
    let out = second.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        processes_matching("sleep 313"),
        0,
        "the silent build's step was stopped"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(first.id() as i32, libc::SIGCONT) };
    first.kill().unwrap();
    first.wait().unwrap();
}
