//! `vigil-bench`: how fast and how far one collector goes, side by side with PostgreSQL's own
//! limit. Starts a private PostgreSQL, a real `vigil-collector serve` (subprocess, so that its
//! memory and CPU are its own) and simulated agents speaking the real protocol over mTLS; also
//! measures a real `vigil-agent`'s footprint, idle and draining a large backlog. Run by hand;
//! figures go into BENCHMARKS.md.

mod backlog;
mod copy;
mod env;
mod history;
mod sim;
mod stale;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use env::{Pg, Proc, ServiceDef, Workspace};
use sim::{AgentSim, Arrived, Behaviour, Control, Shared};

/// Benchmark of one Vigil collector with PostgreSQL on this machine.
///
/// Starts a private PostgreSQL with deploy/pg.sh (or uses the server whose admin URL is in
/// VIGIL_BENCH_DATABASE_URL; every scenario gets a fresh database), runs the release
/// `vigil-collector serve` built next to this binary, and simulates agents: real mTLS gRPC
/// streams, Hello, result batches of at most 500 results with at most 5,000 unacknowledged (as
/// the real agent), acks timed.
///
/// Scenarios:
///   ingest   N agents × M checks at --rate results/s per agent for --duration (60 s): results
///            stored per second, send→ack (commit) latency p50/p99, collector/PostgreSQL CPU, then
///            in the same run a binary COPY of as many identical rows into check_results and the
///            ratio; threshold→command probes run during the load.
///   latency  services with `on_failure: {action: restart, after: 1}`: one failing result at a
///            time, time until the restart Command arrives on that agent's stream (p50/p99).
///   streams  ramps up to --agents streams (10,000) in --step steps: collector RSS and CPU per
///            1,000 agents, the most streams held over --duration.
///   agent    a real vigil-agent with 20 checks every 30 s for --duration (180 s): RSS and CPU.
///   stale    the liveness statements over --services services (10,000) on --nodes nodes (100):
///            a stale pass with nothing due, one marking every service stale, the node pass.
///   backlog  a real vigil-agent whose outbox holds --results (100,000) large results: the real
///            `command` check's result for a plugin printing 1,200 perfdata metrics (256 kept),
///            written with the agent's own Outbox before it starts. With the collector down it
///            runs --checks (10) such checks every second for --duration (20 s) (fill); then the
///            collector starts and the agent drains its outbox (drain). Agent RSS (VmRSS) during
///            fill and drain, drain rate.
///   history  --history-services (1000) services × --days (7) of results every 30 s COPYed
///            into the real partitioned schema with their roll-ups (--copy-streams, at least
///            2): index write cost before/after, the service list and a service page timed
///            through the store (--requests, 200), dropping a day's partition, bytes a result.
///   all      every scenario with its defaults (options given apply to all).
///
/// Build: CARGO_TARGET_DIR=target/bench cargo build --release -p vigil-bench -p vigil-collector
/// -p vigil-agent, then run target/bench/release/vigil-bench. VIGIL_BENCH_COLLECTOR=PATH runs
/// another collector binary (to compare builds).
#[derive(Parser, Debug)]
#[command(name = "vigil-bench", version, verbatim_doc_comment)]
struct Cli {
    /// Which measurement to run.
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    scenario: Scenario,
    /// Simulated agents (ingest: 200, latency: 20, streams: 10000).
    #[arg(long)]
    agents: Option<usize>,
    /// Checks (services) per simulated agent (ingest: 50, latency: 10, streams: 1); backlog: the
    /// real agent's checks (10).
    #[arg(long)]
    checks: Option<usize>,
    /// Results per second each simulated agent sends (ingest: 500, latency: 0, streams: 1/30).
    #[arg(long)]
    rate: Option<f64>,
    /// Measured time in seconds (ingest: 60, streams: hold 30, agent: 180, backlog: fill 20).
    #[arg(long)]
    duration: Option<f64>,
    /// Backlog scenario: results in the agent's outbox before it starts.
    #[arg(long, default_value_t = 100_000)]
    results: usize,
    /// Backlog scenario: perfdata metrics the check's plugin prints.
    #[arg(long, default_value_t = 1200)]
    metrics: usize,
    /// Warm-up before the ingest measurement, seconds.
    #[arg(long, default_value_t = 5.0)]
    warmup: f64,
    /// Streams scenario: agents added per step.
    #[arg(long, default_value_t = 1000)]
    step: usize,
    /// Threshold→command probes (latency: one per service; ingest: during the load).
    #[arg(long)]
    probes: Option<usize>,
    /// The collector's database pool size (`database.pool_size`).
    #[arg(long, default_value_t = 8)]
    pool: usize,
    /// Parallel COPY statements for the raw PostgreSQL figure.
    #[arg(long, default_value_t = 1)]
    copy_streams: usize,
    /// Streams opened at the same time while connecting agents.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Stale scenario: services in the database.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Stale scenario: nodes the services are spread over.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// History scenario: services.
    #[arg(long, default_value_t = 1000)]
    history_services: usize,
    /// History scenario: days of results.
    #[arg(long, default_value_t = 7.0)]
    days: f64,
    /// History scenario: timed requests per read.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// RUST_LOG for the collector subprocess.
    #[arg(long, default_value = "warn")]
    collector_log: String,
    /// Also write the report (markdown) to this file.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Ingest,
    Latency,
    Streams,
    Agent,
    Stale,
    Backlog,
    History,
    All,
}

