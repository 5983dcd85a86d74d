//! The stream to the collector: mTLS channel, Hello/Welcome, config updates, result batches, acks;
//! commands are handed to [`crate::commands`], which replies on the same stream.
//!
//! One task owns the connection and reconnects with capped exponential backoff. Results are read
//! from the outbox (never from memory), so after any reconnect sending starts again at the first
//! unacknowledged seq and the collector de-duplicates on (node, epoch, seq).
//!
//! The hello and the session's starting point come from one outbox snapshot (one read
//! transaction), so a result appended meanwhile is never taken for acknowledged. Batches are
//! bounded by count ([`MAX_BATCH`]) and bytes ([`MAX_BATCH_BYTES`]), and so is what is sent and
//! not yet acknowledged ([`MAX_IN_FLIGHT`], [`MAX_IN_FLIGHT_BYTES`]); results are sanitised when
//! read from the outbox ([`Outbox::pending`]). An [`AgentStatus`] goes out every
//! [`STATUS_INTERVAL`] (the agent's heartbeat) and before any batch that follows a deliberate
//! drop the collector has not been told about.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{Mutex, Notify, mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use vigil_error::{describe, with_causes};
use vigil_proto::agent_message::Msg as Out;
use vigil_proto::agent_service_client::AgentServiceClient;
use vigil_proto::collector_message::Msg as In;
use vigil_proto::{
    AgentMessage, AgentStatus, Capabilities, CollectorMessage, ConfigUpdate, Hello, Pong,
    ResultBatch,
};

use crate::backoff::Backoff;
use crate::cache::ConfigCache;
use crate::commands::Commands;
use crate::config::AgentConfig;
use crate::outbox::{Outbox, Snapshot};
use crate::scheduler::Scheduler;

/// Most results in one `ResultBatch`.
pub const MAX_BATCH: usize = 500;
/// Most bytes of results in one `ResultBatch` ([`vigil_proto::sanitize::encoded_len`]), unless its
/// only result is larger (a sanitised result is at most
/// [`vigil_proto::sanitize::MAX_RESULT_BYTES`]): far below [`vigil_proto::MAX_MESSAGE_BYTES`].
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Most results sent and not yet acknowledged (flow control).
pub const MAX_IN_FLIGHT: u64 = 5000;
/// Most bytes of results sent and not yet acknowledged (flow control: a batch gets only the room
/// left, so this is passed only by a batch whose one result is larger than that room).
pub const MAX_IN_FLIGHT_BYTES: usize = 4 * 1024 * 1024;
/// How often the agent sends its [`AgentStatus`] while connected (also its heartbeat).
pub const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// The stream is dropped when nothing at all arrives from the collector for this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long Hello waits for the Docker engine to answer a ping (capability `docker`).
pub const DOCKER_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the connection to the collector stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    /// Connecting (or about to); no Welcome yet.
    Connecting,
    /// Welcome received from the collector, which calls this node `node`.
    Connected { node: String },
    /// The collector rejected this agent (wrong node name, certificate not accepted).
    Refused { reason: String },
    /// Not connected, waiting before the next attempt.
    Disconnected { reason: String },
}

/// Errors setting up the client (bad TLS files, bad URL).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} is not usable: {reason}")]
    BadFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("collector url {url:?}: {reason}")]
    Url { url: String, reason: String },
}

/// Builds the mTLS endpoint of the first collector URL; every TLS file is read and checked here
/// so that a bad one fails the start with an error naming it.
pub fn build_endpoint(config: &AgentConfig) -> Result<Endpoint, ClientError> {
    build_endpoint_for(config, &config.collector.url)
}

/// One mTLS endpoint per collector URL, in the order of `collector.urls`.
pub fn build_endpoints(config: &AgentConfig) -> Result<Vec<(String, Endpoint)>, ClientError> {
    config
        .collector
        .urls
        .iter()
        .map(|u| Ok((u.clone(), build_endpoint_for(config, u)?)))
        .collect()
}

