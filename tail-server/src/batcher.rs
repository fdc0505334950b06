//! The dynamic batcher: requests for one model wait in a bounded queue and run together.
//!
//! A tail model on a GPU (or a vectorised CPU kernel) does far more work per second on a
//! batch of frames than on one frame at a time, and frames from many heads arrive one by
//! one. The batcher sits between the two, with the knobs Triton's dynamic batcher has:
//!
//! - **max batch size**: the most samples one model run takes;
//! - **max queue delay**: how long the oldest request may wait for company before a smaller
//!   batch runs anyway (0: run whatever is waiting, batching only under load);
//! - **preferred batch sizes**: sizes the batcher runs at once when it can form them (sizes
//!   a TensorRT engine was built for, say), without waiting out the delay;
//! - **queue size**: a bound on waiting requests; a request beyond it is refused at once
//!   ([`BatchError::QueueFull`], `RESOURCE_EXHAUSTED` on the wire) instead of growing
//!   latency for everyone;
//! - **deadlines**: a request whose deadline passed while it waited is dropped before
//!   compute and answered [`BatchError::DeadlineExceeded`].
//!
//! Each model instance is one OS thread that owns its [`Model`]: model execution never runs
//! on the async workers. Instances share the queue; while one computes, the next batch
//! forms. Requests leave the queue in arrival order, so a stream that waits for each answer
//! in turn gets them in order.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cleave_engine::{Model, Tensor};
use tokio::sync::oneshot;

use crate::telemetry::ModelMetrics;

/// How one model's requests are batched; the fields follow Triton's `dynamic_batching`.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchingConfig {
    /// Most samples in one model run; 1 turns batching off.
    pub max_batch_size: usize,
    /// Longest the oldest waiting request is held back to grow its batch.
    pub max_queue_delay: Duration,
    /// Batch sizes run as soon as they can be formed, ascending; each ≤ `max_batch_size`.
    pub preferred_batch_sizes: Vec<usize>,
    /// Most requests waiting; more are refused with [`BatchError::QueueFull`].
    pub max_queue_size: usize,
    /// Deadline given to requests that bring none; `None`: wait as long as it takes.
    pub default_timeout: Option<Duration>,
}

impl Default for BatchingConfig {
    /// Batches of up to 8, 1 ms of queue delay, 256 waiting requests, no deadline.
    fn default() -> Self {
        Self {
            max_batch_size: 8,
            max_queue_delay: Duration::from_millis(1),
            preferred_batch_sizes: Vec::new(),
            max_queue_size: 256,
            default_timeout: None,
        }
    }
}

impl BatchingConfig {
    /// Checks the fields against each other.
    ///
    /// # Errors
    ///
    /// A sentence naming the field that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_batch_size == 0 {
            return Err("max_batch_size must be at least 1".into());
        }
        if self.max_queue_size == 0 {
            return Err("max_queue_size must be at least 1".into());
        }
        if let Some(&bad) = self
            .preferred_batch_sizes
            .iter()
            .find(|&&s| s == 0 || s > self.max_batch_size)
        {
            return Err(format!(
                "preferred batch size {bad} is not within 1..={} (max_batch_size)",
                self.max_batch_size
            ));
        }
        if self.preferred_batch_sizes.windows(2).any(|w| w[0] >= w[1]) {
            return Err("preferred_batch_sizes must be ascending without repeats".into());
        }
        Ok(())
    }
}

/// Why a request got no output.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// The queue was full when the request came.
    #[error("the queue of {model} is full ({capacity} requests waiting); retry later")]
    QueueFull {
        /// The model.
        model: String,
        /// Its queue bound.
        capacity: usize,
    },
    /// The request's deadline passed before it ran.
    #[error("deadline exceeded after {waited:?} in the queue of {model}; dropped before compute")]
    DeadlineExceeded {
        /// The model.
        model: String,
        /// Time spent waiting.
        waited: Duration,
    },
    /// The request has more samples than one batch may hold, or a shape the model lacks.
    #[error("{0}")]
    BadRequest(String),
    /// The model failed on the batch the request was in.
    #[error("model run failed: {0}")]
    Model(String),
    /// The batcher has stopped (server shutting down).
    #[error("the model {0} is shutting down")]
    Stopped(String),
}

