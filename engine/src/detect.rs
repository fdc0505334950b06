//! From a DB probability map to boxes: the postprocessing of a `task = "detection"` bundle.
//!
//! PP-OCR's text detectors (and DB, "Real-time Scene Text Detection with Differentiable
//! Binarization", Liao et al. 2020) end in a map `[1, H, W]` of the probability that each
//! pixel lies in the shrunk core of a text region. The reference postprocessing (PaddleOCR's
//! `DBPostProcess`) needs OpenCV and Clipper for contours, rotated rectangles and polygon
//! offsets. This is the same idea in plain Rust, with axis-aligned boxes, so the engine needs
//! no native library:
//!
//! 1. binarize: a pixel is foreground when `p > binarize_threshold`;
//! 2. 8-connected components of the foreground (a flood fill, each pixel visited once), in
//!    the raster order of their first pixel;
//! 3. each component's axis-aligned box over pixel edges (a single pixel is a 1×1 box);
//!    components whose shorter side is under `min_box_side` map pixels are dropped;
//! 4. score = the mean probability over the component's own pixels. Not over its box: a box
//!    also holds background (more of it for slanted or sparse text), so a box mean would
//!    rank components by their shape as much as by the model's confidence. This is DB's
//!    `score_mode = "slow"` (the mean inside the contour), and costs nothing extra here since
//!    the flood fill visits those pixels anyway. Boxes under `box_threshold` are dropped;
//! 5. unclip: the map marks shrunk regions, so each side grows by `area × unclip_ratio /
//!    perimeter`, the distance DB offsets its polygon by (for a rectangle, the bounding box
//!    of DB's rounded offset is exactly this box);
//! 6. scale to input pixels (the map may be coarser than the input), clamp to the image;
//! 7. sort by score, best first (stable: ties keep the components' order), greedy NMS at
//!    `nms_iou` (components are disjoint, but their unclipped boxes can overlap), keep at
//!    most `max_detections`.
//!
//! `models/tools/detection.py` implements exactly these steps in numpy; the bundle tool
//! measures fidelity with it and `engine/tests/detection.rs` checks this code against its
//! boxes on ONNX Runtime's output. Arithmetic on scores and coordinates is `f64`.

use crate::manifest::{DetectionKind, DetectionSpec, Task};
use crate::{Bundle, EngineError, Tensor};

/// One detected object: a box in input-image pixels (the model input's, after the
/// preprocessor's crop and resize), its score and its class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    /// Left edge.
    pub x0: f32,
    /// Top edge.
    pub y0: f32,
    /// Right edge (exclusive).
    pub x1: f32,
    /// Bottom edge (exclusive).
    pub y1: f32,
    /// Mean map probability over the detected component, in [0, 1].
    pub score: f32,
    /// Class index into the manifest's labels (always 0 for a DB map).
    pub label: usize,
}

impl Detection {
    /// Width times height; 0 for an empty box.
    pub fn area(&self) -> f32 {
        (self.x1 - self.x0).max(0.0) * (self.y1 - self.y0).max(0.0)
    }

    /// Intersection over union with `other`; 0 when either box is empty.
    pub fn iou(&self, other: &Detection) -> f32 {
        iou(
            [self.x0, self.y0, self.x1, self.y1].map(f64::from),
            [other.x0, other.y0, other.x1, other.y1].map(f64::from),
        ) as f32
    }
}

/// A box while it is worked on: edges and score in `f64`.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    edges: [f64; 4],
    score: f64,
}

/// The postprocessing of one detection bundle: its `[detection]` parameters and input size.
#[derive(Debug, Clone)]
pub struct DbPostprocess {
    spec: DetectionSpec,
    input_width: usize,
    input_height: usize,
}

impl DbPostprocess {
    /// Postprocessing with `spec` for maps over an input of `input_width` × `input_height`
    /// pixels (boxes come out in those pixels, whatever the map's own size).
    pub fn new(spec: &DetectionSpec, input_width: usize, input_height: usize) -> Self {
        Self {
            spec: spec.clone(),
            input_width,
            input_height,
        }
    }

