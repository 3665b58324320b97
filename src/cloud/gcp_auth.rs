//! Google credentials for the compute API, found the way `gcloud` and the
//! Google client libraries find them (Application Default Credentials).
//!
//! The search order follows AIP-4110: the file named by
//! `GOOGLE_APPLICATION_CREDENTIALS`, then gcloud's
//! `application_default_credentials.json` (in `$CLOUDSDK_CONFIG`, else
//! `~/.config/gcloud`), then the metadata server of the VM we run on
//! (`GCE_METADATA_HOST` overrides its address). absconda does the search
//! itself so that every authentication error can say which source was used
//! and what to check.
//!
//! Every token is absconda's own ([`super::gcp_token`]), fetched with the
//! one HTTP client whose trust roots are the system store or the built-in
//! ones, plus `ca_file:`:
//! - a service account key: a self-signed JWT, no request;
//! - an `authorized_user` file: its refresh token posted to its `token_uri`;
//! - the metadata server: `GET …/token` with `Metadata-Flavor: Google`;
//! - an `impersonated_service_account` file: its `source_credentials`' token
//!   (a user's refresh token, or a service account key's JWT-bearer grant),
//!   then IAM Credentials' `generateAccessToken` for the service account;
//! - an `external_account` file (workload identity federation): the STS
//!   token exchange of a subject token from a file, a URL or AWS (a signed
//!   `GetCallerIdentity` request, keys from the environment or the
//!   instance's metadata), then `generateAccessToken` when the file names a
//!   service account to impersonate; an `executable` source is refused (it
//!   would run a program).
//!
//! When nothing is configured and the metadata server is only a guess, a
//! short probe decides whether it exists, so a laptop without credentials
//! gets a clear error at once instead of retries against
//! `metadata.google.internal` until the deadline.
//!
//! Tokens, refresh tokens, client secrets and private keys never leave this
//! module except inside the `Authorization` header, which is marked sensitive.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use serde_json::Value;
use tokio::sync::OnceCell;

use super::CloudError;
use super::gcp_token::{
    AwsSubject, GOOGLE_TOKEN_URI, Grant, ServiceAccountKey, Subject, TokenError, TokenSource,
};

/// The metadata server's host when nothing overrides it.
pub const DEFAULT_METADATA_HOST: &str = "metadata.google.internal";

/// How long the probe for an unconfigured metadata server may take.
const METADATA_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

const IAM_ROLE: &str = "roles/compute.instanceAdmin.v1";

/// Where the credentials came from, for messages. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    /// A JSON credentials file named by `GOOGLE_APPLICATION_CREDENTIALS`.
    EnvFile {
        path: PathBuf,
        /// The file's `type`: `service_account`, `authorized_user`, …
        kind: String,
        /// The service account's `client_email`, when the file has one.
        principal: Option<String>,
    },
    /// gcloud's `application_default_credentials.json`, written by
    /// `gcloud auth application-default login`.
    GcloudFile {
        path: PathBuf,
        kind: String,
        principal: Option<String>,
    },
    /// The metadata server of the VM absconda runs on.
    MetadataServer {
        host: String,
        /// Whether `GCE_METADATA_HOST` named it, rather than it being the
        /// last resort of the search.
        explicit: bool,
        /// The gcloud file that was looked for and not found.
        searched: Option<PathBuf>,
    },
}

impl fmt::Display for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialSource::EnvFile {
                path,
                kind,
                principal,
            } => {
                write!(f, "{} `{}`", file_label(kind), path.display())?;
                if let Some(p) = principal {
                    write!(f, " for `{p}`")?;
                }
                f.write_str(" (from GOOGLE_APPLICATION_CREDENTIALS)")
            }
            CredentialSource::GcloudFile {
                path,
                kind,
                principal,
            } => {
                write!(
                    f,
                    "gcloud application-default credentials `{}` ({}",
                    path.display(),
                    kind
                )?;
                if let Some(p) = principal {
                    write!(f, " `{p}`")?;
                }
                f.write_str(")")
            }
            CredentialSource::MetadataServer { host, explicit, .. } => {
                write!(f, "the metadata server at `{host}`")?;
                if *explicit {
                    f.write_str(" (from GCE_METADATA_HOST)")
                } else {
                    f.write_str(
                        " (no GOOGLE_APPLICATION_CREDENTIALS and no gcloud credentials file)",
                    )
                }
            }
        }
    }
}