/// A request's output and what it cost.
#[derive(Debug, Clone)]
pub struct BatchOutput {
    /// The request's rows of the model output, batch axis first.
    pub output: Tensor,
    /// Time spent waiting in the queue.
    pub queue: Duration,
    /// Time of the model run the request was part of.
    pub compute: Duration,
    /// Samples in that run.
    pub batch_size: usize,
}

struct Pending {
    input: Tensor,
    rows: usize,
    enqueued: Instant,
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<BatchOutput, BatchError>>,
}

impl Pending {
    fn rows(&self) -> usize {
        self.rows
    }
}

#[derive(Default)]
struct Queue {
    pending: VecDeque<Pending>,
    closed: bool,
}

struct Shared {
    model: String,
    metrics: ModelMetrics,
    config: BatchingConfig,
    sample_shape: Vec<usize>,
    queue: Mutex<Queue>,
    arrived: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves the queue itself consistent (every change is
        // a single push or pop), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Handle to one model's queue and instance threads; cheap to clone. Dropping the last
/// handle — or calling [`Batcher::close`] — lets the instances finish what is queued and
/// stop.
#[derive(Clone)]
pub struct Batcher {
    shared: Arc<Shared>,
    _closer: Arc<Closer>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("model", &self.shared.model)
            .field("config", &self.shared.config)
            .finish()
    }
}

/// Closes the queue when the last [`Batcher`] handle goes.
struct Closer(Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.arrived.notify_all();
    }
}

impl Batcher {
    /// Starts one thread per model in `instances` (all the same model, loaded once each),
    /// named after `model`.
    ///
    /// # Errors
    ///
    /// An invalid config, instances of different shapes, or a thread that cannot start.
    pub fn start(
        model: &str,
        instances: Vec<Model>,
        config: BatchingConfig,
    ) -> Result<Self, String> {
        config.validate()?;
        let first = instances
            .first()
            .ok_or_else(|| format!("{model}: no model instance to run"))?;
        let sample_shape = first.input_shape().to_vec();
        if instances
            .iter()
            .any(|m| m.input_shape() != sample_shape.as_slice())
        {
            return Err(format!("{model}: instances disagree on the input shape"));
        }
        let shared = Arc::new(Shared {
            model: model.to_string(),
            metrics: ModelMetrics::new(model),
            config,
            sample_shape,
            queue: Mutex::new(Queue::default()),
            arrived: Condvar::new(),
        });
        for (index, instance) in instances.into_iter().enumerate() {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("cleave-model-{index}"))
                .spawn(move || run_instance(&shared, &instance))
                .map_err(|e| format!("{model}: cannot start a model thread: {e}"))?;
        }
        Ok(Self {
            _closer: Arc::new(Closer(shared.clone())),
            shared,
        })
    }

    /// The batching settings.
    pub fn config(&self) -> &BatchingConfig {
        &self.shared.config
    }

    /// Requests waiting now.
    pub fn queued(&self) -> usize {
        self.shared.lock().pending.len()
    }

    /// Queues `input` (`[rows, ..sample]`) and waits for its rows of the output.
    ///
    /// `deadline` (or the config's default timeout) bounds the time in the queue: a request
    /// still waiting then is dropped before compute. A full queue refuses at once.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the reply; the request may still run once.
    ///
    /// # Errors
    ///
    /// Every [`BatchError`].
    pub async fn infer(
        &self,
        input: Tensor,
        deadline: Option<Instant>,
    ) -> Result<BatchOutput, BatchError> {
        let answer = self.submit(input, deadline)?;
        answer
            .await
            .map_err(|_| BatchError::Stopped(self.shared.model.clone()))?
    }

    /// Queues a request and returns the receiver of its answer.
    fn submit(
        &self,
        input: Tensor,
        deadline: Option<Instant>,
    ) -> Result<oneshot::Receiver<Result<BatchOutput, BatchError>>, BatchError> {
        let shared = &self.shared;
        let rows = input.shape.first().copied().unwrap_or(0);
        if input.shape.get(1..) != Some(shared.sample_shape.as_slice()) || rows == 0 {
            return Err(BatchError::BadRequest(format!(
                "input shape {:?} does not fit {}: expected [N, {}]",
                input.shape,
                shared.model,
                join(&shared.sample_shape)
            )));
        }
        if rows > shared.config.max_batch_size {
            return Err(BatchError::BadRequest(format!(
                "{rows} samples in one request exceed the max batch size {} of {}",
                shared.config.max_batch_size, shared.model
            )));
        }
        let now = Instant::now();
        let deadline = deadline.or_else(|| shared.config.default_timeout.map(|t| now + t));
        let (reply, answer) = oneshot::channel();
        {
            let mut queue = shared.lock();
            if queue.closed {
                return Err(BatchError::Stopped(shared.model.clone()));
            }
            if queue.pending.len() >= shared.config.max_queue_size {
                return Err(BatchError::QueueFull {
                    model: shared.model.clone(),
                    capacity: shared.config.max_queue_size,
                });
            }
            queue.pending.push_back(Pending {
                input,
                rows,
                enqueued: now,
                deadline,
                reply,
            });
            shared.metrics.pending(queue.pending.len());
        }
        shared.arrived.notify_one();
        Ok(answer)
    }

    /// Stops taking requests; queued ones still run.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.arrived.notify_all();
    }
}

