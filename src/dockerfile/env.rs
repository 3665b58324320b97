//! Reading a conda `environment.yaml`.
//!
//! The file is the user's own description of their software, so it is read
//! strictly where a mistake would give a broken image (a dependency that is a
//! number, a `pip:` entry that is not a list, a variable whose value spans
//! lines) and every such error names the line, because the user fixes it in
//! an editor, not in absconda. Keys conda knows but absconda does not use, and
//! keys nobody knows (a typo of `dependencies`, say), are reported with
//! `tracing::warn!` instead of being dropped silently.
//!
//! The parser is a hand-written serde visitor rather than derived structs:
//! serde_norway attaches the line and column of the offending node only to
//! errors raised while that node is being deserialized, and a visitor can
//! raise them exactly there.

use std::fmt;
use std::path::Path;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::DockerfileError;

/// What absconda calls an environment that has no `name:`, as the original did.
pub const DEFAULT_ENV_NAME: &str = "absconda";

/// The channel used when the file lists none, as the original did.
pub const DEFAULT_CHANNEL: &str = "conda-forge";

/// conda's keyword in `channels:` for "leave out the default channels".
pub const NODEFAULTS: &str = "nodefaults";

/// An `environment.yaml` as absconda understands it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    /// The `name:` as written, if any (see [`Environment::safe_name`]).
    pub name: Option<String>,
    /// The `channels:` in priority order; empty when the file lists none.
    pub channels: Vec<String>,
    /// Conda match specs, in file order.
    pub conda: Vec<String>,
    /// Requirements from all `pip:` lists, in file order.
    pub pip: Vec<String>,
    /// `variables:` in file order; values are the scalars' text.
    pub variables: Vec<(String, String)>,
    /// Top-level keys that were present but are not used, with their line.
    pub ignored_keys: Vec<(String, Option<usize>)>,
}

impl Environment {
    /// The channels micromamba is pointed at: the file's, or `conda-forge`
    /// when it lists none. `nodefaults` is conda's keyword for "no default
    /// channels", not a channel: micromamba reads it from the file, and it
    /// is never passed as `--channel`.
    pub fn effective_channels(&self) -> Vec<String> {
        let listed: Vec<String> = self
            .channels
            .iter()
            .filter(|c| c.as_str() != NODEFAULTS)
            .cloned()
            .collect();
        if listed.is_empty() {
            vec![DEFAULT_CHANNEL.to_string()]
        } else {
            listed
        }
    }

    /// True when the file lists no channel of its own (`nodefaults` aside),
    /// so the default channel is passed for it.
    pub fn uses_default_channel(&self) -> bool {
        self.channels.iter().all(|c| c == NODEFAULTS)
    }

    /// True when the environment has a python: the file lists `python`,
    /// `pip` or `pip:` requirements (pip brings python). An environment whose
    /// packages only pull python in as a dependency counts as without.
    pub fn has_python(&self) -> bool {
        !self.pip.is_empty()
            || self
                .conda
                .iter()
                .any(|spec| matches!(package_name(spec).as_str(), "python" | "pip"))
    }

    /// True when the file has `pip:` requirements but does not list `pip`
    /// itself: micromamba then adds `pip` to the conda packages (the
    /// original did the same), so it ends up in the image all the same.
    pub fn adds_pip(&self) -> bool {
        !self.pip.is_empty() && !self.conda.iter().any(|spec| package_name(spec) == "pip")
    }

    /// The name used for the environment directory, `micromamba -n` and the
    /// image title: see [`safe_name`].
    pub fn safe_name(&self) -> String {
        safe_name(self.name.as_deref().unwrap_or(DEFAULT_ENV_NAME))
    }
}

