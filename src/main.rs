//! The `contact-bulk` binary: the command line (`cli`), over the service library
//! (`serve`, `token`), the operator commands, and the test kit (`dev`, `bench`).

mod cli;

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    cli::main(cli::Cli::parse()).await
}
