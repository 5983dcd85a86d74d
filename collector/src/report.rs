//! `vigil-collector report`: the availability of every configured service and node over a
//! window (default: the last full calendar month, UTC), as JSON, CSV or one self-contained HTML
//! page (inline style, no external reference).

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use maud::{DOCTYPE, html};
use serde::Serialize;

use crate::availability::{Figures, ServiceAvailability, Totals, duration_text, percent_text};
use crate::store::{Scope, Store, StoreError};

/// The report's output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Json,
    Csv,
    Html,
}

/// The figures of one node: its configured services together.
#[derive(Debug, Clone, Serialize)]
pub struct NodeAvailability {
    pub node: String,
    pub services: usize,
    #[serde(flatten)]
    pub figures: Figures,
}

/// A whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Where counting stopped: `to`, or the time of the report when `to` is in the future.
    pub until: DateTime<Utc>,
    pub generated_at: DateTime<Utc>,
    /// Every service together.
    pub total: Figures,
    pub nodes: Vec<NodeAvailability>,
    pub services: Vec<ServiceAvailability>,
}

/// The last full calendar month before `now`, UTC: `[first of last month, first of this month)`.
pub fn last_full_month(now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let first = |y: i32, m: u32| {
        Utc.from_utc_datetime(
            &NaiveDate::from_ymd_opt(y, m, 1)
                .expect("the first of a month exists")
                .and_hms_opt(0, 0, 0)
                .expect("midnight exists"),
        )
    };
    let (y, m) = (now.year(), now.month());
    let to = first(y, m);
    let from = if m == 1 {
        first(y - 1, 12)
    } else {
        first(y, m - 1)
    };
    (from, to)
}

/// A time on the command line: RFC 3339 (2026-11-01T00:00:00Z) or a UTC date (2026-11-01,
/// midnight).
pub fn parse_when(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| Utc.from_utc_datetime(&t))
        .ok_or_else(|| {
            format!(
                "{s:?} is neither an RFC 3339 time (2026-11-01T00:00:00Z) nor a date (2026-11-01)"
            )
        })
}

