//! Quoting for POSIX `sh`.
//!
//! Every command absconda runs on a builder is one string that the remote
//! user's login shell parses (that is how SSH `exec` works). Joining words with
//! spaces, as the Python original did, lets a tag like `v1; rm -rf ~` run code.
//! Here every argument is single-quoted, so the remote shell sees exactly the
//! bytes the user gave, whatever they contain.

/// Quotes one argument so that `sh` reads it back byte for byte.
///
/// Arguments made only of safe characters are left bare to keep logs
/// readable; anything else is wrapped in single quotes, with each embedded
/// `'` written as `'\''`.
pub fn quote(arg: &str) -> String {
    let bytes = arg.as_bytes();
    let safe = !bytes.is_empty()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(b));
    if safe {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('\'');
    for (i, part) in arg.split('\'').enumerate() {
        if i > 0 {
            out.push_str("'\\''");
        }
        out.push_str(part);
    }
    out.push('\'');
    out
}

/// Builds a command line from separately quoted words.
pub fn join<I, S>(words: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    words
        .into_iter()
        .map(|w| quote(w.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn quoting_table() {
        let cases = [
            ("plain", "plain"),
            ("", "''"),
            ("a b", "'a b'"),
            ("it's", "'it'\\''s'"),
            ("$(id)", "'$(id)'"),
            ("a;b", "'a;b'"),
            ("line\nbreak", "'line\nbreak'"),
            ("''", "''\\'''\\'''"),
            ("127.0.0.1:5000/team/app:v1", "127.0.0.1:5000/team/app:v1"),
        ];
        for (input, want) in cases {
            assert_eq!(quote(input), want, "quote({input:?})");
        }
    }

    /// The real test: `sh` must hand every argument back unchanged.
    #[test]
    fn sh_reads_arguments_back_byte_exact() {
        let hostile = [
            "simple",
            "with space",
            "single'quote",
            "double\"quote",
            "$(touch /tmp/absconda-pwned)",
            "`id`",
            "a;b&&c||d|e",
            "new\nline",
            "tab\there",
            "glob*?[x]",
            "~user",
            "back\\slash",
            "ünïcödé",
            "",
            "-n",
        ];
        let script = format!("for a in {}; do printf '%s\\0' \"$a\"; done", join(hostile));
        let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        assert!(out.status.success());
        let got: Vec<&[u8]> = out.stdout.split(|b| *b == 0).collect();
        let want: Vec<&[u8]> = hostile
            .iter()
            .map(|s| s.as_bytes())
            .chain([&b""[..]])
            .collect();
        assert_eq!(got, want);
        assert!(!std::path::Path::new("/tmp/absconda-pwned").exists());
    }
}
