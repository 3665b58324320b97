//! How the user's SSH key comes to be trusted by a cloud builder, just
//! before absconda connects (`access:`).
//!
//! - `key`: the builder already trusts the key (baked into the image, put
//!   there by Terraform); nothing is sent anywhere.
//! - `oslogin` (GCE): the key is put on the caller's Google account through
//!   the OS Login API for a limited time; the username is the account's
//!   POSIX name. This is what VMs with `enable-oslogin=TRUE` require: they
//!   ignore metadata keys.
//! - `metadata` (GCE): an expiring `ssh-keys` entry on the instance, which
//!   the guest agent turns into an `authorized_keys` line.
//! - `auto` (the GCE default): `oslogin` when the instance's (else the
//!   project's) metadata says `enable-oslogin=TRUE`, else `key`.
//! - `instance-connect` (EC2): the key is pushed with EC2 Instance Connect
//!   before each connection and is accepted for 60 seconds, inside which
//!   the SSH handshake must finish.
//!
//! Keys are given a lifetime: long enough for the wait until the builder is
//! ready and the handshake, short enough that an account or VM does not
//! collect keys forever. A long build is not cut off when the key expires:
//! only new connections need it.

use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use chrono::{DateTime, Utc};

use crate::cloud::ec2::{Ec2, Ec2Instance};
use crate::cloud::gce::{Gce, SshMetadata};
use crate::cloud::instance_connect::InstanceConnect;
use crate::cloud::oslogin::{self, KeyChange, OsLogin};
use crate::cloud::retry::Backoff;
use crate::config::{Builder, ProviderKind};
use crate::lifecycle::Cloud;

/// `access:` in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessSetting {
    Key,
    Auto,
    Oslogin,
    Metadata,
    InstanceConnect,
}

impl AccessSetting {
    pub fn default_for(provider: ProviderKind) -> AccessSetting {
        match provider {
            ProviderKind::Gcp => AccessSetting::Auto,
            _ => AccessSetting::Key,
        }
    }

    pub fn parse(value: &str, provider: ProviderKind) -> Result<AccessSetting, String> {
        let setting = match value {
            "key" => AccessSetting::Key,
            "auto" => AccessSetting::Auto,
            "oslogin" | "os-login" => AccessSetting::Oslogin,
            "metadata" => AccessSetting::Metadata,
            "instance-connect" => AccessSetting::InstanceConnect,
            other => {
                return Err(format!(
                    "`{other}`: use `key`, `auto`, `oslogin` or `metadata` (gcp builders), or `instance-connect` (aws builders)"
                ));
            }
        };
        match (setting, provider) {
            (AccessSetting::Key, _)
            | (AccessSetting::InstanceConnect, ProviderKind::Aws)
            | (
                AccessSetting::Auto | AccessSetting::Oslogin | AccessSetting::Metadata,
                ProviderKind::Gcp,
            ) => Ok(setting),
            (AccessSetting::InstanceConnect, _) => Err(format!(
                "`{value}` is only for aws builders; {provider} builders use `key`"
            )),
            _ => Err(format!(
                "`{value}` is only for gcp builders; {provider} builders use `key`"
            )),
        }
    }
}

/// How one connection was made possible, for `remote status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Access {
    /// `key`, `oslogin`, `metadata` or `instance-connect`.
    pub mode: &'static str,
    /// The user SSH logs in as.
    pub user: String,
}

/// Why a builder cannot be reached the way its config asks.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(
        "builder `{builder}` requires OS Login with {what} (`{key}=TRUE` in its metadata), which absconda does not support"
    )]
    Unsupported {
        builder: String,
        what: &'static str,
        key: &'static str,
    },
    #[error(
        "builder `{builder}` has OS Login enabled (`enable-oslogin=TRUE`), so its guest ignores SSH keys in metadata; use `access: oslogin` (or `auto`)"
    )]
    MetadataIgnored { builder: String },
}

/// Lifetimes of the keys absconda puts in place: a key with less than
/// `needed` left is renewed to last `lifetime`.
fn lifetimes(b: &Builder) -> (Duration, Duration) {
    let needed = b.ready_timeout + Duration::from_secs(600);
    (needed, needed + Duration::from_secs(3600))
}

