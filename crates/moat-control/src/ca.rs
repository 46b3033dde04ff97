//! The CA in the store: load the sealed state, or initialise it on first start (generated, or
//! imported from operator PEM files); then [`CaManager`] holds the live CA and swaps it when a
//! rotation step commits a new state.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

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

    fn read(&self) -> Result<ByoPem, CaStartError> {
        fn text(p: &Option<PathBuf>) -> Result<Option<String>, CaStartError> {
            p.as_ref()
                .map(|p| {
                    std::fs::read_to_string(p).map_err(|source| CaStartError::ImportFile {
                        path: p.clone(),
                        source,
                    })
                })
                .transpose()
        }
        let Some(root_cert) = text(&self.root_cert)? else {
            return Err(CaStartError::ImportWithoutRoot);
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

    /// Changes of the stored CA state (by this process or another replica on the same store).
    pub async fn changes(&self) -> moat_store::WatchStream {
        self.store.watch_retrying(KEY).await
    }

    /// Puts the stored CA in force if it is not the one in force already (another replica
    /// committed a change). Returns whether it changed.
    pub async fn reload(&self) -> Result<bool, CaChangeError> {
        let _one_at_a_time = self.steps.lock().await;
        let (state, _) = self.state().await?;
        let stored = CertificateAuthority::load(&state, &self.kek)?;
        let current = self.current();
        if current.intermediate() == stored.intermediate()
            && current.bundle().fingerprints() == stored.bundle().fingerprints()
        {
            return Ok(false);
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(stored);
        Ok(true)
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

/// Why the stored CA could not be loaded, created or replaced.
#[derive(Debug, thiserror::Error)]
pub enum CaStartError {
    /// The CA cannot issue and only an offline command can fix it; the text says which. The
    /// control plane waits in recovery mode meanwhile.
    #[error(transparent)]
    Stuck(moat_ca::Stuck),
    #[error("cannot read {path}: {source}")]
    ImportFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--import-root-cert is required when importing a CA")]
    ImportWithoutRoot,
    #[error(
        "the CA in this data directory already exists; the --import-* flags only apply on first start (remove them)"
    )]
    AlreadyExists,
    #[error(
        "this data directory belongs to trust domain {stored:?}, not {given:?}: pass --trust-domain {stored} or use another --data-dir"
    )]
    ForeignDomain { stored: String, given: String },
    #[error("this data directory holds no CA (start the control plane once to create one)")]
    NoCa,
    #[error("the stored CA state is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("{what}: {source}")]
    Ca {
        what: &'static str,
        #[source]
        source: CaError,
    },
    #[error("{0}")]
    Conflict(&'static str),
    #[error(transparent)]
    Store(#[from] moat_store::StoreError),
}

/// Labels a CA failure with what was being done.
fn doing(what: &'static str) -> impl FnOnce(CaError) -> CaStartError {
    move |source| CaStartError::Ca { what, source }
}

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
/// `rev`. Fails with [`CaStartError::Stuck`] when only an offline command can help.
async fn prepare(
    store: &Arc<dyn Store>,
    state: CaState,
    rev: u64,
    kek: &Kek,
    at: RotateAt,
) -> Result<(CaState, Start), CaStartError> {
    let mut next = None;
    if state.has_unbound_keys() {
        tracing::info!("resealing the CA keys bound to their role and certificate");
        next = Some(
            state
                .reseal_bound(kek)
                .map_err(doing("cannot reseal the CA keys"))?,
        );
    }
    let current = next.as_ref().unwrap_or(&state);
    let mut start = Start::Loaded;
    match current
        .health(moat_identity::clock::unix_now(), at)
        .map_err(doing("cannot read the CA certificates"))?
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
                    .map_err(doing("cannot rotate the intermediate"))?,
            );
            start = Start::Rotated { expired };
        }
        Health::Stuck(why) => return Err(CaStartError::Stuck(why)),
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
        return Err(CaStartError::Conflict(
            "another process changed the CA concurrently; start again",
        ));
    }
    Ok((next, start))
}

/// Reads the stored CA state for an offline command (the control plane must be stopped).
pub async fn read_state(store: &Arc<dyn Store>) -> Result<(CaState, u64), CaStartError> {
    let kv = store.get(KEY).await?.ok_or(CaStartError::NoCa)?;
    let state = serde_json::from_slice(&kv.value)?;
    Ok((state, kv.mod_revision))
}

/// Stores `next` in place of the state read at `rev`, after proving it loads (offline commands).
pub async fn write_state(
    store: &Arc<dyn Store>,
    next: &CaState,
    rev: u64,
    kek: &Kek,
) -> Result<CertificateAuthority, CaStartError> {
    let ca = CertificateAuthority::load(next, kek).map_err(doing("the new CA does not load"))?;
    let done = store
        .txn(Txn {
            compares: vec![Compare::ModRevision(KEY.to_owned(), rev)],
            success: vec![Op::Put(KEY.to_owned(), serde_json::to_vec(next)?)],
            ..Txn::default()
        })
        .await?;
    if !done.succeeded {
        return Err(CaStartError::Conflict(
            "the CA changed concurrently (is a control plane running on this store?); run the command again",
        ));
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
) -> Result<(CertificateAuthority, Start), CaStartError> {
    if let Some(kv) = store.get(KEY).await? {
        if import.any() {
            return Err(CaStartError::AlreadyExists);
        }
        let state: CaState = serde_json::from_slice(&kv.value)?;
        if state.trust_domain != trust_domain.as_str() {
            return Err(CaStartError::ForeignDomain {
                stored: state.trust_domain,
                given: trust_domain.as_str().to_owned(),
            });
        }
        let (state, start) = prepare(store, state, kv.mod_revision, kek, at).await?;
        let ca = CertificateAuthority::load(&state, kek).map_err(doing("cannot load the CA"))?;
        return Ok((ca, start));
    }
    let (ca, state) = if import.any() {
        CertificateAuthority::import(trust_domain, &import.read()?, kek)
            .map_err(doing("cannot import the CA"))?
    } else {
        CertificateAuthority::generate(trust_domain, kek).map_err(doing("cannot create the CA"))?
    };
    let done = store
        .txn(Txn {
            compares: vec![Compare::ModRevision(KEY.to_owned(), 0)],
            success: vec![Op::Put(KEY.to_owned(), serde_json::to_vec(&state)?)],
            ..Txn::default()
        })
        .await?;
    if !done.succeeded {
        return Err(CaStartError::Conflict(
            "another process initialised the CA concurrently; start again",
        ));
    }
    Ok((ca, Start::Created))
}
