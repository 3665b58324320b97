//! Cloud builders end to end: the VM is started through the API, the build
//! runs through the loopback sshd of the other tests, and the VM is stopped
//! again — by `--remote-off` through the API, or by the builder's own
//! self-stop after `stop_delay`. GCE is the fake in `support::gce_fake`
//! (no emulator exists); EC2 is moto with signature checks on.

use std::time::{Duration, Instant};

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, docker, registry};
use crate::support::gce_fake::{Flow, GceFake};
use crate::support::moto::Moto;
use crate::support::sshd::{SSHD, Sshd};

fn ok() -> bool {
    crate::support::require(SSHD)
        && crate::support::require("dockerd")
        && crate::support::require("docker-registry")
}

/// A self-stop test's builder is a machine of its own (see
/// [`Sshd::start_on_own_machine`]): on the machine every test shares,
/// another test's build would rightly keep it on.
fn self_stop_ok() -> bool {
    ok() && crate::support::require("unshare") && crate::support::require("nsenter")
}

fn gce_project(fake: &GceFake, sshd: &Sshd, extra: &str) -> Project {
    let yaml = format!(
        "    provider: gcp\n    project: {}\n    zone: {}\n    instance: builder\n    api_endpoint: {}\n    ready_timeout: 60\n{extra}",
        fake.project(),
        fake.zone(),
        fake.api_endpoint()
    );
    let mut p = Project::with_builder(sshd, &yaml);
    for (k, v) in fake.credential_env(Flow::ServiceAccountKey, p.dir.path()) {
        if let Some(v) = v {
            p.env.push((k.to_string(), v));
        }
    }
    p
}

