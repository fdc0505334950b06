//! How a frame that went to the session ends: the report of its answer, its expiry, or the
//! lost link — spooled, run here or dropped, as the link-down policy says — and the report
//! of a frame the full model ran here.
//!
//! Split from `run.rs`, which keeps the pipeline (reading, planning, preparing, sending);
//! this is the bookkeeping after it.

use std::time::Instant;

use cleave_engine::Tensor;

use super::{LinkDownPolicy, RunSummary, Shared};
use crate::mode::Mode;
use crate::report::{FrameReport, Outcome, Status};
use crate::session::Delivery;
use crate::{HeadError, UplinkResult};

/// What the report of a sent frame needs.
pub(super) struct SentFrame {
    pub(super) frame_id: u64,
    pub(super) source: String,
    pub(super) mode: Mode,
    pub(super) choice: Option<String>,
    pub(super) started: Instant,
    pub(super) sent: Instant,
    pub(super) preprocess_ms: f64,
    pub(super) device_ms: f64,
    pub(super) coding: String,
    pub(super) bytes: usize,
    /// The depth rate control chose, if it did.
    pub(super) bits: Option<u8>,
}

/// The reports a delivered frame ends in: its own (none if it went to the spool), and
/// those of frames the spool evicted for it.
pub(super) async fn settle(
    shared: &Shared,
    frame: SentFrame,
    delivery: Delivery,
    input: Option<Tensor>,
    summary: &mut RunSummary,
) -> Vec<FrameReport> {
    let Some(spool) = &shared.options.spool else {
        return vec![settle_here(shared, frame, delivery, input).await];
    };
    if let Delivery::LinkDown {
        reason,
        payload: Some(payload),
    } = delivery
    {
        shared.observe(|c| c.observe_lost(frame.mode));
        let (spool, name) = (spool.clone(), frame.source.clone());
        let stored = tokio::task::spawn_blocking(move || spool.store(&name, &payload)).await;
        return match stored {
            Ok(Ok(evicted)) => {
                summary.spooled += 1;
                evicted
                    .into_iter()
                    .map(|name| {
                        FrameReport::unanswered(
                            frame.frame_id,
                            name,
                            Status::Dropped,
                            "spool_full",
                            "evicted from the full spool to make room for a newer frame",
                        )
                    })
                    .collect()
            }
            Ok(Err(why)) => vec![frame.unanswered(
                Status::Dropped,
                "link_down",
                format!("no tail reachable ({reason}) and the spool refused the frame: {why}"),
            )],
            Err(join) => vec![frame.unanswered(
                Status::Failed,
                "spool",
                format!("spooling panicked: {join}"),
            )],
        };
    }
    vec![settle_here(shared, frame, delivery, input).await]
}

