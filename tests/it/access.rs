//! How the user's key reaches a cloud builder (`access:`): GCP OS Login and
//! expiring metadata keys, end to end.
//!
//! The builder is the loopback sshd, whose `AuthorizedKeysFile` is a folder
//! the GCE fake keeps as a VM's guest would: with OS Login on, the keys the
//! OS Login fake holds for each POSIX user; otherwise the unexpired
//! `ssh-keys` metadata entries. The folder starts empty, so a build only
//! gets in with a key absconda put in place through the APIs.

use std::time::Duration;

use serde_json::Value;

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, docker, registry};
use crate::support::gce_fake::{Flow, GceFake, Route};
use crate::support::sshd::{SSHD, Sshd};

fn ok() -> bool {
    crate::support::require(SSHD)
        && crate::support::require("dockerd")
        && crate::support::require("docker-registry")
}

pub(crate) const SA: &str = "absconda-builder@absconda-test.iam.gserviceaccount.com";

/// An sshd that lets in whom the fake's guest keys folder says.
pub(crate) fn guest_sshd(keys: &std::path::Path) -> Sshd {
    let d = docker();
    Sshd::start_with(
        Some(&d.host),
        "127.0.0.1",
        None,
        &format!("AuthorizedKeysFile {}/%u\n", keys.display()),
    )
}

/// A gcp builder `local` on the fake's instance `builder`, whose config
/// says `user: config-user`: OS Login must replace it.
pub(crate) fn project(fake: &GceFake, sshd: &Sshd, extra: &str) -> Project {
    let yaml = format!(
        "    provider: gcp\n    project: {}\n    zone: {}\n    instance: builder\n    api_endpoint: {}\n    oslogin_endpoint: {}\n    ready_timeout: 30\n{extra}",
        fake.project(),
        fake.zone(),
        fake.api_endpoint(),
        fake.api_endpoint(),
    );
    let mut p = Project::with_builder(sshd, &yaml);
    for (k, v) in fake.credential_env(Flow::ServiceAccountKey, p.dir.path()) {
        if let Some(v) = v {
            p.env.push((k.to_string(), v));
        }
    }
    p
}

pub(crate) fn set_config_user(p: &Project, user: &str) {
    let yaml = std::fs::read_to_string(&p.config).unwrap();
    assert!(yaml.contains("    user: root\n"));
    std::fs::write(
        &p.config,
        yaml.replace("    user: root\n", &format!("    user: {user}\n")),
    )
    .unwrap();
}