fn build_endpoint_for(config: &AgentConfig, url: &str) -> Result<Endpoint, ClientError> {
    let ca = read_file("CA certificate", &config.tls.ca)?;
    let cert = read_file("client certificate", &config.tls.cert)?;
    let key = read_file("private key", &config.tls.key)?;
    check_certs("CA certificate", &config.tls.ca, &ca)?;
    check_certs("client certificate", &config.tls.cert, &cert)?;
    if let Err(e) = PrivateKeyDer::from_pem_slice(&key) {
        return Err(ClientError::BadFile {
            what: "private key",
            path: config.tls.key.clone(),
            reason: format!("no PEM private key found ({e})"),
        });
    }
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca))
        .identity(Identity::from_pem(&cert, &key))
        .domain_name(config.server_name_for(url));
    let url = url.to_string();
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| ClientError::Url {
            url: url.clone(),
            reason: describe(&e),
        })?
        .connect_timeout(config.collector.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true)
        .user_agent(format!("vigil-agent/{}", env!("CARGO_PKG_VERSION")))
        .map_err(|e| ClientError::Url {
            url: url.clone(),
            reason: describe(&e),
        })?;
    endpoint.tls_config(tls).map_err(|e| ClientError::BadFile {
        what: "client certificate and key",
        path: config.tls.cert.clone(),
        reason: format!(
            "rejected together with {} and {}: {}",
            config.tls.key.display(),
            config.tls.ca.display(),
            describe(&e)
        ),
    })
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn check_certs(what: &'static str, path: &Path, pem: &[u8]) -> Result<(), ClientError> {
    let mut n = 0;
    for c in CertificateDer::pem_slice_iter(pem) {
        if let Err(e) = c {
            return Err(ClientError::BadFile {
                what,
                path: path.to_path_buf(),
                reason: format!("bad PEM: {e}"),
            });
        }
        n += 1;
    }
    if n == 0 {
        return Err(ClientError::BadFile {
            what,
            path: path.to_path_buf(),
            reason: "no PEM certificate found".into(),
        });
    }
    Ok(())
}

/// How a session ended.
enum SessionEnd {
    Shutdown,
    Failed { welcomed: bool, failure: Failure },
}

enum Failure {
    /// The collector said this agent is not allowed (PermissionDenied / Unauthenticated).
    Refused(String),
    /// Anything else: connection failed or lost.
    Lost(String),
}

fn classify(status: &tonic::Status) -> Failure {
    match status.code() {
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
            Failure::Refused(format!("{:?}: {}", status.code(), status.message()))
        }
        code => Failure::Lost(with_causes(
            format!("{code:?}: {}", status.message()),
            status,
        )),
    }
}

/// The connection task and everything it needs.
pub(crate) struct Client {
    pub node: String,
    /// The collectors (URL, endpoint), tried in turn: one while it works, the next after any
    /// failure.
    pub endpoints: Vec<(String, Endpoint)>,
    /// Index into `endpoints` of the collector this session uses.
    pub current: usize,
    pub outbox: Arc<Outbox>,
    pub notify: Arc<Notify>,
    pub scheduler: Arc<Mutex<Scheduler>>,
    pub cache: ConfigCache,
    pub state: watch::Sender<ConnState>,
    pub backoff: Backoff,
    /// The node's inventory as JSON for the hello: collected before the first hello, again
    /// after a session that the collector had welcomed ended (cheap, but not free).
    pub inventory: Option<String>,
    /// How often an [`AgentStatus`] is sent while connected ([`STATUS_INTERVAL`]).
    pub status_interval: Duration,
    /// Every command received, and its outcome until the collector acknowledges it.
    pub journal: Arc<crate::journal::Journal>,
}

/// Milliseconds since the Unix epoch by the agent's clock.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn status_message(status: AgentStatus) -> AgentMessage {
    AgentMessage {
        msg: Some(Out::Status(status)),
    }
}

/// Batches sent and not yet acknowledged: (last seq, bytes) of each, oldest first.
#[derive(Debug, Default)]
struct InFlight {
    batches: VecDeque<(u64, usize)>,
    bytes: usize,
}

impl InFlight {
    fn push(&mut self, last_seq: u64, bytes: usize) {
        self.batches.push_back((last_seq, bytes));
        self.bytes += bytes;
    }

    /// Forgets the batches acknowledged by `acked` (cumulative).
    fn release(&mut self, acked: u64) {
        while let Some(&(last, bytes)) = self.batches.front() {
            if last > acked {
                break;
            }
            self.batches.pop_front();
            self.bytes -= bytes;
        }
    }
}

