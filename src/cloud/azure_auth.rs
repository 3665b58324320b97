//! Microsoft Entra ID tokens for Azure Resource Manager, requested by hand.
//!
//! The search order is the one of the Azure SDKs' `DefaultAzureCredential`,
//! limited to what a CLI on a laptop, in CI or on a VM needs:
//! 1. a service principal from the environment: `AZURE_TENANT_ID` and
//!    `AZURE_CLIENT_ID` with `AZURE_CLIENT_SECRET`, or with
//!    `AZURE_CLIENT_CERTIFICATE_PATH` (a PEM file holding the certificate and
//!    its RSA private key, which signs an RS256 client assertion whose `x5t`
//!    header is the certificate's SHA-1 thumbprint);
//! 2. workload identity federation: `AZURE_FEDERATED_TOKEN_FILE` (with
//!    `AZURE_TENANT_ID` and `AZURE_CLIENT_ID`), whose token is sent as the
//!    client assertion;
//! 3. a managed identity through the instance metadata service
//!    (`Metadata: true`), user-assigned when `AZURE_CLIENT_ID` is set.
//!
//! The first three post the client-credentials grant to
//! `{authority_host}/{tenant}/oauth2/v2.0/token` with the scope
//! `https://management.azure.com/.default`. The `azure_identity` crate would
//! do the same with many more dependencies; these three requests are small.
//! Tokens are cached until five minutes before they expire.
//!
//! Secrets (the client secret, the private key, assertions and tokens) never
//! leave this module except in a request body or the `Authorization` header,
//! which is marked sensitive; errors name the source and what to check.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rsa::KeyPair as RsaKeyPair;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::header::HeaderValue;
use serde_json::{Value, json};
use sha1::Digest as _;
use tokio::time::Instant;

use super::CloudError;

/// Where Entra ID answers when neither `authority_host` nor
/// `AZURE_AUTHORITY_HOST` says otherwise.
pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";
/// The instance metadata service of an Azure VM.
pub const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";
/// The token scope for Azure Resource Manager.
pub const ARM_SCOPE: &str = "https://management.azure.com/.default";
/// The resource IMDS issues a token for (v1 style, without `.default`).
pub const ARM_RESOURCE: &str = "https://management.azure.com/";
/// IMDS's identity endpoint version.
const IMDS_API_VERSION: &str = "2018-02-01";
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);
/// When IMDS is only the last resort, a short probe decides whether it exists.
const IMDS_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const ASSERTION_LIFETIME: u64 = 600;

/// Where the credentials came from, for messages. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AzureCredentialSource {
    ClientSecret {
        tenant: String,
        client_id: String,
    },
    ClientCertificate {
        tenant: String,
        client_id: String,
        path: PathBuf,
    },
    WorkloadIdentity {
        tenant: String,
        client_id: String,
        token_file: PathBuf,
    },
    ManagedIdentity {
        endpoint: String,
        /// A user-assigned identity's client id; `None` for the system-assigned one.
        client_id: Option<String>,
        /// Whether something in the environment pointed at IMDS, rather than
        /// it being the last resort of the search.
        explicit: bool,
    },
}

impl fmt::Display for AzureCredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AzureCredentialSource::ClientSecret { tenant, client_id } => write!(
                f,
                "the service principal `{client_id}` of tenant `{tenant}` with `AZURE_CLIENT_SECRET`"
            ),
            AzureCredentialSource::ClientCertificate {
                tenant,
                client_id,
                path,
            } => write!(
                f,
                "the service principal `{client_id}` of tenant `{tenant}` with the certificate `{}` (`AZURE_CLIENT_CERTIFICATE_PATH`)",
                path.display()
            ),
            AzureCredentialSource::WorkloadIdentity {
                tenant,
                client_id,
                token_file,
            } => write!(
                f,
                "workload identity `{client_id}` of tenant `{tenant}` with the federated token `{}` (`AZURE_FEDERATED_TOKEN_FILE`)",
                token_file.display()
            ),
            AzureCredentialSource::ManagedIdentity {
                endpoint,
                client_id: Some(id),
                ..
            } => write!(
                f,
                "the user-assigned managed identity `{id}` from the instance metadata service at `{endpoint}`"
            ),
            AzureCredentialSource::ManagedIdentity { endpoint, .. } => write!(
                f,
                "the managed identity from the instance metadata service at `{endpoint}`"
            ),
        }
    }
}

