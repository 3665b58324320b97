//! `absconda completions SHELL` and `absconda man`: generated from the clap
//! definitions, so they never drift from the real flags.

use std::io::Write;

use anyhow::Context;
use clap::CommandFactory;

use crate::cli::Cli;

pub const COMPLETIONS_EXAMPLES: &str = "\
Examples:
  # bash: now, and in every new shell
  source <(absconda completions bash)
  absconda completions bash > ~/.local/share/bash-completion/completions/absconda

  # zsh: into a folder of your $fpath
  absconda completions zsh > ~/.zfunc/_absconda

  # fish
  absconda completions fish > ~/.config/fish/completions/absconda.fish

  # PowerShell: add to $PROFILE
  absconda completions powershell | Out-String | Invoke-Expression";

pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "absconda", &mut out);
    write_stdout(&out)
}

pub fn man() -> anyhow::Result<()> {
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut out)
        .context("could not render the manual page")?;
    write_stdout(&out)
}

fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut o = std::io::stdout().lock();
    o.write_all(bytes)
        .and_then(|()| o.flush())
        .context("could not write to stdout")
}
