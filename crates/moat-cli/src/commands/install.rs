//! `moat install`: the Kubernetes manifests in `deploy/` (compiled in), set up for this
//! installation, on standard output for `kubectl apply -f -`.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use serde::Deserialize as _;
use serde_json::Value;

/// The manifests of `deploy/`, in apply order.
const MANIFESTS: &[(&str, &str)] = &[
    (
        "namespace.yaml",
        include_str!("../../../../deploy/namespace.yaml"),
    ),
    ("crds.yaml", include_str!("../../../../deploy/crds.yaml")),
    (
        "control-plane.yaml",
        include_str!("../../../../deploy/control-plane.yaml"),
    ),
    (
        "webhook.yaml",
        include_str!("../../../../deploy/webhook.yaml"),
    ),
];

/// The etcd cluster `--ha` bundles when no `--etcd-endpoints` are given.
const BUNDLED_ETCD: &str = include_str!("../../../../deploy/ha/etcd.yaml");

/// The bundled etcd members' client addresses.
const BUNDLED_MEMBERS: &str = "moat-etcd-0.moat-etcd.moat-system.svc:2379,moat-etcd-1.moat-etcd.moat-system.svc:2379,moat-etcd-2.moat-etcd.moat-system.svc:2379";

/// Control-plane replicas with `--ha`.
const HA_REPLICAS: u64 = 3;

#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// The mesh's trust domain (fixed when the control plane first starts).
    #[arg(long, default_value = "moat.local")]
    trust_domain: moat_identity::TrustDomain,
    /// The control-plane image.
    #[arg(long, default_value = concat!("ghcr.io/moat-mesh/moat-control:", env!("CARGO_PKG_VERSION")))]
    control_image: String,
    /// The sidecar image the webhook injects.
    #[arg(long, default_value = concat!("ghcr.io/moat-mesh/moat-proxy:", env!("CARGO_PKG_VERSION")))]
    proxy_image: String,
    /// PEM roots that sign the webhook's certificate (`moat ca bundle`); without it the webhook
    /// configuration has no caBundle until the control plane sets it at start.
    #[arg(long)]
    ca_bundle: Option<PathBuf>,
    /// What the API server does with a pod that opted into the mesh while the injection webhook
    /// cannot be reached: `Fail` (the default) does not create it, `Ignore` creates it without
    /// a sidecar, outside the mesh. Pods that did not opt in are never affected.
    #[arg(long, value_enum, default_value_t = FailurePolicy::Fail)]
    webhook_failure_policy: FailurePolicy,
    /// A highly available control plane: 3 replicas on separate nodes sharing an etcd cluster
    /// (the bundled 3-member one, or yours with --etcd-endpoints), at least 2 kept up through
    /// voluntary disruptions.
    #[arg(long)]
    ha: bool,
    /// With --ha: your etcd cluster's members (HOST:PORT, comma-separated) instead of the
    /// bundled one.
    #[arg(long, requires = "ha", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// With --ha: the Secret (ca.crt, tls.crt, tls.key) the control plane authenticates to etcd
    /// with, and that the bundled members use. etcd is always reached over TLS.
    #[arg(long, requires = "ha", default_value = "moat-etcd-tls")]
    etcd_tls_secret: String,
    /// With --ha and the bundled etcd: its image.
    #[arg(long, requires = "ha", default_value = "registry.k8s.io/etcd:3.5.15-0")]
    etcd_image: String,
}

/// The admission webhooks' `failurePolicy`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
#[value(rename_all = "PascalCase")]
enum FailurePolicy {
    Fail,
    Ignore,
}

impl FailurePolicy {
    fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::Fail => "Fail",
            FailurePolicy::Ignore => "Ignore",
        }
    }
}

/// The standard labels `moat install` owns on every object (and pod template): the version
/// this CLI installs, and itself as the manager. The manifests carry the rest.
fn set_labels(v: &mut Value) {
    let paths = ["/metadata", "/spec/template/metadata"];
    for path in paths {
        let Some(meta) = v.pointer_mut(path).and_then(Value::as_object_mut) else {
            continue;
        };
        let labels = meta
            .entry("labels")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(labels) = labels.as_object_mut()
            && labels.contains_key("app.kubernetes.io/part-of")
        {
            labels.insert(
                "app.kubernetes.io/version".into(),
                env!("CARGO_PKG_VERSION").into(),
            );
            labels.insert("app.kubernetes.io/managed-by".into(), "moat-install".into());
        }
    }
}

fn container_mut(deploy: &mut Value) -> Option<&mut Value> {
    deploy.pointer_mut("/spec/template/spec/containers/0")
}

/// `--ha`: the control plane's Deployment runs 3 replicas, one per node, on etcd (over TLS with
/// a client certificate from `secret`), keeping nothing on a volume of its own.
fn make_ha(deploy: &mut Value, store: &str, secret: &str) {
    deploy["spec"]["replicas"] = HA_REPLICAS.into();
    deploy["spec"]["strategy"] = serde_json::json!({
        "type": "RollingUpdate",
        "rollingUpdate": { "maxUnavailable": 1, "maxSurge": 0 }
    });
    let pod = &mut deploy["spec"]["template"]["spec"];
    pod["affinity"] = serde_json::json!({
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [{
                "topologyKey": "kubernetes.io/hostname",
                "labelSelector": { "matchLabels": { "app.kubernetes.io/name": "moat-control" } }
            }]
        }
    });
    if let Some(volumes) = pod.get_mut("volumes").and_then(Value::as_array_mut) {
        for v in volumes.iter_mut() {
            // Only the admin credential is written there now; the state is in etcd.
            if v["name"] == "data" {
                *v = serde_json::json!({ "name": "data", "emptyDir": {} });
            }
        }
        volumes.push(serde_json::json!({
            "name": "etcd-tls",
            "secret": { "secretName": secret, "defaultMode": 256 }
        }));
    }
    if let Some(c) = pod.pointer_mut("/containers/0") {
        if let Some(mounts) = c.get_mut("volumeMounts").and_then(Value::as_array_mut) {
            mounts.push(serde_json::json!({
                "name": "etcd-tls", "mountPath": "/etc/moat/etcd", "readOnly": true
            }));
        }
        if let Some(list) = c.get_mut("args").and_then(Value::as_array_mut) {
            list.extend(
                [
                    format!("--store=etcd://{store}"),
                    "--etcd-ca=/etc/moat/etcd/ca.crt".to_owned(),
                    "--etcd-cert=/etc/moat/etcd/tls.crt".to_owned(),
                    "--etcd-key=/etc/moat/etcd/tls.key".to_owned(),
                ]
                .map(Value::from),
            );
        }
    }
}

