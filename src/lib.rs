//! absconda builds container images on remote builders.
//!
//! # Layout
//! - `cloud/`: the VMs builders run on (GCE, EC2, plain SSH hosts)
//! - `ssh/`: the native SSH client: host keys, authentication, channels
//! - `shell`: quoting every remote argument for POSIX sh
pub mod cloud;
pub mod config;
pub mod registry;
pub mod remote;
pub mod shell;
pub mod ssh;
