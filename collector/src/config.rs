//! Collector configuration: `collector.yaml`, the nodes, and one YAML file per service, loaded and
//! validated with errors that name the file, line and key.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vigil_checks::CheckSpec;
pub use vigil_control::{ControlSpec, Via};

/// Environment variable that overrides `database.url`.
pub const DATABASE_URL_ENV: &str = "VIGIL_DATABASE_URL";

/// A configuration error, always with the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}{location}: {key}{message}")]
    Parse {
        path: PathBuf,
        /// `:LINE:COLUMN`, or empty when the parser gave none.
        location: String,
        /// `key.path: `, or empty at the top level.
        key: String,
        message: String,
    },
    #[error("{path}: {field}: {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
}

fn invalid(path: &Path, field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_path_buf(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// Parses YAML text into `T`, reporting the line, column and dotted key path of the first error.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    let de = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let key = err.path().to_string();
        let inner = err.into_inner();
        let location = inner
            .location()
            .map(|l| format!(":{}:{}", l.line(), l.column()))
            .unwrap_or_default();
        let mut message = inner.to_string();
        // serde_norway appends " at line X column Y"; we already print the location up front.
        if let Some(idx) = message.find(" at line ") {
            message.truncate(idx);
        }
        // serde_norway already names the key path in some messages; do not repeat it.
        let named = message.starts_with(&format!("{key}: "));
        ConfigError::Parse {
            path: path.to_path_buf(),
            location,
            key: if key == "." || key.is_empty() || named {
                String::new()
            } else {
                format!("{key}: ")
            },
            message,
        }
    })
}

/// Parses a service file. serde reads a `check:` block whole to find its `type:` tag, which loses
/// the position of a bad key inside it; such an error is found again by deserializing the block
/// as its kind's struct directly, and reported at the key's own line and column with every key
/// valid there.
pub fn parse_service(path: &Path, text: &str) -> Result<ServiceFile, ConfigError> {
    parse_yaml(path, text).map_err(|err| match &err {
        ConfigError::Parse { key, message, .. }
            if key.starts_with("check") || message.starts_with("check") =>
        {
            precise_check_error(path, text).unwrap_or(err)
        }
        _ => err,
    })
}

/// The keys every check accepts besides its kind's own.
const CHECK_COMMON_KEYS: &[&str] = &["type", "interval", "timeout"];

/// `interval:` and `timeout:` alone, to find an error in them with its key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckCommon {
    #[serde(default, with = "humantime_serde")]
    _interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    _timeout: Option<Duration>,
}

fn precise_check_error(path: &Path, text: &str) -> Option<ConfigError> {
    use serde_norway::{Mapping, Value};
    let doc: Value = serde_norway::from_str(text).ok()?;
    let check = doc.get("check")?.as_mapping()?;
    let kind = check.get("type")?.as_str()?.to_string();
    let mut common = Mapping::new();
    let mut fields = Mapping::new();
    for (k, v) in check {
        match k.as_str() {
            Some("type") => {}
            Some(name @ ("interval" | "timeout")) => {
                common.insert(Value::String(format!("_{name}")), v.clone());
            }
            _ => {
                fields.insert(k.clone(), v.clone());
            }
        }
    }
    let (segments, message) =
        match serde_path_to_error::deserialize::<_, CheckCommon>(Value::Mapping(common)) {
            Err(e) => (
                path_segments(e.path())
                    .into_iter()
                    .map(|s| s.trim_start_matches('_').to_string())
                    .collect(),
                e.into_inner().to_string(),
            ),
            Ok(_) => {
                let mut track = serde_path_to_error::Track::new();
                let de = serde_path_to_error::Deserializer::new(Value::Mapping(fields), &mut track);
                match vigil_checks::CheckKind::deserialize_as(&kind, de) {
                    Ok(_) => return None,
                    Err(e) => (path_segments(&track.path()), e.to_string()),
                }
            }
        };
    let mut message = message;
    if let Some(idx) = message.find(" at line ") {
        message.truncate(idx);
    }
    let mut at: Vec<String> = std::iter::once("check".to_string())
        .chain(segments)
        .collect();
    // An unknown key: point at the key itself, and at the top of the block list the keys
    // every check takes as well as the kind's own.
    let unknown = message
        .strip_prefix("unknown field `")
        .and_then(|r| r.split('`').next())
        .map(str::to_string);
    if let Some(name) = &unknown {
        if at.last() != Some(name) {
            at.push(name.clone());
        }
        if at.len() == 2 {
            let valid = message
                .split_once("expected ")
                .map(|(_, rest)| rest.trim_start_matches("one of "))
                .unwrap_or("");
            let mut names: Vec<String> = CHECK_COMMON_KEYS.iter().map(|s| s.to_string()).collect();
            names.extend(
                valid
                    .split([',', ' '])
                    .filter(|w| w.starts_with('`'))
                    .map(|w| w.trim_matches('`').to_string()),
            );
            let listed: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
            message = format!(
                "unknown field `{name}` for a {kind} check, expected one of {}",
                listed.join(", ")
            );
        }
    }
    let location = locate(text, &at)
        .map(|(l, c)| format!(":{l}:{c}"))
        .unwrap_or_default();
    let key_path = if unknown.is_some() {
        &at[..at.len() - 1]
    } else {
        &at[..]
    };
    Some(ConfigError::Parse {
        path: path.to_path_buf(),
        location,
        key: format!("{}: ", key_path.join(".")),
        message,
    })
}