fn file_label(kind: &str) -> &'static str {
    match kind {
        "service_account" => "service account key file",
        "authorized_user" => "user credentials file",
        "impersonated_service_account" => "impersonated service account file",
        "external_account" => "workload identity federation file",
        _ => "credentials file",
    }
}

impl CredentialSource {
    /// What the user should check when the API rejects these credentials.
    pub fn hint(&self) -> String {
        match self {
            CredentialSource::EnvFile {
                path,
                kind,
                principal,
            }
            | CredentialSource::GcloudFile {
                path,
                kind,
                principal,
            } => match kind.as_str() {
                "service_account" => format!(
                    "check that the key in `{}` has not been deleted or disabled and that `{}` \
                     has the role {IAM_ROLE} (Compute Instance Admin) on the project",
                    path.display(),
                    principal.as_deref().unwrap_or("the service account"),
                ),
                "authorized_user" => format!(
                    "run `gcloud auth application-default login` again (the refresh token in `{}` \
                     may be expired or revoked) and check that your account has the role \
                     {IAM_ROLE} on the project",
                    path.display()
                ),
                "impersonated_service_account" => format!(
                    "check the `source_credentials` in `{}` (a key that has not been deleted or \
                     disabled, or a current login), that they may impersonate the service \
                     account (roles/iam.serviceAccountTokenCreator), and that the service \
                     account has the role {IAM_ROLE} on the project",
                    path.display()
                ),
                "external_account" => format!(
                    "check that the workload identity pool provider named by `audience` in `{}` \
                     accepts this workload's identity (its OIDC token, or its AWS account and \
                     keys), and that the principal or the impersonated service account has \
                     the role {IAM_ROLE} on the project",
                    path.display()
                ),
                _ => format!(
                    "check the credentials file `{}` and that its identity has the role \
                     {IAM_ROLE} on the project",
                    path.display()
                ),
            },
            CredentialSource::MetadataServer {
                explicit: false,
                searched,
                ..
            } => format!(
                "set GOOGLE_APPLICATION_CREDENTIALS to a service account key file or run \
                 `gcloud auth application-default login`{}; on a GCE VM, check that its service \
                 account has the role {IAM_ROLE} and the VM the `cloud-platform` access scope",
                searched
                    .as_ref()
                    .map(|p| format!(" (looked for `{}`)", p.display()))
                    .unwrap_or_default()
            ),
            CredentialSource::MetadataServer { host, .. } => format!(
                "check that the metadata server at `{host}` answers and that the VM's service \
                 account has the role {IAM_ROLE} and the `cloud-platform` access scope"
            ),
        }
    }

    /// The endpoint tokens are fetched from, for transport errors.
    fn endpoint(&self, config: Option<&Value>) -> String {
        match self {
            CredentialSource::MetadataServer { host, .. } => {
                format!("http://{host}/computeMetadata/v1/instance/service-accounts/default/token")
            }
            _ => config
                .and_then(|c| c.get("token_uri"))
                .and_then(Value::as_str)
                .unwrap_or("https://oauth2.googleapis.com/token")
                .to_string(),
        }
    }
}

/// Application Default Credentials for one `Gce` provider.
pub struct GcpAuth {
    source: CredentialSource,
    /// The credentials file's JSON. Holds secrets: never printed.
    config: Option<Value>,
    /// The outcome of probing an unconfigured metadata server.
    probe: OnceCell<bool>,
    /// Where tokens come from; `Err` says why the file cannot be used.
    own: Result<TokenSource, String>,
}

