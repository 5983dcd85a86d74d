//! Commands over the agent's real stream: a fake collector (a tonic server with mutual TLS and
//! rcgen certificates, as in `stream.rs`) sends `Command`s and reads the `CommandResult`s —
//! restart steps, a failing step, a step past its timeout, check-now, a command past its
//! deadline, a slow command that does not hold up the stream, and the `docker` capability.

use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::Routes;
use tonic::{Request, Response, Status, Streaming};
use vigil_agent::{Agent, AgentConfig, AgentHandle};
use vigil_control::{Action, How, Plan};
use vigil_proto::agent_message::Msg as Out;
use vigil_proto::agent_service_server::{AgentService, AgentServiceServer};
use vigil_proto::collector_message::Msg as In;
use vigil_proto::{
    Ack, AgentMessage, CheckAssignment, CollectorMessage, Command, CommandResult, ConfigUpdate,
    Hello, Ping, Welcome,
};
use vigil_testkit::grpc;
use vigil_testkit::pki::Pki;

const NODE: &str = "node-a";
const DEADLINE: Duration = Duration::from_secs(30);
/// The service with a check (`/bin/true`) in the fake's config.
const SERVICE: &str = "web";

type ToAgent = mpsc::Sender<Result<CollectorMessage, Status>>;

/// What the fake collector saw.
#[derive(Debug)]
enum Event {
    /// A session started (with this Hello); messages for the agent go here.
    Session(ToAgent, Box<Hello>),
    Pong(u64),
    CommandResult(Box<CommandResult>),
}