/// The segments of a serde path as strings (map keys, and sequence indexes as numbers).
fn path_segments(p: &serde_path_to_error::Path) -> Vec<String> {
    use serde_path_to_error::Segment;
    p.iter()
        .filter_map(|s| match s {
            Segment::Map { key } => Some(key.clone()),
            Segment::Seq { index } => Some(index.to_string()),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect()
}

/// 1-based line and column of the key at `keys` in block-style YAML (a number is a sequence
/// index), as deep as it can be followed; `None` when not even the first key is found.
fn locate(text: &str, keys: &[String]) -> Option<(usize, usize)> {
    // Every key and sequence item with its line and indentation; `- a: 1` is an item and a
    // key two columns further in.
    enum Tok<'a> {
        Item,
        Key(&'a str),
    }
    let mut toks: Vec<(usize, usize, Tok)> = Vec::new();
    for (no, line) in text.lines().enumerate() {
        let mut indent = line.len() - line.trim_start_matches(' ').len();
        let mut rest = &line[indent..];
        if rest.is_empty() || rest.starts_with('#') || rest.starts_with("---") {
            continue;
        }
        while let Some(r) = rest
            .strip_prefix("- ")
            .or(if rest == "-" { Some("") } else { None })
        {
            toks.push((no + 1, indent, Tok::Item));
            let inner = r.len() - r.trim_start_matches(' ').len();
            indent += 2 + inner;
            rest = r.trim_start_matches(' ');
        }
        if let Some((k, _)) = rest.split_once(':') {
            let k = k.trim().trim_matches(['"', '\'']);
            if !k.is_empty() && !k.contains([' ', '{', '[']) {
                toks.push((no + 1, indent, Tok::Key(k)));
            }
        }
    }
    let mut found = None;
    let (mut from, mut parent) = (0usize, None::<usize>);
    for key in keys {
        let scope: Vec<usize> = (from..toks.len())
            .take_while(|&i| parent.is_none_or(|p| toks[i].1 > p))
            .collect();
        let Some(&first) = scope.first() else { break };
        let child = toks[first].1;
        let hit = match key.parse::<usize>() {
            Ok(n) => scope
                .iter()
                .filter(|&&i| toks[i].1 == child && matches!(toks[i].2, Tok::Item))
                .nth(n)
                .copied(),
            Err(_) => scope
                .iter()
                .find(|&&i| toks[i].1 == child && matches!(toks[i].2, Tok::Key(k) if k == key))
                .copied(),
        };
        let Some(i) = hit else { break };
        found = Some((toks[i].0, toks[i].1 + 1));
        from = i + 1;
        parent = Some(toks[i].1);
    }
    found
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn default_grpc_listen() -> SocketAddr {
    "0.0.0.0:7443".parse().expect("static address")
}
fn default_pool_size() -> usize {
    8
}
fn default_services_dir() -> PathBuf {
    PathBuf::from("services")
}

/// `collector.yaml` as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorFile {
    /// Address the agent gRPC stream (mTLS) listens on.
    #[serde(default = "default_grpc_listen")]
    pub grpc_listen: SocketAddr,
    pub database: DatabaseConfig,
    pub tls: TlsFiles,
    /// Directory of service files (`*.yaml`, one service each), relative to collector.yaml.
    #[serde(default = "default_services_dir")]
    pub services_dir: PathBuf,
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
    #[serde(default)]
    pub defaults: Defaults,
    /// Webhooks for down / gave-up / recovered / flapping alerts.
    #[serde(default)]
    pub notify: crate::notify::NotifyConfig,
    /// The dashboard and the REST API.
    #[serde(default)]
    pub http: HttpConfig,
    /// Prometheus `/metrics`, on an address of its own.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// A node whose agent is silent (no message at all, Pongs included) this long is down;
    /// a node can set its own under `nodes:`.
    #[serde(default = "default_node_timeout", with = "humantime_serde")]
    pub node_timeout: Duration,
    /// A connected node whose oldest unacknowledged result is older than this raises an alert.
    #[serde(default = "default_backlog_alert", with = "humantime_serde")]
    pub backlog_alert: Duration,
    /// A result dated more than this in the future (or before 2000) is stored with the time it
    /// was received; a node whose clock is off by more is flagged.
    #[serde(default = "default_max_clock_skew", with = "humantime_serde")]
    pub max_clock_skew: Duration,
    /// How long history is kept: raw results, hourly and daily roll-ups.
    #[serde(default)]
    pub retention: Retention,
}

/// `retention:` in collector.yaml. Raw results are dropped a whole day partition at a time, so
/// up to a day more than `raw` is kept; roll-ups are deleted by the hour and the day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Raw results (each check result as stored).
    #[serde(default = "d_retention_raw", with = "humantime_serde")]
    pub raw: Duration,
    /// Hourly roll-ups per service.
    #[serde(default = "d_retention_hourly", with = "humantime_serde")]
    pub hourly: Duration,
    /// Daily roll-ups per service.
    #[serde(default = "d_retention_daily", with = "humantime_serde")]
    pub daily: Duration,
}

const DAY: Duration = Duration::from_secs(86_400);

fn d_retention_raw() -> Duration {
    14 * DAY
}
fn d_retention_hourly() -> Duration {
    90 * DAY
}
fn d_retention_daily() -> Duration {
    730 * DAY
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            raw: d_retention_raw(),
            hourly: d_retention_hourly(),
            daily: d_retention_daily(),
        }
    }
}

impl Retention {
    /// The first setting that is out of range: (key under `retention`, why).
    pub fn invalid(&self) -> Option<(&'static str, String)> {
        // The 24-hour figures read hourly roll-ups, the daily table reads daily ones.
        let limit = 100 * 365 * DAY;
        for (key, v, min) in [
            ("raw", self.raw, DAY),
            ("hourly", self.hourly, 2 * DAY),
            ("daily", self.daily, 2 * DAY),
        ] {
            if v < min {
                return Some((
                    key,
                    format!("must be at least {}", humantime::format_duration(min)),
                ));
            }
            if v > limit {
                return Some((key, "must be at most 100 years".into()));
            }
        }
        None
    }
}

/// The largest `max_clock_skew` accepted.
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(24 * 3600);

fn default_max_clock_skew() -> Duration {
    Duration::from_secs(300)
}

fn default_node_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_backlog_alert() -> Duration {
    Duration::from_secs(300)
}

fn default_http_listen() -> Option<SocketAddr> {
    Some("127.0.0.1:8080".parse().expect("static address"))
}
fn default_session_ttl() -> Duration {
    Duration::from_secs(12 * 3600)
}
fn default_metrics_listen() -> Option<SocketAddr> {
    Some("127.0.0.1:9464".parse().expect("static address"))
}

/// `http:` in collector.yaml: the dashboard and the REST API (`/api`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the dashboard and the API; `null` turns them off.
    #[serde(default = "default_http_listen")]
    pub listen: Option<SocketAddr>,
    /// How long a dashboard login lasts.
    #[serde(default = "default_session_ttl", with = "humantime_serde")]
    pub session_ttl: Duration,
    /// Mark the session cookie `Secure` (set it when a TLS proxy is in front).
    #[serde(default)]
    pub secure_cookie: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_http_listen(),
            session_ttl: default_session_ttl(),
            secure_cookie: false,
        }
    }
}

/// `metrics:` in collector.yaml: Prometheus exposition.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of `/metrics`; `null` turns it off.
    #[serde(default = "default_metrics_listen")]
    pub listen: Option<SocketAddr>,
    /// A file holding a bearer token that scrapers must send; unset: no authentication.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: default_metrics_listen(),
            bearer_token_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://user@host:port/db`; the VIGIL_DATABASE_URL environment variable overrides it.
    #[serde(default)]
    pub url: Option<String>,
    /// A file holding the URL (it carries the password): instead of `url`.
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// An environment variable holding the URL: instead of `url`.
    #[serde(default)]
    pub url_env: Option<String>,
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
}

