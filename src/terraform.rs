//! Terraform: the one program absconda runs, and only to provision and
//! destroy builders.
//!
//! Everything else absconda does natively, but creating a VM with its
//! firewall, service account and startup script is what Terraform modules are
//! for, and what teams already review and audit. So `remote provision` and
//! `remote destroy` drive the `terraform` CLI, never interactively
//! (`-input=false`), with the builder's settings passed as `-var` — only the
//! variables the module declares, because Terraform rejects unknown ones.
//!
//! Each builder gets its own working copy of its module under
//! `$XDG_DATA_HOME/absconda/terraform/<builder>/`, so two builders made from
//! the same module never share a `terraform.tfstate`, a read-only install of
//! the bundled modules still works, and `destroy` runs against exactly what
//! was applied. A module that reads files from its parent folder (the bundled
//! ones use `../scripts/`) is copied together with that parent.
//!
//! Terraform's output streams to our stderr as it comes. Terraform runs in its
//! own process group: a Ctrl-C reaches absconda only, which forwards one
//! SIGINT so Terraform stops gracefully and writes its state, instead of
//! being killed half-way and leaving resources nobody knows about.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::config::{Builder, ProviderKind};

/// The oldest Terraform the bundled modules accept (`required_version`).
pub const MIN_VERSION: (u64, u64) = (1, 5);
/// The environment variable that names the Terraform binary to use.
pub const PROGRAM_ENV: &str = "ABSCONDA_TERRAFORM";
/// What to tell a user who has no Terraform.
pub const INSTALL_HINT: &str = "install Terraform ≥ 1.5 from your package manager or HashiCorp's releases (https://developer.hashicorp.com/terraform/install), or point ABSCONDA_TERRAFORM at its binary";

/// How long each Terraform command may run.
pub const INIT_TIMEOUT: Duration = Duration::from_secs(15 * 60);
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(60 * 60);
pub const OUTPUT_TIMEOUT: Duration = Duration::from_secs(2 * 60);
/// How long Terraform gets to stop after a SIGINT before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(120);

