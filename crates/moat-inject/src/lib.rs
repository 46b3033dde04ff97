//! Sidecar injection, with no I/O. A Kubernetes object (as a JSON value) goes in; the same object
//! with the moat sidecar added to its pod template comes out. `moat inject` applies it to YAML
//! files and the control plane's admission webhook answers with the JSONPatch between the two,
//! so both produce the same pod.
//!
//! The injected pod gets, ahead of its own init containers: `moat-init`, which installs the
//! interception rules (`moat-proxy init`), and `moat-proxy` as a native sidecar (an init container
//! with `restartPolicy: Always`, so the app starts once the proxy is ready and Jobs complete);
//! a projected service-account token for audience `moat`; and the mesh's trust bundle from the
//! `moat-ca-root` ConfigMap. The app's HTTP and TCP probes are rewritten to go through the
//! sidecar's admin port (`probes`). Injecting twice changes nothing.
//!
//! Injection is opt-in: a namespace labelled `moat.dev/inject: enabled`, or a pod template
//! labelled (or annotated) so. `disabled` on either opts out, and `hostNetwork` pods are never
//! injected. The webhook is only called for pods its selectors matched ([`Selected::ByAdmission`]);
//! `moat inject` decides offline from the workload and the Namespace documents beside it
//! ([`Selected::Offline`]).

pub mod probes;

use serde_json::{Value, json};

/// Namespace label, pod label or pod annotation: `enabled` opts in, `disabled` opts out.
pub const INJECT: &str = "moat.dev/inject";
pub const ENABLED: &str = "enabled";
pub const DISABLED: &str = "disabled";
/// Pod annotation: ports carried as opaque TCP without protocol detection (comma-separated).
pub const OPAQUE_PORTS: &str = "moat.dev/opaque-ports";
/// Pod annotations: inbound / outbound ports not intercepted at all (comma-separated).
pub const SKIP_INBOUND: &str = "moat.dev/skip-inbound-ports";
pub const SKIP_OUTBOUND: &str = "moat.dev/skip-outbound-ports";

/// The sidecar container's name.
pub const PROXY: &str = "moat-proxy";
/// The interception-rules init container's name.
pub const INIT: &str = "moat-init";
/// Where the projected service-account token is mounted.
pub const TOKEN_PATH: &str = "/var/run/secrets/moat/token";
/// Where the trust bundle ConfigMap is mounted.
pub const BUNDLE_PATH: &str = "/var/run/moat/ca/bundle.pem";

/// The sidecar's ports: inbound mTLS, transparent outbound, admin.
pub const INBOUND_PORT: u16 = 7143;
pub const OUTBOUND_PORT: u16 = 7140;
pub const ADMIN_PORT: u16 = 7191;

/// What the injected sidecar points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectConfig {
    pub proxy_image: String,
    /// The control plane's gRPC URL as pods reach it.
    pub control_plane: String,
    pub trust_domain: String,
    /// The uid the proxy runs as; its own traffic is not intercepted.
    pub proxy_uid: i64,
}

impl Outcome {
    /// Why a workload was left without a sidecar, for people; `None` when it has one.
    pub fn skipped_because(self) -> Option<&'static str> {
        match self {
            Outcome::Injected | Outcome::AlreadyInjected => None,
            Outcome::OptedOut => Some("moat.dev/inject: disabled"),
            Outcome::NotOptedIn => Some(
                "not opted in: label its namespace, or its pod template, moat.dev/inject=enabled",
            ),
            Outcome::HostNetwork => Some(
                "hostNetwork: true (the sidecar's interception rules would rewrite the node's own networking)",
            ),
            Outcome::NotAWorkload => Some("not a workload"),
        }
    }
}

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            proxy_image: format!("ghcr.io/moat-mesh/moat-proxy:{}", env!("CARGO_PKG_VERSION")),
            control_plane: "https://moat-control.moat-system.svc:7443".into(),
            trust_domain: "moat.local".into(),
            proxy_uid: 1337,
        }
    }
}

/// What [`inject`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    AlreadyInjected,
    /// `moat.dev/inject: disabled`.
    OptedOut,
    /// Neither the workload nor its namespace opted in.
    NotOptedIn,
    /// `hostNetwork: true`: the pod shares the node's network namespace, so the interception
    /// rules would rewrite the node's own traffic. Never injected.
    HostNetwork,
    /// Not a kind that has a pod template (Service, ConfigMap, …): left untouched.
    NotAWorkload,
}

