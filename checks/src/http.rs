//! `http` check: one HTTP(S) request (optionally a multipart file upload, e.g. a PDF to an OCR
//! API) and expectations on the answer: status, body substrings/regex, JSON-path conditions
//! (RFC 9535) and a maximum response time. TLS via rustls with the aws-lc-rs provider.
//!
//! OK when every expectation holds; CRITICAL naming the first one that failed, or the connection
//! error; UNKNOWN when the check itself cannot be prepared (unreadable upload file or CA file).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderName, HeaderValue};
use reqwest::{Method, multipart};
use serde::{Deserialize, Serialize};
use serde_json_path::JsonPath;
use vigil_error::describe;

use crate::{
    Attachments, MAX_OUTPUT_BYTES, Metric, Outcome, SpecError, Status, excerpt, grace,
    internal_deadline,
};

/// Most bytes of a response body read; past it the rest is not read (the connection is dropped).
pub const MAX_BODY_BYTES: usize = 10 * 1024 * 1024;

/// An HTTP check, as written under `check:` with `type: http`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    /// What to send.
    pub request: HttpRequest,
    /// What the answer must look like (default: status 200).
    #[serde(default)]
    pub expect: HttpExpect,
    /// TLS options for `https://` URLs.
    #[serde(default, skip_serializing_if = "HttpTls::is_default")]
    pub tls: HttpTls,
}

fn default_method() -> String {
    "GET".to_string()
}

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// The request to send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRequest {
    /// HTTP method (default `GET`); case-insensitive, sent upper-case.
    #[serde(default = "default_method")]
    pub method: String,
    /// Absolute `http://` or `https://` URL.
    pub url: String,
    /// Extra request headers (`Authorization`, `Host`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Raw request body (set `Content-Type` in `headers`). Not together with `multipart`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// A `multipart/form-data` body, one entry per form field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multipart: Option<Vec<MultipartPart>>,
    /// Follow redirects (up to 10; default true). With `false` a 3xx is the answer checked.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub follow_redirects: bool,
}

/// One field of a multipart form: exactly one of `file` or `text`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultipartPart {
    /// Form field name (`files`).
    pub field: String,
    /// Path of a file to upload, as written (`data/test.pdf`). Its bytes come from the
    /// attachments shipped by the collector, or else from the local disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// A plain text value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Content type of the part (`application/pdf`); files default to
    /// `application/octet-stream`, text parts send none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// File name sent in the part; defaults to the base name of `file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
}

fn default_status() -> Vec<u16> {
    vec![200]
}

/// Conditions on the answer; all must hold, checked in the order of the fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpExpect {
    /// Accepted status codes (default `[200]`; must not be empty).
    #[serde(default = "default_status")]
    pub status: Vec<u16>,
    /// Substrings the body must contain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub body_contains: Vec<String>,
    /// Substrings the body must not contain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub body_not_contains: Vec<String>,
    /// A regular expression (Rust `regex` syntax) that must match somewhere in the body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_regex: Option<String>,
    /// Conditions on the body parsed as JSON.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub json: Vec<JsonExpect>,
    /// Longest acceptable time from sending the request to the end of the body (`2s`, `500ms`).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_response_time: Option<Duration>,
}

impl Default for HttpExpect {
    fn default() -> Self {
        HttpExpect {
            status: default_status(),
            body_contains: Vec::new(),
            body_not_contains: Vec::new(),
            body_regex: None,
            json: Vec::new(),
            max_response_time: None,
        }
    }
}

impl HttpExpect {
    fn needs_body(&self) -> bool {
        !self.body_contains.is_empty()
            || !self.body_not_contains.is_empty()
            || self.body_regex.is_some()
            || !self.json.is_empty()
    }
}

/// A condition on a JSON path. With neither `exists` nor `equals`, the path must match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonExpect {
    /// RFC 9535 JSONPath (`$.results`, `$.items[0].state`, `$.nodes[?@.up == false]`).
    pub path: String,
    /// `true`: the path must match at least one node; `false`: it must match none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
    /// The path must match, and every matched node must equal this value (numbers compare by
    /// value: `1` equals `1.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<serde_json::Value>,
}

/// TLS options.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTls {
    /// Accept any server certificate (expired, self-signed, wrong host). Default false.
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// PEM file of CA certificates to trust *instead of* the system roots (like `curl --cacert`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS; needs `client_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, RSA or SEC1) of `client_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
}

impl HttpTls {
    fn is_default(&self) -> bool {
        *self == HttpTls::default()
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.to_string(),
        reason: reason.into(),
    }
}

fn parse_method(m: &str) -> Result<Method, String> {
    Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("{m:?} is not a valid HTTP method"))
}

