//! Test-only helpers for running the real moat binaries: find (and build, once per test
//! process) `moat-control`, `moat-proxy` and `moat`; start a control plane on a free loopback
//! port with its own data directory and a KEK kept outside it, restart it on the same port or
//! `kill -9` it; run CLI commands against it; start sidecars next to test apps (`apps`).

pub mod apps;
pub mod etcd;
pub mod mesh;
mod proxy;

pub use proxy::{Proxy, apply_policy};

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// The directory holding the workspace's binaries for the profile this test was built with.
fn bin_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target/debug"))
}

/// Builds the binaries once per process, so tests never run stale ones. Set
/// `MOAT_TEST_PREBUILT=1` when the binaries were just built (CI does).
fn ensure_built() -> anyhow::Result<()> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            if std::env::var_os("MOAT_TEST_PREBUILT").is_some() {
                return Ok(());
            }
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let mut cmd = Command::new(cargo);
            cmd.args([
                "build",
                "--quiet",
                "-p",
                "moat-control",
                "-p",
                "moat-cli",
                "-p",
                "moat-proxy",
                "-p",
                "moat-demo-app",
                "--bins",
                // The etcd store backend, for the replicated control-plane tests.
                "--features",
                "moat-control/etcd",
            ]);
            if bin_dir().file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "building the binaries failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(())
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The path of a workspace binary, built if needed.
pub fn bin(name: &str) -> PathBuf {
    if let Err(e) = ensure_built() {
        panic!("{e:#}");
    }
    let path = bin_dir().join(name);
    assert!(path.exists(), "{} does not exist", path.display());
    path
}

/// A running (or stopped) `moat-control serve`.
#[derive(Debug)]
pub struct ControlPlane {
    child: Option<Child>,
    addr: String,
    admin_addr: String,
    /// `host:port` of the injection webhook, when started with `--webhook`.
    webhook_addr: String,
    data: tempfile::TempDir,
    secrets: tempfile::TempDir,
    log: PathBuf,
    /// The gRPC port, kept across restarts (proxies reconnect to the same URL).
    listen: ReservedPort,
    extra_args: Vec<String>,
    /// Environment for the control plane and the CLI runs against it (e.g. a moved clock).
    env: Vec<(String, String)>,
}

/// A clock for the real binaries, moved with libfaketime: every process started with
/// [`Clock::env`] reads its offset from one file, so a test can move the whole mesh forward
/// (e.g. a year, past the intermediate's end) while the processes keep running. Monotonic time
/// is left alone (timers keep their pace).
#[derive(Debug)]
pub struct Clock {
    dir: tempfile::TempDir,
    library: PathBuf,
}

impl Clock {
    /// A clock at the real time. Fails when libfaketime is not installed (`scripts/test`
    /// installs Debian's `faketime`).
    pub fn new() -> anyhow::Result<Self> {
        let library = ["x86_64-linux-gnu", "aarch64-linux-gnu"]
            .iter()
            .map(|arch| PathBuf::from(format!("/usr/lib/{arch}/faketime/libfaketime.so.1")))
            .find(|p| p.exists())
            .context(
                "libfaketime is not installed: run scripts/test, or apt-get install faketime",
            )?;
        let clock = Clock {
            dir: tempfile::tempdir()?,
            library,
        };
        clock.set("+0")?;
        Ok(clock)
    }

    /// Moves every process's clock to `offset` from the real time (libfaketime syntax, e.g.
    /// `+366d`); running processes see it within a second.
    pub fn set(&self, offset: &str) -> anyhow::Result<()> {
        std::fs::write(self.dir.path().join("offset"), format!("{offset}\n"))?;
        Ok(())
    }

    /// The environment that puts a process on this clock.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("LD_PRELOAD".into(), self.library.display().to_string()),
            (
                "FAKETIME_TIMESTAMP_FILE".into(),
                self.dir.path().join("offset").display().to_string(),
            ),
            ("FAKETIME_CACHE_DURATION".into(), "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ]
    }
}

