//! Scenario `backlog`: a real `vigil-agent` with a large outbox of large results (a plugin that
//! prints ~1,200 perfdata metrics), first filling it with the collector down, then draining it
//! into the real collector; the agent's resident memory throughout and the drain rate.
//!
//! The backlog is written with the agent's own [`Outbox`] (the same sanitising and storage code
//! the agent uses; 1,000 results per transaction instead of one, so that 100,000 results take
//! seconds rather than 100,000 fsyncs), from the result of the real `command` check run once here.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use prost::Message as _;
use vigil_agent::cache::ConfigCache;
use vigil_agent::outbox::{self, Outbox};
use vigil_proto::{CheckAssignment, CheckResult, ConfigUpdate};

use crate::env::{self, Pg, Proc, ProcSample, ServiceDef};
use crate::{Cli, finish, prepare_collector, spawn_collector};

/// The node of the real agent.
const NODE: &str = "backlog";
/// The plugin output the checks print (`cat`), in the workspace.
const PERFDATA_FILE: &str = "perfdata.txt";
/// Results per outbox transaction while filling the backlog.
const CHUNK: usize = 1000;
/// How often the agent's memory is read.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// The drain must end within this.
const DRAIN_LIMIT: Duration = Duration::from_secs(3600);

/// Resident memory over a phase (from /proc, kB).
#[derive(Debug, Default, Clone, Copy)]
struct Rss {
    samples: u64,
    sum_kb: u64,
    max_kb: u64,
    max_anon_kb: u64,
}

impl Rss {
    fn add(&mut self, s: &ProcSample) {
        self.samples += 1;
        self.sum_kb += s.rss_kb;
        self.max_kb = self.max_kb.max(s.rss_kb);
        self.max_anon_kb = self.max_anon_kb.max(s.rss_anon_kb);
    }

