//! On Kubernetes: keeps the mesh's trust bundle where the cluster needs it.
//!
//! - A ConfigMap (`moat-ca-root`, key `bundle.pem`) in every namespace, which injected sidecars
//!   mount to verify the control plane at bootstrap. Namespaces are watched, so a new one gets
//!   its ConfigMap at once.
//! - With `--webhook-configuration NAME`, the `caBundle` of the sidecar injector's
//!   MutatingWebhookConfiguration: the API server verifies the webhook's certificate (issued by
//!   the mesh CA) with it, so a fresh `moat install | kubectl apply` needs no second apply.
//!
//! The bundle is compared every interval (a root rotation changes it); an object is written
//! only when its content differs, and every object is re-read every ten intervals, so an edit
//! by hand is undone. On kube-rs, with the pod's service-account token.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, ResourceExt as _};
use tokio_stream::StreamExt as _;

use crate::ca::CaManager;
use crate::kube_api::ApiServer;
pub use crate::kube_api::KubeError;

/// What to publish where.
#[derive(Clone, Debug)]
pub struct KubeConfig {
    pub server: ApiServer,
    /// The ConfigMap's name in each namespace.
    pub configmap: String,
    /// The MutatingWebhookConfiguration whose `caBundle` to keep current, if any.
    pub webhook: Option<String>,
    pub interval: Duration,
}

/// How many intervals pass between full re-reads of what was published.
const REREAD_EVERY: u32 = 10;

struct Publisher {
    client: Client,
    cfg: KubeConfig,
    ca: Arc<CaManager>,
    /// Namespace -> the bundle its ConfigMap was last seen or written with.
    published: BTreeMap<String, String>,
    /// The bundle the webhook configuration was last seen or written with.
    webhook: Option<String>,
}

/// Publishes the bundle until the process ends.
pub async fn publish_loop(cfg: KubeConfig, ca: Arc<CaManager>) {
    let client = match cfg.server.client() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot publish the trust bundle to Kubernetes");
            return;
        }
    };
    let mut p = Publisher {
        client: client.clone(),
        cfg,
        ca,
        published: BTreeMap::new(),
        webhook: None,
    };
    let namespaces =
        watcher(Api::<Namespace>::all(client), watcher::Config::default()).default_backoff();
    tokio::pin!(namespaces);
    let mut known = BTreeSet::new();
    let mut listing: Option<BTreeSet<String>> = None;
    let mut tick = tokio::time::interval(p.cfg.interval);
    let mut ticks = 0u32;
    loop {
        tokio::select! {
            event = namespaces.next() => match event {
                Some(Ok(Event::Init)) => listing = Some(BTreeSet::new()),
                Some(Ok(Event::InitApply(ns))) => {
                    let name = ns.name_any();
                    if let Some(l) = listing.as_mut() {
                        l.insert(name.clone());
                    }
                    known.insert(name.clone());
                    p.namespace(&name).await;
                }
                Some(Ok(Event::InitDone)) => {
                    if let Some(l) = listing.take() {
                        known = l;
                        p.published.retain(|ns, _| known.contains(ns));
                    }
                }
                Some(Ok(Event::Apply(ns))) => {
                    let name = ns.name_any();
                    if known.insert(name.clone()) {
                        p.namespace(&name).await;
                    }
                }
                Some(Ok(Event::Delete(ns))) => {
                    known.remove(&ns.name_any());
                    p.published.remove(&ns.name_any());
                }
                Some(Err(e)) => tracing::warn!(error = %e, "watching namespaces failed; retrying"),
                None => return,
            },
            _ = tick.tick() => {
                ticks += 1;
                if ticks.is_multiple_of(REREAD_EVERY) {
                    p.published.clear();
                    p.webhook = None;
                }
                let mut written = 0;
                for ns in &known {
                    written += usize::from(p.namespace(ns).await);
                }
                if written > 0 {
                    tracing::info!(configmaps = written, "published the trust bundle");
                }
                p.webhook().await;
            }
        }
    }
}

impl Publisher {
    fn pem(&self) -> String {
        self.ca.current().bundle().to_pem()
    }

    /// Brings `ns`'s ConfigMap to the current bundle; whether it wrote it.
    async fn namespace(&mut self, ns: &str) -> bool {
        let pem = self.pem();
        if self.published.get(ns) == Some(&pem) {
            return false;
        }
        match self.configmap(ns, &pem).await {
            Ok(wrote) => {
                self.published.insert(ns.to_owned(), pem);
                wrote
            }
            Err(e) => {
                tracing::warn!(namespace = ns, error = %e, "cannot write the trust-bundle ConfigMap; retrying");
                false
            }
        }
    }

    async fn configmap(&self, ns: &str, pem: &str) -> Result<bool, kube::Error> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let name = &self.cfg.configmap;
        let data = BTreeMap::from([("bundle.pem".to_owned(), pem.to_owned())]);
        match api.get_opt(name).await? {
            Some(cm) if cm.data.as_ref() == Some(&data) => Ok(false),
            Some(mut cm) => {
                cm.data = Some(data);
                api.replace(name, &PostParams::default(), &cm).await?;
                Ok(true)
            }
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(ns.to_owned()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/managed-by".to_owned(),
                            "moat-control".to_owned(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    data: Some(data),
                    ..ConfigMap::default()
                };
                api.create(&PostParams::default(), &cm).await?;
                Ok(true)
            }
        }
    }

    /// Brings the webhook configuration's `caBundle` to the current bundle.
    async fn webhook(&mut self) {
        let Some(name) = self.cfg.webhook.clone() else {
            return;
        };
        let pem = self.pem();
        if self.webhook.as_ref() == Some(&pem) {
            return;
        }
        let api: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let result = async {
            let Some(mut w) = api.get_opt(&name).await? else {
                return Ok::<_, kube::Error>(None);
            };
            let want = ByteString(pem.clone().into_bytes());
            let hooks = w.webhooks.iter_mut().flatten();
            let mut changed = false;
            for hook in hooks {
                if hook.client_config.ca_bundle.as_ref() != Some(&want) {
                    hook.client_config.ca_bundle = Some(want.clone());
                    changed = true;
                }
            }
            if changed {
                // Carries the resourceVersion read: a concurrent change makes this a conflict,
                // retried at the next interval.
                api.replace(&name, &PostParams::default(), &w).await?;
            }
            Ok(Some(changed))
        }
        .await;
        match result {
            Ok(Some(changed)) => {
                if changed {
                    tracing::info!(webhook = %name, "set the injector webhook's caBundle to the mesh roots");
                }
                self.webhook = Some(pem);
            }
            Ok(None) => {
                tracing::warn!(webhook = %name, "no MutatingWebhookConfiguration of this name yet (moat install creates it)")
            }
            Err(e) => {
                tracing::warn!(webhook = %name, error = %e, "cannot set the injector webhook's caBundle; retrying")
            }
        }
    }
}
