//! `absconda-remote.yaml`: raw YAML → validated [`Builder`] settings.
//!
//! Two steps, as ripgrep does with its flags: the file is parsed into plain
//! values and every key checked against the schema (unknown keys are errors
//! with a did-you-mean, keys of the Python original are accepted as aliases or
//! rejected with the native replacement), then one builder is resolved into a
//! typed [`Builder`] on demand. `${VAR}` expansion happens at that second step,
//! so a variable missing for one builder does not break the others.
//!
//! Every error names the file, the builder, the key and, where it can be
//! found, the line.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_norway::Value;

use crate::ssh::known_hosts::{HostKeyPolicy, Pin};

/// The file name absconda looks for.
pub const FILE_NAME: &str = "absconda-remote.yaml";

/// Where a setting went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub builder: Option<String>,
    pub key: Option<String>,
    pub line: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, " line {line}")?;
        }
        if let Some(b) = &self.builder {
            write!(f, ", builder `{b}`")?;
        }
        if let Some(k) = &self.key {
            write!(f, ", key `{k}`")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no `{FILE_NAME}` found (looked in: {})", searched.iter().map(|p| format!("`{}`", p.display())).collect::<Vec<_>>().join(", "))]
    NotFound { searched: Vec<PathBuf> },
    #[error("could not read `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{at}: invalid YAML: {message}")]
    Yaml { at: Location, message: String },
    #[error("{at}: unknown key{}", suggestion.as_ref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default())]
    UnknownKey {
        at: Location,
        suggestion: Option<String>,
    },
    #[error("{at}: not supported by absconda: {replacement}")]
    Rejected { at: Location, replacement: String },
    #[error("{at}: {message}")]
    Invalid { at: Location, message: String },
    #[error("{at}: environment variable `{var}` is not set")]
    MissingVar { at: Location, var: String },
    #[error("{at}: required for provider `{provider}`")]
    Missing { at: Location, provider: String },
    #[error("no builder named `{name}` in `{}`{}", file.display(), suggestion(name, available))]
    UnknownBuilder {
        file: PathBuf,
        name: String,
        available: Vec<String>,
    },
    #[error("no builder chosen: `{}` defines {} builders ({}) and no `default_builder:`", file.display(), available.len(), available.join(", "))]
    NoBuilderChosen {
        file: PathBuf,
        available: Vec<String>,
    },
}

fn suggestion(name: &str, available: &[String]) -> String {
    match did_you_mean(name, available.iter().map(String::as_str)) {
        Some(s) => format!(" (did you mean `{s}`?)"),
        None if available.is_empty() => " (it defines no builders)".into(),
        None => format!(" (it defines: {})", available.join(", ")),
    }
}

/// Which cloud a builder runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// An always-on host reached over SSH.
    Ssh,
    Gcp,
    Aws,
    Azure,
    /// AWS CodeBuild: a build service, no VM of ours.
    #[serde(rename = "codebuild")]
    CodeBuild,
    /// Google Cloud Build: a build service, no VM of ours.
    #[serde(rename = "cloudbuild")]
    CloudBuild,
}

impl ProviderKind {
    /// Whether builds run on a build service rather than on a VM over SSH.
    pub fn is_service(self) -> bool {
        matches!(self, ProviderKind::CodeBuild | ProviderKind::CloudBuild)
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProviderKind::Ssh => "ssh",
            ProviderKind::Gcp => "gcp",
            ProviderKind::Aws => "aws",
            ProviderKind::Azure => "azure",
            ProviderKind::CodeBuild => "codebuild",
            ProviderKind::CloudBuild => "cloudbuild",
        })
    }
}

/// `compression:` for the context upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionSetting {
    /// None when the builder is on loopback; else zstd when the builder has
    /// `zstd`, gzip when it has not.
    Auto,
    /// zstd, or gzip on a builder without `zstd`.
    Zstd,
    Gzip,
    None,
}

/// `buildkit:` on the builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildkitSetting {
    /// Use BuildKit when the builder's docker CLI offers it.
    Auto,
    On,
    Off,
}

/// `address:` for GCE builders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressSetting {
    External,
    Internal,
}

/// One builder, validated and with defaults applied.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Builder {
    pub name: String,
    pub provider: ProviderKind,
    /// The config file it came from (relative paths in it are relative to its folder).
    pub config_file: PathBuf,
    /// SSH address; for cloud builders it overrides the address the API reports.
    pub host: Option<String>,
    pub port: u16,
    pub user: String,
    pub identity_files: Vec<PathBuf>,
    /// OpenSSH user certificates (`certificate_file:`).
    pub certificate_files: Vec<PathBuf>,
    /// From `~/.ssh/config`: `IdentitiesOnly`, `IdentityAgent`,
    /// `ServerAliveInterval`/`ServerAliveCountMax` (seconds, count).
    pub identities_only: bool,
    pub identity_agent: Option<String>,
    pub server_alive: Option<(u64, u64)>,
    pub known_hosts: PathBuf,
    pub host_key_policy: HostKeyPolicy,
    #[serde(skip)]
    pub host_key: Option<Pin>,
    pub host_key_alias: Option<String>,
    /// The HTTP CONNECT or SOCKS5 proxy SSH goes through (password hidden when shown).
    pub proxy: Option<crate::ssh::proxy::Proxy>,
    /// Jump hosts, in order, before the builder.
    pub jump: Vec<crate::ssh::jump::JumpHost>,
    pub workspace: String,
    /// How much of the builder's disk the content store and the context
    /// copies may take (`cache_max:`, default 20 % of the filesystem).
    pub cache_max: crate::sync::store::CacheMax,
    /// Copies and content unused this long go (`cache_ttl:`, default 30 days).
    #[serde(with = "secs")]
    pub cache_ttl: Duration,
    pub docker: String,
    pub compression: CompressionSetting,
    /// A cold send is fed to `docker build` while the builder unpacks it
    /// (`stream_cold:`, default false; `--no-cache` builds always do): the
    /// layers such a build leaves are not reused by later builds from the
    /// copy, whose context is a folder rather than an archive.
    pub stream_cold: bool,
    /// Channels that carry a large upload of new content at once
    /// (`upload_channels:`, 1 to 16; `None`: 4, or 1 to a builder on
    /// loopback). Each SSH channel may have only the window sshd grants it
    /// in flight (2 MiB for OpenSSH), which holds one channel to 2 MiB a
    /// round trip on a long link.
    pub upload_channels: Option<u8>,
    pub buildkit: BuildkitSetting,
    /// Where `--secret` values are stored during a build; `None`: a tmpfs
    /// (`/dev/shm` or `$XDG_RUNTIME_DIR`), refusing disk-backed folders.
    pub secret_dir: Option<String>,
    #[serde(with = "secs")]
    pub timeout: Duration,
    #[serde(with = "secs")]
    pub connect_timeout: Duration,
    #[serde(with = "secs")]
    pub ready_timeout: Duration,
    pub auto_start: bool,
    pub auto_stop: bool,
    #[serde(with = "secs")]
    pub stop_delay: Duration,
    pub poweroff_command: String,
    // Cloud identity.
    pub project: Option<String>,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub instance: Option<String>,
    pub instance_id: Option<String>,
    pub api_endpoint: Option<String>,
    /// The metadata server as the builder itself reaches it, for the
    /// self-stop's identity check.
    pub metadata_endpoint: Option<String>,
    pub address: AddressSetting,
    pub profile: Option<String>,
    /// How the SSH key reaches the builder (`access:`) and where those APIs are.
    pub access: crate::access::AccessSetting,
    pub oslogin_endpoint: Option<String>,
    pub instance_connect_endpoint: Option<String>,
    /// How SSH reaches a cloud builder without a reachable address
    /// (`tunnel: iap` for gcp, `eice` for aws), and where those services are.
    pub tunnel: Option<Tunnel>,
    pub iap_endpoint: Option<String>,
    pub eice_endpoint: Option<String>,
    /// Extra CA certificates (PEM) trusted by the cloud API clients.
    pub ca_file: Option<PathBuf>,
    // Provisioning (Terraform) and cost.
    pub terraform_dir: Option<PathBuf>,
    pub machine_type: Option<String>,
    pub instance_type: Option<String>,
    pub disk_size: Option<u64>,
    pub spot: bool,
    pub allowed_ssh_cidr: Vec<String>,
    pub idle_shutdown_minutes: Option<u64>,
    pub hourly_cost: Option<f64>,
    /// The platform its docker builds natively (`platform:`); `None`: asked
    /// from the builder's docker when a build needs to know.
    pub platform: Option<crate::platform::Platform>,
    // Azure identity: the VM `vm_name` in `resource_group` of `subscription_id`,
    // with tokens from `authority_host` (Microsoft Entra ID).
    pub subscription_id: Option<String>,
    pub resource_group: Option<String>,
    pub vm_name: Option<String>,
    pub authority_host: Option<String>,
    // Build services (`provider: codebuild` or `cloudbuild`).
    /// The S3 or GCS bucket the context is uploaded to.
    pub bucket: Option<String>,
    /// The CodeBuild project whose environment and role run the builds.
    pub codebuild_project: Option<String>,
    /// CodeBuild: the Secrets Manager secret (name or ARN) with `username`
    /// and `password` keys for a registry that is not ECR.
    pub registry_secret: Option<String>,
    /// CodeBuild: the CloudWatch Logs group of the builds.
    pub log_group: Option<String>,
    /// Cloud Build: the Cloud Storage JSON API endpoint.
    pub storage_endpoint: Option<String>,
    /// US dollars per billed build minute, for `remote metrics`.
    pub build_minute_cost: Option<f64>,
}

