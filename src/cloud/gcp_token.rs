//! Google access tokens, made by absconda itself: a service account key's
//! self-signed JWT (AIP-4111, no request), the JWT-bearer grant of a key
//! (RFC 7523) at its `token_uri`, the refresh token of an `authorized_user`
//! file (gcloud's application-default login) at its `token_uri` (RFC 6749
//! §6), the default service account's token from the metadata server of the
//! VM absconda runs on, a service account's token from IAM Credentials'
//! `generateAccessToken` (impersonation), and the RFC 8693 token exchange at
//! Google's STS of an `external_account` file (workload identity
//! federation), whose subject token is a CI system's OIDC token read from a
//! file or fetched from a URL, or a SigV4-signed AWS `GetCallerIdentity`
//! request (AIP-4117).
//!
//! Google's client libraries can do all this, but the Rust one makes every
//! request with `reqwest::Client::new()`: a client that trusts the system's
//! CA store only, cannot be given other roots, and panics when that store
//! is empty (a `FROM scratch` CI image), even for the metadata server's
//! `http://` URL. These requests are small and fully documented, so absconda
//! makes them with the client every other request uses
//! ([`super::http::builder`]: the system store or the built-in roots, plus
//! `ca_file:`), signs with the RS256 code of [`super::jwt`] and the SigV4
//! code of [`super::aws_auth`], and runs no other program.
//!
//! A token is cached until shortly before it expires; a failed fetch is not
//! cached, so the caller's retry makes a fresh one.

use std::fmt;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Mutex;

use super::CloudError;

/// How long one token request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A token is renewed this long before it expires (at most half its lifetime).
const RENEW_BEFORE: Duration = Duration::from_secs(5 * 60);

/// When the answer gives no `expires_in`: Google's tokens last an hour.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// Where tokens come from. Holds secrets: its `Debug` shows none.
pub enum Grant {
    /// `grant_type=refresh_token` at `endpoint`.
    RefreshToken {
        endpoint: String,
        client_id: String,
        client_secret: String,
        refresh_token: String,
    },
    /// `GET /computeMetadata/v1/instance/service-accounts/default/token`.
    Metadata { host: String },
    /// A service account key's self-signed JWT, sent as the token itself
    /// (AIP-4111): no request.
    SelfSignedJwt { key: ServiceAccountKey },
    /// The JWT-bearer grant (RFC 7523) at the key file's `token_uri`: an
    /// RS256 assertion signed with the key.
    JwtBearer { key: ServiceAccountKey },
    /// RFC 8693 token exchange at `token_url` (Google's STS) of the subject
    /// token `subject` yields.
    Sts {
        token_url: String,
        audience: String,
        subject_token_type: String,
        /// `workforce_pool_user_project`, sent as STS `options`.
        user_project: Option<String>,
        subject: Subject,
    },
    /// `POST …/serviceAccounts/EMAIL:generateAccessToken` (IAM Credentials),
    /// authorised by the token of `source`.
    Impersonate {
        url: String,
        delegates: Vec<String>,
        source: Box<TokenSource>,
    },
}

/// Where the subject token of a token exchange comes from (an
/// `external_account` file's `credential_source`).
#[derive(Debug)]
pub enum Subject {
    /// A file the CI system writes (read on every exchange).
    File {
        path: std::path::PathBuf,
        /// With `format.type: json`: the field holding the token.
        json_field: Option<String>,
    },
    /// A URL answering with the token (GitHub's and Azure's OIDC endpoints).
    Url {
        url: String,
        headers: Vec<(String, String)>,
        json_field: Option<String>,
    },
    /// AWS (`environment_id: aws1`): a SigV4-signed `GetCallerIdentity`
    /// request, serialized, is the subject token.
    Aws(AwsSubject),
}

/// Where the AWS region and keys of an `aws1` credential source come from:
/// the environment first, then the instance metadata URLs of the file.
#[derive(Debug)]
pub struct AwsSubject {
    /// `regional_cred_verification_url`, with `{region}` in it.
    pub verification_url: String,
    /// `region_url`: answers with the availability zone.
    pub region_url: Option<String>,
    /// `url`: the security-credentials directory (role name, then keys).
    pub credentials_url: Option<String>,
    /// `imdsv2_session_token_url`: where a session token for the two above
    /// is fetched (IMDSv2).
    pub imdsv2_url: Option<String>,
    /// `AWS_REGION`, `AWS_ACCESS_KEY_ID`, …; its `Debug` shows names only.
    pub env: super::aws_auth::Env,
}

