//! Waiting for a certificate to expire. A NotAfter is wall-clock time and timers run on the
//! monotonic clock, so the wait looks at the wall clock again at least every
//! [`WALL_CLOCK_CHECK`]: a clock jump (a suspended VM, a corrected clock) moves the moment a
//! connection is closed by at most that much.

use std::time::Duration;

/// How long a wait for an expiry trusts the monotonic clock before reading the wall clock again.
pub const WALL_CLOCK_CHECK: Duration = Duration::from_secs(30);

/// Resolves once the wall clock reaches `not_after` (Unix seconds): from then on a certificate
/// with that NotAfter has expired (as [`moat_identity::verify`] counts it).
pub async fn expired(not_after: i64) {
    loop {
        let left_ms = not_after
            .saturating_mul(1000)
            .saturating_sub(moat_identity::clock::unix_now_ms());
        if left_ms <= 0 {
            return;
        }
        let nap = Duration::from_millis(u64::try_from(left_ms).unwrap_or(u64::MAX));
        tokio::time::sleep(nap.min(WALL_CLOCK_CHECK)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resolves_at_once_for_a_past_expiry() {
        let past = moat_identity::clock::unix_now() - 1;
        tokio::time::timeout(Duration::from_secs(5), expired(past))
            .await
            .expect("an expiry in the past has already come");
    }

    #[tokio::test]
    async fn waits_until_the_expiry() {
        let soon = moat_identity::clock::unix_now() + 2;
        expired(soon).await;
        assert!(
            moat_identity::clock::unix_now() >= soon,
            "woke before the expiry"
        );
    }
}
