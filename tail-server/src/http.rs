//! The HTTP side port: `/healthz`, `/readyz` and Prometheus `/metrics`.
//!
//! Load balancers and Kubernetes probe over HTTP; Prometheus scrapes over HTTP. Liveness
//! says the process answers; readiness says every model is loaded and warmed up and the
//! server is not draining, so a balancer stops sending new work the moment SIGTERM arrives.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::telemetry;

/// Whether the server takes new work: set once models are ready, cleared on shutdown.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the server ready or not.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    /// Whether it is ready.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Tells long-lived streams that the server has begun to drain.
#[derive(Debug, Clone)]
pub struct Draining(tokio::sync::watch::Receiver<bool>);

impl Draining {
    /// A pair: the sender starts the drain (send `true`), the receiver is cloned into streams.
    pub fn channel() -> (tokio::sync::watch::Sender<bool>, Self) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (tx, Self(rx))
    }

    /// Completes once the drain has begun (at once if it already has, or if the server is
    /// gone).
    pub async fn started(&mut self) {
        let _ = self.0.wait_for(|draining| *draining).await;
    }
}

fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(readiness)
}

async fn ready(State(readiness): State<Readiness>) -> impl IntoResponse {
    if readiness.get() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        telemetry::render(),
    )
}

/// Serves the probes and metrics on `listener` until `shutdown` completes.
///
/// # Errors
///
/// The I/O error that stopped the server.
pub(crate) async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(readiness))
        .with_graceful_shutdown(shutdown)
        .await
}
