//! Credential directories: `cert.pem` (chain, leaf first), `key.pem` (PKCS#8, 0600) and
//! `bundle.pem` (trust bundle). The control plane writes one for the admin into
//! `<data-dir>/admin`; `moat cert issue|request|renew` write the same layout.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use moat_identity::TrustBundle;
use moat_identity::bundle::der_to_pem;
use moat_tls::Credential;

/// A loaded credential directory.
#[derive(Debug)]
pub struct CredDir {
    pub credential: Credential,
    pub bundle: TrustBundle,
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Reads a trust bundle file.
pub fn read_bundle(path: &Path) -> anyhow::Result<TrustBundle> {
    TrustBundle::from_pem(&read(path)?)
        .with_context(|| format!("{} is not a usable trust bundle", path.display()))
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
        let bundle = read_bundle(&dir.join("bundle.pem"))?;
        let credential = Credential::from_pem(
            &read(&dir.join("cert.pem"))?,
            &read(&dir.join("key.pem"))?,
            &bundle,
        )
        .with_context(|| {
            format!(
                "the credential in {} is not usable (expired? renew it)",
                dir.display()
            )
        })?;
        Ok(CredDir { credential, bundle })
    }
}

/// Writes a credential directory (all files 0600, each replaced atomically).
pub fn write(
    dir: &Path,
    chain_der: &[Vec<u8>],
    key_pem: &str,
    bundle_der: &[Vec<u8>],
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let chain: String = chain_der
        .iter()
        .map(|c| der_to_pem("CERTIFICATE", c))
        .collect();
    let bundle: String = bundle_der
        .iter()
        .map(|c| der_to_pem("CERTIFICATE", c))
        .collect();
    write_private(&dir.join("key.pem"), key_pem.as_bytes())?;
    write_private(&dir.join("cert.pem"), chain.as_bytes())?;
    write_private(&dir.join("bundle.pem"), bundle.as_bytes())?;
    Ok(dir.to_path_buf())
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}
