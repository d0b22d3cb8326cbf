//! The rest of mihomo's controller routes, each answered honestly for what tpacct is: caches
//! tpacct does not keep flush as no-ops (204), features it does not have say so in JSON (501),
//! and `/restart` restarts the daemon in place as mihomo does.

use std::sync::Arc;

use axum::{Json, extract::State, http::StatusCode};
use serde_json::{Value, json};

use super::{ApiError, ApiState};

fn not_implemented(message: &str) -> ApiError {
    ApiError(StatusCode::NOT_IMPLEMENTED, message.to_owned())
}

/// `POST /cache/fakeip/flush`: tpacct keeps no fake-IP pool; nothing to flush.
pub(super) async fn flush() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// `POST /cache/dns/flush`: forgets the names learned from relayed DNS answers.
pub(super) async fn flush_dns(State(state): State<Arc<ApiState>>) -> StatusCode {
    state.pipeline.dns.clear();
    StatusCode::NO_CONTENT
}

/// `GET /dns/query`: tpacct runs no DNS resolver of its own.
pub(super) async fn dns_query() -> ApiError {
    not_implemented("tpacct runs no DNS resolver: it relays the DNS traffic of its clients")
}

/// `POST /upgrade`, `POST /upgrade/ui`: tpacct is upgraded by its package manager.
pub(super) async fn upgrade() -> ApiError {
    not_implemented(
        "tpacct is upgraded by installing a new build (cargo xtask install), not through the API",
    )
}

/// `POST /upgrade/geo`, `POST /configs/geo`: downloads the geodata in use now and rebuilds the
/// routing when a file changed.
pub(super) async fn update_geo(State(state): State<Arc<ApiState>>) -> StatusCode {
    let config = state.reloader.current();
    let router = &state.pipeline.router;
    if !crate::route::refresh::geo_now(router, &config, &state.dir).await {
        tracing::info!("geodata: nothing in use changed");
    }
    StatusCode::NO_CONTENT
}

/// `POST /restart`: answers `{"status":"ok"}`, then the daemon stops cleanly and starts again
/// from its own executable with the same arguments.
pub(super) async fn restart(State(state): State<Arc<ApiState>>) -> Json<Value> {
    tracing::info!("restart requested through the API");
    state.restart.cancel();
    Json(json!({ "status": "ok" }))
}
