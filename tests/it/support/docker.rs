//! One dockerd and one password-protected registry per test run, shared by
//! the tests (each test uses its own repository names).
//!
//! dockerd runs without touching the host network (`--bridge=none`,
//! no iptables); base images cannot be pulled here, so a busybox image is
//! made locally as `local/busybox:latest`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::{free_port, spawn_daemon, wait_until};

/// The docker CLI that matches docker.io's daemon and understands
/// `DOCKER_BUILDKIT=1` (a newer client elsewhere on PATH may not).
pub const DOCKER_CLI: &str = "/usr/bin/docker";
pub const BASE_IMAGE: &str = "local/busybox:latest";

pub struct Docker {
    pub host: String,
    pub root: PathBuf,
}

pub struct Registry {
    pub addr: String,
    pub user: &'static str,
    pub password: &'static str,
    pub root: PathBuf,
}

fn state_dir() -> PathBuf {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(sweep_dead_state_dirs);
    // Short paths: unix socket paths are limited to 108 bytes.
    let p = PathBuf::from(format!("/tmp/absconda-it-{}", std::process::id()));
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Removes what earlier test runs left behind: the state folder of every
/// test process that no longer exists, after lazily unmounting what its
/// dockerd (killed with the test process) still had mounted there.
fn sweep_dead_state_dirs() {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("absconda-it-") else {
            continue;
        };
        if pid.parse::<u32>().is_err() || Path::new("/proc").join(pid).exists() {
            continue;
        }
        let dir = entry.path();
        let prefix = format!("{}/", dir.display());
        let mut below: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        // Deepest first.
        below.sort_unstable_by(|a, b| b.cmp(a));
        for m in below {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

impl Docker {
    /// `docker` with `DOCKER_HOST` pointing at the test daemon.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(DOCKER_CLI);
        c.env("DOCKER_HOST", &self.host)
            .env("DOCKER_CONFIG", self.root.join("client-config"));
        c
    }

    pub fn run(&self, args: &[&str]) -> std::process::Output {
        self.cmd().args(args).output().expect("run docker")
    }
}

/// The shared daemon, started on first use.
pub fn docker() -> &'static Docker {
    crate::support::watch();
    static D: OnceLock<Docker> = OnceLock::new();
    D.get_or_init(|| {
        let root = state_dir().join("docker");
        std::fs::create_dir_all(&root).unwrap();
        let sock = root.join("docker.sock");
        let host = format!("unix://{}", sock.display());
        let mut cmd = Command::new("dockerd");
        cmd.args([
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            "--ip6tables=false",
        ])
        .arg("--data-root")
        .arg(root.join("data"))
        .arg("--exec-root")
        .arg(root.join("exec"))
        .arg("--pidfile")
        .arg(root.join("docker.pid"))
        .arg("-H")
        .arg(&host)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(root.join("dockerd.log")).unwrap());
        let mut child = spawn_daemon(cmd).expect("start dockerd");
        let d = Docker { host, root };
        wait_until("dockerd answering", Duration::from_secs(60), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "dockerd exited ({status}):\n{}",
                    std::fs::read_to_string(d.root.join("dockerd.log")).unwrap_or_default()
                );
            }
            d.run(&["version"]).status.success()
        });
        std::mem::forget(child);
        // A base image made from the local busybox.
        let rootfs = d.root.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        for c in [
            "sh",
            "ls",
            "cat",
            "echo",
            "mkdir",
            "wc",
            "sleep",
            "env",
            "sha256sum",
            "find",
            "stat",
            "printf",
            "test",
            "true",
            "id",
            "head",
            "tr",
            "sort",
            "xargs",
            "cp",
            "rm",
            "ln",
            "chmod",
            "touch",
            "tar",
            "gzip",
            "grep",
            "sed",
            "awk",
            "dirname",
            "basename",
        ] {
            let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(c));
        }
        let mut import = d.cmd();
        import
            .args(["import", "-", BASE_IMAGE])
            .stdin(Stdio::piped())
            .stdout(Stdio::null());
        let mut child = import.spawn().unwrap();
        let tar = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .args(["-c", "."])
            .output()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&tar.stdout).unwrap();
        assert!(child.wait().unwrap().success(), "docker import failed");
        d
    })
}

/// Whether the server at `addr` asks for credentials for `realm`.
fn answers_with_realm(addr: &str, realm: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.take(64 * 1024).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).contains(&format!("realm=\"{realm}\""))
}

