//! Prometheus `/metrics` end to end: a real PostgreSQL, the collector and an agent in-process,
//! the exposition scraped over HTTP and parsed (OpenMetrics text), and the bearer token enforced.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use vigil_collector::{Collector, Config};
use vigil_tests::{Workspace, connected, init, pg, start_agent, true_service, wait_for};

const LIMIT: Duration = Duration::from_secs(30);

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed exposition: metric family types and samples.
#[derive(Debug, Default)]
struct Exposition {
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    /// The value of the one sample named `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        match found.as_slice() {
            [one] => Some(one.value),
            [] => None,
            _ => panic!("{name} {labels:?} matches {} samples", found.len()),
        }
    }
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(s: &str) -> anyhow::Result<f64> {
    Ok(match s {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => s
            .parse::<f64>()
            .with_context(|| format!("bad value {s:?}"))?,
    })
}

/// Parses `{name="value",...}` at the start of `s`; returns the labels and the rest of `s`.
fn parse_labels(s: &str) -> anyhow::Result<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').context("expected '{'")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').context("label without '='")?;
        let name = &rest[..eq];
        ensure!(is_name(name), "bad label name {name:?}");
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .context("label value must be quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => bail!("bad escape {other:?} in label {name}"),
                },
                Some((_, '\n')) | None => bail!("unterminated value of label {name}"),
                Some((_, c)) => value.push(c),
            }
        };
        ensure!(
            labels.insert(name.to_string(), value).is_none(),
            "label {name} repeated"
        );
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else {
            ensure!(
                rest.starts_with('}'),
                "expected ',' or '}}' after label {name}"
            );
        }
    }
}

/// Parses OpenMetrics text: metadata lines, samples (each belonging to a declared family), and
/// the final `# EOF`.
fn parse(text: &str) -> anyhow::Result<Exposition> {
    let mut exp = Exposition::default();
    ensure!(
        text.ends_with("# EOF\n"),
        "exposition does not end with # EOF"
    );
    let mut eof = false;
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        ensure!(!eof, "line {n} after # EOF");
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.splitn(3, ' ');
            let (kind, family, rest) = (parts.next(), parts.next(), parts.next());
            let family = family.with_context(|| format!("line {n}: metadata without a name"))?;
            ensure!(is_name(family), "line {n}: bad family name {family:?}");
            match (kind, rest) {
                (Some("TYPE"), Some(t)) => {
                    ensure!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "gaugehistogram",
                            "summary",
                            "info",
                            "stateset",
                            "unknown"
                        ]
                        .contains(&t),
                        "line {n}: unknown type {t:?}"
                    );
                    ensure!(
                        exp.types
                            .insert(family.to_string(), t.to_string())
                            .is_none(),
                        "line {n}: {family} declared twice"
                    );
                }
                (Some("HELP" | "UNIT"), _) => {}
                _ => bail!("line {n}: bad metadata {line:?}"),
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .with_context(|| format!("line {n}: no value: {line:?}"))?;
        let name = &line[..name_end];
        ensure!(is_name(name), "line {n}: bad metric name {name:?}");
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).with_context(|| format!("line {n}: {line:?}"))?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let rest = rest
            .strip_prefix(' ')
            .with_context(|| format!("line {n}: expected a space before the value"))?;
        // value [timestamp] [# exemplar]
        let rest = rest.split(" # ").next().unwrap_or_default();
        let mut fields = rest.split(' ');
        let value =
            parse_value(fields.next().unwrap_or_default()).with_context(|| format!("line {n}"))?;
        if let Some(ts) = fields.next() {
            parse_value(ts).with_context(|| format!("line {n}: timestamp"))?;
        }
        ensure!(fields.next().is_none(), "line {n}: trailing fields");
        let declared = exp.types.contains_key(name)
            || ["_total", "_created", "_count", "_sum", "_bucket", "_info"]
                .iter()
                .any(|suffix| {
                    name.strip_suffix(suffix)
                        .is_some_and(|f| exp.types.contains_key(f))
                });
        ensure!(declared, "line {n}: sample {name} of no declared family");
        exp.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    ensure!(eof, "no # EOF");
    Ok(exp)
}

/// What Prometheus sends (it prefers OpenMetrics).
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// GET /metrics with an optional bearer token, as Prometheus asks: (status, content type, body).
async fn get_metrics(
    addr: SocketAddr,
    token: Option<&str>,
) -> anyhow::Result<(u16, String, String)> {
    get_metrics_as(addr, token, Some(PROMETHEUS_ACCEPT)).await
}

