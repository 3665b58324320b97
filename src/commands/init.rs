//! `absconda init` and `absconda remote add`: write the builders file for a
//! newcomer, then check the builder the way `remote health` does.
//!
//! `init` writes a commented `absconda-remote.yaml` (never over an existing
//! one without `--force`); `remote add` inserts one builder into an existing
//! file as text, so the file's comments and layout stay as they are, and
//! keeps the result only if it still parses. Both take every value as a flag;
//! on a terminal, `init` asks for what the flags leave out.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::Args;

use crate::config::{self, ConfigFile, FILE_NAME};
use crate::health::{self, Level};
use crate::state::State;

pub const INIT_EXAMPLES: &str = "\
Examples:
  absconda init                      # on a terminal: asks what it needs
  absconda init --host build.example.com --user builder --identity-file ~/.ssh/absconda
  absconda init --provider gcp --project my-project --zone us-central1-a --instance absconda-builder --user builder
  absconda init --provider aws --region us-east-1 --instance-id i-0123456789abcdef0 --user ubuntu
  absconda remote add second --host 10.0.0.5 --user builder";

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("`{}` exists already", path.display())]
    Exists { path: PathBuf },
    #[error("`{}` already defines a builder named `{name}`", path.display())]
    Duplicate { path: PathBuf, name: String },
    #[error("`--{flag}` is required for provider `{provider}`")]
    Missing {
        flag: &'static str,
        provider: String,
    },
    #[error("`{provider}` is not a provider: use `ssh`, `gcp` or `aws`")]
    BadProvider { provider: String },
    #[error("could not write `{}`", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the builder written to `{}` does not load", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: Box<config::ConfigError>,
    },
}

/// Where an answer goes.
type Field = fn(&mut BuilderFlags) -> &mut Option<String>;

/// One builder's settings, as flags.
#[derive(Debug, Clone, Default, Args)]
pub struct BuilderFlags {
    /// `ssh` (an always-on host), `gcp` or `aws`.
    #[arg(long, value_name = "ssh|gcp|aws")]
    pub provider: Option<String>,
    /// SSH address (for cloud builders: overrides the API's address).
    #[arg(long)]
    pub host: Option<String>,
    /// SSH port (default 22).
    #[arg(long)]
    pub port: Option<u16>,
    /// SSH user on the builder.
    #[arg(long)]
    pub user: Option<String>,
    /// Private key file to log in with.
    #[arg(long, value_name = "PATH")]
    pub identity_file: Option<String>,
    /// GCE project.
    #[arg(long)]
    pub project: Option<String>,
    /// GCE zone.
    #[arg(long)]
    pub zone: Option<String>,
    /// GCE instance name (EC2: the `Name` tag).
    #[arg(long)]
    pub instance: Option<String>,
    /// EC2 region.
    #[arg(long)]
    pub region: Option<String>,
    /// EC2 instance id.
    #[arg(long, value_name = "ID")]
    pub instance_id: Option<String>,
    /// `host_key_policy:` (`strict` or `accept-new`).
    #[arg(long, value_name = "POLICY")]
    pub host_key_policy: Option<String>,
    /// Folder on the builder for leases and runs.
    #[arg(long, value_name = "DIR")]
    pub workspace: Option<String>,
    /// Do not check the builder after writing.
    #[arg(long)]
    pub no_check: bool,
}

#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// The builder's name (default: `local`, `gcp-builder` or `aws-builder`).
    #[arg(long)]
    pub name: Option<String>,
    /// Write `$XDG_CONFIG_HOME/absconda/absconda-remote.yaml` (your default
    /// for every folder) instead of `./absconda-remote.yaml`.
    #[arg(long)]
    pub global: bool,
    /// Replace an existing file.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub builder: BuilderFlags,
}

#[derive(Debug, Clone, Args)]
pub struct AddArgs {
    /// The new builder's name.
    pub name: String,
    #[command(flatten)]
    pub config: crate::cli::ConfigArg,
    #[command(flatten)]
    pub builder: BuilderFlags,
}

