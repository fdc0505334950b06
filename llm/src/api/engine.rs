//! The engine: one [`Decoder`] on a thread of its own, running one sequence at a time, and
//! a bounded queue of the requests waiting for it.
//!
//! The HTTP handlers tokenize and check a request, then [`Engine::submit`] it; a full
//! queue is refused at once (the caller answers 503). The thread sends the request's text
//! back as it is generated, then the outcome or the failure. A request whose receiver is
//! gone (the client disconnected) is skipped if it is still waiting, and stopped at its
//! next token if it is running: the decoder is wrapped so that every step first checks.
//!
//! After a decoder failure (a cluster node gone) the engine is *broken*, which `/health`
//! reports; while no request comes it tries [`Decoder::reset`] (for a cluster: re-forming
//! it) every [`EngineOptions::retry_every`], and any request that succeeds mends it too.

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::chat::ChatTemplate;
use crate::engine::{Decoder, Limits, Outcome, generate};
use crate::model::{Config, ModelError};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The model's name in the API (`/v1/models`, answers).
    pub name: String,
    /// Most requests waiting while one runs; more are refused.
    pub queue: usize,
    /// While broken and idle, how often to try to mend the decoder.
    pub retry_every: Duration,
}

/// What the engine sends back for a request.
#[derive(Debug)]
pub(crate) enum Event {
    /// Text generated (never half a character, never part of a stop text).
    Text(String),
    /// The generation ended.
    Done(Outcome),
    /// The decoder failed; the message says how.
    Failed(String),
}

/// A request, tokenized and checked.
#[derive(Debug)]
pub(crate) struct Job {
    /// What the request is, for the log (`chat.completion chatcmpl-…`).
    pub(crate) label: String,
    pub(crate) prompt: Vec<u32>,
    pub(crate) limits: Limits,
    pub(crate) sampling: SamplingParams,
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The queue is full.
    Full,
    /// The engine's thread is gone.
    Stopped,
}

/// What `/health` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Why the decoder is unusable (a failed cluster), if it is.
    pub broken: Option<String>,
    /// Whether a request is running.
    pub running: bool,
    /// Requests waiting.
    pub waiting: usize,
    /// Most requests that may wait.
    pub queue: usize,
    /// Requests answered since the start (failed ones included).
    pub served: u64,
}

/// State shared between the handlers and the engine's thread.
#[derive(Debug, Default)]
struct Shared {
    waiting: AtomicUsize,
    running: AtomicBool,
    served: AtomicU64,
    broken: Mutex<Option<String>>,
}

impl Shared {
    fn broken(&self) -> Option<String> {
        self.broken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_broken(&self, why: Option<String>) {
        *self.broken.lock().unwrap_or_else(PoisonError::into_inner) = why;
    }
}

/// The decoder's thread and its queue; shared by every HTTP handler.
pub struct Engine {
    jobs: SyncSender<(Job, UnboundedSender<Event>)>,
    shared: Arc<Shared>,
    options: EngineOptions,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    config: Config,
    capacity: usize,
    started: u64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("options", &self.options)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Starts the thread that owns `decoder`. `template` is the model's chat template
    /// (without one, `/v1/chat/completions` answers 400). `log` receives a line per
    /// request and per failure.
    ///
    /// # Errors
    ///
    /// The thread could not be started.
    pub fn start(
        decoder: Box<dyn Decoder>,
        tokenizer: Tokenizer,
        template: Option<ChatTemplate>,
        options: EngineOptions,
        log: Box<dyn FnMut(&str) + Send>,
    ) -> std::io::Result<Self> {
        let (jobs, queue) = std::sync::mpsc::sync_channel(options.queue);
        let shared = Arc::new(Shared::default());
        let tokenizer = Arc::new(tokenizer);
        let config = decoder.config().clone();
        let capacity = decoder.capacity();
        let worker = Worker {
            decoder,
            tokenizer: tokenizer.clone(),
            shared: shared.clone(),
            retry_every: options.retry_every,
            log,
        };
        std::thread::Builder::new()
            .name("cleave-llm-engine".into())
            .spawn(move || worker.run(&queue))?;
        Ok(Self {
            jobs,
            shared,
            options,
            tokenizer,
            template,
            config,
            capacity,
            started: unix_time(),
        })
    }

    /// The model's name in the API.
    pub fn name(&self) -> &str {
        &self.options.name
    }

