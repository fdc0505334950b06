//! The scene-change gate: a fixed camera over a still scene sends nothing new.
//!
//! Each frame (already cropped and resized to the model's input) is shrunk to a 32×32
//! grey thumbnail and compared with the thumbnail of the last frame the gate let through:
//! the mean absolute difference of the grey levels, from 0 (identical) to 1 (black against
//! white). Below the threshold the frame is `unchanged` and goes no further; at or above
//! it, it passes and becomes the new reference. Comparing with the last frame *sent*, not
//! the last frame seen, means a slow drift (a shadow moving) still passes once it adds up.
//!
//! A 32×32 average is cheap (microseconds beside a head model's milliseconds) and blind to
//! sensor noise, which averages out; what it misses by design is a small object moving
//! inside an otherwise still frame, which is what a low threshold is for.

use image::RgbImage;
use image::imageops::FilterType;

/// Side of the grey thumbnail compared.
const THUMB: u32 = 32;

/// What the gate decided for one frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Send it; `change` from the last frame sent (`None` for the first).
    Pass {
        /// Mean absolute difference, 0 to 1.
        change: Option<f32>,
    },
    /// Nearly identical to the last frame sent: skip it.
    Unchanged {
        /// Mean absolute difference, 0 to 1.
        change: f32,
    },
}

/// Remembers the last frame let through; see the module docs.
#[derive(Debug, Clone)]
pub struct SceneGate {
    threshold: f32,
    reference: Option<Vec<u8>>,
}

impl SceneGate {
    /// A gate that lets through frames differing by at least `threshold` (0 to 1) from the
    /// last one it let through. 0 lets everything through.
    pub fn new(threshold: f32) -> Self {
        Self {
            threshold,
            reference: None,
        }
    }

    /// Judges `frame`; a passing frame becomes the reference.
    pub fn check(&mut self, frame: &RgbImage) -> Verdict {
        let thumb = thumbnail(frame);
        let change = self.reference.as_ref().map(|r| difference(r, &thumb));
        match change {
            Some(change) if change < self.threshold => Verdict::Unchanged { change },
            _ => {
                self.reference = Some(thumb);
                Verdict::Pass { change }
            }
        }
    }
}

/// The frame as 32×32 grey levels (Rec. 601 luma).
fn thumbnail(frame: &RgbImage) -> Vec<u8> {
    let small = image::imageops::resize(frame, THUMB, THUMB, FilterType::Triangle);
    small
        .pixels()
        .map(|p| {
            let [r, g, b] = p.0;
            let luma = 0.299 * f32::from(r) + 0.587 * f32::from(g) + 0.114 * f32::from(b);
            luma.round().clamp(0.0, 255.0) as u8
        })
        .collect()
}

/// Mean absolute difference of two thumbnails, 0 to 1.
fn difference(a: &[u8], b: &[u8]) -> f32 {
    let total: u64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    total as f32 / (a.len().max(1) as f32 * 255.0)
}

#[cfg(test)]
mod tests {
    use image::Rgb;

    use super::*;

    fn grey(level: u8) -> RgbImage {
        RgbImage::from_pixel(224, 224, Rgb([level, level, level]))
    }

    #[test]
    fn the_first_frame_passes_and_a_repeat_is_unchanged() {
        let mut gate = SceneGate::new(0.02);
        assert_eq!(gate.check(&grey(100)), Verdict::Pass { change: None });
        assert_eq!(gate.check(&grey(100)), Verdict::Unchanged { change: 0.0 });
    }

    #[test]
    fn sensor_noise_is_unchanged_and_a_new_object_passes() {
        let mut gate = SceneGate::new(0.02);
        gate.check(&grey(100));
        // ±3 levels of pixel noise averages out in the thumbnail.
        let mut noisy = grey(100);
        for (i, p) in noisy.pixels_mut().enumerate() {
            let level = if i % 2 == 0 { 103 } else { 97 };
            *p = Rgb([level, level, level]);
        }
        assert!(matches!(gate.check(&noisy), Verdict::Unchanged { .. }));
        // A bright square over a sixth of the frame.
        let mut object = grey(100);
        for y in 60..150 {
            for x in 60..150 {
                object.put_pixel(x, y, Rgb([250, 250, 250]));
            }
        }
        let Verdict::Pass {
            change: Some(change),
        } = gate.check(&object)
        else {
            panic!("a new object passes");
        };
        // 16 % of the area, 150 grey levels brighter: about 0.09.
        assert!(change > 0.05, "{change}");
    }

    #[test]
    fn a_slow_drift_passes_once_it_adds_up_against_the_last_frame_sent() {
        let mut gate = SceneGate::new(0.02);
        gate.check(&grey(100));
        // Each step is 1/255 ≈ 0.004 from the one before; against the reference they add up.
        let passed: Vec<u8> = (101..=110)
            .filter(|&level| matches!(gate.check(&grey(level)), Verdict::Pass { .. }))
            .collect();
        assert_eq!(
            passed,
            [106],
            "passes when 6 levels (0.0235) from the reference"
        );
    }

    #[test]
    fn threshold_zero_passes_everything() {
        let mut gate = SceneGate::new(0.0);
        gate.check(&grey(7));
        assert!(matches!(
            gate.check(&grey(7)),
            Verdict::Pass { change: Some(_) }
        ));
    }
}
