//! Simulated agents: one real mTLS gRPC stream each (tonic client, the agent's own protocol),
//! Hello, then result batches with an outbox epoch and increasing seq, at most 500 results per
//! batch and 5,000 unacknowledged (as the real agent), acks timed per result; Commands are
//! answered with a successful CommandResult and reported to the latency probe.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use vigil_proto::v1::{
    self, AgentMessage, agent_message::Msg as In, agent_service_client::AgentServiceClient,
    collector_message::Msg as Out,
};

/// Most results in one batch (the real agent's `MAX_BATCH`).
pub const BATCH_MAX: usize = 500;
/// Most results sent and not acknowledged (the real agent's `MAX_IN_FLIGHT`).
pub const IN_FLIGHT_MAX: usize = 5_000;

/// Counters and latencies shared by every simulated agent.
#[derive(Default)]
pub struct Shared {
    pub connected: AtomicUsize,
    pub ended: AtomicUsize,
    pub acked: AtomicU64,
    pub sent: AtomicU64,
    /// Latencies are kept only while this is 1.
    pub measuring: AtomicUsize,
    /// (send -> ack, µs; results) per acknowledged batch.
    pub send_ack: Mutex<Vec<(u64, u64)>>,
    /// (created -> ack, µs; results) per group of results created together.
    pub created_ack: Mutex<Vec<(u64, u64)>>,
    pub errors: Mutex<Vec<String>>,
}

impl Shared {
    pub fn error(&self, e: String) {
        let mut v = self.errors.lock().expect("errors lock");
        if v.len() < 20 {
            v.push(e);
        }
    }
}

/// What a probe asks an agent to do.
pub enum Control {
    /// Send one CRITICAL result for the agent's check `check` now.
    Fail { check: usize },
    /// Send one OK result for every check now.
    AllOk,
}

/// A Command that arrived: service id and when.
pub struct Arrived {
    pub service_id: String,
    pub at: Instant,
}

/// How one simulated agent behaves.
#[derive(Clone)]
pub struct Behaviour {
    /// Results per second this agent produces (spread over its checks); 0 for none.
    pub rate: f64,
    /// How often results are produced (and sent).
    pub tick: Duration,
}

/// A connected simulated agent.
pub struct AgentSim {
    pub control: mpsc::Sender<Control>,
    pub task: tokio::task::JoinHandle<()>,
}

/// The client TLS config for `node`.
pub fn tls_for(certs: &Path, node: &str) -> anyhow::Result<ClientTlsConfig> {
    let ca = std::fs::read(certs.join("ca.pem"))?;
    let cert = std::fs::read(certs.join(format!("{node}.pem")))?;
    let key = std::fs::read(certs.join(format!("{node}.key")))?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name("localhost"))
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// One result as an agent sends it: a check that answered in a few ms, with one metric.
pub fn result(
    seq: u64,
    service_id: &str,
    status: v1::Status,
    config_version: u64,
) -> v1::CheckResult {
    let ms = 2 + (seq % 7) as u32;
    v1::CheckResult {
        seq,
        service_id: service_id.to_string(),
        started_at_ms: now_ms(),
        duration_ms: ms,
        status: status as i32,
        message: if status == v1::Status::Ok {
            format!("OK - answered in {ms} ms")
        } else {
            "CRITICAL - connection refused".to_string()
        },
        metrics: vec![v1::Metric {
            label: "time".into(),
            value: ms as f64 / 1000.0,
            unit: "s".into(),
            warn: "1".into(),
            crit: "5".into(),
            min: Some(0.0),
            max: None,
        }],
        output: String::new(),
        config_version,
        exit_code: None,
        duration_us: 0,
    }
}

