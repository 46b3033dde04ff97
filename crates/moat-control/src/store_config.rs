//! Which store the control plane keeps its state in: the embedded redb file under the data
//! directory (the default, one process), or an etcd cluster shared by several replicas
//! (`--store etcd://HOST:PORT,...`, when built with the `etcd` feature).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use moat_store::{EmbeddedStore, Store, StoreError};

/// The `--store` choice, checked.
#[derive(Clone, Debug)]
pub enum StoreConfig {
    /// `moat.redb` in the data directory.
    Embedded,
    /// An etcd cluster.
    #[cfg(feature = "etcd")]
    Etcd(moat_store::EtcdConfig),
}

/// TLS files for etcd (`--etcd-ca`, `--etcd-cert`, `--etcd-key`).
#[derive(Clone, Debug, Default)]
pub struct EtcdTlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl StoreConfig {
    /// Parses `--store` (`embedded` or `etcd://HOST:PORT[,HOST:PORT...]`) with the etcd TLS
    /// files, reading them now so that a wrong path fails at start.
    pub fn parse(store: &str, tls: &EtcdTlsFiles) -> Result<Self, String> {
        let has_tls = tls.ca.is_some() || tls.cert.is_some() || tls.key.is_some();
        if store == "embedded" {
            if has_tls {
                return Err(
                    "--etcd-ca/--etcd-cert/--etcd-key apply to --store etcd://... only".into(),
                );
            }
            return Ok(StoreConfig::Embedded);
        }
        if !store.starts_with("etcd://") {
            return Err(format!(
                "--store {store:?}: write `embedded` (the default) or etcd://HOST:PORT[,HOST:PORT...]"
            ));
        }
        Self::etcd(store, tls)
    }

    #[cfg(feature = "etcd")]
    fn etcd(store: &str, tls: &EtcdTlsFiles) -> Result<Self, String> {
        let mut cfg = moat_store::EtcdConfig::parse(store).map_err(|e| format!("--store: {e}"))?;
        let read = |flag: &str, p: &Path| {
            std::fs::read(p).map_err(|e| format!("{flag} {}: {e}", p.display()))
        };
        cfg.tls = match (&tls.ca, &tls.cert, &tls.key) {
            (None, None, None) => None,
            (Some(ca), cert, key) => {
                let identity = match (cert, key) {
                    (Some(c), Some(k)) => Some((read("--etcd-cert", c)?, read("--etcd-key", k)?)),
                    (None, None) => None,
                    _ => return Err("--etcd-cert and --etcd-key go together".into()),
                };
                Some(moat_store::EtcdTls {
                    ca: read("--etcd-ca", ca)?,
                    identity,
                })
            }
            (None, _, _) => {
                return Err(
                    "--etcd-cert/--etcd-key need --etcd-ca (the CA that signed the etcd members' certificates)"
                        .into(),
                );
            }
        };
        Ok(StoreConfig::Etcd(cfg))
    }

    #[cfg(not(feature = "etcd"))]
    fn etcd(_store: &str, _tls: &EtcdTlsFiles) -> Result<Self, String> {
        Err("--store etcd://...: this moat-control was built without the etcd backend; build it with `cargo build --release -p moat-control --features etcd` (the container image has it)".into())
    }

    /// Opens the store.
    pub async fn open(&self, data_dir: &Path) -> Result<Arc<dyn Store>, StoreError> {
        match self {
            StoreConfig::Embedded => Ok(Arc::new(EmbeddedStore::open(data_dir)?)),
            #[cfg(feature = "etcd")]
            StoreConfig::Etcd(cfg) => Ok(Arc::new(moat_store::EtcdStore::connect(cfg).await?)),
        }
    }

    /// Whether several control-plane processes share this store.
    pub fn shared(&self) -> bool {
        !matches!(self, StoreConfig::Embedded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_flags() {
        let none = EtcdTlsFiles::default();
        assert!(matches!(
            StoreConfig::parse("embedded", &none),
            Ok(StoreConfig::Embedded)
        ));
        let e = StoreConfig::parse("redb", &none).unwrap_err();
        assert!(e.contains("etcd://HOST:PORT"), "{e}");
        let tls = EtcdTlsFiles {
            ca: Some("/x".into()),
            ..EtcdTlsFiles::default()
        };
        let e = StoreConfig::parse("embedded", &tls).unwrap_err();
        assert!(e.contains("etcd://... only"), "{e}");
        #[cfg(feature = "etcd")]
        {
            assert!(StoreConfig::parse("etcd://a:2379,b:2379", &none).is_ok());
            let e = StoreConfig::parse("etcd://a", &none).unwrap_err();
            assert!(e.contains("HOST:PORT"), "{e}");
            let e = StoreConfig::parse("etcd://a:1", &tls).unwrap_err();
            assert!(e.contains("--etcd-ca /x"), "{e}");
            let half = EtcdTlsFiles {
                cert: Some("/c".into()),
                ..EtcdTlsFiles::default()
            };
            let e = StoreConfig::parse("etcd://a:1", &half).unwrap_err();
            assert!(e.contains("need --etcd-ca"), "{e}");
        }
        #[cfg(not(feature = "etcd"))]
        {
            let e = StoreConfig::parse("etcd://a:2379", &none).unwrap_err();
            assert!(e.contains("--features etcd"), "{e}");
        }
    }
}