pub async fn init(args: InitArgs) -> anyhow::Result<()> {
    let path = if args.global {
        global_path()
    } else {
        PathBuf::from(FILE_NAME)
    };
    if path.exists() && !args.force {
        return Err(InitError::Exists { path }.into());
    }
    let mut flags = args.builder.clone();
    let interactive = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
    if interactive {
        ask_missing(&mut flags)?;
    }
    let provider = provider(&flags)?;
    let name = args.name.clone().unwrap_or_else(|| {
        match provider {
            "gcp" => "gcp-builder",
            "aws" => "aws-builder",
            _ => "local",
        }
        .to_string()
    });
    let text = file_text(&name, &builder_text(&name, provider, &flags)?);
    ConfigFile::parse(&path, &text)
        .and_then(|f| f.builder(&name).map(|_| ()))
        .map_err(|source| InitError::Invalid {
            path: path.clone(),
            source: Box::new(source),
        })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| InitError::Write {
            path: path.clone(),
            source,
        })?;
    }
    write_atomic(&path, &text)?;
    eprintln!("absconda: wrote `{}` with builder `{name}`", path.display());
    check(&path, &name, &flags).await
}

pub async fn add(args: AddArgs) -> anyhow::Result<()> {
    let path = config::discover(args.config.remote_config.as_deref())?;
    let text = std::fs::read_to_string(&path).map_err(|source| config::ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let before = ConfigFile::parse(&path, &text)?;
    if before.names().iter().any(|n| n == &args.name) {
        return Err(InitError::Duplicate {
            path,
            name: args.name,
        }
        .into());
    }
    let provider = provider(&args.builder)?;
    let entry = builder_text(&args.name, provider, &args.builder)?;
    let new = insert_builder(&text, &entry);
    ConfigFile::parse(&path, &new)
        .and_then(|f| f.builder(&args.name).map(|_| ()))
        .map_err(|source| InitError::Invalid {
            path: path.clone(),
            source: Box::new(source),
        })?;
    write_atomic(&path, &new)?;
    eprintln!(
        "absconda: added builder `{}` to `{}`",
        args.name,
        path.display()
    );
    check(&path, &args.name, &args.builder).await
}

fn global_path() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from(".config"))
        .join("absconda")
        .join(FILE_NAME)
}

fn provider(flags: &BuilderFlags) -> Result<&'static str, InitError> {
    let cloudy = flags.project.is_some() || flags.zone.is_some();
    let aws = flags.region.is_some() || flags.instance_id.is_some();
    match flags.provider.as_deref() {
        None if cloudy => Ok("gcp"),
        None if aws => Ok("aws"),
        None | Some("ssh") => Ok("ssh"),
        Some("gcp" | "gce") => Ok("gcp"),
        Some("aws" | "ec2") => Ok("aws"),
        Some(other) => Err(InitError::BadProvider {
            provider: other.to_string(),
        }),
    }
}

/// Asks on the terminal for what a builder of the chosen provider needs.
fn ask_missing(flags: &mut BuilderFlags) -> anyhow::Result<()> {
    if flags.provider.is_none() && flags.host.is_none() && provider(flags)? == "ssh" {
        flags.provider = Some(ask("provider: ssh (an always-on host), gcp or aws", "ssh")?);
    }
    let need: &[(&str, Field)] = match provider(flags)? {
        "gcp" => &[
            ("GCE project", |f| &mut f.project),
            ("zone", |f| &mut f.zone),
            ("instance name", |f| &mut f.instance),
        ],
        "aws" => &[
            ("EC2 region", |f| &mut f.region),
            ("instance id", |f| &mut f.instance_id),
        ],
        _ => &[("host (name or address)", |f| &mut f.host)],
    };
    for (what, field) in need {
        if field(flags).is_none() {
            *field(flags) = Some(ask(what, "")?);
        }
    }
    if flags.user.is_none() {
        let default = std::env::var("USER").unwrap_or_default();
        flags.user = Some(ask("SSH user on the builder", &default)?);
    }
    if flags.identity_file.is_none() {
        let a = ask(
            "key file to log in with (empty: your agent and ~/.ssh/id_*)",
            "",
        )?;
        flags.identity_file = (!a.is_empty()).then_some(a);
    }
    Ok(())
}

