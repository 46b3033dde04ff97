//! Request spans over OTLP (`--otlp-endpoint`), on the OpenTelemetry SDK. Each sidecar reports
//! one span per HTTP request it handles: a client span on the outbound side, a server span on
//! the inbound side. A span continues the request's W3C `traceparent` (and `tracestate`) and
//! respects its sampled flag; the header is then rewritten to name the sidecar's own span, so
//! the next hop (the other sidecar, or the app) becomes its child. Spans are batched and
//! exported by the SDK's batch processor on its own thread; a collector that is down costs
//! dropped spans, never a waiting request. Without `--otlp-endpoint` none of this exists and
//! requests keep their `traceparent` as sent (one is added when missing).

use std::time::SystemTime;

use http::{HeaderMap, HeaderName, HeaderValue};
use moat_identity::SpiffeId;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error(
        "--otlp-endpoint {0:?} must be an http:// URL of an OTLP/gRPC collector (e.g. http://127.0.0.1:4317); TLS to the collector is not supported, so run one next to the sidecar (a node-local agent)"
    )]
    Endpoint(String),
    #[error("--otlp-sample-ratio {0} must be between 0 and 1")]
    Ratio(f64),
    #[error("cannot set up the OTLP exporter: {0}")]
    Exporter(String),
}

/// Checks an `--otlp-endpoint`: an `http://host:port` URL.
pub fn check_endpoint(endpoint: &str) -> Result<(), TraceError> {
    let url = http::Uri::try_from(endpoint).map_err(|_| TraceError::Endpoint(endpoint.into()))?;
    if url.scheme_str() != Some("http") || url.authority().is_none() {
        return Err(TraceError::Endpoint(endpoint.into()));
    }
    Ok(())
}

/// Checks an `--otlp-sample-ratio`: between 0 and 1.
pub fn check_ratio(ratio: f64) -> Result<(), TraceError> {
    if (0.0..=1.0).contains(&ratio) {
        Ok(())
    } else {
        Err(TraceError::Ratio(ratio))
    }
}

/// Where spans go (`--otlp-endpoint`) and how many traces that start at the sidecar are kept.
#[derive(Clone, Debug)]
pub struct TraceConfig {
    pub endpoint: String,
    pub sample_ratio: f64,
}

/// The span exporter of one sidecar.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl Tracing {
    /// Starts exporting to `endpoint` as `identity`. Traces that start at this sidecar (no
    /// incoming `traceparent`) are sampled at `ratio`; others follow their sampled flag. Must run
    /// inside the tokio runtime (the exporter's connection lives there).
    pub fn start(endpoint: &str, identity: &SpiffeId, ratio: f64) -> Result<Self, TraceError> {
        check_endpoint(endpoint)?;
        check_ratio(ratio)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| TraceError::Exporter(e.to_string()))?;
        let resource = opentelemetry_sdk::Resource::builder_empty()
            .with_service_name(identity.service_account().to_string())
            .with_attributes([
                KeyValue::new("service.namespace", identity.namespace().to_string()),
                KeyValue::new("moat.identity", identity.to_string()),
            ])
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                ratio,
            ))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("moat-proxy");
        Ok(Tracing {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
        })
    }

    /// Starts the span of a request whose headers are `headers`, as a child of its
    /// `traceparent`, and rewrites that header to name this span (marked [`crate::http::not_indexed`]).
    pub fn request(&self, headers: &mut HeaderMap, kind: SpanKind, name: &'static str) -> Span {
        let parent = self.propagator.extract(&Headers(headers));
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_start_time(SystemTime::now())
            .start_with_context(&self.tracer, &parent);
        let cx = Context::new().with_remote_span_context(span.span_context().clone());
        self.propagator
            .inject_context(&cx, &mut HeadersMut(headers));
        crate::http::not_indexed(headers);
        Span(span)
    }

    /// Exports what is still queued; at shutdown. The exporter's connection runs on this
    /// runtime, so the wait happens on a blocking thread.
    pub async fn flush(&self) {
        let provider = self.provider.clone();
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not export the last spans"),
            Err(e) => tracing::warn!(error = %e, "could not export the last spans"),
        }
    }
}

