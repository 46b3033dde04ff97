//! A stand-in for the Kubernetes API server for moat's custom resources (no kube-apiserver
//! binary can run here). It speaks the parts of the real wire protocol a kube-rs watcher and
//! status writer use, over HTTPS: LIST (`items` with `metadata.resourceVersion`), WATCH
//! (`?watch=true&resourceVersion=N`: newline-delimited `{"type","object"}` events, resumable
//! from any revision still in its history, `ERROR` 410 Expired for one that was compacted away)
//! and merge-patches of the `status` subresource. Objects carry `uid`, `generation` (bumped when
//! the spec changes, as the API server does) and `resourceVersion`. The test plays kubectl with
//! [`KubeApi::apply`], [`KubeApi::put`] and [`KubeApi::delete`], and makes watch gaps with
//! [`KubeApi::hold`]. Besides moat's resources it serves what the trust-bundle publisher uses:
//! namespaces (list, watch), ConfigMaps and MutatingWebhookConfigurations (get, create, replace
//! with resourceVersion preconditions).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt as _, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

/// One request as the stand-in saw it.
#[derive(Clone, Debug)]
pub struct KubeRequest {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    pub body: Vec<u8>,
}

/// (revision, plural, event JSON).
type Change = (u64, String, Value);

#[derive(Default)]
struct State {
    revision: u64,
    /// (plural, namespace, name) -> object.
    objects: BTreeMap<(String, String, String), Value>,
    history: Vec<Change>,
    /// Watches from before this revision get 410 Expired.
    compacted: u64,
    requests: Vec<KubeRequest>,
}

/// The stand-in server.
#[derive(Clone)]
pub struct KubeApi {
    state: Arc<Mutex<State>>,
    live: broadcast::Sender<Change>,
    /// Bumped to end every open watch.
    cut: watch::Sender<u64>,
    /// While true, new watch requests wait.
    held: watch::Sender<bool>,
    /// Watch streams being served.
    open_watches: Arc<std::sync::atomic::AtomicUsize>,
    pub addr: std::net::SocketAddr,
    pub ca_pem: String,
}

fn kind_of(plural: &str) -> &'static str {
    match plural {
        "accesspolicies" => "AccessPolicy",
        "meshconfigs" => "MeshConfig",
        "namespaces" => "Namespace",
        "configmaps" => "ConfigMap",
        "mutatingwebhookconfigurations" => "MutatingWebhookConfiguration",
        _ => "Unknown",
    }
}

fn api_version_of(plural: &str) -> &'static str {
    match plural {
        "namespaces" | "configmaps" => "v1",
        "mutatingwebhookconfigurations" => "admissionregistration.k8s.io/v1",
        _ => "moat.dev/v1",
    }
}

/// What a request path names: `/api/v1/...` or `/apis/GROUP/VERSION/...`, then an optional
/// `namespaces/NS/`, the resource, an optional name and subresource.
#[derive(Debug)]
struct Target {
    namespace: String,
    plural: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn target_of(path: &[&str]) -> Option<Target> {
    let rest = match path {
        ["api", "v1", rest @ ..] => rest,
        ["apis", _, _, rest @ ..] => rest,
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, rest @ ..] => (ns.to_string(), {
            let mut r = vec![*plural];
            r.extend_from_slice(rest);
            r
        }),
        other => (String::new(), other.to_vec()),
    };
    Some(Target {
        namespace,
        plural: rest.first()?.to_string(),
        name: rest.get(1).map(|s| s.to_string()),
        subresource: rest.get(2).map(|s| s.to_string()),
    })
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
           "reason": reason, "message": message, "code": code})
}

type Body = BoxBody<Bytes, Infallible>;