struct Fake {
    events: mpsc::UnboundedSender<Event>,
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
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let events = self.events.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                match m.msg {
                    Some(Out::Hello(hello)) => {
                        let _ = tx
                            .send(msg(In::Welcome(Welcome {
                                node: NODE.into(),
                                collector_version: "fake".into(),
                            })))
                            .await;
                        let _ = tx
                            .send(msg(In::Config(ConfigUpdate {
                                version: 9,
                                checks: vec![CheckAssignment {
                                    service_id: SERVICE.into(),
                                    spec_json:
                                        r#"{"type":"command","argv":["/bin/true"],"interval":"1h"}"#
                                            .into(),
                                }],
                                ..Default::default()
                            })))
                            .await;
                        let _ = events.send(Event::Session(tx.clone(), Box::new(hello)));
                    }
                    Some(Out::Results(b)) => {
                        let last = b.results.last().map_or(0, |r| r.seq);
                        let _ = tx
                            .send(msg(In::Ack(Ack {
                                outbox_epoch: b.outbox_epoch,
                                up_to_seq: last,
                            })))
                            .await;
                    }
                    Some(Out::Pong(p)) => {
                        let _ = events.send(Event::Pong(p.nonce));
                    }
                    Some(Out::CommandResult(c)) => {
                        let _ = events.send(Event::CommandResult(Box::new(c)));
                    }
                    Some(Out::Status(_)) | None => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A fake collector, an agent connected to it, and the sender of the agent's session.
struct Setup {
    _pki: Pki,
    _state: tempfile::TempDir,
    agent: Option<AgentHandle>,
    events: mpsc::UnboundedReceiver<Event>,
    to_agent: ToAgent,
    hello: Hello,
    server: tokio::task::JoinHandle<()>,
}

impl Setup {
    async fn start() -> Self {
        let pki = Pki::new(NODE);
        let state = tempfile::tempdir().unwrap();
        let (etx, events) = mpsc::unbounded_channel();
        let server = grpc::serve_mtls(
            &pki,
            Routes::new(AgentServiceServer::new(Fake { events: etx })),
        )
        .await;
        let yaml = pki.agent_yaml(&server.url(), state.path(), "");
        let config = AgentConfig::from_yaml(&yaml, &pki.path().join("agent.yaml")).unwrap();
        let agent = Agent::start(config).await.unwrap();
        let mut setup = Setup {
            _pki: pki,
            _state: state,
            agent: Some(agent),
            events,
            to_agent: mpsc::channel(1).0,
            hello: Hello::default(),
            server: server.task,
        };
        (setup.to_agent, setup.hello) = setup
            .expect("a session", |e| match e {
                Event::Session(tx, hello) => Some((tx.clone(), (**hello).clone())),
                _ => None,
            })
            .await;
        // The config is applied before later messages are read: wait until it runs.
        let deadline = Instant::now() + DEADLINE;
        while setup.agent.as_ref().unwrap().config_version().await != 9 {
            assert!(
                Instant::now() < deadline,
                "the agent did not apply the config"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        setup
    }

    async fn send(&self, m: In) {
        self.to_agent.send(msg(m)).await.expect("session gone");
    }

    /// Waits for an event matching `pred`, skipping others.
    async fn expect<T>(&mut self, what: &str, pred: impl FnMut(&Event) -> Option<T>) -> T {
        grpc::expect(&mut self.events, what, DEADLINE, pred).await
    }

    /// Sends `cmd` and waits for its result.
    async fn run(&mut self, cmd: Command) -> CommandResult {
        let id = cmd.command_id.clone();
        self.send(In::Command(cmd)).await;
        self.result_of(&id).await
    }

    async fn result_of(&mut self, id: &str) -> CommandResult {
        self.expect(&format!("the result of command {id}"), |e| match e {
            Event::CommandResult(r) if r.command_id == id => Some((**r).clone()),
            _ => None,
        })
        .await
    }

    async fn stop(mut self) {
        if let Some(agent) = self.agent.take() {
            agent.shutdown().await;
        }
        self.server.abort();
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn steps_command(id: &str, action: Action, steps: &[&[&str]], step_timeout: Duration) -> Command {
    let plan = Plan {
        action,
        how: How::Steps {
            steps: steps
                .iter()
                .map(|s| s.iter().map(|a| a.to_string()).collect())
                .collect(),
        },
        step_timeout,
    };
    Command {
        command_id: id.into(),
        service_id: SERVICE.into(),
        action: action.as_str().into(),
        deadline_ms: now_ms() + 60_000,
        plan_json: serde_json::to_string(&plan).unwrap(),
        ..Default::default()
    }
}

#[tokio::test]
async fn restart_steps_succeed_with_their_output() {
    let mut s = Setup::start().await;
    let r = s
        .run(steps_command(
            "r1",
            Action::Restart,
            &[&["/bin/sh", "-c", "echo restarted; exit 0"]],
            Duration::from_secs(10),
        ))
        .await;
    assert!(r.success, "{r:?}");
    assert_eq!(r.exit_code, 0);
    assert!(!r.timed_out);
    assert!(r.output.contains("restarted"), "{}", r.output);
    assert!(r.output.starts_with("$ /bin/sh -c"), "{}", r.output);
    assert!(r.check.is_none());
    s.stop().await;
}

#[tokio::test]
async fn a_failing_step_reports_its_exit_code() {
    let mut s = Setup::start().await;
    let r = s
        .run(steps_command(
            "f1",
            Action::Start,
            &[
                &["/bin/sh", "-c", "echo 'port in use' >&2; exit 4"],
                &["/bin/sh", "-c", "echo never"],
            ],
            Duration::from_secs(10),
        ))
        .await;
    assert!(!r.success);
    assert_eq!(r.exit_code, 4);
    assert!(!r.timed_out);
    assert!(r.output.contains("port in use"), "{}", r.output);
    assert!(
        r.output.contains("step 1/2: exited with code 4"),
        "{}",
        r.output
    );
    assert!(!r.output.contains("never"), "{}", r.output);
    s.stop().await;
}

#[tokio::test]
async fn a_step_past_its_timeout_is_killed_and_reported() {
    let mut s = Setup::start().await;
    let r = s
        .run(steps_command(
            "t1",
            Action::Stop,
            &[&["/bin/sh", "-c", "echo stopping; sleep 30"]],
            Duration::from_millis(300),
        ))
        .await;
    assert!(!r.success);
    assert!(r.timed_out, "{r:?}");
    assert_eq!(r.exit_code, -1);
    assert!(r.output.contains("stopping"), "{}", r.output);
    assert!(r.duration_ms < 10_000, "{}", r.duration_ms);
    s.stop().await;
}

#[tokio::test]
async fn check_now_returns_the_check_result() {
    let mut s = Setup::start().await;
    let before = now_ms();
    let r = s
        .run(Command {
            command_id: "k1".into(),
            service_id: SERVICE.into(),
            action: "check".into(),
            deadline_ms: now_ms() + 60_000,
            plan_json: String::new(),
            ..Default::default()
        })
        .await;
    assert!(r.success, "{r:?}");
    let check = r.check.expect("no check result");
    assert_eq!(check.seq, 0);
    assert_eq!(check.service_id, SERVICE);
    assert_eq!(check.status, vigil_proto::Status::Ok as i32, "{check:?}");
    assert_eq!(check.config_version, 9);
    assert!(check.started_at_ms >= before, "{check:?}");

    let r = s
        .run(Command {
            command_id: "k2".into(),
            service_id: "not-here".into(),
            action: "check".into(),
            deadline_ms: now_ms() + 60_000,
            plan_json: String::new(),
            ..Default::default()
        })
        .await;
    assert!(!r.success);
    assert_eq!(r.output, "no such check on this agent");
    assert!(r.check.is_none());
    s.stop().await;
}

#[tokio::test]
async fn commands_that_cannot_run_are_refused() {
    let mut s = Setup::start().await;
    let marker = tempfile::tempdir().unwrap();
    let marker = marker.path().join("ran");
    let mut late = steps_command(
        "d1",
        Action::Restart,
        &[&["touch", marker.to_str().unwrap()]],
        Duration::from_secs(10),
    );
    late.deadline_ms = now_ms() - 5_000;
    let r = s.run(late).await;
    assert!(!r.success);
    assert_eq!(r.exit_code, -1);
    assert!(r.output.contains("deadline passed"), "{}", r.output);
    assert!(!marker.exists(), "a command past its deadline ran");

    let mut unknown = steps_command("u1", Action::Restart, &[&["true"]], Duration::from_secs(1));
    unknown.action = "reboot".into();
    let r = s.run(unknown).await;
    assert!(!r.success);
    assert_eq!(r.exit_code, -1);
    assert!(
        r.output.contains("unknown action \"reboot\""),
        "{}",
        r.output
    );

    let mut bad = steps_command("p1", Action::Restart, &[&["true"]], Duration::from_secs(1));
    bad.plan_json = "{\"action\":".into();
    let r = s.run(bad).await;
    assert!(!r.success);
    assert!(r.output.contains("cannot read the plan"), "{}", r.output);
    s.stop().await;
}

#[tokio::test]
async fn a_running_command_does_not_hold_up_the_stream() {
    let mut s = Setup::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("go");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.05; done; echo done",
        gate.display()
    );
    s.send(In::Command(steps_command(
        "slow",
        Action::Restart,
        &[&["/bin/sh", "-c", &script]],
        Duration::from_secs(20),
    )))
    .await;
    // While it runs: pings are answered and a second command for the service is refused.
    s.send(In::Ping(Ping { nonce: 7 })).await;
    s.expect("pong", |e| matches!(e, Event::Pong(7)).then_some(()))
        .await;
    let r = s
        .run(steps_command(
            "second",
            Action::Restart,
            &[&["true"]],
            Duration::from_secs(10),
        ))
        .await;
    assert!(!r.success);
    assert_eq!(r.output, "another command for this service is running");

    std::fs::write(&gate, "").unwrap();
    let r = s.result_of("slow").await;
    assert!(r.success, "{r:?}");
    assert!(r.output.contains("done"), "{}", r.output);
    s.stop().await;
}

#[tokio::test]
async fn hello_advertises_docker_only_when_it_answers() {
    let s = Setup::start().await;
    let answers = vigil_control::docker::ping(Duration::from_secs(5)).await;
    let caps = s.hello.capabilities.clone().expect("no capabilities");
    assert_eq!(caps.docker, answers.is_ok(), "{answers:?}");
    s.stop().await;
}