/// The service id of a simulated agent's check.
pub fn service_id(node: &str, check: usize) -> String {
    format!("{node}-c{check}")
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let nofile = env::raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli, nofile))
}

async fn run(cli: Cli, nofile: u64) -> anyhow::Result<()> {
    let pg = tokio::task::spawn_blocking(Pg::start).await??;
    let mut report = String::new();
    writeln!(report, "# vigil-bench report\n")?;
    writeln!(report, "- machine: {}", machine())?;
    writeln!(report, "- {}", pg.describe().await?)?;
    writeln!(report, "- open files limit (bench and collector): {nofile}")?;
    writeln!(
        report,
        "- command: `{}`\n",
        std::env::args().collect::<Vec<_>>().join(" ")
    )?;
    eprint!("{report}");
    let all = cli.scenario == Scenario::All;
    let mut result = Ok(());
    for (s, f) in [
        (Scenario::Ingest, 0),
        (Scenario::Latency, 1),
        (Scenario::Streams, 2),
        (Scenario::Agent, 3),
        (Scenario::Stale, 4),
        (Scenario::Backlog, 5),
        (Scenario::History, 6),
    ] {
        if !all && cli.scenario != s {
            continue;
        }
        let section = match f {
            0 => ingest(&cli, &pg).await,
            1 => latency(&cli, &pg).await,
            2 => streams(&cli, &pg).await,
            3 => agent(&cli, &pg).await,
            4 => stale::stale(&pg, cli.services, cli.nodes).await,
            5 => backlog::run(&cli, &pg).await,
            _ => {
                let size = history::Size {
                    services: cli.history_services,
                    days: cli.days,
                    interval_s: 30,
                    streams: cli.copy_streams.max(2),
                    requests: cli.requests,
                };
                history::run(&pg, &size).await
            }
        };
        match section {
            Ok(text) => {
                eprintln!("{text}");
                report.push_str(&text);
            }
            Err(e) => {
                let text = format!("## {s:?}\n\nFAILED: {e:#}\n\n");
                eprintln!("{text}");
                report.push_str(&text);
                result = Err(e);
            }
        }
    }
    println!("{report}");
    if let Some(path) = &cli.out {
        std::fs::write(path, &report)?;
    }
    result
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let mem_gb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!("{cpus} cores ({model}), {mem_gb:.0} GiB RAM")
}

/// A collector subprocess with its workspace and database.
struct Running {
    ws: Workspace,
    proc: Option<Proc>,
    pid: u32,
    addr: SocketAddr,
    db_url: String,
    db_name: String,
}

/// A collector's workspace, database and config, not started yet.
struct Prepared {
    ws: Workspace,
    addr: SocketAddr,
    cfg: std::path::PathBuf,
    db_url: String,
    db_name: String,
    nodes: usize,
    services: usize,
}

async fn start_collector(
    cli: &Cli,
    pg: &Pg,
    name: &str,
    nodes: &[String],
    services: &[ServiceDef],
) -> anyhow::Result<Running> {
    let prepared = prepare_collector(cli, pg, name, nodes, services).await?;
    spawn_collector(cli, name, prepared).await
}

