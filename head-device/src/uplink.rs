//! The connection to a tail: negotiation, then one long-lived bidirectional stream.

use cleave_codec::BundleId;
use cleave_proto::BUNDLE_ID_METADATA;
use cleave_proto::v1::split_client::SplitClient;
use cleave_proto::v1::{FeatureFrame, FrameResult, NegotiateRequest, frame_error, frame_result};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::HeadError;
use crate::report::{DetectedBox, Failure, Outcome, Score};

/// Bytes gRPC adds in front of every message (compression flag and length).
const GRPC_PREFIX_BYTES: usize = 5;

/// A negotiated connection to a tail.
#[derive(Debug, Clone)]
pub struct Uplink {
    server: String,
    client: SplitClient<Channel>,
    bundle_id: BundleId,
    max_frame_bytes: usize,
    full_model: bool,
    negotiate_rtt: Duration,
}

/// What a frame carries to the tail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A coded feature frame, for the bundle's tail model (`split`).
    Features(Vec<u8>),
    /// The model input as a JPEG, for the bundle's full model on the server (`offload`).
    Image(Vec<u8>),
}

impl Payload {
    /// Bytes of the frame or image.
    pub fn len(&self) -> usize {
        match self {
            Self::Features(bytes) | Self::Image(bytes) => bytes.len(),
        }
    }

    /// Whether it carries nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Vec<u8>> for Payload {
    fn from(frame: Vec<u8>) -> Self {
        Self::Features(frame)
    }
}

/// How a head dials a tail.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Longest a TCP connect plus negotiation may take.
    pub connect_timeout: Duration,
    /// HTTP/2 pings at this interval, also while idle; a connection whose ping is not
    /// answered within the same time is closed, so a link that went silent (no reset, no
    /// FIN) is noticed.
    pub keepalive: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            keepalive: Duration::from_secs(10),
        }
    }
}

/// A tail's answer to one frame.
#[derive(Debug, Clone)]
pub struct UplinkResult {
    /// The frame's id.
    pub frame_id: u64,
    /// Ranked classes, boxes, or the tail's per-frame error.
    pub outcome: Outcome,
    /// Milliseconds the tail spent on the frame.
    pub tail_ms: f64,
    /// Coded bytes the tail says it received.
    pub received_bytes: u64,
}

impl Uplink {
    /// Connects to `server` (e.g. `http://127.0.0.1:50051`) and checks that the tail serves
    /// `bundle_id`.
    ///
    /// # Errors
    ///
    /// [`HeadError::Uplink`] if the tail cannot be reached, [`HeadError::BundleMismatch`] if it
    /// serves another bundle (the message names both ids).
    pub async fn connect(server: &str, bundle_id: BundleId) -> Result<Self, HeadError> {
        Self::connect_with(server, bundle_id, &ConnectOptions::default()).await
    }

    /// As [`connect`](Self::connect), with timeouts and keepalive from `options`.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect); a connect or negotiation slower than
    /// `options.connect_timeout` is [`HeadError::Uplink`].
    pub async fn connect_with(
        server: &str,
        bundle_id: BundleId,
        options: &ConnectOptions,
    ) -> Result<Self, HeadError> {
        match tokio::time::timeout(
            options.connect_timeout,
            Self::dial(server, bundle_id, options),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(HeadError::Uplink {
                server: server.to_string(),
                reason: format!("no answer within {:?}", options.connect_timeout),
            }),
        }
    }

