//! `absconda init` and `absconda remote add`: write the builders file for a
//! newcomer, then check the builder the way `remote health` does.
//!
//! `init` writes a commented `absconda-remote.yaml` (never over an existing
//! one without `--force`); `remote add` inserts one builder into an existing
//! file as text, so the file's comments and layout stay as they are, and
//! keeps the result only if it still parses. Both take every value as a flag;
//! on a terminal, `init` asks for what the flags leave out, and offers the
//! cloud instances the credentials see (GCE `instances.aggregatedList`, EC2
//! `DescribeInstances`) as a menu.
//!
//! After writing, both check the builder as `remote health` does. A host key
//! `known_hosts` does not know is recorded only on the user's word
//! (`--accept-new-host-key`, or `--trust-cloud-host-key` when the cloud
//! reports the same key; a terminal asks), never when the cloud reports
//! another. Failed checks do not fail the command: the file is written, and
//! the report gives each failure its next step.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::Args;

use crate::cloud::Status;
use crate::cloud::ec2::{Ec2, Ec2Instance, Ec2Settings, Instance as Ec2Listed};
use crate::cloud::gce::{Gce, ListedInstance};
use crate::cloud::retry::Backoff;
use crate::config::{self, ConfigFile, FILE_NAME};
use crate::health::{self, Level};
use crate::lifecycle::Cloud;
use crate::provisioned::Endpoint;
use crate::ssh::SshError;
use crate::ssh::known_hosts::{HostKeyPolicy, KnownHosts, Pin, Verdict};
use crate::ssh::ssh_config::SshConfig;
use crate::state::State;

/// How long `init` waits for a cloud API before it reports what it could
/// not learn (the file is written by then).
const CLOUD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub const INIT_EXAMPLES: &str = "\
Examples:
  absconda init                      # on a terminal: asks what it needs
  absconda init --host build.example.com --user builder --identity-file ~/.ssh/absconda
  absconda init --provider gcp --project my-project --zone us-central1-a --instance absconda-builder --user builder
  absconda init --provider aws --region us-east-1 --instance-id i-0123456789abcdef0 --user ubuntu
  absconda init --provider gcp --project my-project --label role=builder --list
  absconda init --from-ssh-config buildbox --accept-new-host-key
  absconda remote add second --host 10.0.0.5 --user builder

