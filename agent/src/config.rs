//! The agent's own configuration (`agent.yaml`): where the collector is, the TLS files, the state dir.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Errors reading or validating `agent.yaml`; each names the file (and the line when known).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// YAML syntax error, unknown key, missing field, wrong type.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// Well-formed but unusable value.
    #[error("{path}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

/// Everything in `agent.yaml`. Relative paths are resolved against the config file's directory by
/// [`AgentConfig::load`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Node name; must equal the CN of the client certificate.
    pub node: String,
    pub collector: CollectorConfig,
    pub tls: TlsFiles,
    /// Where the outbox and the cached config live.
    pub state_dir: PathBuf,
    #[serde(default)]
    pub reconnect: ReconnectConfig,
    /// Most checks running at the same time.
    #[serde(default = "default_max_concurrent_checks")]
    pub max_concurrent_checks: usize,
    /// Most results kept in the outbox; past it the oldest are dropped (with an error log).
    #[serde(default = "default_outbox_max_results")]
    pub outbox_max_results: u64,
}

/// How to reach the collector.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// `https://host:port` of the collector's agent endpoint (or `urls`). After loading, the
    /// first of `urls`.
    #[serde(default)]
    pub url: String,
    /// Several collectors of one cluster. The agent stays on one while it works and moves to
    /// the next (in list order, round) after any failure; none is preferred. After loading,
    /// holds `url` alone when `url` was given.
    #[serde(default)]
    pub urls: Vec<String>,
    /// Name verified in the collector's certificate (default: the URL's host).
    #[serde(default)]
    pub server_name: Option<String>,
    /// Limit on one TCP + TLS connection attempt.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

/// PEM files for mutual TLS.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA certificate(s) that signed the collector's certificate.
    pub ca: PathBuf,
    /// This agent's client certificate (CN = node).
    pub cert: PathBuf,
    /// Private key of the client certificate.
    pub key: PathBuf,
}

/// Capped exponential backoff between connection attempts.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconnectConfig {
    #[serde(default = "default_reconnect_initial", with = "humantime_serde")]
    pub initial: Duration,
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub max: Duration,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig {
            initial: default_reconnect_initial(),
            max: default_reconnect_max(),
        }
    }
}

