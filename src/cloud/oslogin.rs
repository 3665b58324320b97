//! The Cloud OS Login API (`oslogin.googleapis.com/v1`): putting the user's
//! SSH public key on their Google account for a while, and learning the
//! POSIX username VMs with OS Login know them by.
//!
//! A VM with `enable-oslogin=TRUE` ignores keys in its metadata; its sshd
//! asks the OS Login service which keys the account behind a username holds.
//! So before connecting, absconda reads the account's login profile
//! (`users.getLoginProfile`): when the key is there and lives long enough,
//! nothing is written; when it is there but expires too soon, only its
//! expiry is extended (`users.sshPublicKeys.patch`); otherwise it is imported
//! with an expiry (`users.importSshPublicKey`), so keys do not pile up on the
//! account forever. The username comes from the profile's POSIX account for
//! the builder's project.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::Method;
use serde_json::{Value, json};
use tokio::time::Instant;
use url::Url;

use super::CloudError;
use super::gcp_auth::GcpAuth;
use super::retry::{Backoff, with_retry_until};

/// The OS Login API's base URL when `oslogin_endpoint` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://oslogin.googleapis.com";

/// The gcloud setting that overrides the endpoint, honoured the same way.
pub const ENDPOINT_ENV: &str = "CLOUDSDK_API_ENDPOINT_OVERRIDES_OSLOGIN";

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// IAM roles that allow logging in through OS Login, for hints.
const LOGIN_ROLES: &str = "roles/compute.osLogin (or roles/compute.osAdminLogin for sudo)";

/// A key as the login profile lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProfileKey {
    /// `ssh-ed25519 AAAA…` (the comment, if any, is kept out).
    key: String,
    /// Microseconds since the epoch; `None` = never expires.
    expires_usec: Option<u128>,
    /// `users/{user}/sshPublicKeys/{fingerprint}`.
    name: String,
}

/// What happened to the key, for messages and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyChange {
    /// The profile already held the key for long enough.
    Unchanged,
    /// The key was there; its expiry was moved later.
    Extended,
    /// The key was imported.
    Imported,
}

/// The outcome of [`OsLogin::ensure_key`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginUser {
    /// The POSIX username to log in as.
    pub username: String,
    pub change: KeyChange,
}

/// An OS Login client for one account.
pub struct OsLogin<'a> {
    base: Url,
    http: reqwest::Client,
    auth: &'a GcpAuth,
    backoff: Backoff,
}

