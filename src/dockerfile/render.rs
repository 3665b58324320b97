//! Writing the Dockerfile text.
//!
//! The text is built line by line rather than from templates so that every
//! value that comes from a user (image names, channels, label values,
//! variables) passes through one of two quoting functions, and so that the
//! output is byte-identical for identical inputs. Nothing here uses heredocs,
//! `--chmod`, `--link` or other BuildKit-only syntax: builders run whatever
//! Docker their VM has, and the legacy builder must read every line.
//!
//! The shape follows the Python original: a micromamba builder stage that
//! creates the environment, a slim runtime stage that receives it, then the
//! `CONDA_*` and `PATH` exports and `CMD ["python"]` (left out when the
//! environment has no python). Unlike the original, the builder stage creates
//! the environment at its final prefix, so it is copied rather than packed
//! and relocated; only `--tarball` archives are relocated with
//! `conda-unpack`.

use super::env::Environment;

/// Where an environment is created, unpacked and exported.
pub(crate) struct Layout<'a> {
    /// The safe environment name.
    pub name: &'a str,
    /// The directory the environment lives in, in the final image.
    pub env_dir: &'a str,
    /// The parent of `env_dir` (the `--env-prefix`).
    pub env_prefix: &'a str,
}

/// What every mode shares: the comment on top, labels and extra `ENV` lines.
pub(crate) struct Common<'a> {
    /// Comment lines (without `# `) that open the file.
    pub header: Vec<String>,
    /// `LABEL` pairs, in output order.
    pub labels: &'a [(String, String)],
}

/// Where the builder stage reads the environment file from.
const ENV_FILE_IN_IMAGE: &str = "/tmp/env.yaml";
/// The root prefix of the micromamba images, whose `bin` the original also
/// put on `PATH`.
const CONDA_ROOT_BIN: &str = "/opt/conda/bin";

/// The default: build in micromamba, run on a slim image.
///
/// The environment is created at its final prefix in the builder stage and
/// copied to the same path in the runtime stage, so nothing in it needs
/// rewriting: conda-pack and conda-unpack (which needs a python the
/// environment may not have, e.g. R-only or bioconda-tools environments)
/// are not involved, and no prefix can be left stale.
pub(crate) fn multi_stage(
    common: &Common<'_>,
    env: &Environment,
    layout: &Layout<'_>,
    builder_base: &str,
    runtime_base: &str,
    env_file_in_context: &str,
) -> String {
    let mut out = Dockerfile::new(&common.header);
    out.line(format!("FROM {builder_base} AS builder"));
    out.create_env(env, layout, env_file_in_context);
    out.blank();

    out.line(format!("FROM {runtime_base} AS runtime"));
    out.line(format!(
        "COPY --from=builder {dir}/ {dir}/",
        dir = layout.env_dir
    ));
    out.blank();
    out.exports(layout, &env.variables);
    out.finish(common.labels, env.has_python())
}

/// `--single-stage`: one micromamba image that creates the environment in
/// place; there is nothing to move, so nothing to pack.
pub(crate) fn single_stage(
    common: &Common<'_>,
    env: &Environment,
    layout: &Layout<'_>,
    builder_base: &str,
    env_file_in_context: &str,
) -> String {
    let mut out = Dockerfile::new(&common.header);
    out.line(format!("FROM {builder_base}"));
    out.create_env(env, layout, env_file_in_context);
    out.blank();
    out.exports(layout, &env.variables);
    out.finish(common.labels, env.has_python())
}

/// `--tarball`: a conda-pack archive made elsewhere, unpacked into the
/// runtime image.
pub(crate) fn tarball(
    common: &Common<'_>,
    layout: &Layout<'_>,
    runtime_base: &str,
    archive_in_context: &str,
) -> String {
    let mut out = Dockerfile::new(&common.header);
    out.line(format!("FROM {runtime_base} AS runtime"));
    // ADD unpacks a local tar archive itself (gzip, bzip2 or xz), in both
    // builders. Unlike the original's COPY + `tar -x`, the archive never
    // lands in a layer, and the runtime image needs no tar or gzip.
    out.line(format!("ADD {archive_in_context} {}/", layout.env_dir));
    out.conda_unpack(layout.env_dir);
    out.blank();
    out.exports(layout, &[]);
    out.finish(common.labels, true)
}

