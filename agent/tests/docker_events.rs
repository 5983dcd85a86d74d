//! Docker events against the real Docker engine: a container of the local busybox image
//! (`deploy/images/busybox.sh`, never pulled) is watched by a `docker` check with a one-hour
//! interval; after its first scheduled result the container is killed, and a CRITICAL result
//! must follow, which only the `die` event can explain.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;
use vigil_agent::docker_events::DockerEvents;
use vigil_agent::outbox::{self, Outbox};
use vigil_agent::scheduler::Scheduler;
use vigil_proto::{CheckAssignment, CheckResult, ConfigUpdate, Status};
use vigil_testkit::docker::{Container, docker};

fn assignment(service_id: &str, spec: serde_json::Value) -> CheckAssignment {
    CheckAssignment {
        service_id: service_id.into(),
        spec_json: spec.to_string(),
    }
}

/// Waits (at most `within`) until the outbox holds a result of `service` with seq above
/// `after_seq`, and returns the first such result.
async fn next_result(
    ob: &Arc<Outbox>,
    service: &str,
    after_seq: u64,
    within: Duration,
    what: &str,
) -> CheckResult {
    let deadline = Instant::now() + within;
    loop {
        let ob2 = ob.clone();
        let pending = tokio::task::spawn_blocking(move || {
            ob2.pending(after_seq, 10_000, usize::MAX).unwrap().results
        })
        .await
        .unwrap();
        if let Some(r) = pending.into_iter().find(|r| r.service_id == service) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn killed_container_is_reported_at_once() {
    // Docker is a real dependency of this test: unreachable is a failure, not a skip.
    docker(&["version", "--format", "{{.Server.Version}}"]);
    let container = Container::run_sh("while true; do sleep 1; done").unwrap();
    let name = container.name.clone();

    let dir = tempfile::tempdir().unwrap();
    let ob = Arc::new(Outbox::open(&dir.path().join(outbox::FILE_NAME), 10_000).unwrap());
    let scheduler = Arc::new(Mutex::new(Scheduler::new(
        ob.clone(),
        Arc::new(Notify::new()),
        4,
    )));
    let events = DockerEvents::start(scheduler.clone()).await;

    // First a config without a docker check; the watcher must follow the config that adds it.
    let hourly_true =
        serde_json::json!({"type": "command", "argv": ["/bin/true"], "interval": "1h"});
    let mut update = ConfigUpdate {
        version: 1,
        checks: vec![assignment("other", hourly_true.clone())],
        ..Default::default()
    };
    scheduler.lock().await.apply(&update).await;
    next_result(
        &ob,
        "other",
        0,
        Duration::from_secs(20),
        "the command check",
    )
    .await;

    update.version = 2;
    update.checks.push(assignment(
        "web",
        serde_json::json!({"type": "docker", "container": name, "interval": "1h",
            "timeout": "10s"}),
    ));
    scheduler.lock().await.apply(&update).await;
    let first = next_result(
        &ob,
        "web",
        0,
        Duration::from_secs(20),
        "the first scheduled result",
    )
    .await;
    assert_eq!(first.status, Status::Ok as i32, "{first:?}");
    assert!(first.message.contains("is running"), "{first:?}");

    docker(&["kill", &name]);
    // The interval is one hour: only the `die` event can explain a second result.
    let second = next_result(
        &ob,
        "web",
        first.seq,
        Duration::from_secs(20),
        "the result run on the Docker event",
    )
    .await;
    assert_eq!(second.status, Status::Critical as i32, "{second:?}");
    assert!(second.message.contains("exit code 137"), "{second:?}");
    assert!(
        second
            .message
            .contains("(run at once: Docker event die (exit code 137))"),
        "{second:?}"
    );
    assert_eq!(second.config_version, 2);

    events.stop().await;
    scheduler.lock().await.stop_all().await;
}
