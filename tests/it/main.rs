//! Integration tests: the real `absconda` binary against real OpenSSH sshd,
//! dockerd and a password-protected registry on loopback.

mod support;

mod access;
mod auth;
mod azure;
mod build;
mod cache;
mod client_guards;
mod cloud;
mod config;
mod digests;
mod dockerignore;
mod ec2;
mod escape;
mod firsthour;
mod gce;
mod generate;
mod hostkeys;
mod hostkeys_cloud;
mod init;
mod lease;
mod lifecycle;
mod named_contexts;
mod outputs;
mod parity;
mod pools;
mod retry;
mod safety;
mod secrets;
mod services;
mod ssh_forward;
mod sshnet;
mod supervisor;
mod sync;
mod tls;
mod tunnels;
