//! The `portcullis` binary: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use portcullis::cli::{Cli, run};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    portcullis::telemetry::init_logging(cli.log_format);
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
