//! The scaler's HTTP side: the web page at /, /healthz, /metrics, /api/v1/services[/NAME].

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use prometheus_client::registry::Registry;

use crate::{metrics, page, state::Shared, view::snapshot};

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    registry: Arc<Registry>,
}

pub fn router(shared: Arc<Shared>) -> Router {
    let registry = Arc::new(metrics::registry(Arc::clone(&shared)));
    Router::new()
        .route("/", get(page::index))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(prometheus))
        .route("/api/v1/services", get(services))
        .route("/api/v1/services/{name}", get(service))
        .route("/api/v1/services/{name}/decisions", get(decisions))
        .route("/api/v1/services/{name}/replicas", get(replicas))
        .with_state(AppState { shared, registry })
}

async fn prometheus(State(app): State<AppState>) -> Response {
    match metrics::encode(&app.registry) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed\n").into_response(),
    }
}

async fn services(State(app): State<AppState>) -> Response {
    Json(snapshot(&app.shared)).into_response()
}

async fn service(State(app): State<AppState>, Path(name): Path<String>) -> Response {
    match snapshot(&app.shared)
        .services
        .into_iter()
        .find(|s| s.name == name)
    {
        Some(v) => Json(v).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": format!("no service named {name:?}") })),
        )
            .into_response(),
    }
}

/// The local actuator's replicas of a service, and the backends in each node's kernel map.
async fn replicas(State(app): State<AppState>, Path(name): Path<String>) -> Response {
    match app.shared.local.view(&name) {
        Some(v) => Json(v).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": format!("no local service named {name:?}") })),
        )
            .into_response(),
    }
}

/// The last decisions of a service with a policy, newest first.
async fn decisions(State(app): State<AppState>, Path(name): Path<String>) -> Response {
    if !app.shared.catalog.specs().iter().any(|s| s.name == name) {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": format!("no service named {name:?}") })),
        )
            .into_response();
    }
    let decisions = app
        .shared
        .control
        .get(&name)
        .map(|c| c.decisions)
        .unwrap_or_default();
    Json(serde_json::json!({ "service": name, "decisions": decisions })).into_response()
}
