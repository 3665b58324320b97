//! Running the real `absconda` binary against a loopback builder.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::docker::{DOCKER_CLI, Docker, Registry};
use super::sshd::Sshd;
use super::tempdir;

pub const BIN: &str = env!("CARGO_BIN_EXE_absconda");

/// A user's machine: a HOME, a builders file and a context folder.
pub struct Project {
    pub dir: tempfile::TempDir,
    pub home: PathBuf,
    pub context: PathBuf,
    pub config: PathBuf,
    pub workspace: PathBuf,
    pub env: Vec<(String, String)>,
}

impl Project {
    /// A project whose builder `local` is `sshd`, with docker on the builder
    /// being `/usr/bin/docker` talking to the test daemon.
    pub fn new(sshd: &Sshd) -> Project {
        Project::with_builder(sshd, "")
    }

    /// Like [`Project::new`], with extra YAML lines for the builder.
    pub fn with_builder(sshd: &Sshd, extra: &str) -> Project {
        crate::support::watch();
        let dir = tempdir();
        let home = dir.path().join("home");
        let context = dir.path().join("ctx");
        let workspace = dir.path().join("workspace");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&context).unwrap();
        let config = dir.path().join("absconda-remote.yaml");
        let mut p = Project {
            dir,
            home,
            context,
            config,
            workspace,
            env: Vec::new(),
        };
        p.write_config(sshd, extra);
        p
    }

    pub fn write_config(&mut self, sshd: &Sshd, extra: &str) {
        let provider = if extra.contains("provider:") {
            ""
        } else {
            "    provider: ssh\n"
        };
        let yaml = format!(
            "builders:\n  local:\n{provider}    host: {host}\n    port: {port}\n    user: root\n    identity_file: {key}\n    known_hosts: {kh}\n    workspace: {ws}\n    docker: {docker}\n{extra}defaults:\n  timeout: 600\n",
            host = sshd.listen,
            port = sshd.port,
            key = sshd.user_key.display(),
            kh = sshd.known_hosts.display(),
            ws = self.workspace.display(),
            docker = DOCKER_CLI,
        );
        std::fs::write(&self.config, yaml).unwrap();
    }

    pub fn file(&self, rel: &str, content: &str) {
        let p = self.context.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    /// `absconda` with a clean environment: HOME is the project's, no agent.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", &self.home)
            .env("USER", "tester")
            .env("ABSCONDA_REMOTE_CONFIG", &self.config)
            .current_dir(self.dir.path());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// `absconda build` of the project's context through `local`.
    pub fn build(&self, repo: &str, extra: &[&str]) -> Output {
        let mut c = self.cmd();
        c.args(["build", "--remote-builder", "local", "--context"])
            .arg(&self.context)
            .args(["--repository", repo]);
        c.args(extra);
        c.output().unwrap()
    }

    /// Leftover run folders on the builder.
    pub fn run_folders(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.workspace.join("runs")) {
            Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The state file absconda writes for this project's HOME.
    pub fn state(&self) -> serde_json::Value {
        let path = self.home.join(".local/share/absconda/remote-state.json");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap()
    }

    /// Credentials for the test registry through the environment.
    pub fn with_registry_credentials(&mut self, reg: &Registry) {
        self.env
            .push(("ABSCONDA_REGISTRY_USER".into(), reg.user.into()));
        self.env
            .push(("ABSCONDA_REGISTRY_PASSWORD".into(), reg.password.into()));
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "status: {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `image` on the test daemon after pulling it from the registry
/// (the local copy is removed first, so the content really came from there).
pub fn run_pulled(docker: &Docker, reg: &Registry, image: &str, cmd: &[&str]) -> Output {
    let login = docker
        .cmd()
        .args([
            "login",
            "--username",
            reg.user,
            "--password-stdin",
            &reg.addr,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(reg.password.as_bytes())?;
            c.wait()
        })
        .unwrap();
    assert!(login.success());
    let _ = docker.run(&["rmi", "-f", image]);
    let pull = docker.run(&["pull", image]);
    assert!(
        pull.status.success(),
        "pull {image}: {}",
        String::from_utf8_lossy(&pull.stderr)
    );
    let mut args = vec!["run", "--rm", "--network", "none", image];
    args.extend_from_slice(cmd);
    docker.run(&args)
}

pub fn exists(p: &Path) -> bool {
    p.symlink_metadata().is_ok()
}