/// The JSON pointers of the pod template's metadata and spec for `kind`, if it has one.
fn template_paths(kind: &str) -> Option<(&'static str, &'static str)> {
    Some(match kind {
        "Pod" => ("/metadata", "/spec"),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            ("/spec/template/metadata", "/spec/template/spec")
        }
        "CronJob" => (
            "/spec/jobTemplate/spec/template/metadata",
            "/spec/jobTemplate/spec/template/spec",
        ),
        _ => return None,
    })
}

fn annotation<'a>(meta: Option<&'a Value>, key: &str) -> Option<&'a str> {
    meta?.get("annotations")?.get(key)?.as_str()
}

fn label<'a>(meta: Option<&'a Value>, key: &str) -> Option<&'a str> {
    meta?.get("labels")?.get(key)?.as_str()
}

/// Whether `meta` sets `moat.dev/inject` to `value`, as a label or an annotation.
fn inject_is(meta: Option<&Value>, value: &str) -> bool {
    label(meta, INJECT) == Some(value) || annotation(meta, INJECT) == Some(value)
}

/// Who has already chosen the workloads [`inject`] sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selected {
    /// The API server, for the admission webhook: it calls the webhook only for pods in a
    /// namespace labelled `moat.dev/inject: enabled` or labelled so themselves.
    ByAdmission,
    /// Nobody yet (`moat inject`): the workload must opt in itself, or its namespace must be
    /// labelled (`namespace_enabled`, from a Namespace document beside it).
    Offline { namespace_enabled: bool },
}

/// Why a workload could not be injected: which object or document, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("{object}: annotation {key}: {value:?} is not a port (1..65535)")]
    BadPort {
        object: String,
        key: &'static str,
        value: String,
    },
    #[error("{object}: {field} is missing")]
    NoPodSpec { object: String, field: String },
    #[error("{object}: {field}.containers must be a list of containers")]
    NoContainers { object: String, field: String },
    #[error("document {index}: not valid YAML: {source}")]
    Yaml {
        index: usize,
        source: serde_yaml_ng::Error,
    },
    #[error("document {index}: not a Kubernetes object (a mapping with kind and metadata)")]
    NotAnObject { index: usize },
    #[error("document {index}: {source}")]
    Document {
        index: usize,
        source: Box<InjectError>,
    },
    #[error("cannot write the injected YAML: {0}")]
    Write(serde_yaml_ng::Error),
}

/// Parses a comma-separated port list annotation of `object`.
fn ports(meta: Option<&Value>, key: &'static str, object: &str) -> Result<Vec<u16>, InjectError> {
    let Some(text) = annotation(meta, key) else {
        return Ok(Vec::new());
    };
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| InjectError::BadPort {
                    object: object.to_owned(),
                    key,
                    value: p.to_owned(),
                })
        })
        .collect()
}

fn join(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Adds the sidecar to `obj`'s pod template. Errors name the object and what is wrong with it.
pub fn inject(
    obj: &mut Value,
    cfg: &InjectConfig,
    selected: Selected,
) -> Result<Outcome, InjectError> {
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let Some((meta_path, spec_path)) = template_paths(&kind) else {
        return Ok(Outcome::NotAWorkload);
    };
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)")
        .to_owned();
    let what = format!("{kind} {name}");
    let says = |value: &str| {
        inject_is(obj.get("metadata"), value) || inject_is(obj.pointer(meta_path), value)
    };
    if says(DISABLED) {
        return Ok(Outcome::OptedOut);
    }
    let opted_in = match selected {
        Selected::ByAdmission => true,
        Selected::Offline { namespace_enabled } => namespace_enabled || says(ENABLED),
    };
    if !opted_in {
        return Ok(Outcome::NotOptedIn);
    }
    let meta = obj.pointer(meta_path).cloned();
    let opaque = ports(meta.as_ref(), OPAQUE_PORTS, &what)?;
    let skip_in = ports(meta.as_ref(), SKIP_INBOUND, &what)?;
    let skip_out = ports(meta.as_ref(), SKIP_OUTBOUND, &what)?;
    let field = spec_path[1..].replace('/', ".");
    let Some(spec) = obj.pointer_mut(spec_path).and_then(Value::as_object_mut) else {
        return Err(InjectError::NoPodSpec {
            object: what,
            field,
        });
    };
    if !spec.get("containers").is_some_and(Value::is_array) {
        return Err(InjectError::NoContainers {
            object: what,
            field,
        });
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::HostNetwork);
    }
    let has = |list: &str, n: &str| {
        spec.get(list).and_then(Value::as_array).is_some_and(|cs| {
            cs.iter()
                .any(|c| c.get("name").and_then(Value::as_str) == Some(n))
        })
    };
    if has("initContainers", PROXY) || has("containers", PROXY) {
        return Ok(Outcome::AlreadyInjected);
    }
    let mut skip_inbound = vec![ADMIN_PORT];
    skip_inbound.extend(skip_in);
    let init = init_container(cfg, &skip_inbound, &skip_out);
    let probes = match spec.get_mut("containers").and_then(Value::as_array_mut) {
        Some(containers) => probes::rewrite(containers),
        None => probes::Rewritten::default(),
    };
    let proxy = proxy_container(cfg, &opaque, probes.checks);
    add_to_pod(spec, init, proxy);
    if !probes.originals.is_empty() {
        // The pod template's metadata exists: it was read for the opt-in above, or is created.
        let original = Value::Object(probes.originals).to_string();
        if let Some(meta) = ensure_object(obj, meta_path)
            && let Some(annotations) = entry_object(meta, "annotations")
        {
            annotations.insert(probes::ORIGINAL_PROBES.to_owned(), original.into());
        }
    }
    Ok(Outcome::Injected)
}

