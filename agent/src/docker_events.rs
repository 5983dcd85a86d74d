//! Docker events: the containers of the `docker` checks are watched on the Docker Engine's event
//! stream, and when one dies, is OOM-killed or changes health, its service's check runs at once
//! (through [`Scheduler::run_now`], so the result takes the normal path: outbox, then stream)
//! instead of waiting for the next interval.
//!
//! One subscription per engine (`host:` of the specs), filtered on `type=container`,
//! `event=die|oom|health_status` and the watched containers. The set comes from
//! [`Scheduler::docker_targets`] and the subscriptions are made again whenever a new config
//! changes it. A lost stream (the engine restarted) is made again with backoff, asking for the
//! events since the last one seen, and every watched check then runs at once (events may have
//! been lost with the engine). No engine is no error: the first failure is logged at warn, the
//! following ones at debug, and the checks go on running on their schedule.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::models::EventMessage;
use bollard::query_parameters::EventsOptionsBuilder;
use futures::StreamExt;
use tokio::sync::{Mutex, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::scheduler::{DockerTarget, Scheduler};

/// The container events that make a check run at once.
pub const EVENTS: &[&str] = &["die", "oom", "health_status"];
/// Longest wait for the engine to answer while subscribing.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First delay before subscribing again after a failure.
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Longest delay between attempts to subscribe.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A stream open this long had worked (the engine accepted it), even without any event.
const STREAM_WORKED: Duration = Duration::from_secs(5);

/// The running watcher; [`DockerEvents::stop`] ends it.
pub struct DockerEvents {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl DockerEvents {
    /// Starts watching the containers of `scheduler`'s `docker` checks. Never blocks on the
    /// engine: everything happens in a background task.
    pub async fn start(scheduler: Arc<Mutex<Scheduler>>) -> Self {
        let targets = scheduler.lock().await.docker_targets();
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(supervise(scheduler, targets, stop_rx));
        DockerEvents { stop, task }
    }

    /// Ends every subscription and waits for them.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "Docker events task failed");
        }
    }
}

/// Keeps one subscription per engine for the current set of targets.
async fn supervise(
    scheduler: Arc<Mutex<Scheduler>>,
    mut targets: watch::Receiver<Vec<DockerTarget>>,
    mut stop: watch::Receiver<bool>,
) {
    // Shared by the subscriptions so that an absent engine is reported at warn only once.
    let warned = Arc::new(AtomicBool::new(false));
    loop {
        let set = targets.borrow_and_update().clone();
        let mut by_host: BTreeMap<Option<String>, Vec<DockerTarget>> = BTreeMap::new();
        for t in set {
            by_host.entry(t.host.clone()).or_default().push(t);
        }
        let mut subscriptions = JoinSet::new();
        for (host, watched) in by_host {
            tracing::debug!(
                host = host.as_deref().unwrap_or("local"),
                containers = watched.len(),
                "watching Docker events"
            );
            subscriptions.spawn(subscribe(
                Watch::new(host, watched),
                scheduler.clone(),
                warned.clone(),
            ));
        }
        let go_on = tokio::select! {
            changed = targets.changed() => changed.is_ok(),
            _ = stop.changed() => false,
        };
        // The subscriptions of the previous targets end here.
        subscriptions.shutdown().await;
        if !go_on {
            break;
        }
    }
}

/// The containers watched on one engine.
struct Watch {
    host: Option<String>,
    /// Service ids by container (as written in the spec, without a leading `/`).
    services: HashMap<String, Vec<String>>,
}

impl Watch {
    fn new(host: Option<String>, targets: Vec<DockerTarget>) -> Self {
        let mut services: HashMap<String, Vec<String>> = HashMap::new();
        for t in targets {
            services
                .entry(t.container.trim_start_matches('/').to_string())
                .or_default()
                .push(t.service_id);
        }
        Watch { host, services }
    }

    fn engine(&self) -> &str {
        self.host.as_deref().unwrap_or("the local Docker engine")
    }

    fn containers(&self) -> Vec<String> {
        let mut c: Vec<String> = self.services.keys().cloned().collect();
        c.sort();
        c
    }

