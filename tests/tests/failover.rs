//! An agent that knows two collectors (`collector.urls`), both on one PostgreSQL: when the one
//! it streams to is SIGKILLed, it carries on with the other; rounds of kill and restart move it
//! back and forth, and its results stay contiguous (nothing lost, nothing stored twice).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vigil_agent::ConnState;
use vigil_tests::{Workspace, free_port, init, pg, spawn_collector, start_agent, wait_for};

const LIMIT: Duration = Duration::from_secs(60);

/// A collector config listening for agents on `port`, the rest as `template`.
fn collector_on(ws: &Workspace, template: &str, port: u16, name: &str) -> anyhow::Result<PathBuf> {
    let path = ws.path().join(name);
    std::fs::write(
        &path,
        template.replace(
            "grpc_listen: 127.0.0.1:0",
            &format!("grpc_listen: 127.0.0.1:{port}"),
        ),
    )?;
    Ok(path)
}

/// Waits until the agent reports a state `want` accepts.
async fn agent_state(
    agent: &vigil_agent::AgentHandle,
    what: &str,
    want: fn(&ConnState) -> bool,
) -> anyhow::Result<()> {
    let mut st = agent.state();
    wait_for(what, LIMIT, || {
        let s = st.borrow_and_update().clone();
        async move { Ok(want(&s).then_some(())) }
    })
    .await
}

/// The seqs of the node's outbox stored so far: (count, lowest, highest).
async fn seqs(db: &tokio_postgres::Client) -> anyhow::Result<(i64, i64, i64)> {
    let r = db
        .query_one(
            "SELECT count(*), coalesce(min(seq), 0), coalesce(max(seq), 0) FROM check_results
             WHERE node = 'n1' AND outbox_epoch <> 0",
            &[],
        )
        .await?;
    Ok((r.get(0), r.get(1), r.get(2)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_moves_to_the_other_collector_when_one_is_killed() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    ws.write_service(
        "svc",
        "id: svc\ncategory: system\nnode: n1\ncheck:\n  type: command\n  interval: 1s\n  argv: [\"/bin/true\"]\n",
    )?;
    let template = std::fs::read_to_string(ws.write_collector(&db.url, &["n1"])?)?;
    let ports = [free_port()?, free_port()?];
    let configs = [
        collector_on(&ws, &template, ports[0], "collector-a.yaml")?,
        collector_on(&ws, &template, ports[1], "collector-b.yaml")?,
    ];
    let mut procs = [
        Some(spawn_collector(&configs[0])?),
        Some(spawn_collector(&configs[1])?),
    ];
    // The agent's config lists both; it starts with the first.
    let agent_yaml = ws.write_agent("a", "n1", "n1", format!("127.0.0.1:{}", ports[0]).parse()?)?;
    let text = std::fs::read_to_string(&agent_yaml)?.replace(
        &format!("  url: https://127.0.0.1:{}\n", ports[0]),
        &format!(
            "  urls: [\"https://127.0.0.1:{}\", \"https://127.0.0.1:{}\"]\n",
            ports[0], ports[1]
        ),
    );
    assert!(text.contains("urls:"), "{text}");
    std::fs::write(&agent_yaml, text)?;
    let agent = start_agent(&agent_yaml).await?;
    agent_state(&agent, "agent connected", |s| {
        matches!(s, ConnState::Connected { .. })
    })
    .await?;
    let client = db.connect().await?;

    // Rounds: the collector the agent uses is killed (it is the only one it can be using: the
    // other was just started, or has been up all along and the agent was on the killed one);
    // the agent reconnects to the other, results go on.
    let mut using = 0;
    let mut failovers = Vec::new();
    for round in 0..4 {
        let (before, _, _) = seqs(&client).await?;
        wait_for("results stored", LIMIT, || async {
            Ok((seqs(&client).await?.0 >= before + 2).then_some(()))
        })
        .await?;
        let killed = Instant::now();
        procs[using] = None;
        agent_state(&agent, "agent notices the loss", |s| {
            !matches!(s, ConnState::Connected { .. })
        })
        .await?;
        agent_state(&agent, "agent connected to the other collector", |s| {
            matches!(s, ConnState::Connected { .. })
        })
        .await?;
        failovers.push(killed.elapsed());
        let (after_kill, _, _) = seqs(&client).await?;
        wait_for(
            "results stored through the other collector",
            LIMIT,
            || async { Ok((seqs(&client).await?.0 >= after_kill + 2).then_some(())) },
        )
        .await?;
        // The killed one comes back for the next round.
        procs[using] = Some(spawn_collector(&configs[using])?);
        using = 1 - using;
        eprintln!(
            "round {round}: connected to the other collector {:?} after the kill",
            failovers.last().expect("pushed")
        );
    }
    // Every seq from the first to the last is stored exactly once.
    let (n, lo, hi) = seqs(&client).await?;
    assert_eq!(lo, 1, "the outbox's first result is stored");
    assert_eq!(
        n,
        hi - lo + 1,
        "seqs {lo}..={hi} stored once each ({n} rows)"
    );
    let gaps: i64 = client
        .query_one(
            "SELECT count(*) FROM node_events WHERE node = 'n1' AND kind = 'gap'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(gaps, 0, "no result recorded as lost");
    eprintln!("failover times: {failovers:?}");
    agent.shutdown().await;
    drop(procs);
    Ok(())
}
