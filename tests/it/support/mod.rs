//! Harnesses for the integration tests: real programs on loopback.
//!
//! - [`moto`]: moto's EC2 server with IAM signature checks switched on,
//!   installed in a cached Python venv on first use;
//! - [`faulty_proxy`]: an HTTP proxy that breaks requests on a script
//!   (503 bursts, 429 with `Retry-After`, resets, a permanent 500).
//!
//! A harness whose program cannot be had fails the test when `CI=true` and
//! skips it, saying so, anywhere else.

// Each test file uses a different part of the harnesses.
#![allow(dead_code)]

pub mod faulty_proxy;
pub mod moto;

/// Whether the tests run in CI, where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Skips the calling test outside CI, fails it in CI.
pub fn skip_or_fail(what: &str) {
    if in_ci() {
        panic!("{what} (CI=true: integration prerequisites must be available)");
    }
    eprintln!("SKIPPED: {what}; set CI=true to make this a failure");
}
