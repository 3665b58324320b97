//! One file per subcommand: each turns its parsed flags into calls to the
//! library and decides what the user sees, so `main.rs` stays a dispatcher.

pub mod generate;
