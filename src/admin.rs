//! The admin port every mode serves (plain HTTP): `/live`, `/ready`, `/metrics`, plus routes a
//! mode adds (the agent's `/status`).

use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub type ReadyCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    ready: ReadyCheck,
    registry: Arc<Registry>,
    extra: Router,
    shutdown: CancellationToken,
) {
    let app = router(ready, registry).merge(extra);
    let _ = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
}

pub fn router(ready: ReadyCheck, registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok\n" }))
        .route(
            "/ready",
            get(move || {
                let ready = ready.clone();
                async move {
                    if ready() { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut body = String::new();
                    match prometheus_client::encoding::text::encode(&mut body, &registry) {
                        Ok(()) => (
                            StatusCode::OK,
                            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                            body,
                        )
                            .into_response(),
                        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
                    }
                }
            }),
        )
}
