//! The agent's stream against a minimal fake collector (a real tonic server with mutual TLS and
//! certificates made by rcgen): hello, welcome, config, batches, acks, ping, command, refusal,
//! resending after a reconnect, running the cached config without a collector; the hello's view
//! of the outbox, no result lost when results are appended while a slow collector answers the
//! hello, the status heartbeat, a deliberate drop reported before the gap, and an older agent's
//! outbox (epoch above i64::MAX, unbounded results) sent under a new epoch in batches below 1 MiB.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::Routes;
use tonic::{Request, Response, Status, Streaming};
use vigil_agent::cache::ConfigCache;
use vigil_agent::client::{MAX_BATCH_BYTES, MAX_IN_FLIGHT_BYTES};
use vigil_agent::outbox::{self, Outbox};
use vigil_agent::{Agent, AgentConfig, AgentHandle, AgentOptions, ConnState};
use vigil_proto::agent_message::Msg as Out;
use vigil_proto::agent_service_server::{AgentService, AgentServiceServer};
use vigil_proto::collector_message::Msg as In;
use vigil_proto::{
    Ack, AgentMessage, AgentStatus, CheckAssignment, CheckResult, CollectorMessage, Command,
    ConfigUpdate, Hello, Metric, Ping, Welcome, sanitize,
};
use vigil_testkit::grpc;
use vigil_testkit::pki::Pki;

const NODE: &str = "node-a";
const DEADLINE: Duration = Duration::from_secs(30);

/// What the fake collector saw.
#[derive(Debug, Clone)]
enum Event {
    Connected(Instant),
    Hello(Box<Hello>),
    Batch {
        epoch: u64,
        seqs: Vec<u64>,
        /// The `ResultBatch` message, encoded.
        bytes: usize,
        /// The largest result in it, encoded.
        largest: usize,
        /// The most metrics one of its results carries.
        most_metrics: usize,
    },
    Status(AgentStatus, Instant),
    Pong(u64),
    CommandResult {
        id: String,
        success: bool,
        output: String,
    },
}

struct Fake {
    events: mpsc::UnboundedSender<Event>,
    /// Answer every session with PermissionDenied.
    refuse: bool,
    /// Ack each batch once received.
    ack: Arc<AtomicBool>,
    /// End the stream after this many results in this session (0: never).
    drop_after: Arc<AtomicUsize>,
    /// Answer a session this many milliseconds late (a slow collector).
    answer_delay_ms: Arc<AtomicU64>,
    /// Welcome is sent only while this is true.
    welcome_open: watch::Sender<bool>,
}

fn config_update() -> ConfigUpdate {
    ConfigUpdate {
        version: 5,
        checks: vec![CheckAssignment {
            service_id: "true".into(),
            spec_json: r#"{"type":"command","argv":["/bin/true"],"interval":"1s"}"#.into(),
        }],
        ..Default::default()
    }
}

fn msg(m: In) -> Result<CollectorMessage, Status> {
    Ok(CollectorMessage { msg: Some(m) })
}

