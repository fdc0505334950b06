//! The engine's one error type.

use std::path::PathBuf;

/// Why a bundle could not be opened or a model could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A file the bundle needs is absent.
    #[error("{path}: missing ({reason})")]
    Missing {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// `manifest.toml` does not parse or says something impossible.
    #[error("{path}: invalid manifest: {reason}")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file's content does not hash to what the manifest says.
    #[error("{path}: corrupt: sha256 is {actual}, the manifest says {expected}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Digest in the manifest.
        expected: String,
        /// Digest of the file.
        actual: String,
    },
    /// The manifest's `id` is not the hash of its content.
    #[error("{path}: bundle id {declared} does not match the manifest's content ({computed})")]
    IdMismatch {
        /// The manifest.
        path: PathBuf,
        /// Id written in the manifest.
        declared: String,
        /// Id computed from the content.
        computed: String,
    },
    /// A model's input or output shape disagrees with the manifest.
    #[error("{path}: wrong shape for {tensor}: model has {actual}, the manifest says {expected}")]
    WrongShape {
        /// The model file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// Shape from the manifest.
        expected: String,
        /// Shape from the model.
        actual: String,
    },
    /// The backend could not load or optimize a model.
    #[error("{path}: cannot load with {backend}: {reason}")]
    Load {
        /// The model file.
        path: PathBuf,
        /// Backend name.
        backend: &'static str,
        /// The backend's message.
        reason: String,
    },
    /// A backend or device that this build or machine cannot provide.
    #[error("backend unavailable: {0}")]
    BackendUnavailable(String),
    /// Running the model failed.
    #[error("inference failed ({backend}): {reason}")]
    Run {
        /// Backend name.
        backend: &'static str,
        /// The backend's message.
        reason: String,
    },
    /// An input tensor has the wrong shape for the model.
    #[error("input shape {actual:?} does not fit the model's {expected:?}")]
    InputShape {
        /// Per-sample shape the model takes.
        expected: Vec<usize>,
        /// Shape given, batch axis first.
        actual: Vec<usize>,
    },
    /// An image could not be decoded.
    #[error("cannot decode image: {0}")]
    Image(String),
}