/// Parses the text of an environment file. `path` is only used in errors.
pub fn parse(text: &str, path: &Path) -> Result<Environment, DockerfileError> {
    if is_blank_yaml(text) {
        return Err(DockerfileError::EmptyEnvironment {
            path: path.to_path_buf(),
        });
    }
    crate::yaml::check_depth(text).map_err(|e| DockerfileError::InvalidEnvironment {
        path: path.to_path_buf(),
        line: Some(e.line),
        column: Some(e.column),
        reason: format!("nested more than {} levels deep", crate::yaml::MAX_DEPTH),
    })?;
    // Syntax first: serde_norway reports a syntax error only after the
    // events before it were deserialized, so a visitor's complaint about a
    // half-read node would otherwise hide it (an unclosed `[` read as a
    // dependency section).
    serde_norway::from_str::<IgnoredAny>(text).map_err(|err| {
        let mut e = yaml_error(path, &err);
        if let DockerfileError::InvalidEnvironment { reason, .. } = &mut e {
            *reason = format!("YAML syntax error: {reason}");
        }
        e
    })?;
    let raw: RawEnvironment = serde_norway::from_str(text).map_err(|err| yaml_error(path, &err))?;
    let RawEnvironment {
        name,
        channels,
        dependencies,
        variables,
        other_keys,
        duplicate_key,
    } = raw;
    if let Some(key) = duplicate_key {
        return Err(DockerfileError::InvalidEnvironment {
            path: path.to_path_buf(),
            line: top_level_key_lines(text, &key).nth(1),
            column: Some(1),
            reason: format!("duplicate key `{key}`"),
        });
    }

    let mut conda = Vec::new();
    let mut pip = Vec::new();
    for dep in dependencies.unwrap_or_default() {
        match dep {
            Dependency::Conda(spec) => conda.push(spec),
            Dependency::Pip(list) => pip.extend(list),
        }
    }
    let ignored_keys = other_keys
        .into_iter()
        .map(|key| {
            let line = top_level_key_lines(text, &key).next();
            (key, line)
        })
        .collect();

    Ok(Environment {
        name,
        channels: channels.unwrap_or_default(),
        conda,
        pip,
        variables: variables.unwrap_or_default(),
        ignored_keys,
    })
}

/// The package name of a conda match spec: `conda-forge::numpy>=1.26` →
/// `numpy`.
pub fn package_name(spec: &str) -> String {
    let without_channel = spec.rsplit("::").next().unwrap_or(spec);
    without_channel
        .split(|c: char| c.is_whitespace() || "=<>!~[(".contains(c))
        .next()
        .unwrap_or_default()
        .trim()
        .to_lowercase()
}

/// Makes an environment name usable as a path component, a `micromamba -n`
/// argument and a Docker repository path component.
///
/// Docker's grammar is the strictest of the three: lowercase letters and
/// digits, separated by one `.`, one or two `_`, or any number of `-`. Names
/// already in that form (`analysis`, `my_env`, `rna-seq.v2`) are kept as they
/// are, so the common case matches what the original generated; anything
/// else is lowercased and every other run of characters becomes one `-`. A
/// name with nothing usable left becomes `absconda`.
pub fn safe_name(name: &str) -> String {
    let lower = name.trim().to_lowercase();
    let mut out = String::with_capacity(lower.len());
    let mut separator = String::new();
    for ch in lower.chars() {
        if ch.is_ascii_lowercase() || ch.is_ascii_digit() {
            if !separator.is_empty() {
                if !out.is_empty() {
                    out.push_str(normalise_separator(&separator));
                }
                separator.clear();
            }
            out.push(ch);
        } else {
            separator.push(ch);
        }
    }
    if out.is_empty() {
        DEFAULT_ENV_NAME.to_string()
    } else {
        out
    }
}

/// Keeps a separator run that Docker accepts, replaces any other with `-`.
fn normalise_separator(run: &str) -> &str {
    let all_dashes = run.chars().all(|c| c == '-');
    if run == "." || run == "_" || run == "__" || all_dashes {
        run
    } else {
        "-"
    }
}

/// True when the text holds no YAML node at all (empty, or only comments).
fn is_blank_yaml(text: &str) -> bool {
    text.lines().all(|line| {
        let line = line.trim();
        line.is_empty() || line.starts_with('#') || line == "---" || line == "..."
    })
}

/// The lines a top-level key starts on, found by a plain text scan: serde
/// reports positions for errors only, and a warning is worth a line number.
fn top_level_key_lines<'t>(text: &'t str, key: &str) -> impl Iterator<Item = usize> + 't {
    let forms = [
        format!("{key}:"),
        format!("\"{key}\":"),
        format!("'{key}':"),
    ];
    text.lines()
        .enumerate()
        .filter(move |(_, line)| forms.iter().any(|form| line.starts_with(form.as_str())))
        .map(|(index, _)| index + 1)
}

fn yaml_error(path: &Path, err: &serde_norway::Error) -> DockerfileError {
    let location = err.location();
    let mut reason = err.to_string();
    // serde_norway and libyaml put " at line L column C" into their
    // messages; the line is reported separately, so drop the duplicate.
    if let Some(loc) = &location {
        let at = format!(" at line {} column {}", loc.line(), loc.column());
        reason = reason.replacen(&at, "", 1);
    }
    DockerfileError::InvalidEnvironment {
        path: path.to_path_buf(),
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        reason,
    }
}