    /// The postprocessing a bundle's manifest describes; `None` unless its task is
    /// detection with a DB map (`Bundle::open` has checked the parameters).
    pub fn for_bundle(bundle: &Bundle) -> Option<Self> {
        let manifest = bundle.manifest();
        let spec = manifest.detection.as_ref()?;
        (manifest.task == Task::Detection && spec.kind == DetectionKind::Db)
            .then(|| Self::new(spec, manifest.input.width, manifest.input.height))
    }

    /// The parameters in use.
    pub fn spec(&self) -> &DetectionSpec {
        &self.spec
    }

    /// Boxes of one sample's map, shaped `[1, H, W]` (or `[H, W]`), best first.
    ///
    /// # Errors
    ///
    /// [`EngineError::InputShape`] for any other shape.
    pub fn detect(&self, map: &Tensor) -> Result<Vec<Detection>, EngineError> {
        match map.shape[..] {
            [1, height, width] | [height, width] => Ok(self.boxes(&map.data, height, width)),
            _ => Err(EngineError::InputShape {
                expected: vec![1, self.input_height, self.input_width],
                actual: map.shape.clone(),
            }),
        }
    }

    /// Boxes of every sample of a model's output `[N, 1, H, W]`.
    ///
    /// # Errors
    ///
    /// [`EngineError::InputShape`] for any other shape.
    pub fn detect_batch(&self, output: &Tensor) -> Result<Vec<Vec<Detection>>, EngineError> {
        let [batch, 1, height, width] = output.shape[..] else {
            return Err(EngineError::InputShape {
                expected: vec![1, self.input_height, self.input_width],
                actual: output.shape.clone(),
            });
        };
        let per = height * width;
        Ok((0..batch)
            .map(|i| self.boxes(&output.data[i * per..(i + 1) * per], height, width))
            .collect())
    }

    /// Boxes of a row-major `height` × `width` map whose length the caller has checked.
    fn boxes(&self, map: &[f32], height: usize, width: usize) -> Vec<Detection> {
        if height == 0 || width == 0 || map.len() != height * width {
            return Vec::new();
        }
        let spec = &self.spec;
        // The f32 nearest the threshold, as numpy's `prob > np.float32(t)` compares.
        let threshold = spec.binarize_threshold as f32;
        let scale_x = self.input_width as f64 / width as f64;
        let scale_y = self.input_height as f64 / height as f64;
        let (max_x, max_y) = (self.input_width as f64, self.input_height as f64);
        let mut candidates = Vec::new();
        for component in Components::new(map, height, width, threshold) {
            let [x0, y0, x1, y1] = component.edges.map(|e| e as f64);
            let (w, h) = (x1 - x0, y1 - y0);
            if w.min(h) < spec.min_box_side {
                continue;
            }
            let score = component.sum / component.pixels as f64;
            if score < spec.box_threshold {
                continue;
            }
            let d = w * h * spec.unclip_ratio / (2.0 * (w + h));
            let edges = [
                ((x0 - d) * scale_x).clamp(0.0, max_x),
                ((y0 - d) * scale_y).clamp(0.0, max_y),
                ((x1 + d) * scale_x).clamp(0.0, max_x),
                ((y1 + d) * scale_y).clamp(0.0, max_y),
            ];
            candidates.push(Candidate { edges, score });
        }
        nms(candidates, spec.nms_iou, spec.max_detections)
            .into_iter()
            .map(|c| Detection {
                x0: c.edges[0] as f32,
                y0: c.edges[1] as f32,
                x1: c.edges[2] as f32,
                y1: c.edges[3] as f32,
                score: c.score as f32,
                label: 0,
            })
            .collect()
    }
}