impl fmt::Debug for GcpAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcpAuth")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl GcpAuth {
    /// Searches the process environment for credentials.
    pub fn from_env() -> Result<GcpAuth, CloudError> {
        GcpAuth::from_lookup(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// Searches for credentials with `lookup` standing in for the process
    /// environment (`GOOGLE_APPLICATION_CREDENTIALS`, `CLOUDSDK_CONFIG`,
    /// `HOME`, `GCE_METADATA_HOST`). Reads the credentials file, if any; the
    /// network is only used when a token is first needed.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<GcpAuth, CloudError> {
        if let Some(path) = lookup("GOOGLE_APPLICATION_CREDENTIALS") {
            let path = PathBuf::from(path);
            let (config, kind, principal) = read_credentials_file(&path, true)?;
            return Ok(GcpAuth::new(
                CredentialSource::EnvFile {
                    path,
                    kind,
                    principal,
                },
                Some(config),
            ));
        }
        let gcloud_dir = lookup("CLOUDSDK_CONFIG")
            .map(PathBuf::from)
            .or_else(|| lookup("HOME").map(|h| Path::new(&h).join(".config/gcloud")));
        let well_known = gcloud_dir.map(|d| d.join("application_default_credentials.json"));
        if let Some(path) = &well_known
            && path.exists()
        {
            let (config, kind, principal) = read_credentials_file(path, false)?;
            return Ok(GcpAuth::new(
                CredentialSource::GcloudFile {
                    path: path.clone(),
                    kind,
                    principal,
                },
                Some(config),
            ));
        }
        let (host, explicit) = match lookup("GCE_METADATA_HOST") {
            Some(host) => (host, true),
            None => (DEFAULT_METADATA_HOST.to_string(), false),
        };
        Ok(GcpAuth::new(
            CredentialSource::MetadataServer {
                host,
                explicit,
                searched: well_known,
            },
            None,
        ))
    }

    fn new(source: CredentialSource, config: Option<Value>) -> GcpAuth {
        let own = own_grant(&source, config.as_ref()).map(TokenSource::new);
        GcpAuth {
            source,
            config,
            probe: OnceCell::new(),
            own,
        }
    }

    /// Which credentials are in use, for messages.
    pub fn source(&self) -> &CredentialSource {
        &self.source
    }

    /// An authentication error naming the source and what to check.
    pub fn auth_error(&self, message: impl fmt::Display) -> CloudError {
        let message = message.to_string();
        CloudError::Auth {
            source_name: self.source.to_string(),
            message: format!(
                "{}; hint: {}",
                message.trim_end_matches('.'),
                self.source.hint()
            ),
        }
    }

    /// The headers that authenticate one API request: `Authorization`
    /// (marked sensitive) and, for a credentials file with a quota project,
    /// `x-goog-user-project`.
    pub async fn headers(&self) -> Result<HeaderMap, CloudError> {
        if let CredentialSource::MetadataServer {
            host,
            explicit: false,
            ..
        } = &self.source
        {
            let present = *self.probe.get_or_init(|| probe_metadata(host)).await;
            if !present {
                return Err(self.auth_error("no credentials found"));
            }
        }
        self.own_headers(&self.own).await
    }

    /// The email of the account these credentials act as, for OS Login:
    /// a service account key's `client_email`, the metadata server's
    /// default service account, or, for user credentials, what Google's
    /// `tokeninfo` endpoint (next to the file's `token_uri`) says the
    /// token belongs to.
    pub async fn account_email(&self) -> Result<String, CloudError> {
        let principal = match &self.source {
            CredentialSource::EnvFile { principal, .. }
            | CredentialSource::GcloudFile { principal, .. } => principal.clone(),
            CredentialSource::MetadataServer { .. } => None,
        };
        if let Some(p) = principal {
            return Ok(p);
        }
        let client = super::http::builder()
            .map_err(|e| self.auth_error(e.to_string()))?
            .timeout(Duration::from_secs(15))
            .no_proxy()
            .build()
            .map_err(|e| self.auth_error(format!("cannot make an HTTP client: {e}")))?;
        let (url, request) = match &self.source {
            CredentialSource::MetadataServer { host, .. } => {
                let url = format!(
                    "http://{host}/computeMetadata/v1/instance/service-accounts/default/email"
                );
                let request = client.get(&url).header("Metadata-Flavor", "Google");
                (url, request)
            }
            _ => {
                let token_uri = self.source.endpoint(self.config.as_ref());
                let mut url = url::Url::parse(&token_uri)
                    .map_err(|e| self.auth_error(format!("bad `token_uri` ({e})")))?;
                url.set_path("/tokeninfo");
                url.set_query(None);
                let shown = url.to_string();
                let headers = self.headers().await?;
                let token = headers
                    .get(reqwest::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .ok_or_else(|| self.auth_error("the credentials gave no bearer token"))?
                    .to_string();
                // The documented form; the URL is only ever shown without it.
                url.query_pairs_mut().append_pair("access_token", &token);
                let request = client.get(url.as_str());
                (shown, request)
            }
        };
        let failed = |why: String| {
            self.auth_error(format!(
                "cannot tell which account the credentials belong to (needed for OS Login): {why}"
            ))
        };
        let response = request
            .send()
            .await
            .map_err(|e| failed(format!("{url}: {}", e.without_url())))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| failed(format!("{url}: {}", e.without_url())))?;
        if !status.is_success() {
            return Err(failed(format!("{url} answered {status}")));
        }
        let email = match &self.source {
            CredentialSource::MetadataServer { .. } => text.trim().to_string(),
            _ => serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("email").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_default(),
        };
        if email.is_empty() || !email.contains('@') {
            return Err(failed(format!(
                "{url} named no account email (the token may lack the `userinfo.email` scope)"
            )));
        }
        Ok(email)
    }

    /// The headers from absconda's own token fetch.
    async fn own_headers(
        &self,
        own: &Result<TokenSource, String>,
    ) -> Result<HeaderMap, CloudError> {
        let tokens = own.as_ref().map_err(|why| self.auth_error(why))?;
        let value = match tokens.authorization().await {
            Ok(v) => v,
            Err(TokenError::Refused(what)) => {
                return Err(self.auth_error(format!("no access token: {what}")));
            }
            Err(TokenError::Cloud(e)) => return Err(e),
        };
        let mut value = HeaderValue::from_str(&value)
            .map_err(|_| self.auth_error("the access token is not a valid header value"))?;
        value.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, value);
        // What Google's client libraries send for a credentials file with a
        // quota project (any type): the project billed for the API calls.
        if let Some(project) = self
            .config
            .as_ref()
            .and_then(|c| c.get("quota_project_id"))
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
            && let Ok(v) = HeaderValue::from_str(project)
        {
            headers.insert("x-goog-user-project", v);
        }
        Ok(headers)
    }

    /// Drops the cached token so the next request fetches a new one (after
    /// the API refused it).
    pub fn forget(&self) {
        if let Ok(tokens) = &self.own {
            tokens.forget();
        }
    }
}

