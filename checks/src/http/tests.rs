//! Tests of the `http` check against real local servers: axum on 127.0.0.1:0 for HTTP, and a
//! the test kit's minimal HTTPS server and PKI for HTTPS and client certificates.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Multipart, Path as UrlPath};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{any, get, post};
use serde_json::json;
use vigil_testkit::pki::Pki;

use super::*;
use crate::{CheckKind, CheckSpec};

/// Stand-in for the uploaded PDF: binary, with a NUL and invalid UTF-8.
const PDF: &[u8] = b"%PDF-1.4\n\x00\xff\xfe binary test document\n%%EOF\n";

async fn file_parse(mut form: Multipart) -> impl IntoResponse {
    let mut seen = Vec::new();
    while let Ok(Some(field)) = form.next_field().await {
        let name = field.name().unwrap_or("").to_string();
        let filename = field.file_name().map(str::to_string);
        let ct = field.content_type().map(str::to_string);
        let bytes = field.bytes().await.unwrap_or_default();
        seen.push((name, filename, ct, bytes));
    }
    let files = seen.iter().find(|(n, ..)| n == "files");
    let Some((_, filename, ct, bytes)) = files else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "no files field"})),
        );
    };
    if filename.as_deref() != Some("test.pdf") {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("filename {filename:?}")})),
        );
    }
    if ct.as_deref() != Some("application/pdf") {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("content type {ct:?}")})),
        );
    }
    if bytes.as_ref() != PDF {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "bytes differ"})),
        );
    }
    let lang = seen
        .iter()
        .find(|(n, ..)| n == "lang")
        .map(|(.., b)| String::from_utf8_lossy(b).into_owned());
    (
        StatusCode::OK,
        Json(json!({
            "results": {"test": {"pages": 1, "lang": lang}},
            "md_content": "# Test document",
        })),
    )
}

async fn serve() -> String {
    let app = Router::new()
        .route("/ok", get(|| async { "hello md_content world" }))
        .route(
            "/status/{code}",
            get(|UrlPath(code): UrlPath<u16>| async move {
                (
                    StatusCode::from_u16(code).unwrap(),
                    format!("status {code}"),
                )
            }),
        )
        .route(
            "/json",
            get(|| async {
                Json(json!({
                    "results": {"pages": 2, "ratio": 1.0},
                    "ok": true,
                    "nodes": [{"name": "a", "up": true}, {"name": "b", "up": true}],
                    "empty": null
                }))
            }),
        )
        .route("/not-json", get(|| async { "<html>oops</html>" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                "finally"
            }),
        )
        .route(
            "/hang",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                "never"
            }),
        )
        .route("/big", get(|| async { vec![b'x'; MAX_BODY_BYTES + 1024] }))
        .route(
            "/echo",
            any(
                |method: axum::http::Method, headers: HeaderMap, body: String| async move {
                    let h: HashMap<String, String> = headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                        .collect();
                    Json(json!({"method": method.as_str(), "headers": h, "body": body}))
                },
            ),
        )
        .route(
            "/redirect",
            get(|| async { axum::response::Redirect::temporary("/ok") }),
        )
        .route("/file_parse", post(file_parse));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn spec(v: serde_json::Value) -> CheckSpec {
    let spec: CheckSpec = serde_json::from_value(v).expect("spec deserializes");
    spec.validate().expect("spec is valid");
    spec
}

async fn run(v: serde_json::Value) -> Outcome {
    spec(v).run(&Attachments::default()).await
}

#[tokio::test]
async fn status_match_is_ok_with_metrics_and_body_excerpt() {
    let base = serve().await;
    let o = run(json!({"type": "http", "request": {"url": format!("{base}/ok")}})).await;
    assert_eq!(o.status, Status::Ok, "{}", o.message);
    assert!(o.message.starts_with("HTTP 200 in "), "{}", o.message);
    assert_eq!(o.output, "hello md_content world");
    let labels: Vec<_> = o
        .metrics
        .iter()
        .map(|m| (m.label.as_str(), m.unit.as_str()))
        .collect();
    assert_eq!(labels, [("time", "s"), ("size", "B")]);
    assert_eq!(o.metrics[1].value, 22.0);
}