mod secs {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
}

/// `tunnel:` — the cloud service that carries SSH to the builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tunnel {
    /// Google's Identity-Aware Proxy TCP forwarding.
    Iap,
    /// EC2 Instance Connect Endpoint.
    Eice,
}

/// The value types keys can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Int,
    Bool,
    Float,
    StrList,
}

/// Keys a builder accepts, with their type.
const BUILDER_KEYS: &[(&str, Kind)] = &[
    ("provider", Kind::Str),
    ("host", Kind::Str),
    ("port", Kind::Int),
    ("user", Kind::Str),
    ("identity_file", Kind::StrList),
    ("certificate_file", Kind::StrList),
    ("known_hosts", Kind::Str),
    ("host_key_policy", Kind::Str),
    ("host_key", Kind::Str),
    ("host_key_alias", Kind::Str),
    ("proxy", Kind::Str),
    ("jump", Kind::StrList),
    ("ssh_config", Kind::Str),
    ("workspace", Kind::Str),
    ("cache_max", Kind::Str),
    ("cache_ttl", Kind::Str),
    ("docker", Kind::Str),
    ("compression", Kind::Str),
    ("stream_cold", Kind::Bool),
    ("upload_channels", Kind::Int),
    ("buildkit", Kind::Str),
    ("secret_dir", Kind::Str),
    ("timeout", Kind::Int),
    ("connect_timeout", Kind::Int),
    ("ready_timeout", Kind::Int),
    ("auto_start", Kind::Bool),
    ("auto_stop", Kind::Bool),
    ("stop_delay", Kind::Int),
    ("poweroff_command", Kind::Str),
    ("project", Kind::Str),
    ("region", Kind::Str),
    ("zone", Kind::Str),
    ("instance", Kind::Str),
    ("instance_id", Kind::Str),
    ("api_endpoint", Kind::Str),
    ("metadata_endpoint", Kind::Str),
    ("address", Kind::Str),
    ("profile", Kind::Str),
    ("access", Kind::Str),
    ("oslogin_endpoint", Kind::Str),
    ("instance_connect_endpoint", Kind::Str),
    ("tunnel", Kind::Str),
    ("iap_endpoint", Kind::Str),
    ("eice_endpoint", Kind::Str),
    ("ca_file", Kind::Str),
    ("terraform_dir", Kind::Str),
    ("machine_type", Kind::Str),
    ("instance_type", Kind::Str),
    ("disk_size", Kind::Int),
    ("spot", Kind::Bool),
    ("allowed_ssh_cidr", Kind::StrList),
    ("idle_shutdown_minutes", Kind::Int),
    ("hourly_cost", Kind::Float),
    ("platform", Kind::Str),
    ("subscription_id", Kind::Str),
    ("resource_group", Kind::Str),
    ("vm_name", Kind::Str),
    ("authority_host", Kind::Str),
    ("bucket", Kind::Str),
    ("codebuild_project", Kind::Str),
    ("registry_secret", Kind::Str),
    ("log_group", Kind::Str),
    ("storage_endpoint", Kind::Str),
    ("build_minute_cost", Kind::Float),
];

/// Keys `defaults:` accepts: everything that is not a builder's identity.
const DEFAULT_KEYS: &[&str] = &[
    "port",
    "user",
    "identity_file",
    "certificate_file",
    "known_hosts",
    "host_key_policy",
    "proxy",
    "jump",
    "ssh_config",
    "workspace",
    "cache_max",
    "cache_ttl",
    "docker",
    "compression",
    "stream_cold",
    "upload_channels",
    "buildkit",
    "secret_dir",
    "timeout",
    "connect_timeout",
    "ready_timeout",
    "auto_start",
    "auto_stop",
    "stop_delay",
    "poweroff_command",
    "region",
    "zone",
    "project",
    "profile",
    "access",
    "machine_type",
    "instance_type",
    "disk_size",
    "spot",
    "allowed_ssh_cidr",
    "idle_shutdown_minutes",
    "subscription_id",
    "resource_group",
    "authority_host",
    "ca_file",
];

/// The Python original's spellings, accepted as aliases.
const ALIASES: &[(&str, &str)] = &[
    ("ssh_host", "host"),
    ("ssh_user", "user"),
    ("ssh_key", "identity_file"),
    ("ssh_port", "port"),
];

/// Keys of the Python original that drove external programs; each has a native replacement.
fn rejected(key: &str) -> Option<String> {
    if key == "ssh_options" {
        return Some(
            "absconda has its own SSH client and reads no OpenSSH options; use `port`, `user`, `identity_file`, `known_hosts`, `host_key_policy` (strict or accept-new), `host_key` (a pinned `SHA256:` fingerprint) or `host_key_alias`, and `connect_timeout`".into(),
        );
    }
    if key.ends_with("_command") && key != "poweroff_command" {
        return Some(format!(
            "`{key}` ran an external program; absconda does this natively: set `provider` (ssh, gcp or aws) with `project`/`zone`/`instance` (gcp) or `region`/`instance_id` (aws) and it calls the cloud API itself, and `docker` names the docker CLI on the builder"
        ));
    }
    None
}

/// The parsed file: raw values per builder, keys already checked.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    text: String,
    builders: BTreeMap<String, BTreeMap<String, Value>>,
    order: Vec<String>,
    defaults: BTreeMap<String, Value>,
    default_builder: Option<String>,
    pools: BTreeMap<String, Pool>,
}

