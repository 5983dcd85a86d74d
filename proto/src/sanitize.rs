//! Bounds and cleans what a check reported so that it can always be sent and stored: every string
//! without NUL and cut to a length, at most [`MAX_METRICS`] metrics. The agent applies it before a
//! result enters its outbox and before it is sent; the collector applies it again on receipt.
//!
//! Nothing is dropped: a NUL becomes U+FFFD, an over-long string is cut (saying so), extra
//! metrics are removed and the message says how many. A sanitised result is at most
//! [`MAX_RESULT_BYTES`] encoded, far below the stream's message limit.

use prost::Message;

use crate::v1::{CheckResult, CommandResult, Metric};

/// Longest `message` (bytes).
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Longest `output` excerpt (bytes).
pub const MAX_OUTPUT_BYTES: usize = 8 * 1024;
/// Longest service id echoed back (bytes).
pub const MAX_SERVICE_ID_BYTES: usize = 256;
/// Longest metric label (bytes).
pub const MAX_LABEL_BYTES: usize = 128;
/// Longest metric unit (bytes).
pub const MAX_UNIT_BYTES: usize = 16;
/// Longest warn/crit range (bytes).
pub const MAX_RANGE_BYTES: usize = 64;
/// Most metrics kept per result.
pub const MAX_METRICS: usize = 256;
/// Upper bound of one sanitised result, encoded (bytes), with room for the truncation markers.
pub const MAX_RESULT_BYTES: usize = 128 * 1024;

/// The marker [`vigil_checks::truncate`] appends; counted in the bounds above.
const CUT_MARK_BYTES: usize = "…[truncated]".len();

/// Makes `s` free of NUL and at most `max` bytes, the truncation marker included. Returns
/// whether it changed.
pub fn text(s: &mut String, max: usize) -> bool {
    let mut changed = false;
    if s.contains('\0') {
        *s = s.replace('\0', "\u{FFFD}");
        changed = true;
    }
    if s.len() > max {
        *s = vigil_checks::truncate(s, max.saturating_sub(CUT_MARK_BYTES));
        changed = true;
    }
    changed
}

fn metric(m: &mut Metric) -> bool {
    let a = text(&mut m.label, MAX_LABEL_BYTES);
    let b = text(&mut m.unit, MAX_UNIT_BYTES);
    let c = text(&mut m.warn, MAX_RANGE_BYTES);
    let d = text(&mut m.crit, MAX_RANGE_BYTES);
    a | b | c | d
}

/// Sanitises one result in place. Returns whether anything changed.
pub fn result(r: &mut CheckResult) -> bool {
    let mut changed = false;
    let mut note = String::new();
    if r.metrics.len() > MAX_METRICS {
        note = format!(
            " [{} metrics reported, the first {MAX_METRICS} kept]",
            r.metrics.len()
        );
        r.metrics.truncate(MAX_METRICS);
        changed = true;
    }
    for m in &mut r.metrics {
        changed |= metric(m);
    }
    changed |= text(&mut r.service_id, MAX_SERVICE_ID_BYTES);
    changed |= text(&mut r.output, MAX_OUTPUT_BYTES);
    // The note survives the cut: the message is shortened to make room for it.
    changed |= text(&mut r.message, MAX_MESSAGE_BYTES - note.len());
    if !note.is_empty() && !r.message.ends_with(&note) {
        r.message.push_str(&note);
    }
    changed
}

/// Sanitises a command's result (and the check result it may carry). Returns whether anything
/// changed.
pub fn command_result(r: &mut CommandResult) -> bool {
    let mut changed = text(&mut r.command_id, 64);
    changed |= text(&mut r.issuer, 64);
    changed |= text(&mut r.output, MAX_OUTPUT_BYTES);
    if let Some(c) = &mut r.check {
        changed |= result(c);
    }
    changed
}

/// Encoded size of a result as it travels in a batch (field tag and length prefix included).
pub fn encoded_len(r: &CheckResult) -> usize {
    let n = r.encoded_len();
    n + prost::length_delimiter_len(n) + 1
}

const _: () = assert!(
    MAX_MESSAGE_BYTES
        + MAX_OUTPUT_BYTES
        + MAX_SERVICE_ID_BYTES
        + MAX_METRICS * (MAX_LABEL_BYTES + MAX_UNIT_BYTES + 2 * MAX_RANGE_BYTES + 64)
        + 128
        < MAX_RESULT_BYTES
);

#[cfg(test)]
mod tests {
    use super::*;

    fn hostile() -> CheckResult {
        CheckResult {
            seq: 1,
            service_id: "svc\0x".into(),
            message: format!("bad\0{}", "m".repeat(5000)),
            output: "o\0".repeat(100_000),
            metrics: (0..1200)
                .map(|i| Metric {
                    label: format!("x\0y{i}{}", "l".repeat(500)),
                    unit: "\0".repeat(100),
                    warn: "w".repeat(1000),
                    crit: "\0".into(),
                    value: i as f64,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn hostile_result_is_bounded_and_nul_free() {
        let mut r = hostile();
        assert!(result(&mut r));
        assert_eq!(r.metrics.len(), MAX_METRICS);
        assert!(
            r.message
                .ends_with("[1200 metrics reported, the first 256 kept]"),
            "{}",
            r.message
        );
        assert!(r.message.starts_with("bad\u{FFFD}m"));
        assert!(r.message.len() <= MAX_MESSAGE_BYTES);
        assert!(r.output.len() <= MAX_OUTPUT_BYTES);
        for s in std::iter::once(&r.message)
            .chain([&r.output, &r.service_id])
            .chain(
                r.metrics
                    .iter()
                    .flat_map(|m| [&m.label, &m.unit, &m.warn, &m.crit]),
            )
        {
            assert!(!s.contains('\0'), "{s:?}");
        }
        assert!(encoded_len(&r) < MAX_RESULT_BYTES, "{}", encoded_len(&r));
        // The values themselves are kept.
        assert_eq!(r.metrics[255].value, 255.0);
    }

    #[test]
    fn idempotent() {
        let mut r = hostile();
        result(&mut r);
        let once = r.clone();
        assert!(!result(&mut r), "a sanitised result is left alone");
        assert_eq!(r, once);
    }

    #[test]
    fn clean_result_untouched() {
        let mut r = CheckResult {
            service_id: "web".into(),
            message: "HTTP 200 in 12 ms".into(),
            metrics: vec![Metric {
                label: "time".into(),
                value: 0.012,
                unit: "s".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let before = r.clone();
        assert!(!result(&mut r));
        assert_eq!(r, before);
    }

    #[test]
    fn command_result_is_bounded() {
        let mut c = CommandResult {
            command_id: "1\n2024-01-01 INFO forged".repeat(10),
            output: "\0".repeat(20_000),
            check: Some(hostile()),
            ..Default::default()
        };
        assert!(command_result(&mut c));
        assert!(!c.output.contains('\0'));
        assert!(c.command_id.len() <= 64);
        assert_eq!(c.check.unwrap().metrics.len(), MAX_METRICS);
    }
}