/// A service account key file's identity and RSA key. Its `Debug` shows
/// the email and key id, never the key.
pub struct ServiceAccountKey {
    pub client_email: String,
    pub private_key_id: String,
    pub token_uri: String,
    key: aws_lc_rs::rsa::KeyPair,
}

impl fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .finish_non_exhaustive()
    }
}

impl ServiceAccountKey {
    /// The key of a `service_account` file's JSON; the error says which
    /// field is missing or why the key cannot be used, never quoting it.
    pub fn from_json(config: &serde_json::Value) -> Result<ServiceAccountKey, String> {
        let field = |name: &str| {
            config
                .get(name)
                .and_then(serde_json::Value::as_str)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
                .ok_or_else(|| format!("the service account key has no `{name}`"))
        };
        let pem = field("private_key")?;
        let key = super::jwt::rsa_key_from_pem(&pem)
            .map_err(|e| format!("the service account key's `private_key`: {e}"))?;
        Ok(ServiceAccountKey {
            client_email: field("client_email")?,
            private_key_id: field("private_key_id")?,
            token_uri: config
                .get("token_uri")
                .and_then(serde_json::Value::as_str)
                .filter(|v| !v.is_empty())
                .unwrap_or(GOOGLE_TOKEN_URI)
                .to_string(),
            key,
        })
    }

    /// An RS256 JWT for the `cloud-platform` scope, valid for an hour:
    /// `aud` is the token URI for a JWT-bearer assertion (RFC 7523), absent
    /// for a self-signed token (AIP-4111: scope instead of audience).
    fn sign(&self, aud: Option<&str>) -> Result<String, String> {
        let now = chrono::Utc::now().timestamp();
        let header = serde_json::json!({
            "alg": "RS256",
            "typ": "JWT",
            "kid": self.private_key_id,
        });
        let mut claims = serde_json::json!({
            "iss": self.client_email,
            "scope": CLOUD_PLATFORM,
            "iat": now,
            "exp": now + DEFAULT_LIFETIME.as_secs() as i64,
        });
        match aud {
            Some(aud) => claims["aud"] = aud.into(),
            // A self-signed token names its account as `sub` too; an
            // assertion's `sub` would ask for domain-wide delegation to
            // that user, so it has none.
            None => claims["sub"] = self.client_email.clone().into(),
        }
        super::jwt::sign_rs256(&self.key, &header, &claims).map_err(|e| {
            format!(
                "cannot sign a token with the key of `{}`: {e}",
                self.client_email
            )
        })
    }
}

/// Google's OAuth 2.0 token endpoint, when a key file names none.
pub const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Grant::RefreshToken { .. } => "Grant::RefreshToken",
            Grant::Metadata { .. } => "Grant::Metadata",
            Grant::SelfSignedJwt { .. } => "Grant::SelfSignedJwt",
            Grant::JwtBearer { .. } => "Grant::JwtBearer",
            Grant::Impersonate { .. } => "Grant::Impersonate",
            Grant::Sts { .. } => "Grant::Sts",
        })
    }
}

impl Grant {
    /// The URL tokens are fetched from (holds no secret).
    pub fn url(&self) -> String {
        match self {
            Grant::RefreshToken { endpoint, .. } => endpoint.clone(),
            Grant::Impersonate { url, .. } => url.clone(),
            Grant::Sts { token_url, .. } => token_url.clone(),
            Grant::SelfSignedJwt { key } | Grant::JwtBearer { key } => key.token_uri.clone(),
            Grant::Metadata { host } => {
                format!("http://{host}/computeMetadata/v1/instance/service-accounts/default/token")
            }
        }
    }
}

/// Why no token came.
#[derive(Debug)]
pub enum TokenError {
    /// The endpoint refused the credentials (an OAuth error or another
    /// 4xx); retrying will not help. The text names the endpoint, the
    /// status and the OAuth error, never a secret.
    Refused(String),
    /// Anything else: no answer (DNS, connect, TLS), 429 or 5xx, an answer
    /// that is not a token, a `ca_file:` that cannot be read.
    Cloud(CloudError),
}

struct Cached {
    /// `Bearer …`; never logged.
    value: String,
    renew_at: Instant,
}

