//! `cleave.v1.Split`: negotiation, unary and streaming inference.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use cleave_codec::{BundleId, FrameDecoder, FrameError, Limits};
use cleave_engine::{Bundle, Tensor, top_k};
use cleave_proto::BUNDLE_ID_METADATA;
use cleave_proto::v1::split_server::Split;
use cleave_proto::v1::{
    ClassScore, Classification, FeatureFrame, FrameResult, NegotiateRequest, NegotiateResponse,
    frame_result::Outcome,
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::{TailError, TailExecutor};

/// Classes returned per frame.
const TOP_K: usize = 5;

/// The `Split` service over one bundle's tail model.
#[derive(Debug, Clone)]
pub struct SplitService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    bundle: Arc<Bundle>,
    executor: TailExecutor,
    decoder: FrameDecoder,
    max_frame_bytes: usize,
}

impl SplitService {
    /// A service for `bundle`, running frames on `executor`.
    pub fn new(bundle: Arc<Bundle>, executor: TailExecutor, max_frame_bytes: usize) -> Self {
        // A frame for this tail holds exactly one bottleneck: no more elements than that are
        // ever decoded, and a frame for another bundle is refused before its payload is.
        let limits = Limits {
            max_frame_bytes,
            max_elements: bundle.manifest().bottleneck.shape.iter().product(),
        };
        let decoder =
            FrameDecoder::new(bundle.coding_tables().cloned(), limits).expecting(bundle.id().tag());
        Self {
            inner: Arc::new(Inner {
                bundle,
                executor,
                decoder,
                max_frame_bytes,
            }),
        }
    }
}

impl Inner {
    fn check_bundle(&self, head: &str) -> Result<(), TailError> {
        let tail = self.bundle.id();
        match head.parse::<BundleId>() {
            Ok(id) if id == tail => Ok(()),
            _ => Err(TailError::BundleMismatch {
                head: head.to_string(),
                tail,
            }),
        }
    }

    /// Decodes, checks and runs one frame; always answers with a result or a frame error.
    #[tracing::instrument(name = "frame", skip_all, fields(frame_id = frame.frame_id))]
    async fn process(&self, frame: FeatureFrame) -> FrameResult {
        let started = Instant::now();
        let received_bytes = frame.frame.len() as u64;
        let outcome = match self.classify(&frame.frame).await {
            Ok(classification) => Outcome::Classification(classification),
            Err(error) => {
                tracing::debug!(frame_id = frame.frame_id, %error, "frame failed");
                Outcome::Error(error.to_frame_error())
            }
        };
        FrameResult {
            frame_id: frame.frame_id,
            outcome: Some(outcome),
            tail_ms: started.elapsed().as_secs_f64() * 1e3,
            received_bytes,
        }
    }

    async fn classify(&self, bytes: &[u8]) -> Result<Classification, TailError> {
        let tail = self.bundle.id();
        let decoded = match self.decoder.decode(bytes) {
            Err(FrameError::BundleMismatch { frame, .. }) => {
                return Err(TailError::BundleMismatch {
                    head: format!("{frame}… (frame tag)"),
                    tail,
                });
            }
            other => other?,
        };
        let expected = &self.bundle.manifest().bottleneck.shape;
        if &decoded.header.shape != expected {
            return Err(TailError::ShapeMismatch {
                expected: expected.clone(),
                actual: decoded.header.shape,
            });
        }
        let mut shape = vec![1];
        shape.extend_from_slice(expected);
        let restored = decoded.dequantize().map_err(FrameError::from)?;
        let input = Tensor::new(shape, restored);
        let logits = self.executor.run(input).await?;
        let labels = &self.bundle.manifest().labels.names;
        let top = top_k(&logits.data, TOP_K)
            .into_iter()
            .map(|c| ClassScore {
                index: c.index as u32,
                label: labels.get(c.index).cloned().unwrap_or_default(),
                score: c.score,
            })
            .collect();
        Ok(Classification { top })
    }
}

type ResultStream = Pin<Box<dyn Stream<Item = Result<FrameResult, Status>> + Send>>;

#[tonic::async_trait]
impl Split for SplitService {
    async fn negotiate(
        &self,
        request: Request<NegotiateRequest>,
    ) -> Result<Response<NegotiateResponse>, Status> {
        let request = request.into_inner();
        self.inner.check_bundle(&request.bundle_id)?;
        tracing::info!(client = %request.client, "head negotiated");
        let manifest = self.inner.bundle.manifest();
        Ok(Response::new(NegotiateResponse {
            bundle_id: self.inner.bundle.id().to_string(),
            bundle_name: format!("{} {}", manifest.name, manifest.version),
            max_frame_bytes: self.inner.max_frame_bytes as u64,
        }))
    }

    async fn infer(&self, request: Request<FeatureFrame>) -> Result<Response<FrameResult>, Status> {
        Ok(Response::new(
            self.inner.process(request.into_inner()).await,
        ))
    }

    type StreamStream = ResultStream;

    async fn stream(
        &self,
        request: Request<Streaming<FeatureFrame>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let head = request
            .metadata()
            .get(BUNDLE_ID_METADATA)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Status::invalid_argument(format!("missing `{BUNDLE_ID_METADATA}` metadata"))
            })?
            .to_string();
        self.inner.check_bundle(&head)?;
        let inner = self.inner.clone();
        let mut frames = request.into_inner();
        // Frames are processed one after another, so results keep the order of the frames.
        let results = async_stream(move |tx| async move {
            while let Some(next) = frames.next().await {
                let item = match next {
                    Ok(frame) => Ok(inner.process(frame).await),
                    Err(status) => Err(status),
                };
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(Response::new(results))
    }
}

/// A stream fed by a task through a small channel.
fn async_stream<F, Fut>(body: F) -> ResultStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<FrameResult, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
