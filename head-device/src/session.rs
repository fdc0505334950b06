//! An uplink that survives its link: reconnects, fails over, resends, and never loses a frame.
//!
//! A [`Session`] owns the connection to the tails. Frames are [`submit`](Session::submit)ted
//! with a deadline, and each gets exactly one [`Delivery`]: the tail's answer, `Expired`,
//! or `LinkDown` (when the caller asked to hear at once that no tail is reachable, so it can
//! run the frame locally or drop it).
//!
//! One task does all of it, so there is no lock and no race between an answer and a
//! reconnect:
//!
//! - **Window.** Up to `window` frames are on the stream at once, answered in order. Frames
//!   beyond it wait in the session.
//! - **Resend.** When the stream breaks — reset, tail drained (`UNAVAILABLE`), stalled past a
//!   frame's deadline, keepalive timeout — the frames that were on it go back to the front of
//!   the queue and are sent again on the next connection. Inference has no side effects, so
//!   a frame the old tail did run costs only time; its report says how many sends it took.
//! - **Failover.** Servers are tried in the order given, starting with the next one after
//!   the one that failed; the first to negotiate takes the stream.
//! - **Backoff.** Once every server has failed in a row, the link is *down*: the session
//!   waits ([`Backoff`]: exponential, full jitter) and starts a new round. While down it
//!   keeps probing, so the link comes back on its own.
//! - **Deadlines.** A frame that waits past its deadline is answered `Expired` and never
//!   sent; one on the stream carries its remaining time to the tail, which drops it unrun
//!   when late. If the stream gives no answer at all for a frame a grace period past its
//!   deadline, the stream is taken for dead.
//! - **Link estimate.** Every answer is a transfer sample and every negotiation a round
//!   trip ([`LinkEstimator`]); with `probe_interval`, a small probe on the open connection
//!   now and then keeps the round trip fresh. [`Session::estimate`] reads it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cleave_codec::BundleId;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::link_estimate::{LinkEstimate, LinkEstimator};
use crate::uplink::{ConnectOptions, FrameSender, Payload, ResultReceiver, Uplink, UplinkResult};

/// How a session reaches its tails.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Tail URLs, in order of preference (failover goes down the list and wraps around).
    pub servers: Vec<String>,
    /// Frames on the stream at once.
    pub window: usize,
    /// Dial timeout and keepalive.
    pub connect: ConnectOptions,
    /// First and largest wait between rounds of reconnect attempts.
    pub backoff_initial: Duration,
    /// See `backoff_initial`.
    pub backoff_max: Duration,
    /// How long past a frame's deadline the stream may stay silent before it is dropped
    /// and its frames resent elsewhere.
    pub stall_grace: Duration,
    /// While the link is down, answer frames `LinkDown` at once instead of holding them
    /// until it is back or their deadline passes.
    pub fail_fast_when_down: bool,
    /// Measure the round trip with a small probe this often while connected (`None`: only
    /// at each connect).
    pub probe_interval: Option<Duration>,
}

impl SessionConfig {
    /// Defaults for `servers`: window 4, 0.1 s to 10 s backoff, 1 s stall grace, frames held
    /// while the link is down.
    pub fn new(servers: Vec<String>) -> Self {
        Self {
            servers,
            window: 4,
            connect: ConnectOptions::default(),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            stall_grace: Duration::from_secs(1),
            fail_fast_when_down: false,
            probe_interval: None,
        }
    }
}

/// How a submitted frame ended.
#[derive(Debug)]
pub enum Delivery {
    /// A tail answered (its answer may itself be a per-frame error).
    Answered {
        /// The answer.
        result: UplinkResult,
        /// The tail that answered.
        server: String,
        /// Times the frame was sent (more than 1 after a resend).
        sends: u32,
        /// Bytes of its last gRPC message (protobuf plus the 5-byte prefix).
        wire_bytes: usize,
    },
    /// The deadline passed before an answer came.
    Expired {
        /// Times the frame was sent (0: never, it waited for a link).
        sends: u32,
        /// Bytes of its last gRPC message, 0 if never sent.
        wire_bytes: usize,
        /// The link's state when it expired.
        why: String,
    },
    /// No tail is reachable (only with `fail_fast_when_down`).
    LinkDown {
        /// The last connection error.
        reason: String,
        /// The frame's payload, handed back so the caller can spool it without keeping a
        /// copy of every frame it sends; `None` only if the session itself is gone.
        payload: Option<Payload>,
    },
}