impl AzureCredentialSource {
    /// What to check when this source is refused.
    fn hint(&self) -> &'static str {
        match self {
            AzureCredentialSource::ClientSecret { .. } => {
                "check `AZURE_TENANT_ID`, `AZURE_CLIENT_ID` and that `AZURE_CLIENT_SECRET` is a current secret value (not its id) of that app registration"
            }
            AzureCredentialSource::ClientCertificate { .. } => {
                "check that the certificate in `AZURE_CLIENT_CERTIFICATE_PATH` is uploaded to that app registration and not expired"
            }
            AzureCredentialSource::WorkloadIdentity { .. } => {
                "check the federated credential of that app registration (issuer, subject, audience) and that the token file is fresh"
            }
            AzureCredentialSource::ManagedIdentity { .. } => {
                "check that the VM has a managed identity (and, with `AZURE_CLIENT_ID`, that it is assigned to the VM)"
            }
        }
    }
}

/// The secret half of a source.
enum Secret {
    Password(String),
    Certificate { key: RsaKeyPair, x5t: Thumbprints },
    FederatedToken(PathBuf),
    Imds,
}

/// A cached access token.
struct Cached {
    token: String,
    refresh_at: Instant,
}

/// Credentials for Azure Resource Manager, with a token cache.
pub struct AzureAuth {
    source: AzureCredentialSource,
    secret: Secret,
    authority_host: String,
    http: reqwest::Client,
    cache: tokio::sync::Mutex<Option<Cached>>,
    /// Set after the IMDS probe succeeded once, so later requests wait longer.
    imds_seen: Mutex<bool>,
}

impl fmt::Debug for AzureAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureAuth")
            .field("source", &self.source)
            .field("authority_host", &self.authority_host)
            .finish_non_exhaustive()
    }
}

impl AzureAuth {
    /// Credentials from the process environment; `authority_host` from the
    /// config wins over `AZURE_AUTHORITY_HOST`.
    pub fn from_env(authority_host: Option<&str>) -> Result<AzureAuth, CloudError> {
        AzureAuth::from_lookup(|k| std::env::var(k).ok(), authority_host)
    }

