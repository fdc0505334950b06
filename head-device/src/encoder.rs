//! Image in, coded feature frame out: preprocessing, head model, quantization, framing.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use cleave_codec::{Codec, Granularity, encode_frame, quantize};
use cleave_engine::{Backend, Bundle, Model, Preprocessor, Role, Tensor};

use crate::HeadError;

/// Runs a bundle's head: everything the device does before the uplink.
#[derive(Debug)]
pub struct HeadEncoder {
    bundle: Arc<Bundle>,
    preprocessor: Preprocessor,
    model: Model,
    codec: Codec,
    granularity: Granularity,
}

/// One frame, ready to send.
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    /// The coded feature frame (cleave-codec format).
    pub bytes: Vec<u8>,
    /// Milliseconds spent decoding and preprocessing the image.
    pub preprocess_ms: f64,
    /// Milliseconds spent in the head model, quantization and coding.
    pub head_ms: f64,
}

impl HeadEncoder {
    /// Loads the bundle's head model with `backend`.
    ///
    /// # Errors
    ///
    /// [`HeadError::Engine`] if the model does not load.
    pub fn new(bundle: Arc<Bundle>, backend: &Backend) -> Result<Self, HeadError> {
        let model = bundle.load(Role::Head, backend)?;
        let preprocessor = Preprocessor::new(&bundle.manifest().input);
        let q = &bundle.manifest().bottleneck.quantization;
        // Bundle::open validated both names.
        let codec = Codec::from_name(&q.codec).unwrap_or(Codec::Zstd);
        let granularity = match q.granularity.as_str() {
            "per_tensor" => Granularity::PerTensor,
            _ => Granularity::PerChannel,
        };
        Ok(Self {
            bundle,
            preprocessor,
            model,
            codec,
            granularity,
        })
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
    /// [`HeadError::Codec`] if the features cannot be coded (e.g. NaN).
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
        let batch = Tensor::stack(&[input]);
        let features = self.model.run(&batch)?;
        let shape = &self.bundle.manifest().bottleneck.shape;
        let quantized = quantize(&features.data, shape, self.granularity)
            .map_err(|e| HeadError::Codec(e.to_string()))?;
        let bytes = encode_frame(&self.bundle.id(), &quantized, self.codec)
            .map_err(|e| HeadError::Codec(e.to_string()))?;
        Ok(EncodedFrame {
            bytes,
            preprocess_ms: 0.0,
            head_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }
}
