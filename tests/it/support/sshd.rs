//! A real OpenSSH sshd on loopback, one per test, with its own host key,
//! user key and `known_hosts`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, spawn_daemon, tempdir, wait_until};

pub const SSHD: &str = "/usr/sbin/sshd";

pub struct Sshd {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub host_key_pub: String,
    pub user_key: PathBuf,
    /// A known_hosts file with this server's key recorded as `[127.0.0.1]:port`.
    pub known_hosts: PathBuf,
    pub listen: String,
    child: Option<Child>,
    config: PathBuf,
}

fn keygen(path: &Path, kind: &str) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-N", "", "-C", "", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen");
    assert!(st.success());
}

impl Sshd {
    /// Starts sshd; `docker_host` becomes `DOCKER_HOST` in its sessions.
    pub fn start(docker_host: Option<&str>) -> Sshd {
        Sshd::start_with(docker_host, "127.0.0.1", None, "")
    }

    /// Starts sshd on `listen` (inside network namespace `netns` when given)
    /// with extra sshd_config lines.
    pub fn start_with(
        docker_host: Option<&str>,
        listen: &str,
        netns: Option<&str>,
        extra: &str,
    ) -> Sshd {
        let dir = tempdir();
        let d = dir.path();
        keygen(&d.join("hostkey"), "ed25519");
        keygen(&d.join("userkey"), "ed25519");
        std::fs::copy(d.join("userkey.pub"), d.join("authorized_keys")).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        // Another process may take the free port before sshd binds it: then
        // sshd exits, and the next attempt takes another port.
        let mut attempt = 0;
        let (port, host_key_pub, known_hosts, config_path, child) = loop {
            attempt += 1;
            let port = free_port();
            let mut config = format!(
                "Port {port}\nListenAddress {listen}\nHostKey {hk}\nAuthorizedKeysFile {ak}\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             PidFile {pid}\nPermitRootLogin prohibit-password\nMaxStartups 50\nMaxSessions 50\nLogLevel VERBOSE\n",
                hk = d.join("hostkey").display(),
                ak = d.join("authorized_keys").display(),
                pid = d.join("sshd.pid").display(),
            );
            if extra.lines().any(|l| l.starts_with("LogLevel ")) {
                // sshd takes the first value: let the test's win.
                config = config.replace("LogLevel VERBOSE\n", "");
            }
            if let Some(h) = docker_host {
                config.push_str(&format!("SetEnv DOCKER_HOST={h}\n"));
            }
            config.push_str(extra);
            let config_path = d.join("sshd_config");
            std::fs::write(&config_path, config).unwrap();
            let host_key_pub = std::fs::read_to_string(d.join("hostkey.pub"))
                .unwrap()
                .trim()
                .to_string();
            let name = if port == 22 {
                listen.to_string()
            } else {
                format!("[{listen}]:{port}")
            };
            let known_hosts = d.join("known_hosts");
            std::fs::write(&known_hosts, format!("{name} {host_key_pub}\n")).unwrap();

            let mut cmd = match netns {
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns, SSHD]);
                    c
                }
                None => Command::new(SSHD),
            };
            cmd.args(["-D", "-e", "-f"])
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.join("sshd.log")).unwrap());
            let mut child = spawn_daemon(cmd).expect("start sshd");
            let log = d.join("sshd.log");
            let mut exited = false;
            wait_until("sshd listening", Duration::from_secs(20), || {
                exited = child.try_wait().ok().flatten().is_some();
                exited
                    || std::fs::read_to_string(&log).is_ok_and(|l| {
                        l.contains(&format!("Server listening on {listen} port {port}"))
                    })
            });
            if !exited {
                break (port, host_key_pub, known_hosts, config_path, child);
            }
            assert!(
                attempt < 5,
                "sshd did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Sshd {
            port,
            user_key: d.join("userkey"),
            host_key_pub,
            known_hosts,
            listen: listen.to_string(),
            child: Some(child),
            config: config_path,
            dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// `SHA256:…` of the host key, as ssh-keygen prints it.
    pub fn fingerprint(&self) -> String {
        let out = Command::new("ssh-keygen")
            .args(["-l", "-E", "sha256", "-f"])
            .arg(self.dir.path().join("hostkey.pub"))
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    }

    /// Cuts every open connection (as a network failure or a VM powering
    /// off would), leaving the listener up for new ones.
    pub fn drop_connections(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("pkill")
                .args(["-KILL", "-P", &c.id().to_string()])
                .status();
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}
