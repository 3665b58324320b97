//! Integration tests: the real `absconda` binary against real OpenSSH sshd,
//! dockerd and a password-protected registry on loopback.

mod support;

mod build;
mod ec2;
mod gce;
mod hostkeys;
mod lease;
mod safety;
mod sync;