/// A frame waiting for its delivery.
struct Job {
    frame_id: u64,
    payload: Payload,
    deadline: Instant,
    /// When it was last put on a stream.
    sent_at: Option<Instant>,
    sends: u32,
    wire_bytes: usize,
    /// Taken when the delivery is made, so there is only ever one.
    reply: Option<oneshot::Sender<Delivery>>,
}

impl Job {
    /// Answers `LinkDown`, handing the payload back.
    fn link_down(self, reason: String) {
        let Job { payload, reply, .. } = self;
        if let Some(reply) = reply {
            let _ = reply.send(Delivery::LinkDown {
                reason,
                payload: Some(payload),
            });
        }
    }

    fn deliver(&mut self, delivery: Delivery) {
        if let Some(reply) = self.reply.take() {
            // The caller may have stopped waiting; nothing to do then.
            let _ = reply.send(delivery);
        }
    }
}

/// What the session's task shows its handles.
#[derive(Debug, Default)]
struct LinkState {
    /// A stream to a tail is open.
    up: AtomicBool,
    /// Every server failed in a row; the session is backing off.
    down: AtomicBool,
    /// The last connection error.
    last_error: std::sync::Mutex<String>,
    /// The tail on the open stream also runs the full model (takes offloaded images).
    full_model: AtomicBool,
    /// Round trip and bandwidth, from answers and probes.
    estimator: std::sync::Mutex<LinkEstimator>,
}

impl LinkState {
    fn with_estimator(&self, f: impl FnOnce(&mut LinkEstimator)) {
        if let Ok(mut estimator) = self.estimator.lock() {
            f(&mut estimator);
        }
    }
}

/// The handle to a running session; dropping it (and every clone) lets the session finish
/// the frames it has and stop.
#[derive(Debug, Clone)]
pub struct Session {
    jobs: mpsc::Sender<Job>,
    state: Arc<LinkState>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("frame_id", &self.frame_id)
            .field("sends", &self.sends)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Starts a session for `bundle_id` on the current tokio runtime. It dials at once.
    pub fn start(bundle_id: BundleId, config: SessionConfig) -> Self {
        let (jobs, incoming) = mpsc::channel(config.window.max(1));
        let state = Arc::new(LinkState::default());
        let driver = Driver::new(bundle_id, config, incoming, state.clone());
        tokio::spawn(driver.run());
        Self { jobs, state }
    }

    /// Whether a stream to a tail is open now.
    pub fn is_up(&self) -> bool {
        self.state.up.load(Ordering::Relaxed)
    }

    /// Whether every server has failed since the last success (the link is down; the
    /// session keeps probing). False while the first dial is still under way.
    pub fn is_down(&self) -> bool {
        self.state.down.load(Ordering::Relaxed)
    }