#[tokio::test]
async fn status_mismatch_is_critical() {
    let base = serve().await;
    let o = run(json!({"type": "http", "request": {"url": format!("{base}/status/500")}})).await;
    assert_eq!(o.status, Status::Critical);
    assert_eq!(o.message, "status 500, expected [200]");
    assert_eq!(o.output, "status 500");

    let o = run(json!({
        "type": "http",
        "request": {"url": format!("{base}/status/503")},
        "expect": {"status": [200, 503]}
    }))
    .await;
    assert_eq!(o.status, Status::Ok, "{}", o.message);
}

#[tokio::test]
async fn body_contains_not_contains_and_regex() {
    let base = serve().await;
    let url = format!("{base}/ok");
    let o = run(json!({"type": "http", "request": {"url": url},
        "expect": {"body_contains": ["hello", "md_content"], "body_not_contains": ["error"],
                   "body_regex": "^hello \\w+ world$"}}))
    .await;
    assert_eq!(o.status, Status::Ok, "{}", o.message);

    let o = run(json!({"type": "http", "request": {"url": url},
        "expect": {"body_contains": ["hello", "results"]}}))
    .await;
    assert_eq!(o.status, Status::Critical);
    assert_eq!(o.message, "body does not contain \"results\"");

    let o = run(json!({"type": "http", "request": {"url": url},
        "expect": {"body_not_contains": ["world"]}}))
    .await;
    assert_eq!(o.status, Status::Critical);
    assert_eq!(o.message, "body contains \"world\"");

    let o = run(json!({"type": "http", "request": {"url": url},
        "expect": {"body_regex": "^bye"}}))
    .await;
    assert_eq!(o.status, Status::Critical);
    assert_eq!(o.message, "body does not match /^bye/");
}

#[tokio::test]
async fn json_paths_exist_and_equal() {
    let base = serve().await;
    let url = format!("{base}/json");
    let ok = run(
        json!({"type": "http", "request": {"url": url}, "expect": {"json": [
            {"path": "$.results", "exists": true},
            {"path": "$.results.pages", "equals": 2},
            {"path": "$.results.ratio", "equals": 1},
            {"path": "$.ok", "equals": true},
            {"path": "$.nodes[*].up", "equals": true},
            {"path": "$.nodes[?@.up == false]", "exists": false},
            {"path": "$.empty", "equals": null},
            {"path": "$.nodes[0].name"}
        ]}}),
    )
    .await;
    assert_eq!(ok.status, Status::Ok, "{}", ok.message);

    for (cond, msg) in [
        (
            json!({"path": "$.missing", "exists": true}),
            "$.missing: no match",
        ),
        (json!({"path": "$.missing"}), "$.missing: no match"),
        (
            json!({"path": "$.missing", "equals": 1}),
            "$.missing: no match",
        ),
        (
            json!({"path": "$.results.pages", "equals": 3}),
            "$.results.pages: got 2, expected 3",
        ),
        (
            json!({"path": "$.ok", "equals": "true"}),
            "$.ok: got true, expected \"true\"",
        ),
        (
            json!({"path": "$.nodes[*].name", "exists": false}),
            "$.nodes[*].name: expected no match, found 2 (\"a\")",
        ),
    ] {
        let o =
            run(json!({"type": "http", "request": {"url": url}, "expect": {"json": [cond]}})).await;
        assert_eq!(o.status, Status::Critical, "{cond}");
        assert_eq!(o.message, msg, "{cond}");
    }

    let o = run(
        json!({"type": "http", "request": {"url": format!("{base}/not-json")},
        "expect": {"json": [{"path": "$.results"}]}}),
    )
    .await;
    assert_eq!(o.status, Status::Critical);
    assert!(o.message.starts_with("body is not JSON"), "{}", o.message);
}

