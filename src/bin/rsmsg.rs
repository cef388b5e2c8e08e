//! The `rsmsg` command line. Each subcommand lives in its own module under `src/bin/rsmsg/`.

use clap::{Parser, Subcommand};

// Crate-root modules resolve relative to src/bin/, so each subcommand names its file.
#[path = "rsmsg/info.rs"]
mod info;

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
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info(args) => info::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rsmsg: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