/// Makes sure the builder will accept the user's key, the way `access:`
/// says, and returns who to log in as.
pub async fn prepare(b: &Builder, cloud: &Cloud) -> anyhow::Result<Access> {
    let key = || Access {
        mode: "key",
        user: b.user.clone(),
    };
    let gce = match cloud {
        Cloud::Gce(g) => g,
        Cloud::Ec2(ec2) if b.access == AccessSetting::InstanceConnect => {
            return instance_connect(b, ec2).await;
        }
        Cloud::Ec2(_) | Cloud::Azure(_) => return Ok(key()),
    };
    match b.access {
        AccessSetting::Key | AccessSetting::InstanceConnect => Ok(key()),
        AccessSetting::Auto => {
            let md = gce.ssh_metadata().await?;
            if md.is_true("enable-oslogin") {
                tracing::debug!(builder = %b.name, "OS Login is enabled: using it");
                os_login(b, gce, &md).await
            } else {
                Ok(key())
            }
        }
        AccessSetting::Oslogin => {
            let md = gce.ssh_metadata().await?;
            if !md.is_true("enable-oslogin") {
                tracing::warn!(
                    "builder `{}`: neither its instance nor its project metadata sets `enable-oslogin=TRUE`, so its guest may ignore OS Login keys",
                    b.name
                );
            }
            os_login(b, gce, &md).await
        }
        AccessSetting::Metadata => {
            let md = gce.ssh_metadata().await?;
            if md.is_true("enable-oslogin") {
                return Err(AccessError::MetadataIgnored {
                    builder: b.name.clone(),
                }
                .into());
            }
            metadata_key(b, gce).await
        }
    }
}

/// The variants of OS Login absconda cannot satisfy without a person at a
/// keyboard or a key it does not hold.
const UNSUPPORTED: [(&str, &str); 3] = [
    ("enable-oslogin-2fa", "two-factor authentication"),
    ("enable-oslogin-sk", "security keys"),
    ("enable-oslogin-certificates", "certificates only"),
];

async fn os_login(b: &Builder, gce: &Gce, md: &SshMetadata) -> anyhow::Result<Access> {
    for (key, what) in UNSUPPORTED {
        if md.is_true(key) {
            return Err(AccessError::Unsupported {
                builder: b.name.clone(),
                what,
                key,
            }
            .into());
        }
    }
    let public_key = public_key(b)?;
    let auth = gce.auth();
    let account = auth.account_email().await?;
    let (needed, lifetime) = lifetimes(b);
    let now = SystemTime::now();
    let client = OsLogin::new(b.oslogin_endpoint.as_deref(), auth, Backoff::default())?;
    let user = client
        .ensure_key(
            &account,
            &gce.settings().project,
            &public_key,
            now + needed,
            now + lifetime,
        )
        .await
        .with_context(|| {
            format!("could not put the SSH key on the OS Login profile of `{account}`")
        })?;
    match user.change {
        KeyChange::Unchanged => {}
        KeyChange::Extended => {
            tracing::info!(%account, "extended the expiry of the SSH key in OS Login")
        }
        KeyChange::Imported => tracing::info!(%account, "imported the SSH key into OS Login"),
    }
    Ok(Access {
        mode: "oslogin",
        user: user.username,
    })
}

async fn metadata_key(b: &Builder, gce: &Gce) -> anyhow::Result<Access> {
    let public_key = public_key(b)?;
    // The entry names the account it belongs to; without one (an unusual
    // credential), the login name stands in.
    let owner = match gce.auth().account_email().await {
        Ok(e) => e,
        Err(e) => {
            tracing::debug!("no account email for the ssh-keys entry: {e}");
            b.user.clone()
        }
    };
    let (needed, lifetime) = lifetimes(b);
    let now = Utc::now();
    let needed_until = now + chrono::Duration::from_std(needed).unwrap_or_default();
    let expire = now + chrono::Duration::from_std(lifetime).unwrap_or_default();
    let changed = gce
        .update_ssh_keys(|current| {
            merge_ssh_key(current, &b.user, &public_key, &owner, needed_until, expire)
        })
        .await
        .with_context(|| {
            format!(
                "could not add the SSH key to builder `{}`'s metadata",
                b.name
            )
        })?;
    if changed {
        tracing::info!(builder = %b.name, user = %b.user, "added an expiring SSH key to the instance metadata");
    }
    Ok(Access {
        mode: "metadata",
        user: b.user.clone(),
    })
}

