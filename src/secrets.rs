//! Build secrets (`--secret id=NAME[,src=FILE|,env=VAR]`).
//!
//! A secret's value is read on the client and travels only through a
//! channel's stdin, as a small tar stream, to a 0700 folder on a tmpfs of
//! the builder (see [`crate::remote::secrets`]). `docker build --secret
//! id=NAME,src=PATH` gets the file's path, never the value. The folder
//! belongs to the lease: the supervisor removes it when the build ends in
//! any way, and the next lease removes what a killed supervisor left.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::ssh::agent::{AgentForward, KeyAgent};

/// One `--secret` as the user wrote it, with its value read.
#[derive(Clone)]
pub struct BuildSecret {
    pub id: String,
    /// Where the value came from, for messages (`file `x``, `$VAR`).
    pub from: String,
    value: Vec<u8>,
}

impl fmt::Debug for BuildSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BuildSecret({} from {}, ***)", self.id, self.from)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("`--secret {spec}`: {message}")]
    Spec { spec: String, message: String },
    #[error("`--secret id={id}`: cannot read `{}`", path.display())]
    Read {
        id: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`--secret id={id}`: the environment variable `{var}` is not set")]
    NoEnv { id: String, var: String },
    #[error("`--ssh {spec}`: {message}")]
    SshSpec { spec: String, message: String },
    #[error("`--ssh {spec}`: cannot use the key file `{}`", path.display())]
    SshKey {
        spec: String,
        path: PathBuf,
        #[source]
        source: Box<crate::ssh::auth::AuthError>,
    },
}

/// Where a secret's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    File(PathBuf),
    Env(String),
}

/// Parses docker's syntax: `id=NAME,src=FILE`, `id=NAME,env=VAR`,
/// `type=file|env`, `source=` for `src=`; `id=NAME` alone reads the
/// environment variable `NAME`.
fn parse(spec: &str) -> Result<(String, Source), SecretError> {
    let bad = |message: String| SecretError::Spec {
        spec: spec.to_string(),
        message,
    };
    let mut id = None;
    let mut kind = None;
    let mut src = None;
    let mut env = None;
    for part in spec.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("`{part}` is not KEY=VALUE")))?;
        match k {
            "id" => id = Some(v.to_string()),
            "type" => kind = Some(v.to_string()),
            "src" | "source" => src = Some(v.to_string()),
            "env" => env = Some(v.to_string()),
            other => {
                return Err(bad(format!(
                    "unknown key `{other}`: use `id`, `src` (or `source`), `env` or `type`"
                )));
            }
        }
    }
    let id = id.ok_or_else(|| bad("`id=NAME` is missing".into()))?;
    if id.is_empty()
        || id.starts_with('.')
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(bad(format!(
            "the id `{id}` may use only letters, digits, `.`, `_` and `-`, and must not start with `.`"
        )));
    }
    let source = match (kind.as_deref(), src, env) {
        (_, Some(_), Some(_)) => return Err(bad("give either `src=` or `env=`, not both".into())),
        (None | Some("file"), Some(s), None) => Source::File(PathBuf::from(s)),
        (None | Some("env"), None, Some(e)) => Source::Env(e),
        (Some("env"), Some(s), None) => Source::Env(s),
        (Some("file"), None, None) => Source::File(PathBuf::from(&id)),
        (None | Some("env"), None, None) => Source::Env(id.clone()),
        (Some(t), _, _) if t != "file" && t != "env" => {
            return Err(bad(format!("unknown type `{t}`: use `file` or `env`")));
        }
        _ => {
            return Err(bad(
                "`type=file` takes `src=`, `type=env` takes `env=`".into()
            ));
        }
    };
    Ok((id, source))
}

impl BuildSecret {
    /// Parses one `--secret` and reads its value on this machine.
    pub fn read(spec: &str) -> Result<BuildSecret, SecretError> {
        let (id, source) = parse(spec)?;
        match source {
            Source::File(path) => {
                let value = std::fs::read(&path).map_err(|source| SecretError::Read {
                    id: id.clone(),
                    path: path.clone(),
                    source,
                })?;
                Ok(BuildSecret {
                    from: format!("file `{}`", path.display()),
                    id,
                    value,
                })
            }
            Source::Env(var) => {
                let value = std::env::var_os(&var).ok_or_else(|| SecretError::NoEnv {
                    id: id.clone(),
                    var: var.clone(),
                })?;
                use std::os::unix::ffi::OsStringExt;
                Ok(BuildSecret {
                    from: format!("${var}"),
                    id,
                    value: value.into_vec(),
                })
            }
        }
    }
}