    /// The last connection error (which server, what happened), for reports.
    pub fn last_error(&self) -> String {
        self.state
            .last_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    /// Whether the tail on the open stream also runs the bundle's full model, so it takes
    /// offloaded images. False while no stream is open.
    pub fn serves_full_model(&self) -> bool {
        self.is_up() && self.state.full_model.load(Ordering::Relaxed)
    }

    /// The link's round trip and bandwidth as measured so far (kept across reconnects: the
    /// link is usually the same one).
    pub fn estimate(&self) -> LinkEstimate {
        self.state
            .estimator
            .lock()
            .map(|e| e.estimate())
            .unwrap_or_default()
    }

    /// Hands a frame to the session; the receiver gets its one [`Delivery`]. Waits while
    /// the session's queue is full.
    pub async fn submit(
        &self,
        frame_id: u64,
        payload: impl Into<Payload>,
        deadline: Instant,
    ) -> oneshot::Receiver<Delivery> {
        let (reply, delivery) = oneshot::channel();
        let job = Job {
            frame_id,
            payload: payload.into(),
            deadline,
            sent_at: None,
            sends: 0,
            wire_bytes: 0,
            reply: Some(reply),
        };
        if let Err(mpsc::error::SendError(job)) = self.jobs.send(job).await {
            job.link_down("the uplink session has stopped".into());
        }
        delivery
    }
}

/// A connected stream.
struct Connection {
    server: String,
    /// For probes beside the stream.
    uplink: Uplink,
    sender: FrameSender,
    results: ResultReceiver,
}

/// What woke the driver.
enum Event {
    Job(Option<Job>),
    Answer(Result<Option<UplinkResult>, crate::HeadError>),
    Timer,
}

/// The session's one task.
struct Driver {
    bundle_id: BundleId,
    config: SessionConfig,
    incoming: mpsc::Receiver<Job>,
    incoming_open: bool,
    state: Arc<LinkState>,
    /// Not yet on a stream, oldest first.
    waiting: VecDeque<Job>,
    /// On the current stream, in the order sent.
    in_flight: VecDeque<Job>,
    connection: Option<Connection>,
    /// Answers read on the current connection.
    answered_here: usize,
    /// The server to dial next.
    next_server: usize,
    /// Dial failures since the last success.
    failures_in_row: usize,
    down: bool,
    last_error: String,
    backoff: Backoff,
    next_dial: Instant,
    next_probe: Option<Instant>,
}

impl Driver {
    fn new(
        bundle_id: BundleId,
        config: SessionConfig,
        incoming: mpsc::Receiver<Job>,
        state: Arc<LinkState>,
    ) -> Self {
        let backoff = Backoff::new(config.backoff_initial, config.backoff_max);
        Self {
            bundle_id,
            config,
            incoming,
            incoming_open: true,
            state,
            waiting: VecDeque::new(),
            in_flight: VecDeque::new(),
            connection: None,
            answered_here: 0,
            next_server: 0,
            failures_in_row: 0,
            down: false,
            last_error: "not connected yet".into(),
            backoff,
            next_dial: Instant::now(),
            next_probe: None,
        }
    }

    async fn run(mut self) {
        loop {
            self.expire_waiting();
            if self.connection.is_none()
                && Instant::now() >= self.next_dial
                && (self.incoming_open || self.has_work())
            {
                self.dial().await;
                continue;
            }
            self.send_waiting().await;
            if !self.incoming_open && !self.has_work() {
                break;
            }
            if self.stream_stalled() {
                self.broken("no answer from the tail long past a frame's deadline".into());
                continue;
            }
            match self.next_event().await {
                Event::Job(Some(job)) => self.accept(job),
                Event::Job(None) => self.incoming_open = false,
                Event::Answer(answer) => self.answer(answer),
                Event::Timer => self.probe_if_due(),
            }
        }
        self.state.up.store(false, Ordering::Relaxed);
    }

    fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.in_flight.is_empty()
    }

    async fn next_event(&mut self) -> Event {
        let wake = self.next_wakeup();
        let room = self.waiting.len() + self.in_flight.len() < 2 * self.config.window.max(1);
        let answers = self.connection.as_mut().map(|c| &mut c.results);
        tokio::select! {
            job = self.incoming.recv(), if self.incoming_open && room => Event::Job(job),
            answer = async { match answers { Some(r) => r.next().await, None => std::future::pending().await } } => Event::Answer(answer),
            () = tokio::time::sleep_until(wake) => Event::Timer,
        }
    }

    /// The earliest moment something is due: a waiting frame's deadline, a stalled stream,
    /// the next dial.
    fn next_wakeup(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let waiting = self.waiting.iter().map(|j| j.deadline).min();
        let stall = self
            .in_flight
            .front()
            .map(|j| j.deadline + self.config.stall_grace);
        let dial = self.connection.is_none().then_some(self.next_dial);
        let probe = self.connection.as_ref().and(self.next_probe);
        [waiting, stall, dial, probe]
            .into_iter()
            .flatten()
            .fold(far, Instant::min)
    }

