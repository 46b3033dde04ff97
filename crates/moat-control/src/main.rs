//! `moat-control`: flags and environment in, `moat_control::serve` out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use moat_ca::CertTtl;
use moat_control::ca::ImportPaths;
use moat_control::kek_source::{KekLoadError, KekSource};
use moat_control::{ServeConfig, default_admin_id};
use moat_identity::{SpiffeId, TrustDomain};
use tracing_subscriber::filter::Targets;

/// Thousands of long-lived streams each hold many small buffers; with jemalloc the control
/// plane's RSS at 3,330 streams was 190 MB against glibc malloc's 202 MB, and its ramp took
/// 13 % less CPU (bench/results/control_plane_allocator.md). The proxy uses it too.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(
    name = "moat-control",
    version,
    about = "The moat control plane and certificate authority"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "MOAT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the control plane. The first start on an empty data directory initialises the CA.
    Serve(Box<ServeArgs>),
    /// Repair the CA offline, with the control plane stopped: for a CA that can no longer issue
    /// (the control plane then waits in recovery mode and says which command to run).
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Show the CA certificates, their expiry and what the CA needs now.
    Status(OfflineArgs),
    /// Replace the issuing intermediate: a new one under the held root, or the operator's own
    /// (`--intermediate-cert` and `--intermediate-key`) when the CA does not hold its root key.
    RotateIntermediate {
        #[command(flatten)]
        args: OfflineArgs,
        /// A new intermediate certificate signed by your root (PEM).
        #[arg(long, requires = "intermediate_key")]
        intermediate_cert: Option<PathBuf>,
        /// Its PKCS#8 key (PEM).
        #[arg(long, requires = "intermediate_cert")]
        intermediate_key: Option<PathBuf>,
    },
    /// Replace the root. While the current root is valid this only takes step 1 of the normal
    /// rotation (the new root joins the bundle); start the control plane and finish with
    /// `moat ca rotate-root`. Once it has expired, a new root and intermediate replace it at
    /// once, and every sidecar must be given the new trust bundle.
    RotateRoot(OfflineArgs),
}

