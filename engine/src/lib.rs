//! Model bundles and the inference backends that run them.
//!
//! # Brief overview
//!
//! A [`Bundle`] is a folder: `manifest.toml` plus the ONNX files it lists (`full.onnx`,
//! `head.onnx`, `tail.onnx`). [`Bundle::open`] parses the manifest, recomputes the bundle id
//! and every file's sha256, and refuses anything that does not match, naming the file.
//!
//! Inference runs in typed stages, built once and run many times:
//!
//! | stage | method | output |
//! |---|---|---|
//! | open | [`Bundle::open`] | a checked [`Bundle`] |
//! | load + optimize | [`Bundle::load`] with a [`Backend`] | a [`Model`] (any batch size) |
//! | run | [`Model::run`] | a [`Tensor`] |
//!
//! [`Preprocessor`] turns JPEG/PNG bytes into the model's input tensor as the manifest says.
//! The manifest's [`Task`] decides what turns the model's output into a result: [`top_k`]
//! ranks a classifier's logits; [`DbPostprocess`] turns a detector's probability map into
//! boxes ([`Detection`]) with the parameters of the manifest's `[detection]` table.
//!
//! A bundle may carry a prefilter: [`Bundle::load_prefilter`] loads it like the other models,
//! and [`Bundle::prefilter_spec`] holds its threshold ([`PrefilterSpec::keeps`]).
//!
//! The engine knows nothing of networks or gRPC; it depends only on the codec (for
//! [`BundleId`]).

mod backend;
mod bundle;
mod classify;
mod detect;
mod error;
mod manifest;
#[cfg(feature = "ort")]
mod ort_backend;
mod preprocess;
mod tensor;
mod tract_backend;

pub use backend::{Backend, LoadOptions, Model, OrtDevice};
pub use bundle::{Bundle, Role};
pub use classify::{ClassScore, softmax, top_k};
pub use cleave_codec::BundleId;
pub use detect::{DbPostprocess, Detection};
pub use error::EngineError;
pub use manifest::{
    BottleneckSpec, DetectionFidelity, DetectionKind, DetectionSpec, Fidelity, InputSpec, Manifest,
    ModelFile, PrefilterSpec, QuantizationLevel, QuantizationSpec, Task,
};
pub use preprocess::Preprocessor;
pub use tensor::Tensor;
