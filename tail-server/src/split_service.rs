//! `cleave.v1.Split`: negotiation, unary and streaming inference over the model repository.
//!
//! A stream belongs to one bundle (its `cleave-bundle-id` metadata). Up to `stream_window`
//! of its frames are in flight at once — decoded and queued in the batcher together, so one
//! head's frames can share a batch — and their results are sent back in frame order. A
//! client that stops reading results stops having its frames read: its window is all it can
//! hold of the server. When the server drains, a stream stops taking frames, answers the
//! ones in flight and ends `UNAVAILABLE`, so an open stream never holds a shutdown up.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use cleave_codec::{BundleId, peek_bundle_tag};
use cleave_proto::BUNDLE_ID_METADATA;
use cleave_proto::v1::split_server::Split;
use cleave_proto::v1::{
    ClassScore, Classification, DetectedBox, Detections, FeatureFrame, FrameResult,
    NegotiateRequest, NegotiateResponse, frame_result::Outcome,
};
use tokio_stream::Stream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::ordered_stream::OrderedAnswers;
use crate::repository::{ModelRepository, Prediction, ServedModel};
use crate::{Draining, TailError, deadline};

/// The `Split` service over a model repository.
#[derive(Debug, Clone)]
pub struct SplitService {
    repository: Arc<ModelRepository>,
    max_frame_bytes: usize,
    stream_window: usize,
    draining: Draining,
}

impl SplitService {
    /// A service answering from `repository`, with up to `stream_window` frames of a stream
    /// in flight.
    pub fn new(
        repository: Arc<ModelRepository>,
        max_frame_bytes: usize,
        stream_window: usize,
        draining: Draining,
    ) -> Self {
        Self {
            repository,
            max_frame_bytes,
            stream_window: stream_window.max(1),
            draining,
        }
    }

    /// The tail for a call's `cleave-bundle-id` metadata, if it has one.
    fn tail_from_metadata(
        &self,
        metadata: &MetadataMap,
    ) -> Result<Option<Arc<ServedModel>>, TailError> {
        let Some(value) = metadata.get(BUNDLE_ID_METADATA) else {
            return Ok(None);
        };
        let text = value.to_str().unwrap_or_default();
        let id = parse_id(text, &self.repository)?;
        Ok(Some(self.repository.tail_for(id)?.clone()))
    }
}

fn parse_id(text: &str, repository: &ModelRepository) -> Result<BundleId, TailError> {
    text.parse::<BundleId>()
        .map_err(|_| TailError::UnknownBundle {
            requested: format!("{text:?} (not a bundle id)"),
            served: repository.served_bundles(),
        })
}

/// The models a head's frames go to: the bundle's tail for feature frames, and its full
/// model (if served) for offloaded images.
#[derive(Debug, Clone)]
struct Route {
    tail: Arc<ServedModel>,
    full: Option<Arc<ServedModel>>,
}

impl Route {
    fn new(tail: Arc<ServedModel>, repository: &ModelRepository) -> Self {
        let full = repository.full_for(tail.bundle().id()).cloned();
        Self { tail, full }
    }

    /// Runs a frame's feature frame on the tail, or its image on the full model.
    async fn run(
        &self,
        frame: &FeatureFrame,
        deadline: Option<Instant>,
    ) -> Result<(&ServedModel, crate::repository::Answer), TailError> {
        if frame.image.is_empty() {
            return Ok((
                &self.tail,
                self.tail.infer_frame(&frame.frame, deadline).await?,
            ));
        }
        let full = self.full.as_deref().ok_or_else(|| {
            TailError::Unsupported(format!(
                "this tail does not run the full model of {} (serve it with `full_model = \
                 true`), so it cannot take offloaded images",
                self.tail.name()
            ))
        })?;
        Ok((full, full.infer_image(&frame.image, deadline).await?))
    }
}

