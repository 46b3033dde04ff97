//! Credential directories on disk: `cert.pem` (chain, leaf first), `key.pem` (PKCS#8) and
//! `bundle.pem` (trust bundle), each written 0600 and replaced atomically. The control plane
//! writes the admin credential in this layout; `moat cert issue|request|renew` write it too.

use std::path::{Path, PathBuf};

use moat_identity::TrustBundle;
use moat_identity::bundle::der_to_pem;

use crate::{Credential, CredentialError};

/// Why a credential directory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CredDirError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a usable trust bundle: {source}")]
    Bundle {
        path: PathBuf,
        #[source]
        source: moat_identity::BundleError,
    },
    #[error("the credential in {dir} is not usable (expired? renew it): {source}")]
    Credential {
        dir: PathBuf,
        #[source]
        source: CredentialError,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CredDirError + '_ {
    move |source| CredDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a PEM trust bundle file.
pub fn read_bundle(path: &Path) -> Result<TrustBundle, CredDirError> {
    let pem = std::fs::read(path).map_err(io(path))?;
    TrustBundle::from_pem(&pem).map_err(|source| CredDirError::Bundle {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads `dir` and validates its credential against its bundle, now.
pub fn load(dir: &Path) -> Result<(Credential, TrustBundle), CredDirError> {
    let bundle = read_bundle(&dir.join("bundle.pem"))?;
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let chain = std::fs::read(&cert).map_err(io(&cert))?;
    let key = std::fs::read(&key).map_err(io(&key))?;
    let credential =
        Credential::from_pem(&chain, &key, &bundle).map_err(|source| CredDirError::Credential {
            dir: dir.to_path_buf(),
            source,
        })?;
    Ok((credential, bundle))
}

/// Writes `dir` (created 0700 if missing) from DER chain and bundle and a PEM key.
pub fn write(
    dir: &Path,
    chain_der: &[impl AsRef<[u8]>],
    key_pem: &str,
    bundle_der: &[impl AsRef<[u8]>],
) -> Result<(), CredDirError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    write_private(&dir.join("key.pem"), key_pem.as_bytes())?;
    write_private(&dir.join("cert.pem"), pem(chain_der).as_bytes())?;
    write_private(&dir.join("bundle.pem"), pem(bundle_der).as_bytes())
}

fn pem(ders: &[impl AsRef<[u8]>]) -> String {
    ders.iter()
        .map(|c| der_to_pem("CERTIFICATE", c.as_ref()))
        .collect()
}

/// Writes a file readable only by its owner (0600), atomically (temp file, fsync, rename).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CredDirError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}