/// The file as serde sees it; turned into an [`Environment`] by [`parse`].
struct RawEnvironment {
    name: Option<String>,
    channels: Option<Vec<String>>,
    dependencies: Option<Vec<Dependency>>,
    variables: Option<Vec<(String, String)>>,
    other_keys: Vec<String>,
    /// The first top-level key given twice.
    duplicate_key: Option<String>,
}

impl<'de> Deserialize<'de> for RawEnvironment {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(RawEnvironmentVisitor)
    }
}

struct RawEnvironmentVisitor;

impl<'de> Visitor<'de> for RawEnvironmentVisitor {
    type Value = RawEnvironment;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping with `name`, `channels` and `dependencies`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut raw = RawEnvironment {
            name: None,
            channels: None,
            dependencies: None,
            variables: None,
            other_keys: Vec::new(),
            duplicate_key: None,
        };
        let mut seen: Vec<String> = Vec::new();
        while let Some(key) = map.next_key::<ScalarText>()? {
            let key = key.0;
            if seen.contains(&key) {
                // The error is raised in `parse`, which can find the line of
                // the second key; an error raised here would point at the
                // start of the file.
                map.next_value::<IgnoredAny>()?;
                raw.duplicate_key.get_or_insert(key);
                continue;
            }
            seen.push(key.clone());
            match key.as_str() {
                "name" => {
                    raw.name = map
                        .next_value::<Option<ScalarText>>()?
                        .map(|text| text.0.trim().to_string())
                        .filter(|name| !name.is_empty());
                }
                "channels" => {
                    raw.channels = map
                        .next_value_seed(OptionalList(Channel))?
                        .map(|list| list.into_iter().map(|c| c.0).collect());
                }
                "dependencies" => {
                    raw.dependencies = map.next_value_seed(OptionalList(DependencySeed))?
                }
                "variables" => raw.variables = map.next_value::<Option<Variables>>()?.map(|v| v.0),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    raw.other_keys.push(key);
                }
            }
        }
        Ok(raw)
    }
}

/// Reads a sequence of `T` where `null` (a key with nothing after it)
/// counts as absent.
struct OptionalList<S>(S);

impl<'de, S> DeserializeSeed<'de> for OptionalList<S>
where
    S: DeserializeSeed<'de> + Copy,
{
    type Value = Option<Vec<S::Value>>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, S> Visitor<'de> for OptionalList<S>
where
    S: DeserializeSeed<'de> + Copy,
{
    type Value = Option<Vec<S::Value>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self.0)? {
            items.push(item);
        }
        Ok(Some(items))
    }
}

/// Any scalar as text: YAML reads `name: 2024` as a number, conda as a name.
struct ScalarText(String);

impl<'de> Deserialize<'de> for ScalarText {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarTextVisitor)
    }
}

struct ScalarTextVisitor;

impl Visitor<'_> for ScalarTextVisitor {
    type Value = ScalarText;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(ScalarText(v.to_string()))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(ScalarText(v.to_string()))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(ScalarText(v.to_string()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(ScalarText(v.to_string()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(ScalarText(v.to_string()))
    }
}

/// Checks a one-line word (a match spec, a channel, a pip requirement) that
/// ends up in a command line or a Dockerfile comment.
fn one_line<E: de::Error>(what: &str, value: &str) -> Result<String, E> {
    let value = value.trim();
    if value.is_empty() {
        return Err(E::custom(format_args!("empty {what}")));
    }
    if value.chars().any(char::is_control) {
        return Err(E::custom(format_args!(
            "{what} `{}` spans several lines or holds control characters",
            value.escape_default()
        )));
    }
    Ok(value.to_string())
}

#[derive(Clone, Copy)]
struct Channel;

struct ChannelName(String);

impl<'de> DeserializeSeed<'de> for Channel {
    type Value = ChannelName;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl Visitor<'_> for Channel {
    type Value = ChannelName;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a channel name or URL")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let channel = one_line("channel", v)?;
        if channel.chars().any(char::is_whitespace) {
            return Err(E::custom(format_args!(
                "channel `{channel}` contains a space"
            )));
        }
        Ok(ChannelName(channel))
    }
}

/// One entry of `dependencies:`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Dependency {
    /// A conda match spec such as `numpy>=1.26` or `conda-forge::python=3.11`.
    Conda(String),
    /// The entries of a `- pip: [...]` block.
    Pip(Vec<String>),
}