    /// Credentials found through `lookup` instead of the process environment.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
        authority_host: Option<&str>,
    ) -> Result<AzureAuth, CloudError> {
        let get = |k: &str| lookup(k).filter(|v| !v.is_empty());
        let authority_host = authority_host
            .map(str::to_string)
            .or_else(|| get("AZURE_AUTHORITY_HOST"))
            .unwrap_or_else(|| DEFAULT_AUTHORITY_HOST.to_string())
            .trim_end_matches('/')
            .to_string();
        let tenant = get("AZURE_TENANT_ID");
        let client_id = get("AZURE_CLIENT_ID");
        let (source, secret) = match (&tenant, &client_id) {
            (Some(tenant), Some(client_id))
                if get("AZURE_CLIENT_SECRET").is_some()
                    || get("AZURE_CLIENT_CERTIFICATE_PATH").is_some()
                    || get("AZURE_FEDERATED_TOKEN_FILE").is_some() =>
            {
                check_tenant(tenant)?;
                if let Some(secret) = get("AZURE_CLIENT_SECRET") {
                    (
                        AzureCredentialSource::ClientSecret {
                            tenant: tenant.clone(),
                            client_id: client_id.clone(),
                        },
                        Secret::Password(secret),
                    )
                } else if let Some(path) = get("AZURE_CLIENT_CERTIFICATE_PATH") {
                    let source = AzureCredentialSource::ClientCertificate {
                        tenant: tenant.clone(),
                        client_id: client_id.clone(),
                        path: PathBuf::from(&path),
                    };
                    let (key, x5t) =
                        load_certificate(Path::new(&path)).map_err(|message| CloudError::Auth {
                            source_name: source.to_string(),
                            message,
                        })?;
                    (source, Secret::Certificate { key, x5t })
                } else {
                    let path = PathBuf::from(get("AZURE_FEDERATED_TOKEN_FILE").unwrap_or_default());
                    (
                        AzureCredentialSource::WorkloadIdentity {
                            tenant: tenant.clone(),
                            client_id: client_id.clone(),
                            token_file: path.clone(),
                        },
                        Secret::FederatedToken(path),
                    )
                }
            }
            (None, Some(_)) | (Some(_), None)
                if get("AZURE_CLIENT_SECRET").is_some()
                    || get("AZURE_CLIENT_CERTIFICATE_PATH").is_some() =>
            {
                return Err(CloudError::Auth {
                    source_name: "a service principal from the environment".into(),
                    message: "`AZURE_TENANT_ID` and `AZURE_CLIENT_ID` must both be set with `AZURE_CLIENT_SECRET` or `AZURE_CLIENT_CERTIFICATE_PATH`".into(),
                });
            }
            _ => {
                let explicit_endpoint =
                    get("AZURE_POD_IDENTITY_AUTHORITY_HOST").or_else(|| get("IMDS_ENDPOINT"));
                let explicit = explicit_endpoint.is_some() || client_id.is_some();
                let endpoint = explicit_endpoint
                    .unwrap_or_else(|| DEFAULT_IMDS_ENDPOINT.to_string())
                    .trim_end_matches('/')
                    .to_string();
                (
                    AzureCredentialSource::ManagedIdentity {
                        endpoint,
                        client_id,
                        explicit,
                    },
                    Secret::Imds,
                )
            }
        };
        let http = super::http::builder()?
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("absconda/", env!("CARGO_PKG_VERSION")))
            .no_proxy_if_loopback(&source, &authority_host)
            .build()
            .map_err(|e| CloudError::Transport {
                url: authority_host.clone(),
                source: Box::new(e),
            })?;
        Ok(AzureAuth {
            source,
            secret,
            authority_host,
            http,
            cache: tokio::sync::Mutex::new(None),
            imds_seen: Mutex::new(false),
        })
    }

    pub fn source(&self) -> &AzureCredentialSource {
        &self.source
    }

    /// Forgets the cached token (after the API refused it).
    pub async fn invalidate(&self) {
        *self.cache.lock().await = None;
    }

    /// `Authorization: Bearer …`, marked sensitive.
    pub async fn header(&self) -> Result<HeaderValue, CloudError> {
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref()
            && Instant::now() < c.refresh_at
        {
            return bearer(&c.token, &self.source);
        }
        let (token, expires_in) = self.fetch().await?;
        let refresh_at = Instant::now() + expires_in.saturating_sub(REFRESH_MARGIN);
        let value = bearer(&token, &self.source)?;
        *cache = Some(Cached { token, refresh_at });
        Ok(value)
    }

    async fn fetch(&self) -> Result<(String, Duration), CloudError> {
        match &self.secret {
            Secret::Imds => self.fetch_imds().await,
            secret => {
                let (tenant, client_id) = match &self.source {
                    AzureCredentialSource::ClientSecret { tenant, client_id }
                    | AzureCredentialSource::ClientCertificate {
                        tenant, client_id, ..
                    }
                    | AzureCredentialSource::WorkloadIdentity {
                        tenant, client_id, ..
                    } => (tenant.as_str(), client_id.as_str()),
                    AzureCredentialSource::ManagedIdentity { .. } => {
                        return Err(mismatched_source());
                    }
                };
                let url = format!("{}/{tenant}/oauth2/v2.0/token", self.authority_host);
                let mut form = vec![
                    ("grant_type", "client_credentials".to_string()),
                    ("client_id", client_id.to_string()),
                    ("scope", ARM_SCOPE.to_string()),
                ];
                match secret {
                    Secret::Password(s) => form.push(("client_secret", s.clone())),
                    Secret::Certificate { key, x5t } => {
                        let assertion = sign_assertion(key, x5t, client_id, &url)
                            .map_err(|message| self.auth_error(message))?;
                        form.push((
                            "client_assertion_type",
                            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                        ));
                        form.push(("client_assertion", assertion));
                    }
                    Secret::FederatedToken(path) => {
                        let token = std::fs::read_to_string(path).map_err(|e| {
                            self.auth_error(format!(
                                "cannot read the federated token file `{}`: {e}",
                                path.display()
                            ))
                        })?;
                        form.push((
                            "client_assertion_type",
                            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                        ));
                        form.push(("client_assertion", token.trim().to_string()));
                    }
                    Secret::Imds => {}
                }
                let resp = self
                    .http
                    .post(&url)
                    .timeout(TOKEN_TIMEOUT)
                    .form(&form)
                    .send()
                    .await
                    .map_err(|e| CloudError::Transport {
                        url: url.clone(),
                        source: Box::new(e.without_url()),
                    })?;
                self.token_response(resp, &url).await
            }
        }
    }

    async fn fetch_imds(&self) -> Result<(String, Duration), CloudError> {
        let AzureCredentialSource::ManagedIdentity {
            endpoint,
            client_id,
            explicit,
        } = &self.source
        else {
            return Err(mismatched_source());
        };
        let mut url = url::Url::parse(&format!("{endpoint}/metadata/identity/oauth2/token"))
            .map_err(|e| CloudError::Config {
                message: format!("the instance metadata service address `{endpoint}`: {e}"),
            })?;
        url.query_pairs_mut()
            .append_pair("api-version", IMDS_API_VERSION)
            .append_pair("resource", ARM_RESOURCE);
        if let Some(id) = client_id {
            url.query_pairs_mut().append_pair("client_id", id);
        }
        let probe = !*explicit && !self.imds_seen.lock().map(|s| *s).unwrap_or(false);
        let resp = self
            .http
            .get(url.clone())
            .header("Metadata", "true")
            .timeout(if probe {
                IMDS_PROBE_TIMEOUT
            } else {
                TOKEN_TIMEOUT
            })
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(_) if probe => {
                return Err(CloudError::Auth {
                    source_name: "the Azure credential search".into(),
                    message: format!(
                        "no Azure credentials found: set `AZURE_TENANT_ID`, `AZURE_CLIENT_ID` and `AZURE_CLIENT_SECRET` (or `AZURE_CLIENT_CERTIFICATE_PATH`, or `AZURE_FEDERATED_TOKEN_FILE`), or run on an Azure VM with a managed identity (the instance metadata service at `{endpoint}` did not answer)"
                    ),
                });
            }
            Err(e) => {
                return Err(CloudError::Transport {
                    url: format!("{endpoint}/metadata/identity/oauth2/token"),
                    source: Box::new(e.without_url()),
                });
            }
        };
        if let Ok(mut seen) = self.imds_seen.lock() {
            *seen = true;
        }
        self.token_response(resp, &format!("{endpoint}/metadata/identity/oauth2/token"))
            .await
    }

    /// Reads `access_token` and `expires_in` (a number, or a string from IMDS).
    async fn token_response(
        &self,
        resp: reqwest::Response,
        url: &str,
    ) -> Result<(String, Duration), CloudError> {
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = resp.text().await.map_err(|e| CloudError::Transport {
            url: url.to_string(),
            source: Box::new(e.without_url()),
        })?;
        let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        if status == 429 || status >= 500 {
            return Err(CloudError::Api {
                service: "Entra ID",
                operation: format!("token request to `{url}`"),
                status,
                code: json["error"].as_str().unwrap_or("").to_string(),
                message: describe_token_error(&json, &body),
                retry_after,
            });
        }
        if !(200..300).contains(&status) {
            return Err(self.auth_error(format!(
                "the token endpoint answered {status}: {}",
                describe_token_error(&json, &body)
            )));
        }
        let token = json["access_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| CloudError::Protocol {
                url: url.to_string(),
                message: "the token answer has no `access_token`".into(),
            })?;
        let expires_in = match &json["expires_in"] {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
        .unwrap_or(3600);
        Ok((token.to_string(), Duration::from_secs(expires_in)))
    }

    /// An authentication error naming the source and what to check.
    pub fn auth_error(&self, message: String) -> CloudError {
        CloudError::Auth {
            source_name: self.source.to_string(),
            message: format!("{}; {}", message.trim_end_matches('.'), self.source.hint()),
        }
    }
}

