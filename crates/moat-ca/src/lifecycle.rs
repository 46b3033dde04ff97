//! When the CA's own certificates need replacing, decided from the stored state and a clock
//! (no I/O): the intermediate rotates once it has lived a configurable fraction of its life, and
//! a CA that can no longer issue says exactly which offline step brings it back.

use moat_identity::CertInfo;

use crate::{CaError, CaState};

/// The fraction of the intermediate's life after which it is replaced (default 2/3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RotateAt(f64);

/// A rotation point outside 0.1..=0.95 of the intermediate's life.
#[derive(Clone, Copy, Debug, PartialEq, thiserror::Error)]
#[error("{0} is not a fraction between 0.1 and 0.95 of the intermediate's life (e.g. 0.667)")]
pub struct NotAFraction(pub f64);

impl RotateAt {
    /// Two thirds of its life: a third of a year (four months) of margin for a one-year
    /// intermediate.
    pub const DEFAULT: RotateAt = RotateAt(2.0 / 3.0);

    /// A fraction between 0.1 and 0.95.
    pub fn new(fraction: f64) -> Result<Self, NotAFraction> {
        if (0.1..=0.95).contains(&fraction) {
            Ok(RotateAt(fraction))
        } else {
            Err(NotAFraction(fraction))
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

/// What the CA needs, as of a given time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Issuing normally. The intermediate is due for rotation at `rotate_at` (Unix seconds);
    /// `None` when no automatic rotation is possible (imported intermediate, or the root ends
    /// before a new intermediate could outlive this one), in which case the expiry warnings
    /// and `moat check` carry the message.
    Issuing { rotate_at: Option<i64> },
    /// The intermediate has reached its rotation point (`expired`: or its end) and the CA holds
    /// the root key: rotate it now.
    RotateIntermediate { expired: bool, not_after: i64 },
    /// The CA cannot issue and no automatic step fixes it; its text says which offline command
    /// does.
    Stuck(Stuck),
}

/// Why the CA cannot issue, each with the offline command that fixes it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Stuck {
    #[error(
        "the root CA certificate expired at {not_after} (unix): nothing it signed can be trusted any more. Stop the control plane and run `moat-control ca rotate-root --data-dir DIR` (with the same key-encryption key), then give every sidecar the new trust bundle"
    )]
    RootExpired { not_after: i64 },
    #[error(
        "the imported intermediate expired at {not_after} (unix) and this CA does not hold the root key. Stop the control plane and run `moat-control ca rotate-intermediate --data-dir DIR --intermediate-cert FILE --intermediate-key FILE` with a new intermediate signed by your root"
    )]
    ImportedIntermediateExpired { not_after: i64 },
    #[error(
        "the intermediate expired at {intermediate_not_after} (unix) and the root ends at {root_not_after} (unix), too soon for a new one. Stop the control plane and run `moat-control ca rotate-root --data-dir DIR`, then give every sidecar the new trust bundle"
    )]
    RootEndsTooSoon {
        intermediate_not_after: i64,
        root_not_after: i64,
    },
}

fn info(what: &str, der: &[u8]) -> Result<CertInfo, CaError> {
    CertInfo::from_der(der).map_err(|e| CaError::Import(format!("{what}: {e}")))
}

/// Shortest useful gain from a rotation: a new intermediate must outlive the current one by at
/// least this, or rotating only churns (the root is about to end).
const MIN_GAIN: i64 = 86_400;

