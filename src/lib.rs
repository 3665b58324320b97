//! absconda builds container images on remote builders.
//!
//! # Layout
//! - `cloud/`: the VMs builders run on (GCE, EC2, plain SSH hosts)
//! - `dockerfile/`: conda `environment.yaml` (or requirements, or a
//!   conda-pack archive) → Dockerfile, plus the files its build context needs
//! - `commands/`: one file per subcommand
pub mod cloud;
pub mod commands;
pub mod dockerfile;