Exit status: 0 once the file is written, whatever the checks found (the last
line says whether the builder is ready; `absconda remote health NAME` exits
non-zero while it is not); 2 for a missing or wrong flag, an existing file,
no instance picked, or an alias not in ~/.ssh/config.";

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
    #[error(
        "`{flag}` is required for provider `{provider}`: pick one of the {count} instances listed above"
    )]
    NotChosen {
        flag: &'static str,
        provider: &'static str,
        count: usize,
    },
    #[error("the credentials see no instances{}", if filter.is_empty() { String::new() } else { format!(" matching {filter}") })]
    NoneListed { filter: String },
    #[error("`--{flag} {value}`: {why}")]
    BadFilter {
        flag: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("no `Host {alias}` in `{}`{suggestion}", path.display())]
    NoSuchAlias {
        alias: String,
        path: PathBuf,
        suggestion: String,
    },
    #[error(
        "`--from-ssh-config` makes an `ssh` builder and names its host: it cannot go with `--{flag}`"
    )]
    FromSshConfigWith { flag: &'static str },
    #[error("could not read `{}`", path.display())]
    SshConfig {
        path: PathBuf,
        #[source]
        source: crate::ssh::ssh_config::SshConfigError,
    },
    #[error("no instance picked")]
    NotPicked,
    #[error("`--list` lists the instances of a cloud, and this builder is an `ssh` host")]
    ListNeedsCloud,
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
    /// The cloud API's base URL (a private endpoint or an emulator).
    #[arg(long, value_name = "URL")]
    pub api_endpoint: Option<String>,
    /// Make an `ssh` builder from a `Host` alias of `~/.ssh/config`: writes
    /// `host: ALIAS`, so HostName, User, Port, ProxyJump and IdentityFile
    /// keep coming from that file.
    #[arg(long, value_name = "HOST")]
    pub from_ssh_config: Option<String>,
    /// When `known_hosts` does not know the builder's host key, record it
    /// if the cloud confirms it (GCE guest attributes, EC2 console output).
    #[arg(long)]
    pub trust_cloud_host_key: bool,
    /// When `known_hosts` does not know the builder's host key, record the
    /// key it presents now (trust on first use, once; compare the
    /// fingerprint it prints with the builder's own).
    #[arg(long)]
    pub accept_new_host_key: bool,
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
    /// Only list the instances the credentials see (gcp: in `--project`;
    /// aws: in `--region`) and write nothing.
    #[arg(long)]
    pub list: bool,
    /// gcp: list only VMs with this label (`KEY=VALUE`, or `KEY` for any
    /// value); repeat to require several.
    #[arg(long, value_name = "KEY=VALUE")]
    pub label: Vec<String>,
    /// aws: list only instances with this tag (`KEY=VALUE`, or `KEY` for
    /// any value); repeat to require several.
    #[arg(long, value_name = "KEY=VALUE")]
    pub tag: Vec<String>,
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
    if path.exists() && !args.force && !args.list {
        return Err(InitError::Exists { path }.into());
    }
    let mut flags = args.builder.clone();
    let filters = Filters::parse(&args.label, &args.tag)?;
    let alias = flags.from_ssh_config.clone();
    if let Some(alias) = &alias {
        use_ssh_alias(&mut flags, alias)?;
    }
    let interactive = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
    if args.list {
        let listing = list(&flags, &filters).await?;
        print!("{}", listing.table(false));
        eprintln!("absconda: {}", listing.summary());
        return Ok(());
    }
    if interactive {
        ask_missing(&mut flags, &filters).await?;
    } else {
        explain_missing(&flags, &filters).await?;
    }
    let provider = provider(&flags)?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| match (&alias, provider) {
            (Some(a), _) => a.clone(),
            (None, "gcp") => "gcp-builder".into(),
            (None, "aws") => "aws-builder".into(),
            (None, _) => "local".into(),
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
    if let Some(alias) = &alias {
        show_ssh_alias(&path, &name, alias)?;
    }
    let rerun = "run this command again with `--force --accept-new-host-key`";
    check(&path, &name, &flags, interactive, rerun).await
}

/// `~/.ssh/config`, which `ssh` builders read.
fn ssh_config_path() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
        .join(".ssh/config")
}

/// `--from-ssh-config ALIAS`: an `ssh` builder whose host is the alias,
/// which must be a `Host` of `~/.ssh/config`.
fn use_ssh_alias(flags: &mut BuilderFlags, alias: &str) -> Result<(), InitError> {
    if flags.host.is_some() {
        return Err(InitError::FromSshConfigWith { flag: "host" });
    }
    if provider(flags)? != "ssh" {
        return Err(InitError::FromSshConfigWith { flag: "provider" });
    }
    let path = ssh_config_path();
    let cfg = SshConfig::load(&path).map_err(|source| InitError::SshConfig {
        path: path.clone(),
        source,
    })?;
    let aliases = cfg.aliases();
    if !aliases.iter().any(|a| a.eq_ignore_ascii_case(alias)) {
        let suggestion = match config::did_you_mean(alias, aliases.iter().map(String::as_str)) {
            Some(s) => format!(" (did you mean `{s}`?)"),
            None if aliases.is_empty() => " (it names no hosts)".into(),
            None => format!(" (it names: {})", aliases.join(", ")),
        };
        return Err(InitError::NoSuchAlias {
            alias: alias.to_string(),
            path,
            suggestion,
        });
    }
    flags.provider = Some("ssh".into());
    flags.host = Some(alias.to_string());
    Ok(())
}

/// What `~/.ssh/config` makes of the alias, as the builder will use it.
fn show_ssh_alias(path: &Path, name: &str, alias: &str) -> anyhow::Result<()> {
    let b = config::load(Some(path))?.builder(name)?;
    let cfg_path = ssh_config_path();
    let jump = SshConfig::load(&cfg_path)
        .and_then(|c| c.resolve(alias, None))
        .ok()
        .and_then(|h| h.proxy_jump)
        .unwrap_or_else(|| "none".into());
    eprintln!(
        "absconda: `Host {alias}` in `{}`: HostName {}, User {}, Port {}, ProxyJump {jump}",
        cfg_path.display(),
        b.host.as_deref().unwrap_or(alias),
        b.user,
        b.port,
    );
    Ok(())
}

