//! A small HTTP service that behaves like the things Vigil monitors: a health endpoint, a
//! Mineru-like PDF-OCR `POST /file_parse`, arbitrary status codes, slow answers and an HTML page.
//!
//! ```text
//! GET  /health         200 {"status":"ok"}
//! POST /file_parse     multipart field `files` (one or more PDFs) ->
//!                      200 {"backend":"pipeline","version":"test","results":{"<stem>":{"md_content":"# …"}}}
//!                      missing field / not a PDF / not multipart -> 422 {"detail":…}
//! GET  /status/{code}  that status code
//! GET  /slow/{ms}      waits ms milliseconds (at most 10 minutes), then 200
//! GET  /               a small HTML page titled "Vigil test page"
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::Json;
use axum::Router;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Largest upload `/file_parse` accepts.
pub const MAX_UPLOAD_BYTES: usize = 64 * 1024 * 1024;
const MAX_SLOW: Duration = Duration::from_secs(600);

/// A running test service. Dropping it also stops it (without waiting); prefer [`TestSvc::stop`].
#[derive(Debug)]
pub struct TestSvc {
    /// The address it listens on (the real port when spawned on port 0).
    pub addr: SocketAddr,
    requests: Arc<AtomicU64>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl TestSvc {
    /// `http://<addr><path>`, e.g. `svc.url("/health")`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// How many requests it has answered so far.
    pub fn request_count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Stops listening at once (the port is free for a new [`spawn`] on the same address), lets
    /// in-flight requests finish for up to 5 s, then returns.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

/// Starts the service on `addr` (use port 0 for a free port) with `SO_REUSEADDR`, so it can be
/// stopped and started again on the same port.
pub async fn spawn(addr: SocketAddr) -> anyhow::Result<TestSvc> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("binding test service to {addr}"))?;
    let listener = socket.listen(1024)?;
    let addr = listener.local_addr()?;
    let requests = Arc::new(AtomicU64::new(0));
    let app = router_with_counter(requests.clone());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                // Resolves on stop() and when the TestSvc is dropped.
                let _ = rx.await;
            })
            .await
    });
    tracing::debug!(%addr, "test service listening");
    Ok(TestSvc {
        addr,
        requests,
        shutdown: Some(tx),
        task,
    })
}

/// The service's routes, for driving it without a socket (e.g. `tower::ServiceExt::oneshot`).
pub fn router() -> Router {
    router_with_counter(Arc::new(AtomicU64::new(0)))
}

fn router_with_counter(requests: Arc<AtomicU64>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/health", get(health))
        .route("/file_parse", post(file_parse))
        .route("/status/{code}", get(status))
        .route("/slow/{ms}", get(slow))
        .layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES))
        .layer(middleware::from_fn_with_state(requests, log_request))
}

async fn log_request(State(requests): State<Arc<AtomicU64>>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let started = Instant::now();
    let response = next.run(req).await;
    requests.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        %method,
        %uri,
        status = response.status().as_u16(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "request"
    );
    response
}

async fn index() -> Html<&'static str> {
    Html(
        "<!doctype html>\n<html><head><title>Vigil test page</title></head>\n\
         <body><h1>Vigil test page</h1><p>Served by vigil-testsvc.</p></body></html>\n",
    )
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn status(Path(code): Path<u16>) -> Response {
    match StatusCode::from_u16(code) {
        Ok(code) => (code, format!("status {}\n", code.as_u16())).into_response(),
        Err(_) => (StatusCode::BAD_REQUEST, "not a status code\n").into_response(),
    }
}

async fn slow(Path(ms): Path<u64>) -> Json<Value> {
    tokio::time::sleep(Duration::from_millis(ms).min(MAX_SLOW)).await;
    Json(json!({"status": "ok", "slept_ms": ms}))
}

/// FastAPI-style validation error, as Mineru answers.
fn unprocessable(msg: impl Into<String>) -> Response {
    let msg = msg.into();
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({"detail": [{"type": "value_error", "loc": ["body", "files"], "msg": msg}]})),
    )
        .into_response()
}

