//! The head's main job: take each frame, answer it in its mode, report it exactly once.
//!
//! Per frame, in source order:
//!
//! 1. **Mode.** A fixed [`Mode`], or `auto`: the [`ModeChooser`] predicts each mode's cost
//!    from the link estimate and what it has measured, and picks one.
//! 2. **Device work** ([`prepare`](crate::prepare)) on a blocking thread: crop, scene gate,
//!    then the head and coding, a JPEG, or the whole model.
//! 3. **Uplink.** Remote frames go to the [`Session`], which sends, resends after a lost
//!    stream and fails over. When no tail is reachable the [`LinkDownPolicy`] decides: run
//!    the full model here, drop the frame, or wait (until its deadline). `auto` runs it here.
//!
//! Up to `max_pending` frames are between being read and being reported, so device work
//! overlaps with the uplink. Reports come out in input order, and every input ends in
//! exactly one: a result, or a status with its reason.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cleave_engine::Tensor;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::energy::{EnergyMark, EnergyMeter, FrameActivity};
use crate::link_estimate::LinkEstimate;
use crate::local::LocalModel;
use crate::mode::{AutoConfig, Decision, Mode, ModeChooser, Usable};
use crate::prefilter::Prefilter;
use crate::prepare::{Prepared, Work, prepare};
use crate::rate_control::{Level, RateControl};
use crate::report::{Failure, FrameReport, Outcome, Status};
use crate::scene_gate::SceneGate;
use crate::session::{Delivery, Session};
use crate::sources::SourceFrame;
use crate::spooler::{Spooler, drain};

mod settle;
use crate::{CodingPolicy, HeadEncoder, HeadError};
use settle::{SentFrame, joined, local_report, settle};

/// What a run did, for the caller's exit status and summary line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunSummary {
    /// Frames with a result (classified or detected), here or at a tail.
    pub answered: usize,
    /// Frames answered by the full model on this device.
    pub local: usize,
    /// Frames answered by the full model on a server, from a JPEG.
    pub offloaded: usize,
    /// Frames that failed.
    pub failed: usize,
    /// Frames whose deadline passed first.
    pub expired: usize,
    /// Frames dropped on purpose.
    pub dropped: usize,
    /// Frames the scene gate held back.
    pub unchanged: usize,
    /// Frames put in the on-disk spool while the link was down (their lines come when they
    /// are answered, in this run or a later one).
    pub spooled: usize,
    /// Bytes sent (coded features or JPEG), all frames and all sends.
    pub bytes_sent: usize,
}

/// What the head does with frames of a remote mode while no tail is reachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkDownPolicy {
    /// Hold them; each is sent when a tail is back, or expires at its deadline.
    Wait,
    /// Run the bundle's full model here ([`RunOptions::local`] must hold it).
    Local,
    /// Report them dropped.
    Drop,
    /// Keep them, coded, in the on-disk spool ([`RunOptions::spool`] must hold it) and send
    /// them once a tail is back; each frame's line comes when it is answered.
    Spool,
}

/// How frames pick their mode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ModeSetting {
    /// Every frame in this mode.
    Fixed(Mode),
    /// Per frame, the mode predicted cheapest.
    Auto(AutoConfig),
}

/// How [`run`] paces and bounds its frames.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Frames between being read and being reported, at most.
    pub max_pending: usize,
    /// Time from reading a frame to its answer, after which it is reported `expired`.
    pub deadline: Duration,
    /// Where frames are computed.
    pub mode: ModeSetting,
    /// The full model on this device: needed by `local`, `auto` and [`LinkDownPolicy::Local`].
    pub local: Option<Arc<LocalModel>>,
    /// What to do with remote frames while no tail is reachable.
    pub on_link_down: LinkDownPolicy,
    /// The scene gate's threshold (0 to 1), if frames nearly identical to the last one
    /// sent are to be skipped.
    pub scene_threshold: Option<f32>,
    /// JPEG quality (1–100) of offloaded frames.
    pub jpeg_quality: u8,
    /// The bundle's prefilter, if frames it finds of no interest are to be dropped.
    pub prefilter: Option<Arc<Prefilter>>,
    /// Gives each frame its energy, if a profile or a sensor is there.
    pub energy: Option<Arc<EnergyMeter>>,
    /// The on-disk spool, for [`LinkDownPolicy::Spool`].
    pub spool: Option<Arc<Spooler>>,
    /// Rate control: `split` frames get the highest calibrated depth predicted to be
    /// answered within this.
    pub latency_target: Option<Duration>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            max_pending: 8,
            deadline: Duration::from_secs(10),
            mode: ModeSetting::Fixed(Mode::Split),
            local: None,
            on_link_down: LinkDownPolicy::Wait,
            scene_threshold: None,
            jpeg_quality: 85,
            prefilter: None,
            energy: None,
            spool: None,
            latency_target: None,
        }
    }
}