/// How a pool picks among its free builders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Prefer {
    /// The builder that holds this context's copy, then any idle one.
    Affinity,
    /// Any idle builder, in the pool's order.
    Idle,
    /// The cheapest by `hourly_cost` (builders without one come last).
    Cheapest,
}

/// Where a multi-platform build writes its image index from (`index_from:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IndexFrom {
    /// This machine, else, when it cannot reach the registry, a builder.
    Auto,
    /// This machine only.
    Client,
    /// A builder that built a platform, through its SSH connection.
    Builder,
}

/// Several builders behind one name (`pools:`).
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub name: String,
    /// Builder names, in the order the file gives them.
    pub members: Vec<String>,
    /// How many of the pool's cloud VMs may run at once; absconda starts a
    /// stopped one only below this. `None`: as many as there are.
    pub max_running: Option<usize>,
    pub prefer: Prefer,
    /// Whether a platform no member has is built on another member with
    /// its docker's emulation (`--platform`, QEMU for `RUN` steps).
    pub emulate: bool,
    pub index_from: IndexFrom,
    /// A build service (`provider: codebuild` or `cloudbuild`) that takes
    /// the build when every member is busy, instead of waiting.
    pub overflow: Option<String>,
}

/// Finds the config file: `--remote-config`, `$ABSCONDA_REMOTE_CONFIG`, the
/// current folder and its parents, then `$XDG_CONFIG_HOME/absconda/`.
pub fn discover(explicit: Option<&Path>) -> Result<PathBuf, ConfigError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ABSCONDA_REMOTE_CONFIG").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let mut searched = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        for dir in cwd.ancestors() {
            let p = dir.join(FILE_NAME);
            if p.is_file() {
                return Ok(p);
            }
            searched.push(p);
        }
    }
    let xdg = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    if let Some(x) = xdg {
        let p = x.join("absconda").join(FILE_NAME);
        if p.is_file() {
            return Ok(p);
        }
        searched.push(p);
    }
    Err(ConfigError::NotFound { searched })
}

/// Discovers and loads the config.
pub fn load(explicit: Option<&Path>) -> Result<ConfigFile, ConfigError> {
    let path = discover(explicit)?;
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    ConfigFile::parse(&path, &text)
}

impl ConfigFile {
    /// Parses and checks every key; builders are resolved later with [`ConfigFile::builder`].
    pub fn parse(path: &Path, text: &str) -> Result<ConfigFile, ConfigError> {
        let at = |builder: Option<&str>, key: Option<&str>, line: Option<usize>| Location {
            file: path.to_path_buf(),
            builder: builder.map(str::to_string),
            key: key.map(str::to_string),
            line,
        };
        crate::yaml::check_depth(text).map_err(|e| ConfigError::Yaml {
            at: at(None, None, Some(e.line)),
            message: e.to_string(),
        })?;
        let root: Value = serde_norway::from_str(text).map_err(|e| ConfigError::Yaml {
            at: at(None, None, e.location().map(|l| l.line())),
            message: strip_location(&e.to_string()),
        })?;
        let mut file = ConfigFile {
            path: path.to_path_buf(),
            text: text.to_string(),
            builders: BTreeMap::new(),
            order: Vec::new(),
            defaults: BTreeMap::new(),
            default_builder: None,
            pools: BTreeMap::new(),
        };
        let root = match root {
            Value::Mapping(m) => m,
            Value::Null => return Ok(file),
            _ => {
                return Err(ConfigError::Invalid {
                    at: at(None, None, Some(1)),
                    message:
                        "the file must be a mapping with `builders:` and optionally `defaults:`"
                            .into(),
                });
            }
        };
        let mut pools = None;
        for (k, v) in root {
            let key = key_str(&k).ok_or_else(|| ConfigError::Invalid {
                at: at(None, None, None),
                message: "top-level keys must be strings".into(),
            })?;
            match key.as_str() {
                "builders" => {
                    let map = match v {
                        Value::Mapping(m) => m,
                        Value::Null => continue,
                        _ => {
                            return Err(ConfigError::Invalid {
                                at: at(None, Some("builders"), file.line_of(&["builders"])),
                                message: "`builders` must map builder names to their settings"
                                    .into(),
                            });
                        }
                    };
                    for (name, settings) in map {
                        let name = key_str(&name).ok_or_else(|| ConfigError::Invalid {
                            at: at(None, Some("builders"), file.line_of(&["builders"])),
                            message: "builder names must be strings".into(),
                        })?;
                        let values = file.check_keys(Some(&name), settings, false)?;
                        file.order.push(name.clone());
                        file.builders.insert(name, values);
                    }
                }
                "defaults" => {
                    file.defaults = file.check_keys(None, v, true)?;
                }
                "pools" => pools = Some(v),
                "default_builder" => match v {
                    Value::String(name) => file.default_builder = Some(name),
                    Value::Null => {}
                    _ => {
                        return Err(ConfigError::Invalid {
                            at: at(
                                None,
                                Some("default_builder"),
                                file.line_of(&["default_builder"]),
                            ),
                            message: "`default_builder` must be the name of a builder".into(),
                        });
                    }
                },
                other => {
                    return Err(ConfigError::UnknownKey {
                        at: at(None, Some(other), file.line_of(&[other])),
                        suggestion: did_you_mean(
                            other,
                            ["builders", "defaults", "default_builder", "pools"].into_iter(),
                        ),
                    });
                }
            }
        }
        if let Some(v) = pools {
            file.pools = file.parse_pools(v)?;
        }
        Ok(file)
    }

    fn pool_location(&self, pool: Option<&str>, key: Option<&str>) -> Location {
        let mut path = vec!["pools"];
        path.extend(pool);
        path.extend(key);
        Location {
            file: self.path.clone(),
            builder: None,
            key: Some(match (pool, key) {
                (Some(p), Some(k)) => format!("pools.{p}.{k}"),
                (Some(p), None) => format!("pools.{p}"),
                _ => "pools".into(),
            }),
            line: self.line_of(&path),
        }
    }