fn default_max_concurrent_checks() -> usize {
    16
}
fn default_outbox_max_results() -> u64 {
    1_000_000
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_reconnect_initial() -> Duration {
    Duration::from_secs(1)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(60)
}

impl AgentConfig {
    /// Reads, parses and validates `path`; relative paths in it are made relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml(&text, path)
    }

    /// Parses YAML `text` as if read from `path` (used for error messages and relative paths).
    pub fn from_yaml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: AgentConfig = serde_norway::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: strip_location(&e.to_string()),
            }
        })?;
        config.validate(path)?;
        if config.collector.urls.is_empty() {
            config.collector.urls = vec![config.collector.url.clone()];
        } else {
            config.collector.url = config.collector.urls[0].clone();
        }
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let base = absolute.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        Ok(config)
    }

    /// The name to verify in the collector's certificate: `server_name`, else the URL's host.
    pub fn server_name(&self) -> String {
        self.server_name_for(&self.collector.url)
    }

    /// The name to verify in the certificate of the collector at `url`: `server_name`, else
    /// the host of `url`.
    pub fn server_name_for(&self, url: &str) -> String {
        if let Some(name) = &self.collector.server_name {
            return name.clone();
        }
        url_host(url).unwrap_or_default()
    }

    /// Makes every relative path absolute against `base` (the config file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.tls.ca,
            &mut self.tls.cert,
            &mut self.tls.key,
            &mut self.state_dir,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        if self.node.trim().is_empty() {
            return Err(invalid("node", "must not be empty".into()));
        }
        let given: Vec<(String, &String)> = match (
            self.collector.url.is_empty(),
            self.collector.urls.is_empty(),
        ) {
            (false, false) => {
                return Err(invalid(
                    "collector.urls",
                    "give collector.url or collector.urls, not both".into(),
                ));
            }
            (true, true) => {
                return Err(invalid(
                    "collector.url",
                    "missing: give collector.url (or collector.urls, a list)".into(),
                ));
            }
            (false, true) => vec![("collector.url".to_string(), &self.collector.url)],
            (true, false) => self
                .collector
                .urls
                .iter()
                .enumerate()
                .map(|(i, u)| (format!("collector.urls[{i}]"), u))
                .collect(),
        };
        let mut seen = std::collections::HashSet::new();
        for (key, url) in given {
            if !url.starts_with("https://") {
                return Err(invalid(
                    &key,
                    format!(
                        "{url:?} must start with https:// (the agent stream is always mutual TLS)"
                    ),
                ));
            }
            if url.parse::<tonic::transport::Uri>().is_err() || url_host(url).is_none() {
                return Err(invalid(&key, format!("{url:?} is not a valid URL")));
            }
            if !seen.insert(url.as_str()) {
                return Err(invalid(&key, format!("{url:?} is listed twice")));
            }
        }
        if let Some(name) = &self.collector.server_name
            && name.trim().is_empty()
        {
            return Err(invalid("collector.server_name", "must not be empty".into()));
        }
        if self.collector.connect_timeout.is_zero() {
            return Err(invalid(
                "collector.connect_timeout",
                "must be more than 0s".into(),
            ));
        }
        if self.reconnect.initial.is_zero() {
            return Err(invalid("reconnect.initial", "must be more than 0s".into()));
        }
        if self.reconnect.max < self.reconnect.initial {
            return Err(invalid(
                "reconnect.max",
                "must be at least reconnect.initial".into(),
            ));
        }
        if self.max_concurrent_checks == 0 {
            return Err(invalid(
                "max_concurrent_checks",
                "must be at least 1".into(),
            ));
        }
        if self.outbox_max_results == 0 {
            return Err(invalid("outbox_max_results", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// serde_norway appends " at line L column C"; the error already leads with `path:line:column`.
fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) if msg[i..].contains(" column ") => msg[..i].to_string(),
        _ => msg.to_string(),
    }
}