/// One grant and its cached token.
pub struct TokenSource {
    grant: Grant,
    cached: Mutex<Option<Cached>>,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource")
            .field("grant", &self.grant)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    token_type: Option<String>,
}

/// IAM Credentials' answer to `generateAccessToken`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeneratedToken {
    access_token: String,
    #[serde(default)]
    expire_time: Option<String>,
}

/// Google's JSON error (`{"error": {"code", "message", "status"}}`).
#[derive(Deserialize, Default)]
struct GoogleError {
    #[serde(default)]
    error: GoogleErrorBody,
}

#[derive(Deserialize, Default)]
struct GoogleErrorBody {
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
}

/// The scope absconda's tokens need (compute, OS Login).
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

#[derive(Deserialize, Default)]
struct OAuthError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

impl TokenSource {
    pub fn new(grant: Grant) -> TokenSource {
        TokenSource {
            grant,
            cached: Mutex::new(None),
        }
    }

    /// The `Authorization` header value (`Bearer …`): the cached token, or
    /// a new one. Concurrent callers wait for one fetch.
    pub async fn authorization(&self) -> Result<String, TokenError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref()
            && Instant::now() < c.renew_at
        {
            return Ok(c.value.clone());
        }
        *cached = None;
        let fetched = self.fetch().await?;
        let value = fetched.value.clone();
        *cached = Some(fetched);
        Ok(value)
    }

    /// Drops the cached token (the API refused it), and the source's. A
    /// fetch under way keeps its result.
    pub fn forget(&self) {
        if let Ok(mut cached) = self.cached.try_lock() {
            *cached = None;
        }
        if let Grant::Impersonate { source, .. } = &self.grant {
            source.forget();
        }
    }

    async fn fetch(&self) -> Result<Cached, TokenError> {
        if let Grant::SelfSignedJwt { key } = &self.grant {
            let signed = Instant::now();
            let jwt = key.sign(None).map_err(TokenError::Refused)?;
            return Ok(Cached {
                value: format!("Bearer {jwt}"),
                renew_at: signed + DEFAULT_LIFETIME - RENEW_BEFORE,
            });
        }
        let url = self.grant.url();
        let cloud = TokenError::Cloud;
        let parsed = url::Url::parse(&url).map_err(|e| {
            cloud(CloudError::Config {
                message: format!("the token endpoint `{url}` is not a URL ({e})"),
            })
        })?;
        let mut builder = super::http::builder()
            .map_err(cloud)?
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("absconda/", env!("CARGO_PKG_VERSION")));
        if matches!(self.grant, Grant::Metadata { .. }) || super::gce::is_loopback(&parsed) {
            // The metadata server is link-local and a local endpoint is
            // local: a proxy from the environment must not capture them.
            builder = builder.no_proxy();
        }
        let client = builder.build().map_err(|e| {
            cloud(CloudError::Transport {
                url: url.clone(),
                source: Box::new(e),
            })
        })?;
        let request = match &self.grant {
            Grant::RefreshToken {
                client_id,
                client_secret,
                refresh_token,
                ..
            } => client.post(parsed).form(&[
                ("grant_type", "refresh_token"),
                ("client_id", client_id.as_str()),
                ("client_secret", client_secret.as_str()),
                ("refresh_token", refresh_token.as_str()),
            ]),
            Grant::Metadata { .. } => client.get(parsed).header("Metadata-Flavor", "Google"),
            Grant::SelfSignedJwt { .. } => {
                return Err(TokenError::Refused(
                    "a self-signed token needs no request".into(),
                ));
            }
            Grant::JwtBearer { key } => {
                let assertion = key.sign(Some(&url)).map_err(TokenError::Refused)?;
                client.post(parsed).form(&[
                    ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                    ("assertion", assertion.as_str()),
                ])
            }
            Grant::Sts {
                audience,
                subject_token_type,
                user_project,
                subject,
                ..
            } => {
                let subject_token = subject_token(&client, subject, audience).await?;
                let mut form = vec![
                    (
                        "grant_type",
                        "urn:ietf:params:oauth:grant-type:token-exchange".to_string(),
                    ),
                    ("audience", audience.clone()),
                    ("scope", CLOUD_PLATFORM.to_string()),
                    (
                        "requested_token_type",
                        "urn:ietf:params:oauth:token-type:access_token".to_string(),
                    ),
                    ("subject_token", subject_token),
                    ("subject_token_type", subject_token_type.clone()),
                ];
                if let Some(p) = user_project {
                    form.push((
                        "options",
                        serde_json::json!({ "userProject": p }).to_string(),
                    ));
                }
                client.post(parsed).form(&form)
            }
            Grant::Impersonate {
                delegates, source, ..
            } => {
                // The source's token (a user's), fetched with the same roots.
                let bearer = Box::pin(source.authorization()).await?;
                let mut bearer = reqwest::header::HeaderValue::from_str(&bearer).map_err(|_| {
                    TokenError::Refused(
                        "the source credentials' token is not a header value".into(),
                    )
                })?;
                bearer.set_sensitive(true);
                client
                    .post(parsed)
                    .header(reqwest::header::AUTHORIZATION, bearer)
                    .json(&serde_json::json!({
                        "scope": [CLOUD_PLATFORM],
                        "delegates": delegates,
                        "lifetime": "3600s",
                    }))
            }
        };
        let transport = |e: reqwest::Error| {
            cloud(CloudError::Transport {
                url: url.clone(),
                source: Box::new(e.without_url()),
            })
        };
        let requested = Instant::now();
        let response = request.send().await.map_err(transport)?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = super::read_body(response, super::BODY_LIMIT)
            .await
            .map_err(|e| match e {
                super::BodyError::Http(e) => transport(e),
                e => cloud(CloudError::Protocol {
                    url: url.clone(),
                    message: e.to_string(),
                }),
            })?;
        tracing::debug!(url = %url, status, "token endpoint answered");
        if !(200..300).contains(&status) {
            let mut oauth: OAuthError = serde_json::from_slice(&body).unwrap_or_default();
            if oauth.error.is_empty() {
                let google: GoogleError = serde_json::from_slice(&body).unwrap_or_default();
                oauth.error = google.error.status;
                oauth.error_description = google.error.message;
            }
            let mut what = format!("`{url}` answered HTTP {status}");
            if !oauth.error.is_empty() {
                what.push_str(&format!(": {}", oauth.error));
            }
            if !oauth.error_description.is_empty() {
                what.push_str(&format!(" ({})", oauth.error_description));
            }
            if status == 408 || status == 429 || status >= 500 {
                return Err(cloud(CloudError::Api {
                    service: "token",
                    operation: format!("fetch an access token from `{url}`"),
                    status,
                    code: oauth.error,
                    message: oauth.error_description,
                    retry_after,
                }));
            }
            return Err(TokenError::Refused(what));
        }
        if matches!(self.grant, Grant::Impersonate { .. }) {
            let token: GeneratedToken = serde_json::from_slice(&body).map_err(|e| {
                cloud(CloudError::Protocol {
                    url: url.clone(),
                    message: format!("expected a generated access token, got something else ({e})"),
                })
            })?;
            if token.access_token.is_empty() {
                return Err(cloud(CloudError::Protocol {
                    url,
                    message: "the answer holds an empty `accessToken`".into(),
                }));
            }
            let lifetime = token
                .expire_time
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .and_then(|t| {
                    (t.with_timezone(&chrono::Utc) - chrono::Utc::now())
                        .to_std()
                        .ok()
                })
                .unwrap_or(DEFAULT_LIFETIME);
            return Ok(Cached {
                value: format!("Bearer {}", token.access_token),
                renew_at: requested + lifetime - RENEW_BEFORE.min(lifetime / 2),
            });
        }
        // The serde error says where the JSON breaks without quoting it: a
        // good answer holds a token.
        let token: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            cloud(CloudError::Protocol {
                url: url.clone(),
                message: format!("expected a JSON token, got something else ({e})"),
            })
        })?;
        if token.access_token.is_empty() {
            return Err(cloud(CloudError::Protocol {
                url: url.clone(),
                message: "the answer holds an empty `access_token`".into(),
            }));
        }
        if let Some(kind) = &token.token_type
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(cloud(CloudError::Protocol {
                url,
                message: format!("the token's type is `{kind}`, not `Bearer`"),
            }));
        }
        let lifetime = token
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_LIFETIME);
        Ok(Cached {
            value: format!("Bearer {}", token.access_token),
            renew_at: requested + lifetime - RENEW_BEFORE.min(lifetime / 2),
        })
    }
}