fn join(dims: &[usize]) -> String {
    dims.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One instance's loop: form a batch, run it, answer, until the queue is closed and empty.
fn run_instance(shared: &Shared, model: &Model) {
    let _guard = InstanceGuard(shared);
    while let Some(batch) = next_batch(shared) {
        run_batch(shared, model, batch);
    }
}

/// If an instance thread dies of a panic (the model's own panics are caught in
/// [`run_batch`]; this is for the batcher's), the queue closes and every waiting request is
/// answered, instead of the model hanging while it keeps accepting work.
struct InstanceGuard<'a>(&'a Shared);

impl Drop for InstanceGuard<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut queue = self.0.lock();
        queue.closed = true;
        for request in queue.pending.drain(..) {
            let _ = request
                .reply
                .send(Err(BatchError::Stopped(self.0.model.clone())));
        }
        drop(queue);
        self.0.arrived.notify_all();
        tracing::error!(model = %self.0.model, "a model thread panicked; the model stopped");
    }
}

/// Waits until a batch is due and takes it from the queue; `None` once closed and drained.
fn next_batch(shared: &Shared) -> Option<Vec<Pending>> {
    let config = &shared.config;
    let mut queue = shared.lock();
    loop {
        drop_expired(shared, &mut queue.pending);
        if queue.pending.is_empty() {
            if queue.closed {
                return None;
            }
            queue = shared
                .arrived
                .wait(queue)
                .unwrap_or_else(|e| e.into_inner());
            continue;
        }
        let rows = waiting_rows(&queue.pending, config.max_batch_size);
        let oldest = queue.pending.front().map(|p| p.enqueued)?;
        let waited = oldest.elapsed();
        let target = if rows >= config.max_batch_size {
            Some(config.max_batch_size)
        } else if let Some(&preferred) = config
            .preferred_batch_sizes
            .iter()
            .rev()
            .find(|&&s| s <= rows && s > 1)
        {
            Some(preferred)
        } else if waited >= config.max_queue_delay || queue.closed {
            Some(rows)
        } else {
            None
        };
        if let Some(target) = target {
            let batch = take_rows(&mut queue.pending, target);
            shared.metrics.pending(queue.pending.len());
            drop(queue);
            // Others may be waiting behind this batch for a second instance.
            shared.arrived.notify_one();
            return Some(batch);
        }
        // Wake when the delay runs out or the earliest deadline passes, whichever is first.
        let mut wake = config.max_queue_delay - waited;
        if let Some(deadline) = queue.pending.iter().filter_map(|p| p.deadline).min() {
            wake = wake.min(deadline.saturating_duration_since(Instant::now()));
        }
        queue = shared
            .arrived
            .wait_timeout(queue, wake)
            .map(|(q, _)| q)
            .unwrap_or_else(|e| e.into_inner().0);
    }
}

/// Samples in the requests at the front of the queue that fit in one batch, capped at `max`.
fn waiting_rows(pending: &VecDeque<Pending>, max: usize) -> usize {
    let mut rows = 0;
    for request in pending {
        if rows + request.rows() > max {
            break;
        }
        rows += request.rows();
    }
    rows
}

