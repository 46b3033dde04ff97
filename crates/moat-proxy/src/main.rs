//! `moat-proxy`: flags and environment in, `moat_proxy::run` out.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use moat_identity::{SpiffeId, TrustDomain};
use moat_proxy::config::{Bootstrap, ProxyConfig, Unknown, Upstream};
use tracing_subscriber::filter::Targets;

/// Every request allocates and frees many small buffers, and the TCP path a TLS record's worth
/// per write; jemalloc does both with less CPU than glibc's malloc (and mimalloc, tried too,
/// halved the bulk TCP rate): bench/results/compare-ab-isolation.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(name = "moat-proxy", version, about = "The moat sidecar proxy")]
struct Args {
    /// Control-plane address; several replicas comma-separated (the sidecar starts at a random
    /// one and moves to a random other one when it fails), or one DNS name that resolves to them
    /// all.
    #[arg(
        long,
        env = "MOAT_CONTROL_PLANE",
        default_value = "https://127.0.0.1:7443",
        value_delimiter = ','
    )]
    control_plane: Vec<String>,
    /// This workload's identity: `orders`, `shop/orders` or a full spiffe:// ID.
    #[arg(long, env = "MOAT_IDENTITY")]
    identity: String,
    /// Trust domain for short identity forms.
    #[arg(long, env = "MOAT_TRUST_DOMAIN", default_value = "moat.local")]
    trust_domain: TrustDomain,
    /// File holding the join token for the first certificate.
    #[arg(
        long,
        env = "MOAT_TOKEN_FILE",
        required_unless_present = "k8s_token_file"
    )]
    token_file: Option<PathBuf>,
    /// On Kubernetes: the projected service-account token (audience `moat`) to prove the pod's
    /// identity with, instead of a join token. Re-read at every bootstrap.
    #[arg(long, env = "MOAT_K8S_TOKEN_FILE", conflicts_with = "token_file")]
    k8s_token_file: Option<PathBuf>,
    /// PEM roots to trust the control plane by (`moat ca bundle`).
    #[arg(long, env = "MOAT_TRUST_ANCHORS")]
    trust_anchors: PathBuf,
    /// Inbound mTLS listener.
    #[arg(long, env = "MOAT_INBOUND", default_value = "0.0.0.0:7143")]
    inbound: SocketAddr,
    /// The address other sidecars dial, HOST:PORT, or an IP address alone (v4, or v6 without
    /// brackets), which takes --inbound's port (default: --inbound, which must then not be a
    /// wildcard).
    #[arg(long, env = "MOAT_ADVERTISE")]
    advertise: Option<String>,
    /// The local app that inbound traffic goes to. Without it (transparent mode, with
    /// --transparent) each inbound connection goes to the port its caller dialled.
    #[arg(long, env = "MOAT_APP", required_unless_present = "transparent")]
    app: Option<SocketAddr>,
    /// Transparent mode: the listener that the interception rules (`moat-proxy init`) redirect
    /// the pod's outbound TCP to; the original destination decides where it goes.
    #[arg(long, env = "MOAT_TRANSPARENT")]
    transparent: Option<SocketAddr>,
    /// Intercepted connections to addresses outside the mesh: passthrough (connect directly)
    /// or deny.
    #[arg(long, env = "MOAT_UNKNOWN_DESTINATIONS", default_value = "passthrough", value_parser = ["passthrough", "deny"])]
    unknown_destinations: String,
    /// Outbound listener: SERVICE=ADDR (repeatable), e.g. orders=127.0.0.1:9001.
    #[arg(long = "upstream", env = "MOAT_UPSTREAMS", value_delimiter = ',')]
    upstreams: Vec<Upstream>,
    /// Admin listener (/ready, /live, /metrics, /config).
    #[arg(long, env = "MOAT_ADMIN", default_value = "127.0.0.1:7191")]
    admin: SocketAddr,
    /// Once every listener is bound, write their addresses as JSON (admin, inbound, upstreams in
    /// flag order, transparent) to this file, replaced whole: how to find a port given as 0.
    #[arg(long, env = "MOAT_ADDRESSES_FILE")]
    addresses_file: Option<PathBuf>,
    /// The app's kubelet probes, moved to the admin port by injection: JSON keyed by the
    /// `/app-health/<container>/<kind>` path the kubelet now calls (moat inject writes it).
    #[arg(long, env = "MOAT_APP_PROBES", value_parser = app_probes)]
    app_probes: Option<moat_proxy::app_probe::AppProbes>,
    /// How long SIGTERM waits for in-flight work.
    #[arg(long, env = "MOAT_DRAIN_TIMEOUT", default_value = "10s", value_parser = duration)]
    drain_timeout: Duration,
    /// Requested certificate lifetime (the control plane's default when omitted; capped by its
    /// --max-cert-ttl).
    #[arg(long, env = "MOAT_CERT_TTL", value_parser = duration)]
    cert_ttl: Option<Duration>,
    /// Ports carried as opaque TCP without protocol detection (comma-separated): outbound
    /// listener ports and/or the app port.
    #[arg(long, env = "MOAT_OPAQUE_PORTS", value_delimiter = ',')]
    opaque_ports: Vec<u16>,
    /// An HTTP/1 request head must arrive in full within this of its first byte, or the
    /// connection is closed (a connection idle between requests is governed by --idle-timeout).
    #[arg(long, env = "MOAT_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = timeout)]
    header_read_timeout: Duration,
    /// A request body the peer started must keep coming (or the response keep flowing) within
    /// this, or the connection is closed.
    #[arg(long, env = "MOAT_REQUEST_IDLE_TIMEOUT", default_value = "5m", value_parser = timeout)]
    request_idle_timeout: Duration,
    /// The peer must keep reading the response it asked for within this, or the connection is
    /// closed.
    #[arg(long, env = "MOAT_RESPONSE_IDLE_TIMEOUT", default_value = "60s", value_parser = timeout)]
    response_idle_timeout: Duration,
    /// A served connection with nothing in flight for this long is closed.
    #[arg(long, env = "MOAT_IDLE_TIMEOUT", default_value = "10m", value_parser = timeout)]
    idle_timeout: Duration,
    /// Requests one caller identity may have in flight at the app at once, across all its
    /// connections; more are answered 429 `caller-busy`.
    #[arg(long, env = "MOAT_MAX_REQUESTS_PER_CALLER", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_requests_per_caller: u32,
    /// Mesh connections one caller identity may hold open to this sidecar at once; one more is
    /// closed after its handshake, before any of it reaches the app.
    #[arg(long, env = "MOAT_MAX_CONNECTIONS_PER_CALLER", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections_per_caller: u32,
    /// How the kernel schedules the sidecar: `batch` (SCHED_BATCH: a thread woken by its
    /// sockets does not preempt the app or the next hop, and handles several ready connections
    /// when it runs; decision 50) or `normal` (as started: every wake-up may preempt).
    #[arg(long, env = "MOAT_CPU_SCHEDULING", value_enum, default_value_t = moat_proxy::cpu::CpuScheduling::Batch)]
    cpu_scheduling: moat_proxy::cpu::CpuScheduling,
    /// Worker threads (1: everything on one thread).
    #[arg(long, env = "MOAT_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: u16,
    /// Export one span per HTTP request to this OTLP/gRPC collector (http://HOST:4317),
    /// continuing the request's W3C traceparent.
    #[arg(long, env = "MOAT_OTLP_ENDPOINT", value_parser = otlp_endpoint)]
    otlp_endpoint: Option<String>,
    /// Share of traces that start at this sidecar (no incoming traceparent) to export, 0 to 1;
    /// requests with a traceparent follow its sampled flag.
    #[arg(long, env = "MOAT_OTLP_SAMPLE_RATIO", default_value_t = 1.0, value_parser = sample_ratio)]
    otlp_sample_ratio: f64,
    /// Log format.
    #[arg(long, env = "MOAT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn app_probes(s: &str) -> Result<moat_proxy::app_probe::AppProbes, String> {
    s.parse()
        .map_err(|e: moat_proxy::app_probe::AppProbesError| e.to_string())
}

