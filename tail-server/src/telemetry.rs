//! The tail's Prometheus metrics: names, meanings and the one recorder that renders them.
//!
//! Names follow Triton's (`nv_inference_*`) with the `cleave_` prefix and the unit in the
//! name, so an operator's dashboards translate one to one:
//!
//! | cleave | Triton | meaning |
//! |---|---|---|
//! | `cleave_inference_request_success_total` | `nv_inference_request_success` | requests answered with an output |
//! | `cleave_inference_request_failure_total{reason}` | `nv_inference_request_failure` | requests answered with an error, by reason |
//! | `cleave_inference_count_total` | `nv_inference_count` | samples inferred (a batch of 8 counts 8) |
//! | `cleave_inference_exec_count_total` | `nv_inference_exec_count` | model runs (a batch of 8 counts 1) |
//! | `cleave_inference_request_duration_seconds` | `nv_inference_request_duration_us` | receipt to answer, per request |
//! | `cleave_inference_queue_duration_seconds` | `nv_inference_queue_duration_us` | time in the batcher's queue |
//! | `cleave_inference_compute_duration_seconds` | `nv_inference_compute_infer_duration_us` | model run time, per run |
//! | `cleave_inference_batch_size` | — | samples per model run |
//! | `cleave_inference_pending_requests` | `nv_inference_pending_request_count` | requests waiting now |
//! | `cleave_received_bytes_total` | — | coded frame and tensor bytes received |
//!
//! Every series carries a `model` label. Triton's durations are cumulative microsecond
//! counters; these are histograms in seconds (Prometheus' convention), whose `_sum` and
//! `_count` give the same averages. The recorder is process-wide (the `metrics` crate has
//! one global recorder), so several servers in one process share it; their series differ by
//! model name.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests answered with an output.
pub const REQUEST_SUCCESS: &str = "cleave_inference_request_success_total";
/// Requests answered with an error, labelled by `reason`.
pub const REQUEST_FAILURE: &str = "cleave_inference_request_failure_total";
/// Samples inferred.
pub const INFERENCE_COUNT: &str = "cleave_inference_count_total";
/// Model runs.
pub const EXEC_COUNT: &str = "cleave_inference_exec_count_total";
/// Receipt-to-answer time per request.
pub const REQUEST_DURATION: &str = "cleave_inference_request_duration_seconds";
/// Time in the queue per request.
pub const QUEUE_DURATION: &str = "cleave_inference_queue_duration_seconds";
/// Model run time.
pub const COMPUTE_DURATION: &str = "cleave_inference_compute_duration_seconds";
/// Samples per model run.
pub const BATCH_SIZE: &str = "cleave_inference_batch_size";
/// Requests waiting now.
pub const PENDING: &str = "cleave_inference_pending_requests";
/// Bytes received.
pub const RECEIVED_BYTES: &str = "cleave_received_bytes_total";

/// Why a request failed, as the `reason` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Bytes that are not a valid frame, or a tensor of the wrong shape or type.
    BadInput,
    /// The queue was full.
    QueueFull,
    /// The deadline passed before compute.
    Deadline,
    /// The model failed.
    Model,
    /// The server is shutting down.
    Shutdown,
}

impl Failure {
    fn label(self) -> &'static str {
        match self {
            Failure::BadInput => "bad_input",
            Failure::QueueFull => "queue_full",
            Failure::Deadline => "deadline",
            Failure::Model => "model",
            Failure::Shutdown => "shutdown",
        }
    }
}

/// The process's Prometheus recorder, installed on first use. `None` if the embedding
/// program installed another `metrics` recorder first (then `/metrics` says so).
pub fn recorder() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ];
            let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &sizes))
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(REQUEST_SUCCESS, "Requests answered with an output");
    describe_counter!(
        REQUEST_FAILURE,
        "Requests answered with an error, by reason"
    );
    describe_counter!(INFERENCE_COUNT, "Samples inferred (a batch of 8 counts 8)");
    describe_counter!(EXEC_COUNT, "Model runs (a batch of 8 counts 1)");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from receipt to answer, per request"
    );
    describe_histogram!(
        QUEUE_DURATION,
        Unit::Seconds,
        "Time in the batcher's queue, per request"
    );
    describe_histogram!(COMPUTE_DURATION, Unit::Seconds, "Model run time, per run");
    describe_histogram!(BATCH_SIZE, Unit::Count, "Samples per model run");
    describe_gauge!(PENDING, "Requests waiting in the batcher's queue");
    describe_counter!(
        RECEIVED_BYTES,
        Unit::Bytes,
        "Frame and tensor bytes received"
    );
}

/// Renders the current values in the Prometheus text format.
pub fn render() -> String {
    match recorder() {
        Some(handle) => {
            handle.run_upkeep();
            handle.render()
        }
        None => "# another metrics recorder is installed in this process\n".into(),
    }
}

/// One model's series, registered once: recording is then a handle update, with no label
/// strings built or looked up per request (the hot path runs this several times a frame).
#[derive(Clone)]
pub(crate) struct ModelMetrics {
    success: Counter,
    failures: [Counter; 5],
    inference_count: Counter,
    exec_count: Counter,
    request_duration: Histogram,
    queue_duration: Histogram,
    compute_duration: Histogram,
    batch_size: Histogram,
    pending: Gauge,
    received: Counter,
}

impl std::fmt::Debug for ModelMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ModelMetrics")
    }
}

impl ModelMetrics {
    /// Registers (or finds) the series of `model` in the installed recorder; without one,
    /// the handles record nothing.
    pub(crate) fn new(model: &str) -> Self {
        let label = || [("model", model.to_string())];
        let failure = |f: Failure| counter!(REQUEST_FAILURE, "model" => model.to_string(), "reason" => f.label());
        Self {
            success: counter!(REQUEST_SUCCESS, &label()),
            // In declaration order, so `failure as usize` indexes it.
            failures: [
                Failure::BadInput,
                Failure::QueueFull,
                Failure::Deadline,
                Failure::Model,
                Failure::Shutdown,
            ]
            .map(failure),
            inference_count: counter!(INFERENCE_COUNT, &label()),
            exec_count: counter!(EXEC_COUNT, &label()),
            request_duration: histogram!(REQUEST_DURATION, &label()),
            queue_duration: histogram!(QUEUE_DURATION, &label()),
            compute_duration: histogram!(COMPUTE_DURATION, &label()),
            batch_size: histogram!(BATCH_SIZE, &label()),
            pending: gauge!(PENDING, &label()),
            received: counter!(RECEIVED_BYTES, &label()),
        }
    }

    pub(crate) fn pending(&self, waiting: usize) {
        self.pending.set(waiting as f64);
    }

    pub(crate) fn queued(&self, waited: Duration) {
        self.queue_duration.record(waited.as_secs_f64());
    }

    pub(crate) fn executed(&self, samples: usize, compute: Duration) {
        self.exec_count.increment(1);
        self.inference_count.increment(samples as u64);
        self.compute_duration.record(compute.as_secs_f64());
        self.batch_size.record(samples as f64);
    }

    pub(crate) fn received(&self, bytes: usize) {
        self.received.increment(bytes as u64);
    }

    /// Counts one finished request, successful or not, and its duration.
    pub(crate) fn answered(&self, outcome: Result<(), Failure>, duration: Duration) {
        match outcome {
            Ok(()) => self.success.increment(1),
            Err(failure) => self.failures[failure as usize].increment(1),
        }
        self.request_duration.record(duration.as_secs_f64());
    }
}
