//! Cleave's wire contracts: the `cleave.v1` protobuf messages and the tonic client and server
//! for the `Split` service, generated at build time from `proto/cleave/v1/*.proto`.
//!
//! These types live at the service edges only: the head and the tail convert them to their
//! own domain types before anything reaches the codec or the engine.

/// The `cleave.v1` package: split-computing protocol between a head and a tail.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("cleave.v1");
}

/// Metadata key that carries the head's bundle id on a `Stream` call.
pub const BUNDLE_ID_METADATA: &str = "cleave-bundle-id";
