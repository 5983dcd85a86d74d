//! Nothing a check prints can stop a node's results from being stored: the real agent and
//! collector with checks printing NUL bytes, invalid UTF-8, 10 MB, and 1,200 perfdata metrics
//! through a collector outage.

use std::time::Duration;

use vigil_collector::{Collector, Config};
use vigil_tests::{Workspace, binary, init, pg, true_service, wait_for};

const LIMIT: Duration = Duration::from_secs(60);

/// A `command` service on n1 running `script` with sh every second, restartable (its restart
/// runs /bin/true), so that a wrong "down" would show as a restart command.
fn script_service(id: &str, script: &str) -> String {
    format!(
        "id: {id}\ncategory: system\nnode: n1\ncheck:\n  type: command\n  interval: 1s\n  timeout: 10s\n  \
         argv: [\"/bin/sh\", \"-c\", {script:?}]\n\
         control:\n  restart: [[\"/bin/true\"]]\non_failure:\n  action: restart\n  after: 1\n"
    )
}

/// The agent binary as a child process (so that its memory is its own), killed on drop.
struct AgentProc(std::process::Child);

impl AgentProc {
    fn start(config: &std::path::Path) -> anyhow::Result<AgentProc> {
        Ok(AgentProc(
            std::process::Command::new(binary("vigil-agent")?)
                .arg("--config")
                .arg(config)
                .env("RUST_LOG", "warn")
                .spawn()?,
        ))
    }

