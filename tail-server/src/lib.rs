//! The server side of Cleave: the services that finish what the heads started.
//!
//! # Brief overview
//!
//! [`TailServer::build`] loads the model repository — every bundle of the config, each
//! model loaded, warmed up at the batch sizes it will run and given a dynamic [`Batcher`]
//! (model execution runs on the batcher's threads, never on the async workers) — and binds
//! the listeners. [`TailServer::serve`] then serves, on one gRPC port:
//!
//! - `cleave.v1.Split` ([`SplitService`]): heads send coded feature frames; the head's
//!   bundle id picks the tail;
//! - `inference.GRPCInferenceService` ([`KserveService`]): the KServe v2 / Open Inference
//!   Protocol, so Triton's and KServe's clients work unchanged;
//! - `grpc.health.v1.Health`;
//!
//! and on an optional HTTP port `/healthz`, `/readyz` and Prometheus `/metrics`
//! ([`telemetry`] lists the metrics).
//!
//! On shutdown, readiness and health turn `NOT_SERVING` first, the gRPC server stops taking
//! connections and streams, in-flight requests finish, and the batchers drain their queues.
//!
//! | file | room |
//! |---|---|
//! | `config.rs` | the TOML config and flags, validated |
//! | `repository.rs` | bundles → served models, lookup by bundle id or name |
//! | `batcher.rs` | dynamic batching and the model threads |
//! | `split_service.rs`, `kserve_service.rs` | the two inference protocols |
//! | `http.rs`, `telemetry.rs` | probes and metrics |
//! | `deadline.rs`, `status.rs` | deadlines from the wire; errors to gRPC statuses |

mod batcher;
mod config;
mod deadline;
mod http;
pub mod kserve_service;
mod ordered_stream;
mod repository;
mod split_service;
mod status;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cleave_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use cleave_proto::v1::split_server::SplitServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

pub use batcher::{BatchError, BatchOutput, Batcher, BatchingConfig};
pub use config::{
    BatchingFile, ConfigFile, ModelSettings, ModelSettingsFile, TailConfig, bundles_in,
};
pub use http::{Draining, Readiness};
pub use kserve_service::KserveService;
pub use repository::{Answer, ModelRepository, Prediction, ServedModel, TOP_K};
pub use split_service::SplitService;
pub use status::TailError;

/// A tail whose models are loaded and whose sockets are bound, ready to serve.
#[derive(Debug)]
pub struct TailServer {
    listener: TcpListener,
    http: Option<TcpListener>,
    repository: Arc<ModelRepository>,
    config: TailConfig,
    readiness: Readiness,
}

