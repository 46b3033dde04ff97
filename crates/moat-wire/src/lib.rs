//! The wire mappings, defined once: what the control plane sends and the proxy (and the CLI)
//! reads, where both sides must agree beyond the generated protobuf types.
//!
//! - [`policy`]: access policies to their protobuf form and back, every field validated on the
//!   way in.
//! - [`table`]: the outbound service table a proxy folds from snapshots, and the digests by
//!   which a reconnecting proxy says what it holds, so that any replica resends only what
//!   differs.
//!
//! moat-api stays generated code only; this crate is the one place that knows both sides.

pub mod policy;
pub mod table;

pub use policy::{WireError, policy_from_proto, policy_to_proto};
