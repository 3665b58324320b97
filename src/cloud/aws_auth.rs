//! AWS credentials and Signature Version 4, without the AWS SDK or CLI.
//!
//! absconda talks to EC2 with nothing installed on the user's machine, so it
//! finds credentials the way the AWS tools do and signs requests itself:
//!
//! 1. environment variables `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
//!    `AWS_SESSION_TOKEN` (skipped when the builder names a `profile:`, as
//!    `aws --profile` does);
//! 2. a profile (the builder's `profile:`, else `AWS_PROFILE`, else `default`)
//!    from `~/.aws/credentials` and `~/.aws/config` (`AWS_SHARED_CREDENTIALS_FILE`,
//!    `AWS_CONFIG_FILE`): static keys, or a `credential_process` whose JSON
//!    output is used until its `Expiration`;
//! 3. the EC2 instance metadata service (IMDSv2 only), probed with a short
//!    timeout and skipped with `AWS_EC2_METADATA_DISABLED=true`.
//!
//! Every credential remembers where it came from ([`CredentialSource`]) so an
//! authentication error can say which source was used and what to check.
//! Secrets never appear in `Debug` output, logs or error messages.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use url::Url;

use super::CloudError;

/// The environment variables the credential chain, region and endpoint
/// resolution read. [`Env::from_process`] snapshots exactly these.
const ENV_NAMES: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_EC2",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT",
    "HOME",
    "USERPROFILE",
];

/// Where IMDS lives when `AWS_EC2_METADATA_SERVICE_ENDPOINT` is not set.
pub const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";

/// IMDS answers within milliseconds on an instance; anywhere else nothing
/// answers at all, so waiting longer only delays the "no credentials" error.
const IMDS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const IMDS_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const IMDS_TOKEN_TTL_SECONDS: &str = "21600";

/// A `credential_process` may have to ask a password manager; past this it is
/// considered hung.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(60);
/// The most absconda reads of `credential_process`'s stdout or stderr (its
/// JSON is a few hundred bytes).
const PROCESS_OUTPUT_LIMIT: usize = 64 << 10;
/// The most of one instance metadata answer (a token, a role, credentials).
const IMDS_LIMIT: usize = 64 << 10;

/// Credentials closer than this to their `Expiration` are fetched again.
const REFRESH_MARGIN: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// A snapshot of the environment variables that matter to AWS access.
///
/// The chain reads this instead of the process environment so that callers
/// (and tests, which run in parallel in one process) can say exactly what the
/// environment is.
#[derive(Clone, Default)]
pub struct Env {
    vars: HashMap<String, String>,
}

impl Env {
    /// The current process environment (only the AWS variables and `HOME`).
    pub fn from_process() -> Env {
        let vars = ENV_NAMES
            .iter()
            .filter_map(|name| std::env::var(name).ok().map(|v| (name.to_string(), v)))
            .collect();
        Env { vars }
    }

    /// An environment made of exactly these variables.
    pub fn from_pairs<I, K, V>(pairs: I) -> Env
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Env {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// Returns a copy with `name` set to `value`.
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Env {
        self.vars.insert(name.to_string(), value.into());
        self
    }

    /// The value of `name`, when set and not empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    fn home(&self) -> Option<PathBuf> {
        self.get("HOME")
            .or_else(|| self.get("USERPROFILE"))
            .map(PathBuf::from)
    }

    /// `~/...` expanded against this environment's home directory.
    fn expand(&self, path: &str) -> PathBuf {
        match (path.strip_prefix("~/"), self.home()) {
            (Some(rest), Some(home)) => home.join(rest),
            _ => PathBuf::from(path),
        }
    }

    /// A path as the user would write it: the home directory shown as `~`.
    fn display_path(&self, path: &Path) -> String {
        if let Some(home) = self.home()
            && let Ok(rest) = path.strip_prefix(&home)
        {
            return format!("~/{}", rest.display());
        }
        path.display().to_string()
    }

    fn is_true(&self, name: &str) -> bool {
        self.get(name)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    }
}

impl fmt::Debug for Env {
    /// Names only: the values include secret keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = self.vars.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("Env").field("set", &names).finish()
    }
}

/// Where a set of credentials came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    /// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (/ `AWS_SESSION_TOKEN`).
    Environment,
    /// Static keys of `profile` in the file shown as `path`.
    ProfileFile { profile: String, path: String },
    /// The `credential_process` of `profile`.
    Process { profile: String },
    /// The instance metadata service at `endpoint`.
    Imds { endpoint: String },
    /// Handed over directly by the caller (tests, embedding programs).
    Explicit,
}

impl CredentialSource {
    /// What the user should check when AWS rejects credentials from here.
    pub fn hint(&self) -> String {
        match self {
            CredentialSource::Environment => "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                 (temporary keys also need a current AWS_SESSION_TOKEN), or unset them to use a profile"
                .to_string(),
            CredentialSource::ProfileFile { profile, path } => format!(
                "check `aws_access_key_id` and `aws_secret_access_key` (and `aws_session_token`) \
                 of profile `{profile}` in `{path}`, and that the key is still active"
            ),
            CredentialSource::Process { profile } => format!(
                "run the `credential_process` of profile `{profile}` yourself and check the keys \
                 and `Expiration` it prints"
            ),
            CredentialSource::Imds { .. } => {
                "check the IAM role (instance profile) attached to this instance".to_string()
            }
            CredentialSource::Explicit => "check the credentials given to absconda".to_string(),
        }
    }
}

impl fmt::Display for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialSource::Environment => {
                f.write_str("environment variables AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
            }
            CredentialSource::ProfileFile { profile, path } => {
                write!(f, "profile `{profile}` in `{path}`")
            }
            CredentialSource::Process { profile } => {
                write!(f, "credential_process of profile `{profile}`")
            }
            CredentialSource::Imds { endpoint } => {
                write!(f, "EC2 instance metadata (IMDSv2) at `{endpoint}`")
            }
            CredentialSource::Explicit => f.write_str("explicitly given credentials"),
        }
    }
}

/// An access key, its secret and an optional session token.
///
/// The secret parts are private and never printed; [`fmt::Debug`] redacts them.
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
    /// When temporary credentials stop working.
    pub expiration: Option<DateTime<Utc>>,
    pub source: CredentialSource,
}

impl Credentials {
    pub fn new(
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
        session_token: Option<String>,
        source: CredentialSource,
    ) -> Credentials {
        Credentials {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token: session_token.filter(|t| !t.is_empty()),
            expiration: None,
            source,
        }
    }

    pub fn with_expiration(mut self, expiration: Option<DateTime<Utc>>) -> Credentials {
        self.expiration = expiration;
        self
    }

    pub fn has_session_token(&self) -> bool {
        self.session_token.is_some()
    }