#[tokio::test]
async fn max_response_time_exceeded_is_critical() {
    let base = serve().await;
    let o = run(
        json!({"type": "http", "timeout": "10s", "request": {"url": format!("{base}/slow")},
        "expect": {"max_response_time": "100ms", "body_contains": ["finally"]}}),
    )
    .await;
    assert_eq!(o.status, Status::Critical, "{}", o.message);
    assert!(o.message.starts_with("response took "), "{}", o.message);
    assert!(
        o.message.ends_with(", more than max 100ms"),
        "{}",
        o.message
    );
    // The answer itself was fine and fully read.
    assert_eq!(o.output, "finally");
}

#[tokio::test]
async fn timeout_is_critical_and_reported_by_the_check() {
    let base = serve().await;
    let o =
        run(json!({"type": "http", "timeout": "1s", "request": {"url": format!("{base}/hang")}}))
            .await;
    assert_eq!(o.status, Status::Critical);
    assert!(
        o.message
            .starts_with(&format!("GET {base}/hang: timed out after")),
        "{}",
        o.message
    );
    assert!(
        o.message.contains("waiting for the response"),
        "{}",
        o.message
    );
}

#[tokio::test]
async fn connection_refused_is_critical_with_error_chain() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let o = run(json!({"type": "http", "request": {"url": format!("http://{addr}/")}})).await;
    assert_eq!(o.status, Status::Critical);
    assert!(
        o.message.starts_with(&format!("GET http://{addr}/: ")),
        "{}",
        o.message
    );
    assert!(
        o.message.to_lowercase().contains("connection refused"),
        "{}",
        o.message
    );
    assert!(o.metrics.is_empty());
}

#[tokio::test]
async fn method_headers_and_body_are_sent() {
    let base = serve().await;
    let o = run(json!({"type": "http", "request": {
        "method": "put", "url": format!("{base}/echo"),
        "headers": {"X-Token": "s3cret", "Content-Type": "text/plain"},
        "body": "payload"
    }, "expect": {"json": [
        {"path": "$.method", "equals": "PUT"},
        {"path": "$.headers['x-token']", "equals": "s3cret"},
        {"path": "$.body", "equals": "payload"},
        {"path": "$.headers['user-agent']", "equals": concat!("vigil/", env!("CARGO_PKG_VERSION"))}
    ]}}))
    .await;
    assert_eq!(o.status, Status::Ok, "{} / {}", o.message, o.output);
}

#[tokio::test]
async fn redirects_followed_unless_disabled() {
    let base = serve().await;
    let url = format!("{base}/redirect");
    let o = run(json!({"type": "http", "request": {"url": url}})).await;
    assert_eq!(o.status, Status::Ok, "{}", o.message);
    let o = run(
        json!({"type": "http", "request": {"url": url, "follow_redirects": false},
        "expect": {"status": [307]}}),
    )
    .await;
    assert_eq!(o.status, Status::Ok, "{}", o.message);
}

#[tokio::test]
async fn body_over_the_read_limit() {
    let base = serve().await;
    let url = format!("{base}/big");
    let o = run(json!({"type": "http", "request": {"url": url}})).await;
    assert_eq!(o.status, Status::Ok, "{}", o.message);
    assert!(o.message.contains("read limit"), "{}", o.message);
    assert_eq!(o.metrics[1].value, MAX_BODY_BYTES as f64);
    assert!(o.output.len() <= MAX_OUTPUT_BYTES + 32);
    let o = run(json!({"type": "http", "request": {"url": url},
        "expect": {"body_not_contains": ["error"]}}))
    .await;
    assert_eq!(o.status, Status::Critical);
    assert!(o.message.contains("read limit"), "{}", o.message);
}

