//! Progress reporting from the library to whoever draws it.
//!
//! The pipeline never prints: it tells a [`Reporter`] what happens, and only
//! the CLI decides whether that becomes a progress bar, plain lines or
//! nothing (tests use [`Silent`] or a recording reporter).

use std::time::Duration;

/// The phases of a build, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Asking the cloud for the VM and starting it.
    Start,
    /// Waiting until the VM answers SSH and docker.
    Ready,
    Connect,
    Lease,
    Upload,
    Build,
    Push,
    Cleanup,
    Stop,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Start => "start",
            Phase::Ready => "ready",
            Phase::Connect => "connect",
            Phase::Lease => "lease",
            Phase::Upload => "upload",
            Phase::Build => "build",
            Phase::Push => "push",
            Phase::Cleanup => "cleanup",
            Phase::Stop => "stop",
        }
    }
}

/// Receives progress from the pipeline. All methods have no-op defaults.
pub trait Reporter: Send + Sync {
    /// A phase begins.
    fn phase(&self, _phase: Phase) {}
    /// A phase ended after `took`.
    fn phase_done(&self, _phase: Phase, _took: Duration) {}
    /// A status message for the user (goes to stderr).
    fn info(&self, _message: &str) {}
    /// Upload progress: bytes sent so far.
    fn upload_progress(&self, _sent: u64) {}
    /// Upload progress in file content: `done` of the `total` bytes the
    /// upload plans to send, before compression.
    fn upload_content(&self, _done: u64, _total: u64) {}
    /// Download progress of `--output`: `received` bytes so far, of
    /// `total` when it is known.
    fn download_progress(&self, _received: u64, _total: Option<u64>) {}
    /// The `--output` download ended (in any way) after `took`.
    fn download_done(&self, _received: u64, _took: Duration) {}
    /// Live output of a remote command; `stderr` tells which stream.
    fn output(&self, _stderr: bool, _data: &[u8]) {}
}

/// Reports nothing.
pub struct Silent;

impl Reporter for Silent {}
