//! Secrets in collector.yaml: a value given inline, in a file (`…_file`) or in an environment
//! variable (`…_env`), exactly one of them; the `Secret` type that holds it never shows it
//! (Debug, Display and Serialize print a placeholder); and the redaction of check specs before
//! they are written to the database.

use std::path::{Path, PathBuf};

/// What a secret prints as, wherever it would be shown.
pub const REDACTED: &str = "<redacted>";

/// A secret value. Its `Debug` and `Serialize` never show it; `expose` is the one way out.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself: for the request or the login that needs it, never for a log line.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

/// Reads a secret file: the whole file less its trailing line break; empty, not UTF-8 or
/// holding a NUL is an error (naming the file, never showing the content).
pub fn from_file(path: &Path) -> Result<Secret, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let text =
        String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
    let value = text.trim_end_matches(['\n', '\r']);
    if value.trim().is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    if value.contains('\0') {
        return Err(format!("{} holds a NUL byte", path.display()));
    }
    Ok(Secret::new(value))
}

/// Reads a secret from the environment variable `name`; unset or empty is an error naming it.
pub fn from_env(name: &str) -> Result<Secret, String> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Ok(Secret::new(v)),
        Ok(_) => Err(format!("environment variable {name} is empty")),
        Err(std::env::VarError::NotPresent) => {
            Err(format!("environment variable {name} is not set"))
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(format!("environment variable {name} is not UTF-8"))
        }
    }
}

/// The three ways one secret `key` can be written: `key`, `key_file`, `key_env`.
pub struct Ways<'a> {
    pub key: &'a str,
    pub inline: Option<&'a str>,
    pub file: Option<&'a Path>,
    pub env: Option<&'a str>,
}

/// Resolves a secret written one of three ways. Returns `(key, reason)` for the config error:
/// more than one way given, or the one given unreadable. `None` when none is given.
pub fn resolve(
    ways: Ways<'_>,
    resolve_path: &dyn Fn(&Path) -> PathBuf,
) -> Result<Option<Secret>, (String, String)> {
    let key = ways.key;
    let given = [
        ways.inline.is_some(),
        ways.file.is_some(),
        ways.env.is_some(),
    ]
    .iter()
    .filter(|g| **g)
    .count();
    if given > 1 {
        return Err((
            key.to_string(),
            format!("give one of {key}, {key}_file and {key}_env, not several"),
        ));
    }
    if let Some(v) = ways.inline {
        if v.trim().is_empty() {
            return Err((key.to_string(), "is empty".into()));
        }
        return Ok(Some(Secret::new(v)));
    }
    if let Some(p) = ways.file {
        return from_file(&resolve_path(p))
            .map(Some)
            .map_err(|r| (format!("{key}_file"), r));
    }
    if let Some(name) = ways.env {
        return from_env(name)
            .map(Some)
            .map_err(|r| (format!("{key}_env"), r));
    }
    Ok(None)
}

/// A URL as it may be shown: without user name, password, query or fragment. A URL that does
/// not parse is shown as its scheme at most.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => REDACTED.to_string(),
    }
}

/// A check spec (as JSON) fit for the database: request header values, passwords in URLs,
/// query strings, request bodies and text parts, a command's arguments and environment values
/// are replaced by `<redacted>` (they
/// may carry tokens; the agent gets the real spec, the database only what describes the check).
pub fn redact_spec(mut spec: serde_json::Value) -> serde_json::Value {
    redact_value(&mut spec);
    spec
}

fn redact_value(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                match k.as_str() {
                    "headers" | "metadata" | "env" => {
                        if let Value::Object(h) = child {
                            for value in h.values_mut() {
                                *value = Value::String(REDACTED.into());
                            }
                        }
                    }
                    "body" | "text" | "password" | "token" | "secret" => {
                        if !child.is_null() {
                            *child = Value::String(REDACTED.into());
                        }
                    }
                    "argv" | "args" => {
                        if let Value::Array(a) = child {
                            for arg in a.iter_mut().skip(1) {
                                *arg = Value::String(REDACTED.into());
                            }
                        }
                    }
                    _ => redact_value(child),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                redact_value(item);
            }
        }
        Value::String(s) if s.contains("://") => {
            *s = redact_url(s);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn same(p: &Path) -> PathBuf {
        p.to_path_buf()
    }

    #[test]
    fn a_secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            format!("\"{REDACTED}\"")
        );
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn one_way_only_and_each_way_reads() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::write(&f, "from-file\n").unwrap();
        let ways = |inline, file, env| Ways {
            key: "routing_key",
            inline,
            file,
            env,
        };
        let got = resolve(ways(None, Some(&f), None), &same).unwrap().unwrap();
        assert_eq!(got.expose(), "from-file");
        let got = resolve(ways(Some("inline"), None, None), &same)
            .unwrap()
            .unwrap();
        assert_eq!(got.expose(), "inline");
        assert!(resolve(ways(None, None, None), &same).unwrap().is_none());
        let (k, r) = resolve(ways(Some("x"), Some(&f), None), &same).unwrap_err();
        assert_eq!(k, "routing_key");
        assert!(r.contains("routing_key_file"), "{r}");
        let (k, r) =
            resolve(ways(None, None, Some("VIGIL_TEST_SURELY_UNSET_7")), &same).unwrap_err();
        assert_eq!(k, "routing_key_env");
        assert!(r.contains("VIGIL_TEST_SURELY_UNSET_7"), "{r}");
        let missing = dir.path().join("missing");
        let (k, r) = resolve(ways(None, Some(&missing), None), &same).unwrap_err();
        assert_eq!(k, "routing_key_file");
        assert!(r.contains("missing"), "{r}");
    }

    #[test]
    fn hostile_files_are_refused_without_showing_them() {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in [
            ("empty", b"\n".to_vec()),
            ("nul", b"abc\0def".to_vec()),
            ("latin1", vec![0xff, 0xfe, b's']),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, &bytes).unwrap();
            let e = from_file(&p).unwrap_err();
            assert!(e.contains(name), "{e}");
            assert!(!e.contains("abc") && !e.contains("def"), "{e}");
        }
    }

    #[test]
    fn urls_lose_their_credentials_and_queries() {
        assert_eq!(
            redact_url("https://bot:t0ken@hooks.example/a/b?key=s3cret#x"),
            "https://hooks.example/a/b"
        );
        assert_eq!(redact_url("not a url with s3cret"), REDACTED);
    }

    #[test]
    fn specs_keep_their_shape_and_lose_their_secrets() {
        let spec = json!({
            "type": "http",
            "interval": "30s",
            "request": {
                "url": "https://user:pw@api.example/v1?token=abc",
                "headers": {"Authorization": "Bearer abc"},
                "body": "{\"password\":\"abc\"}"
            },
            "argv": ["/usr/lib/nagios/plugins/check_mysql", "-p", "abc"]
        });
        let text = redact_spec(spec).to_string();
        assert!(!text.contains("abc") && !text.contains("pw"), "{text}");
        assert!(
            text.contains("check_mysql") && text.contains("api.example"),
            "{text}"
        );
        assert!(
            text.contains("Authorization") && text.contains("30s"),
            "{text}"
        );
    }
}
