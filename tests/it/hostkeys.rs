//! Host key verification against a real sshd.

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, docker};
use crate::support::sshd::{SSHD, Sshd};

fn ok() -> bool {
    crate::support::require(SSHD) && crate::support::require("dockerd")
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
fn a_wrong_host_key_is_refused_before_any_byte_of_context() {
    if !ok() {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let p = Project::new(&sshd);
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
    // Record another ed25519 key for this host.
    let other = crate::support::tempdir();
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(other.path().join("k"))
        .status()
        .unwrap();
    assert!(st.success());
    let other_pub = std::fs::read_to_string(other.path().join("k.pub")).unwrap();
    std::fs::write(
        &sshd.known_hosts,
        format!("[127.0.0.1]:{} {}", sshd.port, other_pub),
    )
    .unwrap();

    let out = p.build("127.0.0.1:1/x/y", &["--tag", "t"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HOST KEY MISMATCH"), "{err}");
    assert!(
        err.contains(&sshd.fingerprint()),
        "the server's fingerprint is shown: {err}"
    );
    assert!(err.contains("line 1"), "{err}");
    nothing_sent(&sshd, &p);
}

#[test]
fn a_key_of_another_algorithm_than_recorded_is_a_change() {
    if !ok() {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let p = Project::new(&sshd);
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
    let other = crate::support::tempdir();
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ecdsa", "-N", "", "-f"])
        .arg(other.path().join("k"))
        .status()
        .unwrap();
    assert!(st.success());
    let other_pub = std::fs::read_to_string(other.path().join("k.pub")).unwrap();
    std::fs::write(
        &sshd.known_hosts,
        format!("[127.0.0.1]:{} {}", sshd.port, other_pub),
    )
    .unwrap();
    let out = p.build("127.0.0.1:1/x/y", &["--tag", "t"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("HOST KEY MISMATCH"));
    nothing_sent(&sshd, &p);
}

#[test]
fn an_unknown_host_is_refused_with_its_fingerprint_and_accept_new_records_it() {
    if !ok() {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    std::fs::write(&sshd.known_hosts, "").unwrap();
    let p = Project::new(&sshd);
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
    let out = p
        .cmd()
        .args(["remote", "status", "local"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(err.contains("is not known"), "{err}");
    assert!(err.contains(&sshd.fingerprint()), "{err}");
    assert!(
        err.contains("host_key_policy: accept-new"),
        "the hint names the setting: {err}"
    );
    nothing_sent(&sshd, &p);

    // Pinning the fingerprint works without touching known_hosts.
    let pinned = Project::with_builder(
        &sshd,
        &format!("    host_key: \"{}\"\n", sshd.fingerprint()),
    );
    let out = pinned
        .cmd()
        .args(["remote", "status", "local", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&sshd.known_hosts).unwrap(), "");

    // accept-new records the key, and the next connection checks against it.
    let p = Project::with_builder(&sshd, "    host_key_policy: accept-new\n");
    let out = p
        .cmd()
        .args(["remote", "status", "local", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["reachable"], true);
    assert_eq!(status["host_key"], sshd.fingerprint());
    let recorded = std::fs::read_to_string(&sshd.known_hosts).unwrap();
    assert_eq!(
        recorded.trim(),
        format!(
            "[127.0.0.1]:{} {}",
            sshd.port,
            sshd.host_key_pub
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        )
    );
    let strict = Project::new(&sshd);
    let out = strict
        .cmd()
        .args(["remote", "status", "local"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

/// `accept-new` accepts only keys of hosts it has never seen: a host whose
/// recorded key changed is refused as under `strict`, and the recorded key
/// stays as it was.
#[test]
fn a_changed_host_key_is_refused_under_accept_new() {
    if !ok() {
        return;
    }
    let sshd = Sshd::start(Some(&docker().host));
    let p = Project::with_builder(&sshd, "    host_key_policy: accept-new\n");
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
    // What an earlier accept-new recorded for this host and port: the key
    // the server had before it changed.
    let other = crate::support::tempdir();
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(other.path().join("k"))
        .status()
        .unwrap();
    assert!(st.success());
    let other_pub = std::fs::read_to_string(other.path().join("k.pub")).unwrap();
    let recorded = format!("[127.0.0.1]:{} {}", sshd.port, other_pub.trim());
    std::fs::write(&sshd.known_hosts, format!("{recorded}\n")).unwrap();

    let out = p.build("127.0.0.1:1/x/y", &["--tag", "t"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HOST KEY MISMATCH"), "{err}");
    assert!(err.contains(&sshd.fingerprint()), "{err}");
    assert_eq!(
        std::fs::read_to_string(&sshd.known_hosts).unwrap(),
        format!("{recorded}\n"),
        "the recorded key was replaced"
    );
    nothing_sent(&sshd, &p);
}
