//! The offload payload: the model input as a JPEG or PNG, decoded without trusting it.
//!
//! In `offload` mode a head sends, instead of a feature frame, an image of exactly the
//! model's input size (cropped and resized on the head). The bytes come off the network,
//! so the decoder reads the size from the image's header and refuses anything but the
//! expected width × height before a pixel is decoded, and caps what the image library may
//! allocate: a hostile "100 000 × 100 000" PNG costs a header read, not gigabytes.
//! Like the frame decoder, every malformed input is a typed error, never a panic
//! (`fuzz/fuzz_targets/decode_image.rs`).

use std::io::Cursor;

use image::{ImageFormat, ImageReader, Limits};

/// Why offloaded image bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// Not a JPEG or PNG.
    #[error("not a JPEG or PNG image")]
    Format,
    /// The header gives another size than the model's input.
    #[error("the image is {width}x{height}, the model takes {expected_width}x{expected_height}")]
    Size {
        /// Width in the header.
        width: u32,
        /// Height in the header.
        height: u32,
        /// The model input's width.
        expected_width: u32,
        /// The model input's height.
        expected_height: u32,
    },
    /// The header or the pixels do not decode.
    #[error("the image does not decode: {0}")]
    Decode(String),
}

/// Decodes an offloaded image of exactly `width` × `height` into RGB8, row by row.
///
/// # Errors
///
/// [`ImageError`] for anything else: another format, another size, bytes that do not
/// decode.
pub fn decode_image(bytes: &[u8], width: u32, height: u32) -> Result<Vec<u8>, ImageError> {
    let format = match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Jpeg | ImageFormat::Png)) => f,
        _ => return Err(ImageError::Format),
    };
    let mut limits = Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // The decoded image (up to 4 bytes a pixel, 16-bit PNG: 8) and the decoders' own buffers.
    limits.max_alloc = Some(u64::from(width) * u64::from(height) * 8 + (4 << 20));
    let reader = |limits: Limits| {
        let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
        reader.limits(limits);
        reader
    };
    let (w, h) = reader(limits.clone())
        .into_dimensions()
        .map_err(|e| header_error(&e, width, height))?;
    if (w, h) != (width, height) {
        return Err(ImageError::Size {
            width: w,
            height: h,
            expected_width: width,
            expected_height: height,
        });
    }
    let image = reader(limits)
        .decode()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    Ok(image.into_rgb8().into_raw())
}

/// A header the limits refused is a size error; anything else does not decode.
fn header_error(error: &image::ImageError, width: u32, height: u32) -> ImageError {
    match error {
        image::ImageError::Limits(_) => ImageError::Decode(format!(
            "larger than the model's {width}x{height} input ({error})"
        )),
        other => ImageError::Decode(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use image::codecs::jpeg::JpegEncoder;
    use image::{ImageEncoder, RgbImage};

    use super::*;

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let rgb = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Vec::new();
        JpegEncoder::new_with_quality(&mut out, 90)
            .write_image(rgb.as_raw(), w, h, image::ExtendedColorType::Rgb8)
            .unwrap();
        out
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let rgb = RgbImage::from_fn(w, h, |x, _| image::Rgb([x as u8, 0, 0]));
        let mut out = Vec::new();
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(rgb.as_raw(), w, h, image::ExtendedColorType::Rgb8)
            .unwrap();
        out
    }

    #[test]
    fn an_image_of_the_input_size_decodes_to_rgb() {
        let rgb = decode_image(&jpeg(32, 16), 32, 16).unwrap();
        assert_eq!(rgb.len(), 32 * 16 * 3);
        let rgb = decode_image(&png(8, 8), 8, 8).unwrap();
        assert_eq!(&rgb[3 * 5..3 * 6], &[5, 0, 0]);
    }

    #[test]
    fn other_sizes_and_formats_are_refused_before_decoding() {
        assert!(matches!(
            decode_image(&jpeg(16, 16), 32, 16),
            Err(ImageError::Size { width: 16, .. })
        ));
        // Larger than the input: refused from the header by the limits.
        assert!(matches!(
            decode_image(&png(64, 64), 32, 32),
            Err(ImageError::Decode(m)) if m.contains("larger")
        ));
        assert_eq!(decode_image(b"GIF89a....", 8, 8), Err(ImageError::Format));
        assert_eq!(decode_image(&[], 8, 8), Err(ImageError::Format));
    }

    #[test]
    fn truncated_and_corrupted_images_are_errors_not_panics() {
        let good = jpeg(32, 32);
        for cut in (0..good.len()).step_by(37) {
            let _ = decode_image(&good[..cut], 32, 32);
        }
        let mut bad = png(8, 8);
        for i in (8..bad.len()).step_by(3) {
            bad[i] ^= 0x5a;
            let _ = decode_image(&bad, 8, 8);
        }
        // A PNG header claiming a huge image.
        let mut huge = png(8, 8);
        huge[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        huge[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        assert!(decode_image(&huge, 8, 8).is_err());
    }
}