/// Reads or fetches the subject token of a token exchange. The token is a
/// secret: errors name the file or URL, never its content.
async fn subject_token(
    client: &reqwest::Client,
    subject: &Subject,
    audience: &str,
) -> Result<String, TokenError> {
    let (text, json_field, from) = match subject {
        Subject::Aws(aws) => return aws_subject_token(aws, audience).await,
        Subject::File { path, json_field } => {
            let text = tokio::fs::read_to_string(path).await.map_err(|e| {
                TokenError::Refused(format!(
                    "cannot read the subject token file `{}`: {e}",
                    path.display()
                ))
            })?;
            (text, json_field, format!("`{}`", path.display()))
        }
        Subject::Url {
            url,
            headers,
            json_field,
        } => {
            let mut request = client.get(url);
            for (k, v) in headers {
                request = request.header(k, v);
            }
            let failed =
                |why: String| TokenError::Refused(format!("the subject token URL `{url}` {why}"));
            let response = request
                .send()
                .await
                .map_err(|e| failed(format!("did not answer: {}", e.without_url())))?;
            let status = response.status();
            if !status.is_success() {
                return Err(failed(format!("answered {status}")));
            }
            let text = response
                .text()
                .await
                .map_err(|e| failed(format!("sent no text: {}", e.without_url())))?;
            (text, json_field, format!("`{url}`"))
        }
    };
    let token = match json_field {
        Some(field) => serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get(field).and_then(|t| t.as_str()).map(str::to_string))
            .ok_or_else(|| {
                TokenError::Refused(format!(
                    "the subject token from {from} is not JSON with a string `{field}`"
                ))
            })?,
        None => text.trim().to_string(),
    };
    if token.is_empty() {
        return Err(TokenError::Refused(format!(
            "the subject token from {from} is empty"
        )));
    }
    Ok(token)
}