fn ocr_spec(base: &str, file: &str) -> serde_json::Value {
    json!({
        "type": "http",
        "interval": "30m",
        "timeout": "120s",
        "request": {
            "method": "POST",
            "url": format!("{base}/file_parse"),
            "multipart": [
                {"field": "files", "file": file, "content_type": "application/pdf"},
                {"field": "lang", "text": "en"}
            ]
        },
        "expect": {
            "status": [200],
            "body_contains": ["md_content"],
            "json": [
                {"path": "$.results", "exists": true},
                {"path": "$.results.test.lang", "equals": "en"}
            ],
            "max_response_time": "60s"
        }
    })
}

#[tokio::test]
async fn multipart_upload_from_attachments() {
    let base = serve().await;
    let s = spec(ocr_spec(&base, "data/test.pdf"));
    assert_eq!(s.attachments(), ["data/test.pdf"]);
    let files: Attachments = Arc::new(HashMap::from([("data/test.pdf".to_string(), PDF.to_vec())]));
    let o = s.run(&files).await;
    assert_eq!(o.status, Status::Ok, "{} / {}", o.message, o.output);
    assert!(o.output.contains("# Test document"));
}

#[tokio::test]
async fn multipart_upload_from_local_disk_and_wrong_part() {
    let base = serve().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("test.pdf");
    std::fs::write(&path, PDF).unwrap();
    let file = path.to_str().unwrap();
    let o = spec(ocr_spec(&base, file))
        .run(&Attachments::default())
        .await;
    assert_eq!(o.status, Status::Ok, "{} / {}", o.message, o.output);

    // The server checks the content type: a wrong one is a 400 and so CRITICAL.
    let mut v = ocr_spec(&base, file);
    v["request"]["multipart"][0]["content_type"] = json!("text/plain");
    let o = spec(v).run(&Attachments::default()).await;
    assert_eq!(o.status, Status::Critical);
    assert_eq!(o.message, "status 400, expected [200]");
    assert!(o.output.contains("content type"), "{}", o.output);

    // An explicit filename replaces the base name.
    let mut v = ocr_spec(&base, file);
    v["request"]["multipart"][0]["filename"] = json!("other.pdf");
    let o = spec(v).run(&Attachments::default()).await;
    assert_eq!(o.status, Status::Critical);
    assert!(o.output.contains("other.pdf"), "{}", o.output);
}

#[tokio::test]
async fn multipart_missing_file_is_unknown() {
    let base = serve().await;
    let o = spec(ocr_spec(&base, "/nonexistent/vigil/test.pdf"))
        .run(&Attachments::default())
        .await;
    assert_eq!(o.status, Status::Unknown);
    assert!(
        o.message
            .contains("cannot read multipart file /nonexistent/vigil/test.pdf"),
        "{}",
        o.message
    );
}

#[test]
fn spec_deserializes_with_defaults() {
    let s = spec(json!({"type": "http", "request": {"url": "http://127.0.0.1:8000/health"}}));
    let CheckKind::Http(h) = &s.kind else {
        panic!("{s:?}")
    };
    assert_eq!(h.request.method, "GET");
    assert!(h.request.follow_redirects);
    assert_eq!(h.expect.status, [200]);
    assert_eq!(h.tls, HttpTls::default());
    assert!(s.attachments().is_empty());

    let s = spec(ocr_spec("http://127.0.0.1:8000", "data/test.pdf"));
    let CheckKind::Http(h) = &s.kind else {
        panic!("{s:?}")
    };
    assert_eq!(h.expect.max_response_time, Some(Duration::from_secs(60)));
    let parts = h.request.multipart.as_ref().unwrap();
    assert_eq!(parts[0].content_type.as_deref(), Some("application/pdf"));
    assert_eq!(parts[1].text.as_deref(), Some("en"));
    // Serializing and reading back gives the same spec.
    let again: CheckSpec = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
    assert_eq!(again, s);
}