    async fn dial(
        server: &str,
        bundle_id: BundleId,
        options: &ConnectOptions,
    ) -> Result<Self, HeadError> {
        let uplink_err = |reason: String| HeadError::Uplink {
            server: server.to_string(),
            reason,
        };
        let endpoint = Endpoint::from_shared(server.to_string())
            .map_err(|e| uplink_err(format!("bad address: {e}")))?
            .tcp_nodelay(true)
            .connect_timeout(options.connect_timeout)
            .http2_keep_alive_interval(options.keepalive)
            .keep_alive_timeout(options.keepalive)
            .keep_alive_while_idle(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| uplink_err(error_chain(&e)))?;
        let limit = 64 << 20;
        let mut client = SplitClient::new(channel)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let request = NegotiateRequest {
            bundle_id: bundle_id.to_string(),
            client: format!(
                "cleave-head {} on {}",
                env!("CARGO_PKG_VERSION"),
                std::env::consts::ARCH
            ),
        };
        let asked = Instant::now();
        let response = match client.negotiate(request).await {
            Ok(response) => response.into_inner(),
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::NotFound
                ) =>
            {
                return Err(mismatch(server, bundle_id, &status));
            }
            Err(status) => return Err(uplink_err(format!("negotiation failed: {status}"))),
        };
        if response.bundle_id != bundle_id.to_string() {
            return Err(HeadError::BundleMismatch {
                server: server.to_string(),
                head: bundle_id.to_string(),
                tail: response.bundle_id,
            });
        }
        tracing::info!(server, bundle = %response.bundle_name, "negotiated");
        Ok(Self {
            server: server.to_string(),
            client,
            bundle_id,
            max_frame_bytes: usize::try_from(response.max_frame_bytes).unwrap_or(usize::MAX),
            full_model: response.full_model,
            negotiate_rtt: asked.elapsed(),
        })
    }

    /// Whether the tail also runs the bundle's full model, so it takes offloaded images.
    pub fn serves_full_model(&self) -> bool {
        self.full_model
    }

    /// How long negotiation took: one small request and its answer on an open connection,
    /// the head's first sample of the round-trip time.
    pub fn negotiate_rtt(&self) -> Duration {
        self.negotiate_rtt
    }

    /// Measures one round trip: a negotiation on the open connection (a few dozen bytes
    /// each way, no model run), multiplexed beside any frame stream.
    ///
    /// # Errors
    ///
    /// [`HeadError::Uplink`] if the tail does not answer.
    pub async fn probe(&mut self) -> Result<Duration, HeadError> {
        let request = NegotiateRequest {
            bundle_id: self.bundle_id.to_string(),
            client: "cleave-head probe".into(),
        };
        let asked = Instant::now();
        self.client
            .negotiate(request)
            .await
            .map_err(|status| self.status_error(status))?;
        Ok(asked.elapsed())
    }

    /// The tail's address.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Largest frame the tail accepts.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Opens a frame stream. Frames sent on the [`FrameSender`] are answered, in order, on
    /// the [`ResultReceiver`]; dropping the sender ends the stream once the answers are in.
    ///
    /// # Errors
    ///
    /// [`HeadError::Uplink`] if the tail refuses the stream.
    pub async fn open_stream(
        &mut self,
        window: usize,
    ) -> Result<(FrameSender, ResultReceiver), HeadError> {
        let (tx, rx) = mpsc::channel(window.max(1));
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        let id = self
            .bundle_id
            .to_string()
            .parse()
            .map_err(|_| HeadError::Uplink {
                server: self.server.clone(),
                reason: "bundle id is not valid metadata".into(),
            })?;
        request.metadata_mut().insert(BUNDLE_ID_METADATA, id);
        let response = self
            .client
            .stream(request)
            .await
            .map_err(|status| self.status_error(status))?;
        Ok((
            FrameSender {
                tx,
                server: self.server.clone(),
            },
            ResultReceiver {
                stream: response.into_inner(),
                server: self.server.clone(),
            },
        ))
    }

    fn status_error(&self, status: tonic::Status) -> HeadError {
        if status.code() == tonic::Code::FailedPrecondition {
            return mismatch(&self.server, self.bundle_id, &status);
        }
        HeadError::Uplink {
            server: self.server.clone(),
            reason: status.to_string(),
        }
    }
}

/// The error for a tail that refused our bundle; the tail names its own id in the status
/// metadata (older or foreign servers only in the message).
fn mismatch(server: &str, head: BundleId, status: &tonic::Status) -> HeadError {
    let tail = status
        .metadata()
        .get(BUNDLE_ID_METADATA)
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| status.message().to_string(), str::to_string);
    HeadError::BundleMismatch {
        server: server.to_string(),
        head: head.to_string(),
        tail,
    }
}