    /// The services watching the event's container (by name, or by id or id prefix).
    fn services_for(&self, event: &EventMessage) -> Vec<&str> {
        let Some(actor) = &event.actor else {
            return Vec::new();
        };
        let id = actor.id.as_deref().unwrap_or_default();
        let name = actor
            .attributes
            .as_ref()
            .and_then(|a| a.get("name"))
            .map(|n| n.trim_start_matches('/'))
            .unwrap_or_default();
        self.services
            .iter()
            .filter(|(c, _)| *c == name || (!id.is_empty() && id.starts_with(c.as_str())))
            .flat_map(|(_, s)| s.iter().map(String::as_str))
            .collect()
    }

    fn all_services(&self) -> Vec<&str> {
        self.services
            .values()
            .flatten()
            .map(String::as_str)
            .collect()
    }
}

/// What an event says, for the result's message: `Docker event die (exit code 137)`.
fn reason(event: &EventMessage) -> String {
    let action = event.action.as_deref().unwrap_or("?");
    let exit = event
        .actor
        .as_ref()
        .and_then(|a| a.attributes.as_ref())
        .and_then(|a| a.get("exitCode"));
    match exit {
        Some(code) if action == "die" => format!("Docker event {action} (exit code {code})"),
        _ => format!("Docker event {action}"),
    }
}

/// `since` for the engine: seconds and nanoseconds since the epoch.
fn since_arg(nanos: i64) -> String {
    format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000)
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

async fn trigger(scheduler: &Mutex<Scheduler>, services: &[&str], why: &str) {
    let scheduler = scheduler.lock().await;
    for service in services {
        if scheduler.run_now(service, why) {
            tracing::info!(service = %service, reason = %why, "running check at once");
        } else {
            tracing::debug!(service = %service, reason = %why, "no check to run for this event");
        }
    }
}

