//! Google access tokens that need a request: the refresh token of an
//! `authorized_user` file (gcloud's application-default login), exchanged at
//! the file's `token_uri` (RFC 6749 §6), the default service account's
//! token from the metadata server of the VM absconda runs on, and a service
//! account's token from IAM Credentials' `generateAccessToken` for an
//! `impersonated_service_account` file whose source is a user login
//! (`gcloud auth application-default login --impersonate-service-account`),
//! and the RFC 8693 token exchange at Google's STS of an `external_account`
//! file (workload identity federation: a CI system's OIDC token read from a
//! file or fetched from a URL), optionally followed by impersonation.
//!
//! google-cloud-auth can fetch both, but for every fetch it makes a client
//! with `reqwest::Client::new()`: reqwest's platform verifier, which trusts
//! the system's CA store only, cannot be given other roots or a client, and
//! panics when that store is empty (a `FROM scratch` CI image), even for the
//! metadata server's `http://` URL. These two requests are small and fully
//! documented, so absconda makes them itself with the client every other
//! request uses ([`super::http::builder`]: the system store or the built-in
//! roots, plus `ca_file:`). A service account key needs no request at all
//! (google-cloud-auth signs a self-signed JWT locally), so it stays with the
//! crate.
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
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Grant::RefreshToken { .. } => "Grant::RefreshToken",
            Grant::Metadata { .. } => "Grant::Metadata",
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

    async fn fetch(&self) -> Result<Cached, TokenError> {
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
            Grant::Sts {
                audience,
                subject_token_type,
                user_project,
                subject,
                ..
            } => {
                let subject_token = subject_token(&client, subject).await?;
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
async fn subject_token(client: &reqwest::Client, subject: &Subject) -> Result<String, TokenError> {
    let (text, json_field, from) = match subject {
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
}
