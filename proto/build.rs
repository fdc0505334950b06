//! Compiles Cleave's `.proto` files with protox (pure Rust, no system `protoc`) and generates
//! the prost messages and the tonic client and server code: `proto/cleave/v1/*.proto` (the
//! split protocol) and `proto/inference/grpc_service.proto` (KServe v2 / Open Inference
//! Protocol).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/cleave/v1/split.proto",
        "proto/inference/grpc_service.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
