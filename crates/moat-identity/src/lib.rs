//! Workload identity for the moat mesh, with no I/O: SPIFFE IDs and trust domains as validated
//! newtypes (`spiffe_id`), the one parser for the short forms operators write (`orders`,
//! `shop/orders`, `spiffe://…`), trust bundles (`bundle`), CSR generation and validation (`csr`),
//! and chain + SPIFFE-ID verification shared by the rustls verifiers and tooling (`verify`).
//! Certificate facts that tools print live in `cert`; `clock` reads the wall clock as Unix
//! seconds or milliseconds, the one way the mesh writes times down.

pub mod bundle;
pub mod cert;
pub mod clock;
pub mod csr;
pub mod spiffe_id;
pub mod verify;

pub use bundle::{BundleError, TrustBundle};
pub use cert::{CertInfo, CertInfoError, NoSpiffeId, NotASerial, Serial};
pub use csr::{CsrError, ValidatedCsr, WorkloadKey};
pub use spiffe_id::{IdError, Namespace, ServiceAccount, SpiffeId, TrustDomain};
pub use verify::{Usage, VerifiedPeer, VerifyError, issuer_sha256, verify_chain};
