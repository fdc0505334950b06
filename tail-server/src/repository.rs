//! The model repository: every bundle the tail serves, loaded, warmed up and batched.
//!
//! A tail behind a load balancer serves many heads, and heads of different bundles: the
//! repository holds one [`ServedModel`] per bundle (its tail model) and, when asked, one
//! per full model. A head's bundle id picks its tail; a KServe client's model name picks
//! either. A request for anything else is refused with the list of what is served, so the
//! operator sees the mismatch in the client's error.
//!
//! Loading is the slow part of start-up (an ONNX model optimised per instance, then run
//! once at every batch size the batcher will form, so the first frames do not pay for
//! lazy initialisation or a TensorRT engine build). The repository exists only once all of
//! it is done; that is what "ready" means.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cleave_codec::{BundleId, BundleTag, FrameDecoder, FrameError, Limits};
use cleave_engine::{
    Bundle, ClassScore, DbPostprocess, Detection, LoadOptions, Model, Preprocessor, Role, Tensor,
    top_k,
};

use crate::telemetry::{Failure, ModelMetrics};
use crate::{BatchError, BatchOutput, Batcher, ModelSettings, TailConfig, TailError};

/// Classes returned per classified sample.
pub const TOP_K: usize = 5;

/// One model as clients see it: a name, a bundle, a role, a batcher.
#[derive(Debug)]
pub struct ServedModel {
    name: String,
    role: Role,
    bundle: Arc<Bundle>,
    batcher: Batcher,
    decoder: FrameDecoder,
    settings: ModelSettings,
    detector: Option<DbPostprocess>,
    metrics: ModelMetrics,
}

/// What a model's output means, per sample: the bundle's task decides.
#[derive(Debug, Clone, PartialEq)]
pub enum Prediction {
    /// The best classes, most probable first, with their labels.
    Classes(Vec<(ClassScore, String)>),
    /// Boxes after score thresholds and NMS, best first, with their labels.
    Boxes(Vec<(Detection, String)>),
}

/// A finished request: the raw output, what it means, and what it cost.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The model's output rows for the request.
    pub output: Tensor,
    /// Time in the batcher's queue.
    pub queue: Duration,
    /// Time of the model run.
    pub compute: Duration,
    /// Samples in that run.
    pub batch_size: usize,
}

impl ServedModel {
    /// The name clients use (the bundle's name; `<name>-full` for a full model).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tail or full model.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The bundle it comes from.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// How it is run.
    pub fn settings(&self) -> &ModelSettings {
        &self.settings
    }

    /// Per-sample input shape.
    pub fn input_shape(&self) -> Vec<usize> {
        self.bundle.input_shape(self.role)
    }

    /// Per-sample output shape.
    pub fn output_shape(&self) -> Vec<usize> {
        self.bundle.output_shape(self.role)
    }

    /// Stops taking requests; queued ones still run.
    pub fn close(&self) {
        self.batcher.close();
    }

    /// Decodes a coded feature frame into the tail's input (`[1, ..bottleneck]`).
    ///
    /// # Errors
    ///
    /// [`TailError::Malformed`], [`TailError::BundleMismatch`] or
    /// [`TailError::ShapeMismatch`]; [`TailError::BadRequest`] for a full model.
    pub fn decode_frame(&self, bytes: &[u8]) -> Result<Tensor, TailError> {
        if self.role != Role::Tail {
            return Err(TailError::BadRequest(format!(
                "{} takes an image tensor, not a feature frame",
                self.name
            )));
        }
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
        Ok(Tensor::new(shape, restored))
    }

