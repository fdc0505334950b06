//! The bundle's neural prefilter: send nothing when there is nothing to see.
//!
//! As in the neural-filter detectors of Matsubara et al., a small classifier reads the
//! head's bottleneck — features the head computes anyway for `split` — and says how likely
//! the frame is to hold what the bundle cares about (for the bundled model: an animal, a
//! vehicle or a person, as the full model sees it). Below the threshold the frame is
//! dropped with a report that says so, and nothing is sent or run further.
//!
//! Its cost is a few thousand multiply-adds on top of the head. In `offload` and `local`
//! the head is not otherwise run, so there the prefilter costs one head run per frame: it
//! pays when it drops more than the head costs relative to the rest.

use std::sync::Arc;

use cleave_engine::{Backend, Bundle, Model, Tensor};

use crate::HeadError;

/// The loaded prefilter and its threshold.
#[derive(Debug)]
pub struct Prefilter {
    model: Model,
    backend: &'static str,
    threshold: f32,
    positive: String,
}

/// What the prefilter said of one frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// The probability that the frame is of interest.
    pub interest: f32,
    /// Whether it is kept: `interest` at or above the threshold.
    pub keep: bool,
}

impl Prefilter {
    /// Loads the bundle's prefilter; `threshold` replaces the manifest's.
    ///
    /// # Errors
    ///
    /// [`HeadError::Engine`] if the bundle has no prefilter or it does not load.
    pub fn new(
        bundle: &Arc<Bundle>,
        backend: &Backend,
        threshold: Option<f32>,
    ) -> Result<Self, HeadError> {
        let (Some(spec), Some(model)) = (bundle.prefilter_spec(), bundle.load_prefilter(backend)?)
        else {
            return Err(HeadError::Config(format!(
                "bundle {} has no prefilter ([models.prefilter] and [prefilter] in its manifest)",
                bundle.dir().display()
            )));
        };
        Ok(Self {
            model,
            backend: backend.name(),
            threshold: threshold.unwrap_or(spec.threshold as f32),
            positive: spec.positive.clone(),
        })
    }

    /// The threshold in use.
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// What counts as interesting, as the bundle describes it.
    pub fn positive(&self) -> &str {
        &self.positive
    }

    /// Runs the prefilter on the head's output (`[1, ..bottleneck]`).
    ///
    /// # Errors
    ///
    /// [`HeadError::Engine`] if the model fails or returns no value.
    pub fn check(&self, features: &Tensor) -> Result<Verdict, HeadError> {
        let output = self.model.run(features)?;
        let interest = output.data.first().copied().ok_or_else(|| {
            HeadError::Engine(cleave_engine::EngineError::Run {
                backend: self.backend,
                reason: "the prefilter returned nothing".into(),
            })
        })?;
        Ok(Verdict {
            interest,
            keep: interest >= self.threshold,
        })
    }
}
