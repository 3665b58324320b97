//! absconda builds container images on remote builders.
//!
//! # Layout
//! - `cloud/`: the VMs builders run on (GCE, EC2, plain SSH hosts)
//! - `context/`: the build context: `.dockerignore`, the walk, the tar stream, hashing
pub mod cloud;
pub mod context;
