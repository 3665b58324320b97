//! The registry HTTP API v2, from the client: reading the manifests the
//! builders pushed and writing the multi-platform index over them.
//!
//! Only manifests cross this connection (a few kilobytes); the layers were
//! pushed by the builders. Authentication follows the registry's
//! `WWW-Authenticate` challenge: `Basic` gets the credentials of
//! [`crate::registry::lookup`] directly, `Bearer` sends them to the token
//! service the challenge names (realm, service) for a token scoped to
//! `repository:NAME:pull,push`. A loopback registry (`localhost`,
//! `127.0.0.0/8`, `[::1]`) is spoken to in plain HTTP, as docker does by
//! default; every other one over HTTPS with absconda's trust roots.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::Digest as _;

use crate::platform::Platform;
use crate::registry::Credentials;

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// The largest manifest absconda reads.
const MAX_MANIFEST: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RegistryApiError {
    #[error("cannot make an HTTP client for the registry")]
    Client(#[source] crate::cloud::CloudError),
    #[error("cannot reach the registry at `{url}`")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the registry refused `{method} {url}` (HTTP {status}): {body}")]
    Status {
        method: String,
        url: String,
        status: u16,
        body: String,
    },
    #[error("the registry's token service at `{realm}` gave no token: {why}")]
    Token { realm: String, why: String },
    #[error("the manifest at `{url}` is not usable: {why}")]
    BadManifest { url: String, why: String },
}

/// A `WWW-Authenticate` challenge: the scheme and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: BTreeMap<String, String>,
}

/// Parses `Bearer realm="https://auth/token",service="reg",scope="repository:a/b:pull,push"`
/// (one challenge; values quoted or not, commas allowed inside quotes).
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = match header.split_once(char::is_whitespace) {
        Some((s, r)) => (s, r),
        None => (header, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(c) if *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.trim().is_empty() {
            break;
        }
        if chars.next() != Some('=') {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        params.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

/// Where a repository lives: the API's base URL and the name in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repository {
    /// `https://ghcr.io`, `http://127.0.0.1:5000`.
    pub base: String,
    /// `lab/analysis`, `library/ubuntu`.
    pub name: String,
}

impl Repository {
    /// From an image repository as `--repository` takes it (no tag).
    pub fn parse(repository: &str) -> Repository {
        let registry = crate::registry::registry_of(repository);
        let explicit = repository
            .split_once('/')
            .filter(|(first, _)| *first == registry);
        let mut name = match explicit {
            Some((_, rest)) => rest.to_string(),
            None => repository.to_string(),
        };
        let base = if registry == "docker.io" {
            if !name.contains('/') {
                name = format!("library/{name}");
            }
            "https://registry-1.docker.io".to_string()
        } else if is_loopback(&registry) {
            format!("http://{registry}")
        } else {
            format!("https://{registry}")
        };
        Repository { base, name }
    }
}

fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => registry.split(':').next().unwrap_or(registry),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Credentials go to a token service only over HTTPS, or on loopback.
fn realm_may_get_credentials(realm: &str) -> bool {
    match url::Url::parse(realm) {
        Ok(u) if u.scheme() == "https" => true,
        Ok(u) if u.scheme() == "http" => u.host_str().is_some_and(|h| {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            h == "localhost"
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }),
        _ => false,
    }
}

/// A manifest as the registry stores it.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub media_type: String,
    pub digest: String,
    pub bytes: Vec<u8>,
}

/// What an index entry points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// `sha256:<hex>` of some bytes.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(bytes))
}

/// The index over per-platform manifests: a Docker manifest list when they
/// are all Docker manifests, else an OCI image index. Returns the media
/// type and the bytes to PUT.
pub fn index_json(entries: &[(Descriptor, Platform)]) -> (String, Vec<u8>) {
    let media_type = if entries.iter().all(|(d, _)| d.media_type == DOCKER_MANIFEST) {
        DOCKER_LIST
    } else {
        OCI_INDEX
    };
    let manifests: Vec<serde_json::Value> = entries
        .iter()
        .map(|(d, p)| {
            let mut platform = serde_json::json!({ "architecture": p.arch, "os": p.os });
            if let Some(v) = &p.variant {
                platform["variant"] = v.clone().into();
            }
            serde_json::json!({
                "mediaType": d.media_type,
                "digest": d.digest,
                "size": d.size,
                "platform": platform,
            })
        })
        .collect();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": manifests,
    });
    // serde_json's `json!` keeps keys sorted; the bytes are what is digested.
    (media_type.to_string(), index.to_string().into_bytes())
}

