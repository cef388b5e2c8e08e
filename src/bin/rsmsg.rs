//! The `rsmsg` command line. Each subcommand lives in its own module under `src/bin/rsmsg/`.

use clap::{Parser, Subcommand};

// Crate-root modules resolve relative to src/bin/, so each subcommand names its file.
#[path = "rsmsg/info.rs"]
mod info;
#[path = "rsmsg/manager.rs"]
mod manager;
#[path = "rsmsg/perf.rs"]
mod perf;

/// rsmsg: messaging over RDMA verbs and shared memory.
#[derive(Debug, Parser)]
#[command(name = "rsmsg", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List RDMA devices, ports and GID tables.
    Info(info::Args),
    /// Measure latency, bandwidth and message rate (default: two processes of this host over
    /// shared memory).
    Perf(perf::Args),
    /// Run the standalone bootstrap manager.
    Manager(manager::Args),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info(args) => info::run(&args),
        Command::Perf(args) => perf::run(&args),
        Command::Manager(args) => manager::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rsmsg: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
