//! How both binaries answer `/metrics`. prometheus-client writes OpenMetrics 1.0; Prometheus
//! servers ask for it, but `promtool check metrics`, older scrapers and most tools that read the
//! endpoint by hand expect the classic text format 0.0.4. [`Format::negotiate`] reads the
//! request's `Accept` header (classic text unless OpenMetrics is preferred), and [`encode`]
//! writes the registry in that format. [`build_info`] registers `moat_build_info`; [`Held`] keeps a
//! gauge of work in progress true however the work ends.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Upper bounds, in milliseconds, of the latency buckets of the per-edge counters the sidecars
/// report to the control plane (`moat edges`); one more bucket holds the rest. Shared so the
/// sidecar that counts and the control plane that answers agree.
pub const EDGE_LATENCY_BOUNDS_MS: [f64; 14] = [
    0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// An exposition format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The classic Prometheus text format, version 0.0.4 (the default).
    Text,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header prefers among the two served: OpenMetrics only when it
    /// is acceptable with a quality at least that of the classic text; anything else (no header,
    /// `*/*`, `text/plain`, an unparsable one) gets the classic text.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Text;
        };
        let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
        for range in accept.split(',') {
            let Ok(m) = range.trim().parse::<mime::Mime>() else {
                continue;
            };
            let q = m
                .get_param("q")
                .and_then(|q| q.as_str().parse::<f32>().ok())
                .unwrap_or(1.0);
            match (m.type_().as_str(), m.subtype().as_str()) {
                ("application", "openmetrics-text") => openmetrics = openmetrics.max(q),
                ("text", "plain") | ("text", "*") | ("*", "*") => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }

    /// The format a request's headers prefer (see [`Format::negotiate`]).
    pub fn requested(headers: &http::HeaderMap) -> Format {
        Format::negotiate(
            headers
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok()),
        )
    }

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// `registry` written in `format`.
pub fn encode(registry: &Registry, format: Format) -> String {
    let mut openmetrics = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut openmetrics, registry);
    match format {
        Format::OpenMetrics => openmetrics,
        Format::Text => classic_text(&openmetrics),
    }
}

/// The classic text of an OpenMetrics exposition. They differ only in metadata: a counter
/// family is named without `_total` in OpenMetrics and with it in the classic format, which
/// has no `info`/`unknown` types (they are a gauge and `untyped`), no `# UNIT` and no
/// `# EOF`. Samples are written the same way in both.
fn classic_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A family's HELP line comes before its TYPE line, which decides the family's name.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" => (name.to_owned(), "untyped"),
                other => (name.to_owned(), other),
            };
            if let Some((_, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    version: &'static str,
}

/// Registers `moat_build_info{component, version} 1`, the series dashboards join on to tell
/// which release each process runs (`registry` is prefixed `moat`).
pub fn build_info(registry: &mut Registry, component: &'static str, version: &'static str) {
    let info = Family::<BuildLabels, Gauge>::default();
    info.get_or_create(&BuildLabels { component, version })
        .set(1);
    registry.register(
        "build_info",
        "Always 1; the labels say which moat component and release this process is",
        info,
    );
}

/// One unit of a gauge that counts work in progress (handshakes waiting, say), held until
/// dropped: every way the work can end, an error or a cancelled task included, gives it back.
#[derive(Debug)]
pub struct Held(Gauge);

impl Held {
    /// Counts one more in `gauge` until the returned value is dropped.
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Held(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::histogram::Histogram;

    use super::*;

    #[test]
    fn a_held_unit_is_given_back_however_it_is_dropped() {
        let gauge = Gauge::default();
        let one = Held::new(&gauge);
        let two = Held::new(&gauge);
        assert_eq!(gauge.get(), 2);
        drop(one);
        assert_eq!(gauge.get(), 1);
        // A future cancelled while it holds one (a handshake task dropped) gives it back too.
        let work = async move {
            let _two = two;
            std::future::pending::<()>().await;
        };
        drop(work);
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn the_classic_text_is_the_default_and_openmetrics_is_served_when_preferred() {
        use Format::*;
        for (accept, want) in [
            (None, Text),
            (Some("*/*"), Text),
            (Some("text/plain;version=0.0.4"), Text),
            (Some("garbage;;;"), Text),
            (
                Some("application/openmetrics-text;version=1.0.0"),
                OpenMetrics,
            ),
            // What Prometheus 2.x sends.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                OpenMetrics,
            ),
            (
                Some("text/plain;version=0.0.4;q=0.9,application/openmetrics-text;q=0.5"),
                Text,
            ),
            (Some("application/openmetrics-text;q=0"), Text),
        ] {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
    }

    #[test]
    fn counters_carry_total_in_their_family_name_only_in_the_classic_text() {
        let mut registry = Registry::with_prefix("moat");
        let c = Counter::<u64>::default();
        c.inc();
        registry.register("requests", "HTTP requests handled", c);
        let h = Histogram::new([0.1, 1.0]);
        h.observe(0.5);
        registry.register("request_duration_seconds", "Request duration", h);
        build_info(&mut registry, "proxy", "1.2.3");

        let om = encode(&registry, Format::OpenMetrics);
        assert!(om.contains("# TYPE moat_requests counter\n"), "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");

        let text = encode(&registry, Format::Text);
        assert!(
            text.contains("# HELP moat_requests_total HTTP requests handled"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE moat_requests_total counter\n"),
            "{text}"
        );
        assert!(text.contains("\nmoat_requests_total 1\n"), "{text}");
        assert!(
            text.contains("# TYPE moat_request_duration_seconds histogram\n"),
            "{text}"
        );
        assert!(
            text.contains("moat_request_duration_seconds_bucket{le=\"1.0\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("moat_build_info{component=\"proxy\",version=\"1.2.3\"} 1\n"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
    }
}
