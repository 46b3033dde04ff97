//! The control plane's own certificates: its serving identity (`moat-system/moat-control`) and
//! the admin credential it writes for the CLI (`<data-dir>/admin/`). Both are issued by the CA
//! like any workload's, with a fresh key each time, and renewed at their refresh hint.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use moat_ca::{CaError, CertTtl, CertificateAuthority, IssuedCert};
use moat_identity::{CsrError, SpiffeId, ValidatedCsr, WorkloadKey};
use moat_tls::cred_dir::CredDirError;
use moat_tls::{ALPN_H2, ClientAuth, Credential, CredentialError, LiveTls, Serving, cred_dir};

use crate::ca::CaManager;

/// The control plane's listener: gRPC over HTTP/2; a client certificate is asked for but not
/// required, because `Identity.Certify` with a join token comes before the caller has one.
const SERVING: Serving = Serving {
    client_auth: ClientAuth::Optional,
    alpn: &[ALPN_H2],
};

/// Why the control plane could not issue or write one of its own credentials.
#[derive(Debug, thiserror::Error)]
pub enum SelfCertError {
    #[error("cannot generate a key pair: {0}")]
    Key(#[from] CsrError),
    #[error("the CA cannot issue: {0}")]
    Issue(#[from] CaError),
    #[error("the issued certificate is unusable: {0}")]
    Credential(#[from] CredentialError),
    #[error("cannot write the credential to {dir}: {source}")]
    Write {
        dir: PathBuf,
        #[source]
        source: CredDirError,
    },
}

/// Lifetime of the admin credential the control plane writes for local CLI use.
pub const ADMIN_CREDENTIAL_TTL: Duration = Duration::from_secs(24 * 3600);

/// Issues a certificate for `id` over a freshly generated key.
pub fn issue_local(
    ca: &CertificateAuthority,
    id: &SpiffeId,
    ttl: CertTtl,
) -> Result<(Credential, WorkloadKey, IssuedCert), SelfCertError> {
    let key = WorkloadKey::generate(id)?;
    let csr = ValidatedCsr::from_der(key.csr_der())?;
    let issued = ca.issue(&csr.spki_der, id, ttl)?;
    let cred = Credential::issued(issued.chain.clone(), &key, ca.bundle())?;
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
) -> Result<IssuedCert, SelfCertError> {
    let (_, key, issued) = issue_local(ca, id, ttl)?;
    cred_dir::write(
        dir,
        &issued.chain,
        &key.private_key_pem(),
        ca.bundle().roots(),
    )
    .map_err(|source| SelfCertError::Write {
        dir: dir.to_owned(),
        source,
    })?;
    Ok(issued)
}

/// The control plane's serving certificate and admin credential, renewed at their refresh hints
/// and reissued at once (under the new CA, with the new bundle) whenever the CA changes.
#[derive(Debug)]
pub struct SelfCerts {
    ca: Arc<CaManager>,
    live: Arc<LiveTls>,
    self_id: SpiffeId,
    admin: Option<(PathBuf, SpiffeId)>,
    /// When the serving certificate and the admin credential are due (Unix seconds).
    due: std::sync::Mutex<(i64, i64)>,
    wake: tokio::sync::Notify,
}

impl SelfCerts {
    /// Issues the serving certificate (published on a new [`LiveTls`]) and writes the admin
    /// credential, under the current CA.
    pub fn start(
        ca: Arc<CaManager>,
        self_id: SpiffeId,
        admin: Option<(PathBuf, SpiffeId)>,
    ) -> Result<Arc<Self>, SelfCertError> {
        let current = ca.current();
        let (cred, _, serving) = issue_local(&current, &self_id, CertTtl::DEFAULT)?;
        let live = Arc::new(LiveTls::empty(SERVING));
        live.publish(cred, current.bundle().clone(), serving.refresh_after)?;
        let admin_due = match &admin {
            Some((dir, id)) => write_credential_dir(dir, &current, id, admin_ttl())?.refresh_after,
            None => i64::MAX,
        };
        Ok(Arc::new(SelfCerts {
            ca,
            live,
            self_id,
            admin,
            due: std::sync::Mutex::new((serving.refresh_after, admin_due)),
            wake: tokio::sync::Notify::new(),
        }))
    }

    /// The live TLS material the listener serves with.
    pub fn live(&self) -> &Arc<LiveTls> {
        &self.live
    }

    fn renew_serving(&self) -> Result<i64, SelfCertError> {
        let ca = self.ca.current();
        let (cred, _, issued) = issue_local(&ca, &self.self_id, CertTtl::DEFAULT)?;
        self.live
            .publish(cred, ca.bundle().clone(), issued.refresh_after)?;
        tracing::info!(serial = %issued.serial, not_after = issued.not_after, "renewed the control plane's serving certificate");
        Ok(issued.refresh_after)
    }

    fn renew_admin(&self) -> Result<i64, SelfCertError> {
        let Some((dir, id)) = &self.admin else {
            return Ok(i64::MAX);
        };
        Ok(write_credential_dir(dir, &self.ca.current(), id, admin_ttl())?.refresh_after)
    }

    /// Reissues both now, under the CA in force (after a CA change).
    pub fn reissue_all(&self) -> Result<(), SelfCertError> {
        let serving = self.renew_serving()?;
        let admin = self.renew_admin()?;
        *self.due.lock().unwrap_or_else(|e| e.into_inner()) = (serving, admin);
        self.wake.notify_one();
        Ok(())
    }

    /// Renews each at its refresh hint, forever; a failure retries in 30 s.
    pub async fn renew_loop(self: Arc<Self>) {
        loop {
            let now = moat_identity::clock::unix_now();
            let (serving_at, admin_at) = *self.due.lock().unwrap_or_else(|e| e.into_inner());
            let next = serving_at.min(admin_at);
            if next > now {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs((next - now) as u64)) => {}
                    () = self.wake.notified() => {}
                }
                continue;
            }
            let mut due = (serving_at, admin_at);
            if serving_at <= now {
                due.0 = self.renew_serving().unwrap_or_else(|e| {
                    tracing::error!(error = %e, "cannot renew the serving certificate; retrying in 30 s");
                    now + 30
                });
            }
            if admin_at <= now {
                due.1 = self.renew_admin().unwrap_or_else(|e| {
                    tracing::error!(error = %e, "cannot renew the admin credential; retrying in 30 s");
                    now + 30
                });
            }
            *self.due.lock().unwrap_or_else(|e| e.into_inner()) = due;
        }
    }
}

fn admin_ttl() -> CertTtl {
    CertTtl::unchecked(ADMIN_CREDENTIAL_TTL)
}
