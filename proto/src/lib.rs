//! Cleave's wire contracts, generated at build time (prost messages, tonic clients and servers):
//! the `cleave.v1` split protocol from `proto/cleave/v1/*.proto`, and the KServe v2 / Open
//! Inference Protocol (`inference.GRPCInferenceService`) from
//! `proto/inference/grpc_service.proto`.
//!
//! These types live at the service edges only: the head and the tail convert them to their
//! own domain types before anything reaches the codec or the engine.

/// The `cleave.v1` package: split-computing protocol between a head and a tail.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("cleave.v1");
}

/// The `inference` package: the KServe v2 / Open Inference Protocol gRPC service
/// `GRPCInferenceService` (ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata,
/// ModelInfer and Triton's bidirectional ModelStreamInfer), wire-compatible with standard
/// clients such as NVIDIA's `tritonclient[grpc]`.
///
/// Server: `grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer}`;
/// client: `grpc_inference_service_client::GrpcInferenceServiceClient`.
///
/// Tensor data travels in `raw_input_contents` / `raw_output_contents`, one entry per tensor
/// in the order of `inputs` / `outputs`: fixed-size types little-endian and row-major, BYTES
/// elements each as a 4-byte little-endian length followed by the bytes.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod inference {
    tonic::include_proto!("inference");
}

/// Metadata key that carries the head's bundle id on a `Stream` call.
pub const BUNDLE_ID_METADATA: &str = "cleave-bundle-id";
