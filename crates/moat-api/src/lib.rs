//! The moat wire contract: Rust types and tonic clients/servers generated at build time from
//! `proto/moat/v1`. Nothing else lives here; conversion to domain types happens at each gRPC edge.

/// `moat.v1`: Identity, Mesh, Admin.
pub mod v1 {
    #![allow(missing_docs, clippy::all, missing_debug_implementations)]
    tonic::include_proto!("moat.v1");
}