    /// Still usable at `now`, with the refresh margin to spare.
    fn is_fresh(&self, now: DateTime<Utc>) -> bool {
        self.expiration.is_none_or(|exp| now + REFRESH_MARGIN < exp)
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("expiration", &self.expiration)
            .field("source", &self.source)
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Shared config and credentials files

/// One profile's `key = value` pairs; keys are lowercase.
pub type ProfileSection = BTreeMap<String, String>;

/// Which of the two shared files is being parsed: they name sections differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileFileKind {
    /// `~/.aws/config`: `[default]` and `[profile NAME]`; other sections
    /// (`[sso-session x]`, `[services x]`) are not profiles.
    Config,
    /// `~/.aws/credentials`: `[NAME]`.
    Credentials,
}

/// Parses an AWS shared config or credentials file into its profiles.
///
/// Follows the AWS CLI's reading: `#` and `;` start comment lines, keys are
/// case-insensitive, values are trimmed and keep any `#` inside them (secret
/// keys may contain anything), indented lines continue the previous value
/// (nested settings such as `s3 =`), a repeated section adds to the first.
pub fn parse_profile_file(text: &str, kind: ProfileFileKind) -> HashMap<String, ProfileSection> {
    let mut profiles: HashMap<String, ProfileSection> = HashMap::new();
    let mut current: Option<String> = None;
    let mut last_key: Option<String> = None;
    for raw in text.lines() {
        let line = raw.trim_end();
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        if let Some(header) = trimmed.strip_prefix('[') {
            last_key = None;
            current = header
                .split_once(']')
                .and_then(|(name, _)| section_profile_name(name.trim(), kind));
            if let Some(name) = &current {
                profiles.entry(name.clone()).or_default();
            }
            continue;
        }
        let Some(section) = current.as_ref().and_then(|name| profiles.get_mut(name)) else {
            continue;
        };
        if line.starts_with(char::is_whitespace) {
            if let Some(value) = last_key.as_ref().and_then(|k| section.get_mut(k)) {
                value.push('\n');
                value.push_str(trimmed);
            }
            continue;
        }
        if let Some((key, value)) = trimmed.split_once('=') {
            let key = key.trim().to_ascii_lowercase();
            section.insert(key.clone(), value.trim().to_string());
            last_key = Some(key);
        }
    }
    profiles
}

fn section_profile_name(section: &str, kind: ProfileFileKind) -> Option<String> {
    match kind {
        ProfileFileKind::Credentials => Some(section.to_string()).filter(|s| !s.is_empty()),
        ProfileFileKind::Config => {
            if section == "default" {
                return Some("default".to_string());
            }
            let rest = section.strip_prefix("profile")?;
            if !rest.starts_with(char::is_whitespace) {
                return None;
            }
            Some(rest.trim().to_string()).filter(|s| !s.is_empty())
        }
    }
}

/// Both shared files, as read at one moment.
struct ProfileFiles {
    credentials_path: PathBuf,
    config_path: PathBuf,
    credentials: HashMap<String, ProfileSection>,
    config: HashMap<String, ProfileSection>,
}

impl ProfileFiles {
    /// Reads both files; a file that does not exist has no profiles.
    fn load(env: &Env) -> Result<ProfileFiles, (PathBuf, std::io::Error)> {
        let credentials_path = match env.get("AWS_SHARED_CREDENTIALS_FILE") {
            Some(p) => env.expand(p),
            None => env.expand("~/.aws/credentials"),
        };
        let config_path = match env.get("AWS_CONFIG_FILE") {
            Some(p) => env.expand(p),
            None => env.expand("~/.aws/config"),
        };
        let read = |path: &Path, kind| match std::fs::read_to_string(path) {
            Ok(text) => Ok(parse_profile_file(&text, kind)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashMap::new()),
            Err(e) => Err((path.to_path_buf(), e)),
        };
        Ok(ProfileFiles {
            credentials: read(&credentials_path, ProfileFileKind::Credentials)?,
            config: read(&config_path, ProfileFileKind::Config)?,
            credentials_path,
            config_path,
        })
    }

    /// A setting of `profile`: the credentials file wins over the config file,
    /// as in the AWS CLI. Returns the value and the file it came from.
    fn get(&self, profile: &str, key: &str) -> Option<(&str, &Path)> {
        fn from<'a>(
            profiles: &'a HashMap<String, ProfileSection>,
            profile: &str,
            key: &str,
        ) -> Option<&'a str> {
            profiles
                .get(profile)
                .and_then(|s| s.get(key))
                .map(String::as_str)
                .filter(|v| !v.is_empty())
        }
        from(&self.credentials, profile, key)
            .map(|v| (v, self.credentials_path.as_path()))
            .or_else(|| from(&self.config, profile, key).map(|v| (v, self.config_path.as_path())))
    }

    fn has(&self, profile: &str) -> bool {
        self.credentials.contains_key(profile) || self.config.contains_key(profile)
    }
}

/// The region of `profile` in the config file (`region = ...`), if any.
pub fn profile_region(env: &Env, profile: &str) -> Option<String> {
    let files = ProfileFiles::load(env).ok()?;
    files
        .config
        .get(profile)
        .and_then(|s| s.get("region"))
        .filter(|r| !r.is_empty())
        .cloned()
}

// ---------------------------------------------------------------------------
// The chain

/// Finds credentials in the usual places and keeps them until they expire.
pub struct CredentialChain {
    env: Env,
    profile: String,
    /// The builder's config named the profile: environment keys are skipped.
    profile_from_settings: bool,
    /// Someone named the profile (settings or `AWS_PROFILE`): it must exist.
    profile_explicit: bool,
    cache: tokio::sync::Mutex<Option<Credentials>>,
}

impl fmt::Debug for CredentialChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialChain")
            .field("profile", &self.profile)
            .field("env", &self.env)
            .finish_non_exhaustive()
    }
}

impl CredentialChain {
    /// `profile` is the builder's `profile:` setting, if any.
    pub fn new(env: Env, profile: Option<&str>) -> CredentialChain {
        let settings = profile.map(str::trim).filter(|p| !p.is_empty());
        let from_env = env.get("AWS_PROFILE").map(str::trim).map(str::to_string);
        let profile_explicit = settings.is_some() || from_env.is_some();
        CredentialChain {
            profile: settings
                .map(str::to_string)
                .or(from_env)
                .unwrap_or_else(|| "default".to_string()),
            profile_from_settings: settings.is_some(),
            profile_explicit,
            env,
            cache: tokio::sync::Mutex::new(None),
        }
    }

    /// A chain that always yields these credentials.
    pub fn fixed(credentials: Credentials) -> CredentialChain {
        CredentialChain {
            env: Env::default(),
            profile: "default".to_string(),
            profile_from_settings: false,
            profile_explicit: false,
            cache: tokio::sync::Mutex::new(Some(credentials.with_expiration(None))),
        }
    }

    /// The profile this chain reads.
    pub fn profile(&self) -> &str {
        &self.profile
    }

    /// The environment the chain was made with.
    pub fn env(&self) -> &Env {
        &self.env
    }

    /// Current credentials: cached ones while fresh, else found again.
    pub async fn credentials(&self) -> Result<Credentials, CloudError> {
        let mut cache = self.cache.lock().await;
        if let Some(creds) = cache.as_ref()
            && creds.is_fresh(Utc::now())
        {
            return Ok(creds.clone());
        }
        let creds = self.resolve().await?;
        if let Some(exp) = creds.expiration
            && exp <= Utc::now()
        {
            return Err(CloudError::Auth {
                source_name: creds.source.to_string(),
                message: format!(
                    "the credentials expired at {}; {}",
                    exp.to_rfc3339(),
                    creds.source.hint()
                ),
            });
        }
        tracing::debug!(source = %creds.source, access_key_id = %creds.access_key_id, "using AWS credentials");
        *cache = Some(creds.clone());
        Ok(creds)
    }

