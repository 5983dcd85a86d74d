//! The operator surface over HTTP (axum): the REST API under `/api` (OpenAPI document at
//! `/api/openapi.json`), the server-rendered dashboard with live updates, login with a token
//! into a session cookie.

pub mod api;
pub mod auth;
pub mod availability;
pub mod dashboard;
pub mod maintenance;
pub mod settings;

use std::sync::Arc;

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::grpc::Hub;
use crate::store::StoreError;

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    pub hub: Arc<Hub>,
    pub tokens: Arc<auth::TokenCache>,
}

/// A JSON error: `{"error": "not_found", "message": "...", "field": "..."}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable: bad_request, unauthorized, forbidden, not_found, conflict, internal.
    pub error: String,
    /// What went wrong, for a person.
    pub message: String,
    /// The offending field of the request, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// An error answered as JSON with its status code.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: code.into(),
                message: message.into(),
                field: None,
            },
        }
    }
    pub fn bad_request(field: Option<&str>, message: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message);
        e.body.field = field.map(str::to_string);
        e
    }
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        if e.is_bad_input() {
            tracing::info!(error = %e, "API request refused: the database cannot take a value it carries");
            return ApiError::bad_request(
                None,
                "the request carries a value that cannot be stored or looked up \
                 (a NUL character, an invalid byte sequence or an out-of-range value)",
            );
        }
        tracing::error!(error = ?e, "API request failed on the database");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the database is not available; try again",
        )
    }
}

/// Refuses, before any handler, a request whose path or query holds a NUL character or bytes
/// that are not UTF-8 once percent-decoded: no id, name or filter can hold them, so the answer is
/// 400 whichever endpoint was asked (rather than an empty list from one and a database error
/// from another).
pub async fn refuse_bad_bytes(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let bad = |raw: &str| {
        percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map_or(true, |s| s.contains('\0'))
    };
    let uri = req.uri();
    if bad(uri.path()) {
        return ApiError::bad_request(
            None,
            "the path holds a NUL character or bytes that are not UTF-8",
        )
        .into_response();
    }
    if let Some(q) = uri.query() {
        for pair in q.split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if bad(name) || bad(value) {
                let field = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
                return ApiError::bad_request(
                    Some(&field),
                    "the query holds a NUL character or bytes that are not UTF-8",
                )
                .into_response();
            }
        }
    }
    next.run(req).await
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"vigil\""),
            );
        }
        r
    }
}

/// The dashboard and the API.
pub fn router(hub: Arc<Hub>) -> axum::Router {
    let state = AppState {
        hub,
        tokens: Arc::new(auth::TokenCache::default()),
    };
    axum::Router::new()
        .merge(api::routes())
        .merge(dashboard::routes())
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    h.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("same-origin"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(header::HeaderValue::from_static("no-store"));
    r
}
