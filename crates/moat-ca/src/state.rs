//! What the control plane persists for the CA: the roots, the issuing intermediate, their
//! sealed keys, and a root rotation in progress. Data only; issuing is in `authority`, the
//! rotation steps (transitions of this state) in `rotation`.

use serde::{Deserialize, Serialize};

use crate::Sealed;

/// What the control plane persists for the CA. Private keys appear only sealed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaState {
    pub trust_domain: String,
    /// Every trusted root, PEM. The first one is the root the intermediate chains to.
    pub roots_pem: Vec<String>,
    /// The root's key, when the CA holds it (absent for an imported intermediate).
    pub root_key: Option<Sealed>,
    /// The issuing intermediate, PEM.
    pub intermediate_pem: String,
    pub intermediate_key: Sealed,
    /// During a root rotation: the new root's key, until issuance switches to the new root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_root_key: Option<Sealed>,
    /// The root rotation in progress, if any (see [`crate::rotation`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_rotation: Option<RootRotation>,
}

/// Where a root rotation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RotationPhase {
    /// Step 1 done: both roots are in the bundle; certificates still come from the old root.
    Trusting,
    /// Step 2 done: certificates come from the new root; the old root is still trusted.
    Issuing,
}

impl RotationPhase {
    /// The name shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            RotationPhase::Trusting => "trusting-new-root",
            RotationPhase::Issuing => "issuing-from-new-root",
        }
    }
}

/// A root rotation in progress, persisted inside [`CaState`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootRotation {
    pub phase: RotationPhase,
    /// SHA-256 of the root being retired.
    pub old_root_sha256: String,
    /// SHA-256 of the root being introduced.
    pub new_root_sha256: String,
    pub started_unix: i64,
    /// When the current phase was entered.
    pub phase_unix: i64,
}
