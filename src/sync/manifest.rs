//! The manifest: every entry of a context as the builder's copy must hold
//! it (path, type, mode, size, mtime, symlink target, SHA-256), and the two
//! fingerprints the builder can compute of its copy with nothing but sh and
//! coreutils.
//!
//! The builder never receives the manifest itself (that would cost as much
//! as a small context on every build). Instead the client predicts, from
//! the manifest, the exact text the builder's `find … -exec stat -c …`
//! prints for its copy, sorted the way `LC_ALL=C sort` sorts it, and sends
//! only the SHA-256 of that text: the *listing hash*. It covers names,
//! types, permission bits, file sizes and file mtimes, and symlink target
//! lengths, which is what every `tar` restores the same way (directory and
//! symlink mtimes are left out: busybox tar does not restore them). The
//! full check (`--verify`) adds the hash of every file's `sha256sum`, in an
//! order the client chooses, and of every symlink's `readlink`.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The permission bits a copy on the builder keeps: the sync clears setuid
/// and setgid bits there, so the prediction of its listing leaves them out.
pub const COPIED_MODE_BITS: u32 = 0o1777;

/// What an entry is, with what the builder must reproduce of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Kind {
    File {
        size: u64,
        /// Whole seconds, as the tar header carries them (never negative).
        mtime: u64,
        #[serde(with = "hex32")]
        sha256: [u8; 32],
    },
    Dir,
    Symlink {
        /// The target's bytes, hex-encoded in the cache file.
        #[serde(with = "hex_bytes")]
        target: Vec<u8>,
    },
}

/// One entry of the context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Relative to the context, `/`-separated, valid UTF-8 (the walk
    /// refuses anything else).
    pub path: String,
    /// Permission bits including setuid/setgid/sticky; ignored for symlinks.
    pub mode: u32,
    #[serde(flatten)]
    pub kind: Kind,
}

impl ManifestEntry {
    pub fn same_type(&self, other: &ManifestEntry) -> bool {
        std::mem::discriminant(&self.kind) == std::mem::discriminant(&other.kind)
    }
}

/// All entries of a context, sorted by the bytes of their path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub entries: Vec<ManifestEntry>,
}

impl Manifest {
    /// Sorts the entries; the caller guarantees unique paths.
    pub fn new(mut entries: Vec<ManifestEntry>) -> Manifest {
        entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        Manifest { entries }
    }

    /// Identifies this exact manifest (the builder's state file records it).
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"absconda-manifest-v1\0");
        for e in &self.entries {
            h.update(e.path.as_bytes());
            h.update([0]);
            h.update(e.mode.to_le_bytes());
            match &e.kind {
                Kind::File {
                    size,
                    mtime,
                    sha256,
                } => {
                    h.update(b"f");
                    h.update(size.to_le_bytes());
                    h.update(mtime.to_le_bytes());
                    h.update(sha256);
                }
                Kind::Dir => h.update(b"d"),
                Kind::Symlink { target } => {
                    h.update(b"l");
                    h.update((target.len() as u64).to_le_bytes());
                    h.update(target);
                }
            }
        }
        hex::encode(h.finalize())
    }

    /// The lines the builder's listing prints for this manifest, sorted as
    /// `LC_ALL=C sort` sorts them (a name with a newline spans two lines,
    /// which sort apart: the prediction splits them the same way).
    pub fn listing_lines(&self) -> Vec<String> {
        let mut lines = Vec::with_capacity(self.entries.len());
        let mut record = String::new();
        for e in &self.entries {
            record.clear();
            // Must match `LISTING` in the sync script, field for field.
            let _ = match &e.kind {
                Kind::Dir => writeln!(record, "d {:o} ./{}", e.mode & COPIED_MODE_BITS, e.path),
                Kind::File { size, mtime, .. } => writeln!(
                    record,
                    "f {:o} {size} {mtime} ./{}",
                    e.mode & COPIED_MODE_BITS,
                    e.path
                ),
                Kind::Symlink { target } => writeln!(record, "l {} ./{}", target.len(), e.path),
            };
            lines.extend(record.split_terminator('\n').map(str::to_string));
        }
        lines.sort_unstable();
        lines
    }

    /// SHA-256 (hex) of the builder's sorted listing for this manifest.
    pub fn listing_hash(&self) -> String {
        let mut h = Sha256::new();
        for line in self.listing_lines() {
            h.update(line.as_bytes());
            h.update(b"\n");
        }
        hex::encode(h.finalize())
    }

    /// What `--verify` asks the builder to hash, and the expected results.
    pub fn verify_plan(&self) -> VerifyPlan {
        let mut plan = VerifyPlan::default();
        let mut weird = Vec::new();
        let mut files = Sha256::new();
        let mut weird_hashes = Vec::new();
        let mut links = Sha256::new();
        for e in &self.entries {
            match &e.kind {
                Kind::File { sha256, .. } => {
                    // GNU sha256sum escapes names with `\`, newline or CR
                    // (and busybox does not): those are hashed through
                    // stdin so that no name appears in the output.
                    if e.path.contains(['\\', '\n', '\r']) {
                        weird.push(e.path.clone());
                        weird_hashes.push(*sha256);
                    } else {
                        plan.files.push(e.path.clone());
                        files.update(hex::encode(sha256));
                        files.update(b"\n");
                    }
                }
                Kind::Symlink { target } => {
                    plan.links.push(e.path.clone());
                    links.update(target);
                    links.update(b"\n");
                }
                Kind::Dir => {}
            }
        }
        for sha in weird_hashes {
            files.update(hex::encode(sha));
            files.update(b"\n");
        }
        plan.odd_files = weird;
        plan.files_hash = hex::encode(files.finalize());
        plan.links_hash = hex::encode(links.finalize());
        plan
    }

    pub fn files(&self) -> impl Iterator<Item = &ManifestEntry> {
        self.entries
            .iter()
            .filter(|e| matches!(e.kind, Kind::File { .. }))
    }
}

