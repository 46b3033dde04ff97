//! `moat`, the operator CLI. Flags are parsed here; each command group lives in `commands/`.
//! Exit codes: 0 ok, 1 failure (with a message saying what to do), 2 usage.

mod commands;
mod connect;
mod creds;
mod output;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _, Subcommand};

/// Settings shared by every command that talks to the control plane.
#[derive(clap::Args, Debug, Clone)]
pub struct Global {
    /// Control-plane address; several replicas comma-separated (the first that answers is
    /// used).
    #[arg(
        long,
        global = true,
        env = "MOAT_CONTROL_PLANE",
        default_value = "https://127.0.0.1:7443"
    )]
    pub control_plane: String,
    /// Admin credential directory (cert.pem, key.pem, bundle.pem).
    #[arg(
        long,
        global = true,
        env = "MOAT_CREDENTIALS",
        default_value = "moat-data/admin"
    )]
    pub credentials: PathBuf,
}

#[derive(clap::Parser, Debug)]
#[command(name = "moat", version, about = "Operate a moat service mesh")]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a whole mesh on this machine and watch it work: control plane, three services with
    /// sidecars, an intruder, a live policy change and a certificate rotation.
    Demo(commands::demo::DemoArgs),
    /// Join tokens that let a workload obtain its first certificate.
    #[command(subcommand)]
    Token(commands::token::TokenCmd),
    /// The mesh certificate authority.
    #[command(subcommand)]
    Ca(commands::ca::CaCmd),
    /// Workload certificates: issue, request with a token, renew, inspect.
    #[command(subcommand)]
    Cert(commands::cert::CertCmd),
    /// Allow-lists: apply, get, delete, validate.
    #[command(subcommand)]
    Policy(commands::policy::PolicyCmd),
    /// Every connected proxy: identity, address, certificate, snapshot, bundle, last seen.
    Status(commands::status::StatusArgs),
    /// Revoke an identity or a certificate (pushed to every proxy at once), or lift it.
    Revoke(commands::revoke::RevokeArgs),
    /// Health checks, one line each; exits 1 when any fails (for CI and cron).
    Check(commands::check::CheckArgs),
    /// Show the newest control-plane audit log entries.
    Audit(commands::audit::AuditArgs),
    /// Add the moat sidecar to the workloads of a Kubernetes manifest (offline; prints the result).
    Inject(commands::inject::InjectArgs),
    /// Print the Kubernetes manifests that install moat (`moat install | kubectl apply -f -`).
    Install(commands::install::InstallArgs),
    /// Per edge (caller → service): request rate, success rate, p50/p99 latency, denials by
    /// reason, from the sidecars' counters, over a window.
    Edges(commands::edges::EdgesArgs),
    /// `moat edges`, refreshing in the terminal.
    Top(commands::edges::TopArgs),
    /// The calls a service's sidecars decide on, live: caller, method, path, status, decision
    /// with its reason and policy, latency, request id.
    Tap(commands::tap::TapArgs),
    /// This CLI's release and the control plane's.
    Version(commands::version::VersionArgs),
    /// Print a shell completion script: `source <(moat completion bash)`.
    Completion { shell: clap_complete::Shell },
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some(e) = misplaced_control_plane(&matches) {
        e.exit();
    }
    let result = match cli.command {
        Command::Demo(a) => commands::demo::run(a).await,
        Command::Token(c) => commands::token::run(&cli.global, c).await,
        Command::Ca(c) => commands::ca::run(&cli.global, c).await,
        Command::Cert(c) => commands::cert::run(&cli.global, c).await,
        Command::Policy(c) => commands::policy::run(&cli.global, c).await,
        Command::Status(a) => commands::status::run(&cli.global, a).await,
        Command::Revoke(a) => commands::revoke::run(&cli.global, a).await,
        Command::Check(a) => commands::check::run(&cli.global, a).await,
        Command::Audit(a) => commands::audit::run(&cli.global, a).await,
        Command::Inject(a) => commands::inject::run(a),
        Command::Install(a) => commands::install::run(a),
        Command::Version(a) => commands::version::run(&cli.global, a).await,
        Command::Edges(a) => commands::edges::edges(&cli.global, a).await,
        Command::Top(a) => commands::edges::top(&cli.global, a).await,
        Command::Tap(a) => commands::tap::run(&cli.global, a).await,
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "moat", &mut std::io::stdout());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `moat inject --control-plane URL` looks like it sets the address the injected sidecars use,
/// but `--control-plane` is where this CLI itself connects, and inject connects nowhere: a usage
/// error naming the flag that does it, instead of a URL silently ignored.
fn misplaced_control_plane(matches: &clap::ArgMatches) -> Option<clap::Error> {
    let inject = matches.subcommand_matches("inject")?;
    (inject.value_source("control_plane") == Some(clap::parser::ValueSource::CommandLine)).then(
        || {
            Cli::command().error(
                clap::error::ErrorKind::ArgumentConflict,
                "moat inject does not connect to the control plane, so --control-plane is not used; \
                 the address the injected sidecars use is --control-plane-url URL",
            )
        },
    )
}

/// A reader that stops early (`moat cert inspect F | head -1`) closes our stdout; `println!`
/// then panics ("failed printing to stdout: Broken pipe"). Like other command-line tools, stop
/// quietly instead: the reader has what it asked for. The case is told by the state of stdout
/// itself (its reader is gone), not by the panic's text. Any other panic keeps the default
/// report.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if stdout_reader_gone() {
            std::process::exit(0);
        }
        default(info);
    }));
}

/// Whether stdout is a pipe or socket whose reader has closed it (poll reports an error on it).
fn stdout_reader_gone() -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd as _;
    let out = std::io::stdout();
    let mut fds = [PollFd::new(out.as_fd(), PollFlags::POLLOUT)];
    poll(&mut fds, PollTimeout::ZERO).is_ok()
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLERR))
}
