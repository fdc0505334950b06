//! The head's main job: encode each input, stream it to the tail, report each result.
//!
//! Encoding runs on a blocking thread and overlaps with the uplink: up to `window` frames are
//! in flight at once. Results arrive in frame order, so the reports come out in input order,
//! and every input ends in exactly one report — a result or a failure with its reason.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Semaphore, mpsc};

use crate::report::{Failure, FrameReport, Outcome};
use crate::{HeadEncoder, HeadError, ResultReceiver, Uplink, UplinkResult};

/// What a run did, for the caller's exit status and summary line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunSummary {
    /// Frames the tail answered (classified or detected).
    pub answered: usize,
    /// Frames that failed.
    pub failed: usize,
    /// Coded bytes sent, all frames.
    pub bytes_sent: usize,
}

/// A frame that went up the stream and waits for its answer.
struct SentFrame {
    frame_id: u64,
    source: String,
    started: Instant,
    sent: Instant,
    preprocess_ms: f64,
    head_ms: f64,
    coding: String,
    bytes: usize,
    wire_bytes: usize,
}

impl SentFrame {
    /// The frame's report, given the tail's answer or why none came.
    fn report(self, answer: Result<UplinkResult, String>) -> FrameReport {
        let result = match answer {
            Ok(result) => result,
            Err(reason) => {
                let mut report = failed(self.frame_id, self.source, "uplink".into(), reason);
                report.coding = Some(self.coding);
                report.bytes_sent = self.bytes;
                report.wire_bytes = self.wire_bytes;
                return report;
            }
        };
        let now = Instant::now();
        let round_trip_ms = (now - self.sent).as_secs_f64() * 1e3;
        let outcome = result.outcome;
        FrameReport {
            frame_id: self.frame_id,
            source: self.source,
            mode: "split",
            outcome,
            coding: Some(self.coding),
            bytes_sent: self.bytes,
            wire_bytes: self.wire_bytes,
            tail_received_bytes: result.received_bytes,
            preprocess_ms: self.preprocess_ms,
            head_ms: self.head_ms,
            uplink_ms: (round_trip_ms - result.tail_ms).max(0.0),
            tail_ms: result.tail_ms,
            total_ms: (now - self.started).as_secs_f64() * 1e3,
        }
    }
}

/// A frame between encoding and its report.
enum Pending {
    Sent(SentFrame),
    Failed {
        frame_id: u64,
        source: String,
        kind: &'static str,
        message: String,
    },
}

/// Encodes `files` with `encoder`, streams them over `uplink` with at most `window` frames in
/// flight, and hands each frame's report to `emit` in input order.
///
/// # Errors
///
/// [`HeadError::Uplink`] if the stream cannot be opened. A stream that breaks midway does not
/// end the run with an error: the frames it took down are reported as failed.
pub async fn run_split(
    encoder: Arc<HeadEncoder>,
    uplink: &mut Uplink,
    files: Vec<PathBuf>,
    window: usize,
    mut emit: impl FnMut(&FrameReport) -> std::io::Result<()>,
) -> Result<RunSummary, HeadError> {
    let window = window.max(1);
    let (sender, mut results) = uplink.open_stream(window).await?;
    let permits = Arc::new(Semaphore::new(window));
    let (pending_tx, mut pending_rx) = mpsc::unbounded_channel::<Pending>();

    let producer_permits = permits.clone();
    let producer = tokio::spawn(async move {
        for (frame_id, path) in (0u64..).zip(files) {
            let Ok(permit) = producer_permits.clone().acquire_owned().await else {
                break;
            };
            let source = path.display().to_string();
            let started = Instant::now();
            let job_encoder = encoder.clone();
            let encoded = tokio::task::spawn_blocking(move || job_encoder.encode_path(&path)).await;
            let failure = |kind, message| Pending::Failed {
                frame_id,
                source: source.clone(),
                kind,
                message,
            };
            let pending = match encoded {
                Ok(Ok(frame)) => {
                    let bytes = frame.bytes.len();
                    let sent = Instant::now();
                    match sender.send(frame_id, frame.bytes).await {
                        Ok(wire_bytes) => {
                            // The permit comes back when the answer does.
                            permit.forget();
                            Pending::Sent(SentFrame {
                                frame_id,
                                source: source.clone(),
                                started,
                                sent,
                                preprocess_ms: frame.preprocess_ms,
                                head_ms: frame.head_ms,
                                coding: format!("{}, {}", frame.coding, frame.codec.name()),
                                bytes,
                                wire_bytes,
                            })
                        }
                        Err(e) => failure("uplink", e.to_string()),
                    }
                }
                Ok(Err(e)) => failure(failure_kind(&e), e.to_string()),
                Err(join) => failure("input", format!("encoder panicked: {join}")),
            };
            if pending_tx.send(pending).is_err() {
                break;
            }
        }
        // Dropping the sender ends the request stream once everything is sent.
    });

    let mut summary = RunSummary::default();
    let mut broken: Option<String> = None;
    while let Some(pending) = pending_rx.recv().await {
        let report = match pending {
            Pending::Failed {
                frame_id,
                source,
                kind,
                message,
            } => failed(frame_id, source, kind.to_string(), message),
            Pending::Sent(frame) => {
                let answer = match &broken {
                    Some(reason) => Err(reason.clone()),
                    None => next_answer(&mut results, frame.frame_id).await,
                };
                permits.add_permits(1);
                if let Err(reason) = &answer {
                    broken.get_or_insert_with(|| reason.clone());
                }
                frame.report(answer)
            }
        };
        match report.outcome {
            Outcome::Classified { .. } | Outcome::Detected { .. } => summary.answered += 1,
            Outcome::Failed { .. } => summary.failed += 1,
        }
        summary.bytes_sent += report.bytes_sent;
        emit(&report)?;
    }
    let _ = producer.await;
    Ok(summary)
}

/// The tail's answer to `frame_id`, which must be the next on the stream.
async fn next_answer(results: &mut ResultReceiver, frame_id: u64) -> Result<UplinkResult, String> {
    match results.next().await {
        Ok(Some(result)) if result.frame_id == frame_id => Ok(result),
        Ok(Some(result)) => Err(format!(
            "tail answered frame {} when frame {frame_id} was due",
            result.frame_id
        )),
        Ok(None) => Err("the tail ended the stream early".to_string()),
        Err(e) => Err(e.to_string()),
    }
}

fn failure_kind(error: &HeadError) -> &'static str {
    match error {
        HeadError::Codec(_) => "codec",
        HeadError::Uplink { .. } | HeadError::BundleMismatch { .. } => "uplink",
        _ => "input",
    }
}

fn failed(frame_id: u64, source: String, kind: String, message: String) -> FrameReport {
    FrameReport {
        frame_id,
        source,
        mode: "split",
        outcome: Outcome::Failed {
            error: Failure { kind, message },
        },
        coding: None,
        bytes_sent: 0,
        wire_bytes: 0,
        tail_received_bytes: 0,
        preprocess_ms: 0.0,
        head_ms: 0.0,
        uplink_ms: 0.0,
        tail_ms: 0.0,
        total_ms: 0.0,
    }
}

/// Writes a report as one JSON line.
///
/// # Errors
///
/// The writer's error.
pub fn write_json_line(out: &mut impl Write, report: &FrameReport) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, report)?;
    out.write_all(b"\n")?;
    out.flush()
}
