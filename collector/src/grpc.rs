//! The agent stream (`vigil.v1.AgentService/Session`): identifies the node from its client
//! certificate, sends its checks, ingests result batches and acknowledges them after commit.
//! gRPC errors are built here and nowhere else.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use futures::Stream;
use tokio::sync::{RwLock, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use vigil_proto::v1::{
    self, AgentMessage, CollectorMessage, agent_message::Msg as In, collector_message::Msg as Out,
};

use crate::config::Config;
use crate::store::{ResultIn, Store};
use crate::tls::node_of_certificate;

/// Most results accepted in one batch.
pub const MAX_BATCH: usize = 5_000;
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);
/// Pings go out this often, or three times per node timeout if that is shorter: a live agent's
/// Pongs keep it from being declared down.
const PING_EVERY: Duration = Duration::from_secs(30);
/// An agent that sends nothing (not even a Pong) for this long is dropped.
const IDLE_LIMIT: Duration = Duration::from_secs(120);
/// `nodes.last_seen` is written at most this often per session (or four times per node
/// timeout if that is shorter); liveness is judged from it.
const TOUCH_EVERY: Duration = Duration::from_secs(10);

type Tx = mpsc::Sender<Result<CollectorMessage, Status>>;

struct Session {
    id: u64,
    tx: Tx,
}

/// Shared collector state: config, store, and the connected agents.
pub struct Hub {
    pub store: Store,
    config: RwLock<Arc<Config>>,
    sessions: std::sync::Mutex<HashMap<String, Session>>,
    next_id: AtomicU64,
    pub shutdown: CancellationToken,
    /// Incidents and the alert outbox (writes to the database; a worker delivers).
    pub alerts: Arc<crate::notify::Alerts>,
    /// SSH sessions to nodes (agentless checks, control over SSH).
    pub ssh: crate::ssh::SshPool,
    /// Prometheus metrics.
    pub metrics: crate::metrics::Metrics,
    /// This hub, for work that must outlive the caller (commands run over SSH on their own task).
    me: std::sync::Weak<Hub>,
    /// When this collector started: silence is counted from here at the earliest (a collector
    /// that was away heard nothing, which says nothing about the nodes).
    pub started_at: chrono::DateTime<Utc>,
    /// Silence of services counts from here at the earliest: the collector's start, or the last
    /// liveness pass that found scheduled checks suspended (runtime setting enabled: false).
    pub results_expected_since: std::sync::Mutex<chrono::DateTime<Utc>>,
    /// Node-down alerts still waiting for their SSH heal, and the node-up alert that must
    /// follow each (if the node came back meanwhile).
    pub pending_down: std::sync::Mutex<HashMap<String, Option<String>>>,
    /// Nodes whose agent is being checked or restarted over SSH now.
    pub healing: std::sync::Mutex<std::collections::HashSet<String>>,
}

