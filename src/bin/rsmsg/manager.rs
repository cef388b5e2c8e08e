//! `rsmsg manager`: the standalone bootstrap manager.

use std::path::PathBuf;

use anyhow::{Context, Result};
use rsmsg::bootstrap::{DEFAULT_PORT, ManagerConfig, run as run_manager};

/// Arguments of `rsmsg manager`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value_t = format!("127.0.0.1:{DEFAULT_PORT}"))]
    listen: String,
    /// The shared secret (8-1024 bytes). Prefer --token-file or RSMSG_TOKEN: a command line is
    /// visible to other users of the host.
    #[arg(long)]
    token: Option<String>,
    /// A file holding the shared secret.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Most clients served at once (default 256). Every listener holds one for as long as it
    /// is registered, and a connect one while it sets up: a job of N ranks needs about 2N.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_clients: Option<u32>,
    /// Most registered endpoints (default 4096): one per listener.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1048576))]
    max_endpoints: Option<u32>,
}

/// Runs the manager until it is killed.
pub fn run(args: &Args) -> Result<std::process::ExitCode> {
    let config = ManagerConfig::from_cli(
        &args.listen,
        args.token.as_deref(),
        args.token_file.as_deref(),
    )
    .context("manager configuration")?;
    let mut config = config;
    if let Some(n) = args.max_clients {
        config.limits.max_clients = n as usize;
    }
    if let Some(n) = args.max_endpoints {
        config.limits.max_endpoints = n as usize;
    }
    tracing::info!(
        listen = %args.listen,
        max_clients = config.limits.max_clients,
        max_endpoints = config.limits.max_endpoints,
        "starting the bootstrap manager"
    );
    run_manager(config).context("bootstrap manager")?;
    Ok(std::process::ExitCode::SUCCESS)
}
