//! Policies in the store: `policies/<namespace>/<name>` holds a policy's canonical YAML and
//! `meshconfig` the mesh config's. A policy's version is the store revision that last wrote it.
//! An apply is one transaction: every document is validated first and nothing of a refused set
//! is stored.
//!
//! A policy (or the mesh config) may be managed by a Kubernetes resource (`kube_policies`):
//! `owners/policies/<namespace>/<name>` (or `owners/meshconfig`) then names the resource, is
//! written in the same transaction as the policy, and `moat policy apply` and `moat policy
//! delete` refuse to touch it, saying which resource to change instead. A resource takes a
//! policy of its name over from the CLI when it appears.

use std::sync::Arc;

use moat_identity::TrustDomain;
use moat_policy::{
    AccessPolicy, Document, DocumentError, MeshConfig, PolicyVersion, access_policy_yaml,
    check_new_documents, mesh_config_yaml, parse_documents, parse_new_documents,
};
use moat_store::{Compare, Op, Store, StoreError, Txn};

/// Store prefix of policies.
pub const PREFIX: &str = "policies/";
/// Store key of the mesh config.
pub const MESH_KEY: &str = "meshconfig";
/// Store prefix of policy history: `policyhist/<ns>/<name>/<unix-ms>-<random>`, written in the
/// same transaction as the change, so its mod revision is the policy version it records.
pub const HISTORY_PREFIX: &str = "policyhist/";

/// Store prefix of owner records.
pub const OWNERS: &str = "owners/";

/// The Kubernetes resource that manages a stored policy or the mesh config.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    /// `AccessPolicy` or `MeshConfig`.
    pub kind: String,
    /// `namespace/name` of an AccessPolicy, the name of a MeshConfig.
    pub resource: String,
    pub uid: String,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the Kubernetes {} {}", self.kind, self.resource)
    }
}

/// The owner record's key for a policy key (`namespace/name`) or [`MESH_KEY`].
fn owner_key(key: &str) -> String {
    if key == MESH_KEY {
        format!("{OWNERS}{MESH_KEY}")
    } else {
        format!("{OWNERS}policies/{key}")
    }
}

/// What [`Policies::apply_owned`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owned {
    /// `namespace/name`, or [`MESH_KEY`].
    pub key: String,
    /// The policy's version (the store revision that last wrote it).
    pub version: u64,
    /// The protected service, for a policy.
    pub target: Option<moat_identity::SpiffeId>,
    /// Whether this call stored anything (false: it was stored so already).
    pub changed: bool,
}

/// One stored revision of a policy.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Revision {
    #[serde(skip)]
    pub version: u64,
    pub time_unix_ms: i64,
    pub actor: String,
    /// `applied` or `deleted`.
    pub change: String,
    /// The canonical document; empty for a deletion.
    pub document: String,
}

fn history_op(key: &str, actor: &str, change: &str, document: String) -> Op {
    use rand::Rng as _;
    let time_unix_ms = moat_identity::clock::unix_now_ms();
    let suffix: u32 = rand::rng().random();
    let rev = Revision {
        version: 0,
        time_unix_ms,
        actor: actor.to_owned(),
        change: change.to_owned(),
        document,
    };
    // Serialising plain strings and integers cannot fail.
    Op::Put(
        format!("{HISTORY_PREFIX}{key}/{time_unix_ms:015}-{suffix:08x}"),
        serde_json::to_vec(&rev).unwrap_or_default(),
    )
}

fn full_key(name: &str) -> String {
    if name.contains('/') {
        name.to_owned()
    } else {
        format!("default/{name}")
    }
}

/// Every policy and the mesh config, as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySet {
    pub policies: Vec<AccessPolicy>,
    pub mesh: MeshConfig,
}

impl PolicySet {
    /// The policies protecting `target`.
    pub fn for_target(&self, target: &moat_identity::SpiffeId) -> Vec<AccessPolicy> {
        self.policies
            .iter()
            .filter(|p| &p.target == target)
            .cloned()
            .collect()
    }
}

