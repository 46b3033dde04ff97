//! Rotating the CA as pure state transitions on [`CaState`]: a new intermediate under the same
//! root, or a new root in three steps. The control plane persists each new state atomically and
//! decides *when* to take the next step (after every proxy acknowledged the previous one); this
//! module only knows *what* each step changes, so a rotation interrupted anywhere resumes from
//! the stored state.
//!
//! Root rotation:
//! 1. [`CaState::begin_root_rotation`]: a new root joins the bundle; issuance is unchanged.
//! 2. [`CaState::issue_under_new_root`]: a new intermediate under the new root issues from now
//!    on; the new root moves first in the bundle, the old one stays trusted.
//! 3. [`CaState::finish_root_rotation`]: the old root leaves the bundle.

use moat_identity::bundle::{der_to_pem, sha256_hex};
use rcgen::Issuer;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::authority::{
    CaKey, KeyRole, ROOT_LIFETIME, ca_params, generation_tag, intermediate_under, pem_cert, unix,
};
use crate::state::{CaState, RootRotation, RotationPhase};
use crate::{CaError, Kek};

/// A rotation step that does not apply to the current state.
fn wrong_step(what: &str) -> CaError {
    CaError::Rotation(what.to_owned())
}

fn root_sha(pem: &str) -> Result<String, CaError> {
    Ok(sha256_hex(&pem_cert("root certificate", pem)?))
}

impl CaState {
    /// The root the issuing intermediate chains to (the first in the bundle).
    fn active_root_pem(&self) -> Result<&str, CaError> {
        self.roots_pem
            .first()
            .map(String::as_str)
            .ok_or_else(|| CaError::Import("the CA state holds no root".into()))
    }