/// The secrets as a tar stream of 0600 files named by id, for the
/// builder's `tar -x` in the secrets folder. Built in memory: it never
/// touches this machine's disk either.
pub fn tar(secrets: &[BuildSecret]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut builder = ::tar::Builder::new(&mut out);
        for s in secrets {
            let mut header = ::tar::Header::new_ustar();
            header.set_entry_type(::tar::EntryType::Regular);
            header.set_mode(0o600);
            header.set_size(s.value.len() as u64);
            header.set_mtime(0);
            // Writing into a Vec cannot fail, and the ids are validated short names.
            let _ = builder.append_data(&mut header, &s.id, &s.value[..]);
        }
        let _ = builder.finish();
    }
    out
}

/// `docker build` arguments for the secrets stored in `dir` on the builder.
pub fn docker_args(secrets: &[BuildSecret], dir: &str) -> Vec<String> {
    let mut argv = Vec::new();
    for s in secrets {
        argv.push("--secret".into());
        argv.push(format!("id={},src={dir}/{}", s.id, s.id));
    }
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_table() {
        let ok = [
            (
                "id=npm,src=/x/.npmrc",
                "npm",
                Source::File("/x/.npmrc".into()),
            ),
            ("id=npm,source=a", "npm", Source::File("a".into())),
            ("id=tok,env=GH_TOKEN", "tok", Source::Env("GH_TOKEN".into())),
            ("type=env,id=tok,src=V", "tok", Source::Env("V".into())),
            ("id=TOKEN", "TOKEN", Source::Env("TOKEN".into())),
            (
                "type=file,id=a.b_c-d",
                "a.b_c-d",
                Source::File("a.b_c-d".into()),
            ),
        ];
        for (spec, id, src) in ok {
            assert_eq!(parse(spec).unwrap(), (id.to_string(), src), "{spec}");
        }
        for bad in [
            "src=/x",
            "id=",
            "id=../x,src=a",
            "id=.hidden,src=a",
            "id=a b,src=a",
            "id=x,src=a,env=B",
            "id=x,what=y",
            "id=x,type=ssh",
            "justtext",
        ] {
            assert!(parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn debug_never_shows_the_value() {
        let s = BuildSecret {
            id: "x".into(),
            from: "$X".into(),
            value: b"hunter2".to_vec(),
        };
        assert!(!format!("{s:?}").contains("hunter2"));
        let t = tar(std::slice::from_ref(&s));
        let mut a = ::tar::Archive::new(&t[..]);
        let mut e = a.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.path().unwrap().to_str(), Some("x"));
        assert_eq!(e.header().mode().unwrap(), 0o600);
        let mut v = String::new();
        std::io::Read::read_to_string(&mut e, &mut v).unwrap();
        assert_eq!(v, "hunter2");
    }
}

/// `--ssh`: the agent forwarded into `RUN --mount=type=ssh` steps.
#[derive(Debug, Clone)]
pub struct SshForward {
    /// The ids `RUN --mount=type=ssh,id=…` uses (`default` when none is given).
    pub ids: Vec<String>,
    /// What answers: the local agent's socket, or key files absconda serves.
    pub agent: AgentForward,
}

/// Where one `--ssh` id's keys come from, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SshSource {
    Socket(PathBuf),
    KeyFiles(Vec<PathBuf>),
}

/// Parses docker's syntax: `--ssh default`, `--ssh ID` (the agent of
/// `SSH_AUTH_SOCK`), `--ssh ID=SOCKET` and `--ssh ID=KEYFILE[,KEYFILE…]`.
/// Key files are loaded here (an encrypted one is unlocked with
/// `ABSCONDA_SSH_PASSPHRASE` or a prompt) and served by absconda itself.
/// One agent channel reaches the build, so every id shares one source.
pub fn ssh_forward(specs: &[String]) -> Result<Option<SshForward>, SecretError> {
    let mut ids = Vec::new();
    let mut source: Option<(SshSource, &str)> = None;
    for spec in specs {
        let (id, this) = parse_ssh(spec)?;
        if let Some((first, first_spec)) = &source
            && *first != this
        {
            return Err(SecretError::SshSpec {
                spec: spec.clone(),
                message: format!(
                    "every `--ssh` id must use the same agent socket or key files as `--ssh {first_spec}`: the builder gets one forwarded agent"
                ),
            });
        }
        if ids.contains(&id) {
            return Err(SecretError::SshSpec {
                spec: spec.clone(),
                message: format!("the id `{id}` is given twice"),
            });
        }
        ids.push(id);
        if source.is_none() {
            source = Some((this, spec));
        }
    }
    let Some((source, spec)) = source else {
        return Ok(None);
    };
    let agent = match source {
        SshSource::Socket(p) => AgentForward::Socket(p),
        SshSource::KeyFiles(files) => {
            let mut keys = Vec::new();
            for path in files {
                let key =
                    crate::ssh::auth::load_key(&path).map_err(|source| SecretError::SshKey {
                        spec: spec.to_string(),
                        path: path.clone(),
                        source: Box::new(source),
                    })?;
                keys.push((key, path.display().to_string()));
            }
            let agent = KeyAgent::new(keys).map_err(|e| SecretError::SshSpec {
                spec: spec.to_string(),
                message: format!("cannot encode a public key: {e}"),
            })?;
            AgentForward::Keys(std::sync::Arc::new(agent))
        }
    };
    Ok(Some(SshForward { ids, agent }))
}

/// One `--ssh` spec: its id and where its keys come from.
fn parse_ssh(spec: &str) -> Result<(String, SshSource), SecretError> {
    let bad = |message: String| SecretError::SshSpec {
        spec: spec.to_string(),
        message,
    };
    let (id, paths) = match spec.split_once('=') {
        Some((id, p)) => (id, Some(p)),
        None => (spec, None),
    };
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(bad(format!("`{id}` is not a valid id")));
    }
    let from_env = paths.is_none();
    let paths: Vec<PathBuf> = match paths {
        Some(p) => p.split(',').map(PathBuf::from).collect(),
        None => vec![std::env::var_os("SSH_AUTH_SOCK").map(PathBuf::from).ok_or_else(|| {
            bad("`SSH_AUTH_SOCK` is not set: start an agent and add your key (`ssh-add`), or give `ID=SOCKET` or `ID=KEYFILE`".into())
        })?],
    };
    use std::os::unix::fs::FileTypeExt;
    let mut files = Vec::new();
    for path in &paths {
        if path.as_os_str().is_empty() {
            return Err(bad("an empty path".into()));
        }
        let expanded = expand_home(path);
        match std::fs::metadata(&expanded) {
            Ok(md) if md.file_type().is_socket() => {
                if paths.len() > 1 {
                    return Err(bad(format!(
                        "`{}` is an agent socket: give it alone, or only key files",
                        path.display()
                    )));
                }
                return Ok((id.to_string(), SshSource::Socket(expanded)));
            }
            Ok(_) if from_env => {
                return Err(bad(format!(
                    "`SSH_AUTH_SOCK` (`{}`) is not an agent socket",
                    path.display()
                )));
            }
            Ok(md) if md.is_file() => files.push(expanded),
            Ok(_) => {
                return Err(bad(format!(
                    "`{}` is neither an agent socket nor a key file",
                    path.display()
                )));
            }
            Err(e) => return Err(bad(format!("`{}`: {e}", path.display()))),
        }
    }
    Ok((id.to_string(), SshSource::KeyFiles(files)))
}

