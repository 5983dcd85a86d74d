//! Monitoring-Plugins compatibility: Debian's real `monitoring-plugins` programs (`check_disk`,
//! `check_load`, `check_procs`, `check_http`/`check_curl`) run unchanged through the `command`
//! kind; their statuses map, and their perfdata (units and ranges) becomes metrics.
//!
//! The plugins are installed with apt when missing (the test runs as root on the development
//! machines and in CI); a missing plugin that cannot be installed fails the test.

use std::path::{Path, PathBuf};

use vigil_checks::perfdata::Range;
use vigil_checks::{Attachments, CheckSpec, Metric, Outcome, Status};

const PLUGIN_DIR: &str = "/usr/lib/nagios/plugins";

fn apt(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .map_err(|e| format!("cannot run apt-get: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "apt-get {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Path of plugin `name`, installing Debian's monitoring-plugins first when it is missing.
/// Serialized across test processes with a file lock (nextest runs tests in parallel).
fn plugin(name: &str) -> PathBuf {
    let path = Path::new(PLUGIN_DIR).join(name);
    if path.exists() {
        return path;
    }
    let lock = std::fs::File::create(std::env::temp_dir().join("vigil-monitoring-plugins.lock"))
        .expect("create the apt lock file");
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock the apt lock file");
    if !path.exists() {
        let pkgs = [
            "install",
            "-y",
            "-qq",
            "monitoring-plugins-basic",
            "monitoring-plugins-standard",
        ];
        if let Err(first) = apt(&pkgs) {
            let hint = "installing monitoring-plugins needs root and Debian's package mirror";
            apt(&["update", "-qq"]).unwrap_or_else(|e| panic!("{name}: {hint}: {first}\n{e}"));
            apt(&pkgs).unwrap_or_else(|e| panic!("{name}: {hint}: {e}"));
        }
    }
    assert!(
        path.exists(),
        "{} still missing after install",
        path.display()
    );
    path
}

async fn run_plugin(argv: Vec<String>) -> Outcome {
    let spec: CheckSpec = serde_json::from_value(serde_json::json!({
        "type": "command", "timeout": "30s", "argv": argv, "env": {"LC_ALL": "C"}
    }))
    .expect("command spec");
    spec.validate().expect("valid spec");
    spec.run(&Attachments::default()).await
}

fn argv(plugin: &Path, args: &[&str]) -> Vec<String> {
    std::iter::once(plugin.display().to_string())
        .chain(args.iter().map(|s| s.to_string()))
        .collect()
}

/// Every metric's warn/crit, when given, is a valid Nagios range.
fn ranges_parse(metrics: &[Metric]) {
    for m in metrics {
        for r in [&m.warn, &m.crit] {
            if !r.is_empty() {
                Range::parse(r).unwrap_or_else(|e| panic!("{}: range {r:?}: {e}", m.label));
            }
        }
    }
}

#[tokio::test]
async fn check_disk_root() {
    let p = plugin("check_disk");
    let o = run_plugin(argv(&p, &["-w", "20%", "-c", "10%", "-p", "/"])).await;
    // OK, or WARNING/CRITICAL when this machine's disk really is that full; never UNKNOWN.
    assert_ne!(o.status, Status::Unknown, "{}\n{}", o.message, o.output);
    assert!(o.message.starts_with("DISK "), "{}", o.message);
    let m = o
        .metrics
        .iter()
        .find(|m| m.label == "/")
        .unwrap_or_else(|| panic!("no '/' metric in {:?}", o.metrics));
    assert_eq!(m.unit, "B");
    assert!(m.value > 0.0);
    assert!(!m.warn.is_empty() && !m.crit.is_empty(), "{m:?}");
    assert_eq!(m.min, Some(0.0));
    assert!(m.max.is_some_and(|max| max >= m.value), "{m:?}");
    ranges_parse(&o.metrics);

    // A threshold no disk can meet: CRITICAL with the same perfdata.
    let o = run_plugin(argv(&p, &["-w", "100%", "-c", "100%", "-p", "/"])).await;
    assert_eq!(o.status, Status::Critical, "{}", o.message);
}

#[tokio::test]
async fn check_load_ranges() {
    let p = plugin("check_load");
    let o = run_plugin(argv(&p, &["-w", "50,40,30", "-c", "60,50,40"])).await;
    assert_eq!(o.status, Status::Ok, "{}\n{}", o.message, o.output);
    let labels: Vec<&str> = o.metrics.iter().map(|m| m.label.as_str()).collect();
    assert_eq!(labels, ["load1", "load5", "load15"], "{:?}", o.metrics);
    assert_eq!(o.metrics[0].warn, "50.000");
    assert_eq!(o.metrics[2].crit, "40.000");
    assert_eq!(o.metrics[0].min, Some(0.0));
    ranges_parse(&o.metrics);
    // Warning at load >= 0 is always reached: the status maps from the exit code.
    let o = run_plugin(argv(&p, &["-w", "0,0,0", "-c", "1000,1000,1000"])).await;
    assert_eq!(o.status, Status::Warning, "{}", o.message);
}

#[tokio::test]
async fn check_procs_counts() {
    let p = plugin("check_procs");
    let o = run_plugin(argv(&p, &["-w", "1000", "-c", "2000"])).await;
    assert_eq!(o.status, Status::Ok, "{}\n{}", o.message, o.output);
    assert!(o.message.starts_with("PROCS OK"), "{}", o.message);
    let m = o
        .metrics
        .iter()
        .find(|m| m.label == "procs")
        .unwrap_or_else(|| panic!("no procs metric: {:?}", o.metrics));
    assert!(m.value >= 1.0);
    assert_eq!((m.warn.as_str(), m.crit.as_str()), ("1000", "2000"));
    let r = Range::parse(&m.warn).unwrap();
    assert!(!r.alerts(m.value));
    // `-w 0` means more than 0 processes warns (range 0 = 0..0).
    let o = run_plugin(argv(&p, &["-w", "0", "-c", "100000"])).await;
    assert_eq!(o.status, Status::Warning, "{}", o.message);
}

async fn serve_page() -> std::net::SocketAddr {
    use axum::{Router, routing::get};
    let app = Router::new()
        .route("/", get(|| async { "vigil plugin page: all good" }))
        .route(
            "/down",
            get(|| async { (axum::http::StatusCode::SERVICE_UNAVAILABLE, "down") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test]
async fn check_http_and_check_curl_against_a_local_server() {
    let addr = serve_page().await;
    let port = addr.port().to_string();
    for name in ["check_http", "check_curl"] {
        let p = plugin(name);
        let o = run_plugin(argv(
            &p,
            &[
                "-H",
                "127.0.0.1",
                "-p",
                &port,
                "-u",
                "/",
                "-s",
                "all good",
                "-w",
                "5",
                "-c",
                "10",
            ],
        ))
        .await;
        assert_eq!(o.status, Status::Ok, "{name}: {}\n{}", o.message, o.output);
        let time = o
            .metrics
            .iter()
            .find(|m| m.label == "time")
            .unwrap_or_else(|| panic!("{name}: no time metric: {:?}", o.metrics));
        assert_eq!(time.unit, "s");
        assert_eq!(
            (time.warn.as_str(), time.crit.as_str()),
            ("5.000000", "10.000000"),
            "{name}"
        );
        let size = o.metrics.iter().find(|m| m.label == "size").unwrap();
        assert_eq!(size.unit, "B");
        assert!(size.value > 0.0);
        ranges_parse(&o.metrics);

        let o = run_plugin(argv(&p, &["-H", "127.0.0.1", "-p", &port, "-u", "/down"])).await;
        assert_eq!(o.status, Status::Critical, "{name}: {}", o.message);
        assert!(o.message.contains("503"), "{name}: {}", o.message);
    }
}
