//! Command-line types (clap), and nothing else.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};

const BUILD_EXAMPLES: &str = "\
Examples:
  # Build and push through the builder `local` of ./absconda-remote.yaml
  absconda build --remote-builder local --context . --repository 127.0.0.1:5000/team/app \\
      --tag v1 --tag latest --push

  # Start the GCE builder if needed, build, push, and stop it right after
  absconda build --remote-builder gcp-builder --repository ghcr.io/lab/app --tag 2026-11 --push --remote-off

  # Build from a conda environment file (the Dockerfile is generated)
  absconda build --file environment.yaml --repository ghcr.io/lab/analysis --remote-builder gcp-builder --push";

const GENERATE_EXAMPLES: &str = "\
Examples:
  absconda generate --file environment.yaml                 # the Dockerfile on stdout
  absconda generate --file environment.yaml --output Dockerfile
  absconda generate --requirements requirements.txt --reproducible";

const REMOTE_EXAMPLES: &str = "\
Examples:
  absconda remote list
  absconda remote status gcp-builder --json
  absconda remote start gcp-builder
  absconda remote stop gcp-builder";

#[derive(Debug, Parser)]
#[command(
    name = "absconda",
    version,
    about = "Build container images on remote builders (SSH hosts, GCE and EC2 VMs) from one static binary",
    long_about = "Build container images on remote builders.\n\nabsconda starts the builder VM if it is stopped, streams the build context to it over SSH, runs `docker build` and `docker push` there with the output streamed back live, and stops the VM again when nobody needs it. It needs no other program on this machine: no ssh, rsync, gcloud, aws or docker."
)]
pub struct Cli {
    /// More output on stderr (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Print only errors and, after a build, the image names (on stdout).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build (and push) an image on a remote builder.
    #[command(after_help = BUILD_EXAMPLES)]
    Build(Box<BuildArgs>),
    /// Write the Dockerfile for a conda environment, requirements file or conda-pack archive.
    #[command(after_help = GENERATE_EXAMPLES)]
    Generate(crate::commands::generate::GenerateArgs),
    /// Manage remote builders.
    #[command(subcommand, after_help = REMOTE_EXAMPLES)]
    Remote(RemoteCommand),
    /// Print a shell completion script (bash, zsh, fish, powershell, elvish).
    #[command(after_help = crate::commands::completions::COMPLETIONS_EXAMPLES)]
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Write a commented absconda-remote.yaml with one builder and check it.
    #[command(after_help = crate::commands::init::INIT_EXAMPLES)]
    Init(Box<crate::commands::init::InitArgs>),
    /// Print the manual page (roff) on stdout.
    #[command(after_help = "Example:\n  absconda man > ~/.local/share/man/man1/absconda.1")]
    Man,
}

