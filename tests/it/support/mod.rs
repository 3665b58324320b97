//! Test harnesses that start real programs on loopback: OpenSSH's sshd,
//! dockerd and a password-protected docker registry.
//!
//! Daemons are started from one long-lived spawner thread with
//! `PR_SET_PDEATHSIG`, so they die with the test process even when a test
//! panics. A missing program fails the test in CI (`CI=true`) and skips it
//! elsewhere, with a message saying so.

#![allow(dead_code)]

pub mod absconda;
pub mod azure_fake;
pub mod docker;
pub mod faulty_proxy;
pub mod gce_fake;
pub mod moto;
pub mod sshd;

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skips the calling test outside CI, fails it in CI.
pub fn skip_or_fail(what: &str) {
    if in_ci() {
        panic!("{what} (CI=true: integration prerequisites must be available)");
    }
    eprintln!("SKIPPED: {what}; set CI=true to make this a failure");
}

/// Whether `program` exists; in CI a missing program is a failure.
pub fn require(program: &str) -> bool {
    let found = if program.contains('/') {
        Path::new(program).exists()
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(program).exists()))
            .unwrap_or(false)
    };
    if !found {
        if in_ci() {
            panic!("`{program}` is required by this test and CI=true: install it (see .ci/run)");
        }
        eprintln!("SKIPPED: `{program}` is not installed (this would fail in CI)");
    }
    found
}

/// Returns early from a test when a program is missing (outside CI).
#[macro_export]
macro_rules! require {
    ($($p:expr),+) => {
        if !($($crate::support::require($p))&&+) {
            return;
        }
    };
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on loopback")
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns a daemon that dies with the test process.
pub fn spawn_daemon(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::spawn(move || {
            // PDEATHSIG fires when the *thread* that forked exits: this one
            // lives as long as the process.
            for (mut cmd, reply) in rx {
                // SAFETY: prctl is async-signal-safe and only affects the child.
                unsafe {
                    cmd.pre_exec(|| {
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                        Ok(())
                    });
                }
                let _ = reply.send(cmd.spawn());
            }
        });
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock().unwrap().send((cmd, reply_tx)).unwrap();
    reply_rx.recv().unwrap()
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} did not happen within {timeout:?}");
}

/// A scratch folder under the target dir, removed on drop.
pub fn tempdir() -> tempfile::TempDir {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base).unwrap();
    tempfile::Builder::new()
        .prefix("it-")
        .tempdir_in(base)
        .unwrap()
}
