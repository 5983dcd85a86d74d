//! The agent's stream against a minimal fake collector (a real tonic server with mutual TLS and
//! certificates made by rcgen): hello, welcome, config, batches, acks, ping, command, refusal,
//! resending after a reconnect, and running the cached config without a collector.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use vigil_agent::{Agent, AgentConfig, AgentHandle, ConnState};
use vigil_proto::agent_message::Msg as Out;
use vigil_proto::agent_service_server::{AgentService, AgentServiceServer};
use vigil_proto::collector_message::Msg as In;
use vigil_proto::{
    Ack, AgentMessage, CheckAssignment, CollectorMessage, Command, ConfigUpdate, Hello, Ping,
    Welcome,
};

const NODE: &str = "node-a";
const DEADLINE: Duration = Duration::from_secs(30);

/// What the fake collector saw.
#[derive(Debug, Clone)]
enum Event {
    Connected(Instant),
    Hello(Hello),
    Batch {
        epoch: u64,
        seqs: Vec<u64>,
    },
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
        tokio::spawn(async move {
            let mut received = 0usize;
            while let Ok(Some(m)) = inbound.message().await {
                match m.msg {
                    Some(Out::Hello(h)) => {
                        let _ = events.send(Event::Hello(h));
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

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "vigil test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        for (name, cn, eku) in [
            ("server", "localhost", ExtendedKeyUsagePurpose::ServerAuth),
            ("client", NODE, ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(vec![cn.to_string()]).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.extended_key_usages = vec![eku];
            let cert = p.signed_by(&key, &ca).unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        Pki { dir }
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join(name)).unwrap()
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

struct FakeCollector {
    addr: SocketAddr,
    events: mpsc::UnboundedReceiver<Event>,
    ack: Arc<AtomicBool>,
    drop_after: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeCollector {
    async fn start(pki: &Pki, refuse: bool) -> Self {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (etx, events) = mpsc::unbounded_channel();
        let ack = Arc::new(AtomicBool::new(true));
        let drop_after = Arc::new(AtomicUsize::new(0));
        let fake = Fake {
            events: etx,
            refuse,
            ack: ack.clone(),
            drop_after: drop_after.clone(),
        };
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                pki.read("server.pem"),
                pki.read("server.key"),
            ))
            .client_ca_root(Certificate::from_pem(pki.read("ca.pem")));
        let server = Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(AgentServiceServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener));
        let task = tokio::spawn(async move {
            let _ = server.await;
        });
        FakeCollector {
            addr,
            events,
            ack,
            drop_after,
            task,
        }
    }

    /// Waits for an event matching `pred`, skipping others.
    async fn expect<T>(&mut self, what: &str, mut pred: impl FnMut(&Event) -> Option<T>) -> T {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .expect("fake collector gone");
            if let Some(t) = pred(&ev) {
                return t;
            }
        }
    }
}

fn agent_config(pki: &Pki, state_dir: &Path, url: &str) -> AgentConfig {
    let yaml = format!(
        "node: {NODE}\n\
         collector: {{ url: '{url}', server_name: localhost, connect_timeout: 2s }}\n\
         tls: {{ ca: ca.pem, cert: client.pem, key: client.key }}\n\
         state_dir: '{}'\n\
         reconnect: {{ initial: 200ms, max: 400ms }}\n",
        state_dir.display()
    );
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
    let pki = Pki::new();
    let state = tempfile::tempdir().unwrap();
    let mut fake = FakeCollector::start(&pki, false).await;
    let url = format!("https://127.0.0.1:{}", fake.addr.port());
    let agent = Agent::start(agent_config(&pki, state.path(), &url))
        .await
        .unwrap();

    let hello = fake
        .expect("hello", |e| match e {
            Event::Hello(h) => Some(h.clone()),
            _ => None,
        })
        .await;
    assert_eq!(hello.node, NODE);
    assert_eq!(hello.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(hello.config_version, 0);
    assert_eq!(hello.first_unacked_seq, 0);
    assert_eq!(hello.outbox_epoch, agent.outbox_epoch());
    assert_ne!(hello.outbox_epoch, 0);
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
                Event::Batch { epoch, seqs } => Some((*epoch, seqs.clone())),
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
    let pki = Pki::new();
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
            Event::Hello(h) => Some(h.clone()),
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
    let pki = Pki::new();
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
    let pki = Pki::new();
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
