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
pub mod cloudbuild_fake;
pub mod codebuild_gate;
pub mod counting_proxy;
pub mod delay_proxy;
pub mod docker;
pub mod eice_fake;
pub mod faulty_proxy;
pub mod gce_fake;
pub mod iap_fake;
pub mod imds_fake;
pub mod instance_connect_tap;
pub mod moto;
pub mod netns;
pub mod oslogin_fake;
pub mod sigv4;
pub mod sshd;
pub mod token_registry;
pub mod tunnel_proxy;
pub mod ws_server;

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

/// How long one test may run before the watchdog fails the whole run.
pub const TEST_DEADLINE: Duration = Duration::from_secs(280);

/// Puts the calling test under the watchdog (idempotent; the harness's
/// entry points call it). libtest names each test's thread after the test,
/// so a test that hangs is reported by name: after [`TEST_DEADLINE`] the
/// watchdog prints it and ends the test process, which takes the daemons
/// started through [`spawn_daemon`] with it.
pub fn watch() {
    use std::collections::HashMap;
    static RUNNING: OnceLock<Mutex<HashMap<u64, (String, Instant)>>> = OnceLock::new();
    struct Registered(u64);
    impl Drop for Registered {
        fn drop(&mut self) {
            if let Some(Ok(mut m)) = RUNNING.get().map(Mutex::lock) {
                m.remove(&self.0);
            }
        }
    }
    thread_local! {
        static ME: std::cell::OnceCell<Registered> = const { std::cell::OnceCell::new() };
    }
    let Some(name) = std::thread::current().name().map(str::to_string) else {
        return;
    };
    if name == "main" || name.starts_with("tokio-") {
        return;
    }
    let running = RUNNING.get_or_init(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_secs(2));
            let hung: Vec<(String, Duration)> = RUNNING
                .get()
                .and_then(|m| m.lock().ok())
                .map(|m| {
                    m.values()
                        .filter(|(_, t)| t.elapsed() > TEST_DEADLINE)
                        .map(|(n, t)| (n.clone(), t.elapsed()))
                        .collect()
                })
                .unwrap_or_default();
            if !hung.is_empty() {
                for (n, t) in &hung {
                    eprintln!("\nHUNG: test `{n}` still running after {t:?} (deadline {TEST_DEADLINE:?})");
                    println!("test {n} ... FAILED (hung for {t:?})");
                }
                std::process::exit(101);
            }
        });
        Mutex::new(HashMap::new())
    });
    ME.with(|me| {
        me.get_or_init(|| {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Ok(mut m) = running.lock() {
                m.insert(id, (name, Instant::now()));
            }
            Registered(id)
        });
    });
}

/// Whether `program` exists; in CI a missing program is a failure.
pub fn require(program: &str) -> bool {
    watch();
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
    watch();
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
    watch();
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
    watch();
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base).unwrap();
    tempfile::Builder::new()
        .prefix("it-")
        .tempdir_in(base)
        .unwrap()
}