#[derive(Clone, Copy)]
struct DependencySeed;

impl<'de> DeserializeSeed<'de> for DependencySeed {
    type Value = Dependency;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DependencySeed {
    type Value = Dependency;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a match spec such as `numpy>=1.26`, or a `pip:` list")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Dependency::Conda(one_line("match spec", v)?))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut pip = Vec::new();
        let mut any = false;
        while let Some(key) = map.next_key::<ScalarText>()? {
            if key.0 != "pip" {
                return Err(de::Error::custom(format_args!(
                    "unsupported dependency section `{}` (only `pip:` lists are understood)",
                    key.0
                )));
            }
            any = true;
            if let Some(list) = map.next_value_seed(OptionalList(PipRequirement))? {
                pip.extend(list);
            }
        }
        if !any {
            return Err(de::Error::custom("empty mapping in `dependencies`"));
        }
        Ok(Dependency::Pip(pip))
    }
}

#[derive(Clone, Copy)]
struct PipRequirement;

impl<'de> DeserializeSeed<'de> for PipRequirement {
    type Value = String;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl Visitor<'_> for PipRequirement {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a pip requirement such as `requests==2.31.0`")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        one_line("pip requirement", v)
    }
}

/// `variables:`, kept in file order because they become `ENV` lines.
struct Variables(Vec<(String, String)>);

impl<'de> Deserialize<'de> for Variables {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(VariablesVisitor)
    }
}

struct VariablesVisitor;