impl<'a> OsLogin<'a> {
    /// `endpoint`: the base URL before `/v1` (`oslogin_endpoint:`, else
    /// `CLOUDSDK_API_ENDPOINT_OVERRIDES_OSLOGIN`, else the public one).
    pub fn new(
        endpoint: Option<&str>,
        auth: &'a GcpAuth,
        backoff: Backoff,
    ) -> Result<OsLogin<'a>, CloudError> {
        let from_env = std::env::var(ENDPOINT_ENV).ok().filter(|v| !v.is_empty());
        let endpoint = endpoint
            .map(str::to_string)
            .or(from_env)
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let mut base = Url::parse(&endpoint).map_err(|e| CloudError::Config {
            message: format!("OS Login endpoint `{endpoint}` is not a URL ({e})"),
        })?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(CloudError::Config {
                message: format!("OS Login endpoint `{endpoint}` must be an http or https URL"),
            });
        }
        // gcloud's override includes the version (`…/v1/`); accept both.
        let path = base.path().trim_end_matches('/').to_string();
        let path = path.strip_suffix("/v1").unwrap_or(&path).to_string();
        base.set_path(&path);
        let mut builder = super::http::builder()?
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("absconda/", env!("CARGO_PKG_VERSION")));
        if matches!(base.host_str(), Some("127.0.0.1" | "localhost" | "[::1]")) {
            builder = builder.no_proxy();
        }
        let http = builder.build().map_err(|e| CloudError::Transport {
            url: endpoint.clone(),
            source: Box::new(e),
        })?;
        Ok(OsLogin {
            base,
            http,
            auth,
            backoff,
        })
    }

    /// Makes sure `account`'s login profile holds `public_key` until at
    /// least `needed` (importing it, or extending it, to expire at
    /// `expire`), and returns the POSIX username for `project`.
    pub async fn ensure_key(
        &self,
        account: &str,
        project: &str,
        public_key: &str,
        needed: SystemTime,
        expire: SystemTime,
    ) -> Result<LoginUser, CloudError> {
        let deadline = Instant::now() + self.backoff.deadline;
        let wanted = key_body(public_key);
        let needed_usec = usec(needed);
        let until_usec = usec(expire);
        let mut url = self.url(&format!("users/{account}/loginProfile"))?;
        url.query_pairs_mut().append_pair("projectId", project);
        let profile = self
            .call("users.getLoginProfile", Method::GET, &url, None, deadline)
            .await?;
        let keys = profile_keys(&profile, account);
        let found = keys.iter().find(|k| key_body(&k.key) == wanted);
        let (profile, change) = match found {
            Some(k) if k.expires_usec.is_none_or(|e| e >= needed_usec) => {
                (profile, KeyChange::Unchanged)
            }
            Some(k) => {
                let mut url = self.url(&k.name)?;
                url.query_pairs_mut()
                    .append_pair("updateMask", "expirationTimeUsec");
                let body = json!({
                    "key": public_key,
                    "expirationTimeUsec": until_usec.to_string(),
                });
                self.call(
                    "users.sshPublicKeys.patch",
                    Method::PATCH,
                    &url,
                    Some(&body),
                    deadline,
                )
                .await?;
                (profile, KeyChange::Extended)
            }
            None => {
                let mut url = self.url(&format!("users/{account}:importSshPublicKey"))?;
                url.query_pairs_mut().append_pair("projectId", project);
                let body = json!({
                    "key": public_key,
                    "expirationTimeUsec": until_usec.to_string(),
                });
                let answer = self
                    .call(
                        "users.importSshPublicKey",
                        Method::POST,
                        &url,
                        Some(&body),
                        deadline,
                    )
                    .await?;
                let profile = answer.get("loginProfile").cloned().unwrap_or(answer);
                (profile, KeyChange::Imported)
            }
        };
        let username = posix_username(&profile, project).ok_or_else(|| CloudError::Protocol {
            url: self.base.to_string(),
            message: format!(
                "the OS Login profile of `{account}` has no POSIX account for project `{project}`"
            ),
        })?;
        Ok(LoginUser { username, change })
    }

    /// `{base}/v1/{path}`; `path` is the resource name, `/`-separated.
    fn url(&self, path: &str) -> Result<Url, CloudError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|_| CloudError::Config {
                message: format!("`{}` cannot be a base URL", self.base),
            })?
            .pop_if_empty()
            .push("v1")
            .extend(path.split('/'));
        Ok(url)
    }

    async fn call(
        &self,
        what: &str,
        method: Method,
        url: &Url,
        body: Option<&Value>,
        deadline: Instant,
    ) -> Result<Value, CloudError> {
        with_retry_until(what, self.backoff, deadline, || {
            self.send_once(what, method.clone(), url, body)
        })
        .await
    }

    async fn send_once(
        &self,
        what: &str,
        method: Method,
        url: &Url,
        body: Option<&Value>,
    ) -> Result<Value, CloudError> {
        let headers = self.auth.headers().await?;
        let mut request = self
            .http
            .request(method.clone(), url.clone())
            .headers(headers)
            .timeout(REQUEST_TIMEOUT);
        if let Some(body) = body {
            request = request.json(body);
        }
        let transport = |e: reqwest::Error| CloudError::Transport {
            url: url.to_string(),
            source: Box::new(e.without_url()),
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = response.bytes().await.map_err(transport)?;
        tracing::debug!(%method, %url, status, "OS Login API answered");
        let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
        if (200..300).contains(&status) {
            return parsed.ok_or_else(|| CloudError::Protocol {
                url: url.to_string(),
                message: "expected a JSON answer".into(),
            });
        }
        let error = parsed.as_ref().and_then(|v| v.get("error"));
        let message = error
            .and_then(|e| e.get("message"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| {
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned()
            });
        let code = error
            .and_then(|e| e.get("status"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}"));
        if status == 401 {
            return Err(self
                .auth
                .auth_error(format!("HTTP 401 from OS Login: {message}")));
        }
        let message = if status == 403 {
            format!(
                "{message}; hint: the account needs {LOGIN_ROLES} on the builder's project or \
                 instance (and roles/iam.serviceAccountUser when the VM runs as a service \
                 account), and the project must have the OS Login API enabled"
            )
        } else {
            message
        };
        Err(CloudError::Api {
            service: "OS Login",
            operation: what.to_string(),
            status,
            code,
            message,
            retry_after,
        })
    }
}

fn usec(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros()
}

/// `type base64` of an OpenSSH public key line, without its comment.
pub fn key_body(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The keys in a LoginProfile's `sshPublicKeys` map (fingerprint → SshPublicKey).
fn profile_keys(profile: &Value, account: &str) -> Vec<ProfileKey> {
    let Some(map) = profile.get("sshPublicKeys").and_then(Value::as_object) else {
        return Vec::new();
    };
    map.iter()
        .filter_map(|(fingerprint, k)| {
            let key = k.get("key")?.as_str()?.to_string();
            let expires_usec = k
                .get("expirationTimeUsec")
                .and_then(|v| match v {
                    Value::String(s) => s.parse::<u128>().ok(),
                    Value::Number(n) => n.as_u64().map(u128::from),
                    _ => None,
                })
                .filter(|e| *e > 0);
            let name = k
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| {
                    let fp = k
                        .get("fingerprint")
                        .and_then(Value::as_str)
                        .unwrap_or(fingerprint);
                    format!("users/{account}/sshPublicKeys/{fp}")
                });
            Some(ProfileKey {
                key,
                expires_usec,
                name,
            })
        })
        .collect()
}

/// The username of the profile's POSIX account for `project`: the one whose
/// `accountId` is the project, else the primary one, else the first.
fn posix_username(profile: &Value, project: &str) -> Option<String> {
    let accounts = profile.get("posixAccounts")?.as_array()?;
    let username = |a: &Value| {
        a.get("username")
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
    };
    accounts
        .iter()
        .filter(|a| a.get("accountId").and_then(Value::as_str) == Some(project))
        .find_map(username)
        .or_else(|| {
            accounts
                .iter()
                .filter(|a| a.get("primary").and_then(Value::as_bool) == Some(true))
                .find_map(username)
        })
        .or_else(|| accounts.iter().find_map(username))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Value {
        json!({
            "name": "users/dev@example.com",
            "posixAccounts": [
                {"primary": true, "username": "dev_example_com", "uid": "1001", "gid": "1001",
                 "homeDirectory": "/home/dev_example_com", "operatingSystemType": "LINUX",
                 "accountId": "other-project", "name": "users/dev@example.com/projects/other-project"},
                {"primary": false, "username": "ext_dev_example_com", "accountId": "my-project",
                 "operatingSystemType": "LINUX"}
            ],
            "sshPublicKeys": {
                "ab12": {"key": "ssh-ed25519 AAAAkey1 dev@laptop", "expirationTimeUsec": "1700000000000000",
                         "fingerprint": "ab12", "name": "users/dev@example.com/sshPublicKeys/ab12"},
                "cd34": {"key": "ssh-rsa AAAAkey2", "fingerprint": "cd34"}
            }
        })
    }

    #[test]
    fn keys_are_read_from_the_profile_map() {
        let mut keys = profile_keys(&profile(), "dev@example.com");
        keys.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(
            keys,
            vec![
                ProfileKey {
                    key: "ssh-ed25519 AAAAkey1 dev@laptop".into(),
                    expires_usec: Some(1_700_000_000_000_000),
                    name: "users/dev@example.com/sshPublicKeys/ab12".into(),
                },
                ProfileKey {
                    key: "ssh-rsa AAAAkey2".into(),
                    expires_usec: None,
                    name: "users/dev@example.com/sshPublicKeys/cd34".into(),
                },
            ]
        );
    }

    #[test]
    fn the_username_is_the_projects_posix_account() {
        assert_eq!(
            posix_username(&profile(), "my-project").as_deref(),
            Some("ext_dev_example_com")
        );
        assert_eq!(
            posix_username(&profile(), "elsewhere").as_deref(),
            Some("dev_example_com")
        );
        assert_eq!(posix_username(&json!({}), "p"), None);
    }

    #[test]
    fn keys_compare_without_their_comment() {
        assert_eq!(
            key_body("ssh-ed25519 AAAA a@b"),
            key_body("ssh-ed25519  AAAA")
        );
        assert_ne!(key_body("ssh-ed25519 AAAA"), key_body("ssh-ed25519 AAAB"));
    }
}