impl RunOptions {
    /// Whether the session should answer `LinkDown` at once rather than hold frames.
    pub fn fails_fast(&self) -> bool {
        self.on_link_down != LinkDownPolicy::Wait || self.auto_runs_locally()
    }

    /// Whether `auto` may answer frames here.
    fn auto_runs_locally(&self) -> bool {
        matches!(self.mode, ModeSetting::Auto(c) if c.modes.contains(Mode::Local))
            && self.local.is_some()
    }

    /// Whether the options can work: a mode or policy that runs the full model here needs
    /// it loaded, and a remote mode needs a session.
    ///
    /// # Errors
    ///
    /// What is missing, in words.
    pub fn check(&self, has_session: bool) -> Result<(), String> {
        let needs_local = match self.mode {
            ModeSetting::Fixed(Mode::Local) => true,
            ModeSetting::Auto(c) if c.modes.contains(Mode::Local) => true,
            _ => self.on_link_down == LinkDownPolicy::Local,
        };
        if needs_local && self.local.is_none() {
            return Err("this mode or link-down policy needs the full model loaded here".into());
        }
        if self.on_link_down == LinkDownPolicy::Spool && self.spool.is_none() {
            return Err("--on-link-down spool needs a spool folder".into());
        }
        if self.mode != ModeSetting::Fixed(Mode::Local) && !has_session {
            return Err("this mode sends frames, so it needs a server".into());
        }
        Ok(())
    }
}

/// A frame between reading and its report.
enum Pending {
    /// Handed to the session.
    Sent {
        frame: Box<SentFrame>,
        delivery: oneshot::Receiver<Delivery>,
        /// Kept for the local fallback.
        input: Option<Tensor>,
    },
    /// Already finished (failed to read or encode, ran locally, dropped).
    Done(Box<FrameReport>),
}

/// What the producer and the consumer share.
struct Shared {
    encoder: Arc<HeadEncoder>,
    session: Option<Session>,
    options: RunOptions,
    chooser: Option<Mutex<ModeChooser>>,
    rate: Option<Mutex<RateControl>>,
}

impl Shared {
    fn observe(&self, f: impl FnOnce(&mut ModeChooser)) {
        if let Some(mut chooser) = self.chooser.as_ref().and_then(|c| c.lock().ok()) {
            f(&mut chooser);
        }
    }

    fn link_error(&self) -> String {
        self.session
            .as_ref()
            .map_or_else(|| "no server".into(), Session::last_error)
    }
}

