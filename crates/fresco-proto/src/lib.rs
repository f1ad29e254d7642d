//! fresco's gRPC protocol (`proto/fresco/v1`), compiled with protox at build time, plus conversions
//! between the wire types and `fresco-core`'s.

#[allow(clippy::all, clippy::unwrap_used)]
pub mod v1 {
    tonic::include_proto!("fresco.v1");
}

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fresco_descriptor");

mod convert;

pub use convert::*;
