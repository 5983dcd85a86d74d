//! Nagios / Monitoring-Plugins output parsing: perfdata `'label'=value[UOM];warn;crit;min;max`,
//! threshold ranges (`10`, `10:`, `~:10`, `10:20`, `@10:20`) and the plugin output layout
//! (first line `message | perfdata`, then long text, whose `|` starts more perfdata).
//!
//! Parsing never fails and never panics: an entry that cannot be read is skipped (and logged at
//! debug level), because a check must still report its status when a plugin prints odd perfdata.

use serde::{Deserialize, Serialize};

/// One measured value reported by a check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub label: String,
    pub value: f64,
    /// Unit of measure as written (`s`, `ms`, `%`, `B`, `KB`, `c`, ...), empty if none.
    #[serde(default)]
    pub unit: String,
    /// Warning and critical ranges as written (`10`, `10:`, `~:10`, `@10:20`), empty if none.
    /// A range that does not parse with [`Range::parse`] is dropped (left empty) by the parser.
    #[serde(default)]
    pub warn: String,
    #[serde(default)]
    pub crit: String,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

impl Metric {
    /// A metric with only a label, a value and a unit.
    pub fn new(label: impl Into<String>, value: f64, unit: impl Into<String>) -> Self {
        Metric {
            label: label.into(),
            value,
            unit: unit.into(),
            warn: String::new(),
            crit: String::new(),
            min: None,
            max: None,
        }
    }
}

/// Why a threshold range string is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("empty range")]
    Empty,
    #[error("invalid number {0:?} in range")]
    Number(String),
    #[error("range start {start} is greater than its end {end}")]
    Reversed { start: String, end: String },
}

/// A Nagios threshold range. The check alerts when the value is *outside* `start..=end`, or,
/// with a leading `@`, when it is *inside*.
///
/// | written   | start | end  | alerts when           |
/// |-----------|-------|------|-----------------------|
/// | `10`      | 0     | 10   | v < 0 or v > 10       |
/// | `10:`     | 10    | +inf | v < 10                |
/// | `~:10`    | -inf  | 10   | v > 10                |
/// | `10:20`   | 10    | 20   | v < 10 or v > 20      |
/// | `@10:20`  | 10    | 20   | 10 <= v <= 20         |
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    pub start: f64,
    pub end: f64,
    /// `@` prefix: alert when the value is inside the range.
    pub inside: bool,
}

impl Range {
    /// Parses a range as written in perfdata or a plugin's `-w`/`-c` argument.
    pub fn parse(s: &str) -> Result<Range, RangeError> {
        let s = s.trim();
        let (inside, body) = match s.strip_prefix('@') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        if body.is_empty() {
            return Err(RangeError::Empty);
        }
        let (start, end) = match body.split_once(':') {
            None => (0.0, parse_number(body)?),
            Some((start, end)) => {
                let start = match start {
                    "~" => f64::NEG_INFINITY,
                    "" => 0.0,
                    s => parse_number(s)?,
                };
                let end = if end.is_empty() {
                    f64::INFINITY
                } else {
                    parse_number(end)?
                };
                (start, end)
            }
        };
        if start > end {
            return Err(RangeError::Reversed {
                start: start.to_string(),
                end: end.to_string(),
            });
        }
        Ok(Range { start, end, inside })
    }

