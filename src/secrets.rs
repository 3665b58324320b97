//! Build secrets (`--secret id=NAME[,src=FILE|,env=VAR]`).
//!
//! A secret's value is read on the client and travels only through a
//! channel's stdin, as a small tar stream, to a 0700 folder on a tmpfs of
//! the builder (see [`crate::remote::secrets`]). `docker build --secret
//! id=NAME,src=PATH` gets the file's path, never the value. The folder
//! belongs to the lease: the supervisor removes it when the build ends in
//! any way, and the next lease removes what a killed supervisor left.

use std::fmt;
use std::path::PathBuf;

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
    /// The local agent socket.
    pub socket: PathBuf,
}

/// Parses `--ssh default`, `--ssh ID`, `--ssh ID=SOCKET`: every id is
/// served by one local agent (`SSH_AUTH_SOCK` unless a socket is given).
pub fn ssh_forward(specs: &[String]) -> Result<Option<SshForward>, SecretError> {
    if specs.is_empty() {
        return Ok(None);
    }
    let bad = |spec: &str, message: String| SecretError::Spec {
        spec: format!("--ssh {spec}"),
        message,
    };
    let mut ids = Vec::new();
    let mut socket: Option<PathBuf> = None;
    for spec in specs {
        let (id, path) = match spec.split_once('=') {
            Some((id, p)) => (id, Some(PathBuf::from(p))),
            None => (spec.as_str(), None),
        };
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(bad(spec, format!("`{id}` is not a valid id")));
        }
        let path = match path {
            Some(p) => p,
            None => std::env::var_os("SSH_AUTH_SOCK")
                .map(PathBuf::from)
                .ok_or_else(|| {
                    bad(
                        spec,
                        "`SSH_AUTH_SOCK` is not set: start an agent and add your key (`ssh-add`), or give `ID=SOCKET`".into(),
                    )
                })?,
        };
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(&path) {
            Ok(md) if md.file_type().is_socket() => {}
            Ok(_) => {
                return Err(bad(
                    spec,
                    format!(
                        "`{}` is not an agent socket; key files are not forwarded: load the key into an agent with `ssh-add` and use `--ssh {id}`",
                        path.display()
                    ),
                ));
            }
            Err(e) => return Err(bad(spec, format!("`{}`: {e}", path.display()))),
        }
        if let Some(s) = &socket
            && *s != path
        {
            return Err(bad(
                spec,
                "all `--ssh` ids must use the same agent socket".into(),
            ));
        }
        socket = Some(path);
        ids.push(id.to_string());
    }
    Ok(socket.map(|socket| SshForward { ids, socket }))
}