#[derive(clap::Args, Debug)]
struct OfflineArgs {
    /// The control plane's data directory (the control plane must be stopped).
    #[arg(long, env = "MOAT_DATA_DIR")]
    data_dir: PathBuf,
    /// File holding the key-encryption key (the one the control plane uses).
    #[arg(long, env = "MOAT_KEK_FILE")]
    kek_file: Option<PathBuf>,
    /// Development mode: use the development key in the data directory.
    #[arg(long)]
    dev: bool,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Directory for the embedded store and the admin credential.
    #[arg(long, env = "MOAT_DATA_DIR")]
    data_dir: PathBuf,
    /// Where the state lives: `embedded` (a file in the data directory, one process) or
    /// etcd://HOST:PORT[,HOST:PORT...] (an etcd cluster that several replicas share).
    #[arg(long, env = "MOAT_STORE", default_value = "embedded")]
    store: String,
    /// With --store etcd://...: the CA (PEM) that signed the etcd members' certificates; the
    /// members are then reached over TLS.
    #[arg(long, env = "MOAT_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// With --etcd-ca: a client certificate (PEM) for etcd's client-certificate auth.
    #[arg(long, env = "MOAT_ETCD_CERT", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// The key (PEM) of --etcd-cert.
    #[arg(long, env = "MOAT_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "MOAT_LISTEN", default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// Trust domain of the mesh (fixed at first start).
    #[arg(long, env = "MOAT_TRUST_DOMAIN", default_value = "moat.local")]
    trust_domain: TrustDomain,
    /// File holding the key-encryption key (32 bytes, base64 or hex) that seals the CA keys.
    #[arg(long, env = "MOAT_KEK_FILE")]
    kek_file: Option<PathBuf>,
    /// Development mode: without a KEK, create one (0600) in the data directory.
    #[arg(long)]
    dev: bool,
    /// First start only: your root CA certificate (PEM).
    #[arg(long)]
    import_root_cert: Option<PathBuf>,
    /// First start only: the root's PKCS#8 key (PEM); moat then creates its own intermediate.
    #[arg(long, conflicts_with_all = ["import_intermediate_cert", "import_intermediate_key"])]
    import_root_key: Option<PathBuf>,
    /// First start only: an intermediate CA certificate under the root (PEM) to issue with.
    #[arg(long, requires = "import_intermediate_key")]
    import_intermediate_cert: Option<PathBuf>,
    /// First start only: the intermediate's PKCS#8 key (PEM).
    #[arg(long, requires = "import_intermediate_cert")]
    import_intermediate_key: Option<PathBuf>,
    /// Default leaf certificate lifetime (5m to 24h).
    #[arg(long, env = "MOAT_DEFAULT_CERT_TTL", default_value = "1h", value_parser = parse_ttl)]
    default_cert_ttl: CertTtl,
    /// Shortest certificate lifetime callers may request (at least 1s). Lower it only for test
    /// meshes that exercise rotation every few seconds.
    #[arg(long, env = "MOAT_MIN_CERT_TTL", default_value = "5m", value_parser = parse_ttl_bound)]
    min_cert_ttl: std::time::Duration,
    /// Longest certificate lifetime issued on request (up to 24h, not below --min-cert-ttl or
    /// --default-cert-ttl): a request for longer, from a proxy or an admin, is issued for this
    /// long, whatever a sidecar asks for.
    #[arg(long, env = "MOAT_MAX_CERT_TTL", default_value = "24h", value_parser = parse_ttl_bound)]
    max_cert_ttl: std::time::Duration,
    /// Admin identities allowed to use the Admin API (repeatable; short forms allowed).
    /// The first one gets the credential written to <data-dir>/admin.
    #[arg(
        long = "admin-identity",
        env = "MOAT_ADMIN_IDENTITIES",
        value_delimiter = ','
    )]
    admin_identities: Vec<String>,
    /// Plain-HTTP admin port: /live, /ready, /metrics.
    #[arg(
        long = "admin",
        env = "MOAT_ADMIN_LISTEN",
        default_value = "127.0.0.1:7444"
    )]
    admin_listen: SocketAddr,
    /// Serve the sidecar-injection admission webhook (`POST /inject`, TLS) on this address.
    #[arg(long, env = "MOAT_WEBHOOK_LISTEN")]
    webhook: Option<SocketAddr>,
    /// DNS names of the webhook's certificate (what the API server dials).
    #[arg(
        long = "webhook-dns",
        env = "MOAT_WEBHOOK_DNS",
        value_delimiter = ',',
        default_value = "moat-control.moat-system.svc,moat-control.moat-system.svc.cluster.local"
    )]
    webhook_dns: Vec<String>,
    /// Injected sidecar: its image.
    #[arg(long, env = "MOAT_INJECT_IMAGE")]
    inject_image: Option<String>,
    /// Injected sidecar: the control-plane URL pods use.
    #[arg(long, env = "MOAT_INJECT_CONTROL_PLANE")]
    inject_control_plane: Option<String>,
    /// On Kubernetes: keep the trust bundle in a ConfigMap of this name (key bundle.pem) in
    /// every namespace, for injected sidecars to verify the control plane with.
    #[arg(long, env = "MOAT_PUBLISH_BUNDLE")]
    publish_bundle: Option<String>,
    /// The API server (default: in-cluster, from KUBERNETES_SERVICE_HOST/PORT).
    #[arg(long, env = "MOAT_KUBE_API")]
    kube_api: Option<String>,
    /// The bearer token file for the API server (default: the pod's service-account token).
    #[arg(long, requires = "kube_api")]
    kube_token_file: Option<PathBuf>,
    /// The API server's CA (default: the pod's service-account CA).
    #[arg(long, requires = "kube_api")]
    kube_ca_file: Option<PathBuf>,
    /// On Kubernetes: AccessPolicy and MeshConfig resources become the mesh's policies (and
    /// `moat policy apply` cannot change the ones they declare).
    #[arg(long, env = "MOAT_WATCH_POLICIES")]
    watch_policies: bool,
    /// With --publish-bundle: also keep the caBundle of this MutatingWebhookConfiguration (the
    /// sidecar injector's) equal to the mesh roots.
    #[arg(long, env = "MOAT_WEBHOOK_CONFIGURATION", requires = "publish_bundle")]
    webhook_configuration: Option<String>,
    /// How often the ConfigMaps are checked.
    #[arg(long, default_value = "30s", value_parser = parse_horizon)]
    publish_interval: std::time::Duration,
    /// Audit log: keep at most this many actions, and as many sampled refusals apart (the
    /// oldest go first).
    #[arg(long, env = "MOAT_AUDIT_MAX_ENTRIES", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(100..=100_000_000))]
    audit_max_entries: u64,
    /// Audit log: remove entries older than this.
    #[arg(long, env = "MOAT_AUDIT_RETENTION", default_value = "90d", value_parser = parse_retention)]
    audit_retention: std::time::Duration,
    /// Take the inbound address a sidecar announces whatever host it names. By default it must
    /// be the IP address the sidecar's own connection comes from, so that one certificate cannot
    /// list another pod's address under its service. Set this only where sidecars reach the
    /// control plane through NAT, or announce DNS names.
    #[arg(long, env = "MOAT_ANNOUNCE_ANY_ADDRESS")]
    announce_any_address: bool,
    /// Log a warning while the root or the intermediate expires within this.
    #[arg(long, env = "MOAT_CA_EXPIRY_WARNING", default_value = "30d", value_parser = parse_horizon)]
    ca_expiry_warning: std::time::Duration,
    /// Replace the intermediate automatically once it has lived this fraction of its life
    /// (0.1 to 0.95).
    #[arg(long, env = "MOAT_INTERMEDIATE_ROTATION_AT", default_value = "0.667", value_parser = parse_fraction)]
    intermediate_rotation_at: moat_ca::RotateAt,
    /// How often the CA certificates are checked against that point.
    #[arg(long, env = "MOAT_CA_CHECK_INTERVAL", default_value = "10m", value_parser = parse_check_interval)]
    ca_check_interval: std::time::Duration,
}