/// Host part of a URL (without brackets for IPv6), if any.
fn url_host(url: &str) -> Option<String> {
    let uri: tonic::transport::Uri = url.parse().ok()?;
    let host = uri.host()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
node: gpu-01
collector:
  url: https://127.0.0.1:7443
  server_name: localhost
  connect_timeout: 5s
tls: { ca: certs/ca.pem, cert: certs/gpu-01.pem, key: /etc/vigil/gpu-01.key }
state_dir: state
reconnect: { initial: 2s, max: 30s }
max_concurrent_checks: 4
outbox_max_results: 1000
";

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("agent.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn good_file_parses_and_resolves_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), GOOD);
        let c = AgentConfig::load(&path).unwrap();
        assert_eq!(c.node, "gpu-01");
        assert_eq!(c.collector.url, "https://127.0.0.1:7443");
        assert_eq!(c.server_name(), "localhost");
        assert_eq!(c.collector.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.tls.ca, dir.path().join("certs/ca.pem"));
        assert_eq!(c.tls.key, PathBuf::from("/etc/vigil/gpu-01.key"));
        assert_eq!(c.state_dir, dir.path().join("state"));
        assert_eq!(c.reconnect.initial, Duration::from_secs(2));
        assert_eq!(c.reconnect.max, Duration::from_secs(30));
        assert_eq!(c.max_concurrent_checks, 4);
        assert_eq!(c.outbox_max_results, 1000);
    }

    #[test]
    fn defaults_apply() {
        let text = "node: a\ncollector: { url: 'https://collector.example:7443' }\n\
                    tls: { ca: ca.pem, cert: a.pem, key: a.key }\nstate_dir: /var/lib/vigil\n";
        let c = AgentConfig::from_yaml(text, Path::new("/etc/vigil/agent.yaml")).unwrap();
        assert_eq!(c.server_name(), "collector.example");
        assert_eq!(c.collector.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.reconnect, ReconnectConfig::default());
        assert_eq!(c.max_concurrent_checks, 16);
        assert_eq!(c.outbox_max_results, 1_000_000);
        assert_eq!(c.tls.ca, PathBuf::from("/etc/vigil/ca.pem"));
    }

    #[test]
    fn several_collectors_are_a_list_checked_entry_by_entry() {
        let base = "node: a\ntls: { ca: ca.pem, cert: a.pem, key: a.key }\nstate_dir: /s\n";
        let load = |collector: &str| {
            AgentConfig::from_yaml(
                &format!("{base}collector:\n{collector}"),
                Path::new("/etc/vigil/agent.yaml"),
            )
        };
        let c = load("  urls: ['https://c1.example:7443', 'https://c2.example:7443']\n").unwrap();
        assert_eq!(c.collector.urls.len(), 2);
        assert_eq!(c.collector.url, "https://c1.example:7443");
        assert_eq!(c.server_name_for(&c.collector.urls[1]), "c2.example");
        // One url is a list of one.
        let c = load("  url: 'https://c1.example:7443'\n").unwrap();
        assert_eq!(
            c.collector.urls,
            vec!["https://c1.example:7443".to_string()]
        );
        for (collector, key, why) in [
            (
                "  url: 'https://c1:1'\n  urls: ['https://c2:1']\n",
                "collector.urls",
                "not both",
            ),
            ("  connect_timeout: 1s\n", "collector.url", "missing"),
            ("  urls: []\n", "collector.url", "missing"),
            (
                "  urls: ['https://c1:1', 'http://c2:1']\n",
                "collector.urls[1]",
                "https://",
            ),
            (
                "  urls: ['https://c1:1', 'https://c1:1']\n",
                "collector.urls[1]",
                "twice",
            ),
            (
                "  urls: ['https://c1:1', \"https://\\0:1\"]\n",
                "collector.urls[1]",
                "not a valid URL",
            ),
        ] {
            let e = load(collector).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(why), "{collector}: {e}");
        }
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let text = GOOD.replace(
            "  connect_timeout: 5s",
            "  connect_timeout: 5s\n  retries: 3",
        );
        let path = write(dir.path(), &text);
        let err = AgentConfig::load(&path).unwrap_err();
        let msg = err.to_string();
        match &err {
            ConfigError::Parse { line, .. } => assert_eq!(*line, 6, "{msg}"),
            other => panic!("expected a parse error, got {other:?}"),
        }
        assert!(msg.contains("agent.yaml:6:"), "{msg}");
        assert!(msg.contains("retries"), "{msg}");
    }

    #[test]
    fn missing_required_field_is_reported() {
        let text = GOOD.replace("state_dir: state\n", "");
        let err = AgentConfig::from_yaml(&text, Path::new("/x/agent.yaml")).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Parse { .. }), "{msg}");
        assert!(msg.contains("/x/agent.yaml"), "{msg}");
        assert!(msg.contains("state_dir"), "{msg}");
    }

    #[test]
    fn invalid_values_are_reported_with_their_key() {
        let text = GOOD.replace("https://127.0.0.1:7443", "http://127.0.0.1:7443");
        let msg = AgentConfig::from_yaml(&text, Path::new("a.yaml"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("collector.url"), "{msg}");

        let text = GOOD.replace("max: 30s", "max: 1s");
        let msg = AgentConfig::from_yaml(&text, Path::new("a.yaml"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("reconnect.max"), "{msg}");

        let text = GOOD.replace("connect_timeout: 5s", "connect_timeout: soon");
        let msg = AgentConfig::from_yaml(&text, Path::new("a.yaml"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("a.yaml:5:"), "{msg}");
    }

    #[test]
    fn unreadable_file_names_the_file() {
        let msg = AgentConfig::load(Path::new("/nonexistent/agent.yaml"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("/nonexistent/agent.yaml"), "{msg}");
    }
}
