//! Who is calling: bearer API tokens (`vgl_<id>_<secret>`, only an Argon2id hash of the secret is
//! stored) and dashboard sessions (an HttpOnly, SameSite=Strict cookie opened by logging in with
//! a token; state-changing requests on a session must carry its CSRF token). Roles: viewer <
//! operator < admin.

use std::collections::HashMap;
use std::sync::Mutex;

use argon2::{PasswordHasher, PasswordVerifier};
use axum::extract::FromRequestParts;
use axum::http::{HeaderMap, Method, header, request::Parts};
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{ApiError, AppState};
use crate::store::{Store, StoreError};

/// The session cookie's name.
pub const COOKIE: &str = "vigil_session";
/// The header a session's state-changing request carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: i64,
    /// The token's name (recorded on commands and settings as who asked).
    pub name: String,
    pub role: Role,
    /// The session's CSRF token when the caller came with the session cookie.
    pub csrf: Option<String>,
}

impl Caller {
    /// 403 unless the caller has at least `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this needs the {} role; token {:?} is {}",
                role.as_str(),
                self.name,
                self.role.as_str()
            )))
        }
    }

    /// Who asked, for audit records.
    pub fn who(&self) -> String {
        format!("api:{}", self.name)
    }
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Constant-time equality of two strings.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Errors of token management.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a token named {0:?} exists already (revoked tokens keep their name)")]
    Exists(String),
    #[error("cannot hash the token: {0}")]
    Hash(String),
}

/// Creates a token; returns it (shown once, never stored) and its id.
pub async fn create_token(
    store: &Store,
    name: &str,
    role: Role,
) -> Result<(String, i64), TokenError> {
    let secret = random_hex(32);
    let hash = argon2::Argon2::default()
        .hash_password(secret.as_bytes())
        .map_err(|e| TokenError::Hash(e.to_string()))?
        .to_string();
    let id = store
        .create_token(name, role.as_str(), &hash)
        .await?
        .ok_or_else(|| TokenError::Exists(name.to_string()))?;
    Ok((format!("vgl_{id}_{secret}"), id))
}

/// Verified tokens: id -> (SHA-256 of the secret, the stored hash it was checked against), so
/// that Argon2 runs once per token and process, not once per request.
#[derive(Default)]
pub struct TokenCache {
    verified: Mutex<HashMap<i64, (String, String)>>,
}

impl TokenCache {
    /// The caller a bearer token stands for; `None` if it is unknown, wrong or revoked.
    pub async fn check(&self, store: &Store, token: &str) -> Result<Option<Caller>, StoreError> {
        let Some(rest) = token.strip_prefix("vgl_") else {
            return Ok(None);
        };
        let Some((id, secret)) = rest.split_once('_') else {
            return Ok(None);
        };
        let Ok(id) = id.parse::<i64>() else {
            return Ok(None);
        };
        let Some(row) = store.token(id).await? else {
            return Ok(None);
        };
        let Some(role) = Role::parse(&row.role) else {
            return Ok(None);
        };
        if row.revoked_at.is_some() {
            return Ok(None);
        }
        let digest = sha256_hex(secret);
        let cached = self
            .verified
            .lock()
            .expect("token cache")
            .get(&id)
            .is_some_and(|(d, h)| same(d, &digest) && h == &row.secret_hash);
        if !cached {
            let (hash, secret) = (row.secret_hash.clone(), secret.to_string());
            let ok = tokio::task::spawn_blocking(move || {
                argon2::Argon2::default()
                    .verify_password(secret.as_bytes(), hash.as_str())
                    .is_ok()
            })
            .await
            .unwrap_or(false);
            if !ok {
                return Ok(None);
            }
            self.verified
                .lock()
                .expect("token cache")
                .insert(id, (digest, row.secret_hash.clone()));
        }
        if let Err(e) = store.touch_token(id).await {
            tracing::warn!(error = %e, token = %row.name, "cannot record token use");
        }
        Ok(Some(Caller {
            token_id: id,
            name: row.name,
            role,
            csrf: None,
        }))
    }
}

/// A new session for `caller`: the cookie value (to set) and its CSRF token.
pub async fn open_session(
    store: &Store,
    caller: &Caller,
    ttl: std::time::Duration,
) -> Result<(String, String), StoreError> {
    let id = random_hex(32);
    let csrf = random_hex(16);
    let expires = chrono::Utc::now() + chrono::Duration::from_std(ttl).unwrap_or_default();
    store
        .create_session(&sha256_hex(&id), caller.token_id, &csrf, expires)
        .await?;
    Ok((id, csrf))
}