    fn accept(&mut self, job: Job) {
        if self.down && self.config.fail_fast_when_down {
            job.link_down(self.last_error.clone());
        } else {
            self.waiting.push_back(job);
        }
    }

    /// Answers `Expired` to every waiting frame past its deadline.
    fn expire_waiting(&mut self) {
        let now = Instant::now();
        // Runs on every event: describe the link only when a frame is actually due.
        if self.waiting.iter().all(|job| job.deadline > now) {
            return;
        }
        let why = self.link_state();
        self.waiting.retain_mut(|job| {
            if job.deadline > now {
                return true;
            }
            job.deliver(Delivery::Expired {
                sends: job.sends,
                wire_bytes: job.wire_bytes,
                why: why.clone(),
            });
            false
        });
    }

    fn link_state(&self) -> String {
        match &self.connection {
            Some(c) => format!("waited for room on the stream to {}", c.server),
            None => format!("no tail reachable: {}", self.last_error),
        }
    }

    /// True when the oldest frame on the stream is past its deadline plus the grace: the
    /// tail would have answered it (even just `DEADLINE_EXCEEDED`) by now if it could.
    fn stream_stalled(&self) -> bool {
        self.in_flight
            .front()
            .is_some_and(|j| Instant::now() >= j.deadline + self.config.stall_grace)
    }

    async fn send_waiting(&mut self) {
        let window = self.config.window.max(1);
        while self.in_flight.len() < window {
            let Some(connection) = self.connection.as_ref() else {
                return;
            };
            let Some(mut job) = self.waiting.pop_front() else {
                return;
            };
            let remaining = job.deadline.saturating_duration_since(Instant::now());
            // The stream's channel holds `window` frames and at most `window` are in flight,
            // so this does not wait on a stalled stream.
            let sent = connection
                .sender
                .send_within(job.frame_id, job.payload.clone(), Some(remaining))
                .await;
            job.sends += 1;
            job.sent_at = Some(Instant::now());
            match sent {
                Ok(wire_bytes) => {
                    job.wire_bytes = wire_bytes;
                    self.in_flight.push_back(job);
                }
                Err(error) => {
                    self.in_flight.push_back(job);
                    self.broken(error.to_string());
                    return;
                }
            }
        }
    }

    fn answer(&mut self, answer: Result<Option<UplinkResult>, crate::HeadError>) {
        match answer {
            Ok(Some(result)) => {
                let Some(mut job) = self.in_flight.pop_front() else {
                    self.broken(format!(
                        "answer to frame {} that was not sent",
                        result.frame_id
                    ));
                    return;
                };
                if job.frame_id != result.frame_id {
                    let reason = format!(
                        "tail answered frame {} when frame {} was due",
                        result.frame_id, job.frame_id
                    );
                    self.in_flight.push_front(job);
                    self.broken(reason);
                    return;
                }
                let server = self
                    .connection
                    .as_ref()
                    .map(|c| c.server.clone())
                    .unwrap_or_default();
                let (sends, wire_bytes) = (job.sends, job.wire_bytes);
                if let Some(sent_at) = job.sent_at {
                    let tail =
                        Duration::try_from_secs_f64(result.tail_ms / 1e3).unwrap_or_default();
                    let net = sent_at.elapsed().saturating_sub(tail);
                    let bytes = job.payload.len();
                    self.state.with_estimator(|e| e.record_transfer(bytes, net));
                }
                self.answered_here += 1;
                if self.answered_here == 1 {
                    // The tail works: forget the failures before it.
                    self.failures_in_row = 0;
                    self.backoff.reset();
                }
                job.deliver(Delivery::Answered {
                    result,
                    server,
                    sends,
                    wire_bytes,
                });
            }
            Ok(None) if self.has_work() || self.incoming_open => {
                self.broken("the tail ended the stream".into());
            }
            Ok(None) => self.connection = None,
            Err(error) => self.broken(error.to_string()),
        }
    }