/// Opens the stream for `node` (Hello sent), waits for Welcome, then runs the agent in a task.
#[allow(clippy::too_many_arguments)]
pub async fn start(
    certs: &Path,
    addr: SocketAddr,
    node: String,
    checks: Vec<String>,
    behaviour: Behaviour,
    shared: Arc<Shared>,
    commands: Option<mpsc::UnboundedSender<Arrived>>,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<AgentSim> {
    let channel = Channel::from_shared(format!("https://{addr}"))?
        .tls_config(tls_for(certs, &node)?)?
        .connect_timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("{node}: connect"))?;
    // In 1..=2^63-1: the collector refuses other epochs.
    let epoch: u64 = (rand::random::<u64>() >> 1) | 1;
    let (tx, rx) = mpsc::channel::<AgentMessage>(16);
    tx.send(AgentMessage {
        msg: Some(In::Hello(v1::Hello {
            node: node.clone(),
            agent_version: "vigil-bench".into(),
            capabilities: None,
            config_version: 0,
            outbox_epoch: epoch,
            first_unacked_seq: 1,
            inventory_json: String::new(),
            next_seq: 1,
            ..Default::default()
        })),
    })
    .await?;
    let mut inbound = AgentServiceClient::new(channel)
        .max_decoding_message_size(vigil_proto::MAX_MESSAGE_BYTES)
        .session(ReceiverStream::new(rx))
        .await
        .with_context(|| format!("{node}: session"))?
        .into_inner();
    let config_version;
    let deadline = Instant::now() + Duration::from_secs(60);
    // Welcome, then the ConfigUpdate.
    loop {
        let m = tokio::time::timeout_at(deadline.into(), inbound.next())
            .await
            .with_context(|| format!("{node}: no ConfigUpdate"))?;
        match m {
            Some(Ok(m)) => {
                if let Some(Out::Config(c)) = m.msg {
                    config_version = c.version;
                    break;
                }
            }
            Some(Err(s)) => anyhow::bail!("{node}: {s}"),
            None => anyhow::bail!("{node}: stream ended before the ConfigUpdate"),
        }
    }
    shared.connected.fetch_add(1, Ordering::Relaxed);
    let (ctl_tx, ctl_rx) = mpsc::channel(16);
    let mut agent = Running {
        node,
        checks,
        epoch,
        config_version,
        next_seq: 1,
        tx,
        pending: VecDeque::new(),
        pending_n: 0,
        urgent: Vec::new(),
        in_flight: VecDeque::new(),
        in_flight_n: 0,
        carry: 0.0,
        next_check: 0,
        shared: shared.clone(),
        commands,
    };
    let task = tokio::spawn(async move {
        let why = agent.run(&mut inbound, ctl_rx, behaviour, stop).await;
        shared.connected.fetch_sub(1, Ordering::Relaxed);
        if let Err(e) = why {
            shared.ended.fetch_add(1, Ordering::Relaxed);
            shared.error(format!("{}: {e:#}", agent.node));
        }
    });
    Ok(AgentSim {
        control: ctl_tx,
        task,
    })
}

struct Batch {
    up_to: u64,
    sent_at: Instant,
    count: usize,
    /// (created, results) groups in this batch.
    groups: Vec<(Instant, usize)>,
}

struct Running {
    node: String,
    checks: Vec<String>,
    epoch: u64,
    config_version: u64,
    next_seq: u64,
    tx: mpsc::Sender<AgentMessage>,
    /// Results waiting to be sent: (created, how many).
    pending: VecDeque<(Instant, usize)>,
    pending_n: usize,
    /// Results to send before anything else (probes).
    urgent: Vec<v1::CheckResult>,
    in_flight: VecDeque<Batch>,
    in_flight_n: usize,
    carry: f64,
    next_check: usize,
    shared: Arc<Shared>,
    commands: Option<mpsc::UnboundedSender<Arrived>>,
}