    async fn resolve(&self) -> Result<Credentials, CloudError> {
        let mut tried: Vec<String> = Vec::new();

        if self.profile_from_settings {
            tried.push("environment variables (skipped: the builder names a profile)".into());
        } else {
            match (
                self.env.get("AWS_ACCESS_KEY_ID"),
                self.env.get("AWS_SECRET_ACCESS_KEY"),
            ) {
                (Some(id), Some(secret)) => {
                    return Ok(Credentials::new(
                        id.trim(),
                        secret.trim(),
                        self.env
                            .get("AWS_SESSION_TOKEN")
                            .map(|t| t.trim().to_string()),
                        CredentialSource::Environment,
                    ));
                }
                (Some(_), None) | (None, Some(_)) => {
                    return Err(CloudError::Auth {
                        source_name: CredentialSource::Environment.to_string(),
                        message: "only one of AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY is set; \
                                  set both, or neither to use a profile"
                            .into(),
                    });
                }
                (None, None) => tried.push("environment variables (not set)".into()),
            }
        }

        let files = ProfileFiles::load(&self.env).map_err(|(path, e)| CloudError::Auth {
            source_name: format!("profile `{}`", self.profile),
            message: format!("cannot read `{}`: {e}", self.env.display_path(&path)),
        })?;
        let profile = self.profile.as_str();
        let files_shown = format!(
            "`{}` or `{}`",
            self.env.display_path(&files.credentials_path),
            self.env.display_path(&files.config_path)
        );
        if files.has(profile) {
            let key_id = files.get(profile, "aws_access_key_id");
            let secret = files.get(profile, "aws_secret_access_key");
            match (key_id, secret) {
                (Some((id, path)), Some(_)) => {
                    let source = CredentialSource::ProfileFile {
                        profile: profile.to_string(),
                        path: self.env.display_path(path),
                    };
                    let secret = secret.map(|(s, _)| s).unwrap_or_default();
                    let token = files
                        .get(profile, "aws_session_token")
                        .map(|(t, _)| t.to_string());
                    return Ok(Credentials::new(id, secret, token, source));
                }
                (Some((_, path)), None) | (None, Some((_, path))) => {
                    return Err(CloudError::Auth {
                        source_name: format!(
                            "profile `{profile}` in `{}`",
                            self.env.display_path(path)
                        ),
                        message: "the profile has only one of `aws_access_key_id` and \
                                  `aws_secret_access_key`; set both"
                            .into(),
                    });
                }
                (None, None) => {}
            }
            if let Some((command, _)) = files.get(profile, "credential_process") {
                return run_credential_process(profile, command).await;
            }
            for unsupported in [
                "role_arn",
                "sso_session",
                "sso_start_url",
                "web_identity_token_file",
            ] {
                if files.get(profile, unsupported).is_some() {
                    return Err(CloudError::Auth {
                        source_name: format!("profile `{profile}`"),
                        message: format!(
                            "the profile uses `{unsupported}`, which absconda does not support; \
                             give it static keys or a `credential_process` \
                             (for example `aws configure export-credentials --profile {profile}`)"
                        ),
                    });
                }
            }
            if self.profile_explicit {
                return Err(CloudError::Auth {
                    source_name: format!("profile `{profile}`"),
                    message: format!(
                        "the profile in {files_shown} has neither `aws_access_key_id`/`aws_secret_access_key` \
                         nor `credential_process`"
                    ),
                });
            }
            tried.push(format!("profile `{profile}` (no keys)"));
        } else if self.profile_explicit {
            return Err(CloudError::Auth {
                source_name: format!("profile `{profile}`"),
                message: format!(
                    "no profile `{profile}` in {files_shown}; check the builder's `profile:` and AWS_PROFILE"
                ),
            });
        } else {
            tried.push(format!("profile `{profile}` (not in {files_shown})"));
        }

        if self.env.is_true("AWS_EC2_METADATA_DISABLED") {
            tried.push("EC2 instance metadata (disabled by AWS_EC2_METADATA_DISABLED)".into());
            return Err(no_credentials(&tried));
        }
        let endpoint = self
            .env
            .get("AWS_EC2_METADATA_SERVICE_ENDPOINT")
            .unwrap_or(DEFAULT_IMDS_ENDPOINT)
            .trim()
            .trim_end_matches('/')
            .to_string();
        match imds_credentials(&endpoint).await {
            Ok(creds) => Ok(creds),
            Err(ImdsError::Unreachable(why)) => {
                tried.push(format!("EC2 instance metadata at `{endpoint}` ({why})"));
                Err(no_credentials(&tried))
            }
            Err(ImdsError::Failed(why)) => Err(CloudError::Auth {
                source_name: CredentialSource::Imds { endpoint }.to_string(),
                message: why,
            }),
        }
    }
}

fn no_credentials(tried: &[String]) -> CloudError {
    CloudError::Auth {
        source_name: "the AWS credential chain".into(),
        message: format!(
            "no AWS credentials found; tried {}. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
             or a profile with keys or `credential_process` in `~/.aws/credentials` or `~/.aws/config`",
            tried.join(", ")
        ),
    }
}

/// The JSON a `credential_process` prints (its `Version: 1` format).
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ProcessOutput {
    version: u32,
    access_key_id: String,
    secret_access_key: String,
    #[serde(default)]
    session_token: Option<String>,
    #[serde(default)]
    expiration: Option<String>,
}