/// Why an apply or delete failed.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<DocumentError>),
    #[error("{0}")]
    Request(String),
    #[error("no policy {0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored policy {key} is unreadable: {detail}")]
    Corrupt { key: String, detail: String },
    #[error(
        "{what} is managed by {owner}: change or delete that resource instead (kubectl); `moat policy` cannot change what a resource declares"
    )]
    Owned { what: String, owner: Owner },
}

/// Policy operations over the store.
#[derive(Clone, Debug)]
pub struct Policies {
    store: Arc<dyn Store>,
    trust_domain: TrustDomain,
}

fn key_of(p: &AccessPolicy) -> String {
    format!("{PREFIX}{}", p.key())
}

impl Policies {
    /// Policy operations for a mesh in `trust_domain`.
    pub fn new(store: Arc<dyn Store>, trust_domain: TrustDomain) -> Self {
        Policies {
            store,
            trust_domain,
        }
    }

    /// Validates every source, then stores all documents in one transaction. Returns the stored
    /// policies with their versions and the mesh config if one was applied.
    pub async fn apply(
        &self,
        sources: &[(String, String)],
        actor: &str,
    ) -> Result<(Vec<AccessPolicy>, Option<MeshConfig>), PolicyError> {
        if sources.is_empty() {
            return Err(PolicyError::Request("no policy documents were sent".into()));
        }
        let mut docs = Vec::new();
        let mut errors = Vec::new();
        for (name, text) in sources {
            match parse_new_documents(text, name, &self.trust_domain) {
                Ok(mut d) => docs.append(&mut d),
                Err(mut e) => errors.append(&mut e),
            }
        }
        if !errors.is_empty() {
            return Err(PolicyError::Invalid(errors));
        }
        let mut ops = Vec::new();
        let mut policies = Vec::new();
        let mut mesh = None;
        for d in docs {
            match d {
                Document::AccessPolicy(p) => {
                    if policies.iter().any(|q: &AccessPolicy| q.key() == p.key()) {
                        return Err(PolicyError::Request(format!(
                            "policy {} appears twice in the set",
                            p.key()
                        )));
                    }
                    let doc = access_policy_yaml(&p);
                    ops.push(history_op(&p.key(), actor, "applied", doc.clone()));
                    ops.push(Op::Put(key_of(&p), doc.into_bytes()));
                    policies.push(p);
                }
                Document::MeshConfig(m) => {
                    if mesh.is_some() {
                        return Err(PolicyError::Request(
                            "the set holds more than one MeshConfig".into(),
                        ));
                    }
                    ops.push(Op::Put(
                        MESH_KEY.to_owned(),
                        mesh_config_yaml(&m).into_bytes(),
                    ));
                    mesh = Some(m);
                }
            }
        }
        self.check_tokens(&policies, mesh.as_ref()).await?;
        // Nothing a resource manages: checked, and held by the transaction.
        let keys: Vec<String> = policies
            .iter()
            .map(AccessPolicy::key)
            .chain(mesh.as_ref().map(|_| MESH_KEY.to_owned()))
            .collect();
        for key in &keys {
            self.refuse_owned(key).await?;
        }
        let done = self
            .store
            .txn(Txn {
                compares: keys
                    .iter()
                    .map(|k| Compare::ModRevision(owner_key(k), 0))
                    .collect(),
                success: ops,
                ..Txn::default()
            })
            .await?;
        if !done.succeeded {
            for key in &keys {
                self.refuse_owned(key).await?;
            }
            return Err(PolicyError::Request(
                "the policies changed while applying; apply again".into(),
            ));
        }
        for p in &mut policies {
            p.version = PolicyVersion(done.revision);
        }
        Ok((policies, mesh))
    }

