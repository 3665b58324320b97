//! The builder's apply step against a hostile client and a tampered copy,
//! through real OpenSSH sshd: whatever the request, the tar stream or the
//! old copy holds (symlinked folders, `..`, absolute names, a name that
//! became a symlink), nothing outside `<workspace>/contexts/<key>/tree`
//! is written, changed or deleted. Checked on the builder's disk (the
//! builder is this machine).

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use absconda::build::ssh_target;
use absconda::ssh::Session;
use absconda::sync::script::{Request, TarMode, command, fingerprint_command};

use crate::support::absconda::Project;
use crate::support::sshd::{SSHD, Sshd};

const KEY: &str = "k";

/// Everything under `root` with type, mode, mtime and content.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    fn visit(dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            let md = path.symlink_metadata().unwrap();
            let what = if md.file_type().is_symlink() {
                format!("link {:?}", std::fs::read_link(&path).unwrap())
            } else if md.is_dir() {
                visit(&path, out);
                format!("dir {:o}", md.mode())
            } else {
                format!(
                    "file {:o} {}.{} {:?}",
                    md.mode(),
                    md.mtime(),
                    md.mtime_nsec(),
                    std::fs::read(&path).unwrap()
                )
            };
            out.insert(path, what);
        }
    }
    let mut out = BTreeMap::new();
    visit(root, &mut out);
    out
}

/// One tar member with a raw name, as a hostile client could send it.
enum Member<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
    Link(&'a str, &'a str),
}