/// The object at `pointer` (a path of object keys), created empty where missing.
fn ensure_object<'a>(
    obj: &'a mut Value,
    pointer: &str,
) -> Option<&'a mut serde_json::Map<String, Value>> {
    let mut at = obj.as_object_mut()?;
    for key in pointer.split('/').filter(|k| !k.is_empty()) {
        at = entry_object(at, key)?;
    }
    Some(at)
}

/// `map[key]` as an object, created empty when missing; `None` when it is something else.
fn entry_object<'a>(
    map: &'a mut serde_json::Map<String, Value>,
    key: &str,
) -> Option<&'a mut serde_json::Map<String, Value>> {
    map.entry(key.to_owned())
        .or_insert_with(|| Value::Object(serde_json::Map::new()))
        .as_object_mut()
}

/// The init container: installs the iptables rules that send the pod's traffic through the
/// sidecar, except the ports named to skip.
fn init_container(cfg: &InjectConfig, skip_inbound: &[u16], skip_outbound: &[u16]) -> Value {
    json!({
        "name": INIT,
        "image": cfg.proxy_image,
        "args": [
            "init",
            "--proxy-uid", cfg.proxy_uid.to_string(),
            "--inbound-port", INBOUND_PORT.to_string(),
            "--outbound-port", OUTBOUND_PORT.to_string(),
            "--skip-inbound-ports", join(skip_inbound),
            "--skip-outbound-ports", join(skip_outbound),
        ],
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": { "drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"] },
        },
        "resources": {
            "requests": { "cpu": "10m", "memory": "16Mi" },
            "limits": { "cpu": "100m", "memory": "32Mi" },
        },
    })
}