fn fnv1a(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= *b as u64;
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

/// The checks of one node as a ConfigUpdate; its version is a hash of the content, so it is the
/// same across collector restarts and changes only when the node's checks change.
pub fn config_update(cfg: &Config, node: &str) -> v1::ConfigUpdate {
    let mut checks = Vec::new();
    let mut files = HashMap::new();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for s in cfg.services_of(node) {
        let spec_json = serde_json::to_string(&s.check).unwrap_or_default();
        fnv1a(&mut h, s.id.as_bytes());
        fnv1a(&mut h, &[0]);
        fnv1a(&mut h, spec_json.as_bytes());
        fnv1a(&mut h, &[0]);
        for a in s.check.attachments() {
            if let Some(bytes) = cfg.attachments.get(&a) {
                fnv1a(&mut h, a.as_bytes());
                fnv1a(&mut h, bytes);
                files.insert(a, bytes.clone());
            }
        }
        checks.push(v1::CheckAssignment {
            service_id: s.id.clone(),
            spec_json,
        });
    }
    let paused = !cfg.checks_enabled();
    fnv1a(&mut h, &[paused as u8]);
    v1::ConfigUpdate {
        version: h.max(1),
        checks,
        files,
        paused,
    }
}

impl Hub {
    pub fn new(store: Store, config: Config) -> Arc<Hub> {
        let alerts = Arc::new(crate::notify::Alerts::new(store.clone(), &config.notify));
        Arc::new_cyclic(|me| Hub {
            me: me.clone(),
            alerts,
            ssh: crate::ssh::SshPool::new(),
            metrics: crate::metrics::Metrics::new(),
            store,
            config: RwLock::new(Arc::new(config)),
            sessions: std::sync::Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            started_at: Utc::now(),
            results_expected_since: std::sync::Mutex::new(Utc::now()),
            pending_down: std::sync::Mutex::new(HashMap::new()),
            healing: std::sync::Mutex::new(Default::default()),
        })
    }

    pub async fn config(&self) -> Arc<Config> {
        self.config.read().await.clone()
    }

    /// Puts a new config in force: stored, then pushed to every connected agent.
    pub async fn apply(&self, cfg: Config) -> Result<(), crate::store::StoreError> {
        self.store.sync_config(&cfg).await?;
        let cfg = Arc::new(cfg);
        self.alerts.configure(&cfg.notify);
        *self.config.write().await = cfg.clone();
        let sessions: Vec<(String, Tx)> = self
            .sessions
            .lock()
            .expect("sessions lock")
            .iter()
            .map(|(n, s)| (n.clone(), s.tx.clone()))
            .collect();
        for (node, tx) in sessions {
            let update = config_update(&cfg, &node);
            tracing::info!(%node, version = update.version, checks = update.checks.len(), "pushing config");
            let _ = tx.send(Ok(msg(Out::Config(update)))).await;
        }
        Ok(())
    }

    /// A counted handle to this hub (None only while it is being dropped).
    pub fn arc(&self) -> Option<Arc<Hub>> {
        self.me.upgrade()
    }

    /// The outbound stream of `node`'s agent, if it is connected.
    pub fn session_tx(&self, node: &str) -> Option<Tx> {
        self.sessions
            .lock()
            .expect("sessions lock")
            .get(node)
            .map(|s| s.tx.clone())
    }

    /// Names of nodes whose agent is connected now.
    pub fn connected_nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .sessions
            .lock()
            .expect("sessions lock")
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    fn register(&self, node: &str, tx: Tx) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let old = self
            .sessions
            .lock()
            .expect("sessions lock")
            .insert(node.to_string(), Session { id, tx });
        if old.is_some() {
            tracing::warn!(%node, "a second stream for this node replaced the first one");
        }
        id
    }

    fn unregister(&self, node: &str, id: u64) -> bool {
        let mut s = self.sessions.lock().expect("sessions lock");
        if s.get(node).map(|x| x.id) == Some(id) {
            s.remove(node);
            true
        } else {
            false
        }
    }

    /// Ends every session (on shutdown).
    pub fn close_all(&self) {
        self.sessions.lock().expect("sessions lock").clear();
        self.count_agents();
    }

    /// Sets `vigil_agents_connected` (under the sessions lock, so concurrent updates stay in order).
    fn count_agents(&self) {
        let s = self.sessions.lock().expect("sessions lock");
        self.metrics.set_agents_connected(s.len());
    }
}

fn msg(m: Out) -> CollectorMessage {
    CollectorMessage { msg: Some(m) }
}

/// The tonic service.
pub struct AgentSvc {
    pub hub: Arc<Hub>,
}

/// 2000-01-01T00:00:00Z in ms: no result of a running agent is older.
const EARLIEST_PLAUSIBLE_MS: i64 = 946_684_800_000;

/// The start time to store for a result sent as `sent_ms` and received at `now_ms`: as sent,
/// unless it lies more than `max_skew` in the future or before 2000; then the receive time, with
/// the skew (sent minus received, ms).
pub fn plausible_start(sent_ms: i64, now_ms: i64, max_skew: Duration) -> (i64, Option<i64>) {
    let skew = max_skew.as_millis().min(i64::MAX as u128) as i64;
    if sent_ms > now_ms.saturating_add(skew) || sent_ms < EARLIEST_PLAUSIBLE_MS {
        (now_ms, Some(sent_ms.saturating_sub(now_ms)))
    } else {
        (sent_ms, None)
    }
}