    /// The root the intermediate chains to, DER.
    pub(crate) fn active_root_der(&self) -> Result<CertificateDer<'static>, CaError> {
        pem_cert("root certificate", self.active_root_pem()?)
    }

    /// The issuing intermediate, DER.
    pub(crate) fn intermediate_der(&self) -> Result<CertificateDer<'static>, CaError> {
        pem_cert("intermediate certificate", &self.intermediate_pem)
    }

    /// The new root's certificate during a root rotation.
    fn next_root_der(&self) -> Result<Option<CertificateDer<'static>>, CaError> {
        let Some(rotation) = &self.root_rotation else {
            return Ok(None);
        };
        let position = self.position_of(&rotation.new_root_sha256)?;
        pem_cert("root certificate", &self.roots_pem[position]).map(Some)
    }

    /// The active root's key, when held.
    pub(crate) fn open_root_key(&self, kek: &Kek) -> Result<Option<CaKey>, CaError> {
        let Some(sealed) = &self.root_key else {
            return Ok(None);
        };
        let der = self.active_root_der()?;
        CaKey::open(kek, sealed, KeyRole::Root, &der, "root key").map(Some)
    }

    /// During a root rotation's first phase: the new root's key.
    pub(crate) fn open_next_root_key(&self, kek: &Kek) -> Result<Option<CaKey>, CaError> {
        let (Some(sealed), Some(der)) = (&self.next_root_key, self.next_root_der()?) else {
            return Ok(None);
        };
        CaKey::open(kek, sealed, KeyRole::Root, &der, "new root key").map(Some)
    }

    /// Whether any key is still sealed under a label that names only its role (written before
    /// keys were bound to their certificates).
    pub fn has_unbound_keys(&self) -> bool {
        !self.intermediate_key.bound
            || self.root_key.as_ref().is_some_and(|k| !k.bound)
            || self.next_root_key.as_ref().is_some_and(|k| !k.bound)
    }

    /// The same state with every key resealed bound to its role and certificate.
    pub fn reseal_bound(&self, kek: &Kek) -> Result<CaState, CaError> {
        let int_der = self.intermediate_der()?;
        let int_key = CaKey::open(
            kek,
            &self.intermediate_key,
            KeyRole::Intermediate,
            &int_der,
            "intermediate key",
        )?;
        let root_key = match self.open_root_key(kek)? {
            Some(k) => Some(k.seal(kek, KeyRole::Root, &self.active_root_der()?)?),
            None => None,
        };
        let next_root_key = match (self.open_next_root_key(kek)?, self.next_root_der()?) {
            (Some(k), Some(der)) => Some(k.seal(kek, KeyRole::Root, &der)?),
            _ => None,
        };
        Ok(CaState {
            intermediate_key: int_key.seal(kek, KeyRole::Intermediate, &int_der)?,
            root_key,
            next_root_key,
            ..self.clone()
        })
    }

    /// A new intermediate under the active root, which must be held (its key sealed here).
    /// Allowed during a root rotation too: the active root is the one issuing in that phase, so
    /// the phase and its fleet checks are unchanged.
    pub fn rotate_intermediate(&self, kek: &Kek) -> Result<CaState, CaError> {
        let Some(root_key) = self.open_root_key(kek)? else {
            return Err(wrong_step(
                "this CA issues from an imported intermediate and does not hold the root key: import a new intermediate signed by your root instead (`moat-control ca rotate-intermediate --intermediate-cert FILE --intermediate-key FILE`)",
            ));
        };
        let root_der = self.active_root_der()?;
        let root_info = moat_identity::CertInfo::from_der(&root_der)
            .map_err(|e| CaError::Import(e.to_string()))?;
        let now = OffsetDateTime::now_utc();
        if root_info.not_after <= unix(now) {
            return Err(wrong_step(&format!(
                "the root expired at {} (unix): an intermediate under it would be invalid; replace the root (`moat-control ca rotate-root`)",
                root_info.not_after
            )));
        }
        let issuer = Issuer::from_ca_cert_der(&root_der, &root_key)?;
        let td = self.trust_domain()?;
        let (key, der) = intermediate_under(&td, &issuer, now, root_info.not_after)?;
        Ok(CaState {
            intermediate_pem: der_to_pem("CERTIFICATE", &der),
            intermediate_key: key.seal(kek, KeyRole::Intermediate, &der)?,
            ..self.clone()
        })
    }

    /// Replaces the issuing intermediate with an operator's (PEM certificate and PKCS#8 key),
    /// for a CA that does not hold its root key. Loading the result proves the new intermediate
    /// chains to a root in the bundle and matches its key.
    pub fn replace_intermediate(
        &self,
        cert_pem: &str,
        key_pem: &str,
        kek: &Kek,
    ) -> Result<CaState, CaError> {
        let der = pem_cert("intermediate certificate", cert_pem)?;
        let key = CaKey::from_pem("intermediate key", key_pem)?;
        Ok(CaState {
            intermediate_pem: der_to_pem("CERTIFICATE", &der),
            intermediate_key: key.seal(kek, KeyRole::Intermediate, &der)?,
            ..self.clone()
        })
    }

    /// The last resort when the root has expired: a new root and intermediate replace
    /// everything at once, and any root rotation in progress is abandoned. Every member of the
    /// mesh must then be given the new trust bundle out of band, because nothing it trusts can
    /// vouch for the new root.
    pub fn replace_root(&self, kek: &Kek) -> Result<CaState, CaError> {
        let (_, state) = crate::CertificateAuthority::generate(&self.trust_domain()?, kek)?;
        Ok(state)
    }

    /// Step 1: generate a new root and add it to the bundle. Issuance does not change.
    pub fn begin_root_rotation(&self, kek: &Kek) -> Result<CaState, CaError> {
        if let Some(r) = &self.root_rotation {
            return Err(wrong_step(&format!(
                "a root rotation is already in progress ({})",
                r.phase.as_str()
            )));
        }
        let td = self.trust_domain()?;
        let now = OffsetDateTime::now_utc();
        let key = CaKey::generate()?;
        let params = ca_params(
            format!("moat root CA {td} {}", generation_tag()),
            now,
            ROOT_LIFETIME,
            1,
        );
        let cert = params.self_signed(&key)?;
        let old = root_sha(self.active_root_pem()?)?;
        let mut roots_pem = self.roots_pem.clone();
        roots_pem.push(cert.pem());
        Ok(CaState {
            roots_pem,
            next_root_key: Some(key.seal(kek, KeyRole::Root, cert.der())?),
            root_rotation: Some(RootRotation {
                phase: RotationPhase::Trusting,
                old_root_sha256: old,
                new_root_sha256: sha256_hex(cert.der()),
                started_unix: unix(now),
                phase_unix: unix(now),
            }),
            ..self.clone()
        })
    }

    /// Step 2: issue from a new intermediate under the new root.
    pub fn issue_under_new_root(&self, kek: &Kek) -> Result<CaState, CaError> {
        let Some(rotation) = self
            .root_rotation
            .as_ref()
            .filter(|r| r.phase == RotationPhase::Trusting)
        else {
            return Err(wrong_step(
                "no root rotation is waiting to switch issuance to the new root",
            ));
        };
        let (Some(sealed_new), Some(new_key)) =
            (&self.next_root_key, self.open_next_root_key(kek)?)
        else {
            return Err(CaError::Import(
                "the CA state lacks the new root's key; the rotation cannot continue".into(),
            ));
        };
        let position = self.position_of(&rotation.new_root_sha256)?;
        let new_pem = self.roots_pem[position].clone();
        let new_der = pem_cert("root certificate", &new_pem)?;
        let new_info = moat_identity::CertInfo::from_der(&new_der)
            .map_err(|e| CaError::Import(e.to_string()))?;
        let issuer = Issuer::from_ca_cert_der(&new_der, &new_key)?;
        let td = self.trust_domain()?;
        let now = OffsetDateTime::now_utc();
        let (int_key, int_der) = intermediate_under(&td, &issuer, now, new_info.not_after)?;
        let mut roots_pem = self.roots_pem.clone();
        roots_pem.remove(position);
        roots_pem.insert(0, new_pem);
        Ok(CaState {
            roots_pem,
            root_key: Some(sealed_new.clone()),
            next_root_key: None,
            intermediate_pem: der_to_pem("CERTIFICATE", &int_der),
            intermediate_key: int_key.seal(kek, KeyRole::Intermediate, &int_der)?,
            root_rotation: Some(RootRotation {
                phase: RotationPhase::Issuing,
                phase_unix: unix(now),
                ..rotation.clone()
            }),
            ..self.clone()
        })
    }

    /// Step 3: the old root leaves the bundle and the rotation ends.
    pub fn finish_root_rotation(&self) -> Result<CaState, CaError> {
        let Some(rotation) = self
            .root_rotation
            .as_ref()
            .filter(|r| r.phase == RotationPhase::Issuing)
        else {
            return Err(wrong_step(
                "no root rotation is waiting to retire its old root",
            ));
        };
        let old = self.position_of(&rotation.old_root_sha256)?;
        let mut roots_pem = self.roots_pem.clone();
        roots_pem.remove(old);
        Ok(CaState {
            roots_pem,
            root_rotation: None,
            ..self.clone()
        })
    }

    fn position_of(&self, sha256: &str) -> Result<usize, CaError> {
        for (i, pem) in self.roots_pem.iter().enumerate() {
            if root_sha(pem)? == sha256 {
                return Ok(i);
            }
        }
        Err(CaError::Import(format!(
            "the CA state does not hold the root {sha256} its rotation names"
        )))
    }

    fn trust_domain(&self) -> Result<moat_identity::TrustDomain, CaError> {
        self.trust_domain
            .parse()
            .map_err(|e: moat_identity::IdError| CaError::Import(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use moat_identity::{SpiffeId, TrustBundle, Usage, ValidatedCsr, WorkloadKey};
    use rustls_pki_types::UnixTime;

    use super::*;
    use crate::{CertTtl, CertificateAuthority};

    fn leaf(ca: &CertificateAuthority) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        let id = SpiffeId::parse_with_default("shop/orders", ca.trust_domain()).unwrap();
        let key = WorkloadKey::generate(&id).unwrap();
        let csr = ValidatedCsr::from_der(key.csr_der()).unwrap();
        ca.issue(&csr.spki_der, &id, CertTtl::DEFAULT)
            .unwrap()
            .chain
    }

    fn verifies(chain: &[rustls_pki_types::CertificateDer<'static>], bundle: &TrustBundle) -> bool {
        let td = "moat.test".parse().unwrap();
        moat_identity::verify_chain(chain, bundle, &td, UnixTime::now(), Usage::Client).is_ok()
    }

    #[test]
    fn root_rotation_keeps_old_and_new_leaves_valid_until_the_end() {
        let (kek, _) = Kek::generate().unwrap();
        let td = "moat.test".parse().unwrap();
        let (ca0, s0) = CertificateAuthority::generate(&td, &kek).unwrap();
        let old_leaf = leaf(&ca0);

        let s1 = s0.begin_root_rotation(&kek).unwrap();
        let ca1 = CertificateAuthority::load(&s1, &kek).unwrap();
        assert_eq!(ca1.bundle().roots().len(), 2);
        assert_eq!(
            ca1.intermediate(),
            ca0.intermediate(),
            "step 1 keeps issuance"
        );
        assert!(begin_again_fails(&s1, &kek));

        let s2 = s1.issue_under_new_root(&kek).unwrap();
        let ca2 = CertificateAuthority::load(&s2, &kek).unwrap();
        let new_leaf = leaf(&ca2);
        assert_ne!(ca2.intermediate(), ca0.intermediate());
        assert!(verifies(&old_leaf, ca2.bundle()) && verifies(&new_leaf, ca2.bundle()));
        let rotation = s2.root_rotation.clone().unwrap();
        assert_eq!(ca2.bundle().fingerprints()[0], rotation.new_root_sha256);

        let s3 = s2.finish_root_rotation().unwrap();
        let ca3 = CertificateAuthority::load(&s3, &kek).unwrap();
        assert_eq!(ca3.bundle().fingerprints(), vec![rotation.new_root_sha256]);
        assert!(verifies(&new_leaf, ca3.bundle()));
        assert!(!verifies(&old_leaf, ca3.bundle()), "the old root is gone");
        assert!(s3.root_rotation.is_none() && s3.next_root_key.is_none());
        // And the persisted form round-trips.
        let back: CaState = serde_json::from_str(&serde_json::to_string(&s2).unwrap()).unwrap();
        assert_eq!(back.root_rotation, s2.root_rotation);
    }

    fn begin_again_fails(s: &CaState, kek: &Kek) -> bool {
        s.begin_root_rotation(kek).is_err() && s.finish_root_rotation().is_err()
    }

    #[test]
    fn steps_out_of_order_are_refused() {
        let (kek, _) = Kek::generate().unwrap();
        let td = "moat.test".parse().unwrap();
        let (_, s0) = CertificateAuthority::generate(&td, &kek).unwrap();
        let e = s0.issue_under_new_root(&kek).unwrap_err().to_string();
        assert!(e.contains("no root rotation"), "{e}");
        assert!(s0.finish_root_rotation().is_err());
    }

    #[test]
    fn keys_sealed_before_binding_still_load_and_reseal_bound() {
        let (kek, _) = Kek::generate().unwrap();
        let td = "moat.test".parse().unwrap();
        let (_, s0) = CertificateAuthority::generate(&td, &kek).unwrap();
        // Rewrite the keys the way earlier versions sealed them: the role's label only.
        let legacy = |sealed: &crate::Sealed, role: KeyRole, der: &[u8]| {
            let key = CaKey::open(&kek, sealed, role, der, "key").unwrap();
            let pem = zeroize::Zeroizing::new(key.0.serialize_pem());
            let mut old = kek.seal(pem.as_bytes(), role.legacy_label()).unwrap();
            old.bound = false;
            old
        };
        let root_der = s0.active_root_der().unwrap();
        let int_der = s0.intermediate_der().unwrap();
        let old = CaState {
            root_key: Some(legacy(
                s0.root_key.as_ref().unwrap(),
                KeyRole::Root,
                &root_der,
            )),
            intermediate_key: legacy(&s0.intermediate_key, KeyRole::Intermediate, &int_der),
            ..s0.clone()
        };
        assert!(old.has_unbound_keys());
        CertificateAuthority::load(&old, &kek).unwrap();
        let resealed = old.reseal_bound(&kek).unwrap();
        assert!(!resealed.has_unbound_keys());
        let ca = CertificateAuthority::load(&resealed, &kek).unwrap();
        assert!(verifies(&leaf(&ca), ca.bundle()));
    }

    #[test]
    fn intermediate_rotation_keeps_the_root() {
        let (kek, _) = Kek::generate().unwrap();
        let td = "moat.test".parse().unwrap();
        let (ca0, s0) = CertificateAuthority::generate(&td, &kek).unwrap();
        let old_leaf = leaf(&ca0);
        let s1 = s0.rotate_intermediate(&kek).unwrap();
        let ca1 = CertificateAuthority::load(&s1, &kek).unwrap();
        assert_ne!(ca1.intermediate(), ca0.intermediate());
        assert_eq!(ca1.bundle().fingerprints(), ca0.bundle().fingerprints());
        assert!(verifies(&old_leaf, ca1.bundle()) && verifies(&leaf(&ca1), ca1.bundle()));
    }
}