    /// Refuses a set whose token requirements cannot hold: a new MeshConfig's issuers must have
    /// readable, usable key sets, and every policy (new, or stored and kept) may only require
    /// issuers of the MeshConfig that will be in force.
    async fn check_tokens(
        &self,
        policies: &[AccessPolicy],
        new_mesh: Option<&MeshConfig>,
    ) -> Result<(), PolicyError> {
        let stored = self.load().await?;
        let mesh = new_mesh.unwrap_or(&stored.mesh);
        if let Some(m) = new_mesh {
            let named = m
                .jwt_issuers
                .iter()
                .enumerate()
                .map(|(i, issuer)| (format!("spec.jwtIssuers[{i}]"), issuer))
                .chain(
                    m.kubernetes
                        .iter()
                        .map(|k| ("spec.kubernetes".to_owned(), &k.issuer)),
                );
            for (field, issuer) in named {
                crate::jwks::resolve(issuer).await.map_err(|e| {
                    PolicyError::Request(format!(
                        "MeshConfig {field} ({}): {e}; nothing was applied",
                        issuer.issuer
                    ))
                })?;
            }
        }
        let kept = stored
            .policies
            .iter()
            .filter(|p| !policies.iter().any(|n| n.key() == p.key()));
        moat_policy::check_issuers(policies.iter().chain(kept), mesh)
            .map_err(|e| PolicyError::Request(format!("{e}; nothing was applied")))
    }

    /// Deletes `namespace/name` (or `name` in namespace `default`), unless a resource manages it.
    pub async fn delete(&self, name: &str, actor: &str) -> Result<(), PolicyError> {
        let key = full_key(name);
        let full = format!("{PREFIX}{key}");
        if self.store.get(&full).await?.is_none() {
            return Err(PolicyError::NotFound(key));
        }
        self.refuse_owned(&key).await?;
        let done = self
            .store
            .txn(Txn {
                compares: vec![Compare::ModRevision(owner_key(&key), 0)],
                success: vec![
                    Op::Delete(full),
                    history_op(&key, actor, "deleted", String::new()),
                ],
                ..Txn::default()
            })
            .await?;
        if !done.succeeded {
            self.refuse_owned(&key).await?;
        }
        Ok(())
    }

