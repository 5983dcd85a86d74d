//! `vigil-agent` binary: loads agent.yaml, runs the agent until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vigil_agent::{Agent, AgentConfig};

/// Vigil agent: runs this node's checks (assigned by the collector, cached on disk), keeps every
/// result in a durable local outbox, and streams them to the collector over mutual TLS.
///
/// Logging follows RUST_LOG (default: info), e.g. RUST_LOG=vigil_agent=debug.
#[derive(Debug, Parser)]
#[command(name = "vigil-agent", version)]
struct Args {
    /// Path of agent.yaml (node name, collector URL, TLS files, state dir; see config/agent.yaml).
    #[arg(
        long,
        short,
        env = "VIGIL_AGENT_CONFIG",
        default_value = "/etc/vigil/agent.yaml",
        global = true
    )]
    config: PathBuf,
    /// Log format: text (for people; colours only on a terminal) or json (one object per line).
    #[arg(
        long,
        value_enum,
        env = "VIGIL_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    log_format: vigil_log::LogFormat,
    /// Without a command: run the agent.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pre-flight check: config, certificates, the collector (TCP and mutual TLS), Docker, the
    /// NVIDIA driver, the state dir. One line per finding (OK, WARN, ERROR with how to fix it);
    /// exit status 1 on any ERROR.
    Doctor,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Doctor) = args.command {
        return doctor(&args.config);
    }
    vigil_log::init(args.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, each cause once (sources often repeat their parent's text).
            let mut text = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !text.contains(&c) {
                    text = format!("{text}: {c}");
                }
            }
            tracing::error!("{text}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `doctor` and prints its findings on stdout (no logging: the findings say it all).
fn doctor(config: &std::path::Path) -> ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(vigil_agent::doctor::run(config));
    print!("{report}");
    if report.has_errors() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Already installed is fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    let config = AgentConfig::load(&args.config)?;
    let agent = Agent::start(config)
        .await
        .with_context(|| format!("cannot start the agent ({})", args.config.display()))?;

    wait_for_signal().await?;
    tracing::info!("shutting down");
    agent.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot listen for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}
