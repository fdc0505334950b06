//! The ONNX Runtime backend (cargo feature `ort`), loaded at run time.
//!
//! `libonnxruntime` is found through `ORT_DYLIB_PATH`, or else in the `onnxruntime` Python
//! package of the first `python3` on `PATH` (`onnxruntime/capi/libonnxruntime.so*`). CUDA and
//! TensorRT are registered with `error_on_failure`: if they cannot run, loading fails.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
#[cfg(any(feature = "cuda", feature = "tensorrt"))]
use ort::ep;
use ort::session::Session;
use ort::value::Tensor as OrtTensor;

use crate::{EngineError, LoadOptions, OrtDevice, Tensor};

const BACKEND: &str = "ort";

pub(crate) struct OrtModel {
    session: Mutex<Session>,
}

/// ONNX Runtime allows one environment per process.
fn environment() -> Result<&'static Environment, EngineError> {
    static ENV: OnceLock<Result<Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = library_path()?;
        ort::init_from(&path)
            .map_err(|e| format!("cannot load {}: {e}", path.display()))?
            .with_name("cleave")
            .build()
            .map_err(|e| format!("cannot start ONNX Runtime from {}: {e}", path.display()))
    })
    .as_ref()
    .map_err(|e| EngineError::BackendUnavailable(e.clone()))
}

fn library_path() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        return Ok(PathBuf::from(path));
    }
    let output = std::process::Command::new("python3")
        .args([
            "-c",
            "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))",
        ])
        .output()
        .map_err(|e| format!("ORT_DYLIB_PATH is not set and python3 cannot run: {e}"))?;
    if !output.status.success() {
        return Err(
            "ORT_DYLIB_PATH is not set and no Python onnxruntime package was found \
                    (pip install onnxruntime, or point ORT_DYLIB_PATH at libonnxruntime.so)"
                .into(),
        );
    }
    let capi = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()).join("capi");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&capi)
        .map_err(|e| format!("{}: {e}", capi.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
        .collect();
    found.sort();
    found
        .pop()
        .ok_or_else(|| format!("no libonnxruntime.so* in {}", capi.display()))
}

impl OrtModel {
    pub(crate) fn load(
        path: &Path,
        device: OrtDevice,
        input_shape: &[usize],
        output_shape: &[usize],
        options: &LoadOptions,
    ) -> Result<Self, EngineError> {
        let env = environment()?;
        let load_err = |reason: String| EngineError::Load {
            path: path.to_path_buf(),
            backend: BACKEND,
            reason,
        };
        let mut builder = Session::builder(env).map_err(|e| load_err(e.to_string()))?;
        if let Some(threads) = options.threads {
            builder = builder
                .with_intra_threads(threads)
                .map_err(|e| load_err(e.to_string()))?;
        }
        builder = match device {
            OrtDevice::Cpu => builder,
            #[cfg(feature = "cuda")]
            OrtDevice::Cuda => builder
                .with_execution_providers([ep::CUDA::default().build().error_on_failure()])
                .map_err(|e| EngineError::BackendUnavailable(format!("CUDA: {e}")))?,
            #[cfg(feature = "tensorrt")]
            OrtDevice::TensorRt => builder
                .with_execution_providers([ep::TensorRT::default().build().error_on_failure()])
                .map_err(|e| EngineError::BackendUnavailable(format!("TensorRT: {e}")))?,
            #[allow(unreachable_patterns)]
            other => {
                let (name, feature) = match other {
                    OrtDevice::Cuda => ("CUDA", "cuda"),
                    _ => ("TensorRT", "tensorrt"),
                };
                return Err(EngineError::BackendUnavailable(format!(
                    "{name}: this build has no {name} execution provider \
                     (rebuild with `--features {feature}`)"
                )));
            }
        };
        let session = builder
            .commit_from_file(path)
            .map_err(|e| load_err(e.to_string()))?;
        let model = Self {
            session: Mutex::new(session),
        };
        // One sample through the model checks the output shape and warms it up.
        let mut shape = vec![1];
        shape.extend_from_slice(input_shape);
        let probe = Tensor::new(shape, vec![0.0; input_shape.iter().product()]);
        let out = model.run(&probe)?;
        if out.shape[1..] != output_shape[..] {
            return Err(EngineError::WrongShape {
                path: path.to_path_buf(),
                tensor: "output".into(),
                expected: format!("{output_shape:?}"),
                actual: format!("{:?}", &out.shape[1..]),
            });
        }
        Ok(model)
    }

    pub(crate) fn run(&self, input: &Tensor) -> Result<Tensor, EngineError> {
        let run_err = |e: ort::Error| EngineError::Run {
            backend: BACKEND,
            reason: e.to_string(),
        };
        let value =
            OrtTensor::from_array((input.shape.clone(), input.data.clone())).map_err(run_err)?;
        let mut session = self.session.lock().map_err(|_| EngineError::Run {
            backend: BACKEND,
            reason: "session poisoned".into(),
        })?;
        let outputs = session.run(ort::inputs![value]).map_err(run_err)?;
        let (shape, data) = outputs[0].try_extract_tensor::<f32>().map_err(run_err)?;
        let shape: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
        Ok(Tensor::new(shape, data.to_vec()))
    }
}
