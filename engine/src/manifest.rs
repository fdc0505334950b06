//! `manifest.toml`: what a bundle holds and how to use it, as plain serde structs.
//!
//! The manifest is the contract between the tool that makes a bundle
//! (`models/tools/make_bundle.py`) and every runtime that opens one. Unknown keys are errors,
//! so a typo is caught at open rather than silently ignored.
//!
//! The task decides what the models end in and what turns that into a result: logits over
//! `labels` for `classification` (ranked by [`top_k`](crate::top_k)), a DB probability map
//! for `detection`, made into boxes by [`DbPostprocess`](crate::DbPostprocess) with the
//! parameters of the `[detection]` table, which only a detection bundle has.
//!
//! A bundle may also carry a prefilter (`[models.prefilter]` and the `[prefilter]` table,
//! `docs/prefilter.md`): a small model on the head's output that says how likely a frame is
//! to be of interest; the head drops frames below its `threshold` before sending anything.

use serde::Deserialize;

/// The parsed `manifest.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format version; this build reads 1.
    pub format: u32,
    /// Bundle id: sha256 (hex) of the manifest with this line removed.
    pub id: String,
    /// Bundle name.
    pub name: String,
    /// Bundle version.
    pub version: String,
    /// One line for humans.
    #[serde(default)]
    pub description: String,
    /// What the models compute.
    pub task: Task,
    /// Image preprocessing.
    pub input: InputSpec,
    /// The model files.
    pub models: Models,
    /// The cut between head and tail.
    pub bottleneck: BottleneckSpec,
    /// Measured quality of a classification split, if the tool measured it (a detection
    /// bundle keeps its figures in `[detection.fidelity]`).
    pub fidelity: Option<Fidelity>,
    /// How a detection bundle's map becomes boxes: required for `task = "detection"`,
    /// refused for any other task.
    #[serde(default)]
    pub detection: Option<DetectionSpec>,
    /// The prefilter's threshold and measured quality: present exactly when
    /// `[models.prefilter]` is.
    #[serde(default)]
    pub prefilter: Option<PrefilterSpec>,
    /// Class names.
    pub labels: Labels,
}

/// What a bundle's models compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Task {
    /// Logits over `labels`.
    Classification,
    /// A probability map `[1, H, W]` over the input image (H, W: the input's height and
    /// width), made into boxes as the `[detection]` table says.
    Detection,
}

impl Task {
    /// The name `manifest.toml` uses: `classification` or `detection`.
    pub fn name(self) -> &'static str {
        match self {
            Task::Classification => "classification",
            Task::Detection => "detection",
        }
    }
}

/// The `[detection]` table: how a probability map becomes boxes (`DbPostprocess`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectionSpec {
    /// The kind of map; only `db`.
    pub kind: DetectionKind,
    /// A map pixel is foreground when its probability is above this, in (0, 1).
    pub binarize_threshold: f64,
    /// A box is kept when the mean probability over its component's pixels reaches this.
    pub box_threshold: f64,
    /// Each box side grows by `area * unclip_ratio / perimeter` map pixels (DB's unclip).
    pub unclip_ratio: f64,
    /// A box overlapping a better-scored one by more than this IoU is dropped, in (0, 1].
    pub nms_iou: f64,
    /// At most this many boxes per image.
    pub max_detections: usize,
    /// Components whose shorter side is under this many map pixels are dropped.
    pub min_box_side: f64,
    /// Measured quality of the split, if the tool measured it.
    #[serde(default)]
    pub fidelity: Option<DetectionFidelity>,
}

/// What kind of detector output a `[detection]` table decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DetectionKind {
    /// A DB ("Differentiable Binarization") text probability map, as PP-OCR's detectors
    /// make; one class.
    Db,
}

/// Quality of a detection split as measured by the tool that made the bundle: the split
/// (with its quantized bottleneck) against the full model on held-out views.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectionFidelity {
    /// Mean absolute difference between the full and the split model's probability maps.
    pub map_mae: f64,
    /// F1 of the split's boxes against the full model's, matched one-to-one at IoU 0.5.
    pub box_f1: f64,
    /// Mean over the full model's boxes of the best IoU with any of the split's.
    pub mean_best_iou: f64,
    /// Mean coded payload per frame, in bytes.
    pub payload_bytes: u64,
    /// What the figures were measured on.
    pub evaluated_on: String,
}