    fn avg_mib(&self) -> f64 {
        self.sum_kb as f64 / self.samples.max(1) as f64 / 1024.0
    }
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// One line of plugin output with `n` perfdata metrics (a disk plugin on a host with many
/// volumes): `DISK OK - n volumes | v0000=…B;…;…;0;… v0001=…`.
fn perfdata_text(n: usize) -> String {
    let mut s = format!("DISK OK - {n} volumes |");
    for i in 0..n {
        let used = 1_000_000 + i * 7919;
        write!(s, " v{i:04}={used}B;9000000;9500000;0;10000000").expect("write to String");
    }
    s.push('\n');
    s
}

fn spec_json(perfdata: &str) -> String {
    serde_json::json!({
        "type": "command",
        "argv": ["/bin/cat", perfdata],
        "interval": "1s",
    })
    .to_string()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What the backlog was made of.
struct Filled {
    epoch: u64,
    last_seq: u64,
    /// Encoded size of one (sanitised) result.
    result_bytes: usize,
    metrics_printed: usize,
    metrics_kept: usize,
    took: Duration,
    file_bytes: u64,
}

/// Writes `total` results made from `template` into the outbox in `state_dir`, spread over
/// `services` and over the past `total` seconds.
fn fill_outbox(
    state_dir: &Path,
    template: &CheckResult,
    services: &[String],
    total: usize,
    metrics_printed: usize,
) -> anyhow::Result<Filled> {
    std::fs::create_dir_all(state_dir)?;
    let path = state_dir.join(outbox::FILE_NAME);
    let t = Instant::now();
    let ob = Outbox::open(&path, 1_000_000).context("open the agent's outbox")?;
    let start = now_ms() - total as i64 * 1000;
    let mut last_seq = 0;
    let mut made = 0usize;
    while made < total {
        let n = CHUNK.min(total - made);
        let chunk: Vec<CheckResult> = (made..made + n)
            .map(|i| {
                let mut r = template.clone();
                r.service_id = services[i % services.len()].clone();
                r.started_at_ms = start + i as i64 * 1000 / services.len().max(1) as i64;
                r
            })
            .collect();
        last_seq = *ob.append_all(chunk)?.end();
        made += n;
    }
    let took = t.elapsed();
    let p = ob.pending(0, 1, usize::MAX)?;
    let sample = p.results.first().context("the outbox is empty")?;
    let filled = Filled {
        epoch: ob.epoch(),
        last_seq,
        result_bytes: sample.encoded_len(),
        metrics_printed,
        metrics_kept: sample.metrics.len(),
        took,
        file_bytes: 0,
    };
    drop(ob);
    Ok(Filled {
        file_bytes: std::fs::metadata(&path)?.len(),
        ..filled
    })
}

pub async fn run(cli: &Cli, pg: &Pg) -> anyhow::Result<String> {
    let total = cli.results.max(1);
    let checks = cli.checks.unwrap_or(10).max(1);
    let fill_for = Duration::from_secs_f64(cli.duration.unwrap_or(20.0));
    let metrics = cli.metrics.max(1);
    let node = NODE.to_string();
    let ids: Vec<String> = (0..checks).map(|i| format!("{NODE}-c{i}")).collect();
    // Relative to the agent's working directory, the workspace.
    let check =
        format!("  type: command\n  interval: 1s\n  argv: [\"/bin/cat\", \"{PERFDATA_FILE}\"]\n");
    let services: Vec<ServiceDef> = ids
        .iter()
        .map(|id| ServiceDef {
            id: id.clone(),
            node: node.clone(),
            check: Some(check.clone()),
            restart: false,
        })
        .collect();
    let prepared =
        prepare_collector(cli, pg, "backlog", std::slice::from_ref(&node), &services).await?;
    let ws = prepared.ws.path().to_path_buf();
    let perfdata = ws.join(PERFDATA_FILE);
    std::fs::write(&perfdata, perfdata_text(metrics))?;

    // The real check, run once: every backlog result is its result.
    let spec: vigil_checks::CheckSpec =
        serde_json::from_str(&spec_json(&perfdata.to_string_lossy()))?;
    let outcome = spec.run(&Default::default()).await;
    ensure!(
        outcome.metrics.len() == metrics,
        "the check parsed {} of {metrics} metrics: {}",
        outcome.metrics.len(),
        outcome.message
    );
    let template = CheckResult {
        seq: 0,
        service_id: String::new(),
        started_at_ms: 0,
        duration_ms: u32::try_from(outcome.duration.as_millis()).unwrap_or(u32::MAX),
        status: vigil_proto::Status::from(outcome.status) as i32,
        message: outcome.message.clone(),
        metrics: outcome.metrics.iter().cloned().map(Into::into).collect(),
        output: outcome.output.clone(),
        config_version: 1,
        exit_code: None,
        duration_us: 0,
    };
    let state_dir = ws.join(format!("agent-{node}"));
    let filled = {
        let (state_dir, template, ids) = (state_dir.clone(), template.clone(), ids.clone());
        tokio::task::spawn_blocking(move || {
            fill_outbox(&state_dir, &template, &ids, total, metrics)
        })
        .await??
    };
    eprintln!(
        "backlog: {total} results ({} bytes each) written in {:.1}s, outbox file {:.0} MiB",
        filled.result_bytes,
        filled.took.as_secs_f64(),
        filled.file_bytes as f64 / 1024.0 / 1024.0
    );
    // The agent runs its checks from the cached config while the collector is down.
    let update = ConfigUpdate {
        version: 1,
        checks: ids
            .iter()
            .map(|id| CheckAssignment {
                service_id: id.clone(),
                spec_json: spec_json(PERFDATA_FILE),
            })
            .collect(),
        ..Default::default()
    };
    ConfigCache::new(&state_dir)
        .store(&update)
        .context("write the agent's cached config")?;

    let agent_cfg = prepared.ws.write_agent(&node, prepared.addr)?;
    let bin = env::sibling_binary("vigil-agent")?;
    let cfg_s = agent_cfg.to_string_lossy().to_string();
    let agent_log = ws.join("agent.log");
    let agent = Proc::spawn(&bin, &["--config", &cfg_s], &ws, agent_log.clone(), "info")?;
    let pid = agent.pid();

    // Fill: the collector is down; the agent opens the backlog and adds to it.
    let t = Instant::now();
    let mut fill = Rss::default();
    let mut first = None;
    while t.elapsed() < fill_for {
        let s = env::sample(pid).context("the agent exited while filling")?;
        if t.elapsed() >= Duration::from_secs(1) {
            first.get_or_insert(s);
        }
        fill.add(&s);
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    let first = first.unwrap_or_default();
    let fill_hwm = env::sample(pid).context("the agent exited")?.hwm_kb;

    // Drain: the collector comes up; the agent sends its outbox.
    let run = spawn_collector(cli, "backlog", prepared).await?;
    let db = env::connect(&run.db_url).await?;
    let epoch = i64::try_from(filled.epoch).context("outbox epoch above i64::MAX")?;
    let t = Instant::now();
    let mut drain = Rss::default();
    let mut collector_max_kb = 0u64;
    let mut first_stored = None;
    let mut last_poll = Instant::now() - Duration::from_secs(1);
    // Agent RSS (max so far) when 10, 25, 50, 75 and 100 % of the backlog was stored.
    let marks = [10u64, 25, 50, 75, 100];
    let mut at_marks: Vec<(u64, f64, u64)> = Vec::new();
    let drained = loop {
        let s = env::sample(pid).context("the agent exited while draining")?;
        drain.add(&s);
        if let Ok(c) = env::sample(run.pid) {
            collector_max_kb = collector_max_kb.max(c.rss_kb);
        }
        if last_poll.elapsed() >= Duration::from_secs(1) {
            last_poll = Instant::now();
            let stored: Option<i64> = db
                .query_opt(
                    "SELECT stored_seq FROM outbox_progress WHERE node = $1 AND outbox_epoch = $2",
                    &[&node, &epoch],
                )
                .await?
                .map(|r| r.get(0));
            let stored = stored.unwrap_or(0).max(0) as u64;
            if stored > 0 && first_stored.is_none() {
                first_stored = Some(t.elapsed());
            }
            while let Some(&m) = marks.get(at_marks.len()) {
                if stored * 100 < filled.last_seq * m {
                    break;
                }
                at_marks.push((m, t.elapsed().as_secs_f64(), drain.max_kb));
            }
            if stored >= filled.last_seq {
                break t.elapsed();
            }
        }
        if t.elapsed() > DRAIN_LIMIT {
            bail!(
                "the backlog was not drained within {} s",
                DRAIN_LIMIT.as_secs()
            );
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    };
    let end = env::sample(pid).context("the agent exited")?;
    let backlog_rows: i64 = db
        .query_one(
            "SELECT count(*) FROM check_results WHERE node = $1 AND outbox_epoch = $2 AND seq <= $3",
            &[&node, &epoch, &(filled.last_seq as i64)],
        )
        .await?
        .get(0);
    drop(db);
    drop(agent);
    let log = std::fs::read_to_string(&agent_log).unwrap_or_default();
    let lost_streams = log
        .lines()
        .filter(|l| l.contains("connection to the collector lost"))
        .count();

    let secs = drained.as_secs_f64().max(1e-9);
    let mut s = String::new();
    writeln!(s, "## agent backlog\n")?;
    writeln!(
        s,
        "A real `vigil-agent` (release) whose outbox holds {total} results, each the real `command` check's result for a plugin printing {} perfdata metrics ({} kept by sanitising, {} bytes encoded), {:.0} MiB of outbox file, written with the agent's `Outbox` in {:.1} s. Fill: {checks} such checks every second with the collector down, for {:.0} s. Drain: the collector starts and the agent sends its outbox (batches ≤ {} KiB, ≤ {} KiB unacknowledged).\n",
        filled.metrics_printed,
        filled.metrics_kept,
        filled.result_bytes,
        filled.file_bytes as f64 / 1024.0 / 1024.0,
        filled.took.as_secs_f64(),
        fill_for.as_secs_f64(),
        vigil_agent::client::MAX_BATCH_BYTES / 1024,
        vigil_agent::client::MAX_IN_FLIGHT_BYTES / 1024,
    )?;
    writeln!(s, "| figure | value |\n|---|---|")?;
    writeln!(
        s,
        "| agent RSS 1 s after start (outbox open, checks starting) | {:.1} MiB |",
        mib(first.rss_kb)
    )?;
    writeln!(
        s,
        "| fill: agent RSS avg / **max** (RssAnon max) / VmHWM | {:.1} / **{:.1}** ({:.1}) / {:.1} MiB |",
        fill.avg_mib(),
        mib(fill.max_kb),
        mib(fill.max_anon_kb),
        mib(fill_hwm)
    )?;
    writeln!(
        s,
        "| drain: agent RSS avg / **max** (RssAnon max) / VmHWM at the end | {:.1} / **{:.1}** ({:.1}) / {:.1} MiB |",
        drain.avg_mib(),
        mib(drain.max_kb),
        mib(drain.max_anon_kb),
        mib(end.hwm_kb)
    )?;
    writeln!(
        s,
        "| drain: {total} results stored in | **{secs:.1} s** ({:.0} results/s, {:.1} MiB/s; first stored after {:.1} s) |",
        total as f64 / secs,
        (total * filled.result_bytes) as f64 / 1024.0 / 1024.0 / secs,
        first_stored.map_or(0.0, |d| d.as_secs_f64())
    )?;
    let marks_text: Vec<String> = at_marks
        .iter()
        .map(|(m, secs, kb)| format!("{m} %: {secs:.0} s, {:.1} MiB", mib(*kb)))
        .collect();
    writeln!(
        s,
        "| drain progress: time and agent RSS max so far | {} |",
        marks_text.join("; ")
    )?;
    writeln!(
        s,
        "| backlog rows in check_results at the end (of {total}) | {backlog_rows} |"
    )?;
    writeln!(
        s,
        "| collector RSS max during the drain | {:.0} MiB |",
        mib(collector_max_kb)
    )?;
    writeln!(
        s,
        "| agent streams lost during the run | {lost_streams} |\n"
    )?;
    finish(run, pg).await;
    Ok(s)
}