/// Takes the frames of a source (see [`crate::sources::start`]), answers each in its mode
/// (sending remote ones through `session`), and gives each frame's report to `emit` in
/// source order, until the source ends.
///
/// # Errors
///
/// Only `emit`'s: a lost link, a failed tail or a bad input is a frame's report, not an
/// error of the run.
pub async fn run(
    encoder: Arc<HeadEncoder>,
    session: Option<&Session>,
    frames: mpsc::Receiver<SourceFrame>,
    options: &RunOptions,
    mut emit: impl FnMut(&FrameReport) -> std::io::Result<()>,
) -> Result<RunSummary, HeadError> {
    let chooser = match options.mode {
        ModeSetting::Auto(config) => Some(Mutex::new(ModeChooser::new(config))),
        ModeSetting::Fixed(_) => None,
    };
    let rate = options.latency_target.map(|target| {
        let quantization = &encoder.bundle().manifest().bottleneck.quantization;
        let levels = quantization
            .levels
            .iter()
            .map(|l| Level {
                bits: l.bits,
                bytes: l.payload_bytes as f64,
            })
            .collect();
        let default_bits = match encoder.policy() {
            CodingPolicy::Fixed { bits, .. } => bits,
            _ => quantization.bits,
        };
        Mutex::new(RateControl::new(
            target.as_secs_f64() * 1e3,
            levels,
            default_bits,
        ))
    });
    let shared = Arc::new(Shared {
        encoder,
        session: session.cloned(),
        options: options.clone(),
        chooser,
        rate,
    });
    let permits = Arc::new(Semaphore::new(options.max_pending.max(1)));
    let (pending_tx, mut pending_rx) = mpsc::unbounded_channel::<(Pending, Option<EnergyMark>)>();
    let producer = tokio::spawn(produce(shared.clone(), frames, permits.clone(), pending_tx));

    let stop = Arc::new(AtomicBool::new(false));
    let (drained_tx, mut drained_rx) = mpsc::unbounded_channel::<FrameReport>();
    let mut drain_done = true;
    if let (Some(spool), Some(session)) = (&options.spool, session) {
        drain_done = false;
        let job = drain(
            spool.clone(),
            session.clone(),
            options.deadline,
            stop.clone(),
            drained_tx,
        );
        tokio::spawn(job);
    }

    let mut summary = RunSummary::default();
    let mut source_done = false;
    loop {
        let reports = tokio::select! {
            pending = pending_rx.recv(), if !source_done => {
                let Some((pending, mark)) = pending else {
                    source_done = true;
                    stop.store(true, Ordering::Relaxed);
                    continue;
                };
                let mut reports = match pending {
                    Pending::Done(report) => vec![*report],
                    Pending::Sent {
                        frame,
                        delivery,
                        input,
                    } => {
                        let delivery = delivery.await.unwrap_or(Delivery::LinkDown {
                            reason: "the uplink session stopped".into(),
                            payload: None,
                        });
                        settle(&shared, *frame, delivery, input, &mut summary).await
                    }
                };
                if let (Some(meter), Some(mark), Some(report)) =
                    (&options.energy, mark, reports.first_mut())
                {
                    report.energy = meter.finish(&mark, &activity(report, session));
                }
                permits.add_permits(1);
                reports
            }
            drained = drained_rx.recv(), if !drain_done => match drained {
                Some(report) => vec![report],
                None => {
                    drain_done = true;
                    continue;
                }
            },
            else => break,
        };
        for report in reports {
            count(&mut summary, &report);
            emit(&report)?;
        }
    }
    let _ = producer.await;
    Ok(summary)
}

/// What the frame kept this device busy with, for its energy: compute, and the radio for
/// its bytes at the link's estimated rate.
fn activity(report: &FrameReport, session: Option<&Session>) -> FrameActivity {
    let ms = |v: f64| Duration::try_from_secs_f64(v / 1e3).unwrap_or_default();
    // A frame never sent (dropped or expired while waiting for a link) used no radio.
    let sent = report.wire_bytes.max(report.bytes_sent) * report.sends as usize;
    let radio_tx = session
        .and_then(|s| s.estimate().transmission_time(sent))
        .unwrap_or_else(|| {
            if sent > 0 {
                ms(report.uplink_ms)
            } else {
                Duration::ZERO
            }
        });
    FrameActivity {
        compute: ms(report.preprocess_ms + report.head_ms),
        radio_tx,
        radio_rx: Duration::ZERO,
        wall: ms(report.total_ms),
    }
}

fn count(summary: &mut RunSummary, report: &FrameReport) {
    match report.status {
        Status::Answered => {
            summary.answered += 1;
            match report.mode {
                "local" => summary.local += 1,
                "offload" => summary.offloaded += 1,
                _ => {}
            }
        }
        Status::Failed => summary.failed += 1,
        Status::Expired => summary.expired += 1,
        Status::Dropped => summary.dropped += 1,
        Status::Unchanged => summary.unchanged += 1,
    }
    summary.bytes_sent += report.bytes_sent * report.sends.max(1) as usize;
}

