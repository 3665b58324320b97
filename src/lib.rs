//! absconda builds container images on remote builders.
//!
//! # Layout
//! - `cloud/`: the VMs builders run on (GCE, EC2, plain SSH hosts)
pub mod cloud;
