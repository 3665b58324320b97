//! The builder lease: builds take turns, a dead client releases at once,
//! Ctrl-C kills the remote build and cleans up.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, docker, registry};
use crate::support::sshd::{SSHD, Sshd};
use crate::support::wait_until;

fn ok() -> bool {
    crate::support::require(SSHD) && crate::support::require("dockerd")
}

fn processes_matching(needle: &str) -> usize {
    let out = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

#[test]
fn two_builds_at_once_take_turns() {
    if !ok() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::new(&sshd);
    // Each build records when its RUN step starts and ends; the intervals must not overlap.
    p.file(
        "Dockerfile",
        &format!(
            "FROM {BASE_IMAGE}\nARG N\n\
             RUN echo \"mark start $N $(cat /proc/uptime)\" && sleep 3 && echo \"mark end $N $(cat /proc/uptime)\"\n"
        ),
    );
    let spawn = |n: &str| {
        let mut c = p.cmd();
        c.args(["build", "--remote-builder", "local", "--context"])
            .arg(&p.context)
            .args([
                "--repository",
                "turns/app",
                "--tag",
                n,
                "--network",
                "none",
                "--no-cache",
                "--build-arg",
            ])
            .arg(format!("N={n}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c.spawn().unwrap()
    };
    let a = spawn("a");
    let b = spawn("b");
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", text(&a));
    assert!(b.status.success(), "{}", text(&b));
    // The builder's clock (seconds since boot) as each step printed it in
    // the streamed log.
    let mark = |o: &std::process::Output, what: &str, n: &str| -> f64 {
        let log = String::from_utf8_lossy(&o.stderr).into_owned();
        let needle = format!("mark {what} {n} ");
        log.match_indices(&needle)
            .map(|(i, _)| &log[i + needle.len()..])
            .find_map(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no `{needle}<time>` in the log:\n{log}"))
    };
    let (sa, ea) = (mark(&a, "start", "a"), mark(&a, "end", "a"));
    let (sb, eb) = (mark(&b, "start", "b"), mark(&b, "end", "b"));
    assert!(sa < ea && sb < eb, "a {sa}..{ea}, b {sb}..{eb}");
    assert!(
        ea <= sb || eb <= sa,
        "the RUN steps overlapped: a {sa}..{ea}, b {sb}..{eb}"
    );
    eprintln!("RUN steps: a {sa}..{ea}, b {sb}..{eb} (builder uptime)");
    let waited = [&a, &b]
        .iter()
        .filter(|o| String::from_utf8_lossy(&o.stderr).contains("is busy: held by tester@"))
        .count();
    assert_eq!(
        waited,
        1,
        "exactly one build waited, naming the holder:\n{}\n{}",
        text(&a),
        text(&b)
    );
    assert!(p.run_folders().is_empty());
}

#[test]
fn a_lease_wait_that_runs_out_exits_7() {
    if !ok() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::new(&sshd);
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nRUN sleep 8\n"));
    let mut first = p.cmd();
    first
        .args(["build", "--remote-builder", "local", "--context"])
        .arg(&p.context)
        .args([
            "--repository",
            "wait/app",
            "--network",
            "none",
            "--no-cache",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let first = first.spawn().unwrap();
    wait_until(
        "first build holds the lease",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(p.workspace.join(".lease-holder"))
                .is_ok_and(|s| !s.trim().is_empty())
        },
    );
    let out = p.build("wait/app", &["--remote-wait", "2", "--network", "none"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is busy: tester@"), "{err}");
    assert!(err.contains("--remote-wait"), "{err}");
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success(), "{}", text(&first));
}

#[test]
fn a_killed_client_releases_the_lease_within_seconds() {
    if !ok() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::new(&sshd);
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nRUN sleep 47\n"));
    let mut c = p.cmd();
    c.args(["build", "--remote-builder", "local", "--context"])
        .arg(&p.context)
        .args([
            "--repository",
            "killed/app",
            "--network",
            "none",
            "--no-cache",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    wait_until("the RUN step started", Duration::from_secs(30), || {
        processes_matching("sleep 47") > 0
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let t = Instant::now();
    let p2 = Project::new(&sshd);
    // Same workspace: the second project must point at the first one's.
    std::fs::write(&p2.config, std::fs::read_to_string(&p.config).unwrap()).unwrap();
    p2.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
    let out = p2.build("killed/next", &["--remote-wait", "30"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "lease took {:?} to be released",
        t.elapsed()
    );
    wait_until(
        "the orphaned build was killed",
        Duration::from_secs(15),
        || processes_matching("sleep 47") == 0,
    );
    assert!(p.run_folders().is_empty(), "{:?}", p.run_folders());
}

#[test]
fn ctrl_c_kills_the_remote_build_and_leaves_no_run_folder() {
    interrupt_cleans_up(libc::SIGINT);
}

/// CI systems cancel a job with SIGTERM: the same cleanup must run.
#[test]
fn sigterm_cleans_up_like_ctrl_c() {
    interrupt_cleans_up(libc::SIGTERM);
}

fn interrupt_cleans_up(signal: i32) {
    if !ok() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let mut p = Project::new(&sshd);
    let reg = registry();
    p.with_registry_credentials(reg);
    let marker = format!("sleep 5{signal}");
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nRUN {marker}\n"));
    let mut c = p.cmd();
    c.args(["build", "--remote-builder", "local", "--context"])
        .arg(&p.context)
        .args([
            "--repository",
            &format!("{}/ctrlc/app{signal}", reg.addr),
            "--network",
            "none",
            "--no-cache",
            "--push",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    wait_until("the RUN step started", Duration::from_secs(30), || {
        processes_matching(&marker) > 0
    });
    assert_eq!(p.run_folders().len(), 1);
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    assert!(t.elapsed() < Duration::from_secs(20));
    assert_eq!(
        processes_matching(&marker),
        0,
        "the remote RUN step is still running"
    );
    assert!(
        p.run_folders().is_empty(),
        "run folder left: {:?}",
        p.run_folders()
    );
    let holder = std::fs::read_to_string(p.workspace.join(".lease-holder")).unwrap_or_default();
    assert!(holder.trim().is_empty(), "lease still held by {holder}");
    assert!(reg.tags(&format!("ctrlc/app{signal}")).is_empty());
}

/// A second Ctrl-C quits at once, even while the cleanup after the first
/// one is stuck on a link to the builder that went silent.
#[test]
fn a_second_ctrl_c_quits_at_once() {
    if !ok() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::new(&sshd);
    let wire = crate::support::counting_proxy::CountingProxy::start(
        "127.0.0.1:0",
        ([127, 0, 0, 1], sshd.port).into(),
    );
    let kh = std::fs::read_to_string(&sshd.known_hosts).unwrap();
    std::fs::write(
        &sshd.known_hosts,
        format!(
            "{kh}[127.0.0.1]:{} {}\n",
            wire.addr.port(),
            sshd.host_key_pub
        ),
    )
    .unwrap();
    let config = std::fs::read_to_string(&p.config).unwrap();
    std::fs::write(
        &p.config,
        config.replace(
            &format!("port: {}\n", sshd.port),
            &format!("port: {}\n", wire.addr.port()),
        ),
    )
    .unwrap();
    let marker = "sleep 61";
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nRUN {marker}\n"));
    let mut c = p.cmd();
    c.args(["build", "--remote-builder", "local", "--context"])
        .arg(&p.context)
        .args([
            "--repository",
            "ctrlc/twice",
            "--network",
            "none",
            "--no-cache",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let stderr = stderr.clone();
        let mut pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                stderr
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    wait_until("the RUN step started", Duration::from_secs(60), || {
        processes_matching(marker) > 0
    });
    // The link goes silent: the cleanup after the first Ctrl-C cannot finish.
    wire.pause();
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    wait_until(
        "the first Ctrl-C was taken",
        Duration::from_secs(10),
        || {
            stderr
                .lock()
                .unwrap()
                .contains("Ctrl-C again to quit at once")
        },
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "absconda ended before the second Ctrl-C"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t = Instant::now();
    let mut status = None;
    wait_until("absconda quit", Duration::from_secs(10), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let quit_after = t.elapsed();
    reader.join().unwrap();
    assert_eq!(
        status.unwrap().code(),
        Some(130),
        "{}",
        stderr.lock().unwrap()
    );
    assert!(
        quit_after < Duration::from_secs(2),
        "quit {quit_after:?} after the second Ctrl-C"
    );
    // Once the link is back, the builder's lease supervisor sees the client
    // gone and stops the build.
    wire.resume();
    drop(wire);
    wait_until(
        "the orphaned build was killed",
        Duration::from_secs(60),
        || processes_matching(marker) == 0,
    );
}
