//! The only place moat builds rustls configurations. Every config is TLS 1.3 only on the aws-lc-rs
//! provider with the hybrid post-quantum group X25519MLKEM768 offered first and AES-256-GCM
//! preferred unless a [`SuiteOrder`] says AES-128-GCM (`provider`). Peers
//! are authenticated by SPIFFE ID against the mesh trust bundle, never by DNS name (`verifier`).
//! A [`Credential`] (chain + key) is validated before any config is built from it (`config`), and
//! [`LiveTls`] publishes each new generation (credential, bundle, server config, cached client
//! configs) on a watch, so rotation never mutates a live config (`live`); both binaries use it.
//! Outbound configs keep session tickets per endpoint (`tickets`). `connect` dials a gRPC server
//! (the control plane) with those configs; `cred_dir` reads and writes credential directories
//! (cert.pem, key.pem, bundle.pem); `failure` says why a handshake failed, from the error's type;
//! `pending` bounds the handshakes a listener open to strangers lets wait; `expiry` waits for a
//! peer's certificate to expire, so a connection never outlives the certificate that opened it.
//! `per_caller` counts what each caller (an identity, a source address) holds, under a limit;
//! `by_source` keeps entries by age and by source address for the bounds that make room by age.

pub mod by_source;
pub mod config;
pub mod connect;
pub mod cred_dir;
pub mod expiry;
pub mod failure;
pub mod live;
pub mod pending;
pub mod per_caller;
pub mod provider;
pub mod tickets;
pub mod verifier;

pub use config::{
    ALPN_H2, ALPN_HTTP1, ALPN_TCP, ClientAuth, Credential, CredentialError, client_config,
    client_config_ordered, peer_identity, private_key, server_config, server_config_ordered,
};
pub use failure::HandshakeFailure;
pub use live::{LiveTls, Serving, TlsState, TlsWatch};
pub use provider::SuiteOrder;
pub use tickets::Tickets;
pub use verifier::{SpiffeClientVerifier, SpiffeServerVerifier};
