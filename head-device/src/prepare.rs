//! The per-frame work that blocks: read the picture, crop and resize it, ask the scene
//! gate and the prefilter, then do what the frame's mode needs here — code the head's
//! features (`split`), encode a JPEG (`offload`) or run the whole model (`local`).
//!
//! It runs on tokio's blocking threads, never on the async workers.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use cleave_engine::{Preprocessor, Tensor};
use image::codecs::jpeg::JpegEncoder;
use image::{DynamicImage, RgbImage};

use crate::local::LocalModel;
use crate::prefilter::Prefilter;
use crate::report::Outcome;
use crate::scene_gate::{SceneGate, Verdict};
use crate::sources::Picture;
use crate::{HeadEncoder, HeadError, Payload};

/// What a frame's mode needs done on the device.
#[derive(Debug, Clone)]
pub(crate) enum Work {
    /// Head model and coding (at this depth, if rate control chose one).
    Split { bits: Option<u8> },
    /// A JPEG of the model input at this quality (1–100).
    Offload { quality: u8 },
    /// The full model.
    Local(Arc<LocalModel>),
}

/// What the device made of a frame.
#[derive(Debug)]
pub(crate) enum Prepared {
    /// The scene gate held it back.
    Unchanged { change: f32, preprocess_ms: f64 },
    /// Ready for the uplink.
    Ready {
        payload: Payload,
        /// How it was coded, for the report (`5-bit calibrated, ans`, `jpeg q85`).
        coding: String,
        preprocess_ms: f64,
        /// Head and coding, or the JPEG encoder.
        device_ms: f64,
        /// The model input, kept for a local fallback if the link fails.
        input: Option<Tensor>,
    },
    /// The prefilter saw nothing of interest.
    Filtered {
        interest: f32,
        threshold: f32,
        preprocess_ms: f64,
        /// Head and prefilter.
        device_ms: f64,
    },
    /// Answered here by the full model.
    Local {
        ran: Result<(Outcome, f64), HeadError>,
        preprocess_ms: f64,
    },
}

/// Turns a source's picture into the model's cropped and resized RGB input.
fn picture(encoder: &HeadEncoder, picture: Picture) -> Result<RgbImage, HeadError> {
    let image = match picture {
        Picture::File(path) => {
            let input_error = |reason: String| HeadError::Input {
                path: path.display().to_string(),
                reason,
            };
            let bytes = std::fs::read(&path).map_err(|e| input_error(e.to_string()))?;
            Preprocessor::decode(&bytes).map_err(|e| input_error(e.to_string()))?
        }
        Picture::Rgb(rgb) => DynamicImage::ImageRgb8(rgb),
    };
    Ok(encoder.preprocessor().crop_resize(&image))
}

/// Preprocess, gate, prefilter, then the mode's work.
pub(crate) fn prepare(
    encoder: &HeadEncoder,
    gate: Option<&Mutex<SceneGate>>,
    prefilter: Option<&Prefilter>,
    source: Picture,
    work: &Work,
    keep_input: bool,
) -> Result<Prepared, HeadError> {
    let read = Instant::now();
    let rgb = picture(encoder, source)?;
    if let Some(gate) = gate {
        let verdict = gate
            .lock()
            .map_or(Verdict::Pass { change: None }, |mut g| g.check(&rgb));
        if let Verdict::Unchanged { change } = verdict {
            return Ok(Prepared::Unchanged {
                change,
                preprocess_ms: ms_since(read),
            });
        }
    }
    let offload = matches!(work, Work::Offload { .. });
    // The offloaded JPEG is made from the crop; the tensor only if something here needs it.
    let input = (!offload || prefilter.is_some() || keep_input)
        .then(|| encoder.preprocessor().tensor(&rgb));
    let preprocess_ms = ms_since(read);
    let started = Instant::now();
    let features = match (
        &input,
        prefilter.is_some() || matches!(work, Work::Split { .. }),
    ) {
        (Some(input), true) => Some(encoder.features(input)?),
        _ => None,
    };
    if let (Some(prefilter), Some(features)) = (prefilter, &features) {
        let verdict = prefilter.check(features)?;
        if !verdict.keep {
            return Ok(Prepared::Filtered {
                interest: verdict.interest,
                threshold: prefilter.threshold(),
                preprocess_ms,
                device_ms: ms_since(started),
            });
        }
    }
    match (work, input, features) {
        (Work::Offload { quality }, input, _) => {
            let jpeg = jpeg(&rgb, *quality)?;
            Ok(Prepared::Ready {
                payload: Payload::Image(jpeg),
                coding: format!("jpeg q{quality}"),
                preprocess_ms,
                device_ms: ms_since(started),
                input: input.filter(|_| keep_input),
            })
        }
        (Work::Local(local), Some(input), _) => {
            // The head and prefilter run first count as this frame's device work too.
            let filter_ms = ms_since(started);
            Ok(Prepared::Local {
                ran: local
                    .run(&input)
                    .map(|(outcome, ms)| (outcome, ms + filter_ms)),
                preprocess_ms,
            })
        }
        (work, input, Some(features)) => {
            let frame = match work {
                Work::Split { bits: Some(bits) } => encoder.code_at(&features, *bits)?,
                _ => encoder.code(&features)?,
            };
            Ok(Prepared::Ready {
                coding: format!("{}, {}", frame.coding, frame.codec.name()),
                payload: Payload::Features(frame.bytes),
                preprocess_ms,
                device_ms: ms_since(started),
                input: input.filter(|_| keep_input),
            })
        }
        // Unreachable by construction: split and local always have the input.
        _ => Err(HeadError::Config(
            "no model input for this frame's mode".into(),
        )),
    }
}

/// The model input as a baseline JPEG.
fn jpeg(rgb: &RgbImage, quality: u8) -> Result<Vec<u8>, HeadError> {
    let mut bytes = Vec::with_capacity(32 << 10);
    JpegEncoder::new_with_quality(&mut bytes, quality.clamp(1, 100))
        .encode_image(rgb)
        .map_err(|e| HeadError::Codec(format!("jpeg: {e}")))?;
    Ok(bytes)
}

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_of_the_model_input_decodes_to_its_size() {
        let rgb = RgbImage::from_fn(224, 224, |x, y| image::Rgb([x as u8, y as u8, 128]));
        let bytes = jpeg(&rgb, 85).unwrap();
        let back = image::load_from_memory(&bytes).unwrap();
        assert_eq!((back.width(), back.height()), (224, 224));
        // Lower quality, fewer bytes.
        assert!(jpeg(&rgb, 30).unwrap().len() < bytes.len());
    }
}
