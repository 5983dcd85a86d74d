//! Runs the assigned checks: one task per check, jittered intervals, a global concurrency limit.
//!
//! Each outcome becomes a `CheckResult`, sanitised ([`vigil_proto::sanitize::result`]: bounded,
//! NUL-free) and committed to the outbox before the sender is woken, so no check ever waits on
//! the collector and nothing a check prints can make a result unsendable. [`Scheduler::run_now`] runs a check at once,
//! out of schedule, through the same path (used by [`crate::docker_events`]); the containers of
//! the `docker` checks are published on [`Scheduler::docker_targets`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use vigil_checks::{Attachments, CheckKind, CheckSpec, Outcome, Status};
use vigil_proto::{CheckResult, ConfigUpdate};

use crate::outbox::Outbox;

/// Interval of a check whose spec cannot be read at all (its UNKNOWN result repeats this often).
const FALLBACK_INTERVAL: Duration = Duration::from_secs(30);
/// Upper bound of the random delay before a check's first run.
const MAX_FIRST_DELAY: Duration = Duration::from_secs(2);

/// State shared by the scheduler and its check tasks.
struct Shared {
    outbox: Arc<Outbox>,
    notify: Arc<Notify>,
    semaphore: Arc<Semaphore>,
    /// Config version stamped on results.
    version: AtomicU64,
    /// Scheduled runs are suspended (the config says `paused`); run-now still works.
    paused: watch::Sender<bool>,
}

/// One running check task.
struct Task {
    spec_json: String,
    /// The attachment paths the spec uses and the bytes it was started with.
    files: Vec<(String, Option<Vec<u8>>)>,
    /// What the task runs, shared with check-now.
    plan: Arc<Plan>,
    /// Asks the task to run at once; the string says why (it ends up in the result's message).
    kick: mpsc::Sender<String>,
    stop: oneshot::Sender<()>,
    handle: JoinHandle<()>,
}

/// A container watched by a `docker` check.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DockerTarget {
    /// Host of the engine (`None`: the local default), as in the spec.
    pub host: Option<String>,
    /// Container name or id, as in the spec.
    pub container: String,
    /// The service whose check watches it.
    pub service_id: String,
}

/// What a check task does each interval.
enum Plan {
    Run {
        spec: Box<CheckSpec>,
        files: Attachments,
    },
    /// The spec is unusable: report UNKNOWN with this message every `interval`.
    Broken { interval: Duration, message: String },
}

impl Plan {
    fn interval(&self) -> Duration {
        match self {
            Plan::Run { spec, .. } => spec.interval,
            Plan::Broken { interval, .. } => *interval,
        }
    }
}

/// The set of running checks for the current config version.
pub struct Scheduler {
    shared: Arc<Shared>,
    tasks: HashMap<String, Task>,
    version: u64,
    /// The containers of the running `docker` checks, sorted.
    docker: watch::Sender<Vec<DockerTarget>>,
}

impl Scheduler {
    /// A scheduler with no checks; results go to `outbox`, then `notify` wakes the sender.
    pub fn new(outbox: Arc<Outbox>, notify: Arc<Notify>, max_concurrent_checks: usize) -> Self {
        Scheduler {
            shared: Arc::new(Shared {
                outbox,
                notify,
                semaphore: Arc::new(Semaphore::new(max_concurrent_checks.max(1))),
                version: AtomicU64::new(0),
                paused: watch::Sender::new(false),
            }),
            tasks: HashMap::new(),
            version: 0,
            docker: watch::Sender::new(Vec::new()),
        }
    }

    /// The containers watched by the running `docker` checks, updated whenever a config changes
    /// them (unchanged when a new config leaves them as they were).
    pub fn docker_targets(&self) -> watch::Receiver<Vec<DockerTarget>> {
        self.docker.subscribe()
    }