/// Wire result → domain result, with every string NUL-free and bounded and at most
/// [`vigil_proto::sanitize::MAX_METRICS`] metrics (the agent did so already; a collector never
/// trusts it).
pub fn result_in(mut r: v1::CheckResult) -> ResultIn {
    vigil_proto::sanitize::result(&mut r);
    let metrics: Vec<vigil_checks::Metric> = r.metrics.into_iter().map(Into::into).collect();
    ResultIn {
        duration_us: r.duration_us,
        seq: r.seq,
        started_at: Utc
            .timestamp_millis_opt(r.started_at_ms)
            .single()
            .unwrap_or_else(Utc::now),
        duration_ms: r.duration_ms,
        status: vigil_proto::status_from_wire(r.status),
        message: r.message,
        output: r.output,
        service_id: r.service_id,
        metrics,
        config_version: r.config_version,
    }
}

impl AgentSvc {
    async fn hello(
        &self,
        peer: Option<SocketAddr>,
        cert_node: &str,
        inbound: &mut Streaming<AgentMessage>,
    ) -> Result<v1::Hello, Status> {
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 15s"))??;
        let hello = match first.and_then(|m| m.msg) {
            Some(In::Hello(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on the stream must be Hello",
                ));
            }
        };
        if hello.node != cert_node {
            tracing::warn!(
                peer = ?peer,
                certificate_node = ?cert_node,
                claimed_node = ?hello.node,
                "agent refused: it claims a node other than its certificate's"
            );
            return Err(Status::permission_denied(format!(
                "this agent's certificate is for node {cert_node:?} but it claims node {:?}; \
                 set node: {cert_node} in agent.yaml or issue a certificate for {:?}",
                hello.node, hello.node
            )));
        }
        let cfg = self.hub.config().await;
        if !cfg.nodes.iter().any(|n| n.name == hello.node) {
            tracing::warn!(peer = ?peer, node = ?hello.node, "agent refused: node not in collector.yaml");
            return Err(Status::permission_denied(format!(
                "node {:?} is not configured on this collector (add it under nodes: in collector.yaml)",
                hello.node
            )));
        }
        if hello.outbox_epoch == 0 || hello.outbox_epoch > i64::MAX as u64 {
            tracing::warn!(peer = ?peer, node = ?hello.node, epoch = hello.outbox_epoch, "agent refused: outbox epoch out of range");
            return Err(Status::invalid_argument(format!(
                "Hello.outbox_epoch must be in 1..=2^63-1, got {}; upgrade the agent (it renews an old epoch when it opens its outbox)",
                hello.outbox_epoch
            )));
        }
        Ok(hello)
    }
}

#[tonic::async_trait]
impl v1::agent_service_server::AgentService for AgentSvc {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<CollectorMessage, Status>> + Send>>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request.remote_addr();
        let Some(certs) = request.peer_certs().filter(|c| !c.is_empty()) else {
            tracing::warn!(peer = ?peer, "agent refused: no client certificate");
            return Err(Status::unauthenticated(
                "a client certificate signed by the collector's CA is required \
                 (vigil-collector ca issue --node NAME)",
            ));
        };
        let Some(cert_node) = node_of_certificate(&certs[0]) else {
            tracing::warn!(peer = ?peer, "agent refused: certificate has no common name");
            return Err(Status::unauthenticated(
                "the client certificate has no common name",
            ));
        };
        let mut inbound = request.into_inner();
        let hello = self.hello(peer, &cert_node, &mut inbound).await?;
        let node = hello.node.clone();
        let cfg = self.hub.config().await;