/// PEM files of the collector's TLS identity and the CA that signs agent certificates.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node name; an agent's certificate carries it as its identity.
    pub name: String,
    /// Host name or IP, shown to operators and used for SSH.
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub description: String,
    /// Whether an agent runs on this node (default true). Without one, the collector runs the
    /// node's checks itself: `command` checks over SSH, the others from the collector.
    #[serde(default = "yes")]
    pub agent: bool,
    /// How to reach the node over SSH: for agentless nodes, for `control.via: ssh`, and for
    /// `via: auto` when the agent is not connected.
    #[serde(default)]
    pub ssh: Option<crate::ssh::SshConfig>,
    /// This node's agent may be silent this long before the node is down (default: the
    /// top-level `node_timeout`).
    #[serde(default, with = "humantime_serde")]
    pub node_timeout: Option<Duration>,
    /// How the collector heals this node's agent over SSH when it is down (needs `ssh:`).
    #[serde(default)]
    pub agent_control: AgentControl,
}

/// `agent_control:` under a node: how to tell over SSH whether the agent runs, and restart it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentControl {
    /// Restart a down agent over SSH (when the node has an `ssh:` block).
    #[serde(default = "yes")]
    pub heal: bool,
    /// Exits 0 when the agent runs (default: `systemctl is-active --quiet vigil-agent`).
    #[serde(default = "d_agent_check")]
    pub check: Vec<String>,
    /// Starts or restarts the agent (default: `systemctl restart vigil-agent`).
    #[serde(default = "d_agent_restart")]
    pub restart: Vec<String>,
    /// Restarts allowed within `within` (default 3 per hour).
    #[serde(default = "d_max_restarts")]
    pub max_restarts: u32,
    #[serde(default = "d_within", with = "humantime_serde")]
    pub within: Duration,
    /// Each SSH command is given this long (default 30 s).
    #[serde(default = "d_agent_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// While the node stays down, check and heal its agent again this often (default 5 min).
    #[serde(default = "d_agent_retry", with = "humantime_serde")]
    pub retry_after: Duration,
}

impl Default for AgentControl {
    fn default() -> Self {
        AgentControl {
            heal: true,
            check: d_agent_check(),
            restart: d_agent_restart(),
            max_restarts: d_max_restarts(),
            within: d_within(),
            timeout: d_agent_timeout(),
            retry_after: d_agent_retry(),
        }
    }
}

fn d_agent_check() -> Vec<String> {
    ["systemctl", "is-active", "--quiet", "vigil-agent"]
        .map(String::from)
        .to_vec()
}
fn d_agent_restart() -> Vec<String> {
    ["systemctl", "restart", "vigil-agent"]
        .map(String::from)
        .to_vec()
}
fn d_agent_retry() -> Duration {
    Duration::from_secs(300)
}
fn d_agent_timeout() -> Duration {
    Duration::from_secs(30)
}

fn yes() -> bool {
    true
}

fn d_after() -> u32 {
    3
}
fn d_recover_after() -> u32 {
    2
}
fn d_max_restarts() -> u32 {
    3
}
fn d_within() -> Duration {
    Duration::from_secs(3600)
}
fn d_retry_after() -> Duration {
    Duration::from_secs(3600)
}
fn d_grace() -> Duration {
    Duration::from_secs(60)
}
fn d_flap_high() -> u8 {
    50
}
fn d_flap_low() -> u8 {
    25
}
fn d_command_deadline() -> Duration {
    Duration::from_secs(300)
}

/// Global defaults for every service's `on_failure`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    #[serde(default = "d_after")]
    pub after: u32,
    #[serde(default = "d_recover_after")]
    pub recover_after: u32,
    #[serde(default = "d_max_restarts")]
    pub max_restarts: u32,
    #[serde(default = "d_within", with = "humantime_serde")]
    pub within: Duration,
    #[serde(default = "d_retry_after", with = "humantime_serde")]
    pub retry_after: Duration,
    /// After a restart, failures in this period do not count (the service is starting).
    #[serde(default = "d_grace", with = "humantime_serde")]
    pub grace: Duration,
    /// Percent state change over the last 21 results above which a service is flapping ...
    #[serde(default = "d_flap_high")]
    pub flap_high: u8,
    /// ... and below which it is not any more.
    #[serde(default = "d_flap_low")]
    pub flap_low: u8,
    /// A command not finished by then is timed out (start/stop/restart/check).
    #[serde(default = "d_command_deadline", with = "humantime_serde")]
    pub command_deadline: Duration,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            after: d_after(),
            recover_after: d_recover_after(),
            max_restarts: d_max_restarts(),
            within: d_within(),
            retry_after: d_retry_after(),
            grace: d_grace(),
            flap_high: d_flap_high(),
            flap_low: d_flap_low(),
            command_deadline: d_command_deadline(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    Api,
    Web,
    Container,
    System,
    Gpu,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Api => "api",
            Category::Web => "web",
            Category::Container => "container",
            Category::System => "system",
            Category::Gpu => "gpu",
        }
    }
}

/// One service file as written.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    pub category: Category,
    pub node: String,
    #[serde(default)]
    pub description: String,
    pub check: CheckSpec,
    #[serde(default)]
    pub control: Option<ControlSpec>,
    #[serde(default)]
    pub on_failure: OnFailureFile,
    /// Services this one needs: while one of them is down, this one is not restarted and its
    /// alerts name the dependency.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// With no result for this long the service is stale (default: interval × 2 + timeout +
    /// 5 s).
    #[serde(default, with = "humantime_serde")]
    pub stale_after: Option<Duration>,
    /// What a stale service raises: `alert` (default) or `ignore`.
    #[serde(default)]
    pub on_stale: OnStale,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// `on_stale:` in a service file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStale {
    #[default]
    Alert,
    Ignore,
}

impl OnStale {
    pub fn as_str(self) -> &'static str {
        match self {
            OnStale::Alert => "alert",
            OnStale::Ignore => "ignore",
        }
    }
}

/// Added to interval × 2 + timeout for the default `stale_after`.
pub const STALE_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    #[default]
    Notify,
    Restart,
}

/// `on_failure:` as written; unset fields take the global defaults.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OnFailureFile {
    #[serde(default)]
    pub action: FailureAction,
    pub after: Option<u32>,
    pub recover_after: Option<u32>,
    pub max_restarts: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub within: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub retry_after: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub grace: Option<Duration>,
    pub flap_high: Option<u8>,
    pub flap_low: Option<u8>,
}

/// Thresholds in force for one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Thresholds {
    pub after: u32,
    pub recover_after: u32,
    /// Percent state change above which the service counts as flapping ...
    pub flap_high: u8,
    /// ... and below which it stops flapping.
    pub flap_low: u8,
}