/// The sidecar itself: a native sidecar (an init container that keeps running), identified by
/// the pod's service account, with its probes on the admin port, and the app's probes it
/// performs in the kubelet's place (see [`probes`]).
fn proxy_container(
    cfg: &InjectConfig,
    opaque: &[u16],
    app_probes: serde_json::Map<String, Value>,
) -> Value {
    let env = |name: &str, path: &str| json!({ "name": name, "valueFrom": { "fieldRef": { "fieldPath": path } } });
    let mut args = vec![
        json!("--control-plane"),
        json!(cfg.control_plane),
        json!("--trust-domain"),
        json!(cfg.trust_domain),
        json!("--identity"),
        json!("$(MOAT_NAMESPACE)/$(MOAT_SERVICE_ACCOUNT)"),
        json!("--k8s-token-file"),
        json!(TOKEN_PATH),
        json!("--trust-anchors"),
        json!(BUNDLE_PATH),
        json!("--inbound"),
        json!(format!("0.0.0.0:{INBOUND_PORT}")),
        json!("--advertise"),
        // The IP alone: the sidecar adds the inbound port, bracketing an IPv6 address.
        json!("$(MOAT_POD_IP)"),
        json!("--transparent"),
        json!(format!("0.0.0.0:{OUTBOUND_PORT}")),
        json!("--admin"),
        json!(format!("0.0.0.0:{ADMIN_PORT}")),
        json!("--log-format"),
        json!("json"),
    ];
    if !opaque.is_empty() {
        args.push(json!("--opaque-ports"));
        args.push(json!(join(opaque)));
    }
    let probe = |path: &str| json!({ "httpGet": { "path": path, "port": ADMIN_PORT }, "periodSeconds": 2, "failureThreshold": 30 });
    let mut env = vec![
        env("MOAT_NAMESPACE", "metadata.namespace"),
        env("MOAT_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        env("MOAT_POD_IP", "status.podIP"),
    ];
    if !app_probes.is_empty() {
        env.push(json!({ "name": probes::APP_PROBES_ENV, "value": Value::Object(app_probes).to_string() }));
    }
    json!({
        "name": PROXY,
        "image": cfg.proxy_image,
        "restartPolicy": "Always",
        "args": args,
        "env": env,
        "ports": [
            { "name": "moat-inbound", "containerPort": INBOUND_PORT },
            { "name": "moat-admin", "containerPort": ADMIN_PORT },
        ],
        "startupProbe": probe("/ready"),
        "readinessProbe": probe("/ready"),
        "livenessProbe": probe("/live"),
        "securityContext": {
            "runAsUser": cfg.proxy_uid,
            "runAsGroup": cfg.proxy_uid,
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": { "drop": ["ALL"] },
        },
        "resources": {
            "requests": { "cpu": "20m", "memory": "16Mi" },
            "limits": { "cpu": "1", "memory": "64Mi" },
        },
        "volumeMounts": [
            { "name": "moat-token", "mountPath": "/var/run/secrets/moat", "readOnly": true },
            { "name": "moat-ca-root", "mountPath": "/var/run/moat/ca", "readOnly": true },
        ],
    })
}

/// Puts the two containers first among the pod's init containers and adds the volumes they
/// mount (the projected service-account token, the CA bundle).
fn add_to_pod(spec: &mut serde_json::Map<String, Value>, init: Value, proxy: Value) {
    let mut init_containers = vec![init, proxy];
    if let Some(existing) = spec.get("initContainers").and_then(Value::as_array) {
        init_containers.extend(existing.iter().cloned());
    }
    spec.insert("initContainers".into(), Value::Array(init_containers));
    let mut volumes = spec
        .get("volumes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    volumes.push(json!({
        "name": "moat-token",
        "projected": { "sources": [ { "serviceAccountToken": {
            "audience": "moat", "expirationSeconds": 3600, "path": "token",
        } } ] },
    }));
    volumes.push(json!({
        "name": "moat-ca-root",
        "configMap": { "name": "moat-ca-root", "items": [ { "key": "bundle.pem", "path": "bundle.pem" } ] },
    }));
    spec.insert("volumes".into(), Value::Array(volumes));
}

/// Splits YAML text into documents at `---` lines (keeping each document's text).
fn documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            docs.push(String::new());
        } else if let Some(cur) = docs.last_mut() {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    docs
}

