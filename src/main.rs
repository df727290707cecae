//! The `portcullis` binary: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use portcullis::cli::{Cli, run};

/// mimalloc instead of the system allocator: the request path allocates many
/// small, short-lived objects across Tokio's worker threads, which glibc's
/// malloc serves with lock and consolidation overhead (`cargo bench --bench
/// load` measures the difference; `docs/performance.md` has the figures).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve`'s configuration says how to log and where spans go.
    let config = cli.served_config();
    let telemetry = config.as_ref().map(|c| &c.telemetry);
    let traces = match portcullis::telemetry::init(cli.log_format(config.as_ref()), telemetry) {
        Ok(traces) => traces,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let code = match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    };
    // The spans still queued are sent before exiting, whatever happened.
    let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
    code
}
