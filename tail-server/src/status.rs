//! The tail's errors, and their conversion to gRPC statuses in one place.

use cleave_codec::BundleId;
use cleave_engine::EngineError;
use cleave_proto::BUNDLE_ID_METADATA;
use cleave_proto::v1::FrameError as WireFrameError;
use cleave_proto::v1::frame_error::Kind;

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
    /// The model failed on a frame, or the executor is gone.
    #[error("inference: {0}")]
    Inference(String),
}

impl TailError {
    /// The per-frame error sent back on a stream.
    pub(crate) fn to_frame_error(&self) -> WireFrameError {
        let kind = match self {
            TailError::Malformed(_) => Kind::Malformed,
            TailError::BundleMismatch { .. } => Kind::BundleMismatch,
            TailError::ShapeMismatch { .. } => Kind::ShapeMismatch,
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
            TailError::Malformed(_) | TailError::ShapeMismatch { .. } => {
                tonic::Status::invalid_argument(message)
            }
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
