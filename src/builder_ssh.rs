//! `~/.ssh/config` applied to a builder: absconda's own keys win, the file
//! fills in what they leave unset (as OpenSSH's command line wins over its
//! file). Only `ssh` builders read it; `ssh_config: false` turns it off.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::Builder;
use crate::ssh::jump::JumpHost;
use crate::ssh::known_hosts::HostKeyPolicy;
use crate::ssh::ssh_config::{SshConfig, SshConfigError};

/// Which keys absconda's config set itself.
#[derive(Debug, Default)]
pub struct Explicit {
    pub port: bool,
    pub user: bool,
    pub identity_file: bool,
    pub certificate_file: bool,
    pub known_hosts: bool,
    pub host_key_policy: bool,
    pub connect_timeout: bool,
    pub jump: bool,
}

/// Fills `b` from the ssh_config file at `path` for `b.host` and its jump hosts.
pub fn apply(
    b: &mut Builder,
    path: &std::path::Path,
    explicit: &Explicit,
) -> Result<(), SshConfigError> {
    let Some(alias) = b.host.clone() else {
        return Ok(());
    };
    let cfg = SshConfig::load(path)?;
    let given_user = explicit.user.then_some(b.user.as_str());
    let hc = cfg.resolve(&alias, given_user)?;
    if let Some(h) = &hc.host_name {
        b.host = Some(h.clone());
    }
    if !explicit.port
        && let Some(p) = hc.port
    {
        b.port = p;
    }
    if !explicit.user
        && let Some(u) = &hc.user
    {
        b.user = u.clone();
    }
    if !explicit.identity_file {
        b.identity_files = existing(&hc.identity_files);
    }
    if !explicit.certificate_file {
        b.certificate_files = existing(&hc.certificate_files);
    }
    if !explicit.known_hosts
        && let Some(k) = &hc.user_known_hosts_file
    {
        b.known_hosts = k.clone();
    }
    if !explicit.host_key_policy && hc.strict_host_key_checking.as_deref() == Some("accept-new") {
        b.host_key_policy = HostKeyPolicy::AcceptNew;
    }
    if b.host_key_alias.is_none() {
        b.host_key_alias = hc.host_key_alias.clone();
    }
    if !explicit.connect_timeout
        && let Some(t) = hc.connect_timeout
    {
        b.connect_timeout = Duration::from_secs(t);
    }
    if !explicit.jump
        && let Some(pj) = &hc.proxy_jump
        && !pj.eq_ignore_ascii_case("none")
    {
        b.jump = JumpHost::parse_chain(pj).map_err(|message| SshConfigError::Invalid {
            path: path.to_path_buf(),
            line: 0,
            message: format!("`ProxyJump {pj}`: {message}"),
        })?;
    }
    // Each jump host may be an alias with its own settings.
    for hop in &mut b.jump {
        let hh = cfg.resolve(&hop.host, hop.user.as_deref())?;
        if let Some(h) = hh.host_name {
            hop.host = h;
        }
        if hop.port.is_none() {
            hop.port = hh.port;
        }
        if hop.user.is_none() {
            hop.user = hh.user;
        }
        if hop.identity_files.is_empty() {
            hop.identity_files = existing(&hh.identity_files);
        }
    }
    Ok(())
}

/// OpenSSH skips `IdentityFile`s that do not exist (`Host *` defaults).
fn existing(files: &[PathBuf]) -> Vec<PathBuf> {
    files.iter().filter(|p| p.exists()).cloned().collect()
}
