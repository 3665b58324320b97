//! What turns the builder's copy of one manifest into the next: paths to
//! delete, permission bits to change, and entries to send.
//!
//! Anything whose content, type, size, mtime or symlink target changed is
//! deleted first and sent again, never written over: a file that became a
//! folder (or the reverse) cannot be extracted over the old one, and tar
//! then never needs to replace anything. Only the topmost of nested
//! deletions is listed, since `rm -rf` takes the rest. A change of
//! permission bits alone is a `chmod`, not a resend.

use std::collections::HashSet;

use super::manifest::{COPIED_MODE_BITS, Kind, Manifest, ManifestEntry};

/// The changes from one manifest to another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Paths to remove before extracting, topmost only, sorted.
    pub delete: Vec<String>,
    /// Permission bits to set after extracting, as (mode, path).
    pub chmod: Vec<(u32, String)>,
    /// Indices into the new manifest of the entries to send, in order.
    pub send: Vec<usize>,
}

impl Plan {
    /// Everything, into an empty copy.
    pub fn full(new: &Manifest) -> Plan {
        Plan {
            send: (0..new.entries.len()).collect(),
            ..Plan::default()
        }
    }

    /// The changes from `old` to `new` (both sorted by path).
    pub fn delta(old: &Manifest, new: &Manifest) -> Plan {
        let mut plan = Plan::default();
        let mut deleted: HashSet<&str> = HashSet::new();
        let (mut i, mut j) = (0, 0);
        while i < old.entries.len() || j < new.entries.len() {
            let o = old.entries.get(i);
            let n = new.entries.get(j);
            match (o, n) {
                (Some(o), Some(n)) if o.path == n.path => {
                    match change(o, n) {
                        Change::None => {}
                        Change::Mode => {
                            plan.chmod.push((n.mode & COPIED_MODE_BITS, n.path.clone()))
                        }
                        Change::Replace => {
                            delete(&o.path, &mut deleted, &mut plan);
                            plan.send.push(j);
                        }
                    }
                    i += 1;
                    j += 1;
                }
                (Some(o), Some(n)) if o.path < n.path => {
                    delete(&o.path, &mut deleted, &mut plan);
                    i += 1;
                }
                (Some(o), None) => {
                    delete(&o.path, &mut deleted, &mut plan);
                    i += 1;
                }
                (_, Some(_)) => {
                    plan.send.push(j);
                    j += 1;
                }
                (None, None) => break,
            }
        }
        plan
    }

    /// Nothing to delete, chmod or send.
    pub fn is_empty(&self) -> bool {
        self.delete.is_empty() && self.chmod.is_empty() && self.send.is_empty()
    }
}

fn delete<'a>(path: &'a str, deleted: &mut HashSet<&'a str>, plan: &mut Plan) {
    let covered = path
        .match_indices('/')
        .any(|(i, _)| deleted.contains(&path[..i]));
    if !covered {
        plan.delete.push(path.to_string());
    }
    // Remembered either way: its descendants are covered too.
    deleted.insert(path);
}

enum Change {
    None,
    Mode,
    Replace,
}