    /// `pools: {NAME: {builders: [...], max_running: N, prefer: ..., emulate: B, index_from: ...}}`.
    fn parse_pools(&self, v: Value) -> Result<BTreeMap<String, Pool>, ConfigError> {
        let invalid =
            |pool: Option<&str>, key: Option<&str>, message: String| ConfigError::Invalid {
                at: self.pool_location(pool, key),
                message,
            };
        let map = match v {
            Value::Mapping(m) => m,
            Value::Null => return Ok(BTreeMap::new()),
            _ => {
                return Err(invalid(
                    None,
                    None,
                    "`pools` must map pool names to their settings".into(),
                ));
            }
        };
        let mut pools = BTreeMap::new();
        for (name, settings) in map {
            let name = key_str(&name)
                .ok_or_else(|| invalid(None, None, "pool names must be strings".into()))?;
            if self.builders.contains_key(&name) {
                return Err(invalid(
                    Some(&name),
                    None,
                    format!("`{name}` names both a builder and a pool: rename one"),
                ));
            }
            let Value::Mapping(settings) = settings else {
                return Err(invalid(
                    Some(&name),
                    None,
                    "expected `builders:` and optionally `max_running:`, `prefer:`, `emulate:` and `index_from:`".into(),
                ));
            };
            let mut pool = Pool {
                name: name.clone(),
                members: Vec::new(),
                max_running: None,
                prefer: Prefer::Affinity,
                emulate: false,
                index_from: IndexFrom::Auto,
                overflow: None,
            };
            for (k, v) in settings {
                let key = key_str(&k).unwrap_or_default();
                match key.as_str() {
                    "builders" => {
                        let Value::Sequence(items) = v else {
                            return Err(invalid(
                                Some(&name),
                                Some("builders"),
                                "expected a list of builder names".into(),
                            ));
                        };
                        for item in items {
                            let Some(member) = key_str(&item) else {
                                return Err(invalid(
                                    Some(&name),
                                    Some("builders"),
                                    "expected a list of builder names".into(),
                                ));
                            };
                            if !self.builders.contains_key(&member) {
                                return Err(invalid(
                                    Some(&name),
                                    Some("builders"),
                                    format!(
                                        "no builder named `{member}`{}",
                                        suggestion(&member, &self.order)
                                    ),
                                ));
                            }
                            if self
                                .builders
                                .get(&member)
                                .and_then(|raw| raw.get("provider"))
                                .and_then(Value::as_str)
                                .is_some_and(|p| p == "codebuild" || p == "cloudbuild")
                            {
                                return Err(invalid(
                                    Some(&name),
                                    Some("builders"),
                                    format!(
                                        "`{member}` is a build service: name it as the pool's `overflow:` instead"
                                    ),
                                ));
                            }
                            if pool.members.contains(&member) {
                                return Err(invalid(
                                    Some(&name),
                                    Some("builders"),
                                    format!("`{member}` is listed twice"),
                                ));
                            }
                            pool.members.push(member);
                        }
                    }
                    "max_running" => match v.as_u64() {
                        Some(n) if n >= 1 => pool.max_running = Some(n as usize),
                        _ => {
                            return Err(invalid(
                                Some(&name),
                                Some("max_running"),
                                "expected a whole number of at least 1".into(),
                            ));
                        }
                    },
                    "prefer" => {
                        pool.prefer = match v.as_str() {
                            Some("affinity") => Prefer::Affinity,
                            Some("idle") => Prefer::Idle,
                            Some("cheapest") => Prefer::Cheapest,
                            _ => {
                                return Err(invalid(
                                    Some(&name),
                                    Some("prefer"),
                                    "expected `affinity`, `idle` or `cheapest`".into(),
                                ));
                            }
                        }
                    }
                    "emulate" => {
                        pool.emulate = v.as_bool().ok_or_else(|| {
                            invalid(
                                Some(&name),
                                Some("emulate"),
                                "expected `true` or `false`".into(),
                            )
                        })?;
                    }
                    "index_from" => {
                        pool.index_from = match v.as_str() {
                            Some("auto") => IndexFrom::Auto,
                            Some("client") => IndexFrom::Client,
                            Some("builder") => IndexFrom::Builder,
                            _ => {
                                return Err(invalid(
                                    Some(&name),
                                    Some("index_from"),
                                    "expected `auto`, `client` or `builder`".into(),
                                ));
                            }
                        }
                    }
                    "overflow" => {
                        let service = key_str(&v).filter(|b| {
                            self.builders
                                .get(b)
                                .and_then(|raw| raw.get("provider"))
                                .and_then(Value::as_str)
                                .is_some_and(|p| p == "codebuild" || p == "cloudbuild")
                        });
                        let Some(service) = service else {
                            return Err(invalid(
                                Some(&name),
                                Some("overflow"),
                                "expected the name of a builder with `provider: codebuild` or `provider: cloudbuild`".into(),
                            ));
                        };
                        pool.overflow = Some(service);
                    }
                    other => {
                        return Err(ConfigError::UnknownKey {
                            at: self.pool_location(Some(&name), Some(other)),
                            suggestion: did_you_mean(
                                other,
                                [
                                    "builders",
                                    "max_running",
                                    "prefer",
                                    "emulate",
                                    "index_from",
                                    "overflow",
                                ]
                                .into_iter(),
                            ),
                        });
                    }
                }
            }
            if pool.members.is_empty() {
                return Err(invalid(
                    Some(&name),
                    Some("builders"),
                    "a pool needs at least one builder".into(),
                ));
            }
            pools.insert(name, pool);
        }
        Ok(pools)
    }

    fn location(&self, builder: Option<&str>, key: Option<&str>) -> Location {
        let line = match (builder, key) {
            (Some(b), Some(k)) => self.line_of(&["builders", b, k]),
            (Some(b), None) => self.line_of(&["builders", b]),
            (None, Some(k)) => self.line_of(&["defaults", k]),
            (None, None) => None,
        };
        Location {
            file: self.path.clone(),
            builder: builder.map(str::to_string),
            key: key.map(str::to_string),
            line,
        }
    }

    fn check_keys(
        &self,
        builder: Option<&str>,
        settings: Value,
        is_defaults: bool,
    ) -> Result<BTreeMap<String, Value>, ConfigError> {
        let map = match settings {
            Value::Mapping(m) => m,
            Value::Null => return Ok(BTreeMap::new()),
            _ => {
                return Err(ConfigError::Invalid {
                    at: self.location(builder, None),
                    message: "expected a mapping of settings".into(),
                });
            }
        };
        let mut out = BTreeMap::new();
        for (k, v) in map {
            let raw_key = key_str(&k).unwrap_or_default();
            let at = if is_defaults {
                Location {
                    key: Some(raw_key.clone()),
                    ..self.location(None, Some(&raw_key))
                }
            } else {
                self.location(builder, Some(&raw_key))
            };
            if let Some(replacement) = rejected(&raw_key) {
                return Err(ConfigError::Rejected { at, replacement });
            }
            let key = ALIASES
                .iter()
                .find(|(alias, _)| *alias == raw_key)
                .map(|(_, canon)| canon.to_string())
                .unwrap_or(raw_key.clone());
            let allowed = if is_defaults {
                DEFAULT_KEYS.contains(&key.as_str())
            } else {
                BUILDER_KEYS.iter().any(|(k, _)| *k == key)
            };
            if !allowed {
                let names: Vec<&str> = if is_defaults {
                    DEFAULT_KEYS.to_vec()
                } else {
                    BUILDER_KEYS.iter().map(|(k, _)| *k).collect()
                };
                let suggestion = did_you_mean(&key, names.into_iter()).or_else(|| {
                    (is_defaults && BUILDER_KEYS.iter().any(|(k, _)| *k == key))
                        .then(|| format!("{key}` belongs in a builder, not in `defaults"))
                });
                return Err(ConfigError::UnknownKey { at, suggestion });
            }
            if out.insert(key.clone(), v).is_some() {
                return Err(ConfigError::Invalid {
                    at,
                    message: format!("`{key}` is given twice (once through an alias)"),
                });
            }
        }
        Ok(out)
    }

    /// Builder names in file order.
    pub fn names(&self) -> &[String] {
        &self.order
    }