fn public_key(sshd: &Sshd) -> String {
    let line = std::fs::read_to_string(sshd.user_key.with_extension("pub")).unwrap();
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

fn now_usec() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

#[test]
fn oslogin_imports_the_key_for_the_account_and_builds_as_its_posix_user() {
    if !ok() {
        return;
    }
    let reg = registry();
    let keys = tempfile::tempdir().unwrap();
    let sshd = guest_sshd(keys.path());
    let fake = GceFake::start();
    fake.add_instance("builder", "TERMINATED");
    // Org policy style: OS Login on for the whole project.
    fake.set_project_metadata("enable-oslogin", "TRUE");
    fake.serve_guest_keys("builder", keys.path());
    // The POSIX account OS Login makes for the service account; root here,
    // since the loopback builder has no other user that may run docker.
    fake.oslogin(|o| o.set_username(SA, "root"));
    let mut p = project(&fake, &sshd, "");
    set_config_user(&p, "config-user");
    p.with_registry_credentials(reg);
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nCOPY hello /hello\n"),
    );
    p.file("hello", "through OS Login\n");

    let before = now_usec();
    let out = p.build(
        &format!("{}/access/oslogin", reg.addr),
        &["--tag", "v1", "--push", "--remote-off"],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), sshd.log());
    assert_eq!(
        reg.files("access/oslogin", "v1")
            .get("hello")
            .map(|v| v.as_slice()),
        Some(&b"through OS Login\n"[..])
    );
    assert_eq!(fake.status("builder").as_deref(), Some("TERMINATED"));
    // sshd saw the POSIX user, not the config's.
    assert!(
        sshd.log().contains("Accepted publickey for root"),
        "{}",
        sshd.log()
    );

    // What reached the OS Login API: the profile read first, then one import
    // of exactly the user's key, with an expiry in microseconds, for the
    // builder's project.
    let calls = fake.oslogin(|o| o.requests.clone());
    let shape: Vec<(String, String)> = calls
        .iter()
        .map(|c| (c.method.clone(), c.path.clone()))
        .collect();
    assert_eq!(
        shape,
        vec![
            ("GET".into(), format!("/v1/users/{SA}/loginProfile")),
            ("POST".into(), format!("/v1/users/{SA}:importSshPublicKey")),
        ],
        "{calls:#?}"
    );
    assert!(
        calls
            .iter()
            .all(|c| c.query.contains("projectId=absconda-test"))
    );
    let body = &calls[1].body;
    assert_eq!(body["key"].as_str(), Some(public_key(&sshd).as_str()));
    let expires: i64 = body["expirationTimeUsec"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let ttl = Duration::from_micros((expires - before) as u64);
    assert!(
        ttl > Duration::from_secs(30 + 600) && ttl < Duration::from_secs(3 * 3600),
        "key lifetime {ttl:?}"
    );
    let held = fake.oslogin(|o| o.keys(SA));
    assert_eq!(held.len(), 1, "{held:?}");

    // The next connection finds the key and writes nothing; `remote status`
    // names the access path and the user.
    let status = |p: &Project| -> Value {
        let out = p
            .cmd()
            .args(["remote", "status", "local", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    fake.set_status("builder", "RUNNING");
    let st = status(&p);
    assert_eq!(st["reachable"], true, "{st}");
    assert_eq!(st["path"], "direct");
    assert_eq!(st["access"], "oslogin");
    assert_eq!(st["user"], "root");
    let calls = fake.oslogin(|o| o.requests.clone());
    assert_eq!(calls.len(), 3, "only the profile was read: {calls:#?}");

    // A key about to expire is extended in place, never imported twice.
    let soon = now_usec() + 60_000_000;
    let key = public_key(&sshd);
    fake.oslogin(|o| o.add_key(SA, &key, Some(soon)));
    let st = status(&p);
    assert_eq!(st["reachable"], true, "{st}");
    let calls = fake.oslogin(|o| o.requests.clone());
    let patch = calls.last().unwrap();
    assert_eq!(patch.method, "PATCH", "{calls:#?}");
    assert!(
        patch
            .path
            .starts_with(&format!("/v1/users/{SA}/sshPublicKeys/"))
    );
    assert_eq!(patch.query, "updateMask=expirationTimeUsec");
    let held = fake.oslogin(|o| o.keys(SA));
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(held[0].1.unwrap() > soon + 600_000_000, "{held:?}");
    fake.set_status("builder", "TERMINATED");
}

#[test]
fn oslogin_variants_absconda_cannot_use_are_named() {
    if !crate::support::require(SSHD) {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let sshd = Sshd::start_with(
        None,
        "127.0.0.1",
        None,
        &format!("AuthorizedKeysFile {}/%u\n", keys.path().display()),
    );
    let fake = GceFake::start();
    fake.add_instance("builder", "RUNNING");
    fake.set_instance_metadata("builder", "enable-oslogin", "TRUE");
    for (key, words) in [
        ("enable-oslogin-2fa", "two-factor authentication"),
        ("enable-oslogin-certificates", "certificates only"),
    ] {
        fake.set_instance_metadata("builder", key, "TRUE");
        let p = project(&fake, &sshd, "");
        p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
        let out = p.build("x/y", &[]);
        assert_eq!(out.status.code(), Some(3), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(words) && err.contains(key), "{err}");
        assert!(err.contains("does not support"), "{err}");
        fake.set_instance_metadata("builder", key, "FALSE");
    }
    assert_eq!(
        fake.oslogin(|o| o.requests.len()),
        0,
        "nothing was imported"
    );

    // Metadata keys on an OS Login VM would be ignored by its guest: refused.
    let p = project(&fake, &sshd, "    access: metadata\n");
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
    let out = p.build("x/y", &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("access: oslogin"));
    assert_eq!(fake.count(Route::SetMetadata), 0);

    // The instance's `enable-oslogin=FALSE` overrides the project's TRUE:
    // `auto` then uses the key the builder trusts (none here, so the
    // connection is refused, but OS Login is never asked).
    fake.set_instance_metadata("builder", "enable-oslogin", "FALSE");
    fake.set_project_metadata("enable-oslogin", "TRUE");
    let p = project(&fake, &sshd, "");
    let out = p
        .cmd()
        .args(["remote", "status", "local", "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(fake.oslogin(|o| o.requests.len()), 0);
}

#[test]
fn a_metadata_key_is_added_next_to_everything_else_despite_a_concurrent_writer() {
    if !ok() {
        return;
    }
    let reg = registry();
    let keys = tempfile::tempdir().unwrap();
    let sshd = guest_sshd(keys.path());
    let fake = GceFake::start();
    fake.add_instance("builder", "TERMINATED");
    let alice = "alice:ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC0 alice@laptop";
    fake.set_instance_metadata("builder", "startup-script", "#!/bin/sh\necho hi\n");
    fake.set_instance_metadata("builder", "ssh-keys", alice);
    fake.serve_guest_keys("builder", keys.path());
    // Someone else changes the metadata between absconda's read and write.
    fake.write_concurrently_before_next_set("builder", "team-note", "written meanwhile");
    let mut p = project(&fake, &sshd, "    access: metadata\n");
    p.with_registry_credentials(reg);
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nCOPY hello /hello\n"),
    );
    p.file("hello", "through a metadata key\n");

    let out = p.build(
        &format!("{}/access/metadata", reg.addr),
        &["--tag", "v1", "--push", "--remote-off"],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), sshd.log());
    assert_eq!(
        reg.files("access/metadata", "v1")
            .get("hello")
            .map(|v| v.as_slice()),
        Some(&b"through a metadata key\n"[..])
    );

    // The first setMetadata lost the race (412) and was redone on fresh
    // metadata: every other item and key survived.
    let bodies = fake.set_metadata_bodies();
    assert_eq!(bodies.len(), 2, "{bodies:#?}");
    assert_ne!(bodies[0]["fingerprint"], bodies[1]["fingerprint"]);
    let md = fake.instance_metadata("builder");
    let get = |k: &str| md.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    assert_eq!(
        get("startup-script").as_deref(),
        Some("#!/bin/sh\necho hi\n")
    );
    assert_eq!(get("team-note").as_deref(), Some("written meanwhile"));
    let ssh_keys = get("ssh-keys").unwrap();
    let lines: Vec<&str> = ssh_keys.lines().collect();
    assert_eq!(lines.len(), 2, "{ssh_keys}");
    assert_eq!(lines[0], alice);
    // The documented format: `user:type key google-ssh {"userName":…,"expireOn":…}`.
    let (head, meta) = lines[1].split_once(" google-ssh ").unwrap();
    assert_eq!(head, format!("root:{}", public_key(&sshd)));
    let meta: Value = serde_json::from_str(meta).unwrap();
    assert_eq!(meta["userName"], SA);
    let expire =
        chrono::DateTime::parse_from_str(meta["expireOn"].as_str().unwrap(), "%Y-%m-%dT%H:%M:%S%z")
            .unwrap();
    let ttl = expire.with_timezone(&chrono::Utc) - chrono::Utc::now();
    assert!(
        ttl > chrono::Duration::minutes(10) && ttl < chrono::Duration::hours(3),
        "{ttl}"
    );

    // A second build finds its entry valid and writes nothing.
    fake.write_concurrently_before_next_set("builder", "unused", "x");
    let out = p.build(
        &format!("{}/access/metadata", reg.addr),
        &["--tag", "v2", "--push"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(fake.set_metadata_bodies().len(), 2);
    fake.set_status("builder", "TERMINATED");
}

#[test]
fn instance_connect_pushes_the_key_before_each_connection() {
    use crate::support::instance_connect_tap::InstanceConnectTap;
    use crate::support::moto::Moto;
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
    let reg = registry();
    let keys = tempfile::tempdir().unwrap();
    let sshd = guest_sshd(keys.path());
    let tap = InstanceConnectTap::start(
        moto.addr(),
        keys.path().to_path_buf(),
        absconda::cloud::instance_connect::KEY_WINDOW,
    );
    let yaml = format!(
        "    provider: aws\n    region: us-east-1\n    instance: absconda-builder\n    api_endpoint: {}\n    instance_connect_endpoint: {}\n    access: instance-connect\n    ready_timeout: 60\n",
        moto.endpoint(),
        tap.endpoint(),
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
    p.file("hello", "through EC2 Instance Connect\n");

    let out = p.build(
        &format!("{}/access/eic", reg.addr),
        &["--tag", "v1", "--push", "--remote-off"],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), sshd.log());
    assert_eq!(
        reg.files("access/eic", "v1")
            .get("hello")
            .map(|v| v.as_slice()),
        Some(&b"through EC2 Instance Connect\n"[..])
    );
    assert_eq!(rt.block_on(moto.state(&id)), "stopped");
    assert!(
        sshd.log().contains("Accepted publickey for root"),
        "{}",
        sshd.log()
    );

    // Every push was signed for ec2-instance-connect, accepted by moto's
    // signature check, and carried exactly the user's key for the instance.
    let pushed = tap.pushed();
    assert!(!pushed.is_empty());
    for push in &pushed {
        assert_eq!(push.status, 200, "{push:?}");
        assert_eq!(push.body["InstanceId"], id.as_str());
        assert_eq!(push.body["InstanceOSUser"], "root");
        assert_eq!(push.body["SSHPublicKey"], public_key(&sshd).as_str());
        let auth = push
            .headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .map(|(_, v)| v.as_str())
            .unwrap_or_default();
        assert!(
            auth.contains("/us-east-1/ec2-instance-connect/aws4_request"),
            "{auth}"
        );
        assert!(
            auth.contains("SignedHeaders=content-type;host;x-amz-date;x-amz-target"),
            "{auth}"
        );
    }

    // Another connection, another push first.
    let before = pushed.len();
    rt.block_on(async {
        use absconda::cloud::Provider;
        moto.ec2(absconda::cloud::ec2::Ec2Instance::Id(id.clone()))
            .start()
            .await
            .unwrap();
    });
    let out = p
        .cmd()
        .args(["remote", "status", "local", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["reachable"], true, "{st}");
    assert_eq!(st["access"], "instance-connect");
    assert_eq!(st["user"], "root");
    assert_eq!(tap.pushed().len(), before + 1);
}

#[test]
fn oslogin_finds_the_account_of_gcloud_user_and_metadata_server_credentials() {
    if !ok() {
        return;
    }
    for (flow, account) in [
        (Flow::GcloudUser, "dev@example.com"),
        (
            Flow::MetadataServer,
            "123456789012-compute@developer.gserviceaccount.com",
        ),
    ] {
        let keys = tempfile::tempdir().unwrap();
        let sshd = guest_sshd(keys.path());
        let fake = GceFake::start();
        fake.add_instance("builder", "RUNNING");
        fake.set_instance_metadata("builder", "enable-oslogin", "TRUE");
        fake.serve_guest_keys("builder", keys.path());
        fake.oslogin(|o| o.set_username(account, "root"));
        let mut p = project(&fake, &sshd, "");
        p.env.retain(|(k, _)| {
            !matches!(
                k.as_str(),
                "GOOGLE_APPLICATION_CREDENTIALS" | "CLOUDSDK_CONFIG" | "GCE_METADATA_HOST"
            )
        });
        let mut cmd = p.cmd();
        for (k, v) in fake.credential_env(flow, p.dir.path()) {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let out = cmd
            .args(["remote", "status", "local", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{flow:?}: {}", text(&out));
        let st: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(st["reachable"], true, "{flow:?}: {st}");
        assert_eq!(st["access"], "oslogin");
        let keys_held = fake.oslogin(|o| o.keys(account));
        assert_eq!(keys_held.len(), 1, "{flow:?}");
        assert_eq!(keys_held[0].0, public_key(&sshd));
        // The token never travels in a path the fake logs.
        assert!(fake.requests().iter().all(|r| !r.path.contains("ya29.")));
    }
}
