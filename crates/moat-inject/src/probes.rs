//! The app's kubelet probes, through the sidecar. Once injected, every inbound connection to an
//! app port is redirected to the sidecar, which admits only mutual TLS: a kubelet's plain
//! `httpGet` probe would be refused (the pod never gets ready) and a `tcpSocket` probe would be
//! answered by the sidecar itself (the app could be down and the probe would still pass). So
//! both are rewritten to the sidecar's admin port, which is not intercepted:
//! `GET /app-health/<container>/<livez|readyz|startupz>`, and the sidecar performs the original
//! probe against the app on the pod's loopback and answers with its outcome. The originals go to
//! the sidecar in `MOAT_APP_PROBES` (JSON, keyed by the new path); the sidecar performs only
//! those. A `grpc` probe becomes the same kind of path, and the sidecar makes the gRPC health
//! check (`grpc.health.v1.Health/Check`) over h2c on loopback: SERVING passes, anything else
//! fails, as the kubelet's own gRPC probe would. Probes that name another host, use HTTPS or
//! `exec`, or a port name the container does not declare are left as they are.

use serde_json::{Map, Value, json};

use crate::ADMIN_PORT;

/// The sidecar's environment variable that carries the original probes.
pub const APP_PROBES_ENV: &str = "MOAT_APP_PROBES";

/// The probe fields of a container and the path segment each is served under.
const KINDS: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];

/// Pod annotation keeping the probes as they were before injection, by container and field
/// (JSON), so what injection changed can be seen and undone.
pub const ORIGINAL_PROBES: &str = "moat.dev/original-probes";

/// What [`rewrite`] did.
#[derive(Debug, Default)]
pub struct Rewritten {
    /// What each new path must check, for the sidecar (`MOAT_APP_PROBES`).
    pub checks: Map<String, Value>,
    /// The probes replaced, as they were: container name -> probe field -> probe.
    pub originals: Map<String, Value>,
}

/// Rewrites the HTTP, TCP and gRPC probes of `containers` (the app's, not the sidecar's) to
/// the sidecar's admin port.
pub fn rewrite(containers: &mut [Value]) -> Rewritten {
    let mut done = Rewritten::default();
    for container in containers.iter_mut() {
        let Some(name) = container
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            continue;
        };
        let ports = container.get("ports").cloned().unwrap_or(Value::Null);
        for (field, kind) in KINDS {
            let Some(probe) = container.get_mut(field).and_then(Value::as_object_mut) else {
                continue;
            };
            let Some(original) = original(probe, &ports) else {
                continue;
            };
            let before = Value::Object(probe.clone());
            let path = format!("/app-health/{name}/{kind}");
            probe.remove("tcpSocket");
            probe.remove("grpc");
            probe.insert(
                "httpGet".into(),
                json!({ "path": path, "port": ADMIN_PORT, "scheme": "HTTP" }),
            );
            done.checks.insert(path, original);
            if let Some(fields) = done
                .originals
                .entry(name.clone())
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
            {
                fields.insert(field.to_owned(), before);
            }
        }
    }
    done
}

/// What `probe` checks, if the sidecar can check it in the kubelet's place.
fn original(probe: &Map<String, Value>, ports: &Value) -> Option<Value> {
    if let Some(get) = probe.get("httpGet") {
        let scheme = get.get("scheme").and_then(Value::as_str).unwrap_or("HTTP");
        if !scheme.eq_ignore_ascii_case("HTTP") || get.get("host").is_some() {
            return None;
        }
        let port = port(get.get("port")?, ports)?;
        let path = get.get("path").and_then(Value::as_str).unwrap_or("/");
        let headers: Vec<Value> = get
            .get("httpHeaders")
            .and_then(Value::as_array)
            .map(|hs| {
                hs.iter()
                    .filter_map(|h| {
                        Some(json!([h.get("name")?.as_str()?, h.get("value")?.as_str()?]))
                    })
                    .collect()
            })
            .unwrap_or_default();
        return Some(json!({ "http": { "port": port, "path": path, "headers": headers } }));
    }
    if let Some(tcp) = probe.get("tcpSocket") {
        if tcp.get("host").is_some() {
            return None;
        }
        let port = port(tcp.get("port")?, ports)?;
        return Some(json!({ "tcp": { "port": port } }));
    }
    if let Some(grpc) = probe.get("grpc") {
        let port = port(grpc.get("port")?, ports)?;
        let service = grpc.get("service").and_then(Value::as_str).unwrap_or("");
        return Some(json!({ "grpc": { "port": port, "service": service } }));
    }
    None
}

