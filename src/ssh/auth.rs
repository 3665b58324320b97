//! Public-key authentication: key files and ssh-agent.
//!
//! The order follows OpenSSH: the configured `identity_file`s first, then the
//! keys an agent holds (`SSH_AUTH_SOCK`), then — only when no identity file is
//! configured — the default `~/.ssh/id_ed25519`, `id_ecdsa` and `id_rsa`.
//! At most [`MAX_ATTEMPTS`] keys are offered, so a crowded agent does not hit
//! the server's `MaxAuthTries` and lock us out. RSA keys sign with
//! rsa-sha2-512/256 as the server allows. An encrypted key is unlocked with
//! `ABSCONDA_SSH_PASSPHRASE` or a prompt on the terminal.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use russh::client::Handle;
use russh::keys::agent::client::AgentClient;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg};

use super::{Client, Target};

/// How many keys we offer before giving up (OpenSSH's server default is 6 tries).
pub const MAX_ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("could not read the key file `{}`", path.display())]
    KeyFile {
        path: PathBuf,
        #[source]
        source: russh::keys::Error,
    },
    #[error(
        "the key file `{}` is protected by a passphrase; set ABSCONDA_SSH_PASSPHRASE or run in a terminal to be asked",
        path.display()
    )]
    NeedPassphrase { path: PathBuf },
    #[error(
        "permissions {mode:04o} for the key file `{}` are too open: private key files must not be accessible by others, so this key is ignored",
        path.display()
    )]
    OpenKey { path: PathBuf, mode: u32 },
    #[error("could not read the certificate `{}`", path.display())]
    CertificateFile {
        path: PathBuf,
        #[source]
        source: russh::keys::ssh_key::Error,
    },
    #[error("the certificate `{}` {when} ({}); ask your CA for a new one", path.display(), at)]
    CertificateTime {
        path: PathBuf,
        when: &'static str,
        at: String,
    },
    #[error(
        "the certificate `{}` is not valid for the user `{user}` (its principals: {})",
        path.display(),
        if principals.is_empty() { "none".to_string() } else { principals.join(", ") }
    )]
    CertificatePrincipal {
        path: PathBuf,
        user: String,
        principals: Vec<String>,
    },
    #[error(
        "no private key for the certificate `{}`: put it next to the certificate (`{}`) or list it in `identity_file`",
        path.display(),
        path.to_string_lossy().trim_end_matches("-cert.pub")
    )]
    CertificateKey { path: PathBuf },
    #[error("wrong passphrase for the key file `{}`", path.display())]
    WrongPassphrase { path: PathBuf },
    #[error("`{user}@{host}` refused every key offered ({})", if tried.is_empty() { "none were available".to_string() } else { tried.join(", ") })]
    Refused {
        user: String,
        host: String,
        tried: Vec<String>,
    },
    #[error("authentication with `{host}` failed")]
    Protocol {
        host: String,
        #[source]
        source: russh::Error,
    },
}

fn expand_home(path: &Path) -> PathBuf {
    if let Ok(rest) = path.strip_prefix("~")
        && let Some(home) = std::env::var_os("HOME")
    {
        return PathBuf::from(home).join(rest);
    }
    path.to_path_buf()
}

fn default_key_files() -> Vec<PathBuf> {
    let Some(home) = std::env::var_os("HOME") else {
        return Vec::new();
    };
    ["id_ed25519", "id_ecdsa", "id_rsa"]
        .iter()
        .map(|n| PathBuf::from(&home).join(".ssh").join(n))
        .filter(|p| p.exists())
        .collect()
}

/// Refuses a key file that group or others can access, as OpenSSH does,
/// unless `ABSCONDA_ALLOW_OPEN_KEYS=1` (for CI systems that mount secrets 0644).
fn check_permissions(path: &Path) -> Result<(), AuthError> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        // Reading it will say what is wrong.
        return Ok(());
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    if std::env::var("ABSCONDA_ALLOW_OPEN_KEYS").is_ok_and(|v| v == "1") {
        tracing::warn!(
            "the key file `{}` is accessible by others (permissions {mode:04o}); using it because ABSCONDA_ALLOW_OPEN_KEYS=1",
            path.display()
        );
        return Ok(());
    }
    Err(AuthError::OpenKey {
        path: path.to_path_buf(),
        mode,
    })
}