/// How long one request to the AWS instance metadata URLs may take (an
/// instance answers in milliseconds).
const AWS_METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// The most absconda reads of one metadata answer (a zone, a role, keys).
const AWS_METADATA_LIMIT: usize = 64 << 10;

/// The instance role's keys, as the security-credentials URL serves them.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AwsRoleKeys {
    access_key_id: String,
    secret_access_key: String,
    #[serde(default)]
    token: Option<String>,
}

/// The subject token of an `aws1` credential source (AIP-4117): a
/// `GetCallerIdentity` POST to the regional AWS STS, signed with SigV4
/// ([`super::aws_auth::sign`]) including the `x-goog-cloud-target-resource`
/// header (the pool provider's audience), serialized as JSON
/// (`url`, `method`, `headers` as `key`/`value` pairs) and URL-encoded.
/// Google's STS replays it to AWS to learn the caller's identity, so the
/// AWS secret itself never leaves this machine.
async fn aws_subject_token(aws: &AwsSubject, audience: &str) -> Result<String, TokenError> {
    use super::aws_auth::{self, CredentialSource, Credentials, SigningRequest};

    let env_value = |name: &str| aws.env.get(name).filter(|v| !v.is_empty());
    let env_region = env_value("AWS_REGION")
        .or_else(|| env_value("AWS_DEFAULT_REGION"))
        .map(str::to_string);
    let env_keys = match (
        env_value("AWS_ACCESS_KEY_ID"),
        env_value("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Some(id), Some(secret)) => Some(Credentials::new(
            id,
            secret,
            env_value("AWS_SESSION_TOKEN").map(str::to_string),
            CredentialSource::Environment,
        )),
        _ => None,
    };
    // The metadata URLs only for what the environment does not give.
    let (region, keys) = match (env_region, env_keys) {
        (Some(region), Some(keys)) => (region, keys),
        (region, keys) => {
            let metadata = AwsMetadata::connect(aws).await?;
            let region = match region {
                Some(r) => r,
                None => metadata.region(aws).await?,
            };
            let keys = match keys {
                Some(k) => k,
                None => metadata.keys(aws).await?,
            };
            (region, keys)
        }
    };

    let url_text = aws.verification_url.replace("{region}", &region);
    let url = url::Url::parse(&url_text).map_err(|e| {
        TokenError::Refused(format!(
            "the `regional_cred_verification_url` `{url_text}` is not a URL ({e})"
        ))
    })?;
    let host = aws_auth::host_header(&url);
    let headers = [
        ("host", host.as_str()),
        ("x-goog-cloud-target-resource", audience),
    ];
    let request = SigningRequest {
        method: "POST",
        url: &url,
        headers: &headers,
        body: b"",
    };
    let signed = aws_auth::sign(&request, &keys, &region, "sts", chrono::Utc::now());
    let mut pairs: Vec<serde_json::Value> = Vec::new();
    let mut push = |key: &str, value: &str| {
        pairs.push(serde_json::json!({ "key": key, "value": value }));
    };
    if let Some(v) = signed.get("authorization") {
        push("Authorization", v);
    }
    push("host", &host);
    if let Some(v) = signed.get("x-amz-date") {
        push("x-amz-date", v);
    }
    if let Some(v) = signed.get("x-amz-security-token") {
        push("x-amz-security-token", v);
    }
    push("x-goog-cloud-target-resource", audience);
    let request = serde_json::json!({
        "url": url_text,
        "method": "POST",
        "headers": pairs,
    });
    Ok(url::form_urlencoded::byte_serialize(request.to_string().as_bytes()).collect())
}