fn parse_fraction(s: &str) -> Result<moat_ca::RotateAt, String> {
    let f: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number (write e.g. 0.667)"))?;
    moat_ca::RotateAt::new(f).map_err(|e| e.to_string())
}

fn parse_check_interval(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_horizon(s)?;
    if d < std::time::Duration::from_secs(1) || d > std::time::Duration::from_secs(86_400) {
        return Err("check between every 1s and every 24h".into());
    }
    Ok(d)
}

fn parse_horizon(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 30d, 720h)"))
}

fn parse_retention(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_horizon(s)?;
    if d < std::time::Duration::from_secs(3600) {
        return Err("keep the audit log at least 1h".into());
    }
    Ok(d)
}

fn parse_ttl(s: &str) -> Result<CertTtl, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 30m, 1h, 12h)"))?;
    CertTtl::new(d).map_err(|e| e.to_string())
}

fn parse_ttl_bound(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 10s, 5m)"))?;
    if d < std::time::Duration::from_secs(1) || d > CertTtl::MAX {
        return Err("must be between 1s and 24h".into());
    }
    Ok(d)
}

/// Colours only on a terminal: log files and collectors get plain lines.
fn init_logging(format: &str, filter: Targets) {
    use std::io::IsTerminal as _;
    let ansi = std::io::stderr().is_terminal();
    moat_log::init(format == "json", filter, ansi, std::io::stderr);
}