fn expand_home(path: &Path) -> PathBuf {
    if let Ok(rest) = path.strip_prefix("~")
        && let Some(home) = std::env::var_os("HOME")
    {
        return PathBuf::from(home).join(rest);
    }
    path.to_path_buf()
}

#[cfg(test)]
mod ssh_tests {
    use super::*;

    #[test]
    fn ssh_specs() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let key = dir.path().join("k");
        std::fs::write(&key, "not parsed here").unwrap();
        let (s, k) = (sock.display(), key.display());

        let (id, src) = parse_ssh(&format!("default={s}")).unwrap();
        assert_eq!(
            (id.as_str(), src),
            ("default", SshSource::Socket(sock.clone()))
        );
        let (id, src) = parse_ssh(&format!("git.hub-1={k},{k}")).unwrap();
        assert_eq!(id, "git.hub-1");
        assert_eq!(src, SshSource::KeyFiles(vec![key.clone(), key.clone()]));

        for (bad, says) in [
            (format!("={k}"), "not a valid id"),
            (format!("a b={k}"), "not a valid id"),
            (format!("x={s},{k}"), "give it alone"),
            (format!("x={k},"), "an empty path"),
            (
                format!("x={}", dir.path().display()),
                "neither an agent socket nor a key file",
            ),
            ("x=/does/not/exist".to_string(), "/does/not/exist"),
        ] {
            let e = parse_ssh(&bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        // One forwarded agent: every id shares its source.
        let e = ssh_forward(&[format!("a={s}"), format!("b={k}")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("same agent socket or key files"), "{e}");
        let e = ssh_forward(&[format!("a={s}"), format!("a={s}")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("given twice"), "{e}");
        let fw = ssh_forward(&[format!("a={s}"), format!("b={s}")])
            .unwrap()
            .unwrap();
        assert_eq!(fw.ids, ["a", "b"]);
        assert!(matches!(fw.agent, AgentForward::Socket(p) if p == sock));
        assert!(ssh_forward(&[]).unwrap().is_none());
    }
}