/// The source and the secret are built together in `from_lookup`, so they
/// always agree; this error only keeps the code free of panics.
fn mismatched_source() -> CloudError {
    CloudError::Config {
        message: "internal: the Azure credential source and its secret disagree".into(),
    }
}

/// Entra's `error_description` starts with an `AADSTS…` code and a sentence;
/// keep the first line (the trace and correlation ids follow).
fn describe_token_error(json: &Value, body: &str) -> String {
    let code = json["error"].as_str().unwrap_or("");
    let description = json["error_description"]
        .as_str()
        .and_then(|d| d.lines().next())
        .unwrap_or("");
    match (code, description) {
        ("", "") => body.chars().take(200).collect(),
        (c, "") => format!("`{c}`"),
        ("", d) => d.to_string(),
        (c, d) => format!("`{c}`: {d}"),
    }
}

fn check_tenant(tenant: &str) -> Result<(), CloudError> {
    if tenant.contains(['/', '?', '#']) || tenant.chars().any(char::is_whitespace) {
        return Err(CloudError::Config {
            message: format!("`AZURE_TENANT_ID` `{tenant}` is not a tenant id or domain"),
        });
    }
    Ok(())
}

fn bearer(token: &str, source: &AzureCredentialSource) -> Result<HeaderValue, CloudError> {
    let mut v =
        HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| CloudError::Auth {
            source_name: source.to_string(),
            message: "the token holds characters that cannot be sent in a header".into(),
        })?;
    v.set_sensitive(true);
    Ok(v)
}