/// The AWS instance metadata URLs of a credential source, with an IMDSv2
/// session token when the file names its URL. Never through a proxy: the
/// metadata service is link-local.
struct AwsMetadata {
    client: reqwest::Client,
    session: Option<reqwest::header::HeaderValue>,
}

impl AwsMetadata {
    async fn connect(aws: &AwsSubject) -> Result<AwsMetadata, TokenError> {
        let client = super::http::builder()
            .map_err(TokenError::Cloud)?
            .no_proxy()
            .timeout(AWS_METADATA_TIMEOUT)
            .build()
            .map_err(|e| TokenError::Refused(format!("cannot make an HTTP client: {e}")))?;
        let session = match &aws.imdsv2_url {
            None => None,
            Some(url) => {
                let failed = |why: String| {
                    TokenError::Refused(format!("the IMDSv2 session token URL `{url}` {why}"))
                };
                let response = client
                    .put(url)
                    .header("x-aws-ec2-metadata-token-ttl-seconds", "300")
                    .send()
                    .await
                    .map_err(|e| failed(format!("did not answer: {}", e.without_url())))?;
                if !response.status().is_success() {
                    return Err(failed(format!("answered {}", response.status())));
                }
                let body = super::read_body(response, AWS_METADATA_LIMIT)
                    .await
                    .map_err(|e| failed(format!("sent no token: {e}")))?;
                let mut token = reqwest::header::HeaderValue::from_bytes(
                    String::from_utf8_lossy(&body).trim().as_bytes(),
                )
                .map_err(|_| failed("sent a token that is not a header value".into()))?;
                token.set_sensitive(true);
                Some(token)
            }
        };
        Ok(AwsMetadata { client, session })
    }

    /// The region: the availability zone at `region_url` (`us-east-1b`)
    /// without its last letter.
    async fn region(&self, aws: &AwsSubject) -> Result<String, TokenError> {
        let url = aws.region_url.as_deref().ok_or_else(|| {
            TokenError::Refused(
                "no AWS region: set AWS_REGION, or give the file's `credential_source` a \
                 `region_url`"
                    .into(),
            )
        })?;
        let mut region = self.get(url).await?.trim().to_string();
        region.pop();
        if region.is_empty() {
            return Err(TokenError::Refused(format!(
                "the AWS region URL `{url}` answered no availability zone"
            )));
        }
        Ok(region)
    }

    /// The keys of the instance's role: its name at `url`, then its keys
    /// at `url/NAME`.
    async fn keys(&self, aws: &AwsSubject) -> Result<super::aws_auth::Credentials, TokenError> {
        let url = aws.credentials_url.as_deref().ok_or_else(|| {
            TokenError::Refused(
                "no AWS keys: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give the \
                 file's `credential_source` a `url`"
                    .into(),
            )
        })?;
        let roles = self.get(url).await?;
        let role = roles
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .ok_or_else(|| {
                TokenError::Refused(format!(
                    "the AWS credentials URL `{url}` named no IAM role (is an instance \
                     profile attached?)"
                ))
            })?
            .to_string();
        let doc = self
            .get(&format!("{}/{role}", url.trim_end_matches('/')))
            .await?;
        let keys: AwsRoleKeys = serde_json::from_str(&doc).map_err(|e| {
            TokenError::Refused(format!(
                "the AWS credentials of role `{role}` at `{url}` are not the expected JSON \
                 (line {} column {})",
                e.line(),
                e.column()
            ))
        })?;
        Ok(super::aws_auth::Credentials::new(
            keys.access_key_id,
            keys.secret_access_key,
            keys.token,
            super::aws_auth::CredentialSource::Imds {
                endpoint: url.to_string(),
            },
        ))
    }