    /// Decodes an offloaded image — JPEG or PNG of exactly the model's input size, cropped
    /// and resized by the head — into the full model's input (`[1, 3, H, W]`).
    ///
    /// The size is checked from the image's header before its pixels are decoded, so a
    /// hostile image cannot make the tail allocate more than one input's worth
    /// ([`cleave_codec::offload`], fuzzed).
    ///
    /// # Errors
    ///
    /// [`TailError::Unsupported`] for a tail model (it takes feature frames),
    /// [`TailError::BadRequest`] for bytes that are not an image of the input's size.
    pub fn decode_image(&self, bytes: &[u8]) -> Result<Tensor, TailError> {
        if self.role != Role::Full {
            return Err(TailError::Unsupported(format!(
                "{} takes feature frames, not images",
                self.name
            )));
        }
        let spec = &self.bundle.manifest().input;
        let (width, height) = (spec.width as u32, spec.height as u32);
        let rgb = cleave_codec::offload::decode_image(bytes, width, height)
            .map_err(|e| TailError::BadRequest(format!("offloaded image: {e}")))?;
        let rgb = image::RgbImage::from_raw(width, height, rgb).ok_or_else(|| {
            TailError::BadRequest("offloaded image: the decoder returned a short buffer".into())
        })?;
        let sample = Preprocessor::new(spec).tensor(&rgb);
        Ok(Tensor::stack(&[&sample]))
    }

    /// Decodes an offloaded image and runs the full model on it; counts the request, its
    /// bytes and its outcome.
    ///
    /// # Errors
    ///
    /// Those of [`ServedModel::decode_image`] and [`ServedModel::infer`].
    pub async fn infer_image(
        &self,
        bytes: &[u8],
        deadline: Option<Instant>,
    ) -> Result<Answer, TailError> {
        self.decode_and_run(bytes.len(), || self.decode_image(bytes), deadline)
            .await
    }

    /// Decodes one frame and runs it; counts the request, its bytes and its outcome.
    ///
    /// # Errors
    ///
    /// Those of [`ServedModel::decode_frame`] and [`ServedModel::infer`].
    pub async fn infer_frame(
        &self,
        bytes: &[u8],
        deadline: Option<Instant>,
    ) -> Result<Answer, TailError> {
        self.infer_frames(&[bytes], deadline).await
    }

    /// Decodes several frames (one request) and runs them as one `[N, ..]` input; counts
    /// the request, its bytes and its outcome.
    ///
    /// # Errors
    ///
    /// Those of [`ServedModel::decode_frame`] (the first bad frame) and
    /// [`ServedModel::infer`].
    pub async fn infer_frames(
        &self,
        frames: &[&[u8]],
        deadline: Option<Instant>,
    ) -> Result<Answer, TailError> {
        let bytes = frames.iter().map(|f| f.len()).sum();
        self.decode_and_run(bytes, || self.decode_all(frames), deadline)
            .await
    }

    /// Counts `bytes` received, decodes with `decode` (a failure counts as bad input) and
    /// runs the result.
    async fn decode_and_run(
        &self,
        bytes: usize,
        decode: impl FnOnce() -> Result<Tensor, TailError>,
        deadline: Option<Instant>,
    ) -> Result<Answer, TailError> {
        let received = Instant::now();
        self.metrics.received(bytes);
        let input = match decode() {
            Ok(input) => input,
            Err(error) => {
                self.metrics
                    .answered(Err(Failure::BadInput), received.elapsed());
                return Err(error);
            }
        };
        self.run(input, deadline, received).await
    }

    /// The frames' tensors concatenated along the batch axis.
    fn decode_all(&self, frames: &[&[u8]]) -> Result<Tensor, TailError> {
        let mut input: Option<Tensor> = None;
        for frame in frames {
            let sample = self.decode_frame(frame)?;
            match input.as_mut() {
                None => input = Some(sample),
                Some(batch) => {
                    batch.shape[0] += 1;
                    batch.data.extend_from_slice(&sample.data);
                }
            }
        }
        input.ok_or_else(|| TailError::BadRequest("no frame in the request".into()))
    }

    /// Runs a tensor of `[N, ..input_shape]` through the batcher; counts the request.
    ///
    /// # Errors
    ///
    /// [`TailError::BadRequest`] for a shape the model does not take or a batch too large,
    /// [`TailError::Overloaded`], [`TailError::DeadlineExceeded`], [`TailError::Inference`],
    /// [`TailError::ShuttingDown`].
    pub async fn infer(
        &self,
        input: Tensor,
        deadline: Option<Instant>,
    ) -> Result<Answer, TailError> {
        let received = Instant::now();
        self.metrics.received(input.data.len() * 4);
        self.run(input, deadline, received).await
    }