    /// Peak resident memory (VmHWM) in KiB.
    fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no VmHWM in /proc/{}/status", self.0.id()))
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn results(client: &tokio_postgres::Client, service: &str) -> anyhow::Result<i64> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM check_results WHERE service_id = $1",
            &[&service],
        )
        .await?
        .get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_invalid_utf8_and_10_mb_of_output_block_nothing() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    ws.write_service("tick", &true_service("tick", "n1"))?;
    // NUL in the message, the output and a perfdata label.
    ws.write_service(
        "nul",
        &script_service(
            "nul",
            r"printf 'OK - fi\000ne | x\000y=1;;;; good=2\nmore\000output\n'",
        ),
    )?;
    // Bytes that are not UTF-8, in the message and a label.
    ws.write_service(
        "latin1",
        &script_service("latin1", r"printf 'OK - caf\351 \377\376 | t\351mp=3\n'"),
    )?;
    // 10 MB on stdout.
    ws.write_service(
        "flood",
        &script_service(
            "flood",
            "head -c 10000000 /dev/zero | tr '\\000' 'a'; echo; echo 'OK - flooded'",
        ),
    )?;
    let path = ws.write_collector(&db.url, &["n1"])?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let _agent = AgentProc::start(&ws.write_agent("a", "n1", "n1", collector.grpc_addr)?)?;
    let client = db.connect().await?;
    for s in ["nul", "latin1", "flood"] {
        wait_for(&format!("3 results of {s}"), LIMIT, || async {
            Ok((results(&client, s).await? >= 3).then_some(()))
        })
        .await?;
    }
    // The honest service keeps being stored after the hostile ones were.
    let ticks = results(&client, "tick").await?;
    wait_for("more results of tick", LIMIT, || async {
        Ok((results(&client, "tick").await? >= ticks + 3).then_some(()))
    })
    .await?;
    let rows = client
        .query(
            "SELECT DISTINCT ON (service_id) service_id, status, message, output, metrics::text
             FROM check_results WHERE service_id IN ('nul', 'latin1', 'flood')
             ORDER BY service_id, seq DESC",
            &[],
        )
        .await?;
    assert_eq!(rows.len(), 3);
    for r in &rows {
        let (id, status, message, output, metrics): (String, i16, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        eprintln!("{id}: status {status} message {message:?} metrics {metrics}");
        assert_eq!(status, 0, "{id} is stored as the OK it reported: {message}");
        assert!(
            output.len() <= vigil_proto::sanitize::MAX_OUTPUT_BYTES,
            "{id}: {}",
            output.len()
        );
        match id.as_str() {
            "nul" => {
                assert!(message.contains("fi\u{FFFD}ne"), "{message}");
                assert!(metrics.contains("x\u{FFFD}y"), "{metrics}");
            }
            "latin1" => assert!(message.contains('\u{FFFD}'), "{message}"),
            _ => assert!(output.contains("…[truncated]"), "{output:.80}"),
        }
    }
    // Nothing went down, so nothing was restarted.
    let commands: i64 = client
        .query_one("SELECT count(*) FROM commands", &[])
        .await?
        .get(0);
    assert_eq!(commands, 0);
    let lost: i64 = client
        .query_one("SELECT results_lost FROM nodes WHERE name = 'n1'", &[])
        .await?
        .get(0);
    assert_eq!(lost, 0);
    collector.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_huge_results_is_stored_whole_after_an_outage() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    // 20 checks, each printing 1,200 perfdata metrics (60 KB, under the command check's 64 KiB
    // capture) every second: a 30 s outage builds a backlog of about 600 results of ~14 KB each
    // once cut to 256 metrics (8+ MB, above the 8 MiB message limit that a single batch once
    // exceeded). Each run also appends a byte to `runs`, so that the test can tell how many ran.
    let runs = ws.path().join("runs");
    let script = format!(
        "printf x >> {}; awk 'BEGIN {{ printf \"OK - many metrics |\"; \
         for (i = 0; i < 1200; i++) printf \" metric_label_padding_xxxxxxx_%04d=%d;80;90;0;100\", i, i; \
         print \"\" }}'",
        runs.display()
    );
    for i in 0..20 {
        let id = format!("many{i}");
        ws.write_service(&id, &script_service(&id, &script))?;
    }
    let path = ws.write_collector(&db.url, &["n1"])?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let listen = collector.grpc_addr;
    let agent = AgentProc::start(&ws.write_agent("a", "n1", "n1", listen)?)?;
    let client = db.connect().await?;
    let total = || async {
        anyhow::Ok(
            client
                .query_one("SELECT count(*) FROM check_results WHERE node = 'n1'", &[])
                .await?
                .get::<_, i64>(0),
        )
    };
    wait_for("first results", LIMIT, || async {
        Ok((total().await? >= 20).then_some(()))
    })
    .await?;
    collector.shutdown().await;
    // The outage: the agent keeps checking into its outbox; 300 runs of ~40 KB each.
    let ran = || std::fs::metadata(&runs).map_or(0, |m| m.len());
    let target = ran() + 300;
    wait_for(
        "300 checks run during the outage",
        Duration::from_secs(120),
        || async { Ok((ran() >= target).then_some(())) },
    )
    .await?;
    let before = total().await?;
    let collector = Collector::start(Config::load(&path).map(|mut c| {
        c.grpc_listen = listen;
        c
    })?)
    .await?;
    wait_for("the backlog stored", Duration::from_secs(120), || async {
        Ok((total().await? >= before + 550).then_some(()))
    })
    .await?;
    // Every seq of every outbox epoch once, none missing.
    let rows = client
        .query(
            "SELECT outbox_epoch, count(*), count(DISTINCT seq), max(seq) - min(seq) + 1
             FROM check_results WHERE node = 'n1' AND outbox_epoch <> 0 GROUP BY outbox_epoch",
            &[],
        )
        .await?;
    assert_eq!(rows.len(), 1);
    let (n, distinct, span): (i64, i64, i64) = (rows[0].get(1), rows[0].get(2), rows[0].get(3));
    assert_eq!((n, distinct), (span, span), "every seq exactly once");
    // Every result cut to 256 metrics and saying so.
    let uncut: i64 = client
        .query_one(
            "SELECT count(*) FROM check_results WHERE node = 'n1'
             AND (jsonb_array_length(metrics) <> 256
                  OR message NOT LIKE '%1200 metrics reported, the first 256 kept%')",
            &[],
        )
        .await?
        .get(0);
    if uncut > 0 {
        let r = client
            .query_one(
                "SELECT message, jsonb_array_length(metrics), status, left(output, 300)
                 FROM check_results WHERE node = 'n1'
                 AND (jsonb_array_length(metrics) <> 256
                      OR message NOT LIKE '%1200 metrics reported, the first 256 kept%')
                 LIMIT 1",
                &[],
            )
            .await?;
        panic!(
            "{uncut} results not cut as expected, e.g. status {} message {:?} with {} metrics, output {:?}",
            r.get::<_, i16>(2),
            r.get::<_, String>(0),
            r.get::<_, i32>(1),
            r.get::<_, String>(3)
        );
    }
    let lost: i64 = client
        .query_one("SELECT results_lost FROM nodes WHERE name = 'n1'", &[])
        .await?
        .get(0);
    assert_eq!(lost, 0);
    // The agent's memory stayed bounded while it held and sent the backlog (a generous bound:
    // it is about 9 MiB of results; unbounded batching once took hundreds of MB).
    let peak = agent.peak_rss_kib()?;
    eprintln!("agent peak RSS {} MiB", peak / 1024);
    assert!(peak < 150 * 1024, "agent peak RSS {} MiB", peak / 1024);
    collector.shutdown().await;
    Ok(())
}
