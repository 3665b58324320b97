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

/// A fresh key file (`ssh-keygen`); returns its public key and fingerprint.
fn key_file(path: &Path, kind: &str, passphrase: &str) -> (String, String) {
    let st = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            kind,
            "-C",
            "absconda-test",
            "-N",
            passphrase,
            "-f",
        ])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
    let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    let fp = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(path.with_extension("pub"))
        .output()
        .unwrap();
    let fingerprint = String::from_utf8_lossy(&fp.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    (public, fingerprint)
}

/// Files under `roots` (recursively) that contain any of `needles`
/// (byte strings without a newline).
fn files_containing_any(roots: &[&Path], needles: &[Vec<u8>]) -> Vec<String> {
    let patterns = tempfile::NamedTempFile::new().unwrap();
    let mut all = Vec::new();
    for n in needles {
        assert!(!n.contains(&b'\n'));
        all.extend_from_slice(n);
        all.push(b'\n');
    }
    std::fs::write(patterns.path(), &all).unwrap();
    let mut cmd = Command::new("grep");
    cmd.arg("-rlsaF").arg("-f").arg(patterns.path()).arg("--");
    let mut any = false;
    for r in roots {
        if r.exists() {
            cmd.arg(r);
            any = true;
        }
    }
    if !any {
        return Vec::new();
    }
    let out = cmd.output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with(&patterns.path().display().to_string()))
        .map(String::from)
        .collect()
}

/// What of a key file must never be on the builder: every line of its
/// (base64) body that is not public (the file starts with the public key,
/// which the context carries on purpose), and for an unencrypted ed25519
/// key the raw private half.
fn key_needles(path: &Path) -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(path).unwrap();
    let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    let mut needles: Vec<Vec<u8>> = text
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 20 && !public.contains(*l))
        .map(|l| l.as_bytes().to_vec())
        .collect();
    if let Ok(key) = russh::keys::PrivateKey::from_openssh(&text)
        && let Some(ed) = key.key_data().ed25519()
    {
        let secret = ed.private.to_bytes();
        // The longest run of the secret without a newline byte.
        let best = secret
            .split(|b| *b == b'\n')
            .max_by_key(|s| s.len())
            .unwrap()
            .to_vec();
        assert!(best.len() >= 12);
        needles.push(best);
    }
    needles
}

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
    programs_into(context, &["/usr/bin/ssh-add"]);
}

