//! Image platforms (`os/arch[/variant]`), as `--platform`, the `platform:`
//! key and the builder's docker write them.
//!
//! Docker reports its architecture with Go's names (`amd64`, `arm64`), and
//! so do image indexes; the kernel's names (`x86_64`, `aarch64`) are
//! accepted and mapped to them so a builder's `uname -m` can be pasted.

use std::fmt;

/// One platform, normalised.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch[/variant]`; the message says what is wrong.
    pub fn parse(text: &str) -> Result<Platform, String> {
        let t = text.trim();
        let parts: Vec<&str> = t.split('/').collect();
        let ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(|p| ok(p)) {
            return Err(format!(
                "`{t}` is not a platform: write `os/arch` or `os/arch/variant` in lowercase, e.g. `linux/amd64` or `linux/arm/v7`"
            ));
        }
        let arch = match parts[1] {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            a => a,
        };
        Ok(Platform {
            os: parts[0].to_string(),
            arch: arch.to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }

    /// Parses a comma-separated `--platform` value, without duplicates.
    pub fn parse_list(text: &str) -> Result<Vec<Platform>, String> {
        let mut out: Vec<Platform> = Vec::new();
        for part in text.split(',').filter(|p| !p.trim().is_empty()) {
            let p = Platform::parse(part)?;
            if !out.contains(&p) {
                out.push(p);
            }
        }
        if out.is_empty() {
            return Err("`--platform` names no platform".into());
        }
        Ok(out)
    }

    /// Whether a builder of platform `self` builds `wanted` natively: same
    /// os and architecture, and the same variant when both name one.
    pub fn serves(&self, wanted: &Platform) -> bool {
        self.os == wanted.os
            && self.arch == wanted.arch
            && match (&self.variant, &wanted.variant) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    /// `linux-arm64`, `linux-arm-v7`: for tags.
    pub fn tag_suffix(&self) -> String {
        self.to_string().replace('/', "-")
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl serde::Serialize for Platform {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_table() {
        let cases = [
            ("linux/amd64", Some("linux/amd64")),
            ("linux/x86_64", Some("linux/amd64")),
            ("linux/aarch64", Some("linux/arm64")),
            (" linux/arm/v7 ", Some("linux/arm/v7")),
            ("linux", None),
            ("linux/", None),
            ("Linux/amd64", None),
            ("linux/arm/v7/x", None),
            ("linux/am d64", None),
        ];
        for (text, want) in cases {
            let got = Platform::parse(text).map(|p| p.to_string()).ok();
            assert_eq!(got.as_deref(), want, "{text}");
        }
        let list = Platform::parse_list("linux/amd64,linux/arm64,linux/amd64").unwrap();
        assert_eq!(list.len(), 2);
        assert!(Platform::parse_list(",").is_err());
    }

    #[test]
    fn variants_match_when_both_are_given() {
        let p = |s| Platform::parse(s).unwrap();
        assert!(p("linux/arm64").serves(&p("linux/arm64/v8")));
        assert!(p("linux/arm/v7").serves(&p("linux/arm")));
        assert!(!p("linux/arm/v6").serves(&p("linux/arm/v7")));
        assert!(!p("linux/amd64").serves(&p("linux/arm64")));
        assert_eq!(p("linux/arm/v7").tag_suffix(), "linux-arm-v7");
    }
}
