//! Authentication with every kind of key, ssh-agent, passphrases; a long
//! silent step against an sshd that probes its clients; registry
//! credentials from `~/.docker/config.json`; gzip on the wire.

use std::process::{Command, Stdio};

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, docker, registry};
use crate::support::sshd::{SSHD, Sshd};

fn ok() -> bool {
    crate::support::require(SSHD) && crate::support::require("dockerd")
}

fn keygen(path: &std::path::Path, args: &[&str]) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-C", ""])
        .args(args)
        .arg("-f")
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Authorises `key.pub` on `sshd` and points the project's builder at `key`.
fn use_key(p: &mut Project, sshd: &Sshd, key: &std::path::Path, extra: &str) {
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    std::fs::write(sshd.dir.path().join("authorized_keys"), public).unwrap();
    p.write_config(sshd, extra);
    let text = std::fs::read_to_string(&p.config).unwrap();
    std::fs::write(
        &p.config,
        text.replace(
            &sshd.user_key.display().to_string(),
            &key.display().to_string(),
        ),
    )
    .unwrap();
}

fn status_ok(p: &Project) -> Result<(), String> {
    let out = p
        .cmd()
        .args(["remote", "status", "local", "--json"])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(text(&out))
    }
}

#[test]
fn rsa_ecdsa_and_passphrase_protected_keys_authenticate() {
    if !ok() {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let keys = crate::support::tempdir();
    let mut p = Project::new(&sshd);
    for (name, args) in [
        ("rsa", vec!["-t", "rsa", "-b", "3072", "-N", ""]),
        ("ecdsa", vec!["-t", "ecdsa", "-b", "256", "-N", ""]),
        ("ecdsa384", vec!["-t", "ecdsa", "-b", "384", "-N", ""]),
        ("ed25519", vec!["-t", "ed25519", "-N", ""]),
    ] {
        let key = keys.path().join(name);
        keygen(&key, &args);
        use_key(&mut p, &sshd, &key, "");
        status_ok(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // OpenSSH 9 refuses `ssh-rsa` (SHA-1) signatures by default, so the RSA
    // key getting in shows absconda signed with rsa-sha2-256/512.
    assert!(
        sshd.log()
            .contains("Accepted publickey for root from 127.0.0.1 port")
            && sshd.log().contains(": RSA SHA256:"),
        "{}",
        sshd.log()
    );

    let key = keys.path().join("locked");
    keygen(&key, &["-t", "ed25519", "-N", "correct horse"]);
    use_key(&mut p, &sshd, &key, "");
    // No terminal and no passphrase: a clear error, exit 3.
    let out = p
        .cmd()
        .args(["remote", "status", "local"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ABSCONDA_SSH_PASSPHRASE"),
        "{}",
        text(&out)
    );
    p.env
        .push(("ABSCONDA_SSH_PASSPHRASE".into(), "wrong".into()));
    let out = p
        .cmd()
        .args(["remote", "status", "local"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("wrong passphrase"),
        "{}",
        text(&out)
    );
    p.env.pop();
    p.env
        .push(("ABSCONDA_SSH_PASSPHRASE".into(), "correct horse".into()));
    status_ok(&p).unwrap();
    let out = p
        .cmd()
        .args(["-vv", "remote", "status", "local"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("correct horse"));
}

/// Starts ssh-agent holding `decoys` unrelated keys, then `sshd`'s user
/// key, and points a project at it with no identity file. Returns the
/// project, the agent and its folder.
fn agent_project(sshd: &Sshd, decoys: usize) -> (Project, std::process::Child, tempfile::TempDir) {
    let dir = crate::support::tempdir();
    let sock = dir.path().join("agent.sock");
    let agent = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    crate::support::wait_until(
        "ssh-agent socket",
        std::time::Duration::from_secs(5),
        || sock.exists(),
    );
    let mut keys: Vec<std::path::PathBuf> = (0..decoys)
        .map(|i| {
            let k = dir.path().join(format!("decoy{i}"));
            keygen(&k, &["-t", "ed25519", "-N", ""]);
            k
        })
        .collect();
    keys.push(sshd.user_key.clone());
    for k in &keys {
        assert!(
            Command::new("ssh-add")
                .arg(k)
                .env("SSH_AUTH_SOCK", &sock)
                .stderr(Stdio::null())
                .status()
                .unwrap()
                .success()
        );
    }
    let mut p = Project::new(sshd);
    // No identity_file: the agent's keys are offered.
    let yaml = std::fs::read_to_string(&p.config).unwrap();
    let yaml: String = yaml
        .lines()
        .filter(|l| !l.contains("identity_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&p.config, yaml).unwrap();
    p.env
        .push(("SSH_AUTH_SOCK".into(), sock.display().to_string()));
    (p, agent, dir)
}

#[test]
fn keys_held_by_ssh_agent_authenticate() {
    if !(ok() && crate::support::require("ssh-agent") && crate::support::require("ssh-add")) {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    // Several unrelated keys first, then the right one.
    let (p, mut agent, _dir) = agent_project(&sshd, 3);
    let r = status_ok(&p);
    let _ = agent.kill();
    let _ = agent.wait();
    r.unwrap();
}

/// An agent crowded with keys: absconda offers at most five, as sshd's log
/// shows, even to a server that would take more tries (here the right key
/// is the seventh, and sshd allows 20).
#[test]
fn a_crowded_agent_is_offered_at_most_five_keys() {
    if !(ok() && crate::support::require("ssh-agent") && crate::support::require("ssh-add")) {
        return;
    }
    let sshd = Sshd::start_with(Some(&docker().host), "127.0.0.1", None, "MaxAuthTries 20\n");
    let (p, mut agent, _dir) = agent_project(&sshd, 6);
    let r = status_ok(&p);
    let _ = agent.kill();
    let _ = agent.wait();
    let err = r.expect_err("the seventh key must not be offered");
    let log = sshd.log();
    let failed = log.matches("Failed publickey for root").count();
    assert!(!log.contains("Accepted publickey"), "{log}");
    assert!(
        (1..=5).contains(&failed),
        "{failed} keys tried:\n{log}\n{err}"
    );
}

#[test]
fn a_long_silent_step_survives_an_sshd_that_probes_its_clients() {
    if !ok() {
        return;
    }
    // sshd drops clients that miss two keepalive probes 1 s apart; a silent
    // 6 s step must still finish.
    let sshd = Sshd::start_with(
        Some(&docker().host),
        "127.0.0.1",
        None,
        "ClientAliveInterval 1\nClientAliveCountMax 2\n",
    );
    let p = Project::new(&sshd);
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\nRUN sleep 6\n"));
    let out = p.build("silent/app", &["--network", "none", "--no-cache"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn gzip_on_the_wire_and_credentials_from_docker_config() {
    if !(ok() && crate::support::require("docker-registry")) {
        return;
    }
    let (d, reg) = (docker(), registry());
    let sshd = Sshd::start(Some(&d.host));
    let p = Project::with_builder(&sshd, "    compression: gzip\n");
    // Credentials only in the user's ~/.docker/config.json.
    let auth = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("{}:{}", reg.user, reg.password),
    );
    std::fs::create_dir_all(p.home.join(".docker")).unwrap();
    std::fs::write(
        p.home.join(".docker/config.json"),
        format!(r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#, reg.addr),
    )
    .unwrap();
    p.file(
        "Dockerfile",
        &format!("FROM {BASE_IMAGE}\nCOPY big.txt /big.txt\n"),
    );
    p.file("big.txt", &"compressible text\n".repeat(50_000));
    let out = p.build(
        &format!("{}/wire/gzip", reg.addr),
        &["--tag", "v1", "--push", "--json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["compression"], "gzip");
    let sent = report["bytes_sent"].as_u64().unwrap();
    assert!(
        sent < 100_000,
        "gzip did not shrink 900 kB of text: {sent} bytes sent"
    );
    assert_eq!(reg.files("wire/gzip", "v1")["big.txt"].len(), 900_000);
}