impl Manifest {
    /// Checks that the task and its tables agree: a detection bundle has a valid
    /// `[detection]` table, one label for a DB map and no classification `[fidelity]`; a
    /// classification bundle has no `[detection]` table. The message names the key.
    ///
    /// # Errors
    ///
    /// What is wrong, for [`EngineError::Manifest`](crate::EngineError::Manifest).
    pub fn check_task(&self) -> Result<(), String> {
        match (self.task, &self.detection) {
            (Task::Detection, None) => Err("task = \"detection\" needs a [detection] table \
                 (kind, binarize_threshold, box_threshold, unclip_ratio, nms_iou, \
                 max_detections, min_box_side)"
                .into()),
            (Task::Detection, Some(spec)) => {
                spec.check()?;
                if self.fidelity.is_some() {
                    return Err("[fidelity] holds classification figures (top-1, KL); a \
                         detection bundle keeps its own in [detection.fidelity]"
                        .into());
                }
                let labels = self.labels.names.len();
                if spec.kind == DetectionKind::Db && labels != 1 {
                    return Err(format!(
                        "detection.kind \"db\" finds one class, but labels.names has {labels}"
                    ));
                }
                Ok(())
            }
            (task, Some(_)) => Err(format!(
                "a [detection] table is only for task = \"detection\", not {:?}",
                task.name()
            )),
            (_, None) => Ok(()),
        }
    }
}

impl DetectionSpec {
    /// Checks every parameter's range; the message names the key.
    ///
    /// # Errors
    ///
    /// What is out of range.
    pub fn check(&self) -> Result<(), String> {
        let within = |name: &str, value: f64, ok: bool, range: &str| {
            if ok && value.is_finite() {
                Ok(())
            } else {
                Err(format!("detection.{name} = {value} is not in {range}"))
            }
        };
        let t = self.binarize_threshold;
        within("binarize_threshold", t, t > 0.0 && t < 1.0, "(0, 1)")?;
        let b = self.box_threshold;
        within("box_threshold", b, (0.0..=1.0).contains(&b), "[0, 1]")?;
        let u = self.unclip_ratio;
        within(
            "unclip_ratio",
            u,
            (0.0..=MAX_UNCLIP_RATIO).contains(&u),
            "[0, 10]",
        )?;
        let n = self.nms_iou;
        within("nms_iou", n, n > 0.0 && n <= 1.0, "(0, 1]")?;
        let m = self.min_box_side;
        within("min_box_side", m, m >= 0.0, "[0, inf)")?;
        if self.max_detections == 0 || self.max_detections > MAX_DETECTIONS {
            return Err(format!(
                "detection.max_detections = {} is not in [1, {MAX_DETECTIONS}]",
                self.max_detections
            ));
        }
        Ok(())
    }
}

/// The `[prefilter]` table: when a frame is worth sending, and how well the prefilter was
/// measured to say so.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefilterSpec {
    /// A frame whose prefilter probability is below this is dropped, in (0, 1).
    pub threshold: f64,
    /// What counts as interesting, in one line.
    pub positive: String,
    /// What the prefilter was trained on, in one line.
    #[serde(default)]
    pub trained_on: String,
    /// Of the frames kept, the fraction that were of interest, on `evaluated_on`.
    #[serde(default)]
    pub precision: Option<f64>,
    /// Of the frames of interest, the fraction kept, on `evaluated_on`.
    #[serde(default)]
    pub recall: Option<f64>,
    /// What precision and recall were measured on (with the count).
    #[serde(default)]
    pub evaluated_on: Option<String>,
}

impl PrefilterSpec {
    /// Whether a frame whose prefilter output is `interest` is kept (sent on): at or above
    /// the threshold. A NaN is never kept.
    pub fn keeps(&self, interest: f32) -> bool {
        f64::from(interest) >= self.threshold
    }

    /// Checks the threshold and the measured figures; the message names the key.
    ///
    /// # Errors
    ///
    /// What is out of range or missing.
    pub fn check(&self) -> Result<(), String> {
        let t = self.threshold;
        if !(t.is_finite() && t > 0.0 && t < 1.0) {
            return Err(format!(
                "prefilter.threshold = {t} is not in (0, 1): a frame is dropped when its \
                 probability of interest is below it"
            ));
        }
        if self.positive.trim().is_empty() {
            return Err("prefilter.positive is empty: say what counts as interesting".into());
        }
        for (name, value) in [("precision", self.precision), ("recall", self.recall)] {
            if let Some(v) = value
                && !(0.0..=1.0).contains(&v)
            {
                return Err(format!("prefilter.{name} = {v} is not in [0, 1]"));
            }
        }
        if (self.precision.is_some() || self.recall.is_some()) && self.evaluated_on.is_none() {
            return Err(
                "prefilter.precision and recall need evaluated_on (what they were \
                 measured on)"
                    .into(),
            );
        }
        Ok(())
    }
}