/// `--requirements`: a plain Python image with the requirements installed
/// by pip.
pub(crate) fn requirements(
    common: &Common<'_>,
    runtime_base: &str,
    requirements_in_context: &str,
) -> String {
    let mut out = Dockerfile::new(&common.header);
    let in_image = "/tmp/requirements.txt";
    out.line(format!("FROM {runtime_base} AS runtime"));
    out.line(format!("COPY {requirements_in_context} {in_image}"));
    out.run(&[
        format!("pip install --no-cache-dir -r {in_image}"),
        format!("rm {in_image}"),
    ]);
    out.blank();
    out.finish(common.labels, true)
}

fn is_under_conda_root(prefix: &str) -> bool {
    prefix == "/opt/conda" || prefix.starts_with("/opt/conda/")
}

fn channel_flags(channels: &[String]) -> String {
    channels
        .iter()
        .map(|channel| format!("--channel {}", sh_quote(channel)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A Dockerfile under construction.
struct Dockerfile {
    text: String,
}

impl Dockerfile {
    fn new(header: &[String]) -> Self {
        let mut text = String::new();
        for line in header {
            if line.is_empty() {
                text.push_str("#\n");
            } else {
                text.push_str("# ");
                text.push_str(line);
                text.push('\n');
            }
        }
        if !header.is_empty() {
            text.push('\n');
        }
        Dockerfile { text }
    }

    fn line(&mut self, line: impl AsRef<str>) {
        self.text.push_str(line.as_ref());
        self.text.push('\n');
    }

    fn blank(&mut self) {
        self.text.push('\n');
    }

    /// One `RUN` whose commands are joined with `&&`, one per line.
    fn run(&mut self, commands: &[String]) {
        let joined = commands.join(" && \\\n    ");
        self.line(format!("RUN {joined}"));
    }

    /// The micromamba images run as `$MAMBA_USER`, who may write only below
    /// /opt/conda: a prefix elsewhere is created and handed over first.
    fn own_prefix(&mut self, env_prefix: &str) {
        if !is_under_conda_root(env_prefix) {
            self.line("USER root");
            self.line(format!(
                "RUN mkdir -p {env_prefix} && chown \"$MAMBA_USER\" {env_prefix}"
            ));
            self.line("USER $MAMBA_USER");
        }
    }

    /// Creates the environment from the `environment.yaml` in the context,
    /// at its final prefix, and drops micromamba's package cache.
    fn create_env(&mut self, env: &Environment, layout: &Layout<'_>, env_file_in_context: &str) {
        self.own_prefix(layout.env_prefix);
        self.line(format!("COPY {env_file_in_context} {ENV_FILE_IN_IMAGE}"));
        self.run(&[
            format!(
                "micromamba create -y -p {} {} -f {ENV_FILE_IN_IMAGE}",
                layout.env_dir,
                channel_flags(&env.effective_channels())
            ),
            "micromamba clean -afy".to_string(),
        ]);
    }

    /// Rewrites the prefixes conda-pack recorded to the environment's new
    /// place (`--tarball`: the archive was packed elsewhere). conda-unpack is
    /// a Python script: the environment's own Python runs it, or the image's
    /// for environments without Python (R-only ones). With neither the build
    /// fails: the environment's files would keep the prefix it was packed
    /// at, and the image would be broken without a word. A failing
    /// conda-unpack fails the build too.
    fn conda_unpack(&mut self, env_dir: &str) {
        let lines = [
            format!("RUN set -e; prefix={env_dir}; \\"),
            "    if [ -x \"$prefix/bin/conda-unpack\" ]; then \\".to_string(),
            "        py=; \\".to_string(),
            "        for candidate in \"$prefix/bin/python3\" \"$prefix/bin/python\" \\".to_string(),
            "                \"$(command -v python3 2>/dev/null)\" \"$(command -v python 2>/dev/null)\"; do \\".to_string(),
            "            if [ -n \"$candidate\" ] && [ -x \"$candidate\" ]; then py=\"$candidate\"; break; fi; \\".to_string(),
            "        done; \\".to_string(),
            "        if [ -n \"$py\" ]; then \"$py\" \"$prefix/bin/conda-unpack\"; \\".to_string(),
            "        else echo \"absconda: conda-unpack needs a python to rewrite the packed prefixes, and neither the environment nor the runtime image has one; use a --runtime-base with python\" >&2; exit 1; fi; \\".to_string(),
            "        rm -rf \"$prefix/conda-meta/history\"; \\".to_string(),
            "    fi".to_string(),
        ];
        for line in lines {
            self.line(line);
        }
    }

    /// The activation the original exported, then the file's `variables`.
    fn exports(&mut self, layout: &Layout<'_>, variables: &[(String, String)]) {
        self.line(format!("ENV CONDA_DEFAULT_ENV={}", layout.name));
        self.line(format!("ENV CONDA_PREFIX={}", layout.env_dir));
        self.line(format!(
            "ENV PATH={}/bin:{CONDA_ROOT_BIN}:${{PATH}}",
            layout.env_dir
        ));
        for (name, value) in variables {
            self.line(format!("ENV {name}={}", dq(value)));
        }
        self.blank();
    }

    /// Labels go last, just before `CMD`: the `created` label changes on
    /// every build, and an instruction that changes invalidates the build
    /// cache of everything after it.
    /// `CMD ["python"]` only when the environment has a python; otherwise no
    /// `CMD`, so the runtime image's own (a shell, for the default image)
    /// applies instead of a command that cannot start.
    fn finish(mut self, labels: &[(String, String)], has_python: bool) -> String {
        if !labels.is_empty() {
            let pairs: Vec<String> = labels
                .iter()
                .map(|(key, value)| format!("{key}={}", dq(value)))
                .collect();
            self.line(format!("LABEL {}", pairs.join(" \\\n      ")));
            self.blank();
        }
        if has_python {
            self.line("CMD [\"python\"]");
        } else {
            // Without a CMD the text would end in a blank line.
            self.text.pop();
        }
        self.text
    }
}

/// A Dockerfile double-quoted word: `\`, `"` and `$` are escaped so the value
/// arrives byte for byte and no variable is expanded. Callers reject line
/// breaks, which no Dockerfile word can hold.
pub(crate) fn dq(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for ch in value.chars() {
        if matches!(ch, '\\' | '"' | '$') {
            out.push('\\');
        }
        out.push(ch);
    }
    out.push('"');
    out
}

/// A POSIX `sh` word: bare when made of safe characters (so ordinary channel
/// names read as in the original), single-quoted otherwise.
pub fn sh_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerfile_double_quoting() {
        let cases = [
            ("plain", "\"plain\""),
            ("", "\"\""),
            ("with space", "\"with space\""),
            ("say \"hi\"", "\"say \\\"hi\\\"\""),
            ("$HOME and ${PATH}", "\"\\$HOME and \\${PATH}\""),
            ("back\\slash", "\"back\\\\slash\""),
        ];
        for (input, want) in cases {
            assert_eq!(dq(input), want, "dq({input:?})");
        }
    }

    #[test]
    fn shell_quoting() {
        let cases = [
            ("conda-forge", "conda-forge"),
            (
                "https://conda.example.org/main",
                "https://conda.example.org/main",
            ),
            ("conda-forge/label/dev", "conda-forge/label/dev"),
            ("a&b", "'a&b'"),
            ("it's", "'it'\\''s'"),
            ("$(id)", "'$(id)'"),
        ];
        for (input, want) in cases {
            assert_eq!(sh_quote(input), want, "sh_quote({input:?})");
        }
    }

    #[test]
    fn conda_root_detection() {
        assert!(is_under_conda_root("/opt/conda/envs"));
        assert!(is_under_conda_root("/opt/conda"));
        assert!(!is_under_conda_root("/opt/condax"));
        assert!(!is_under_conda_root("/srv/envs"));
    }
}