    /// The pool of that name, if `pools:` defines one.
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.get(name)
    }

    /// Pool names, sorted.
    pub fn pool_names(&self) -> Vec<String> {
        self.pools.keys().cloned().collect()
    }

    /// Builder and pool names: what `--remote-builder` accepts.
    fn choices(&self) -> Vec<String> {
        let mut all = self.order.clone();
        all.extend(self.pools.keys().cloned());
        all
    }

    /// The builder to use when none is named: `default_builder:`, else the
    /// only one. Returns the name and why it was chosen.
    pub fn default_builder(&self) -> Result<(String, &'static str), ConfigError> {
        if let Some(name) = &self.default_builder {
            if !self.builders.contains_key(name) && !self.pools.contains_key(name) {
                return Err(ConfigError::UnknownBuilder {
                    file: self.path.clone(),
                    name: name.clone(),
                    available: self.choices(),
                });
            }
            return Ok((name.clone(), "`default_builder:`"));
        }
        match self.order.as_slice() {
            [only] => Ok((only.clone(), "the only builder")),
            _ => Err(ConfigError::NoBuilderChosen {
                file: self.path.clone(),
                available: self.order.clone(),
            }),
        }
    }

    /// Resolves one builder: expands variables, checks types, applies defaults.
    pub fn builder(&self, name: &str) -> Result<Builder, ConfigError> {
        let raw = self
            .builders
            .get(name)
            .ok_or_else(|| ConfigError::UnknownBuilder {
                file: self.path.clone(),
                name: name.to_string(),
                available: self.choices(),
            })?;
        let r = Resolver {
            file: self,
            name,
            raw,
        };
        let provider = match r.string("provider")?.as_deref() {
            None | Some("ssh") => ProviderKind::Ssh,
            Some("gcp") | Some("gce") => ProviderKind::Gcp,
            Some("aws") | Some("ec2") => ProviderKind::Aws,
            Some("azure") | Some("az") => ProviderKind::Azure,
            Some("codebuild") => ProviderKind::CodeBuild,
            Some("cloudbuild") => ProviderKind::CloudBuild,
            Some(other) => {
                return Err(r.invalid(
                    "provider",
                    format!("unknown provider `{other}`: use `ssh`, `gcp`, `aws`, `azure`, `codebuild` or `cloudbuild`"),
                ));
            }
        };
        let cloud = provider != ProviderKind::Ssh;
        let base = self.path.parent().unwrap_or(Path::new("."));
        let local_path = |p: String| -> PathBuf { expand_path(&p, base) };

        let host = r.string("host")?;
        if provider == ProviderKind::Ssh && host.is_none() && r.string("terraform_dir")?.is_none() {
            return Err(ConfigError::Missing {
                at: self.location(Some(name), Some("host")),
                provider: provider.to_string(),
            });
        }
        // A builder made by `absconda remote provision` learns its instance
        // from Terraform's outputs.
        let provisioned = r.string("terraform_dir")?.is_some();
        match provider {
            ProviderKind::Gcp => {
                for key in ["project", "zone", "instance"] {
                    if r.string(key)?.is_none() && !(provisioned && key == "instance") {
                        return Err(ConfigError::Missing {
                            at: Location {
                                key: Some(key.into()),
                                ..self.location(Some(name), None)
                            },
                            provider: "gcp".into(),
                        });
                    }
                }
            }
            ProviderKind::Aws => {
                if r.string("instance_id")?.is_none()
                    && r.string("instance")?.is_none()
                    && !provisioned
                {
                    return Err(ConfigError::Missing {
                        at: Location {
                            key: Some("instance_id` or `instance".into()),
                            ..self.location(Some(name), None)
                        },
                        provider: "aws".into(),
                    });
                }
            }
            ProviderKind::Azure => {
                for key in ["subscription_id", "resource_group", "vm_name"] {
                    if r.string(key)?.is_none() && !(provisioned && key == "vm_name") {
                        return Err(ConfigError::Missing {
                            at: Location {
                                key: Some(key.into()),
                                ..self.location(Some(name), None)
                            },
                            provider: "azure".into(),
                        });
                    }
                }
            }
            ProviderKind::CodeBuild | ProviderKind::CloudBuild => {
                let keys: &[&str] = if provider == ProviderKind::CodeBuild {
                    &["bucket", "codebuild_project"]
                } else {
                    &["bucket", "project"]
                };
                for key in keys {
                    if r.string(key)?.is_none() {
                        return Err(ConfigError::Missing {
                            at: Location {
                                key: Some((*key).into()),
                                ..self.location(Some(name), None)
                            },
                            provider: provider.to_string(),
                        });
                    }
                }
            }
            ProviderKind::Ssh => {}
        }

        let policy = match r.string("host_key_policy")?.as_deref() {
            None | Some("strict") | Some("yes") => HostKeyPolicy::Strict,
            Some("accept-new") => HostKeyPolicy::AcceptNew,
            Some(other) => {
                return Err(r.invalid(
                    "host_key_policy",
                    format!(
                        "`{other}` is not a policy: use `strict` (the default) or `accept-new`; host key checking cannot be turned off — pin a key with `host_key: SHA256:…` instead"
                    ),
                ));
            }
        };
        let host_key = match r.string("host_key")? {
            Some(s) => Some(Pin::parse(&s).map_err(|m| r.invalid("host_key", m))?),
            None => None,
        };
        let compression = match r.string("compression")?.as_deref() {
            None | Some("auto") => CompressionSetting::Auto,
            Some("zstd") => CompressionSetting::Zstd,
            Some("gzip") => CompressionSetting::Gzip,
            Some("none") => CompressionSetting::None,
            Some(o) => {
                return Err(r.invalid(
                    "compression",
                    format!("`{o}`: use `auto`, `zstd`, `gzip` or `none`"),
                ));
            }
        };
        let upload_channels = match r.int("upload_channels")? {
            None => None,
            Some(n @ 1..=16) => Some(n as u8),
            Some(n) => {
                return Err(r.invalid(
                    "upload_channels",
                    format!(
                        "`{n}`: give from 1 to 16 channels (leave it out for 4, or 1 on loopback)"
                    ),
                ));
            }
        };
        let buildkit = match r.value("buildkit")? {
            None => BuildkitSetting::Auto,
            Some(Value::Bool(true)) => BuildkitSetting::On,
            Some(Value::Bool(false)) => BuildkitSetting::Off,
            Some(_) => match r.string("buildkit")?.as_deref() {
                Some("auto") => BuildkitSetting::Auto,
                Some("on") => BuildkitSetting::On,
                Some("off") => BuildkitSetting::Off,
                o => {
                    return Err(r.invalid(
                        "buildkit",
                        format!("`{}`: use `auto`, `on` or `off`", o.unwrap_or_default()),
                    ));
                }
            },
        };
        let address = match r.string("address")?.as_deref() {
            None | Some("external") => AddressSetting::External,
            Some("internal") => AddressSetting::Internal,
            Some(o) => {
                return Err(r.invalid("address", format!("`{o}`: use `external` or `internal`")));
            }
        };
        let port = r.int("port")?.unwrap_or(22);
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| r.invalid("port", format!("{port} is not a TCP port")))?;
        let user = match r.string("user")? {
            Some(u) => u,
            None => std::env::var("USER").unwrap_or_else(|_| "root".into()),
        };
        let known_hosts = r
            .string("known_hosts")?
            .map(&local_path)
            .unwrap_or_else(|| expand_path("~/.ssh/known_hosts", base));
        let proxy = match r.string("proxy")?.as_deref() {
            None | Some("none") => None,
            Some("env") => {
                // Only when asked: `ALL_PROXY` is often set for other tools.
                let url = ["ALL_PROXY", "all_proxy"]
                    .iter()
                    .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
                    .ok_or_else(|| {
                        r.invalid(
                            "proxy",
                            "`env` takes the proxy from `ALL_PROXY`, which is not set".into(),
                        )
                    })?;
                Some(
                    crate::ssh::proxy::Proxy::parse(&url)
                        .map_err(|m| r.invalid("proxy", format!("`ALL_PROXY`: {m}")))?,
                )
            }
            Some(url) => {
                Some(crate::ssh::proxy::Proxy::parse(url).map_err(|m| r.invalid("proxy", m))?)
            }
        };
        let jump = r
            .list("jump")?
            .iter()
            .flat_map(|s| s.split(','))
            .map(crate::ssh::jump::JumpHost::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| r.invalid("jump", m))?;
        let secs = |key: &str, default: u64| -> Result<Duration, ConfigError> {
            Ok(Duration::from_secs(r.int(key)?.unwrap_or(default)))
        };
        let b = Builder {
            name: name.to_string(),
            provider,
            config_file: self.path.clone(),
            host,
            port,
            user,
            identity_files: r
                .list("identity_file")?
                .into_iter()
                .map(&local_path)
                .collect(),
            certificate_files: r
                .list("certificate_file")?
                .into_iter()
                .map(&local_path)
                .collect(),
            identities_only: false,
            identity_agent: None,
            server_alive: None,
            known_hosts,
            host_key_policy: policy,
            host_key,
            host_key_alias: r.string("host_key_alias")?,
            proxy,
            jump,
            workspace: r
                .string("workspace")?
                .unwrap_or_else(|| "/var/lib/absconda".into()),
            cache_max: match r.string("cache_max")? {
                None => crate::sync::store::CacheMax::default(),
                Some(v) => crate::sync::store::CacheMax::parse(&v)
                    .map_err(|m| r.invalid("cache_max", m))?,
            },
            cache_ttl: match r.string("cache_ttl")? {
                None => crate::sync::store::DEFAULT_TTL,
                Some(v) => {
                    crate::sync::store::parse_ttl(&v).map_err(|m| r.invalid("cache_ttl", m))?
                }
            },
            docker: r.string("docker")?.unwrap_or_else(|| "docker".into()),
            compression,
            stream_cold: r.bool("stream_cold")?.unwrap_or(false),
            upload_channels,
            buildkit,
            secret_dir: r.string("secret_dir")?,
            timeout: secs("timeout", 3600)?,
            connect_timeout: secs("connect_timeout", 15)?,
            ready_timeout: secs("ready_timeout", 300)?,
            auto_start: r.bool("auto_start")?.unwrap_or(cloud),
            auto_stop: r.bool("auto_stop")?.unwrap_or(false),
            stop_delay: secs("stop_delay", 300)?,
            poweroff_command: r
                .string("poweroff_command")?
                .unwrap_or_else(|| "sudo poweroff".into()),
            project: r.string("project")?,
            region: r.string("region")?,
            zone: r.string("zone")?,
            instance: r.string("instance")?,
            instance_id: r.string("instance_id")?,
            api_endpoint: r.string("api_endpoint")?,
            metadata_endpoint: r.string("metadata_endpoint")?,
            address,
            profile: r.string("profile")?,
            access: match r.string("access")? {
                None => crate::access::AccessSetting::default_for(provider),
                Some(v) => crate::access::AccessSetting::parse(&v, provider)
                    .map_err(|m| r.invalid("access", m))?,
            },
            oslogin_endpoint: r.string("oslogin_endpoint")?,
            instance_connect_endpoint: r.string("instance_connect_endpoint")?,
            tunnel: match r.string("tunnel")?.as_deref() {
                None | Some("none") => None,
                Some("iap") if provider == ProviderKind::Gcp => Some(Tunnel::Iap),
                Some("eice") if provider == ProviderKind::Aws => Some(Tunnel::Eice),
                Some(v @ ("iap" | "eice")) => {
                    return Err(r.invalid(
                        "tunnel",
                        format!(
                            "`{v}` is only for {} builders",
                            if v == "iap" { "gcp" } else { "aws" }
                        ),
                    ));
                }
                Some(other) => {
                    return Err(r.invalid(
                        "tunnel",
                        format!(
                            "`{other}`: use `iap` (gcp builders), `eice` (aws builders) or `none`"
                        ),
                    ));
                }
            },
            iap_endpoint: r.string("iap_endpoint")?,
            eice_endpoint: r.string("eice_endpoint")?,
            ca_file: r.string("ca_file")?.map(&local_path),
            terraform_dir: r.string("terraform_dir")?.map(&local_path),
            machine_type: r.string("machine_type")?,
            instance_type: r.string("instance_type")?,
            disk_size: r.int("disk_size")?,
            spot: r.bool("spot")?.unwrap_or(false),
            allowed_ssh_cidr: r.list("allowed_ssh_cidr")?,
            idle_shutdown_minutes: r.int("idle_shutdown_minutes")?,
            hourly_cost: r.float("hourly_cost")?,
            platform: match r.string("platform")? {
                Some(p) => Some(
                    crate::platform::Platform::parse(&p).map_err(|m| r.invalid("platform", m))?,
                ),
                None => None,
            },
            subscription_id: r.string("subscription_id")?,
            resource_group: r.string("resource_group")?,
            vm_name: r.string("vm_name")?,
            authority_host: r.string("authority_host")?,
            bucket: r.string("bucket")?,
            codebuild_project: r.string("codebuild_project")?,
            registry_secret: r.string("registry_secret")?,
            log_group: r.string("log_group")?,
            storage_endpoint: r.string("storage_endpoint")?,
            build_minute_cost: r.float("build_minute_cost")?,
        };
        let mut b = b;
        if provider == ProviderKind::Ssh {
            let ssh_config = match r.value("ssh_config")? {
                Some(Value::Bool(false)) => None,
                Some(Value::Bool(true)) | None => Some(expand_path("~/.ssh/config", base)),
                Some(_) => r.string("ssh_config")?.map(&local_path),
            };
            if let Some(path) = ssh_config {
                let explicit = crate::builder_ssh::Explicit {
                    port: r.value("port")?.is_some(),
                    user: r.value("user")?.is_some(),
                    identity_file: !r.list("identity_file")?.is_empty(),
                    certificate_file: !r.list("certificate_file")?.is_empty(),
                    known_hosts: r.value("known_hosts")?.is_some(),
                    host_key_policy: r.value("host_key_policy")?.is_some(),
                    connect_timeout: r.value("connect_timeout")?.is_some(),
                    jump: !b.jump.is_empty(),
                };
                crate::builder_ssh::apply(&mut b, &path, &explicit)
                    .map_err(|e| r.invalid("ssh_config", e.to_string()))?;
            }
        }
        if b.workspace.is_empty() || b.workspace.contains('\0') {
            return Err(r.invalid("workspace", "must be a non-empty path".into()));
        }
        Ok(b)
    }

    /// The 1-based line of a nested key, found by indentation.
    fn line_of(&self, path: &[&str]) -> Option<usize> {
        let lines: Vec<&str> = self.text.lines().collect();
        let mut start = 0;
        let mut parent_indent: isize = -1;
        let mut found = None;
        for key in path {
            let mut hit = None;
            for (i, line) in lines.iter().enumerate().skip(start) {
                let trimmed = line.trim_start();
                if trimmed.is_empty() || trimmed.starts_with('#') {
                    continue;
                }
                let indent = (line.len() - trimmed.len()) as isize;
                if indent <= parent_indent && i > start {
                    break;
                }
                let bare = trimmed.trim_start_matches("- ");
                let matches = [
                    format!("{key}:"),
                    format!("\"{key}\":"),
                    format!("'{key}':"),
                ]
                .iter()
                .any(|p| bare.starts_with(p.as_str()));
                if matches && indent > parent_indent {
                    hit = Some((i, indent));
                    break;
                }
            }
            let (i, indent) = hit?;
            start = i + 1;
            parent_indent = indent;
            found = Some(i + 1);
        }
        found
    }
}