/// Why the check could not even be tried (UNKNOWN), as opposed to a failed service (CRITICAL).
#[derive(Debug, thiserror::Error)]
enum PrepareError {
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
}

impl HttpCheck {
    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        let r = &self.request;
        parse_method(&r.method).map_err(|e| invalid("request.method", e))?;
        let url = reqwest::Url::parse(&r.url)
            .map_err(|e| invalid("request.url", format!("{:?}: {e}", shown_url(&r.url))))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(
                "request.url",
                format!("scheme {:?} is not http or https", url.scheme()),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("request.url", "has no host"));
        }
        for (k, v) in &r.headers {
            HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| invalid("request.headers", format!("{k:?} is not a header name")))?;
            HeaderValue::from_str(v).map_err(|_| {
                invalid(
                    "request.headers",
                    format!("{k}: value is not a valid header value"),
                )
            })?;
        }
        if r.body.is_some() && r.multipart.is_some() {
            return Err(invalid("request", "set either body or multipart, not both"));
        }
        if let Some(parts) = &r.multipart {
            if parts.is_empty() {
                return Err(invalid("request.multipart", "has no parts"));
            }
            for (i, p) in parts.iter().enumerate() {
                let field = format!("request.multipart[{i}]");
                if p.field.is_empty() {
                    return Err(invalid(&field, "field name is empty"));
                }
                match (&p.file, &p.text) {
                    (Some(f), None) if f.is_empty() => {
                        return Err(invalid(&field, "file path is empty"));
                    }
                    (Some(_), None) | (None, Some(_)) => {}
                    _ => return Err(invalid(&field, "set exactly one of file or text")),
                }
                if let Some(ct) = &p.content_type {
                    multipart::Part::text("").mime_str(ct).map_err(|_| {
                        invalid(&field, format!("content_type {ct:?} is not a MIME type"))
                    })?;
                }
            }
        }
        let e = &self.expect;
        if e.status.is_empty() {
            return Err(invalid("expect.status", "list at least one status code"));
        }
        if let Some(bad) = e.status.iter().find(|s| !(100..=599).contains(*s)) {
            return Err(invalid(
                "expect.status",
                format!("{bad} is not an HTTP status code (100-599)"),
            ));
        }
        if let Some(re) = &e.body_regex {
            regex::Regex::new(re).map_err(|err| invalid("expect.body_regex", err.to_string()))?;
        }
        for (i, j) in e.json.iter().enumerate() {
            JsonPath::parse(&j.path).map_err(|err| {
                invalid(
                    &format!("expect.json[{i}].path"),
                    format!("{:?}: {err}", j.path),
                )
            })?;
            if j.exists == Some(false) && j.equals.is_some() {
                return Err(invalid(
                    &format!("expect.json[{i}]"),
                    "exists: false cannot be combined with equals",
                ));
            }
        }
        if e.max_response_time.is_some_and(|d| d.is_zero()) {
            return Err(invalid("expect.max_response_time", "must be more than 0s"));
        }
        let t = &self.tls;
        if t.client_cert.is_some() != t.client_key.is_some() {
            return Err(invalid("tls", "client_cert and client_key go together"));
        }
        Ok(())
    }

    pub(crate) fn attachments(&self) -> Vec<String> {
        self.request
            .multipart
            .iter()
            .flatten()
            .filter_map(|p| p.file.clone())
            .collect()
    }

    pub(crate) async fn run(&self, timeout: Duration, files: &Attachments) -> Outcome {
        let start = Instant::now();
        let deadline = internal_deadline(timeout);
        let label = format!(
            "{} {}",
            self.request.method.to_ascii_uppercase(),
            shown_url(&self.request.url)
        );
        // reqwest enforces `deadline` itself; this is the backstop for everything else
        // (reading upload files, a stalled body), still inside the outer timeout.
        let backstop = deadline + grace(timeout) / 2;
        let mut outcome =
            match tokio::time::timeout(backstop, self.run_inner(deadline, files)).await {
                Ok(o) => o,
                Err(_) => Outcome::new(
                    Status::Critical,
                    format!("{label}: timed out after {}", fmt_secs(deadline)),
                ),
            };
        outcome.duration = start.elapsed();
        tracing::debug!(
            url = %shown_url(&self.request.url),
            status = %outcome.status,
            message = %outcome.message,
            "http check finished"
        );
        outcome
    }

    async fn run_inner(&self, deadline: Duration, files: &Attachments) -> Outcome {
        let r = &self.request;
        let label = format!("{} {}", r.method.to_ascii_uppercase(), shown_url(&r.url));
        let request = match self.build(deadline, files).await {
            Ok(req) => req,
            Err(e) => {
                tracing::warn!(url = %shown_url(&r.url), error = %e, "http check cannot be prepared");
                return Outcome::new(Status::Unknown, format!("{label}: {e}"));
            }
        };

        let sent = Instant::now();
        let mut response = match request.send().await {
            Ok(resp) => resp,
            Err(e) => return Outcome::new(Status::Critical, request_error(&label, e, deadline)),
        };
        let code = response.status();
        let mut body: Vec<u8> = Vec::new();
        let mut over_limit = false;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = MAX_BODY_BYTES - body.len();
                    if chunk.len() > room {
                        body.extend_from_slice(&chunk[..room]);
                        over_limit = true;
                        break;
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    let mut o = Outcome::new(
                        Status::Critical,
                        format!(
                            "HTTP {} then {}",
                            code.as_u16(),
                            request_error(&label, e, deadline)
                        ),
                    );
                    o.output = excerpt(&String::from_utf8_lossy(&body), MAX_OUTPUT_BYTES);
                    return o;
                }
            }
        }
        drop(response);
        let took = sent.elapsed();
        let text = String::from_utf8_lossy(&body);
        let metrics = vec![
            Metric::new("time", took.as_secs_f64(), "s"),
            Metric::new("size", body.len() as f64, "B"),
        ];
        let failure = if over_limit && self.expect.needs_body() {
            Some(format!(
                "body larger than the {} MiB read limit, cannot check it",
                MAX_BODY_BYTES / (1024 * 1024)
            ))
        } else {
            self.first_failure(code.as_u16(), &text, took)
        };
        let (status, message) = match failure {
            Some(f) => (Status::Critical, f),
            None => (
                Status::Ok,
                format!(
                    "HTTP {} in {:.0} ms, {} B{}",
                    code.as_u16(),
                    took.as_secs_f64() * 1000.0,
                    body.len(),
                    if over_limit {
                        " (read limit reached)"
                    } else {
                        ""
                    }
                ),
            ),
        };
        Outcome {
            status,
            message,
            metrics,
            output: excerpt(&text, MAX_OUTPUT_BYTES),
            duration: Duration::ZERO,
            exit_code: None,
        }
    }

    /// Builds the client and the request; errors here are the check's own (UNKNOWN).
    async fn build(
        &self,
        deadline: Duration,
        files: &Attachments,
    ) -> Result<reqwest::RequestBuilder, PrepareError> {
        let r = &self.request;
        let method = parse_method(&r.method).map_err(|detail| PrepareError::Invalid {
            what: "method",
            detail,
        })?;
        let mut builder = reqwest::Client::builder()
            .timeout(deadline)
            .user_agent(concat!("vigil/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(0)
            .redirect(if r.follow_redirects {
                reqwest::redirect::Policy::limited(10)
            } else {
                reqwest::redirect::Policy::none()
            });
        let t = &self.tls;
        if t.insecure_skip_verify {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        if let Some(ca) = &t.ca_file {
            let pem = read_local(ca, "tls.ca_file").await?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| PrepareError::Invalid {
                    what: "tls.ca_file",
                    detail: format!("{}: {e}", ca.display()),
                })?;
            if certs.is_empty() {
                return Err(PrepareError::Invalid {
                    what: "tls.ca_file",
                    detail: format!("{}: no certificate found", ca.display()),
                });
            }
            builder = builder.tls_certs_only(certs);
        }
        if let (Some(cert), Some(key)) = (&t.client_cert, &t.client_key) {
            let mut pem = read_local(cert, "tls.client_cert").await?;
            pem.push(b'\n');
            pem.extend(read_local(key, "tls.client_key").await?);
            let id = reqwest::Identity::from_pem(&pem).map_err(|e| PrepareError::Invalid {
                what: "tls.client_cert/client_key",
                detail: describe(&e),
            })?;
            builder = builder.identity(id);
        }
        let client = builder.build().map_err(|e| PrepareError::Invalid {
            what: "HTTP client settings",
            detail: describe(&e),
        })?;

        let mut req = client.request(method, &r.url);
        for (k, v) in &r.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        if let Some(body) = &r.body {
            req = req.body(body.clone());
        }
        if let Some(parts) = &r.multipart {
            let mut form = multipart::Form::new();
            for p in parts {
                let part = match (&p.file, &p.text) {
                    (Some(path), _) => {
                        let bytes = match files.get(path) {
                            Some(b) => b.clone(),
                            None => read_local(Path::new(path), "multipart file").await?,
                        };
                        let filename = p.filename.clone().unwrap_or_else(|| {
                            Path::new(path)
                                .file_name()
                                .map_or_else(|| path.clone(), |n| n.to_string_lossy().into_owned())
                        });
                        let ct = p
                            .content_type
                            .as_deref()
                            .unwrap_or("application/octet-stream");
                        multipart::Part::bytes(bytes)
                            .file_name(filename)
                            .mime_str(ct)
                            .map_err(|e| PrepareError::Invalid {
                                what: "multipart content_type",
                                detail: describe(&e),
                            })?
                    }
                    (None, Some(text)) => {
                        let mut part = multipart::Part::text(text.clone());
                        if let Some(name) = &p.filename {
                            part = part.file_name(name.clone());
                        }
                        if let Some(ct) = &p.content_type {
                            part = part.mime_str(ct).map_err(|e| PrepareError::Invalid {
                                what: "multipart content_type",
                                detail: describe(&e),
                            })?;
                        }
                        part
                    }
                    (None, None) => {
                        return Err(PrepareError::Invalid {
                            what: "multipart part",
                            detail: format!("{}: neither file nor text", p.field),
                        });
                    }
                };
                form = form.part(p.field.clone(), part);
            }
            req = req.multipart(form);
        }
        Ok(req)
    }

    /// The first expectation that does not hold, as a one-line message.
    fn first_failure(&self, code: u16, body: &str, took: Duration) -> Option<String> {
        let e = &self.expect;
        if !e.status.contains(&code) {
            return Some(format!("status {code}, expected {:?}", e.status));
        }
        for s in &e.body_contains {
            if !body.contains(s.as_str()) {
                return Some(format!("body does not contain {s:?}"));
            }
        }
        for s in &e.body_not_contains {
            if body.contains(s.as_str()) {
                return Some(format!("body contains {s:?}"));
            }
        }
        if let Some(re) = &e.body_regex {
            match regex::Regex::new(re) {
                Ok(rx) if rx.is_match(body) => {}
                Ok(_) => return Some(format!("body does not match /{re}/")),
                Err(err) => return Some(format!("body_regex invalid: {err}")),
            }
        }
        if !e.json.is_empty() {
            let value: serde_json::Value = match serde_json::from_str(body) {
                Ok(v) => v,
                Err(err) => return Some(format!("body is not JSON: {err}")),
            };
            for j in &e.json {
                if let Some(f) = json_failure(j, &value) {
                    return Some(f);
                }
            }
        }
        if let Some(max) = e.max_response_time
            && took > max
        {
            return Some(format!(
                "response took {}, more than max {}",
                fmt_secs(took),
                humantime::format_duration(max)
            ));
        }
        None
    }
}

fn json_failure(j: &JsonExpect, value: &serde_json::Value) -> Option<String> {
    let path = match JsonPath::parse(&j.path) {
        Ok(p) => p,
        Err(err) => return Some(format!("{}: invalid JSONPath: {err}", j.path)),
    };
    let nodes = path.query(value).all();
    if j.exists == Some(false) {
        return (!nodes.is_empty()).then(|| {
            format!(
                "{}: expected no match, found {} ({})",
                j.path,
                nodes.len(),
                short_json(nodes[0])
            )
        });
    }
    if nodes.is_empty() {
        return Some(format!("{}: no match", j.path));
    }
    if let Some(want) = &j.equals
        && let Some(got) = nodes.iter().find(|n| !json_eq(n, want))
    {
        return Some(format!(
            "{}: got {}, expected {}",
            j.path,
            short_json(got),
            short_json(want)
        ));
    }
    None
}

/// JSON equality where numbers compare by value (`1` == `1.0`).
fn json_eq(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y,
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

fn short_json(v: &serde_json::Value) -> String {
    crate::truncate(&v.to_string(), 100)
}

/// `3.2s`, `0.125s`: seconds with up to three decimals.
fn fmt_secs(d: Duration) -> String {
    let s = format!("{:.3}", d.as_secs_f64());
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}s")
}

async fn read_local(path: &Path, what: &'static str) -> Result<Vec<u8>, PrepareError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| PrepareError::ReadFile {
            what,
            path: path.display().to_string(),
            source,
        })
}

/// A URL as a result message or a log line shows it: no user name or password, the query
/// string as `?…` (both may carry credentials; results are stored and shown to operators).
pub fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        // Nothing to hide: shown as written.
        Ok(u)
            if u.username().is_empty()
                && u.password().is_none()
                && u.query().is_none()
                && u.fragment().is_none() =>
        {
            url.to_string()
        }
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            let had_query = u.query().is_some();
            u.set_query(None);
            u.set_fragment(None);
            let mut s = u.to_string();
            if had_query {
                s.push_str("?…");
            }
            s
        }
        Err(_) => url.to_string(),
    }
}

fn request_error(label: &str, e: reqwest::Error, deadline: Duration) -> String {
    if e.is_timeout() {
        let phase = if e.is_body() || e.is_decode() {
            "reading the body"
        } else {
            "waiting for the response"
        };
        return format!("{label}: timed out after {} {phase}", fmt_secs(deadline));
    }
    // The URL is already in the label.
    format!("{label}: {}", describe(&e.without_url()))
}

#[cfg(test)]
mod tests;
