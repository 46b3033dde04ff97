//! Request spans over OTLP, over the real binaries: two sidecars with `--otlp-endpoint` export
//! to a real OTLP/gRPC receiver (the `TraceService` of the OpenTelemetry protos, served by tonic
//! in this test). A request through both produces two linked spans in the caller's trace (the
//! client sidecar's, child of the caller's span; the server sidecar's, child of that), and the
//! app receives a `traceparent` naming the server sidecar's span. An unsampled trace is passed
//! on unsampled and exports nothing; a refused request's span says why.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use moat_test_util::apps::{http_echo, recording_http};
use moat_test_util::{Proxy, apply_policy, eventually};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;

const POLICY: &str = r#"
apiVersion: moat.dev/v1
kind: AccessPolicy
metadata: { name: orders }
spec:
  target: orders
  rules:
    - from: [frontend]
      http:
        - methods: [GET]
          paths: ["/orders/*"]
"#;

/// A span as received, with the `service.name` of the resource that sent it.
#[derive(Clone, Debug)]
struct Got {
    service: String,
    span: Span,
}

impl Got {
    fn attr(&self, key: &str) -> Option<String> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => Some(s.clone()),
                Value::IntValue(i) => Some(i.to_string()),
                _ => None,
            })
    }
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Got>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    got.push(Got {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn otlp_receiver() -> (SocketAddr, Receiver) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::default();
    let svc = TraceServiceServer::new(receiver.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, receiver)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn trace(spans: &Receiver, trace_id: &str) -> Vec<Got> {
    spans
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|g| hex(&g.span.trace_id) == trace_id)
        .cloned()
        .collect()
}

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_through_two_sidecars_yields_two_linked_spans() {
    let (otlp, spans) = otlp_receiver().await;
    let endpoint = format!("http://{otlp}");
    let cp = moat_test_util::ControlPlane::start().unwrap();
    apply_policy(&cp, POLICY);
    let (app, seen) = recording_http().await;
    let _orders = Proxy::builder(&cp, "orders")
        .app(app)
        .args(&["--otlp-endpoint", &endpoint])
        .start()
        .unwrap();
    let frontend = Proxy::builder(&cp, "frontend")
        .app(http_echo().await)
        .upstreams(&["orders"])
        .args(&["--otlp-endpoint", &endpoint])
        .start()
        .unwrap();
    wait_for_services(&frontend, &["orders"]);
    let client = h1_client();
    let url = |path: &str| format!("http://{}{path}", frontend.upstream("orders"));
    let received_traceparent = |path: &str| {
        seen.lock()
            .unwrap()
            .iter()
            .find(|r| r.path() == path)
            .and_then(|r| {
                r.headers
                    .iter()
                    .find(|(k, _)| k == "traceparent")
                    .map(|(_, v)| v.clone())
            })
    };

    // Not sampled by the caller: passed on as such, and no span is exported.
    let unsampled = "5bf92f3577b34da6a3ce929d0e0e4736";
    let tp = format!("00-{unsampled}-00f067aa0ba902b7-00");
    let (status, _, _) = get(&client, "GET", &url("/orders/0"), &[("traceparent", &tp)])
        .await
        .unwrap();
    assert_eq!(status, 200);
    let passed = received_traceparent("/orders/0").unwrap();
    assert!(
        passed.starts_with(&format!("00-{unsampled}-")) && passed.ends_with("-00"),
        "{passed}"
    );

    // Sampled: the client sidecar's span is the caller span's child, the server sidecar's is
    // the client span's child, and the app's traceparent names the server span.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let tp = format!("00-{trace_id}-{caller_span}-01");
    let (status, _, _) = get(&client, "GET", &url("/orders/1"), &[("traceparent", &tp)])
        .await
        .unwrap();
    assert_eq!(status, 200);
    // A refused request's span says why (and the app never sees it).
    let denied_trace = "3bf92f3577b34da6a3ce929d0e0e4736";
    let tp = format!("00-{denied_trace}-{caller_span}-01");
    let (status, _, _) = get(
        &client,
        "DELETE",
        &url("/orders/1"),
        &[("traceparent", &tp)],
    )
    .await
    .unwrap();
    assert_eq!(status, 403);

    // The SDK exports in batches (every 5 s by default).
    let both = eventually(Duration::from_secs(30), || {
        let t = trace(&spans, trace_id);
        let d = trace(&spans, denied_trace);
        (t.len() >= 2 && d.len() >= 2).then_some((t, d))
    });
    let (t, d) = both.expect("the receiver never got both sidecars' spans");
    assert_eq!(t.len(), 2, "{t:#?}");
    let client_span = t
        .iter()
        .find(|g| g.span.kind == CLIENT)
        .expect("no client span");
    let server_span = t
        .iter()
        .find(|g| g.span.kind == SERVER)
        .expect("no server span");
    assert_eq!(client_span.service, "frontend");
    assert_eq!(server_span.service, "orders");
    assert_eq!(hex(&client_span.span.parent_span_id), caller_span);
    assert_eq!(server_span.span.parent_span_id, client_span.span.span_id);
    assert_eq!(
        received_traceparent("/orders/1").unwrap(),
        format!("00-{trace_id}-{}-01", hex(&server_span.span.span_id))
    );
    // The server span says who called, what was decided, by which policy, and the outcome.
    assert_eq!(
        server_span.attr("moat.peer").unwrap(),
        id("frontend").to_string()
    );
    assert_eq!(
        server_span.attr("moat.target").unwrap(),
        id("orders").to_string()
    );
    assert_eq!(server_span.attr("moat.decision").unwrap(), "allow");
    assert!(
        server_span
            .attr("moat.policy")
            .unwrap()
            .starts_with("default/orders@")
    );
    assert_eq!(
        server_span.attr("http.response.status_code").unwrap(),
        "200"
    );
    assert_eq!(server_span.attr("url.path").unwrap(), "/orders/1");
    assert_eq!(
        server_span.attr("moat.request_id"),
        client_span.attr("moat.request_id")
    );
    assert_eq!(
        client_span.attr("moat.target").unwrap(),
        id("orders").to_string()
    );

    let denied = d.iter().find(|g| g.span.kind == SERVER).unwrap();
    assert_eq!(denied.attr("moat.decision").unwrap(), "deny");
    assert_eq!(denied.attr("moat.reason").unwrap(), "route-not-allowed");
    assert_eq!(denied.attr("http.response.status_code").unwrap(), "403");
    assert_eq!(denied.span.status.as_ref().map(|s| s.code), Some(2));
    assert!(
        seen.lock().unwrap().iter().all(|r| r.method != "DELETE"),
        "the app received the refused request"
    );
    // Ended before the sampled spans, so exported no later than them: nothing came.
    assert!(trace(&spans, unsampled).is_empty());
}
