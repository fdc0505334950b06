//! The tract backend: pure Rust, builds anywhere, single-threaded.

use std::path::Path;
use std::sync::Arc;

use tract_hir::infer::Factoid;
use tract_onnx::prelude::*;

use crate::{EngineError, Tensor};

const BACKEND: &str = "tract";

pub(crate) struct TractModel {
    plan: Arc<TypedRunnableModel>,
}

impl TractModel {
    pub(crate) fn load(
        path: &Path,
        input_shape: &[usize],
        output_shape: &[usize],
    ) -> Result<Self, EngineError> {
        let load_err = |e: TractError| EngineError::Load {
            path: path.to_path_buf(),
            backend: BACKEND,
            reason: format!("{e:#}"),
        };
        let mut model = tract_onnx::onnx().model_for_path(path).map_err(load_err)?;
        let declared = model.input_fact(0).map_err(load_err)?.clone();
        check_declared(path, "input", &declared, input_shape)?;
        let batch = model.symbols.sym("N");
        let mut dims: TVec<TDim> = tvec![batch.into()];
        dims.extend(input_shape.iter().map(|&d| TDim::from(d)));
        model
            .set_input_fact(0, f32::fact(dims).into())
            .map_err(load_err)?;
        let typed = model.into_optimized().map_err(load_err)?;
        let out_fact = typed.output_fact(0).map_err(load_err)?;
        let out_dims: Vec<String> = out_fact.shape.iter().map(|d| d.to_string()).collect();
        let expected: Vec<String> = std::iter::once("N".to_string())
            .chain(output_shape.iter().map(|d| d.to_string()))
            .collect();
        if out_dims != expected {
            return Err(EngineError::WrongShape {
                path: path.to_path_buf(),
                tensor: "output".into(),
                expected: format!("[{}]", expected.join(", ")),
                actual: format!("[{}]", out_dims.join(", ")),
            });
        }
        let plan = typed.into_runnable().map_err(load_err)?;
        Ok(Self { plan })
    }

    pub(crate) fn run(&self, input: &Tensor) -> Result<Tensor, EngineError> {
        let run_err = |e: TractError| EngineError::Run {
            backend: BACKEND,
            reason: format!("{e:#}"),
        };
        let tensor =
            tract_onnx::prelude::Tensor::from_shape(&input.shape, &input.data).map_err(run_err)?;
        let outputs = self.plan.run(tvec!(tensor.into())).map_err(run_err)?;
        let view = outputs[0].to_plain_array_view::<f32>().map_err(run_err)?;
        Ok(Tensor::new(
            view.shape().to_vec(),
            view.iter().copied().collect(),
        ))
    }
}

/// Compares the shape the ONNX file declares (batch axis excluded; symbolic axes pass) with
/// the manifest's.
fn check_declared(
    path: &Path,
    tensor: &str,
    fact: &InferenceFact,
    expected: &[usize],
) -> Result<(), EngineError> {
    let dims: Vec<Option<usize>> = fact
        .shape
        .dims()
        .map(|d| {
            d.concretize()
                .and_then(|d| d.as_i64())
                .and_then(|d| usize::try_from(d).ok())
        })
        .collect();
    let show = |dims: &[Option<usize>]| {
        let parts: Vec<String> = dims
            .iter()
            .map(|d| d.map_or("?".to_string(), |d| d.to_string()))
            .collect();
        format!("[{}]", parts.join(", "))
    };
    let mismatch = dims.len() != expected.len() + 1
        || dims[1..]
            .iter()
            .zip(expected)
            .any(|(d, e)| d.is_some_and(|d| d != *e));
    if mismatch && !dims.is_empty() {
        let mut want = vec![None];
        want.extend(expected.iter().map(|&e| Some(e)));
        return Err(EngineError::WrongShape {
            path: path.to_path_buf(),
            tensor: tensor.into(),
            expected: show(&want),
            actual: show(&dims),
        });
    }
    Ok(())
}