impl Manifest {
    /// Checks that `[models.prefilter]` and `[prefilter]` come together, that the prefilter
    /// reads the head's output tensor, and the `[prefilter]` table's ranges.
    ///
    /// # Errors
    ///
    /// What is wrong, for [`EngineError::Manifest`](crate::EngineError::Manifest).
    pub fn check_prefilter(&self) -> Result<(), String> {
        match (&self.models.prefilter, &self.prefilter) {
            (None, None) => Ok(()),
            (Some(_), None) => Err("[models.prefilter] needs a [prefilter] table (threshold, \
                 positive, ...)"
                .into()),
            (None, Some(_)) => Err("a [prefilter] table needs a [models.prefilter] file".into()),
            (Some(file), Some(spec)) => {
                let head = &self.models.head.output;
                if file.input != *head {
                    return Err(format!(
                        "models.prefilter.input {:?} must name the head's output tensor {head:?}",
                        file.input
                    ));
                }
                spec.check()
            }
        }
    }
}

/// Largest `unclip_ratio` accepted (DB uses 1.5 to 2).
const MAX_UNCLIP_RATIO: f64 = 10.0;
/// Largest `max_detections` accepted.
const MAX_DETECTIONS: usize = 100_000;

/// How an image becomes the model's input tensor.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Input width in pixels.
    pub width: usize,
    /// Input height in pixels.
    pub height: usize,
    /// Tensor layout; only `NCHW`.
    pub layout: String,
    /// Channel order; only `RGB`.
    pub color: String,
    /// Resize filter: `bilinear` or `nearest`.
    pub resize: String,
    /// Side of the centred square crop, as a fraction of the image's shorter side.
    pub crop_fraction: f32,
    /// Per-channel mean subtracted from 0–255 pixel values.
    pub mean: [f32; 3],
    /// Per-channel divisor applied after the mean.
    pub std: [f32; 3],
}

/// The three model files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Models {
    /// The whole network: image → logits.
    pub full: ModelFile,
    /// The head: image → bottleneck.
    pub head: ModelFile,
    /// The tail: bottleneck → logits.
    pub tail: ModelFile,
    /// The prefilter, if the bundle has one: the head's output → `[1]` probability that the
    /// frame is of interest.
    #[serde(default)]
    pub prefilter: Option<ModelFile>,
}

/// One ONNX file of the bundle.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    /// Path relative to the bundle folder.
    pub path: String,
    /// Hex sha256 of the file.
    pub sha256: String,
    /// Name of the model's input tensor.
    pub input: String,
    /// Name of the model's output tensor.
    pub output: String,
}

/// The cut between head and tail.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BottleneckSpec {
    /// Name of the full model's tensor where it was cut.
    pub split_at: String,
    /// How the bottleneck was fitted (`pca`, `none`, ...).
    pub fit: String,
    /// Per-sample shape of the head's output, `[C, H, W]`.
    pub shape: Vec<usize>,
    /// How the bottleneck is quantized and coded.
    pub quantization: QuantizationSpec,
}

/// How the bottleneck is quantized and coded on the wire (`docs/coding-tables.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizationSpec {
    /// The bit depth the head sends by default, 2 to 8.
    pub bits: u8,
    /// `per_tensor` or `per_channel`, for frames that carry their own ranges.
    pub granularity: String,
    /// Default payload codec: `ans`, `zstd` or `raw`.
    pub codec: String,
    /// The prior tables file (`priors.json`), relative to the bundle folder.
    #[serde(default)]
    pub priors: Option<String>,
    /// Hex sha256 of the priors file.
    #[serde(default)]
    pub priors_sha256: Option<String>,
    /// What the clipping ranges and priors were fitted on.
    #[serde(default)]
    pub calibrated_on: Option<String>,
    /// Calibrated bit depths, each with its clipping ranges and measured fidelity.
    #[serde(default)]
    pub levels: Vec<QuantizationLevel>,
}

/// One calibrated bit depth.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizationLevel {
    /// Bit depth, 2 to 8.
    pub bits: u8,
    /// Upper percentile of the clipping range (the lower one is `100 - clip_percentile`).
    pub clip_percentile: f64,
    /// Lower clip per channel.
    pub low: Vec<f32>,
    /// Upper clip per channel.
    pub high: Vec<f32>,
    /// Top-1 agreement with the full model at this depth, on the held-out views.
    pub top1_agreement: f64,
    /// Mean KL from the full model at this depth.
    pub mean_kl: f64,
    /// Mean ANS payload bytes per frame on the held-out views.
    pub payload_bytes: u64,
}

/// Quality of the split as measured by the tool that made the bundle.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fidelity {
    /// Fraction of held-out views where split and full model agree on the top class.
    pub top1_agreement: f64,
    /// Mean KL divergence from the full model's softmax to the split model's.
    pub mean_kl: f64,
    /// Mean coded payload per frame, in bytes.
    pub payload_bytes: u64,
    /// What the figures were measured on.
    pub evaluated_on: String,
}