/// The sending half of a frame stream.
#[derive(Debug, Clone)]
pub struct FrameSender {
    tx: mpsc::Sender<FeatureFrame>,
    server: String,
}

impl FrameSender {
    /// Queues a coded frame for sending; returns the bytes the gRPC message takes on the
    /// wire (protobuf encoding plus gRPC's 5-byte prefix, before HTTP/2 framing).
    ///
    /// # Errors
    ///
    /// [`HeadError::Uplink`] if the stream has closed.
    pub async fn send(&self, frame_id: u64, frame: impl Into<Payload>) -> Result<usize, HeadError> {
        self.send_within(frame_id, frame.into(), None).await
    }

    /// As [`send`](Self::send); the tail drops the frame unrun if it cannot start it within
    /// `deadline` of receiving it, and answers `DEADLINE_EXCEEDED`.
    ///
    /// # Errors
    ///
    /// [`HeadError::Uplink`] if the stream has closed.
    pub async fn send_within(
        &self,
        frame_id: u64,
        payload: Payload,
        deadline: Option<Duration>,
    ) -> Result<usize, HeadError> {
        let deadline_ms = deadline.map_or(0, |d| {
            u32::try_from(d.as_millis().max(1)).unwrap_or(u32::MAX)
        });
        let (frame, image) = match payload {
            Payload::Features(frame) => (frame, Vec::new()),
            Payload::Image(image) => (Vec::new(), image),
        };
        let message = FeatureFrame {
            frame_id,
            frame,
            deadline_ms,
            image,
        };
        let wire = message.encoded_len() + GRPC_PREFIX_BYTES;
        self.tx.send(message).await.map_err(|_| HeadError::Uplink {
            server: self.server.clone(),
            reason: "the stream closed".into(),
        })?;
        Ok(wire)
    }
}

/// The receiving half of a frame stream.
#[derive(Debug)]
pub struct ResultReceiver {
    stream: tonic::Streaming<FrameResult>,
    server: String,
}

impl ResultReceiver {
    /// The next result, or `None` when the stream has ended.
    ///
    /// # Errors
    ///
    /// [`HeadError::Uplink`] if the stream broke.
    pub async fn next(&mut self) -> Result<Option<UplinkResult>, HeadError> {
        let message = self
            .stream
            .message()
            .await
            .map_err(|status| HeadError::Uplink {
                server: self.server.clone(),
                reason: format!("stream broke: {status}"),
            })?;
        Ok(message.map(convert))
    }
}

fn convert(result: FrameResult) -> UplinkResult {
    let outcome = match result.outcome {
        Some(frame_result::Outcome::Classification(c)) => Outcome::Classified {
            top5: c
                .top
                .into_iter()
                .map(|s| Score {
                    index: s.index,
                    label: s.label,
                    score: s.score,
                })
                .collect(),
        },
        Some(frame_result::Outcome::Detections(d)) => Outcome::Detected {
            boxes: d
                .boxes
                .into_iter()
                .map(|b| DetectedBox {
                    corners: [b.x0, b.y0, b.x1, b.y1],
                    score: b.score,
                    label: b.label,
                })
                .collect(),
        },
        Some(frame_result::Outcome::Error(e)) => {
            let kind = frame_error::Kind::try_from(e.kind)
                .map(|k| {
                    k.as_str_name()
                        .trim_start_matches("KIND_")
                        .to_ascii_lowercase()
                })
                .unwrap_or_else(|_| format!("unknown({})", e.kind));
            failed(kind, e.message)
        }
        None => failed("unknown".into(), "the tail sent no outcome".into()),
    };
    UplinkResult {
        frame_id: result.frame_id,
        outcome,
        tail_ms: result.tail_ms,
        received_bytes: result.received_bytes,
    }
}

fn failed(kind: String, message: String) -> Outcome {
    Outcome::Failed {
        error: Failure { kind, message },
    }
}

/// A transport error with its causes, which tonic hides behind "transport error".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
