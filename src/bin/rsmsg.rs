//! The `rsmsg` command line. Each subcommand lives in its own module under `src/bin/rsmsg/`.
//!
//! Logging goes through `tracing` to stderr. The filter comes from `--log FILTER`, else from
//! `$RSMSG_LOG`, else `warn`; FILTER uses the `EnvFilter` syntax (`info`, `rsmsg::bootstrap=debug`).

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// `println!` that returns the `io::Result` rather than panicking when stdout is closed (output
/// piped into `head`): the command then stops, and `main` exits quietly.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)
    }};
}

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
    /// Log filter (EnvFilter syntax, e.g. `info` or `rsmsg::bootstrap=debug`); logs go to stderr.
    /// Default: $RSMSG_LOG, else `warn`.
    #[arg(long, global = true, value_name = "FILTER")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List RDMA devices, ports and GID tables, and which transports are usable here.
    Info(info::Args),
    /// Measure latency, bandwidth and message rate (default: two processes of this host over
    /// shared memory).
    Perf(perf::Args),
    /// Run the standalone bootstrap manager.
    Manager(manager::Args),
}

/// The log filter: `--log`, else `$RSMSG_LOG`, else `warn`. A malformed filter is an error.
fn log_filter(cli: Option<&str>) -> Result<EnvFilter, String> {
    let (spec, from) = match cli {
        Some(s) => (s.to_string(), "--log"),
        None => match std::env::var("RSMSG_LOG") {
            Ok(s) if !s.trim().is_empty() => (s, "RSMSG_LOG"),
            _ => ("warn".to_string(), "default"),
        },
    };
    EnvFilter::builder()
        .parse(&spec)
        .map_err(|e| format!("bad log filter {spec:?} ({from}): {e}"))
}

/// Writes `rsmsg: error: MSG` on stderr, ignoring a closed stderr (where `eprintln!` panics).
fn report(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "rsmsg: error: {msg}");
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = match log_filter(cli.log.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            report(&e);
            return std::process::ExitCode::from(2);
        }
    };
    // A log line that cannot be written (stderr closed: a background manager whose terminal or
    // log reader went away) is dropped. By default the subscriber would report it on stderr
    // with `eprintln!`, which panics when stderr is closed, and a manager's client threads
    // died of it.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Info(args) => info::run(&args),
        Command::Perf(args) => perf::run(&args),
        Command::Manager(args) => manager::run(&args),
    };
    match result {
        Ok(code) => code,
        // Stdout closed (piped into `head`): stop quietly, with the status of a process that
        // a SIGPIPE ended, as a shell reports it.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            std::process::ExitCode::from(141)
        }
        Err(e) => {
            tracing::debug!(error = ?e, "command failed");
            report(&format!("{e:#}"));
            std::process::ExitCode::FAILURE
        }
    }
}
