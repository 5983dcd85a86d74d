//! Vigil agent: runs the node's checks, keeps every result in a durable outbox, and streams them
//! to the collector over mutual TLS. Usable in-process (tests) through [`Agent::start`].
//!
//! Modules: [`config`] (agent.yaml), [`outbox`] (durable results), [`cache`] (last config),
//! [`scheduler`] (check tasks, run-now), [`docker_events`] (Docker events make a `docker` check
//! run at once), [`client`] (the stream, the hello with the node's inventory), [`commands`]
//! (commands from the collector: restart/stop/start, check now), [`journal`] (every command
//! received, so that none runs twice and no outcome is lost), [`backoff`] (reconnect delays).

pub mod backoff;
pub mod cache;
pub mod client;
pub mod commands;
pub mod config;
pub mod docker_events;
pub mod doctor;
pub mod journal;
pub mod outbox;
pub mod scheduler;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Notify, watch};
use tokio::task::JoinHandle;

pub use client::ConnState;
pub use config::{AgentConfig, CollectorConfig, ConfigError, ReconnectConfig, TlsFiles};

use crate::backoff::Backoff;
use crate::cache::ConfigCache;
use crate::client::{Client, ClientError};
use crate::docker_events::DockerEvents;
use crate::outbox::{Outbox, OutboxError, Snapshot};
use crate::scheduler::Scheduler;

/// Errors starting the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot create state dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Settings of the agent that are not in agent.yaml (tests shorten them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentOptions {
    /// How often the agent sends its outbox status while connected.
    pub status_interval: Duration,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            status_interval: client::STATUS_INTERVAL,
        }
    }
}

/// Entry point of the agent.
pub struct Agent;

impl Agent {
    /// Opens the outbox, starts the cached checks at once, and starts connecting to the collector
    /// in the background. Fails only on local problems (state dir, outbox, TLS files).
    pub async fn start(config: AgentConfig) -> Result<AgentHandle, AgentError> {
        Self::start_with(config, AgentOptions::default()).await
    }

    /// [`Agent::start`] with `options`.
    pub async fn start_with(
        config: AgentConfig,
        options: AgentOptions,
    ) -> Result<AgentHandle, AgentError> {
        let state_dir = config.state_dir.clone();
        std::fs::create_dir_all(&state_dir).map_err(|source| AgentError::StateDir {
            path: state_dir.clone(),
            source,
        })?;
        let endpoints = client::build_endpoints(&config)?;

        let outbox_path = state_dir.join(outbox::FILE_NAME);
        let max = config.outbox_max_results;
        let outbox = tokio::task::spawn_blocking(move || Outbox::open(&outbox_path, max))
            .await
            .expect("outbox open panicked")?;
        let outbox = Arc::new(outbox);
        let journal_path = state_dir.join(journal::FILE_NAME);
        let journal = tokio::task::spawn_blocking(move || {
            journal::Journal::open(&journal_path, client::now_ms())
        })
        .await
        .expect("journal open panicked")?;
        let notify = Arc::new(Notify::new());
        let mut scheduler =
            Scheduler::new(outbox.clone(), notify.clone(), config.max_concurrent_checks);

        let cache = ConfigCache::new(&state_dir);
        let cache2 = cache.clone();
        match tokio::task::spawn_blocking(move || cache2.load()).await {
            Ok(Ok(Some(update))) => {
                tracing::info!(
                    version = update.version,
                    checks = update.checks.len(),
                    "running the cached config until the collector sends one"
                );
                scheduler.apply(&update).await;
            }
            Ok(Ok(None)) => tracing::info!("no cached config yet; waiting for the collector"),
            Ok(Err(e)) => tracing::warn!(error = %e, "ignoring the cached config"),
            Err(e) => tracing::warn!(error = %e, "ignoring the cached config"),
        }
        let scheduler = Arc::new(Mutex::new(scheduler));
        let docker_events = DockerEvents::start(scheduler.clone()).await;

        let (state_tx, state_rx) = watch::channel(ConnState::Connecting);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        tracing::info!(
            node = %config.node,
            collectors = %config.collector.urls.join(", "),
            outbox_epoch = outbox.epoch(),
            state_dir = %state_dir.display(),
            "agent started"
        );
        let client = Client {
            node: config.node.clone(),
            endpoints,
            current: 0,
            outbox: outbox.clone(),
            notify,
            scheduler: scheduler.clone(),
            cache,
            state: state_tx,
            backoff: Backoff::new(config.reconnect.initial, config.reconnect.max),
            inventory: None,
            status_interval: options.status_interval,
            journal: Arc::new(journal),
        };
        let client_task = tokio::spawn(client.run(shutdown_rx));
        Ok(AgentHandle {
            state: state_rx,
            shutdown: shutdown_tx,
            client_task,
            docker_events,
            scheduler,
            outbox,
        })
    }
}

/// A running agent.
pub struct AgentHandle {
    state: watch::Receiver<ConnState>,
    shutdown: watch::Sender<bool>,
    client_task: JoinHandle<()>,
    docker_events: DockerEvents,
    scheduler: Arc<Mutex<Scheduler>>,
    outbox: Arc<Outbox>,
}

impl AgentHandle {
    /// The connection state, updated as it changes.
    pub fn state(&self) -> watch::Receiver<ConnState> {
        self.state.clone()
    }

    /// The random identity of this agent's outbox.
    pub fn outbox_epoch(&self) -> u64 {
        self.outbox.epoch()
    }

    /// Results stored and not yet acknowledged by the collector.
    pub async fn outbox_len(&self) -> u64 {
        let outbox = self.outbox.clone();
        tokio::task::spawn_blocking(move || outbox.len())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0)
    }

    /// The outbox as it stands (one read transaction).
    pub async fn outbox_snapshot(&self) -> Result<Snapshot, OutboxError> {
        let outbox = self.outbox.clone();
        tokio::task::spawn_blocking(move || outbox.snapshot())
            .await
            .expect("outbox snapshot panicked")
    }

    /// Version of the config the checks run under now (0: none).
    pub async fn config_version(&self) -> u64 {
        self.scheduler.lock().await.version()
    }

    /// Stops the stream and every check, and waits for them; the outbox stays on disk (and its
    /// file is closed when this returns, so the same state dir can be opened again).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        if let Err(e) = self.client_task.await {
            tracing::error!(error = %e, "stream task failed");
        }
        self.docker_events.stop().await;
        self.scheduler.lock().await.stop_all().await;
        tracing::info!("agent stopped");
    }
}
