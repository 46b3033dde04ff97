//! Where the key-encryption key comes from: a file, the environment, or (only with `--dev`) a
//! generated file created with 0600 permissions.

use std::path::{Path, PathBuf};

use moat_ca::{Kek, KekError};

/// The KEK settings from flags and environment.
#[derive(Clone, Debug, Default)]
pub struct KekSource {
    pub file: Option<PathBuf>,
    /// The KEK text itself (from `MOAT_KEK`).
    pub inline: Option<String>,
    pub dev: bool,
}

/// Why the KEK could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KekLoadError {
    /// No source was given: a usage problem, answered with exit code 2.
    #[error(
        "no key-encryption key: pass --kek-file FILE or set MOAT_KEK to 32 random bytes in base64 (e.g. `openssl rand -base64 32`), or use --dev for a local development key"
    )]
    Missing,
    #[error("cannot {doing} {path}: {source}")]
    Io {
        doing: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the key-encryption key file {path} has mode {mode:04o}: others can read or change the key that unlocks the CA. Run `chmod 600 {path}` (and keep it owned by the user running moat-control)"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{source_name}: {source}")]
    Parse {
        /// The file or variable the text came from.
        source_name: String,
        #[source]
        source: KekError,
    },
    #[error("cannot create a development key-encryption key: {0}")]
    Generate(#[source] KekError),
    #[error("cannot write the development key-encryption key: {0}")]
    Write(#[from] moat_tls::cred_dir::CredDirError),
}

fn io(doing: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> KekLoadError {
    let path = path.to_owned();
    move |source| KekLoadError::Io {
        doing,
        path,
        source,
    }
}

fn parse(text: &str, source_name: impl std::fmt::Display) -> Result<Kek, KekLoadError> {
    Kek::parse(text).map_err(|source| KekLoadError::Parse {
        source_name: source_name.to_string(),
        source,
    })
}

impl KekSource {
    /// Resolves the KEK. In dev mode without a file or env value, creates (or reuses)
    /// `<data-dir>/dev.kek` and warns that it sits beside the keys it protects.
    pub fn load(&self, data_dir: &Path) -> Result<Kek, KekLoadError> {
        if let Some(path) = &self.file {
            private_enough(path)?;
            let text = std::fs::read_to_string(path)
                .map_err(io("read the key-encryption key file", path))?;
            return parse(
                &text,
                format_args!("key-encryption key file {}", path.display()),
            );
        }
        if let Some(text) = &self.inline {
            return parse(text, "MOAT_KEK");
        }
        if !self.dev {
            return Err(KekLoadError::Missing);
        }
        let path = data_dir.join("dev.kek");
        if path.exists() {
            private_enough(&path)?;
            let text = std::fs::read_to_string(&path).map_err(io("read", &path))?;
            tracing::warn!(path = %path.display(), "dev mode: using the development key-encryption key stored beside the CA keys; never do this in production");
            return parse(&text, path.display());
        }
        let (kek, text) = Kek::generate().map_err(KekLoadError::Generate)?;
        std::fs::create_dir_all(data_dir).map_err(io("create", data_dir))?;
        moat_tls::cred_dir::write_private(&path, text.as_bytes())?;
        tracing::warn!(path = %path.display(), "dev mode: created a development key-encryption key (0600) beside the CA keys; never do this in production");
        Ok(kek)
    }
}

/// A KEK file that others may read is refused, with the command that fixes it. Group read is
/// tolerated only when the group is this process's own (Kubernetes sets a secret's group to the
/// pod's `fsGroup` and adds group read; with `runAsGroup` equal to it nobody else is in it).
fn private_enough(path: &Path) -> Result<(), KekLoadError> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).map_err(io("read the key-encryption key file", path))?;
    let mode = meta.mode() & 0o777;
    let own_group = meta.gid() == nix::unistd::getegid().as_raw();
    let too_open = mode & 0o007 != 0 || mode & 0o020 != 0 || (mode & 0o040 != 0 && !own_group);
    if too_open {
        return Err(KekLoadError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn kek_files_others_can_read_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        std::fs::write(&path, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
        let source = KekSource {
            file: Some(path.clone()),
            ..KekSource::default()
        };
        for bad in [0o644, 0o604, 0o666, 0o620] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(bad)).unwrap();
            let e = source.load(dir.path()).unwrap_err().to_string();
            assert!(
                e.contains(&format!("mode {bad:04o}")) && e.contains("chmod 600"),
                "{e}"
            );
        }
        for good in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(good)).unwrap();
            source.load(dir.path()).unwrap();
        }
        // The file's group is ours (created by this process): group read is what a Kubernetes
        // fsGroup mount looks like, and is accepted.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o440)).unwrap();
        source.load(dir.path()).unwrap();
    }
}
