//! One way to write an error with its causes (`error: cause: root cause`), for messages people
//! read: check outcomes, doctor findings, reasons the agent gives for a lost connection, failed
//! alert deliveries. No dependencies, so every Vigil crate can use it.

#![forbid(unsafe_code)]

use std::error::Error;

/// The causes of `e`, nearest first (not `e` itself).
pub fn causes<'a>(e: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(e.source(), |&s| s.source())
}

/// `e` and its causes joined by ": ". A cause whose text is already part of what is written
/// (many errors repeat their source in their own message) is left out, so nothing is said twice.
pub fn describe(e: &(dyn Error + 'static)) -> String {
    with_causes(e.to_string(), e)
}

/// `text` (what the caller says of `e`, e.g. a status code and message) followed by the causes of
/// `e`, by the same rule as [`describe`].
pub fn with_causes(mut text: String, e: &(dyn Error + 'static)) -> String {
    for cause in causes(e) {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt;

    /// An error with a message and an optional source.
    #[derive(Debug)]
    struct E(String, Option<Box<E>>);

    impl fmt::Display for E {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl Error for E {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as &(dyn Error + 'static))
        }
    }

    fn chain(texts: &[&str]) -> E {
        let mut e: Option<Box<E>> = None;
        for t in texts.iter().rev() {
            e = Some(Box::new(E((*t).to_string(), e)));
        }
        *e.expect("at least one text")
    }

    #[test]
    fn distinct_causes_are_joined_with_colons() {
        let e = chain(&["request failed", "connection refused", "os error 111"]);
        assert_eq!(
            describe(&e),
            "request failed: connection refused: os error 111"
        );
        assert_eq!(causes(&e).count(), 2);
    }

    #[test]
    fn a_cause_repeated_in_its_parents_text_is_written_once() {
        let e = chain(&[
            "error trying to connect: tcp connect error: Connection refused",
            "tcp connect error: Connection refused",
            "Connection refused",
        ]);
        assert_eq!(
            describe(&e),
            "error trying to connect: tcp connect error: Connection refused"
        );
        // Equal texts are one text.
        let e = chain(&["timed out", "timed out"]);
        assert_eq!(describe(&e), "timed out");
        // A cause already said further up, not only by its parent, is not repeated either.
        let e = chain(&["dns error: no such host", "lookup failed", "no such host"]);
        assert_eq!(describe(&e), "dns error: no such host: lookup failed");
    }

    #[test]
    fn causes_after_the_callers_own_text() {
        let e = chain(&["status: Unavailable", "transport error", "connection reset"]);
        assert_eq!(
            with_causes("Unavailable: transport error".into(), &e),
            "Unavailable: transport error: connection reset"
        );
    }

    #[test]
    fn an_error_without_causes_and_empty_causes() {
        assert_eq!(describe(&chain(&["alone"])), "alone");
        assert_eq!(describe(&chain(&["outer", ""])), "outer");
    }
}
