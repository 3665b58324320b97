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
    /// sshd's pid here: the child itself, or `unshare`'s child for
    /// [`Sshd::start_on_own_machine`].
    sshd_pid: u32,
    /// Whether sshd is the first process of a PID namespace of its own.
    own_machine: bool,
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
        Sshd::launch(docker_host, listen, netns, extra, false)
    }

    /// Starts sshd on loopback as the first process of a PID namespace of
    /// its own, with its own `/proc`: what the builder's scripts find there
    /// is only what runs through this sshd or [`Sshd::on_machine`], as on a
    /// builder VM. Every test shares this machine, and the self-stop looks
    /// at every workspace in use on its machine: a self-stop test needs a
    /// machine that other tests' builds are not on. The network and the
    /// files are shared (the fakes, dockerd and the test's folders are
    /// reached as usual). Everything started there dies with sshd. Needs
    /// `unshare` and `nsenter` (util-linux) and root.
    pub fn start_on_own_machine(docker_host: Option<&str>) -> Sshd {
        Sshd::launch(docker_host, "127.0.0.1", None, "", true)
    }

    /// `program` run on this sshd's machine (see
    /// [`Sshd::start_on_own_machine`]), as a child of `nsenter`, which
    /// passes its stdio and exit status through.
    pub fn on_machine(&self, program: &str) -> Command {
        assert!(self.own_machine, "sshd has no machine of its own");
        let mut c = Command::new("nsenter");
        c.args([
            "--target",
            &self.sshd_pid.to_string(),
            "--pid",
            "--mount",
            "--",
        ])
        .arg(program);
        c
    }

    fn launch(
        docker_host: Option<&str>,
        listen: &str,
        netns: Option<&str>,
        extra: &str,
        own_machine: bool,
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
        let (port, host_key_pub, known_hosts, config_path, child, sshd_pid) = loop {
            attempt += 1;
            let port = free_port();
            // A test that brings its own `AuthorizedKeysFile` (sshd takes the
            // first one) gets only its own.
            let ak = if extra.contains("AuthorizedKeysFile") {
                String::new()
            } else {
                format!(
                    "AuthorizedKeysFile {}\n",
                    d.join("authorized_keys").display()
                )
            };
            let mut config = format!(
                "Port {port}\nListenAddress {listen}\nHostKey {hk}\n{ak}\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             PidFile {pid}\nPermitRootLogin prohibit-password\nMaxStartups 50\nMaxSessions 50\nLogLevel VERBOSE\n",
                hk = d.join("hostkey").display(),
                pid = d.join("sshd.pid").display(),
            );
            if extra.lines().any(|l| l.starts_with("AuthorizedKeysFile ")) {
                // A test that brings its own keys file gets only its own.
                config = config.replace(
                    &format!(
                        "AuthorizedKeysFile {}\n",
                        d.join("authorized_keys").display()
                    ),
                    "",
                );
            }
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
                // sshd is PID 1 there and reaps what its sessions leave
                // behind; `--kill-child` kills it when `unshare` dies, and
                // the kernel then kills everything else in the namespace.
                None if own_machine => {
                    let mut c = Command::new("unshare");
                    c.args(["--pid", "--mount-proc", "--kill-child", SSHD]);
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
                let sshd_pid = if own_machine {
                    child_of(child.id()).expect("sshd under unshare")
                } else {
                    child.id()
                };
                break (
                    port,
                    host_key_pub,
                    known_hosts,
                    config_path,
                    child,
                    sshd_pid,
                );
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
            sshd_pid,
            own_machine,
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
        if self.child.is_some() {
            let _ = Command::new("pkill")
                .args(["-KILL", "-P", &self.sshd_pid.to_string()])
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

/// The pid of a child of `parent` (`unshare --fork` has one).
fn child_of(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        (ppid == parent).then_some(pid)
    })
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}