fn raw_tar(members: &[Member]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in members {
        let mut h = tar::Header::new_ustar();
        let (name, data): (&str, &[u8]) = match m {
            Member::File(n, d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                (n, d)
            }
            Member::Dir(n) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                (n, b"")
            }
            Member::Link(n, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                let lb = t.as_bytes();
                h.as_old_mut().linkname[..lb.len()].copy_from_slice(lb);
                (n, b"")
            }
        };
        let nb = name.as_bytes();
        h.as_old_mut().name[..nb.len()].copy_from_slice(nb);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

struct Attack {
    project: Project,
    session: Session,
    outside: PathBuf,
    tree: PathBuf,
}

impl Attack {
    async fn new(sshd: &Sshd) -> Attack {
        let project = Project::new(sshd);
        let file = absconda::config::load(Some(&project.config)).unwrap();
        let builder = file.builder("local").unwrap();
        let target = ssh_target(&builder, builder.host.as_deref().unwrap());
        let session = Session::connect(&target).await.unwrap();
        // A folder outside the workspace the attacks aim at.
        let outside = project.dir.path().join("outside");
        std::fs::create_dir_all(outside.join("sub")).unwrap();
        std::fs::write(outside.join("victim.txt"), "original\n").unwrap();
        std::fs::write(outside.join("sub/keep.txt"), "keep\n").unwrap();
        let tree = project.workspace.join("contexts").join(KEY).join("tree");
        Attack {
            project,
            session,
            outside,
            tree,
        }
    }

    fn ws(&self) -> String {
        self.project.workspace.display().to_string()
    }

    /// A copy someone changed on the builder (or an earlier context left),
    /// with its state file claiming it clean and matching its listing, so
    /// that the builder accepts a delta onto it.
    async fn plant(&self, entries: &[(&str, Option<&Path>)]) {
        let _ = std::fs::remove_dir_all(&self.tree);
        std::fs::create_dir_all(&self.tree).unwrap();
        for (name, target) in entries {
            let p = self.tree.join(name);
            match target {
                Some(t) => symlink(t, &p).unwrap(),
                None => std::fs::create_dir_all(&p).unwrap(),
            }
        }
        let out = self
            .session
            .output("fingerprint", &fingerprint_command(&self.ws(), KEY), b"")
            .await
            .unwrap();
        assert!(out.status.success(), "{}", out.stderr_tail());
        let listing = hex::encode(Sha256::digest(&out.stdout));
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
        std::fs::write(
            self.tree.parent().unwrap().join("state"),
            format!("v1 clean base {listing} {}\n", boot.trim()),
        )
        .unwrap();
    }

    /// Sends one crafted request (a delta onto the planted copy, or a
    /// full send) with `tar` after it; returns what the builder printed.
    async fn send(
        &self,
        delta: bool,
        delete: &[&str],
        chmod: &[(u32, &str)],
        tar: &[u8],
    ) -> String {
        let delete: Vec<String> = delete.iter().map(|s| s.to_string()).collect();
        let chmod: Vec<(u32, String)> = chmod.iter().map(|(m, p)| (*m, p.to_string())).collect();
        let mut input = Request {
            base: delta.then_some("base"),
            new_manifest: "new",
            tar: if tar.is_empty() {
                TarMode::None
            } else {
                TarMode::Plain
            },
            expected_listing: "x",
            delete: &delete,
            chmod: &chmod,
            verify: None,
            stream: None,
        }
        .encode();
        input.extend_from_slice(tar);
        let out = self
            .session
            .output("sync", &command(&self.ws(), KEY, "", None), &input)
            .await
            .unwrap();
        format!(
            "{}{}",
            out.stdout_str(),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

/// A delta onto a copy holding symlinks to outside folders and files: files
/// sent beneath them, deletions through them, permission changes on them,
/// and `..` or absolute deletions, all leave the outside untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_never_reaches_through_symlinks_in_the_copy() {
    crate::require!(SSHD);
    let sshd = Sshd::start(None);
    let a = Attack::new(&sshd).await;
    let before = snapshot(&a.outside);
    let victim = a.outside.join("victim.txt");
    let planted: [(&str, Option<&Path>); 4] = [
        (".absconda", Some(&a.outside)),
        ("sub", Some(&a.outside.join("sub"))),
        ("file-link", Some(&victim)),
        ("real", None),
    ];

    // Files sent beneath a symlinked folder (the extra-input attack).
    a.plant(&planted).await;
    let said = a
        .send(
            true,
            &[],
            &[],
            &raw_tar(&[
                Member::File(".absconda/victim.txt", b"pwned\n"),
                Member::File("sub/new.txt", b"pwned\n"),
                Member::File("real/ok.txt", b"fine\n"),
            ]),
        )
        .await;
    assert_eq!(snapshot(&a.outside), before, "{}", applied(&said));

    // Deletions through a symlinked folder, of `..` and absolute names.
    let abs = victim.display().to_string();
    for del in [
        ".absconda/victim.txt",
        "sub/keep.txt",
        "../../../outside/victim.txt",
        &abs,
    ] {
        a.plant(&planted).await;
        let said = a.send(true, &[del], &[], b"").await;
        assert_eq!(
            snapshot(&a.outside),
            before,
            "deleting {del:?}: {}",
            applied(&said)
        );
    }

    // Permission changes on a symlink and through a symlinked folder.
    for target in ["file-link", ".absconda/victim.txt", "sub"] {
        a.plant(&planted).await;
        let said = a.send(true, &[], &[(0o4777, target)], b"").await;
        assert_eq!(
            snapshot(&a.outside),
            before,
            "chmod {target:?}: {}",
            applied(&said)
        );
    }

    // A folder in the copy that became a symlink since the last build: a
    // delta sending the folder's entries replaces the link, never follows it.
    a.plant(&[("real", Some(&a.outside))]).await;
    let said = a
        .send(
            true,
            &[],
            &[],
            &raw_tar(&[
                Member::Dir("real"),
                Member::File("real/victim.txt", b"pwned\n"),
            ]),
        )
        .await;
    assert_eq!(snapshot(&a.outside), before, "{}", applied(&said));
    assert_eq!(
        std::fs::read(a.tree.join("real/victim.txt")).unwrap(),
        b"pwned\n",
        "the entry lands in the copy: {said}"
    );
    assert!(!a.tree.join("real").symlink_metadata().unwrap().is_symlink());
}

/// A full send whose stream names `..`, absolute paths, or a file beneath a
/// symlink it just created writes nothing outside the copy, and a copy
/// folder or state file replaced by a symlink is not written through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_stream_or_planted_links_never_write_outside() {
    crate::require!(SSHD);
    let sshd = Sshd::start(None);
    let a = Attack::new(&sshd).await;
    let before = snapshot(&a.outside);
    let out = a.outside.display().to_string();
    let abs_victim = format!("{out}/victim.txt");
    let said = a
        .send(
            false,
            &[],
            &[],
            &raw_tar(&[
                Member::Link("esc", &out),
                Member::File("esc/victim.txt", b"pwned\n"),
                Member::Link("rel", "../../../outside"),
                Member::File("rel/sub/keep.txt", b"pwned\n"),
                Member::File("../../../outside/victim.txt", b"pwned\n"),
                Member::File(&abs_victim, b"pwned\n"),
            ]),
        )
        .await;
    assert_eq!(snapshot(&a.outside), before, "{said}");

    // The copy itself, and the files beside it, replaced by symlinks.
    a.plant(&[]).await;
    let dir = a.tree.parent().unwrap().to_path_buf();
    std::fs::remove_dir_all(&a.tree).unwrap();
    symlink(&a.outside, &a.tree).unwrap();
    symlink(a.outside.join("victim.txt"), dir.join("state.tmp")).unwrap();
    symlink(a.outside.join("sub"), dir.join("stage")).unwrap();
    let said = a
        .send(
            true,
            &["victim.txt"],
            &[],
            &raw_tar(&[Member::File("victim.txt", b"pwned\n")]),
        )
        .await;
    assert_eq!(snapshot(&a.outside), before, "{said}");
    let said = a
        .send(
            false,
            &[],
            &[],
            &raw_tar(&[Member::File("victim.txt", b"in the copy\n")]),
        )
        .await;
    assert_eq!(snapshot(&a.outside), before, "{said}");
    assert_eq!(
        std::fs::read(a.tree.join("victim.txt")).unwrap(),
        b"in the copy\n"
    );
}

/// The planted copy was accepted as clean: the attack reached the apply step.
fn applied(said: &str) -> &str {
    assert!(!said.contains("result stale"), "{said}");
    said
}

/// No other local user can read the copy or reach a file in it (a setuid
/// one included), even when the workspace itself is open to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_local_users_cannot_reach_the_copy() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    crate::require!(SSHD);
    let sshd = Sshd::start(None);
    let a = Attack::new(&sshd).await;
    std::fs::set_permissions(a.project.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(&a.project.workspace).unwrap();
    std::fs::set_permissions(&a.project.workspace, std::fs::Permissions::from_mode(0o775)).unwrap();
    let said = a
        .send(
            false,
            &[],
            &[],
            &raw_tar(&[Member::File("secret.txt", b"secret\n")]),
        )
        .await;
    let secret = a.tree.join("secret.txt");
    assert_eq!(std::fs::read(&secret).unwrap(), b"secret\n", "{said}");
    // `nobody` stands for any other local user.
    for (prog, arg) in [("cat", &secret), ("ls", &a.tree)] {
        let out = std::process::Command::new(prog)
            .arg(arg)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        assert!(
            !out.status.success() && out.stdout.is_empty(),
            "`{prog}` as nobody reached the copy: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
