//! The crypto provider: aws-lc-rs, TLS 1.3 suites only, post-quantum hybrid key exchange first.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs::{self, cipher_suite, kx_group};

/// Which AES-GCM suite a config offers first (client) or picks first (server). Both are always
/// enabled, with ChaCha20-Poly1305 last, so sidecars with different orders still agree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SuiteOrder {
    /// TLS_AES_256_GCM_SHA384 first: the symmetric cipher matches ML-KEM-768's strength.
    #[default]
    Aes256First,
    /// TLS_AES_128_GCM_SHA256 first: its key schedule hashes with SHA-256, which CPUs with SHA
    /// extensions do in hardware, where SHA-384 runs in software.
    Aes128First,
}

/// aws-lc-rs with the TLS 1.3 cipher suites in the default order and key-exchange groups
/// X25519MLKEM768, X25519, P-256 (in that order).
pub fn provider() -> Arc<CryptoProvider> {
    provider_ordered(SuiteOrder::default())
}

/// [`provider`] with the AES-GCM suites in `order`.
pub fn provider_ordered(order: SuiteOrder) -> Arc<CryptoProvider> {
    let (first, second) = match order {
        SuiteOrder::Aes256First => (
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_AES_128_GCM_SHA256,
        ),
        SuiteOrder::Aes128First => (
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
        ),
    };
    Arc::new(CryptoProvider {
        cipher_suites: vec![first, second, cipher_suite::TLS13_CHACHA20_POLY1305_SHA256],
        kx_groups: vec![
            kx_group::X25519MLKEM768,
            kx_group::X25519,
            kx_group::SECP256R1,
        ],
        ..aws_lc_rs::default_provider()
    })
}

/// The protocol versions every moat config allows: TLS 1.3 only.
pub static VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