/// Loads a private key, asking for its passphrase when it has one.
pub fn load_key(path: &Path) -> Result<PrivateKey, AuthError> {
    let path = expand_home(path);
    check_permissions(&path)?;
    match russh::keys::load_secret_key(&path, None) {
        Ok(k) => Ok(k),
        Err(russh::keys::Error::KeyIsEncrypted) => {
            let pass = match std::env::var("ABSCONDA_SSH_PASSPHRASE") {
                Ok(p) => p,
                Err(_) => {
                    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                        return Err(AuthError::NeedPassphrase { path });
                    }
                    rpassword::prompt_password(format!(
                        "Enter passphrase for key `{}`: ",
                        path.display()
                    ))
                    .map_err(|_| AuthError::NeedPassphrase { path: path.clone() })?
                }
            };
            russh::keys::load_secret_key(&path, Some(&pass)).map_err(|e| match e {
                russh::keys::Error::KeyIsEncrypted => {
                    AuthError::WrongPassphrase { path: path.clone() }
                }
                source => {
                    if format!("{source}").to_ascii_lowercase().contains("decrypt")
                        || format!("{source}").to_ascii_lowercase().contains("crypto")
                    {
                        AuthError::WrongPassphrase { path: path.clone() }
                    } else {
                        AuthError::KeyFile {
                            path: path.clone(),
                            source,
                        }
                    }
                }
            })
        }
        Err(source) => Err(AuthError::KeyFile { path, source }),
    }
}