/// Copying a module tree bigger than this is refused: it is not a module.
const MAX_COPY_FILES: usize = 5_000;
const MAX_COPY_BYTES: u64 = 200 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TerraformError {
    #[error("Terraform is not installed: no `terraform` on PATH and {PROGRAM_ENV} is not set")]
    NotFound,
    #[error("{PROGRAM_ENV} names `{}`, which is not an executable file", path.display())]
    BadOverride { path: PathBuf },
    #[error("Terraform {found} at `{}` is too old: absconda needs {}.{} or newer", path.display(), MIN_VERSION.0, MIN_VERSION.1)]
    TooOld { path: PathBuf, found: String },
    #[error("could not run `{}`", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`terraform {command}` failed in `{}` ({status}); Terraform's output above says why", dir.display())]
    Failed {
        command: String,
        dir: PathBuf,
        status: String,
    },
    #[error("`terraform {command}` in `{}` did not finish within {}s and was stopped", dir.display(), after.as_secs())]
    Timeout {
        command: String,
        dir: PathBuf,
        after: Duration,
    },
    #[error("interrupted: `terraform {command}` in `{}` was stopped", dir.display())]
    Interrupted { command: String, dir: PathBuf },
    #[error(
        "builder `{builder}` is an SSH host without `terraform_dir`: there is nothing to provision or destroy"
    )]
    NothingToProvision { builder: String },
    #[error("no Terraform module found for builder `{builder}` (provider `{provider}`; looked in {})", searched.iter().map(|p| format!("`{}`", p.display())).collect::<Vec<_>>().join(", "))]
    NoModule {
        builder: String,
        provider: ProviderKind,
        searched: Vec<PathBuf>,
    },
    #[error("`{}` is not a Terraform module: it has no `.tf` files", dir.display())]
    NotAModule { dir: PathBuf },
    #[error("could not read or copy `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the Terraform module `{}` is too big to copy into absconda's working folder ({message})", dir.display())]
    TooBig { dir: PathBuf, message: String },
    #[error("the Terraform module `{}` reads files {levels} folders above it, from `{}`; absconda copies at most two levels up and never `/` or your home folder", dir.display(), ancestor.display())]
    ReachesTooFar {
        dir: PathBuf,
        levels: usize,
        ancestor: PathBuf,
    },
    #[error("the Terraform module `{}` requires the variable `{variable}`, and builder `{builder}` does not set {}", dir.display(), key.map(|k| format!("`{k}`")).unwrap_or_else(|| "anything absconda passes for it".into()))]
    MissingVariable {
        dir: PathBuf,
        builder: String,
        variable: String,
        key: Option<&'static str>,
    },
    #[error(
        "builder `{builder}` has no SSH key whose public half absconda could authorise on the new machine"
    )]
    NoPublicKey { builder: String },
    #[error("could not read the public key for `{}`", path.display())]
    PublicKey {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the outputs of the Terraform module in `{}` are not usable: {message}", dir.display())]
    Outputs { dir: PathBuf, message: String },
    #[error("another absconda is provisioning or destroying builder `{builder}` right now (lock `{}`)", lock.display())]
    Busy { builder: String, lock: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TerraformError + '_ {
    move |source| TerraformError::Io {
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------
// Finding Terraform

/// A Terraform binary that answered `terraform version`.
#[derive(Debug, Clone)]
pub struct Terraform {
    pub program: PathBuf,
    pub version: String,
    /// Extra environment for every Terraform command.
    env: Vec<(String, String)>,
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `$ABSCONDA_TERRAFORM`, else `terraform` on PATH.
pub fn locate() -> Result<PathBuf, TerraformError> {
    if let Some(p) = std::env::var_os(PROGRAM_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(p);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(TerraformError::BadOverride { path })
        };
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("terraform"))
                .find(|p| is_executable(p))
        })
        .ok_or(TerraformError::NotFound)
}

/// `1.11.4` → `(1, 11)`.
fn major_minor(version: &str) -> Option<(u64, u64)> {
    let mut parts = version.trim().trim_start_matches('v').split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    Some((major, minor))
}

impl Terraform {
    /// Finds Terraform and checks its version.
    pub async fn find() -> Result<Terraform, TerraformError> {
        let program = locate()?;
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(&program)
                .args(["version", "-json"])
                .env("CHECKPOINT_DISABLE", "1")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| TerraformError::Timeout {
            command: "version".into(),
            dir: PathBuf::from("."),
            after: Duration::from_secs(60),
        })?
        .map_err(|source| TerraformError::Spawn {
            program: program.clone(),
            source,
        })?;
        let version = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v.get("terraform_version")?.as_str().map(str::to_string))
            .unwrap_or_default();
        match major_minor(&version) {
            Some(v) if v < MIN_VERSION => {
                return Err(TerraformError::TooOld {
                    path: program,
                    found: version,
                });
            }
            Some(_) => {}
            None => tracing::warn!(
                "could not read the version of `{}`; going on",
                program.display()
            ),
        }
        tracing::debug!(program = %program.display(), %version, "found terraform");
        Ok(Terraform {
            program,
            version,
            env: Vec::new(),
        })
    }

    /// Sets an environment variable for every Terraform command.
    pub fn with_env(mut self, key: &str, value: &str) -> Terraform {
        self.env.push((key.into(), value.into()));
        self
    }

    fn command(&self, dir: &Path, args: &[String]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.program);
        c.args(args)
            .current_dir(dir)
            .env("TF_IN_AUTOMATION", "1")
            .env("TF_INPUT", "0")
            .env("CHECKPOINT_DISABLE", "1")
            .stdin(Stdio::null())
            // Ctrl-C on the terminal must reach absconda only, which then
            // stops Terraform gracefully (see the module docs).
            .process_group(0)
            .kill_on_drop(true);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs `terraform ARGS…` in `dir` with its output streamed to our stderr.
    pub async fn run(
        &self,
        dir: &Path,
        args: &[String],
        timeout: Duration,
    ) -> Result<(), TerraformError> {
        let command = args.first().cloned().unwrap_or_default();
        tracing::debug!(dir = %dir.display(), ?args, "terraform");
        let mut cmd = self.command(dir, args);
        cmd.stdout(Stdio::from(std::io::stderr()))
            .stderr(Stdio::from(std::io::stderr()));
        let child = cmd.spawn().map_err(|source| TerraformError::Spawn {
            program: self.program.clone(),
            source,
        })?;
        let status = supervise(child, &command, dir, timeout).await?;
        if status.success() {
            Ok(())
        } else {
            Err(TerraformError::Failed {
                command,
                dir: dir.to_path_buf(),
                status: describe(status),
            })
        }
    }

    /// `terraform output -json` in `dir`.
    pub async fn outputs(&self, dir: &Path) -> Result<Outputs, TerraformError> {
        let args: Vec<String> = ["output", "-json", "-no-color"].map(String::from).into();
        let mut cmd = self.command(dir, &args);
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::from(std::io::stderr()));
        let mut child = cmd.spawn().map_err(|source| TerraformError::Spawn {
            program: self.program.clone(),
            source,
        })?;
        let mut stdout = child.stdout.take();
        let read = async {
            let mut buf = Vec::new();
            if let Some(s) = stdout.as_mut() {
                use tokio::io::AsyncReadExt;
                let _ = s.read_to_end(&mut buf).await;
            }
            buf
        };
        let (buf, status) = tokio::join!(read, supervise(child, "output", dir, OUTPUT_TIMEOUT));
        let status = status?;
        if !status.success() {
            return Err(TerraformError::Failed {
                command: "output".into(),
                dir: dir.to_path_buf(),
                status: describe(status),
            });
        }
        Outputs::parse(&buf).map_err(|message| TerraformError::Outputs {
            dir: dir.to_path_buf(),
            message,
        })
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown status".into(),
    }
}

fn signal(child: &tokio::process::Child, sig: i32) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}

/// Waits for Terraform, forwarding Ctrl-C and enforcing the deadline.
async fn supervise(
    mut child: tokio::process::Child,
    command: &str,
    dir: &Path,
    timeout: Duration,
) -> Result<std::process::ExitStatus, TerraformError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut interrupted = false;
    loop {
        tokio::select! {
            status = child.wait() => {
                let status = status.map_err(|source| TerraformError::Io { path: dir.to_path_buf(), source })?;
                if interrupted {
                    return Err(TerraformError::Interrupted { command: command.into(), dir: dir.to_path_buf() });
                }
                return Ok(status);
            }
            _ = tokio::signal::ctrl_c() => {
                if interrupted {
                    eprintln!("absconda: interrupted again; Terraform stops at once (its state may be incomplete)");
                } else {
                    eprintln!("absconda: interrupted; letting `terraform {command}` stop safely and save its state (Ctrl-C again to stop it at once)");
                }
                interrupted = true;
                signal(&child, libc::SIGINT);
            }
            _ = tokio::time::sleep_until(deadline) => {
                eprintln!("absconda: `terraform {command}` ran for more than {}s; stopping it", timeout.as_secs());
                signal(&child, libc::SIGINT);
                if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
                return Err(TerraformError::Timeout { command: command.into(), dir: dir.to_path_buf(), after: timeout });
            }
        }
    }
}

/// `-no-color` unless Terraform writes to a terminal and colour is welcome.
pub fn color_args() -> Vec<String> {
    if std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none() {
        Vec::new()
    } else {
        vec!["-no-color".into()]
    }
}

// ---------------------------------------------------------------------------
// Outputs