    /// The text at `url`; the error names the URL, never the answer.
    async fn get(&self, url: &str) -> Result<String, TokenError> {
        let failed =
            |why: String| TokenError::Refused(format!("the AWS metadata URL `{url}` {why}"));
        let mut request = self.client.get(url);
        if let Some(token) = &self.session {
            request = request.header("x-aws-ec2-metadata-token", token.clone());
        }
        let response = request
            .send()
            .await
            .map_err(|e| failed(format!("did not answer: {}", e.without_url())))?;
        if !response.status().is_success() {
            return Err(failed(format!("answered {}", response.status())));
        }
        let body = super::read_body(response, AWS_METADATA_LIMIT)
            .await
            .map_err(|e| failed(format!("sent no text: {e}")))?;
        String::from_utf8(body.to_vec()).map_err(|_| failed("sent text that is not UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_secret() {
        let grant = Grant::RefreshToken {
            endpoint: "https://oauth2.googleapis.com/token".into(),
            client_id: "id".into(),
            client_secret: "GOCSPX-secret".into(),
            refresh_token: "1//refresh".into(),
        };
        let text = format!("{:?}", TokenSource::new(grant));
        assert!(!text.contains("GOCSPX-secret"), "{text}");
        assert!(!text.contains("1//refresh"), "{text}");
    }

    #[test]
    fn the_metadata_url_is_the_default_service_accounts_token() {
        let grant = Grant::Metadata {
            host: "169.254.169.254".into(),
        };
        assert_eq!(
            grant.url(),
            "http://169.254.169.254/computeMetadata/v1/instance/service-accounts/default/token"
        );
    }

    fn test_key() -> (serde_json::Value, Vec<u8>) {
        use aws_lc_rs::encoding::AsDer;
        use aws_lc_rs::signature::KeyPair as _;
        use base64::Engine as _;
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).unwrap();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(der.as_ref())
        );
        let json = serde_json::json!({
            "type": "service_account",
            "client_email": "ci@p.iam.gserviceaccount.com",
            "private_key_id": "k1",
            "private_key": pem,
            "token_uri": "https://oauth2.example/token",
        });
        (json, pair.public_key().as_ref().to_vec())
    }