/// The descriptor for `platform` in what a builder pushed: the manifest
/// itself, or, when the push made an index (BuildKit's attestations), its
/// entry for that platform.
pub fn descriptor_for(
    m: &Manifest,
    platform: &Platform,
    url: &str,
) -> Result<Descriptor, RegistryApiError> {
    let bad = |why: String| RegistryApiError::BadManifest {
        url: url.to_string(),
        why,
    };
    if m.media_type == DOCKER_MANIFEST || m.media_type == OCI_MANIFEST {
        return Ok(Descriptor {
            media_type: m.media_type.clone(),
            digest: m.digest.clone(),
            size: m.bytes.len() as u64,
        });
    }
    if m.media_type != DOCKER_LIST && m.media_type != OCI_INDEX {
        return Err(bad(format!("unexpected media type `{}`", m.media_type)));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&m.bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    let entries = v["manifests"].as_array().cloned().unwrap_or_default();
    for e in entries {
        let (Some(os), Some(arch)) = (
            e["platform"]["os"].as_str(),
            e["platform"]["architecture"].as_str(),
        ) else {
            continue;
        };
        let have = Platform {
            os: os.into(),
            arch: arch.into(),
            variant: e["platform"]["variant"].as_str().map(String::from),
        };
        if have.serves(platform) {
            return Ok(Descriptor {
                media_type: e["mediaType"].as_str().unwrap_or(OCI_MANIFEST).to_string(),
                digest: e["digest"]
                    .as_str()
                    .ok_or_else(|| bad("an entry has no digest".into()))?
                    .to_string(),
                size: e["size"]
                    .as_u64()
                    .ok_or_else(|| bad("an entry has no size".into()))?,
            });
        }
    }
    Err(bad(format!("it is an index without a `{platform}` entry")))
}

/// A client for one repository of one registry.
pub struct Client {
    http: reqwest::Client,
    repo: Repository,
    creds: Option<Credentials>,
    /// The `Authorization` value that worked last.
    auth: tokio::sync::Mutex<Option<String>>,
}

impl Client {
    pub fn new(repo: Repository, creds: Option<Credentials>) -> Result<Client, RegistryApiError> {
        let http = crate::cloud::http::builder()
            .map_err(RegistryApiError::Client)?
            .user_agent(concat!("absconda/", env!("CARGO_PKG_VERSION")))
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| {
                RegistryApiError::Client(crate::cloud::CloudError::Config {
                    message: format!("cannot build the HTTP client: {e}"),
                })
            })?;
        Ok(Client {
            http,
            repo,
            creds,
            auth: tokio::sync::Mutex::new(None),
        })
    }

    pub fn manifest_url(&self, reference: &str) -> String {
        format!(
            "{}/v2/{}/manifests/{reference}",
            self.repo.base, self.repo.name
        )
    }

    /// Sends a request, answering one authentication challenge.
    async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::Response, RegistryApiError> {
        let transport = |source| RegistryApiError::Transport {
            url: url.to_string(),
            source,
        };
        let make = |auth: Option<&str>| {
            let mut r = self.http.request(method.clone(), url);
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            if let Some(a) = auth {
                r = r.header(reqwest::header::AUTHORIZATION, a);
            }
            if let Some(b) = &body {
                r = r.body(b.clone());
            }
            r
        };
        let cached = self.auth.lock().await.clone();
        let resp = make(cached.as_deref()).send().await.map_err(transport)?;
        if resp.status() != reqwest::StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let Some(challenge) = resp
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|h| h.to_str().ok())
            .and_then(parse_challenge)
        else {
            return Ok(resp);
        };
        let Some(auth) = self.answer(&challenge).await? else {
            return Ok(resp);
        };
        *self.auth.lock().await = Some(auth.clone());
        make(Some(&auth)).send().await.map_err(transport)
    }

    /// The `Authorization` value for a challenge; `None` when there is
    /// nothing to answer with.
    async fn answer(&self, c: &Challenge) -> Result<Option<String>, RegistryApiError> {
        let basic = self.creds.as_ref().map(|c| {
            format!(
                "Basic {}",
                B64.encode(format!("{}:{}", c.username, c.password.expose()))
            )
        });
        match c.scheme.as_str() {
            "basic" => Ok(basic),
            "bearer" => {
                let Some(realm) = c.params.get("realm") else {
                    return Ok(None);
                };
                let mut query: Vec<(&str, String)> = Vec::new();
                if let Some(s) = c.params.get("service") {
                    query.push(("service", s.clone()));
                }
                query.push(("scope", format!("repository:{}:pull,push", self.repo.name)));
                let token_err = |why: String| RegistryApiError::Token {
                    realm: realm.clone(),
                    why,
                };
                if !realm_may_get_credentials(realm) {
                    return Err(token_err(
                        "it is not an https:// URL (nor on loopback), so the credentials are not sent to it".into(),
                    ));
                }
                let mut r = self.http.get(realm).query(&query);
                if let Some(b) = &basic {
                    r = r.header(reqwest::header::AUTHORIZATION, b);
                }
                let resp = r
                    .send()
                    .await
                    .map_err(|source| RegistryApiError::Transport {
                        url: realm.clone(),
                        source,
                    })?;
                let status = resp.status();
                if !status.is_success() {
                    return Err(token_err(format!("HTTP {}", status.as_u16())));
                }
                let v: serde_json::Value = resp
                    .json()
                    .await
                    .map_err(|e| token_err(format!("the answer is not JSON: {e}")))?;
                let token = v["token"]
                    .as_str()
                    .or_else(|| v["access_token"].as_str())
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| token_err("the answer has no `token`".into()))?;
                Ok(Some(format!("Bearer {token}")))
            }
            _ => Ok(None),
        }
    }

    /// GET a manifest by tag or digest, with its media type and digest.
    pub async fn manifest(&self, reference: &str) -> Result<Manifest, RegistryApiError> {
        let url = self.manifest_url(reference);
        let accept = [DOCKER_MANIFEST, OCI_MANIFEST, DOCKER_LIST, OCI_INDEX].join(", ");
        let resp = self
            .send(
                reqwest::Method::GET,
                &url,
                &[("Accept", accept.as_str())],
                None,
            )
            .await?;
        let resp = check(resp, "GET", &url).await?;
        let header_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|h| h.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| RegistryApiError::Transport {
                url: url.clone(),
                source,
            })?;
        if bytes.len() > MAX_MANIFEST {
            return Err(RegistryApiError::BadManifest {
                url,
                why: format!("it is larger than {MAX_MANIFEST} bytes"),
            });
        }
        let body_type = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["mediaType"].as_str().map(String::from));
        let media_type =
            body_type
                .or(header_type)
                .ok_or_else(|| RegistryApiError::BadManifest {
                    url: url.clone(),
                    why: "it has no media type".into(),
                })?;
        Ok(Manifest {
            media_type,
            digest: digest_of(&bytes),
            bytes: bytes.to_vec(),
        })
    }

    /// PUT a manifest under `tag`; returns its digest.
    pub async fn put_manifest(
        &self,
        tag: &str,
        media_type: &str,
        body: &[u8],
    ) -> Result<String, RegistryApiError> {
        let url = self.manifest_url(tag);
        let resp = self
            .send(
                reqwest::Method::PUT,
                &url,
                &[("Content-Type", media_type)],
                Some(body.to_vec()),
            )
            .await?;
        check(resp, "PUT", &url).await?;
        Ok(digest_of(body))
    }
}

