//! The policy controller: AccessPolicy and MeshConfig custom resources (`kubectl apply`, Argo
//! CD, Flux) become the mesh's policies, through the same validation and storage as `moat
//! policy apply` (`Policies::apply_owned`). Each resource's `status` says what happened:
//! condition `Accepted` (`True`, or `False` with reason `Invalid` and the validation error, or
//! `Conflict`), `observedGeneration`, the policy version it became, and how many of the target's
//! connected proxies applied it (`applied: "n/m"`, kept current). Deleting a resource deletes
//! its policy. After every (re-)list, policies owned by resources that no longer exist are
//! deleted, and every listed resource is applied, so a watch gap neither loses nor resurrects a
//! policy. Watches are kube-rs watchers (list, then watch from the list's resourceVersion,
//! re-list on 410 Expired, back off on errors).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, ResourceExt as _};
use serde_json::{Value, json};
use tokio_stream::StreamExt as _;

use crate::mesh_state::MeshState;
use crate::policies::{Owner, Policies, PolicyError};

/// How often the rollout (`applied: n/m`) in each AccessPolicy's status is brought up to date.
const ROLLOUT_EVERY: Duration = Duration::from_secs(5);

/// The two kinds the controller watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    AccessPolicy,
    MeshConfig,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::AccessPolicy => "AccessPolicy",
            Kind::MeshConfig => "MeshConfig",
        }
    }

    fn resource(self) -> ApiResource {
        let plural = match self {
            Kind::AccessPolicy => "accesspolicies",
            Kind::MeshConfig => "meshconfigs",
        };
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("moat.dev", "v1", self.name()),
            plural,
        )
    }

    /// `namespace/name` of an AccessPolicy, the name of a MeshConfig.
    fn resource_name(self, o: &DynamicObject) -> String {
        match self {
            Kind::AccessPolicy => format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()),
            Kind::MeshConfig => o.name_any(),
        }
    }
}

/// An accepted AccessPolicy whose rollout the status reports.
#[derive(Clone, Debug)]
struct Accepted {
    namespace: String,
    name: String,
    key: String,
    version: u64,
    target: moat_identity::SpiffeId,
    /// What the status says now.
    rollout: Option<(u32, u32)>,
}

/// The controller.
#[derive(Clone)]
pub struct Controller {
    client: Client,
    policies: Policies,
    mesh: Arc<MeshState>,
    accepted: Arc<std::sync::Mutex<BTreeMap<String, Accepted>>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").finish_non_exhaustive()
    }
}

impl Controller {
    pub fn new(client: Client, policies: Policies, mesh: Arc<MeshState>) -> Self {
        Controller {
            client,
            policies,
            mesh,
            accepted: Arc::default(),
        }
    }

    /// Runs until the process ends.
    pub async fn run(self) {
        tokio::join!(
            self.watch(Kind::MeshConfig),
            self.watch(Kind::AccessPolicy),
            self.rollouts(),
        );
    }

    fn api(&self, kind: Kind) -> Api<DynamicObject> {
        Api::all_with(self.client.clone(), &kind.resource())
    }