impl Running {
    async fn run(
        &mut self,
        inbound: &mut tonic::Streaming<v1::CollectorMessage>,
        mut ctl: mpsc::Receiver<Control>,
        b: Behaviour,
        stop: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<()> {
        // Spread the agents' ticks over the period.
        let offset =
            Duration::from_micros(rand::random::<u64>() % b.tick.as_micros().max(1) as u64);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, b.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tick.tick(), if b.rate > 0.0 => {
                    let now = Instant::now();
                    self.carry += b.rate * now.duration_since(last).as_secs_f64();
                    last = now;
                    let n = self.carry.floor() as usize;
                    self.carry -= n as f64;
                    if n > 0 {
                        self.pending.push_back((now, n));
                        self.pending_n += n;
                    }
                }
                c = ctl.recv() => match c {
                    Some(Control::Fail { check }) => {
                        let seq = self.seq();
                        let id = self.checks[check % self.checks.len()].clone();
                        self.urgent.push(result(seq, &id, v1::Status::Critical, self.config_version));
                    }
                    Some(Control::AllOk) => {
                        for i in 0..self.checks.len() {
                            let seq = self.seq();
                            let id = self.checks[i].clone();
                            self.urgent.push(result(seq, &id, v1::Status::Ok, self.config_version));
                        }
                    }
                    None => return Ok(()),
                },
                m = inbound.next() => match m {
                    None => anyhow::bail!("the collector ended the stream"),
                    Some(Err(s)) => anyhow::bail!("stream error: {s}"),
                    Some(Ok(m)) => self.on_message(m).await?,
                },
            }
            self.send().await?;
        }
    }

    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    async fn on_message(&mut self, m: v1::CollectorMessage) -> anyhow::Result<()> {
        match m.msg {
            Some(Out::Ack(a)) => {
                let now = Instant::now();
                let measuring = self.shared.measuring.load(Ordering::Relaxed) == 1;
                let mut acked = 0;
                while self
                    .in_flight
                    .front()
                    .is_some_and(|b| b.up_to <= a.up_to_seq)
                {
                    let b = self.in_flight.pop_front().expect("front");
                    self.in_flight_n -= b.count;
                    acked += b.count as u64;
                    if measuring && !b.groups.is_empty() {
                        let us = now.duration_since(b.sent_at).as_micros() as u64;
                        self.shared
                            .send_ack
                            .lock()
                            .expect("lock")
                            .push((us, b.count as u64));
                        let mut c = self.shared.created_ack.lock().expect("lock");
                        for (created, n) in &b.groups {
                            c.push((now.duration_since(*created).as_micros() as u64, *n as u64));
                        }
                    }
                }
                self.shared.acked.fetch_add(acked, Ordering::Relaxed);
            }
            Some(Out::Ping(p)) => {
                self.tx
                    .send(AgentMessage {
                        msg: Some(In::Pong(v1::Pong { nonce: p.nonce })),
                    })
                    .await?;
            }
            Some(Out::Command(c)) => {
                if let Some(tx) = &self.commands {
                    let _ = tx.send(Arrived {
                        service_id: c.service_id.clone(),
                        at: Instant::now(),
                    });
                }
                self.tx
                    .send(AgentMessage {
                        msg: Some(In::CommandResult(v1::CommandResult {
                            command_id: c.command_id,
                            success: true,
                            exit_code: 0,
                            output: String::new(),
                            duration_ms: 1,
                            timed_out: false,
                            check: None,
                            issuer: c.issuer,
                            ..Default::default()
                        })),
                    })
                    .await?;
            }
            Some(Out::Config(c)) => self.config_version = c.version,
            _ => {}
        }
        Ok(())
    }

    /// Sends batches while there are results and room (unacknowledged results < 5,000).
    async fn send(&mut self) -> anyhow::Result<()> {
        if !self.urgent.is_empty() {
            let results = std::mem::take(&mut self.urgent);
            let up_to = results.last().map_or(0, |r| r.seq);
            self.in_flight.push_back(Batch {
                up_to,
                sent_at: Instant::now(),
                count: results.len(),
                groups: Vec::new(),
            });
            self.in_flight_n += results.len();
            self.shared
                .sent
                .fetch_add(results.len() as u64, Ordering::Relaxed);
            self.push(results).await?;
        }
        while self.pending_n > 0 && self.in_flight_n < IN_FLIGHT_MAX {
            let room = (IN_FLIGHT_MAX - self.in_flight_n).min(BATCH_MAX);
            let mut results = Vec::with_capacity(room.min(self.pending_n));
            let mut groups = Vec::new();
            while results.len() < room {
                let Some(&(created, n)) = self.pending.front() else {
                    break;
                };
                let take = n.min(room - results.len());
                for _ in 0..take {
                    let seq = self.seq();
                    let id = &self.checks[self.next_check % self.checks.len()];
                    self.next_check += 1;
                    results.push(result(seq, id, v1::Status::Ok, self.config_version));
                }
                groups.push((created, take));
                if take == n {
                    self.pending.pop_front();
                } else if let Some(front) = self.pending.front_mut() {
                    front.1 -= take;
                }
            }
            self.pending_n -= results.len();
            let up_to = results.last().map_or(0, |r| r.seq);
            self.in_flight.push_back(Batch {
                up_to,
                sent_at: Instant::now(),
                count: results.len(),
                groups,
            });
            self.in_flight_n += results.len();
            self.shared
                .sent
                .fetch_add(results.len() as u64, Ordering::Relaxed);
            self.push(results).await?;
        }
        Ok(())
    }

    async fn push(&mut self, results: Vec<v1::CheckResult>) -> anyhow::Result<()> {
        self.tx
            .send(AgentMessage {
                msg: Some(In::Results(v1::ResultBatch {
                    outbox_epoch: self.epoch,
                    results,
                })),
            })
            .await
            .map_err(|_| anyhow::anyhow!("request stream closed"))
    }
}

/// Weighted percentile (`p` in 0..=100) of (value, weight) pairs; sorts them.
pub fn percentile(v: &mut [(u64, u64)], p: f64) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable_by_key(|x| x.0);
    let total: u64 = v.iter().map(|x| x.1).sum();
    let target = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
    let mut acc = 0;
    for (val, w) in v.iter() {
        acc += w;
        if acc >= target {
            return Some(*val);
        }
    }
    v.last().map(|x| x.0)
}