fn ask(question: &str, default: &str) -> anyhow::Result<String> {
    let mut e = std::io::stderr().lock();
    if default.is_empty() {
        write!(e, "{question}: ")?;
    } else {
        write!(e, "{question} [{default}]: ")?;
    }
    e.flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let line = line.trim();
    Ok(if line.is_empty() { default } else { line }.to_string())
}

/// A YAML scalar: bare when it cannot be misread, double-quoted otherwise.
fn scalar(v: &str) -> String {
    let chars_ok = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/~@-".contains(c));
    let keyword = matches!(
        v.to_ascii_lowercase().as_str(),
        "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "~"
    );
    let start_ok = !v.starts_with(['-', '~']) || v.starts_with("~/");
    let plain = chars_ok && !keyword && start_ok;
    if plain {
        v.to_string()
    } else {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// The builder's lines, indented for `builders:`.
fn builder_text(name: &str, provider: &str, f: &BuilderFlags) -> Result<String, InitError> {
    let required: &[(&'static str, &Option<String>)] = match provider {
        "gcp" => &[
            ("project", &f.project),
            ("zone", &f.zone),
            ("instance", &f.instance),
        ],
        "aws" => &[("region", &f.region)],
        _ => &[("host", &f.host)],
    };
    for (flag, value) in required {
        if value.is_none() {
            return Err(InitError::Missing {
                flag,
                provider: provider.to_string(),
            });
        }
    }
    if provider == "aws" && f.instance_id.is_none() && f.instance.is_none() {
        return Err(InitError::Missing {
            flag: "instance-id",
            provider: provider.into(),
        });
    }
    let mut out = format!("  {}:\n    provider: {provider}\n", scalar(name));
    let mut key = |k: &str, v: &Option<String>, note: &str| {
        if let Some(v) = v {
            out.push_str(&format!("    {k}: {}{note}\n", scalar(v)));
        }
    };
    key("project", &f.project, "");
    key("zone", &f.zone, "");
    key("instance", &f.instance, "");
    key("region", &f.region, "");
    key("instance_id", &f.instance_id, "");
    key(
        "host",
        &f.host,
        if provider == "ssh" {
            ""
        } else {
            "   # overrides the address the cloud API reports"
        },
    );
    key("port", &f.port.map(|p| p.to_string()), "");
    key("user", &f.user, "");
    key("identity_file", &f.identity_file, "");
    key("host_key_policy", &f.host_key_policy, "");
    key("workspace", &f.workspace, "");
    if provider != "ssh" && f.host.is_none() {
        out.push_str(&format!(
            "    host_key_alias: {}   # the IP changes at every start\n",
            scalar(name)
        ));
    }
    if f.workspace.is_none() {
        out.push_str(
            "    # workspace: /var/lib/absconda   # folder on the builder the SSH user can write\n",
        );
    }
    if f.host_key_policy.is_none() {
        out.push_str(
            "    # host_key_policy: accept-new    # record an unknown host key on first use\n",
        );
    }
    Ok(out)
}

fn file_text(name: &str, builder: &str) -> String {
    format!(
        "# Builders for absconda (written by `absconda init`). The README's\n\
         # \"Configuration\" section describes every key; `absconda remote add NAME`\n\
         # adds another builder, `absconda remote health NAME` checks one.\n\
         \n\
         # The builder `absconda build` uses without --remote-builder.\n\
         default_builder: {}\n\
         \n\
         builders:\n\
         {builder}\
         \n\
         defaults:\n\
         \x20 # timeout: 3600        # seconds a build may take\n\
         \x20 # auto_stop: true      # cloud builders stop themselves after stop_delay seconds\n\
         \x20 # stop_delay: 300\n",
        scalar(name)
    )
}

/// `entry` inserted at the end of the `builders:` block, or a new block at
/// the end of the file; every other line stays as it was.
fn insert_builder(text: &str, entry: &str) -> String {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let top = |l: &str| !l.starts_with([' ', '\t', '#', '\n', '\r']) && !l.trim().is_empty();
    let Some(start) = lines.iter().position(|l| l.starts_with("builders:")) else {
        let mut out = text.to_string();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str("builders:\n");
        out.push_str(entry);
        return out;
    };
    // The block ends at the next top-level key; trailing blank and comment
    // lines before it belong to what follows.
    let mut end = lines[start + 1..]
        .iter()
        .position(|l| top(l))
        .map_or(lines.len(), |i| start + 1 + i);
    while end > start + 1 {
        let prev = lines[end - 1].trim();
        if prev.is_empty() || (prev.starts_with('#') && !lines[end - 1].starts_with("    ")) {
            end -= 1;
        } else {
            break;
        }
    }
    let mut out: String = lines[..end].concat();
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(entry);
    out.push_str(&lines[end..].concat());
    out
}

fn write_atomic(path: &Path, text: &str) -> Result<(), InitError> {
    let err = |source| InitError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

/// The checks of `remote health`, with what to do about each failure.
async fn check(path: &Path, name: &str, flags: &BuilderFlags) -> anyhow::Result<()> {
    if flags.no_check {
        return Ok(());
    }
    let file = config::load(Some(path))?;
    let builder = file.builder(name)?;
    let Some(_) = &builder.host else {
        eprintln!(
            "absconda: next: `absconda remote start {name}` starts the VM and checks SSH and docker"
        );
        return Ok(());
    };
    let ep = crate::provisioned::endpoint(&builder, &State::default())?;
    let report = health::check(&builder, &ep, None).await;
    for c in &report.checks {
        let mark = match c.status {
            Level::Fail => "FAIL",
            other => other.as_str(),
        };
        eprintln!("  {mark:<5} {:<9} {}", c.name, c.detail);
    }
    if report.healthy {
        eprintln!(
            "absconda: builder `{name}` is ready: `absconda build --repository REPO` builds on it"
        );
    } else {
        eprintln!(
            "absconda: builder `{name}` is not ready yet; fix the FAIL lines (the hint of `absconda remote health {name}` says how), then run it again"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_keeps_comments_and_lands_in_the_builders_block() {
        let text = "# top comment\nbuilders:\n  a:\n    host: h   # why\n\n# about defaults\ndefaults:\n  timeout: 10\n";
        let out = insert_builder(text, "  b:\n    host: x\n");
        assert_eq!(
            out,
            "# top comment\nbuilders:\n  a:\n    host: h   # why\n  b:\n    host: x\n\n# about defaults\ndefaults:\n  timeout: 10\n"
        );
        let f = ConfigFile::parse(Path::new("f"), &out).unwrap();
        assert_eq!(f.names(), ["a", "b"]);
        assert_eq!(
            insert_builder("defaults:\n  timeout: 1", "  b:\n    host: x\n"),
            "defaults:\n  timeout: 1\nbuilders:\n  b:\n    host: x\n"
        );
    }

    #[test]
    fn scalars_that_yaml_would_misread_are_quoted() {
        assert_eq!(scalar("127.0.0.1"), "127.0.0.1");
        assert_eq!(scalar("~/.ssh/id_ed25519"), "~/.ssh/id_ed25519");
        assert_eq!(scalar("yes"), "\"yes\"");
        assert_eq!(scalar("a b: c"), "\"a b: c\"");
        assert_eq!(scalar("-x"), "\"-x\"");
    }
}
