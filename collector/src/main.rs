//! `vigil-collector`: serve agents, print the status table, validate config, manage the CA.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use vigil_collector::{Collector, Config, Store, ca, status};

/// The Vigil collector: receives check results from agents over mutually authenticated gRPC,
/// stores them in PostgreSQL and keeps the state of every service.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the collector until SIGINT/SIGTERM; SIGHUP reloads the config (a bad config is
    /// reported and the running one stays in force).
    Serve {
        /// collector.yaml; service files are read from its services_dir.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print every service: node, category, state, last check, response time, 24 h failure rate,
    /// last error.
    Status {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate collector.yaml and every service file, then exit (non-zero on any error).
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Certificate authority for the agent stream.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a CA and the collector's server certificate in DIR (refuses to overwrite).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Extra DNS name or IP agents use to reach the collector (repeatable); localhost and
        /// 127.0.0.1 are always included.
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// Create a client certificate for an agent; its identity is the node name.
    Issue {
        #[arg(long)]
        node: String,
        #[arg(long)]
        dir: PathBuf,
    },
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            init_tracing();
            serve(config).await
        }
        Command::Status { config } => {
            let cfg = Config::load(&config)?;
            let store = Store::connect(&cfg.database_url, 1).await?;
            let rows = store.status().await?;
            print!("{}", status::render(&rows, chrono::Utc::now()));
            Ok(())
        }
        Command::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            println!(
                "{}: OK ({} nodes, {} services)",
                config.display(),
                cfg.nodes.len(),
                cfg.services.len()
            );
            Ok(())
        }
        Command::Ca { command } => match command {
            CaCommand::Init { dir, hosts } => {
                for f in ca::init(&dir, &hosts)? {
                    println!("wrote {}", f.display());
                }
                Ok(())
            }
            CaCommand::Issue { node, dir } => {
                for f in ca::issue(&dir, &node)? {
                    println!("wrote {}", f.display());
                }
                println!(
                    "copy ca.pem, {node}.pem and {node}.key to the node and set node: {node} in its agent.yaml"
                );
                Ok(())
            }
        },
    }
}

async fn serve(path: PathBuf) -> anyhow::Result<()> {
    let cfg = Config::load(&path).context("refusing to start with an invalid config")?;
    tracing::info!(
        config = %path.display(),
        nodes = cfg.nodes.len(),
        services = cfg.services.len(),
        "config loaded"
    );
    let collector = Collector::start(cfg).await?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                match collector.reload(&path).await {
                    Ok(()) => tracing::info!(config = %path.display(), "config reloaded"),
                    Err(e) => tracing::error!(error = %e, "config reload failed; the previous config stays in force"),
                }
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("shutting down");
    collector.shutdown().await;
    Ok(())
}