/// A service after loading: defaults applied, attachments read.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub id: String,
    pub name: String,
    pub category: Category,
    pub node: String,
    pub description: String,
    pub check: CheckSpec,
    pub control: Option<ControlSpec>,
    pub action: FailureAction,
    pub thresholds: Thresholds,
    pub max_restarts: u32,
    pub within: Duration,
    pub retry_after: Duration,
    pub grace: Duration,
    pub depends_on: Vec<String>,
    pub command_deadline: Duration,
    /// `stale_after` as written (None: derived from the check's interval and timeout).
    pub stale_after_explicit: Option<Duration>,
    pub on_stale: OnStale,
    /// The file it came from.
    pub source: PathBuf,
    /// Which of the values that runtime settings can replace the service file set itself.
    pub explicit: Explicit,
    /// `labels:` of the service file (alert routes match on them).
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Service {
    /// No result for this long makes the service stale: `stale_after` as written, or the
    /// check's interval × 2 + its timeout + [`STALE_GRACE`].
    pub fn stale_after(&self) -> Duration {
        self.stale_after_explicit
            .unwrap_or(self.check.interval * 2 + self.check.timeout + STALE_GRACE)
    }
}

/// Values a service file set itself (runtime settings replace only the others).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Explicit {
    pub interval: bool,
    pub after: bool,
    pub retry_after: bool,
}

/// Global health-check settings changed at run time (REST API `PUT /api/health-check/config`),
/// kept in PostgreSQL. They replace `defaults:` (and the default check interval) for every
/// service whose file does not set the value itself.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HealthSettings {
    /// False: scheduled checks are suspended everywhere (check-now still works).
    pub enabled: bool,
    /// Check interval.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Consecutive failures before a service is down (`after`).
    pub max_error_count: u32,
    /// After the restart budget is spent, try again after this long.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
}

/// The whole loaded configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub grpc_listen: SocketAddr,
    pub database_url: String,
    pub pool_size: usize,
    pub tls: TlsFiles,
    pub nodes: Vec<NodeConfig>,
    pub services: Vec<Service>,
    /// Bytes of files that checks upload, keyed by the path written in the spec.
    pub attachments: HashMap<String, Vec<u8>>,
    pub notify: crate::notify::NotifyConfig,
    pub http: HttpConfig,
    pub metrics: MetricsConfig,
    /// The bearer token `/metrics` requires (read from `metrics.bearer_token_file`).
    pub metrics_token: Option<String>,
    /// `defaults:` as written in collector.yaml (before runtime settings).
    pub defaults: Defaults,
    /// Runtime settings in force (`None`: none stored yet, the files alone decide).
    pub settings: Option<HealthSettings>,
    /// Default silence after which a node is down (`node_timeout`).
    pub node_timeout: Duration,
    /// Age of the oldest unacknowledged result that raises a backlog alert.
    pub backlog_alert: Duration,
    /// How far an agent's clock may be off (`max_clock_skew`).
    pub max_clock_skew: Duration,
    /// Every file a secret is read from (config key, resolved path): for `doctor`'s mode check.
    pub secret_files: Vec<(String, PathBuf)>,
    /// How long raw results and roll-ups are kept (`retention`).
    pub retention: Retention,
    /// Each node's services and their thresholds, built once at load (ingest reads it per batch).
    thresholds_by_node: HashMap<String, std::sync::Arc<HashMap<String, Thresholds>>>,
    /// Position of each service in `services` by id (ingest looks a service up per result).
    service_at: HashMap<String, usize>,
    /// Position of each node in `nodes` by name.
    node_at: HashMap<String, usize>,
}

fn positions<'a>(names: impl Iterator<Item = &'a str>) -> HashMap<String, usize> {
    names.enumerate().map(|(i, n)| (n.to_string(), i)).collect()
}

fn index_thresholds(
    services: &[Service],
) -> HashMap<String, std::sync::Arc<HashMap<String, Thresholds>>> {
    let mut by_node: HashMap<String, HashMap<String, Thresholds>> = HashMap::new();
    for s in services {
        by_node
            .entry(s.node.clone())
            .or_default()
            .insert(s.id.clone(), s.thresholds);
    }
    by_node
        .into_iter()
        .map(|(n, m)| (n, std::sync::Arc::new(m)))
        .collect()
}

/// Largest attachment total shipped to one agent (bytes); the gRPC message limit is above it.
pub const MAX_ATTACHMENT_BYTES: usize = 4 * 1024 * 1024;

pub(crate) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// Longest label value (characters).
pub const MAX_LABEL_VALUE: usize = 256;

/// A label key: `[a-z0-9_.-]{1,63}`.
pub fn valid_label_key(k: &str) -> bool {
    (1..=63).contains(&k.len())
        && k.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        })
}

/// Where `key` is written under the top-level `labels:` of a service file (":LINE:COLUMN").
fn label_location(text: &str, key: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let Some(first) = lines.iter().position(|l| l.starts_with("labels:")) else {
        return String::new();
    };
    for (i, line) in lines.iter().enumerate().skip(first) {
        if i > first && !line.is_empty() && !line.starts_with([' ', '\t', '#']) {
            break;
        }
        let mut from = if i == first { "labels:".len() } else { 0 };
        while let Some(at) = line[from..].find(key) {
            let pos = from + at;
            let rest = line[pos + key.len()..].trim_start_matches(['"', '\'']);
            if rest.starts_with(':') {
                return format!(":{}:{}", i + 1, pos + 1);
            }
            from = pos + key.len().max(1);
        }
    }
    format!(":{}:1", first + 1)
}

/// Checks a service file's labels: keys `[a-z0-9_.-]{1,63}`, values at most
/// [`MAX_LABEL_VALUE`] characters; an invalid one is reported with file:line:column and key.
fn check_labels(
    f: &Path,
    text: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    for (k, v) in labels {
        let message = if !valid_label_key(k) {
            format!("{k:?} is not a valid label key (a-z, 0-9, _ . -, 1 to 63 characters)")
        } else if v.chars().count() > MAX_LABEL_VALUE {
            format!(
                "a label value is at most {MAX_LABEL_VALUE} characters (this one has {})",
                v.chars().count()
            )
        } else {
            continue;
        };
        return Err(ConfigError::Parse {
            path: f.to_path_buf(),
            location: if k.is_empty() {
                String::new()
            } else {
                label_location(text, k)
            },
            key: format!("labels.{k}: "),
            message,
        });
    }
    Ok(())
}