    /// Whether `value` should raise an alert under this range.
    pub fn alerts(&self, value: f64) -> bool {
        let within = value >= self.start && value <= self.end;
        if self.inside { within } else { !within }
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.inside {
            f.write_str("@")?;
        }
        match (self.start, self.end) {
            (s, e) if s == 0.0 && e.is_finite() => write!(f, "{e}"),
            (s, e) => {
                if s == f64::NEG_INFINITY {
                    f.write_str("~")?;
                } else {
                    write!(f, "{s}")?;
                }
                f.write_str(":")?;
                if e.is_finite() {
                    write!(f, "{e}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::str::FromStr for Range {
    type Err = RangeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Range::parse(s)
    }
}

fn parse_number(s: &str) -> Result<f64, RangeError> {
    match split_number(s) {
        Some((v, "")) => Ok(v),
        _ => Err(RangeError::Number(s.to_string())),
    }
}

/// Splits the leading decimal number (`-1.5`, `.5`, `3e-2`, `1,5` with a decimal comma) off `s`;
/// returns it and the rest (the unit). `None` when `s` does not start with a finite number.
fn split_number(s: &str) -> Option<(f64, &str)> {
    let b = s.as_bytes();
    let mut i = 0;
    if i < b.len() && (b[i] == b'-' || b[i] == b'+') {
        i += 1;
    }
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let mut digits = i - int_start;
    let mut comma = false;
    if i < b.len() && (b[i] == b'.' || b[i] == b',') {
        let frac_start = i + 1;
        let mut j = frac_start;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        // A lone trailing separator ("5." or "5,") is accepted only for '.', as in strtod.
        if j > frac_start || b[i] == b'.' {
            comma = b[i] == b',';
            digits += j - frac_start;
            i = j;
        }
    }
    if digits == 0 {
        return None;
    }
    // Exponent, only when digits follow (so a unit such as "e" is not eaten).
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        let mut j = i + 1;
        if j < b.len() && (b[j] == b'-' || b[j] == b'+') {
            j += 1;
        }
        let exp_start = j;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        if j > exp_start {
            i = j;
        }
    }
    let text = &s[..i];
    let value: f64 = if comma {
        text.replace(',', ".").parse().ok()?
    } else {
        text.parse().ok()?
    };
    value.is_finite().then_some((value, &s[i..]))
}

/// Parses a perfdata string: space-separated `label=value[UOM];warn;crit;min;max` entries, labels
/// optionally in single quotes (a quote inside is written `''`). Entries with the value `U`
/// (unknown), a missing `=`, an empty label or a non-numeric value are skipped.
pub fn parse_perfdata(s: &str) -> Vec<Metric> {
    let mut metrics = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let (label, after_label) = match read_label(rest) {
            Ok(v) => v,
            Err(skip_to) => {
                tracing::debug!(entry = %&rest[..skip_to], "perfdata: skipping entry without label=value");
                rest = &rest[skip_to..];
                continue;
            }
        };
        let end = after_label
            .find(char::is_whitespace)
            .unwrap_or(after_label.len());
        let data = &after_label[..end];
        rest = &after_label[end..];
        if label.is_empty() {
            tracing::debug!(data, "perfdata: skipping entry with an empty label");
            continue;
        }
        if let Some(m) = parse_entry(label, data) {
            metrics.push(m);
        }
    }
    metrics
}

/// Reads `label=` from the start of `s` (quoted or not). Returns the label and what follows the
/// `=`, or, for garbage, the byte offset where the next entry may start.
fn read_label(s: &str) -> Result<(String, &str), usize> {
    if let Some(quoted) = s.strip_prefix('\'') {
        let mut label = String::new();
        let mut chars = quoted.char_indices();
        while let Some((i, c)) = chars.next() {
            if c != '\'' {
                label.push(c);
                continue;
            }
            // `''` is an escaped quote inside the label.
            if quoted[i + 1..].starts_with('\'') {
                label.push('\'');
                chars.next();
                continue;
            }
            // Closing quote: `=` must follow.
            let after = &quoted[i + 1..];
            return match after.strip_prefix('=') {
                Some(data) => Ok((label, data)),
                None => Err(1 + i + 1 + after.find(char::is_whitespace).unwrap_or(after.len())),
            };
        }
        // Unterminated quote: nothing more can be read reliably.
        Err(s.len())
    } else {
        let token_end = s.find(char::is_whitespace).unwrap_or(s.len());
        let token = &s[..token_end];
        match token.find('=') {
            Some(eq) => Ok((token[..eq].to_string(), &s[eq + 1..])),
            None => Err(token_end),
        }
    }
}

fn parse_entry(label: String, data: &str) -> Option<Metric> {
    let mut fields = data.split(';');
    let value_field = fields.next().unwrap_or("");
    if value_field == "U" {
        tracing::debug!(label, "perfdata: value unknown (U), skipped");
        return None;
    }
    let Some((value, unit)) = split_number(value_field) else {
        tracing::debug!(
            label,
            value = value_field,
            "perfdata: value is not a number, skipped"
        );
        return None;
    };
    let mut range_field = |name: &str| -> String {
        let raw = fields.next().unwrap_or("").trim();
        if raw.is_empty() {
            return String::new();
        }
        match Range::parse(raw) {
            Ok(_) => raw.to_string(),
            Err(e) => {
                tracing::debug!(label, field = name, raw, error = %e, "perfdata: invalid range dropped");
                String::new()
            }
        }
    };
    let warn = range_field("warn");
    let crit = range_field("crit");
    let mut bound = || -> Option<f64> {
        let raw = fields.next().unwrap_or("").trim();
        // Some plugins repeat the unit on min/max; accept and ignore it.
        split_number(raw).map(|(v, _)| v)
    };
    let min = bound();
    let max = bound();
    Some(Metric {
        label,
        value,
        unit: unit.to_string(),
        warn,
        crit,
        min,
        max,
    })
}

/// What a plugin printed on stdout, split by the plugin convention.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PluginOutput {
    /// First line, before any `|`, trimmed.
    pub message: String,
    /// Lines after the first, up to the `|` that starts the long-output perfdata.
    pub long_text: String,
    pub metrics: Vec<Metric>,
}

/// Splits plugin stdout: the first line is `message | perfdata`; later lines are long text until
/// a line containing `|`, after which everything (rest of that line and the following lines) is
/// more perfdata. Returns `(message, long_text, metrics)`.
pub fn parse_plugin_output(stdout: &str) -> (String, String, Vec<Metric>) {
    let out = parse_plugin_output_struct(stdout);
    (out.message, out.long_text, out.metrics)
}

/// Same as [`parse_plugin_output`], as a struct.
pub fn parse_plugin_output_struct(stdout: &str) -> PluginOutput {
    let mut lines = stdout.lines();
    let first = lines.next().unwrap_or("");
    let (message, first_perf) = match first.split_once('|') {
        Some((m, p)) => (m.trim(), p),
        None => (first.trim(), ""),
    };
    let mut metrics = parse_perfdata(first_perf);
    let mut long_lines: Vec<&str> = Vec::new();
    let mut in_perf = false;
    for line in lines {
        if in_perf {
            metrics.extend(parse_perfdata(line));
        } else if let Some((text, perf)) = line.split_once('|') {
            in_perf = true;
            if !text.trim().is_empty() {
                long_lines.push(text.trim_end());
            }
            metrics.extend(parse_perfdata(perf));
        } else {
            long_lines.push(line);
        }
    }
    while long_lines.last().is_some_and(|l| l.trim().is_empty()) {
        long_lines.pop();
    }
    PluginOutput {
        message: message.to_string(),
        long_text: long_lines.join("\n"),
        metrics,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> Metric {
        let v = parse_perfdata(s);
        assert_eq!(v.len(), 1, "expected one metric from {s:?}, got {v:?}");
        v.into_iter().next().unwrap()
    }

    #[test]
    fn full_entry() {
        let m = one("time=0.123s;1;2;0;10");
        assert_eq!(m.label, "time");
        assert_eq!(m.value, 0.123);
        assert_eq!(m.unit, "s");
        assert_eq!(m.warn, "1");
        assert_eq!(m.crit, "2");
        assert_eq!(m.min, Some(0.0));
        assert_eq!(m.max, Some(10.0));
    }

    #[test]
    fn bare_value_no_unit() {
        let m = one("users=5");
        assert_eq!((m.value, m.unit.as_str()), (5.0, ""));
        assert_eq!((m.warn.as_str(), m.crit.as_str()), ("", ""));
        assert_eq!((m.min, m.max), (None, None));
    }

    #[test]
    fn units() {
        for (s, v, u) in [
            ("a=1ms", 1.0, "ms"),
            ("a=2us", 2.0, "us"),
            ("a=99.5%", 99.5, "%"),
            ("a=10B", 10.0, "B"),
            ("a=10KB", 10.0, "KB"),
            ("a=1.5MB", 1.5, "MB"),
            ("a=3GB", 3.0, "GB"),
            ("a=4TB", 4.0, "TB"),
            ("a=12345c", 12345.0, "c"),
            ("a=-3.5degC", -3.5, "degC"),
            ("a=1e3", 1000.0, ""),
            ("a=2e", 2.0, "e"),
            ("a=.5s", 0.5, "s"),
            ("a=1,5s", 1.5, "s"),
        ] {
            let m = one(s);
            assert_eq!((m.value, m.unit.as_str()), (v, u), "{s}");
        }
    }

    #[test]
    fn quoted_labels() {
        let m = one("'disk /var usage'=42%;80;90;0;100");
        assert_eq!(m.label, "disk /var usage");
        assert_eq!(m.value, 42.0);
        let m = one("'it''s ok'=1");
        assert_eq!(m.label, "it's ok");
        let m = one("'a=b'=2");
        assert_eq!(m.label, "a=b");
        assert_eq!(m.value, 2.0);
    }

    #[test]
    fn several_entries_and_whitespace() {
        let v = parse_perfdata("  time=0.01s;;;0 'size b'=512B  load1=0.5;5;10\tload5=0.7 ");
        let labels: Vec<_> = v.iter().map(|m| m.label.as_str()).collect();
        assert_eq!(labels, ["time", "size b", "load1", "load5"]);
        assert_eq!(v[0].min, Some(0.0));
        assert_eq!(v[0].warn, "");
    }

    #[test]
    fn unknown_value_is_skipped() {
        let v = parse_perfdata("a=U;1;2 b=3");
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].label, "b");
    }