    async fn run(
        &self,
        input: Tensor,
        deadline: Option<Instant>,
        received: Instant,
    ) -> Result<Answer, TailError> {
        let result = self.batcher.infer(input, deadline).await;
        let outcome = match &result {
            Ok(_) => Ok(()),
            Err(BatchError::QueueFull { .. }) => Err(Failure::QueueFull),
            Err(BatchError::DeadlineExceeded { .. }) => Err(Failure::Deadline),
            Err(BatchError::BadRequest(_)) => Err(Failure::BadInput),
            Err(BatchError::Stopped(_)) => Err(Failure::Shutdown),
            Err(_) => Err(Failure::Model),
        };
        self.metrics.answered(outcome, received.elapsed());
        let BatchOutput {
            output,
            queue,
            compute,
            batch_size,
        } = result?;
        Ok(Answer {
            output,
            queue,
            compute,
            batch_size,
        })
    }

    /// What each sample of an output means, by the bundle's task: top-k classes, or boxes
    /// from a detector's map (thresholds and NMS from the manifest's `[detection]`).
    ///
    /// # Errors
    ///
    /// [`TailError::Inference`] if a detector's output is not the map it should be.
    pub fn predictions(&self, output: &Tensor) -> Result<Vec<Prediction>, TailError> {
        let labels = &self.bundle.manifest().labels.names;
        let label = |index: usize| labels.get(index).cloned().unwrap_or_default();
        if let Some(detector) = &self.detector {
            let boxes = detector
                .detect_batch(output)
                .map_err(|e| TailError::Inference(e.to_string()))?;
            return Ok(boxes
                .into_iter()
                .map(|found| {
                    Prediction::Boxes(found.into_iter().map(|d| (d, label(d.label))).collect())
                })
                .collect());
        }
        let rows = output.shape.first().copied().unwrap_or(0);
        let per_row = output.data.len() / rows.max(1);
        Ok(output
            .data
            .chunks(per_row.max(1))
            .take(rows)
            .map(|logits| {
                Prediction::Classes(
                    top_k(logits, TOP_K)
                        .into_iter()
                        .map(|c| {
                            let name = label(c.index);
                            (c, name)
                        })
                        .collect(),
                )
            })
            .collect())
    }
}

/// Every served model, by bundle id (tails) and by name (all).
#[derive(Debug)]
pub struct ModelRepository {
    models: Vec<Arc<ServedModel>>,
}

impl ModelRepository {
    /// Opens every bundle of `config`, loads and warms up each model's instances and starts
    /// their batchers. Blocking: call it off the async workers.
    ///
    /// # Errors
    ///
    /// The first bundle that does not open or load, a model whose warm-up fails, or two
    /// bundles with the same name.
    pub fn load(config: &TailConfig) -> Result<Self, TailError> {
        let mut models: Vec<Arc<ServedModel>> = Vec::new();
        for dir in &config.bundles {
            let bundle = Arc::new(Bundle::open(dir)?);
            let name = bundle.manifest().name.clone();
            let settings = config.settings_for(&name).clone();
            let mut roles = vec![(name.clone(), Role::Tail)];
            if settings.full_model {
                roles.push((format!("{name}-full"), Role::Full));
            }
            for (model_name, role) in roles {
                if let Some(twin) = models.iter().find(|m| m.name == model_name) {
                    return Err(TailError::Startup(format!(
                        "two bundles named {model_name}: {} and {}",
                        twin.bundle.dir().display(),
                        dir.display()
                    )));
                }
                let served = load_model(&bundle, &model_name, role, &settings, config)?;
                models.push(Arc::new(served));
            }
        }
        Ok(Self { models })
    }

    /// Every served model, in load order.
    pub fn models(&self) -> &[Arc<ServedModel>] {
        &self.models
    }

    /// The tail model for a head's bundle id.
    ///
    /// # Errors
    ///
    /// [`TailError::UnknownBundle`] listing the bundles served.
    pub fn tail_for(&self, id: BundleId) -> Result<&Arc<ServedModel>, TailError> {
        self.models
            .iter()
            .find(|m| m.role == Role::Tail && m.bundle.id() == id)
            .ok_or_else(|| TailError::UnknownBundle {
                requested: id.to_string(),
                served: self.served_bundles(),
            })
    }