#[tonic::async_trait]
impl AgentService for Fake {
    type SessionStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<CollectorMessage, Status>> + Send>>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let _ = self.events.send(Event::Connected(Instant::now()));
        let delay = self.answer_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.refuse {
            return Err(Status::permission_denied(
                "node \"node-a\" does not match the certificate CN \"other\"",
            ));
        }
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let events = self.events.clone();
        let ack = self.ack.clone();
        let drop_after = self.drop_after.load(Ordering::SeqCst);
        let mut welcome_open = self.welcome_open.subscribe();
        tokio::spawn(async move {
            let mut received = 0usize;
            while let Ok(Some(m)) = inbound.message().await {
                match m.msg {
                    Some(Out::Hello(h)) => {
                        let _ = events.send(Event::Hello(Box::new(h)));
                        if welcome_open.wait_for(|open| *open).await.is_err() {
                            return;
                        }
                        let _ = tx
                            .send(msg(In::Welcome(Welcome {
                                node: NODE.into(),
                                collector_version: "fake".into(),
                            })))
                            .await;
                        let _ = tx.send(msg(In::Config(config_update()))).await;
                        let _ = tx.send(msg(In::Ping(Ping { nonce: 42 }))).await;
                        let _ = tx
                            .send(msg(In::Command(Command {
                                command_id: "c1".into(),
                                service_id: "true".into(),
                                action: "restart".into(),
                                deadline_ms: 0,
                                plan_json: "not a plan".into(),
                                ..Default::default()
                            })))
                            .await;
                    }
                    Some(Out::Results(b)) => {
                        let seqs: Vec<u64> = b.results.iter().map(|r| r.seq).collect();
                        received += seqs.len();
                        let last = *seqs.last().unwrap();
                        let _ = events.send(Event::Batch {
                            epoch: b.outbox_epoch,
                            seqs,
                            bytes: b.encoded_len(),
                            largest: b.results.iter().map(|r| r.encoded_len()).max().unwrap_or(0),
                            most_metrics: b
                                .results
                                .iter()
                                .map(|r| r.metrics.len())
                                .max()
                                .unwrap_or(0),
                        });
                        if ack.load(Ordering::SeqCst) {
                            let _ = tx
                                .send(msg(In::Ack(Ack {
                                    outbox_epoch: b.outbox_epoch,
                                    up_to_seq: last,
                                })))
                                .await;
                        }
                        if drop_after > 0 && received >= drop_after {
                            let _ = tx.send(Err(Status::unavailable("fake restarts"))).await;
                            return;
                        }
                    }
                    Some(Out::Status(st)) => {
                        let _ = events.send(Event::Status(st, Instant::now()));
                    }
                    Some(Out::Pong(p)) => {
                        let _ = events.send(Event::Pong(p.nonce));
                    }
                    Some(Out::CommandResult(c)) => {
                        let _ = events.send(Event::CommandResult {
                            id: c.command_id,
                            success: c.success,
                            output: c.output,
                        });
                    }
                    None => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct FakeCollector {
    addr: SocketAddr,
    events: mpsc::UnboundedReceiver<Event>,
    ack: Arc<AtomicBool>,
    drop_after: Arc<AtomicUsize>,
    answer_delay_ms: Arc<AtomicU64>,
    welcome_open: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeCollector {
    async fn start(pki: &Pki, refuse: bool) -> Self {
        let (etx, events) = mpsc::unbounded_channel();
        let ack = Arc::new(AtomicBool::new(true));
        let drop_after = Arc::new(AtomicUsize::new(0));
        let answer_delay_ms = Arc::new(AtomicU64::new(0));
        let welcome_open = watch::Sender::new(true);
        let fake = Fake {
            events: etx,
            refuse,
            ack: ack.clone(),
            drop_after: drop_after.clone(),
            answer_delay_ms: answer_delay_ms.clone(),
            welcome_open: welcome_open.clone(),
        };
        let server = grpc::serve_mtls(pki, Routes::new(AgentServiceServer::new(fake))).await;
        FakeCollector {
            addr: server.addr,
            events,
            ack,
            drop_after,
            answer_delay_ms,
            welcome_open,
            task: server.task,
        }
    }

    /// Waits for an event matching `pred`, skipping others.
    async fn expect<T>(&mut self, what: &str, pred: impl FnMut(&Event) -> Option<T>) -> T {
        grpc::expect(&mut self.events, what, DEADLINE, pred).await
    }
}

fn agent_config(pki: &Pki, state_dir: &Path, url: &str) -> AgentConfig {
    agent_config_with(pki, state_dir, url, "")
}

/// [`agent_config`] with more agent.yaml lines.
fn agent_config_with(pki: &Pki, state_dir: &Path, url: &str, extra: &str) -> AgentConfig {
    let yaml = pki.agent_yaml(url, state_dir, extra);
    AgentConfig::from_yaml(&yaml, &pki.path().join("agent.yaml")).unwrap()
}

async fn wait_state(
    agent: &AgentHandle,
    what: &str,
    pred: impl Fn(&ConnState) -> bool,
) -> ConnState {
    let mut rx = agent.state();
    let r = tokio::time::timeout(DEADLINE, rx.wait_for(|s| pred(s)))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "timed out waiting for state {what}; now {:?}",
                *agent.state().borrow()
            )
        });
    r.unwrap().clone()
}

async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn stream_delivers_results_and_handles_collector_messages() {
    let pki = Pki::new(NODE);
    let state = tempfile::tempdir().unwrap();
    let mut fake = FakeCollector::start(&pki, false).await;
    let url = format!("https://127.0.0.1:{}", fake.addr.port());
    let agent = Agent::start(agent_config(&pki, state.path(), &url))
        .await
        .unwrap();

    let hello = fake
        .expect("hello", |e| match e {
            Event::Hello(h) => Some(h.as_ref().clone()),
            _ => None,
        })
        .await;
    assert_eq!(hello.node, NODE);
    assert_eq!(hello.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(hello.config_version, 0);
    assert_eq!(hello.first_unacked_seq, 0);
    assert_eq!(hello.outbox_epoch, agent.outbox_epoch());
    assert!((1..=i64::MAX as u64).contains(&hello.outbox_epoch));
    assert_eq!((hello.next_seq, hello.epoch_start_seq), (1, 1));
    assert_eq!(hello.status, Some(AgentStatus::default()));
    let kinds = hello.capabilities.unwrap().check_kinds;
    assert_eq!(kinds, vigil_checks::KINDS);
    // The hello carries what the node is.
    let inventory: serde_json::Value =
        serde_json::from_str(&hello.inventory_json).unwrap_or_else(|e| {
            panic!(
                "inventory_json is not JSON ({e}): {:?}",
                hello.inventory_json
            )
        });
    assert!(
        inventory["cpu_count"].as_u64().is_some_and(|n| n > 0),
        "{inventory}"
    );
    assert!(
        inventory["kernel"].as_str().is_some_and(|k| !k.is_empty()),
        "{inventory}"
    );

    let s = wait_state(&agent, "connected", |s| {
        matches!(s, ConnState::Connected { .. })
    })
    .await;
    assert_eq!(s, ConnState::Connected { node: NODE.into() });

    fake.expect("pong", |e| matches!(e, Event::Pong(42)).then_some(()))
        .await;
    let (success, output) = fake
        .expect("command result", |e| match e {
            Event::CommandResult {
                id,
                success,
                output,
            } if id == "c1" => Some((*success, output.clone())),
            _ => None,
        })
        .await;
    assert!(!success);
    assert!(output.contains("cannot read the plan"), "{output}");

    // Results of the assigned check arrive in seq order, in this outbox's epoch.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (epoch, seqs) = fake
            .expect("a result batch", |e| match e {
                Event::Batch { epoch, seqs, .. } => Some((*epoch, seqs.clone())),
                _ => None,
            })
            .await;
        assert_eq!(epoch, agent.outbox_epoch());
        seen.extend(seqs);
    }
    assert_eq!(seen[..2], [1, 2]);
    assert_eq!(agent.config_version().await, 5);
    assert!(state.path().join("config.pb").exists());
    // Acked results leave the outbox.
    wait_until("the outbox to empty", || async {
        agent.outbox_len().await == 0
    })
    .await;

    agent.shutdown().await;
    fake.task.abort();
}

#[tokio::test]
async fn unacked_results_are_resent_after_reconnect_and_cached_config_runs_offline() {
    let pki = Pki::new(NODE);
    let state = tempfile::tempdir().unwrap();
    let mut fake = FakeCollector::start(&pki, false).await;
    fake.ack.store(false, Ordering::SeqCst);
    fake.drop_after.store(2, Ordering::SeqCst);
    let url = format!("https://127.0.0.1:{}", fake.addr.port());
    let agent = Agent::start(agent_config(&pki, state.path(), &url))
        .await
        .unwrap();

    let mut first = Vec::new();
    while first.len() < 2 {
        let seqs = fake
            .expect("batch", |e| match e {
                Event::Batch { seqs, .. } => Some(seqs.clone()),
                _ => None,
            })
            .await;
        first.extend(seqs);
    }
    // The fake dropped the stream without acking; the next session starts at seq 1 again.
    fake.drop_after.store(0, Ordering::SeqCst);
    fake.ack.store(true, Ordering::SeqCst);
    let hello = fake
        .expect("second hello", |e| match e {
            Event::Hello(h) => Some(h.as_ref().clone()),
            _ => None,
        })
        .await;
    assert_eq!(hello.first_unacked_seq, 1);
    assert_eq!(hello.config_version, 5);
    let seqs = fake
        .expect("resent batch", |e| match e {
            Event::Batch { seqs, .. } => Some(seqs.clone()),
            _ => None,
        })
        .await;
    assert_eq!(seqs[0], 1, "{seqs:?}");
    assert!(seqs.len() >= 2, "{seqs:?}");
    let epoch = agent.outbox_epoch();
    agent.shutdown().await;
    fake.task.abort();

    // Restart without any collector: the cached config runs at once and fills the outbox.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}", closed.local_addr().unwrap().port());
    drop(closed);
    let agent = Agent::start(agent_config(&pki, state.path(), &url))
        .await
        .unwrap();
    assert_eq!(agent.outbox_epoch(), epoch);
    assert_eq!(agent.config_version().await, 5);
    let before = agent.outbox_len().await;
    wait_until("results while offline", || async {
        agent.outbox_len().await >= before + 2
    })
    .await;
    wait_state(&agent, "disconnected", |s| {
        matches!(s, ConnState::Disconnected { .. })
    })
    .await;
    agent.shutdown().await;
}

#[tokio::test]
async fn refused_agent_reports_it_and_backs_off() {
    let pki = Pki::new(NODE);
    let state = tempfile::tempdir().unwrap();
    let mut fake = FakeCollector::start(&pki, true).await;
    let url = format!("https://127.0.0.1:{}", fake.addr.port());
    let agent = Agent::start(agent_config(&pki, state.path(), &url))
        .await
        .unwrap();

    let s = wait_state(&agent, "refused", |s| {
        matches!(s, ConnState::Refused { .. })
    })
    .await;
    let ConnState::Refused { reason } = s else {
        unreachable!()
    };
    assert!(reason.contains("does not match"), "{reason}");

    // Attempts 1, 2, 3 are at least 150 ms + 300 ms apart (200 ms, then 400 ms, minus jitter).
    let mut at = Vec::new();
    for _ in 0..3 {
        at.push(
            fake.expect("an attempt", |e| match e {
                Event::Connected(t) => Some(*t),
                _ => None,
            })
            .await,
        );
    }
    let spread = at[2] - at[0];
    assert!(spread >= Duration::from_millis(450), "{spread:?}");
    agent.shutdown().await;
    fake.task.abort();
}

#[tokio::test]
async fn unreadable_tls_file_fails_start_naming_it() {
    let pki = Pki::new(NODE);
    let state = tempfile::tempdir().unwrap();
    let mut config = agent_config(&pki, state.path(), "https://127.0.0.1:1");
    config.tls.key = pki.path().join("missing.key");
    let err = Agent::start(config).await.err().expect("start must fail");
    assert!(err.to_string().contains("missing.key"), "{err}");

    let mut config = agent_config(&pki, state.path(), "https://127.0.0.1:1");
    std::fs::write(pki.path().join("garbage.pem"), "not a certificate").unwrap();
    config.tls.cert = pki.path().join("garbage.pem");
    let err = Agent::start(config).await.err().expect("start must fail");
    assert!(err.to_string().contains("garbage.pem"), "{err}");
}

/// Every seq the outbox ever assigned was delivered to the fake or is still held: none was
/// silently lost. Reads the outbox file after the agent has shut down.
fn assert_none_lost(state_dir: &Path, delivered: &BTreeSet<u64>) -> u64 {
    let ob = Outbox::open(&state_dir.join(outbox::FILE_NAME), 1_000_000).unwrap();
    let p = ob.pending(0, usize::MAX, usize::MAX).unwrap();
    let next_seq = p.outbox.next_seq;
    let held: BTreeSet<u64> = p.results.iter().map(|r| r.seq).collect();
    let lost: Vec<u64> = (1..next_seq)
        .filter(|s| !delivered.contains(s) && !held.contains(s))
        .collect();
    assert!(
        lost.is_empty(),
        "seqs neither delivered nor held: {lost:?} (next_seq {next_seq}, held {held:?})"
    );
    next_seq
}

/// The hello race: with a collector that answers the session a second late, a result appended
/// while the hello is in flight must still be sent. (The agent used to read `first_unacked` for
/// the hello and `next_seq` after the answer, counting such results as acknowledged; the next ack
/// deleted them.) Six sessions, each acked and ended by the fake after its first batch.
#[tokio::test]
async fn results_appended_while_the_hello_is_answered_are_not_lost() {
    let pki = Pki::new(NODE);
    let state = tempfile::tempdir().unwrap();
    let mut fake = FakeCollector::start(&pki, false).await;
    fake.answer_delay_ms.store(1000, Ordering::SeqCst);
    fake.drop_after.store(1, Ordering::SeqCst);
    let url = format!("https://127.0.0.1:{}", fake.addr.port());
    let agent = Agent::start(agent_config(&pki, state.path(), &url))
        .await
        .unwrap();

    let mut delivered = BTreeSet::new();
    let mut hellos = 0;
    while hellos < 7 {
        match fake
            .expect("a hello or a batch", |e| match e {
                Event::Hello(_) | Event::Batch { .. } => Some(e.clone()),
                _ => None,
            })
            .await
        {
            Event::Hello(_) => hellos += 1,
            Event::Batch { seqs, .. } => delivered.extend(seqs),
            _ => unreachable!(),
        }
    }
    agent.shutdown().await;
    fake.task.abort();
    while let Ok(e) = fake.events.try_recv() {
        if let Event::Batch { seqs, .. } = e {
            delivered.extend(seqs);
        }
    }
    let next_seq = assert_none_lost(state.path(), &delivered);
    assert!(next_seq > 5, "too few results to tell: next_seq {next_seq}");
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn result(service: &str, started_at_ms: i64) -> CheckResult {
    CheckResult {
        service_id: service.into(),
        started_at_ms,
        status: vigil_proto::Status::Ok as i32,
        message: format!("{service} ok"),
        ..Default::default()
    }
}

/// Waits for a Hello.
async fn hello(fake: &mut FakeCollector) -> Hello {
    fake.expect("hello", |e| match e {
        Event::Hello(h) => Some(h.as_ref().clone()),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn hello_carries_next_seq_epoch_start_and_status_of_the_outbox() {
    let pki = Pki::new(NODE);
    let state = tempfile::tempdir().unwrap();
    // An outbox left by an earlier run: 8 results, 3 dropped (bound 5), 4 acknowledged.
    let started = now_ms() - 60_000;
    let epoch = {
        let ob = Outbox::open(&state.path().join(outbox::FILE_NAME), 5).unwrap();
        for i in 1..=8 {
            ob.append(result(&format!("r{i}"), started + i)).unwrap();
        }
        ob.ack(ob.epoch(), 4).unwrap();
        ob.epoch()
    };
    let mut fake = FakeCollector::start(&pki, false).await;
    let url = format!("https://127.0.0.1:{}", fake.addr.port());
    let agent = Agent::start(agent_config(&pki, state.path(), &url))
        .await
        .unwrap();
    let h = hello(&mut fake).await;
    assert_eq!(h.outbox_epoch, epoch);
    assert_eq!(
        (h.first_unacked_seq, h.next_seq, h.epoch_start_seq),
        (5, 9, 1)
    );
    let st = h.status.expect("no status in the hello");
    assert_eq!(
        (st.outbox_depth, st.dropped_total, st.dropped_through_seq),
        (4, 3, 3)
    );
    // The oldest held result (seq 5) started a minute ago by the agent's clock.
    let age = st.oldest_unacked_age_ms;
    assert!(
        (60_000..60_000 + DEADLINE.as_millis() as u64).contains(&age),
        "{age}"
    );
    // The first batch starts where the hello said.
    let seqs = fake
        .expect("a batch", |e| match e {
            Event::Batch { seqs, .. } => Some(seqs.clone()),
            _ => None,
        })
        .await;
    assert_eq!(seqs[..4], [5, 6, 7, 8]);
    agent.shutdown().await;
    fake.task.abort();
}

#[tokio::test]
async fn a_status_arrives_every_interval_while_connected() {
    let pki = Pki::new(NODE);
    let state = tempfile::tempdir().unwrap();
    let mut fake = FakeCollector::start(&pki, false).await;
    let url = format!("https://127.0.0.1:{}", fake.addr.port());
    let interval = Duration::from_millis(300);
    let agent = Agent::start_with(
        agent_config(&pki, state.path(), &url),
        AgentOptions {
            status_interval: interval,
        },
    )
    .await
    .unwrap();
    hello(&mut fake).await;
    let mut at = Vec::new();
    while at.len() < 6 {
        let (st, t) = fake
            .expect("a status", |e| match e {
                Event::Status(st, t) => Some((*st, *t)),
                _ => None,
            })
            .await;
        assert_eq!((st.dropped_total, st.dropped_through_seq), (0, 0));
        at.push(t);
    }
    // Generous for a loaded machine; what matters is that it keeps coming.
    let longest = at.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(longest < interval * 5, "{longest:?} between two statuses");
    let span = at[5] - at[0];
    assert!(span >= interval * 4, "5 intervals took only {span:?}");
    agent.shutdown().await;
    fake.task.abort();
}

/// Results dropped (outbox full) while the agent waits for the Welcome: the collector must be
/// told by a Status before it gets the batch that starts after the gap.
#[tokio::test]
async fn a_drop_is_reported_by_a_status_before_the_batch_after_the_gap() {
    let pki = Pki::new(NODE);
    let state = tempfile::tempdir().unwrap();
    {
        let ob = Outbox::open(&state.path().join(outbox::FILE_NAME), 3).unwrap();
        for i in 1..=3 {
            ob.append(result(&format!("r{i}"), now_ms())).unwrap();
        }
    }
    // The check runs from the cached config at once, every second.
    ConfigCache::new(state.path())
        .store(&config_update())
        .unwrap();
    let mut fake = FakeCollector::start(&pki, false).await;
    fake.welcome_open.send_replace(false);
    let url = format!("https://127.0.0.1:{}", fake.addr.port());
    let agent = Agent::start(agent_config_with(
        &pki,
        state.path(),
        &url,
        "outbox_max_results: 3\n",
    ))
    .await
    .unwrap();
    let h = hello(&mut fake).await;
    let told = h.status.unwrap().dropped_total;
    // Two more drops than the hello told of, then the collector welcomes the agent.
    wait_until("two drops after the hello", || async {
        agent.outbox_snapshot().await.unwrap().dropped_total >= told + 2
    })
    .await;
    fake.welcome_open.send_replace(true);
    let mut statuses = Vec::new();
    let first_batch = loop {
        match fake
            .expect("a status or a batch", |e| match e {
                Event::Status(..) | Event::Batch { .. } => Some(e.clone()),
                _ => None,
            })
            .await
        {
            Event::Status(st, _) => statuses.push(st),
            Event::Batch { seqs, .. } => break seqs,
            _ => unreachable!(),
        }
    };
    let first = first_batch[0];
    assert!(
        first > h.first_unacked_seq.max(1),
        "no gap: hello said {}, batch starts at {first}",
        h.first_unacked_seq
    );
    let st = statuses
        .last()
        .unwrap_or_else(|| panic!("no status before the batch starting at {first}"));
    assert!(st.dropped_total >= told + 2, "{st:?}");
    assert!(
        st.dropped_through_seq >= first - 1,
        "the gap below {first} is not covered: {st:?}"
    );
    assert!(st.outbox_depth >= 1 && st.outbox_depth <= 3, "{st:?}");
    agent.shutdown().await;
    fake.task.abort();
}

/// What a check printing ~1,200 perfdata metrics and `output_bytes` of text made, unbounded, as
/// an older agent stored it.
fn huge(seq: u64, output_bytes: usize) -> CheckResult {
    CheckResult {
        seq,
        service_id: "perfdata".into(),
        started_at_ms: now_ms(),
        status: vigil_proto::Status::Ok as i32,
        message: "OK".into(),
        output: "o\0".repeat(output_bytes / 2),
        metrics: (0..1200)
            .map(|i| Metric {
                label: format!("disk_{i}_{}", "x".repeat(150)),
                value: f64::from(i),
                unit: "B".into(),
                warn: "80".into(),
                crit: "90".into(),
                min: Some(0.0),
                max: Some(1e12),
            })
            .collect(),
        ..Default::default()
    }
}

/// An older agent's outbox: its (out of range) epoch, next seq and unbounded results, in the
/// on-disk format it used (tables `meta` and `results`).
fn write_old_outbox(path: &Path, epoch: u64, next_seq: u64, held: &[CheckResult]) {
    let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
    let results: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("results");
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut m = txn.open_table(meta).unwrap();
        m.insert("epoch", epoch).unwrap();
        m.insert("next_seq", next_seq).unwrap();
        let mut t = txn.open_table(results).unwrap();
        for r in held {
            t.insert(r.seq, r.encode_to_vec().as_slice()).unwrap();
        }
    }
    txn.commit().unwrap();
}

#[tokio::test]
async fn an_older_agents_outbox_goes_under_a_new_epoch_in_batches_below_1_mib() {
    let pki = Pki::new(NODE);
    let state = tempfile::tempdir().unwrap();
    let old_epoch = u64::MAX - 1;
    // Seqs 11..=40 (about 50 KiB each once sanitised: more than one batch); one result alone is
    // larger than a gRPC message may be.
    let held: Vec<CheckResult> = (11..=40)
        .map(|s| huge(s, if s == 13 { 10_000_000 } else { 100_000 }))
        .collect();
    assert!(held[2].encoded_len() > vigil_proto::MAX_MESSAGE_BYTES);
    write_old_outbox(&state.path().join(outbox::FILE_NAME), old_epoch, 41, &held);

    let mut fake = FakeCollector::start(&pki, false).await;
    let url = format!("https://127.0.0.1:{}", fake.addr.port());
    let agent = Agent::start(agent_config(&pki, state.path(), &url))
        .await
        .unwrap();
    let h = hello(&mut fake).await;
    assert_ne!(h.outbox_epoch, old_epoch);
    assert!((1..=i64::MAX as u64).contains(&h.outbox_epoch));
    assert_eq!(h.outbox_epoch, agent.outbox_epoch());
    assert_eq!(
        (h.epoch_start_seq, h.first_unacked_seq, h.next_seq),
        (11, 11, 41)
    );
    assert_eq!(h.status.unwrap().outbox_depth, 30);

    let mut got = Vec::new();
    let mut batches = 0;
    while got.len() < 30 {
        let (epoch, seqs, bytes, largest, most_metrics) = fake
            .expect("a batch", |e| match e {
                Event::Batch {
                    epoch,
                    seqs,
                    bytes,
                    largest,
                    most_metrics,
                } => Some((*epoch, seqs.clone(), *bytes, *largest, *most_metrics)),
                _ => None,
            })
            .await;
        assert_eq!(epoch, h.outbox_epoch);
        assert!(bytes <= MAX_BATCH_BYTES + 16, "batch of {bytes} bytes");
        assert!(
            largest <= sanitize::MAX_RESULT_BYTES,
            "result of {largest} bytes"
        );
        assert!(most_metrics <= sanitize::MAX_METRICS);
        batches += 1;
        got.extend(seqs.into_iter().filter(|s| *s <= 40));
    }
    assert_eq!(got, (11..=40).collect::<Vec<_>>());
    assert!(batches > 1, "all in one batch");
    wait_until("the old results to be acknowledged", || async {
        agent.outbox_snapshot().await.unwrap().first_unacked != 11
    })
    .await;
    agent.shutdown().await;
    fake.task.abort();
}

/// A collector that acknowledges nothing gets at most MAX_IN_FLIGHT_BYTES of results (plus one
/// result), however large the backlog: the agent does not build up what it has sent.
#[tokio::test]
async fn unacknowledged_bytes_stay_within_the_in_flight_bound() {
    let pki = Pki::new(NODE);
    let state = tempfile::tempdir().unwrap();
    let held: Vec<CheckResult> = (1..=120).map(|s| huge(s, 100_000)).collect();
    write_old_outbox(&state.path().join(outbox::FILE_NAME), 7, 121, &held);
    let mut fake = FakeCollector::start(&pki, false).await;
    fake.ack.store(false, Ordering::SeqCst);
    let url = format!("https://127.0.0.1:{}", fake.addr.port());
    let agent = Agent::start_with(
        agent_config(&pki, state.path(), &url),
        AgentOptions {
            status_interval: Duration::from_millis(200),
        },
    )
    .await
    .unwrap();
    hello(&mut fake).await;
    let mut received = 0usize;
    let mut seqs = Vec::new();
    // Batches until the bound is nearly reached, then three heartbeats: time enough for the agent
    // to send more if it would.
    let mut statuses_after = 0;
    while statuses_after < 3 {
        match fake
            .expect("a batch or a status", |e| match e {
                Event::Batch { .. } | Event::Status(..) => Some(e.clone()),
                _ => None,
            })
            .await
        {
            Event::Batch { seqs: s, bytes, .. } => {
                received += bytes;
                seqs.extend(s);
            }
            Event::Status(..) if received > MAX_IN_FLIGHT_BYTES - MAX_BATCH_BYTES => {
                statuses_after += 1
            }
            _ => {}
        }
    }
    assert!(
        received <= MAX_IN_FLIGHT_BYTES + sanitize::MAX_RESULT_BYTES,
        "{received} bytes sent and not acknowledged"
    );
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert!(
        seqs.len() < 120,
        "the whole backlog went out unacknowledged"
    );
    agent.shutdown().await;
    fake.task.abort();
}
