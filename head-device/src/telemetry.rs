//! The head's Prometheus metrics, served on `--metrics-listen` at `/metrics`.
//!
//! A board in a field is watched from afar: these say what its frames became, what they cost
//! on the link, how long they took, and whether a tail is reachable.
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `cleave_head_frames_total{status, mode}` | counter | frames reported, by status (`answered`, `failed`, `expired`, `dropped`, `unchanged`) and mode (`split`, `local`, `offload`) |
//! | `cleave_head_sent_bytes_total` | counter | bytes sent (coded features or JPEG), every send counted |
//! | `cleave_head_wire_bytes_total` | counter | gRPC message bytes of those sends |
//! | `cleave_head_resends_total` | counter | sends beyond the first (frames resent after a lost stream) |
//! | `cleave_head_frame_duration_seconds{mode}` | histogram | capture to result, answered frames |
//! | `cleave_head_uplink_duration_seconds{mode}` | histogram | send to answer, less the tail's time (`split` and `offload` frames) |
//! | `cleave_head_tail_duration_seconds{mode}` | histogram | the tail's own time (`split` and `offload` frames) |
//! | `cleave_head_link_up` | gauge | 1 while a stream to a tail is open |
//! | `cleave_head_link_down` | gauge | 1 while every tail failed in a row (the link-down policy applies) |
//! | `cleave_head_link_rtt_seconds` | gauge | estimated round trip of a small message |
//! | `cleave_head_link_bandwidth_bits_per_second` | gauge | estimated bandwidth a frame gets |
//!
//! The `metrics` crate has one recorder per process, installed on first use.

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::LinkEstimate;
use crate::report::{FrameReport, Status};

/// Frames reported, by status and mode.
pub const FRAMES: &str = "cleave_head_frames_total";
/// Coded bytes sent.
pub const SENT_BYTES: &str = "cleave_head_sent_bytes_total";
/// gRPC message bytes sent.
pub const WIRE_BYTES: &str = "cleave_head_wire_bytes_total";
/// Sends beyond the first.
pub const RESENDS: &str = "cleave_head_resends_total";
/// Capture to result.
pub const FRAME_DURATION: &str = "cleave_head_frame_duration_seconds";
/// Uplink time of split frames.
pub const UPLINK_DURATION: &str = "cleave_head_uplink_duration_seconds";
/// Tail time of split frames.
pub const TAIL_DURATION: &str = "cleave_head_tail_duration_seconds";
/// A stream is open.
pub const LINK_UP: &str = "cleave_head_link_up";
/// Every tail failed in a row.
pub const LINK_DOWN: &str = "cleave_head_link_down";
/// Estimated round trip.
pub const LINK_RTT: &str = "cleave_head_link_rtt_seconds";
/// Estimated bandwidth.
pub const LINK_BANDWIDTH: &str = "cleave_head_link_bandwidth_bits_per_second";

fn recorder() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .ok()?
                .install_recorder()
                .ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(FRAMES, "Frames reported, by status and mode");
    describe_counter!(SENT_BYTES, Unit::Bytes, "Coded feature-frame bytes sent");
    describe_counter!(WIRE_BYTES, Unit::Bytes, "gRPC message bytes sent");
    describe_counter!(RESENDS, "Frames sent again after a lost stream");
    describe_histogram!(FRAME_DURATION, Unit::Seconds, "Capture to result");
    describe_histogram!(
        UPLINK_DURATION,
        Unit::Seconds,
        "Send to answer less the tail's time"
    );
    describe_histogram!(TAIL_DURATION, Unit::Seconds, "The tail's own time");
    describe_gauge!(LINK_UP, "1 while a stream to a tail is open");
    describe_gauge!(LINK_DOWN, "1 while every tail failed in a row");
    describe_gauge!(
        LINK_RTT,
        Unit::Seconds,
        "Estimated round trip of a small message"
    );
    describe_gauge!(LINK_BANDWIDTH, "Estimated bits per second a frame gets");
    #[cfg(feature = "v4l2")]
    describe_counter!(
        crate::camera::DROPPED_FRAMES,
        "Camera frames dropped because the pipeline was busy"
    );
}

/// Counts one report.
pub fn record(report: &FrameReport) {
    if recorder().is_none() {
        return;
    }
    let status = match report.status {
        Status::Answered => "answered",
        Status::Failed => "failed",
        Status::Expired => "expired",
        Status::Dropped => "dropped",
        Status::Unchanged => "unchanged",
    };
    counter!(FRAMES, "status" => status, "mode" => report.mode).increment(1);
    let sends = u64::from(report.sends);
    counter!(SENT_BYTES).increment(report.bytes_sent as u64 * sends);
    counter!(WIRE_BYTES).increment(report.wire_bytes as u64 * sends);
    counter!(RESENDS).increment(sends.saturating_sub(1));
    if report.status == Status::Answered {
        histogram!(FRAME_DURATION, "mode" => report.mode).record(report.total_ms / 1e3);
        if report.mode != "local" {
            histogram!(UPLINK_DURATION, "mode" => report.mode).record(report.uplink_ms / 1e3);
            histogram!(TAIL_DURATION, "mode" => report.mode).record(report.tail_ms / 1e3);
        }
    }
}

/// Sets the link gauges: state and estimates.
pub fn link(up: bool, down: bool, estimate: &LinkEstimate) {
    if recorder().is_none() {
        return;
    }
    gauge!(LINK_UP).set(f64::from(u8::from(up)));
    gauge!(LINK_DOWN).set(f64::from(u8::from(down)));
    if let Some(rtt) = estimate.rtt {
        gauge!(LINK_RTT).set(rtt.as_secs_f64());
    }
    if let Some(rate) = estimate.bandwidth_bps {
        gauge!(LINK_BANDWIDTH).set(rate);
    }
}

/// The current values in the Prometheus text format.
pub fn render() -> String {
    match recorder() {
        Some(handle) => {
            handle.run_upkeep();
            handle.render()
        }
        None => "# another metrics recorder is installed in this process\n".into(),
    }
}

/// Binds `addr` and serves `/metrics` (and `/healthz`) on the current runtime until the
/// process ends; returns the bound address.
///
/// # Errors
///
/// The bind error.
pub async fn serve(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let _ = recorder();
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    render(),
                )
                    .into_response()
            }),
        );
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "the metrics server stopped");
        }
    });
    Ok(bound)
}