/// Checks `--etcd-endpoints`: HOST:PORT each.
fn etcd_members(endpoints: &[String]) -> anyhow::Result<String> {
    for e in endpoints {
        let ok = e.rsplit_once(':').is_some_and(|(h, p)| {
            !h.is_empty() && !h.contains('/') && p.parse::<u16>().is_ok_and(|p| p != 0)
        });
        if !ok {
            bail!("--etcd-endpoints: {e:?} is not HOST:PORT (for example etcd-0.etcd.db.svc:2379)");
        }
    }
    Ok(endpoints.join(","))
}

pub fn run(args: InstallArgs) -> anyhow::Result<()> {
    let store = if args.etcd_endpoints.is_empty() {
        BUNDLED_MEMBERS.to_owned()
    } else {
        etcd_members(&args.etcd_endpoints)?
    };
    let bundled = args.ha && args.etcd_endpoints.is_empty();
    let ca_bundle = match &args.ca_bundle {
        None => None,
        Some(p) => {
            let pem = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
            moat_identity::TrustBundle::from_pem(&pem)
                .with_context(|| format!("{} is not a PEM certificate bundle", p.display()))?;
            Some(base64::engine::general_purpose::STANDARD.encode(&pem))
        }
    };
    let mut out = vec![format!(
        "# moat {} for trust domain {} (`moat install`); apply with kubectl apply -f -\n",
        env!("CARGO_PKG_VERSION"),
        args.trust_domain
    )];
    let extra = bundled.then_some(("ha/etcd.yaml", BUNDLED_ETCD));
    for (file, text) in MANIFESTS.iter().copied().chain(extra) {
        for doc in serde_yaml_ng::Deserializer::from_str(text) {
            let mut v = Value::deserialize(doc)
                .with_context(|| format!("built-in manifest {file} is not valid YAML"))?;
            if v.is_null() {
                continue;
            }
            let kind = v
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            set_labels(&mut v);
            match kind.as_str() {
                // With --ha the state is in etcd: no volume of its own.
                "PersistentVolumeClaim" if args.ha => continue,
                "PodDisruptionBudget" if args.ha && v["metadata"]["name"] == "moat-control" => {
                    v["spec"] = serde_json::json!({
                        "minAvailable": 2,
                        "selector": { "matchLabels": { "app.kubernetes.io/name": "moat-control" } }
                    });
                }
                "StatefulSet" => {
                    if let Some(c) = container_mut(&mut v) {
                        c["image"] = args.etcd_image.clone().into();
                    }
                    if let Some(vols) = v
                        .pointer_mut("/spec/template/spec/volumes")
                        .and_then(Value::as_array_mut)
                    {
                        for vol in vols.iter_mut().filter(|vol| vol["name"] == "tls") {
                            vol["secret"]["secretName"] = args.etcd_tls_secret.clone().into();
                        }
                    }
                }
                "Deployment" => {
                    if args.ha {
                        make_ha(&mut v, &store, &args.etcd_tls_secret);
                    }
                    let td = args.trust_domain.to_string();
                    if let Some(c) = container_mut(&mut v) {
                        c["image"] = args.control_image.clone().into();
                        if let Some(list) = c.get_mut("args").and_then(Value::as_array_mut) {
                            for a in list.iter_mut() {
                                if a.as_str().is_some_and(|s| s.starts_with("--trust-domain=")) {
                                    *a = format!("--trust-domain={td}").into();
                                }
                            }
                            list.push(format!("--inject-image={}", args.proxy_image).into());
                        }
                    }
                }
                "MutatingWebhookConfiguration" => {
                    let hooks = v.get_mut("webhooks").and_then(Value::as_array_mut);
                    for hook in hooks.into_iter().flatten() {
                        hook["failurePolicy"] = args.webhook_failure_policy.as_str().into();
                        if let Some(b) = &ca_bundle {
                            hook["clientConfig"]["caBundle"] = b.clone().into();
                        }
                    }
                }
                _ => {}
            }
            out.push(serde_yaml_ng::to_string(&v)?);
        }
    }
    print!("{}", out.join("---\n"));
    if args.ha {
        eprintln!(
            "note: --ha needs the Secret {} (ca.crt, tls.crt, tls.key) in moat-system before the pods can start{}, and at least 3 nodes (one replica per node); see docs/control-plane.md",
            args.etcd_tls_secret,
            if bundled {
                "; the bundled etcd members use it too"
            } else {
                ""
            }
        );
    }
    if ca_bundle.is_none() {
        eprintln!(
            "note: the webhook has no caBundle yet; the control plane sets it to the mesh roots when it starts (--webhook-configuration), so pods that opt in are admitted from then on"
        );
    }
    Ok(())
}