/// Class names, index = class id.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Labels {
    /// One name per class.
    pub names: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = "kind = \"db\"\nbinarize_threshold = 0.3\nbox_threshold = 0.5\n\
        unclip_ratio = 1.6\nnms_iou = 0.5\nmax_detections = 100\nmin_box_side = 3.0\n";

    fn spec(replace: (&str, &str)) -> Result<DetectionSpec, String> {
        let spec: DetectionSpec =
            toml::from_str(&SPEC.replace(replace.0, replace.1)).map_err(|e| e.to_string())?;
        spec.check().map(|()| spec)
    }

    #[test]
    fn a_db_table_parses_and_passes() {
        let s = spec(("", "")).unwrap();
        assert_eq!(s.kind, DetectionKind::Db);
        assert_eq!(s.max_detections, 100);
        assert!(s.fidelity.is_none());
    }

    #[test]
    fn every_parameter_is_range_checked_by_name() {
        for (from, to, says) in [
            (
                "binarize_threshold = 0.3",
                "binarize_threshold = 0.0",
                "binarize_threshold",
            ),
            (
                "binarize_threshold = 0.3",
                "binarize_threshold = nan",
                "binarize_threshold",
            ),
            (
                "box_threshold = 0.5",
                "box_threshold = 1.01",
                "box_threshold",
            ),
            ("unclip_ratio = 1.6", "unclip_ratio = -1.0", "unclip_ratio"),
            ("unclip_ratio = 1.6", "unclip_ratio = inf", "unclip_ratio"),
            ("nms_iou = 0.5", "nms_iou = 0.0", "nms_iou"),
            (
                "max_detections = 100",
                "max_detections = 0",
                "max_detections",
            ),
            (
                "max_detections = 100",
                "max_detections = 1000000",
                "max_detections",
            ),
            ("min_box_side = 3.0", "min_box_side = -0.5", "min_box_side"),
            ("kind = \"db\"", "kind = \"east\"", "unknown variant"),
            ("nms_iou", "iou", "unknown field"),
        ] {
            let error = spec((from, to)).unwrap_err();
            assert!(error.contains(says), "{to}: {error}");
        }
    }

    const PREFILTER: &str = "threshold = 0.3\npositive = \"an animal\"\n\
        trained_on = \"photos\"\nprecision = 0.5\nrecall = 0.9\nevaluated_on = \"100 photos\"\n";

    fn prefilter(replace: (&str, &str)) -> Result<PrefilterSpec, String> {
        let spec: PrefilterSpec =
            toml::from_str(&PREFILTER.replace(replace.0, replace.1)).map_err(|e| e.to_string())?;
        spec.check().map(|()| spec)
    }

    #[test]
    fn a_prefilter_table_parses_and_keeps_at_the_threshold() {
        let s = prefilter(("", "")).unwrap();
        assert_eq!(s.threshold, 0.3);
        assert!(s.keeps(0.3) && s.keeps(0.9));
        assert!(!s.keeps(0.29) && !s.keeps(f32::NAN));
        let minimal: PrefilterSpec =
            toml::from_str("threshold = 0.5\npositive = \"a person\"\n").unwrap();
        minimal.check().unwrap();
    }

    #[test]
    fn a_bad_prefilter_table_is_rejected_by_name() {
        for (from, to, says) in [
            (
                "threshold = 0.3",
                "threshold = 0.0",
                "prefilter.threshold = 0 is not in (0, 1)",
            ),
            (
                "threshold = 0.3",
                "threshold = 1.0",
                "prefilter.threshold = 1 is not in (0, 1)",
            ),
            ("threshold = 0.3", "threshold = 1.5", "prefilter.threshold"),
            ("threshold = 0.3", "threshold = nan", "prefilter.threshold"),
            ("threshold = 0.3", "threshold = -0.2", "prefilter.threshold"),
            ("threshold = 0.3\n", "", "missing field `threshold`"),
            ("precision = 0.5", "precision = 1.5", "prefilter.precision"),
            ("recall = 0.9", "recall = -0.1", "prefilter.recall"),
            ("evaluated_on = \"100 photos\"\n", "", "evaluated_on"),
            (
                "positive = \"an animal\"",
                "positive = \" \"",
                "prefilter.positive",
            ),
            ("recall", "recal", "unknown field"),
        ] {
            let error = prefilter((from, to)).unwrap_err();
            assert!(error.contains(says), "{to}: {error}");
        }
    }

    #[test]
    fn task_names_are_the_manifest_spelling() {
        for task in [Task::Classification, Task::Detection] {
            let parsed: Task = toml::Value::String(task.name().into()).try_into().unwrap();
            assert_eq!(parsed, task);
        }
    }
}
