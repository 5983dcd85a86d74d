//! Container control against the real Docker engine of this machine (CI has one): a uniquely named
//! container from the local `vigil-busybox` image (built by `deploy/images/busybox.sh`, never
//! pulled), removed at the end. Without a reachable Docker these tests fail, naming the socket.

use vigil_testkit::docker::{Container, docker, unique_name};

use super::*;
use crate::{How, Plan};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Fails the test with a clear message when Docker is not usable here.
async fn require_docker() {
    if let Err(e) = ping(Duration::from_secs(5)).await {
        panic!("these tests need a running Docker engine: {e}");
    }
}

/// A running test container that exits at once on SIGTERM, so stop and restart take no grace
/// period; removed on drop.
fn run_container() -> Container {
    Container::run_sh("trap 'exit 0' TERM; sleep 3600 & wait").unwrap()
}

/// (running, StartedAt)
fn state(c: &Container) -> (bool, String) {
    let s = docker(&[
        "inspect",
        "-f",
        "{{.State.Running}} {{.State.StartedAt}}",
        &c.name,
    ]);
    let (running, started) = s.split_once(' ').unwrap();
    (running == "true", started.to_string())
}

fn plan(action: Action, name: &str) -> Plan {
    Plan {
        action,
        how: How::Container {
            name: name.to_string(),
        },
        step_timeout: TIMEOUT,
    }
}

#[tokio::test]
async fn restart_stop_start_a_real_container() {
    require_docker().await;
    let c = run_container();
    let (running, started0) = state(&c);
    assert!(running);

    let e = crate::execute(&plan(Action::Restart, &c.name)).await;
    assert!(e.success, "{e:?}");
    assert_eq!(e.exit_code, -1);
    assert!(e.output.contains("container is running"), "{}", e.output);
    let (running, started1) = state(&c);
    assert!(running);
    assert_ne!(started0, started1, "StartedAt did not change");

    let e = crate::execute(&plan(Action::Stop, &c.name)).await;
    assert!(e.success, "{e:?}");
    assert!(e.output.contains("container is exited"), "{}", e.output);
    assert!(!state(&c).0);
    // Stopping a stopped container: nothing to do.
    let e = crate::execute(&plan(Action::Stop, &c.name)).await;
    assert!(e.success, "{e:?}");

    let e = crate::execute(&plan(Action::Start, &c.name)).await;
    assert!(e.success, "{e:?}");
    assert!(state(&c).0);
    // Starting a running container: nothing to do.
    let e = crate::execute(&plan(Action::Start, &c.name)).await;
    assert!(e.success, "{e:?}");
    assert!(state(&c).0);
}

#[tokio::test]
async fn missing_container_fails_clearly() {
    require_docker().await;
    let name = format!("{}-missing", unique_name());
    for action in [Action::Start, Action::Stop, Action::Restart] {
        let e = crate::execute(&plan(action, &name)).await;
        assert!(!e.success);
        assert!(!e.timed_out);
        assert!(
            e.output
                .contains(&format!("container \"{name}\" not found")),
            "{}",
            e.output
        );
    }
}

#[tokio::test]
async fn unreachable_docker_names_the_socket() {
    let host = "unix:///nonexistent/vigil-docker.sock";
    let e = execute_container_at(host, Action::Restart, "x", TIMEOUT).await;
    assert!(!e.success);
    assert!(
        e.output
            .contains("cannot reach Docker at unix:///nonexistent/vigil-docker.sock"),
        "{}",
        e.output
    );
    let err = ping_at(host, Duration::from_secs(2)).await.unwrap_err();
    assert!(err.to_string().contains("vigil-docker.sock"), "{err}");
}

#[tokio::test]
async fn names_that_could_change_the_request_are_refused() {
    let e = execute_container_at("unix:///nonexistent", Action::Start, "../images", TIMEOUT).await;
    assert!(!e.success);
    assert!(e.output.contains("invalid container name"), "{}", e.output);
    assert!(valid_name("mineru_container"));
    assert!(valid_name("a1.b-c"));
    assert!(!valid_name(""));
    assert!(!valid_name("x?all=1"));
}

#[test]
fn api_version_from_the_too_new_message() {
    let v = max_version("client version 1.53 is too new. Maximum supported API version is 1.41")
        .unwrap();
    assert_eq!((v.major_version, v.minor_version), (1, 41));
    assert!(max_version("something else").is_none());
    assert_eq!(stop_grace(Duration::from_secs(60)), 10);
    assert_eq!(stop_grace(Duration::from_secs(6)), 3);
}
