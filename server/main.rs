//! The `provision` binary: parse arguments, set up logging, hand over to `cli::run`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = provision::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PROVISION_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    provision::cli::run(cli)
}