/// `--label` / `--tag`, checked.
#[derive(Debug, Default)]
struct Filters {
    labels: Vec<(String, Option<String>)>,
    tags: Vec<(String, Option<String>)>,
}

impl Filters {
    fn parse(labels: &[String], tags: &[String]) -> Result<Filters, InitError> {
        let split = |v: &String| match v.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (v.clone(), None),
        };
        let mut f = Filters::default();
        for l in labels {
            let (k, v) = split(l);
            // GCE label keys and values: lowercase letters, digits, `_`, `-`
            // (so they need no quoting in a filter expression).
            let ok = |s: &str| {
                s.len() <= 63
                    && s.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'
                    })
            };
            if k.is_empty() || !ok(&k) || !v.as_deref().is_none_or(ok) {
                return Err(InitError::BadFilter {
                    flag: "label",
                    value: l.clone(),
                    why: "GCE labels use lowercase letters, digits, `_` and `-`",
                });
            }
            f.labels.push((k, v));
        }
        for t in tags {
            let (k, v) = split(t);
            if k.is_empty() || k.len() > 128 || v.as_ref().is_some_and(|v| v.len() > 256) {
                return Err(InitError::BadFilter {
                    flag: "tag",
                    value: t.clone(),
                    why: "a tag key is 1 to 128 characters, its value up to 256",
                });
            }
            f.tags.push((k, v));
        }
        Ok(f)
    }

    /// The `filter` of `instances.aggregatedList`: `labels.KEY = "VALUE"`
    /// (or `labels.KEY:*`), each in parentheses, all required.
    fn gce_filter(&self) -> Option<String> {
        let exprs: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| match v {
                Some(v) => format!("labels.{k} = \"{v}\""),
                None => format!("labels.{k}:*"),
            })
            .collect();
        match exprs.len() {
            0 => None,
            1 => exprs.into_iter().next(),
            _ => Some(
                exprs
                    .iter()
                    .map(|e| format!("({e})"))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        }
    }

    fn describe(pairs: &[(String, Option<String>)]) -> String {
        pairs
            .iter()
            .map(|(k, v)| match v {
                Some(v) => format!("`{k}={v}`"),
                None => format!("`{k}`"),
            })
            .collect::<Vec<_>>()
            .join(" and ")
    }
}

/// The instances a provider's credentials see, for picking one.
struct Listing {
    provider: &'static str,
    /// Where: `project `p`` or `region `r``, and the filter.
    scope: String,
    filter: String,
    gce: Vec<ListedInstance>,
    ec2: Vec<Ec2Listed>,
}

impl Listing {
    fn len(&self) -> usize {
        self.gce.len() + self.ec2.len()
    }