async fn instance_connect(b: &Builder, ec2: &Ec2) -> anyhow::Result<Access> {
    let public_key = public_key(b)?;
    let instance_id = match ec2.instance() {
        Ec2Instance::Id(id) => id.clone(),
        Ec2Instance::Name(_) => {
            use crate::cloud::Provider as _;
            ec2.describe().await?.id
        }
    };
    InstanceConnect::new(
        b.instance_connect_endpoint.as_deref(),
        ec2.region(),
        ec2.credentials(),
        Backoff::default(),
    )?
    .send_ssh_public_key(&instance_id, &b.user, &public_key)
    .await
    .with_context(|| {
        format!(
            "could not push the SSH key to `{instance_id}` with EC2 Instance Connect for user `{}`",
            b.user
        )
    })?;
    tracing::debug!(instance = %instance_id, user = %b.user, "pushed the SSH key with EC2 Instance Connect");
    Ok(Access {
        mode: "instance-connect",
        user: b.user.clone(),
    })
}

/// How long the SSH connection after an Instance Connect push may take, so
/// that authentication happens inside the key's 60-second window.
pub fn connect_timeout(b: &Builder) -> Duration {
    if b.access == AccessSetting::InstanceConnect {
        b.connect_timeout
            .min(crate::cloud::instance_connect::KEY_WINDOW - Duration::from_secs(15))
    } else {
        b.connect_timeout
    }
}

/// The public key of the builder's first identity file.
fn public_key(b: &Builder) -> anyhow::Result<String> {
    let line = crate::terraform::public_key(b)
        .with_context(|| format!("builder `{}` needs a key to authorise", b.name))?;
    Ok(oslogin::key_body(&line))
}

/// The `expireOn` format the guest agent parses.
const EXPIRE_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%z";

/// The new value of an `ssh-keys` item with `user:key` in it, expiring at
/// `expire`; `None` when an entry for that user and key already lasts until
/// `needed` (or never expires). Entries of other users or keys are kept
/// exactly as they were; only an expiring entry for the same user and key
/// is replaced.
pub fn merge_ssh_key(
    current: &str,
    user: &str,
    key: &str,
    owner: &str,
    needed: DateTime<Utc>,
    expire: DateTime<Utc>,
) -> Option<String> {
    let wanted = oslogin::key_body(key);
    let mut kept: Vec<&str> = Vec::new();
    for line in current.lines() {
        let ours = line
            .split_once(':')
            .filter(|(u, rest)| *u == user && oslogin::key_body(rest) == wanted);
        match ours {
            Some((_, rest)) => match entry_expiry(rest) {
                None => return None,
                Some(Some(at)) if at >= needed => return None,
                // Expired or about to: replaced below.
                Some(_) => {}
            },
            None => kept.push(line),
        }
    }
    // In the documented field order (serde_json would sort them).
    let quote = |v: &str| serde_json::Value::String(v.to_string()).to_string();
    let meta = format!(
        "{{\"userName\":{},\"expireOn\":{}}}",
        quote(owner),
        quote(&expire.format(EXPIRE_FORMAT).to_string())
    );
    let entry = format!("{user}:{wanted} google-ssh {meta}");
    while kept.last().is_some_and(|l| l.trim().is_empty()) {
        kept.pop();
    }
    kept.push(&entry);
    Some(kept.join("\n"))
}