/// Reads one builder's values, falling back to `defaults:`.
struct Resolver<'a> {
    file: &'a ConfigFile,
    name: &'a str,
    raw: &'a BTreeMap<String, Value>,
}

impl Resolver<'_> {
    fn at(&self, key: &str) -> Location {
        if self.raw.contains_key(key) {
            self.file.location(Some(self.name), Some(key))
        } else {
            Location {
                builder: Some(self.name.to_string()),
                ..self.file.location(None, Some(key))
            }
        }
    }

    fn invalid(&self, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            at: self.at(key),
            message,
        }
    }

    fn value(&self, key: &str) -> Result<Option<Value>, ConfigError> {
        let v = self.raw.get(key).or_else(|| self.file.defaults.get(key));
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => {
                let expanded = expand_vars(s).map_err(|var| ConfigError::MissingVar {
                    at: self.at(key),
                    var,
                })?;
                Ok(Some(Value::String(expanded)))
            }
            Some(v) => Ok(Some(v.clone())),
        }
    }

    fn kind_error(&self, key: &str, want: Kind, got: &Value) -> ConfigError {
        let want = match want {
            Kind::Str => "a string",
            Kind::Int => "a whole number",
            Kind::Bool => "true or false",
            Kind::Float => "a number",
            Kind::StrList => "a string or a list of strings",
        };
        let got = serde_norway::to_string(got)
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        self.invalid(key, format!("expected {want}, got `{got}`"))
    }

    fn string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.value(key)? {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(v) => Err(self.kind_error(key, Kind::Str, &v)),
        }
    }

    fn int(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        match self.value(key)? {
            None => Ok(None),
            Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
            Some(Value::String(s)) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| self.kind_error(key, Kind::Int, &Value::String(s))),
            Some(v) => Err(self.kind_error(key, Kind::Int, &v)),
        }
    }

    fn float(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.value(key)? {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(Value::String(s)) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| self.kind_error(key, Kind::Float, &Value::String(s))),
            Some(v) => Err(self.kind_error(key, Kind::Float, &v)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.value(key)? {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(Value::String(s)) if s == "true" => Ok(Some(true)),
            Some(Value::String(s)) if s == "false" => Ok(Some(false)),
            Some(v) => Err(self.kind_error(key, Kind::Bool, &v)),
        }
    }

    fn list(&self, key: &str) -> Result<Vec<String>, ConfigError> {
        match self.value(key)? {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s]),
            Some(Value::Sequence(items)) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(s) => expand_vars(&s).map_err(|var| ConfigError::MissingVar {
                        at: self.at(key),
                        var,
                    }),
                    other => Err(self.kind_error(key, Kind::StrList, &other)),
                })
                .collect(),
            Some(v) => Err(self.kind_error(key, Kind::StrList, &v)),
        }
    }
}

