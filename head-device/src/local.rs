//! The whole model on the device, for frames no tail can answer.
//!
//! A bundle carries `full.onnx` beside its head and tail, so a head that loses its link can
//! still answer, slower and with more energy, instead of dropping frames. The answer is
//! postprocessed as the tail would: top-5 classes, or boxes for a detection bundle.

use std::sync::Arc;
use std::time::Instant;

use cleave_engine::{Backend, Bundle, DbPostprocess, Model, Role, Tensor, top_k};

use crate::HeadError;
use crate::report::{DetectedBox, Outcome, Score};

/// Classes reported per frame, as the tail does.
const TOP_K: usize = 5;

/// A bundle's full model, loaded on the device.
#[derive(Debug)]
pub struct LocalModel {
    bundle: Arc<Bundle>,
    model: Model,
    detector: Option<DbPostprocess>,
}

impl LocalModel {
    /// Loads `full.onnx` of `bundle` with `backend`.
    ///
    /// # Errors
    ///
    /// [`HeadError::Engine`] if it does not load.
    pub fn new(bundle: Arc<Bundle>, backend: &Backend) -> Result<Self, HeadError> {
        let model = bundle.load(Role::Full, backend)?;
        let detector = DbPostprocess::for_bundle(&bundle);
        Ok(Self {
            bundle,
            model,
            detector,
        })
    }

    /// Runs one preprocessed `[3, H, W]` input; returns the outcome and the milliseconds the
    /// model and postprocessing took.
    ///
    /// # Errors
    ///
    /// [`HeadError::Engine`] if the model fails or its output has the wrong shape.
    pub fn run(&self, input: &Tensor) -> Result<(Outcome, f64), HeadError> {
        let started = Instant::now();
        let output = self.model.run(&Tensor::stack(&[input]))?;
        let labels = &self.bundle.manifest().labels.names;
        let label = |index: usize| labels.get(index).cloned().unwrap_or_default();
        let outcome = match &self.detector {
            Some(detector) => Outcome::Detected {
                boxes: detector
                    .detect_batch(&output)?
                    .into_iter()
                    .next()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|d| DetectedBox {
                        corners: [d.x0, d.y0, d.x1, d.y1],
                        score: d.score,
                        label: label(d.label),
                    })
                    .collect(),
            },
            None => Outcome::Classified {
                top5: top_k(&output.data, TOP_K)
                    .into_iter()
                    .map(|c| Score {
                        index: u32::try_from(c.index).unwrap_or(u32::MAX),
                        label: label(c.index),
                        score: c.score,
                    })
                    .collect(),
            },
        };
        Ok((outcome, started.elapsed().as_secs_f64() * 1e3))
    }
}