    /// Runs the check of `service_id` at once, outside its schedule, through the normal path
    /// (outbox, then stream); `reason` is appended to the result's message. A request made while
    /// the check runs makes it run again right after; requests beyond that are merged. The
    /// regular schedule is unchanged. False when this agent has no check for that service.
    pub fn run_now(&self, service_id: &str, reason: &str) -> bool {
        let Some(task) = self.tasks.get(service_id) else {
            return false;
        };
        match task.kick.try_send(reason.to_string()) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    fn publish_docker_targets(&self) {
        let mut targets: Vec<DockerTarget> = self
            .tasks
            .iter()
            .filter_map(|(id, t)| match &*t.plan {
                Plan::Run { spec, .. } => match &spec.kind {
                    CheckKind::Docker(d) => Some(DockerTarget {
                        host: d.host.clone(),
                        container: d.container.clone(),
                        service_id: id.clone(),
                    }),
                    _ => None,
                },
                Plan::Broken { .. } => None,
            })
            .collect();
        targets.sort();
        self.docker.send_if_modified(|now| {
            if *now == targets {
                return false;
            }
            *now = targets;
            true
        });
    }

    /// Version of the config running now (0: none).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Service ids of the running checks, sorted.
    pub fn services(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.tasks.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Switches to `update`: stops removed and changed checks, starts new and changed ones, and
    /// leaves unchanged ones (same spec, same attachment bytes) running on their schedule.
    pub async fn apply(&mut self, update: &ConfigUpdate) {
        let files: Attachments = Arc::new(
            update
                .files
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        );
        let mut wanted: HashMap<&str, &str> = HashMap::new();
        for a in &update.checks {
            if wanted
                .insert(a.service_id.as_str(), a.spec_json.as_str())
                .is_some()
            {
                tracing::warn!(
                    service = %a.service_id,
                    version = update.version,
                    "config assigns the same service twice; the last assignment wins"
                );
            }
        }

        // Stop what is gone or changed.
        let mut stopping = Vec::new();
        let ids: Vec<String> = self.tasks.keys().cloned().collect();
        for id in ids {
            let keep = match (wanted.get(id.as_str()), self.tasks.get(&id)) {
                (Some(spec_json), Some(task)) => {
                    task.spec_json == *spec_json
                        && task
                            .files
                            .iter()
                            .all(|(p, bytes)| files.get(p) == bytes.as_ref())
                }
                _ => false,
            };
            if !keep && let Some(task) = self.tasks.remove(&id) {
                tracing::debug!(service = %id, "stopping check");
                let _ = task.stop.send(());
                stopping.push(task.handle);
            }
        }
        for h in stopping {
            let _ = h.await;
        }

        self.version = update.version;
        self.shared.version.store(update.version, Ordering::SeqCst);
        if self.shared.paused.send_replace(update.paused) != update.paused {
            tracing::warn!(
                paused = update.paused,
                "scheduled checks {} by the collector",
                if update.paused {
                    "suspended"
                } else {
                    "resumed"
                }
            );
        }

        let mut started = 0usize;
        for (id, spec_json) in wanted {
            if self.tasks.contains_key(id) {
                continue;
            }
            let plan = Arc::new(plan_for(id, spec_json, &files));
            let task_files = match &*plan {
                Plan::Run { spec, .. } => spec
                    .attachments()
                    .into_iter()
                    .map(|p| {
                        let bytes = files.get(&p).cloned();
                        (p, bytes)
                    })
                    .collect(),
                Plan::Broken { .. } => Vec::new(),
            };
            let (stop, stop_rx) = oneshot::channel();
            let (kick, kick_rx) = mpsc::channel(1);
            let handle = tokio::spawn(run_check(
                self.shared.clone(),
                id.to_string(),
                plan.clone(),
                kick_rx,
                stop_rx,
            ));
            self.tasks.insert(
                id.to_string(),
                Task {
                    spec_json: spec_json.to_string(),
                    files: task_files,
                    plan,
                    kick,
                    stop,
                    handle,
                },
            );
            started += 1;
        }
        self.publish_docker_targets();
        tracing::info!(
            version = update.version,
            checks = self.tasks.len(),
            started,
            "applied config"
        );
    }

    /// The check of `service_id` ready to run once now, outside its schedule (None: this agent
    /// has no check for that service).
    pub fn check_now(&self, service_id: &str) -> Option<CheckNow> {
        self.tasks.get(service_id).map(|t| CheckNow {
            shared: self.shared.clone(),
            service_id: service_id.to_string(),
            plan: t.plan.clone(),
        })
    }

    /// Stops every check and waits for the tasks to end (a run in progress is cancelled).
    pub async fn stop_all(&mut self) {
        let tasks: Vec<Task> = self.tasks.drain().map(|(_, t)| t).collect();
        self.publish_docker_targets();
        let mut handles = Vec::new();
        for t in tasks {
            let _ = t.stop.send(());
            handles.push(t.handle);
        }
        for h in handles {
            let _ = h.await;
        }
    }
}

/// One run of a service's current check on demand (command `check`); holds what it needs, so
/// the scheduler is not locked while it runs.
pub struct CheckNow {
    shared: Arc<Shared>,
    service_id: String,
    plan: Arc<Plan>,
}

impl CheckNow {
    /// Runs the check once (within the global concurrency limit) and returns its result, which
    /// is not stored in the outbox: it travels in the command's reply.
    pub async fn run(self) -> CheckResult {
        let _permit = self.shared.semaphore.clone().acquire_owned().await.ok();
        let started_at = SystemTime::now();
        let outcome = run_plan(&self.plan).await;
        let version = self.shared.version.load(Ordering::SeqCst);
        to_result(&self.service_id, started_at, &outcome, version)
    }
}

async fn run_plan(plan: &Plan) -> Outcome {
    match plan {
        Plan::Run { spec, files } => spec.run(files).await,
        Plan::Broken { message, .. } => Outcome::new(Status::Unknown, message.clone()),
    }
}

/// Parses and validates a spec; anything unusable becomes a [`Plan::Broken`] explaining why.
fn plan_for(service_id: &str, spec_json: &str, files: &Attachments) -> Plan {
    let problem = match serde_json::from_str::<CheckSpec>(spec_json) {
        Ok(spec) => match spec.validate() {
            Ok(()) => {
                return Plan::Run {
                    spec: Box::new(spec),
                    files: files.clone(),
                };
            }
            Err(e) => format!("invalid check spec: {e}"),
        },
        Err(e) => format!("cannot read check spec: {e}"),
    };
    let message = format!(
        "{problem}; this agent (vigil-agent {}) knows the check kinds: {}",
        env!("CARGO_PKG_VERSION"),
        vigil_checks::KINDS.join(", ")
    );
    tracing::error!(service = %service_id, reason = %message, "check cannot run on this agent");
    Plan::Broken {
        interval: interval_of(spec_json),
        message,
    }
}

/// Best-effort `interval` of a spec that does not parse as a whole.
fn interval_of(spec_json: &str) -> Duration {
    serde_json::from_str::<serde_json::Value>(spec_json)
        .ok()
        .and_then(|v| v.get("interval")?.as_str().map(str::to_string))
        .and_then(|s| humantime::parse_duration(&s).ok())
        .map(|d| d.max(Duration::from_secs(1)))
        .unwrap_or(FALLBACK_INTERVAL)
}

/// Random delay before the first run: uniform in [0, min(interval, 2s)).
pub(crate) fn first_delay(interval: Duration) -> Duration {
    let max = interval.min(MAX_FIRST_DELAY);
    if max.is_zero() {
        return Duration::ZERO;
    }
    max.mul_f64(rand::rng().random_range(0.0..1.0))
}

/// `interval` with ±10 % jitter.
pub(crate) fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(rand::rng().random_range(0.9..=1.1))
}

async fn run_check(
    shared: Arc<Shared>,
    service_id: String,
    plan: Arc<Plan>,
    mut kick: mpsc::Receiver<String>,
    mut stop: oneshot::Receiver<()>,
) {
    let interval = plan.interval();
    let mut next = Instant::now() + first_delay(interval);
    let mut paused = shared.paused.subscribe();
    // Whether this check's output was already reported as cut (said once, then at debug).
    let mut told_sanitised = false;
    loop {
        let suspended = *paused.borrow_and_update();
        // `Some(why)`: an out-of-schedule run asked for by `Scheduler::run_now`.
        let kicked = tokio::select! {
            _ = tokio::time::sleep_until(next), if !suspended => None,
            Ok(()) = paused.changed() => {
                // Resumed (or suspended): the schedule starts again from now.
                next = Instant::now() + first_delay(interval);
                continue;
            }
            Some(why) = kick.recv() => Some(why),
            _ = &mut stop => return,
        };
        let permit = tokio::select! {
            p = shared.semaphore.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = &mut stop => return,
        };
        let started = Instant::now();
        let started_at = SystemTime::now();
        let mut outcome = tokio::select! {
            o = run_plan(&plan) => o,
            _ = &mut stop => return,
        };
        drop(permit);
        if let Some(why) = &kicked {
            tracing::info!(service = %service_id, reason = %why, status = %outcome.status,
                "check run at once");
            outcome.message = format!("{} (run at once: {why})", outcome.message);
        }

        let version = shared.version.load(Ordering::SeqCst);
        let mut result = to_result(&service_id, started_at, &outcome, version);
        if vigil_proto::sanitize::result(&mut result) {
            if told_sanitised {
                tracing::debug!(service = %service_id, "check result sanitised");
            } else {
                told_sanitised = true;
                tracing::warn!(
                    service = %service_id,
                    metrics = outcome.metrics.len(),
                    output_bytes = outcome.output.len(),
                    message_bytes = outcome.message.len(),
                    "check result cut to the protocol's bounds (NUL replaced, long text cut, at most {} metrics); said once per check",
                    vigil_proto::sanitize::MAX_METRICS
                );
            }
        }
        let status = outcome.status;
        let outbox = shared.outbox.clone();
        match tokio::task::spawn_blocking(move || outbox.append(result)).await {
            Ok(Ok(seq)) => {
                tracing::debug!(seq, service = %service_id, %status, "check result stored");
                shared.notify.notify_one();
            }
            Ok(Err(e)) => {
                tracing::error!(service = %service_id, error = %e, "cannot store check result")
            }
            Err(e) => {
                tracing::error!(service = %service_id, error = %e, "cannot store check result")
            }
        }

        // A run on request leaves the schedule as it was.
        if kicked.is_none() {
            next = (started + jittered(interval)).max(Instant::now());
        }
    }
}

/// The wire form of one outcome (seq is assigned by the outbox).
pub(crate) fn to_result(
    service_id: &str,
    started_at: SystemTime,
    outcome: &Outcome,
    config_version: u64,
) -> CheckResult {
    let started_at_ms = started_at
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    CheckResult {
        seq: 0,
        service_id: service_id.to_string(),
        started_at_ms,
        duration_ms: u32::try_from(outcome.duration.as_millis()).unwrap_or(u32::MAX),
        status: vigil_proto::Status::from(outcome.status) as i32,
        message: outcome.message.clone(),
        metrics: outcome.metrics.iter().cloned().map(Into::into).collect(),
        output: outcome.output.clone(),
        config_version,
        exit_code: outcome.exit_code,
        duration_us: u64::try_from(outcome.duration.as_micros()).unwrap_or(u64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox;
    use vigil_proto::CheckAssignment;

    fn setup(dir: &std::path::Path) -> (Arc<Outbox>, Arc<Notify>, Scheduler) {
        let ob = Arc::new(Outbox::open(&dir.join(outbox::FILE_NAME), 10_000).unwrap());
        let notify = Arc::new(Notify::new());
        let s = Scheduler::new(ob.clone(), notify.clone(), 4);
        (ob, notify, s)
    }

    fn update(version: u64, checks: &[(&str, &str)]) -> ConfigUpdate {
        ConfigUpdate {
            version,
            checks: checks
                .iter()
                .map(|(id, spec)| CheckAssignment {
                    service_id: id.to_string(),
                    spec_json: spec.to_string(),
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Polls the outbox until `pred` holds for its pending results, or panics after 20 s.
    async fn wait_for(ob: &Arc<Outbox>, what: &str, pred: impl Fn(&[CheckResult]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ob2 = ob.clone();
            let pending = tokio::task::spawn_blocking(move || {
                ob2.pending(0, 100_000, usize::MAX).unwrap().results
            })
            .await
            .unwrap();
            if pred(&pending) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {pending:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    const TRUE: &str = r#"{"type":"command","argv":["/bin/true"],"interval":"1s"}"#;
    const FALSE: &str = r#"{"type":"command","argv":["/bin/false"],"interval":"1s"}"#;

    /// A check that prints invalid UTF-8, NUL bytes and 1,200 perfdata metrics: its result in the
    /// outbox is valid text without NUL, bounded, with at most 256 metrics and a note saying so.
    #[tokio::test]
    async fn a_hostile_check_output_is_stored_sanitised() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _notify, mut s) = setup(dir.path());
        let script = r"printf 'OK bad \377\376 bytes | '; i=0; while [ $i -lt 1200 ]; do printf 'm%d=%d;80;90;0;100 ' $i $i; i=$((i+1)); done; printf '\n\000tail\377\n'";
        let spec = serde_json::json!({
            "type": "command",
            "argv": ["/bin/sh", "-c", script],
            "interval": "1h",
        })
        .to_string();
        s.apply(&update(1, &[("hostile", &spec)])).await;
        wait_for(&ob, "the hostile result", |p| !p.is_empty()).await;
        let r = &ob.pending(0, 1, usize::MAX).unwrap().results[0];
        assert_eq!(
            r.metrics.len(),
            vigil_proto::sanitize::MAX_METRICS,
            "{}",
            r.message
        );
        assert!(
            r.message
                .ends_with("[1200 metrics reported, the first 256 kept]"),
            "{}",
            r.message
        );
        assert_eq!(r.metrics[255].label, "m255");
        assert!(
            r.output.contains('\u{FFFD}'),
            "invalid UTF-8 kept visible: {:?}",
            r.output
        );
        for text in [&r.message, &r.output, &r.service_id] {
            assert!(!text.contains('\0'), "{text:?}");
        }
        assert!(vigil_proto::sanitize::encoded_len(r) <= vigil_proto::sanitize::MAX_RESULT_BYTES);
        s.stop_all().await;
    }

    #[tokio::test]
    async fn command_check_results_reach_the_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, notify, mut s) = setup(dir.path());
        s.apply(&update(3, &[("ok", TRUE)])).await;
        assert_eq!(s.version(), 3);
        tokio::time::timeout(Duration::from_secs(20), notify.notified())
            .await
            .expect("no notification");
        wait_for(&ob, "two results", |p| p.len() >= 2).await;
        let p = ob.pending(0, 10, usize::MAX).unwrap().results;
        let r = &p[0];
        assert_eq!(r.seq, 1);
        assert_eq!(r.service_id, "ok");
        assert_eq!(r.config_version, 3);
        assert!(r.started_at_ms > 1_600_000_000_000);
        assert_eq!(
            r.status,
            vigil_proto::Status::Ok as i32,
            "/bin/true must be OK: {r:?}"
        );
        // Runs are about one interval apart (±10 %), never overlapping.
        let gap = p[1].started_at_ms - p[0].started_at_ms;
        assert!((850..=1500).contains(&gap), "gap {gap} ms");
        s.stop_all().await;
    }

    #[tokio::test]
    async fn paused_config_runs_only_on_request_until_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _notify, mut s) = setup(dir.path());
        let mut paused = update(1, &[("ok", TRUE)]);
        paused.paused = true;
        s.apply(&paused).await;
        assert!(s.run_now("ok", "operator"));
        wait_for(&ob, "the requested run", |p| p.len() == 1).await;
        // Three intervals (plus the first delay) pass with no scheduled run.
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            let n = ob.pending(0, 100, usize::MAX).unwrap().results.len();
            assert_eq!(n, 1, "a scheduled check ran while paused");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let p = ob.pending(0, 10, usize::MAX).unwrap().results;
        assert!(p[0].message.contains("run at once"), "{}", p[0].message);
        // Resumed: scheduled runs come back.
        s.apply(&update(2, &[("ok", TRUE)])).await;
        wait_for(&ob, "a scheduled run after resuming", |p| {
            p.iter().any(|r| !r.message.contains("run at once"))
        })
        .await;
        s.stop_all().await;
    }

    #[tokio::test]
    async fn unknown_kind_reports_unknown_with_known_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _notify, mut s) = setup(dir.path());
        s.apply(&update(
            1,
            &[("future", r#"{"type":"quantum","qubits":3,"interval":"1s"}"#)],
        ))
        .await;
        wait_for(&ob, "an UNKNOWN result", |p| !p.is_empty()).await;
        let r = &ob.pending(0, 1, usize::MAX).unwrap().results[0];
        assert_eq!(r.status, vigil_proto::Status::Unknown as i32);
        assert!(r.message.contains("quantum"), "{}", r.message);
        for kind in vigil_checks::KINDS {
            assert!(r.message.contains(kind), "{}", r.message);
        }
        s.stop_all().await;
    }

    #[tokio::test]
    async fn invalid_spec_reports_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _notify, mut s) = setup(dir.path());
        // interval below the 1s minimum fails validate().
        s.apply(&update(
            1,
            &[(
                "bad",
                r#"{"type":"command","argv":["/bin/true"],"interval":"10ms"}"#,
            )],
        ))
        .await;
        wait_for(&ob, "an UNKNOWN result", |p| !p.is_empty()).await;
        let r = &ob.pending(0, 1, usize::MAX).unwrap().results[0];
        assert_eq!(r.status, vigil_proto::Status::Unknown as i32);
        assert!(r.message.contains("interval"), "{}", r.message);
        s.stop_all().await;
    }

    #[tokio::test]
    async fn new_config_replaces_only_changed_checks() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _notify, mut s) = setup(dir.path());
        s.apply(&update(
            1,
            &[("keep", TRUE), ("change", TRUE), ("drop", TRUE)],
        ))
        .await;
        let keep_id = s.tasks["keep"].handle.id();
        let change_id = s.tasks["change"].handle.id();
        wait_for(&ob, "first results", |p| {
            ["keep", "change", "drop"]
                .iter()
                .all(|id| p.iter().any(|r| r.service_id == *id))
        })
        .await;

        s.apply(&update(
            2,
            &[("keep", TRUE), ("change", FALSE), ("new", TRUE)],
        ))
        .await;
        assert_eq!(s.services(), ["change", "keep", "new"]);
        assert_eq!(
            s.tasks["keep"].handle.id(),
            keep_id,
            "unchanged check restarted"
        );
        assert_ne!(s.tasks["change"].handle.id(), change_id);

        let after = ob.next_seq().unwrap();
        wait_for(&ob, "results of version 2", |p| {
            let v2: Vec<_> = p.iter().filter(|r| r.seq >= after).collect();
            v2.iter().any(|r| r.service_id == "new")
                && v2
                    .iter()
                    .any(|r| r.service_id == "keep" && r.config_version == 2)
                && v2.iter().any(|r| r.service_id == "change")
        })
        .await;
        let p = ob.pending(after - 1, 100_000, usize::MAX).unwrap().results;
        assert!(
            p.iter().all(|r| r.service_id != "drop"),
            "removed check still runs"
        );
        s.stop_all().await;
        assert!(s.services().is_empty());
    }

