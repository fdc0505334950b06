//! The edge side of Cleave: turn camera frames into a few kilobytes and get answers back.
//!
//! # Brief overview
//!
//! * [`sources`] lists the frames to process (image files, folders).
//! * [`HeadEncoder`] runs preprocessing, the bundle's head model and the codec: image in,
//!   coded feature frame out ([`EncodedFrame`]).
//! * [`Uplink`] connects to a tail, checks that both run the same bundle, and streams frames
//!   over one long-lived gRPC stream, several in flight, results in order.
//! * [`Session`] keeps an uplink alive across a bad link: reconnect with backoff, failover
//!   between tails, resend of what a lost stream took down, deadlines.
//! * [`LocalModel`] runs the bundle's full model on the device, for when no tail answers.
//! * [`mode`] says where a frame is computed (`split`, `local`, `offload`) and, for `auto`,
//!   predicts each mode's cost from the [`LinkEstimate`] and measured compute times.
//! * [`run`] ties them together and emits one [`FrameReport`] per frame: the classes,
//!   the bytes that crossed, and where the time went, or the status and its reason.
//!
//! The head never imports the tail: the two share only `cleave-proto`.

mod backoff;
#[cfg(feature = "v4l2")]
pub mod camera;
pub mod config_file;
mod encoder;
pub mod energy;
mod link_estimate;
mod local;
pub mod mode;
mod prefilter;
mod prepare;
pub mod rate_control;
mod report;
mod run;
pub mod scene_gate;
mod session;
pub mod sources;
pub mod spool;
mod spooler;
pub mod telemetry;
mod uplink;

pub use backoff::Backoff;
pub use encoder::{CodingPolicy, EncodedFrame, HeadEncoder};
pub use link_estimate::{LinkEstimate, LinkEstimator};
pub use local::LocalModel;
pub use mode::Mode;
pub use prefilter::{Prefilter, Verdict as PrefilterVerdict};
pub use report::{DetectedBox, Failure, FrameReport, Outcome, Score, Status};
pub use run::{LinkDownPolicy, ModeSetting, RunOptions, RunSummary, run, write_json_line};
pub use session::{Delivery, Session, SessionConfig};
pub use spooler::{DRAIN_IDS, SpoolConfig, Spooler};
pub use uplink::{ConnectOptions, FrameSender, Payload, ResultReceiver, Uplink, UplinkResult};

/// What can go wrong on the head.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeadError {
    /// The bundle or a model failed to open, load or run.
    #[error(transparent)]
    Engine(#[from] cleave_engine::EngineError),
    /// The head's output could not be quantized or framed.
    #[error("codec: {0}")]
    Codec(String),
    /// The tail could not be reached, or broke the connection.
    #[error("uplink to {server}: {reason}")]
    Uplink {
        /// The tail's address.
        server: String,
        /// What happened.
        reason: String,
    },
    /// Head and tail run different bundles.
    #[error("bundle mismatch: head runs {head}, tail at {server} serves {tail}")]
    BundleMismatch {
        /// The tail's address.
        server: String,
        /// The head's bundle id.
        head: String,
        /// The tail's bundle id.
        tail: String,
    },
    /// An input path could not be read.
    #[error("{path}: {reason}")]
    Input {
        /// The path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The options ask for something the bundle cannot give.
    #[error("{0}")]
    Config(String),
    /// Writing the report failed.
    #[error("writing results: {0}")]
    Output(#[from] std::io::Error),
}