/// What a builder module reports after `apply`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Outputs {
    pub instance_ip: String,
    pub instance_name: Option<String>,
    pub instance_id: Option<String>,
    pub ssh_user: Option<String>,
    /// `SHA256:…` fingerprints; public key lines in the output are turned into theirs.
    pub host_key_fingerprints: Vec<String>,
    pub ssh_port: Option<u16>,
}

impl Outputs {
    /// Parses `terraform output -json`.
    pub fn parse(json: &[u8]) -> Result<Outputs, String> {
        let root: serde_json::Value = serde_json::from_slice(json)
            .map_err(|e| format!("`terraform output -json` printed no JSON ({e})"))?;
        let value = |name: &str| root.get(name).and_then(|o| o.get("value"));
        let string = |name: &str| -> Result<Option<String>, String> {
            match value(name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) if s.trim().is_empty() => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.trim().to_string())),
                Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string())),
                Some(other) => Err(format!("output `{name}` must be a string, not `{other}`")),
            }
        };
        let instance_ip = string("instance_ip")?.ok_or_else(|| {
            if root.get("instance_ip").is_some() {
                "output `instance_ip` is empty (the machine has no address yet?)".to_string()
            } else {
                "there is no output `instance_ip`; every builder module must output the address to connect to".to_string()
            }
        })?;
        let ssh_port = match value("ssh_port") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let n = v
                    .as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()));
                Some(
                    n.and_then(|n| u16::try_from(n).ok())
                        .filter(|p| *p > 0)
                        .ok_or_else(|| format!("output `ssh_port` is not a TCP port: `{v}`"))?,
                )
            }
        };
        let mut host_key_fingerprints = Vec::new();
        match value("host_key_fingerprints") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Array(items)) => {
                for item in items {
                    let text = item.as_str().ok_or_else(|| {
                        format!("output `host_key_fingerprints` must list strings, not `{item}`")
                    })?;
                    let pin = crate::ssh::known_hosts::Pin::parse(text)
                        .map_err(|m| format!("output `host_key_fingerprints` has `{text}`: {m}"))?;
                    host_key_fingerprints.push(pin.fingerprint().to_string());
                }
            }
            Some(other) => {
                return Err(format!(
                    "output `host_key_fingerprints` must be a list, not `{other}`"
                ));
            }
        }
        Ok(Outputs {
            instance_ip,
            instance_name: string("instance_name")?,
            instance_id: string("instance_id")?,
            ssh_user: string("ssh_user")?,
            host_key_fingerprints,
            ssh_port,
        })
    }

    /// The instance the cloud API knows: the id on EC2, the name on GCE.
    pub fn instance(&self, provider: ProviderKind) -> Option<String> {
        match provider {
            ProviderKind::Aws => self.instance_id.clone().or(self.instance_name.clone()),
            _ => self.instance_name.clone().or(self.instance_id.clone()),
        }
    }
}

// ---------------------------------------------------------------------------
// Modules and working copies

/// The module a builder is made from: its `terraform_dir`, else the bundled
/// module for its provider, found next to the config file (in `infra/` of its
/// folder or a parent) or installed next to the executable
/// (`../share/absconda/infra/`).
pub fn module_source(builder: &Builder) -> Result<PathBuf, TerraformError> {
    if let Some(dir) = &builder.terraform_dir {
        return Ok(dir.clone());
    }
    let sub = match builder.provider {
        ProviderKind::Ssh | ProviderKind::CodeBuild | ProviderKind::CloudBuild => {
            return Err(TerraformError::NothingToProvision {
                builder: builder.name.clone(),
            });
        }
        ProviderKind::Gcp => "gcp",
        ProviderKind::Aws => "aws",
        ProviderKind::Azure => "azure",
    };
    let mut searched = Vec::new();
    let config_dir = builder
        .config_file
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .and_then(|p| std::fs::canonicalize(p).ok());
    if let Some(dir) = config_dir {
        for d in dir.ancestors() {
            searched.push(d.join("infra").join(sub));
        }
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(prefix) = exe.parent().and_then(Path::parent)
    {
        searched.push(prefix.join("share/absconda/infra").join(sub));
    }
    if let Some(found) = searched.iter().find(|d| has_tf_files(d)) {
        return Ok(found.clone());
    }
    Err(TerraformError::NoModule {
        builder: builder.name.clone(),
        provider: builder.provider,
        searched,
    })
}

fn has_tf_files(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.flatten().any(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.ends_with(".tf") || n.ends_with(".tf.json")
        })
    })
}

fn tf_files(dir: &Path) -> Result<Vec<PathBuf>, TerraformError> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    n.ends_with(".tf") || n.ends_with(".tf.json")
                })
        })
        .collect();
    out.sort();
    Ok(out)
}

/// `$XDG_DATA_HOME/absconda/terraform/`, next to the state file.
pub fn data_dir() -> PathBuf {
    crate::state::default_path()
        .parent()
        .map(|p| p.join("terraform"))
        .unwrap_or_else(|| PathBuf::from("terraform"))
}

/// A builder name as one safe path component.
fn path_component(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-_".contains(&b) || (b == b'.' && !out.is_empty()) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() { "%".into() } else { out }
}

/// One builder's Terraform working folder.
#[derive(Debug, Clone)]
pub struct Workdir {
    /// `…/terraform/<builder>/`
    pub root: PathBuf,
    /// Where Terraform runs (and keeps `terraform.tfstate`): inside `root/tree/`.
    pub module: PathBuf,
}

impl Workdir {
    /// The working folder of `builder`, wherever its module sits inside.
    pub fn of(builder: &str) -> Workdir {
        let root = data_dir().join(path_component(builder));
        let module = std::fs::read_to_string(root.join("module-path"))
            .ok()
            .filter(|rel| !rel.trim().is_empty())
            .map(|rel| root.join("tree").join(rel.trim()))
            .unwrap_or_else(|| root.join("tree"));
        Workdir { root, module }
    }

