//! `--ssh`: the client's agent (OpenSSH's ssh-agent, started by the test)
//! answers a `RUN --mount=type=ssh` step on the builder through absconda's
//! own SSH connection.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::absconda::{Project, text};
use crate::support::docker::{BASE_IMAGE, docker};
use crate::support::sshd::{SSHD, Sshd};
use crate::support::{spawn_daemon, wait_until};

/// Stops the test's ssh-agent (it does not keep the parent-death signal).
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An ssh-agent on `sock` holding a fresh key; returns it and the key's fingerprint.
fn agent_with_key(dir: &Path, sock: &Path) -> (Agent, String) {
    let mut cmd = Command::new("ssh-agent");
    cmd.args(["-D", "-a"])
        .arg(sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let agent = Agent(spawn_daemon(cmd).unwrap());
    wait_until("ssh-agent listening", Duration::from_secs(10), || {
        sock.exists()
    });
    let key = dir.join("agent-key");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("ssh-add")
        .arg(&key)
        .env("SSH_AUTH_SOCK", sock)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let fp = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(key.with_extension("pub"))
        .output()
        .unwrap();
    let fingerprint = String::from_utf8_lossy(&fp.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    (agent, fingerprint)
}

/// ssh-add and the libraries it needs, copied into the context.
fn ssh_add_into(context: &Path) {
    let ldd = Command::new("ldd")
        .arg("/usr/bin/ssh-add")
        .output()
        .unwrap();
    let mut files = vec!["/usr/bin/ssh-add".to_string()];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
            files.push(p.to_string());
        }
    }
    for f in files {
        let to = context.join("root").join(f.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&f, &to).unwrap();
    }
}

fn project(sshd: &Sshd) -> Project {
    let p = Project::with_builder(sshd, "    buildkit: on\n");
    ssh_add_into(&p.context);
    p.file(
        "Dockerfile",
        &format!(
            "FROM {BASE_IMAGE}\nCOPY root/ /\nRUN --mount=type=ssh /usr/bin/ssh-add -l > /keys\n"
        ),
    );
    p
}

#[test]
fn the_local_agent_answers_a_build_step() {
    crate::require!(SSHD, "dockerd", "ssh-agent", "ssh-add", "ssh-keygen", "ldd");
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let mut p = project(&sshd);
    let sock = p.dir.path().join("agent.sock");
    let (_agent, fingerprint) = agent_with_key(p.dir.path(), &sock);
    p.env
        .push(("SSH_AUTH_SOCK".into(), sock.display().to_string()));
    let out = p.build("sshfwd/app", &["--network", "none", "--ssh", "default"]);
    assert!(out.status.success(), "{}", text(&out));
    let keys = d.run(&[
        "run",
        "--rm",
        "--network",
        "none",
        "sshfwd/app:latest",
        "cat",
        "/keys",
    ]);
    let keys = String::from_utf8_lossy(&keys.stdout);
    assert!(
        keys.contains(&fingerprint),
        "the agent's key not listed: {keys}"
    );
}

#[test]
fn a_server_that_refuses_forwarding_is_a_clear_error() {
    crate::require!(SSHD, "dockerd", "ssh-agent", "ssh-add", "ssh-keygen", "ldd");
    let d = docker();
    let sshd = Sshd::start_with(
        Some(&d.host),
        "127.0.0.1",
        None,
        "AllowAgentForwarding no\n",
    );
    let mut p = project(&sshd);
    let sock = p.dir.path().join("agent.sock");
    let _agent = agent_with_key(p.dir.path(), &sock);
    p.env
        .push(("SSH_AUTH_SOCK".into(), sock.display().to_string()));
    let out = p.build("sshfwd/refused", &["--network", "none", "--ssh", "default"]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused agent forwarding")
            && err.contains("hint: set `AllowAgentForwarding yes`"),
        "{err}"
    );
    assert!(p.run_folders().is_empty());
}
