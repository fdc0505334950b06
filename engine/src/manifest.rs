//! `manifest.toml`: what a bundle holds and how to use it, as plain serde structs.
//!
//! The manifest is the contract between the tool that makes a bundle
//! (`models/tools/make_bundle.py`) and every runtime that opens one. Unknown keys are errors,
//! so a typo is caught at open rather than silently ignored.

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
    /// Measured quality of the split, if the tool measured it.
    pub fidelity: Option<Fidelity>,
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
}

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