/// GET /metrics with an optional token and `Accept` header.
async fn get_metrics_as(
    addr: SocketAddr,
    token: Option<&str>,
    accept: Option<&str>,
) -> anyhow::Result<(u16, String, String)> {
    let mut req = reqwest::Client::new().get(format!("http://{addr}/metrics"));
    if let Some(a) = accept {
        req = req.header(reqwest::header::ACCEPT, a);
    }
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    Ok((status, ctype, resp.text().await?))
}

/// Scrapes and parses `/metrics` (no token).
async fn scrape(addr: SocketAddr) -> anyhow::Result<Exposition> {
    let (status, ctype, body) = get_metrics(addr, None).await?;
    ensure!(status == 200, "GET /metrics: {status}: {body}");
    ensure!(
        ctype == "application/openmetrics-text; version=1.0.0; charset=utf-8",
        "content type {ctype:?}"
    );
    parse(&body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_ingest_and_survive_a_restart() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    ws.write_service("t", &true_service("t", "n1"))?;
    let cfg_path = ws.write_collector(&db.url, &["n1"])?;
    let collector = Collector::start(Config::load(&cfg_path)?).await?;
    let addr = collector
        .metrics_addr
        .context("metrics are on by default")?;

    // Before any result: the service is known from the database and not up; no agent.
    // (prometheus-client leaves out labelled families without series, so not the check durations.)
    let exp = scrape(addr).await?;
    assert_eq!(
        exp.types.get("vigil_service_up").map(String::as_str),
        Some("gauge")
    );
    assert_eq!(
        exp.types.get("vigil_results_ingested").map(String::as_str),
        Some("counter")
    );
    assert_eq!(
        exp.value(
            "vigil_service_up",
            &[("service", "t"), ("node", "n1"), ("category", "system")]
        ),
        Some(0.0)
    );
    assert_eq!(exp.value("vigil_agents_connected", &[]), Some(0.0));

    let agent = start_agent(&ws.write_agent("a", "n1", "n1", collector.grpc_addr)?).await?;
    connected(&agent).await?;
    let exp = wait_for("vigil_service_up of t = 1", LIMIT, || async move {
        let exp = scrape(addr).await?;
        Ok((exp.value("vigil_service_up", &[("service", "t")]) == Some(1.0)).then_some(exp))
    })
    .await?;
    assert_eq!(
        exp.value(
            "vigil_service_up",
            &[("service", "t"), ("node", "n1"), ("category", "system")]
        ),
        Some(1.0)
    );
    let ingested = exp
        .value("vigil_results_ingested_total", &[])
        .context("vigil_results_ingested_total")?;
    assert!(ingested > 0.0, "vigil_results_ingested_total = {ingested}");
    assert_eq!(exp.value("vigil_agents_connected", &[]), Some(1.0));
    assert_eq!(
        exp.types
            .get("vigil_check_duration_seconds")
            .map(String::as_str),
        Some("histogram")
    );
    let checks = exp
        .value("vigil_check_duration_seconds_count", &[("kind", "command")])
        .context("vigil_check_duration_seconds_count{kind=command}")?;
    assert!(checks > 0.0, "check duration count {checks}");
    assert_eq!(
        exp.value(
            "vigil_check_duration_seconds_bucket",
            &[("kind", "command"), ("le", "+Inf")]
        ),
        Some(checks)
    );
    let batches = exp
        .value("vigil_ingest_batch_seconds_count", &[])
        .context("vigil_ingest_batch_seconds_count")?;
    assert!(batches > 0.0, "ingest batch count {batches}");
    assert!(
        exp.value("vigil_ingest_batch_seconds_sum", &[])
            .is_some_and(|s| s >= 0.0)
    );

    agent.shutdown().await;
    wait_for("vigil_agents_connected = 0", LIMIT, || async move {
        let exp = scrape(addr).await?;
        Ok((exp.value("vigil_agents_connected", &[]) == Some(0.0)).then_some(()))
    })
    .await?;
    collector.shutdown().await;

    // A new collector on the same database knows the service is up before any agent reports.
    let collector = Collector::start(Config::load(&cfg_path)?).await?;
    let addr = collector.metrics_addr.context("metrics address")?;
    let exp = scrape(addr).await?;
    assert_eq!(
        exp.value(
            "vigil_service_up",
            &[("service", "t"), ("node", "n1"), ("category", "system")]
        ),
        Some(1.0)
    );
    assert_eq!(exp.value("vigil_agents_connected", &[]), Some(0.0));
    collector.shutdown().await;
    Ok(())
}

/// `promtool check metrics` (Prometheus' own linter) on the text format 0.0.4 that a scraper
/// not asking for OpenMetrics gets: no finding. Check durations keep sub-millisecond precision
/// (a TCP connect on loopback takes well under a millisecond: in whole milliseconds its sum
/// would stay 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_format_passes_promtool_and_durations_are_precise() -> anyhow::Result<()> {
    init();
    let Some(promtool) = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .iter()
        .map(std::path::Path::new)
        .find(|p| p.exists())
    else {
        ensure!(
            std::env::var("CI").as_deref() != Ok("true"),
            "promtool is missing (deploy/test.sh installs Debian's prometheus package)"
        );
        eprintln!("SKIPPED: promtool is not installed (apt-get install prometheus)");
        return Ok(());
    };
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    let open = std::net::TcpListener::bind("127.0.0.1:0")?;
    ws.write_service(
        "port",
        &format!(
            "id: port\ncategory: api\nnode: n1\ncheck:\n  type: tcp\n  interval: 1s\n  address: {}\n",
            open.local_addr()?
        ),
    )?;
    let cfg_path = ws.write_collector(&db.url, &["n1"])?;
    let collector = Collector::start(Config::load(&cfg_path)?).await?;
    let addr = collector.metrics_addr.context("metrics address")?;
    let agent = start_agent(&ws.write_agent("a", "n1", "n1", collector.grpc_addr)?).await?;
    connected(&agent).await?;
    let sum = wait_for("tcp check durations", LIMIT, || async move {
        let exp = scrape(addr).await?;
        Ok(exp
            .value("vigil_check_duration_seconds_count", &[("kind", "tcp")])
            .filter(|n| *n >= 2.0)
            .and(exp.value("vigil_check_duration_seconds_sum", &[("kind", "tcp")])))
    })
    .await?;
    assert!(
        sum > 0.0,
        "vigil_check_duration_seconds_sum{{kind=tcp}} = {sum}"
    );

    for accept in [None, Some("text/plain;version=0.0.4"), Some("*/*")] {
        let (status, ctype, body) = get_metrics_as(addr, None, accept).await?;
        ensure!(status == 200, "{status}: {body}");
        assert_eq!(
            ctype, "text/plain; version=0.0.4; charset=utf-8",
            "{accept:?}"
        );
        assert!(
            !body.contains("# EOF") && !body.contains("# UNIT"),
            "{body}"
        );
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        use std::io::Write;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(body.as_bytes())?;
        let out = child.wait_with_output()?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "promtool check metrics ({accept:?}): {said}\n--- exposition ---\n{body}"
        );
    }
    // Prometheus itself asks for OpenMetrics and gets it.
    let (_, ctype, _) = get_metrics(addr, None).await?;
    assert_eq!(
        ctype,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    agent.shutdown().await;
    collector.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_token_is_enforced() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    let path = ws.write_collector(&db.url, &[])?;
    let text = std::fs::read_to_string(&path)?;
    let plain = "metrics: { listen: 127.0.0.1:0 }";
    ensure!(text.contains(plain), "unexpected collector.yaml:\n{text}");
    std::fs::write(
        &path,
        text.replace(
            plain,
            "metrics: { listen: 127.0.0.1:0, bearer_token_file: metrics.token }",
        ),
    )?;
    std::fs::write(ws.path().join("metrics.token"), "s3cret-token\n")?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let addr = collector.metrics_addr.context("metrics address")?;

    let (status, _, _) = get_metrics(addr, None).await?;
    assert_eq!(status, 401, "no token");
    let (status, _, _) = get_metrics(addr, Some("wrong")).await?;
    assert_eq!(status, 401, "wrong token");
    let (status, ctype, body) = get_metrics(addr, Some("s3cret-token")).await?;
    assert_eq!(status, 200, "{body}");
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    let exp = parse(&body)?;
    assert_eq!(exp.value("vigil_agents_connected", &[]), Some(0.0));
    collector.shutdown().await;
    Ok(())
}

#[test]
fn parser_reads_escapes_and_rejects_garbage() {
    let exp = parse(
        "# TYPE a counter\na_total{x=\"q\\\"\\\\\\n\",y=\"\"} 3 # {} 1\n# TYPE b gauge\nb +Inf\n# EOF\n",
    )
    .expect("valid exposition");
    assert_eq!(
        exp.value("a_total", &[("x", "q\"\\\n"), ("y", "")]),
        Some(3.0)
    );
    assert_eq!(exp.value("b", &[]), Some(f64::INFINITY));
    for bad in [
        "a 1\n# EOF\n",                             // no TYPE
        "# TYPE a gauge\na 1\n",                    // no EOF
        "# TYPE a gauge\na{x=\"1} 1\n# EOF\n",      // unterminated
        "# TYPE a gauge\na{x=1} 1\n# EOF\n",        // unquoted
        "# TYPE a gauge\na one\n# EOF\n",           // bad value
        "# TYPE a gauge\na 1\n# EOF\na 2\n# EOF\n", // after EOF
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
}