/// The shared registry (htpasswd auth), started on first use.
pub fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| {
        let root = state_dir().join("registry");
        std::fs::create_dir_all(root.join("data")).unwrap();
        let (user, password) = ("tester", "s3cret-Pa55word-7c1e");
        // The password goes through stdin: a test watches the process list
        // for it while absconda builds.
        let mut htpasswd = Command::new("htpasswd")
            .args(["-iBc"])
            .arg(root.join("htpasswd"))
            .arg(user)
            .stdin(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("htpasswd");
        {
            use std::io::Write;
            htpasswd.stdin.take().unwrap().write_all(password.as_bytes()).unwrap();
        }
        assert!(htpasswd.wait().unwrap().success());
        // Another process may take the free port first: the registry then
        // exits, or another server answers without this registry's realm;
        // either way the next attempt takes another port.
        let mut attempt = 0;
        let addr = loop {
        attempt += 1;
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let realm = format!("absconda-test-{}-{port}", std::process::id());
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\nauth:\n  htpasswd:\n    realm: {realm}\n    path: {htp}\n",
            data = root.join("data").display(),
            htp = root.join("htpasswd").display(),
        );
        std::fs::write(root.join("config.yml"), config).unwrap();
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve")
            .arg(root.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(root.join("registry.log")).unwrap());
        let mut child = spawn_daemon(cmd).expect("start docker-registry");
        let mut exited = false;
        let mut ours = false;
        wait_until("registry listening", Duration::from_secs(20), || {
            exited = child.try_wait().ok().flatten().is_some();
            ours = !exited && answers_with_realm(&addr, &realm);
            exited || ours
        });
        if ours {
            std::mem::forget(child);
            break addr;
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(attempt < 5, "docker-registry did not start: {}", std::fs::read_to_string(root.join("registry.log")).unwrap_or_default());
        };
        Registry {
            addr,
            user,
            password,
            root,
        }
    })
}

impl Registry {
    fn get(&self, path: &str, accept: &str) -> (u16, Vec<u8>) {
        // Credentials through a curl config on stdin, never in argv.
        let mut curl = Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}", "-K", "-"])
            .args(["-H", &format!("Accept: {accept}")])
            .arg(format!("http://{}{path}", self.addr))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl");
        {
            use std::io::Write;
            let config = format!("user = \"{}:{}\"\n", self.user, self.password);
            curl.stdin
                .take()
                .unwrap()
                .write_all(config.as_bytes())
                .unwrap();
        }
        let out = curl.wait_with_output().expect("curl");
        let mut body = out.stdout;
        let pos = body.iter().rposition(|b| *b == b'\n').unwrap();
        let code = String::from_utf8_lossy(&body[pos + 1..]).parse().unwrap();
        body.truncate(pos);
        (code, body)
    }

    /// `GET` a path of the registry's HTTP API: status and body.
    pub fn api(&self, path: &str, accept: &str) -> (u16, Vec<u8>) {
        self.get(path, accept)
    }

    /// Tags of `name` as the registry's HTTP API lists them.
    pub fn tags(&self, name: &str) -> Vec<String> {
        let (code, body) = self.get(&format!("/v2/{name}/tags/list"), "application/json");
        if code != 200 {
            return Vec::new();
        }
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let mut tags: Vec<String> = v["tags"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        tags.sort();
        tags
    }

    /// The manifest digest the registry reports for `name:tag`
    /// (`Docker-Content-Digest` of a `HEAD /v2/<name>/manifests/<tag>`).
    pub fn digest(&self, name: &str, tag: &str) -> Option<String> {
        let mut curl = Command::new("curl")
            .args(["-s", "-I", "-K", "-"])
            .args([
                "-H",
                "Accept: application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json",
            ])
            .arg(format!("http://{}/v2/{name}/manifests/{tag}", self.addr))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl");
        {
            use std::io::Write;
            let config = format!("user = \"{}:{}\"\n", self.user, self.password);
            curl.stdin
                .take()
                .unwrap()
                .write_all(config.as_bytes())
                .unwrap();
        }
        let out = curl.wait_with_output().expect("curl");
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("docker-content-digest")
                .then(|| v.trim().to_string())
        })
    }

    /// The manifest of `name:tag`.
    pub fn manifest(&self, name: &str, tag: &str) -> Option<serde_json::Value> {
        let (code, body) = self.get(
            &format!("/v2/{name}/manifests/{tag}"),
            "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json",
        );
        (code == 200).then(|| serde_json::from_slice(&body).unwrap())
    }

    /// The files in all layers of `name:tag`, fetched as blobs from the registry.
    pub fn files(&self, name: &str, tag: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
        let manifest = self.manifest(name, tag).expect("manifest");
        let mut files = std::collections::BTreeMap::new();
        for layer in manifest["layers"].as_array().unwrap() {
            let digest = layer["digest"].as_str().unwrap();
            let (code, blob) = self.get(&format!("/v2/{name}/blobs/{digest}"), "*/*");
            assert_eq!(code, 200);
            let reader: Box<dyn std::io::Read> = if blob.starts_with(&[0x1f, 0x8b]) {
                Box::new(flate2::read::GzDecoder::new(&blob[..]))
            } else {
                Box::new(&blob[..])
            };
            let mut ar = tar::Archive::new(reader);
            for entry in ar.entries().unwrap() {
                let mut entry = entry.unwrap();
                let path = entry.path().unwrap().to_string_lossy().into_owned();
                let mut data = Vec::new();
                use std::io::Read;
                entry.read_to_end(&mut data).unwrap();
                files.insert(path.trim_start_matches("./").to_string(), data);
            }
        }
        files
    }
}
