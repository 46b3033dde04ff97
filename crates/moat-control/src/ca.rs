//! The CA in the store: load the sealed state, or initialise it on first start (generated, or
//! imported from operator PEM files); then [`CaManager`] holds the live CA and swaps it when a
//! rotation step commits a new state.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use anyhow::{Context as _, bail};
use moat_ca::{ByoPem, CaError, CaState, CertificateAuthority, Health, Kek, RotateAt};
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

/// The live CA and its persisted state. Readers take a cheap snapshot with [`CaManager::current`];
/// a rotation step computes the next [`CaState`] and [`CaManager::commit`]s it: stored first
/// (compare-and-swap on the revision it was derived from), then swapped in.
#[derive(Debug)]
pub struct CaManager {
    current: RwLock<Arc<CertificateAuthority>>,
    /// Kept to seal new CA keys and to unseal the root's when a rotation needs it.
    kek: Kek,
    store: Arc<dyn Store>,
    /// Serialises rotation steps within this process.
    steps: tokio::sync::Mutex<()>,
}

/// Why a CA change could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CaChangeError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("the CA state changed concurrently; run the command again")]
    Conflict,
    #[error("the CA state in the store is unreadable: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Store(#[from] moat_store::StoreError),
}

impl CaManager {
    pub fn new(ca: CertificateAuthority, kek: Kek, store: Arc<dyn Store>) -> Self {
        CaManager {
            current: RwLock::new(Arc::new(ca)),
            kek,
            store,
            steps: tokio::sync::Mutex::new(()),
        }
    }

    /// The CA as of now.
    pub fn current(&self) -> Arc<CertificateAuthority> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The stored state and the revision it was read at.
    pub async fn state(&self) -> Result<(CaState, u64), CaChangeError> {
        let kv = self
            .store
            .get(KEY)
            .await?
            .ok_or_else(|| CaChangeError::Corrupt("no CA state".into()))?;
        let state =
            serde_json::from_slice(&kv.value).map_err(|e| CaChangeError::Corrupt(e.to_string()))?;
        Ok((state, kv.mod_revision))
    }

    /// Runs one change: `step` derives the next state from the stored one (or returns `None`
    /// for no change); the result is loaded (which self-checks it), stored atomically, and
    /// swapped in. Returns the state now in force and whether it changed.
    pub async fn change(
        &self,
        step: impl FnOnce(&CaState, &Kek) -> Result<Option<CaState>, CaError>,
    ) -> Result<(CaState, bool), CaChangeError> {
        let _one_at_a_time = self.steps.lock().await;
        let (state, rev) = self.state().await?;
        let Some(next) = step(&state, &self.kek)? else {
            return Ok((state, false));
        };
        let ca = CertificateAuthority::load(&next, &self.kek)?;
        let value = serde_json::to_vec(&next).map_err(|e| CaChangeError::Corrupt(e.to_string()))?;
        let done = self
            .store
            .txn(Txn {
                compares: vec![Compare::ModRevision(KEY.to_owned(), rev)],
                success: vec![Op::Put(KEY.to_owned(), value)],
                ..Txn::default()
            })
            .await?;
        if !done.succeeded {
            return Err(CaChangeError::Conflict);
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ca);
        Ok((next, true))
    }
}

/// The CA cannot issue and only an offline command can fix it; the text says which. The control
/// plane waits in recovery mode meanwhile.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct CaStuck(pub moat_ca::Stuck);

/// How the CA came up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Created now, on an empty store.
    Created,
    /// Loaded as stored.
    Loaded,
    /// Loaded, and the intermediate was replaced before serving because it had passed its
    /// rotation point (`expired`: or its end) while the control plane was down.
    Rotated { expired: bool },
}

/// Brings a stored CA to a state that can issue before anything is served: keys sealed the old
/// way are resealed bound to their certificates, and an intermediate past its rotation point
/// (or expired while the control plane was down) is replaced. Stored with compare-and-swap on
/// `rev`. Fails with [`CaStuck`] when only an offline command can help.
async fn prepare(
    store: &Arc<dyn Store>,
    state: CaState,
    rev: u64,
    kek: &Kek,
    at: RotateAt,
) -> anyhow::Result<(CaState, Start)> {
    let mut next = None;
    if state.has_unbound_keys() {
        tracing::info!("resealing the CA keys bound to their role and certificate");
        next = Some(
            state
                .reseal_bound(kek)
                .context("cannot reseal the CA keys")?,
        );
    }
    let current = next.as_ref().unwrap_or(&state);
    let mut start = Start::Loaded;
    match current
        .health(moat_identity::clock::unix_now(), at)
        .context("cannot read the CA certificates")?
    {
        Health::Issuing { .. } => {}
        Health::RotateIntermediate { expired, not_after } => {
            tracing::warn!(
                not_after,
                expired,
                "the issuing intermediate passed its rotation point while the control plane was down: replacing it before serving"
            );
            next = Some(
                current
                    .rotate_intermediate(kek)
                    .context("cannot rotate the intermediate")?,
            );
            start = Start::Rotated { expired };
        }
        Health::Stuck(why) => return Err(CaStuck(why).into()),
    }
    let Some(next) = next else {
        return Ok((state, start));
    };
    let done = store
        .txn(Txn {
            compares: vec![Compare::ModRevision(KEY.to_owned(), rev)],
            success: vec![Op::Put(KEY.to_owned(), serde_json::to_vec(&next)?)],
            ..Txn::default()
        })
        .await?;
    if !done.succeeded {
        bail!("another process changed the CA concurrently; start again");
    }
    Ok((next, start))
}

/// Reads the stored CA state for an offline command (the control plane must be stopped).
pub async fn read_state(store: &Arc<dyn Store>) -> anyhow::Result<(CaState, u64)> {
    let kv = store
        .get(KEY)
        .await?
        .context("this data directory holds no CA (start the control plane once to create one)")?;
    let state = serde_json::from_slice(&kv.value).context("stored CA state is corrupt")?;
    Ok((state, kv.mod_revision))
}

/// Stores `next` in place of the state read at `rev`, after proving it loads (offline commands).
pub async fn write_state(
    store: &Arc<dyn Store>,
    next: &CaState,
    rev: u64,
    kek: &Kek,
) -> anyhow::Result<CertificateAuthority> {
    let ca = CertificateAuthority::load(next, kek).context("the new CA does not load")?;
    let done = store
        .txn(Txn {
            compares: vec![Compare::ModRevision(KEY.to_owned(), rev)],
            success: vec![Op::Put(KEY.to_owned(), serde_json::to_vec(next)?)],
            ..Txn::default()
        })
        .await?;
    if !done.succeeded {
        bail!(
            "the CA changed concurrently (is a control plane running on this store?); run the command again"
        );
    }
    Ok(ca)
}

/// Loads the CA, creating it on first start, and prepares it to issue (see [`prepare`]).
pub async fn load_or_init(
    store: &Arc<dyn Store>,
    trust_domain: &TrustDomain,
    kek: &Kek,
    import: &ImportPaths,
    at: RotateAt,
) -> anyhow::Result<(CertificateAuthority, Start)> {
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
        let (state, start) = prepare(store, state, kv.mod_revision, kek, at).await?;
        let ca = CertificateAuthority::load(&state, kek).context("cannot load the CA")?;
        return Ok((ca, start));
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
    Ok((ca, Start::Created))
}