/// Sorts by score, best first (stable), and keeps each box whose IoU with every box kept
/// before it is at most `max_iou`, up to `max` boxes.
fn nms(mut candidates: Vec<Candidate>, max_iou: f64, max: usize) -> Vec<Candidate> {
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Candidate> = Vec::new();
    for candidate in candidates {
        if kept.len() >= max {
            break;
        }
        if kept
            .iter()
            .all(|k| iou(k.edges, candidate.edges) <= max_iou)
        {
            kept.push(candidate);
        }
    }
    kept
}

/// IoU of two `[x0, y0, x1, y1]` boxes; 0 without overlap or area.
fn iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let iw = a[2].min(b[2]) - a[0].max(b[0]);
    let ih = a[3].min(b[3]) - a[1].max(b[1]);
    if iw <= 0.0 || ih <= 0.0 {
        return 0.0;
    }
    let inter = iw * ih;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// One 8-connected component of the foreground.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Component {
    /// `[x0, y0, x1, y1]` over pixel edges (exclusive ends).
    edges: [usize; 4],
    /// Sum of the component's probabilities.
    sum: f64,
    /// Number of pixels.
    pixels: usize,
}

/// The 8-connected components of `map > threshold`, in the raster order of their first
/// pixel; a flood fill with an explicit stack, so no recursion depth to overflow.
struct Components<'m> {
    map: &'m [f32],
    height: usize,
    width: usize,
    threshold: f32,
    seen: Vec<bool>,
    next: usize,
    stack: Vec<usize>,
}

impl<'m> Components<'m> {
    fn new(map: &'m [f32], height: usize, width: usize, threshold: f32) -> Self {
        Self {
            map,
            height,
            width,
            threshold,
            seen: vec![false; map.len()],
            next: 0,
            stack: Vec::new(),
        }
    }

    fn fill(&mut self, start: usize) -> Component {
        let (w, h) = (self.width, self.height);
        let mut c = Component {
            edges: [start % w, start / w, start % w + 1, start / w + 1],
            sum: 0.0,
            pixels: 0,
        };
        self.seen[start] = true;
        self.stack.push(start);
        while let Some(i) = self.stack.pop() {
            let (y, x) = (i / w, i % w);
            c.edges = [
                c.edges[0].min(x),
                c.edges[1].min(y),
                c.edges[2].max(x + 1),
                c.edges[3].max(y + 1),
            ];
            c.sum += f64::from(self.map[i]);
            c.pixels += 1;
            for ny in y.saturating_sub(1)..(y + 2).min(h) {
                for nx in x.saturating_sub(1)..(x + 2).min(w) {
                    let j = ny * w + nx;
                    if !self.seen[j] && self.map[j] > self.threshold {
                        self.seen[j] = true;
                        self.stack.push(j);
                    }
                }
            }
        }
        c
    }
}