/// Certificates, a fresh database, collector.yaml and the service files; the collector's address
/// is chosen here.
async fn prepare_collector(
    cli: &Cli,
    pg: &Pg,
    name: &str,
    nodes: &[String],
    services: &[ServiceDef],
) -> anyhow::Result<Prepared> {
    let t = Instant::now();
    let owned: Vec<String> = nodes.to_vec();
    let ws = tokio::task::spawn_blocking(move || Workspace::new(&owned)).await??;
    eprintln!(
        "{name}: {} certificates issued in {:.1}s",
        nodes.len(),
        t.elapsed().as_secs_f64()
    );
    let db_name = format!("vigil_bench_{name}");
    let db_url = pg.fresh_db(&db_name).await?;
    let addr: SocketAddr = format!("127.0.0.1:{}", env::free_port()?).parse()?;
    let cfg = ws.write_collector(&db_url, addr, cli.pool, nodes, services)?;
    Ok(Prepared {
        ws,
        addr,
        cfg,
        db_url,
        db_name,
        nodes: nodes.len(),
        services: services.len(),
    })
}

/// Starts `vigil-collector serve` on a prepared workspace and waits until it listens.
async fn spawn_collector(cli: &Cli, name: &str, prepared: Prepared) -> anyhow::Result<Running> {
    let Prepared {
        ws,
        addr,
        cfg,
        db_url,
        db_name,
        nodes,
        services,
    } = prepared;
    // Another build of the collector may be compared with VIGIL_BENCH_COLLECTOR=PATH.
    let bin = match std::env::var_os("VIGIL_BENCH_COLLECTOR") {
        Some(p) => std::path::PathBuf::from(p),
        None => env::sibling_binary("vigil-collector")?,
    };
    let cfg_s = cfg.to_string_lossy().to_string();
    let mut proc = Proc::spawn(
        &bin,
        &["serve", "--config", &cfg_s],
        ws.path(),
        ws.path().join("collector.log"),
        &cli.collector_log,
    )?;
    let t = Instant::now();
    let proc = tokio::task::spawn_blocking(move || {
        proc.wait_listening(addr, Duration::from_secs(600))
            .map(|_| proc)
    })
    .await??;
    eprintln!(
        "{name}: collector (pid {}) listening on {addr} after {:.1}s ({nodes} nodes, {services} services)",
        proc.pid(),
        t.elapsed().as_secs_f64(),
    );
    Ok(Running {
        ws,
        pid: proc.pid(),
        proc: Some(proc),
        addr,
        db_url,
        db_name,
    })
}