/// The expiry of a `google-ssh` entry: `None` when it never expires,
/// `Some(None)` when its expiry cannot be read (treated as expired).
fn entry_expiry(rest: &str) -> Option<Option<DateTime<Utc>>> {
    let mut fields = rest.splitn(4, char::is_whitespace);
    let _type = fields.next();
    let _blob = fields.next();
    if fields.next() != Some("google-ssh") {
        return None;
    }
    let json: serde_json::Value = match fields.next().map(serde_json::from_str) {
        Some(Ok(v)) => v,
        _ => return Some(None),
    };
    let at = json
        .get("expireOn")
        .and_then(|v| v.as_str())
        .and_then(|s| DateTime::parse_from_str(s, EXPIRE_FORMAT).ok())
        .map(|t| t.with_timezone(&Utc));
    Some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey";

    #[test]
    fn ssh_keys_entries_are_added_replaced_or_left() {
        let needed = t("2026-12-01T12:00:00Z");
        let expire = t("2026-12-01T13:00:00Z");
        let ours = "builder:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey google-ssh {\"userName\":\"me@example.com\",\"expireOn\":\"2026-12-01T13:00:00+0000\"}";
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("empty", "", Some(ours)),
            (
                "others kept",
                "alice:ssh-rsa AAAAB alice@laptop\nbob:ssh-ed25519 AAAAC bob",
                Some(&format!(
                    "alice:ssh-rsa AAAAB alice@laptop\nbob:ssh-ed25519 AAAAC bob\n{ours}"
                )),
            ),
            (
                "same key, other user kept",
                "alice:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey x",
                Some(&format!(
                    "alice:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey x\n{ours}"
                )),
            ),
            (
                "permanent entry is enough",
                "builder:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey me@laptop",
                None,
            ),
            (
                "long enough",
                "builder:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey google-ssh {\"userName\":\"me@example.com\",\"expireOn\":\"2026-12-01T12:30:00+0000\"}",
                None,
            ),
            (
                "expiring soon is replaced",
                "alice:ssh-rsa AAAAB a\nbuilder:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey google-ssh {\"userName\":\"me@example.com\",\"expireOn\":\"2026-12-01T11:30:00+0000\"}\n",
                Some(&format!("alice:ssh-rsa AAAAB a\n{ours}")),
            ),
        ];
        for (name, current, want) in cases {
            let got = merge_ssh_key(current, "builder", KEY, "me@example.com", needed, expire);
            assert_eq!(got.as_deref(), *want, "{name}");
        }
    }

    #[test]
    fn access_in_the_builders_file() {
        let yaml = "builders:\n  g:\n    provider: gcp\n    project: p\n    zone: z\n    instance: i\n  a:\n    provider: aws\n    region: r\n    instance_id: i-1\n    access: instance-connect\n  s:\n    host: h\n    access: oslogin\ndefaults:\n  access: metadata\n";
        let f =
            crate::config::ConfigFile::parse(std::path::Path::new("/x/absconda-remote.yaml"), yaml)
                .unwrap();
        assert_eq!(f.builder("g").unwrap().access, AccessSetting::Metadata);
        assert_eq!(
            f.builder("a").unwrap().access,
            AccessSetting::InstanceConnect
        );
        let e = f.builder("s").unwrap_err().to_string();
        assert!(
            e.contains("key `access`") && e.contains("only for gcp builders"),
            "{e}"
        );
    }

    #[test]
    fn tunnel_in_the_builders_file() {
        let yaml = "builders:\n  g:\n    provider: gcp\n    project: p\n    zone: z\n    instance: i\n    tunnel: iap\n  a:\n    provider: aws\n    region: r\n    instance_id: i-1\n    tunnel: eice\n  wrong:\n    provider: aws\n    region: r\n    instance_id: i-1\n    tunnel: iap\n  odd:\n    provider: gcp\n    project: p\n    zone: z\n    instance: i\n    tunnel: vpn\n";
        let f =
            crate::config::ConfigFile::parse(std::path::Path::new("/x/absconda-remote.yaml"), yaml)
                .unwrap();
        assert_eq!(
            f.builder("g").unwrap().tunnel,
            Some(crate::config::Tunnel::Iap)
        );
        assert_eq!(
            f.builder("a").unwrap().tunnel,
            Some(crate::config::Tunnel::Eice)
        );
        let e = f.builder("wrong").unwrap_err().to_string();
        assert!(
            e.contains("key `tunnel`") && e.contains("only for gcp builders"),
            "{e}"
        );
        let e = f.builder("odd").unwrap_err().to_string();
        assert!(e.contains("`vpn`: use `iap`"), "{e}");
    }

    #[test]
    fn access_values() {
        assert_eq!(
            AccessSetting::parse("oslogin", ProviderKind::Gcp),
            Ok(AccessSetting::Oslogin)
        );
        assert!(AccessSetting::parse("oslogin", ProviderKind::Ssh).is_err());
        assert!(AccessSetting::parse("nope", ProviderKind::Gcp).is_err());
        assert_eq!(
            AccessSetting::default_for(ProviderKind::Gcp),
            AccessSetting::Auto
        );
    }
}
