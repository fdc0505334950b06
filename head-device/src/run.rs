//! The head's main job: encode each input, get it answered, report each frame exactly once.
//!
//! Encoding runs on blocking threads and overlaps with the uplink: up to `max_pending`
//! frames are between being read and being reported. The [`Session`] sends them, resends
//! them after a lost stream and fails over between tails; when no tail is reachable, the
//! [`LinkDownPolicy`] decides: run the full model here, drop the frame, or wait (until the
//! frame's deadline). Reports come out in input order, and every input ends in exactly one:
//! a result, or a status with its reason.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cleave_engine::{Preprocessor, Tensor};
use image::{DynamicImage, RgbImage};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::local::LocalModel;
use crate::report::{Failure, FrameReport, Outcome, Status};
use crate::scene_gate::{SceneGate, Verdict};
use crate::session::{Delivery, Session};
use crate::sources::{Picture, SourceFrame};
use crate::{EncodedFrame, HeadEncoder, HeadError, UplinkResult};

/// What a run did, for the caller's exit status and summary line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunSummary {
    /// Frames with a result (classified or detected), here or at a tail.
    pub answered: usize,
    /// Frames answered by the full model on this device.
    pub local: usize,
    /// Frames that failed.
    pub failed: usize,
    /// Frames whose deadline passed first.
    pub expired: usize,
    /// Frames dropped on purpose.
    pub dropped: usize,
    /// Frames the scene gate held back.
    pub unchanged: usize,
    /// Coded bytes sent, all frames and all sends.
    pub bytes_sent: usize,
}

/// What the head does with frames while no tail is reachable.
#[derive(Debug, Clone)]
pub enum LinkDownPolicy {
    /// Hold them; each is sent when a tail is back, or expires at its deadline.
    Wait,
    /// Run the bundle's full model here.
    Local(Arc<LocalModel>),
    /// Report them dropped.
    Drop,
}

impl LinkDownPolicy {
    /// Whether the session should answer `LinkDown` at once rather than hold frames.
    pub fn fails_fast(&self) -> bool {
        !matches!(self, Self::Wait)
    }
}

/// How [`run_split`] paces and bounds its frames.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Frames between being read and being reported, at most.
    pub max_pending: usize,
    /// Time from reading a frame to its answer, after which it is reported `expired`.
    pub deadline: Duration,
    /// What to do while no tail is reachable.
    pub on_link_down: LinkDownPolicy,
    /// The scene gate's threshold (0 to 1), if frames nearly identical to the last one
    /// sent are to be skipped.
    pub scene_threshold: Option<f32>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            max_pending: 8,
            deadline: Duration::from_secs(10),
            on_link_down: LinkDownPolicy::Wait,
            scene_threshold: None,
        }
    }
}

/// A frame between reading and its report.
enum Pending {
    /// Handed to the session.
    Sent {
        frame: SentFrame,
        delivery: oneshot::Receiver<Delivery>,
        /// Kept for the local fallback.
        input: Option<Tensor>,
    },
    /// Already finished (failed to read or encode, ran locally, dropped).
    Done(Box<FrameReport>),
}

/// What the report of a sent frame needs.
struct SentFrame {
    frame_id: u64,
    source: String,
    started: Instant,
    sent: Instant,
    preprocess_ms: f64,
    head_ms: f64,
    coding: String,
    bytes: usize,
}

/// Takes the frames of a source (see [`crate::sources::start`]), encodes them, hands them
/// to `session`, and gives each frame's report to `emit` in source order, until the source
/// ends.
///
/// # Errors
///
/// Only `emit`'s: a lost link, a failed tail or a bad input is a frame's report, not an
/// error of the run.
pub async fn run_split(
    encoder: Arc<HeadEncoder>,
    session: &Session,
    frames: mpsc::Receiver<SourceFrame>,
    options: &RunOptions,
    mut emit: impl FnMut(&FrameReport) -> std::io::Result<()>,
) -> Result<RunSummary, HeadError> {
    let permits = Arc::new(Semaphore::new(options.max_pending.max(1)));
    let (pending_tx, mut pending_rx) = mpsc::unbounded_channel::<Pending>();
    let producer = tokio::spawn(produce(
        encoder,
        session.clone(),
        frames,
        options.clone(),
        permits.clone(),
        pending_tx,
    ));

    let mut summary = RunSummary::default();
    while let Some(pending) = pending_rx.recv().await {
        let report = match pending {
            Pending::Done(report) => *report,
            Pending::Sent {
                frame,
                delivery,
                input,
            } => {
                let delivery = delivery.await.unwrap_or(Delivery::LinkDown {
                    reason: "the uplink session stopped".into(),
                });
                settle(frame, delivery, input, &options.on_link_down).await
            }
        };
        permits.add_permits(1);
        count(&mut summary, &report);
        emit(&report)?;
    }
    let _ = producer.await;
    Ok(summary)
}