/// Runs the user's `credential_process` through the shell, as the AWS CLI does.
async fn run_credential_process(profile: &str, command: &str) -> Result<Credentials, CloudError> {
    let source = CredentialSource::Process {
        profile: profile.to_string(),
    };
    let fail = |message: String| CloudError::Auth {
        source_name: source.to_string(),
        message,
    };
    let mut cmd = if cfg!(windows) {
        let mut c = tokio::process::Command::new("cmd");
        c.arg("/C").arg(command);
        c
    } else {
        let mut c = tokio::process::Command::new("sh");
        c.arg("-c").arg(command);
        c
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    tracing::debug!(profile, "running credential_process");
    let output = match tokio::time::timeout(PROCESS_TIMEOUT, capped_output(cmd)).await {
        Err(_) => {
            return Err(fail(format!(
                "`credential_process` did not finish within {}s",
                PROCESS_TIMEOUT.as_secs()
            )));
        }
        Ok(Err(e)) => return Err(fail(format!("cannot run `credential_process`: {e}"))),
        Ok(Ok(output)) => output,
    };
    if !output.status.success() {
        // Its stderr is the user's own diagnostics; stdout may hold secrets.
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr: String = stderr.trim().chars().take(500).collect();
        return Err(fail(format!(
            "`credential_process` failed ({}){}{}",
            output.status,
            if stderr.is_empty() { "" } else { ": " },
            stderr
        )));
    }
    // serde_json's messages can quote the input; report only where it broke.
    let parsed: ProcessOutput = serde_json::from_slice(&output.stdout).map_err(|e| {
        fail(format!(
            "`credential_process` did not print the expected JSON \
             (`Version: 1` with `AccessKeyId` and `SecretAccessKey`): {:?} error at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    if parsed.version != 1 {
        return Err(fail(format!(
            "`credential_process` printed `Version: {}`; only version 1 is supported",
            parsed.version
        )));
    }
    let expiration = match parsed.expiration.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(
            DateTime::parse_from_rfc3339(text)
                .map_err(|e| {
                    fail(format!(
                        "`credential_process` printed an `Expiration` that is not an RFC 3339 time: {e}"
                    ))
                })?
                .with_timezone(&Utc),
        ),
    };
    Ok(Credentials::new(
        parsed.access_key_id,
        parsed.secret_access_key,
        parsed.session_token,
        source,
    )
    .with_expiration(expiration))
}

enum ImdsError {
    /// Nothing answered: not on EC2, which is a normal end of the chain.
    Unreachable(String),
    /// IMDS answered but gave no usable credentials.
    Failed(String),
}

/// The credentials document IMDS serves for a role.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ImdsCredentials {
    #[serde(default)]
    code: Option<String>,
    access_key_id: String,
    secret_access_key: String,
    token: String,
    #[serde(default)]
    expiration: Option<String>,
}

/// IMDSv2: a session token from `PUT /latest/api/token`, then the role's
/// credentials under `/latest/meta-data/iam/security-credentials/`.
async fn imds_credentials(endpoint: &str) -> Result<Credentials, ImdsError> {
    let client = super::http::builder()
        .map_err(|e| ImdsError::Failed(e.to_string()))?
        .no_proxy()
        .connect_timeout(IMDS_CONNECT_TIMEOUT)
        .timeout(IMDS_REQUEST_TIMEOUT)
        .build()
        .map_err(|e| ImdsError::Failed(format!("cannot set up an HTTP client: {e}")))?;
    let unreachable = |e: reqwest::Error| {
        ImdsError::Unreachable(if e.is_timeout() {
            format!("no answer within {}s", IMDS_REQUEST_TIMEOUT.as_secs())
        } else {
            "not reachable".to_string()
        })
    };
    let response = client
        .put(format!("{endpoint}/latest/api/token"))
        .header(
            "x-aws-ec2-metadata-token-ttl-seconds",
            IMDS_TOKEN_TTL_SECONDS,
        )
        .send()
        .await
        .map_err(unreachable)?;
    if !response.status().is_success() {
        return Err(ImdsError::Failed(format!(
            "IMDSv2 refused a session token (HTTP {}); check that the instance allows IMDSv2 \
             and its hop limit",
            response.status().as_u16()
        )));
    }
    let token = super::read_body(response, IMDS_LIMIT)
        .await
        .map_err(|e| ImdsError::Failed(format!("cannot read the IMDSv2 session token: {e}")))?;
    let token = String::from_utf8_lossy(&token).trim().to_string();

    let get = |path: String| {
        client
            .get(format!("{endpoint}{path}"))
            .header("x-aws-ec2-metadata-token", token.as_str())
            .send()
    };
    let roles = get("/latest/meta-data/iam/security-credentials/".into())
        .await
        .map_err(|e| ImdsError::Failed(format!("cannot list the instance's IAM roles: {e}")))?;
    if roles.status() == reqwest::StatusCode::NOT_FOUND {
        return Err(ImdsError::Failed(
            "this instance has no IAM role (instance profile) attached".into(),
        ));
    }
    if !roles.status().is_success() {
        return Err(ImdsError::Failed(format!(
            "listing the instance's IAM roles failed with HTTP {}",
            roles.status().as_u16()
        )));
    }
    let roles = super::read_body(roles, IMDS_LIMIT)
        .await
        .map_err(|e| ImdsError::Failed(format!("cannot read the instance's IAM roles: {e}")))?;
    let roles = String::from_utf8_lossy(&roles);
    let Some(role) = roles.lines().map(str::trim).find(|l| !l.is_empty()) else {
        return Err(ImdsError::Failed(
            "this instance has no IAM role (instance profile) attached".into(),
        ));
    };
    let role = role.to_string();
    let creds = get(format!("/latest/meta-data/iam/security-credentials/{role}"))
        .await
        .map_err(|e| {
            ImdsError::Failed(format!(
                "cannot fetch the credentials of role `{role}`: {e}"
            ))
        })?;
    if !creds.status().is_success() {
        return Err(ImdsError::Failed(format!(
            "fetching the credentials of role `{role}` failed with HTTP {}",
            creds.status().as_u16()
        )));
    }
    let body = super::read_body(creds, IMDS_LIMIT).await.map_err(|e| {
        ImdsError::Failed(format!("cannot read the credentials of role `{role}`: {e}"))
    })?;
    let doc: ImdsCredentials = serde_json::from_slice(&body).map_err(|e| {
        ImdsError::Failed(format!(
            "the credentials of role `{role}` are not the expected JSON ({:?} error at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    if let Some(code) = doc.code.as_deref()
        && code != "Success"
    {
        return Err(ImdsError::Failed(format!(
            "IMDS reports `{code}` for the credentials of role `{role}`"
        )));
    }
    let expiration = doc
        .expiration
        .as_deref()
        .and_then(|e| DateTime::parse_from_rfc3339(e.trim()).ok())
        .map(|e| e.with_timezone(&Utc));
    Ok(Credentials::new(
        doc.access_key_id,
        doc.secret_access_key,
        Some(doc.token),
        CredentialSource::Imds {
            endpoint: endpoint.to_string(),
        },
    )
    .with_expiration(expiration))
}

// ---------------------------------------------------------------------------
// Signature Version 4

/// A request to sign: what goes on the wire, minus the signature headers.
#[derive(Debug, Clone, Copy)]
pub struct SigningRequest<'a> {
    pub method: &'a str,
    pub url: &'a Url,
    /// Headers that will be sent and must be covered by the signature
    /// (`content-type`, …). `host` is derived from the URL when absent.
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// The headers to add to a signed request: `x-amz-date`,
/// `x-amz-security-token` (with a session token) and `authorization`.
#[derive(Clone)]
pub struct SignedHeaders {
    headers: Vec<(&'static str, String)>,
}

impl SignedHeaders {
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.headers.iter().map(|(n, v)| (*n, v.as_str()))
    }

    /// The value of one of the added headers.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Adds the headers to a request; all but the date are marked
    /// sensitive, which keeps them out of HTTP/2 header compression tables
    /// and `Debug` output.
    pub fn apply(
        &self,
        mut request: reqwest::RequestBuilder,
        creds: &Credentials,
    ) -> Result<reqwest::RequestBuilder, super::CloudError> {
        for (name, value) in self.iter() {
            let mut value = reqwest::header::HeaderValue::from_str(value).map_err(|_| {
                super::CloudError::Auth {
                    source_name: creds.source.to_string(),
                    message: format!(
                        "the credentials contain characters not allowed in the `{name}` header"
                    ),
                }
            })?;
            value.set_sensitive(name != "x-amz-date");
            request = request.header(name, value);
        }
        Ok(request)
    }
}

impl fmt::Debug for SignedHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| *n).collect();
        f.debug_struct("SignedHeaders")
            .field("names", &names)
            .finish_non_exhaustive()
    }
}

/// The pieces of a signature, for tests against published vectors.
pub(crate) struct Signature {
    // Never logged: the canonical request holds the session token.
    #[cfg_attr(not(test), allow(dead_code))]
    pub canonical_request: String,
    #[cfg_attr(not(test), allow(dead_code))]
    pub string_to_sign: String,
    pub signed_headers: String,
    pub signature: String,
}

/// Signs `request` for `service` in `region` at `time` (SigV4, header form).
pub fn sign(
    request: &SigningRequest<'_>,
    credentials: &Credentials,
    region: &str,
    service: &str,
    time: DateTime<Utc>,
) -> SignedHeaders {
    let amz_date = time.format("%Y%m%dT%H%M%SZ").to_string();
    let sig = signature(request, credentials, region, service, time);
    let date = time.format("%Y%m%d");
    let authorization = format!(
        "AWS4-HMAC-SHA256 Credential={}/{date}/{region}/{service}/aws4_request, SignedHeaders={}, Signature={}",
        credentials.access_key_id, sig.signed_headers, sig.signature
    );
    let mut headers = vec![("x-amz-date", amz_date)];
    if let Some(token) = &credentials.session_token {
        headers.push(("x-amz-security-token", token.clone()));
    }
    headers.push(("authorization", authorization));
    SignedHeaders { headers }
}

pub(crate) fn signature(
    request: &SigningRequest<'_>,
    credentials: &Credentials,
    region: &str,
    service: &str,
    time: DateTime<Utc>,
) -> Signature {
    let amz_date = time.format("%Y%m%dT%H%M%SZ").to_string();
    let date = time.format("%Y%m%d").to_string();

    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in request.headers {
        headers
            .entry(name.to_ascii_lowercase())
            .or_default()
            .push(canonical_header_value(value));
    }
    if !headers.contains_key("host") {
        headers.insert("host".into(), vec![host_header(request.url)]);
    }
    headers.insert("x-amz-date".into(), vec![amz_date.clone()]);
    if let Some(token) = &credentials.session_token {
        headers.insert("x-amz-security-token".into(), vec![token.clone()]);
    }
    let canonical_headers: String = headers
        .iter()
        .map(|(name, values)| format!("{name}:{}\n", values.join(",")))
        .collect();
    let signed_headers = headers.keys().cloned().collect::<Vec<_>>().join(";");

    let canonical_request = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        request.method.to_ascii_uppercase(),
        canonical_uri(request.url),
        canonical_query(request.url),
        canonical_headers,
        signed_headers,
        hex::encode(Sha256::digest(request.body)),
    );
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let (string_to_sign, signature) = signature_of(
        &canonical_request,
        credentials,
        &date,
        region,
        service,
        &amz_date,
        &scope,
    );
    Signature {
        canonical_request,
        string_to_sign,
        signed_headers,
        signature,
    }
}

/// The string to sign for `canonical_request` and its signature with the
/// key derived from the secret for `date`, `region` and `service`; shared
/// by header signing and presigned URLs.
fn signature_of(
    canonical_request: &str,
    credentials: &Credentials,
    date: &str,
    region: &str,
    service: &str,
    amz_date: &str,
    scope: &str,
) -> (String, String) {
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );
    let key = hmac(
        format!("AWS4{}", credentials.secret_access_key).as_bytes(),
        date.as_bytes(),
    );
    let key = hmac(&key, region.as_bytes());
    let key = hmac(&key, service.as_bytes());
    let key = hmac(&key, b"aws4_request");
    let signature = hex::encode(hmac(&key, string_to_sign.as_bytes()));
    (string_to_sign, signature)
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        // The error type exists for fixed-key MACs; HMAC takes any length.
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Presigns a GET of `url` (SigV4 in the query string, only `host`
/// signed), valid for `expires` seconds: the form of EC2 Instance Connect
/// Endpoint's `openTunnel` websocket URL.
pub fn presign(
    url: &Url,
    credentials: &Credentials,
    region: &str,
    service: &str,
    time: DateTime<Utc>,
    expires: u32,
) -> Url {
    let amz_date = time.format("%Y%m%dT%H%M%SZ").to_string();
    let date = time.format("%Y%m%d").to_string();
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let mut u = url.clone();
    {
        let mut q = u.query_pairs_mut();
        q.append_pair("X-Amz-Algorithm", "AWS4-HMAC-SHA256");
        q.append_pair(
            "X-Amz-Credential",
            &format!("{}/{scope}", credentials.access_key_id),
        );
        q.append_pair("X-Amz-Date", &amz_date);
        q.append_pair("X-Amz-Expires", &expires.to_string());
        if let Some(token) = &credentials.session_token {
            q.append_pair("X-Amz-Security-Token", token);
        }
        q.append_pair("X-Amz-SignedHeaders", "host");
    }
    let canonical_request = format!(
        "GET\n{}\n{}\nhost:{}\n\nhost\n{}",
        canonical_uri(&u),
        canonical_query(&u),
        host_header(&u),
        hex::encode(Sha256::digest(b"")),
    );
    let (_, signature) = signature_of(
        &canonical_request,
        credentials,
        &date,
        region,
        service,
        &amz_date,
        &scope,
    );
    u.query_pairs_mut()
        .append_pair("X-Amz-Signature", &signature);
    u
}

/// A Query API form body, encoded byte for byte as the AWS SDKs encode it.
///
/// AWS verifies the signature over the bytes it receives, so any correct
/// encoding works there; but servers that re-encode the parsed form before
/// checking the signature (moto does) only agree with this one: letters,
/// digits and `-_.~` as they are, space as `+`, everything else as `%XX`.
pub fn query_body<'a>(params: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    fn encode(out: &mut String, s: &str) {
        for b in s.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    out.push(b as char)
                }
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
    }
    let mut out = String::new();
    for (k, v) in params {
        if !out.is_empty() {
            out.push('&');
        }
        encode(&mut out, k);
        out.push('=');
        encode(&mut out, v);
    }
    out
}

