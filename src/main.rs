//! The `absconda` binary: parse, set up logging, run, map the error to an exit code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = absconda::cli::Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "absconda=debug,info",
        _ => "absconda=trace,russh=debug,debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(
            std::env::var_os("NO_COLOR").is_none()
                && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        )
        .with_target(false)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::from(absconda::exit::FAILURE);
        }
    };
    match runtime.block_on(absconda::commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            absconda::exit::report(&err);
            ExitCode::from(absconda::exit::code(&err))
        }
    }
}