/// Subscribes to one engine's events for `watch` until aborted, again and again with backoff.
async fn subscribe(watch: Watch, scheduler: Arc<Mutex<Scheduler>>, warned: Arc<AtomicBool>) {
    let containers = watch.containers();
    let mut filters = HashMap::new();
    filters.insert("type".to_string(), vec!["container".to_string()]);
    filters.insert(
        "event".to_string(),
        EVENTS.iter().map(|e| e.to_string()).collect(),
    );
    filters.insert("container".to_string(), containers.clone());
    let mut backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX);
    // Events from the start count, even those during the subscription's set-up; after a loss
    // the engine replays what it still has since the last event seen.
    let mut since = now_nanos();
    // A stream that worked was lost: events may be missing, so every check runs once it is back.
    let mut lost = false;
    loop {
        let failure =
            match vigil_checks::docker::connect(watch.host.as_deref(), CONNECT_TIMEOUT).await {
                Err(reason) => reason,
                Ok(docker) => {
                    if std::mem::take(&mut lost) {
                        tracing::info!(engine = watch.engine(), "Docker engine back");
                        trigger(
                            &scheduler,
                            &watch.all_services(),
                            "Docker event stream back after a loss",
                        )
                        .await;
                    }
                    let options = EventsOptionsBuilder::new()
                        .since(&since_arg(since))
                        .filters(&filters)
                        .build();
                    let mut events = docker.events(Some(options));
                    let opened = Instant::now();
                    let mut seen = 0u64;
                    let end = loop {
                        match events.next().await {
                            None => break "the engine closed the event stream".to_string(),
                            Some(Err(e)) => break e.to_string(),
                            Some(Ok(event)) => {
                                seen += 1;
                                if let Some(t) = event.time_nano {
                                    since = since.max(t + 1);
                                }
                                let why = reason(&event);
                                let services = watch.services_for(&event);
                                tracing::debug!(engine = watch.engine(), event = %why,
                                services = ?services, "Docker event");
                                trigger(&scheduler, &services, &why).await;
                            }
                        }
                    };
                    if seen > 0 || opened.elapsed() >= STREAM_WORKED {
                        lost = true;
                        backoff.reset();
                        warned.store(false, Ordering::SeqCst);
                    }
                    end
                }
            };
        let delay = backoff.next_delay();
        let retry_in = humantime::format_duration(delay).to_string();
        if warned.swap(true, Ordering::SeqCst) {
            tracing::debug!(engine = watch.engine(), reason = %failure, %retry_in,
                "no Docker events");
        } else {
            tracing::warn!(engine = watch.engine(), reason = %failure, %retry_in,
                containers = ?containers,
                "no Docker events; docker checks run on their schedule only until the engine answers");
        }
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::EventActor;
    use std::sync::Arc;
    use tokio::sync::Notify;
    use vigil_proto::{CheckAssignment, ConfigUpdate};

    use crate::outbox::{self, Outbox};

    fn target(host: Option<&str>, container: &str, service: &str) -> DockerTarget {
        DockerTarget {
            host: host.map(str::to_string),
            container: container.into(),
            service_id: service.into(),
        }
    }

    fn event(action: &str, id: &str, attrs: &[(&str, &str)]) -> EventMessage {
        EventMessage {
            action: Some(action.into()),
            actor: Some(EventActor {
                id: Some(id.into()),
                attributes: Some(
                    attrs
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn events_map_to_the_watching_services() {
        let w = Watch::new(
            None,
            vec![
                target(None, "/web", "web"),
                target(None, "web", "web-health"),
                target(None, "3f4e5d", "by-id"),
                target(None, "db", "db"),
            ],
        );
        assert_eq!(w.containers(), ["3f4e5d", "db", "web"]);
        let mut s = w.services_for(&event("die", "aaaa", &[("name", "web")]));
        s.sort();
        assert_eq!(s, ["web", "web-health"]);
        let s = w.services_for(&event("oom", "3f4e5d0011", &[("name", "other")]));
        assert_eq!(s, ["by-id"]);
        assert!(
            w.services_for(&event("die", "bbbb", &[("name", "webx")]))
                .is_empty()
        );
        assert!(w.services_for(&EventMessage::default()).is_empty());
        assert_eq!(w.all_services().len(), 4);
    }

    #[test]
    fn reasons_and_since() {
        let e = event("die", "a", &[("name", "web"), ("exitCode", "137")]);
        assert_eq!(reason(&e), "Docker event die (exit code 137)");
        let e = event("health_status: unhealthy", "a", &[("name", "web")]);
        assert_eq!(reason(&e), "Docker event health_status: unhealthy");
        assert_eq!(since_arg(1_700_000_000_000_000_042), "1700000000.000000042");
    }

    /// Without an engine (a socket that does not exist), the checks still run on their schedule
    /// and stopping does not wait for the engine.
    #[tokio::test]
    async fn absent_engine_blocks_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Arc::new(Outbox::open(&dir.path().join(outbox::FILE_NAME), 1000).unwrap());
        let scheduler = Arc::new(Mutex::new(Scheduler::new(
            ob.clone(),
            Arc::new(Notify::new()),
            2,
        )));
        let events = DockerEvents::start(scheduler.clone()).await;
        let spec = serde_json::json!({"type": "docker", "container": "web", "interval": "1s",
            "host": format!("unix://{}/no-docker.sock", dir.path().display())});
        let update = ConfigUpdate {
            version: 1,
            checks: vec![CheckAssignment {
                service_id: "web".into(),
                spec_json: spec.to_string(),
            }],
            ..Default::default()
        };
        scheduler.lock().await.apply(&update).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        let results = loop {
            let ob = ob.clone();
            let p =
                tokio::task::spawn_blocking(move || ob.pending(0, 10, usize::MAX).unwrap().results)
                    .await
                    .unwrap();
            if p.len() >= 2 {
                break p;
            }
            assert!(Instant::now() < deadline, "no scheduled results: {p:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            results
                .iter()
                .all(|r| r.status == vigil_proto::Status::Unknown as i32),
            "{results:?}"
        );
        tokio::time::timeout(Duration::from_secs(5), events.stop())
            .await
            .expect("stopping the watcher waited on the engine");
        scheduler.lock().await.stop_all().await;
    }
}
