//! `inference.GRPCInferenceService`: the KServe v2 / Open Inference Protocol over the model
//! repository, so Triton's and KServe's clients, gateways and load generators work unchanged.
//!
//! Every served model is one KServe model, version `1`:
//!
//! | model | inputs (one per request) | output |
//! |---|---|---|
//! | `<bundle name>` (tail) | `frame`: BYTES `[N]`, coded feature frames; or the tail's own input (e.g. `bottleneck`): FP32 `[N, C, H, W]`, dequantized | the tail's output (e.g. `logits`), FP32 |
//! | `<bundle name>-full` | the full model's input (e.g. `image`): FP32 `[N, 3, H, W]`, preprocessed | its output, FP32 |
//!
//! Tensor data comes in `raw_input_contents` (little-endian; BYTES elements each behind a
//! 4-byte little-endian length, as tritonclient sends them) or in the typed `contents`
//! fields, and goes back in `raw_output_contents`, as Triton answers. Requests queue in the
//! same batcher as `cleave.v1` frames, so both protocols share batches.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use cleave_engine::{Role, Tensor};
use cleave_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use cleave_proto::inference::model_infer_request::InferInputTensor;
use cleave_proto::inference::model_infer_response::InferOutputTensor;
use cleave_proto::inference::model_metadata_response::TensorMetadata;
use cleave_proto::inference::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ModelStreamInferResponse, ServerLiveRequest,
    ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest,
    ServerReadyResponse,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::ordered_stream::OrderedAnswers;
use crate::repository::{ModelRepository, ServedModel};
use crate::{Draining, Readiness, TailError, deadline};

/// The one version every model has.
const VERSION: &str = "1";
/// Name of the input that carries coded feature frames.
pub const FRAME_INPUT: &str = "frame";

/// The KServe v2 service over a model repository.
#[derive(Debug, Clone)]
pub struct KserveService {
    repository: Arc<ModelRepository>,
    readiness: Readiness,
    stream_window: usize,
    draining: Draining,
}

impl KserveService {
    /// A service answering from `repository`; `ServerReady` follows `readiness`; a stream
    /// has up to `stream_window` requests in flight and ends once `draining` starts.
    pub fn new(
        repository: Arc<ModelRepository>,
        readiness: Readiness,
        stream_window: usize,
        draining: Draining,
    ) -> Self {
        Self {
            repository,
            readiness,
            stream_window,
            draining,
        }
    }

    fn model(&self, name: &str, version: &str) -> Result<&Arc<ServedModel>, TailError> {
        let model = self.repository.by_name(name)?;
        if !version.is_empty() && version != VERSION {
            return Err(TailError::UnknownModel {
                requested: format!("{name} version {version}"),
                served: vec![format!("{name} version {VERSION}")],
            });
        }
        Ok(model)
    }

    async fn infer(
        &self,
        request: ModelInferRequest,
        call: Option<Instant>,
    ) -> Result<ModelInferResponse, TailError> {
        let model = self
            .model(&request.model_name, &request.model_version)?
            .clone();
        let output_name = model.bundle().model_file(model.role()).output.clone();
        if let Some(other) = request.outputs.iter().find(|o| o.name != output_name) {
            return Err(TailError::BadRequest(format!(
                "{} has no output {:?}; its output is {output_name:?}",
                model.name(),
                other.name
            )));
        }
        let [input] = request.inputs.as_slice() else {
            return Err(TailError::BadRequest(format!(
                "{} takes exactly one input tensor, got {}",
                model.name(),
                request.inputs.len()
            )));
        };
        if !request.raw_input_contents.is_empty() && request.raw_input_contents.len() != 1 {
            return Err(TailError::BadRequest(format!(
                "{} raw_input_contents for one input",
                request.raw_input_contents.len()
            )));
        }
        if input
            .parameters
            .keys()
            .any(|k| k.starts_with("shared_memory"))
        {
            return Err(TailError::BadRequest(
                "shared-memory inputs are not supported: send the data in the request".into(),
            ));
        }
        let raw = request.raw_input_contents.first().map(Vec::as_slice);
        let answer = if input.name == FRAME_INPUT && model.role() == Role::Tail {
            let frames = bytes_elements(input, raw)?;
            model.infer_frames(&frames, call).await?
        } else {
            let tensor = fp32_tensor(&model, input, raw)?;
            model.infer(tensor, call).await?
        };
        let shape = answer.output.shape.iter().map(|&d| d as i64).collect();
        let bytes = answer
            .output
            .data
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        Ok(ModelInferResponse {
            model_name: model.name().to_string(),
            model_version: VERSION.to_string(),
            id: request.id,
            parameters: Default::default(),
            outputs: vec![InferOutputTensor {
                name: output_name,
                datatype: "FP32".into(),
                shape,
                parameters: Default::default(),
                contents: None,
            }],
            raw_output_contents: vec![bytes],
        })
    }
}

/// The elements of a BYTES tensor `[N]` (or `[N, 1]`): from raw contents, where each is a
/// 4-byte little-endian length and the bytes, or from `contents.bytes_contents`.
fn bytes_elements<'a>(
    input: &'a InferInputTensor,
    raw: Option<&'a [u8]>,
) -> Result<Vec<&'a [u8]>, TailError> {
    if input.datatype != "BYTES" {
        return Err(TailError::BadRequest(format!(
            "input {FRAME_INPUT:?} must be BYTES (coded feature frames), not {}",
            input.datatype
        )));
    }
    let count = element_count(&input.shape)?;
    let elements: Vec<&[u8]> = match raw {
        Some(mut rest) => {
            let mut elements = Vec::new();
            while !rest.is_empty() {
                let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                    return Err(TailError::BadRequest(
                        "BYTES raw contents end inside a length prefix".into(),
                    ));
                };
                let len = u32::from_le_bytes(*len) as usize;
                if tail.len() < len {
                    return Err(TailError::BadRequest(format!(
                        "a BYTES element declares {len} bytes, {} remain",
                        tail.len()
                    )));
                }
                let (element, after) = tail.split_at(len);
                elements.push(element);
                rest = after;
            }
            elements
        }
        None => input
            .contents
            .as_ref()
            .map(|c| c.bytes_contents.iter().map(Vec::as_slice).collect())
            .unwrap_or_default(),
    };
    if elements.len() != count || count == 0 {
        return Err(TailError::BadRequest(format!(
            "input {FRAME_INPUT:?} has shape {:?} but {} elements",
            input.shape,
            elements.len()
        )));
    }
    Ok(elements)
}

