//! Commands from the collector: start, stop or restart a service (its plan, carried out by
//! `vigil-control`) or run its check now. Each command runs in its own task so the stream keeps
//! flowing; its `CommandResult` goes out on the current stream when it is done.
//!
//! Refused at once (success false, exit code -1): an unknown action, a command past its
//! deadline, a plan that cannot be read, and a second command for a service that has one running.
//! Every command is recorded in the [`Journal`] before it starts: a command id sent again (after
//! a reconnect, a collector restart) is never started twice but answered with its recorded
//! outcome or "still running", and an outcome is sent on every new stream until the collector
//! acknowledges it (`CommandAck`), so one that finished while the stream was down is not lost.
//! Every `CommandResult` (and the check result a check-now carries) is
//! sanitised ([`vigil_proto::sanitize::command_result`]) before it is sent.

use std::collections::HashSet;
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use vigil_control::{Action, Execution, Plan};
use vigil_proto::agent_message::Msg as Out;
use vigil_proto::{AgentMessage, Command, CommandResult};

use crate::journal::{self, Begin, Journal};
use crate::scheduler::Scheduler;

/// The action that runs the service's check once, now.
pub const CHECK_ACTION: &str = "check";
/// Reply to a command for a service that already has one running.
pub const BUSY: &str = "another command for this service is running";
/// Reply to a command sent again while it runs (with `running: true`).
pub const STILL_RUNNING: &str = "still running; its outcome follows when it ends";
/// Reply to `check` for a service this agent has no check for.
pub const NO_SUCH_CHECK: &str = "no such check on this agent";

/// Why a command was not started.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Refusal {
    #[error("unknown action {0:?}: this agent knows start, stop, restart and check")]
    UnknownAction(String),
    #[error("the command's deadline passed {0} ago; not started")]
    PastDeadline(String),
    #[error("cannot read the plan: {0}")]
    BadPlan(String),
    #[error("the plan is for {plan:?} but the command asks for {command:?}")]
    PlanMismatch { plan: String, command: String },
    #[error("{BUSY}")]
    Busy,
}

/// What a command asks for, once checked.
#[derive(Debug)]
enum Work {
    Plan(Plan),
    Check,
}

