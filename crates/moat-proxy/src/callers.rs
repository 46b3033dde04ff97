//! What one caller identity holds at this sidecar's inbound, counted across all its connections
//! (every replica of a service shares one identity), so that no caller can take from the others
//! what they share:
//! - requests in flight at the app (`--max-requests-per-caller`): over the limit, a request is
//!   answered 429 `caller-busy` without reaching the app;
//! - open mesh connections (`--max-connections-per-caller`): over the limit, a connection is
//!   closed after its handshake, before any of it reaches the app, so a holder of a valid
//!   certificate cannot exhaust the sidecar's memory and sockets with idle connections.
//!
//! The same count ([`moat_tls::per_caller`]), keyed by source address, bounds the admin port's
//! connections (`admin`).

pub use moat_tls::per_caller::{PerCaller, Slot};