    async fn watch(&self, kind: Kind) {
        let stream = watcher(self.api(kind), watcher::Config::default()).default_backoff();
        tokio::pin!(stream);
        // The resources of the list in progress.
        let mut listed: Option<BTreeSet<String>> = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Init) => listed = Some(BTreeSet::new()),
                Ok(Event::InitApply(o)) => {
                    if let Some(l) = listed.as_mut() {
                        l.insert(kind.resource_name(&o));
                    }
                    self.reconcile(kind, &o).await;
                }
                Ok(Event::InitDone) => {
                    if let Some(l) = listed.take() {
                        self.forget_missing(kind, &l).await;
                    }
                }
                Ok(Event::Apply(o)) => self.reconcile(kind, &o).await,
                Ok(Event::Delete(o)) => self.removed(kind, &o).await,
                Err(e) => {
                    tracing::warn!(kind = kind.name(), error = %e, "watching Kubernetes resources failed; retrying")
                }
            }
        }
    }

    /// Deletes the policies of resources of `kind` not in `listed` (deleted during a gap).
    async fn forget_missing(&self, kind: Kind, listed: &BTreeSet<String>) {
        let owned = match self.policies.owned().await {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "cannot read which policies resources own");
                return;
            }
        };
        for (key, owner) in owned {
            if owner.kind == kind.name() && !listed.contains(&owner.resource) {
                self.delete(&key, &owner).await;
            }
        }
    }

    async fn removed(&self, kind: Kind, o: &DynamicObject) {
        let resource = kind.resource_name(o);
        let key = match kind {
            Kind::AccessPolicy => resource.clone(),
            Kind::MeshConfig => crate::policies::MESH_KEY.to_owned(),
        };
        let owner = Owner {
            kind: kind.name().to_owned(),
            resource,
            uid: o.uid().unwrap_or_default(),
        };
        self.delete(&key, &owner).await;
    }

    async fn delete(&self, key: &str, owner: &Owner) {
        match self.policies.delete_owned(key, owner).await {
            Ok(true) => {
                tracing::info!(policy = key, resource = %owner, "deleted the policy of a deleted resource");
                self.lock().remove(key);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(policy = key, error = %e, "cannot delete the policy of a deleted resource")
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Accepted>> {
        self.accepted.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores what `o` declares and writes its status.
    async fn reconcile(&self, kind: Kind, o: &DynamicObject) {
        let resource = kind.resource_name(o);
        let owner = Owner {
            kind: kind.name().to_owned(),
            resource: resource.clone(),
            uid: o.uid().unwrap_or_default(),
        };
        let generation = o.metadata.generation.unwrap_or(0);
        let source = format!("{} {resource}", kind.name());
        let outcome = self
            .policies
            .apply_owned(&source, &document(kind, o), &owner)
            .await;
        let (accepted, reason, message, version) = match &outcome {
            Ok(done) => (
                true,
                "Accepted",
                format!("stored as {}@{}", done.key, done.version),
                Some(done.version),
            ),
            Err(e @ PolicyError::Invalid(_)) => (false, "Invalid", e.to_string(), None),
            Err(e @ (PolicyError::Request(_) | PolicyError::Owned { .. })) => {
                (false, "Invalid", e.to_string(), None)
            }
            Err(e) => {
                // The store failed: nothing is known to be wrong with the resource; the next
                // event (or re-list) tries again.
                tracing::error!(resource = %owner, error = %e, "cannot store a resource's policy");
                return;
            }
        };
        match &outcome {
            Ok(done) if done.changed => {
                tracing::info!(resource = %owner, policy = %done.key, version = done.version, "applied a resource's policy")
            }
            Err(e) => tracing::warn!(resource = %owner, error = %e, "refused a resource's policy"),
            _ => {}
        }
        let mut status = json!({
            "observedGeneration": generation,
            "conditions": [condition(o, accepted, reason, &message, generation)],
        });
        if let Some(v) = version {
            status["policyVersion"] = v.into();
        }
        if let (Ok(done), Kind::AccessPolicy) = (&outcome, kind)
            && let Some(target) = &done.target
        {
            let rollout = self.rollout(target, &done.key, done.version);
            status["applied"] = format!("{}/{}", rollout.0, rollout.1).into();
            self.lock().insert(
                done.key.clone(),
                Accepted {
                    namespace: o.namespace().unwrap_or_default(),
                    name: o.name_any(),
                    key: done.key.clone(),
                    version: done.version,
                    target: target.clone(),
                    rollout: Some(rollout),
                },
            );
        }
        // Only when it says something new: a status write is itself a change the watch sees.
        if !same_status(o.data.get("status"), &status) {
            self.write_status(kind, o.namespace().as_deref(), &o.name_any(), status)
                .await;
        }
    }

    /// (proxies that applied `version` of `key`, connected proxies of `target`).
    fn rollout(&self, target: &moat_identity::SpiffeId, key: &str, version: u64) -> (u32, u32) {
        let (proxies, applied) = self.mesh.registry().rollout(target, key, version);
        (applied, proxies)
    }

    async fn write_status(&self, kind: Kind, namespace: Option<&str>, name: &str, status: Value) {
        let api: Api<DynamicObject> = match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &kind.resource()),
            None => Api::all_with(self.client.clone(), &kind.resource()),
        };
        let patch = Patch::Merge(json!({ "status": status }));
        if let Err(e) = api
            .patch_status(name, &PatchParams::default(), &patch)
            .await
        {
            tracing::warn!(kind = kind.name(), name, error = %e, "cannot write a resource's status");
        }
    }

    /// Keeps `applied: n/m` current as proxies acknowledge.
    async fn rollouts(&self) {
        loop {
            tokio::time::sleep(ROLLOUT_EVERY).await;
            let accepted: Vec<Accepted> = self.lock().values().cloned().collect();
            for a in accepted {
                let now = self.rollout(&a.target, &a.key, a.version);
                if a.rollout == Some(now) {
                    continue;
                }
                let status = json!({ "applied": format!("{}/{}", now.0, now.1) });
                self.write_status(Kind::AccessPolicy, Some(&a.namespace), &a.name, status)
                    .await;
                if let Some(entry) = self.lock().get_mut(&a.key)
                    && entry.version == a.version
                {
                    entry.rollout = Some(now);
                }
            }
        }
    }
}

/// The policy document a resource declares, as `moat policy apply` would read it (JSON is
/// YAML): its kind, name, namespace and spec; nothing of its status or other metadata.
fn document(kind: Kind, o: &DynamicObject) -> String {
    let mut metadata = json!({ "name": o.name_any() });
    if let Some(ns) = o.namespace() {
        metadata["namespace"] = ns.into();
    }
    let doc = json!({
        "apiVersion": "moat.dev/v1",
        "kind": kind.name(),
        "metadata": metadata,
        "spec": o.data.get("spec").cloned().unwrap_or(Value::Null),
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// The `Accepted` condition, keeping the last transition time when the status did not change.
fn condition(
    o: &DynamicObject,
    accepted: bool,
    reason: &str,
    message: &str,
    generation: i64,
) -> Value {
    let status = if accepted { "True" } else { "False" };
    let previous = o
        .data
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|c| c.iter().find(|c| c["type"] == "Accepted"));
    let since = match previous {
        Some(p) if p["status"] == status => p["lastTransitionTime"].clone(),
        _ => humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            .to_string()
            .into(),
    };
    json!({
        "type": "Accepted",
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    })
}

/// Whether the stored status already says everything `new` says.
fn same_status(old: Option<&Value>, new: &Value) -> bool {
    let Some(old) = old else {
        return false;
    };
    new.as_object()
        .is_some_and(|fields| fields.iter().all(|(k, v)| old.get(k) == Some(v)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn object(status: Value) -> DynamicObject {
        let mut o = DynamicObject::new("orders", &Kind::AccessPolicy.resource()).within("shop");
        o.data = json!({ "spec": { "target": "orders", "rules": [] }, "status": status });
        o
    }

    #[test]
    fn the_document_is_the_resource_s_kind_name_namespace_and_spec_only() {
        let o = object(json!({ "applied": "1/1" }));
        let doc: Value = serde_json::from_str(&document(Kind::AccessPolicy, &o)).unwrap();
        assert_eq!(
            doc,
            json!({ "apiVersion": "moat.dev/v1", "kind": "AccessPolicy",
                    "metadata": { "name": "orders", "namespace": "shop" },
                    "spec": { "target": "orders", "rules": [] } })
        );
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_flips() {
        let o = object(
            json!({ "conditions": [{ "type": "Accepted", "status": "True",
            "lastTransitionTime": "2026-01-01T00:00:00Z" }] }),
        );
        let same = condition(&o, true, "Accepted", "m", 2);
        assert_eq!(same["lastTransitionTime"], "2026-01-01T00:00:00Z");
        let flipped = condition(&o, false, "Invalid", "m", 2);
        assert_ne!(flipped["lastTransitionTime"], "2026-01-01T00:00:00Z");
    }

    #[test]
    fn a_status_is_written_only_when_it_says_something_new() {
        let old = json!({ "observedGeneration": 2, "applied": "1/1", "conditions": [] });
        assert!(same_status(
            Some(&old),
            &json!({ "observedGeneration": 2, "conditions": [] })
        ));
        assert!(!same_status(
            Some(&old),
            &json!({ "observedGeneration": 3 })
        ));
        assert!(!same_status(None, &json!({})));
    }
}