/// Loads a certificate and its private key, and checks what can be checked
/// here (validity period, principals) so the user learns why, instead of a
/// bare refusal from the server.
fn load_certificate(
    path: &Path,
    identity_files: &[PathBuf],
    user: &str,
) -> Result<(PrivateKey, russh::keys::Certificate), AuthError> {
    let cert = russh::keys::load_openssh_certificate(path).map_err(|source| {
        AuthError::CertificateFile {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let stamp = |t: u64| {
        chrono::DateTime::from_timestamp(i64::try_from(t).unwrap_or(i64::MAX), 0)
            .map(|d| d.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_else(|| "forever".into())
    };
    if cert.valid_before() <= now {
        return Err(AuthError::CertificateTime {
            path: path.to_path_buf(),
            when: "expired",
            at: format!("valid until {}", stamp(cert.valid_before())),
        });
    }
    if cert.valid_after() > now {
        return Err(AuthError::CertificateTime {
            path: path.to_path_buf(),
            when: "is not valid yet",
            at: format!("valid from {}", stamp(cert.valid_after())),
        });
    }
    let principals = cert.valid_principals();
    if !principals.is_empty() && !principals.iter().any(|p| p == user) {
        return Err(AuthError::CertificatePrincipal {
            path: path.to_path_buf(),
            user: user.to_string(),
            principals: principals.to_vec(),
        });
    }
    let beside = PathBuf::from(path.to_string_lossy().trim_end_matches("-cert.pub"));
    let candidates = std::iter::once(beside.clone())
        .filter(|p| p != path && p.exists())
        .chain(identity_files.iter().map(|p| expand_home(p)));
    for candidate in candidates {
        let key = load_key(&candidate)?;
        if key.public_key().key_data() == cert.public_key() {
            return Ok((key, cert));
        }
    }
    Err(AuthError::CertificateKey {
        path: path.to_path_buf(),
    })
}

/// Offers one key from a file; true when the server accepted it.
async fn offer_key(
    handle: &mut Handle<Client>,
    target: &Target,
    path: &Path,
    key: PrivateKey,
    rsa_hash: Option<HashAlg>,
    tried: &mut Vec<String>,
) -> Result<bool, russh::Error> {
    tried.push(format!("`{}`", path.display()));
    let key = PrivateKeyWithHashAlg::new(Arc::new(key), rsa_hash);
    Ok(handle
        .authenticate_publickey(&target.user, key)
        .await?
        .success())
}

pub(super) async fn authenticate(
    handle: &mut Handle<Client>,
    target: &Target,
) -> Result<(), AuthError> {
    let host = format!("{}:{}", target.host, target.port);
    let proto = |source| AuthError::Protocol {
        host: host.clone(),
        source,
    };
    let mut tried = Vec::new();
    let rsa_hash: Option<HashAlg> = handle
        .best_supported_rsa_hash()
        .await
        .map_err(proto)?
        .flatten()
        .or(Some(HashAlg::Sha512));

    // Certificates first: the listed ones, then `KEY-cert.pub` next to keys.
    let mut certs: Vec<PathBuf> = target
        .certificate_files
        .iter()
        .map(|p| expand_home(p))
        .collect();
    for f in &target.identity_files {
        let c = PathBuf::from(format!("{}-cert.pub", expand_home(f).display()));
        if c.exists() && !certs.contains(&c) {
            certs.push(c);
        }
    }
    let listed = target.certificate_files.len();
    for (i, cert_path) in certs.iter().enumerate() {
        if tried.len() >= MAX_ATTEMPTS {
            break;
        }
        let (key, cert) = match load_certificate(cert_path, &target.identity_files, &target.user) {
            Ok(kc) => kc,
            // One found next to a key is skipped, as OpenSSH does; a listed one is an error.
            Err(e) if i >= listed => {
                tracing::debug!(error = %e, "skipping certificate");
                continue;
            }
            Err(e) => return Err(e),
        };
        tried.push(format!("certificate `{}`", cert_path.display()));
        if handle
            .authenticate_openssh_cert(&target.user, Arc::new(key), cert)
            .await
            .map_err(proto)?
            .success()
        {
            return Ok(());
        }
    }

    let files: Vec<PathBuf> = if target.identity_files.is_empty() {
        Vec::new()
    } else {
        target.identity_files.clone()
    };
    for path in &files {
        if tried.len() >= MAX_ATTEMPTS {
            break;
        }
        let key = load_key(path)?;
        if offer_key(handle, target, path, key, rsa_hash, &mut tried)
            .await
            .map_err(proto)?
        {
            return Ok(());
        }
    }

    if std::env::var_os("SSH_AUTH_SOCK").is_some() {
        match AgentClient::connect_env().await {
            Ok(mut agent) => {
                let identities = agent.request_identities().await.unwrap_or_default();
                for id in identities {
                    if tried.len() >= MAX_ATTEMPTS {
                        break;
                    }
                    let public = id.public_key().into_owned();
                    tried.push(format!(
                        "agent key {}",
                        super::known_hosts::fingerprint(&public)
                    ));
                    let hash = if public.algorithm().is_rsa() {
                        rsa_hash
                    } else {
                        None
                    };
                    match handle
                        .authenticate_publickey_with(&target.user, public, hash, &mut agent)
                        .await
                    {
                        Ok(r) if r.success() => return Ok(()),
                        Ok(_) => {}
                        Err(e) => tracing::debug!(error = %e, "agent could not sign"),
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "ssh-agent not reachable"),
        }
    }

    if files.is_empty() {
        for path in default_key_files() {
            if tried.len() >= MAX_ATTEMPTS {
                break;
            }
            let key = match load_key(&path) {
                Ok(k) => k,
                Err(e) => {
                    tracing::debug!(error = %e, "skipping default key");
                    continue;
                }
            };
            if offer_key(handle, target, &path, key, rsa_hash, &mut tried)
                .await
                .map_err(proto)?
            {
                return Ok(());
            }
        }
    }
    Err(AuthError::Refused {
        user: target.user.clone(),
        host,
        tried,
    })
}