    /// Where absconda keeps the variables it passed to `apply`.
    pub fn vars_file(&self) -> PathBuf {
        self.root.join("absconda-vars.json")
    }

    /// Whether Terraform's local state there records any resource.
    pub fn has_resources(&self) -> bool {
        std::fs::read(self.module.join("terraform.tfstate"))
            .ok()
            .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("resources")?.as_array().map(|r| !r.is_empty()))
            .unwrap_or(false)
    }

    /// Whether the module keeps its state elsewhere (a `backend` block), so
    /// only Terraform itself knows what exists.
    pub fn has_backend(&self) -> bool {
        tf_files(&self.module).is_ok_and(|files| {
            files.iter().any(|f| {
                std::fs::read_to_string(f).is_ok_and(|t| {
                    let t = strip_comments(&t);
                    t.contains("backend \"") || t.contains("cloud {")
                })
            })
        })
    }

    /// Removes the working folder (after a successful destroy).
    pub fn remove(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// An exclusive lock on a builder's working folder for one provision or destroy.
pub struct WorkLock {
    _file: std::fs::File,
}

/// Takes the lock at once or fails: two Terraform runs on one builder must not overlap.
pub fn lock(builder: &str) -> Result<WorkLock, TerraformError> {
    let dir = data_dir();
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let path = dir.join(format!("{}.lock", path_component(builder)));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(WorkLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(TerraformError::Busy {
            builder: builder.to_string(),
            lock: path,
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(TerraformError::Io { path, source }),
    }
}

/// Names Terraform owns in a working folder: never copied from the source,
/// never deleted by a refresh.
fn terraform_owned(name: &str) -> bool {
    matches!(
        name,
        ".terraform"
            | "terraform.tfstate"
            | "terraform.tfstate.backup"
            | "terraform.tfstate.d"
            | ".terraform.tfstate.lock.info"
            | ".git"
    ) || name.starts_with("terraform.tfstate.")
        || name.ends_with(".tfplan")
}

/// How many folders up the module's files reach (`${path.module}/../x` → 1).
fn parent_levels(dir: &Path) -> Result<usize, TerraformError> {
    let re = regex::Regex::new(r"((?:\.\./)+)").map_err(|e| TerraformError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    let mut levels = 0;
    for f in tf_files(dir)? {
        let text = std::fs::read_to_string(&f).map_err(io_err(&f))?;
        let text = strip_comments(&text);
        for c in re.captures_iter(&text) {
            levels = levels.max(c[1].len() / 3);
        }
    }
    Ok(levels)
}

/// Copies (or refreshes) the builder's working copy of `source` and returns it.
///
/// Files that disappeared from the source disappear from the copy, except
/// what Terraform owns there (its state, `.terraform/`), which is never
/// touched. `.terraform.lock.hcl` comes from the source when it has one and
/// is otherwise kept from the last `init`.
pub fn prepare_workdir(builder: &str, source: &Path) -> Result<Workdir, TerraformError> {
    prepare_workdir_in(&data_dir(), builder, source)
}

fn prepare_workdir_in(
    data: &Path,
    builder: &str,
    source: &Path,
) -> Result<Workdir, TerraformError> {
    let source = std::fs::canonicalize(source).map_err(io_err(source))?;
    if !has_tf_files(&source) {
        return Err(TerraformError::NotAModule { dir: source });
    }
    let levels = parent_levels(&source)?;
    let mut copy_root = source.clone();
    for _ in 0..levels {
        copy_root = copy_root
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    if levels > 2 || copy_root.parent().is_none() || home.as_deref().is_some_and(|h| h == copy_root)
    {
        return Err(TerraformError::ReachesTooFar {
            dir: source,
            levels,
            ancestor: copy_root,
        });
    }
    let rel = source
        .strip_prefix(&copy_root)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let root = data.join(path_component(builder));
    let tree = root.join("tree");
    std::fs::create_dir_all(&tree).map_err(io_err(&tree))?;
    let mut budget = (MAX_COPY_FILES, MAX_COPY_BYTES);
    sync_tree(&copy_root, &tree, &mut budget).map_err(|e| match e {
        SyncError::Io(path, source) => TerraformError::Io { path, source },
        SyncError::TooBig(message) => TerraformError::TooBig {
            dir: copy_root.clone(),
            message,
        },
    })?;
    let marker = root.join("module-path");
    std::fs::write(&marker, rel.to_string_lossy().as_bytes()).map_err(io_err(&marker))?;
    Ok(Workdir {
        module: if rel.as_os_str().is_empty() {
            tree
        } else {
            tree.join(&rel)
        },
        root,
    })
}

enum SyncError {
    Io(PathBuf, std::io::Error),
    TooBig(String),
}

fn sync_tree(src: &Path, dst: &Path, budget: &mut (usize, u64)) -> Result<(), SyncError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| SyncError::Io(p, e)
    };
    let mut wanted = BTreeSet::new();
    let mut entries: Vec<_> = std::fs::read_dir(src)
        .map_err(io(src))?
        .collect::<Result<_, _>>()
        .map_err(io(src))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let name_s = name.to_string_lossy().into_owned();
        if terraform_owned(&name_s) {
            continue;
        }
        let from = entry.path();
        let to = dst.join(&name);
        // Follow symlinks: a module may link shared files in.
        let md = std::fs::metadata(&from).map_err(io(&from))?;
        if md.is_dir() {
            if to.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
                std::fs::remove_file(&to).map_err(io(&to))?;
            }
            std::fs::create_dir_all(&to).map_err(io(&to))?;
            sync_tree(&from, &to, budget)?;
        } else if md.is_file() {
            budget.0 = budget
                .0
                .checked_sub(1)
                .ok_or_else(|| SyncError::TooBig(format!("more than {MAX_COPY_FILES} files")))?;
            budget.1 = budget.1.checked_sub(md.len()).ok_or_else(|| {
                SyncError::TooBig(format!("more than {} MiB", MAX_COPY_BYTES >> 20))
            })?;
            if to.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                std::fs::remove_dir_all(&to).map_err(io(&to))?;
            }
            std::fs::copy(&from, &to).map_err(io(&from))?;
        } else {
            continue;
        }
        wanted.insert(name);
    }
    // Whatever the source no longer has goes, except Terraform's own files
    // and a lock file written by an earlier `init`.
    for entry in std::fs::read_dir(dst).map_err(io(dst))?.flatten() {
        let name = entry.file_name();
        let name_s = name.to_string_lossy();
        if wanted.contains(&name) || terraform_owned(&name_s) || name_s == ".terraform.lock.hcl" {
            continue;
        }
        let p = entry.path();
        let r = if p.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(io(&p))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Variables

/// A `variable "name" { … }` block of a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    pub name: String,
    pub has_default: bool,
}

/// Removes `#`, `//` and `/* */` comments outside strings.
fn strip_comments(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let mut in_str = false;
    let mut interp = 0usize;
    while i < b.len() {
        let c = b[i];
        if in_str {
            out.push(c);
            match c {
                b'\\' if i + 1 < b.len() => {
                    out.push(b[i + 1]);
                    i += 1;
                }
                // `${ … }` may hold quotes of its own.
                b'$' if b.get(i + 1) == Some(&b'{') => {
                    interp += 1;
                    out.push(b'{');
                    i += 1;
                }
                b'}' if interp > 0 => interp -= 1,
                b'"' if interp == 0 => in_str = false,
                b'\n' => {
                    in_str = false;
                    interp = 0;
                }
                _ => {}
            }
            i += 1;
            continue;
        }
        match c {
            b'"' => {
                in_str = true;
                out.push(c);
                i += 1;
            }
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    if b[i] == b'\n' {
                        out.push(b'\n');
                    }
                    i += 1;
                }
                i += 2;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The variables declared in HCL text: `variable "x" {` blocks, with whether
/// the block sets `default` at its top level.
pub fn parse_variables(text: &str) -> Vec<Variable> {
    let text = strip_comments(text);
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut depth = 0usize;
    // The variable block being read and the depth of its body.
    let mut current: Option<(Variable, usize)> = None;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'-';
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' => {
                // Skip the string, with its escapes and interpolations.
                i += 1;
                let mut interp = 0usize;
                while i < b.len() {
                    match b[i] {
                        b'\\' => i += 1,
                        b'$' if b.get(i + 1) == Some(&b'{') => {
                            interp += 1;
                            i += 1;
                        }
                        b'}' if interp > 0 => interp -= 1,
                        b'"' if interp == 0 => break,
                        _ => {}
                    }
                    i += 1;
                }
                i += 1;
            }
            b'<' if b.get(i + 1) == Some(&b'<') => {
                // Heredoc: skip to the line holding only its marker.
                let start = i + 2 + usize::from(b.get(i + 2) == Some(&b'-'));
                let mut end = start;
                while end < b.len() && ident(b[end]) {
                    end += 1;
                }
                if end == start {
                    i += 2;
                    continue;
                }
                let marker = &text[start..end];
                let mut pos = text[end..].find('\n').map_or(b.len(), |o| end + o + 1);
                while pos < b.len() {
                    let line_end = text[pos..].find('\n').map_or(b.len(), |o| pos + o + 1);
                    let line = &text[pos..line_end];
                    pos = line_end;
                    if line.trim() == marker {
                        break;
                    }
                }
                i = pos;
            }
            b'{' => {
                depth += 1;
                i += 1;
            }
            b'}' => {
                if let Some((var, body)) = &current
                    && depth == *body
                {
                    out.push(var.clone());
                    current = None;
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            c if ident(c) && (i == 0 || !ident(b[i - 1])) => {
                let start = i;
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
                let word = &text[start..i];
                if depth == 0 && word == "variable" {
                    // `variable "name" {` (or a bare identifier label).
                    let rest = &text[i..];
                    let trimmed = rest.trim_start();
                    let (name, after) = if let Some(r) = trimmed.strip_prefix('"') {
                        match r.find('"') {
                            Some(end) => (&r[..end], &r[end + 1..]),
                            None => continue,
                        }
                    } else {
                        let end = trimmed
                            .bytes()
                            .position(|c| !ident(c))
                            .unwrap_or(trimmed.len());
                        (&trimmed[..end], &trimmed[end..])
                    };
                    if !name.is_empty() && after.trim_start().starts_with('{') {
                        let brace = text.len() - after.trim_start().len();
                        current = Some((
                            Variable {
                                name: name.to_string(),
                                has_default: false,
                            },
                            1,
                        ));
                        depth += 1;
                        i = brace + 1;
                    }
                } else if word == "default"
                    && let Some((var, body)) = &mut current
                    && depth == *body
                {
                    let rest = text[i..].trim_start();
                    if rest.starts_with('=') && !rest.starts_with("==") {
                        var.has_default = true;
                    }
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// The variables of a `.tf.json` file.
fn parse_json_variables(text: &str) -> Vec<Variable> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut add = |obj: &serde_json::Map<String, serde_json::Value>| {
        for (name, body) in obj {
            out.push(Variable {
                name: name.clone(),
                has_default: body.get("default").is_some(),
            });
        }
    };
    match v.get("variable") {
        Some(serde_json::Value::Object(o)) => add(o),
        Some(serde_json::Value::Array(items)) => {
            for item in items {
                if let Some(o) = item.as_object() {
                    add(o);
                }
            }
        }
        _ => {}
    }
    out
}

/// Every variable the module in `dir` declares.
pub fn declared_variables(dir: &Path) -> Result<Vec<Variable>, TerraformError> {
    let mut out: Vec<Variable> = Vec::new();
    for f in tf_files(dir)? {
        let text = std::fs::read_to_string(&f).map_err(io_err(&f))?;
        let vars = if f.to_string_lossy().ends_with(".json") {
            parse_json_variables(&text)
        } else {
            parse_variables(&text)
        };
        out.extend(vars);
    }
    Ok(out)
}

/// Variables set by the module's own `terraform.tfvars` / `*.auto.tfvars(.json)`.
pub fn tfvars_names(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    let assign = regex::Regex::new(r"(?m)^\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=[^=]").ok();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        if name == "terraform.tfvars.json" || name.ends_with(".auto.tfvars.json") {
            if let Ok(serde_json::Value::Object(o)) = serde_json::from_str(&text) {
                out.extend(o.keys().cloned());
            }
        } else if (name == "terraform.tfvars" || name.ends_with(".auto.tfvars"))
            && let Some(re) = &assign
        {
            let text = strip_comments(&text);
            out.extend(re.captures_iter(&text).map(|c| c[1].to_string()));
        }
    }
    out
}

/// The public key line to authorise: `<identity_file>.pub`, else derived from
/// the private key; without `identity_file`, OpenSSH's default key files.
pub fn public_key(builder: &Builder) -> Result<String, TerraformError> {
    let candidates: Vec<PathBuf> = if builder.identity_files.is_empty() {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        ["id_ed25519", "id_ecdsa", "id_rsa"]
            .iter()
            .filter_map(|n| Some(home.as_ref()?.join(".ssh").join(n)))
            .filter(|p| p.exists())
            .collect()
    } else {
        builder.identity_files.clone()
    };
    let Some(private) = candidates.first() else {
        return Err(TerraformError::NoPublicKey {
            builder: builder.name.clone(),
        });
    };
    let mut pub_path = private.clone().into_os_string();
    pub_path.push(".pub");
    let pub_path = PathBuf::from(pub_path);
    if pub_path.exists() {
        let text = std::fs::read_to_string(&pub_path).map_err(io_err(&pub_path))?;
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .unwrap_or_default()
            .to_string();
        russh::keys::PublicKey::from_openssh(&line).map_err(|e| TerraformError::PublicKey {
            path: pub_path.clone(),
            source: Box::new(e),
        })?;
        return Ok(line);
    }
    let key = crate::ssh::auth::load_key(private).map_err(|e| TerraformError::PublicKey {
        path: private.clone(),
        source: Box::new(e),
    })?;
    let line = key
        .public_key()
        .to_openssh()
        .map_err(|e| TerraformError::PublicKey {
            path: private.clone(),
            source: Box::new(e),
        })?;
    Ok(format!("{line} absconda@{}", builder.name))
}

/// The value absconda passes for a module variable, and the config key it comes from.
fn value_for(
    builder: &Builder,
    name: &str,
    public_key: &mut dyn FnMut() -> Result<String, TerraformError>,
) -> Result<(Option<String>, Option<&'static str>), TerraformError> {
    let s = |v: &Option<String>| v.clone();
    let n = |v: Option<u64>| v.map(|n| n.to_string());
    Ok(match name {
        "project" => (s(&builder.project), Some("project")),
        "region" => (s(&builder.region), Some("region")),
        "zone" => (s(&builder.zone), Some("zone")),
        "machine_type" => (s(&builder.machine_type), Some("machine_type")),
        "instance_type" => (s(&builder.instance_type), Some("instance_type")),
        "disk_size" => (n(builder.disk_size), Some("disk_size")),
        "spot" => (Some(builder.spot.to_string()), Some("spot")),
        "allowed_ssh_cidr" => (
            (!builder.allowed_ssh_cidr.is_empty())
                .then(|| serde_json::to_string(&builder.allowed_ssh_cidr).unwrap_or_default()),
            Some("allowed_ssh_cidr"),
        ),
        "ssh_user" => (Some(builder.user.clone()), Some("user")),
        "ssh_public_key" => (Some(public_key()?), Some("identity_file")),
        "idle_shutdown_minutes" => (
            n(builder.idle_shutdown_minutes),
            Some("idle_shutdown_minutes"),
        ),
        "name" => (
            Some(
                builder
                    .instance
                    .clone()
                    .or_else(|| builder.vm_name.clone())
                    .unwrap_or_else(|| builder.name.clone()),
            ),
            Some("instance"),
        ),
        "workspace" => (Some(builder.workspace.clone()), Some("workspace")),
        "subscription_id" => (s(&builder.subscription_id), Some("subscription_id")),
        "resource_group" => (s(&builder.resource_group), Some("resource_group")),
        "location" => (s(&builder.region), Some("region")),
        _ => (None, None),
    })
}

/// The `-var` values for the module in `dir`: the builder's settings for the
/// variables the module declares. A variable the module requires (no
/// default, not in its own `.tfvars`) that absconda cannot fill is an error
/// naming the config key to set.
pub fn variables_for(
    builder: &Builder,
    dir: &Path,
) -> Result<BTreeMap<String, String>, TerraformError> {
    let declared = declared_variables(dir)?;
    let preset = tfvars_names(dir);
    let mut key_cache: Option<String> = None;
    let mut public = || -> Result<String, TerraformError> {
        if let Some(k) = &key_cache {
            return Ok(k.clone());
        }
        let k = public_key(builder)?;
        key_cache = Some(k.clone());
        Ok(k)
    };
    let mut vars = BTreeMap::new();
    for var in declared {
        let (value, key) = value_for(builder, &var.name, &mut public)?;
        match value {
            Some(v) => {
                vars.insert(var.name, v);
            }
            None if !var.has_default && !preset.contains(&var.name) => {
                return Err(TerraformError::MissingVariable {
                    dir: dir.to_path_buf(),
                    builder: builder.name.clone(),
                    variable: var.name,
                    key,
                });
            }
            None => {}
        }
    }
    Ok(vars)
}

/// `-var NAME=VALUE` arguments.
pub fn var_args(vars: &BTreeMap<String, String>) -> Vec<String> {
    vars.iter()
        .flat_map(|(k, v)| ["-var".to_string(), format!("{k}={v}")])
        .collect()
}

/// Saves the variables passed to `apply`, so `destroy` passes the same ones.
pub fn save_vars(work: &Workdir, vars: &BTreeMap<String, String>) -> Result<(), TerraformError> {
    let path = work.vars_file();
    let data = serde_json::to_vec_pretty(vars).map_err(|e| TerraformError::Io {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&path, data).map_err(io_err(&path))
}

/// The variables saved by [`save_vars`], if any.
pub fn saved_vars(work: &Workdir) -> Option<BTreeMap<String, String>> {
    let text = std::fs::read(work.vars_file()).ok()?;
    serde_json::from_slice(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variable_table() {
        let cases: &[(&str, &[(&str, bool)])] = &[
            ("variable \"a\" {}\n", &[("a", false)]),
            (
                "variable \"a\" {\n  type = string\n  default = \"x\"\n}\n",
                &[("a", true)],
            ),
            (
                // `default` inside a nested block or a string does not count.
                "variable \"a\" {\n  validation {\n    default = 1\n  }\n  description = \"default = 2 {\"\n}\nvariable \"b\" {\n default=null\n}\n",
                &[("a", false), ("b", true)],
            ),
            (
                "# variable \"commented\" {}\n// variable \"c2\" {}\n/* variable \"c3\" {} */\nvariable b {\n  condition = var.b == \"${var.x}\" # default = 1\n}\n",
                &[("b", false)],
            ),
            (
                "variable \"h\" {\n  description = <<-EOT\n    } default = 1 {\n  EOT\n}\nresource \"x\" \"y\" {\n  variable = 1\n  default = 2\n}\n",
                &[("h", false)],
            ),
            (
                "variable \"zone\" {\n  type    = string\n  default = null\n}\n\nvariable \"allowed_ssh_cidr\" {\n  type = list(string)\n\n  validation {\n    condition     = length(var.allowed_ssh_cidr) > 0\n    error_message = \"must list at least one\"\n  }\n}\n",
                &[("zone", true), ("allowed_ssh_cidr", false)],
            ),
        ];
        for (text, want) in cases {
            let got: Vec<(String, bool)> = parse_variables(text)
                .into_iter()
                .map(|v| (v.name, v.has_default))
                .collect();
            let want: Vec<(String, bool)> = want.iter().map(|(n, d)| (n.to_string(), *d)).collect();
            assert_eq!(got, want, "{text}");
        }
    }

    #[test]
    fn the_bundled_modules_declare_what_absconda_passes() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let gcp = declared_variables(&root.join("infra/gcp")).unwrap();
        let required: Vec<&str> = gcp
            .iter()
            .filter(|v| !v.has_default)
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(required, ["project", "allowed_ssh_cidr", "ssh_public_key"]);
        assert!(gcp.iter().any(|v| v.name == "machine_type"));
        assert!(!gcp.iter().any(|v| v.name == "instance_type"));
        let aws = declared_variables(&root.join("infra/aws")).unwrap();
        assert!(aws.iter().any(|v| v.name == "instance_type"));
        assert!(!aws.iter().any(|v| v.name == "project"));
        let azure = declared_variables(&root.join("infra/azure")).unwrap();
        let required: Vec<&str> = azure
            .iter()
            .filter(|v| !v.has_default)
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(
            required,
            ["subscription_id", "allowed_ssh_cidr", "ssh_public_key"]
        );
        assert!(azure.iter().any(|v| v.name == "location"));
        let loopback = declared_variables(&root.join("tests/terraform/loopback")).unwrap();
        assert!(loopback.iter().all(|v| v.has_default), "{loopback:?}");
        assert!(loopback.iter().any(|v| v.name == "port"));
    }

    #[test]
    fn the_bundled_modules_reach_one_level_up() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        assert_eq!(parent_levels(&root.join("infra/gcp")).unwrap(), 1);
        assert_eq!(parent_levels(&root.join("infra/aws")).unwrap(), 1);
        assert_eq!(parent_levels(&root.join("infra/azure")).unwrap(), 1);
        assert_eq!(
            parent_levels(&root.join("tests/terraform/loopback")).unwrap(),
            0
        );
    }

    #[test]
    fn outputs_table() {
        let ok = br#"{
            "instance_ip": {"sensitive": false, "type": "string", "value": "10.0.0.5"},
            "instance_id": {"sensitive": false, "type": "string", "value": "i-0abc"},
            "ssh_user": {"sensitive": false, "type": "string", "value": "absconda"},
            "ssh_port": {"sensitive": false, "type": "number", "value": 2222},
            "host_key_fingerprints": {"sensitive": false, "type": ["tuple", ["string"]], "value": ["SHA256:abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG="]}
        }"#;
        let o = Outputs::parse(ok).unwrap();
        assert_eq!(o.instance_ip, "10.0.0.5");
        assert_eq!(o.instance(ProviderKind::Aws).as_deref(), Some("i-0abc"));
        assert_eq!(o.ssh_port, Some(2222));
        assert_eq!(
            o.host_key_fingerprints,
            ["SHA256:abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"]
        );
        let bad: &[(&[u8], &str)] = &[
            (b"{}", "no output `instance_ip`"),
            (br#"{"instance_ip": {"value": ""}}"#, "is empty"),
            (b"not json", "no JSON"),
            (
                br#"{"instance_ip": {"value": "a"}, "ssh_port": {"value": 70000}}"#,
                "not a TCP port",
            ),
            (
                br#"{"instance_ip": {"value": "a"}, "host_key_fingerprints": {"value": ["nope"]}}"#,
                "`nope`",
            ),
        ];
        for (json, want) in bad {
            let e = Outputs::parse(json).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn versions_and_names() {
        assert_eq!(major_minor("1.11.4"), Some((1, 11)));
        assert_eq!(major_minor("v1.5.0-beta1"), Some((1, 5)));
        assert!(major_minor("1.4.7").unwrap() < MIN_VERSION);
        assert_eq!(major_minor("garbage"), None);
        assert_eq!(path_component("gcp-builder"), "gcp-builder");
        assert_eq!(path_component("a/b"), "a%2Fb");
        assert_eq!(path_component(".."), "%2E.");
        assert_eq!(path_component(""), "%");
    }

    fn builder(yaml: &str, key: &Path) -> Builder {
        let cfg = crate::config::ConfigFile::parse(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("absconda-remote.yaml"),
            &format!(
                "builders:\n  b:\n    identity_file: {}\n    user: ana\n{yaml}",
                key.display()
            ),
        )
        .unwrap();
        cfg.builder("b").unwrap()
    }

    fn keypair(dir: &Path) -> PathBuf {
        let key = dir.join("id_ed25519");
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "me@laptop", "-f"])
            .arg(&key)
            .status()
            .unwrap();
        assert!(st.success());
        key
    }

    #[test]
    fn a_gcp_builder_gets_the_bundled_module_and_only_its_variables() {
        let dir = tempfile::tempdir().unwrap();
        let key = keypair(dir.path());
        let b = builder(
            "    provider: gcp\n    project: proj\n    zone: europe-west4-a\n    instance: builder-1\n    machine_type: n2-standard-8\n    instance_type: t3.xlarge\n    disk_size: 200\n    spot: true\n    allowed_ssh_cidr: [203.0.113.7/32]\n    idle_shutdown_minutes: 20\n",
            &key,
        );
        let source = module_source(&b).unwrap();
        assert!(source.ends_with("infra/gcp"), "{}", source.display());
        let work = prepare_workdir_in(&dir.path().join("data"), "b", &source).unwrap();
        assert!(
            work.module.ends_with("tree/gcp"),
            "{}",
            work.module.display()
        );
        assert!(
            work.root
                .join("tree/scripts/builder-setup.sh.tftpl")
                .is_file(),
            "the scripts the module reads from ../scripts come along"
        );
        let vars = variables_for(&b, &work.module).unwrap();
        let pubkey = std::fs::read_to_string(key.with_extension("pub")).unwrap();
        let want: BTreeMap<String, String> = [
            ("allowed_ssh_cidr", "[\"203.0.113.7/32\"]"),
            ("disk_size", "200"),
            ("idle_shutdown_minutes", "20"),
            ("machine_type", "n2-standard-8"),
            ("name", "builder-1"),
            ("project", "proj"),
            ("spot", "true"),
            ("ssh_public_key", pubkey.trim()),
            ("ssh_user", "ana"),
            ("workspace", "/var/lib/absconda"),
            ("zone", "europe-west4-a"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(vars, want, "no instance_type for GCE, no region when unset");
        assert_eq!(
            var_args(&vars)[..2],
            [
                "-var".to_string(),
                "allowed_ssh_cidr=[\"203.0.113.7/32\"]".to_string()
            ]
        );
    }

    #[test]
    fn a_required_variable_names_its_key_and_a_missing_pub_file_is_derived() {
        let dir = tempfile::tempdir().unwrap();
        let key = keypair(dir.path());
        let expected = std::fs::read_to_string(key.with_extension("pub")).unwrap();
        std::fs::remove_file(key.with_extension("pub")).unwrap();
        let b = builder("    provider: aws\n    instance: x\n", &key);
        let e = variables_for(&b, &module_source(&b).unwrap()).unwrap_err();
        assert!(
            matches!(&e, TerraformError::MissingVariable { variable, key: Some("allowed_ssh_cidr"), .. } if variable == "allowed_ssh_cidr"),
            "{e}"
        );
        let derived = public_key(&b).unwrap();
        let material = |l: &str| l.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        assert_eq!(material(&derived), material(&expected));
        assert!(derived.ends_with("absconda@b"), "{derived}");
        let ssh = builder("    host: 10.0.0.1\n", &key);
        assert!(matches!(
            module_source(&ssh),
            Err(TerraformError::NothingToProvision { .. })
        ));
    }

    #[test]
    fn refreshing_a_working_copy_keeps_terraform_state_and_drops_removed_files() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("scripts")).unwrap();
        std::fs::write(src.path().join("main.tf"), "x").unwrap();
        std::fs::write(src.path().join("old.tf"), "x").unwrap();
        std::fs::write(src.path().join("terraform.tfstate"), "theirs").unwrap();
        std::fs::write(src.path().join("scripts/a.sh"), "a").unwrap();
        let mut budget = (100, 1 << 20);
        assert!(sync_tree(src.path(), dst.path(), &mut budget).is_ok());
        assert!(!dst.path().join("terraform.tfstate").exists());
        std::fs::write(dst.path().join("terraform.tfstate"), "ours").unwrap();
        std::fs::create_dir_all(dst.path().join(".terraform")).unwrap();
        std::fs::write(dst.path().join(".terraform.lock.hcl"), "lock").unwrap();
        std::fs::remove_file(src.path().join("old.tf")).unwrap();
        let mut budget = (100, 1 << 20);
        assert!(sync_tree(src.path(), dst.path(), &mut budget).is_ok());
        assert!(!dst.path().join("old.tf").exists());
        assert_eq!(
            std::fs::read_to_string(dst.path().join("terraform.tfstate")).unwrap(),
            "ours"
        );
        assert!(dst.path().join(".terraform").is_dir());
        assert!(dst.path().join(".terraform.lock.hcl").exists());
        assert!(dst.path().join("scripts/a.sh").exists());
        let mut tiny = (1, 1 << 20);
        assert!(matches!(
            sync_tree(src.path(), dst.path(), &mut tiny),
            Err(SyncError::TooBig(_))
        ));
    }
}