fn key_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// `~/x` → `$HOME/x`; relative paths are taken relative to the config file's folder.
pub fn expand_path(p: &str, base: &Path) -> PathBuf {
    if let Some(rest) = p.strip_prefix("~/")
        && let Some(home) = std::env::var_os("HOME")
    {
        return PathBuf::from(home).join(rest);
    }
    if p == "~"
        && let Some(home) = std::env::var_os("HOME")
    {
        return PathBuf::from(home);
    }
    let path = PathBuf::from(p);
    if path.is_absolute() {
        path
    } else {
        base.join(path)
    }
}

/// Expands `${VAR}` (empty when unset), `${VAR?}` (an error when unset) and
/// `${VAR:-default}`; `$$` is a literal `$`. Returns the missing variable's name.
pub fn expand_vars(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
            continue;
        }
        let Some(body_and_rest) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let Some(end) = body_and_rest.find('}') else {
            out.push('$');
            rest = after;
            continue;
        };
        let body = &body_and_rest[..end];
        rest = &body_and_rest[end + 1..];
        let (name, required, default) = if let Some(n) = body.strip_suffix('?') {
            (n, true, None)
        } else if let Some((n, d)) = body.split_once(":-") {
            (n, false, Some(d))
        } else {
            (body, false, None)
        };
        match std::env::var(name) {
            Ok(v) if !(v.is_empty() && default.is_some()) => out.push_str(&v),
            _ if required => return Err(name.to_string()),
            _ => out.push_str(default.unwrap_or("")),
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The closest candidate within a small edit distance.
pub fn did_you_mean<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<String> {
    candidates
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4) && *d < c.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.to_string())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ConfigFile, ConfigError> {
        ConfigFile::parse(Path::new("/etc/absconda-remote.yaml"), text)
    }

    #[test]
    fn a_builder_declares_its_platform() {
        let f = parse(
            "builders:\n  a: {host: a, platform: linux/aarch64}\n  b: {host: b, platform: linux/arm/v7}\n  c: {host: c}\n",
        )
        .unwrap();
        let p = |n: &str| f.builder(n).unwrap().platform.map(|p| p.to_string());
        assert_eq!(p("a").as_deref(), Some("linux/arm64"));
        assert_eq!(p("b").as_deref(), Some("linux/arm/v7"));
        assert_eq!(p("c"), None);
        let bad = parse("builders:\n  a: {host: a, platform: arm64}\n").unwrap();
        let e = bad.builder("a").unwrap_err().to_string();
        assert!(e.contains("platform") && e.contains("os/arch"), "{e}");
    }

    #[test]
    fn pools_name_builders_with_a_policy() {
        let f = parse(
            "builders:\n  a: {host: a}\n  b: {host: b}\npools:\n  farm:\n    builders: [b, a]\n    max_running: 1\n    prefer: cheapest\ndefault_builder: farm\n",
        )
        .unwrap();
        let pool = f.pool("farm").unwrap();
        assert_eq!(pool.members, ["b", "a"]);
        assert_eq!(pool.max_running, Some(1));
        assert_eq!(pool.prefer, Prefer::Cheapest);
        assert!(!pool.emulate);
        assert_eq!(pool.index_from, IndexFrom::Auto);
        assert_eq!(f.default_builder().unwrap().0, "farm");
        assert_eq!(
            parse("builders:\n  a: {host: a}\npools:\n  p:\n    builders: [a]\n")
                .unwrap()
                .pool("p")
                .unwrap()
                .prefer,
            Prefer::Affinity
        );
        let f = parse(
            "builders:\n  a: {host: a}\npools:\n  p:\n    builders: [a]\n    emulate: true\n    index_from: builder\n",
        )
        .unwrap();
        let pool = f.pool("p").unwrap();
        assert!(pool.emulate);
        assert_eq!(pool.index_from, IndexFrom::Builder);
    }

    #[test]
    fn pool_mistakes_are_named() {
        let cases = [
            (
                "pools:\n  p:\n    builders: [a, c]\n",
                "no builder named `c`",
            ),
            (
                "pools:\n  p:\n    builders: [a, a]\n",
                "`a` is listed twice",
            ),
            ("pools:\n  p:\n    builders: []\n", "at least one builder"),
            (
                "pools:\n  a:\n    builders: [a]\n",
                "names both a builder and a pool",
            ),
            (
                "pools:\n  p:\n    builders: [a]\n    max_running: 0\n",
                "at least 1",
            ),
            (
                "pools:\n  p:\n    builders: [a]\n    prefer: fastest\n",
                "`affinity`, `idle` or `cheapest`",
            ),
            (
                "pools:\n  p:\n    builders: [a]\n    max_runing: 2\n",
                "did you mean `max_running`",
            ),
            (
                "pools:\n  p:\n    builders: [a]\n    emulate: yes please\n",
                "`true` or `false`",
            ),
            (
                "pools:\n  p:\n    builders: [a]\n    index_from: registry\n",
                "`auto`, `client` or `builder`",
            ),
            ("pools: [a]\n", "must map pool names"),
        ];
        for (pools, want) in cases {
            let text = format!("builders:\n  a: {{host: a}}\n{pools}");
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{pools:?}: {e}");
        }
        let e = parse("builders:\n  a: {host: a}\npools:\n  farm:\n    builders: [a]\n")
            .unwrap()
            .builder("frm")
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `farm`"), "{e}");
    }

    const GOOD: &str = "\
builders:
  local:
    provider: ssh
    host: 127.0.0.1
    port: 2222
    user: root
    identity_file: /keys/id
    workspace: /var/lib/absconda
    docker: /usr/bin/docker
  legacy:
    ssh_host: build.example
    ssh_user: ci
    ssh_key: keys/id_rsa
    ssh_port: 2200
  gcp-builder:
    provider: gcp
    project: my-project
    zone: us-central1-a
    instance: absconda-builder
    host_key_alias: gcp-builder
