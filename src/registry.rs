//! Registry credentials, taken from the user's side.
//!
//! A push needs credentials on the builder, but the builder is shared and
//! may be a fresh VM. absconda reads them locally — `ABSCONDA_REGISTRY_USER`
//! and `ABSCONDA_REGISTRY_PASSWORD`, or the `auths` entry for the registry in
//! `~/.docker/config.json` — and hands them to `docker login --password-stdin`
//! through a channel's stdin, under a temporary `DOCKER_CONFIG` inside the
//! run folder that the lease supervisor deletes. They never appear in argv,
//! logs or files left behind. `ABSCONDA_REGISTRY=<host[:port]>` says which
//! registry the environment's credentials are for, so a push elsewhere never
//! receives them; `-v` says which registry got credentials and from where.

use std::fmt;
use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

/// A password that refuses to be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Credentials for one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub registry: String,
    pub username: String,
    pub password: Secret,
    /// Where they came from, for messages.
    pub source: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(
        "ABSCONDA_REGISTRY_USER is set but ABSCONDA_REGISTRY_PASSWORD is not (or the other way round)"
    )]
    HalfSet,
    #[error("could not read `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{}` is not valid JSON", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the `auths` entry for `{registry}` in `{}` is not base64 of `user:password`", path.display())]
    BadAuth { registry: String, path: PathBuf },
}

/// The registry host of an image reference, as Docker decides it: the first
/// path component if it has a `.` or `:` or is `localhost`, else Docker Hub.
pub fn registry_of(reference: &str) -> String {
    match reference.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first.to_string()
        }
        _ => "docker.io".to_string(),
    }
}

/// The names Docker's `config.json` may use for a registry.
fn auth_keys(registry: &str) -> Vec<String> {
    if registry == "docker.io" {
        return vec![
            "https://index.docker.io/v1/".into(),
            "index.docker.io".into(),
            "docker.io".into(),
            "registry-1.docker.io".into(),
        ];
    }
    vec![
        registry.to_string(),
        format!("https://{registry}"),
        format!("http://{registry}"),
        format!("https://{registry}/v1/"),
        format!("https://{registry}/v2/"),
    ]
}

fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Finds credentials for `registry`; `Ok(None)` means the builder's own are used.
pub fn lookup(registry: &str) -> Result<Option<Credentials>, CredentialsError> {
    let env = |name: &str| std::env::var(name).ok().filter(|s| !s.is_empty());
    let found = lookup_with(registry, &env, docker_config_path())?;
    match &found {
        Some(c) => tracing::info!(
            "credentials for `{}` (user `{}`) from {}",
            c.registry,
            c.username,
            c.source
        ),
        None => tracing::info!(
            "no credentials for `{registry}` on this machine; the builder's own are used"
        ),
    }
    Ok(found)
}

/// A registry as written in `ABSCONDA_REGISTRY` or an image reference,
/// reduced to the form Docker compares: lowercase `host[:port]`, without a
/// scheme or path, with Docker Hub's aliases as `docker.io`.
pub fn normalise_registry(value: &str) -> String {
    let v = value.trim();
    let v = v
        .strip_prefix("https://")
        .or_else(|| v.strip_prefix("http://"))
        .unwrap_or(v);
    let host = v.split('/').next().unwrap_or(v).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".into(),
        _ => host,
    }
}

/// [`lookup`] with the environment and the docker config's path given.
///
/// `ABSCONDA_REGISTRY_USER`/`ABSCONDA_REGISTRY_PASSWORD` go to any registry
/// unless `ABSCONDA_REGISTRY=<host[:port]>` names the one they are for: then
/// a push to another registry does not get them (its credentials come from
/// the docker config, or the builder's own are used).
fn lookup_with(
    registry: &str,
    env: &dyn Fn(&str) -> Option<String>,
    docker_config: Option<PathBuf>,
) -> Result<Option<Credentials>, CredentialsError> {
    let user = env("ABSCONDA_REGISTRY_USER");
    let pass = env("ABSCONDA_REGISTRY_PASSWORD");
    let scope = env("ABSCONDA_REGISTRY");
    match (user, pass) {
        (Some(username), Some(password)) => match scope {
            Some(scope) if normalise_registry(&scope) != normalise_registry(registry) => {
                tracing::info!(
                    "ABSCONDA_REGISTRY_USER/ABSCONDA_REGISTRY_PASSWORD are for `{}` (ABSCONDA_REGISTRY), not `{registry}`: not sent",
                    normalise_registry(&scope)
                );
            }
            scope => {
                return Ok(Some(Credentials {
                    registry: registry.to_string(),
                    username,
                    password: Secret(password),
                    source: match scope {
                        Some(_) => "ABSCONDA_REGISTRY_USER/ABSCONDA_REGISTRY_PASSWORD (scoped by ABSCONDA_REGISTRY)".into(),
                        None => "ABSCONDA_REGISTRY_USER/ABSCONDA_REGISTRY_PASSWORD".into(),
                    },
                }));
            }
        },
        (None, None) => {}
        _ => return Err(CredentialsError::HalfSet),
    }
    let Some(path) = docker_config else {
        return Ok(None);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CredentialsError::Read { path, source }),
    };
    from_docker_config(&text, registry, &path)
}