/// The report of a frame the session delivered; runs it here if the link was down and
/// the policy (or `auto`) says so.
async fn settle_here(
    shared: &Shared,
    frame: SentFrame,
    delivery: Delivery,
    input: Option<Tensor>,
) -> FrameReport {
    let mode = frame.mode;
    match delivery {
        Delivery::Answered {
            result,
            server,
            sends,
            wire_bytes,
        } => {
            if matches!(
                result.outcome,
                Outcome::Classified { .. } | Outcome::Detected { .. }
            ) {
                let (bytes, tail_ms) = (frame.bytes, result.tail_ms);
                shared.observe(|c| c.observe_answer(mode, bytes, tail_ms));
                if let (Some(bits), Some(rate)) = (frame.bits, &shared.rate)
                    && let Ok(mut rate) = rate.lock()
                    && tail_ms.is_finite()
                    && tail_ms >= 0.0
                {
                    rate.observe(bits, bytes, frame.device_ms, tail_ms);
                }
            } else {
                shared.observe(|c| c.observe_lost(mode));
            }
            frame.answered(result, server, sends, wire_bytes)
        }
        Delivery::Expired {
            sends,
            wire_bytes,
            why,
        } => {
            shared.observe(|c| c.observe_lost(mode));
            let mut report = frame.unanswered(Status::Expired, "expired", why);
            report.sends = sends;
            report.wire_bytes = wire_bytes;
            report
        }
        Delivery::LinkDown { reason, .. } => {
            shared.observe(|c| c.observe_lost(mode));
            let runs_here = shared.options.on_link_down == LinkDownPolicy::Local
                || shared.options.auto_runs_locally();
            match (&shared.options.local, input) {
                (Some(local), Some(input)) if runs_here => {
                    let local = local.clone();
                    let job = tokio::task::spawn_blocking(move || local.run(&input));
                    let ran = job.await;
                    if let Ok(Ok((_, model_ms))) = &ran {
                        let model_ms = *model_ms;
                        shared.observe(|c| c.observe_device(Mode::Local, model_ms));
                    }
                    let mut report = local_report(
                        frame.frame_id,
                        frame.source,
                        frame.started,
                        ran,
                        Some(format!(
                            "the link went down ({reason}); ran the full model on this device"
                        )),
                    );
                    report.choice = frame.choice;
                    report.preprocess_ms = frame.preprocess_ms;
                    report
                }
                _ => frame.unanswered(
                    Status::Dropped,
                    "link_down",
                    format!("no tail reachable, frame dropped: {reason}"),
                ),
            }
        }
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
        let mut report = FrameReport::blank(self.frame_id, self.source, status, result.outcome);
        report.mode = self.mode.name();
        report.choice = self.choice;
        report.server = Some(server);
        report.sends = sends;
        report.coding = Some(self.coding);
        report.bytes_sent = self.bytes;
        report.wire_bytes = wire_bytes;
        report.tail_received_bytes = result.received_bytes;
        report.preprocess_ms = self.preprocess_ms;
        report.head_ms = self.device_ms;
        report.uplink_ms = (round_trip_ms - result.tail_ms).max(0.0);
        report.tail_ms = result.tail_ms;
        report.total_ms = (now - self.started).as_secs_f64() * 1e3;
        report
    }

    pub(super) fn unanswered(self, status: Status, kind: &str, message: String) -> FrameReport {
        let mut report = FrameReport::unanswered(self.frame_id, self.source, status, kind, message);
        report.mode = self.mode.name();
        report.choice = self.choice;
        report.coding = Some(self.coding);
        report.bytes_sent = self.bytes;
        report.preprocess_ms = self.preprocess_ms;
        report.head_ms = self.device_ms;
        report.total_ms = self.started.elapsed().as_secs_f64() * 1e3;
        report
    }
}

pub(super) fn local_report(
    frame_id: u64,
    source: String,
    started: Instant,
    ran: Result<Result<(Outcome, f64), HeadError>, tokio::task::JoinError>,
    note: Option<String>,
) -> FrameReport {
    let mut report = match joined(ran, "the local model") {
        Ok((outcome, model_ms)) => {
            let mut report = FrameReport::blank(frame_id, source, Status::Answered, outcome);
            report.head_ms = model_ms;
            report
        }
        Err((kind, message)) => {
            FrameReport::unanswered(frame_id, source, Status::Failed, kind, message)
        }
    };
    report.mode = Mode::Local.name();
    report.note = note;
    report.total_ms = started.elapsed().as_secs_f64() * 1e3;
    report
}

/// What work on a blocking thread gave: its value, or the failure kind and message its
/// report names.
pub(super) fn joined<T>(
    ran: Result<Result<T, HeadError>, tokio::task::JoinError>,
    work: &str,
) -> Result<T, (&'static str, String)> {
    match ran {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err((failure_kind(&error), error.to_string())),
        Err(join) => Err(("input", format!("{work} panicked: {join}"))),
    }
}

fn failure_kind(error: &HeadError) -> &'static str {
    match error {
        HeadError::Codec(_) => "codec",
        HeadError::Uplink { .. } | HeadError::BundleMismatch { .. } => "uplink",
        _ => "input",
    }
}