impl Iterator for Components<'_> {
    type Item = Component;

    fn next(&mut self) -> Option<Component> {
        while self.next < self.map.len() {
            let i = self.next;
            self.next += 1;
            if !self.seen[i] && self.map[i] > self.threshold {
                return Some(self.fill(i));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DetectionSpec {
        DetectionSpec {
            kind: DetectionKind::Db,
            binarize_threshold: 0.3,
            box_threshold: 0.5,
            unclip_ratio: 0.0,
            nms_iou: 0.5,
            max_detections: 100,
            min_box_side: 1.0,
            fidelity: None,
        }
    }

    /// A `height` × `width` map of `background` with `value` over each `[x0, y0, x1, y1]`.
    fn map(height: usize, width: usize, rects: &[([usize; 4], f32)]) -> Tensor {
        let mut data = vec![0.0; height * width];
        for &([x0, y0, x1, y1], value) in rects {
            for y in y0..y1 {
                for x in x0..x1 {
                    data[y * width + x] = value;
                }
            }
        }
        Tensor::new(vec![1, height, width], data)
    }

    fn edges(d: &Detection) -> [f32; 4] {
        [d.x0, d.y0, d.x1, d.y1]
    }

    #[test]
    fn two_blobs_make_two_boxes_best_first() {
        let post = DbPostprocess::new(&spec(), 20, 10);
        let m = map(10, 20, &[([2, 1, 6, 4], 0.8), ([10, 5, 18, 9], 0.9)]);
        let found = post.detect(&m).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(edges(&found[0]), [10.0, 5.0, 18.0, 9.0]);
        assert_eq!(edges(&found[1]), [2.0, 1.0, 6.0, 4.0]);
        assert!((found[0].score - 0.9).abs() < 1e-6 && (found[1].score - 0.8).abs() < 1e-6);
        assert!(found.iter().all(|d| d.label == 0));
    }

    #[test]
    fn diagonal_neighbours_are_one_component() {
        let post = DbPostprocess::new(&spec(), 6, 6);
        // Two squares touching only at a corner: 8-connectivity joins them.
        let m = map(6, 6, &[([0, 0, 2, 2], 0.9), ([2, 2, 4, 4], 0.7)]);
        let found = post.detect(&m).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(edges(&found[0]), [0.0, 0.0, 4.0, 4.0]);
        assert!((found[0].score - 0.8).abs() < 1e-6, "{}", found[0].score);
    }

    #[test]
    fn score_is_the_mean_over_the_component_not_its_box() {
        let post = DbPostprocess::new(&spec(), 10, 10);
        // An L: its box is 3x3 but only 5 pixels are foreground, all at 0.6.
        let m = map(10, 10, &[([0, 0, 1, 3], 0.6), ([0, 2, 3, 3], 0.6)]);
        let found = post.detect(&m).unwrap();
        assert_eq!(found.len(), 1);
        assert!((found[0].score - 0.6).abs() < 1e-6);
    }

    #[test]
    fn thresholds_filter_pixels_and_boxes() {
        let mut s = spec();
        s.box_threshold = 0.85;
        let post = DbPostprocess::new(&s, 20, 10);
        // 0.3 is not above the binarize threshold; 0.8 passes it but not the box threshold.
        let m = map(
            10,
            20,
            &[
                ([0, 0, 3, 3], 0.3),
                ([5, 0, 9, 3], 0.8),
                ([12, 4, 16, 8], 0.9),
            ],
        );
        let found = post.detect(&m).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(edges(&found[0]), [12.0, 4.0, 16.0, 8.0]);
    }

    #[test]
    fn small_components_are_dropped() {
        let mut s = spec();
        s.min_box_side = 3.0;
        let post = DbPostprocess::new(&s, 20, 10);
        let m = map(10, 20, &[([0, 0, 10, 2], 0.9), ([12, 2, 15, 5], 0.9)]);
        let found = post.detect(&m).unwrap();
        assert_eq!(found.len(), 1, "the 10x2 strip is too thin");
        assert_eq!(edges(&found[0]), [12.0, 2.0, 15.0, 5.0]);
    }

    #[test]
    fn unclip_grows_by_area_ratio_over_perimeter_and_scales_and_clamps() {
        let mut s = spec();
        s.unclip_ratio = 2.0;
        // The map is half the input's resolution: boxes double.
        let post = DbPostprocess::new(&s, 40, 20);
        let m = map(10, 20, &[([4, 2, 10, 6], 0.9), ([0, 0, 2, 2], 0.95)]);
        let found = post.detect(&m).unwrap();
        assert_eq!(found.len(), 2);
        // 2x2 at the corner: d = 4 * 2 / 8 = 1, clamped at 0, doubled.
        assert_eq!(edges(&found[0]), [0.0, 0.0, 6.0, 6.0]);
        // 6x4: d = 24 * 2 / 20 = 2.4 → [1.6, -0.4, 12.4, 8.4], clamped, doubled.
        let e = edges(&found[1]);
        for (got, want) in e.iter().zip([3.2, 0.0, 24.8, 16.8]) {
            assert!((got - want).abs() < 1e-4, "{e:?}");
        }
    }

    #[test]
    fn nms_drops_the_weaker_of_overlapping_boxes() {
        let mut s = spec();
        s.unclip_ratio = 6.0;
        let post = DbPostprocess::new(&s, 30, 12);
        // Two 6x6 blobs a pixel apart: each side grows by 36 * 6 / 24 = 9, and the clamped
        // boxes [0, 0, 19, 12] and [2, 0, 26, 12] overlap at IoU 204 / 312 = 0.65.
        let m = map(12, 30, &[([4, 3, 10, 9], 0.7), ([11, 3, 17, 9], 0.9)]);
        let found = post.detect(&m).unwrap();
        assert_eq!(found.len(), 1);
        assert!((found[0].score - 0.9).abs() < 1e-6);
        // Without the overlap rule both stay.
        s.nms_iou = 1.0;
        let all = DbPostprocess::new(&s, 30, 12).detect(&m).unwrap();
        assert_eq!(all.len(), 2);
        assert!((all[0].iou(&all[1]) - 204.0 / 312.0).abs() < 1e-6);
    }

    #[test]
    fn max_detections_caps_the_best() {
        let mut s = spec();
        s.max_detections = 2;
        let post = DbPostprocess::new(&s, 30, 4);
        let m = map(
            4,
            30,
            &[
                ([0, 0, 3, 3], 0.6),
                ([6, 0, 9, 3], 0.9),
                ([12, 0, 15, 3], 0.7),
                ([18, 0, 21, 3], 0.8),
            ],
        );
        let scores: Vec<f32> = post.detect(&m).unwrap().iter().map(|d| d.score).collect();
        assert_eq!(scores.len(), 2);
        assert!((scores[0] - 0.9).abs() < 1e-6 && (scores[1] - 0.8).abs() < 1e-6);
    }

    #[test]
    fn an_empty_map_has_no_boxes() {
        let post = DbPostprocess::new(&spec(), 8, 8);
        assert!(post.detect(&map(8, 8, &[])).unwrap().is_empty());
        let below = map(8, 8, &[([0, 0, 8, 8], 0.29)]);
        assert!(post.detect(&below).unwrap().is_empty());
    }

    #[test]
    fn degenerate_maps_never_panic() {
        let post = DbPostprocess::new(&spec(), 8, 8);
        for (h, w) in [(0, 0), (0, 5), (5, 0), (1, 1), (1, 9), (9, 1)] {
            let full = Tensor::new(vec![1, h, w], vec![1.0; h * w]);
            let found = post.detect(&full).unwrap();
            assert!(found.len() <= 1, "{h}x{w}");
        }
        let odd = Tensor::new(
            vec![1, 3, 3],
            vec![
                f32::NAN,
                f32::INFINITY,
                0.5,
                -1.0,
                0.0,
                2.0,
                0.4,
                f32::NEG_INFINITY,
                1.0,
            ],
        );
        assert!(post.detect(&odd).unwrap().len() <= 1);
        let bad = Tensor::new(vec![2, 2, 2], vec![0.0; 8]);
        assert!(matches!(
            post.detect(&bad),
            Err(EngineError::InputShape { .. })
        ));
        let batch = Tensor::new(vec![2, 1, 2, 2], vec![0.9; 8]);
        assert_eq!(post.detect_batch(&batch).unwrap().len(), 2);
        assert!(post.detect_batch(&bad).is_err());
        // A zero-sized input: boxes clamp to an empty image.
        let nowhere = DbPostprocess::new(&spec(), 0, 0);
        let found = nowhere.detect(&map(4, 4, &[([0, 0, 2, 2], 0.9)])).unwrap();
        assert!(found.iter().all(|d| d.area() == 0.0));
    }

    #[test]
    fn a_map_full_of_foreground_is_one_box() {
        let post = DbPostprocess::new(&spec(), 64, 64);
        let m = map(64, 64, &[([0, 0, 64, 64], 1.0)]);
        let found = post.detect(&m).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(edges(&found[0]), [0.0, 0.0, 64.0, 64.0]);
    }
}