#[test]
fn unknown_fields_are_rejected_at_every_level() {
    let base = json!({"type": "http", "request": {"url": "http://h/"}});
    for (pointer, key) in [
        ("", "expected"),
        ("/request", "methd"),
        ("/expect", "status_code"),
        ("/tls", "verify"),
    ] {
        let mut v = base.clone();
        if pointer == "/expect" || pointer == "/tls" {
            v[&pointer[1..]] = json!({});
        }
        v.pointer_mut(if pointer.is_empty() { "" } else { pointer })
            .unwrap()
            .as_object_mut()
            .unwrap()
            .insert(key.to_string(), json!(1));
        let err = serde_json::from_value::<CheckSpec>(v.clone()).unwrap_err();
        assert!(err.to_string().contains(key), "{v}: {err}");
    }
    let v = json!({"type": "http", "request": {"url": "http://h/",
        "multipart": [{"field": "f", "text": "x", "mime": "a/b"}]}});
    assert!(serde_json::from_value::<CheckSpec>(v).is_err());
    let v = json!({"type": "http", "request": {"url": "http://h/"},
        "expect": {"json": [{"path": "$.a", "exist": true}]}});
    assert!(serde_json::from_value::<CheckSpec>(v).is_err());
}

#[test]
fn validate_rejects_bad_specs() {
    let cases = [
        (json!({"url": "not a url"}), json!({}), "request.url"),
        (json!({"url": "ftp://h/"}), json!({}), "request.url"),
        (
            json!({"url": "http://h/", "method": "GE T"}),
            json!({}),
            "request.method",
        ),
        (
            json!({"url": "http://h/", "headers": {"bad header": "x"}}),
            json!({}),
            "request.headers",
        ),
        (
            json!({"url": "http://h/", "headers": {"x": "a\nb"}}),
            json!({}),
            "request.headers",
        ),
        (
            json!({"url": "http://h/", "body": "x", "multipart": [{"field": "f", "text": "x"}]}),
            json!({}),
            "request",
        ),
        (
            json!({"url": "http://h/", "multipart": []}),
            json!({}),
            "request.multipart",
        ),
        (
            json!({"url": "http://h/", "multipart": [{"field": "f"}]}),
            json!({}),
            "request.multipart[0]",
        ),
        (
            json!({"url": "http://h/", "multipart": [{"field": "f", "file": "a", "text": "b"}]}),
            json!({}),
            "request.multipart[0]",
        ),
        (
            json!({"url": "http://h/", "multipart": [{"field": "f", "file": "a", "content_type": "pdf"}]}),
            json!({}),
            "request.multipart[0]",
        ),
        (
            json!({"url": "http://h/"}),
            json!({"status": []}),
            "expect.status",
        ),
        (
            json!({"url": "http://h/"}),
            json!({"status": [42]}),
            "expect.status",
        ),
        (
            json!({"url": "http://h/"}),
            json!({"body_regex": "("}),
            "expect.body_regex",
        ),
        (
            json!({"url": "http://h/"}),
            json!({"json": [{"path": "results"}]}),
            "expect.json[0].path",
        ),
        (
            json!({"url": "http://h/"}),
            json!({"json": [{"path": "$[?"}]}),
            "expect.json[0].path",
        ),
        (
            json!({"url": "http://h/"}),
            json!({"json": [{"path": "$.a", "exists": false, "equals": 1}]}),
            "expect.json[0]",
        ),
    ];
    for (request, expect, field) in cases {
        let v = json!({"type": "http", "request": request, "expect": expect});
        let s: CheckSpec = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{v}: {e}"));
        match s.validate() {
            Err(SpecError::Invalid { field: f, .. }) => assert_eq!(f, field, "{v}"),
            Ok(()) => panic!("{v} should be invalid"),
        }
    }
    let v =
        json!({"type": "http", "request": {"url": "https://h/"}, "tls": {"client_cert": "c.pem"}});
    let s: CheckSpec = serde_json::from_value(v).unwrap();
    assert!(s.validate().is_err());
}