fn change(old: &ManifestEntry, new: &ManifestEntry) -> Change {
    if !old.same_type(new) {
        return Change::Replace;
    }
    let mode_differs = old.mode & COPIED_MODE_BITS != new.mode & COPIED_MODE_BITS;
    match (&old.kind, &new.kind) {
        (Kind::File { .. }, Kind::File { .. }) if old.kind != new.kind => Change::Replace,
        (Kind::Symlink { target: a }, Kind::Symlink { target: b }) => {
            // Symlink permissions mean nothing on Linux and are not compared.
            if a == b {
                Change::None
            } else {
                Change::Replace
            }
        }
        _ if mode_differs => Change::Mode,
        _ => Change::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(path: &str, mode: u32, content: u8) -> ManifestEntry {
        ManifestEntry {
            path: path.into(),
            mode,
            kind: Kind::File {
                size: 1,
                mtime: 1,
                sha256: [content; 32],
            },
        }
    }

    fn d(path: &str, mode: u32) -> ManifestEntry {
        ManifestEntry {
            path: path.into(),
            mode,
            kind: Kind::Dir,
        }
    }

    fn l(path: &str, target: &str) -> ManifestEntry {
        ManifestEntry {
            path: path.into(),
            mode: 0o777,
            kind: Kind::Symlink {
                target: target.as_bytes().to_vec(),
            },
        }
    }

    fn sent<'a>(plan: &Plan, new: &'a Manifest) -> Vec<&'a str> {
        plan.send
            .iter()
            .map(|i| new.entries[*i].path.as_str())
            .collect()
    }

    #[test]
    fn plans_table() {
        struct Case {
            what: &'static str,
            old: Vec<ManifestEntry>,
            new: Vec<ManifestEntry>,
            delete: &'static [&'static str],
            chmod: &'static [(u32, &'static str)],
            send: &'static [&'static str],
        }
        let cases = [
            Case {
                what: "no change",
                old: vec![d("a", 0o755), f("a/x", 0o644, 1), l("s", "a")],
                new: vec![d("a", 0o755), f("a/x", 0o644, 1), l("s", "a")],
                delete: &[],
                chmod: &[],
                send: &[],
            },
            Case {
                what: "edit, create, delete",
                old: vec![f("a", 0o644, 1), f("b", 0o644, 1)],
                new: vec![f("a", 0o644, 2), f("c", 0o644, 1)],
                delete: &["a", "b"],
                chmod: &[],
                send: &["a", "c"],
            },
            Case {
                what: "chmod only",
                old: vec![d("d", 0o755), f("d/x", 0o644, 1)],
                new: vec![d("d", 0o700), f("d/x", 0o755, 1)],
                delete: &[],
                chmod: &[(0o700, "d"), (0o755, "d/x")],
                send: &[],
            },
            Case {
                what: "file becomes a folder",
                old: vec![f("a", 0o644, 1)],
                new: vec![d("a", 0o755), f("a/x", 0o644, 1)],
                delete: &["a"],
                chmod: &[],
                send: &["a", "a/x"],
            },
            Case {
                what: "folder becomes a symlink: children go with it",
                old: vec![
                    d("a", 0o755),
                    d("a/b", 0o755),
                    f("a/b/x", 0o644, 1),
                    f("a c", 0o644, 1),
                ],
                new: vec![l("a", "elsewhere"), f("a c", 0o644, 1)],
                delete: &["a"],
                chmod: &[],
                send: &["a"],
            },
            Case {
                what: "symlink retargeted; its mode is ignored",
                old: vec![l("s", "x")],
                new: vec![ManifestEntry {
                    mode: 0o755,
                    ..l("s", "y")
                }],
                delete: &["s"],
                chmod: &[],
                send: &["s"],
            },
            Case {
                what: "rename a folder",
                old: vec![d("old", 0o755), f("old/x", 0o644, 1)],
                new: vec![d("new", 0o755), f("new/x", 0o644, 1)],
                delete: &["old"],
                chmod: &[],
                send: &["new", "new/x"],
            },
            Case {
                what: "sibling with a space sorts between parent and child",
                old: vec![d("a", 0o755), f("a b", 0o644, 1), f("a/x", 0o644, 1)],
                new: vec![f("a b", 0o644, 1)],
                delete: &["a"],
                chmod: &[],
                send: &[],
            },
        ];
        for c in cases {
            let old = Manifest::new(c.old);
            let new = Manifest::new(c.new);
            let plan = Plan::delta(&old, &new);
            assert_eq!(plan.delete, c.delete, "{}", c.what);
            let chmod: Vec<(u32, &str)> =
                plan.chmod.iter().map(|(m, p)| (*m, p.as_str())).collect();
            assert_eq!(chmod, c.chmod, "{}", c.what);
            assert_eq!(sent(&plan, &new), c.send, "{}", c.what);
            assert_eq!(plan.is_empty(), c.what == "no change");
        }
    }

    #[test]
    fn full_sends_everything() {
        let new = Manifest::new(vec![d("a", 0o755), f("a/x", 0o644, 1)]);
        assert_eq!(sent(&Plan::full(&new), &new), ["a", "a/x"]);
    }
}