#[test]
fn gce_builder_is_started_built_on_and_stopped_with_remote_off() {
    if !ok() {
        return;
    }
    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    let fake = GceFake::start();
    fake.add_instance("builder", "TERMINATED");
    let mut p = gce_project(&fake, &sshd, "");
    p.with_registry_credentials(reg);
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nCOPY hello /hello\n"),
    );
    p.file("hello", "from a GCE builder\n");

    let out = p.build(
        &format!("{}/cloud/gce", reg.addr),
        &["--tag", "v1", "--push", "--remote-off"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is TERMINATED: starting it"), "{err}");
    assert!(err.contains("builder `local` stopped"), "{err}");
    assert_eq!(
        fake.status("builder").as_deref(),
        Some("TERMINATED"),
        "the VM was left running"
    );
    assert_eq!(fake.transitions("builder"), 2, "one start, one stop");
    assert_eq!(
        reg.files("cloud/gce", "v1")
            .get("hello")
            .map(|v| v.as_slice()),
        Some(&b"from a GCE builder\n"[..])
    );
    let state = p.state();
    assert_eq!(state["builders"]["local"]["status"], "stopped");
    assert_eq!(state["builders"]["local"]["builds_count"], 1);
    assert!(state["builders"]["local"]["vm_seconds"].as_f64().unwrap() > 0.0);
    for phase in ["start", "ready", "upload", "build", "push", "stop"] {
        assert!(
            state["builders"]["local"]["history"][0]["phases"]
                .get(phase)
                .is_some(),
            "phase {phase} not recorded: {state}"
        );
    }
}

#[test]
fn gce_remote_commands_start_report_and_stop() {
    if !ok() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let fake = GceFake::start();
    fake.add_instance("builder", "TERMINATED");
    let p = gce_project(&fake, &sshd, "");
    let run = |args: &[&str]| {
        let out = p.cmd().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let st = run(&["remote", "status", "local", "--json"]);
    assert_eq!(st["status"], "stopped");
    assert_eq!(st["cloud_status"], "TERMINATED");
    assert_eq!(st["reachable"], false);

    let started = run(&["remote", "start", "local", "--json"]);
    assert_eq!(started["status"], "running");
    assert_eq!(fake.status("builder").as_deref(), Some("RUNNING"));
    // Starting a running builder is a no-op.
    run(&["remote", "start", "local", "--json"]);
    assert_eq!(fake.transitions("builder"), 1);

    let st = run(&["remote", "status", "local", "--json"]);
    assert_eq!(st["status"], "running");
    assert_eq!(st["reachable"], true);
    assert!(st["docker_server"].as_str().is_some_and(|v| !v.is_empty()));
    let list = run(&["remote", "list", "--json"]);
    assert_eq!(list[0]["status"], "running");

    let stopped = run(&["remote", "stop", "local", "--json"]);
    assert_eq!(stopped["status"], "stopped");
    assert_eq!(fake.status("builder").as_deref(), Some("TERMINATED"));
    assert_eq!(p.state()["builders"]["local"]["status"], "stopped");
}

#[test]
fn a_stopped_builder_without_auto_start_is_not_started() {
    if !ok() {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let fake = GceFake::start();
    fake.add_instance("builder", "TERMINATED");
    let p = gce_project(&fake, &sshd, "    auto_start: false\n");
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
    let out = p.build("x/y", &[]);
    assert_eq!(out.status.code(), Some(9), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`absconda remote start local`"), "{err}");
    assert_eq!(fake.transitions("builder"), 0);
}

#[test]
fn self_stop_fires_after_stop_delay_and_a_new_build_cancels_it() {
    if !self_stop_ok() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start_on_own_machine(Some(&d.host));
    let fake = GceFake::start();
    fake.add_instance("builder", "RUNNING");
    fake.set_metadata_instance("builder");
    let extra = format!(
        "    auto_stop: true\n    stop_delay: 5\n    poweroff_command: curl -fsS -X POST {}\n    metadata_endpoint: http://{}\n",
        fake.guest_poweroff_url(),
        fake.metadata_host()
    );
    let p = gce_project(&fake, &sshd, &extra);
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nRUN sleep 3\n"));

    let first = p.build("selfstop/app", &["--network", "none"]);
    assert!(first.status.success(), "{}", text(&first));
    let t1 = Instant::now();
    // A second build arrives before the first one's stop_delay ends.
    let second = p.build("selfstop/app", &["--network", "none", "--no-cache"]);
    assert!(second.status.success(), "{}", text(&second));
    let t2 = Instant::now();
    assert!(t2 - t1 >= Duration::from_secs(3));
    // The first timer (t1 + 5 s) was cancelled: still running at t1 + 6.5 s,
    // which is before the second one is due (t2 + 5 s, and t2 >= t1 + 3 s).
    let check = t1 + Duration::from_millis(6500);
    std::thread::sleep(check.saturating_duration_since(Instant::now()));
    assert_eq!(
        fake.status("builder").as_deref(),
        Some("RUNNING"),
        "the first build's self-stop was not cancelled"
    );
    // The second one fires.
    fake.wait_for_status("builder", "TERMINATED", Duration::from_secs(20));
    let log = std::fs::read_to_string(p.workspace.join(".self-stop.log")).unwrap();
    assert_eq!(log.lines().count(), 1, "{log}");
}

#[test]
fn self_stop_does_nothing_on_another_instance_or_an_ssh_builder() {
    if !self_stop_ok() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start_on_own_machine(Some(&d.host));
    let fake = GceFake::start();
    fake.add_instance("builder", "RUNNING");
    fake.add_instance("other", "RUNNING");
    // The metadata server says we are on `other`: the script cannot prove
    // it runs on `builder`, so it must not power off.
    fake.set_metadata_instance("other");
    let marker = crate::support::tempdir();
    let extra = format!(
        "    auto_stop: true\n    stop_delay: 1\n    poweroff_command: touch {}/gce\n    metadata_endpoint: http://{}\n",
        marker.path().display(),
        fake.metadata_host()
    );
    let p = gce_project(&fake, &sshd, &extra);
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
    let out = p.build("selfstop/other", &[]);
    assert!(out.status.success(), "{}", text(&out));

    // The same instance name in another project is another VM too.
    fake.set_metadata_instance("builder");
    fake.set_metadata_project("someone-elses-project");
    let out = p.build("selfstop/other", &[]);
    assert!(out.status.success(), "{}", text(&out));

    // An always-on SSH builder never schedules a self-stop at all.
    let ssh = Project::with_builder(
        &sshd,
        &format!(
            "    auto_stop: true\n    stop_delay: 1\n    poweroff_command: touch {}/ssh\n",
            marker.path().display()
        ),
    );
    ssh.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
    let out = ssh.build("selfstop/ssh", &[]);
    assert!(out.status.success(), "{}", text(&out));

    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !marker.path().join("gce").exists(),
        "powered off without proof of identity"
    );
    assert!(
        !marker.path().join("ssh").exists(),
        "an SSH builder scheduled a self-stop"
    );
    assert!(!ssh.workspace.join(".stop-token").exists());
    assert_eq!(fake.status("builder").as_deref(), Some("RUNNING"));
}

#[test]
fn ec2_builder_is_started_built_on_and_stopped_with_remote_off() {
    if !ok() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(moto) = rt.block_on(Moto::start()) else {
        return;
    };
    let id = rt.block_on(moto.run_instance(Some("absconda-builder")));
    rt.block_on(async {
        use absconda::cloud::Provider;
        moto.ec2(absconda::cloud::ec2::Ec2Instance::Id(id.clone()))
            .stop()
            .await
            .unwrap();
    });
    assert_eq!(rt.block_on(moto.state(&id)), "stopped");

    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    let yaml = format!(
        "    provider: aws\n    region: us-east-1\n    instance: absconda-builder\n    api_endpoint: {}\n    ready_timeout: 60\n",
        moto.endpoint()
    );
    let mut p = Project::with_builder(&sshd, &yaml);
    let (key, secret) = moto.access_key();
    p.env.push(("AWS_ACCESS_KEY_ID".into(), key.to_string()));
    p.env
        .push(("AWS_SECRET_ACCESS_KEY".into(), secret.to_string()));
    p.env
        .push(("AWS_EC2_METADATA_DISABLED".into(), "true".into()));
    p.with_registry_credentials(reg);
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nCOPY hello /hello\n"),
    );
    p.file("hello", "from an EC2 builder\n");

    let out = p.build(
        &format!("{}/cloud/ec2", reg.addr),
        &["--tag", "v1", "--push", "--remote-off"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        rt.block_on(moto.state(&id)),
        "stopped",
        "the VM was left running"
    );
    assert_eq!(
        reg.files("cloud/ec2", "v1")
            .get("hello")
            .map(|v| v.as_slice()),
        Some(&b"from an EC2 builder\n"[..])
    );
    let state = p.state();
    assert_eq!(state["builders"]["local"]["status"], "stopped");
    assert_eq!(state["builders"]["local"]["builds_count"], 1);

    // Wrong secret: a clear authentication error, exit 8, and no retries.
    let mut bad = Project::with_builder(&sshd, &yaml);
    bad.env.push(("AWS_ACCESS_KEY_ID".into(), key.to_string()));
    bad.env
        .push(("AWS_SECRET_ACCESS_KEY".into(), "wrong-secret".into()));
    bad.env
        .push(("AWS_EC2_METADATA_DISABLED".into(), "true".into()));
    bad.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
    let t = Instant::now();
    let out = bad.build("x/y", &[]);
    assert_eq!(out.status.code(), Some(8), "{}", text(&out));
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "auth errors must not be retried"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("authentication failed using environment variables"),
        "{err}"
    );
    assert!(!err.contains("wrong-secret"), "{err}");
}

/// `--remote-off` stops the VM only when the builder proves, under its
/// lease, that no build holds or waits for it: a lease it cannot check
/// leaves the VM running, and absconda says so.
#[test]
fn remote_off_leaves_the_vm_running_when_the_lease_cannot_be_checked() {
    crate::require!(SSHD, "dockerd");
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let fake = GceFake::start();
    fake.add_instance("builder", "RUNNING");
    let p = gce_project(&fake, &sshd, "");
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
    std::fs::create_dir_all(p.workspace.join(".lease")).unwrap();
    let out = p.build("off/doubt", &["--remote-off"]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("leaving builder `local` running"), "{err}");
    assert_eq!(fake.status("builder").as_deref(), Some("RUNNING"));
}

fn processes_with(needle: &str) -> usize {
    let out = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// An EC2 builder's self-stop proves the instance over IMDSv2 (a session
/// token, then the instance id) before it powers off: on the builder's own
/// instance it fires; where IMDS names another instance it does nothing.
#[test]
fn ec2_self_stop_checks_the_instance_id_over_imdsv2() {
    if !(self_stop_ok() && crate::support::require("curl")) {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(moto) = rt.block_on(Moto::start()) else {
        return;
    };
    let id = rt.block_on(moto.run_instance(Some("absconda-builder")));
    let d = docker();
    let sshd = Sshd::start_on_own_machine(Some(&d.host));
    let marker = crate::support::tempdir();
    for (imds_says, fires) in [
        (id.clone(), true),
        ("i-0another00000000".to_string(), false),
    ] {
        let imds = crate::support::imds_fake::ImdsFake::start(&imds_says, "builder-role", None);
        let flag = marker.path().join(if fires { "mine" } else { "other" });
        let yaml = format!(
            "    provider: aws\n    region: us-east-1\n    instance: absconda-builder\n    api_endpoint: {}\n    ready_timeout: 60\n    auto_stop: true\n    stop_delay: 1\n    poweroff_command: touch {}\n    metadata_endpoint: {}\n",
            moto.endpoint(),
            flag.display(),
            imds.endpoint()
        );
        let mut p = Project::with_builder(&sshd, &yaml);
        let (key, secret) = moto.access_key();
        p.env.push(("AWS_ACCESS_KEY_ID".into(), key.to_string()));
        p.env
            .push(("AWS_SECRET_ACCESS_KEY".into(), secret.to_string()));
        p.env
            .push(("AWS_EC2_METADATA_DISABLED".into(), "true".into()));
        p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
        let out = p.build("selfstop/ec2", &[]);
        assert!(out.status.success(), "{}", text(&out));
        // The script asks IMDS who it is, then decides.
        crate::support::wait_until(
            "the self-stop asked IMDS for the instance id",
            Duration::from_secs(30),
            || {
                imds.requests()
                    .iter()
                    .any(|r| r.path == "/latest/meta-data/instance-id")
            },
        );
        crate::support::wait_until(
            "the self-stop script ended",
            Duration::from_secs(30),
            || flag.exists() || processes_with(&flag.display().to_string()) == 0,
        );
        let seen = imds.requests();
        assert_eq!(seen[0].method, "PUT", "{seen:?}");
        assert_eq!(seen[0].ttl.as_deref(), Some("60"), "{seen:?}");
        assert!(
            seen.iter()
                .filter(|r| r.method == "GET")
                .all(|r| r.token_ok && r.status == 200),
            "{seen:?}"
        );
        assert_eq!(
            flag.exists(),
            fires,
            "IMDS said {imds_says}, the builder is {id}"
        );
    }
}

/// With no keys in the environment or files, credentials come from IMDSv2:
/// a session token first (with its TTL header), then the role's document
/// with the token; EC2 (moto, checking signatures) accepts them.
#[test]
fn imdsv2_credentials_reach_ec2() {
    if !ok() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(moto) = rt.block_on(Moto::start()) else {
        return;
    };
    rt.block_on(moto.run_instance(Some("absconda-builder")));
    // A role's temporary credentials, as IMDS hands them out (STS AssumeRole).
    let session = rt.block_on(moto.session_credentials());
    let imds = crate::support::imds_fake::ImdsFake::start(
        "i-0ffffffffffffffff",
        "absconda-client-role",
        Some((
            &session.access_key_id,
            &session.secret_access_key,
            &session.session_token,
        )),
    );
    let sshd = Sshd::start(Some(&docker().host));
    let yaml = format!(
        "    provider: aws\n    region: us-east-1\n    instance: absconda-builder\n    api_endpoint: {}\n    ready_timeout: 60\n",
        moto.endpoint()
    );
    let p = Project::with_builder(&sshd, &yaml);
    let out = p
        .cmd()
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.endpoint())
        .args(["remote", "status", "local", "--json"])
        .output()
        .unwrap();
    let seen = imds.requests();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{seen:?}", text(&out)));
    assert!(out.status.success(), "{}", text(&out));
    assert!(!status["cloud_status"].is_null(), "EC2 answered: {status}");
    assert_eq!(seen[0].method, "PUT", "{seen:?}");
    assert!(seen[0].ttl.is_some(), "{seen:?}");
    assert!(
        seen.iter()
            .any(|r| r.path == "/latest/meta-data/iam/security-credentials/absconda-client-role"),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .filter(|r| r.method == "GET")
            .all(|r| r.token_ok),
        "every read carried the session token: {seen:?}"
    );
}

/// Pids of the self-stop scripts scheduled for `workspace` (the builder is
/// this machine).
fn self_stops(workspace: &std::path::Path) -> Vec<String> {
    let mut want = b"absconda-self-stop\0".to_vec();
    want.extend_from_slice(workspace.as_os_str().as_encoded_bytes());
    want.push(0);
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline"))
            && cmd.windows(want.len()).any(|w| w == want.as_slice())
        {
            pids.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    pids
}

/// Waits for the self-stop scheduled by the build that just ended to start
/// and then to finish, whatever it decided.
pub(crate) fn wait_for_self_stop(workspace: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while self_stops(workspace).is_empty() {
        assert!(Instant::now() < deadline, "no self-stop was scheduled");
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !self_stops(workspace).is_empty() {
        assert!(Instant::now() < deadline, "the self-stop did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Another workspace's build on the builder keeps it on; once no lease is
/// held, it stops.
#[test]
fn self_stop_waits_while_another_workspace_on_the_machine_holds_its_lease() {
    if !self_stop_ok() {
        return;
    }
    let d = docker();
    let sshd = Sshd::start_on_own_machine(Some(&d.host));
    let fake = GceFake::start();
    fake.add_instance("builder", "RUNNING");
    fake.set_metadata_instance("builder");
    let marker = crate::support::tempdir();
    let flag = marker.path().join("off");
    let extra = format!(
        "    auto_stop: true\n    stop_delay: 1\n    poweroff_command: touch {}\n    metadata_endpoint: http://{}\n",
        flag.display(),
        fake.metadata_host()
    );
    let p = gce_project(&fake, &sshd, &extra);
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));

    // Another user's workspace on the same machine, with a build running.
    let other = crate::support::tempdir();
    std::fs::create_dir(other.path().join("runs")).unwrap();
    let lease = other.path().join(".lease");
    std::fs::write(&lease, "").unwrap();
    /// Holds the lease until its stdin closes: ends the holder, also when
    /// the test fails.
    struct Holder(std::process::Child);
    impl Drop for Holder {
        fn drop(&mut self) {
            drop(self.0.stdin.take());
            let _ = self.0.wait();
        }
    }
    let holder = Holder(
        sshd.on_machine("sh")
            .args(["-c", "exec 9<\"$1\" && flock 9 && read -r _", "hold"])
            .arg(&lease)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let held = || {
        !std::process::Command::new("flock")
            .arg("-n")
            .arg(&lease)
            .arg("true")
            .status()
            .unwrap()
            .success()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !held() {
        assert!(Instant::now() < deadline, "the other lease was never taken");
        std::thread::sleep(Duration::from_millis(20));
    }

    let out = p.build("selfstop/shared", &[]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for_self_stop(&p.workspace);
    let busy = flag.exists();
    drop(holder);
    assert!(!held(), "the other lease is still held");
    assert!(
        !busy,
        "powered off while another workspace's build held its lease"
    );
    assert!(!p.workspace.join(".self-stop.log").exists());

    // Once that build is over, the self-stop fires.
    let out = p.build("selfstop/shared", &[]);
    assert!(out.status.success(), "{}", text(&out));
    crate::support::wait_until(
        "the self-stop firing once every lease was free",
        Duration::from_secs(60),
        || flag.exists(),
    );
}