    #[test]
    fn garbage_is_skipped_without_panic() {
        for s in [
            "",
            "   ",
            "=5",
            "noequals",
            "a=",
            "a=abc",
            "a=;;;",
            "'unterminated=5",
            "'q'x=5",
            "a=NaN",
            "a=inf",
            "a=-",
            "a=.",
            "==",
            "'''=1",
            "a=1;;;;;;;;",
            "ü=1€",
            "'é'=",
        ] {
            let v = parse_perfdata(s);
            for m in &v {
                assert!(m.value.is_finite(), "{s}: {m:?}");
            }
        }
        // Good entries around garbage survive.
        let v = parse_perfdata("x=1 garbage y=abc 'q'x=5 z=3");
        let labels: Vec<_> = v.iter().map(|m| m.label.as_str()).collect();
        assert_eq!(labels, ["x", "z"]);
        // A quote-only label: `'''=1` is the label "'" missing its closing quote -> skipped.
        assert!(parse_perfdata("'''=1").is_empty());
        assert_eq!(one("ü=1€").unit, "€");
    }

    #[test]
    fn invalid_ranges_are_dropped_but_value_kept() {
        let m = one("a=5;abc;20:10;x;y");
        assert_eq!(m.value, 5.0);
        assert_eq!(m.warn, "");
        assert_eq!(m.crit, "");
        assert_eq!((m.min, m.max), (None, None));
        let m = one("a=5;@10:20;~:30;0MB;100MB");
        assert_eq!((m.warn.as_str(), m.crit.as_str()), ("@10:20", "~:30"));
        assert_eq!((m.min, m.max), (Some(0.0), Some(100.0)));
    }