    /// The stream is gone: its unanswered frames go back to the front of the queue, and the
    /// next dial goes to the next server right away.
    fn broken(&mut self, reason: String) {
        let server = self.connection.take().map(|c| c.server).unwrap_or_default();
        tracing::warn!(server, %reason, resending = self.in_flight.len(), "uplink stream lost");
        self.state.up.store(false, Ordering::Relaxed);
        self.last_error = format!("{server}: {reason}");
        while let Some(job) = self.in_flight.pop_back() {
            self.waiting.push_front(job);
        }
        if self.answered_here == 0 {
            // A tail that takes the stream and drops it before answering anything counts
            // as a failed dial, so a server stuck that way is not redialled in a tight loop.
            self.failed_attempt();
        } else {
            self.next_server = (self.next_server + 1) % self.config.servers.len().max(1);
            self.next_dial = Instant::now();
        }
    }

    async fn dial(&mut self) {
        let Some(server) = self.config.servers.get(self.next_server).cloned() else {
            self.last_error = "no server configured".into();
            self.set_down(true);
            self.next_dial = Instant::now() + self.config.backoff_max;
            self.fail_fast();
            return;
        };
        let opened = match Uplink::connect_with(&server, self.bundle_id, &self.config.connect).await
        {
            Ok(mut uplink) => uplink
                .open_stream(self.config.window)
                .await
                .map(|(sender, results)| (uplink, sender, results)),
            Err(error) => Err(error),
        };
        match opened {
            Ok((uplink, sender, results)) => {
                tracing::info!(server, "uplink stream open");
                let rtt = uplink.negotiate_rtt();
                self.state.with_estimator(|e| e.record_round_trip(rtt));
                self.state
                    .full_model
                    .store(uplink.serves_full_model(), Ordering::Relaxed);
                self.next_probe = self
                    .config
                    .probe_interval
                    .map(|every| Instant::now() + every);
                self.connection = Some(Connection {
                    server,
                    uplink,
                    sender,
                    results,
                });
                self.answered_here = 0;
                self.set_down(false);
                self.state.up.store(true, Ordering::Relaxed);
            }
            Err(error) => {
                tracing::warn!(server, %error, "uplink dial failed");
                self.last_error = error.to_string();
                self.failed_attempt();
            }
        }
    }

    /// Sends a probe beside the stream when one is due; its round trip goes to the
    /// estimate. It runs on its own task, so a slow link does not hold the session up.
    fn probe_if_due(&mut self) {
        let (Some(due), Some(every), Some(connection)) = (
            self.next_probe,
            self.config.probe_interval,
            self.connection.as_ref(),
        ) else {
            return;
        };
        if Instant::now() < due {
            return;
        }
        self.next_probe = Some(Instant::now() + every);
        let mut uplink = connection.uplink.clone();
        let state = self.state.clone();
        tokio::spawn(async move {
            // A probe that fails says nothing the stream will not say itself.
            if let Ok(Ok(rtt)) = tokio::time::timeout(every, uplink.probe()).await {
                state.with_estimator(|e| e.record_round_trip(rtt));
            }
        });
    }

    /// A dial (or a stream that answered nothing) failed: try the next server now, or, once
    /// every server has failed in a row, call the link down and back off.
    fn failed_attempt(&mut self) {
        let servers = self.config.servers.len().max(1);
        self.failures_in_row += 1;
        self.next_server = (self.next_server + 1) % servers;
        if self.failures_in_row.is_multiple_of(servers) {
            self.set_down(true);
            self.next_dial = Instant::now() + self.backoff.next_wait();
            self.fail_fast();
        } else {
            self.next_dial = Instant::now();
        }
    }

    fn set_down(&mut self, down: bool) {
        self.down = down;
        self.state.down.store(down, Ordering::Relaxed);
        if let Ok(mut shown) = self.state.last_error.lock() {
            shown.clone_from(&self.last_error);
        }
    }

    /// With `fail_fast_when_down`, answers every waiting frame `LinkDown`.
    fn fail_fast(&mut self) {
        if !self.config.fail_fast_when_down {
            return;
        }
        for job in self.waiting.drain(..) {
            job.link_down(self.last_error.clone());
        }
    }
}