/// The grant of the metadata server or of a credentials file. The error
/// says what the file lacks or why absconda cannot use it.
fn own_grant(source: &CredentialSource, config: Option<&Value>) -> Result<Grant, String> {
    match (source, config) {
        (CredentialSource::MetadataServer { host, .. }, _) => {
            Ok(Grant::Metadata { host: host.clone() })
        }
        (_, Some(config)) => file_grant(config, &super::aws_auth::Env::from_process()),
        (_, None) => Err("the credentials file was not loaded".into()),
    }
}

fn text(v: &Value, name: &str) -> Option<String> {
    v.get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// The grant of a credentials file's JSON, by its `type`.
fn file_grant(config: &Value, env: &super::aws_auth::Env) -> Result<Grant, String> {
    let required =
        |name: &str| text(config, name).ok_or_else(|| format!("the file has no `{name}`"));
    match config
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
    {
        // A key signs its own token for the API (AIP-4111): no request.
        "service_account" => Ok(Grant::SelfSignedJwt {
            key: ServiceAccountKey::from_json(config)?,
        }),
        "authorized_user" => Ok(Grant::RefreshToken {
            endpoint: text(config, "token_uri").unwrap_or_else(|| GOOGLE_TOKEN_URI.to_string()),
            client_id: required("client_id")?,
            client_secret: required("client_secret")?,
            refresh_token: required("refresh_token")?,
        }),
        "impersonated_service_account" => {
            let inner = config
                .get("source_credentials")
                .ok_or("the file has no `source_credentials`")?;
            let source =
                source_grant(inner, env).map_err(|e| format!("its `source_credentials`: {e}"))?;
            Ok(Grant::Impersonate {
                url: required("service_account_impersonation_url")?,
                delegates: config
                    .get("delegates")
                    .and_then(Value::as_array)
                    .map(|d| {
                        d.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
                source: Box::new(TokenSource::new(source)),
            })
        }
        "external_account" => {
            let sts = sts_grant(config, env)?;
            Ok(match text(config, "service_account_impersonation_url") {
                Some(url) => Grant::Impersonate {
                    url,
                    delegates: Vec::new(),
                    source: Box::new(TokenSource::new(sts)),
                },
                None => sts,
            })
        }
        "" => Err("the file has no `type`".into()),
        other => Err(format!(
            "credentials of type `{other}` are not supported; use a service account key, \
             `gcloud auth application-default login`, or a workload identity federation file"
        )),
    }
}

/// The token that authorises an impersonation: a service account key's
/// through the JWT-bearer grant (IAM Credentials takes an OAuth access
/// token), any other type as if it were the file.
fn source_grant(inner: &Value, env: &super::aws_auth::Env) -> Result<Grant, String> {
    match inner.get("type").and_then(Value::as_str) {
        Some("service_account") => Ok(Grant::JwtBearer {
            key: ServiceAccountKey::from_json(inner)?,
        }),
        _ => file_grant(inner, env),
    }
}

/// The token exchange of an `external_account` file: its subject token from
/// a file, a URL or AWS (`environment_id: aws1`); an executable source is
/// refused, as it would run a program.
fn sts_grant(config: &Value, env: &super::aws_auth::Env) -> Result<Grant, String> {
    let source = config
        .get("credential_source")
        .ok_or("the file has no `credential_source`")?;
    let json_field = match source.get("format") {
        Some(f) if text(f, "type").as_deref() == Some("json") => Some(
            text(f, "subject_token_field_name")
                .ok_or("the `format` of `credential_source` has no `subject_token_field_name`")?,
        ),
        _ => None,
    };
    let subject = if let Some(id) = text(source, "environment_id") {
        if id != "aws1" {
            return Err(format!(
                "its `credential_source` has `environment_id: {id}`; absconda knows `aws1` \
                 (AWS, version 1) only"
            ));
        }
        Subject::Aws(AwsSubject {
            verification_url: text(source, "regional_cred_verification_url").unwrap_or_else(|| {
                "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15"
                    .to_string()
            }),
            region_url: text(source, "region_url"),
            credentials_url: text(source, "url"),
            imdsv2_url: text(source, "imdsv2_session_token_url"),
            env: env.clone(),
        })
    } else if let Some(path) = text(source, "file") {
        Subject::File {
            path: path.into(),
            json_field,
        }
    } else if let Some(url) = text(source, "url") {
        let headers = source
            .get("headers")
            .and_then(Value::as_object)
            .map(|h| {
                h.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        Subject::Url {
            url,
            headers,
            json_field,
        }
    } else if source.get("executable").is_some() {
        return Err(
            "its `credential_source` is an executable, and absconda runs no other \
                    program: have the CI system write the token to a file (`file:`) or serve \
                    it (`url:`)"
                .to_string(),
        );
    } else {
        return Err("its `credential_source` has no `file`, `url` or `environment_id`".to_string());
    };
    Ok(Grant::Sts {
        token_url: text(config, "token_url")
            .unwrap_or_else(|| "https://sts.googleapis.com/v1/token".to_string()),
        audience: text(config, "audience").ok_or("the file has no `audience`")?,
        subject_token_type: text(config, "subject_token_type")
            .ok_or("the file has no `subject_token_type`")?,
        user_project: text(config, "workforce_pool_user_project"),
        subject,
    })
}

/// Reads a credentials file and returns its JSON, `type` and `client_email`.
fn read_credentials_file(
    path: &Path,
    from_env: bool,
) -> Result<(Value, String, Option<String>), CloudError> {
    let source_name = if from_env {
        format!(
            "credentials file `{}` (from GOOGLE_APPLICATION_CREDENTIALS)",
            path.display()
        )
    } else {
        format!(
            "gcloud application-default credentials `{}`",
            path.display()
        )
    };
    let fail = |message: String| CloudError::Auth {
        source_name: source_name.clone(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        fail(format!(
            "cannot read the file: {e}; hint: point GOOGLE_APPLICATION_CREDENTIALS at a service \
             account key file, or unset it to use `gcloud auth application-default login`"
        ))
    })?;
    // The serde error says where the JSON breaks without quoting the text,
    // which may be a private key.
    let config: Value = serde_json::from_str(&text)
        .map_err(|e| fail(format!("the file is not valid JSON ({e})")))?;
    let kind = config
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| fail("the file has no `type` field".to_string()))?
        .to_string();
    let principal = config
        .get("client_email")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok((config, kind, principal))
}

/// Whether a metadata server answers at `host`, within a short timeout. Only
/// used when no credentials are configured and the metadata server is the
/// last resort: a real one answers in milliseconds with `Metadata-Flavor: Google`.
async fn probe_metadata(host: &str) -> bool {
    let Ok(builder) = super::http::builder() else {
        return false;
    };
    let client = match builder.timeout(METADATA_PROBE_TIMEOUT).no_proxy().build() {
        Ok(c) => c,
        Err(_) => return false,
    };
    let url = format!("http://{host}/computeMetadata/v1/");
    match client
        .get(&url)
        .header("Metadata-Flavor", "Google")
        .send()
        .await
    {
        Ok(resp) => {
            let flavor_ok = resp
                .headers()
                .get("metadata-flavor")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"google"));
            tracing::debug!(status = %resp.status(), flavor_ok, "metadata server probe at {url}");
            flavor_ok
        }
        Err(e) => {
            tracing::debug!(error = %e, "no metadata server at {url}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn env_file_wins_and_names_the_service_account() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.json");
        std::fs::write(
            &key,
            r#"{"type":"service_account","client_email":"sa@p.iam.gserviceaccount.com","private_key":"x","private_key_id":"k","project_id":"p"}"#,
        )
        .unwrap();
        let auth = GcpAuth::from_lookup(lookup(&[
            ("GOOGLE_APPLICATION_CREDENTIALS", key.to_str().unwrap()),
            ("GCE_METADATA_HOST", "127.0.0.1:1"),
        ]))
        .unwrap();
        let text = auth.source().to_string();
        assert!(text.contains("service account key file"), "{text}");
        assert!(text.contains("sa@p.iam.gserviceaccount.com"), "{text}");
        assert!(text.contains("GOOGLE_APPLICATION_CREDENTIALS"), "{text}");
        assert!(auth.source().hint().contains(IAM_ROLE));
        // The Debug form carries no part of the key.
        assert!(!format!("{auth:?}").contains("private_key"));
    }

    #[test]
    fn gcloud_file_found_through_cloudsdk_config_then_home() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("gcloud");
        std::fs::create_dir_all(&cfg).unwrap();
        std::fs::write(
            cfg.join("application_default_credentials.json"),
            r#"{"type":"authorized_user","client_id":"c","client_secret":"s","refresh_token":"r"}"#,
        )
        .unwrap();
        let auth =
            GcpAuth::from_lookup(lookup(&[("CLOUDSDK_CONFIG", cfg.to_str().unwrap())])).unwrap();
        assert!(
            matches!(auth.source(), CredentialSource::GcloudFile { kind, .. } if kind == "authorized_user")
        );
        assert!(
            auth.source()
                .hint()
                .contains("gcloud auth application-default login")
        );

        let home = dir.path().join("home");
        std::fs::create_dir_all(home.join(".config")).unwrap();
        std::fs::rename(&cfg, home.join(".config/gcloud")).unwrap();
        let auth = GcpAuth::from_lookup(lookup(&[("HOME", home.to_str().unwrap())])).unwrap();
        assert!(matches!(auth.source(), CredentialSource::GcloudFile { .. }));
    }

    #[test]
    fn falls_back_to_the_metadata_server() {
        let auth = GcpAuth::from_lookup(lookup(&[("HOME", "/nonexistent")])).unwrap();
        assert!(matches!(
            auth.source(),
            CredentialSource::MetadataServer { explicit: false, host, .. } if host == DEFAULT_METADATA_HOST
        ));
        let auth = GcpAuth::from_lookup(lookup(&[("GCE_METADATA_HOST", "127.0.0.1:9")])).unwrap();
        assert!(auth.source().to_string().contains("GCE_METADATA_HOST"));
    }

    #[test]
    fn missing_or_broken_files_are_auth_errors_without_contents() {
        let err = GcpAuth::from_lookup(lookup(&[(
            "GOOGLE_APPLICATION_CREDENTIALS",
            "/nonexistent/key.json",
        )]))
        .unwrap_err();
        assert!(matches!(err, CloudError::Auth { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/key.json"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.json");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nSECRETSECRET\n").unwrap();
        let err = GcpAuth::from_lookup(lookup(&[(
            "GOOGLE_APPLICATION_CREDENTIALS",
            key.to_str().unwrap(),
        )]))
        .unwrap_err();
        assert!(!err.to_string().contains("SECRETSECRET"), "{err}");
    }

    #[tokio::test]
    async fn unconfigured_metadata_server_fails_fast_with_a_hint() {
        // Port 9 on loopback: nothing listens, so the probe fails at once.
        let auth = GcpAuth::new(
            CredentialSource::MetadataServer {
                host: "127.0.0.1:9".into(),
                explicit: false,
                searched: Some(PathBuf::from(
                    "/home/u/.config/gcloud/application_default_credentials.json",
                )),
            },
            None,
        );
        let err = auth.headers().await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, CloudError::Auth { .. }), "{text}");
        assert!(text.contains("no credentials found"), "{text}");
        assert!(
            text.contains("gcloud auth application-default login"),
            "{text}"
        );
    }

    /// Which grant each kind of file gets, and what a file that cannot be
    /// used says.
    #[test]
    fn every_file_type_has_its_own_grant() {
        let env = crate::cloud::aws_auth::Env::default();
        // A real key, so that the key file parses.
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let der =
            aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).unwrap();
        use base64::Engine as _;
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(der.as_ref())
        );
        let sa = serde_json::json!({
            "type": "service_account", "client_email": "sa@p.iam.gserviceaccount.com",
            "private_key_id": "k", "private_key": pem,
        });
        let user = serde_json::json!({
            "type": "authorized_user", "client_id": "c", "client_secret": "s", "refresh_token": "r",
        });
        let imp = |source: &Value| {
            serde_json::json!({
                "type": "impersonated_service_account",
                "service_account_impersonation_url": "https://iamcredentials.example/v1/x:generateAccessToken",
                "source_credentials": source,
            })
        };
        let ext = |source: Value| {
            serde_json::json!({
                "type": "external_account",
                "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/q",
                "subject_token_type": "urn:ietf:params:aws:token-type:aws4_request",
                "credential_source": source,
            })
        };
        let aws = serde_json::json!({
            "environment_id": "aws1",
            "region_url": "http://169.254.169.254/latest/meta-data/placement/availability-zone",
            "url": "http://169.254.169.254/latest/meta-data/iam/security-credentials",
            "regional_cred_verification_url": "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15",
        });
        let shown = |v: &Value| match file_grant(v, &env) {
            Ok(g) => match g {
                Grant::Impersonate { source, .. } => format!("Impersonate({source:?})"),
                Grant::Sts { subject, .. } => format!("Sts({subject:?})"),
                g => format!("{g:?}"),
            },
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(shown(&sa), "Grant::SelfSignedJwt");
        assert_eq!(shown(&user), "Grant::RefreshToken");
        assert!(
            shown(&imp(&sa)).contains("Grant::JwtBearer"),
            "{}",
            shown(&imp(&sa))
        );
        assert!(shown(&imp(&user)).contains("Grant::RefreshToken"));
        let with_aws = shown(&ext(aws.clone()));
        assert!(with_aws.starts_with("Sts(Aws("), "{with_aws}");
        assert!(with_aws.contains("169.254.169.254"), "{with_aws}");
        let mut aws2 = aws.clone();
        aws2["environment_id"] = "aws2".into();
        assert!(shown(&ext(aws2)).contains("`aws1`"));
        let exe = shown(&ext(
            serde_json::json!({"executable": {"command": "/bin/true"}}),
        ));
        assert!(exe.contains("runs no other program"), "{exe}");
        let mut broken = sa.clone();
        broken["private_key"] = "not a key".into();
        let err = shown(&imp(&broken));
        assert!(
            err.contains("`source_credentials`") && err.contains("PRIVATE KEY"),
            "{err}"
        );
        assert!(!err.contains("not a key"), "{err}");
        let other = shown(&serde_json::json!({"type": "external_account_authorized_user"}));
        assert!(other.contains("not supported"), "{other}");
    }

    /// A service account key needs no request: its headers are a
    /// self-signed token for the key's account and the quota project.
    #[tokio::test]
    async fn a_key_file_authenticates_without_a_request() {
        use base64::Engine as _;
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let der =
            aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).unwrap();
        let config = serde_json::json!({
            "type": "service_account", "client_email": "sa@p.iam.gserviceaccount.com",
            "private_key_id": "k", "quota_project_id": "billing-project",
            // Nothing listens here: a request would fail.
            "token_uri": "http://127.0.0.1:9/token",
            "private_key": format!(
                "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
                base64::engine::general_purpose::STANDARD.encode(der.as_ref())
            ),
        });
        let auth = GcpAuth::new(
            CredentialSource::EnvFile {
                path: "/k.json".into(),
                kind: "service_account".into(),
                principal: Some("sa@p.iam.gserviceaccount.com".into()),
            },
            Some(config),
        );
        let headers = auth.headers().await.unwrap();
        assert_eq!(headers["x-goog-user-project"], "billing-project");
        let bearer = headers[AUTHORIZATION].to_str().unwrap();
        let claims = bearer
            .strip_prefix("Bearer ")
            .unwrap()
            .split('.')
            .nth(1)
            .unwrap();
        let claims: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(claims)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["iss"], "sa@p.iam.gserviceaccount.com");
        assert!(headers[AUTHORIZATION].is_sensitive());
    }
}