defaults:
  timeout: 600
  auto_stop: true
";

    #[test]
    fn resolves_builders_with_defaults_and_aliases() {
        let f = parse(GOOD).unwrap();
        assert_eq!(f.names(), ["local", "legacy", "gcp-builder"]);
        let b = f.builder("local").unwrap();
        assert_eq!(b.port, 2222);
        assert_eq!(b.docker, "/usr/bin/docker");
        assert_eq!(b.timeout, Duration::from_secs(600));
        assert!(!b.auto_start, "ssh builders are always on");
        let l = f.builder("legacy").unwrap();
        assert_eq!(l.host.as_deref(), Some("build.example"));
        assert_eq!(l.user, "ci");
        assert_eq!(l.port, 2200);
        assert_eq!(l.identity_files, [PathBuf::from("/etc/keys/id_rsa")]);
        let g = f.builder("gcp-builder").unwrap();
        assert_eq!(g.provider, ProviderKind::Gcp);
        assert!(g.auto_start && g.auto_stop);
    }

    #[test]
    fn error_table() {
        let cases: &[(&str, &str)] = &[
            (
                "builders:\n  a:\n    hots: x\n",
                "line 3, builder `a`, key `hots`: unknown key (did you mean `host`?)",
            ),
            (
                "builders:\n  a:\n    host: x\n    ssh_options: [-o, X=y]\n",
                "line 4, builder `a`, key `ssh_options`: not supported by absconda",
            ),
            (
                "builders:\n  a:\n    host: x\n    start_command: gcloud start\n",
                "key `start_command`: not supported by absconda: `start_command` ran an external program",
            ),
            ("builders:\n  a:\n    host: [\n", "invalid YAML"),
            (
                "bilders: {}\n",
                "line 1, key `bilders`: unknown key (did you mean `builders`?)",
            ),
            (
                "builders:\n  a:\n    host: x\n    host_key_policy: no\n",
                "host checking cannot",
            ),
        ];
        for (text, want) in cases {
            let err = match parse(text) {
                Err(e) => e.to_string(),
                Ok(f) => f.builder("a").unwrap_err().to_string(),
            };
            let want = want.replace("host checking", "host key checking");
            assert!(err.contains(&want), "{text:?}\n got: {err}\nwant: {want}");
        }
    }

    #[test]
    fn type_and_missing_errors_name_the_line() {
        let f = parse(
            "builders:\n  a:\n    host: x\n    port: many\n  b:\n    provider: gcp\n    zone: z\n",
        )
        .unwrap();
        let e = f.builder("a").unwrap_err().to_string();
        assert!(
            e.contains("line 4, builder `a`, key `port`: expected a whole number, got `many`"),
            "{e}"
        );
        let e = f.builder("b").unwrap_err().to_string();
        assert!(
            e.contains("builder `b`, key `project`: required for provider `gcp`"),
            "{e}"
        );
        let e = f.builder("c").unwrap_err().to_string();
        assert!(e.contains("no builder named `c`"), "{e}");
    }

    #[test]
    fn variables_only_fail_for_the_builder_used() {
        // SAFETY: tests in this module use variable names no other test reads.
        unsafe { std::env::set_var("ABSCONDA_TEST_HOST", "10.1.2.3") };
        let f = parse(
            "builders:\n  ok:\n    host: ${ABSCONDA_TEST_HOST}\n    user: ${ABSCONDA_TEST_UNSET_USER:-ci}\n  broken:\n    host: ${ABSCONDA_TEST_UNSET?}\n",
        )
        .unwrap();
        let ok = f.builder("ok").unwrap();
        assert_eq!(ok.host.as_deref(), Some("10.1.2.3"));
        assert_eq!(ok.user, "ci");
        let e = f.builder("broken").unwrap_err().to_string();
        assert!(e.contains("line 6, builder `broken`, key `host`: environment variable `ABSCONDA_TEST_UNSET` is not set"), "{e}");
    }

    #[test]
    fn expansion_table() {
        let cases = [
            ("plain", "plain"),
            ("$$HOME", "$HOME"),
            ("${ABSCONDA_TEST_NEVER_SET}", ""),
            ("a${ABSCONDA_TEST_NEVER_SET:-b}c", "abc"),
            ("$notbraced", "$notbraced"),
            ("${unclosed", "${unclosed"),
        ];
        for (input, want) in cases {
            assert_eq!(expand_vars(input).unwrap(), want, "{input}");
        }
        assert_eq!(
            expand_vars("${ABSCONDA_TEST_NEVER_SET?}").unwrap_err(),
            "ABSCONDA_TEST_NEVER_SET"
        );
    }

    #[test]
    fn build_services_and_overflow() {
        let ok = parse(
            "builders:\n  vm:\n    host: h\n  cb:\n    provider: codebuild\n    bucket: b\n    codebuild_project: p\npools:\n  farm:\n    builders: [vm]\n    overflow: cb\n",
        )
        .unwrap();
        assert_eq!(ok.pool("farm").unwrap().overflow.as_deref(), Some("cb"));
        let cb = ok.builder("cb").unwrap();
        assert!(cb.provider.is_service());
        assert_eq!(cb.bucket.as_deref(), Some("b"));
        for (text, want) in [
            (
                "builders:\n  cb:\n    provider: codebuild\n    bucket: b\n",
                "key `codebuild_project`: required for provider `codebuild`",
            ),
            (
                "builders:\n  gb:\n    provider: cloudbuild\n    project: p\n",
                "key `bucket`: required for provider `cloudbuild`",
            ),
        ] {
            let e = parse(text)
                .unwrap()
                .builder(if text.contains("cb:") { "cb" } else { "gb" });
            let e = e.unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        for (pool, want) in [
            (
                "    builders: [vm]\n    overflow: vm\n",
                "expected the name of a builder with `provider: codebuild`",
            ),
            (
                "    builders: [vm, cb]\n",
                "`cb` is a build service: name it as the pool's `overflow:` instead",
            ),
        ] {
            let text = format!(
                "builders:\n  vm:\n    host: h\n  cb:\n    provider: codebuild\n    bucket: b\n    codebuild_project: p\npools:\n  farm:\n{pool}"
            );
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_quickly() {
        let text = format!("builders: {}", "{a: ".repeat(100_000));
        let start = std::time::Instant::now();
        let err = parse(&text).unwrap_err().to_string();
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(err.contains("nested more than 64 levels deep"), "{err}");
        assert!(err.contains("line 1"), "{err}");
    }
}