/// `host[:port]` exactly as an HTTP client sends it (default ports omitted).
pub fn host_header(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    }
}

/// Trimmed, with runs of spaces collapsed to one.
fn canonical_header_value(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The path, each segment URI-encoded (once more, as every service but S3 wants).
fn canonical_uri(url: &Url) -> String {
    let path = url.path();
    if path.is_empty() {
        return "/".into();
    }
    path.split('/')
        .map(uri_encode)
        .collect::<Vec<_>>()
        .join("/")
}

/// Query parameters, decoded then re-encoded the SigV4 way, sorted.
fn canonical_query(url: &Url) -> String {
    let mut pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (uri_encode(&k), uri_encode(&v)))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// RFC 3986 encoding: everything but unreserved characters as `%XX`.
fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Runs `cmd` and collects its output, at most [`PROCESS_OUTPUT_LIMIT`]
/// bytes of each stream: more is an error at once, and the process is
/// killed (`kill_on_drop`) rather than read further.
async fn capped_output(mut cmd: tokio::process::Command) -> std::io::Result<std::process::Output> {
    use tokio::io::AsyncReadExt;
    let mut child = cmd.spawn()?;
    let too_long = || {
        std::io::Error::other(format!(
            "it printed more than {}, the most absconda reads",
            crate::util::human_bytes(PROCESS_OUTPUT_LIMIT as u64)
        ))
    };
    async fn read_capped(
        pipe: Option<impl tokio::io::AsyncRead + Unpin>,
    ) -> std::io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        if let Some(pipe) = pipe {
            pipe.take(PROCESS_OUTPUT_LIMIT as u64 + 1)
                .read_to_end(&mut buf)
                .await?;
        }
        Ok(buf)
    }
    let out_f = read_capped(child.stdout.take());
    let err_f = read_capped(child.stderr.take());
    tokio::pin!(out_f, err_f);
    let (mut stdout, mut stderr) = (None, None);
    // Whichever stream overflows first ends the wait: the other may never
    // close while the process blocks writing.
    while stdout.is_none() || stderr.is_none() {
        let (slot, got) = tokio::select! {
            r = &mut out_f, if stdout.is_none() => (&mut stdout, r?),
            r = &mut err_f, if stderr.is_none() => (&mut stderr, r?),
        };
        if got.len() > PROCESS_OUTPUT_LIMIT {
            return Err(too_long());
        }
        *slot = Some(got);
    }
    let (stdout, stderr) = (stdout.unwrap_or_default(), stderr.unwrap_or_default());
    let status = child.wait().await?;
    Ok(std::process::Output {
        status,
        stdout,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn credential_process_output_is_capped() {
        let run = |script: &str| {
            let mut c = tokio::process::Command::new("sh");
            c.arg("-c")
                .arg(script)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            capped_output(c)
        };
        let start = std::time::Instant::now();
        for script in [
            "head -c 100000000 /dev/zero",
            "head -c 100000000 /dev/zero >&2",
            "yes",
        ] {
            let err = run(script).await.unwrap_err();
            assert!(
                err.to_string().contains("printed more than 64.0 KiB"),
                "{err}"
            );
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        let ok = run("echo '{}'; echo note >&2").await.unwrap();
        assert_eq!(ok.stdout, b"{}\n");
        assert_eq!(ok.stderr, b"note\n");
    }

    use super::*;

    /// The AWS test suite's example key, joined here so it does not sit whole in the source.
    fn suite_credentials(token: Option<&str>) -> Credentials {
        Credentials::new(
            "AKIDEXAMPLE",
            ["wJalrXUtnFEMI", "K7MDENG+bPxRfiCYEXAMPLEKEY"].join("/"),
            token.map(str::to_string),
            CredentialSource::Explicit,
        )
    }

    fn suite_time() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2015-08-30T12:36:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    const SUITE_TOKEN: &str = "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==";

    /// Vectors from AWS's Signature Version 4 test suite
    /// (service `service`, region `us-east-1`, 2015-08-30T12:36:00Z).
    #[test]
    fn sigv4_test_suite_vectors() {
        struct Case {
            name: &'static str,
            method: &'static str,
            url: &'static str,
            headers: &'static [(&'static str, &'static str)],
            body: &'static str,
            token: Option<&'static str>,
            signed_headers: &'static str,
            signature: &'static str,
        }
        let cases = [
            Case {
                name: "get-vanilla",
                method: "GET",
                url: "https://example.amazonaws.com/",
                headers: &[],
                body: "",
                token: None,
                signed_headers: "host;x-amz-date",
                signature: "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            },
            Case {
                name: "post-vanilla",
                method: "POST",
                url: "https://example.amazonaws.com/",
                headers: &[],
                body: "",
                token: None,
                signed_headers: "host;x-amz-date",
                signature: "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
            },
            Case {
                name: "get-vanilla-query-order-key-case",
                method: "GET",
                url: "https://example.amazonaws.com/?Param2=value2&Param1=value1",
                headers: &[],
                body: "",
                token: None,
                signed_headers: "host;x-amz-date",
                signature: "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
            },
            Case {
                name: "post-header-value-case",
                method: "POST",
                url: "https://example.amazonaws.com/",
                headers: &[("My-Header1", "VALUE1")],
                body: "",
                token: None,
                signed_headers: "host;my-header1;x-amz-date",
                signature: "cdbc9802e29d2942e5e10b5bccfdd67c5f22c7c4e8ae67b53629efa58b974b7d",
            },
            Case {
                name: "post-x-www-form-urlencoded",
                method: "POST",
                url: "https://example.amazonaws.com/",
                headers: &[("Content-Type", "application/x-www-form-urlencoded")],
                body: "Param1=value1",
                token: None,
                signed_headers: "content-type;host;x-amz-date",
                signature: "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
            },
            Case {
                name: "post-sts-header-before",
                method: "POST",
                url: "https://example.amazonaws.com/",
                headers: &[],
                body: "",
                token: Some(SUITE_TOKEN),
                signed_headers: "host;x-amz-date;x-amz-security-token",
                signature: "85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead",
            },
        ];
        for case in cases {
            let url = Url::parse(case.url).unwrap();
            let req = SigningRequest {
                method: case.method,
                url: &url,
                headers: case.headers,
                body: case.body.as_bytes(),
            };
            let creds = suite_credentials(case.token);
            let signed = sign(&req, &creds, "us-east-1", "service", suite_time());
            let expected = format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
                 SignedHeaders={}, Signature={}",
                case.signed_headers, case.signature
            );
            assert_eq!(
                signed.get("authorization"),
                Some(expected.as_str()),
                "{}",
                case.name
            );
            assert_eq!(signed.get("x-amz-date"), Some("20150830T123600Z"));
            assert_eq!(
                signed.get("x-amz-security-token"),
                case.token,
                "{}",
                case.name
            );
        }
    }

    /// The suite's intermediate steps for post-x-www-form-urlencoded.
    #[test]
    fn sigv4_canonical_request_and_string_to_sign() {
        let url = Url::parse("https://example.amazonaws.com/").unwrap();
        let req = SigningRequest {
            method: "POST",
            url: &url,
            headers: &[("Content-Type", "application/x-www-form-urlencoded")],
            body: b"Param1=value1",
        };
        let sig = signature(
            &req,
            &suite_credentials(None),
            "us-east-1",
            "service",
            suite_time(),
        );
        assert_eq!(
            sig.canonical_request,
            "POST\n/\n\ncontent-type:application/x-www-form-urlencoded\nhost:example.amazonaws.com\n\
             x-amz-date:20150830T123600Z\n\ncontent-type;host;x-amz-date\n\
             9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e"
        );
        assert!(sig.string_to_sign.starts_with(
            "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n"
        ));
    }

    /// The worked example of AWS's "create a signed request" documentation:
    /// IAM ListUsers, with its published string to sign and signature.
    #[test]
    fn sigv4_documentation_example_iam_list_users() {
        let url =
            Url::parse("https://iam.amazonaws.com/?Action=ListUsers&Version=2010-05-08").unwrap();
        let req = SigningRequest {
            method: "GET",
            url: &url,
            headers: &[(
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8",
            )],
            body: b"",
        };
        let sig = signature(
            &req,
            &suite_credentials(None),
            "us-east-1",
            "iam",
            suite_time(),
        );
        assert_eq!(
            sig.string_to_sign,
            "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/iam/aws4_request\n\
             f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59"
        );
        assert_eq!(
            sig.signature,
            "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
    }

    /// An EC2 Query API request exactly as absconda sends it, with the
    /// signature botocore (the AWS SDK for Python) computes for it.
    #[test]
    fn sigv4_ec2_query_request_matches_botocore() {
        let url = Url::parse("https://ec2.eu-west-1.amazonaws.com/").unwrap();
        let body = "Action=StartInstances&Version=2016-11-15&InstanceId.1=i-0123456789abcdef0";
        let req = SigningRequest {
            method: "POST",
            url: &url,
            headers: &[(
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8",
            )],
            body: body.as_bytes(),
        };
        let time = DateTime::parse_from_rfc3339("2026-11-27T10:20:30Z")
            .unwrap()
            .with_timezone(&Utc);
        let signed = sign(&req, &suite_credentials(None), "eu-west-1", "ec2", time);
        assert_eq!(
            signed.get("authorization"),
            Some(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261127/eu-west-1/ec2/aws4_request, \
                 SignedHeaders=content-type;host;x-amz-date, \
                 Signature=9d62061c08fe5b1e850c14b5109c8ec31ffa7441bf6486e27947d1779a0cc699"
            )
        );
    }

    #[test]
    fn query_bodies_are_encoded_like_the_sdks() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("Action", "DescribeInstances"), ("Version", "2016-11-15")],
                "Action=DescribeInstances&Version=2016-11-15",
            ),
            (
                &[
                    ("Filter.1.Name", "tag:Name"),
                    ("Filter.1.Value.1", "my builder"),
                ],
                "Filter.1.Name=tag%3AName&Filter.1.Value.1=my+builder",
            ),
            (
                &[("P", r#"{"Action":"*","R":"a/b~c+d&e=f"}"#)],
                "P=%7B%22Action%22%3A%22%2A%22%2C%22R%22%3A%22a%2Fb~c%2Bd%26e%3Df%22%7D",
            ),
            (&[("Name", "caf\u{e9}")], "Name=caf%C3%A9"),
            (&[], ""),
        ];
        for (params, body) in cases {
            assert_eq!(query_body(params.iter().copied()), *body);
        }
    }

    #[test]
    fn host_header_keeps_non_default_ports() {
        let cases = [
            (
                "https://ec2.us-east-1.amazonaws.com/",
                "ec2.us-east-1.amazonaws.com",
            ),
            (
                "https://ec2.us-east-1.amazonaws.com:443/",
                "ec2.us-east-1.amazonaws.com",
            ),
            ("http://127.0.0.1:5000/", "127.0.0.1:5000"),
            ("http://[::1]:5000/", "[::1]:5000"),
        ];
        for (url, host) in cases {
            assert_eq!(host_header(&Url::parse(url).unwrap()), host, "{url}");
        }
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let creds = suite_credentials(Some(SUITE_TOKEN));
        let shown = format!("{creds:?}");
        assert!(shown.contains("AKIDEXAMPLE"));
        assert!(!shown.contains("EXAMPLEKEY"));
        assert!(!shown.contains("AQoDYXdzEPT"));
        let url = Url::parse("https://example.amazonaws.com/").unwrap();
        let req = SigningRequest {
            method: "POST",
            url: &url,
            headers: &[],
            body: b"",
        };
        let signed = sign(&req, &creds, "us-east-1", "service", suite_time());
        let shown = format!("{signed:?}");
        assert!(!shown.contains("85d96828"), "{shown}");
        assert!(!shown.contains("AQoDYXdzEPT"), "{shown}");
        let env = Env::from_pairs([("AWS_SECRET_ACCESS_KEY", "hunter2")]);
        assert!(!format!("{env:?}").contains("hunter2"));
    }

    #[test]
    fn profile_files_parse_like_the_aws_cli() {
        struct Case {
            name: &'static str,
            kind: ProfileFileKind,
            text: &'static str,
            profile: &'static str,
            key: &'static str,
            value: Option<&'static str>,
        }
        let cases = [
            Case {
                name: "credentials: plain section",
                kind: ProfileFileKind::Credentials,
                text: "[default]\naws_access_key_id = AKIA1\naws_secret_access_key=abc/def+g==\n",
                profile: "default",
                key: "aws_secret_access_key",
                value: Some("abc/def+g=="),
            },
            Case {
                name: "credentials: `profile x` is a literal name there",
                kind: ProfileFileKind::Credentials,
                text: "[profile dev]\naws_access_key_id = AKIA1\n",
                profile: "dev",
                key: "aws_access_key_id",
                value: None,
            },
            Case {
                name: "config: profile prefix",
                kind: ProfileFileKind::Config,
                text: "[profile  dev ]\nregion = eu-west-1\n",
                profile: "dev",
                key: "region",
                value: Some("eu-west-1"),
            },
            Case {
                name: "config: default without prefix",
                kind: ProfileFileKind::Config,
                text: "[default]\nregion = us-west-2\n",
                profile: "default",
                key: "region",
                value: Some("us-west-2"),
            },
            Case {
                name: "config: default with prefix",
                kind: ProfileFileKind::Config,
                text: "[profile default]\nregion = us-west-2\n",
                profile: "default",
                key: "region",
                value: Some("us-west-2"),
            },
            Case {
                name: "config: a bare name is not a profile",
                kind: ProfileFileKind::Config,
                text: "[dev]\nregion = us-west-2\n",
                profile: "dev",
                key: "region",
                value: None,
            },
            Case {
                name: "config: sso-session sections are not profiles",
                kind: ProfileFileKind::Config,
                text: "[sso-session dev]\nsso_region = us-east-1\n[profilex]\nregion=a\n",
                profile: "dev",
                key: "sso_region",
                value: None,
            },
            Case {
                name: "comments and blank lines",
                kind: ProfileFileKind::Credentials,
                text: "# top\n\n[dev] ; trailing\n; note\naws_access_key_id = AKIA2\n",
                profile: "dev",
                key: "aws_access_key_id",
                value: Some("AKIA2"),
            },
            Case {
                name: "keys are case-insensitive",
                kind: ProfileFileKind::Credentials,
                text: "[dev]\nAWS_Access_Key_ID = AKIA3\n",
                profile: "dev",
                key: "aws_access_key_id",
                value: Some("AKIA3"),
            },
            Case {
                name: "a # inside a value stays",
                kind: ProfileFileKind::Credentials,
                text: "[dev]\naws_secret_access_key = ab#cd ;x\n",
                profile: "dev",
                key: "aws_secret_access_key",
                value: Some("ab#cd ;x"),
            },
            Case {
                name: "credential_process keeps its arguments",
                kind: ProfileFileKind::Config,
                text: "[profile p]\ncredential_process = /usr/bin/get-creds --profile \"a b\"\n",
                profile: "p",
                key: "credential_process",
                value: Some("/usr/bin/get-creds --profile \"a b\""),
            },
            Case {
                name: "nested settings do not leak into the profile",
                kind: ProfileFileKind::Config,
                text: "[profile p]\ns3 =\n  max_concurrent_requests = 20\nregion = eu-north-1\n",
                profile: "p",
                key: "max_concurrent_requests",
                value: None,
            },
            Case {
                name: "a repeated section adds to the first",
                kind: ProfileFileKind::Credentials,
                text: "[a]\nx = 1\n[b]\ny = 2\n[a]\nz = 3\n",
                profile: "a",
                key: "x",
                value: Some("1"),
            },
            Case {
                name: "CRLF line ends",
                kind: ProfileFileKind::Credentials,
                text: "[a]\r\naws_access_key_id = AKIA4\r\n",
                profile: "a",
                key: "aws_access_key_id",
                value: Some("AKIA4"),
            },
        ];
        for case in cases {
            let profiles = parse_profile_file(case.text, case.kind);
            let got = profiles
                .get(case.profile)
                .and_then(|p| p.get(case.key))
                .map(String::as_str);
            assert_eq!(got, case.value, "{}", case.name);
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn base_env(dir: &Path) -> Env {
        Env::from_pairs([
            ("HOME", dir.to_str().unwrap()),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ])
    }

    #[tokio::test]
    async fn environment_variables_come_first() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "creds",
            "[default]\naws_access_key_id=FILE\naws_secret_access_key=s\n",
        );
        let env = base_env(dir.path())
            .with(
                "AWS_SHARED_CREDENTIALS_FILE",
                dir.path().join("creds").to_str().unwrap(),
            )
            .with("AWS_ACCESS_KEY_ID", "ENVKEY")
            .with("AWS_SECRET_ACCESS_KEY", "envsecret")
            .with("AWS_SESSION_TOKEN", "envtoken");
        let creds = CredentialChain::new(env.clone(), None)
            .credentials()
            .await
            .unwrap();
        assert_eq!(creds.access_key_id, "ENVKEY");
        assert!(creds.has_session_token());
        assert_eq!(creds.source, CredentialSource::Environment);

        // A profile named by the builder's config wins over the environment.
        let creds = CredentialChain::new(env, Some("default"))
            .credentials()
            .await
            .unwrap();
        assert_eq!(creds.access_key_id, "FILE");
    }

    #[tokio::test]
    async fn profiles_from_both_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".aws")).unwrap();
        write(
            &dir.path().join(".aws"),
            "credentials",
            "[default]\naws_access_key_id=DEFAULTKEY\naws_secret_access_key=s\n",
        );
        write(
            &dir.path().join(".aws"),
            "config",
            "[profile dev]\naws_access_key_id=DEVKEY\naws_secret_access_key=s\naws_session_token=t\nregion=eu-west-3\n\
             [profile empty]\nregion=eu-west-1\n",
        );
        let env = base_env(dir.path());
        let creds = CredentialChain::new(env.clone(), None)
            .credentials()
            .await
            .unwrap();
        assert_eq!(creds.access_key_id, "DEFAULTKEY");
        assert_eq!(
            creds.source.to_string(),
            "profile `default` in `~/.aws/credentials`"
        );

        let creds = CredentialChain::new(env.clone().with("AWS_PROFILE", "dev"), None)
            .credentials()
            .await
            .unwrap();
        assert_eq!(creds.access_key_id, "DEVKEY");
        assert!(creds.has_session_token());
        assert_eq!(creds.source.to_string(), "profile `dev` in `~/.aws/config`");
        assert_eq!(profile_region(&env, "dev").as_deref(), Some("eu-west-3"));

        // The builder's profile wins over AWS_PROFILE.
        let creds = CredentialChain::new(env.clone().with("AWS_PROFILE", "dev"), Some("default"))
            .credentials()
            .await
            .unwrap();
        assert_eq!(creds.access_key_id, "DEFAULTKEY");

        let err = CredentialChain::new(env.clone(), Some("nope"))
            .credentials()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no profile `nope`"), "{err}");

        let err = CredentialChain::new(env, Some("empty"))
            .credentials()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("neither"), "{err}");
    }

    #[tokio::test]
    async fn nothing_found_says_what_was_tried() {
        let dir = tempfile::tempdir().unwrap();
        let err = CredentialChain::new(base_env(dir.path()), None)
            .credentials()
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, CloudError::Auth { .. }));
        assert!(text.contains("environment variables (not set)"), "{text}");
        assert!(text.contains("profile `default`"), "{text}");
        assert!(text.contains("AWS_EC2_METADATA_DISABLED"), "{text}");
    }

    #[tokio::test]
    async fn credential_process_output_is_used_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let counter = dir.path().join("count");
        let script = write(
            dir.path(),
            "creds.sh",
            &format!(
                "#!/bin/sh\necho x >> '{}'\nprintf '{{\"Version\": 1, \"AccessKeyId\": \"PROCKEY\", \
                 \"SecretAccessKey\": \"s\", \"SessionToken\": \"t\", \"Expiration\": \"%s\"}}' \"$EXP\"\n",
                counter.display()
            ),
        );
        let config = |exp: &str| {
            format!(
                "[profile p]\ncredential_process = env EXP={exp} sh '{}'\n",
                script.display()
            )
        };
        let runs = || {
            std::fs::read_to_string(&counter)
                .map(|s| s.lines().count())
                .unwrap_or(0)
        };
        let env = base_env(dir.path()).with(
            "AWS_CONFIG_FILE",
            dir.path().join("config").to_str().unwrap(),
        );

        // Valid for an hour: the process runs once.
        let later = (Utc::now() + chrono::TimeDelta::hours(1)).to_rfc3339();
        write(dir.path(), "config", &config(&later));
        let chain = CredentialChain::new(env.clone(), Some("p"));
        for _ in 0..3 {
            let creds = chain.credentials().await.unwrap();
            assert_eq!(creds.access_key_id, "PROCKEY");
            assert_eq!(
                creds.source.to_string(),
                "credential_process of profile `p`"
            );
        }
        assert_eq!(runs(), 1);

        // About to expire: asked again at every use.
        let soon = (Utc::now() + chrono::TimeDelta::minutes(2)).to_rfc3339();
        write(dir.path(), "config", &config(&soon));
        let chain = CredentialChain::new(env.clone(), Some("p"));
        chain.credentials().await.unwrap();
        chain.credentials().await.unwrap();
        assert_eq!(runs(), 3);

        // Already expired: an error naming the source.
        write(dir.path(), "config", &config("2020-01-01T00:00:00Z"));
        let err = CredentialChain::new(env.clone(), Some("p"))
            .credentials()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
        assert!(
            err.to_string()
                .contains("credential_process of profile `p`"),
            "{err}"
        );

        // A failing process: its stderr is shown, its stdout is not.
        write(
            dir.path(),
            "config",
            "[profile p]\ncredential_process = sh -c 'echo SECRETOUT; echo locked vault >&2; exit 3'\n",
        );
        let err = CredentialChain::new(env.clone(), Some("p"))
            .credentials()
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("locked vault"), "{text}");
        assert!(!text.contains("SECRETOUT"), "{text}");

        // Output that is not the expected JSON: no part of it is echoed.
        write(
            dir.path(),
            "config",
            "[profile p]\ncredential_process = echo '{\"Version\": \"SECRETVALUE\"}'\n",
        );
        let err = CredentialChain::new(env, Some("p"))
            .credentials()
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("expected JSON"), "{text}");
        assert!(!text.contains("SECRETVALUE"), "{text}");
    }

    /// A tiny IMDSv2 on loopback: a token is required for every metadata read.
    #[tokio::test]
    async fn imds_v2_token_then_role_credentials() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..3 {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let n = sock.read(&mut buf).await.unwrap();
                let req = String::from_utf8_lossy(&buf[..n]).to_lowercase();
                let first = req.lines().next().unwrap_or_default().to_string();
                let body = if first.starts_with("put /latest/api/token")
                    && req.contains("x-aws-ec2-metadata-token-ttl-seconds: 21600")
                {
                    "TOKEN123".to_string()
                } else if !req.contains("x-aws-ec2-metadata-token: token123") {
                    String::new()
                } else if first.starts_with("get /latest/meta-data/iam/security-credentials/ ") {
                    "builder-role\n".to_string()
                } else if first
                    .starts_with("get /latest/meta-data/iam/security-credentials/builder-role ")
                {
                    format!(
                        "{{\"Code\":\"Success\",\"Type\":\"AWS-HMAC\",\"AccessKeyId\":\"ASIAIMDS\",\
                         \"SecretAccessKey\":\"s\",\"Token\":\"t\",\"Expiration\":\"{}\"}}",
                        (Utc::now() + chrono::TimeDelta::hours(6)).to_rfc3339()
                    )
                } else {
                    String::new()
                };
                let status = if body.is_empty() {
                    "401 Unauthorized"
                } else {
                    "200 OK"
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                sock.write_all(resp.as_bytes()).await.unwrap();
                seen.push(first);
            }
            seen
        });
        let dir = tempfile::tempdir().unwrap();
        let env = Env::from_pairs([
            ("HOME", dir.path().to_str().unwrap().to_string()),
            (
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                format!("http://{addr}/"),
            ),
        ]);
        let creds = CredentialChain::new(env, None).credentials().await.unwrap();
        assert_eq!(creds.access_key_id, "ASIAIMDS");
        assert!(creds.has_session_token());
        assert!(creds.expiration.is_some());
        assert_eq!(
            creds.source.to_string(),
            format!("EC2 instance metadata (IMDSv2) at `http://{addr}`")
        );
        let seen = server.await.unwrap();
        assert!(seen[0].starts_with("put /latest/api/token"), "{seen:?}");
    }

    #[tokio::test]
    async fn imds_that_does_not_answer_ends_the_chain_quickly() {
        // A port nothing listens on: connection refused at once.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let dir = tempfile::tempdir().unwrap();
        let env = Env::from_pairs([
            ("HOME", dir.path().to_str().unwrap().to_string()),
            (
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                format!("http://{addr}"),
            ),
        ]);
        let started = std::time::Instant::now();
        let err = CredentialChain::new(env, None)
            .credentials()
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            err.to_string().contains("no AWS credentials found"),
            "{err}"
        );
    }
}
