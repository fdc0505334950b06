//! The tail's errors, and their conversion to gRPC statuses in one place.

use cleave_codec::BundleId;
use cleave_engine::EngineError;
use cleave_proto::BUNDLE_ID_METADATA;
use cleave_proto::v1::FrameError as WireFrameError;
use cleave_proto::v1::frame_error::Kind;

use crate::BatchError;

/// What can go wrong in the tail, at start or per frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TailError {
    /// The bundle or the model failed to open or load.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Anything else at start-up (binding the port, starting threads).
    #[error("{0}")]
    Startup(String),
    /// The gRPC server failed.
    #[error("transport: {0}")]
    Transport(String),
    /// A frame's bytes do not decode.
    #[error("malformed frame: {0}")]
    Malformed(#[from] cleave_codec::FrameError),
    /// A frame or a call names another bundle.
    #[error("bundle mismatch: head runs {head}, tail serves {tail}")]
    BundleMismatch {
        /// The id the head sent.
        head: String,
        /// The id this tail serves.
        tail: BundleId,
    },
    /// A frame's tensor does not fit the tail model.
    #[error("frame shape {actual:?} does not fit the tail's bottleneck {expected:?}")]
    ShapeMismatch {
        /// The bundle's bottleneck shape.
        expected: Vec<usize>,
        /// The frame's shape.
        actual: Vec<usize>,
    },
    /// The model failed on a frame.
    #[error("inference: {0}")]
    Inference(String),
    /// A head's bundle is not among those served.
    #[error("bundle {requested} is not served here; this tail serves: {}", served.join(", "))]
    UnknownBundle {
        /// The id (or frame tag) asked for.
        requested: String,
        /// `name version (id)` of each served bundle.
        served: Vec<String>,
    },
    /// A KServe model name is not among those served.
    #[error("model {requested:?} is not served here; models: {}", served.join(", "))]
    UnknownModel {
        /// The name asked for.
        requested: String,
        /// The names served.
        served: Vec<String>,
    },
    /// A request the model cannot take (shape, type, batch too large).
    #[error("{0}")]
    BadRequest(String),
    /// The model's queue is full.
    #[error("{0}")]
    Overloaded(String),
    /// The request's deadline passed before compute.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The server is shutting down.
    #[error("{0}")]
    ShuttingDown(String),
    /// The request asks for something this tail does not serve (an image for a bundle
    /// whose full model it does not run).
    #[error("{0}")]
    Unsupported(String),
}

impl From<BatchError> for TailError {
    fn from(error: BatchError) -> Self {
        let message = error.to_string();
        match error {
            BatchError::QueueFull { .. } => TailError::Overloaded(message),
            BatchError::DeadlineExceeded { .. } => TailError::DeadlineExceeded(message),
            BatchError::BadRequest(_) => TailError::BadRequest(message),
            BatchError::Stopped(_) => TailError::ShuttingDown(message),
            _ => TailError::Inference(message),
        }
    }
}

impl TailError {
    /// The per-frame error sent back on a stream.
    pub(crate) fn to_frame_error(&self) -> WireFrameError {
        let kind = match self {
            TailError::Malformed(_) => Kind::Malformed,
            TailError::BundleMismatch { .. } => Kind::BundleMismatch,
            TailError::ShapeMismatch { .. } | TailError::BadRequest(_) => Kind::ShapeMismatch,
            TailError::UnknownBundle { .. } => Kind::BundleMismatch,
            TailError::Overloaded(_) => Kind::Overloaded,
            TailError::DeadlineExceeded(_) => Kind::DeadlineExceeded,
            TailError::ShuttingDown(_) => Kind::Unavailable,
            TailError::Unsupported(_) => Kind::Unsupported,
            _ => Kind::Inference,
        };
        WireFrameError {
            kind: kind as i32,
            message: self.to_string(),
        }
    }
}

impl From<TailError> for tonic::Status {
    fn from(error: TailError) -> Self {
        let message = error.to_string();
        match error {
            TailError::Malformed(_)
            | TailError::ShapeMismatch { .. }
            | TailError::BadRequest(_) => tonic::Status::invalid_argument(message),
            TailError::UnknownBundle { .. } | TailError::UnknownModel { .. } => {
                tonic::Status::not_found(message)
            }
            TailError::Overloaded(_) => tonic::Status::resource_exhausted(message),
            TailError::DeadlineExceeded(_) => tonic::Status::deadline_exceeded(message),
            TailError::ShuttingDown(_) => tonic::Status::unavailable(message),
            TailError::Unsupported(_) => tonic::Status::unimplemented(message),
            TailError::BundleMismatch { tail, .. } => {
                // The tail's id travels as metadata too, so a head can name it exactly.
                let mut status = tonic::Status::failed_precondition(message);
                if let Ok(value) = tail.to_string().parse() {
                    status.metadata_mut().insert(BUNDLE_ID_METADATA, value);
                }
                status
            }
            TailError::Inference(_) | TailError::Engine(_) => tonic::Status::internal(message),
            TailError::Startup(_) | TailError::Transport(_) => tonic::Status::unavailable(message),
        }
    }
}