fn otlp_endpoint(s: &str) -> Result<String, String> {
    moat_proxy::trace::check_endpoint(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

fn sample_ratio(s: &str) -> Result<f64, String> {
    let r: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number (write e.g. 0.1)"))?;
    moat_proxy::trace::check_ratio(r).map_err(|e| e.to_string())?;
    Ok(r)
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 10s, 1m)"))
}

/// A connection timeout: between 1s and 24h (zero would close everything at once).
fn timeout(s: &str) -> Result<Duration, String> {
    let d = duration(s)?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(86_400) {
        return Err("must be between 1s and 24h".into());
    }
    Ok(d)
}

/// The `--control-plane` URLs, checked.
fn control_planes(urls: &[String]) -> Result<Vec<String>, String> {
    let urls: Vec<String> = urls
        .iter()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err("--control-plane is empty: give https://HOST:PORT (comma-separated for several replicas)".into());
    }
    if let Some(bad) = urls.iter().find(|u| !u.starts_with("https://")) {
        return Err(format!(
            "--control-plane {bad:?}: the control plane is reached over TLS; write https://HOST:PORT"
        ));
    }
    Ok(urls)
}

fn config(a: &Args) -> Result<ProxyConfig, String> {
    let identity = SpiffeId::parse_with_default(&a.identity, &a.trust_domain)
        .map_err(|e| format!("--identity: {e}"))?;
    let advertise = match &a.advertise {
        // An IP address alone (the injected sidecar's pod IP): `IP:PORT` would be ambiguous for
        // an IPv6 address, and unparseable for the control plane.
        Some(s) => match s.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, a.inbound.port()).to_string(),
            Err(_) => s.clone(),
        },
        None if a.inbound.ip().is_unspecified() => {
            return Err(format!(
                "--inbound {} is a wildcard address: pass --advertise HOST:PORT, the address other sidecars should dial",
                a.inbound
            ));
        }
        None => a.inbound.to_string(),
    };
    for up in &a.upstreams {
        up.identity(&a.trust_domain).map_err(|e| e.to_string())?;
    }
    Ok(ProxyConfig {
        control_plane: moat_proxy::config::ControlPlanes::new(control_planes(&a.control_plane)?),
        trust_domain: a.trust_domain.clone(),
        identity,
        bootstrap: match (&a.token_file, &a.k8s_token_file) {
            (_, Some(f)) => Bootstrap::ServiceAccount(f.clone()),
            (Some(f), None) => Bootstrap::JoinToken(f.clone()),
            (None, None) => return Err("give --token-file or --k8s-token-file".into()),
        },
        trust_anchors: a.trust_anchors.clone(),
        inbound: a.inbound,
        advertise,
        app: a.app,
        upstreams: a.upstreams.clone(),
        transparent: a.transparent,
        unknown_destinations: if a.unknown_destinations == "deny" {
            Unknown::Deny
        } else {
            Unknown::Passthrough
        },
        admin: a.admin,
        addresses_file: a.addresses_file.clone(),
        app_probes: a.app_probes.clone().unwrap_or_default(),
        drain_timeout: a.drain_timeout,
        cert_ttl: a.cert_ttl,
        opaque_ports: a.opaque_ports.clone(),
        limits: moat_proxy::conn_guard::ConnLimits {
            header_read: a.header_read_timeout,
            request_idle: a.request_idle_timeout,
            response_idle: a.response_idle_timeout,
            idle: a.idle_timeout,
        },
        requests_per_caller: a.max_requests_per_caller as usize,
        connections_per_caller: a.max_connections_per_caller as usize,
        open_files: moat_tls::pending::raise_open_file_limit(),
        tracing: a
            .otlp_endpoint
            .clone()
            .map(|endpoint| moat_proxy::trace::TraceConfig {
                endpoint,
                sample_ratio: a.otlp_sample_ratio,
            }),
    })
}