fn from_docker_config(
    text: &str,
    registry: &str,
    path: &std::path::Path,
) -> Result<Option<Credentials>, CredentialsError> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|source| CredentialsError::Json {
            path: path.to_path_buf(),
            source,
        })?;
    for key in auth_keys(registry) {
        let Some(entry) = json.pointer(&format!(
            "/auths/{}",
            key.replace('~', "~0").replace('/', "~1")
        )) else {
            continue;
        };
        let bad = || CredentialsError::BadAuth {
            registry: registry.to_string(),
            path: path.to_path_buf(),
        };
        let (username, password) = if let Some(auth) = entry.get("auth").and_then(|a| a.as_str()) {
            let decoded = B64.decode(auth.trim()).map_err(|_| bad())?;
            let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
            let (u, p) = decoded.split_once(':').ok_or_else(bad)?;
            (u.to_string(), p.to_string())
        } else if let (Some(u), Some(p)) = (
            entry.get("username").and_then(|v| v.as_str()),
            entry.get("password").and_then(|v| v.as_str()),
        ) {
            (u.to_string(), p.to_string())
        } else {
            continue;
        };
        if username.is_empty() || password.is_empty() {
            continue;
        }
        return Ok(Some(Credentials {
            registry: registry.to_string(),
            username,
            password: Secret(password),
            source: format!("`{}` (auths.{key})", path.display()),
        }));
    }
    let helper = json
        .pointer(&format!("/credHelpers/{registry}"))
        .or_else(|| json.get("credsStore"));
    if let Some(h) = helper.and_then(|h| h.as_str()) {
        tracing::warn!(
            "`{}` keeps the credentials for `{registry}` in the `{h}` credential helper, which absconda does not run; set ABSCONDA_REGISTRY_USER and ABSCONDA_REGISTRY_PASSWORD to push with them. Using the builder's own credentials.",
            path.display()
        );
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn env_of<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn absconda_registry_scopes_the_environment_credentials() {
        let creds = [
            ("ABSCONDA_REGISTRY_USER", "u"),
            ("ABSCONDA_REGISTRY_PASSWORD", "p"),
        ];
        let scoped = |scope: &'static str| {
            let mut v = creds.to_vec();
            v.push(("ABSCONDA_REGISTRY", scope));
            v
        };
        // Unscoped: sent to any registry, as before.
        let c = lookup_with("ghcr.io", &env_of(&creds), None)
            .unwrap()
            .unwrap();
        assert_eq!((c.registry.as_str(), c.username.as_str()), ("ghcr.io", "u"));
        assert_eq!(
            c.source,
            "ABSCONDA_REGISTRY_USER/ABSCONDA_REGISTRY_PASSWORD"
        );
        // Scoped to the repository's registry, in any spelling.
        for (scope, registry) in [
            ("127.0.0.1:5000", "127.0.0.1:5000"),
            ("https://GHCR.io/", "ghcr.io"),
            ("index.docker.io", "docker.io"),
        ] {
            let vars = scoped(scope);
            let c = lookup_with(registry, &env_of(&vars), None).unwrap();
            let c = c.unwrap_or_else(|| panic!("{scope} vs {registry}"));
            assert!(
                c.source.contains("scoped by ABSCONDA_REGISTRY"),
                "{}",
                c.source
            );
        }
        // Scoped elsewhere: not sent; the docker config may still answer.
        for (scope, registry) in [
            ("ghcr.io", "evil.example"),
            ("127.0.0.1:5000", "127.0.0.1:5001"),
            ("127.0.0.1:5000", "127.0.0.1"),
            ("ghcr.io", "docker.io"),
        ] {
            let vars = scoped(scope);
            assert!(
                lookup_with(registry, &env_of(&vars), None)
                    .unwrap()
                    .is_none(),
                "{scope} vs {registry}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.json");
        let auth = B64.encode("other:pw2");
        std::fs::write(
            &config,
            format!(r#"{{"auths": {{"evil.example": {{"auth": "{auth}"}}}}}}"#),
        )
        .unwrap();
        let vars = scoped("ghcr.io");
        let c = lookup_with("evil.example", &env_of(&vars), Some(config))
            .unwrap()
            .unwrap();
        assert_eq!(c.username, "other");
        assert!(c.source.contains("config.json"), "{}", c.source);
    }

    #[test]
    fn registry_table() {
        let cases = [
            ("127.0.0.1:5000/team/app", "127.0.0.1:5000"),
            ("ghcr.io/lab/analysis", "ghcr.io"),
            ("localhost/app", "localhost"),
            ("library/ubuntu", "docker.io"),
            ("ubuntu", "docker.io"),
            ("us-docker.pkg.dev/p/r/img", "us-docker.pkg.dev"),
        ];
        for (r, want) in cases {
            assert_eq!(registry_of(r), want, "{r}");
        }
    }

    #[test]
    fn docker_config_entries() {
        let auth = B64.encode("tester:s3cr:et");
        let text = format!(
            r#"{{"auths": {{"127.0.0.1:5000": {{"auth": "{auth}"}}, "https://index.docker.io/v1/": {{"username": "hub", "password": "pw"}}}}}}"#
        );
        let p = Path::new("/home/u/.docker/config.json");
        let c = from_docker_config(&text, "127.0.0.1:5000", p)
            .unwrap()
            .unwrap();
        assert_eq!(c.username, "tester");
        assert_eq!(c.password.expose(), "s3cr:et");
        assert_eq!(format!("{:?}", c.password), "Secret(***)");
        let hub = from_docker_config(&text, "docker.io", p).unwrap().unwrap();
        assert_eq!(hub.username, "hub");
        assert!(from_docker_config(&text, "ghcr.io", p).unwrap().is_none());
        let bad = r#"{"auths": {"ghcr.io": {"auth": "!!"}}}"#;
        assert!(from_docker_config(bad, "ghcr.io", p).is_err());
    }
}
