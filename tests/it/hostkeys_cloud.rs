//! Host keys learned from the cloud, so that a fresh cloud builder needs no
//! trust-on-first-use: GCE guest attributes (`hostkeys/`) through the fake,
//! the EC2 console output through moto and a proxy's canned answers, and
//! `remote provision` saving what the cloud reports as the builder's pins.
//!
//! Every GCE test starts from an EMPTY `known_hosts` and the default strict
//! policy; the fake publishes the real host key of the test sshd (or
//! another key, or none).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use absconda::cloud::ec2::{Ec2, Ec2Instance};

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, DOCKER_CLI, docker};
use crate::support::faulty_proxy::{Fault, FaultyProxy};
use crate::support::gce_fake::{Fault as GceFault, Flow, GceFake, Route, Scope};
use crate::support::moto::{Moto, fast_backoff};
use crate::support::sshd::{SSHD, Sshd};

fn ok() -> bool {
    crate::support::require(SSHD) && crate::support::require("dockerd")
}

/// A GCE builder `local` on the fake's instance `builder`, reached at the
/// loopback sshd, whose `known_hosts` is emptied.
fn gce_project(fake: &GceFake, sshd: &Sshd, extra: &str) -> Project {
    std::fs::write(&sshd.known_hosts, "").unwrap();
    let ready = if extra.contains("ready_timeout:") {
        ""
    } else {
        "    ready_timeout: 60\n"
    };
    let yaml = format!(
        "    provider: gcp\n    project: {}\n    zone: {}\n    instance: builder\n    api_endpoint: {}\n{ready}{extra}",
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
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
    p
}

/// A fresh ed25519 public key line that no server holds.
fn other_key() -> (String, String) {
    let dir = crate::support::tempdir();
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
        .arg(dir.path().join("k"))
        .status()
        .unwrap();
    assert!(st.success());
    let line = std::fs::read_to_string(dir.path().join("k.pub"))
        .unwrap()
        .trim()
        .to_string();
    let out = std::process::Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(dir.path().join("k.pub"))
        .output()
        .unwrap();
    let fp = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    (line, fp)
}

fn known_hosts_text(sshd: &Sshd) -> String {
    std::fs::read_to_string(&sshd.known_hosts).unwrap_or_default()
}

/// The base64 part of an OpenSSH public key line.
fn key_data(line: &str) -> &str {
    line.split_whitespace().nth(1).unwrap()
}

/// No authentication happened and nothing reached the workspace.
fn nothing_sent(sshd: &Sshd, p: &Project) {
    let log = sshd.log();
    assert!(
        !log.contains("Accepted publickey"),
        "authentication went ahead:\n{log}"
    );
    assert!(!p.workspace.exists(), "the workspace was touched");
}

#[test]
fn a_stopped_gce_builder_is_trusted_through_its_guest_attributes_then_known() {
    if !ok() {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let fake = GceFake::start();
    fake.add_instance("builder", "TERMINATED");
    fake.set_guest_host_keys("builder", &[&sshd.host_key_pub]);
    let p = gce_project(&fake, &sshd, "");

    let out = p.build("hostkeys/gce", &["--remote-off"]);
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let name = format!("[127.0.0.1]:{}", sshd.port);
    assert!(
        err.contains(&format!("recorded the host key of `{name}`"))
            && err.contains("as reported by the cloud (guest attributes)"),
        "{err}"
    );
    assert!(err.contains(&sshd.fingerprint()), "{err}");
    let recorded = known_hosts_text(&sshd);
    assert_eq!(
        recorded.trim(),
        format!("{name} ssh-ed25519 {}", key_data(&sshd.host_key_pub)),
        "known_hosts records exactly the server's key"
    );
    let asked = fake.count(Route::GuestAttributes);
    assert!(asked >= 1);
    assert_eq!(fake.status("builder").as_deref(), Some("TERMINATED"));

    // The next build finds the key in known_hosts: the cloud is not asked.
    let out = p.build("hostkeys/gce", &["--remote-off"]);
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("recorded the host key"), "{err}");
    assert_eq!(fake.count(Route::GuestAttributes), asked);
    assert_eq!(known_hosts_text(&sshd), recorded, "nothing recorded twice");
    assert_eq!(fake.transitions("builder"), 4, "two starts, two stops");
}

#[test]
fn a_host_key_the_cloud_does_not_report_is_refused_before_anything_is_sent() {
    if !ok() {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let fake = GceFake::start();
    fake.add_instance("builder", "TERMINATED");
    let (other, other_fp) = other_key();
    fake.set_guest_host_keys("builder", &[&other]);
    let p = gce_project(&fake, &sshd, "");

    let t = Instant::now();
    let out = p.build("hostkeys/gce", &["--remote-off"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        t.elapsed() < Duration::from_secs(40),
        "refused at once, not at the deadline"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("differs from what the cloud reports for its VM in the guest attributes"),
        "{err}"
    );
    assert!(err.contains(&sshd.fingerprint()), "{err}");
    assert!(err.contains(&other_fp), "{err}");
    nothing_sent(&sshd, &p);
    assert_eq!(known_hosts_text(&sshd), "", "nothing was recorded");
    // The VM absconda started for nothing is stopped again.
    fake.wait_for_status("builder", "TERMINATED", Duration::from_secs(10));
}

#[test]
fn no_published_keys_on_a_running_builder_is_the_usual_unknown_key_at_once() {
    if !ok() {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let fake = GceFake::start();
    fake.add_instance("builder", "RUNNING");
    let p = gce_project(&fake, &sshd, "");

    let t = Instant::now();
    let out = p.build("hostkeys/gce", &[]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "no wait for keys a running VM would have published: {:?}",
        t.elapsed()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not known"), "{err}");
    assert!(
        err.contains("host_key_policy: accept-new"),
        "the hint: {err}"
    );
    assert!(!err.contains("waiting for the builder"), "{err}");
    assert_eq!(fake.count(Route::GuestAttributes), 1, "the cloud was asked");
    nothing_sent(&sshd, &p);
    assert_eq!(fake.status("builder").as_deref(), Some("RUNNING"));
}

#[test]
fn keys_published_a_while_after_boot_are_waited_for() {
    if !ok() {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let fake = GceFake::start();
    fake.add_instance("builder", "TERMINATED");
    fake.set_guest_host_keys_after("builder", &[&sshd.host_key_pub], Duration::from_secs(3));
    let p = gce_project(&fake, &sshd, "");

    let out = p.build("hostkeys/gce", &["--remote-off"]);
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.matches("waiting for the builder to publish its host keys in its guest attributes")
            .count(),
        1,
        "said once: {err}"
    );
    assert!(err.contains("as reported by the cloud"), "{err}");
    assert!(known_hosts_text(&sshd).contains(key_data(&sshd.host_key_pub)));
    assert!(fake.count(Route::GuestAttributes) >= 2);
}

#[test]
fn keys_never_published_end_at_the_ready_deadline() {
    if !ok() {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let fake = GceFake::start();
    fake.add_instance("builder", "TERMINATED");
    let p = gce_project(&fake, &sshd, "    ready_timeout: 6\n");

    let out = p.build("hostkeys/gce", &["--remote-off"]);
    assert_eq!(out.status.code(), Some(9), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "not ready within 6s (the builder to publish its host keys in its guest attributes)"
        ),
        "{err}"
    );
    assert!(err.contains("is not known"), "the cause is kept: {err}");
    nothing_sent(&sshd, &p);
    fake.wait_for_status("builder", "TERMINATED", Duration::from_secs(10));
}

#[test]
fn a_cloud_that_cannot_say_is_an_error_unless_accept_new() {
    if !ok() {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let fake = GceFake::start();
    fake.add_instance("builder", "RUNNING");
    fake.set_guest_host_keys("builder", &[&sshd.host_key_pub]);
    // Something that is not the compute API answers for this one method.
    fake.inject_always(Scope::GuestAttributes, GceFault::Html(404));
    let p = gce_project(&fake, &sshd, "");
    let out = p.build("hostkeys/gce", &[]);
    assert_eq!(out.status.code(), Some(8), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "could not read the host keys the cloud reports for builder `local` (guest attributes)"
        ),
        "{err}"
    );
    assert!(err.contains(&sshd.fingerprint()), "{err}");
    nothing_sent(&sshd, &p);

    // accept-new: the user's choice of trust on first use stands, with a word.
    let p = gce_project(&fake, &sshd, "    host_key_policy: accept-new\n");
    let out = p.build("hostkeys/gce", &[]);
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("could not read builder `local`'s host keys from the cloud"),
        "{err}"
    );
    assert!(known_hosts_text(&sshd).contains(key_data(&sshd.host_key_pub)));
}

#[test]
fn accept_new_asks_the_cloud_first() {
    if !ok() {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let fake = GceFake::start();
    fake.add_instance("builder", "RUNNING");
    let (other, _) = other_key();
    fake.set_guest_host_keys("builder", &[&other]);
    let p = gce_project(&fake, &sshd, "    host_key_policy: accept-new\n");

    // The cloud says another key: first use does not make it trusted.
    let out = p.build("hostkeys/gce", &[]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("differs from what the cloud reports"),
        "{}",
        text(&out)
    );
    assert_eq!(known_hosts_text(&sshd), "");

    // The cloud reports nothing: accept-new records on first use, as asked.
    fake.set_guest_host_keys("builder", &[]);
    let out = p.build("hostkeys/gce", &[]);
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("on first use (host_key_policy: accept-new)"),
        "{err}"
    );
    assert!(known_hosts_text(&sshd).contains(key_data(&sshd.host_key_pub)));
}

#[test]
fn a_host_key_pin_is_not_second_guessed_by_the_cloud() {
    if !ok() {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let fake = GceFake::start();
    fake.add_instance("builder", "RUNNING");
    let (other, _) = other_key();
    fake.set_guest_host_keys("builder", &[&other]);
    let p = gce_project(
        &fake,
        &sshd,
        &format!("    host_key: \"{}\"\n", sshd.fingerprint()),
    );
    let out = p.build("hostkeys/gce", &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(fake.count(Route::GuestAttributes), 0);
    assert_eq!(known_hosts_text(&sshd), "", "a pin records nothing");
}

// ---- EC2: the console output ---------------------------------------------------

fn console_answer(id: &str, console: &str) -> Fault {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(console);
    Fault::Answer {
        status: 200,
        body: format!(
            r#"<?xml version="1.0" encoding="UTF-8"?>
<GetConsoleOutputResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
    <requestId>7c2b9f0e-proxy</requestId>
    <instanceId>{id}</instanceId>
    <timestamp>2025-03-03T10:00:05.000Z</timestamp>
    <output>{encoded}</output>
</GetConsoleOutputResponse>"#
        ),
    }
}

#[tokio::test]
async fn ec2_console_fingerprints_through_moto_and_canned_consoles() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let id = moto.run_instance(Some("console-builder")).await;

    // moto's console is a fixed text without any fingerprint block: the
    // signed call goes through and reports nothing, by id and by Name tag.
    let by_name = moto.ec2(Ec2Instance::Name("console-builder".into()));
    assert_eq!(
        by_name.console_host_key_fingerprints().await.unwrap(),
        Vec::<String>::new()
    );

    let proxy = FaultyProxy::start(moto.addr()).await;
    let mut settings = moto.settings(Ec2Instance::Id(id.clone()));
    settings.endpoint = Some(proxy.url());
    settings.backoff = fast_backoff(Duration::from_secs(20));
    let ec2 = Ec2::with_env(settings, moto.env()).unwrap();
    proxy.script([], Fault::Pass);
    assert!(
        ec2.console_host_key_fingerprints()
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(proxy.actions(), ["GetConsoleOutput"]);

    let ed = "SHA256:Yq8wE3rT6uI9oP2aS5dF7gH0jK4lZ1xC3vB6nM8qW2e";
    let ec = "SHA256:0mTz3n7Qv5yPbXW1kJc8sUu2aHdLr9eFgN4oViYtZqE";
    let console = format!(
        "[   12.0] cloud-init[812]: ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----\r\n\
         [   12.0] cloud-init[812]: ec2: 256 {ec} root@ip-10-0-0-1 (ECDSA)\r\n\
         [   12.0] cloud-init[812]: ec2: -----END SSH HOST KEY FINGERPRINTS-----\r\n\
         -----BEGIN ABSCONDA HOST KEY FINGERPRINTS-----\r\n\
         ssh-ed25519 {ed}\r\n\
         ecdsa-sha2-nistp256 {ec}\r\n\
         -----END ABSCONDA HOST KEY FINGERPRINTS-----\r\n"
    );
    // An instance type without `Latest` support refuses the parameter:
    // asked again without it.
    proxy.script(
        [
            Fault::Ec2Error {
                status: 400,
                code: "UnsupportedOperation",
            },
            console_answer(&id, &console),
        ],
        Fault::Pass,
    );
    assert_eq!(
        ec2.console_host_key_fingerprints().await.unwrap(),
        vec![ed.to_string(), ec.to_string()]
    );
    assert_eq!(proxy.actions(), ["GetConsoleOutput", "GetConsoleOutput"]);

    // Only cloud-init's block (an image without the startup script).
    let cloud_init_only = &console[..console.find("-----BEGIN ABSCONDA").unwrap()];
    proxy.script([console_answer(&id, cloud_init_only)], Fault::Pass);
    assert_eq!(
        ec2.console_host_key_fingerprints().await.unwrap(),
        vec![ec.to_string()]
    );

    // Throttled, then answered: retried like every call.
    proxy.script(
        [
            Fault::Ec2Error {
                status: 503,
                code: "RequestLimitExceeded",
            },
            console_answer(&id, &console),
        ],
        Fault::Pass,
    );
    assert_eq!(ec2.console_host_key_fingerprints().await.unwrap().len(), 2);
}

// ---- provision -------------------------------------------------------------------

/// Terraform for the child absconda, or `None` (a skip outside CI).
fn terraform() -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("terraform"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        crate::support::skip_or_fail("`terraform` is not installed");
    }
    found
}

/// The offline loopback module, aimed at `sshd`.
fn loopback_module(dir: &Path, sshd: &Sshd) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/terraform/loopback/main.tf");
    let module = dir.join("module");
    std::fs::create_dir_all(&module).unwrap();
    std::fs::copy(src, module.join("main.tf")).unwrap();
    std::fs::write(
        module.join("terraform.auto.tfvars"),
        format!("address = \"127.0.0.1\"\nport    = {}\n", sshd.port),
    )
    .unwrap();
    module
}

#[test]
fn provision_of_a_gce_builder_pins_the_keys_its_guest_publishes() {
    if !ok() {
        return;
    }
    let Some(tf) = terraform() else { return };
    let sshd = Sshd::start(Some(&docker().host));
    std::fs::write(&sshd.known_hosts, "").unwrap();
    let fake = GceFake::start();
    // The module names the VM after the builder.
    fake.add_instance("gcpb", "RUNNING");

    let mut p = Project::new(&sshd);
    let module = loopback_module(p.dir.path(), &sshd);
    std::fs::write(
        &p.config,
        format!(
            "builders:\n  gcpb:\n    provider: gcp\n    project: {project}\n    zone: {zone}\n    api_endpoint: {api}\n    terraform_dir: {module}\n    user: root\n    identity_file: {key}\n    known_hosts: {kh}\n    workspace: {ws}\n    docker: {DOCKER_CLI}\n    ready_timeout: 60\n    connect_timeout: 5\n    auto_stop: false\n",
            project = fake.project(),
            zone = fake.zone(),
            api = fake.api_endpoint(),
            module = module.display(),
            key = sshd.user_key.display(),
            kh = sshd.known_hosts.display(),
            ws = p.workspace.display(),
        ),
    )
    .unwrap();
    for (k, v) in fake.credential_env(Flow::ServiceAccountKey, p.dir.path()) {
        if let Some(v) = v {
            p.env.push((k.to_string(), v));
        }
    }
    p.env
        .push(("ABSCONDA_TERRAFORM".into(), tf.display().to_string()));

    let child = p
        .cmd()
        .args(["remote", "provision", "gcpb"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The guest agent publishes the keys a little after Terraform is done:
    // after absconda first asked for them.
    crate::support::wait_until(
        "absconda asking for the guest attributes",
        Duration::from_secs(120),
        || fake.count(Route::GuestAttributes) >= 1,
    );
    fake.set_guest_host_keys("gcpb", &[&sshd.host_key_pub]);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("waiting for builder `gcpb` to publish its host keys (guest attributes)"),
        "{err}"
    );
    assert!(
        err.contains("builder `gcpb` published its host keys (guest attributes)"),
        "{err}"
    );
    assert!(err.contains("builder `gcpb` is ready"), "{err}");
    let state = p.state();
    assert_eq!(
        state["builders"]["gcpb"]["host_key_fingerprints"],
        serde_json::json!([sshd.fingerprint()])
    );
    assert_eq!(state["builders"]["gcpb"]["instance"], "gcpb");
    // Pinned through the state, not recorded on first use.
    assert_eq!(known_hosts_text(&sshd), "");
}
