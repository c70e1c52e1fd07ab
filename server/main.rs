//! The `provision` binary: parse arguments, set up logging, hand over to `cli::run`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = provision::cli::Cli::parse();
    provision::cli::init_logging(cli.log_format);
    provision::cli::run(cli)
}