impl Config {
    /// Loads `collector.yaml` and every service file. Any error refuses the whole config.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read(path)?;
        let file: CollectorFile = parse_yaml(path, &text)?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };

        let from_file = crate::secret::resolve(
            crate::secret::Ways {
                key: "url",
                inline: file.database.url.as_deref(),
                file: file.database.url_file.as_deref(),
                env: file.database.url_env.as_deref(),
            },
            &resolve,
        )
        .map_err(|(k, r)| invalid(path, format!("database.{k}"), r))?;
        let database_url = std::env::var(DATABASE_URL_ENV)
            .ok()
            .filter(|s| !s.is_empty())
            .or(from_file.map(|s| s.expose().to_string()))
            .ok_or_else(|| {
                invalid(
                    path,
                    "database.url",
                    format!("missing (set it, url_file or url_env here, or {DATABASE_URL_ENV})"),
                )
            })?;
        if file.database.pool_size == 0 {
            return Err(invalid(path, "database.pool_size", "must be at least 1"));
        }
        if file.defaults.after == 0 || file.defaults.recover_after == 0 {
            return Err(invalid(
                path,
                "defaults",
                "after and recover_after must be at least 1",
            ));
        }
        if file.node_timeout < Duration::from_secs(1) {
            return Err(invalid(path, "node_timeout", "must be at least 1s"));
        }
        if file.backlog_alert < Duration::from_secs(1) {
            return Err(invalid(path, "backlog_alert", "must be at least 1s"));
        }
        // Below a second every result of a node a few milliseconds ahead would lose its time;
        // above a day the rule would keep results dated tomorrow.
        if file.max_clock_skew < Duration::from_secs(1) || file.max_clock_skew > MAX_CLOCK_SKEW {
            return Err(invalid(
                path,
                "max_clock_skew",
                "must be between 1s and 1day",
            ));
        }
        if let Some((key, reason)) = file.retention.invalid() {
            let keys = ["retention".to_string(), key.to_string()];
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                location: locate(&text, &keys)
                    .map(|(l, c)| format!(":{l}:{c}"))
                    .unwrap_or_default(),
                key: format!("retention.{key}: "),
                message: reason,
            });
        }
        let mut file = file;
        let mut secret_files: Vec<(String, PathBuf)> = file
            .notify
            .secret_files()
            .into_iter()
            .map(|(k, p)| (k, resolve(&p)))
            .collect();
        for (key, p) in [
            ("database.url_file", &file.database.url_file),
            ("metrics.bearer_token_file", &file.metrics.bearer_token_file),
        ] {
            if let Some(p) = p {
                secret_files.push((key.to_string(), resolve(p)));
            }
        }
        file.notify
            .validate(&resolve)
            .map_err(|e| invalid(path, e.key, e.reason))?;
        for (i, n) in file.nodes.iter_mut().enumerate() {
            if n.node_timeout.is_some_and(|t| t < Duration::from_secs(1)) {
                return Err(invalid(
                    path,
                    format!("nodes[{i}].node_timeout"),
                    "must be at least 1s",
                ));
            }
            let ac = &n.agent_control;
            if ac.check.is_empty() || ac.restart.is_empty() {
                return Err(invalid(
                    path,
                    format!("nodes[{i}].agent_control"),
                    "check and restart must be non-empty argument vectors",
                ));
            }
            if let Some(ssh) = &mut n.ssh {
                for p in [&mut ssh.key, &mut ssh.password_file, &mut ssh.known_hosts]
                    .into_iter()
                    .flatten()
                {
                    *p = resolve(p);
                }
                ssh.validate()
                    .map_err(|e| invalid(path, format!("nodes[{i}].ssh"), e.to_string()))?;
            } else if !n.agent {
                return Err(invalid(
                    path,
                    format!("nodes[{i}]"),
                    "a node without an agent (agent: false) needs an ssh: block",
                ));
            }
        }
        let mut seen = HashSet::new();
        for (i, n) in file.nodes.iter().enumerate() {
            if !valid_name(&n.name) {
                return Err(invalid(
                    path,
                    format!("nodes[{i}].name"),
                    format!(
                        "{:?} is not a valid node name (letters, digits, - _ .)",
                        n.name
                    ),
                ));
            }
            if !seen.insert(n.name.clone()) {
                return Err(invalid(
                    path,
                    format!("nodes[{i}].name"),
                    format!("duplicate node {:?}", n.name),
                ));
            }
        }

        let services_dir = resolve(&file.services_dir);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&services_dir)
            .map_err(|source| ConfigError::Read {
                path: services_dir.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        files.sort();

        let mut services = Vec::new();
        let mut ids: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut attachments = HashMap::new();
        let mut attachment_bytes = 0usize;
        for f in files {
            let text = read(&f)?;
            let sf: ServiceFile = parse_service(&f, &text)?;
            check_labels(&f, &text, &sf.labels)?;
            let mut svc = Self::load_service(&f, sf, &file.defaults, &seen)?;
            // The parsed spec carries a default interval; whether the file wrote one is only
            // visible in the document itself.
            svc.explicit.interval = serde_norway::from_str::<serde_norway::Value>(&text)
                .ok()
                .and_then(|v| v.get("check")?.get("interval").cloned())
                .is_some();
            let node = file
                .nodes
                .iter()
                .find(|n| n.name == svc.node)
                .expect("node checked");
            let via_ssh = svc.control.as_ref().is_some_and(|c| c.via == Via::Ssh);
            if via_ssh && node.ssh.is_none() {
                return Err(invalid(
                    &f,
                    "control.via",
                    format!(
                        "ssh needs an ssh: block under node {:?} in collector.yaml",
                        node.name
                    ),
                ));
            }

            if let Some(other) = ids.insert(svc.id.clone(), f.clone()) {
                return Err(invalid(
                    &f,
                    "id",
                    format!(
                        "duplicate service id {:?} (also in {})",
                        svc.id,
                        other.display()
                    ),
                ));
            }
            for a in svc.check.attachments() {
                if attachments.contains_key(&a) {
                    continue;
                }
                let p = resolve(Path::new(&a));
                let bytes = std::fs::read(&p).map_err(|e| {
                    invalid(
                        &f,
                        "check.request.multipart.file",
                        format!("cannot read {}: {e}", p.display()),
                    )
                })?;
                attachment_bytes += bytes.len();
                if attachment_bytes > MAX_ATTACHMENT_BYTES {
                    return Err(invalid(
                        &f,
                        "check.request.multipart.file",
                        format!("attachments exceed {MAX_ATTACHMENT_BYTES} bytes in total"),
                    ));
                }
                attachments.insert(a, bytes);
            }
            services.push(svc);
        }

        for svc in &services {
            if let Some(missing) = svc.depends_on.iter().find(|d| !ids.contains_key(*d)) {
                return Err(invalid(
                    &svc.source,
                    "depends_on",
                    format!("unknown service {missing:?}"),
                ));
            }
        }

        let metrics_token = match &file.metrics.bearer_token_file {
            Some(p) => {
                let p = resolve(p);
                let t = std::fs::read_to_string(&p).map_err(|e| {
                    invalid(
                        path,
                        "metrics.bearer_token_file",
                        format!("cannot read {}: {e}", p.display()),
                    )
                })?;
                let t = t.trim().to_string();
                if t.is_empty() {
                    return Err(invalid(
                        path,
                        "metrics.bearer_token_file",
                        format!("{} is empty", p.display()),
                    ));
                }
                Some(t)
            }
            None => None,
        };

        Ok(Config {
            thresholds_by_node: index_thresholds(&services),
            service_at: positions(services.iter().map(|s| s.id.as_str())),
            node_at: positions(file.nodes.iter().map(|n| n.name.as_str())),
            http: file.http,
            metrics: file.metrics,
            metrics_token,
            defaults: file.defaults,
            settings: None,
            node_timeout: file.node_timeout,
            max_clock_skew: file.max_clock_skew,
            secret_files,
            retention: file.retention,
            backlog_alert: file.backlog_alert,
            path: path.to_path_buf(),
            grpc_listen: file.grpc_listen,
            database_url,
            pool_size: file.database.pool_size,
            tls: TlsFiles {
                ca: resolve(&file.tls.ca),
                cert: resolve(&file.tls.cert),
                key: resolve(&file.tls.key),
            },
            nodes: file.nodes,
            services,
            attachments,
            notify: file.notify,
        })
    }

    fn load_service(
        f: &Path,
        sf: ServiceFile,
        d: &Defaults,
        nodes: &HashSet<String>,
    ) -> Result<Service, ConfigError> {
        if !valid_name(&sf.id) {
            return Err(invalid(
                f,
                "id",
                format!(
                    "{:?} is not a valid service id (letters, digits, - _ ., at most 64)",
                    sf.id
                ),
            ));
        }
        if !nodes.contains(&sf.node) {
            let mut known: Vec<_> = nodes.iter().cloned().collect();
            known.sort();
            return Err(invalid(
                f,
                "node",
                format!(
                    "unknown node {:?}; nodes in collector.yaml: {}",
                    sf.node,
                    known.join(", ")
                ),
            ));
        }
        sf.check
            .validate()
            .map_err(|e| invalid(f, "check", e.to_string()))?;
        if let Some(c) = &sf.control {
            c.validate()
                .map_err(|reason| invalid(f, "control", reason))?;
        }
        let of = sf.on_failure;
        let thresholds = Thresholds {
            after: of.after.unwrap_or(d.after),
            recover_after: of.recover_after.unwrap_or(d.recover_after),
            flap_high: of.flap_high.unwrap_or(d.flap_high),
            flap_low: of.flap_low.unwrap_or(d.flap_low),
        };
        if thresholds.flap_low >= thresholds.flap_high || thresholds.flap_high > 100 {
            return Err(invalid(
                f,
                "on_failure.flap_low",
                "flap_low must be below flap_high, and flap_high at most 100",
            ));
        }
        if of.action == FailureAction::Restart && sf.control.is_none() {
            return Err(invalid(
                f,
                "on_failure.action",
                "restart needs a control: block saying how to restart the service",
            ));
        }
        if sf.depends_on.iter().any(|d| d == &sf.id) {
            return Err(invalid(
                f,
                "depends_on",
                "a service cannot depend on itself",
            ));
        }
        if sf.stale_after.is_some_and(|d| d < Duration::from_secs(1)) {
            return Err(invalid(f, "stale_after", "must be at least 1s"));
        }
        if thresholds.after == 0 {
            return Err(invalid(f, "on_failure.after", "must be at least 1"));
        }
        if thresholds.recover_after == 0 {
            return Err(invalid(f, "on_failure.recover_after", "must be at least 1"));
        }
        Ok(Service {
            name: sf.name.unwrap_or_else(|| sf.id.clone()),
            id: sf.id,
            category: sf.category,
            node: sf.node,
            description: sf.description,
            check: sf.check,
            control: sf.control,
            action: of.action,
            thresholds,
            max_restarts: of.max_restarts.unwrap_or(d.max_restarts),
            within: of.within.unwrap_or(d.within),
            retry_after: of.retry_after.unwrap_or(d.retry_after),
            grace: of.grace.unwrap_or(d.grace),
            depends_on: sf.depends_on,
            command_deadline: d.command_deadline,
            stale_after_explicit: sf.stale_after,
            on_stale: sf.on_stale,
            source: f.to_path_buf(),
            explicit: Explicit {
                interval: false,
                after: of.after.is_some(),
                retry_after: of.retry_after.is_some(),
            },
            labels: sf.labels,
        })
    }

    /// This config with runtime `settings` in force: every service that does not set the check
    /// interval, `after` or `retry_after` itself takes them from `settings` (or, with `None`, from
    /// `defaults:` and the built-in interval again).
    pub fn with_settings(mut self, settings: Option<HealthSettings>) -> Config {
        for s in &mut self.services {
            if !s.explicit.interval {
                s.check.interval = settings
                    .map(|h| h.interval)
                    .unwrap_or(vigil_checks::DEFAULT_INTERVAL);
            }
            if !s.explicit.after {
                s.thresholds.after = settings
                    .map(|h| h.max_error_count)
                    .unwrap_or(self.defaults.after);
            }
            if !s.explicit.retry_after {
                s.retry_after = settings
                    .map(|h| h.retry_after)
                    .unwrap_or(self.defaults.retry_after);
            }
        }
        self.thresholds_by_node = index_thresholds(&self.services);
        self.settings = settings;
        self
    }

    /// Whether scheduled checks run (runtime setting `enabled`; true without settings).
    pub fn checks_enabled(&self) -> bool {
        self.settings.is_none_or(|s| s.enabled)
    }

    /// The services a node's agent runs.
    pub fn services_of<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Service> + 'a {
        self.services.iter().filter(move |s| s.node == node)
    }

    /// The services of `node` with their thresholds (empty if it has none).
    pub fn thresholds_of(&self, node: &str) -> std::sync::Arc<HashMap<String, Thresholds>> {
        self.thresholds_by_node
            .get(node)
            .cloned()
            .unwrap_or_default()
    }

    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        // `nodes` is public: the index is checked against it, never trusted blindly.
        let n = self.node_at.get(name).and_then(|&i| self.nodes.get(i));
        n.filter(|n| n.name == name)
    }

    /// How long `node`'s agent may be silent before the node is down.
    pub fn node_timeout_of(&self, node: &NodeConfig) -> Duration {
        node.node_timeout.unwrap_or(self.node_timeout)
    }

    pub fn service(&self, id: &str) -> Option<&Service> {
        let s = self.service_at.get(id).and_then(|&i| self.services.get(i));
        s.filter(|s| s.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COLLECTOR: &str = "\
database:
  url: postgres://vigil@127.0.0.1:5432/vigil
tls: { ca: certs/ca.pem, cert: certs/collector.pem, key: certs/collector.key }
nodes:
  - name: n1
defaults:
  after: 4
";

    fn setup(services: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("services")).unwrap();
        let path = dir.path().join("collector.yaml");
        std::fs::write(&path, COLLECTOR).unwrap();
        for (name, text) in services {
            std::fs::write(dir.path().join("services").join(name), text).unwrap();
        }
        (dir, path)
    }

    fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load(path)
    }

    const TCP: &str =
        "id: db\ncategory: system\nnode: n1\ncheck:\n  type: tcp\n  address: 127.0.0.1:5432\n";

    #[test]
    fn good_config_applies_defaults_and_resolves_paths() {
        let (dir, path) = setup(&[("db.yaml", TCP), ("notes.txt", "ignored")]);
        let cfg = load(&path).unwrap();
        assert_eq!(cfg.services.len(), 1);
        let s = &cfg.services[0];
        assert_eq!(s.name, "db");
        assert_eq!(
            s.thresholds,
            Thresholds {
                after: 4,
                recover_after: 2,
                flap_high: 50,
                flap_low: 25
            }
        );
        assert_eq!(s.check.interval, Duration::from_secs(30));
        assert_eq!(cfg.tls.ca, dir.path().join("certs/ca.pem"));
    }

    #[test]
    fn max_clock_skew_has_bounds_and_database_url_a_file() {
        let (dir, path) = setup(&[("db.yaml", TCP)]);
        for (skew, ok) in [
            ("0s", false),
            ("500ms", false),
            ("1s", true),
            ("1day", true),
            ("2days", false),
        ] {
            std::fs::write(&path, format!("{COLLECTOR}max_clock_skew: {skew}\n")).unwrap();
            match load(&path) {
                Ok(c) => assert!(ok, "{skew} accepted: {:?}", c.max_clock_skew),
                Err(e) => {
                    assert!(!ok, "{skew} refused: {e}");
                    assert!(e.to_string().contains("max_clock_skew"), "{e}");
                }
            }
        }
        // The URL (with its password) from a file; the file and the inline URL together are
        // refused at the key.
        let url = dir.path().join("db-url");
        std::fs::write(&url, "postgres://vigil:pw@127.0.0.1:5432/vigil\n").unwrap();
        let from_file = COLLECTOR.replace(
            "url: postgres://vigil@127.0.0.1:5432/vigil",
            &format!("url_file: {}", url.display()),
        );
        std::fs::write(&path, &from_file).unwrap();
        if std::env::var(DATABASE_URL_ENV).is_err() {
            assert_eq!(
                load(&path).unwrap().database_url,
                "postgres://vigil:pw@127.0.0.1:5432/vigil"
            );
        }
        let both = COLLECTOR.replace(
            "  url: postgres://vigil@127.0.0.1:5432/vigil",
            &format!("  url: postgres://x@h/d\n  url_file: {}", url.display()),
        );
        std::fs::write(&path, both).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.contains("database.url") && e.contains("not several"),
            "{e}"
        );
        assert!(!e.contains("pw@"), "{e}");
    }

    #[test]
    fn retention_defaults_and_errors_name_file_line_and_key() {
        let (_dir, path) = setup(&[("db.yaml", TCP)]);
        let cfg = load(&path).unwrap();
        assert_eq!(cfg.retention, Retention::default());
        assert_eq!(cfg.retention.raw, Duration::from_secs(14 * 86_400));
        let with = |extra: &str| {
            std::fs::write(&path, format!("{COLLECTOR}{extra}")).unwrap();
            load(&path)
        };
        let cfg = with("retention:\n  raw: 3d\n  daily: 1y\n").unwrap();
        assert_eq!(cfg.retention.raw, Duration::from_secs(3 * 86_400));
        assert_eq!(cfg.retention.hourly, Duration::from_secs(90 * 86_400));
        let line = COLLECTOR.lines().count() + 2;
        let err = with("retention:\n  raw: 3d\n  hourly: 1h\n")
            .unwrap_err()
            .to_string();
        let want = format!(
            "{}:{}:3: retention.hourly: must be at least 2days",
            path.display(),
            line + 1
        );
        assert_eq!(err, want);
        let err = with("retention:\n  raw: 12h\n").unwrap_err().to_string();
        let want = format!(
            "{}:{line}:3: retention.raw: must be at least 1day",
            path.display()
        );
        assert_eq!(err, want);
        let err = with("retention:\n  raw: soon\n").unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}:{line}:", path.display())),
            "{err}"
        );
        assert!(err.contains("retention.raw"), "{err}");
        let err = with("retention:\n  rwa: 3d\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `rwa`"), "{err}");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let bad = "id: db\ncategory: system\nnode: n1\ncheck:\n  type: tcp\n  address: 127.0.0.1:5432\n  adress: x\n";
        let (_dir, path) = setup(&[("db.yaml", bad)]);
        let err = load(&path).unwrap_err().to_string();
        let file = path.parent().unwrap().join("services/db.yaml");
        let want = format!("{}:7:3: check: unknown field `adress`", file.display());
        assert!(err.starts_with(&want), "{err}");
    }

    /// A typo inside `check:` is reported at its own line and column, with every key valid at
    /// the top of a check (the common ones included), wherever `type:` is written.
    #[test]
    fn typo_in_check_points_at_its_line_and_lists_every_key() {
        let bad = "id: web\ncategory: web\nnode: n1\ncheck:\n  intervall: 10s\n  type: http\n  request:\n    url: http://127.0.0.1/\n";
        let (_dir, path) = setup(&[("web.yaml", bad)]);
        let err = load(&path).unwrap_err().to_string();
        let file = path.parent().unwrap().join("services/web.yaml");
        let want = format!("{}:5:3: check: unknown field `intervall`", file.display());
        assert!(err.starts_with(&want), "{err}");
        for key in ["`interval`", "`timeout`", "`type`", "`request`", "`expect`"] {
            assert!(err.contains(key), "{key} missing: {err}");
        }
    }

    #[test]
    fn typo_deep_in_check_points_at_its_line() {
        let bad = "id: web\ncategory: web\nnode: n1\ncheck:\n  type: http\n  request:\n    url: http://127.0.0.1/\n  expect:\n    staus: 200\n";
        let (_dir, path) = setup(&[("web.yaml", bad)]);
        let err = load(&path).unwrap_err().to_string();
        let file = path.parent().unwrap().join("services/web.yaml");
        let want = format!(
            "{}:9:5: check.expect: unknown field `staus`",
            file.display()
        );
        assert!(err.starts_with(&want), "{err}");
        assert!(err.contains("`status`"), "{err}");

        let bad = "id: web\ncategory: web\nnode: n1\ncheck:\n  type: http\n  request:\n    url: http://127.0.0.1/\n    metod: GET\n";
        let (_dir, path) = setup(&[("web.yaml", bad)]);
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.contains("web.yaml:8:5: check.request: unknown field `metod`"),
            "{err}"
        );
        assert!(err.contains("`method`"), "{err}");
    }

    #[test]
    fn bad_value_in_check_points_at_its_key() {
        let bad = "id: db\ncategory: system\nnode: n1\ncheck:\n  type: tcp\n  address: 127.0.0.1:5432\n  timeout: soon\n";
        let (_dir, path) = setup(&[("db.yaml", bad)]);
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("db.yaml:7:3: check.timeout: "), "{err}");
    }

    #[test]
    fn typo_in_control_points_at_its_line() {
        let bad = format!("{TCP}control:\n  via: agent\n  restrat: [[systemctl, restart, x]]\n");
        let (_dir, path) = setup(&[("db.yaml", &bad)]);
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("db.yaml:9:3: "), "{err}");
        assert!(
            err.contains("restrat") && err.contains("`restart`"),
            "{err}"
        );
    }

    #[test]
    fn locate_follows_keys_and_items() {
        let text = "a:\n  b:\n    - x: 1\n    - y: 2\n      z: 3\n  c: 4\n";
        let k = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(locate(text, &k(&["a", "c"])), Some((6, 3)));
        assert_eq!(locate(text, &k(&["a", "b", "1", "z"])), Some((5, 7)));
        assert_eq!(locate(text, &k(&["a", "b", "0", "x"])), Some((3, 7)));
        assert_eq!(locate(text, &k(&["a", "nope"])), Some((1, 1)));
        assert_eq!(locate(text, &k(&["q"])), None);
    }

    #[test]
    fn unknown_check_kind_lists_the_kinds() {
        let bad = "id: db\ncategory: system\nnode: n1\ncheck:\n  type: ping\n";
        let (_dir, path) = setup(&[("db.yaml", bad)]);
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.contains("ping") && err.contains("http") && err.contains("tcp"),
            "{err}"
        );
    }

    #[test]
    fn unknown_node_and_duplicate_ids_are_refused() {
        let other = TCP.replace("node: n1", "node: n9");
        let (_dir, path) = setup(&[("db.yaml", &other)]);
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.contains("unknown node \"n9\"") && err.contains("n1"),
            "{err}"
        );

        let (_dir, path) = setup(&[("a.yaml", TCP), ("b.yaml", TCP)]);
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("duplicate service id"), "{err}");
    }

    #[test]
    fn bad_collector_yaml_is_reported_with_its_path() {
        let (dir, path) = setup(&[]);
        std::fs::write(
            &path,
            "database: {url: x}\ntls: {ca: a, cert: b, key: c}\ngrpc_listen: nope\n",
        )
        .unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("collector.yaml:3"), "{err}");
        assert!(err.contains("grpc_listen"), "{err}");
        drop(dir);
    }

    #[test]
    fn zero_threshold_is_refused() {
        let s = format!("{TCP}on_failure:\n  after: 0\n");
        let (_dir, path) = setup(&[("db.yaml", &s)]);
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("on_failure.after"), "{err}");
        // restart needs a control block; depends_on must name known services.
        let s = format!("{TCP}on_failure:\n  action: restart\n");
        let (_dir, path) = setup(&[("db.yaml", &s)]);
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.contains("on_failure.action") && err.contains("control"),
            "{err}"
        );
        let s = format!("{TCP}depends_on: [nope]\n");
        let (_dir, path) = setup(&[("db.yaml", &s)]);
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("depends_on") && err.contains("nope"), "{err}");
    }

    #[test]
    fn missing_attachment_is_refused() {
        let s = "id: ocr\ncategory: api\nnode: n1\ncheck:\n  type: http\n  request:\n    method: POST\n    url: http://127.0.0.1:1/x\n    multipart:\n      - { field: files, file: data/missing.pdf }\n";
        let (_dir, path) = setup(&[("ocr.yaml", s)]);
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("missing.pdf"), "{err}");
    }

    #[test]
    fn labels_are_loaded_and_bad_ones_refused_with_their_line() {
        let s = format!("{TCP}labels:\n  env: prod\n  team.ocr-1_x: \"\"\n");
        let (_dir, path) = setup(&[("db.yaml", &s)]);
        let cfg = load(&path).unwrap();
        let labels = &cfg.service("db").unwrap().labels;
        assert_eq!(labels.get("env").map(String::as_str), Some("prod"));
        assert_eq!(labels.len(), 2);

        let s = format!("{TCP}labels:\n  env: prod\n  Team: ocr\n");
        let (dir, path) = setup(&[("db.yaml", &s)]);
        let err = load(&path).unwrap_err().to_string();
        let file = dir.path().join("services/db.yaml");
        assert!(err.starts_with(&format!("{}:9:", file.display())), "{err}");
        assert!(err.contains("labels.Team: \"Team\" is not"), "{err}");
        let s = format!("{TCP}labels: {{env: prod, Team: ocr}}\n");
        let (_dir, path) = setup(&[("db.yaml", &s)]);
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("db.yaml:7:21: labels.Team"), "{err}");

        let long = "x".repeat(257);
        let s = format!("{TCP}labels:\n  env: {long}\n");
        let (_dir, path) = setup(&[("db.yaml", &s)]);
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.contains("db.yaml:8:") && err.contains("labels.env"),
            "{err}"
        );
        assert!(err.contains("256"), "{err}");

        let s = format!("{TCP}labels:\n  {}: x\n", "k".repeat(64));
        let (_dir, path) = setup(&[("db.yaml", &s)]);
        assert!(load(&path).unwrap_err().to_string().contains("label key"));
        assert!(valid_label_key(&"k".repeat(63)));
        assert!(!valid_label_key(""));
    }

    /// The shipped examples must stay valid: the template as a service file, and the whole
    /// example config directory.
    #[test]
    fn shipped_examples_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let tpl = root.join("services_template.yaml");
        let text = std::fs::read_to_string(&tpl).unwrap();
        let sf: ServiceFile = parse_yaml(&tpl, &text).unwrap();
        sf.check.validate().unwrap();
        let cfg = Config::load(&root.join("collector.yaml")).unwrap();
        assert!(cfg.service("mineru").is_some());
        assert!(cfg.attachments.contains_key("data/test.pdf"));
    }
}