#[test]
fn json_numbers_compare_by_value() {
    assert!(json_eq(&json!(1), &json!(1.0)));
    assert!(json_eq(&json!({"a": [1, 2.0]}), &json!({"a": [1.0, 2]})));
    assert!(!json_eq(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
    assert!(!json_eq(&json!("1"), &json!(1)));
}

#[test]
fn secs_formatting() {
    assert_eq!(fmt_secs(Duration::from_millis(3200)), "3.2s");
    assert_eq!(fmt_secs(Duration::from_secs(2)), "2s");
    assert_eq!(fmt_secs(Duration::from_micros(125_400)), "0.125s");
}

// ---- HTTPS ----

/// A one-route HTTPS server answering `200 secure` to any request; with `require_client_cert`
/// it demands a client certificate signed by the test CA.
async fn serve_tls(pki: &Pki, require_client_cert: bool) -> String {
    vigil_testkit::https::serve_url(pki.rustls_server(require_client_cert), "secure").await
}

#[tokio::test]
async fn https_with_ca_file_unknown_ca_and_insecure() {
    let pki = Pki::new("vigil-agent");
    let url = serve_tls(&pki, false).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca.pem).unwrap();

    let o = run(json!({"type": "http", "request": {"url": url},
        "tls": {"ca_file": ca}, "expect": {"body_contains": ["secure"]}}))
    .await;
    assert_eq!(o.status, Status::Ok, "{}", o.message);

    // Not trusted by the system roots.
    let o = run(json!({"type": "http", "request": {"url": url}})).await;
    assert_eq!(o.status, Status::Critical, "{}", o.message);
    assert!(
        o.message.to_lowercase().contains("certificate"),
        "{}",
        o.message
    );

    let o = run(json!({"type": "http", "request": {"url": url},
        "tls": {"insecure_skip_verify": true}}))
    .await;
    assert_eq!(o.status, Status::Ok, "{}", o.message);

    // A missing CA file is the check's own problem: UNKNOWN.
    let o = run(json!({"type": "http", "request": {"url": url},
        "tls": {"ca_file": dir.path().join("missing.pem")}}))
    .await;
    assert_eq!(o.status, Status::Unknown, "{}", o.message);
    assert!(o.message.contains("tls.ca_file"), "{}", o.message);
}

#[tokio::test]
async fn https_client_certificate() {
    let pki = Pki::new("vigil-agent");
    let url = serve_tls(&pki, true).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let cert = dir.path().join("client.pem");
    let key = dir.path().join("client.key");
    std::fs::write(&ca, &pki.ca.pem).unwrap();
    std::fs::write(&cert, &pki.client.pem).unwrap();
    std::fs::write(&key, &pki.client.key_pem).unwrap();

    let o = run(json!({"type": "http", "request": {"url": url}, "tls": {"ca_file": ca}})).await;
    assert_eq!(o.status, Status::Critical, "{}", o.message);

    let o = run(json!({"type": "http", "request": {"url": url},
        "tls": {"ca_file": ca, "client_cert": cert, "client_key": key}}))
    .await;
    assert_eq!(o.status, Status::Ok, "{}", o.message);
}

#[tokio::test]
async fn credentials_in_the_url_never_reach_the_result() {
    // Port 9 (discard) on loopback: nothing listens, the request fails at once.
    let o = run(json!({
        "type": "http",
        "request": {"url": "http://bot:pw-8c1d@127.0.0.1:9/status?token=tk-5e2a"}
    }))
    .await;
    assert_eq!(o.status, Status::Critical, "{}", o.message);
    assert!(o.message.contains("127.0.0.1:9/status?…"), "{}", o.message);
    for secret in ["bot", "pw-8c1d", "tk-5e2a"] {
        assert!(!o.message.contains(secret), "{secret}: {}", o.message);
        assert!(!o.output.contains(secret), "{secret}: {}", o.output);
    }
    assert_eq!(shown_url("not a url"), "not a url");
}
