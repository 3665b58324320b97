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
            "create `{FILE_NAME}` in this folder with one builder: `builders: {{local: {{host: HOST, user: USER}}}}`"
        ),
        ConfigError::UnknownBuilder {
            name, available, ..
        } if available.is_empty() => format!("add `{name}:` with its `host:` under `builders:`"),
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
