//! `vigil-collector status`: the services table, rendered as aligned text for a terminal, and a
//! line for every node that is down, whose results went missing, or whose backlog is old.

use chrono::{DateTime, Utc};

use crate::store::{NodeRow, StatusRow};

/// One line per node that needs attention (nothing when all are well).
pub fn render_nodes(nodes: &[NodeRow], now: DateTime<Utc>) -> String {
    let mut out = String::new();
    for n in nodes.iter().filter(|n| n.active) {
        if n.down_since.is_some() {
            out.push_str(&format!(
                "NODE {} DOWN since {}: {}\n",
                n.name,
                ago(n.down_since, now),
                one_line(n.down_reason.as_deref().unwrap_or(""), 120)
            ));
        }
        if n.backlog_alert_since.is_some() {
            out.push_str(&format!(
                "NODE {} BACKLOG: {} results held by its agent, the oldest taken {}\n",
                n.name,
                n.backlog_results.unwrap_or(0),
                ago(n.backlog_oldest_at, now)
            ));
        }
        if n.results_lost > 0 {
            out.push_str(&format!(
                "NODE {} LOST {} result(s) (never received; see its events)\n",
                n.name, n.results_lost
            ));
        }
    }
    if !out.is_empty() {
        out.insert(0, '\n');
    }
    out
}

fn ago(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    let Some(t) = t else { return "never".into() };
    let s = (now - t).num_seconds().max(0);
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86_399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

fn one_line(s: &str, max: usize) -> String {
    let line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > max {
        let cut: String = line.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        line
    }
}

/// Renders the table; `now` is a parameter so the output is testable.
pub fn render(rows: &[StatusRow], now: DateTime<Utc>) -> String {
    let header = [
        "SERVICE",
        "NODE",
        "CATEGORY",
        "STATE",
        "LAST CHECK",
        "RESPONSE",
        "FAILED 24H",
        "LAST ERROR",
    ];
    let mut table: Vec<[String; 8]> = vec![header.map(String::from)];
    for r in rows {
        let rate = if r.checks_24h == 0 {
            "-".to_string()
        } else {
            format!(
                "{:.1}% ({}/{})",
                r.failures_24h as f64 * 100.0 / r.checks_24h as f64,
                r.failures_24h,
                r.checks_24h
            )
        };
        table.push([
            r.service_id.clone(),
            r.node.clone(),
            r.category.clone(),
            r.state.to_uppercase(),
            ago(r.last_check_at, now),
            r.last_response_ms
                .map(|ms| format!("{ms} ms"))
                .unwrap_or_else(|| "-".into()),
            rate,
            r.last_error
                .as_deref()
                .map(|e| one_line(e, 80))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    let mut widths = [0usize; 8];
    for row in &table {
        for (i, c) in row.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for row in &table {
        let mut line = String::new();
        for (i, c) in row.iter().enumerate() {
            if i == 7 {
                line.push_str(c);
            } else {
                line.push_str(c);
                line.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("(no services configured)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rates_ages_and_errors() {
        let now = Utc::now();
        let rows = vec![
            StatusRow {
                service_id: "web".into(),
                node: "n1".into(),
                category: "web".into(),
                state: "healthy".into(),
                last_check_at: Some(now - chrono::Duration::seconds(5)),
                last_response_ms: Some(12),
                checks_24h: 4,
                failures_24h: 1,
                last_error: Some("status 500,\n expected [200]".into()),
            },
            StatusRow {
                service_id: "ocr".into(),
                node: "n1".into(),
                category: "api".into(),
                state: "unknown".into(),
                last_check_at: None,
                last_response_ms: None,
                checks_24h: 0,
                failures_24h: 0,
                last_error: None,
            },
        ];
        let out = render(&rows, now);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("SERVICE"));
        assert!(
            lines[1].contains("HEALTHY")
                && lines[1].contains("5s ago")
                && lines[1].contains("12 ms")
        );
        assert!(lines[1].contains("25.0% (1/4)"));
        assert!(lines[1].ends_with("status 500, expected [200]"));
        assert!(lines[2].contains("never") && lines[2].contains("UNKNOWN"));
        // Columns line up: STATE starts at the same offset on every line.
        let col = lines[0].find("STATE").unwrap();
        assert_eq!(&lines[1][col..col + 7], "HEALTHY");
    }
}
