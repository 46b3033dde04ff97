//! The moat certificate authority, with no I/O: a root (trust anchor) and an issuing
//! intermediate, generated with rcgen or brought by the operator as PEM (`authority`); the leaf
//! lifetime rules (`ttl`); and sealing of CA private keys under a key-encryption key with
//! AES-256-GCM (`kek`); rotation of the intermediate and of the root as steps on the
//! persisted state (`rotation`), and when the intermediate is due for it (`lifecycle`). What to
//! persist is [`CaState`] (`state`); the control plane stores it.

pub mod authority;
pub mod kek;
pub mod lifecycle;
pub mod rotation;
pub mod state;
pub mod ttl;

pub use authority::{ByoPem, CaCertInfo, CaError, CertificateAuthority, IssuedCert};
pub use kek::{Kek, KekError, Sealed};
pub use lifecycle::{Health, NotAFraction, RotateAt, Stuck};
pub use state::{CaState, RootRotation, RotationPhase};
pub use ttl::{CertTtl, TtlError};