    /// Aligned columns; numbered for a menu.
    fn table(&self, numbered: bool) -> String {
        let mut rows: Vec<Vec<String>> = Vec::new();
        if self.provider == "gcp" {
            rows.push(vec![
                "ZONE".into(),
                "NAME".into(),
                "STATUS".into(),
                "ADDRESS".into(),
                "LABELS".into(),
            ]);
            for i in &self.gce {
                rows.push(vec![
                    i.zone.clone(),
                    i.name.clone(),
                    i.status.clone(),
                    i.external_ip
                        .clone()
                        .or_else(|| i.internal_ip.clone())
                        .unwrap_or_else(|| "-".into()),
                    i.labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(","),
                ]);
            }
        } else {
            rows.push(vec![
                "INSTANCE ID".into(),
                "NAME".into(),
                "STATE".into(),
                "ADDRESS".into(),
            ]);
            for i in &self.ec2 {
                rows.push(vec![
                    i.instance_id.clone(),
                    i.name.clone().unwrap_or_else(|| "-".into()),
                    i.state.clone(),
                    i.address().unwrap_or_else(|| "-".into()),
                ]);
            }
        }
        let cols = rows[0].len();
        let widths: Vec<usize> = (0..cols)
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for (n, r) in rows.iter().enumerate() {
            let mut line = String::new();
            if numbered {
                line.push_str(&if n == 0 {
                    "     ".to_string()
                } else {
                    format!("{n:>3}) ")
                });
            }
            for (c, cell) in r.iter().enumerate() {
                if c + 1 == cols {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    fn summary(&self) -> String {
        format!(
            "{} instance(s) in {}{}",
            self.len(),
            self.scope,
            if self.filter.is_empty() {
                String::new()
            } else {
                format!(" with {}", self.filter)
            }
        )
    }
}

/// Lists what the credentials see: the VMs of `--project` (gcp) or the
/// instances of `--region` (aws).
async fn list(flags: &BuilderFlags, filters: &Filters) -> anyhow::Result<Listing> {
    let backoff = Backoff {
        deadline: CLOUD_TIMEOUT,
        ..Backoff::default()
    };
    match provider(flags)? {
        "gcp" => {
            let project = flags.project.clone().ok_or(InitError::Missing {
                flag: "project",
                provider: "gcp".into(),
            })?;
            let gce = Gce::for_project(&project, flags.api_endpoint.clone(), backoff)?;
            let found = gce.aggregated_list(filters.gce_filter().as_deref()).await?;
            Ok(Listing {
                provider: "gcp",
                scope: format!("project `{project}`"),
                filter: Filters::describe(&filters.labels),
                gce: found,
                ec2: Vec::new(),
            })
        }
        "aws" => {
            let ec2 = Ec2::new(Ec2Settings {
                region: flags.region.clone(),
                // Listing names no instance.
                instance: Ec2Instance::Name(String::new()),
                endpoint: flags.api_endpoint.clone(),
                profile: None,
                backoff,
            })?;
            let found = ec2.list_instances(&filters.tags).await?;
            Ok(Listing {
                provider: "aws",
                scope: format!("region `{}`", ec2.region()),
                filter: Filters::describe(&filters.tags),
                gce: Vec::new(),
                ec2: found,
            })
        }
        _ => Err(InitError::ListNeedsCloud.into()),
    }
}

/// Without a terminal: when the instance is left out, show what there is
/// to pick from and say which flag picks it.
async fn explain_missing(flags: &BuilderFlags, filters: &Filters) -> anyhow::Result<()> {
    let (flag, missing) = match provider(flags)? {
        "gcp" => (
            "--instance",
            flags.project.is_some() && (flags.zone.is_none() || flags.instance.is_none()),
        ),
        "aws" => (
            "--instance-id",
            flags.instance_id.is_none() && flags.instance.is_none(),
        ),
        _ => return Ok(()),
    };
    if !missing {
        return Ok(());
    }
    let provider = provider(flags)?;
    match list(flags, filters).await {
        Ok(listing) if listing.len() == 0 => Err(InitError::NoneListed {
            filter: listing.filter,
        }
        .into()),
        Ok(listing) => {
            print!("{}", listing.table(false));
            Err(InitError::NotChosen {
                flag,
                provider,
                count: listing.len(),
            }
            .into())
        }
        Err(e) => {
            eprintln!(
                "absconda: could not list the instances to pick from: {}",
                crate::util::chain(e.as_ref())
            );
            Err(InitError::Missing {
                flag: flag.trim_start_matches("--"),
                provider: provider.into(),
            }
            .into())
        }
    }
}

/// On a terminal: the instance picked from a numbered menu.
async fn pick_instance(flags: &mut BuilderFlags, filters: &Filters) -> anyhow::Result<bool> {
    let listing = match list(flags, filters).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "absconda: could not list the instances to pick from: {}",
                crate::util::chain(e.as_ref())
            );
            return Ok(false);
        }
    };
    if listing.len() == 0 {
        eprintln!("absconda: {}; type the instance's name", listing.summary());
        return Ok(false);
    }
    eprintln!("absconda: {}:", listing.summary());
    eprint!("{}", listing.table(true));
    let default = if listing.len() == 1 { "1" } else { "" };
    for _ in 0..5 {
        let answer = ask(&format!("builder VM [1-{}]", listing.len()), default)?;
        if answer.is_empty() {
            return Err(InitError::NotPicked.into());
        }
        match answer.parse::<usize>() {
            Ok(n) if (1..=listing.len()).contains(&n) => {
                if let Some(i) = listing.gce.get(n - 1) {
                    flags.zone = Some(i.zone.clone());
                    flags.instance = Some(i.name.clone());
                } else if let Some(i) = listing.ec2.get(n - 1) {
                    flags.instance_id = Some(i.instance_id.clone());
                }
                return Ok(true);
            }
            _ => eprintln!("absconda: type a number from 1 to {}", listing.len()),
        }
    }
    Err(InitError::NotPicked.into())
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
    let mut flags = args.builder.clone();
    if let Some(alias) = args.builder.from_ssh_config.as_deref() {
        use_ssh_alias(&mut flags, alias)?;
    }
    let provider = provider(&flags)?;
    let entry = builder_text(&args.name, provider, &flags)?;
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
    if let Some(alias) = flags.from_ssh_config.as_deref() {
        show_ssh_alias(&path, &args.name, alias)?;
    }
    let interactive = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
    let rerun = "set `host_key: \"FINGERPRINT\"` on the builder with the fingerprint above, or `host_key_policy: accept-new`";
    check(&path, &args.name, &flags, interactive, rerun).await
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

/// Asks on the terminal for what a builder of the chosen provider needs;
/// a cloud instance is picked from the list the credentials see.
async fn ask_missing(flags: &mut BuilderFlags, filters: &Filters) -> anyhow::Result<()> {
    if flags.provider.is_none() && flags.host.is_none() && provider(flags)? == "ssh" {
        flags.provider = Some(ask("provider: ssh (an always-on host), gcp or aws", "ssh")?);
    }
    match provider(flags)? {
        "gcp" => {
            if flags.project.is_none() {
                flags.project = Some(ask("GCE project", "")?);
            }
            if (flags.zone.is_none() || flags.instance.is_none())
                && !pick_instance(flags, filters).await?
            {
                if flags.zone.is_none() {
                    flags.zone = Some(ask("zone", "")?);
                }
                if flags.instance.is_none() {
                    flags.instance = Some(ask("instance name", "")?);
                }
            }
        }
        "aws" => {
            if flags.region.is_none() {
                let default = std::env::var("AWS_REGION")
                    .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
                    .unwrap_or_default();
                flags.region = Some(ask("EC2 region", &default)?);
            }
            if flags.instance_id.is_none()
                && flags.instance.is_none()
                && !pick_instance(flags, filters).await?
            {
                flags.instance_id = Some(ask("instance id", "")?);
            }
        }
        _ => {
            if flags.host.is_none() {
                flags.host = Some(ask("host (name or address)", "")?);
            }
        }
    }
    if flags.from_ssh_config.is_some() {
        // User and key come from `~/.ssh/config`.
        return Ok(());
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
    key("api_endpoint", &f.api_endpoint, "");
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
///
/// Never an error once the file is written: what the builder lacks is
/// reported, each with its next step, and `init` exits 0 (scripts that need
/// a ready builder run `absconda remote health NAME`, which exits non-zero).
async fn check(
    path: &Path,
    name: &str,
    flags: &BuilderFlags,
    interactive: bool,
    rerun: &str,
) -> anyhow::Result<()> {
    if flags.no_check {
        return Ok(());
    }
    let file = config::load(Some(path))?;
    let builder = file.builder(name)?;
    let cloud = match Cloud::for_builder(&builder) {
        Ok(c) => c,
        Err(e) => {
            not_checked(name, &anyhow::Error::from(e));
            return Ok(());
        }
    };
    let ep = match (&builder.host, &cloud) {
        (Some(_), _) | (None, None) => crate::provisioned::endpoint(&builder, &State::default())?,
        (None, Some(cloud)) => match tokio::time::timeout(CLOUD_TIMEOUT, cloud.describe())
            .await
            .unwrap_or_else(|_| {
                Err(crate::cloud::CloudError::Timeout {
                    what: format!("describing the VM of builder `{name}`"),
                    after: CLOUD_TIMEOUT,
                    last: None,
                })
            }) {
            Ok(info) => match (&info.status, &info.address) {
                (Status::Running, Some(address)) => Endpoint {
                    target: crate::provisioned::target_at(&builder, address, builder.port),
                    pins: Vec::new(),
                    provisioned: None,
                },
                _ => {
                    eprintln!(
                        "absconda: the VM of builder `{name}` is {}: `absconda remote start {name}` starts it and checks SSH and docker",
                        info.raw_status
                    );
                    return Ok(());
                }
            },
            Err(e) => {
                not_checked(name, &anyhow::Error::from(e));
                return Ok(());
            }
        },
    };
    let offer = host_key(&ep, cloud.as_ref(), flags, interactive, rerun).await;
    let report = health::check(&builder, &ep, None).await;
    eprintln!(
        "absconda: checks of builder `{name}` at {}@{}:",
        report.user, report.address
    );
    for c in &report.checks {
        let mark = match c.status {
            Level::Fail => "FAIL",
            other => other.as_str(),
        };
        eprintln!("  {mark:<5} {:<9} {}", c.name, c.detail);
        if c.status != Level::Fail {
            continue;
        }
        let next = match c.name {
            "ssh" if offer.is_some() => offer.clone(),
            "ssh" if c.detail.contains("refused every key") => {
                let tried: Vec<String> = builder
                    .identity_files
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                Some(crate::hints::key_refused(
                    &report.user,
                    &ep.target.host,
                    &tried,
                ))
            }
            "docker" => Some(crate::hints::docker(&report.user, &c.detail)),
            _ => None,
        };
        if let Some(next) = next {
            eprintln!("        next: {next}");
        }
    }
    if report.healthy {
        eprintln!(
            "absconda: builder `{name}` is ready: `absconda build --repository REPO` builds on it"
        );
    } else {
        eprintln!(
            "absconda: builder `{name}` is not ready yet ({} failed); the file is written: fix what the FAIL lines say, then `absconda remote health {name}` checks again",
            report.failed().join(", ")
        );
    }
    Ok(())
}

fn not_checked(name: &str, e: &anyhow::Error) {
    eprintln!(
        "absconda: could not check builder `{name}`: {}",
        crate::util::chain(e.as_ref())
    );
    if let Some(hint) = crate::exit::hint(e) {
        eprintln!("absconda: next: {hint}");
    }
}

/// When `known_hosts` does not know the builder's key: record it if the
/// flags or the user say so (the cloud's confirmation first), else return
/// what to do about it.
async fn host_key(
    ep: &Endpoint,
    cloud: Option<&Cloud>,
    flags: &BuilderFlags,
    interactive: bool,
    rerun: &str,
) -> Option<String> {
    if ep.target.pin.is_some() || !ep.pins.is_empty() {
        return None;
    }
    let mut strict = ep.clone();
    strict.target.policy = HostKeyPolicy::Strict;
    let (known_name, algorithm, fingerprint, known_hosts) =
        match crate::provisioned::connect(&strict).await {
            Ok(s) => {
                s.close().await;
                return None;
            }
            Err(SshError::UnknownHostKey {
                name,
                algorithm,
                fingerprint,
                known_hosts,
            }) => (name, algorithm, fingerprint, known_hosts),
            Err(_) => return None,
        };
    if ep.target.policy == HostKeyPolicy::AcceptNew {
        // The health check's connection records it, as the config asks.
        return None;
    }
    let presented = fingerprint.trim_end_matches('=').to_string();
    eprintln!(
        "absconda: `{known_name}` presents {algorithm} key {fingerprint}, which `{}` does not record",
        known_hosts.display()
    );
    let (source, reported) = match cloud {
        Some(c) => (
            c.host_key_source(),
            match tokio::time::timeout(CLOUD_TIMEOUT, c.host_key_fingerprints()).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {}s", CLOUD_TIMEOUT.as_secs())),
            },
        ),
        None => ("", Ok(Vec::new())),
    };
    let confirmed = matches!(&reported, Ok(r) if r.contains(&presented));
    if let (Some(_), Ok(r)) = (cloud, &reported)
        && !r.is_empty()
        && !confirmed
    {
        eprintln!(
            "absconda: the cloud reports other keys for this VM in its {source} ({}): someone else may be answering at its address, so absconda will not trust it",
            r.join(", ")
        );
        return Some(format!(
            "do not connect until you know why: compare the keys in the VM's {source} with {fingerprint}"
        ));
    }
    if let (Some(_), Err(e)) = (cloud, &reported) {
        eprintln!("absconda: could not read the host keys the cloud reports ({source}): {e}");
    }
    let how = if confirmed {
        eprintln!("absconda: the cloud confirms this key ({source})");
        let asked = flags.trust_cloud_host_key || flags.accept_new_host_key;
        (asked
            || (interactive && yes("record it in known_hosts (it is the key the cloud reports)?")))
        .then_some("confirmed by the cloud")
    } else if flags.accept_new_host_key {
        Some("on first use, as `--accept-new-host-key` asked")
    } else if interactive
        && yes(&format!(
            "record it in known_hosts? compare it first with `ssh-keygen -lf /etc/ssh/ssh_host_{}_key.pub` on the builder",
            key_file_type(&algorithm)
        ))
    {
        Some("on first use, as you answered")
    } else {
        None
    };
    let Some(how) = how else {
        return Some(if confirmed {
            format!(
                "the cloud confirms the key: {}",
                rerun.replace("--accept-new-host-key", "--trust-cloud-host-key")
            )
        } else {
            format!(
                "if {fingerprint} is what `ssh-keygen -lf /etc/ssh/ssh_host_{}_key.pub` prints on the builder, {rerun}",
                key_file_type(&algorithm)
            )
        });
    };
    match record(ep, &known_name, &presented).await {
        Ok(()) => {
            eprintln!(
                "absconda: recorded the host key of `{known_name}` ({algorithm} {fingerprint}) in `{}`, {how}",
                known_hosts.display()
            );
            None
        }
        Err(e) => Some(format!(
            "could not record the key: {}",
            crate::util::chain(&e)
        )),
    }
}

/// `ed25519` for `ssh-ed25519`, as in `/etc/ssh/ssh_host_ed25519_key.pub`.
fn key_file_type(algorithm: &str) -> &'static str {
    let a = algorithm.to_ascii_lowercase();
    if a.contains("ed25519") {
        "ed25519"
    } else if a.contains("ecdsa") {
        "ecdsa"
    } else {
        "rsa"
    }
}

/// Connects accepting exactly `fingerprint`, and records the key under `name`.
async fn record(ep: &Endpoint, name: &str, fingerprint: &str) -> Result<(), RecordError> {
    let mut pinned = ep.clone();
    pinned.target.pin = Some(Pin::Fingerprint(fingerprint.to_string()));
    let session = crate::provisioned::connect(&pinned).await?;
    let key = session.host_key().clone();
    session.close().await;
    let path = ep.target.known_hosts.clone();
    let entry = name.to_string();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut known = KnownHosts::load(&path)?;
        if matches!(known.check(&entry, &key), Verdict::Known { .. }) {
            return Ok(());
        }
        known.record(&entry, &key)
    })
    .await
    .map_err(|e| RecordError::Io(std::io::Error::other(e)))?
    .map_err(RecordError::Io)
}