/// One request's span; reported when [`Span::end`] is called.
#[derive(Debug)]
pub struct Span(opentelemetry_sdk::trace::Span);

impl Span {
    /// Ends the span with the attributes of `o`, a request for `target`; `o.peer` is the other
    /// side (the caller inbound, the service called outbound). A 5xx, or a request the sidecar
    /// refused, is an error.
    pub fn end(mut self, o: &crate::tap::Call<'_>, target: &str) {
        if !self.0.is_recording() {
            return;
        }
        let mut attrs = vec![
            KeyValue::new("moat.peer", o.peer.to_owned()),
            KeyValue::new("moat.target", target.to_owned()),
            KeyValue::new("moat.decision", o.decision.to_owned()),
            KeyValue::new("moat.reason", o.reason.to_owned()),
            KeyValue::new("moat.request_id", o.request_id.to_owned()),
            KeyValue::new("http.request.method", o.method.to_owned()),
            KeyValue::new("url.path", o.path.to_owned()),
            KeyValue::new("http.response.status_code", i64::from(o.status)),
        ];
        if let Some(p) = o.policy {
            attrs.push(KeyValue::new("moat.policy", p.to_owned()));
        }
        if let Some(code) = o.grpc_status.and_then(|c| c.parse::<i64>().ok()) {
            attrs.push(KeyValue::new("rpc.grpc.status_code", code));
        }
        self.0.set_attributes(attrs);
        if o.status >= 500 || o.decision == "deny" {
            self.0
                .set_status(Status::error(format!("{} {}", o.status, o.reason)));
        }
        self.0.end_with_timestamp(SystemTime::now());
    }
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn id() -> SpiffeId {
        "spiffe://mesh.test/ns/shop/sa/orders".parse().unwrap()
    }

    #[test]
    fn endpoints_that_are_not_plain_otlp_grpc_urls_are_refused() {
        for bad in [
            "127.0.0.1:4317",
            "https://collector:4317",
            "http://",
            "collector",
        ] {
            let e = Tracing::start(bad, &id(), 1.0).unwrap_err();
            assert!(matches!(e, TraceError::Endpoint(_)), "{bad}: {e}");
        }
        let e = Tracing::start("http://127.0.0.1:4317", &id(), 1.5).unwrap_err();
        assert!(e.to_string().contains("between 0 and 1"), "{e}");
    }

    #[tokio::test]
    async fn a_span_continues_the_incoming_trace_and_names_itself_to_the_next_hop() {
        let t = Tracing::start("http://127.0.0.1:9", &id(), 1.0).unwrap();
        let mut h = HeaderMap::new();
        let incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        h.insert("traceparent", HeaderValue::from_static(incoming));
        let span = t.request(&mut h, SpanKind::Server, "test");
        let out = h["traceparent"].to_str().unwrap().to_owned();
        assert!(
            out.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
            "{out}"
        );
        assert!(
            out.ends_with("-01") && !out.contains("b7ad6b7169203331"),
            "{out}"
        );
        assert_eq!(
            out,
            format!(
                "00-{}-{}-01",
                span.0.span_context().trace_id(),
                span.0.span_context().span_id()
            )
        );
        // Not sampled upstream: not sampled here either, and still passed on.
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),
        );
        let span = t.request(&mut h, SpanKind::Server, "test");
        assert!(!span.0.is_recording());
        assert!(h["traceparent"].to_str().unwrap().ends_with("-00"));
        // No traceparent: a new trace starts here.
        let mut h = HeaderMap::new();
        t.request(&mut h, SpanKind::Server, "test");
        assert!(h["traceparent"].to_str().unwrap().ends_with("-01"));
    }
}