    #[tokio::test]
    async fn run_now_runs_out_of_schedule_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _notify, mut s) = setup(dir.path());
        let hourly = r#"{"type":"command","argv":["/bin/true"],"interval":"1h"}"#;
        s.apply(&update(1, &[("ok", hourly)])).await;
        wait_for(&ob, "the first result", |p| p.len() == 1).await;
        assert!(s.run_now("ok", "a test"));
        assert!(!s.run_now("missing", "a test"));
        // Only the request can explain a second result within an hourly interval.
        wait_for(&ob, "the result run at once", |p| p.len() == 2).await;
        let r = &ob.pending(1, 1, usize::MAX).unwrap().results[0];
        assert_eq!(r.service_id, "ok");
        assert_eq!(r.status, vigil_proto::Status::Ok as i32);
        assert!(
            r.message.ends_with("(run at once: a test)"),
            "{}",
            r.message
        );
        s.stop_all().await;
        assert!(!s.run_now("ok", "a test"));
    }

    #[tokio::test]
    async fn docker_targets_follow_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let (_ob, _notify, mut s) = setup(dir.path());
        let mut rx = s.docker_targets();
        assert!(rx.borrow_and_update().is_empty());
        let web = r#"{"type":"docker","container":"web","interval":"1h"}"#;
        let db = r#"{"type":"docker","container":"db","host":"unix:///x.sock","interval":"1h"}"#;
        s.apply(&update(1, &[("web", web), ("db", db), ("ok", TRUE)]))
            .await;
        assert!(rx.has_changed().unwrap());
        let want = vec![
            DockerTarget {
                host: None,
                container: "web".into(),
                service_id: "web".into(),
            },
            DockerTarget {
                host: Some("unix:///x.sock".into()),
                container: "db".into(),
                service_id: "db".into(),
            },
        ];
        assert_eq!(*rx.borrow_and_update(), want);
        // A new config with the same docker checks does not disturb the watchers.
        s.apply(&update(2, &[("web", web), ("db", db)])).await;
        assert!(!rx.has_changed().unwrap());
        s.apply(&update(3, &[("web", web)])).await;
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), want[..1]);
        s.stop_all().await;
        assert!(rx.borrow_and_update().is_empty());
    }

    #[test]
    fn jitter_and_first_delay_stay_in_bounds() {
        for _ in 0..1000 {
            let d = first_delay(Duration::from_secs(30));
            assert!(d < Duration::from_secs(2));
            let d = first_delay(Duration::from_millis(1500));
            assert!(d < Duration::from_millis(1500));
            let j = jittered(Duration::from_secs(10));
            assert!(
                j >= Duration::from_secs(9) && j <= Duration::from_secs(11),
                "{j:?}"
            );
        }
    }

    #[test]
    fn interval_of_a_broken_spec() {
        assert_eq!(
            interval_of(r#"{"type":"x","interval":"5m"}"#),
            Duration::from_secs(300)
        );
        assert_eq!(interval_of(r#"{"type":"x"}"#), FALLBACK_INTERVAL);
        assert_eq!(interval_of("not json"), FALLBACK_INTERVAL);
    }
}
