//! Leaf certificate lifetimes: default 1 h, accepted from 5 min to 24 h.

use std::time::Duration;

/// A leaf lifetime inside the accepted range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CertTtl(Duration);

/// A lifetime outside the accepted range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "certificate lifetime {0:?} is outside the accepted range (5 min to 24 h unless the control plane sets another minimum)"
)]
pub struct TtlError(pub Duration);

impl CertTtl {
    /// The shortest accepted lifetime.
    pub const MIN: Duration = Duration::from_secs(5 * 60);
    /// The longest accepted lifetime.
    pub const MAX: Duration = Duration::from_secs(24 * 3600);
    /// The default lifetime, 1 h.
    pub const DEFAULT: CertTtl = CertTtl(Duration::from_secs(3600));
    /// The shortest lifetime, as a value.
    pub const MIN_TTL: CertTtl = CertTtl(Self::MIN);

    /// Checks `d` against the accepted range.
    pub fn new(d: Duration) -> Result<Self, TtlError> {
        if (Self::MIN..=Self::MAX).contains(&d) {
            Ok(CertTtl(d))
        } else {
            Err(TtlError(d))
        }
    }

    /// Checks `d` against `min..=24 h`, for a control plane configured with a lower minimum
    /// (test meshes that rotate every few seconds). `min` itself is never below 1 s.
    pub fn within(d: Duration, min: Duration) -> Result<Self, TtlError> {
        let min = min.max(Duration::from_secs(1));
        if (min..=Self::MAX).contains(&d) {
            Ok(CertTtl(d))
        } else {
            Err(TtlError(d))
        }
    }

    /// Builds a lifetime without the range check. Only for tests and benchmarks that need
    /// certificates living seconds.
    pub fn unchecked(d: Duration) -> Self {
        CertTtl(d)
    }

    /// The lifetime.
    pub fn get(self) -> Duration {
        self.0
    }

    /// This lifetime, or `max` when that is shorter: the control plane's `--max-cert-ttl`.
    pub fn capped(self, max: Duration) -> CertTtl {
        CertTtl(self.0.min(max))
    }
}

impl Default for CertTtl {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_is_enforced() {
        assert!(CertTtl::new(Duration::from_secs(299)).is_err());
        assert!(CertTtl::new(Duration::from_secs(300)).is_ok());
        assert!(CertTtl::new(Duration::from_secs(86400)).is_ok());
        assert!(CertTtl::new(Duration::from_secs(86401)).is_err());
        assert_eq!(CertTtl::default().get(), Duration::from_secs(3600));
        let ten_min = Duration::from_secs(600);
        assert_eq!(CertTtl::default().capped(ten_min).get(), ten_min);
        assert_eq!(CertTtl::MIN_TTL.capped(ten_min), CertTtl::MIN_TTL);
    }
}