#[derive(Debug, Clone, Args)]
pub struct ConfigArg {
    /// The builders file (default: $ABSCONDA_REMOTE_CONFIG, then absconda-remote.yaml in this folder or a parent, then $XDG_CONFIG_HOME/absconda/).
    #[arg(long, value_name = "PATH")]
    pub remote_config: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The builder to use, as named in the builders file (default: its
    /// `default_builder:`, or its only builder).
    #[arg(long, value_name = "NAME", env = "ABSCONDA_REMOTE_BUILDER")]
    pub remote_builder: Option<String>,
    /// Seconds to wait while another build holds the builder.
    #[arg(long, value_name = "SECS", default_value_t = 900)]
    pub remote_wait: u64,
    /// Stop the builder VM right after the build (unless other builds wait for it).
    #[arg(long)]
    pub remote_off: bool,
    /// The build context folder (default: `.`; with --file, --requirements or
    /// --tarball: only the generated files).
    #[arg(long, value_name = "DIR")]
    pub context: Option<PathBuf>,
    /// The Dockerfile (default: Dockerfile in the context).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["file", "requirements", "tarball"])]
    pub dockerfile: Option<PathBuf>,
    /// Build from a conda environment file (the Dockerfile is generated).
    #[arg(short = 'f', long, value_name = "PATH", conflicts_with_all = ["requirements", "tarball"])]
    pub file: Option<PathBuf>,
    /// Build a plain pip image from a requirements file.
    #[arg(short = 'r', long, value_name = "PATH", conflicts_with = "tarball")]
    pub requirements: Option<PathBuf>,
    /// Build from a conda-pack archive.
    #[arg(long, value_name = "PATH")]
    pub tarball: Option<PathBuf>,
    #[command(flatten)]
    pub generate: crate::commands::generate::DockerfileArgs,
    /// Image repository, e.g. `ghcr.io/lab/app` or `127.0.0.1:5000/team/app`.
    #[arg(long, value_name = "REPO")]
    pub repository: String,
    /// Tag (repeatable). Default: `latest`, or today's date (YYYYMMDD) with --file.
    #[arg(short = 't', long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Build-time variable `KEY=VALUE` (repeatable).
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// Build stage to stop at.
    #[arg(long)]
    pub target: Option<String>,
    /// Target platform, e.g. `linux/amd64`.
    #[arg(long)]
    pub platform: Option<String>,
    /// Networking mode for `RUN` steps (`host`, `none`, …).
    #[arg(long)]
    pub network: Option<String>,
    /// Do not use the builder's cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Always pull newer base images.
    #[arg(long)]
    pub pull: bool,
    /// Push every tag after the build.
    #[arg(long)]
    pub push: bool,
    /// Print the build report as JSON on stdout (build output then goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Retry up to N times after transient failures (connection lost, builder
    /// stopped or preempted under the build); a failing Dockerfile step is never retried.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub retries: u32,
    /// Send the whole context instead of only what changed since the last
    /// build on this builder (which keeps a copy of each context).
    #[arg(long)]
    pub no_incremental: bool,
    /// Check the builder's copy of the context fully before building: hash
    /// every file there again (by default only names, types, modes, sizes
    /// and mtimes are compared).
    #[arg(long, conflicts_with = "no_incremental")]
    pub verify: bool,
    /// A build secret for `RUN --mount=type=secret` (repeatable):
    /// `id=NAME,src=FILE`, `id=NAME,env=VAR`, or `id=NAME` for the
    /// variable NAME. Needs BuildKit; kept only on a tmpfs of the builder
    /// during the build.
    #[arg(long = "secret", value_name = "id=NAME[,src=FILE|,env=VAR]")]
    pub secrets: Vec<String>,
    /// Custom host-to-IP mapping for `RUN` steps, `HOST:IP` (repeatable).
    #[arg(long = "add-host", value_name = "HOST:IP")]
    pub add_hosts: Vec<String>,
    /// Size of `/dev/shm` in `RUN` steps, e.g. `2g`.
    #[arg(long, value_name = "SIZE")]
    pub shm_size: Option<String>,
    /// Ulimit for `RUN` steps, e.g. `nofile=1024:2048` (repeatable).
    #[arg(long = "ulimit", value_name = "NAME=SOFT[:HARD]")]
    pub ulimits: Vec<String>,
    /// Build output: `auto`, `plain` and `tty` stream BuildKit's plain
    /// progress (the builder has no terminal), `quiet` only errors and the image id.
    #[arg(long, value_name = "MODE", value_parser = ["auto", "plain", "tty", "quiet"])]
    pub progress: Option<String>,
    /// Stream the result back to this machine: `type=local,dest=DIR`
    /// (or just `DIR`), `type=tar,dest=FILE`, `type=oci|docker,dest=FILE`.
    #[arg(short = 'o', long, value_name = "type=local|tar,dest=PATH")]
    pub output: Option<String>,
    /// Read the layer cache from a registry (repeatable):
    /// `type=registry,ref=IMAGE` or an image reference.
    #[arg(long, value_name = "type=registry,ref=IMAGE")]
    pub cache_from: Vec<String>,
    /// Export the layer cache (repeatable): `type=inline` (in the pushed
    /// image) or, where the builder has buildx, `type=registry,ref=IMAGE,mode=max`.
    #[arg(long, value_name = "type=inline|type=registry,ref=IMAGE")]
    pub cache_to: Vec<String>,
    /// A named context for `FROM NAME` / `COPY --from=NAME` (repeatable):
    /// `NAME=DIR` (synced like the context, with its own `.dockerignore`),
    /// `NAME=docker-image://IMAGE` or `NAME=https://URL`. Needs buildx on
    /// the builder.
    #[arg(
        long = "build-context",
        value_name = "NAME=DIR|docker-image://…|https://…"
    )]
    pub build_contexts: Vec<String>,
    /// Forward an SSH agent to `RUN --mount=type=ssh` steps (repeatable):
    /// `default` (the agent at SSH_AUTH_SOCK), `ID`, `ID=SOCKET`, or
    /// `ID=KEYFILE[,KEYFILE…]` (keys loaded and served by absconda; none
    /// is ever written on the builder).
    #[arg(long = "ssh", value_name = "default|ID[=SOCKET|KEYFILE[,KEYFILE…]]")]
    pub ssh: Vec<String>,
    /// Write the image id (`sha256:…`) to FILE.
    #[arg(long, value_name = "FILE")]
    pub iidfile: Option<PathBuf>,
    /// Write docker's build metadata JSON (`containerimage.digest`,
    /// `image.name`, …) to FILE.
    #[arg(long, value_name = "FILE")]
    pub metadata_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum RemoteCommand {
    /// List the configured builders and their state.
    List(ListArgs),
    /// Show one builder's state: reachable, docker version, BuildKit, disk, lease.
    Status(NameArgs),
    /// Remove context copies and stored content no build needs: those unused
    /// for `cache_ttl` (every copy not in use with --all), then down to `cache_max`.
    Prune(PruneArgs),
    /// Start a builder VM and wait until it can build.
    Start(NameArgs),
    /// Stop a builder VM.
    Stop(NameArgs),
    /// Create the builder's machine with Terraform and wait until it can build.
    Provision(ProvisionArgs),
    /// Destroy a provisioned builder with Terraform (its disk and build cache too).
    Destroy(DestroyArgs),
    /// Check a builder: SSH with a trusted host key, docker, free disk, registry reachability.
    Health(HealthArgs),
    /// Build statistics from the state file: success rate, phase durations, VM time, cost.
    Metrics(MetricsArgs),
    /// Add a builder to the existing builders file, keeping its comments.
    Add(Box<crate::commands::init::AddArgs>),
}