async fn check(
    resp: reqwest::Response,
    method: &str,
    url: &str,
) -> Result<reqwest::Response, RegistryApiError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.text().await.unwrap_or_default();
    let body: String = body.chars().filter(|c| !c.is_control()).take(300).collect();
    Err(RegistryApiError::Status {
        method: method.into(),
        url: url.into(),
        status: status.as_u16(),
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge_parsing() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:lab/app:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.example.com/token");
        assert_eq!(c.params["service"], "registry.example.com");
        assert_eq!(c.params["scope"], "repository:lab/app:pull,push");
        let c = parse_challenge(r#"Basic realm="absconda test""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "absconda test");
        let c = parse_challenge(
            r#"Bearer realm=https://ghcr.io/token, service="ghcr.io", error="insufficient_scope""#,
        )
        .unwrap();
        assert_eq!(c.params["realm"], "https://ghcr.io/token");
        assert_eq!(c.params["service"], "ghcr.io");
        assert_eq!(c.params["error"], "insufficient_scope");
        assert!(parse_challenge("").is_none());
    }

    #[test]
    fn credentials_go_only_to_https_or_loopback_token_services() {
        for (realm, ok) in [
            ("https://auth.docker.io/token", true),
            ("http://127.0.0.1:4000/token", true),
            ("http://localhost/token", true),
            ("http://[::1]:80/token", true),
            ("http://auth.example.com/token", false),
            ("ftp://auth.example.com/token", false),
            ("not a url", false),
        ] {
            assert_eq!(realm_may_get_credentials(realm), ok, "{realm}");
        }
    }

    #[test]
    fn repository_table() {
        let cases = [
            (
                "127.0.0.1:5000/team/app",
                "http://127.0.0.1:5000",
                "team/app",
            ),
            ("localhost/app", "http://localhost", "app"),
            ("ghcr.io/lab/analysis", "https://ghcr.io", "lab/analysis"),
            ("ubuntu", "https://registry-1.docker.io", "library/ubuntu"),
            ("lab/app", "https://registry-1.docker.io", "lab/app"),
            (
                "docker.io/lab/app",
                "https://registry-1.docker.io",
                "lab/app",
            ),
        ];
        for (r, base, name) in cases {
            let got = Repository::parse(r);
            assert_eq!((got.base.as_str(), got.name.as_str()), (base, name), "{r}");
        }
    }

    #[test]
    fn the_index_lists_each_platform_with_its_manifest() {
        let d = |n: u8, t: &str| Descriptor {
            media_type: t.into(),
            digest: format!("sha256:{}", format!("{n:02x}").repeat(32)),
            size: 500 + n as u64,
        };
        let p = |s| Platform::parse(s).unwrap();
        let (mt, bytes) = index_json(&[
            (d(1, DOCKER_MANIFEST), p("linux/amd64")),
            (d(2, DOCKER_MANIFEST), p("linux/arm/v7")),
        ]);
        assert_eq!(mt, DOCKER_LIST);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["schemaVersion"], 2);
        assert_eq!(v["mediaType"], DOCKER_LIST);
        let m = v["manifests"].as_array().unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0]["digest"], d(1, "").digest);
        assert_eq!(m[0]["size"], 501);
        assert_eq!(m[0]["mediaType"], DOCKER_MANIFEST);
        assert_eq!(
            m[0]["platform"],
            serde_json::json!({"architecture": "amd64", "os": "linux"})
        );
        assert_eq!(
            m[1]["platform"],
            serde_json::json!({"architecture": "arm", "os": "linux", "variant": "v7"})
        );
        // OCI manifests, or a mix, make an OCI index.
        let (mt, _) = index_json(&[
            (d(1, OCI_MANIFEST), p("linux/amd64")),
            (d(2, DOCKER_MANIFEST), p("linux/arm64")),
        ]);
        assert_eq!(mt, OCI_INDEX);
        assert_eq!(
            digest_of(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn an_index_pushed_by_buildkit_gives_its_platform_entry() {
        let index = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": "sha256:aa", "size": 7,
                 "platform": {"architecture": "arm64", "os": "linux"}},
                {"mediaType": OCI_MANIFEST, "digest": "sha256:bb", "size": 9,
                 "platform": {"architecture": "unknown", "os": "unknown"}}
            ]
        });
        let m = Manifest {
            media_type: OCI_INDEX.into(),
            digest: "sha256:cc".into(),
            bytes: index.to_string().into_bytes(),
        };
        let d = descriptor_for(&m, &Platform::parse("linux/arm64").unwrap(), "u").unwrap();
        assert_eq!((d.digest.as_str(), d.size), ("sha256:aa", 7));
        assert!(descriptor_for(&m, &Platform::parse("linux/amd64").unwrap(), "u").is_err());
    }
}