    #[test]
    fn range_parse_forms() {
        let r = Range::parse("10").unwrap();
        assert_eq!((r.start, r.end, r.inside), (0.0, 10.0, false));
        let r = Range::parse("10:").unwrap();
        assert_eq!((r.start, r.end), (10.0, f64::INFINITY));
        let r = Range::parse("~:10").unwrap();
        assert_eq!((r.start, r.end), (f64::NEG_INFINITY, 10.0));
        let r = Range::parse("10:20").unwrap();
        assert_eq!((r.start, r.end, r.inside), (10.0, 20.0, false));
        let r = Range::parse("@10:20").unwrap();
        assert_eq!((r.start, r.end, r.inside), (10.0, 20.0, true));
        let r = Range::parse("-5:-1").unwrap();
        assert_eq!((r.start, r.end), (-5.0, -1.0));
        let r = Range::parse(":7").unwrap();
        assert_eq!((r.start, r.end), (0.0, 7.0));
        assert_eq!("1.5:2.5".parse::<Range>().unwrap().end, 2.5);
    }

    #[test]
    fn range_parse_errors() {
        assert_eq!(Range::parse(""), Err(RangeError::Empty));
        assert_eq!(Range::parse("@"), Err(RangeError::Empty));
        assert!(matches!(Range::parse("abc"), Err(RangeError::Number(_))));
        assert!(matches!(Range::parse("10:x"), Err(RangeError::Number(_))));
        assert!(matches!(Range::parse("10%"), Err(RangeError::Number(_))));
        assert!(matches!(
            Range::parse("20:10"),
            Err(RangeError::Reversed { .. })
        ));
        assert!(matches!(Range::parse("~"), Err(RangeError::Number(_))));
    }