async fn file_parse(multipart: Result<Multipart, MultipartRejection>) -> Response {
    let mut multipart = match multipart {
        Ok(m) => m,
        Err(e) => return unprocessable(format!("expected multipart/form-data: {}", e.body_text())),
    };
    let mut results = serde_json::Map::new();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return unprocessable(format!("bad multipart body: {}", e.body_text())),
        };
        if field.name() != Some("files") {
            continue; // other form fields (backend, lang_list, return_md, …) are accepted and ignored
        }
        let file_name = field.file_name().unwrap_or("document.pdf").to_owned();
        let bytes = match field.bytes().await {
            Ok(b) => b,
            Err(e) => return unprocessable(format!("reading {file_name}: {}", e.body_text())),
        };
        if !bytes.starts_with(b"%PDF-") {
            return unprocessable(format!("{file_name} is not a PDF"));
        }
        let stem = std::path::Path::new(&file_name)
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| !s.is_empty())
            .unwrap_or("document")
            .to_owned();
        results.insert(stem.clone(), json!({"md_content": markdown(&stem, &bytes)}));
    }
    if results.is_empty() {
        return unprocessable("Field required");
    }
    Json(json!({"backend": "pipeline", "version": "test", "results": results})).into_response()
}

/// Markdown for a PDF: its text lines, the first one as a heading.
fn markdown(stem: &str, pdf: &[u8]) -> String {
    let lines = pdf_text(pdf);
    match lines.split_first() {
        Some((title, rest)) => {
            let mut md = format!("# {title}\n");
            for line in rest {
                md.push('\n');
                md.push_str(line);
                md.push('\n');
            }
            md
        }
        None => format!("# {stem}\n\n(no text layer)\n"),
    }
}

/// The literal strings shown with `Tj` in uncompressed content streams — enough for test PDFs.
fn pdf_text(pdf: &[u8]) -> Vec<String> {
    let mut lines = Vec::new();
    let mut i = 0;
    while i < pdf.len() {
        if pdf[i] != b'(' {
            i += 1;
            continue;
        }
        let mut depth = 0usize;
        let mut text = Vec::new();
        let mut j = i;
        while j < pdf.len() {
            match pdf[j] {
                b'\\' if j + 1 < pdf.len() => {
                    j += 1;
                    text.push(match pdf[j] {
                        b'n' => b'\n',
                        b't' => b'\t',
                        other => other,
                    });
                }
                b'(' => {
                    if depth > 0 {
                        text.push(b'(');
                    }
                    depth += 1;
                }
                b')' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                    text.push(b')');
                }
                c => text.push(c),
            }
            j += 1;
        }
        let rest = pdf.get(j + 1..).unwrap_or_default();
        let next = rest
            .iter()
            .position(|c| !c.is_ascii_whitespace())
            .unwrap_or(rest.len());
        if rest[next..].starts_with(b"Tj") {
            let line = String::from_utf8_lossy(&text).trim().to_owned();
            if !line.is_empty() {
                lines.push(line);
            }
        }
        i = j + 1;
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_shown_text() {
        let pdf = b"%PDF-1.4\nBT (Hello \\(world\\)) Tj ET (not shown) BT (Second) Tj ET";
        assert_eq!(pdf_text(pdf), vec!["Hello (world)", "Second"]);
        assert_eq!(markdown("x", pdf), "# Hello (world)\n\nSecond\n");
        assert_eq!(markdown("x", b"%PDF-1.4"), "# x\n\n(no text layer)\n");
    }

    #[test]
    fn extracts_text_of_the_example_pdf() {
        let pdf = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/data/test.pdf"
        ))
        .unwrap();
        assert_eq!(markdown("test", &pdf), "# Vigil test document\n");
    }

    async fn raw_get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn restarts_on_the_same_port() {
        let svc = spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = svc.addr;
        assert!(
            raw_get(addr, "/health")
                .await
                .contains("{\"status\":\"ok\"}")
        );
        assert!(
            raw_get(addr, "/status/503")
                .await
                .starts_with("HTTP/1.1 503")
        );
        assert!(raw_get(addr, "/").await.contains("Vigil test page"));
        assert_eq!(svc.request_count(), 3);
        svc.stop().await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        let svc = spawn(addr).await.unwrap();
        assert!(raw_get(addr, "/slow/10").await.starts_with("HTTP/1.1 200"));
        svc.stop().await;
    }
}