/// Takes every frame of the source in order: expired, gated, dropped or run here, or
/// prepared and handed to the session.
async fn produce(
    shared: Arc<Shared>,
    mut frames: mpsc::Receiver<SourceFrame>,
    permits: Arc<Semaphore>,
    pending: mpsc::UnboundedSender<(Pending, Option<EnergyMark>)>,
) {
    let options = &shared.options;
    let keep_input = options.local.is_some()
        && (options.on_link_down == LinkDownPolicy::Local || options.auto_runs_locally());
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
        let mark = options.energy.as_ref().map(|meter| meter.start());
        let item = take(&shared, frame_id, frame, gate.clone(), keep_input).await;
        if pending.send((item, mark)).is_err() {
            break;
        }
    }
}

/// The mode a frame takes, and the work that means here.
enum Plan {
    Work {
        mode: Mode,
        work: Work,
        decision: Option<Decision>,
        /// Why it runs here although its mode is remote.
        note: Option<String>,
    },
    Drop(String),
}

fn plan(shared: &Shared, estimate: LinkEstimate) -> Plan {
    let options = &shared.options;
    let session = shared.session.as_ref();
    let (mode, decision) = match options.mode {
        ModeSetting::Fixed(mode) => (mode, None),
        ModeSetting::Auto(_) => {
            let usable = Usable {
                link: session.is_some_and(Session::is_up),
                offload: session.is_some_and(Session::serves_full_model),
                local: options.local.is_some(),
                estimate,
            };
            let mut decision = None;
            shared.observe(|c| decision = Some(c.choose(&usable)));
            let mode = decision.as_ref().map_or(Mode::Split, |d| d.mode);
            (mode, decision)
        }
    };
    let work = |mode: Mode| match (mode, &options.local) {
        (Mode::Offload, _) => Work::Offload {
            quality: options.jpeg_quality,
        },
        (Mode::Local, Some(local)) => Work::Local(local.clone()),
        _ => Work::Split { bits: None },
    };
    // One reading of the link per frame, so the drop and local decisions agree. (`auto`
    // chose local itself if it may.)
    let down = mode != Mode::Local && session.is_none_or(Session::is_down);
    let note = |what: &str| format!("the link was down ({}); {what}", shared.link_error());
    match (down, options.on_link_down, &options.local) {
        (true, LinkDownPolicy::Drop, _) => Plan::Drop(note("frame dropped")),
        (true, LinkDownPolicy::Local, Some(local)) => Plan::Work {
            mode: Mode::Local,
            work: Work::Local(local.clone()),
            decision,
            note: Some(note("ran the full model on this device")),
        },
        _ => Plan::Work {
            mode,
            work: work(mode),
            decision,
            note: None,
        },
    }
}

