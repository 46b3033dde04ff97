//! Where the key-encryption key comes from: a file, the environment, or (only with `--dev`) a
//! generated file created with 0600 permissions.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use moat_ca::Kek;

/// The KEK settings from flags and environment.
#[derive(Clone, Debug, Default)]
pub struct KekSource {
    pub file: Option<PathBuf>,
    /// The KEK text itself (from `MOAT_KEK`).
    pub inline: Option<String>,
    pub dev: bool,
}

/// Why there is no KEK: a usage problem, answered with exit code 2.
#[derive(Debug, thiserror::Error)]
#[error(
    "no key-encryption key: pass --kek-file FILE or set MOAT_KEK to 32 random bytes in base64 (e.g. `openssl rand -base64 32`), or use --dev for a local development key"
)]
pub struct MissingKek;

impl KekSource {
    /// Resolves the KEK. In dev mode without a file or env value, creates (or reuses)
    /// `<data-dir>/dev.kek` and warns that it sits beside the keys it protects.
    pub fn load(&self, data_dir: &Path) -> anyhow::Result<Kek> {
        if let Some(path) = &self.file {
            let text = std::fs::read_to_string(path).with_context(|| {
                format!("cannot read the key-encryption key file {}", path.display())
            })?;
            return Kek::parse(&text)
                .with_context(|| format!("key-encryption key file {}", path.display()));
        }
        if let Some(text) = &self.inline {
            return Kek::parse(text).context("MOAT_KEK");
        }
        if !self.dev {
            return Err(MissingKek.into());
        }
        let path = data_dir.join("dev.kek");
        if path.exists() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            tracing::warn!(path = %path.display(), "dev mode: using the development key-encryption key stored beside the CA keys; never do this in production");
            return Kek::parse(&text).with_context(|| format!("{}", path.display()));
        }
        let (kek, text) = Kek::generate()?;
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create {}", data_dir.display()))?;
        moat_tls::cred_dir::write_private(&path, text.as_bytes())?;
        tracing::warn!(path = %path.display(), "dev mode: created a development key-encryption key (0600) beside the CA keys; never do this in production");
        Ok(kek)
    }
}
