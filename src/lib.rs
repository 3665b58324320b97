//! absconda builds container images on remote builders.
//!
//! A user types `absconda build --remote-builder NAME …`; absconda starts the
//! builder VM if it is stopped, streams the build context over its own SSH
//! client, runs `docker build` and `docker push` there with the output
//! streamed back, and stops the VM when nobody needs it. Nothing but this
//! binary is needed on the user's machine.
//!
//! # Layout
//! - `cli`: clap types only; `commands/`: one file per subcommand
//! - `config`: `absconda-remote.yaml` → validated [`config::Builder`] settings
//! - `ssh/`: the native SSH client: transports (proxies, jump hosts), host
//!   keys, authentication, channels, `~/.ssh/config`
//! - `builder_ssh`: `~/.ssh/config` applied to a builder's settings
//! - `remote`: the POSIX sh programs run on the builder (lease, upload, probe)
//! - `dockerfile/`: conda `environment.yaml` (or requirements, or a conda-pack
//!   archive) → Dockerfile, plus the files its build context needs
//! - `context/`: walking the context with `.dockerignore`, tar streaming, hashing
//! - `sync/`: the incremental context sync: a persistent copy per context on
//!   the builder, manifests, the local hash cache, and the sh that applies deltas
//! - `build`: the build pipeline, orchestration only; `cache`: `--cache-from/-to`
//! - `named_contexts`: `--build-context`, each folder synced like the main context
//! - `outputs`: files a build writes here (`--iidfile`, `--metadata-file`)
//! - `pool`: several builders behind one name: choice, queue, failover;
//!   `platform`: `os/arch[/variant]`, what a builder builds natively
//! - `registry`: registry credentials from the user's side; `registry_api`:
//!   the registry HTTP API v2 from the client (manifests, the multi-platform
//!   index, Basic and Bearer auth); `commands/multiplatform`: one build per
//!   platform on a pool, then the index
//! - `service/`: build services as builders (CodeBuild with S3 and CloudWatch
//!   Logs, Cloud Build with Cloud Storage): upload, build, log, cancel
//! - `cloud/`: the VMs builders run on (GCE, EC2, Azure), OS Login and EC2
//!   Instance Connect
//! - `access`: how the user's key comes to be trusted by a cloud builder
//!   (OS Login, metadata keys)
//! - `secrets`: `--secret` values, read here and kept on a tmpfs there
//! - `lifecycle`: starting, stopping and reaching a cloud builder's VM
//! - `terraform`: running Terraform for `remote provision` / `remote destroy`
//! - `provisioned`: where a provisioned builder is (from the state) and
//!   waiting until it is ready
//! - `health`: the checks of `remote health`; `metrics`: `remote metrics`
//! - `state`: what absconda knows about each builder between runs
//! - `report`: progress reporting from library to CLI
//! - `shell`: quoting every remote argument for POSIX sh
//! - `exit`: exit codes and error rendering; `hints`: the next step for the
//!   errors a newcomer meets
//! - `util`: small helpers every layer may use (byte counts, error chains)
//! - `yaml`: the nesting limit applied to YAML files before parsing
pub mod access;
pub mod build;
pub mod builder_ssh;
pub mod cache;
pub mod cli;
pub mod cloud;
pub mod commands;
pub mod config;
pub mod context;
pub mod dockerfile;
pub mod exit;
pub mod health;
pub mod hints;
pub mod lifecycle;
pub mod metrics;
pub mod named_contexts;
pub mod outputs;
pub mod platform;
pub mod pool;
pub mod provisioned;
pub mod registry;
pub mod registry_api;
pub mod remote;
pub mod report;
pub mod secrets;
pub mod service;
pub mod shell;
pub mod ssh;
pub mod state;
pub mod sync;
pub mod terraform;
#[cfg(test)]
mod test_support;
pub mod util;
pub mod yaml;