    /// The full model of a bundle, if this tail serves it (`full_model = true`).
    pub fn full_for(&self, id: BundleId) -> Option<&Arc<ServedModel>> {
        self.models
            .iter()
            .find(|m| m.role == Role::Full && m.bundle.id() == id)
    }

    /// The tail model whose bundle id starts with a frame's tag.
    ///
    /// # Errors
    ///
    /// [`TailError::UnknownBundle`] listing the bundles served.
    pub fn tail_for_tag(&self, tag: BundleTag) -> Result<&Arc<ServedModel>, TailError> {
        self.models
            .iter()
            .find(|m| m.role == Role::Tail && m.bundle.id().tag() == tag)
            .ok_or_else(|| TailError::UnknownBundle {
                requested: format!("{tag}… (frame tag)"),
                served: self.served_bundles(),
            })
    }

    /// A model by the name a KServe client uses.
    ///
    /// # Errors
    ///
    /// [`TailError::UnknownModel`] listing the names served.
    pub fn by_name(&self, name: &str) -> Result<&Arc<ServedModel>, TailError> {
        self.models
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| TailError::UnknownModel {
                requested: name.to_string(),
                served: self.models.iter().map(|m| m.name.clone()).collect(),
            })
    }

    /// `name (id)` of every served bundle.
    pub fn served_bundles(&self) -> Vec<String> {
        self.models
            .iter()
            .filter(|m| m.role == Role::Tail)
            .map(|m| {
                format!(
                    "{} {} ({})",
                    m.name,
                    m.bundle.manifest().version,
                    m.bundle.id()
                )
            })
            .collect()
    }

    /// Stops every batcher from taking requests; queued ones still run.
    pub fn close(&self) {
        for model in &self.models {
            model.close();
        }
    }
}

fn load_model(
    bundle: &Arc<Bundle>,
    name: &str,
    role: Role,
    settings: &ModelSettings,
    config: &TailConfig,
) -> Result<ServedModel, TailError> {
    let started = Instant::now();
    let mut instances = Vec::with_capacity(settings.instances);
    for _ in 0..settings.instances {
        let options = match settings.threads {
            Some(threads) => LoadOptions {
                threads: Some(threads),
            },
            None => LoadOptions::sharing_cores(settings.instances),
        };
        let model = bundle.load_with(role, &settings.backend, &options)?;
        warm_up(name, &model, &settings.batching)?;
        instances.push(model);
    }
    tracing::info!(
        model = name,
        role = role.name(),
        backend = %settings.backend,
        instances = settings.instances,
        max_batch = settings.batching.max_batch_size,
        seconds = started.elapsed().as_secs_f64(),
        "model loaded and warmed up"
    );
    let batcher =
        Batcher::start(name, instances, settings.batching.clone()).map_err(TailError::Startup)?;
    // A frame holds exactly one bottleneck: no more elements than that are ever decoded, and
    // a frame for another bundle is refused before its payload is.
    let limits = Limits {
        max_frame_bytes: config.max_frame_bytes,
        max_elements: bundle.manifest().bottleneck.shape.iter().product(),
    };
    let decoder =
        FrameDecoder::new(bundle.coding_tables().cloned(), limits).expecting(bundle.id().tag());
    Ok(ServedModel {
        name: name.to_string(),
        role,
        bundle: bundle.clone(),
        batcher,
        decoder,
        settings: settings.clone(),
        detector: DbPostprocess::for_bundle(bundle),
        metrics: ModelMetrics::new(name),
    })
}

/// Runs the model once at every batch size the batcher can form from single samples
/// (1, the preferred sizes, the largest), so lazy initialisation and per-shape engine
/// builds happen before the server says it is ready.
fn warm_up(name: &str, model: &Model, batching: &crate::BatchingConfig) -> Result<(), TailError> {
    let mut sizes = vec![1, batching.max_batch_size];
    sizes.extend(&batching.preferred_batch_sizes);
    sizes.sort_unstable();
    sizes.dedup();
    let sample: usize = model.input_shape().iter().product();
    for size in sizes {
        let mut shape = vec![size];
        shape.extend_from_slice(model.input_shape());
        model
            .run(&Tensor::new(shape, vec![0.0; size * sample]))
            .map_err(|e| TailError::Startup(format!("{name}: warm-up at batch {size}: {e}")))?;
    }
    Ok(())
}