/// A probe's port: a number, or the name of one of the container's ports.
fn port(port: &Value, ports: &Value) -> Option<u16> {
    match port {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(name) => ports.as_array()?.iter().find_map(|p| {
            (p.get("name")?.as_str()? == name)
                .then(|| p.get("containerPort")?.as_u64())
                .flatten()
                .and_then(|n| u16::try_from(n).ok())
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_and_tcp_probes_go_through_the_sidecar_and_the_rest_stay() {
        let mut containers = vec![
            json!({
                "name": "app",
                "ports": [{ "name": "http", "containerPort": 8080 }],
                "readinessProbe": { "httpGet": { "path": "/ready", "port": "http",
                    "httpHeaders": [{ "name": "X-Probe", "value": "1" }] }, "periodSeconds": 5 },
                "livenessProbe": { "tcpSocket": { "port": 8080 } },
                "startupProbe": { "httpGet": { "path": "/s", "port": 8443, "scheme": "HTTPS" } },
            }),
            json!({
                "name": "worker",
                "livenessProbe": { "exec": { "command": ["true"] } },
                "readinessProbe": { "httpGet": { "path": "/r", "port": "undeclared" } },
            }),
        ];
        let done = rewrite(&mut containers);
        // What was replaced is kept as it was, for the pod annotation.
        assert_eq!(
            Value::Object(done.originals.clone()),
            json!({ "app": {
                "readinessProbe": { "httpGet": { "path": "/ready", "port": "http",
                    "httpHeaders": [{ "name": "X-Probe", "value": "1" }] }, "periodSeconds": 5 },
                "livenessProbe": { "tcpSocket": { "port": 8080 } },
            } })
        );
        let originals = done.checks;
        assert_eq!(
            Value::Object(originals),
            json!({
                "/app-health/app/readyz": { "http": { "port": 8080, "path": "/ready", "headers": [["X-Probe", "1"]] } },
                "/app-health/app/livez": { "tcp": { "port": 8080 } },
            })
        );
        assert_eq!(
            containers[0]["readinessProbe"],
            json!({ "httpGet": { "path": "/app-health/app/readyz", "port": ADMIN_PORT, "scheme": "HTTP" }, "periodSeconds": 5 })
        );
        assert_eq!(
            containers[0]["livenessProbe"],
            json!({ "httpGet": { "path": "/app-health/app/livez", "port": ADMIN_PORT, "scheme": "HTTP" } })
        );
        // HTTPS, exec and an undeclared port name are left alone.
        assert_eq!(containers[0]["startupProbe"]["httpGet"]["port"], 8443);
        assert_eq!(containers[1]["livenessProbe"]["exec"]["command"][0], "true");
        assert_eq!(
            containers[1]["readinessProbe"]["httpGet"]["port"],
            "undeclared"
        );
    }

    #[test]
    fn grpc_probes_go_through_the_sidecar_too() {
        let mut containers = vec![json!({
            "name": "api",
            "livenessProbe": { "grpc": { "port": 9090 }, "periodSeconds": 3 },
            "readinessProbe": { "grpc": { "port": 9090, "service": "orders.v1.Orders" } },
        })];
        let done = rewrite(&mut containers);
        let originals = done.checks;
        assert_eq!(
            Value::Object(originals),
            json!({
                "/app-health/api/livez": { "grpc": { "port": 9090, "service": "" } },
                "/app-health/api/readyz": { "grpc": { "port": 9090, "service": "orders.v1.Orders" } },
            })
        );
        assert_eq!(
            containers[0]["livenessProbe"],
            json!({ "httpGet": { "path": "/app-health/api/livez", "port": ADMIN_PORT, "scheme": "HTTP" }, "periodSeconds": 3 })
        );
    }
}