    /// The resource that manages `key` (`namespace/name` or [`MESH_KEY`]), if one does.
    pub async fn owner(&self, key: &str) -> Result<Option<Owner>, PolicyError> {
        let Some(kv) = self.store.get(&owner_key(key)).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&kv.value)
            .map(Some)
            .map_err(|e| PolicyError::Corrupt {
                key: owner_key(key),
                detail: e.to_string(),
            })
    }

    async fn refuse_owned(&self, key: &str) -> Result<(), PolicyError> {
        match self.owner(key).await? {
            None => Ok(()),
            Some(owner) => Err(PolicyError::Owned {
                what: if key == MESH_KEY {
                    "the MeshConfig".to_owned()
                } else {
                    format!("policy {key}")
                },
                owner,
            }),
        }
    }

    /// Every key a resource manages, with its owner.
    pub async fn owned(&self) -> Result<Vec<(String, Owner)>, PolicyError> {
        let mut out = Vec::new();
        for kv in self.store.range(OWNERS, 0, false).await? {
            let rest = &kv.key[OWNERS.len()..];
            let key = rest.strip_prefix("policies/").unwrap_or(rest).to_owned();
            let owner = serde_json::from_slice(&kv.value).map_err(|e| PolicyError::Corrupt {
                key: kv.key.clone(),
                detail: e.to_string(),
            })?;
            out.push((key, owner));
        }
        Ok(out)
    }

    /// Stores the one document in `text` (named `source` in errors) on behalf of `owner`,
    /// validated as `moat policy apply` validates, unless it is stored so already (a resource
    /// stored before a check on new input existed is left in force as it is, not refused on
    /// every relist). The owner record is written with it, so the CLI leaves it alone from
    /// then on.
    pub async fn apply_owned(
        &self,
        source: &str,
        text: &str,
        owner: &Owner,
    ) -> Result<Owned, PolicyError> {
        let mut docs =
            parse_documents(text, source, &self.trust_domain).map_err(PolicyError::Invalid)?;
        let (Some(doc), true) = (docs.pop(), docs.is_empty()) else {
            return Err(PolicyError::Request(format!(
                "{source}: expected exactly one document"
            )));
        };
        let (key, store_key, canonical, target) = match &doc {
            Document::AccessPolicy(p) => (
                p.key(),
                key_of(p),
                access_policy_yaml(p),
                Some(p.target.clone()),
            ),
            Document::MeshConfig(m) => (
                MESH_KEY.to_owned(),
                MESH_KEY.to_owned(),
                mesh_config_yaml(m),
                None,
            ),
        };
        // A namespaced resource speaks for its namespace only: whoever may write AccessPolicies
        // in `dev` must not be able to open `prod/payments` to anyone (Kubernetes RBAC is
        // granted per namespace).
        if let (Document::AccessPolicy(p), "AccessPolicy") = (&doc, owner.kind.as_str())
            && (p.target.trust_domain() != &self.trust_domain
                || p.target.namespace().as_str() != p.namespace)
        {
            return Err(PolicyError::Request(format!(
                "{source}: spec.target {} is outside the resource's namespace {}: an AccessPolicy resource may only protect services in its own namespace (write spec.target: {}/<service>); nothing was applied",
                p.target, p.namespace, p.namespace
            )));
        }
        let stored = self.store.get(&store_key).await?;
        let stored_owner = self.owner(&key).await?;
        if let Some(kv) = &stored
            && kv.value == canonical.as_bytes()
            && stored_owner.as_ref() == Some(owner)
        {
            return Ok(Owned {
                key,
                version: kv.mod_revision,
                target,
                changed: false,
            });
        }
        check_new_documents(std::slice::from_ref(&doc), source).map_err(PolicyError::Invalid)?;
        match &doc {
            Document::AccessPolicy(p) => self.check_tokens(std::slice::from_ref(p), None).await?,
            Document::MeshConfig(m) => self.check_tokens(&[], Some(m)).await?,
        }
        let actor = format!("kubernetes:{} {}", owner.kind, owner.resource);
        let mut success = vec![
            Op::Put(store_key.clone(), canonical.clone().into_bytes()),
            Op::Put(
                owner_key(&key),
                serde_json::to_vec(owner).unwrap_or_default(),
            ),
        ];
        if key != MESH_KEY {
            success.push(history_op(&key, &actor, "applied", canonical));
        }
        let done = self
            .store
            .txn(Txn {
                success,
                ..Txn::default()
            })
            .await?;
        Ok(Owned {
            key,
            version: done.revision,
            target,
            changed: true,
        })
    }

    /// Removes `key` (`namespace/name` or [`MESH_KEY`]) and its owner record if `owner`
    /// manages it; returns whether it did.
    pub async fn delete_owned(&self, key: &str, owner: &Owner) -> Result<bool, PolicyError> {
        let Some(kv) = self.store.get(&owner_key(key)).await? else {
            return Ok(false);
        };
        let stored: Owner =
            serde_json::from_slice(&kv.value).map_err(|e| PolicyError::Corrupt {
                key: owner_key(key),
                detail: e.to_string(),
            })?;
        if stored.kind != owner.kind || stored.resource != owner.resource {
            return Ok(false);
        }
        let actor = format!("kubernetes:{} {}", owner.kind, owner.resource);
        let mut success = vec![Op::Delete(owner_key(key))];
        if key == MESH_KEY {
            success.push(Op::Delete(MESH_KEY.to_owned()));
        } else {
            success.push(Op::Delete(format!("{PREFIX}{key}")));
            success.push(history_op(key, &actor, "deleted", String::new()));
        }
        // Only if the owner record is still the one read.
        let done = self
            .store
            .txn(Txn {
                compares: vec![Compare::ModRevision(owner_key(key), kv.mod_revision)],
                success,
                ..Txn::default()
            })
            .await?;
        Ok(done.succeeded)
    }

    /// Every stored revision of `name`, oldest first.
    pub async fn history(&self, name: &str) -> Result<Vec<Revision>, PolicyError> {
        let key = full_key(name);
        let revs: Vec<Revision> = self
            .store
            .range(&format!("{HISTORY_PREFIX}{key}/"), 0, false)
            .await?
            .into_iter()
            .filter_map(|kv| {
                let mut r: Revision = serde_json::from_slice(&kv.value).ok()?;
                r.version = kv.mod_revision;
                Some(r)
            })
            .collect();
        if revs.is_empty() {
            return Err(PolicyError::NotFound(key));
        }
        Ok(revs)
    }

    /// Reads every policy and the mesh config.
    pub async fn load(&self) -> Result<PolicySet, PolicyError> {
        let mut set = PolicySet::default();
        for kv in self.store.range(PREFIX, 0, false).await? {
            let mut p = self.parse_one(&kv.key, &kv.value)?;
            p.version = PolicyVersion(kv.mod_revision);
            set.policies.push(p);
        }
        if let Some(kv) = self.store.get(MESH_KEY).await? {
            let text = String::from_utf8_lossy(&kv.value);
            match parse_documents(&text, MESH_KEY, &self.trust_domain)
                .map_err(PolicyError::Invalid)?
                .pop()
            {
                Some(Document::MeshConfig(m)) => set.mesh = m,
                _ => {
                    return Err(PolicyError::Corrupt {
                        key: MESH_KEY.into(),
                        detail: "not a MeshConfig".into(),
                    });
                }
            }
        }
        Ok(set)
    }

    fn parse_one(&self, key: &str, value: &[u8]) -> Result<AccessPolicy, PolicyError> {
        let text = String::from_utf8_lossy(value);
        match parse_documents(&text, key, &self.trust_domain) {
            Ok(mut docs) => match docs.pop() {
                Some(Document::AccessPolicy(p)) => Ok(p),
                _ => Err(PolicyError::Corrupt {
                    key: key.to_owned(),
                    detail: "not an AccessPolicy".into(),
                }),
            },
            Err(e) => Err(PolicyError::Corrupt {
                key: key.to_owned(),
                detail: e
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
            }),
        }
    }

    /// A stream of "something under policies/ or meshconfig changed" events.
    pub async fn changes(&self) -> (moat_store::WatchStream, moat_store::WatchStream) {
        (
            self.store.watch_retrying(PREFIX).await,
            self.store.watch_retrying(MESH_KEY).await,
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const ORDERS: &str = "apiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: { name: orders, namespace: shop }\nspec:\n  target: shop/orders\n  rules: [{ from: [shop/frontend], http: [{ methods: [GET, CONNECT] }] }]\n";

    /// A resource stored before new input was checked for CONNECT stays in force, unchanged,
    /// when the controller relists it; the same resource changed is held to the check.
    #[tokio::test]
    async fn a_resource_stored_before_the_connect_check_is_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(moat_store::EmbeddedStore::open(dir.path()).unwrap());
        let td = TrustDomain::default_domain();
        let policies = Policies::new(store.clone(), td.clone());
        let owner = Owner {
            kind: "AccessPolicy".into(),
            resource: "shop/orders".into(),
            uid: "6c1f".into(),
        };
        // What an older control plane stored for the resource: the canonical document and its
        // owner record.
        let Some(Document::AccessPolicy(p)) = parse_documents(ORDERS, "r", &td).unwrap().pop()
        else {
            panic!("not a policy");
        };
        store
            .txn(Txn {
                success: vec![
                    Op::Put(key_of(&p), access_policy_yaml(&p).into_bytes()),
                    Op::Put(owner_key(&p.key()), serde_json::to_vec(&owner).unwrap()),
                ],
                ..Txn::default()
            })
            .await
            .unwrap();
        let relisted = policies.apply_owned("r", ORDERS, &owner).await.unwrap();
        assert!(!relisted.changed);
        let edited = ORDERS.replace("GET, CONNECT", "POST, CONNECT");
        let err = policies
            .apply_owned("r", &edited, &owner)
            .await
            .expect_err("a changed resource naming CONNECT was stored");
        assert!(
            matches!(err, PolicyError::Invalid(_))
                && err.to_string().contains("CONNECT is never forwarded"),
            "{err}"
        );
        let set = policies.load().await.unwrap();
        assert_eq!(set.policies.len(), 1);
        assert_eq!(
            set.policies[0].rules, p.rules,
            "the stored policy stays in force"
        );
    }
}
