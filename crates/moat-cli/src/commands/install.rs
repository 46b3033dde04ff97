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
    /// A highly available control plane (several replicas).
    #[arg(long)]
    ha: bool,
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

pub fn run(args: InstallArgs) -> anyhow::Result<()> {
    if args.ha {
        bail!(
            "--ha is not available yet: the control plane's embedded store has a single writer; several replicas need the etcd store backend, which is not built. Install without --ha (proxies ride out control-plane restarts on their certificates)"
        );
    }
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
    for (file, text) in MANIFESTS {
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
                "Deployment" => {
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
    if ca_bundle.is_none() {
        eprintln!(
            "note: the webhook has no caBundle yet; the control plane sets it to the mesh roots when it starts (--webhook-configuration), so pods that opt in are admitted from then on"
        );
    }
    Ok(())
}
