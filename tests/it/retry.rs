//! `--retries`: transient failures are retried, a failing Dockerfile never is.

use std::process::Stdio;
use std::time::Duration;

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, docker, registry};
use crate::support::gce_fake::{Flow, GceFake};
use crate::support::sshd::{SSHD, Sshd};
use crate::support::wait_until;

fn ok() -> bool {
    crate::support::require(SSHD)
        && crate::support::require("dockerd")
        && crate::support::require("docker-registry")
}

fn running(needle: &str) -> bool {
    let out = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.contains(needle))
}

/// Starts `p`'s build, cuts the connection once `marker` runs, and returns the output.
fn build_and_cut(
    p: &Project,
    sshd: &Sshd,
    repo: &str,
    marker: &str,
    extra: &[&str],
    before_cut: impl FnOnce(),
) -> std::process::Output {
    let mut c = p.cmd();
    c.args(["build", "--remote-builder", "local", "--context"])
        .arg(&p.context)
        .args([
            "--repository",
            repo,
            "--tag",
            "v1",
            "--network",
            "none",
            "--no-cache",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    wait_until("the RUN step started", Duration::from_secs(60), || {
        running(marker)
    });
    before_cut();
    sshd.drop_connections();
    child.wait_with_output().unwrap()
}

#[test]
fn a_dropped_connection_is_retried_and_without_retries_exits_3() {
    if !ok() {
        return;
    }
    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    let mut p = Project::new(&sshd);
    p.with_registry_credentials(reg);
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nRUN sleep 3.1 && echo slept > /slept\n"),
    );

    let out = build_and_cut(&p, &sshd, "127.0.0.1:1/retry/none", "sleep 3.1", &[], || {});
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    wait_until(
        "the remote build was cleaned up",
        Duration::from_secs(15),
        || p.run_folders().is_empty(),
    );

    let repo = format!("{}/retry/app", reg.addr);
    let out = build_and_cut(
        &p,
        &sshd,
        &repo,
        "sleep 3.1",
        &["--push", "--retries", "2"],
        || {},
    );
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("attempt 1 failed"), "{err}");
    assert!(err.contains("retrying (1/2)"), "{err}");
    assert_eq!(reg.tags("retry/app"), ["v1"]);
    assert!(reg.files("retry/app", "v1").contains_key("slept"));
    assert!(p.run_folders().is_empty());
}

#[test]
fn a_failing_dockerfile_step_is_never_retried() {
    if !ok() {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let p = Project::new(&sshd);
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nRUN echo failing-step && false\n"),
    );
    let out = p.build("retry/fail", &["--retries", "3", "--network", "none"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("failing-step"), "{all}");
    assert_eq!(
        all.matches("absconda: building").count(),
        1,
        "built more than once: {all}"
    );
    assert!(!all.contains("retrying"), "{all}");
}

#[test]
fn a_preempted_spot_builder_is_restarted_and_the_build_retried() {
    if !ok() {
        return;
    }
    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    let fake = GceFake::start();
    fake.add_instance("builder", "RUNNING");
    let yaml = format!(
        "    provider: gcp\n    project: {}\n    zone: {}\n    instance: builder\n    api_endpoint: {}\n    auto_start: false\n    ready_timeout: 60\n",
        fake.project(),
        fake.zone(),
        fake.api_endpoint()
    );
    let mut p = Project::with_builder(&sshd, &yaml);
    for (k, v) in fake.credential_env(Flow::ServiceAccountKey, p.dir.path()) {
        if let Some(v) = v {
            p.env.push((k.to_string(), v));
        }
    }
    p.with_registry_credentials(reg);
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nRUN sleep 3.2 && echo done > /done\n"),
    );
    let repo = format!("{}/retry/spot", reg.addr);
    let out = build_and_cut(
        &p,
        &sshd,
        &repo,
        "sleep 3.2",
        &["--push", "--retries", "1"],
        || {
            // The cloud takes the spot VM away: it stops, and its connections die.
            fake.set_status("builder", "TERMINATED");
        },
    );
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the builder is TERMINATED (stopped or preempted under the build)"),
        "{err}"
    );
    assert_eq!(fake.transitions("builder"), 1, "restarted once");
    assert_eq!(fake.status("builder").as_deref(), Some("RUNNING"));
    assert_eq!(reg.tags("retry/spot"), ["v1"]);
}
