//! The Clash external-controller API (axum): what dashboards such as metacubexd, zashboard
//! and yacd speak, served from the registry and the rate sampler. Every error is JSON
//! `{"message": ...}` with a 4xx/5xx status.

mod auth;
mod configs;
mod connections;
mod control;
mod delay;
mod events;
mod providers;
mod proxies;
mod queries;
mod server;
mod stats;
mod streams;
pub mod ui;

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    http::{HeaderValue, Method, StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::{delete, get, post, put},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::{
    config::Config, flow::pipeline::Pipeline, registry::Registry, route::Routing, speed::Rates,
};

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("external-controller: cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// What every handler reads.
#[derive(Debug)]
pub struct ApiState {
    pub registry: Arc<Registry>,
    pub rates: Rates,
    pub config: Config,
    /// The router (mode, routing in force) and the DNS map, shared with the flows.
    pub pipeline: Arc<Pipeline>,
    /// The state directory (reloads build providers there).
    pub dir: std::path::PathBuf,
    /// Open WebSockets (each holds a permit; they outlive their HTTP connection's slot).
    pub websockets: Arc<tokio::sync::Semaphore>,
    /// Fired by `POST /restart`.
    pub restart: CancellationToken,
    /// Swaps configs (`PUT /configs`).
    pub reloader: Arc<crate::reload::Reloader>,
    /// Runs history queries off the runtime, at low priority.
    pub queries: queries::Queries,
}

impl ApiState {
    pub fn new(
        registry: Arc<Registry>,
        rates: Rates,
        config: &Config,
        pipeline: Arc<Pipeline>,
        dir: std::path::PathBuf,
    ) -> Arc<ApiState> {
        let reloader = Arc::new(crate::reload::Reloader::new(
            pipeline.clone(),
            &dir,
            config.source.clone(),
            config.clone(),
        ));
        Arc::new(ApiState {
            registry,
            rates,
            config: config.clone(),
            pipeline,
            dir,
            websockets: Arc::new(tokio::sync::Semaphore::new(MAX_WEBSOCKETS)),
            restart: CancellationToken::new(),
            reloader,
            queries: queries::Queries::default(),
        })
    }
}

impl ApiState {
    /// The routing in force now.
    pub fn routing(&self) -> Arc<Routing> {
        self.pipeline.router.routing()
    }
}

/// Concurrent WebSockets across all streaming endpoints.
pub const MAX_WEBSOCKETS: usize = 128;
/// Request bodies larger than this are answered 413 before they are read.
pub const MAX_BODY: usize = 1 << 20;

pub use server::{HEADER_TIMEOUT, MAX_CONNECTIONS};

/// A JSON error response.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, message.into())
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError(StatusCode::NOT_FOUND, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "message": self.1 }))).into_response()
    }
}