/// Connects simulated agents for `nodes` (each with `checks` services), `concurrency` at a time.
#[allow(clippy::too_many_arguments)]
async fn connect_fleet(
    run: &Running,
    nodes: &[String],
    checks: usize,
    behaviour: Behaviour,
    shared: Arc<Shared>,
    commands: Option<mpsc::UnboundedSender<Arrived>>,
    stop: CancellationToken,
    concurrency: usize,
) -> (Vec<(String, AgentSim)>, Vec<String>) {
    let certs = run.ws.certs();
    let results: Vec<(String, anyhow::Result<AgentSim>)> =
        futures::stream::iter(nodes.iter().cloned())
            .map(|node| {
                let certs = certs.clone();
                let b = behaviour.clone();
                let shared = shared.clone();
                let commands = commands.clone();
                let stop = stop.clone();
                let addr = run.addr;
                async move {
                    let ids = (0..checks).map(|c| service_id(&node, c)).collect();
                    let r = sim::start(&certs, addr, node.clone(), ids, b, shared, commands, stop)
                        .await;
                    (node, r)
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    for (node, r) in results {
        match r {
            Ok(a) => ok.push((node, a)),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    (ok, errors)
}

fn tick_for(rate: f64) -> Duration {
    if rate <= 0.0 {
        return Duration::from_secs(1);
    }
    Duration::from_secs_f64((1.0 / rate).clamp(0.1, 5.0))
}

/// CPU of the collector, PostgreSQL and this process between two points.
struct CpuMark {
    at: Instant,
    collector: f64,
    pg: f64,
    bench: f64,
}

fn cpu_mark(collector_pid: u32, pg: &Pg) -> CpuMark {
    CpuMark {
        at: Instant::now(),
        collector: env::sample(collector_pid).map_or(0.0, |s| s.cpu_s),
        pg: pg.postmaster_pid().map_or(0.0, env::tree_cpu),
        bench: env::self_cpu(),
    }
}

/// Percent of one core used by (collector, PostgreSQL, bench) between two marks.
fn cpu_between(a: &CpuMark, b: &CpuMark) -> (f64, f64, f64) {
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    (
        100.0 * (b.collector - a.collector) / secs,
        100.0 * (b.pg - a.pg) / secs,
        100.0 * (b.bench - a.bench) / secs,
    )
}

fn ms(us: Option<u64>) -> String {
    us.map_or("-".into(), |u| format!("{:.1} ms", u as f64 / 1000.0))
}

/// Sends one failing result at a time to a restart service and times the Command's arrival.
async fn probe(
    fleet: &[(String, AgentSim)],
    checks: usize,
    arrived: &mut mpsc::UnboundedReceiver<Arrived>,
    n: usize,
    spacing: Duration,
    deadline: Option<Instant>,
) -> (Vec<(u64, u64)>, usize) {
    let mut lat = Vec::new();
    let mut missed = 0;
    for k in 0..n.min(fleet.len() * checks) {
        if deadline.is_some_and(|d| Instant::now() > d) {
            break;
        }
        let (node, agent) = &fleet[k % fleet.len()];
        let check = k / fleet.len();
        let want = service_id(node, check);
        let t0 = Instant::now();
        if agent.control.send(Control::Fail { check }).await.is_err() {
            missed += 1;
            continue;
        }
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(a) = arrived.recv().await {
                if a.service_id == want {
                    return Some(a.at);
                }
            }
            None
        })
        .await;
        match got {
            Ok(Some(at)) => lat.push((at.duration_since(t0).as_micros() as u64, 1)),
            _ => missed += 1,
        }
        tokio::time::sleep(spacing).await;
    }
    (lat, missed)
}

/// Probe agents `p0..` with `checks` restart services each.
fn probe_nodes(agents: usize, checks: usize) -> (Vec<String>, Vec<ServiceDef>) {
    let nodes: Vec<String> = (0..agents).map(|i| format!("p{i}")).collect();
    let services = nodes
        .iter()
        .flat_map(|n| {
            (0..checks).map(move |c| ServiceDef {
                id: service_id(n, c),
                node: n.clone(),
                check: None,
                restart: true,
            })
        })
        .collect();
    (nodes, services)
}

async fn ingest(cli: &Cli, pg: &Pg) -> anyhow::Result<String> {
    let agents = cli.agents.unwrap_or(200);
    let checks = cli.checks.unwrap_or(50).max(1);
    let rate = cli.rate.unwrap_or(500.0);
    let duration = cli.duration.unwrap_or(60.0);
    let probes = cli.probes.unwrap_or(100);
    let nodes: Vec<String> = (0..agents).map(|i| format!("a{i}")).collect();
    let mut services: Vec<ServiceDef> = nodes
        .iter()
        .flat_map(|n| {
            (0..checks).map(move |c| ServiceDef {
                id: service_id(n, c),
                node: n.clone(),
                check: None,
                restart: false,
            })
        })
        .collect();
    let probe_agents = if probes > 0 { 10 } else { 0 };
    let probe_checks = probes.div_ceil(probe_agents.max(1)).max(1);
    let (pnodes, psvcs) = probe_nodes(probe_agents, probe_checks);
    services.extend(psvcs);
    let all_nodes: Vec<String> = nodes.iter().chain(pnodes.iter()).cloned().collect();
    let run = start_collector(cli, pg, "ingest", &all_nodes, &services).await?;

    let shared = Arc::new(Shared::default());
    let stop = CancellationToken::new();
    let behaviour = Behaviour {
        rate,
        tick: tick_for(rate),
    };
    let t = Instant::now();
    let (fleet, errors) = connect_fleet(
        &run,
        &nodes,
        checks,
        behaviour,
        shared.clone(),
        None,
        stop.clone(),
        cli.connect_concurrency,
    )
    .await;
    if !errors.is_empty() {
        bail!("{} agents could not connect: {}", errors.len(), errors[0]);
    }
    let (arr_tx, mut arr_rx) = mpsc::unbounded_channel();
    let (pfleet, perrors) = connect_fleet(
        &run,
        &pnodes,
        probe_checks,
        Behaviour {
            rate: 0.0,
            tick: Duration::from_secs(1),
        },
        Arc::new(Shared::default()),
        Some(arr_tx),
        stop.clone(),
        cli.connect_concurrency,
    )
    .await;
    if !perrors.is_empty() {
        bail!("probe agents could not connect: {}", perrors[0]);
    }
    for (_, a) in &pfleet {
        a.control.send(Control::AllOk).await?;
    }
    eprintln!(
        "ingest: {} agents connected in {:.1}s; warming up {:.0}s",
        fleet.len(),
        t.elapsed().as_secs_f64(),
        cli.warmup
    );
    tokio::time::sleep(Duration::from_secs_f64(cli.warmup)).await;

    let rss0 = env::sample(run.pid)?;
    let a0 = shared.acked.load(Ordering::Relaxed);
    let c0 = cpu_mark(run.pid, pg);
    shared.measuring.store(1, Ordering::Relaxed);
    let end = Instant::now() + Duration::from_secs_f64(duration);
    let spacing = Duration::from_secs_f64((duration * 0.8 / probes.max(1) as f64).min(0.5));
    let (mut probe_lat, missed) = probe(
        &pfleet,
        probe_checks,
        &mut arr_rx,
        probes,
        spacing,
        Some(end),
    )
    .await;
    let mut rss_max = rss0.rss_kb;
    while Instant::now() < end {
        if let Ok(s) = env::sample(run.pid) {
            rss_max = rss_max.max(s.rss_kb);
        }
        tokio::time::sleep(Duration::from_millis(500).min(end - Instant::now())).await;
    }
    let a1 = shared.acked.load(Ordering::Relaxed);
    let c1 = cpu_mark(run.pid, pg);
    shared.measuring.store(0, Ordering::Relaxed);
    let sent = shared.sent.load(Ordering::Relaxed);
    stop.cancel();
    for (_, a) in fleet.into_iter().chain(pfleet) {
        let _ = a.task.await;
    }
    let secs = c1.at.duration_since(c0.at).as_secs_f64();
    let stored = a1 - a0;
    let vigil_rate = stored as f64 / secs;
    let (ccpu, pcpu, bcpu) = cpu_between(&c0, &c1);
    let mut send_ack = std::mem::take(&mut *shared.send_ack.lock().expect("lock"));
    let mut created_ack = std::mem::take(&mut *shared.created_ack.lock().expect("lock"));
    let db = env::connect(&run.db_url).await?;
    let in_db: i64 = db
        .query_one("SELECT count(*) FROM check_results", &[])
        .await?
        .get(0);
    let total_acked = shared.acked.load(Ordering::Relaxed);
    // The collector goes away first: it may still be storing results that were sent before
    // the agents stopped, and COPY must have the machine to itself.
    let mut run = run;
    run.proc = None;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The same rows straight into the table with binary COPY, in the same run.
    let copy_n = (stored as usize).clamp(100_000, 2_000_000);
    eprintln!("ingest: COPY of {copy_n} rows ...");
    let c2 = cpu_mark(0, pg);
    let took = copy::copy_rows(&run.db_url, &nodes, checks, copy_n, cli.copy_streams).await?;
    let c3 = cpu_mark(0, pg);
    let (_, copy_pg_cpu, copy_bench_cpu) = cpu_between(&c2, &c3);
    let copy_rate = copy_n as f64 / took.as_secs_f64();

    let mut s = String::new();
    writeln!(s, "## ingest\n")?;
    writeln!(
        s,
        "{agents} agents × {checks} checks, offered {:.0} results/s ({rate} per agent, batches ≤ {} results, ≤ {} unacknowledged per agent), pool_size {}, {secs:.0} s measured after {:.0} s warm-up.\n",
        agents as f64 * rate,
        sim::BATCH_MAX,
        sim::IN_FLIGHT_MAX,
        cli.pool,
        cli.warmup
    )?;
    writeln!(s, "| figure | value |\n|---|---|")?;
    writeln!(
        s,
        "| results stored (acked after commit) per second | **{vigil_rate:.0}** |"
    )?;
    writeln!(
        s,
        "| raw binary COPY of {copy_n} identical rows ({} stream) per second | **{copy_rate:.0}** ({:.2} s) |",
        cli.copy_streams,
        took.as_secs_f64()
    )?;
    writeln!(
        s,
        "| Vigil / COPY | **{:.0} %** |",
        100.0 * vigil_rate / copy_rate
    )?;
    writeln!(
        s,
        "| send → ack (commit) latency p50 / p99 | {} / {} |",
        ms(sim::percentile(&mut send_ack, 50.0)),
        ms(sim::percentile(&mut send_ack, 99.0))
    )?;
    writeln!(
        s,
        "| created → ack latency p50 / p99 (incl. waiting in the agent) | {} / {} |",
        ms(sim::percentile(&mut created_ack, 50.0)),
        ms(sim::percentile(&mut created_ack, 99.0))
    )?;
    writeln!(
        s,
        "| threshold → restart command under this load, p50 / p99 ({} probes, {missed} missed) | {} / {} |",
        probe_lat.len(),
        ms(sim::percentile(&mut probe_lat, 50.0)),
        ms(sim::percentile(&mut probe_lat, 99.0))
    )?;
    writeln!(
        s,
        "| CPU (% of one core): collector / PostgreSQL / bench | {ccpu:.0} / {pcpu:.0} / {bcpu:.0} |"
    )?;
    writeln!(
        s,
        "| CPU during COPY: PostgreSQL / bench | {copy_pg_cpu:.0} / {copy_bench_cpu:.0} |"
    )?;
    writeln!(
        s,
        "| collector RSS start / max | {:.0} / {:.0} MiB |",
        rss0.rss_kb as f64 / 1024.0,
        rss_max as f64 / 1024.0
    )?;
    writeln!(
        s,
        "| check: rows in check_results / results acked / sent | {in_db} / {total_acked} / {sent} |\n"
    )?;
    let errs = shared.errors.lock().expect("lock").clone();
    if !errs.is_empty() {
        writeln!(s, "stream errors: {errs:?}\n")?;
    }
    drop(db);
    finish(run, pg).await;
    Ok(s)
}

async fn finish(run: Running, pg: &Pg) {
    let Running {
        ws, proc, db_name, ..
    } = run;
    drop(proc);
    pg.drop_db(&db_name).await;
    drop(ws);
}

async fn latency(cli: &Cli, pg: &Pg) -> anyhow::Result<String> {
    let agents = cli.agents.unwrap_or(20);
    let checks = cli.checks.unwrap_or(10).max(1);
    let rate = cli.rate.unwrap_or(0.0);
    let probes = cli.probes.unwrap_or(agents * checks);
    let (nodes, services) = probe_nodes(agents, checks);
    let run = start_collector(cli, pg, "latency", &nodes, &services).await?;
    let shared = Arc::new(Shared::default());
    let stop = CancellationToken::new();
    let (arr_tx, mut arr_rx) = mpsc::unbounded_channel();
    let (fleet, errors) = connect_fleet(
        &run,
        &nodes,
        checks,
        Behaviour {
            rate,
            tick: tick_for(rate),
        },
        shared.clone(),
        Some(arr_tx),
        stop.clone(),
        cli.connect_concurrency,
    )
    .await;
    if !errors.is_empty() {
        bail!("{} agents could not connect: {}", errors.len(), errors[0]);
    }
    for (_, a) in &fleet {
        a.control.send(Control::AllOk).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c0 = cpu_mark(run.pid, pg);
    let (mut lat, missed) = probe(
        &fleet,
        checks,
        &mut arr_rx,
        probes,
        Duration::from_millis(20),
        None,
    )
    .await;
    let c1 = cpu_mark(run.pid, pg);
    stop.cancel();
    for (_, a) in fleet {
        let _ = a.task.await;
    }
    let (ccpu, pcpu, _) = cpu_between(&c0, &c1);
    let max = lat.iter().map(|x| x.0).max();
    let mut s = String::new();
    writeln!(s, "## threshold → command latency\n")?;
    writeln!(
        s,
        "{agents} agents × {checks} services with `on_failure: {{action: restart, after: 1}}`, one failing result at a time (20 ms apart), background {rate} results/s per agent. Time from sending the failing result to the restart `Command` arriving on that agent's stream.\n"
    )?;
    writeln!(s, "| figure | value |\n|---|---|")?;
    writeln!(s, "| probes (missed) | {} ({missed}) |", lat.len())?;
    writeln!(
        s,
        "| p50 / p99 / max | **{}** / **{}** / {} |",
        ms(sim::percentile(&mut lat, 50.0)),
        ms(sim::percentile(&mut lat, 99.0)),
        ms(max)
    )?;
    writeln!(
        s,
        "| CPU (% of one core) collector / PostgreSQL | {ccpu:.0} / {pcpu:.0} |\n"
    )?;
    finish(run, pg).await;
    Ok(s)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

async fn streams(cli: &Cli, pg: &Pg) -> anyhow::Result<String> {
    let agents = cli.agents.unwrap_or(10_000);
    let checks = cli.checks.unwrap_or(1).max(1);
    let rate = cli.rate.unwrap_or(1.0 / 30.0);
    let hold = cli.duration.unwrap_or(30.0);
    let step = cli.step.max(1);
    let nodes: Vec<String> = (0..agents).map(|i| format!("s{i}")).collect();
    let services: Vec<ServiceDef> = nodes
        .iter()
        .flat_map(|n| {
            (0..checks).map(move |c| ServiceDef {
                id: service_id(n, c),
                node: n.clone(),
                check: None,
                restart: false,
            })
        })
        .collect();
    let run = start_collector(cli, pg, "streams", &nodes, &services).await?;
    let pid = run.pid;
    let base = env::sample(pid)?;
    let shared = Arc::new(Shared::default());
    let stop = CancellationToken::new();
    let behaviour = Behaviour {
        rate,
        tick: tick_for(rate),
    };
    let mut fleet = Vec::new();
    let mut s = String::new();
    writeln!(s, "## agent streams\n")?;
    writeln!(
        s,
        "Ramp to {agents} simulated agents, {step} per step ({} at a time), each with {checks} service(s) sending {rate:.3} results/s; collector idle RSS {:.0} MiB.\n",
        cli.connect_concurrency,
        base.rss_kb as f64 / 1024.0
    )?;
    writeln!(
        s,
        "| streams | connect time of the step | collector RSS | RSS per 1,000 agents (above idle) | collector CPU while settling | fds |"
    )?;
    writeln!(s, "|---|---|---|---|---|---|")?;
    let mut failures = Vec::new();
    for chunk in nodes.chunks(step) {
        let t = Instant::now();
        let (ok, errs) = connect_fleet(
            &run,
            chunk,
            checks,
            behaviour.clone(),
            shared.clone(),
            None,
            stop.clone(),
            cli.connect_concurrency,
        )
        .await;
        let took = t.elapsed();
        fleet.extend(ok);
        let c0 = cpu_mark(pid, pg);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let c1 = cpu_mark(pid, pg);
        let held = shared.connected.load(Ordering::Relaxed);
        let rss = env::sample(pid)?.rss_kb;
        let per_k =
            (rss.saturating_sub(base.rss_kb)) as f64 / 1024.0 / (held.max(1) as f64 / 1000.0);
        writeln!(
            s,
            "| {held} | {:.1} s | {:.0} MiB | {per_k:.1} MiB | {:.0} % | {} |",
            took.as_secs_f64(),
            rss as f64 / 1024.0,
            cpu_between(&c0, &c1).0,
            fd_count(pid)
        )?;
        eprintln!("streams: {held} held");
        if !errs.is_empty() {
            failures.push(format!("{} failed at ~{held}: {}", errs.len(), errs[0]));
            break;
        }
    }
    // Hold them all.
    let c0 = cpu_mark(pid, pg);
    let a0 = shared.acked.load(Ordering::Relaxed);
    let mut min_held = usize::MAX;
    let end = Instant::now() + Duration::from_secs_f64(hold);
    while Instant::now() < end {
        min_held = min_held.min(shared.connected.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let c1 = cpu_mark(pid, pg);
    let a1 = shared.acked.load(Ordering::Relaxed);
    let held = shared.connected.load(Ordering::Relaxed);
    let rss = env::sample(pid)?;
    let (ccpu, pcpu, bcpu) = cpu_between(&c0, &c1);
    let secs = c1.at.duration_since(c0.at).as_secs_f64();
    writeln!(s)?;
    writeln!(s, "| over a {hold:.0} s hold | value |\n|---|---|")?;
    writeln!(
        s,
        "| streams held at the end (fewest during the hold) | **{held}** ({min_held}) |"
    )?;
    writeln!(
        s,
        "| results stored per second meanwhile | {:.0} |",
        (a1 - a0) as f64 / secs
    )?;
    writeln!(
        s,
        "| collector RSS / peak | {:.0} / {:.0} MiB ({:.1} MiB per 1,000 agents above idle) |",
        rss.rss_kb as f64 / 1024.0,
        rss.hwm_kb as f64 / 1024.0,
        rss.rss_kb.saturating_sub(base.rss_kb) as f64 / 1024.0 / (held.max(1) as f64 / 1000.0)
    )?;
    writeln!(
        s,
        "| CPU (% of one core): collector / PostgreSQL / bench | {ccpu:.1} / {pcpu:.1} / {bcpu:.1} ({:.2} % collector per 1,000 agents) |",
        ccpu / (held.max(1) as f64 / 1000.0)
    )?;
    let ended = shared.ended.load(Ordering::Relaxed);
    writeln!(s, "| streams that ended with an error | {ended} |\n")?;
    let errs = shared.errors.lock().expect("lock").clone();
    if !errs.is_empty() || !failures.is_empty() {
        writeln!(s, "errors: {failures:?} {errs:?}\n")?;
    }
    stop.cancel();
    for (_, a) in fleet {
        let _ = a.task.await;
    }
    finish(run, pg).await;
    Ok(s)
}

async fn agent(cli: &Cli, pg: &Pg) -> anyhow::Result<String> {
    let duration = cli.duration.unwrap_or(180.0);
    let node = "footprint".to_string();
    let nodes = vec![node.clone()];
    // The collector's port is chosen by start_collector; tcp checks target PostgreSQL's port.
    let pg_addr = {
        let cfg: tokio_postgres::Config = pg.admin_url.parse()?;
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        format!("127.0.0.1:{port}")
    };
    let services: Vec<ServiceDef> = (0..20)
        .map(|i| ServiceDef {
            id: format!("footprint-c{i}"),
            node: node.clone(),
            check: Some(if i % 2 == 0 {
                "  type: command\n  interval: 30s\n  argv: [\"/bin/true\"]\n".to_string()
            } else {
                format!("  type: tcp\n  interval: 30s\n  address: \"{pg_addr}\"\n")
            }),
            restart: false,
        })
        .collect();
    let run = start_collector(cli, pg, "agent", &nodes, &services).await?;
    let agent_cfg = run.ws.write_agent(&node, run.addr)?;
    let bin = env::sibling_binary("vigil-agent")?;
    let cfg_s = agent_cfg.to_string_lossy().to_string();
    let agent = Proc::spawn(
        &bin,
        &["--config", &cfg_s],
        run.ws.path(),
        run.ws.path().join("agent.log"),
        "info",
    )?;
    let pid = agent.pid();
    // Start-up (connect, config, first run of every check) is left out of the steady figure.
    let settle = Duration::from_secs_f64((duration * 0.1).clamp(2.0, 10.0));
    tokio::time::sleep(settle).await;
    let s0 = env::sample(pid).context("the agent exited")?;
    let mut rss_sum = 0u64;
    let mut anon_sum = 0u64;
    let mut rss_max = 0u64;
    let mut threads_max = 0u64;
    let mut samples = 0u64;
    let end = Instant::now() + Duration::from_secs_f64(duration);
    while Instant::now() < end {
        let x = env::sample(pid).context("the agent exited")?;
        rss_sum += x.rss_kb;
        anon_sum += x.rss_anon_kb;
        rss_max = rss_max.max(x.rss_kb);
        threads_max = threads_max.max(x.threads);
        samples += 1;
        tokio::time::sleep(Duration::from_secs(1).min(end - Instant::now())).await;
    }
    let s1 = env::sample(pid)?;
    let secs = s1
        .at
        .zip(s0.at)
        .map_or(1.0, |(b, a)| b.duration_since(a).as_secs_f64());
    let own = 100.0 * (s1.cpu_s - s0.cpu_s) / secs;
    let kids = 100.0 * (s1.children_cpu_s - s0.children_cpu_s) / secs;
    let db = env::connect(&run.db_url).await?;
    let stored: i64 = db
        .query_one(
            "SELECT count(*) FROM check_results WHERE node = $1",
            &[&node],
        )
        .await?
        .get(0);
    drop(db);
    drop(agent);
    let mut s = String::new();
    writeln!(s, "## agent footprint\n")?;
    writeln!(
        s,
        "A real `vigil-agent` (release) with 20 checks every 30 s (10 `command` /bin/true, 10 `tcp`), connected to the collector, measured for {secs:.0} s after {:.0} s of start-up.\n",
        settle.as_secs_f64()
    )?;
    writeln!(s, "| figure | value |\n|---|---|")?;
    writeln!(
        s,
        "| resident memory avg / max / peak (VmHWM) | **{:.1}** / {:.1} / {:.1} MiB |",
        rss_sum as f64 / samples.max(1) as f64 / 1024.0,
        rss_max as f64 / 1024.0,
        s1.hwm_kb as f64 / 1024.0
    )?;
    writeln!(
        s,
        "| of which heap and stacks (RssAnon) avg / mapped files (binary, libraries) avg | {:.1} / {:.1} MiB |",
        anon_sum as f64 / samples.max(1) as f64 / 1024.0,
        (rss_sum - anon_sum) as f64 / samples.max(1) as f64 / 1024.0
    )?;
    writeln!(s, "| threads (most seen) | {threads_max} |")?;
    writeln!(s, "| CPU, agent process | **{own:.3} %** of one core |")?;
    writeln!(
        s,
        "| CPU, check processes it ran (/bin/true) | {kids:.3} % of one core |"
    )?;
    writeln!(s, "| results stored | {stored} |\n")?;
    finish(run, pg).await;
    Ok(s)
}
