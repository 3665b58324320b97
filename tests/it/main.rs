//! Integration tests: the real `absconda` binary against real OpenSSH sshd,
//! dockerd and a password-protected registry on loopback.

mod support;

mod auth;
mod azure;
mod build;
mod cloud;
mod config;
mod ec2;
mod firsthour;
mod gce;
mod generate;
mod hostkeys;
mod hostkeys_cloud;
mod lease;
mod lifecycle;
mod retry;
mod safety;
mod sync;
