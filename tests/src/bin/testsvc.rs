//! `vigil-testsvc`: runs the test service (health, Mineru-like `/file_parse`, status codes, slow
//! answers, an HTML page) until SIGINT or SIGTERM, logging every request.

use std::net::SocketAddr;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// A small HTTP service that behaves like the things Vigil monitors.
///
/// Endpoints: GET /health, POST /file_parse (multipart field `files` with a PDF),
/// GET /status/{code}, GET /slow/{ms}, GET /.
#[derive(Debug, Parser)]
#[command(name = "vigil-testsvc", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18080", env = "VIGIL_TESTSVC_LISTEN")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let svc = vigil_tests::testsvc::spawn(args.listen).await?;
    tracing::info!(addr = %svc.addr, "vigil-testsvc listening");
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    svc.stop().await;
    Ok(())
}