/// Injects every workload of a multi-document YAML text that opted in, itself or through a
/// Namespace document of the same text (see [`Selected::Offline`]). A document that is not changed keeps
/// its exact text (comments included); an injected one is re-serialised. Returns the new text
/// and, per document, its `Kind/name` and what happened.
pub fn inject_yaml(
    text: &str,
    cfg: &InjectConfig,
) -> Result<(String, Vec<(String, Outcome)>), InjectError> {
    let docs = documents(text);
    let enabled_namespaces: Vec<String> = docs
        .iter()
        .filter_map(|d| serde_yaml_ng::from_str::<Value>(d).ok())
        .filter(|v| v.get("kind").and_then(Value::as_str) == Some("Namespace"))
        .filter(|v| label(v.get("metadata"), INJECT) == Some(ENABLED))
        .filter_map(|v| Some(v.pointer("/metadata/name")?.as_str()?.to_owned()))
        .collect();
    let mut out = Vec::new();
    let mut report = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        let index = i + 1;
        let value: Value =
            serde_yaml_ng::from_str(&doc).map_err(|source| InjectError::Yaml { index, source })?;
        if value.is_null() {
            if !doc.trim().is_empty() {
                out.push(doc);
            }
            continue;
        }
        if !value.is_object() {
            return Err(InjectError::NotAnObject { index });
        }
        let mut injected = value.clone();
        let namespace_enabled = value
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .is_some_and(|ns| enabled_namespaces.iter().any(|e| e == ns));
        let selected = Selected::Offline { namespace_enabled };
        let outcome = inject(&mut injected, cfg, selected).map_err(|e| InjectError::Document {
            index,
            source: Box::new(e),
        })?;
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or("?");
        let name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("?");
        report.push((format!("{kind}/{name}"), outcome));
        if outcome == Outcome::Injected {
            out.push(serde_yaml_ng::to_string(&injected).map_err(InjectError::Write)?);
        } else {
            out.push(doc);
        }
    }
    Ok((out.join("---\n"), report))
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = "# the app\napiVersion: v1\nkind: Namespace\nmetadata: { name: shop, labels: { moat.dev/inject: enabled } }\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: { name: web, namespace: shop }\nspec:\n  template:\n    metadata: { labels: { app: web } }\n    spec:\n      containers: [{ name: web, image: nginx }]\n---\napiVersion: v1\nkind: Service\nmetadata: { name: web }  # keep me\nspec: { ports: [{ port: 80 }] }\n";

    #[test]
    fn injects_workloads_once_and_leaves_the_rest_alone() {
        let cfg = InjectConfig::default();
        let (out, report) = inject_yaml(APP, &cfg).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report[0].1, Outcome::NotAWorkload);
        assert_eq!(report[1].1, Outcome::Injected);
        assert_eq!(report[2].1, Outcome::NotAWorkload);
        assert!(out.contains("metadata: { name: web }  # keep me"), "{out}");
        assert!(out.contains("restartPolicy: Always"), "{out}");
        let (again, report) = inject_yaml(&out, &cfg).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again, out);
        assert_eq!(report[1].1, Outcome::AlreadyInjected);
    }

    #[test]
    fn only_what_opted_in_is_injected() {
        let cfg = InjectConfig::default();
        let unlabelled = APP.replace("labels: { moat.dev/inject: enabled }", "labels: {}");
        let (out, report) = inject_yaml(&unlabelled, &cfg).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report[1].1, Outcome::NotOptedIn);
        assert_eq!(out, unlabelled, "a workload not opted in is left as it was");
        // The pod template opts in by itself, with a label or an annotation.
        let labelled = unlabelled.replace(
            "{ labels: { app: web } }",
            "{ labels: { app: web, moat.dev/inject: enabled } }",
        );
        let (_, report) = inject_yaml(&labelled, &cfg).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report[1].1, Outcome::Injected);
        let annotated = unlabelled.replace(
            "{ labels: { app: web } }",
            "{ labels: { app: web }, annotations: { moat.dev/inject: enabled } }",
        );
        let (_, report) = inject_yaml(&annotated, &cfg).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report[1].1, Outcome::Injected);
        // A pod template's own `disabled` wins over its namespace.
        let opted_out = APP.replace(
            "{ labels: { app: web } }",
            "{ labels: { app: web, moat.dev/inject: disabled } }",
        );
        let (_, report) = inject_yaml(&opted_out, &cfg).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report[1].1, Outcome::OptedOut);
    }

    #[test]
    fn opt_out_and_bad_objects() {
        let cfg = InjectConfig::default();
        let mut pod = serde_json::json!({"kind": "Pod", "metadata": {"name": "p", "annotations": {INJECT: "disabled"}}, "spec": {"containers": []}});
        assert!(matches!(
            inject(&mut pod, &cfg, Selected::ByAdmission),
            Ok(Outcome::OptedOut)
        ));
        let node_agent = serde_json::json!({"kind": "DaemonSet", "metadata": {"name": "agent"}, "spec": {"template": {"spec": {"hostNetwork": true, "containers": [{"name": "agent", "image": "agent"}]}}}});
        let mut injected = node_agent.clone();
        assert!(matches!(
            inject(&mut injected, &cfg, Selected::ByAdmission),
            Ok(Outcome::HostNetwork)
        ));
        assert_eq!(injected, node_agent, "a hostNetwork pod is left as it was");
        let mut broken = serde_json::json!({"kind": "Job", "metadata": {"name": "j"}, "spec": {"template": {"spec": {"containers": 3}}}});
        let e = inject(&mut broken, &cfg, Selected::ByAdmission).unwrap_err();
        assert!(
            matches!(&e, InjectError::NoContainers { object, field }
                if object == "Job j" && field == "spec.template.spec"),
            "{e}"
        );
        assert!(e.to_string().contains("containers must be a list"), "{e}");
        let mut bad_port = serde_json::json!({"kind": "Pod", "metadata": {"name": "p", "annotations": {OPAQUE_PORTS: "3306,x"}}, "spec": {"containers": []}});
        let e = inject(&mut bad_port, &cfg, Selected::ByAdmission).unwrap_err();
        assert!(
            matches!(&e, InjectError::BadPort { key: OPAQUE_PORTS, value, .. } if value == "x"),
            "{e}"
        );
    }
}