/// Logs go to stderr in batches (see `moat_proxy::logging`); dropping the guard flushes.
fn init_logging(format: &str, filter: Targets) -> Logs {
    use std::io::IsTerminal as _;
    let (writer, guard) = moat_proxy::logging::Batched::new(std::io::stderr());
    moat_log::init(
        format == "json",
        filter,
        std::io::stderr().is_terminal(),
        writer,
    );
    guard
}

/// The `MOAT_LOG` filter.
fn log_filter() -> Result<Targets, moat_log::FilterError> {
    moat_log::filter_from_env("info,moat::access=off")
}

type Logs = moat_proxy::logging::FlushGuard<std::io::Stderr>;

/// Writes `message` last: after the buffered logs, on stderr (text logs), or as the last log
/// event (JSON logs).
fn fail(logs: Logs, message: String, code: ExitCode) -> ExitCode {
    if moat_log::json() {
        moat_log::fatal(format_args!("{message}"));
        drop(logs);
    } else {
        drop(logs);
        eprintln!("{message}");
    }
    code
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

fn main() -> ExitCode {
    // `moat-proxy init`: install the interception rules (an init container's job), then exit.
    if std::env::args().nth(1).as_deref() == Some("init") {
        let args = moat_proxy::init::InitArgs::parse_from(std::env::args().skip(1));
        let filter = match log_filter() {
            Ok(f) => f,
            Err(e) => {
                eprintln!("moat-proxy init: {e}");
                return ExitCode::from(2);
            }
        };
        let logs = init_logging("text", filter);
        return match moat_proxy::init::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(logs, format!("moat-proxy init: {e:#}"), ExitCode::FAILURE),
        };
    }
    let args = Args::parse();
    // Before any thread starts (the log writer's included), so that every one inherits it.
    let scheduled = moat_proxy::cpu::apply(args.cpu_scheduling);
    let filter = match log_filter() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("moat-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let logs = init_logging(&args.log_format, filter);
    if let Err(e) = scheduled {
        tracing::warn!("--cpu-scheduling batch: {e}");
    }
    let cfg = match config(&args) {
        Ok(c) => c,
        Err(e) => return fail(logs, format!("moat-proxy: {e}"), ExitCode::from(2)),
    };
    // One worker (the default): everything runs on the main thread — no hand-offs between
    // threads, and no second thread's stack and malloc arena in every sidecar's memory.
    let mut builder = if args.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(usize::from(args.workers));
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            let message = format!("moat-proxy: cannot start the runtime: {e}");
            return fail(logs, message, ExitCode::FAILURE);
        }
    };
    // jemalloc hands freed pages back to the kernel only while the process keeps allocating,
    // unless its background thread purges them: without it a sidecar left idle after a burst
    // of connections would keep the burst's memory (bench/results/compare.md).
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(
            "memory freed after a burst stays with the process until the next one: cannot start the allocator's purging thread ({e})"
        );
    }
    let result = runtime.block_on(moat_proxy::run(cfg, shutdown_signal()));
    // Tasks still running (connections past the drain timeout) go now, before the last lines.
    drop(runtime);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(logs, format!("moat-proxy: {e:#}"), ExitCode::FAILURE),
    }
}
