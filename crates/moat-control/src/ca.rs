//! Bringing the CA up from the store: load the sealed state, or initialise it on first start
//! (generated, or imported from operator PEM files).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use moat_ca::{ByoPem, CaState, CertificateAuthority, Kek};
use moat_identity::TrustDomain;
use moat_store::{Compare, Op, Store, Txn};

const KEY: &str = "ca/state";

/// Operator CA material to import on first start, as file paths.
#[derive(Clone, Debug, Default)]
pub struct ImportPaths {
    pub root_cert: Option<PathBuf>,
    pub root_key: Option<PathBuf>,
    pub intermediate_cert: Option<PathBuf>,
    pub intermediate_key: Option<PathBuf>,
}

impl ImportPaths {
    /// Whether any import flag was given.
    pub fn any(&self) -> bool {
        self.root_cert.is_some()
            || self.root_key.is_some()
            || self.intermediate_cert.is_some()
            || self.intermediate_key.is_some()
    }

    fn read(&self) -> anyhow::Result<ByoPem> {
        fn text(p: &Option<PathBuf>) -> anyhow::Result<Option<String>> {
            p.as_ref()
                .map(|p| {
                    std::fs::read_to_string(p)
                        .with_context(|| format!("cannot read {}", p.display()))
                })
                .transpose()
        }
        let Some(root_cert) = text(&self.root_cert)? else {
            bail!("--import-root-cert is required when importing a CA");
        };
        Ok(ByoPem {
            root_cert,
            root_key: text(&self.root_key)?,
            intermediate_cert: text(&self.intermediate_cert)?,
            intermediate_key: text(&self.intermediate_key)?,
        })
    }
}

/// Loads the CA, creating it on first start. Returns the CA and whether it was created now.
pub async fn load_or_init(
    store: &Arc<dyn Store>,
    trust_domain: &TrustDomain,
    kek: &Kek,
    import: &ImportPaths,
) -> anyhow::Result<(CertificateAuthority, bool)> {
    if let Some(kv) = store.get(KEY).await? {
        if import.any() {
            bail!(
                "the CA in this data directory already exists; the --import-* flags only apply on first start (remove them)"
            );
        }
        let state: CaState =
            serde_json::from_slice(&kv.value).context("stored CA state is corrupt")?;
        if state.trust_domain != trust_domain.as_str() {
            bail!(
                "this data directory belongs to trust domain {:?}, not {:?}: pass --trust-domain {} or use another --data-dir",
                state.trust_domain,
                trust_domain.as_str(),
                state.trust_domain
            );
        }
        let ca = CertificateAuthority::load(&state, kek).context("cannot load the CA")?;
        return Ok((ca, false));
    }
    let (ca, state) = if import.any() {
        CertificateAuthority::import(trust_domain, &import.read()?, kek)
            .context("cannot import the CA")?
    } else {
        CertificateAuthority::generate(trust_domain, kek).context("cannot create the CA")?
    };
    let done = store
        .txn(Txn {
            compares: vec![Compare::ModRevision(KEY.to_owned(), 0)],
            success: vec![Op::Put(KEY.to_owned(), serde_json::to_vec(&state)?)],
            ..Txn::default()
        })
        .await?;
    if !done.succeeded {
        bail!("another process initialised the CA concurrently; start again");
    }
    Ok((ca, true))
}
