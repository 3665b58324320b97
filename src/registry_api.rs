//! The registry HTTP API v2: reading the manifests the builders pushed and
//! writing the multi-platform index over them.
//!
//! The requests go from this machine, or, when it cannot reach the
//! registry, through a builder ([`Route`]): each one over a `direct-tcpip`
//! channel that the builder's sshd dials, with absconda speaking HTTP/1.1
//! (and TLS) over it, so nothing has to be installed or run on the builder.
//! The API logic (challenges, tokens, manifests) is the same on both.
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
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::Digest as _;

use crate::platform::Platform;
use crate::registry::Credentials;
use crate::ssh::Session;

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
    /// The registry could not be dialled (refused, no route, timed out):
    /// another route may reach it.
    #[error("cannot reach the registry at `{url}` {route}")]
    Unreachable {
        url: String,
        route: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the exchange with the registry at `{url}` failed")]
    Transport {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
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

impl RegistryApiError {
    /// Whether the registry could not be dialled on this route (not a
    /// refusal, a bad answer or a certificate): another route may do.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, RegistryApiError::Unreachable { .. })
    }
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

/// How the requests reach the registry.
pub enum Route {
    /// From this machine, with reqwest (proxies from the environment).
    Direct(reqwest::Client),
    /// From a builder: each request goes over a `direct-tcpip` channel that
    /// the builder's sshd opens to the registry, spoken as HTTP/1.1 (TLS
    /// for `https://`, with absconda's trust roots) by absconda itself.
    /// Nothing runs on the builder.
    Builder { name: String, session: Arc<Session> },
}

impl Route {
    /// `from this machine`, `through builder `amd``: for messages.
    pub fn describe(&self) -> String {
        match self {
            Route::Direct(_) => "from this machine".into(),
            Route::Builder { name, .. } => format!("through builder `{name}`"),
        }
    }
}

/// One HTTP request, whatever carries it.
struct Request<'a> {
    method: &'static str,
    url: &'a str,
    headers: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
}

/// What came back: the parts the API needs.
struct Reply {
    status: u16,
    content_type: Option<String>,
    challenge: Option<String>,
    /// `Location` of a redirect.
    location: Option<String>,
    body: Vec<u8>,
}

const USER_AGENT: &str = concat!("absconda/", env!("CARGO_PKG_VERSION"));
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_REDIRECTS: usize = 5;

/// A client for one repository of one registry.
pub struct Client {
    route: Route,
    repo: Repository,
    creds: Option<Credentials>,
    /// The `Authorization` value that worked last.
    auth: tokio::sync::Mutex<Option<String>>,
}

impl Client {
    /// A client that speaks to the registry from this machine.
    pub fn new(repo: Repository, creds: Option<Credentials>) -> Result<Client, RegistryApiError> {
        let http = crate::cloud::http::builder()
            .map_err(RegistryApiError::Client)?
            .user_agent(USER_AGENT)
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| {
                RegistryApiError::Client(crate::cloud::CloudError::Config {
                    message: format!("cannot build the HTTP client: {e}"),
                })
            })?;
        Ok(Client::with_route(repo, creds, Route::Direct(http)))
    }

    /// A client whose requests go through `route`.
    pub fn with_route(repo: Repository, creds: Option<Credentials>, route: Route) -> Client {
        Client {
            route,
            repo,
            creds,
            auth: tokio::sync::Mutex::new(None),
        }
    }

    /// The route the requests take.
    pub fn route(&self) -> &Route {
        &self.route
    }

    /// Gives the builder's session back, once the client is done with it.
    pub fn into_session(self) -> Option<Arc<Session>> {
        match self.route {
            Route::Direct(_) => None,
            Route::Builder { session, .. } => Some(session),
        }
    }

    pub fn manifest_url(&self, reference: &str) -> String {
        format!(
            "{}/v2/{}/manifests/{reference}",
            self.repo.base, self.repo.name
        )
    }

    /// One exchange over the route.
    async fn exchange(&self, req: &Request<'_>) -> Result<Reply, RegistryApiError> {
        match &self.route {
            Route::Direct(http) => exchange_direct(http, req).await,
            Route::Builder { name, session } => {
                // Blobs are often redirected to storage (S3, GCS): followed
                // as reqwest does, without the credentials on another host.
                let mut url = req.url.to_string();
                let mut headers = req.headers.clone();
                for _ in 0..=MAX_REDIRECTS {
                    let this = Request {
                        method: req.method,
                        url: &url,
                        headers: headers.clone(),
                        body: req.body.clone(),
                    };
                    let reply = match tokio::time::timeout(
                        REQUEST_TIMEOUT,
                        exchange_over(session, name, &this),
                    )
                    .await
                    {
                        Ok(r) => r?,
                        Err(_) => {
                            return Err(RegistryApiError::Unreachable {
                                url,
                                route: self.route.describe(),
                                source: format!("no answer within {}s", REQUEST_TIMEOUT.as_secs())
                                    .into(),
                            });
                        }
                    };
                    let Some((next, same_origin)) =
                        redirect(&url, req.method, reply.status, reply.location.as_deref())
                    else {
                        return Ok(reply);
                    };
                    if !same_origin {
                        headers.retain(|(k, _)| !k.eq_ignore_ascii_case("authorization"));
                    }
                    url = next;
                }
                Err(RegistryApiError::Transport {
                    url: req.url.to_string(),
                    source: format!("more than {MAX_REDIRECTS} redirects").into(),
                })
            }
        }
    }

    /// Sends a request, answering one authentication challenge.
    async fn send(
        &self,
        method: &'static str,
        url: &str,
        headers: &[(&'static str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Reply, RegistryApiError> {
        let make = |auth: Option<&str>| {
            let mut headers: Vec<(&'static str, String)> =
                headers.iter().map(|(k, v)| (*k, v.to_string())).collect();
            if let Some(a) = auth {
                headers.push(("Authorization", a.to_string()));
            }
            Request {
                method,
                url,
                headers,
                body: body.clone(),
            }
        };
        let cached = self.auth.lock().await.clone();
        let reply = self.exchange(&make(cached.as_deref())).await?;
        if reply.status != 401 {
            return Ok(reply);
        }
        let Some(challenge) = reply.challenge.as_deref().and_then(parse_challenge) else {
            return Ok(reply);
        };
        let Some(auth) = self.answer(&challenge).await? else {
            return Ok(reply);
        };
        *self.auth.lock().await = Some(auth.clone());
        self.exchange(&make(Some(&auth))).await
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
                let token_err = |why: String| RegistryApiError::Token {
                    realm: realm.clone(),
                    why,
                };
                if !realm_may_get_credentials(realm) {
                    return Err(token_err(
                        "it is not an https:// URL (nor on loopback), so the credentials are not sent to it".into(),
                    ));
                }
                let mut url = url::Url::parse(realm)
                    .map_err(|e| token_err(format!("it is not a URL: {e}")))?;
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = c.params.get("service") {
                        q.append_pair("service", s);
                    }
                    q.append_pair("scope", &format!("repository:{}:pull,push", self.repo.name));
                }
                let mut headers = Vec::new();
                if let Some(b) = basic {
                    headers.push(("Authorization", b));
                }
                let reply = self
                    .exchange(&Request {
                        method: "GET",
                        url: url.as_str(),
                        headers,
                        body: None,
                    })
                    .await?;
                if !(200..300).contains(&reply.status) {
                    return Err(token_err(format!("HTTP {}", reply.status)));
                }
                let v: serde_json::Value = serde_json::from_slice(&reply.body)
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
        let reply = self
            .send("GET", &url, &[("Accept", accept.as_str())], None)
            .await?;
        let reply = check(reply, "GET", &url)?;
        let body_type = serde_json::from_slice::<serde_json::Value>(&reply.body)
            .ok()
            .and_then(|v| v["mediaType"].as_str().map(String::from));
        let header_type = reply
            .content_type
            .as_deref()
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
        let media_type =
            body_type
                .or(header_type)
                .ok_or_else(|| RegistryApiError::BadManifest {
                    url: url.clone(),
                    why: "it has no media type".into(),
                })?;
        Ok(Manifest {
            media_type,
            digest: digest_of(&reply.body),
            bytes: reply.body,
        })
    }

    /// GET a blob (an image config) by digest, checked against it.
    pub async fn blob(&self, digest: &str) -> Result<Vec<u8>, RegistryApiError> {
        let url = format!("{}/v2/{}/blobs/{digest}", self.repo.base, self.repo.name);
        let reply = self.send("GET", &url, &[("Accept", "*/*")], None).await?;
        let reply = check(reply, "GET", &url)?;
        if digest.starts_with("sha256:") && digest_of(&reply.body) != digest {
            return Err(RegistryApiError::BadManifest {
                url,
                why: "the blob does not match its digest".into(),
            });
        }
        Ok(reply.body)
    }

    /// The platform an image says it is for (its config's `os`,
    /// `architecture` and `variant`), from the descriptor of its manifest.
    pub async fn image_platform(&self, d: &Descriptor) -> Result<Platform, RegistryApiError> {
        let manifest = self.manifest(&d.digest).await?;
        let url = self.manifest_url(&d.digest);
        let bad = |why: String| RegistryApiError::BadManifest {
            url: url.clone(),
            why,
        };
        let v: serde_json::Value =
            serde_json::from_slice(&manifest.bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        let config = v["config"]["digest"]
            .as_str()
            .ok_or_else(|| bad("it names no config".into()))?;
        let blob = self.blob(config).await?;
        let c: serde_json::Value = serde_json::from_slice(&blob)
            .map_err(|e| bad(format!("its config is not JSON: {e}")))?;
        match (c["os"].as_str(), c["architecture"].as_str()) {
            (Some(os), Some(arch)) => Ok(Platform {
                os: os.into(),
                arch: arch.into(),
                variant: c["variant"].as_str().map(String::from),
            }),
            _ => Err(bad("its config names no os and architecture".into())),
        }
    }

    /// PUT a manifest under `tag`; returns its digest.
    pub async fn put_manifest(
        &self,
        tag: &str,
        media_type: &str,
        body: &[u8],
    ) -> Result<String, RegistryApiError> {
        let url = self.manifest_url(tag);
        let reply = self
            .send(
                "PUT",
                &url,
                &[("Content-Type", media_type)],
                Some(body.to_vec()),
            )
            .await?;
        check(reply, "PUT", &url)?;
        Ok(digest_of(body))
    }
}

/// Where a redirect of a `GET` or `HEAD` leads (`Location` resolved
/// against the request's URL), and whether that is the same origin, so
/// the credentials may go along.
fn redirect(
    url: &str,
    method: &str,
    status: u16,
    location: Option<&str>,
) -> Option<(String, bool)> {
    if !matches!(status, 301 | 302 | 303 | 307 | 308) || !matches!(method, "GET" | "HEAD") {
        return None;
    }
    let from = url::Url::parse(url).ok()?;
    let next = from.join(location?).ok()?;
    if !matches!(next.scheme(), "http" | "https") {
        return None;
    }
    let same = from.origin() == next.origin();
    Some((next.to_string(), same))
}

/// The limit on what a reply may carry, as an error.
fn too_large(url: &str) -> RegistryApiError {
    RegistryApiError::BadManifest {
        url: url.to_string(),
        why: format!("the answer is larger than {MAX_MANIFEST} bytes"),
    }
}

/// An exchange from this machine.
async fn exchange_direct(
    http: &reqwest::Client,
    req: &Request<'_>,
) -> Result<Reply, RegistryApiError> {
    let failed = |source: reqwest::Error| {
        if source.is_connect() || source.is_timeout() {
            RegistryApiError::Unreachable {
                url: req.url.to_string(),
                route: "from this machine".into(),
                source: Box::new(source),
            }
        } else {
            RegistryApiError::Transport {
                url: req.url.to_string(),
                source: Box::new(source),
            }
        }
    };
    let method = reqwest::Method::from_bytes(req.method.as_bytes()).unwrap_or(reqwest::Method::GET);
    let mut r = http.request(method, req.url);
    for (k, v) in &req.headers {
        r = r.header(*k, v);
    }
    if let Some(b) = &req.body {
        r = r.body(b.clone());
    }
    let mut resp = r.send().await.map_err(failed)?;
    let header = |name: reqwest::header::HeaderName| {
        resp.headers()
            .get(name)
            .and_then(|h| h.to_str().ok())
            .map(String::from)
    };
    let status = resp.status().as_u16();
    let content_type = header(reqwest::header::CONTENT_TYPE);
    let challenge = header(reqwest::header::WWW_AUTHENTICATE);
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(failed)? {
        if body.len() + chunk.len() > MAX_MANIFEST {
            return Err(too_large(req.url));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Reply {
        status,
        content_type,
        challenge,
        location: None,
        body,
    })
}

/// An exchange through a builder: a `direct-tcpip` channel to the URL's
/// host and port, TLS over it for `https://`, and one HTTP/1.1 request.
async fn exchange_over(
    session: &Session,
    builder: &str,
    req: &Request<'_>,
) -> Result<Reply, RegistryApiError> {
    let route = format!("through builder `{builder}`");
    let url = url::Url::parse(req.url).map_err(|e| RegistryApiError::Transport {
        url: req.url.to_string(),
        source: Box::new(e),
    })?;
    let transport =
        |source: Box<dyn std::error::Error + Send + Sync>| RegistryApiError::Transport {
            url: req.url.to_string(),
            source,
        };
    let unreachable =
        |source: Box<dyn std::error::Error + Send + Sync>| RegistryApiError::Unreachable {
            url: req.url.to_string(),
            route: route.clone(),
            source,
        };
    let tls = match url.scheme() {
        "https" => true,
        "http" => false,
        other => return Err(transport(format!("`{other}://` is not HTTP").into())),
    };
    let host = url
        .host_str()
        .ok_or_else(|| transport("the URL has no host".into()))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let port = url.port().unwrap_or(if tls { 443 } else { 80 });
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, session.open_tcp(bare, port))
        .await
        .map_err(|_| {
            unreachable(format!("no connection within {}s", CONNECT_TIMEOUT.as_secs()).into())
        })?
        .map_err(|e| unreachable(Box::new(e)))?;
    let io: crate::ssh::transport::BoxedStream = if tls {
        let name = rustls::pki_types::ServerName::try_from(bare.to_string())
            .map_err(|e| transport(Box::new(e)))?;
        let config = crate::cloud::http::tls_config().map_err(RegistryApiError::Client)?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await
            .map_err(|e| transport(Box::new(e)))?;
        crate::ssh::transport::boxed(stream)
    } else {
        stream
    };

    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| transport(Box::new(e)))?;
    let mut target = url.path().to_string();
    if let Some(q) = url.query() {
        target.push('?');
        target.push_str(q);
    }
    let host_header = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let mut builder = hyper::Request::builder()
        .method(req.method)
        .uri(target)
        .header("Host", host_header)
        .header("User-Agent", USER_AGENT);
    for (k, v) in &req.headers {
        builder = builder.header(*k, v);
    }
    let body = http_body_util::Full::new(bytes::Bytes::from(req.body.clone().unwrap_or_default()));
    let request = builder.body(body).map_err(|e| transport(Box::new(e)))?;
    let exchange = async {
        let resp = sender
            .send_request(request)
            .await
            .map_err(|e| transport(Box::new(e)))?;
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|h| h.to_str().ok())
                .map(String::from)
        };
        let status = resp.status().as_u16();
        let content_type = header("content-type");
        let challenge = header("www-authenticate");
        let location = header("location");
        use http_body_util::BodyExt as _;
        let body = http_body_util::Limited::new(resp.into_body(), MAX_MANIFEST)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    too_large(req.url)
                } else {
                    transport(e)
                }
            })?
            .to_bytes()
            .to_vec();
        Ok(Reply {
            status,
            content_type,
            challenge,
            location,
            body,
        })
    };
    // The connection is driven beside the exchange; when it ends first
    // (the registry closed it after answering), the answer is complete.
    tokio::pin!(exchange);
    tokio::select! {
        r = &mut exchange => r,
        c = conn => match c {
            Ok(()) => exchange.await,
            Err(e) => Err(transport(Box::new(e))),
        },
    }
}

