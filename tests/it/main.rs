//! Integration tests: the real `absconda` binary against real OpenSSH sshd,
//! dockerd and a password-protected registry on loopback.

mod support;

mod auth;
mod build;
mod cache;
mod cloud;
mod config;
mod digests;
mod ec2;
mod gce;
mod generate;
mod hostkeys;
mod hostkeys_cloud;
mod lease;
mod lifecycle;
mod outputs;
mod parity;
mod retry;
mod safety;
mod secrets;
mod ssh_forward;
mod sync;
