//! Image in, coded feature frame out: preprocessing, head model, quantization, framing.
//!
//! What the frame is coded with is a [`CodingPolicy`]: a fixed bit depth and codec (the
//! bundle's default unless told otherwise), the bundle's learned prior, or a byte budget per
//! frame that the codec's rate control meets with the highest bit depth that fits.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use cleave_codec::{Choice, Codec, Coding, FrameEncoder, Granularity};
use cleave_engine::{Backend, Bundle, Model, Preprocessor, Role, Tensor};

use crate::HeadError;

/// How the head codes its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodingPolicy {
    /// Always this bit depth and codec (the bundle's calibrated level at that depth if it
    /// has one, otherwise ranges fitted to each frame).
    Fixed {
        /// Bit depth, 2 to 8.
        bits: u8,
        /// Payload codec.
        codec: Codec,
    },
    /// The bundle's learned factorized prior.
    Learned,
    /// The highest calibrated bit depth whose frame fits in `bytes`.
    Budget {
        /// Bytes per frame, header included.
        bytes: usize,
        /// Payload codec.
        codec: Codec,
    },
}

/// Runs a bundle's head: everything the device does before the uplink.
#[derive(Debug)]
pub struct HeadEncoder {
    bundle: Arc<Bundle>,
    preprocessor: Preprocessor,
    model: Model,
    policy: CodingPolicy,
    granularity: Granularity,
}

/// One frame, ready to send.
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    /// The coded feature frame (cleave-codec format).
    pub bytes: Vec<u8>,
    /// What the frame was coded with.
    pub coding: Coding,
    /// The payload codec.
    pub codec: Codec,
    /// Milliseconds spent decoding and preprocessing the image.
    pub preprocess_ms: f64,
    /// Milliseconds spent in the head model, quantization and coding.
    pub head_ms: f64,
}

impl HeadEncoder {
    /// Loads the bundle's head model with `backend`; frames are coded as the manifest's
    /// `[bottleneck.quantization]` says until [`with_policy`](Self::with_policy).
    ///
    /// # Errors
    ///
    /// [`HeadError::Engine`] if the model does not load.
    pub fn new(bundle: Arc<Bundle>, backend: &Backend) -> Result<Self, HeadError> {
        let model = bundle.load(Role::Head, backend)?;
        let preprocessor = Preprocessor::new(&bundle.manifest().input);
        let q = &bundle.manifest().bottleneck.quantization;
        // Bundle::open validated the names.
        let codec = Codec::from_name(&q.codec).unwrap_or(Codec::Zstd);
        let granularity = match q.granularity.as_str() {
            "per_tensor" => Granularity::PerTensor,
            _ => Granularity::PerChannel,
        };
        let policy = CodingPolicy::Fixed {
            bits: q.bits,
            codec,
        };
        Ok(Self {
            bundle,
            preprocessor,
            model,
            policy,
            granularity,
        })
    }

    /// Codes frames with `policy` instead of the bundle's default.
    ///
    /// # Errors
    ///
    /// [`HeadError::Codec`] if the policy needs tables the bundle does not have (a calibrated
    /// level, the learned prior, or any level for a budget), or `ans` on a bundle without
    /// priors.
    pub fn with_policy(mut self, policy: CodingPolicy) -> Result<Self, HeadError> {
        let tables = self.bundle.coding_tables();
        let problem = match policy {
            CodingPolicy::Fixed { bits, codec } => match tables {
                Some(t) if !t.levels().is_empty() && t.level(bits).is_none() => Some(format!(
                    "the bundle has no calibrated level at {bits} bits (it has {:?})",
                    t.levels().iter().map(|l| l.bits).collect::<Vec<_>>()
                )),
                _ if codec == Codec::Ans && tables.is_none_or(|t| t.levels().is_empty()) => {
                    Some("ans needs the bundle's calibrated priors; this bundle has none".into())
                }
                _ => None,
            },
            CodingPolicy::Learned => tables
                .and_then(|t| t.learned())
                .is_none()
                .then(|| "the bundle has no learned prior".to_owned()),
            CodingPolicy::Budget { .. } => tables
                .is_none_or(|t| t.levels().is_empty())
                .then(|| "a byte budget needs a bundle with calibrated levels".to_owned()),
        };
        if let Some(problem) = problem {
            return Err(HeadError::Codec(problem));
        }
        self.policy = policy;
        Ok(self)
    }

