//! The backend choice and the loaded [`Model`] every caller runs.
//!
//! A model is loaded and optimized once for a symbolic batch size, then run any number of
//! times with any batch. Backends: tract (pure Rust, always built) and ONNX Runtime (cargo
//! feature `ort`, loaded at run time). A user who asks for CUDA or TensorRT and does not get
//! it gets an error, never a silent CPU fallback.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::{EngineError, Tensor};

/// Where ONNX Runtime runs a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrtDevice {
    /// The CPU execution provider.
    Cpu,
    /// The CUDA execution provider; loading fails if it does not register.
    Cuda,
    /// The TensorRT execution provider; loading fails if it does not register.
    TensorRt,
}

/// Which inference backend loads a bundle's models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// tract: pure Rust, single-threaded, no native dependencies. The default.
    #[default]
    Tract,
    /// ONNX Runtime through the `ort` crate (cargo feature `ort`), with
    /// `libonnxruntime` found through `ORT_DYLIB_PATH` or a Python `onnxruntime` package.
    Ort(OrtDevice),
}

impl Backend {
    /// Short name for logs and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Tract => "tract",
            Backend::Ort(OrtDevice::Cpu) => "ort",
            Backend::Ort(OrtDevice::Cuda) => "ort-cuda",
            Backend::Ort(OrtDevice::TensorRt) => "ort-tensorrt",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "tract" => Ok(Backend::Tract),
            "ort" | "ort-cpu" => Ok(Backend::Ort(OrtDevice::Cpu)),
            "ort-cuda" => Ok(Backend::Ort(OrtDevice::Cuda)),
            "ort-tensorrt" => Ok(Backend::Ort(OrtDevice::TensorRt)),
            other => Err(format!(
                "unknown backend {other:?} (tract, ort, ort-cuda, ort-tensorrt)"
            )),
        }
    }
}

/// How a model is loaded, beyond the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadOptions {
    /// Threads one run may use (ONNX Runtime's intra-op pool; `None`: its default, one per
    /// core). A server running several instances of a model on a few cores wants 1 here, so
    /// the instances do not fight over the cores. tract runs one thread either way.
    pub threads: Option<usize>,
}

impl LoadOptions {
    /// Threads for each of `instances` models that run at once: the machine's cores shared
    /// out, at least one each, so that together they use each core once.
    ///
    /// ONNX Runtime's own default (a pool of one thread per core in every session)
    /// oversubscribes the cores as soon as two instances run: on a 2-vCPU VM, two
    /// instances of the bundled tail served 241 and 245 frames/s unbatched (16 heads) with
    /// two threads each, and 409 and 394 with one each (`cleave-bench tail-load
    /// --instances 2 --setting max=1 --heads 16 --threads 2|0`, alternated).
    pub fn sharing_cores(instances: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        Self {
            threads: Some((cores / instances.max(1)).max(1)),
        }
    }
}

enum Runner {
    Tract(crate::tract_backend::TractModel),
    #[cfg(feature = "ort")]
    Ort(crate::ort_backend::OrtModel),
}

/// A loaded, optimized model: input `[N, ..input_shape]`, output `[N, ..output_shape]`.
pub struct Model {
    runner: Runner,
    backend: Backend,
    input_shape: Vec<usize>,
    output_shape: Vec<usize>,
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("backend", &self.backend)
            .field("input_shape", &self.input_shape)
            .field("output_shape", &self.output_shape)
            .finish()
    }
}

impl Model {
    /// Loads and optimizes the ONNX file at `path` for per-sample `input_shape`, checking that
    /// it produces per-sample `output_shape`.
    ///
    /// # Errors
    ///
    /// [`EngineError::Load`], [`EngineError::WrongShape`] or
    /// [`EngineError::BackendUnavailable`].
    pub fn load(
        backend: &Backend,
        path: &Path,
        input_shape: Vec<usize>,
        output_shape: Vec<usize>,
    ) -> Result<Self, EngineError> {
        Self::load_with(
            backend,
            path,
            input_shape,
            output_shape,
            &LoadOptions::default(),
        )
    }

    /// [`Model::load`] with [`LoadOptions`].
    ///
    /// # Errors
    ///
    /// As [`Model::load`].
    pub fn load_with(
        backend: &Backend,
        path: &Path,
        input_shape: Vec<usize>,
        output_shape: Vec<usize>,
        options: &LoadOptions,
    ) -> Result<Self, EngineError> {
        #[cfg(not(feature = "ort"))]
        let _ = options;
        let runner = match backend {
            Backend::Tract => Runner::Tract(crate::tract_backend::TractModel::load(
                path,
                &input_shape,
                &output_shape,
            )?),
            #[cfg(feature = "ort")]
            Backend::Ort(device) => Runner::Ort(crate::ort_backend::OrtModel::load(
                path,
                *device,
                &input_shape,
                &output_shape,
                options,
            )?),
            #[cfg(not(feature = "ort"))]
            Backend::Ort(_) => {
                return Err(EngineError::BackendUnavailable(format!(
                    "{backend} asked for, but this build has no ONNX Runtime support \
                     (rebuild with `--features ort`)"
                )));
            }
        };
        Ok(Self {
            runner,
            backend: *backend,
            input_shape,
            output_shape,
        })
    }

    /// The backend that runs this model.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Per-sample input shape.
    pub fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    /// Per-sample output shape.
    pub fn output_shape(&self) -> &[usize] {
        &self.output_shape
    }

    /// Runs a batch: `input` is `[N, ..input_shape]` for any `N ≥ 1`.
    ///
    /// # Errors
    ///
    /// [`EngineError::InputShape`] for a wrongly shaped input, [`EngineError::Run`] if the
    /// backend fails.
    pub fn run(&self, input: &Tensor) -> Result<Tensor, EngineError> {
        if input.shape.len() != self.input_shape.len() + 1
            || input.shape[1..] != self.input_shape[..]
            || input.shape[0] == 0
        {
            return Err(EngineError::InputShape {
                expected: self.input_shape.clone(),
                actual: input.shape.clone(),
            });
        }
        let output = match &self.runner {
            Runner::Tract(model) => model.run(input)?,
            #[cfg(feature = "ort")]
            Runner::Ort(model) => model.run(input)?,
        };
        let mut expected = vec![input.shape[0]];
        expected.extend_from_slice(&self.output_shape);
        if output.shape != expected {
            return Err(EngineError::Run {
                backend: self.backend.name(),
                reason: format!("output shape {:?}, expected {expected:?}", output.shape),
            });
        }
        Ok(output)
    }
}