impl Client {
    /// Connects, serves the stream, and reconnects until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        // Outlives sessions: a command keeps running across a reconnect (its outcome goes out on
        // the stream that is current when it ends, or waits in the journal for the next one).
        // Dropped at shutdown, which cancels what runs.
        let mut commands = Commands::new(self.scheduler.clone(), self.journal.clone());
        loop {
            if *shutdown.borrow() {
                break;
            }
            self.state.send_replace(ConnState::Connecting);
            let (welcomed, failure) = match self.session(&mut shutdown, &mut commands).await {
                SessionEnd::Shutdown => break,
                SessionEnd::Failed { welcomed, failure } => (welcomed, failure),
            };
            if welcomed {
                self.backoff.reset();
                self.inventory = None;
            }
            let delay = self.backoff.next_delay();
            let collector = self.endpoints[self.current].0.clone();
            // Any failure moves on to the next collector (with one, the same again).
            self.current = (self.current + 1) % self.endpoints.len();
            let retry_in = humantime::format_duration(round_ms(delay)).to_string();
            match failure {
                Failure::Refused(reason) => {
                    tracing::error!(
                        node = %self.node,
                        %collector,
                        %retry_in,
                        "collector refused this agent: {reason}; check node: in agent.yaml and the certificate"
                    );
                    self.state.send_replace(ConnState::Refused { reason });
                }
                Failure::Lost(reason) => {
                    if welcomed {
                        tracing::warn!(%collector, %reason, %retry_in, "connection to the collector lost");
                    } else {
                        tracing::warn!(%collector, %reason, %retry_in, "cannot connect to the collector");
                    }
                    self.state.send_replace(ConnState::Disconnected { reason });
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => break,
            }
        }
        self.state.send_replace(ConnState::Disconnected {
            reason: "agent shut down".into(),
        });
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Outbox) -> T + Send + 'static,
    ) -> T {
        let outbox = self.outbox.clone();
        tokio::task::spawn_blocking(move || f(&outbox))
            .await
            .expect("outbox task panicked")
    }

    /// The inventory JSON, collected now unless cached.
    async fn inventory(&mut self) -> String {
        if let Some(json) = &self.inventory {
            return json.clone();
        }
        let inventory = vigil_checks::inventory::collect().await;
        let json = match serde_json::to_string(&inventory) {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode the inventory; the hello carries none");
                String::new()
            }
        };
        self.inventory = Some(json.clone());
        json
    }

    /// The hello for the outbox as `snapshot` shows it (the session starts from the same one).
    async fn hello(&mut self, snapshot: &Snapshot) -> Hello {
        let inventory_json = self.inventory().await;
        Hello {
            node: self.node.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            capabilities: Some(Capabilities {
                docker: docker_available().await,
                systemd: Path::new("/run/systemd/system").exists(),
                gpus: 0,
                check_kinds: vigil_checks::KINDS.iter().map(|k| k.to_string()).collect(),
            }),
            config_version: self.scheduler.lock().await.version(),
            outbox_epoch: self.outbox.epoch(),
            first_unacked_seq: snapshot.first_unacked,
            inventory_json,
            next_seq: snapshot.next_seq,
            epoch_start_seq: snapshot.epoch_start_seq,
            status: Some(snapshot.status(now_ms())),
            agent_time_ms: now_ms(),
        }
    }

    /// One connection, from connect to the end of the stream.
    async fn session(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        commands: &mut Commands,
    ) -> SessionEnd {
        let lost = |welcomed, reason: String| SessionEnd::Failed {
            welcomed,
            failure: Failure::Lost(reason),
        };
        let channel: Channel = tokio::select! {
            c = self.endpoints[self.current].1.connect() => match c {
                Ok(c) => c,
                Err(e) => return lost(false, describe(&e)),
            },
            _ = shutdown.changed() => return SessionEnd::Shutdown,
        };
        let mut client = AgentServiceClient::new(channel)
            .max_decoding_message_size(vigil_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(vigil_proto::MAX_MESSAGE_BYTES);

        // One snapshot for the hello and for where this session starts.
        let snapshot = match self.blocking(|o| o.snapshot()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the outbox");
                return lost(false, format!("cannot read the outbox: {e}"));
            }
        };
        let hello = self.hello(&snapshot).await;
        tracing::debug!(
            config_version = hello.config_version,
            first_unacked_seq = hello.first_unacked_seq,
            next_seq = hello.next_seq,
            epoch_start_seq = hello.epoch_start_seq,
            outbox_depth = snapshot.depth,
            dropped_total = snapshot.dropped_total,
            "sending hello"
        );
        let (tx, rx) = mpsc::channel::<AgentMessage>(16);
        commands.attach(tx.clone());
        let _ = tx
            .send(AgentMessage {
                msg: Some(Out::Hello(hello)),
            })
            .await;
        let mut inbound = tokio::select! {
            r = client.session(ReceiverStream::new(rx)) => match r {
                Ok(resp) => resp.into_inner(),
                Err(status) => return SessionEnd::Failed { welcomed: false, failure: classify(&status) },
            },
            _ = shutdown.changed() => return SessionEnd::Shutdown,
        };

        // Everything up to `acked` is gone from the outbox; everything up to `sent` was sent.
        let mut acked = snapshot.acked_through();
        let mut sent = acked;
        let mut in_flight = InFlight::default();
        // The collector knows of this many deliberate drops (the hello told it).
        let mut reported_dropped = snapshot.dropped_total;
        let mut welcomed = false;
        let mut want_send = true;
        let mut last_rx = Instant::now();
        let period = self.status_interval.max(Duration::from_millis(1));
        let mut status_tick = tokio::time::interval_at(Instant::now() + period, period);
        status_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);

        loop {
            let can_send = welcomed
                && want_send
                && sent.saturating_sub(acked) < MAX_IN_FLIGHT
                && in_flight.bytes < MAX_IN_FLIGHT_BYTES;
            tokio::select! {
                _ = shutdown.changed() => return SessionEnd::Shutdown,
                msg = inbound.message() => {
                    last_rx = Instant::now();
                    let msg = match msg {
                        Ok(Some(m)) => m,
                        Ok(None) => return lost(welcomed, "the collector closed the stream".into()),
                        Err(status) => return SessionEnd::Failed { welcomed, failure: classify(&status) },
                    };
                    match self.handle(msg, &tx, commands, &mut welcomed, &mut acked).await {
                        Ok(()) => {}
                        Err(reason) => return lost(welcomed, reason),
                    }
                    sent = sent.max(acked);
                    in_flight.release(acked);
                    want_send = true;
                }
                _ = tokio::time::sleep_until(last_rx + IDLE_TIMEOUT) => {
                    return lost(welcomed, format!(
                        "nothing received from the collector for {}",
                        humantime::format_duration(IDLE_TIMEOUT)
                    ));
                }
                _ = self.notify.notified() => want_send = true,
                _ = status_tick.tick(), if welcomed => {
                    let snapshot = match self.blocking(|o| o.snapshot()).await {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot read the outbox");
                            return lost(welcomed, format!("cannot read the outbox: {e}"));
                        }
                    };
                    // A heartbeat is not worth waiting for: when the stream is backed up, the
                    // next one goes.
                    match tx.try_send(status_message(snapshot.status(now_ms()))) {
                        Ok(()) => reported_dropped = snapshot.dropped_total,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            tracing::debug!("stream backed up; status skipped");
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            return lost(welcomed, "the request stream closed".into());
                        }
                    }
                }
                // Room for a status and a batch, so that a drop is reported before the gap.
                permits = tx.reserve_many(2), if can_send => {
                    let Ok(mut permits) = permits else {
                        return lost(welcomed, "the request stream closed".into());
                    };
                    let room = (MAX_IN_FLIGHT - sent.saturating_sub(acked)) as usize;
                    let limit = room.min(MAX_BATCH);
                    let budget = MAX_BATCH_BYTES.min(MAX_IN_FLIGHT_BYTES - in_flight.bytes);
                    let after = sent;
                    let pending = match self.blocking(move |o| o.pending(after, limit, budget)).await {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot read the outbox");
                            return lost(welcomed, format!("cannot read the outbox: {e}"));
                        }
                    };
                    let (Some(first), Some(last)) = (pending.results.first(), pending.results.last()) else {
                        want_send = false;
                        continue;
                    };
                    let (first, last) = (first.seq, last.seq);
                    if pending.outbox.dropped_total != reported_dropped {
                        // Read with the batch: the collector learns of the drop before the gap.
                        let status = pending.outbox.status(now_ms());
                        tracing::warn!(
                            dropped_total = status.dropped_total,
                            dropped_through_seq = status.dropped_through_seq,
                            "telling the collector about results dropped from the full outbox"
                        );
                        reported_dropped = status.dropped_total;
                        if let Some(p) = permits.next() {
                            p.send(status_message(status));
                        }
                    }
                    sent = last;
                    in_flight.push(last, pending.bytes);
                    tracing::debug!(
                        first,
                        last,
                        count = pending.results.len(),
                        bytes = pending.bytes,
                        in_flight_bytes = in_flight.bytes,
                        "sending results"
                    );
                    if let Some(p) = permits.next() {
                        p.send(AgentMessage {
                            msg: Some(Out::Results(ResultBatch {
                                outbox_epoch: self.outbox.epoch(),
                                results: pending.results,
                            })),
                        });
                    }
                }
            }
        }
    }

    /// Handles one message from the collector; `Err` ends the session with that reason.
    async fn handle(
        &mut self,
        msg: CollectorMessage,
        tx: &mpsc::Sender<AgentMessage>,
        commands: &mut Commands,
        welcomed: &mut bool,
        acked: &mut u64,
    ) -> Result<(), String> {
        let send = |m: Out| {
            let tx = tx.clone();
            async move {
                tx.send(AgentMessage { msg: Some(m) })
                    .await
                    .map_err(|_| "the request stream closed".to_string())
            }
        };
        match msg.msg {
            None => tracing::debug!("ignoring an empty or unknown message from the collector"),
            Some(In::Welcome(w)) => {
                if !*welcomed {
                    *welcomed = true;
                    tracing::info!(
                        node = %w.node,
                        collector_version = %w.collector_version,
                        "connected to the collector"
                    );
                    self.state
                        .send_replace(ConnState::Connected { node: w.node });
                    // Outcomes that ended while the stream was down, or whose ack was lost.
                    commands.replay();
                }
            }
            Some(In::Config(update)) => self.apply_config(update).await,
            Some(In::Ack(ack)) => {
                let (epoch, up_to) = (ack.outbox_epoch, ack.up_to_seq);
                match self.blocking(move |o| o.ack(epoch, up_to)).await {
                    Ok(deleted) => {
                        tracing::debug!(up_to_seq = up_to, deleted, "results acknowledged");
                        if epoch == self.outbox.epoch() {
                            *acked = (*acked).max(up_to);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, up_to_seq = up_to, "cannot apply ack"),
                }
            }
            Some(In::Ping(p)) => send(Out::Pong(Pong { nonce: p.nonce })).await?,
            // Carried out in a task of its own; the result follows on `tx` when it is done.
            Some(In::Command(c)) => commands.spawn(c),
            Some(In::CommandAck(a)) => commands.acknowledged(&a.issuer, &a.command_id),
        }
        Ok(())
    }

    async fn apply_config(&mut self, update: ConfigUpdate) {
        let mut scheduler = self.scheduler.lock().await;
        if update.version == scheduler.version() {
            tracing::debug!(version = update.version, "config unchanged");
            return;
        }
        tracing::info!(
            version = update.version,
            previous = scheduler.version(),
            checks = update.checks.len(),
            "new config from the collector"
        );
        let cache = self.cache.clone();
        let to_store = update.clone();
        match tokio::task::spawn_blocking(move || cache.store(&to_store)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot cache the config; running it anyway"),
            Err(e) => tracing::error!(error = %e, "cannot cache the config; running it anyway"),
        }
        scheduler.apply(&update).await;
    }
}

/// Whether the Docker engine answers a ping (bounded by [`DOCKER_PING_TIMEOUT`]).
async fn docker_available() -> bool {
    match vigil_control::docker::ping(DOCKER_PING_TIMEOUT).await {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(reason = %e, "no Docker capability");
            false
        }
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_bytes_are_released_by_cumulative_acks() {
        let mut f = InFlight::default();
        f.push(10, 100);
        f.push(20, 200);
        f.push(30, 300);
        assert_eq!(f.bytes, 600);
        // An ack inside a batch releases only the batches it covers completely.
        f.release(15);
        assert_eq!((f.bytes, f.batches.len()), (500, 2));
        f.release(15);
        assert_eq!(f.bytes, 500);
        f.release(30);
        assert_eq!((f.bytes, f.batches.len()), (0, 0));
        f.release(1000);
        assert_eq!(f.bytes, 0);
    }
}
