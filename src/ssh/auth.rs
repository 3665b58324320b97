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