#[derive(Debug, Clone, Args)]
pub struct ProvisionArgs {
    /// The builder, as named in the builders file.
    pub name: String,
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(Debug, Clone, Args)]
pub struct DestroyArgs {
    /// The builder, as named in the builders file.
    pub name: String,
    #[command(flatten)]
    pub config: ConfigArg,
    /// Do not ask for confirmation (needed when stdin is not a terminal).
    #[arg(long)]
    pub yes: bool,
}

#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    /// The builder, as named in the builders file.
    pub name: String,
    #[command(flatten)]
    pub config: ConfigArg,
    /// Also check that the builder can connect to this registry (`HOST:PORT`).
    #[arg(long, value_name = "HOST:PORT")]
    pub registry: Option<String>,
    /// JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct MetricsArgs {
    /// One builder (default: every builder with recorded builds).
    pub name: Option<String>,
    #[command(flatten)]
    pub config: ConfigArg,
    /// JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct PruneArgs {
    /// The builder, as named in the builders file.
    pub name: String,
    /// Every context copy no build is using, whatever its age.
    #[arg(long)]
    pub all: bool,
    /// List what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub config: ConfigArg,
    /// JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct NameArgs {
    /// The builder, as named in the builders file.
    pub name: String,
    #[command(flatten)]
    pub config: ConfigArg,
    /// JSON on stdout.
    #[arg(long)]
    pub json: bool,
}