    /// Most tokens of one sequence, prompt and answer together.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The model's hyperparameters.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// When the engine started (Unix seconds).
    pub fn started(&self) -> u64 {
        self.started
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template, if the model has one.
    pub fn template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// The state of the engine now.
    pub fn health(&self) -> Health {
        Health {
            broken: self.shared.broken(),
            running: self.shared.running.load(Ordering::SeqCst),
            waiting: self.shared.waiting.load(Ordering::SeqCst),
            queue: self.options.queue,
            served: self.shared.served.load(Ordering::SeqCst),
        }
    }

    /// Queues `job`; its events come on the receiver. Dropping the receiver cancels it.
    pub(crate) fn submit(&self, job: Job) -> Result<UnboundedReceiver<Event>, Refused> {
        let (events, receiver) = unbounded_channel();
        self.shared.waiting.fetch_add(1, Ordering::SeqCst);
        match self.jobs.try_send((job, events)) {
            Ok(()) => Ok(receiver),
            Err(e) => {
                self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => Refused::Full,
                    TrySendError::Disconnected(_) => Refused::Stopped,
                })
            }
        }
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The engine's thread.
struct Worker {
    decoder: Box<dyn Decoder>,
    tokenizer: Arc<Tokenizer>,
    shared: Arc<Shared>,
    retry_every: Duration,
    log: Box<dyn FnMut(&str) + Send>,
}

impl Worker {
    fn run(mut self, queue: &Receiver<(Job, UnboundedSender<Event>)>) {
        loop {
            let next = if self.shared.broken().is_some() {
                match queue.recv_timeout(self.retry_every) {
                    Ok(next) => next,
                    Err(RecvTimeoutError::Timeout) => {
                        self.mend();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match queue.recv() {
                    Ok(next) => next,
                    Err(_) => return,
                }
            };
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            let (job, events) = next;
            if events.is_closed() {
                (self.log)(&format!("{}: the client left before it started", job.label));
                continue;
            }
            self.shared.running.store(true, Ordering::SeqCst);
            self.serve(&job, &events);
            self.shared.running.store(false, Ordering::SeqCst);
            self.shared.served.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Tries to make a broken decoder usable again.
    fn mend(&mut self) {
        let attempt = std::panic::catch_unwind(AssertUnwindSafe(|| self.decoder.reset()));
        match attempt {
            Ok(Ok(())) => {
                (self.log)("the decoder works again");
                self.shared.set_broken(None);
            }
            Ok(Err(e)) => self.shared.set_broken(Some(e.to_string())),
            Err(_) => self
                .shared
                .set_broken(Some("the decoder panicked while re-forming".into())),
        }
    }

    fn serve(&mut self, job: &Job, events: &UnboundedSender<Event>) {
        let started = Instant::now();
        let cancelled = AtomicBool::new(false);
        let mut sampler = Sampler::new(job.sampling);
        let result = {
            let mut watched = Watched {
                inner: self.decoder.as_mut(),
                events,
                cancelled: &cancelled,
            };
            let tokenizer = &self.tokenizer;
            std::panic::catch_unwind(AssertUnwindSafe(|| {
                generate(
                    &mut watched,
                    tokenizer,
                    &job.prompt,
                    &job.limits,
                    &mut |logits| sampler.pick(logits),
                    &mut |text| {
                        if events.send(Event::Text(text.to_string())).is_err() {
                            cancelled.store(true, Ordering::SeqCst);
                            ControlFlow::Break(())
                        } else {
                            ControlFlow::Continue(())
                        }
                    },
                )
            }))
        };
        let seconds = started.elapsed().as_secs_f64();
        if cancelled.load(Ordering::SeqCst) {
            (self.log)(&format!(
                "{}: the client left after {seconds:.2} s",
                job.label
            ));
            return;
        }
        match result {
            Ok(Ok(outcome)) => {
                self.shared.set_broken(None);
                (self.log)(&format!(
                    "{}: prompt {} tokens, {} generated ({}) in {seconds:.2} s",
                    job.label,
                    outcome.prompt_tokens,
                    outcome.tokens.len(),
                    outcome.finish.as_str()
                ));
                let _ = events.send(Event::Done(outcome));
            }
            Ok(Err(error)) => {
                let why = error.to_string();
                (self.log)(&format!("{}: the decoder failed: {why}", job.label));
                self.shared.set_broken(Some(why.clone()));
                let _ = events.send(Event::Failed(why));
            }
            Err(_) => {
                let why = "the decoder panicked; it is reset before the next request".to_string();
                (self.log)(&format!("{}: {why}", job.label));
                self.shared.set_broken(Some(why.clone()));
                let _ = events.send(Event::Failed(why));
            }
        }
    }
}

/// The decoder of one request: every step first checks that the client is still there.
struct Watched<'a> {
    inner: &'a mut dyn Decoder,
    events: &'a UnboundedSender<Event>,
    cancelled: &'a AtomicBool,
}

impl Decoder for Watched<'_> {
    fn config(&self) -> &Config {
        self.inner.config()
    }

    fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    fn position(&self) -> usize {
        self.inner.position()
    }

    fn reset(&mut self) -> Result<(), ModelError> {
        self.inner.reset()
    }

    fn step(&mut self, token: u32) -> Result<Vec<f32>, ModelError> {
        if self.events.is_closed() {
            self.cancelled.store(true, Ordering::SeqCst);
            return Err(ModelError::Unsupported("the client went away".into()));
        }
        self.inner.step(token)
    }

    fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        // The inner decoder's own prefill (it may batch the prompt): cancelled before it
        // starts, or at the first generated token.
        if self.events.is_closed() {
            self.cancelled.store(true, Ordering::SeqCst);
            return Err(ModelError::Unsupported("the client went away".into()));
        }
        self.inner.prefill(tokens)
    }
}