    #[test]
    fn range_alerts() {
        let r = Range::parse("10").unwrap();
        assert!(!r.alerts(0.0) && !r.alerts(10.0) && !r.alerts(5.0));
        assert!(r.alerts(-0.1) && r.alerts(10.1));
        let r = Range::parse("10:").unwrap();
        assert!(r.alerts(9.9) && !r.alerts(10.0) && !r.alerts(1e12));
        let r = Range::parse("~:10").unwrap();
        assert!(!r.alerts(-1e12) && !r.alerts(10.0) && r.alerts(10.5));
        let r = Range::parse("10:20").unwrap();
        assert!(r.alerts(9.0) && !r.alerts(15.0) && r.alerts(21.0));
        let r = Range::parse("@10:20").unwrap();
        assert!(!r.alerts(9.0) && r.alerts(10.0) && r.alerts(20.0) && !r.alerts(21.0));
    }

    #[test]
    fn range_display_round_trips() {
        for s in ["10", "10:", "~:10", "10:20", "@10:20", "@~:-1", "-5:"] {
            let r = Range::parse(s).unwrap();
            assert_eq!(r.to_string(), s);
            assert_eq!(Range::parse(&r.to_string()).unwrap(), r);
        }
    }

    #[test]
    fn plugin_output_single_line() {
        let (msg, long, m) =
            parse_plugin_output("DISK OK - free space: / 3326 MB | /=2643MB;5948;5958;0;5968\n");
        assert_eq!(msg, "DISK OK - free space: / 3326 MB");
        assert_eq!(long, "");
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].label, "/");
        assert_eq!(m[0].unit, "MB");
    }

    #[test]
    fn plugin_output_long_text_and_more_perfdata() {
        let out = "DISK OK - free space: / 3326 MB | /=2643MB;5948;5958;0;5968\n\
                   / 15272 MB (77%);\n\
                   /boot 68 MB (69%);\n\
                   /home 69357 MB (27%) | /boot=68MB;88;93;0;98\n\
                   /home=69357MB;253404;253409;0;253414\n\
                   /var/log=819MB;970;975;0;980\n";
        let (msg, long, m) = parse_plugin_output(out);
        assert_eq!(msg, "DISK OK - free space: / 3326 MB");
        assert_eq!(
            long,
            "/ 15272 MB (77%);\n/boot 68 MB (69%);\n/home 69357 MB (27%)"
        );
        let labels: Vec<_> = m.iter().map(|m| m.label.as_str()).collect();
        assert_eq!(labels, ["/", "/boot", "/home", "/var/log"]);
    }

    #[test]
    fn plugin_output_no_perfdata_and_empty() {
        let (msg, long, m) = parse_plugin_output("OK\nline two\n\n");
        assert_eq!(
            (msg.as_str(), long.as_str(), m.len()),
            ("OK", "line two", 0)
        );
        let (msg, long, m) = parse_plugin_output("");
        assert_eq!((msg.as_str(), long.as_str(), m.len()), ("", "", 0));
        let (msg, _, m) = parse_plugin_output("|a=1");
        assert_eq!((msg.as_str(), m.len()), ("", 1));
    }
}