/// Reads the database and computes the report of every configured service over `[from, to)`.
pub async fn build(
    store: &Store,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Report, StoreError> {
    let (sum, per, until) =
        crate::web::availability::compute(store, Scope::All, from, to, now).await?;
    // Services come ordered by node: a node's totals are one run.
    let mut nodes: Vec<(String, usize, Totals)> = Vec::new();
    for (s, t) in &per {
        match nodes.last_mut() {
            Some((n, count, total)) if *n == s.node => {
                *count += 1;
                total.add(t);
            }
            _ => nodes.push((s.node.clone(), 1, *t)),
        }
    }
    Ok(Report {
        from,
        to,
        until,
        generated_at: now,
        total: sum.figures(),
        nodes: nodes
            .into_iter()
            .map(|(node, services, t)| NodeAvailability {
                node,
                services,
                figures: t.figures(),
            })
            .collect(),
        services: per.into_iter().map(|(s, _)| s).collect(),
    })
}

/// The report as pretty JSON.
pub fn json(r: &Report) -> String {
    let mut s = serde_json::to_string_pretty(r).expect("a report serializes");
    s.push('\n');
    s
}

/// The CSV columns: what a row is about, then the figures.
pub const CSV_HEADER: [&str; 16] = [
    "kind",
    "id",
    "name",
    "node",
    "category",
    "uptime_percent",
    "counted_seconds",
    "up_seconds",
    "down_seconds",
    "not_counted_seconds",
    "incidents",
    "longest_incident_seconds",
    "mttr_seconds",
    "mtbf_seconds",
    "down_at_end",
    "window",
];

fn csv_row(
    kind: &str,
    id: &str,
    name: &str,
    node: &str,
    category: &str,
    f: &Figures,
    window: &str,
) -> Vec<String> {
    let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    vec![
        kind.into(),
        id.into(),
        name.into(),
        node.into(),
        category.into(),
        opt(f.uptime_percent),
        f.counted_seconds.to_string(),
        f.up_seconds.to_string(),
        f.down_seconds.to_string(),
        f.not_counted_seconds.to_string(),
        f.incidents.to_string(),
        f.longest_incident_seconds.to_string(),
        opt(f.mttr_seconds),
        opt(f.mtbf_seconds),
        f.down_at_end.to_string(),
        window.into(),
    ]
}

/// The report as CSV (RFC 4180, a header row): one row per service (`kind` service), per node
/// (`node`) and one for everything (`total`); empty cells where a figure has no value.
pub fn csv(r: &Report) -> String {
    let window = format!("{}/{}", r.from.to_rfc3339(), r.until.to_rfc3339());
    let mut w = ::csv::Writer::from_writer(Vec::new());
    let mut rows = vec![CSV_HEADER.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    for s in &r.services {
        rows.push(csv_row(
            "service",
            &s.service,
            &s.name,
            &s.node,
            &s.category,
            &s.figures,
            &window,
        ));
    }
    for n in &r.nodes {
        rows.push(csv_row(
            "node", &n.node, &n.node, &n.node, "", &n.figures, &window,
        ));
    }
    rows.push(csv_row("total", "", "", "", "", &r.total, &window));
    for row in rows {
        w.write_record(&row).expect("writing to memory cannot fail");
    }
    String::from_utf8(w.into_inner().expect("writing to memory cannot fail"))
        .expect("CSV of UTF-8 strings is UTF-8")
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;color:#1d232b;margin:24px}\
h1{font-size:20px}h2{font-size:16px;margin-top:24px}\
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #dde1e6}\
th{background:#eef0f3;font-size:12px;text-transform:uppercase}td.num{text-align:right;font-variant-numeric:tabular-nums}\
.bad{color:#c62828;font-weight:600}.muted{color:#6b7480;font-size:12px}";

/// The report as one HTML page with its style inline: no script, image, font or link to fetch.
pub fn html(r: &Report) -> String {
    let figures_cells = |f: &Figures| {
        html! {
            td.num.bad[f.uptime_percent.is_some_and(|p| p < 99.0)] { (percent_text(f.uptime_percent)) }
            td.num { (f.incidents) }
            td.num { (duration_text((f.down_seconds > 0.0).then_some(f.down_seconds))) }
            td.num { (duration_text(f.mttr_seconds)) }
            td.num { (duration_text(f.mtbf_seconds)) }
            td.num { (duration_text((f.longest_incident_seconds > 0.0).then_some(f.longest_incident_seconds))) }
            td.num { (duration_text(Some(f.not_counted_seconds))) }
        }
    };
    let heads = html! {
        th { "Uptime" } th { "Incidents" } th { "Down" } th { "MTTR" } th { "MTBF" }
        th { "Longest" } th { "Not counted" }
    };
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "Availability " (r.from.format("%Y-%m-%d")) " – " (r.to.format("%Y-%m-%d")) " · Vigil" }
                style { (STYLE) }
            }
            body {
                h1 { "Availability from " (r.from.format("%Y-%m-%d %H:%M UTC")) " to " (r.to.format("%Y-%m-%d %H:%M UTC")) }
                p {
                    "All services: " strong { (percent_text(r.total.uptime_percent)) } " uptime, "
                    (r.total.incidents) " incident(s), "
                    (duration_text(Some(r.total.down_seconds))) " down."
                }
                p.muted {
                    "Computed from recorded state transitions. Down: state down or stale (no fresh result, \
                     also while its node is down). Not counted: paused, stopped, in maintenance, no result yet. \
                     MTTR: down time per incident; MTBF: up time per incident. Counted until "
                    (r.until.format("%Y-%m-%d %H:%M:%S UTC")) "; generated "
                    (r.generated_at.format("%Y-%m-%d %H:%M:%S UTC")) "."
                }
                h2 { "Nodes" }
                table {
                    thead { tr { th { "Node" } th { "Services" } (heads) } }
                    tbody { @for n in &r.nodes { tr { td { (n.node) } td.num { (n.services) } (figures_cells(&n.figures)) } } }
                }
                h2 { "Services" }
                table {
                    thead { tr { th { "Service" } th { "Node" } th { "Category" } (heads) } }
                    tbody { @for s in &r.services { tr {
                        td { (s.name) " " span.muted { "(" (s.service) ")" } } td { (s.node) } td { (s.category) }
                        (figures_cells(&s.figures))
                    } } }
                }
            }
        }
    };
    page.into_string()
}

/// Renders a report in `format`.
pub fn render(r: &Report, format: Format) -> String {
    match format {
        Format::Json => json(r),
        Format::Csv => csv(r),
        Format::Html => html(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn the_default_is_the_last_full_month() {
        assert_eq!(
            last_full_month(t("2026-12-01T00:00:00Z")),
            (t("2026-11-01T00:00:00Z"), t("2026-12-01T00:00:00Z"))
        );
        assert_eq!(
            last_full_month(t("2027-01-15T10:00:00Z")),
            (t("2026-12-01T00:00:00Z"), t("2027-01-01T00:00:00Z"))
        );
    }

    #[test]
    fn times_on_the_command_line() {
        assert_eq!(parse_when("2026-11-01").unwrap(), t("2026-11-01T00:00:00Z"));
        assert_eq!(
            parse_when("2026-11-01T02:00:00+02:00").unwrap(),
            t("2026-11-01T00:00:00Z")
        );
        assert!(parse_when("2026-02-30").is_err());
        assert!(parse_when("last month").is_err());
    }

    fn sample() -> Report {
        let f = Totals {
            up_us: 86_400_000_000 - 600_000_000,
            down_us: 600_000_000,
            incidents: 1,
            longest_incident_us: 600_000_000,
            ..Totals::default()
        }
        .figures();
        Report {
            from: t("2026-11-01T00:00:00Z"),
            to: t("2026-11-02T00:00:00Z"),
            until: t("2026-11-02T00:00:00Z"),
            generated_at: t("2026-11-05T00:00:00Z"),
            total: f,
            nodes: vec![NodeAvailability {
                node: "n1".into(),
                services: 1,
                figures: f,
            }],
            services: vec![ServiceAvailability {
                service: "api".into(),
                name: "API, \"main\"\n<b>".into(),
                node: "n1".into(),
                category: "api".into(),
                figures: f,
            }],
        }
    }

    #[test]
    fn csv_quotes_what_needs_quoting_and_parses_back() {
        let text = csv(&sample());
        let mut rd = ::csv::Reader::from_reader(text.as_bytes());
        assert_eq!(rd.headers().unwrap().iter().collect::<Vec<_>>(), CSV_HEADER);
        let rows: Vec<::csv::StringRecord> = rd.records().map(|r| r.unwrap()).collect();
        assert_eq!(rows.len(), 3);
        assert_eq!(&rows[0][2], "API, \"main\"\n<b>");
        assert_eq!(&rows[0][8], "600");
        assert_eq!(&rows[2][0], "total");
    }

    #[test]
    fn html_is_self_contained_and_escaped() {
        let page = html(&sample());
        assert!(page.contains("99.31 %"));
        assert!(page.contains("&lt;b&gt;"), "names are escaped");
        for external in [
            "<script", "<link", "<img", "src=", "href=", "url(", "@import",
        ] {
            assert!(!page.contains(external), "{external} in the page");
        }
    }
}
