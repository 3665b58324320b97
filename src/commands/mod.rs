//! One file per subcommand; each turns parsed arguments into library calls.

pub mod build;
pub mod completions;
pub mod generate;
pub mod health;
pub mod human;
pub mod init;
pub mod metrics;
pub mod multiplatform;
pub mod printer;
pub mod provision;
pub mod remote;

use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, Command, RemoteCommand};

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    printer::set_quiet(cli.quiet);
    match cli.command {
        Command::Build(args) => build::run(*args, interrupt_token()).await,
        Command::Generate(args) => generate::run(&args),
        Command::Remote(RemoteCommand::List(args)) => remote::list(args).await,
        Command::Remote(RemoteCommand::Status(args)) => remote::status(args).await,
        Command::Remote(RemoteCommand::Prune(args)) => remote::prune(args).await,
        Command::Remote(RemoteCommand::Start(args)) => remote::start(args).await,
        Command::Remote(RemoteCommand::Stop(args)) => remote::stop(args).await,
        Command::Remote(RemoteCommand::Provision(args)) => provision::provision(args).await,
        Command::Remote(RemoteCommand::Destroy(args)) => provision::destroy(args).await,
        Command::Remote(RemoteCommand::Health(args)) => health::run(args).await,
        Command::Remote(RemoteCommand::Metrics(args)) => metrics::run(args),
        Command::Completions { shell } => completions::completions(shell),
        Command::Man => completions::man(),
        Command::Init(args) => init::init(*args).await,
        Command::Remote(RemoteCommand::Add(args)) => init::add(*args).await,
    }
}

/// A token cancelled by the first Ctrl-C (or SIGTERM, as CI systems send
/// when a job is cancelled); a second Ctrl-C exits at once.
fn interrupt_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        let interrupted = tokio::select! {
            r = tokio::signal::ctrl_c() => r.is_ok(),
            _ = term => true,
        };
        if interrupted {
            eprintln!(
                "absconda: interrupted; stopping the remote build and cleaning up (Ctrl-C again to quit at once)"
            );
            t.cancel();
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(i32::from(crate::exit::INTERRUPTED));
            }
        }
    });
    token
}