/// Reads and checks `cmd` at `now_ms` (ms since the Unix epoch). `deadline_ms` 0 means none.
fn prepare(cmd: &Command, now_ms: i64) -> Result<Work, Refusal> {
    let work = if cmd.action == CHECK_ACTION {
        Work::Check
    } else {
        let Some(action) = Action::parse(&cmd.action) else {
            return Err(Refusal::UnknownAction(cmd.action.clone()));
        };
        let plan: Plan =
            serde_json::from_str(&cmd.plan_json).map_err(|e| Refusal::BadPlan(e.to_string()))?;
        if plan.action != action {
            return Err(Refusal::PlanMismatch {
                plan: plan.action.to_string(),
                command: cmd.action.clone(),
            });
        }
        Work::Plan(plan)
    };
    if cmd.deadline_ms > 0 && now_ms > cmd.deadline_ms {
        let late = Duration::from_millis(u64::try_from(now_ms - cmd.deadline_ms).unwrap_or(0));
        return Err(Refusal::PastDeadline(
            humantime::format_duration(late).to_string(),
        ));
    }
    Ok(work)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Services with a command running now.
type Running = Arc<StdMutex<HashSet<String>>>;

/// A service's place in [`Running`], given back when the command ends (or its task is dropped).
struct Slot {
    running: Running,
    service_id: String,
}

impl Slot {
    fn take(running: &Running, service_id: &str) -> Option<Slot> {
        let mut set = running.lock().unwrap_or_else(PoisonError::into_inner);
        set.insert(service_id.to_string()).then(|| Slot {
            running: running.clone(),
            service_id: service_id.to_string(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.service_id);
    }
}

/// The stream results go out on: the current session's, replaced at each new session.
type Stream = Arc<StdMutex<Option<mpsc::Sender<AgentMessage>>>>;

/// The commands this agent is carrying out. Dropping it (the agent shuts down) cancels them,
/// which kills the process groups of their steps (their journal entries stay "running" and
/// become outcome-unknown when the agent starts again).
pub(crate) struct Commands {
    scheduler: Arc<Mutex<Scheduler>>,
    journal: Arc<Journal>,
    stream: Stream,
    running: Running,
    /// Journal keys of the commands this process is starting or running: a copy that arrives
    /// before the first one's journal entry is written is answered "still running".
    keys: Running,
    tasks: JoinSet<()>,
}

fn reply(result: CommandResult) -> AgentMessage {
    AgentMessage {
        msg: Some(Out::CommandResult(result)),
    }
}

/// Sends `result` on the current stream; if there is none (or it is gone), the outcome waits in
/// the journal for the next one.
async fn send_current(stream: &Stream, mut result: CommandResult) {
    if vigil_proto::sanitize::command_result(&mut result) {
        tracing::debug!(command_id = %result.command_id, "command result sanitised");
    }
    let tx = stream
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let id = result.command_id.clone();
    let sent = match tx {
        Some(tx) => tx.send(reply(result)).await.is_ok(),
        None => false,
    };
    if !sent {
        tracing::info!(command_id = %id, "not connected: the outcome is kept in the journal and sent on the next connection");
    }
}

/// The answer to a command this agent has started before.
fn from_journal(cmd: &Command, found: Begin) -> Option<CommandResult> {
    match found {
        Begin::Started => None,
        Begin::Running(e) => Some(still_running(cmd, e.started_at_ms)),
        Begin::Done(_, r) => Some(*r),
    }
}

/// The answer to a command this agent is running now (`started_at_ms` 0: not journaled yet).
fn still_running(cmd: &Command, started_at_ms: i64) -> CommandResult {
    CommandResult {
        command_id: cmd.command_id.clone(),
        exit_code: -1,
        output: STILL_RUNNING.into(),
        running: true,
        started_at_ms,
        issuer: cmd.issuer.clone(),
        ..Default::default()
    }
}

impl Commands {
    pub(crate) fn new(scheduler: Arc<Mutex<Scheduler>>, journal: Arc<Journal>) -> Self {
        Commands {
            scheduler,
            journal,
            stream: Arc::new(StdMutex::new(None)),
            running: Arc::new(StdMutex::new(HashSet::new())),
            keys: Arc::new(StdMutex::new(HashSet::new())),
            tasks: JoinSet::new(),
        }
    }

    /// Results go out on `tx` from now on (a new session).
    pub(crate) fn attach(&self, tx: mpsc::Sender<AgentMessage>) {
        *self.stream.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
    }

    /// Sends every outcome the collector has not acknowledged yet (after a Welcome).
    pub(crate) fn replay(&mut self) {
        while self.tasks.try_join_next().is_some() {}
        let (journal, stream) = (self.journal.clone(), self.stream.clone());
        self.tasks.spawn(async move {
            let pending = tokio::task::spawn_blocking(move || {
                // Forget what was delivered long ago (here: once per new stream).
                if let Err(e) = journal.prune(now_ms()) {
                    tracing::warn!(error = %e, "cannot prune the command journal");
                }
                journal.undelivered()
            })
            .await;
            match pending {
                Ok(Ok(results)) => {
                    if !results.is_empty() {
                        tracing::info!(
                            outcomes = results.len(),
                            "sending command outcomes the collector has not acknowledged"
                        );
                    }
                    for r in results {
                        send_current(&stream, r).await;
                    }
                }
                Ok(Err(e)) => tracing::error!(error = %e, "cannot read the command journal"),
                Err(e) => tracing::error!(error = %e, "command journal task failed"),
            }
        });
    }

    /// The collector recorded the outcome of (`issuer`, `command_id`): stop sending it.
    pub(crate) fn acknowledged(&mut self, issuer: &str, command_id: &str) {
        let key = journal::key(issuer, command_id);
        let journal = self.journal.clone();
        self.tasks.spawn(async move {
            match tokio::task::spawn_blocking(move || journal.delivered(&key, now_ms())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot record a command acknowledgement")
                }
                Err(e) => tracing::error!(error = %e, "command journal task failed"),
            }
        });
    }

    /// Starts `cmd` (or answers it from the journal, or refuses it) in a task of its own; the
    /// reply goes to the current stream.
    pub(crate) fn spawn(&mut self, cmd: Command) {
        // Forget the tasks that have ended.
        while self.tasks.try_join_next().is_some() {}
        let received = Instant::now();
        let key = journal::key(&cmd.issuer, &cmd.command_id);
        // A command sent again: never started twice. (A small read; the write that matters
        // happens in the task, before anything runs.)
        let known = match self.journal.get(&key) {
            Ok(found) => found.and_then(|f| from_journal(&cmd, f)),
            Err(e) => Some(refusal(&cmd, &format!("not started: {e}"))),
        };
        // Its journal entry may not be written yet: this process holds the key.
        let held = Slot::take(&self.keys, &key);
        let known = match (known, &held) {
            (Some(answer), _) => Some(answer),
            (None, None) => Some(still_running(&cmd, 0)),
            (None, Some(_)) => None,
        };
        if let Some(answer) = known {
            tracing::info!(
                command_id = %cmd.command_id, service = %cmd.service_id, action = %cmd.action,
                running = answer.running, "command sent again: answered from the journal, not run again"
            );
            let stream = self.stream.clone();
            self.tasks
                .spawn(async move { send_current(&stream, answer).await });
            return;
        }
        let work = prepare(&cmd, now_ms()).and_then(|work| {
            Slot::take(&self.running, &cmd.service_id)
                .map(|slot| (work, slot))
                .ok_or(Refusal::Busy)
        });
        let scheduler = self.scheduler.clone();
        let (journal, stream) = (self.journal.clone(), self.stream.clone());
        self.tasks.spawn(async move {
            let _held = held;
            let result = match work {
                Err(refusal_reason) => {
                    tracing::warn!(
                        command_id = %cmd.command_id,
                        service = %cmd.service_id,
                        action = %cmd.action,
                        success = false,
                        exit_code = -1,
                        reason = %refusal_reason,
                        "command refused"
                    );
                    refusal(&cmd, &refusal_reason.to_string())
                }
                Ok((work, _slot)) => {
                    let started_at_ms = now_ms();
                    let (j, k, c) = (journal.clone(), key.clone(), cmd.clone());
                    let begun = tokio::task::spawn_blocking(move || {
                        j.begin(&k, &c.service_id, &c.action, started_at_ms)
                    })
                    .await;
                    match begun {
                        Ok(Ok(Begin::Started)) => {}
                        Ok(Ok(found)) => {
                            // Another copy of the command got there first.
                            if let Some(answer) = from_journal(&cmd, found) {
                                send_current(&stream, answer).await;
                            }
                            return;
                        }
                        Ok(Err(e)) => {
                            tracing::error!(command_id = %cmd.command_id, error = %e, "cannot journal the command; not started");
                            send_current(&stream, refusal(&cmd, &format!("not started: {e}"))).await;
                            return;
                        }
                        Err(e) => {
                            tracing::error!(command_id = %cmd.command_id, error = %e, "command journal task failed; not started");
                            return;
                        }
                    }
                    tracing::info!(
                        command_id = %cmd.command_id,
                        service = %cmd.service_id,
                        action = %cmd.action,
                        "command started"
                    );
                    let mut r = carry_out(&cmd, work, &scheduler, received).await;
                    r.started_at_ms = started_at_ms;
                    r.issuer = cmd.issuer.clone();
                    vigil_proto::sanitize::command_result(&mut r);
                    tracing::info!(
                        command_id = %cmd.command_id,
                        service = %cmd.service_id,
                        action = %cmd.action,
                        success = r.success,
                        exit_code = r.exit_code,
                        timed_out = r.timed_out,
                        duration_ms = r.duration_ms,
                        "command done"
                    );
                    tracing::debug!(command_id = %cmd.command_id, output = %r.output, "command output");
                    let (j, k, outcome) = (journal.clone(), key.clone(), r.clone());
                    match tokio::task::spawn_blocking(move || j.finish(&k, &outcome, now_ms())).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::error!(command_id = %cmd.command_id, error = %e, "cannot journal the command's outcome; sending it once"),
                        Err(e) => tracing::error!(command_id = %cmd.command_id, error = %e, "command journal task failed; sending the outcome once"),
                    }
                    r
                }
            };
            send_current(&stream, result).await;
        });
    }
}

/// A reply for a command that was not started.
fn refusal(cmd: &Command, why: &str) -> CommandResult {
    CommandResult {
        command_id: cmd.command_id.clone(),
        success: false,
        exit_code: -1,
        output: why.to_string(),
        duration_ms: 0,
        timed_out: false,
        check: None,
        running: false,
        started_at_ms: 0,
        outcome_unknown: false,
        issuer: cmd.issuer.clone(),
    }
}

impl Drop for Commands {
    fn drop(&mut self) {
        let running = self.tasks.len();
        if running > 0 {
            tracing::info!(running, "cancelling the commands still running");
        }
    }
}

async fn carry_out(
    cmd: &Command,
    work: Work,
    scheduler: &Mutex<Scheduler>,
    received: Instant,
) -> CommandResult {
    match work {
        Work::Plan(plan) => from_execution(&cmd.command_id, vigil_control::execute(&plan).await),
        Work::Check => {
            let check = scheduler.lock().await.check_now(&cmd.service_id);
            let Some(check) = check else {
                return CommandResult {
                    command_id: cmd.command_id.clone(),
                    success: false,
                    exit_code: -1,
                    output: NO_SUCH_CHECK.into(),
                    duration_ms: millis(received.elapsed()),
                    timed_out: false,
                    check: None,
                    ..Default::default()
                };
            };
            let result = check.run().await;
            let status = vigil_proto::Status::try_from(result.status)
                .map(|s| s.as_str_name().trim_start_matches("STATUS_").to_string())
                .unwrap_or_else(|_| result.status.to_string());
            CommandResult {
                command_id: cmd.command_id.clone(),
                success: true,
                // The check's program's exit code as it was (-1: the kind runs no program).
                exit_code: result.exit_code.unwrap_or(-1),
                output: format!("{status}: {}", result.message),
                duration_ms: millis(received.elapsed()),
                timed_out: false,
                check: Some(result),
                ..Default::default()
            }
        }
    }
}

fn from_execution(command_id: &str, e: Execution) -> CommandResult {
    CommandResult {
        command_id: command_id.to_string(),
        success: e.success,
        exit_code: e.exit_code,
        output: e.output,
        duration_ms: millis(e.duration),
        timed_out: e.timed_out,
        check: None,
        ..Default::default()
    }
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{self, Outbox};
    use tokio::sync::Notify;
    use vigil_control::How;
    use vigil_proto::{CheckAssignment, ConfigUpdate};

    fn plan_json(action: Action, steps: &[&[&str]]) -> String {
        serde_json::to_string(&Plan {
            action,
            how: How::Steps {
                steps: steps
                    .iter()
                    .map(|s| s.iter().map(|a| a.to_string()).collect())
                    .collect(),
            },
            step_timeout: Duration::from_secs(10),
        })
        .unwrap()
    }

    fn command(id: &str, service: &str, action: &str, plan_json: String) -> Command {
        Command {
            command_id: id.into(),
            service_id: service.into(),
            action: action.into(),
            deadline_ms: now_ms() + 60_000,
            plan_json,
            issuer: String::new(),
        }
    }

    async fn setup(dir: &std::path::Path) -> (Commands, Arc<Mutex<Scheduler>>) {
        let ob = Arc::new(Outbox::open(&dir.join(outbox::FILE_NAME), 1000).unwrap());
        let mut s = Scheduler::new(ob, Arc::new(Notify::new()), 2);
        s.apply(&ConfigUpdate {
            version: 7,
            checks: vec![CheckAssignment {
                service_id: "svc".into(),
                spec_json: r#"{"type":"command","argv":["/bin/true"],"interval":"1h"}"#.into(),
            }],
            ..Default::default()
        })
        .await;
        let s = Arc::new(Mutex::new(s));
        (Commands::new(s.clone(), journal(dir)), s)
    }

    fn journal(dir: &std::path::Path) -> Arc<Journal> {
        Arc::new(Journal::open(&dir.join(journal::FILE_NAME), now_ms()).unwrap())
    }

    async fn reply(rx: &mut mpsc::Receiver<AgentMessage>) -> CommandResult {
        let m = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("no reply")
            .expect("channel closed");
        match m.msg {
            Some(Out::CommandResult(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn prepare_refuses_what_it_cannot_do() {
        let now = 1_000_000;
        let ok = plan_json(Action::Restart, &[&["true"]]);
        let mut c = command("1", "svc", "restart", ok.clone());
        c.deadline_ms = now + 1;
        assert!(matches!(prepare(&c, now), Ok(Work::Plan(_))));
        c.deadline_ms = 0;
        assert!(
            matches!(prepare(&c, now), Ok(Work::Plan(_))),
            "0: no deadline"
        );
        c.deadline_ms = now - 1500;
        assert_eq!(
            prepare(&c, now).unwrap_err().to_string(),
            "the command's deadline passed 1s 500ms ago; not started"
        );
        let c = command("1", "svc", "reboot", ok.clone());
        assert!(matches!(
            prepare(&c, now),
            Err(Refusal::UnknownAction(a)) if a == "reboot"
        ));
        let c = command("1", "svc", "restart", "{not json".into());
        assert!(matches!(prepare(&c, now), Err(Refusal::BadPlan(_))));
        let c = command("1", "svc", "stop", ok);
        assert!(matches!(
            prepare(&c, now),
            Err(Refusal::PlanMismatch { .. })
        ));
        let c = command("1", "svc", "check", String::new());
        assert!(matches!(prepare(&c, 0), Ok(Work::Check)));
    }

    #[tokio::test]
    async fn one_command_per_service_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let (mut commands, sched) = setup(dir.path()).await;
        let (tx, mut rx) = mpsc::channel(8);
        commands.attach(tx);
        let dir2 = tempfile::tempdir().unwrap();
        let gate = dir2.path().join("go");
        // The first command waits until the file exists, so the second one surely overlaps.
        let script = format!(
            "while [ ! -e {} ]; do sleep 0.05; done; echo first",
            gate.display()
        );
        commands.spawn(command(
            "a",
            "svc",
            "restart",
            plan_json(Action::Restart, &[&["/bin/sh", "-c", &script]]),
        ));
        commands.spawn(command(
            "b",
            "svc",
            "restart",
            plan_json(Action::Restart, &[&["true"]]),
        ));
        let r = reply(&mut rx).await;
        assert_eq!(r.command_id, "b");
        assert!(!r.success);
        assert_eq!(r.exit_code, -1);
        assert_eq!(r.output, BUSY);
        // Another service is not held up.
        commands.spawn(command(
            "c",
            "other",
            "start",
            plan_json(Action::Start, &[&["true"]]),
        ));
        let r = reply(&mut rx).await;
        assert_eq!(r.command_id, "c");
        assert!(r.success, "{r:?}");

        std::fs::write(&gate, "").unwrap();
        let r = reply(&mut rx).await;
        assert_eq!(r.command_id, "a");
        assert!(r.success, "{r:?}");
        assert!(r.output.contains("first"), "{}", r.output);
        // The slot is free again.
        commands.spawn(command(
            "d",
            "svc",
            "restart",
            plan_json(Action::Restart, &[&["true"]]),
        ));
        assert!(reply(&mut rx).await.success);
        sched.lock().await.stop_all().await;
    }

    #[tokio::test]
    async fn check_now_returns_the_result_without_storing_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut commands, sched) = setup(dir.path()).await;
        let (tx, mut rx) = mpsc::channel(8);
        commands.attach(tx);
        commands.spawn(command("k", "svc", "check", String::new()));
        let r = reply(&mut rx).await;
        assert!(r.success, "{r:?}");
        assert_eq!(r.exit_code, 0, "the plugin's exit code as it was");
        assert!(r.output.starts_with("OK"), "{}", r.output);
        let check = r.check.expect("no check result");
        assert_eq!(check.seq, 0);
        assert_eq!(check.service_id, "svc");
        assert_eq!(check.config_version, 7);
        assert_eq!(check.status, vigil_proto::Status::Ok as i32);
        assert!(check.started_at_ms > 1_600_000_000_000);

        commands.spawn(command("n", "nope", "check", String::new()));
        let r = reply(&mut rx).await;
        assert!(!r.success);
        assert_eq!(r.output, NO_SUCH_CHECK);
        assert!(r.check.is_none());
        sched.lock().await.stop_all().await;
    }

    /// Check-now of a check printing NUL bytes and 1,200 metrics: the reply is sanitised, the
    /// check result it carries included.
    #[tokio::test]
    async fn check_now_replies_are_sanitised() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Arc::new(Outbox::open(&dir.path().join(outbox::FILE_NAME), 1000).unwrap());
        let mut s = Scheduler::new(ob, Arc::new(Notify::new()), 2);
        let script = r"printf 'OK \000 | '; i=0; while [ $i -lt 1200 ]; do printf 'm%d=%d ' $i $i; i=$((i+1)); done";
        s.apply(&ConfigUpdate {
            version: 1,
            checks: vec![CheckAssignment {
                service_id: "loud".into(),
                spec_json: serde_json::json!({
                    "type": "command",
                    "argv": ["/bin/sh", "-c", script],
                    "interval": "1h",
                })
                .to_string(),
            }],
            ..Default::default()
        })
        .await;
        let sched = Arc::new(Mutex::new(s));
        let mut commands = Commands::new(sched.clone(), journal(dir.path()));
        let (tx, mut rx) = mpsc::channel(8);
        commands.attach(tx);
        commands.spawn(command("k\0", "loud", "check", String::new()));
        let r = reply(&mut rx).await;
        assert!(r.success, "{r:?}");
        assert_eq!(r.command_id, "k\u{FFFD}");
        assert!(!r.output.contains('\0'), "{:?}", r.output);
        let check = r.check.expect("no check result");
        assert_eq!(check.metrics.len(), vigil_proto::sanitize::MAX_METRICS);
        assert!(!check.message.contains('\0') && !check.output.contains('\0'));
        sched.lock().await.stop_all().await;
    }

    #[tokio::test]
    async fn an_outcome_for_a_closed_stream_waits_in_the_journal_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let (mut commands, sched) = setup(dir.path()).await;
        let (tx, rx) = mpsc::channel(1);
        commands.attach(tx);
        drop(rx);
        commands.spawn(command(
            "z",
            "svc",
            "start",
            plan_json(Action::Start, &[&["true"]]),
        ));
        // The task ends and gives the service's slot back.
        tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(r) = commands.tasks.join_next().await {
                r.unwrap();
            }
        })
        .await
        .expect("the command task did not end");
        assert!(commands.running.lock().unwrap().is_empty());
        // The next stream gets it, and every stream after it until it is acknowledged.
        for _ in 0..2 {
            let (tx, mut rx) = mpsc::channel(8);
            commands.attach(tx);
            commands.replay();
            let r = reply(&mut rx).await;
            assert_eq!((r.command_id.as_str(), r.success), ("z", true), "{r:?}");
            assert!(r.started_at_ms > 0);
        }
        commands.acknowledged("", "z");
        tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(r) = commands.tasks.join_next().await {
                r.unwrap();
            }
        })
        .await
        .expect("the ack task did not end");
        assert!(commands.journal.undelivered().unwrap().is_empty());
        sched.lock().await.stop_all().await;
    }

    /// The same command id sent again while it runs and after it ended: its steps run once;
    /// the answers are "still running" and then the recorded outcome.
    #[tokio::test]
    async fn a_command_sent_again_is_answered_from_the_journal_never_run_twice() {
        let dir = tempfile::tempdir().unwrap();
        let (mut commands, sched) = setup(dir.path()).await;
        let (tx, mut rx) = mpsc::channel(8);
        commands.attach(tx);
        let runs = dir.path().join("runs");
        let gate = dir.path().join("go");
        let script = format!(
            "echo run >> {}; while [ ! -e {} ]; do sleep 0.05; done; echo done",
            runs.display(),
            gate.display()
        );
        let mut cmd = command(
            "42",
            "svc",
            "restart",
            plan_json(Action::Restart, &[&["/bin/sh", "-c", &script]]),
        );
        cmd.issuer = "db-1".into();
        commands.spawn(cmd.clone());
        // A copy right behind it (before its journal entry can be written): not "busy", not
        // run, but "still running".
        commands.spawn(cmd.clone());
        let r = reply(&mut rx).await;
        assert!(r.running, "{r:?}");
        assert_ne!(r.output, BUSY);
        // Wait until it runs, then send it again.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !runs.exists() {
            assert!(Instant::now() < deadline, "the command never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        commands.spawn(cmd.clone());
        let r = reply(&mut rx).await;
        assert!(r.running, "{r:?}");
        assert_eq!((r.command_id.as_str(), r.issuer.as_str()), ("42", "db-1"));
        std::fs::write(&gate, "").unwrap();
        let r = reply(&mut rx).await;
        assert!(!r.running && r.success, "{r:?}");
        assert!(r.output.contains("done"), "{}", r.output);
        commands.spawn(cmd.clone());
        let again = reply(&mut rx).await;
        assert_eq!(again, r, "the recorded outcome, word for word");
        // The same id from another database is another command.
        cmd.issuer = "db-2".into();
        commands.spawn(cmd);
        assert!(reply(&mut rx).await.success);
        assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\nrun\n");
        sched.lock().await.stop_all().await;
    }
}
