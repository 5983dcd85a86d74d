//! tonic servers on 127.0.0.1 for tests: plain, with TLS, or with mutual TLS from a [`Pki`] —
//! the transport of the fake collector the agent's tests talk to (each test brings its own
//! `AgentService`, since each scripts the collector's side differently) — and waiting for what a
//! fake reports, within a deadline.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;
use tonic::transport::{Server, ServerTlsConfig};

use crate::pki::Pki;

/// A running server; aborting `task` stops it.
pub struct GrpcServer {
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
}

impl GrpcServer {
    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

/// Serves `routes` (e.g. `Routes::new(AgentServiceServer::new(fake))`) on 127.0.0.1:0, with
/// `tls` when given.
pub async fn serve(tls: Option<ServerTlsConfig>, routes: Routes) -> GrpcServer {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local address");
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).expect("server TLS config");
    }
    let server = builder
        .add_routes(routes)
        .serve_with_incoming(TcpListenerStream::new(listener));
    let task = tokio::spawn(async move {
        let _ = server.await;
    });
    GrpcServer { addr, task }
}

/// Serves `routes` with mutual TLS: the PKI's server certificate, and only clients with a
/// certificate from its CA (as the collector's agent port).
pub async fn serve_mtls(pki: &Pki, routes: Routes) -> GrpcServer {
    serve(Some(pki.mtls()), routes).await
}

/// Receives events until `pred` picks one (skipping the others); panics naming `what` when none
/// comes within `within` or the sender is gone.
pub async fn expect<E, T>(
    events: &mut mpsc::UnboundedReceiver<E>,
    what: &str,
    within: Duration,
    mut pred: impl FnMut(&E) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("fake server gone");
        if let Some(t) = pred(&ev) {
            return t;
        }
    }
}