/// The `MOAT_LOG` filter.
fn log_filter() -> Result<Targets, moat_log::FilterError> {
    moat_log::filter_from_env("info,moat_control=debug")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, run until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

fn config(args: ServeArgs) -> Result<ServeConfig, String> {
    if args.max_cert_ttl < args.min_cert_ttl || args.max_cert_ttl < args.default_cert_ttl.get() {
        return Err(format!(
            "--max-cert-ttl {} is below --min-cert-ttl {} or --default-cert-ttl {}: raise it, or lower them",
            humantime::format_duration(args.max_cert_ttl),
            humantime::format_duration(args.min_cert_ttl),
            humantime::format_duration(args.default_cert_ttl.get()),
        ));
    }
    let publish_bundle = match &args.publish_bundle {
        None => None,
        Some(name) => Some(moat_control::kube_bundle::KubeConfig {
            server: api_server(&args).map_err(|e| format!("--publish-bundle: {e}"))?,
            configmap: name.clone(),
            webhook: args.webhook_configuration.clone(),
            interval: args.publish_interval,
        }),
    };
    let watch_policies = if args.watch_policies {
        Some(api_server(&args).map_err(|e| format!("--watch-policies: {e}"))?)
    } else {
        None
    };
    let td = args.trust_domain;
    let admins = if args.admin_identities.is_empty() {
        vec![default_admin_id(&td)]
    } else {
        args.admin_identities
            .iter()
            .map(|s| {
                SpiffeId::parse_with_default(s, &td).map_err(|e| format!("--admin-identity: {e}"))
            })
            .collect::<Result<_, _>>()?
    };
    let store = moat_control::store_config::StoreConfig::parse(
        &args.store,
        &moat_control::store_config::EtcdTlsFiles {
            ca: args.etcd_ca.clone(),
            cert: args.etcd_cert.clone(),
            key: args.etcd_key.clone(),
        },
    )?;
    Ok(ServeConfig {
        data_dir: args.data_dir,
        store,
        listen: args.listen,
        open_files: moat_tls::pending::raise_open_file_limit(),
        trust_domain: td.clone(),
        kek: kek_source(args.kek_file, args.dev),
        import: ImportPaths {
            root_cert: args.import_root_cert,
            root_key: args.import_root_key,
            intermediate_cert: args.import_intermediate_cert,
            intermediate_key: args.import_intermediate_key,
        },
        default_ttl: args.default_cert_ttl,
        min_ttl: args.min_cert_ttl,
        max_ttl: args.max_cert_ttl,
        admins,
        admin_listen: args.admin_listen,
        publish_bundle,
        watch_policies,
        webhook: args.webhook.map(|listen| {
            let defaults = moat_inject::InjectConfig::default();
            moat_control::webhook::WebhookConfig {
                listen,
                dns_names: args.webhook_dns.clone(),
                inject: moat_inject::InjectConfig {
                    proxy_image: args.inject_image.clone().unwrap_or(defaults.proxy_image),
                    control_plane: args
                        .inject_control_plane
                        .clone()
                        .unwrap_or(defaults.control_plane),
                    trust_domain: td.to_string(),
                    proxy_uid: defaults.proxy_uid,
                },
            }
        }),
        ca_expiry_warning: args.ca_expiry_warning,
        rotate_at: args.intermediate_rotation_at,
        ca_check_interval: args.ca_check_interval,
        audit_retention: moat_control::audit::Retention {
            max_entries: usize::try_from(args.audit_max_entries).unwrap_or(usize::MAX),
            max_age: args.audit_retention,
        },
        announce_any_address: args.announce_any_address,
    })
}

/// The API server: `--kube-api` with its token and CA files, or the pod's own.
fn api_server(
    args: &ServeArgs,
) -> Result<moat_control::kube_api::ApiServer, moat_control::kube_api::KubeError> {
    match &args.kube_api {
        Some(url) => Ok(moat_control::kube_api::ApiServer::at(
            url.clone(),
            args.kube_token_file.clone(),
            args.kube_ca_file.clone(),
        )),
        None => moat_control::kube_api::ApiServer::in_cluster(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match log_filter() {
        Ok(filter) => init_logging(&cli.log_format, filter),
        Err(e) => {
            eprintln!("moat-control: {e}");
            return ExitCode::from(2);
        }
    }
    tune_allocator();
    let args = match cli.command {
        Command::Serve(args) => *args,
        Command::Ca(cmd) => {
            return exit_code(moat_control::offline::run(offline(cmd)).await);
        }
    };
    let cfg = match config(args) {
        Ok(c) => c,
        Err(e) => {
            moat_log::fatal(format_args!("moat-control: {e}"));
            return ExitCode::from(2);
        }
    };
    exit_code(moat_control::serve(cfg, shutdown_signal()).await)
}

/// Sets jemalloc up for thousands of long-lived streams. Freed pages go back to the kernel
/// at once (`dirty_decay_ms` 0, against 10 s by default), so the buffers each new stream
/// allocates come from untouched pages and only the pages a stream writes count in its RSS:
/// at 10,000 proxies over 3 replicas, 206–226 MB per replica against 242–254 MB, for the same
/// CPU (bench/results/control_plane_allocator.md). A background thread does the purging, also
/// while the control plane is idle after a ramp or a storm of reconnections.
fn tune_allocator() {
    use tikv_jemalloc_ctl::{Access as _, AsName as _};
    const WHY: &str = "memory freed after a burst stays with the process for a while";
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!("{WHY}: cannot start the allocator's purging thread ({e})");
    }
    // Arenas created from now on, then the ones the runtime's threads already use (an arena
    // no thread has used yet refuses the write, and takes the new default when created).
    if let Err(e) = b"arenas.dirty_decay_ms\0".name().write(0isize) {
        tracing::warn!("{WHY}: cannot set the allocator's decay time ({e})");
        return;
    }
    let arenas = tikv_jemalloc_ctl::arenas::narenas::read().unwrap_or(0);
    for i in 0..arenas {
        let key = format!("arena.{i}.dirty_decay_ms\0");
        let _ = key.as_bytes().name().write(0isize);
    }
}

/// 0 on success, 2 for a missing key-encryption key (a usage problem), else 1; the error goes
/// to stderr.
fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if matches!(e.downcast_ref(), Some(KekLoadError::Missing)) => {
            moat_log::fatal(format_args!("moat-control: {e}"));
            ExitCode::from(2)
        }
        Err(e) => {
            moat_log::fatal(format_args!("moat-control: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Where the key-encryption key comes from: `--kek-file`, else `MOAT_KEK`, else (`--dev`) the
/// development key in the data directory.
fn kek_source(file: Option<PathBuf>, dev: bool) -> KekSource {
    KekSource {
        file,
        inline: std::env::var("MOAT_KEK")
            .ok()
            .filter(|s| !s.trim().is_empty()),
        dev,
    }
}

fn offline(cmd: CaCommand) -> moat_control::offline::Command {
    use moat_control::offline::{Action, Command};
    let (args, action) = match cmd {
        CaCommand::Status(a) => (a, Action::Status),
        CaCommand::RotateIntermediate {
            args,
            intermediate_cert,
            intermediate_key,
        } => (
            args,
            Action::RotateIntermediate {
                import: intermediate_cert.zip(intermediate_key),
            },
        ),
        CaCommand::RotateRoot(a) => (a, Action::RotateRoot),
    };
    Command {
        kek: kek_source(args.kek_file, args.dev),
        data_dir: args.data_dir,
        action,
    }
}