        let (tx, rx) = mpsc::channel(64);
        let welcome = v1::Welcome {
            node: node.clone(),
            collector_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let update = config_update(&cfg, &node);
        let _ = tx.send(Ok(msg(Out::Welcome(welcome)))).await;
        let _ = tx.send(Ok(msg(Out::Config(update)))).await;
        let id = self.hub.register(&node, tx.clone());
        self.hub.count_agents();
        let caps = hello.capabilities.clone().unwrap_or_default();
        let inventory: serde_json::Value = if hello.inventory_json.len() > 64 * 1024 {
            tracing::warn!(%node, "inventory over 64 KiB ignored");
            serde_json::Value::Null
        } else {
            serde_json::from_str(&hello.inventory_json).unwrap_or(serde_json::Value::Null)
        };
        let caps_json = serde_json::json!({
            "docker": caps.docker, "systemd": caps.systemd, "gpus": caps.gpus,
            "check_kinds": caps.check_kinds, "inventory": inventory,
        });
        if let Err(e) = self
            .hub
            .store
            .node_session(&node, true, &hello.agent_version, &caps_json)
            .await
        {
            tracing::error!(%node, error = %e, "cannot record agent connection");
        }
        if hello.agent_time_ms != 0 {
            let offset = hello
                .agent_time_ms
                .saturating_sub(Utc::now().timestamp_millis());
            let max = self.hub.config().await.max_clock_skew;
            if offset.unsigned_abs() as u128 > max.as_millis() {
                tracing::warn!(%node, offset_ms = offset, max_ms = max.as_millis() as u64,
                    "the node's clock is off by more than max_clock_skew");
            }
            if let Err(e) = self.hub.store.node_clock(&node, offset).await {
                tracing::error!(%node, error = %e, "cannot record the node's clock offset");
            }
        }
        if let Err(e) = self
            .hub
            .store
            .outbox_opened(&node, hello.outbox_epoch, hello.epoch_start_seq)
            .await
        {
            tracing::error!(%node, error = %e, "cannot record the agent's outbox");
        }
        if let Some(st) = &hello.status
            && let Err(e) = self
                .hub
                .store
                .outbox_status(&node, hello.outbox_epoch, &outbox_status(st))
                .await
        {
            tracing::error!(%node, error = %e, "cannot record the agent's backlog");
        }
        // Commands that waited for this agent go out now; those sent to it before (on a stream
        // that broke, or by this collector's previous run) go again and its journal decides.
        let hub = self.hub.clone();
        let n = node.clone();
        tokio::spawn(async move {
            crate::remediation::resend_to_agent(&hub, &n).await;
            if let Ok(rows) = hub.store.open_commands().await {
                for row in rows.iter().filter(|r| r.node == n && r.status == "pending") {
                    crate::remediation::dispatch(&hub, row).await;
                }
            }
        });
        tracing::info!(
            %node, peer = ?peer, agent_version = ?hello.agent_version,
            config_version = hello.config_version, first_unacked_seq = hello.first_unacked_seq,
            next_seq = hello.next_seq,
            backlog = hello.status.as_ref().map_or(0, |s| s.outbox_depth),
            "agent connected"
        );

        let hub = self.hub.clone();
        let epoch = hello.outbox_epoch;
        tokio::spawn(async move {
            let reason = run_session(&hub, &node, epoch, inbound, &tx).await;
            drop(tx);
            let gone = hub.unregister(&node, id);
            hub.count_agents();
            if gone
                && let Err(e) = hub
                    .store
                    .node_session(&node, false, "", &serde_json::Value::Null)
                    .await
            {
                tracing::error!(%node, error = %e, "cannot record agent disconnection");
            }
            crate::remediation::agent_gone(&hub, &node).await;
            tracing::info!(%node, reason = ?reason, "agent disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn outbox_status(s: &v1::AgentStatus) -> crate::store::OutboxStatus {
    crate::store::OutboxStatus {
        depth: s.outbox_depth,
        oldest_age_ms: s.oldest_unacked_age_ms,
        dropped_total: s.dropped_total,
        dropped_through_seq: s.dropped_through_seq,
    }
}

/// Serves one agent until it goes away; returns why it ended.
async fn run_session(
    hub: &Hub,
    node: &str,
    epoch: u64,
    mut inbound: Streaming<AgentMessage>,
    tx: &Tx,
) -> String {
    let timeout = {
        let cfg = hub.config().await;
        cfg.node(node)
            .map_or(cfg.node_timeout, |n| cfg.node_timeout_of(n))
    };
    let mut ping = tokio::time::interval(PING_EVERY.min(timeout / 3));
    ping.tick().await;
    let touch_every = TOUCH_EVERY.min(timeout / 4);
    // The Hello was recorded with last_seen = now().
    let mut touched = tokio::time::Instant::now();
    let mut dropped_total = None;
    let mut backlog_empty = None;
    let mut nonce = 0u64;
    loop {
        let next = tokio::select! {
            _ = hub.shutdown.cancelled() => return "collector shutting down".into(),
            _ = tx.closed() => return "stream closed".into(),
            _ = ping.tick() => {
                nonce += 1;
                let _ = tx.send(Ok(msg(Out::Ping(v1::Ping { nonce })))).await;
                continue;
            }
            m = tokio::time::timeout(IDLE_LIMIT, inbound.message()) => m,
        };
        let m = match next {
            Err(_) => return format!("nothing received for {}s", IDLE_LIMIT.as_secs()),
            Ok(Err(status)) => return format!("stream error: {}", status.message()),
            Ok(Ok(None)) => return "agent closed the stream".into(),
            Ok(Ok(Some(m))) => m,
        };
        // Any message is a sign of life (a status carries its own).
        let is_status = matches!(m.msg, Some(In::Status(_)));
        if !is_status && touched.elapsed() >= touch_every {
            touched = tokio::time::Instant::now();
            if let Err(e) = hub.store.touch_node(node).await {
                tracing::error!(%node, error = %e, "cannot record that the agent is alive");
            }
        }
        match m.msg {
            Some(In::Status(st)) => {
                // A drop is recorded before the batch that shows its gap is ingested, and a
                // backlog that appears or clears at once; otherwise at most every touch_every.
                let changed = dropped_total != Some(st.dropped_total)
                    || backlog_empty != Some(st.outbox_depth == 0);
                if changed || touched.elapsed() >= touch_every {
                    dropped_total = Some(st.dropped_total);
                    backlog_empty = Some(st.outbox_depth == 0);
                    touched = tokio::time::Instant::now();
                    if let Err(e) = hub
                        .store
                        .outbox_status(node, epoch, &outbox_status(&st))
                        .await
                    {
                        tracing::error!(%node, error = %e, "cannot record the agent's backlog");
                    }
                }
                hub.metrics
                    .set_backlog(node, st.outbox_depth, st.oldest_unacked_age_ms);
            }
            Some(In::Results(batch)) => {
                if let Err(status) = ingest(hub, node, batch, tx).await {
                    let text = status.message().to_string();
                    let _ = tx.send(Err(status)).await;
                    return text;
                }
            }
            Some(In::Pong(_)) => {}
            Some(In::CommandResult(r)) => {
                let ack = v1::CommandAck {
                    command_id: r.command_id.clone(),
                    issuer: r.issuer.clone(),
                };
                // Acknowledged once recorded: until then the agent keeps the outcome and sends
                // it again on its next stream.
                if crate::remediation::on_agent_result(hub, node, r).await {
                    let _ = tx.send(Ok(msg(Out::CommandAck(ack)))).await;
                }
            }
            Some(In::Hello(_)) => {
                let _ = tx
                    .send(Err(Status::invalid_argument(
                        "Hello may only be sent once per stream",
                    )))
                    .await;
                return "second Hello".into();
            }
            None => {}
        }
    }
}

async fn ingest(hub: &Hub, node: &str, batch: v1::ResultBatch, tx: &Tx) -> Result<(), Status> {
    if batch.results.len() > MAX_BATCH {
        tracing::warn!(%node, size = batch.results.len(), "batch refused: too many results");
        return Err(Status::invalid_argument(format!(
            "a batch holds at most {MAX_BATCH} results, got {}",
            batch.results.len()
        )));
    }
    if batch.outbox_epoch == 0 {
        return Err(Status::invalid_argument(
            "ResultBatch.outbox_epoch must not be 0",
        ));
    }
    if batch.outbox_epoch > i64::MAX as u64 {
        return Err(Status::invalid_argument(format!(
            "ResultBatch.outbox_epoch must be at most 2^63-1, got {}",
            batch.outbox_epoch
        )));
    }
    let Some(up_to) = batch.results.iter().map(|r| r.seq).max() else {
        return Ok(());
    };
    let cfg = hub.config().await;
    let thresholds = cfg.thresholds_of(node);
    let total = batch.results.len();
    // Results that cannot be stored under their key are refused, each with its reason, and
    // acknowledged with the batch: sending them again could never succeed.
    let mut refused: Vec<String> = Vec::new();
    let mut results: Vec<ResultIn> = Vec::with_capacity(total);
    let received_ms = Utc::now().timestamp_millis();
    let mut replaced_times: Vec<i64> = Vec::new();
    for mut r in batch.results {
        let (at, skew) = plausible_start(r.started_at_ms, received_ms, cfg.max_clock_skew);
        if let Some(skew) = skew {
            r.started_at_ms = at;
            replaced_times.push(skew);
        }
        if r.seq == 0 || r.seq > i64::MAX as u64 {
            let mut service = r.service_id;
            vigil_proto::sanitize::text(&mut service, 64);
            refused.push(format!(
                "result seq {} of service {service:?} refused: seq must be in 1..=2^63-1",
                r.seq
            ));
        } else if thresholds.contains_key(&r.service_id) {
            results.push(result_in(r));
        } else {
            let mut service = r.service_id;
            vigil_proto::sanitize::text(&mut service, 64);
            refused.push(format!(
                "result seq {} refused: service {service:?} is not assigned to node {node}",
                r.seq
            ));
        }
    }
    if let Some(&worst) = replaced_times.iter().max_by_key(|s| s.unsigned_abs()) {
        let reason = format!(
            "{} result(s) dated implausibly (up to {} s from the receive time, beyond \
             max_clock_skew or before 2000) stored with the receive time; check the node's clock",
            replaced_times.len(),
            worst / 1000
        );
        tracing::warn!(%node, results = replaced_times.len(), skew_ms = worst, "results with implausible times stored with the receive time");
        if let Err(e) = hub
            .store
            .clock_event(node, &reason, replaced_times.len() as i64)
            .await
        {
            tracing::error!(%node, error = %e, "cannot record the clock event");
        }
    }
    if !refused.is_empty() {
        tracing::warn!(
            %node, refused = refused.len(), first = ?refused[0],
            "results refused (not stored; acknowledged so that the agent does not send them again)"
        );
        hub.metrics.results_refused(node, refused.len());
        if let Err(e) = hub.store.refused(node, &refused).await {
            tracing::error!(%node, error = %e, "cannot record refused results");
        }
    }
    let started = std::time::Instant::now();
    let report = hub
        .store
        .ingest(node, batch.outbox_epoch, &results, &thresholds, crate::store::Dedupe::Outbox)
        .await
        .map_err(|e| {
            tracing::error!(%node, error = %e, "cannot store results; the agent keeps them and will resend");
            Status::unavailable(format!("the collector cannot store results now: {e}"))
        })?;
    for g in &report.gaps {
        hub.metrics.results_missing(node, g.lost, g.dropped);
    }
    if !report.replaced.is_empty() {
        hub.metrics.results_replaced(node, report.replaced.len());
    }
    hub.metrics.observe_ingest_batch(started.elapsed());
    for r in &results {
        let kind = cfg
            .service(&r.service_id)
            .map_or("unknown", |s| s.check.kind.name());
        let took = if r.duration_us > 0 {
            Duration::from_micros(r.duration_us)
        } else {
            Duration::from_millis(u64::from(r.duration_ms))
        };
        hub.metrics.observe_check(kind, took);
    }
    tracing::debug!(
        %node, inserted = report.inserted, duplicates = report.duplicates,
        elapsed_ms = started.elapsed().as_millis() as u64, "batch committed"
    );
    let _ = tx
        .send(Ok(msg(Out::Ack(v1::Ack {
            outbox_epoch: batch.outbox_epoch,
            up_to_seq: up_to,
        }))))
        .await;
    after_ingest(hub, node, &report).await;
    Ok(())
}

/// What follows committed results: log transitions and turn them into incidents and alerts
/// (the quiet rules — flapping, paused or stopped, maintenance, a dependency down — are decided
/// by the store from the database), then let remediation act on the services that are down.
pub async fn after_ingest(hub: &Hub, node: &str, report: &crate::store::IngestReport) {
    use crate::state::State;
    let cfg = hub.config().await;
    hub.metrics.ingested(&cfg, report);
    for service in &report.fresh_again {
        tracing::info!(%node, %service, "stale service has a result again");
        if let Some(svc) = cfg.service(service) {
            hub.alerts
                .service_event(&cfg, svc, "fresh", "a result arrived again")
                .await;
        }
    }
    // Flapping first: while it flaps, its down and recovered alerts are held back.
    for (service, f) in &report.flaps {
        let Some(svc) = cfg.service(service) else {
            continue;
        };
        if f.flapping {
            let reason = format!(
                "{:.0}% state change over the last 21 results; not restarted while flapping",
                f.percent
            );
            hub.alerts
                .service_event(&cfg, svc, "flapping", &reason)
                .await;
        } else {
            let now = report
                .states
                .iter()
                .find(|s| &s.service_id == service)
                .map_or("unknown".to_string(), |s| s.state.to_string());
            let reason = format!(
                "stopped flapping ({:.0}% state change over the last 21 results); now {now}",
                f.percent
            );
            hub.alerts.flapping_ended(&cfg, svc, &now, &reason).await;
        }
    }
    for (service, t) in &report.transitions {
        tracing::info!(%node, %service, from = %t.from, to = %t.to, reason = %t.reason, "service state changed");
        let Some(svc) = cfg.service(service) else {
            continue;
        };
        match t.to {
            State::Down => hub.alerts.service_event(&cfg, svc, "down", &t.reason).await,
            State::Healthy if t.from == State::Down => {
                hub.alerts
                    .service_event(&cfg, svc, "recovered", &t.reason)
                    .await
            }
            _ => {}
        }
    }
    let ids: Vec<String> = report
        .states
        .iter()
        .filter(|s| s.state == State::Down && s.mode == "active")
        .map(|s| s.service_id.clone())
        .collect();
    crate::remediation::evaluate(hub, &ids).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implausible_start_times_become_the_receive_time() {
        let now = 1_800_000_000_000; // 2027
        let max = Duration::from_secs(300);
        assert_eq!(plausible_start(now - 5_000, now, max), (now - 5_000, None));
        assert_eq!(
            plausible_start(now + 299_000, now, max),
            (now + 299_000, None)
        );
        // An hour old is plausible (a backlog); five minutes and one second ahead is not.
        assert_eq!(plausible_start(now - 3_600_000, now, max).1, None);
        assert_eq!(
            plausible_start(now + 301_000, now, max),
            (now, Some(301_000))
        );
        // 2100 and 1969.
        let y2100 = 4_102_444_800_000;
        assert_eq!(plausible_start(y2100, now, max), (now, Some(y2100 - now)));
        assert_eq!(plausible_start(-1_000, now, max), (now, Some(-1_000 - now)));
        assert_eq!(plausible_start(0, now, max).0, now);
        assert_eq!(plausible_start(i64::MIN, now, max).0, now);
        assert_eq!(plausible_start(i64::MAX, now, max).0, now);
    }
}
