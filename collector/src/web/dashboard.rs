//! The dashboard: server-rendered pages (maud) with a little plain JavaScript, login with a
//! token into a session cookie, and live updates over server-sent events.

use axum::extract::State;
use axum::routing::get;

use super::AppState;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route("/", get(index))
}

async fn index(State(_state): State<AppState>) -> maud::Markup {
    maud::html! { h1 { "Vigil" } }
}
