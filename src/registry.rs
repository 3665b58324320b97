//! Registry credentials, taken from the user's side.
//!
//! A push needs credentials on the builder, but the builder is shared and
//! may be a fresh VM. absconda reads them locally — `ABSCONDA_REGISTRY_USER`
//! and `ABSCONDA_REGISTRY_PASSWORD`, or the `auths` entry for the registry in
//! `~/.docker/config.json` — and hands them to `docker login --password-stdin`
//! through a channel's stdin, under a temporary `DOCKER_CONFIG` inside the
//! run folder that the lease supervisor deletes. They never appear in argv,
//! logs or files left behind.

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
    let user = std::env::var("ABSCONDA_REGISTRY_USER")
        .ok()
        .filter(|s| !s.is_empty());
    let pass = std::env::var("ABSCONDA_REGISTRY_PASSWORD")
        .ok()
        .filter(|s| !s.is_empty());
    match (user, pass) {
        (Some(username), Some(password)) => {
            return Ok(Some(Credentials {
                registry: registry.to_string(),
                username,
                password: Secret(password),
                source: "ABSCONDA_REGISTRY_USER/ABSCONDA_REGISTRY_PASSWORD".into(),
            }));
        }
        (None, None) => {}
        _ => return Err(CredentialsError::HalfSet),
    }
    let Some(path) = docker_config_path() else {
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
