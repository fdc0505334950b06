//! One JSON line per frame: what the head tells its user.

use serde::Serialize;

use crate::energy::EnergyReading;

/// One ranked class.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Score {
    /// Class index.
    pub index: u32,
    /// Class name.
    pub label: String,
    /// Probability.
    pub score: f32,
}

/// One box found by a detection bundle, in the model input's pixel coordinates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DetectedBox {
    /// Left, top, right, bottom.
    pub corners: [f32; 4],
    /// Confidence.
    pub score: f32,
    /// Class name.
    pub label: String,
}

/// How a frame ended: `"top5": [...]`, `"boxes": [...]` or
/// `"error": {"kind": ..., "message": ...}` in JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Outcome {
    /// The tail classified the frame.
    Classified {
        /// The best classes, best first.
        top5: Vec<Score>,
    },
    /// The tail ran a detector on the frame.
    Detected {
        /// The boxes, best first.
        boxes: Vec<DetectedBox>,
    },
    /// The frame failed, here or at the tail, or ended without a result (expired,
    /// dropped).
    Failed {
        /// Why.
        error: Failure,
    },
    /// The frame was skipped on purpose (the scene gate).
    Skipped {
        /// Why.
        skipped: Failure,
    },
}

/// Why a frame has no result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failure {
    /// `input`, `codec`, `uplink`, or the tail's kind (`malformed`, `inference`, ...).
    pub kind: String,
    /// What happened.
    pub message: String,
}

/// How a frame ended, in one word; every frame gets exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// A result: classes or boxes.
    Answered,
    /// No result; `error` says why.
    Failed,
    /// Its deadline passed first: waiting for a link, in a queue, or at the tail.
    Expired,
    /// Deliberately not processed (link down with the `drop` policy); `error` says why.
    Dropped,
    /// Nearly identical to the last frame sent (the scene gate); `skipped` says how close.
    Unchanged,
}

/// The report of one frame.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FrameReport {
    /// Sequence number within this run.
    pub frame_id: u64,
    /// Where the frame came from.
    pub source: String,
    /// `answered`, `failed`, `expired`, `dropped` or `unchanged`.
    pub status: Status,
    /// Where the result was computed: `split` (head here, tail on a server), `local` (the
    /// full model on this device) or `offload` (a JPEG to the full model on a server).
    pub mode: &'static str,
    /// With `--mode auto`: why this mode, and what each was predicted to cost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub choice: Option<String>,
    /// Result or failure.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// The tail that answered, for `split`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Times the frame was sent (more than 1: resent after a stream was lost).
    pub sends: u32,
    /// Why the frame took the path it did (e.g. ran locally because the link was down).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// How the frame was coded (`"4-bit calibrated, ans"`, `"jpeg q85"`); absent if it was
    /// never coded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coding: Option<String>,
    /// Bytes of the frame sent: the coded features (`split`) or the JPEG (`offload`).
    pub bytes_sent: usize,
    /// Bytes of the gRPC message carrying the frame (protobuf plus 5-byte prefix).
    pub wire_bytes: usize,
    /// Coded bytes the tail reports it received.
    pub tail_received_bytes: u64,
    /// Image decode and preprocessing.
    pub preprocess_ms: f64,
    /// Compute on this device after preprocessing: the head model and coding (`split`), the
    /// JPEG encoder (`offload`) or the full model (`local`).
    pub head_ms: f64,
    /// From sending the frame to its result, less the tail's own time.
    pub uplink_ms: f64,
    /// The tail's decode, model and ranking time.
    pub tail_ms: f64,
    /// From reading the image to having the result.
    pub total_ms: f64,
    /// The frame's energy on this device, measured or modelled (with `--power-profile`, or a
    /// board sensor).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub energy: Option<EnergyReading>,
}

impl FrameReport {
    /// A report with `outcome` and nothing measured yet.
    pub(crate) fn blank(frame_id: u64, source: String, status: Status, outcome: Outcome) -> Self {
        FrameReport {
            frame_id,
            source,
            status,
            mode: "split",
            choice: None,
            outcome,
            server: None,
            sends: 0,
            note: None,
            coding: None,
            bytes_sent: 0,
            wire_bytes: 0,
            tail_received_bytes: 0,
            preprocess_ms: 0.0,
            head_ms: 0.0,
            uplink_ms: 0.0,
            tail_ms: 0.0,
            total_ms: 0.0,
            energy: None,
        }
    }

    /// A report of a frame that ended with `status` for the reason `kind: message`.
    pub(crate) fn unanswered(
        frame_id: u64,
        source: String,
        status: Status,
        kind: &str,
        message: impl ToString,
    ) -> Self {
        let error = Failure {
            kind: kind.to_string(),
            message: message.to_string(),
        };
        Self::blank(frame_id, source, status, Outcome::Failed { error })
    }

    /// The top class, if the frame was classified.
    pub fn top1(&self) -> Option<&Score> {
        match &self.outcome {
            Outcome::Classified { top5 } => top5.first(),
            Outcome::Detected { .. } | Outcome::Failed { .. } | Outcome::Skipped { .. } => None,
        }
    }
}
