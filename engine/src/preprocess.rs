//! Image → input tensor, as the bundle's manifest says: decode, centre-crop a square of
//! `crop_fraction` of the shorter side, resize, `(pixel - mean) / std`, NCHW.
//!
//! This mirrors `Preprocess` in `models/tools/make_bundle.py`, which measured the bundle's
//! fidelity; the two must stay in step.

use std::path::Path;

use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};

use crate::{EngineError, InputSpec, Tensor};

/// Turns images into model input tensors for one bundle.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    spec: InputSpec,
    filter: FilterType,
}

impl Preprocessor {
    /// A preprocessor for the manifest's input spec.
    pub fn new(spec: &InputSpec) -> Self {
        let filter = match spec.resize.as_str() {
            "nearest" => FilterType::Nearest,
            _ => FilterType::Triangle,
        };
        Self {
            spec: spec.clone(),
            filter,
        }
    }

    /// Decodes JPEG or PNG bytes.
    ///
    /// # Errors
    ///
    /// [`EngineError::Image`] if the bytes are not a decodable image.
    pub fn decode(bytes: &[u8]) -> Result<DynamicImage, EngineError> {
        image::load_from_memory(bytes).map_err(|e| EngineError::Image(e.to_string()))
    }

    /// Reads and preprocesses an image file.
    ///
    /// # Errors
    ///
    /// [`EngineError::Missing`] if the file cannot be read, [`EngineError::Image`] if it does
    /// not decode.
    pub fn from_path(&self, path: &Path) -> Result<Tensor, EngineError> {
        let bytes = std::fs::read(path).map_err(|e| EngineError::Missing {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let image = Self::decode(&bytes)
            .map_err(|e| EngineError::Image(format!("{}: {e}", path.display())))?;
        Ok(self.tensor(&self.crop_resize(&image)))
    }

    /// The centred crop, resized to the model's input size, as 8-bit RGB. This is also what
    /// the offload baseline would send.
    pub fn crop_resize(&self, image: &DynamicImage) -> RgbImage {
        let rgb = image.to_rgb8();
        let (w, h) = (f64::from(rgb.width()), f64::from(rgb.height()));
        let side = w.min(h) * f64::from(self.spec.crop_fraction);
        let left = ((w - side) / 2.0).round_ties_even();
        let top = ((h - side) / 2.0).round_ties_even();
        let right = ((w + side) / 2.0).round_ties_even();
        let bottom = ((h + side) / 2.0).round_ties_even();
        let (cw, ch) = (
            (right - left).max(1.0) as u32,
            (bottom - top).max(1.0) as u32,
        );
        let crop = image::imageops::crop_imm(&rgb, left as u32, top as u32, cw, ch).to_image();
        image::imageops::resize(
            &crop,
            self.spec.width as u32,
            self.spec.height as u32,
            self.filter,
        )
    }

    /// Normalizes an already cropped and resized RGB image into a `[3, H, W]` tensor.
    pub fn tensor(&self, rgb: &RgbImage) -> Tensor {
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let mut data = vec![0f32; 3 * w * h];
        for (i, pixel) in rgb.pixels().enumerate() {
            for c in 0..3 {
                data[c * w * h + i] = (f32::from(pixel[c]) - self.spec.mean[c]) / self.spec.std[c];
            }
        }
        Tensor::new(vec![3, h, w], data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InputSpec {
        InputSpec {
            width: 4,
            height: 4,
            layout: "NCHW".into(),
            color: "RGB".into(),
            resize: "bilinear".into(),
            crop_fraction: 1.0,
            mean: [127.0; 3],
            std: [128.0; 3],
        }
    }

    #[test]
    fn normalizes_into_nchw() {
        let pre = Preprocessor::new(&spec());
        let image = RgbImage::from_fn(8, 8, |_, _| image::Rgb([255, 127, 0]));
        let t = pre.tensor(&pre.crop_resize(&DynamicImage::ImageRgb8(image)));
        assert_eq!(t.shape, vec![3, 4, 4]);
        assert!(t.data[..16].iter().all(|&v| (v - 1.0).abs() < 1e-6));
        assert!(t.data[16..32].iter().all(|&v| v.abs() < 1e-6));
        assert!(
            t.data[32..]
                .iter()
                .all(|&v| (v + 127.0 / 128.0).abs() < 1e-6)
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(
            Preprocessor::decode(b"not an image"),
            Err(EngineError::Image(_))
        ));
    }
}