fn full(code: u16, v: &Value) -> http::Response<Body> {
    let mut r = http::Response::new(http_body_util::Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = http::StatusCode::from_u16(code).unwrap();
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

impl KubeApi {
    /// Starts the stand-in on 127.0.0.1 with TLS (its CA in `ca_pem`).
    pub async fn start() -> KubeApi {
        let (acceptor, ca_pem) = super::localhost_tls();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = KubeApi {
            state: Arc::default(),
            live: broadcast::channel(1024).0,
            cut: watch::channel(0).0,
            held: watch::channel(false).0,
            open_watches: Arc::default(),
            addr: listener.local_addr().unwrap(),
            ca_pem,
        };
        let server = api.clone();
        super::serve_tls(listener, acceptor, move |req| {
            let server = server.clone();
            async move { server.answer(req).await }
        });
        api
    }

    /// The API server URL.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn record(&self, state: &mut State, plural: &str, object: Value) {
        let change = (state.revision, plural.to_owned(), object);
        state.history.push(change.clone());
        let _ = self.live.send(change);
    }

    /// `kubectl apply`: creates the object or replaces its spec (a new spec is a new generation).
    pub fn apply(&self, plural: &str, namespace: &str, name: &str, spec: Value) {
        let mut s = self.state.lock().unwrap();
        s.revision += 1;
        let rv = s.revision;
        let key = (plural.to_owned(), namespace.to_owned(), name.to_owned());
        let (kind, object) = match s.objects.get(&key).cloned() {
            Some(mut o) => {
                if o["spec"] != spec {
                    let g = o["metadata"]["generation"].as_u64().unwrap() + 1;
                    o["metadata"]["generation"] = g.into();
                    o["spec"] = spec;
                }
                o["metadata"]["resourceVersion"] = rv.to_string().into();
                ("MODIFIED", o)
            }
            None => {
                let mut meta = json!({"name": name, "uid": format!("uid-{plural}-{name}-{rv}"),
                                      "generation": 1, "resourceVersion": rv.to_string(),
                                      "creationTimestamp": "2026-12-01T00:00:00Z"});
                if !namespace.is_empty() {
                    meta["namespace"] = namespace.into();
                }
                (
                    "ADDED",
                    json!({"apiVersion": api_version_of(plural), "kind": kind_of(plural),
                           "metadata": meta, "spec": spec}),
                )
            }
        };
        s.objects.insert(key, object.clone());
        self.record(&mut s, plural, json!({"type": kind, "object": object}));
    }

    /// `kubectl apply` of an object without a spec (a Namespace, a webhook configuration):
    /// `fields` are its top-level fields besides `metadata`.
    pub fn put(&self, plural: &str, namespace: &str, name: &str, fields: Value) {
        let mut s = self.state.lock().unwrap();
        s.revision += 1;
        let rv = s.revision;
        let key = (plural.to_owned(), namespace.to_owned(), name.to_owned());
        let (kind, mut object) = match s.objects.get(&key).cloned() {
            Some(o) => ("MODIFIED", json!({ "metadata": o["metadata"].clone() })),
            None => {
                let mut meta = json!({"name": name, "uid": format!("uid-{plural}-{name}-{rv}"),
                                      "generation": 1, "creationTimestamp": "2026-12-01T00:00:00Z"});
                if !namespace.is_empty() {
                    meta["namespace"] = namespace.into();
                }
                ("ADDED", json!({ "metadata": meta }))
            }
        };
        object["apiVersion"] = api_version_of(plural).into();
        object["kind"] = kind_of(plural).into();
        object["metadata"]["resourceVersion"] = rv.to_string().into();
        for (k, v) in fields.as_object().cloned().unwrap_or_default() {
            object[k] = v;
        }
        s.objects.insert(key, object.clone());
        self.record(&mut s, plural, json!({"type": kind, "object": object}));
    }

    /// `kubectl delete`.
    pub fn delete(&self, plural: &str, namespace: &str, name: &str) {
        let mut s = self.state.lock().unwrap();
        let key = (plural.to_owned(), namespace.to_owned(), name.to_owned());
        let Some(mut o) = s.objects.remove(&key) else {
            return;
        };
        s.revision += 1;
        o["metadata"]["resourceVersion"] = s.revision.to_string().into();
        self.record(&mut s, plural, json!({"type": "DELETED", "object": o}));
    }

    /// The object as stored now.
    pub fn get(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let s = self.state.lock().unwrap();
        s.objects
            .get(&(plural.to_owned(), namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<KubeRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Starts a watch gap: every open watch ends (this returns once they have) and new ones
    /// wait until [`KubeApi::release`].
    pub async fn hold(&self) {
        self.held.send_replace(true);
        self.cut.send_modify(|n| *n += 1);
        let start = std::time::Instant::now();
        while self.open_watches.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "a watch did not end"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Ends a watch gap. With `compact`, the history written so far is gone, so a watch that
    /// resumes from before now gets 410 Expired and must list again.
    pub fn release(&self, compact: bool) {
        if compact {
            let mut s = self.state.lock().unwrap();
            s.compacted = s.revision + 1;
            s.history.clear();
        }
        self.held.send_replace(false);
    }

    async fn answer(&self, req: http::Request<hyper::body::Incoming>) -> http::Response<Body> {
        let method = req.method().to_string();
        let target = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default();
        let header = |n: http::header::HeaderName| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (content_type, authorization) = (
            header(http::header::CONTENT_TYPE),
            header(http::header::AUTHORIZATION),
        );
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let path: Vec<String> = req
            .uri()
            .path()
            .trim_start_matches('/')
            .split('/')
            .map(str::to_owned)
            .collect();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().to_vec())
            .unwrap_or_default();
        self.state.lock().unwrap().requests.push(KubeRequest {
            method: method.clone(),
            target,
            content_type: content_type.clone(),
            authorization,
            body: body.clone(),
        });
        let p: Vec<&str> = path.iter().map(String::as_str).collect();
        let Some(t) = target_of(&p) else {
            return full(
                404,
                &status(404, "NotFound", "the stand-in does not serve this"),
            );
        };
        match (method.as_str(), t.name.as_deref(), t.subresource.as_deref()) {
            ("GET", None, None) if query.contains_key("watch") => {
                let from: u64 = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                self.watch(&t.plural, from).await
            }
            ("GET", None, None) => self.list(&t.plural, &t.namespace),
            ("GET", Some(name), None) => match self.get(&t.plural, &t.namespace, name) {
                Some(o) => full(200, &o),
                None => full(
                    404,
                    &status(404, "NotFound", &format!("{} {name:?} not found", t.plural)),
                ),
            },
            ("POST", None, None) => self.create(&t, &body),
            ("PUT", Some(name), None) => self.replace(&t, name, &body),
            ("PATCH", Some(name), Some("status")) => self.patch_status(
                &t.plural,
                &t.namespace,
                name,
                content_type.as_deref(),
                &body,
            ),
            _ => full(
                404,
                &status(404, "NotFound", "the stand-in does not serve this"),
            ),
        }
    }

    fn create(&self, t: &Target, body: &[u8]) -> http::Response<Body> {
        let Ok(mut o) = serde_json::from_slice::<Value>(body) else {
            return full(400, &status(400, "BadRequest", "not JSON"));
        };
        let Some(name) = o["metadata"]["name"].as_str().map(str::to_owned) else {
            return full(422, &status(422, "Invalid", "metadata.name is required"));
        };
        if self.get(&t.plural, &t.namespace, &name).is_some() {
            return full(
                409,
                &status(409, "AlreadyExists", &format!("{name:?} already exists")),
            );
        }
        let fields: serde_json::Map<String, Value> = o
            .as_object_mut()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| !["metadata", "apiVersion", "kind"].contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        self.put(&t.plural, &t.namespace, &name, Value::Object(fields));
        full(201, &self.get(&t.plural, &t.namespace, &name).unwrap())
    }

    fn replace(&self, t: &Target, name: &str, body: &[u8]) -> http::Response<Body> {
        let Ok(o) = serde_json::from_slice::<Value>(body) else {
            return full(400, &status(400, "BadRequest", "not JSON"));
        };
        let Some(current) = self.get(&t.plural, &t.namespace, name) else {
            return full(
                404,
                &status(404, "NotFound", &format!("{name:?} not found")),
            );
        };
        // Optimistic concurrency, as the API server does it.
        let sent = o["metadata"]["resourceVersion"].as_str().unwrap_or("");
        if !sent.is_empty() && current["metadata"]["resourceVersion"] != sent {
            return full(
                409,
                &status(409, "Conflict", "the object has been modified"),
            );
        }
        let fields: serde_json::Map<String, Value> = o
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| {
                        !["metadata", "apiVersion", "kind", "status"].contains(&k.as_str())
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        self.put(&t.plural, &t.namespace, name, Value::Object(fields));
        full(200, &self.get(&t.plural, &t.namespace, name).unwrap())
    }

    fn list(&self, plural: &str, namespace: &str) -> http::Response<Body> {
        let s = self.state.lock().unwrap();
        let items: Vec<&Value> = s
            .objects
            .iter()
            .filter(|((p, ns, _), _)| p == plural && (namespace.is_empty() || ns == namespace))
            .map(|(_, o)| o)
            .collect();
        full(
            200,
            &json!({"apiVersion": api_version_of(plural), "kind": format!("{}List", kind_of(plural)),
                    "metadata": {"resourceVersion": s.revision.to_string()}, "items": items}),
        )
    }

    async fn watch(&self, plural: &str, from: u64) -> http::Response<Body> {
        let mut held = self.held.subscribe();
        while *held.borrow_and_update() {
            if held.changed().await.is_err() {
                break;
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
        let line = |v: &Value| Ok(Frame::data(Bytes::from(format!("{v}\n"))));
        let (backlog, mut live, expired) = {
            let s = self.state.lock().unwrap();
            let backlog: Vec<Value> = s
                .history
                .iter()
                .filter(|(rv, p, _)| *rv > from && p == plural)
                .map(|(_, _, e)| e.clone())
                .collect();
            (backlog, self.live.subscribe(), from < s.compacted)
        };
        let mut cut = self.cut.subscribe();
        cut.borrow_and_update();
        let plural = plural.to_owned();
        struct Open(Arc<std::sync::atomic::AtomicUsize>);
        impl Drop for Open {
            fn drop(&mut self) {
                self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        self.open_watches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let open = Open(self.open_watches.clone());
        tokio::spawn(async move {
            let _open = open;
            if expired {
                let gone = status(410, "Expired", "too old resource version");
                let _ = tx
                    .send(line(&json!({"type": "ERROR", "object": gone})))
                    .await;
                return;
            }
            for e in &backlog {
                if tx.send(line(e)).await.is_err() {
                    return;
                }
            }
            loop {
                tokio::select! {
                    biased;
                    _ = cut.changed() => return,
                    c = live.recv() => match c {
                        Ok((rv, p, e)) if rv > from && p == plural => {
                            if tx.send(line(&e)).await.is_err() { return; }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    },
                }
            }
        });
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut r = http::Response::new(body.boxed());
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    }

    fn patch_status(
        &self,
        plural: &str,
        ns: &str,
        name: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> http::Response<Body> {
        if content_type != Some("application/merge-patch+json") {
            return full(
                415,
                &status(
                    415,
                    "UnsupportedMediaType",
                    "the stand-in takes merge patches",
                ),
            );
        }
        let Ok(patch) = serde_json::from_slice::<Value>(body) else {
            return full(400, &status(400, "BadRequest", "not JSON"));
        };
        let mut s = self.state.lock().unwrap();
        let key = (plural.to_owned(), ns.to_owned(), name.to_owned());
        let Some(mut o) = s.objects.get(&key).cloned() else {
            return full(404, &status(404, "NotFound", "no such object"));
        };
        // Only the status subresource changes through /status.
        if let Some(st) = patch.get("status") {
            json_patch::merge(&mut o["status"], st);
        }
        s.revision += 1;
        o["metadata"]["resourceVersion"] = s.revision.to_string().into();
        s.objects.insert(key, o.clone());
        self.record(
            &mut s,
            plural,
            json!({"type": "MODIFIED", "object": o.clone()}),
        );
        full(200, &o)
    }
}
