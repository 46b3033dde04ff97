//! The control plane's own certificates: its serving identity (`moat-system/moat-control`) and
//! the admin credential it writes for the CLI (`<data-dir>/admin/`). Both are issued by the CA
//! like any workload's, with a fresh key each time, and renewed at their refresh hint.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use moat_ca::{CertTtl, CertificateAuthority, IssuedCert};
use moat_identity::{SpiffeId, ValidatedCsr, WorkloadKey};
use moat_tls::{Credential, LiveTls, cred_dir};
use rustls_pki_types::PrivateKeyDer;

/// Lifetime of the admin credential the control plane writes for local CLI use.
pub const ADMIN_CREDENTIAL_TTL: Duration = Duration::from_secs(24 * 3600);

/// Issues a certificate for `id` over a freshly generated key.
pub fn issue_local(
    ca: &CertificateAuthority,
    id: &SpiffeId,
    ttl: CertTtl,
) -> anyhow::Result<(Credential, WorkloadKey, IssuedCert)> {
    let key = WorkloadKey::generate(id)?;
    let csr = ValidatedCsr::from_der(key.csr_der())?;
    let issued = ca.issue(&csr.spki_der, id, ttl)?;
    let der = PrivateKeyDer::try_from(key.private_key_der()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cred = Credential::new(issued.chain.clone(), der, ca.bundle())?;
    Ok((cred, key, issued))
}

/// The admin credential directory inside the data directory.
pub fn admin_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("admin")
}

/// Writes `cert.pem` (chain), `key.pem` and `bundle.pem` for `id` into `dir`, all 0600.
pub fn write_credential_dir(
    dir: &Path,
    ca: &CertificateAuthority,
    id: &SpiffeId,
    ttl: CertTtl,
) -> anyhow::Result<IssuedCert> {
    let (_, key, issued) = issue_local(ca, id, ttl)?;
    cred_dir::write(
        dir,
        &issued.chain,
        &key.private_key_pem(),
        ca.bundle().roots(),
    )
    .with_context(|| format!("cannot write the credential to {}", dir.display()))?;
    Ok(issued)
}

/// Renews the serving certificate and the admin credential at their refresh hints, forever.
pub async fn renew_loop(
    ca: Arc<CertificateAuthority>,
    live: Arc<LiveTls>,
    self_id: SpiffeId,
    serving_refresh: i64,
    admin: Option<(PathBuf, SpiffeId)>,
    admin_refresh: i64,
) {
    let mut serving_at = serving_refresh;
    let mut admin_at = admin_refresh;
    loop {
        let now = unix_now();
        let next = if admin.is_some() {
            serving_at.min(admin_at)
        } else {
            serving_at
        };
        if next > now {
            tokio::time::sleep(Duration::from_secs((next - now) as u64)).await;
            continue;
        }
        if serving_at <= now {
            serving_at = match issue_local(&ca, &self_id, CertTtl::DEFAULT).and_then(
                |(cred, _, issued)| Ok(live.publish(cred, ca.bundle().clone()).map(|_| issued)?),
            ) {
                Ok(issued) => {
                    tracing::info!(serial = %issued.serial, not_after = issued.not_after, "renewed the control plane's serving certificate");
                    issued.refresh_after
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot renew the serving certificate; retrying in 30 s");
                    now + 30
                }
            };
        }
        if let Some((dir, id)) = &admin
            && admin_at <= now
        {
            admin_at = match write_credential_dir(
                dir,
                &ca,
                id,
                CertTtl::unchecked(ADMIN_CREDENTIAL_TTL),
            ) {
                Ok(issued) => issued.refresh_after,
                Err(e) => {
                    tracing::error!(error = %e, "cannot renew the admin credential; retrying in 30 s");
                    now + 30
                }
            };
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