#[derive(Debug, thiserror::Error)]
enum RecordError {
    #[error("could not connect again")]
    Ssh(#[from] SshError),
    #[error("could not write known_hosts")]
    Io(#[source] std::io::Error),
}

/// A yes/no question on the terminal; no unless the answer starts with `y`.
fn yes(question: &str) -> bool {
    ask(&format!("{question} [y/N]"), "")
        .map(|a| a.trim().to_ascii_lowercase().starts_with('y'))
        .unwrap_or(false)
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
    fn label_and_tag_filters() {
        let f = Filters::parse(&["role=builder".into()], &[]).unwrap();
        assert_eq!(f.gce_filter().as_deref(), Some("labels.role = \"builder\""));
        let f = Filters::parse(&["team=ml".into(), "gpu".into()], &["Name=x y".into()]).unwrap();
        assert_eq!(
            f.gce_filter().as_deref(),
            Some("(labels.team = \"ml\") (labels.gpu:*)")
        );
        assert_eq!(f.tags, [("Name".to_string(), Some("x y".to_string()))]);
        assert_eq!(Filters::parse(&[], &[]).unwrap().gce_filter(), None);
        for bad in ["Role=x", "role=a b", "role=\"x\"", "=x", ""] {
            assert!(Filters::parse(&[bad.into()], &[]).is_err(), "{bad}");
        }
        assert!(Filters::parse(&[], &["=v".into()]).is_err());
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
