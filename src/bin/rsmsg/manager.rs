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
}

/// Runs the manager until it is killed.
pub fn run(args: &Args) -> Result<std::process::ExitCode> {
    let config = ManagerConfig::from_cli(
        &args.listen,
        args.token.as_deref(),
        args.token_file.as_deref(),
    )
    .context("manager configuration")?;
    tracing::info!(listen = %args.listen, "starting the bootstrap manager");
    run_manager(config).context("bootstrap manager")?;
    Ok(std::process::ExitCode::SUCCESS)
}