/// The whole API.
pub fn router(state: Arc<ApiState>) -> Router {
    let api = Router::new()
        .route("/", get(configs::hello))
        .route("/version", get(configs::version))
        .route(
            "/connections",
            get(connections::list).delete(connections::close_all),
        )
        .route("/connections/closed", get(connections::closed))
        .route("/connections/events", get(events::events))
        .route("/connections/{id}", delete(connections::close_one))
        .route("/traffic", get(streams::traffic))
        .route("/memory", get(streams::memory))
        .route("/logs", get(streams::logs))
        .route(
            "/configs",
            get(configs::configs)
                .patch(configs::patch_configs)
                .put(configs::reload),
        )
        .route("/proxies", get(proxies::proxies))
        .route(
            "/proxies/{name}",
            get(proxies::proxy)
                .put(proxies::select)
                .delete(proxies::unfix),
        )
        .route("/group", get(proxies::groups))
        .route("/proxies/{name}/delay", get(delay::proxy))
        .route("/group/{name}", get(proxies::group))
        .route("/group/{name}/delay", get(delay::group))
        .route("/rules", get(proxies::rules))
        .route("/providers/proxies", get(providers::list))
        .route(
            "/providers/proxies/{provider}",
            get(providers::one).put(providers::update),
        )
        .route(
            "/providers/proxies/{provider}/healthcheck",
            get(providers::healthcheck),
        )
        .route(
            "/providers/proxies/{provider}/{name}",
            get(providers::proxy),
        )
        .route(
            "/providers/proxies/{provider}/{name}/healthcheck",
            get(providers::proxy_healthcheck),
        )
        .route("/providers/rules", get(providers::rules))
        .route("/providers/rules/{name}", put(providers::update_rules))
        .route("/cache/fakeip/flush", post(control::flush))
        .route("/cache/dns/flush", post(control::flush_dns))
        .route("/dns/query", get(control::dns_query))
        .route("/upgrade", post(control::upgrade))
        .route("/upgrade/ui", post(control::upgrade))
        .route("/upgrade/geo", post(control::update_geo))
        .route("/configs/geo", post(control::update_geo))
        .route("/restart", post(control::restart))
        .route("/metrics", get(metrics))
        .route("/api/v1/stats", get(stats::stats))
        .route("/api/v1/devices", get(stats::devices))
        .route("/api/v1/connections", get(stats::connections))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require))
        // Liveness without credentials, as the seed system's agents probe it.
        .route("/api/v1/health", get(stats::health))
        // The usage page and the dashboard's files; their data calls carry the secret.
        .merge(ui::routes())
        .with_state(state.clone());
    api.layer(middleware::from_fn(limit_body))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(cors(&state.config))
}

/// A body announced larger than [`MAX_BODY`] is refused before a byte of it is read.
async fn limit_body(
    request: axum::extract::Request,
    next: middleware::Next,
) -> Result<Response, ApiError> {
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match announced {
        Some(n) if n > MAX_BODY as u64 => Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body of {n} bytes is over the limit of {MAX_BODY}"),
        )),
        _ => Ok(next.run(request).await),
    }
}

fn cors(config: &Config) -> CorsLayer {
    let cors = &config.external_controller_cors;
    let origins = if cors.allow_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            cors.allow_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .allow_private_network(cors.allow_private_network)
}

/// Binds `external-controller` (if set) and serves the API on `tracker` until `cancel`.
/// Returns the address bound.
pub fn start(
    config: &Config,
    state: Arc<ApiState>,
    cancel: &CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> Result<Option<SocketAddr>, Error> {
    if let Some(addr) = config.metrics_address {
        let bind_error = |source| Error::Bind {
            addr: addr.to_string(),
            source,
        };
        let std_listener = server::listen(addr).map_err(bind_error)?;
        let listener = TcpListener::from_std(std_listener).map_err(bind_error)?;
        tracing::info!("metrics-address: Prometheus metrics on http://{addr}/metrics");
        let only_metrics = Router::new()
            .route("/metrics", get(metrics))
            .with_state(state.clone());
        tracker.spawn(server::serve(
            listener,
            only_metrics,
            cancel.clone(),
            tracker.clone(),
        ));
    }
    if config.external_controller.is_empty() {
        return Ok(None);
    }
    let addr = config.external_controller.clone();
    let bind_error = |source| Error::Bind {
        addr: addr.clone(),
        source,
    };
    let std_listener = server::listen(addr.as_str()).map_err(bind_error)?;
    let listener = TcpListener::from_std(std_listener).map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    tracing::info!("external-controller: Clash API on http://{local}");
    tracker.spawn(server::serve(
        listener,
        router(state),
        cancel.clone(),
        tracker.clone(),
    ));
    Ok(Some(local))
}

/// `GET /metrics`: the Prometheus exposition (text format 0.0.4).
async fn metrics(
    axum::extract::State(state): axum::extract::State<Arc<ApiState>>,
) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&state),
    )
}
