//! Checks that keep the context's own symlinks from deciding what absconda
//! reads or where the builder writes.
//!
//! A context may come from anyone (a cloned repository). Its symlinks are
//! sent as symlinks and never followed by the walk, but two things absconda
//! adds would follow them: the inputs of a generated Dockerfile, written
//! into the context under `.absconda/` (a `.absconda -> /some/dir` link in
//! the context, kept in the builder's copy, would have `tar -x` write
//! through it), and the Dockerfile itself, which absconda reads and sends (a
//! `Dockerfile -> ~/.ssh/id_ed25519` link would send that key to the builder,
//! whose docker then prints its first word). Both are refused here, on the
//! client, before anything is sent.

use std::path::{Component, Path, PathBuf};

use super::ContextError;

/// Refuses to add the file `name` (`/`-separated, relative) to the context
/// `ctx` when one of its parent folders in `ctx` is a symlink or not a
/// folder.
pub fn check_input_parents(ctx: &Path, name: &str) -> Result<(), ContextError> {
    let parts: Vec<&str> = name.split('/').filter(|p| !p.is_empty()).collect();
    let mut path = ctx.to_path_buf();
    for part in parts.iter().take(parts.len().saturating_sub(1)) {
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(md) if md.file_type().is_symlink() || !md.is_dir() => {
                return Err(ContextError::InputParentNotAFolder {
                    name: name.to_string(),
                    path,
                    symlink: md.file_type().is_symlink(),
                });
            }
            Ok(_) => {}
            // Absent: the builder creates a plain folder.
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

/// Refuses a Dockerfile that lies in the context `ctx` (by its path as
/// given) but resolves, through symlinks, to a file outside it. A Dockerfile
/// given outside the context is the user's explicit choice and is read as
/// before; one inside that resolves inside is sent as its target.
pub fn check_dockerfile(ctx: &Path, dockerfile: &Path) -> Result<(), ContextError> {
    let (Ok(ctx_abs), Ok(df_abs)) = (std::path::absolute(ctx), std::path::absolute(dockerfile))
    else {
        return Ok(());
    };
    if !lexical(&df_abs).starts_with(lexical(&ctx_abs)) {
        return Ok(());
    }
    let (Ok(ctx_real), Ok(df_real)) = (
        std::fs::canonicalize(ctx),
        std::fs::canonicalize(dockerfile),
    ) else {
        return Ok(());
    };
    if df_real.starts_with(&ctx_real) {
        Ok(())
    } else {
        Err(ContextError::DockerfileOutside {
            path: dockerfile.to_path_buf(),
            target: df_real,
        })
    }
}

/// `path` with `.` and `..` resolved by name only (no symlinks followed).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn inputs_under_a_symlinked_or_file_parent_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        // Absent parent: fine.
        check_input_parents(&ctx, ".absconda/requirements.txt").unwrap();
        // A real folder: fine.
        std::fs::create_dir(ctx.join(".absconda")).unwrap();
        check_input_parents(&ctx, ".absconda/requirements.txt").unwrap();
        std::fs::remove_dir(ctx.join(".absconda")).unwrap();
        // A symlink to a folder outside: refused, naming the link.
        symlink(&outside, ctx.join(".absconda")).unwrap();
        let err = check_input_parents(&ctx, ".absconda/requirements.txt").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(".absconda") && msg.contains("symlink"),
            "{msg}"
        );
        std::fs::remove_file(ctx.join(".absconda")).unwrap();
        // A plain file: refused.
        std::fs::write(ctx.join(".absconda"), "x").unwrap();
        assert!(check_input_parents(&ctx, ".absconda/environment.yaml").is_err());
        // A top-level name has no parent to check.
        check_input_parents(&ctx, "Dockerfile").unwrap();
    }

    #[test]
    fn a_dockerfile_link_out_of_the_context_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        std::fs::create_dir_all(ctx.join("docker")).unwrap();
        std::fs::write(dir.path().join("secret"), "TOKEN").unwrap();
        std::fs::write(ctx.join("docker/Dockerfile.real"), "FROM x\n").unwrap();
        symlink("docker/Dockerfile.real", ctx.join("Dockerfile")).unwrap();
        check_dockerfile(&ctx, &ctx.join("Dockerfile")).unwrap();
        symlink("../secret", ctx.join("Dockerfile.out")).unwrap();
        let err = check_dockerfile(&ctx, &ctx.join("Dockerfile.out")).unwrap_err();
        assert!(
            err.to_string().contains("outside the build context"),
            "{err}"
        );
        // Through a symlinked folder too.
        symlink(dir.path(), ctx.join("up")).unwrap();
        assert!(check_dockerfile(&ctx, &ctx.join("up/secret")).is_err());
        // A Dockerfile given outside the context is read as given.
        check_dockerfile(&ctx, &dir.path().join("secret")).unwrap();
        check_dockerfile(&ctx.join("docker"), &ctx.join("Dockerfile")).unwrap();
    }
}