/// A plain HTTP/1.1 GET (admin ports): (status, body), or `None` when nothing answers.
pub fn http_get(addr: &SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// A port kept for a process that must listen on a port known before it starts (a control
/// plane that restarts on the same address, a port named in another flag, nginx and Envoy in
/// the benchmarks): a socket bound to it with `SO_REUSEADDR` that never listens. While it is
/// held the system gives the port to nobody else, neither a `bind` to port 0 nor an outgoing
/// connection, and connecting to it is refused until the process listens. The process binds
/// the same port (tokio, nginx and Envoy all set `SO_REUSEADDR`), and can restart on it with no
/// window for another to take it. Processes that can report the port they bound (the sidecar's
/// `--addresses-file`) are started on port 0 instead.
#[derive(Debug)]
pub struct ReservedPort {
    _socket: socket2::Socket,
    addr: SocketAddr,
}

impl ReservedPort {
    /// A port on 127.0.0.1.
    pub fn loopback() -> Self {
        Self::on(std::net::Ipv4Addr::LOCALHOST.into())
    }

    /// A port on `ip` (an address of this host).
    pub fn on(ip: std::net::IpAddr) -> Self {
        let reserve = || -> std::io::Result<Self> {
            let addr = SocketAddr::new(ip, 0);
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )?;
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            let addr = socket
                .local_addr()?
                .as_socket()
                .ok_or_else(|| std::io::Error::other("not an IP socket"))?;
            Ok(ReservedPort {
                _socket: socket,
                addr,
            })
        };
        reserve().unwrap_or_else(|e| panic!("cannot reserve a port on {ip}: {e}"))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// Writes a secret file readable only by its owner (0600), as moat-control requires of a KEK.
pub fn write_secret(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// A fixed, valid KEK for tests (base64 of 32 bytes).
pub const TEST_KEK: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

impl ControlPlane {
    /// Starts a control plane on a fresh data directory.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&[])
    }

    /// Starts one with extra `serve` flags (e.g. `--import-root-cert`).
    pub fn start_with(extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_full(ReservedPort::loopback(), extra, Vec::new())
    }

    /// Starts one whose gRPC port listens on `listen` (e.g. a bridge address other network
    /// namespaces reach).
    pub fn start_listening(ip: std::net::IpAddr, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_full(ReservedPort::on(ip), extra, Vec::new())
    }

    /// Starts one whose processes (and the CLI runs against it) get `env`, e.g. [`Clock::env`].
    pub fn start_env(extra: &[&str], env: Vec<(String, String)>) -> anyhow::Result<Self> {
        Self::start_full(ReservedPort::loopback(), extra, env)
    }

    fn start_full(
        listen: ReservedPort,
        extra: &[&str],
        env: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        let data = tempfile::tempdir()?;
        let secrets = tempfile::tempdir()?;
        write_secret(&secrets.path().join("kek"), TEST_KEK)?;
        // MOAT_TEST_LOG_DIR keeps every control plane's log after the test (for post-mortems).
        let log = match std::env::var_os("MOAT_TEST_LOG_DIR") {
            Some(dir) => PathBuf::from(dir).join(format!("control-{}.log", listen.port())),
            None => secrets.path().join("control.log"),
        };
        let mut cp = ControlPlane {
            child: None,
            addr: String::new(),
            admin_addr: String::new(),
            webhook_addr: String::new(),
            data,
            secrets,
            log,
            listen,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            env,
        };
        cp.launch()?;
        // Import flags (each followed by its file) apply to the first start only.
        let mut keep = Vec::new();
        let mut args = cp.extra_args.drain(..);
        while let Some(a) = args.next() {
            if a.starts_with("--import-") {
                args.next();
            } else {
                keep.push(a);
            }
        }
        drop(args);
        cp.extra_args = keep;
        Ok(cp)
    }

    /// The command line `serve` would run with, for tests that expect it to fail.
    pub fn serve_command(&self, kek_file: &Path) -> Command {
        let mut cmd = Command::new(bin("moat-control"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(self.data.path())
            .args(["--listen", &self.listen.addr().to_string()])
            .args(["--admin", "127.0.0.1:0"])
            .arg("--kek-file")
            .arg(kek_file)
            .env_remove("MOAT_KEK")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(&self.extra_args);
        cmd
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut child = self
            .serve_command(&self.secrets.path().join("kek"))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("cannot start moat-control")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            for _ in 0..3 {
                if let Some(Ok(line)) = lines.next() {
                    let _ = tx.send(line);
                }
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = rx.recv_timeout(Duration::from_secs(30));
        let admin = rx.recv_timeout(Duration::from_secs(10));
        if self.extra_args.iter().any(|a| a == "--webhook") {
            self.webhook_addr = rx
                .recv_timeout(Duration::from_secs(10))
                .ok()
                .and_then(|l| {
                    l.strip_prefix("webhook listening on ")
                        .map(|a| a.trim().to_owned())
                })
                .unwrap_or_default();
        }
        self.child = Some(child);
        match (line, admin) {
            (Ok(l), Ok(a)) if l.starts_with("listening on ") => {
                self.addr = l.trim_start_matches("listening on ").trim().to_owned();
                self.admin_addr = a
                    .trim_start_matches("admin listening on ")
                    .trim()
                    .to_owned();
                Ok(())
            }
            (other, _) => bail!(
                "moat-control did not start ({other:?}); log:\n{}",
                self.log_text()
            ),
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `host:port` of the injection webhook (empty unless started with `--webhook`).
    pub fn webhook_addr(&self) -> &str {
        &self.webhook_addr
    }

    /// The plain-HTTP admin port's address.
    pub fn admin_addr(&self) -> std::net::SocketAddr {
        self.admin_addr
            .parse()
            .unwrap_or_else(|e| panic!("admin address {:?}: {e}", self.admin_addr))
    }

    /// A GET on the plain-HTTP admin port (`/live`, `/ready`, `/metrics`).
    pub fn admin_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&self.admin_addr(), path)
    }

    /// The environment its processes get.
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// The admin credential directory the control plane wrote.
    pub fn admin_dir(&self) -> PathBuf {
        self.data.path().join("admin")
    }

    /// The KEK file (outside the data directory).
    pub fn kek_file(&self) -> PathBuf {
        self.secrets.path().join("kek")
    }

    /// A scratch directory that is removed with the control plane (not the data directory).
    pub fn scratch(&self) -> &Path {
        self.secrets.path()
    }

    /// Everything the control plane logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9`: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same data directory (after [`kill9`](Self::kill9)).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.launch()
    }

    /// Starts again on the same data directory and port with `extra` flags in place of the
    /// ones it had (e.g. a longer `--min-cert-ttl`).
    pub fn restart_with(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        self.extra_args = extra.iter().map(|s| s.to_string()).collect();
        self.restart()
    }

    /// Runs the `moat` CLI against this control plane with the admin credential.
    pub fn moat(&self, args: &[&str]) -> Output {
        Command::new(bin("moat"))
            .args(args)
            .env("MOAT_CONTROL_PLANE", self.url())
            .env("MOAT_CREDENTIALS", self.admin_dir())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap_or_else(|e| panic!("cannot run moat: {e}"))
    }

    /// Runs `moat` and requires success; returns stdout.
    pub fn moat_ok(&self, args: &[&str]) -> String {
        let out = self.moat(args);
        assert!(
            out.status.success(),
            "moat {args:?} failed ({}):\n{}\ncontrol plane log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sum of the samples in Prometheus exposition `text` whose series (name and labels, as
/// written) is `series`, e.g. `moat_mesh_first_snapshots_total{table="resumed"}`; 0 when none.
pub fn metric_sum(text: &str, series: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(name, _)| *name == series)
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                out.push(p);
            }
        }
    }
    out
}