impl<'de> Visitor<'de> for VariablesVisitor {
    type Value = Variables;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping of variable names to values")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut vars: Vec<(String, String)> = Vec::new();
        while let Some(ScalarText(name)) = map.next_key::<ScalarText>()? {
            if !is_env_name(&name) {
                return Err(de::Error::custom(format_args!(
                    "variable name `{}` is not a valid environment variable name \
                     (letters, digits and `_`, not starting with a digit)",
                    name.escape_default()
                )));
            }
            if vars.iter().any(|(n, _)| *n == name) {
                return Err(de::Error::custom(format_args!(
                    "duplicate variable `{name}`"
                )));
            }
            let value = map
                .next_value::<Option<ScalarText>>()?
                .map(|v| v.0)
                .unwrap_or_default();
            if value.contains(['\n', '\r']) {
                return Err(de::Error::custom(format_args!(
                    "variable `{name}` spans several lines, which a Dockerfile `ENV` cannot hold"
                )));
            }
            vars.push((name, value));
        }
        Ok(Variables(vars))
    }
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Environment {
        match parse(text, Path::new("environment.yaml")) {
            Ok(env) => env,
            Err(err) => panic!("expected {text:?} to parse, got: {err}"),
        }
    }

    fn parse_err(text: &str) -> (Option<usize>, String) {
        match parse(text, Path::new("environment.yaml")) {
            Ok(env) => panic!("expected {text:?} to fail, got {env:?}"),
            Err(DockerfileError::InvalidEnvironment { line, reason, .. }) => (line, reason),
            Err(other) => panic!("unexpected error kind for {text:?}: {other}"),
        }
    }

    #[test]
    fn valid_files() {
        struct Case {
            text: &'static str,
            name: Option<&'static str>,
            channels: &'static [&'static str],
            conda: &'static [&'static str],
            pip: &'static [&'static str],
        }
        let cases = [
            Case {
                text: "name: analysis\nchannels: [conda-forge, bioconda]\ndependencies:\n  - python=3.11\n  - samtools>=1.19\n",
                name: Some("analysis"),
                channels: &["conda-forge", "bioconda"],
                conda: &["python=3.11", "samtools>=1.19"],
                pip: &[],
            },
            Case {
                text: "dependencies:\n- numpy\n",
                name: None,
                channels: &[],
                conda: &["numpy"],
                pip: &[],
            },
            Case {
                // Comments, quoting, channel-qualified specs, spaces in specs.
                text: "# lab env\nname: 'rna'\nchannels:\n  - defaults # fallback\ndependencies:\n  - \"conda-forge::python=3.12\"\n  - numpy 1.26.*\n",
                name: Some("rna"),
                channels: &["defaults"],
                conda: &["conda-forge::python=3.12", "numpy 1.26.*"],
                pip: &[],
            },
            Case {
                // Keys present but empty count as absent.
                text: "name:\nchannels:\ndependencies:\n",
                name: None,
                channels: &[],
                conda: &[],
                pip: &[],
            },
            Case {
                text: "name: 2024\ndependencies: [python]\n",
                name: Some("2024"),
                channels: &[],
                conda: &["python"],
                pip: &[],
            },
        ];
        for case in cases {
            let env = parse_ok(case.text);
            assert_eq!(env.name.as_deref(), case.name, "{:?}", case.text);
            assert_eq!(env.channels, case.channels, "{:?}", case.text);
            assert_eq!(env.conda, case.conda, "{:?}", case.text);
            assert_eq!(env.pip, case.pip, "{:?}", case.text);
        }
    }

    #[test]
    fn pip_lists() {
        let cases: [(&str, &[&str], &[&str]); 4] = [
            (
                "dependencies:\n  - python=3.11\n  - pip\n  - pip:\n      - requests==2.31.0\n      - rich\n",
                &["python=3.11", "pip"],
                &["requests==2.31.0", "rich"],
            ),
            // Two pip blocks are concatenated in order.
            (
                "dependencies:\n  - pip:\n    - a\n  - python\n  - pip: [b, c]\n",
                &["python"],
                &["a", "b", "c"],
            ),
            // An empty pip block is allowed and adds nothing.
            ("dependencies:\n  - python\n  - pip:\n", &["python"], &[]),
            (
                "dependencies:\n  - pip:\n    - git+https://github.com/org/repo.git@v1#egg=repo\n",
                &[],
                &["git+https://github.com/org/repo.git@v1#egg=repo"],
            ),
        ];
        for (text, conda, pip) in cases {
            let env = parse_ok(text);
            assert_eq!(env.conda, conda, "{text:?}");
            assert_eq!(env.pip, pip, "{text:?}");
        }
    }

    #[test]
    fn variables_keep_file_order_and_scalar_text() {
        let env = parse_ok(
            "dependencies: [python]\nvariables:\n  ZED: last\n  ALPHA: 1\n  FLAG: true\n  EMPTY:\n  QUOTED: 'a \"b\" $c'\n",
        );
        let want = [
            ("ZED", "last"),
            ("ALPHA", "1"),
            ("FLAG", "true"),
            ("EMPTY", ""),
            ("QUOTED", "a \"b\" $c"),
        ];
        let got: Vec<(&str, &str)> = env
            .variables
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn syntax_errors_are_reported_as_such_with_line_and_column() {
        let cases: [(&str, usize); 3] = [
            ("name: x\ndependencies:\n  - numpy: [1.2\n  - scipy\n", 5),
            ("name: x\ndependencies: [numpy, scipy\n", 3),
            ("name: x\ndependencies:\n  - {numpy\n", 4),
        ];
        for (text, line) in cases {
            let err = parse(text, Path::new("environment.yaml")).unwrap_err();
            let DockerfileError::InvalidEnvironment {
                line: got,
                column,
                reason,
                ..
            } = &err
            else {
                panic!("{text:?}: {err}");
            };
            assert_eq!(*got, Some(line), "{text:?}: {err}");
            assert!(column.is_some(), "{text:?}: {err}");
            assert!(reason.starts_with("YAML syntax error: "), "{text:?}: {err}");
            assert!(!reason.contains("unsupported"), "{text:?}: {err}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_quickly() {
        let text = format!("dependencies: {}", "[".repeat(100_000));
        let start = std::time::Instant::now();
        let err = parse(&text, Path::new("environment.yaml")).unwrap_err();
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        assert!(
            err.to_string().contains("nested more than 64 levels deep"),
            "{err}"
        );
    }

    #[test]
    fn invalid_yaml_names_the_line() {
        let cases: [(&str, usize, &str); 3] = [
            // A tab where YAML wants spaces.
            (
                "name: x\ndependencies:\n\t- python\n",
                3,
                "cannot start any token",
            ),
            // A mapping value where a list item continues.
            (
                "name: x\ndependencies:\n  - python\n    numpy: 1\n",
                4,
                "mapping values are not allowed",
            ),
            // Bad indentation inside the list.
            ("name: x\ndependencies:\n  - python\n - numpy\n", 4, ""),
        ];
        for (text, line, needle) in cases {
            let (got_line, reason) = parse_err(text);
            assert_eq!(got_line, Some(line), "{text:?}: {reason}");
            assert!(reason.contains(needle), "{text:?}: {reason}");
        }
    }

    #[test]
    fn wrong_types_name_the_line() {
        let cases: [(&str, usize, &str); 9] = [
            ("- python\n- numpy\n", 1, "expected a mapping"),
            ("name: x\nchannels: conda-forge\n", 2, "expected a list"),
            (
                "name: x\ndependencies:\n  - python\n  - 3.11\n",
                4,
                "expected a match spec",
            ),
            (
                "name: x\ndependencies:\n  - python\n  - pip: requests\n",
                4,
                "expected a list",
            ),
            (
                "name: x\ndependencies:\n  - python\n  - pip:\n    - [nested]\n",
                5,
                "expected a pip requirement",
            ),
            (
                "name: x\ndependencies:\n  - conda: [numpy]\n",
                3,
                "only `pip:`",
            ),
            (
                "dependencies: [python]\nvariables:\n  - A=1\n",
                3,
                "mapping of variable names",
            ),
            (
                "dependencies: [python]\nvariables:\n  1BAD: x\n",
                3,
                "not a valid environment variable",
            ),
            (
                "dependencies: [python]\nvariables:\n  A: |\n    two\n    lines\n",
                3,
                "spans several lines",
            ),
        ];
        for (text, line, needle) in cases {
            let (got_line, reason) = parse_err(text);
            assert_eq!(got_line, Some(line), "{text:?}: {reason}");
            assert!(reason.contains(needle), "{text:?}: {reason}");
        }
    }

    #[test]
    fn duplicate_top_level_key_is_an_error() {
        let (line, reason) = parse_err("dependencies: [a]\nname: x\ndependencies: [b]\n");
        assert_eq!(line, Some(3), "{reason}");
        assert!(reason.contains("duplicate key `dependencies`"), "{reason}");
    }

    #[test]
    fn empty_file_is_an_error() {
        for text in ["", "\n\n", "# only a comment\n", "---\n"] {
            match parse(text, Path::new("env.yaml")) {
                Err(DockerfileError::EmptyEnvironment { .. }) => {}
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_keys_are_kept_with_their_line() {
        let env = parse_ok(
            "name: x\nprefix: /home/me/envs/x\ndependencies: [python]\ndependncies: [numpy]\nlabels:\n  a: b\n",
        );
        assert_eq!(
            env.ignored_keys,
            [
                ("prefix".to_string(), Some(2)),
                ("dependncies".to_string(), Some(4)),
                ("labels".to_string(), Some(5)),
            ]
        );
        assert_eq!(env.conda, ["python"]);
    }

    #[test]
    fn safe_names() {
        let cases = [
            ("analysis", "analysis"),
            ("my_env", "my_env"),
            ("rna-seq.v2", "rna-seq.v2"),
            ("a__b", "a__b"),
            ("a---b", "a---b"),
            ("MyEnv", "myenv"),
            ("my env", "my-env"),
            ("../../etc", "etc"),
            ("a/b", "a-b"),
            ("a._b", "a-b"),
            ("-lead-and-trail-", "lead-and-trail"),
            ("ünïcode", "n-code"),
            ("", "absconda"),
            ("!!!", "absconda"),
        ];
        for (input, want) in cases {
            assert_eq!(safe_name(input), want, "safe_name({input:?})");
        }
    }

    #[test]
    fn package_names_and_implicit_pip() {
        let cases = [
            ("numpy", "numpy"),
            ("numpy>=1.26", "numpy"),
            ("conda-forge::Python=3.11", "python"),
            ("r-base 4.3.*", "r-base"),
            ("pip[version='>=23']", "pip"),
        ];
        for (spec, want) in cases {
            assert_eq!(package_name(spec), want, "{spec:?}");
        }
        let adds = |text: &str| parse_ok(text).adds_pip();
        assert!(adds("dependencies:\n  - python\n  - pip:\n    - rich\n"));
        assert!(!adds(
            "dependencies:\n  - python\n  - pip>=23\n  - pip:\n    - rich\n"
        ));
        assert!(!adds("dependencies:\n  - python\n  - pip\n"));
        assert!(!adds("dependencies:\n  - python\n"));
    }

    #[test]
    fn effective_channels_default_to_conda_forge() {
        assert_eq!(
            parse_ok("dependencies: [a]\n").effective_channels(),
            ["conda-forge"]
        );
        assert_eq!(
            parse_ok("channels: [bioconda]\ndependencies: [a]\n").effective_channels(),
            ["bioconda"]
        );
    }
}