    /// The claims of `jwt` after checking its RS256 signature with `public`.
    fn verified_claims(jwt: &str, public: &[u8]) -> serde_json::Value {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let (input, sig) = jwt.rsplit_once('.').unwrap();
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
            public,
        )
        .verify(input.as_bytes(), &b64.decode(sig).unwrap())
        .expect("the signature verifies with the key's public half");
        let (header, claims) = input.split_once('.').unwrap();
        let header: serde_json::Value =
            serde_json::from_slice(&b64.decode(header).unwrap()).unwrap();
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["kid"], "k1");
        serde_json::from_slice(&b64.decode(claims).unwrap()).unwrap()
    }

    #[test]
    fn a_key_signs_self_signed_tokens_and_jwt_bearer_assertions() {
        let (json, public) = test_key();
        let key = ServiceAccountKey::from_json(&json).unwrap();
        assert!(!format!("{key:?}").contains("PRIVATE"));
        for aud in [None, Some("https://oauth2.example/token")] {
            let claims = verified_claims(&key.sign(aud).unwrap(), &public);
            assert_eq!(claims["iss"], "ci@p.iam.gserviceaccount.com");
            // `sub` only in a self-signed token: in an assertion it would
            // ask for domain-wide delegation.
            let sub = aud.is_none().then_some("ci@p.iam.gserviceaccount.com");
            assert_eq!(claims.get("sub").and_then(|s| s.as_str()), sub);
            assert_eq!(claims["scope"], CLOUD_PLATFORM);
            let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
            assert_eq!(lifetime, 3600);
            assert_eq!(claims.get("aud").and_then(|a| a.as_str()), aud);
        }
    }

    #[test]
    fn a_key_without_a_usable_private_key_says_which_field() {
        let (mut json, _) = test_key();
        json["private_key"] =
            "-----BEGIN PRIVATE KEY-----\nU0VDUkVU\n-----END PRIVATE KEY-----".into();
        let err = ServiceAccountKey::from_json(&json).unwrap_err();
        assert!(
            err.contains("`private_key`") && !err.contains("U0VDUkVU"),
            "{err}"
        );
        json.as_object_mut().unwrap().remove("client_email");
        json["private_key"] = test_key().0["private_key"].clone();
        let err = ServiceAccountKey::from_json(&json).unwrap_err();
        assert!(err.contains("`client_email`"), "{err}");
    }

    fn hmac(key: &[u8], data: &str) -> Vec<u8> {
        use hmac::Mac;
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
        m.update(data.as_bytes());
        m.finalize().into_bytes().to_vec()
    }

    /// The subject token is Google's documented serialization of a signed
    /// `GetCallerIdentity` request; its signature is recomputed here from
    /// the SigV4 specification, not with absconda's signer.
    #[tokio::test]
    async fn the_aws_subject_token_is_a_signed_get_caller_identity_request() {
        use sha2::Digest;
        let audience = "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/aws";
        let aws = AwsSubject {
            verification_url:
                "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15"
                    .into(),
            region_url: None,
            credentials_url: None,
            imdsv2_url: None,
            env: super::super::aws_auth::Env::from_pairs([
                ("AWS_REGION", "eu-west-3"),
                ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
                (
                    "AWS_SECRET_ACCESS_KEY",
                    "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                ),
                ("AWS_SESSION_TOKEN", "session/token="),
            ]),
        };
        let token = aws_subject_token(&aws, audience).await.unwrap();
        assert!(
            !token.contains('{') && !token.contains('"'),
            "URL-encoded: {token}"
        );
        let decoded: String = url::form_urlencoded::parse(format!("t={token}").as_bytes())
            .next()
            .unwrap()
            .1
            .into_owned();
        let request: serde_json::Value = serde_json::from_str(&decoded).unwrap();
        assert_eq!(
            request["url"],
            "https://sts.eu-west-3.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15"
        );
        assert_eq!(request["method"], "POST");
        let headers: std::collections::BTreeMap<String, String> = request["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h["key"].as_str().unwrap().to_string(),
                    h["value"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let keys: Vec<&str> = headers.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "Authorization",
                "host",
                "x-amz-date",
                "x-amz-security-token",
                "x-goog-cloud-target-resource"
            ]
        );
        assert_eq!(headers["host"], "sts.eu-west-3.amazonaws.com");
        assert_eq!(headers["x-goog-cloud-target-resource"], audience);
        assert_eq!(headers["x-amz-security-token"], "session/token=");
        let date = &headers["x-amz-date"];
        let signed = "host;x-amz-date;x-amz-security-token;x-goog-cloud-target-resource";
        let canonical = format!(
            "POST\n/\nAction=GetCallerIdentity&Version=2011-06-15\nhost:sts.eu-west-3.amazonaws.com\n\
             x-amz-date:{date}\nx-amz-security-token:session/token=\n\
             x-goog-cloud-target-resource:{audience}\n\n{signed}\n{}",
            hex::encode(sha2::Sha256::digest(b""))
        );
        let day = &date[..8];
        let scope = format!("{day}/eu-west-3/sts/aws4_request");
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{date}\n{scope}\n{}",
            hex::encode(sha2::Sha256::digest(canonical.as_bytes()))
        );
        let mut k = hmac(b"AWS4wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", day);
        for part in ["eu-west-3", "sts", "aws4_request"] {
            k = hmac(&k, part);
        }
        let want = format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/{scope}, SignedHeaders={signed}, Signature={}",
            hex::encode(hmac(&k, &to_sign))
        );
        assert_eq!(headers["Authorization"], want);
    }

    #[tokio::test]
    async fn an_aws_source_without_a_region_says_where_to_give_one() {
        let aws = AwsSubject {
            verification_url: "https://sts.{region}.amazonaws.com".into(),
            region_url: None,
            credentials_url: None,
            imdsv2_url: None,
            env: super::super::aws_auth::Env::from_pairs([
                ("AWS_ACCESS_KEY_ID", "AKID"),
                ("AWS_SECRET_ACCESS_KEY", "secret"),
            ]),
        };
        let Err(TokenError::Refused(why)) = aws_subject_token(&aws, "aud").await else {
            panic!("expected a refusal");
        };
        assert!(
            why.contains("AWS_REGION") && why.contains("region_url"),
            "{why}"
        );
        assert!(!why.contains("secret"), "{why}");
    }
}