/// The certificate's thumbprints for the assertion's header: `x5t` (base64url
/// SHA-1 of its DER), which Entra matches, and `x5t#S256` (SHA-256).
struct Thumbprints {
    x5t: String,
    x5t_s256: String,
}

/// The RSA key and the certificate's thumbprints from a PEM file holding both.
fn load_certificate(path: &Path) -> Result<(RsaKeyPair, Thumbprints), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the certificate file `{}`: {e}", path.display()))?;
    let cert = super::jwt::pem_blocks(&text, "CERTIFICATE")
        .into_iter()
        .next()
        .ok_or_else(|| {
            format!(
                "`{}` holds no `CERTIFICATE` PEM block (a PEM file with the certificate and its private key is needed; PKCS#12 files are not read)",
                path.display()
            )
        })?;
    let key =
        super::jwt::rsa_key_from_pem(&text).map_err(|e| format!("`{}`: {e}", path.display()))?;
    let x5t = URL_SAFE_NO_PAD.encode(sha1::Sha1::digest(&cert));
    let x5t_s256 = URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(&cert));
    Ok((key, Thumbprints { x5t, x5t_s256 }))
}

/// An RS256 client assertion for the token endpoint `aud`.
fn sign_assertion(
    key: &RsaKeyPair,
    x5t: &Thumbprints,
    client_id: &str,
    aud: &str,
) -> Result<String, String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let header = json!({"alg": "RS256", "typ": "JWT", "x5t": x5t.x5t, "x5t#S256": x5t.x5t_s256});
    let claims = json!({
        "aud": aud,
        "iss": client_id,
        "sub": client_id,
        "jti": format!("{:032x}", rand::random::<u128>()),
        "nbf": now,
        "iat": now,
        "exp": now + ASSERTION_LIFETIME,
    });
    super::jwt::sign_rs256(key, &header, &claims)
        .map_err(|_| "signing the client assertion with the certificate's key failed".to_string())
}

/// Skips any proxy when every endpoint this client talks to is on loopback.
trait NoProxyIfLoopback {
    fn no_proxy_if_loopback(self, source: &AzureCredentialSource, authority: &str) -> Self;
}

impl NoProxyIfLoopback for reqwest::ClientBuilder {
    fn no_proxy_if_loopback(self, source: &AzureCredentialSource, authority: &str) -> Self {
        let target = match source {
            AzureCredentialSource::ManagedIdentity { endpoint, .. } => endpoint.as_str(),
            _ => authority,
        };
        // IMDS is link-local and never goes through a proxy either.
        let local = url::Url::parse(target)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .is_some_and(|h| {
                h == "localhost"
                    || h.parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback() || ip.to_string() == "169.254.169.254")
                    || h.trim_matches(['[', ']'])
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            });
        if local { self.no_proxy() } else { self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<AzureAuth, CloudError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        AzureAuth::from_lookup(
            move |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()),
            None,
        )
    }

    #[test]
    fn the_search_order_is_secret_certificate_federated_imds() {
        let a = from(&[
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_CLIENT_SECRET", "s3cret"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/x"),
        ])
        .unwrap();
        assert!(matches!(
            a.source(),
            AzureCredentialSource::ClientSecret { .. }
        ));
        assert!(!format!("{a:?} {}", a.source()).contains("s3cret"));
        let a = from(&[
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/x"),
        ])
        .unwrap();
        assert!(matches!(
            a.source(),
            AzureCredentialSource::WorkloadIdentity { .. }
        ));
        let a = from(&[("AZURE_CLIENT_ID", "mi")]).unwrap();
        assert_eq!(
            a.source(),
            &AzureCredentialSource::ManagedIdentity {
                endpoint: DEFAULT_IMDS_ENDPOINT.into(),
                client_id: Some("mi".into()),
                explicit: true
            }
        );
        let a = from(&[]).unwrap();
        assert!(matches!(
            a.source(),
            AzureCredentialSource::ManagedIdentity {
                explicit: false,
                client_id: None,
                ..
            }
        ));
    }

    #[test]
    fn a_secret_without_a_tenant_is_an_error() {
        let e = from(&[("AZURE_CLIENT_ID", "c"), ("AZURE_CLIENT_SECRET", "s3cret")]).unwrap_err();
        assert!(e.to_string().contains("AZURE_TENANT_ID"), "{e}");
        assert!(!e.to_string().contains("s3cret"));
    }

    #[test]
    fn a_missing_certificate_names_the_file() {
        let e = from(&[
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_CLIENT_CERTIFICATE_PATH", "/nonexistent/cert.pem"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/cert.pem"), "{e}");
    }
}