/// One frame, from the source to a pending report.
async fn take(
    shared: &Arc<Shared>,
    frame_id: u64,
    frame: SourceFrame,
    gate: Option<Arc<Mutex<SceneGate>>>,
    keep_input: bool,
) -> Pending {
    let SourceFrame {
        name: source,
        picture,
        captured,
    } = frame;
    let started = captured.unwrap_or_else(Instant::now);
    let deadline = tokio::time::Instant::from_std(started + shared.options.deadline);
    if deadline <= tokio::time::Instant::now() {
        let waited = started.elapsed().as_secs_f64() * 1e3;
        return Pending::Done(Box::new(FrameReport::unanswered(
            frame_id,
            source,
            Status::Expired,
            "expired",
            format!("waited {waited:.0} ms for the pipeline, past its deadline; not processed"),
        )));
    }
    // One reading of the link estimate per frame, for `auto` and rate control alike.
    let estimate = match (&shared.session, &shared.options.mode, &shared.rate) {
        (Some(session), ModeSetting::Auto(_), _) | (Some(session), _, Some(_)) => {
            session.estimate()
        }
        _ => LinkEstimate::default(),
    };
    let (mode, work, decision, note) = match plan(shared, estimate) {
        Plan::Drop(why) => {
            return Pending::Done(Box::new(FrameReport::unanswered(
                frame_id,
                source,
                Status::Dropped,
                "link_down",
                why,
            )));
        }
        Plan::Work {
            mode,
            work,
            decision,
            note,
        } => (mode, work, decision, note),
    };
    let mut choice = decision.as_ref().map(Decision::describe);
    let mut work = work;
    let mut bits = None;
    if let (Work::Split { bits: depth }, Some(rate)) = (&mut work, &shared.rate)
        && let Ok(rate) = rate.lock()
    {
        let chosen = rate.choose(&estimate);
        *depth = Some(chosen.bits);
        bits = Some(chosen.bits);
        let text = rate.describe(&chosen);
        choice = Some(match choice {
            Some(auto) => format!("{auto}; {text}"),
            None => text,
        });
    }
    let job_shared = shared.clone();
    let job = tokio::task::spawn_blocking(move || {
        prepare(
            &job_shared.encoder,
            gate.as_deref(),
            job_shared.options.prefilter.as_deref(),
            picture,
            &work,
            keep_input,
        )
    });
    let mut report = match joined(job.await, "device work") {
        Ok(Prepared::Unchanged {
            change,
            preprocess_ms,
        }) => {
            let skipped = Failure {
                kind: "unchanged".into(),
                message: format!(
                    "changed {:.2} % from the last frame sent, under the scene gate's threshold",
                    change * 100.0
                ),
            };
            let mut report = FrameReport::blank(
                frame_id,
                source,
                Status::Unchanged,
                Outcome::Skipped { skipped },
            );
            report.preprocess_ms = preprocess_ms;
            report
        }
        Ok(Prepared::Filtered {
            interest,
            threshold,
            preprocess_ms,
            device_ms,
        }) => {
            let skipped = Failure {
                kind: "prefilter".into(),
                message: format!(
                    "the prefilter's interest {interest:.3} is under its threshold \
                     {threshold:.3}: nothing here it was trained to look for"
                ),
            };
            let mut report = FrameReport::blank(
                frame_id,
                source,
                Status::Dropped,
                Outcome::Skipped { skipped },
            );
            report.preprocess_ms = preprocess_ms;
            report.head_ms = device_ms;
            report
        }
        Ok(Prepared::Local { ran, preprocess_ms }) => {
            if let Ok((_, model_ms)) = &ran {
                let model_ms = *model_ms;
                shared.observe(|c| c.observe_device(Mode::Local, model_ms));
            }
            let mut report = local_report(frame_id, source, started, Ok(ran), note);
            report.preprocess_ms = preprocess_ms;
            report
        }
        Ok(Prepared::Ready {
            payload,
            coding,
            preprocess_ms,
            device_ms,
            input,
        }) => {
            shared.observe(|c| c.observe_device(mode, device_ms));
            let Some(session) = shared.session.as_ref() else {
                return Pending::Done(Box::new(FrameReport::unanswered(
                    frame_id,
                    source,
                    Status::Failed,
                    "uplink",
                    "no server to send to",
                )));
            };
            let bytes = payload.len();
            shared.observe(|c| c.sent(mode));
            let sent = Instant::now();
            let delivery = session.submit(frame_id, payload, deadline).await;
            return Pending::Sent {
                frame: Box::new(SentFrame {
                    frame_id,
                    source,
                    mode,
                    choice,
                    started,
                    sent,
                    preprocess_ms,
                    device_ms,
                    coding,
                    bytes,
                    bits,
                }),
                delivery,
                input,
            };
        }
        Err((kind, message)) => {
            FrameReport::unanswered(frame_id, source, Status::Failed, kind, message)
        }
    };
    report.mode = mode.name();
    report.choice = choice;
    report.total_ms = started.elapsed().as_secs_f64() * 1e3;
    Pending::Done(Box::new(report))
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
