//! The next step for errors a newcomer meets first.
//!
//! Every hint here names one concrete thing to do — a command to run or a
//! key to set — rather than a pointer to the documentation: someone who has
//! just installed absconda should get from the error to a working build by
//! reading the screen. [`crate::exit::hint`] calls these.

use crate::config::{ConfigError, FILE_NAME};

/// The next step for a problem with the builders file.
pub fn config(e: &ConfigError) -> String {
    match e {
        ConfigError::NotFound { .. } => format!(
            "run `absconda init` to write `{FILE_NAME}` here (it asks on a terminal; or `absconda init --host HOST --user USER`, `--provider gcp|aws`, `--global`)"
        ),
        ConfigError::UnknownBuilder {
            name, available, ..
        } if available.is_empty() => {
            format!("add it with `absconda remote add {name} --host HOST --user USER`")
        }
        ConfigError::UnknownBuilder { .. } => {
            "`absconda remote list` shows the builders it defines".into()
        }
        ConfigError::NoBuilderChosen { available, .. } => format!(
            "pass `--remote-builder {}` (or set `ABSCONDA_REMOTE_BUILDER`), or add `default_builder: {}` at the top of the file",
            available.first().map(String::as_str).unwrap_or("NAME"),
            available.first().map(String::as_str).unwrap_or("NAME"),
        ),
        ConfigError::Missing { at, .. } => format!(
            "add `{}:` to builder `{}`",
            at.key.as_deref().unwrap_or("KEY"),
            at.builder.as_deref().unwrap_or("NAME")
        ),
        ConfigError::MissingVar { .. } => {
            "export the variable, or write `${VAR:-default}` to give it a default".into()
        }
        ConfigError::Read { path, .. } => format!(
            "check that `{}` exists and is readable, or pass another file with `--remote-config PATH`",
            path.display()
        ),
        _ => "fix that line; the README's \"Configuration\" section lists every key".into(),
    }
}

/// The builder refused every key: how to authorise one.
pub fn key_refused(user: &str, host: &str, tried: &[String]) -> String {
    let key = tried
        .iter()
        .map(|t| t.trim_matches('`'))
        .find(|t| t.starts_with('/') || t.starts_with('~'));
    match key {
        Some(key) => format!(
            "authorise `{key}.pub` for `{user}` on the builder (append it to `~{user}/.ssh/authorized_keys` there, or run `ssh-copy-id -i {key}.pub {user}@{host}`), or set `identity_file:` to a key it accepts"
        ),
        None => format!(
            "create a key with `ssh-keygen -t ed25519`, authorise its `.pub` for `{user}` on the builder (`ssh-copy-id {user}@{host}`), and set `identity_file:` to it"
        ),
    }
}

/// docker on the builder does not answer: install it, or let the user use it.
pub fn docker(user: &str, message: &str) -> String {
    let m = message.to_ascii_lowercase();
    if m.contains("permission denied") {
        format!(
            "let `{user}` use docker on the builder: `sudo usermod -aG docker {user}` there (the next connection picks it up)"
        )
    } else if m.contains("not found") || m.contains("no such file") {
        "install docker on the builder (`sudo apt-get install docker.io` on Debian and Ubuntu), or set `docker:` to the path of its docker CLI".into()
    } else {
        format!(
            "start the docker daemon on the builder (`sudo systemctl start docker`) and check that `{user}` may use it"
        )
    }
}

/// No usable cloud credentials.
pub fn cloud_auth(source_name: &str) -> String {
    let aws = ["AWS", "profile `", "credential_process", "EC2"]
        .iter()
        .any(|w| source_name.contains(w));
    if aws {
        "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (with AWS_SESSION_TOKEN for temporary keys), or `profile:` / AWS_PROFILE to a profile in ~/.aws/credentials".into()
    } else {
        "run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file".into()
    }
}

/// A cloud endpoint's certificate is not signed by a trusted root.
pub fn untrusted_certificate(url: &str) -> String {
    format!(
        "if `{url}` is signed by a private CA or reached through a TLS-intercepting proxy, \
         give that CA's PEM certificate with `ca_file:` in the builder's config (or \
         ABSCONDA_CA_FILE); absconda trusts the system's CA store, else Mozilla's roots \
         built into it (`-v` says which)"
    )
}

/// `absconda init` / `remote add` could not do it.
pub fn init(e: &crate::commands::init::InitError) -> Option<String> {
    use crate::commands::init::InitError;
    match e {
        InitError::Exists { .. } => Some(
            "`absconda remote add NAME --host HOST` adds a builder to it; `absconda init --force` replaces it".into(),
        ),
        InitError::Duplicate { name, .. } => Some(format!(
            "choose another name, or edit `{name}` in the file"
        )),
        InitError::Missing { flag, .. } => Some(format!(
            "pass `--{flag} VALUE` (or run `absconda init` on a terminal to be asked)"
        )),
        InitError::BadProvider { .. } => Some("pass `--provider ssh`, `gcp` or `aws`".into()),
        InitError::NotChosen { provider, .. } => Some(if *provider == "gcp" {
            "pass `--zone ZONE --instance NAME` of one of them (or run `absconda init` on a terminal to pick from a menu)".into()
        } else {
            "pass `--instance-id ID` of one of them (or run `absconda init` on a terminal to pick from a menu)".into()
        }),
        InitError::NoneListed { .. } => Some(
            "check `--project`/`--region` and drop `--label`/`--tag`, or name the instance with `--instance` (gcp: with `--zone`) or `--instance-id`".into(),
        ),
        InitError::BadFilter { flag, .. } => Some(format!(
            "write `--{flag} KEY=VALUE`, e.g. `--{flag} role=builder`"
        )),
        InitError::NoSuchAlias { alias, path, .. } => Some(format!(
            "add a `Host {alias}` block with its `HostName` to `{}`, or pass `--host HOST` instead",
            path.display()
        )),
        InitError::FromSshConfigWith { flag } => Some(format!(
            "leave out `--{flag}`: `~/.ssh/config` says where the host is"
        )),
        InitError::ListNeedsCloud => Some(
            "pass `--provider gcp --project PROJECT` or `--provider aws --region REGION`".into(),
        ),
        InitError::NotPicked => Some(
            "run it again and type a number from the list, or pass the instance as a flag".into(),
        ),
        _ => None,
    }
}