/// The `Set-Cookie` value for a session (or, with `None`, one that clears it).
pub fn session_cookie(id: Option<&str>, ttl: std::time::Duration, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match id {
        Some(id) => format!(
            "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            ttl.as_secs()
        ),
        None => format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

/// The session id in the request's cookies.
pub fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
}

/// The caller of a request, if any credentials were presented and are valid. A session's
/// state-changing request without the right CSRF token is refused.
pub async fn identify(
    method: &Method,
    headers: &HeaderMap,
    state: &AppState,
) -> Result<Option<Caller>, ApiError> {
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        let token = auth
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must be \"Bearer TOKEN\"")
            })?;
        return match state.tokens.check(&state.hub.store, token).await? {
            Some(c) => Ok(Some(c)),
            None => Err(ApiError::unauthorized(
                "the token is unknown, wrong or revoked",
            )),
        };
    }
    let Some(id) = session_id(headers) else {
        return Ok(None);
    };
    let Some(s) = state.hub.store.session(&sha256_hex(&id)).await? else {
        return Ok(None);
    };
    let Some(role) = Role::parse(&s.role) else {
        return Ok(None);
    };
    let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe {
        let sent = headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !same(sent, &s.csrf) {
            return Err(ApiError::forbidden(
                "missing or wrong CSRF token (send the page's token in X-CSRF-Token)",
            ));
        }
    }
    Ok(Some(Caller {
        token_id: s.token_id,
        name: s.token_name,
        role,
        csrf: Some(s.csrf),
    }))
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        identify(&parts.method, &parts.headers, state)
            .await?
            .ok_or_else(|| {
                ApiError::unauthorized("authentication required: send Authorization: Bearer TOKEN")
            })
    }
}

/// Checks that a login form comes from the dashboard itself: the `Origin` header (or, without
/// one, the `Referer`) must name the host and port the request was sent to (`Host`). A request
/// with neither (curl, a script) is accepted: the token it posts is proof enough, and a browser
/// always sends `Origin` on a cross-origin POST. `Err` says why the request is refused.
pub fn check_same_origin(headers: &HeaderMap) -> Result<(), String> {
    let (name, value) = match (headers.get(header::ORIGIN), headers.get(header::REFERER)) {
        (Some(o), _) => ("Origin", o),
        (None, Some(r)) => ("Referer", r),
        (None, None) => return Ok(()),
    };
    let value = value.to_str().unwrap_or("");
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return Err(
            "login refused: the request has no Host header to compare its origin with".into(),
        );
    };
    let Some((scheme, from_host, from_port)) = origin_of(value) else {
        return Err(format!(
            "cross-origin login refused: {name} {value:?} is not this dashboard's origin"
        ));
    };
    let default_port = if scheme == "https" { 443 } else { 80 };
    let (to_host, to_port) = match host.rsplit_once(':') {
        Some((h, p)) => match p.parse::<u16>() {
            Ok(p) => (h, p),
            Err(_) => (host, default_port),
        },
        _ => (host, default_port),
    };
    if from_host.eq_ignore_ascii_case(to_host) && from_port.unwrap_or(default_port) == to_port {
        Ok(())
    } else {
        Err(format!(
            "cross-origin login refused: the form was posted from {value:?}, not from this \
             dashboard ({host})"
        ))
    }
}

/// Scheme, host and explicit port of an origin or URL (`https://host:port/...`).
fn origin_of(s: &str) -> Option<(String, String, Option<u16>)> {
    let uri: axum::http::Uri = s.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let auth = uri.authority()?;
    Some((scheme, auth.host().to_string(), auth.port_u16()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        for r in [Role::Viewer, Role::Operator, Role::Admin] {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn cookie_is_httponly_and_strict() {
        let c = session_cookie(Some("abc"), std::time::Duration::from_secs(60), true);
        assert!(c.starts_with("vigil_session=abc;"), "{c}");
        for part in [
            "HttpOnly",
            "SameSite=Strict",
            "Max-Age=60",
            "Secure",
            "Path=/",
        ] {
            assert!(c.contains(part), "{c} lacks {part}");
        }
        assert!(session_cookie(None, Default::default(), false).contains("Max-Age=0"));
    }

    #[test]
    fn constant_time_compare() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
    }

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn login_origin_must_be_the_dashboard() {
        use header::{HOST, ORIGIN, REFERER};
        let ok = |p: &[(header::HeaderName, &str)]| check_same_origin(&headers(p));
        assert!(ok(&[(HOST, "vigil.example:8080")]).is_ok());
        assert!(
            ok(&[
                (HOST, "vigil.example:8080"),
                (ORIGIN, "http://vigil.example:8080")
            ])
            .is_ok()
        );
        assert!(ok(&[(HOST, "vigil.example"), (ORIGIN, "https://VIGIL.example")]).is_ok());
        assert!(
            ok(&[
                (HOST, "vigil.example:443"),
                (ORIGIN, "https://vigil.example")
            ])
            .is_ok()
        );
        assert!(ok(&[(HOST, "[::1]:8080"), (ORIGIN, "http://[::1]:8080")]).is_ok());
        assert!(
            ok(&[
                (HOST, "vigil.example"),
                (REFERER, "https://vigil.example/login?x=1")
            ])
            .is_ok()
        );
        let err = ok(&[(HOST, "vigil.example"), (ORIGIN, "https://evil.example")]).unwrap_err();
        assert!(
            err.contains("cross-origin") && err.contains("evil.example"),
            "{err}"
        );
        assert!(
            ok(&[
                (HOST, "vigil.example:8080"),
                (ORIGIN, "http://vigil.example:9090")
            ])
            .is_err()
        );
        assert!(ok(&[(HOST, "vigil.example"), (ORIGIN, "null")]).is_err());
        assert!(ok(&[(HOST, "vigil.example"), (REFERER, "https://evil.example/x")]).is_err());
        // Origin wins over a same-origin Referer.
        assert!(
            ok(&[
                (HOST, "vigil.example"),
                (ORIGIN, "https://evil.example"),
                (REFERER, "https://vigil.example/login")
            ])
            .is_err()
        );
    }
}