/// Runs one frame and always answers: a result or a per-frame error.
#[tracing::instrument(name = "frame", skip_all, fields(frame_id = frame.frame_id, model = route.tail.name()))]
async fn process(route: &Route, frame: FeatureFrame, call: Option<Instant>) -> FrameResult {
    let started = Instant::now();
    let received_bytes = frame.frame.len().max(frame.image.len()) as u64;
    let deadline = deadline::for_frame(frame.deadline_ms, call, started);
    let mut result = FrameResult {
        frame_id: frame.frame_id,
        received_bytes,
        ..Default::default()
    };
    let outcome = match route.run(&frame, deadline).await {
        Ok((model, answer)) => {
            result.queue_ms = answer.queue.as_secs_f64() * 1e3;
            result.batch_size = u32::try_from(answer.batch_size).unwrap_or(u32::MAX);
            result.compute_ms = answer.compute.as_secs_f64() * 1e3;
            match model
                .predictions(&answer.output)
                .map(|p| p.into_iter().next())
            {
                Ok(Some(prediction)) => to_outcome(prediction),
                Ok(None) => Outcome::Error(
                    TailError::Inference("the model returned no output row".into())
                        .to_frame_error(),
                ),
                Err(error) => Outcome::Error(error.to_frame_error()),
            }
        }
        Err(error) => {
            tracing::debug!(frame_id = frame.frame_id, %error, "frame failed");
            Outcome::Error(error.to_frame_error())
        }
    };
    result.outcome = Some(outcome);
    result.tail_ms = started.elapsed().as_secs_f64() * 1e3;
    result
}

fn to_outcome(prediction: Prediction) -> Outcome {
    match prediction {
        Prediction::Classes(classes) => Outcome::Classification(Classification {
            top: classes
                .into_iter()
                .map(|(c, label)| ClassScore {
                    index: u32::try_from(c.index).unwrap_or(u32::MAX),
                    label,
                    score: c.score,
                })
                .collect(),
        }),
        Prediction::Boxes(boxes) => Outcome::Detections(Detections {
            boxes: boxes
                .into_iter()
                .map(|(d, label)| DetectedBox {
                    x0: d.x0,
                    y0: d.y0,
                    x1: d.x1,
                    y1: d.y1,
                    score: d.score,
                    class_index: u32::try_from(d.label).unwrap_or(u32::MAX),
                    label,
                })
                .collect(),
        }),
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
        let id = parse_id(&request.bundle_id, &self.repository)?;
        let model = self.repository.tail_for(id)?;
        tracing::info!(client = %request.client, model = model.name(), "head negotiated");
        let manifest = model.bundle().manifest();
        Ok(Response::new(NegotiateResponse {
            bundle_id: model.bundle().id().to_string(),
            bundle_name: format!("{} {}", manifest.name, manifest.version),
            max_frame_bytes: self.max_frame_bytes as u64,
            full_model: self.repository.full_for(id).is_some(),
        }))
    }

    async fn infer(&self, request: Request<FeatureFrame>) -> Result<Response<FrameResult>, Status> {
        let call = deadline::from_metadata(request.metadata(), Instant::now());
        let model = match self.tail_from_metadata(request.metadata())? {
            Some(model) => Ok(model),
            None if request.get_ref().frame.is_empty() && !request.get_ref().image.is_empty() => {
                Err(TailError::BadRequest(format!(
                    "an offloaded image carries no bundle tag: name the bundle in the \
                     `{BUNDLE_ID_METADATA}` metadata"
                )))
            }
            None => peek_bundle_tag(&request.get_ref().frame)
                .map_err(TailError::from)
                .and_then(|tag| self.repository.tail_for_tag(tag).cloned()),
        };
        let frame = request.into_inner();
        Ok(Response::new(match model {
            Ok(model) => process(&Route::new(model, &self.repository), frame, call).await,
            // A frame nobody here can decode is that frame's error, as on a stream.
            Err(error) => FrameResult {
                frame_id: frame.frame_id,
                outcome: Some(Outcome::Error(error.to_frame_error())),
                received_bytes: frame.frame.len() as u64,
                ..Default::default()
            },
        }))
    }

    type StreamStream = ResultStream;

    async fn stream(
        &self,
        request: Request<Streaming<FeatureFrame>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let model = self
            .tail_from_metadata(request.metadata())?
            .ok_or_else(|| {
                Status::invalid_argument(format!("missing `{BUNDLE_ID_METADATA}` metadata"))
            })?;
        let frames = request.into_inner();
        Ok(Response::new(ordered_results(
            Route::new(model, &self.repository),
            frames,
            self.stream_window,
            self.draining.clone(),
        )))
    }
}

/// Runs up to `window` frames at once and yields their results in frame order.
fn ordered_results(
    route: Route,
    frames: Streaming<FeatureFrame>,
    window: usize,
    draining: Draining,
) -> ResultStream {
    Box::pin(OrderedAnswers::new(
        frames,
        window,
        draining,
        Status::unavailable(
            "the tail is shutting down: frames without an answer on this stream were not \
             run; send them again (to another tail)",
        ),
        move |frame| {
            let route = route.clone();
            async move { process(&route, frame, None).await }
        },
    ))
}