    /// The policy frames are coded with.
    pub fn policy(&self) -> CodingPolicy {
        self.policy
    }

    /// The bundle this head runs.
    pub fn bundle(&self) -> &Arc<Bundle> {
        &self.bundle
    }

    /// The preprocessor, for callers that also need the model input (local inference).
    pub fn preprocessor(&self) -> &Preprocessor {
        &self.preprocessor
    }

    /// Reads, preprocesses and encodes an image file.
    ///
    /// # Errors
    ///
    /// [`HeadError::Engine`] if the image does not read or decode or the model fails,
    /// [`HeadError::Codec`] if the features cannot be coded (e.g. NaN, or over budget).
    pub fn encode_path(&self, path: &Path) -> Result<EncodedFrame, HeadError> {
        let started = Instant::now();
        let input = self.preprocessor.from_path(path)?;
        let preprocess_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut frame = self.encode_tensor(&input)?;
        frame.preprocess_ms = preprocess_ms;
        Ok(frame)
    }

    /// Encodes a preprocessed `[3, H, W]` input.
    ///
    /// # Errors
    ///
    /// As [`encode_path`](Self::encode_path), without the file errors.
    pub fn encode_tensor(&self, input: &Tensor) -> Result<EncodedFrame, HeadError> {
        let started = Instant::now();
        let features = self.features(input)?;
        let mut frame = self.code(&features)?;
        frame.head_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(frame)
    }

    /// Runs the head model on a preprocessed `[3, H, W]` input: the bottleneck
    /// (`[1, ..bottleneck]`), before quantization.
    ///
    /// # Errors
    ///
    /// [`HeadError::Engine`] if the model fails.
    pub fn features(&self, input: &Tensor) -> Result<Tensor, HeadError> {
        Ok(self.model.run(&Tensor::stack(&[input]))?)
    }

    /// Quantizes and codes the head's output with the encoder's policy; `head_ms` is the
    /// coding time alone.
    ///
    /// # Errors
    ///
    /// [`HeadError::Codec`] if the features cannot be coded (e.g. NaN, or over budget).
    pub fn code(&self, features: &Tensor) -> Result<EncodedFrame, HeadError> {
        self.code_with(features, self.policy)
    }

    /// As [`code`](Self::code), at `bits` (a calibrated depth of the bundle), with the
    /// policy's codec: what rate control asks for per frame.
    ///
    /// # Errors
    ///
    /// As [`code`](Self::code).
    pub fn code_at(&self, features: &Tensor, bits: u8) -> Result<EncodedFrame, HeadError> {
        let codec = match self.policy {
            CodingPolicy::Fixed { codec, .. } | CodingPolicy::Budget { codec, .. } => codec,
            CodingPolicy::Learned => Codec::Ans,
        };
        self.code_with(features, CodingPolicy::Fixed { bits, codec })
    }

    fn code_with(
        &self,
        features: &Tensor,
        policy: CodingPolicy,
    ) -> Result<EncodedFrame, HeadError> {
        let started = Instant::now();
        let shape = &self.bundle.manifest().bottleneck.shape;
        let tables = self.bundle.coding_tables();
        let encoder = FrameEncoder::new(self.bundle.id().tag(), tables);
        let coded = match policy {
            CodingPolicy::Fixed { bits, codec }
                if tables.is_some_and(|t| t.level(bits).is_some()) =>
            {
                encoder.encode(&features.data, shape, Choice::Calibrated { bits, codec })
            }
            CodingPolicy::Fixed { bits, codec } => {
                let choice = Choice::Inline {
                    bits,
                    granularity: self.granularity,
                    codec,
                };
                encoder.encode(&features.data, shape, choice)
            }
            CodingPolicy::Learned => encoder.encode(&features.data, shape, Choice::Learned),
            CodingPolicy::Budget { bytes, codec } => {
                encoder.encode_within(&features.data, shape, bytes, codec)
            }
        }
        .map_err(|e| HeadError::Codec(e.to_string()))?;
        Ok(EncodedFrame {
            bytes: coded.bytes,
            coding: coded.coding,
            codec: coded.codec,
            preprocess_ms: 0.0,
            head_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }
}