/// Takes whole requests from the front while they fit in `target` samples (at least one).
fn take_rows(pending: &mut VecDeque<Pending>, target: usize) -> Vec<Pending> {
    let mut batch = Vec::new();
    let mut rows = 0;
    while let Some(front) = pending.front() {
        if !batch.is_empty() && rows + front.rows() > target {
            break;
        }
        rows += front.rows();
        batch.extend(pending.pop_front());
    }
    batch
}

/// Answers every request whose deadline has passed and removes it.
fn drop_expired(shared: &Shared, pending: &mut VecDeque<Pending>) {
    let now = Instant::now();
    if !pending.iter().any(|p| p.deadline.is_some_and(|d| d <= now)) {
        return;
    }
    let (expired, kept): (VecDeque<Pending>, VecDeque<Pending>) = pending
        .drain(..)
        .partition(|p| p.deadline.is_some_and(|d| d <= now));
    *pending = kept;
    shared.metrics.pending(pending.len());
    for request in expired {
        let waited = now - request.enqueued;
        shared.metrics.queued(waited);
        let _ = request.reply.send(Err(BatchError::DeadlineExceeded {
            model: shared.model.clone(),
            waited,
        }));
    }
}

/// Concatenates the batch, runs the model once and hands each request its rows.
fn run_batch(shared: &Shared, model: &Model, mut batch: Vec<Pending>) {
    let started = Instant::now();
    let rows: usize = batch.iter().map(Pending::rows).sum();
    let mut shape = vec![rows];
    shape.extend_from_slice(&shared.sample_shape);
    let input = if let [only] = batch.as_mut_slice() {
        std::mem::replace(&mut only.input, Tensor::new(vec![0], Vec::new()))
    } else {
        let mut data = Vec::with_capacity(shape.iter().product());
        for request in &batch {
            data.extend_from_slice(&request.input.data);
        }
        Tensor::new(shape, data)
    };
    // A panic inside a backend fails this batch, not the instance: the thread lives on.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.run(&input)))
        .unwrap_or_else(|_| {
            Err(cleave_engine::EngineError::Run {
                backend: model.backend().name(),
                reason: "the backend panicked".into(),
            })
        });
    let compute = started.elapsed();
    shared.metrics.executed(rows, compute);
    match result {
        Ok(output) => {
            let per_row: usize = output.shape[1..].iter().product();
            let mut at = 0;
            for request in batch {
                let n = request.rows();
                let mut out_shape = output.shape.clone();
                out_shape[0] = n;
                let data = output.data[at * per_row..(at + n) * per_row].to_vec();
                at += n;
                let queue = started.saturating_duration_since(request.enqueued);
                shared.metrics.queued(queue);
                let _ = request.reply.send(Ok(BatchOutput {
                    output: Tensor::new(out_shape, data),
                    queue,
                    compute,
                    batch_size: rows,
                }));
            }
        }
        Err(error) => {
            let message = error.to_string();
            for request in batch {
                let _ = request.reply.send(Err(BatchError::Model(message.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(rows: usize) -> Pending {
        Pending {
            input: Tensor::new(vec![rows, 1], vec![0.0; rows]),
            rows,
            enqueued: Instant::now(),
            deadline: None,
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn batches_take_whole_requests_in_arrival_order() {
        let mut queue: VecDeque<Pending> = [1, 2, 3, 1].into_iter().map(pending).collect();
        assert_eq!(waiting_rows(&queue, 4), 3);
        assert_eq!(waiting_rows(&queue, 6), 6);
        let batch = take_rows(&mut queue, 3);
        assert_eq!(batch.iter().map(Pending::rows).collect::<Vec<_>>(), [1, 2]);
        // A request larger than the target still goes alone rather than starving.
        let batch = take_rows(&mut queue, 2);
        assert_eq!(batch.iter().map(Pending::rows).collect::<Vec<_>>(), [3]);
        assert_eq!(queue.len(), 1);
    }

    #[test]
    fn config_validation_names_the_bad_field() {
        let mut config = BatchingConfig::default();
        assert!(config.validate().is_ok());
        config.preferred_batch_sizes = vec![4, 16];
        assert!(config.validate().unwrap_err().contains("16"));
        config.preferred_batch_sizes = vec![4, 2];
        assert!(config.validate().unwrap_err().contains("ascending"));
        config.preferred_batch_sizes.clear();
        config.max_queue_size = 0;
        assert!(config.validate().unwrap_err().contains("max_queue_size"));
    }
}