impl CaState {
    /// Assesses the CA at `now` (Unix seconds).
    pub fn health(&self, now: i64, at: RotateAt) -> Result<Health, CaError> {
        let root = info("root certificate", &self.active_root_der()?)?;
        let int = info("intermediate certificate", &self.intermediate_der()?)?;
        if root.not_after <= now {
            return Ok(Health::Stuck(Stuck::RootExpired {
                not_after: root.not_after,
            }));
        }
        let life = (int.not_after - int.not_before).max(1);
        let rotate_at = int.not_before + (life as f64 * at.get()) as i64;
        let expired = int.not_after <= now;
        let can_rotate = self.root_key.is_some();
        // A replacement (made at the rotation point, or now if that has passed) lives a year, or
        // until the root ends if that is sooner.
        let made = now.max(rotate_at);
        let worth_it = root.not_after.min(made + 365 * 86_400) > int.not_after + MIN_GAIN;
        match (now >= rotate_at || expired, can_rotate, worth_it) {
            (false, true, true) => Ok(Health::Issuing {
                rotate_at: Some(rotate_at),
            }),
            (false, _, _) => Ok(Health::Issuing { rotate_at: None }),
            (true, true, true) => Ok(Health::RotateIntermediate {
                expired,
                not_after: int.not_after,
            }),
            (true, _, _) if !expired => Ok(Health::Issuing { rotate_at: None }),
            (true, false, _) => Ok(Health::Stuck(Stuck::ImportedIntermediateExpired {
                not_after: int.not_after,
            })),
            (true, true, false) => Ok(Health::Stuck(Stuck::RootEndsTooSoon {
                intermediate_not_after: int.not_after,
                root_not_after: root.not_after,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{CertificateAuthority, Kek};

    #[test]
    fn a_fresh_ca_rotates_at_two_thirds_and_must_rotate_once_expired() {
        let (kek, _) = Kek::generate().unwrap();
        let td = "moat.test".parse().unwrap();
        let (ca, state) = CertificateAuthority::generate(&td, &kek).unwrap();
        let i = ca.intermediate_info().unwrap();
        let now = i.not_before + 120;
        let Health::Issuing {
            rotate_at: Some(at),
        } = state.health(now, RotateAt::DEFAULT).unwrap()
        else {
            panic!("a fresh CA issues and has a rotation point");
        };
        let life = i.not_after - i.not_before;
        assert!((at - (i.not_before + life * 2 / 3)).abs() <= 1);
        assert_eq!(
            state.health(at, RotateAt::DEFAULT).unwrap(),
            Health::RotateIntermediate {
                expired: false,
                not_after: i.not_after
            }
        );
        assert_eq!(
            state
                .health(i.not_after + 86_400, RotateAt::DEFAULT)
                .unwrap(),
            Health::RotateIntermediate {
                expired: true,
                not_after: i.not_after
            }
        );
        // After the root's end nothing but an offline root replacement helps.
        let root = &ca.roots_info()[0];
        let Health::Stuck(why) = state.health(root.not_after, RotateAt::DEFAULT).unwrap() else {
            panic!("an expired root is stuck");
        };
        assert_eq!(
            why,
            Stuck::RootExpired {
                not_after: root.not_after
            }
        );
        assert!(
            why.to_string().contains("moat-control ca rotate-root"),
            "{why}"
        );
        // An hour before the root's end, a one-hour intermediate still beats none...
        assert!(matches!(
            state
                .health(root.not_after - 3600, RotateAt::DEFAULT)
                .unwrap(),
            Health::RotateIntermediate { expired: true, .. }
        ));
        // A rotated CA issues again, with its next rotation point ahead.
        let rotated = state.rotate_intermediate(&kek).unwrap();
        let Health::Issuing { rotate_at } = rotated.health(now, RotateAt::DEFAULT).unwrap() else {
            panic!("a fresh intermediate issues");
        };
        assert!(rotate_at.unwrap() > now);
    }

    #[test]
    fn an_imported_intermediate_that_expired_needs_the_offline_command() {
        let (kek, _) = Kek::generate().unwrap();
        let td = "moat.test".parse().unwrap();
        let (ca, mut state) = CertificateAuthority::generate(&td, &kek).unwrap();
        state.root_key = None;
        let end = ca.intermediate_info().unwrap().not_after;
        let Health::Stuck(why) = state.health(end + 1, RotateAt::DEFAULT).unwrap() else {
            panic!("without the root key an expired intermediate is stuck");
        };
        assert_eq!(why, Stuck::ImportedIntermediateExpired { not_after: end });
        assert!(why.to_string().contains("--intermediate-cert"), "{why}");
        // Before it expires there is nothing automatic to do; the warnings carry it.
        assert_eq!(
            state.health(end - 3600, RotateAt::DEFAULT).unwrap(),
            Health::Issuing { rotate_at: None }
        );
    }

    #[test]
    fn fractions_outside_the_range_are_refused() {
        for bad in [0.0, 0.05, 0.96, 1.0, f64::NAN] {
            assert!(RotateAt::new(bad).is_err(), "{bad}");
        }
        assert_eq!(RotateAt::new(0.5).unwrap().get(), 0.5);
    }
}