/// Programs and the libraries they need, copied into the context's `root/`.
fn programs_into(context: &Path, programs: &[&str]) {
    let mut files: Vec<String> = Vec::new();
    for program in programs {
        files.push(program.to_string());
        let ldd = Command::new("ldd").arg(program).output().unwrap();
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/'))
                && !files.iter().any(|f| f == p)
            {
                files.push(p.to_string());
            }
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

#[test]
fn key_files_are_served_by_absconda_and_never_reach_the_builder() {
    crate::require!(SSHD, "dockerd", "ssh-add", "ssh-keygen", "ldd", "grep");
    let d = docker();
    let sshd = Sshd::start(Some(&d.host));
    let mut p = Project::with_builder(&sshd, "    buildkit: on\n");
    let keys = p.dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let ed = keys.join("deploy_ed25519");
    let rsa = keys.join("deploy_rsa");
    let (ed_pub, ed_fp) = key_file(&ed, "ed25519", "");
    // An encrypted key: absconda unlocks it with ABSCONDA_SSH_PASSPHRASE.
    let (rsa_pub, rsa_fp) = key_file(&rsa, "rsa", "correct horse");
    p.env
        .push(("ABSCONDA_SSH_PASSPHRASE".into(), "correct horse".into()));
    programs_into(&p.context, &["/usr/bin/ssh-add", "/usr/bin/ssh-keygen"]);
    p.file("root/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n");
    p.file("root/keys/ed.pub", &ed_pub);
    p.file("root/keys/rsa.pub", &rsa_pub);
    // The step lists the keys, and signs with each (ssh-keygen -Y sign
    // given only a public key asks the agent): RSA signatures use
    // rsa-sha2-512, so the agent must honour the flag.
    p.file(
        "Dockerfile",
        &format!(
            "FROM {BASE_IMAGE}\nCOPY root/ /\n\
             RUN --mount=type=ssh,id=deploy /usr/bin/ssh-add -l > /listed && \
             echo signed-in-the-build > /msg-ed && cp /msg-ed /msg-rsa && \
             /usr/bin/ssh-keygen -q -Y sign -f /keys/ed.pub -n absconda /msg-ed && \
             /usr/bin/ssh-keygen -q -Y sign -f /keys/rsa.pub -n absconda /msg-rsa\n"
        ),
    );
    let spec = format!("deploy={},{}", ed.display(), rsa.display());
    let out = p.build(
        "sshkeys/app",
        &["-vv", "--network", "none", "--no-cache", "--ssh", &spec],
    );
    assert!(out.status.success(), "{}", text(&out));
    let all = text(&out);

    let cat = |f: &str| {
        let o = d.run(&[
            "run",
            "--rm",
            "--network",
            "none",
            "sshkeys/app:latest",
            "cat",
            f,
        ]);
        assert!(
            o.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    };
    let listed = String::from_utf8_lossy(&cat("/listed")).into_owned();
    assert!(
        listed.contains(&ed_fp) && listed.contains(&rsa_fp),
        "the keys are not listed: {listed}"
    );
    assert!(
        listed.contains("RSA") && listed.contains("ED25519"),
        "{listed}"
    );
    // Both signatures verify against the client's public keys.
    let allowed = p.dir.path().join("allowed_signers");
    std::fs::write(&allowed, format!("ed@test {ed_pub}rsa@test {rsa_pub}")).unwrap();
    for (name, who) in [("ed", "ed@test"), ("rsa", "rsa@test")] {
        let sig = p.dir.path().join(format!("{name}.sig"));
        std::fs::write(&sig, cat(&format!("/msg-{name}.sig"))).unwrap();
        let mut verify = Command::new("ssh-keygen")
            .args(["-Y", "verify", "-n", "absconda", "-I", who, "-f"])
            .arg(&allowed)
            .arg("-s")
            .arg(&sig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(
            &mut verify.stdin.take().unwrap(),
            &cat(&format!("/msg-{name}")),
        )
        .unwrap();
        let v = verify.wait_with_output().unwrap();
        assert!(v.status.success(), "{name}: {}", text(&v));
    }
    let sig = String::from_utf8_lossy(&cat("/msg-rsa.sig")).into_owned();
    assert!(sig.contains("BEGIN SSH SIGNATURE"), "{sig}");

    // No key material on the builder: its workspace (run folders, the
    // context's copy), /tmp, /dev/shm and docker's data root; nor in
    // absconda's -vv output or the image.
    let mut needles = key_needles(&ed);
    needles.extend(key_needles(&rsa));
    assert!(needles.len() >= 10, "{}", needles.len());
    let roots = [
        p.workspace.as_path(),
        Path::new("/tmp"),
        Path::new("/dev/shm"),
        d.root.as_path(),
    ];
    assert_eq!(
        files_containing_any(&roots, &needles),
        Vec::<String>::new(),
        "key material on the builder"
    );
    for n in &needles {
        assert!(!all.as_bytes().windows(n.len()).any(|w| w == &n[..]));
    }
    assert!(p.run_folders().is_empty());
}

#[test]
fn a_wrong_passphrase_for_a_key_file_is_refused_before_connecting() {
    crate::require!(SSHD, "ssh-keygen");
    let sshd = Sshd::start(None);
    let mut p = Project::new(&sshd);
    p.file("Dockerfile", &format!("FROM {BASE_IMAGE}\n"));
    let key = p.dir.path().join("locked");
    key_file(&key, "ed25519", "right");
    p.env
        .push(("ABSCONDA_SSH_PASSPHRASE".into(), "wrong".into()));
    let out = p.build(
        "sshkeys/locked",
        &["--ssh", &format!("default={}", key.display())],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot use the key file") && err.contains("wrong passphrase"),
        "{err}"
    );
    assert!(p.run_folders().is_empty());
}