fn check(reply: Reply, method: &str, url: &str) -> Result<Reply, RegistryApiError> {
    if (200..300).contains(&reply.status) {
        return Ok(reply);
    }
    let body = String::from_utf8_lossy(&reply.body);
    let body: String = body.chars().filter(|c| !c.is_control()).take(300).collect();
    Err(RegistryApiError::Status {
        method: method.into(),
        url: url.into(),
        status: reply.status,
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
    fn redirects_keep_credentials_only_on_the_same_origin() {
        let from = "https://reg.example.com/v2/a/blobs/sha256:aa";
        // method, status, Location; where it leads and whether credentials go.
        type Case<'a> = (&'a str, u16, Option<&'a str>, Option<(&'a str, bool)>);
        let cases: &[Case] = &[
            (
                "GET",
                307,
                Some("https://s3.example.com/x?sig=1"),
                Some(("https://s3.example.com/x?sig=1", false)),
            ),
            (
                "GET",
                302,
                Some("/v2/a/blobs/other"),
                Some(("https://reg.example.com/v2/a/blobs/other", true)),
            ),
            (
                "GET",
                301,
                Some("http://reg.example.com/v2/x"),
                Some(("http://reg.example.com/v2/x", false)),
            ),
            ("GET", 200, Some("https://elsewhere/"), None),
            ("PUT", 307, Some("https://elsewhere/"), None),
            ("GET", 302, None, None),
            ("GET", 302, Some("file:///etc/passwd"), None),
        ];
        for (method, status, location, want) in cases {
            let got = redirect(from, method, *status, *location);
            let got = got.as_ref().map(|(u, same)| (u.as_str(), *same));
            assert_eq!(got, *want, "{method} {status} {location:?}");
        }
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