fn count(summary: &mut RunSummary, report: &FrameReport) {
    match report.status {
        Status::Answered if report.mode == "local" => {
            summary.answered += 1;
            summary.local += 1;
        }
        Status::Answered => summary.answered += 1,
        Status::Failed => summary.failed += 1,
        Status::Expired => summary.expired += 1,
        Status::Dropped => summary.dropped += 1,
        Status::Unchanged => summary.unchanged += 1,
    }
    summary.bytes_sent += report.bytes_sent * report.sends.max(1) as usize;
}

/// What the blocking half of the producer made of a frame.
enum Prepared {
    /// The scene gate held it back.
    Unchanged { change: f32, preprocess_ms: f64 },
    /// Coded, ready for the uplink; the input is kept for the local fallback.
    Encoded {
        frame: EncodedFrame,
        input: Option<Tensor>,
    },
    /// Run by the full model here.
    Local(Result<(Outcome, f64), HeadError>),
}

/// Turns a source's picture into the model's cropped and resized RGB input.
fn picture(encoder: &HeadEncoder, picture: Picture) -> Result<RgbImage, HeadError> {
    let image = match picture {
        Picture::File(path) => {
            let bytes = std::fs::read(&path).map_err(|e| HeadError::Input {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            Preprocessor::decode(&bytes).map_err(|e| HeadError::Input {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?
        }
        Picture::Rgb(rgb) => DynamicImage::ImageRgb8(rgb),
    };
    Ok(encoder.preprocessor().crop_resize(&image))
}

/// Preprocess, gate, then encode or run locally: the per-frame work that blocks.
fn prepare(
    encoder: &HeadEncoder,
    gate: Option<&Mutex<SceneGate>>,
    source: Picture,
    local: Option<&LocalModel>,
    keep_input: bool,
) -> Result<Prepared, HeadError> {
    let read = Instant::now();
    let rgb = picture(encoder, source)?;
    if let Some(gate) = gate {
        let verdict = gate
            .lock()
            .map_or(Verdict::Pass { change: None }, |mut g| g.check(&rgb));
        if let Verdict::Unchanged { change } = verdict {
            let preprocess_ms = read.elapsed().as_secs_f64() * 1e3;
            return Ok(Prepared::Unchanged {
                change,
                preprocess_ms,
            });
        }
    }
    let input = encoder.preprocessor().tensor(&rgb);
    let preprocess_ms = read.elapsed().as_secs_f64() * 1e3;
    if let Some(local) = local {
        return Ok(Prepared::Local(local.run(&input)));
    }
    let mut frame = encoder.encode_tensor(&input)?;
    frame.preprocess_ms = preprocess_ms;
    Ok(Prepared::Encoded {
        frame,
        input: keep_input.then_some(input),
    })
}

/// Takes every frame of the source in order: expired, gated, dropped or run locally here,
/// or encoded and handed to the session.
async fn produce(
    encoder: Arc<HeadEncoder>,
    session: Session,
    mut frames: mpsc::Receiver<SourceFrame>,
    options: RunOptions,
    permits: Arc<Semaphore>,
    pending: mpsc::UnboundedSender<Pending>,
) {
    let keep_input = matches!(options.on_link_down, LinkDownPolicy::Local(_));
    let gate = options
        .scene_threshold
        .map(|t| Arc::new(Mutex::new(SceneGate::new(t))));
    for frame_id in 0u64.. {
        let Ok(permit) = permits.acquire().await else {
            break;
        };
        let Some(frame) = frames.recv().await else {
            break;
        };
        // The consumer gives the permit back once the frame is reported.
        permit.forget();
        let SourceFrame {
            name: source,
            picture,
            captured,
        } = frame;
        let started = captured.unwrap_or_else(Instant::now);
        let deadline = tokio::time::Instant::from_std(started + options.deadline);
        // One reading of the link per frame, so the drop and local decisions agree.
        let down = session.is_down();
        let item = if deadline <= tokio::time::Instant::now() {
            let waited = started.elapsed().as_secs_f64() * 1e3;
            let mut report = failed(
                frame_id,
                source,
                "expired",
                format!("waited {waited:.0} ms for the pipeline, past its deadline; not processed"),
            );
            report.status = Status::Expired;
            Pending::Done(Box::new(report))
        } else if down && matches!(options.on_link_down, LinkDownPolicy::Drop) {
            Pending::Done(Box::new(dropped(
                frame_id,
                source,
                format!("no tail reachable, frame dropped: {}", session.last_error()),
            )))
        } else {
            let local = match &options.on_link_down {
                LinkDownPolicy::Local(local) if down => Some(local.clone()),
                _ => None,
            };
            let (job_encoder, job_gate, job_local) = (encoder.clone(), gate.clone(), local.clone());
            let job = tokio::task::spawn_blocking(move || {
                prepare(
                    &job_encoder,
                    job_gate.as_deref(),
                    picture,
                    job_local.as_deref(),
                    keep_input,
                )
            });
            match job.await {
                Ok(Ok(Prepared::Unchanged {
                    change,
                    preprocess_ms,
                })) => {
                    let mut report = blank(
                        frame_id,
                        source,
                        Status::Unchanged,
                        Outcome::Skipped {
                            skipped: Failure {
                                kind: "unchanged".into(),
                                message: format!(
                                    "changed {:.2} % from the last frame sent, under the \
                                     scene gate's threshold",
                                    change * 100.0
                                ),
                            },
                        },
                    );
                    report.preprocess_ms = preprocess_ms;
                    report.total_ms = started.elapsed().as_secs_f64() * 1e3;
                    Pending::Done(Box::new(report))
                }
                Ok(Ok(Prepared::Local(ran))) => Pending::Done(Box::new(local_report(
                    frame_id,
                    source,
                    started,
                    Ok(ran),
                    format!("the link was down: {}", session.last_error()),
                ))),
                Ok(Ok(Prepared::Encoded { frame, input })) => {
                    let bytes = frame.bytes.len();
                    let coding = format!("{}, {}", frame.coding, frame.codec.name());
                    let sent = Instant::now();
                    let delivery = session.submit(frame_id, frame.bytes, deadline).await;
                    Pending::Sent {
                        frame: SentFrame {
                            frame_id,
                            source,
                            started,
                            sent,
                            preprocess_ms: frame.preprocess_ms,
                            head_ms: frame.head_ms,
                            coding,
                            bytes,
                        },
                        delivery,
                        input,
                    }
                }
                Ok(Err(e)) => {
                    Pending::Done(Box::new(failed(frame_id, source, failure_kind(&e), e)))
                }
                Err(join) => Pending::Done(Box::new(failed(
                    frame_id,
                    source,
                    "input",
                    format!("encoder panicked: {join}"),
                ))),
            }
        };
        if pending.send(item).is_err() {
            break;
        }
    }
}

/// The report of a frame the session delivered; runs it locally if the link was down and
/// the policy says so.
async fn settle(
    frame: SentFrame,
    delivery: Delivery,
    input: Option<Tensor>,
    policy: &LinkDownPolicy,
) -> FrameReport {
    match delivery {
        Delivery::Answered {
            result,
            server,
            sends,
            wire_bytes,
        } => frame.answered(result, server, sends, wire_bytes),
        Delivery::Expired {
            sends,
            wire_bytes,
            why,
        } => {
            let mut report = frame.unanswered(Status::Expired, "expired", why);
            report.sends = sends;
            report.wire_bytes = wire_bytes;
            report
        }
        Delivery::LinkDown { reason } => match (policy, input) {
            (LinkDownPolicy::Local(local), Some(input)) => {
                let local = local.clone();
                let job = tokio::task::spawn_blocking(move || local.run(&input));
                let (frame_id, source, started) = (frame.frame_id, frame.source, frame.started);
                local_report(
                    frame_id,
                    source,
                    started,
                    job.await,
                    format!("the link went down: {reason}"),
                )
            }
            _ => frame.unanswered(
                Status::Dropped,
                "link_down",
                format!("no tail reachable, frame dropped: {reason}"),
            ),
        },
    }
}

impl SentFrame {
    fn answered(
        self,
        result: UplinkResult,
        server: String,
        sends: u32,
        wire_bytes: usize,
    ) -> FrameReport {
        let now = Instant::now();
        let round_trip_ms = (now - self.sent).as_secs_f64() * 1e3;
        let status = match &result.outcome {
            Outcome::Failed { error } if error.kind == "deadline_exceeded" => Status::Expired,
            Outcome::Failed { .. } => Status::Failed,
            Outcome::Classified { .. } | Outcome::Detected { .. } => Status::Answered,
            Outcome::Skipped { .. } => Status::Dropped,
        };
        FrameReport {
            frame_id: self.frame_id,
            source: self.source,
            status,
            mode: "split",
            outcome: result.outcome,
            server: Some(server),
            sends,
            note: None,
            coding: Some(self.coding),
            bytes_sent: self.bytes,
            wire_bytes,
            tail_received_bytes: result.received_bytes,
            preprocess_ms: self.preprocess_ms,
            head_ms: self.head_ms,
            uplink_ms: (round_trip_ms - result.tail_ms).max(0.0),
            tail_ms: result.tail_ms,
            total_ms: (now - self.started).as_secs_f64() * 1e3,
        }
    }

    fn unanswered(self, status: Status, kind: &str, message: String) -> FrameReport {
        let mut report = failed(self.frame_id, self.source, kind, message);
        report.status = status;
        report.coding = Some(self.coding);
        report.bytes_sent = self.bytes;
        report.preprocess_ms = self.preprocess_ms;
        report.head_ms = self.head_ms;
        report.total_ms = self.started.elapsed().as_secs_f64() * 1e3;
        report
    }
}

fn local_report(
    frame_id: u64,
    source: String,
    started: Instant,
    ran: Result<Result<(Outcome, f64), HeadError>, tokio::task::JoinError>,
    why: String,
) -> FrameReport {
    let mut report = match ran {
        Ok(Ok((outcome, model_ms))) => {
            let mut report = blank(frame_id, source, Status::Answered, outcome);
            report.head_ms = model_ms;
            report
        }
        Ok(Err(e)) => failed(frame_id, source, failure_kind(&e), e),
        Err(join) => failed(
            frame_id,
            source,
            "input",
            format!("local model panicked: {join}"),
        ),
    };
    report.mode = "local";
    report.note = Some(format!("{why}; ran the full model on this device"));
    report.total_ms = started.elapsed().as_secs_f64() * 1e3;
    report
}

fn failure_kind(error: &HeadError) -> &'static str {
    match error {
        HeadError::Codec(_) => "codec",
        HeadError::Uplink { .. } | HeadError::BundleMismatch { .. } => "uplink",
        _ => "input",
    }
}

fn dropped(frame_id: u64, source: String, message: String) -> FrameReport {
    let mut report = failed(frame_id, source, "link_down", message);
    report.status = Status::Dropped;
    report
}

fn failed(frame_id: u64, source: String, kind: &str, message: impl ToString) -> FrameReport {
    let error = Failure {
        kind: kind.to_string(),
        message: message.to_string(),
    };
    blank(frame_id, source, Status::Failed, Outcome::Failed { error })
}

/// A report with `outcome` and nothing measured yet.
fn blank(frame_id: u64, source: String, status: Status, outcome: Outcome) -> FrameReport {
    FrameReport {
        frame_id,
        source,
        status,
        mode: "split",
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
    }
}

/// Writes a report as one JSON line and flushes it.
///
/// # Errors
///
/// The writer's error.
pub fn write_json_line(out: &mut impl Write, report: &FrameReport) -> std::io::Result<()> {
    // One write per line: an appended file never holds half a line from this process.
    let mut line = serde_json::to_vec(report).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)?;
    out.flush()
}