impl TailServer {
    /// Validates the config, loads and warms up every model, and binds the listeners.
    ///
    /// # Errors
    ///
    /// [`TailError`] if the config is invalid, a bundle does not open, a model does not load
    /// or warm up, or an address cannot be bound.
    pub async fn build(config: &TailConfig) -> Result<Self, TailError> {
        config.validate().map_err(TailError::Startup)?;
        // Install the recorder before anything is counted.
        let _ = telemetry::recorder();
        let repository = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || ModelRepository::load(&config))
                .await
                .map_err(|e| TailError::Startup(format!("model loader panicked: {e}")))??
        };
        let listener = bind(config.listen).await?;
        let http = match config.http_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        Ok(Self {
            listener,
            http,
            repository: Arc::new(repository),
            config: config.clone(),
            readiness: Readiness::default(),
        })
    }

    /// The bound gRPC address (with the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        address_of(&self.listener)
    }

    /// The bound HTTP address, if there is one.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(address_of)
    }

    /// The served models.
    pub fn repository(&self) -> &Arc<ModelRepository> {
        &self.repository
    }

    /// Serves until `shutdown` completes; then turns unready, stops taking connections and
    /// streams, lets in-flight requests finish, drains the batchers and returns.
    ///
    /// # Errors
    ///
    /// [`TailError::Transport`] if a server fails.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), TailError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        let names = [
            "",
            <SplitServer<SplitService> as tonic::server::NamedService>::NAME,
            <GrpcInferenceServiceServer<KserveService> as tonic::server::NamedService>::NAME,
        ];
        for name in names {
            health
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        let message_limit = self.config.max_frame_bytes + 64 * 1024;
        let (drain, draining) = Draining::channel();
        let split = SplitServer::new(SplitService::new(
            self.repository.clone(),
            self.config.max_frame_bytes,
            self.config.stream_window,
            draining.clone(),
        ))
        .max_decoding_message_size(message_limit)
        .max_encoding_message_size(message_limit);
        let kserve = GrpcInferenceServiceServer::new(KserveService::new(
            self.repository.clone(),
            self.readiness.clone(),
            self.config.stream_window,
            draining,
        ))
        .max_decoding_message_size(message_limit)
        .max_encoding_message_size(message_limit);

        let readiness = self.readiness.clone();
        let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
        let http_task = self.http.map(|listener| {
            let readiness = readiness.clone();
            tokio::spawn(http::serve(listener, readiness, async {
                let _ = http_stopped.await;
            }))
        });
        readiness.set(true);
        tracing::info!(
            models = self.repository.models().len(),
            "ready: every model loaded and warmed up"
        );

        let draining = async move {
            shutdown.await;
            readiness.set(false);
            let _ = drain.send(true);
            for name in names {
                health
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            tracing::info!("shutting down: no new streams, finishing in-flight frames");
        };
        let served = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(self.config.max_concurrent_streams))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(health_service)
            .add_service(split)
            .add_service(kserve)
            // Nagle's algorithm would hold small answers back for a delayed ACK (40 ms p99
            // on loopback); the builder's tcp_nodelay does not reach an incoming stream.
            // TCP keep-alive finds heads that vanished without closing.
            .serve_with_incoming_shutdown(
                TcpIncoming::from(self.listener)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(Duration::from_secs(60))),
                draining,
            )
            .await
            .map_err(|e| TailError::Transport(e.to_string()));
        self.repository.close();
        let _ = http_stop.send(());
        if let Some(task) = http_task {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server failed"),
                Err(e) => tracing::warn!(error = %e, "HTTP server task failed"),
            }
        }
        served
    }
}

/// A [`TailServer`] serving on a background task, from [`TailServer::spawn`]. Dropping it
/// starts the shutdown without waiting for it; [`ServingTail::shutdown`] waits.
#[derive(Debug)]
pub struct ServingTail {
    addr: SocketAddr,
    http: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), TailError>>>,
}

impl TailServer {
    /// Serves on a background task of the current runtime until the returned handle shuts
    /// it down or is dropped.
    pub fn spawn(self) -> ServingTail {
        let (addr, http) = (self.local_addr(), self.http_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(self.serve(async {
            let _ = stopped.await;
        }));
        ServingTail {
            addr,
            http,
            stop: Some(stop),
            task: Some(task),
        }
    }
}

impl ServingTail {
    /// The gRPC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The HTTP address, if there is one.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    /// Starts the shutdown ([`TailServer::serve`]'s order) and waits up to `grace` for it.
    ///
    /// # Errors
    ///
    /// The server's own error, [`TailError::ShuttingDown`] if in-flight work did not finish
    /// within `grace`, or [`TailError::Transport`] if the server task failed.
    pub async fn shutdown(mut self, grace: Duration) -> Result<(), TailError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(grace, task).await {
            Ok(Ok(served)) => served,
            Ok(Err(join)) => Err(TailError::Transport(format!("server task failed: {join}"))),
            Err(_) => Err(TailError::ShuttingDown(format!(
                "in-flight calls did not finish within {grace:?}"
            ))),
        }
    }
}

impl Drop for ServingTail {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, TailError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| TailError::Startup(format!("cannot listen on {addr}: {e}")))
}

fn address_of(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}
