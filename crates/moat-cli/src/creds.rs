//! The CLI's credential directories, on top of `moat_tls::cred_dir` (cert.pem, key.pem,
//! bundle.pem): the admin credential `moat-control` writes to `<data-dir>/admin`, and what
//! `moat cert issue|request|renew` write.

use std::path::Path;

use anyhow::bail;
use moat_identity::TrustBundle;
use moat_tls::Credential;
use moat_tls::cred_dir;

/// A loaded credential directory.
#[derive(Debug)]
pub struct CredDir {
    pub credential: Credential,
    pub bundle: TrustBundle,
}

/// Reads a trust bundle file.
pub fn read_bundle(path: &Path) -> anyhow::Result<TrustBundle> {
    Ok(cred_dir::read_bundle(path)?)
}

impl CredDir {
    /// Loads and validates `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        if !dir.is_dir() {
            bail!(
                "credentials directory {} does not exist: pass --credentials DIR (moat-control writes the admin credential to <data-dir>/admin)",
                dir.display()
            );
        }
        // The control plane replaces the three files one by one (each atomically) when it renews
        // the admin credential or the CA changes; a read that straddles the swap sees a key and
        // a certificate that do not match, so it is retried briefly before being reported.
        let mut attempt = 0;
        loop {
            match cred_dir::load(dir) {
                Ok((credential, bundle)) => return Ok(CredDir { credential, bundle }),
                Err(e) if attempt >= 3 => return Err(e.into()),
                Err(_) => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
    }
}

/// Writes a credential directory.
pub fn write(
    dir: &Path,
    chain_der: &[Vec<u8>],
    key_pem: &str,
    bundle_der: &[Vec<u8>],
) -> anyhow::Result<()> {
    Ok(cred_dir::write(dir, chain_der, key_pem, bundle_der)?)
}