/// The lists and expected hashes of a full verification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyPlan {
    /// Files hashed with `sha256sum NAME…`, in this order.
    pub files: Vec<String>,
    /// Files hashed with `sha256sum < NAME`, after `files`.
    pub odd_files: Vec<String>,
    pub links: Vec<String>,
    /// SHA-256 of the files' hex digests, one per line, in order.
    pub files_hash: String,
    /// SHA-256 of the symlinks' targets, one per line, in order.
    pub links_hash: String,
}

/// Encodes a list of paths as one line the sync script can read with
/// `read -r` and turn into a NUL-separated list with
/// `tr '\376\377' '\n\000'`: a newline inside a name becomes 0xFE and each
/// name ends with 0xFF. Neither byte occurs in UTF-8, so this is lossless.
pub fn encode_line<'a>(items: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        out.extend(item.bytes().map(|b| if b == b'\n' { 0xFE } else { b }));
        out.push(0xFF);
    }
    out.push(b'\n');
    out
}

pub(super) mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).map_err(D::Error::custom)?;
        Ok(out)
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, mode: u32, size: u64, mtime: u64, byte: u8) -> ManifestEntry {
        ManifestEntry {
            path: path.into(),
            mode,
            kind: Kind::File {
                size,
                mtime,
                sha256: [byte; 32],
            },
        }
    }

    #[test]
    fn listing_lines_match_stat_output_sorted_bytewise() {
        let m = Manifest::new(vec![
            file("b", 0o644, 3, 10, 1),
            ManifestEntry {
                path: "a dir".into(),
                mode: 0o755,
                kind: Kind::Dir,
            },
            file("a dir/x\ny", 0o4755, 0, 0, 2),
            ManifestEntry {
                path: "link".into(),
                mode: 0o777,
                kind: Kind::Symlink {
                    target: b"../t".to_vec(),
                },
            },
        ]);
        assert_eq!(
            m.listing_lines(),
            [
                "d 755 ./a dir",
                "f 644 3 10 ./b",
                // The builder clears setuid and setgid bits.
                "f 755 0 0 ./a dir/x",
                "l 4 ./link",
                "y"
            ]
        );
    }

    #[test]
    fn manifest_hash_sees_every_field() {
        let base = Manifest::new(vec![file("a", 0o644, 1, 2, 3)]);
        let variants = [
            Manifest::new(vec![file("b", 0o644, 1, 2, 3)]),
            Manifest::new(vec![file("a", 0o755, 1, 2, 3)]),
            Manifest::new(vec![file("a", 0o644, 9, 2, 3)]),
            Manifest::new(vec![file("a", 0o644, 1, 9, 3)]),
            Manifest::new(vec![file("a", 0o644, 1, 2, 9)]),
            Manifest::default(),
        ];
        for v in variants {
            assert_ne!(base.hash(), v.hash(), "{v:?}");
        }
        assert_eq!(
            base.hash(),
            Manifest::new(vec![file("a", 0o644, 1, 2, 3)]).hash()
        );
    }

    #[test]
    fn odd_names_are_verified_through_stdin() {
        let m = Manifest::new(vec![
            file("plain", 0o644, 1, 1, 1),
            file("back\\slash", 0o644, 1, 1, 2),
            file("new\nline", 0o644, 1, 1, 3),
        ]);
        let plan = m.verify_plan();
        assert_eq!(plan.files, ["plain"]);
        assert_eq!(plan.odd_files, ["back\\slash", "new\nline"]);
    }

    #[test]
    fn encoded_lines_have_no_newline_inside() {
        let line = encode_line(["a b", "c\nd", "-x"]);
        assert_eq!(line, b"a b\xFFc\xFEd\xFF-x\xFF\n");
        assert_eq!(encode_line([]), b"\n");
    }

    #[test]
    fn cache_round_trip() {
        let m = Manifest::new(vec![
            file("a", 0o644, 1, 2, 3),
            ManifestEntry {
                path: "l".into(),
                mode: 0o777,
                kind: Kind::Symlink {
                    target: vec![0xff, b'x'],
                },
            },
        ]);
        let json = serde_json::to_string(&m).unwrap();
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
    }
}