/// An FP32 tensor `[N, ..model input]` from raw little-endian bytes or `fp32_contents`.
fn fp32_tensor(
    model: &ServedModel,
    input: &InferInputTensor,
    raw: Option<&[u8]>,
) -> Result<Tensor, TailError> {
    let expected_name = &model.bundle().model_file(model.role()).input;
    if &input.name != expected_name {
        let frame = if model.role() == Role::Tail {
            format!(" or {FRAME_INPUT:?} (BYTES)")
        } else {
            String::new()
        };
        return Err(TailError::BadRequest(format!(
            "{} has no input {:?}; it takes {expected_name:?} (FP32){frame}",
            model.name(),
            input.name
        )));
    }
    if input.datatype != "FP32" {
        return Err(TailError::BadRequest(format!(
            "input {:?} must be FP32, not {}",
            input.name, input.datatype
        )));
    }
    let sample = model.input_shape();
    let shape: Vec<usize> = input
        .shape
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<_>>()
        .unwrap_or_default();
    if shape.len() != sample.len() + 1 || shape[1..] != sample[..] || shape[0] == 0 {
        return Err(TailError::BadRequest(format!(
            "input {:?} has shape {:?}; {} takes [N, {}]",
            input.name,
            input.shape,
            model.name(),
            sample
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let count = element_count(&input.shape)?;
    let data: Vec<f32> = match raw {
        Some(bytes) => {
            if bytes.len() != count * 4 {
                return Err(TailError::BadRequest(format!(
                    "input {:?} of shape {:?} needs {} bytes, got {}",
                    input.name,
                    input.shape,
                    count * 4,
                    bytes.len()
                )));
            }
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        }
        None => input
            .contents
            .as_ref()
            .map(|c| c.fp32_contents.clone())
            .unwrap_or_default(),
    };
    if data.len() != count {
        return Err(TailError::BadRequest(format!(
            "input {:?} of shape {:?} has {} values",
            input.name,
            input.shape,
            data.len()
        )));
    }
    Ok(Tensor::new(shape, data))
}

fn element_count(shape: &[i64]) -> Result<usize, TailError> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| {
            usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
        })
        .filter(|&n| n <= 1 << 28)
        .ok_or_else(|| TailError::BadRequest(format!("invalid tensor shape {shape:?}")))
}

fn tensor_metadata(name: &str, datatype: &str, sample: &[usize], batched: bool) -> TensorMetadata {
    let mut shape: Vec<i64> = if batched { vec![-1] } else { Vec::new() };
    shape.extend(sample.iter().map(|&d| d as i64));
    TensorMetadata {
        name: name.to_string(),
        datatype: datatype.to_string(),
        shape,
    }
}

type StreamResponses = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GrpcInferenceService for KserveService {
    async fn server_live(
        &self,
        _request: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _request: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.readiness.get(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        // As Triton: an unknown model is simply not ready, not an error.
        let request = request.into_inner();
        let known = self.model(&request.name, &request.version).is_ok();
        Ok(Response::new(ModelReadyResponse {
            ready: known && self.readiness.get(),
        }))
    }

    async fn server_metadata(
        &self,
        _request: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "cleave-tail".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let model = self.model(&request.name, &request.version)?;
        let file = model.bundle().model_file(model.role());
        let mut inputs = Vec::new();
        if model.role() == Role::Tail {
            inputs.push(tensor_metadata(FRAME_INPUT, "BYTES", &[], true));
        }
        inputs.push(tensor_metadata(
            &file.input,
            "FP32",
            &model.input_shape(),
            true,
        ));
        Ok(Response::new(ModelMetadataResponse {
            name: model.name().to_string(),
            versions: vec![VERSION.into()],
            platform: format!(
                "cleave_{}_{}",
                model.role().name(),
                model.settings().backend
            ),
            inputs,
            outputs: vec![tensor_metadata(
                &file.output,
                "FP32",
                &model.output_shape(),
                true,
            )],
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let call = deadline::from_metadata(request.metadata(), Instant::now());
        Ok(Response::new(self.infer(request.into_inner(), call).await?))
    }

    type ModelStreamInferStream = StreamResponses;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let service = self.clone();
        // Up to `stream_window` requests of a stream run at once (sharing batches) and are
        // answered in order; a failed request gets its error message and the stream carries
        // on, as Triton does. Draining ends the stream UNAVAILABLE after the requests in
        // flight are answered.
        Ok(Response::new(Box::pin(OrderedAnswers::new(
            request.into_inner(),
            self.stream_window,
            self.draining.clone(),
            Status::unavailable("the server is shutting down: send unanswered requests again"),
            move |request| {
                let service = service.clone();
                async move {
                    match service.infer(request, None).await {
                        Ok(response) => ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(response),
                        },
                        Err(error) => ModelStreamInferResponse {
                            error_message: error.to_string(),
                            infer_response: None,
                        },
                    }
                }
            },
        ))))
    }
}
