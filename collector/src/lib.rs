//! Vigil collector: accepts agent streams over mutual TLS, stores every result in PostgreSQL,
//! keeps each service's state, and offers CA tooling and a status table. The binary
//! `vigil-collector` is a thin CLI over this library; tests run it in-process.

pub mod agentless;
pub mod availability;
pub mod ca;
pub mod config;
pub mod doctor;
pub mod grpc;
pub mod history;
pub mod liveness;
pub mod maintenance;
pub mod metrics;
pub mod notify;
pub mod remediation;
pub mod report;
pub mod rollup;
pub mod secret;
pub mod ssh;
pub mod state;
pub mod status;
pub mod store;
pub mod tls;
pub mod web;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use vigil_proto::v1::agent_service_server::AgentServiceServer;

pub use config::Config;
pub use store::Store;

#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running collector.
pub struct Collector {
    /// Where the agent stream listens (the real port when the config said `:0`).
    pub grpc_addr: SocketAddr,
    /// Where the dashboard and the REST API listen (None: turned off).
    pub http_addr: Option<SocketAddr>,
    /// Where Prometheus `/metrics` listens (None: turned off).
    pub metrics_addr: Option<SocketAddr>,
    pub hub: Arc<grpc::Hub>,
    server: tokio::task::JoinHandle<()>,
}

impl Collector {
    /// Connects to PostgreSQL (migrating it), stores the config, and starts serving agents.
    pub async fn start(config: Config) -> Result<Collector, CollectorError> {
        let store = Store::connect(&config.database_url, config.pool_size).await?;
        // Runtime settings changed through the API outlive restarts.
        let settings = web::settings::stored(&store).await?;
        let config = config.with_settings(settings);
        store.sync_config(&config).await?;
        let tls = tls::server_config(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
        let listener = TcpListener::bind(config.grpc_listen)
            .await
            .map_err(|source| CollectorError::Listen {
                addr: config.grpc_listen,
                source,
            })?;
        let grpc_addr = listener
            .local_addr()
            .map_err(|source| CollectorError::Listen {
                addr: config.grpc_listen,
                source,
            })?;
        let hub = grpc::Hub::new(store, config);

        let (health, health_svc) = tonic_health::server::health_reporter();
        health
            .set_serving::<AgentServiceServer<grpc::AgentSvc>>()
            .await;
        let agents = AgentServiceServer::new(grpc::AgentSvc { hub: hub.clone() })
            .max_decoding_message_size(vigil_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(vigil_proto::MAX_MESSAGE_BYTES);
        // Commands left by the previous run are settled before any agent can connect (a
        // session sends its node's commands at once).
        remediation::recover(&hub).await;
        let incoming = ReceiverStream::new(tls::accept_loop(listener, tls));
        let token = hub.shutdown.clone();
        let server = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(20)))
                .add_service(health_svc)
                .add_service(agents)
                .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        });
        // Remediation: a periodic pass, and commands created by other processes (the ctl CLI)
        // as soon as they are notified.
        let ticker_hub = hub.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(2));
            loop {
                tokio::select! {
                    _ = ticker_hub.shutdown.cancelled() => return,
                    _ = every.tick() => {
                        liveness::pass(&ticker_hub).await;
                        maintenance::pass(&ticker_hub).await;
                        remediation::tick(&ticker_hub).await;
                        let cfg = ticker_hub.config().await;
                        ticker_hub.alerts.tick(&cfg).await;
                    }
                }
            }
        });
        let mut notified = Store::listen_commands(&hub.config().await.database_url)?;
        let listen_hub = hub.clone();
        tokio::spawn(async move {
            loop {
                let id = tokio::select! {
                    _ = listen_hub.shutdown.cancelled() => return,
                    id = notified.recv() => match id { Some(id) => id, None => return },
                };
                if let Ok(Some(cmd)) = listen_hub.store.command(id).await
                    && cmd.status == "pending"
                {
                    remediation::dispatch(&listen_hub, &cmd).await;
                }
            }
        });
        agentless::start(hub.clone());
        // Alerts: the outbox's rows (left by a previous run too) are delivered from now on.
        hub.alerts.start_worker(hub.shutdown.clone());
        tracing::info!(addr = %grpc_addr, "collector listening for agents (mTLS)");
        let cfg = hub.config().await;
        let http_addr = match cfg.http.listen {
            Some(addr) => {
                let a = serve_http(addr, web::router(hub.clone()), &hub).await?;
                tracing::info!(addr = %a, "dashboard and REST API listening (http://{a}/)");
                Some(a)
            }
            None => None,
        };
        let metrics_addr = match cfg.metrics.listen {
            Some(addr) => {
                let a = serve_http(addr, metrics::router(hub.clone()), &hub).await?;
                tracing::info!(addr = %a, "Prometheus metrics listening (http://{a}/metrics)");
                metrics::init(&hub).await;
                Some(a)
            }
            None => None,
        };
        history::start(hub.clone());
        Ok(Collector {
            http_addr,
            metrics_addr,
            grpc_addr,
            hub,
            server,
        })
    }

    /// Re-reads the config file; on any error the running config stays in force.
    pub async fn reload(&self, path: &Path) -> Result<(), CollectorError> {
        let cfg = Config::load(path)?.with_settings(self.hub.config().await.settings);
        self.hub.apply(cfg).await?;
        Ok(())
    }

    /// Ends every agent stream and stops listening.
    pub async fn shutdown(self) {
        self.hub.shutdown.cancel();
        self.hub.close_all();
        let abort = self.server.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), self.server)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

/// Serves `router` over plain HTTP on `addr` until shutdown; returns the bound address.
async fn serve_http(
    addr: SocketAddr,
    router: axum::Router,
    hub: &grpc::Hub,
) -> Result<SocketAddr, CollectorError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| CollectorError::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| CollectorError::Listen { addr, source })?;
    let token = hub.shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(token.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, addr = %bound, "HTTP server stopped");
        }
    });
    Ok(bound)
}
