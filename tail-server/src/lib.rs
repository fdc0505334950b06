//! The server side of Cleave: a gRPC service that finishes what the heads started.
//!
//! # Brief overview
//!
//! [`TailServer::build`] opens a bundle, loads its tail model once (on a dedicated thread:
//! model execution never runs on the async workers, see [`executor`]), and binds a listener.
//! [`TailServer::serve`] then serves `cleave.v1.Split` and `grpc.health.v1.Health` until a
//! shutdown signal, after which in-flight frames finish and health reports `NOT_SERVING`.
//!
//! For every frame the service decodes the feature frame (cleave-codec), checks its bundle id
//! and shape, dequantizes, runs the tail and ranks the classes. A bad frame gets a per-frame
//! error; the stream carries on.

mod executor;
mod split_service;
mod status;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use cleave_engine::{Backend, Bundle, Role};
use cleave_proto::v1::split_server::SplitServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

pub use executor::TailExecutor;
pub use split_service::SplitService;
pub use status::TailError;

/// Everything `cleave-tail` needs to start.
#[derive(Debug, Clone)]
pub struct TailConfig {
    /// The bundle folder.
    pub bundle: PathBuf,
    /// Address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Inference backend for the tail model.
    pub backend: Backend,
    /// Largest coded frame accepted, in bytes.
    pub max_frame_bytes: usize,
    /// Frames waiting for the model before new ones wait for room.
    pub queue_depth: usize,
}

impl TailConfig {
    /// Defaults for `bundle`: loopback on a free port, tract, 4 MiB frames, queue of 64.
    pub fn new(bundle: impl Into<PathBuf>) -> Self {
        Self {
            bundle: bundle.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            backend: Backend::Tract,
            max_frame_bytes: 4 << 20,
            queue_depth: 64,
        }
    }
}

/// A tail whose model is loaded and whose socket is bound, ready to serve.
#[derive(Debug)]
pub struct TailServer {
    listener: TcpListener,
    service: SplitService,
    bundle: Arc<Bundle>,
    max_frame_bytes: usize,
}

impl TailServer {
    /// Opens the bundle, loads and warms up the tail model, and binds the listener.
    ///
    /// # Errors
    ///
    /// [`TailError`] if the bundle does not open, the model does not load, or the address
    /// cannot be bound.
    pub async fn build(config: &TailConfig) -> Result<Self, TailError> {
        let bundle = Arc::new(Bundle::open(&config.bundle)?);
        let model = {
            let bundle = bundle.clone();
            let backend = config.backend;
            tokio::task::spawn_blocking(move || bundle.load(Role::Tail, &backend))
                .await
                .map_err(|e| TailError::Startup(format!("model loader panicked: {e}")))??
        };
        let executor = TailExecutor::start(model, config.queue_depth)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| TailError::Startup(format!("cannot listen on {}: {e}", config.listen)))?;
        let service = SplitService::new(bundle.clone(), executor, config.max_frame_bytes);
        Ok(Self {
            listener,
            service,
            bundle,
            max_frame_bytes: config.max_frame_bytes,
        })
    }

    /// The bound address (with the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The bundle being served.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight calls finish
    /// and returns.
    ///
    /// # Errors
    ///
    /// [`TailError::Transport`] if the server fails.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), TailError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<SplitServer<SplitService>>().await;
        let message_limit = self.max_frame_bytes + 1024;
        let split = SplitServer::new(self.service)
            .max_decoding_message_size(message_limit)
            .max_encoding_message_size(message_limit);
        let reporter = health.clone();
        let shutdown = async move {
            shutdown.await;
            reporter
                .set_not_serving::<SplitServer<SplitService>>()
                .await;
            tracing::info!("shutting down: no new calls, finishing in-flight frames");
        };
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(split)
            .serve_with_incoming_shutdown(TcpListenerStream::new(self.listener), shutdown)
            .await
            .map_err(|e| TailError::Transport(e.to_string()))
    }
}
