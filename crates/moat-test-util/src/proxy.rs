//! A running `moat-proxy` next to a test app.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::{ControlPlane, ReservedPort, bin, eventually};

/// How a proxy gets its first certificate: `flag` (`--token-file` or `--k8s-token-file`) and the
/// token it names.
struct Token<'a> {
    flag: &'a str,
    value: &'a str,
}

/// How a test asks for a sidecar: `Proxy::builder(&cp, "orders").app(addr).upstream("payments")
/// .args(&["--cert-ttl", "10s"]).start()`.
#[derive(Debug)]
pub struct ProxyBuilder<'a> {
    cp: &'a ControlPlane,
    identity: String,
    app: Option<SocketAddr>,
    upstreams: Vec<String>,
    args: Vec<String>,
    binary: Option<PathBuf>,
    open_files: Option<u64>,
}

/// What runs as the sidecar: a `moat-proxy` binary, optionally under `prlimit` with a hard and
/// soft limit of `open_files`.
struct Program<'a> {
    binary: &'a Path,
    open_files: Option<u64>,
}

impl Program<'_> {
    fn command(&self) -> Command {
        match self.open_files {
            None => Command::new(self.binary),
            Some(n) => {
                let mut cmd = Command::new("prlimit");
                cmd.arg(format!("--nofile={n}:{n}")).arg(self.binary);
                cmd
            }
        }
    }
}

impl ProxyBuilder<'_> {
    /// The app the sidecar forwards to (`--app`); without one, a closed local port.
    pub fn app(mut self, app: SocketAddr) -> Self {
        self.app = Some(app);
        self
    }

    /// An outbound listener for `service` (`name`, or `name@port` for a fixed port).
    pub fn upstream(mut self, service: &str) -> Self {
        self.upstreams.push(service.to_owned());
        self
    }

    /// An outbound listener for each of `services`.
    pub fn upstreams(mut self, services: &[&str]) -> Self {
        self.upstreams
            .extend(services.iter().map(|s| (*s).to_owned()));
        self
    }

    /// Extra flags, e.g. `&["--cert-ttl", "10s"]`.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// Runs `binary` instead of this build's `moat-proxy` (the compare benchmark runs an older
    /// build next to this one).
    pub fn binary(mut self, binary: &Path) -> Self {
        self.binary = Some(binary.to_path_buf());
        self
    }

    /// Runs the sidecar with `n` as its soft and hard limit on open files (under util-linux's
    /// `prlimit`, which execs it: the pid is the sidecar's).
    pub fn open_files(mut self, n: u64) -> Self {
        self.open_files = Some(n);
        self
    }

    /// Starts the sidecar with a new join token and waits until it is ready.
    pub fn start(self) -> anyhow::Result<Proxy> {
        let binary = self.binary.unwrap_or_else(|| bin("moat-proxy"));
        // Without an app: a port held closed, so connections to it are refused.
        let closed = self.app.is_none().then(ReservedPort::loopback);
        let app = match (self.app, &closed) {
            (Some(a), _) => a,
            (None, Some(c)) => c.addr(),
            (None, None) => unreachable!("a closed port is reserved when there is no app"),
        };
        let upstreams: Vec<&str> = self.upstreams.iter().map(String::as_str).collect();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let program = Program {
            binary: &binary,
            open_files: self.open_files,
        };
        let mut proxy =
            Proxy::start_binary(self.cp, &program, &self.identity, app, &upstreams, &args)?;
        proxy.held.extend(closed);
        Ok(proxy)
    }
}

/// A sidecar process.
#[derive(Debug)]
pub struct Proxy {
    child: Option<Child>,
    pub identity: String,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    pub upstreams: HashMap<String, SocketAddr>,
    dir: tempfile::TempDir,
    /// Ports kept for this proxy while it lives (see [`ReservedPort`]).
    held: Vec<ReservedPort>,
}

impl Proxy {
    /// A sidecar for `identity`, to be described and started (see [`ProxyBuilder`]).
    pub fn builder<'a>(cp: &'a ControlPlane, identity: &str) -> ProxyBuilder<'a> {
        ProxyBuilder {
            cp,
            identity: identity.to_owned(),
            app: None,
            upstreams: Vec::new(),
            args: Vec::new(),
            binary: None,
            open_files: None,
        }
    }

    /// Starts `program` for `identity` in front of `app`, with an outbound listener for each of
    /// `upstreams` (`name`, or `name@port` for a fixed port) and `extra` flags, with a new join
    /// token, and waits until it is ready (what [`ProxyBuilder::start`] does). With
    /// `--transparent` among `extra`, `app` is not passed: there is no `--app` in that mode.
    fn start_binary(
        cp: &ControlPlane,
        program: &Program<'_>,
        identity: &str,
        app: SocketAddr,
        upstreams: &[&str],
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let token = cp.moat_ok(&["token", "create", "--identity", identity]);
        let token = Token {
            flag: "--token-file",
            value: token.trim(),
        };
        let p = Self::spawn(cp, program, identity, token, app, upstreams, extra)?;
        p.wait_ready(Duration::from_secs(30))?;
        Ok(p)
    }

    /// Starts a proxy with an existing join token and returns at once (the control plane need
    /// not be up). Call [`wait_ready`](Self::wait_ready) to wait for it.
    pub fn launch(
        cp: &ControlPlane,
        identity: &str,
        token: &str,
        app: SocketAddr,
        upstreams: &[&str],
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::launch_with_token(cp, identity, "--token-file", token, app, upstreams, extra)
    }

    /// Like [`launch`](Self::launch), with the token passed by `token_flag` (`--token-file` for a
    /// join token, `--k8s-token-file` for a service-account token).
    pub fn launch_with_token(
        cp: &ControlPlane,
        identity: &str,
        token_flag: &str,
        token: &str,
        app: SocketAddr,
        upstreams: &[&str],
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let token = Token {
            flag: token_flag,
            value: token,
        };
        Self::spawn(
            cp,
            &Program {
                binary: &bin("moat-proxy"),
                open_files: None,
            },
            identity,
            token,
            app,
            upstreams,
            extra,
        )
    }

    fn spawn(
        cp: &ControlPlane,
        program: &Program<'_>,
        identity: &str,
        token: Token<'_>,
        app: SocketAddr,
        upstreams: &[&str],
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, token.value.trim())?;
        // This build binds port 0 and reports what it bound; an older build (the benchmarks
        // compare one) may not know --addresses-file, so it gets ports held for it.
        let reports = program.binary == bin("moat-proxy");
        let mut held = Vec::new();
        let mut port = || -> SocketAddr {
            if reports {
                SocketAddr::from(([127, 0, 0, 1], 0))
            } else {
                let r = ReservedPort::loopback();
                let a = r.addr();
                held.push(r);
                a
            }
        };
        let (inbound, admin) = (port(), port());
        let mut ups = HashMap::new();
        let mut names = Vec::new();
        let mut cmd = program.command();
        cmd.args([
            "--control-plane",
            &cp.url(),
            "--identity",
            identity,
            token.flag,
        ])
        .arg(&token_file)
        .arg("--trust-anchors")
        .arg(cp.admin_dir().join("bundle.pem"))
        .args([
            "--inbound",
            &inbound.to_string(),
            "--admin",
            &admin.to_string(),
        ]);
        // With `--transparent` among the flags there is no `--app`: each mesh connection goes to
        // the port its caller dialled, on the address it arrived at.
        if !extra
            .iter()
            .any(|a| *a == "--transparent" || a.starts_with("--transparent="))
        {
            cmd.args(["--app", &app.to_string()]);
        }
        for u in upstreams {
            let (name, a) = match u.split_once('@') {
                Some((n, p)) => (n, SocketAddr::from(([127, 0, 0, 1], p.parse()?))),
                None => (*u, port()),
            };
            cmd.args(["--upstream", &format!("{name}={a}")]);
            ups.insert(name.to_owned(), a);
            names.push(name.to_owned());
        }
        let addresses = dir.path().join("addresses.json");
        if reports {
            cmd.arg("--addresses-file").arg(&addresses);
        }
        cmd.args(extra);
        // The control plane's environment (e.g. its moved clock) applies to its mesh.
        cmd.envs(cp.env().iter().map(|(k, v)| (k, v)));
        let log = std::fs::File::create(dir.path().join("proxy.log"))?;
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .env_remove("MOAT_UPSTREAMS")
            .spawn()
            .context("cannot start moat-proxy")?;
        let mut proxy = Proxy {
            child: Some(child),
            identity: identity.to_owned(),
            inbound,
            admin,
            upstreams: ups,
            dir,
            held,
        };
        if reports {
            proxy.read_addresses(&addresses, &names)?;
        }
        Ok(proxy)
    }

    /// Waits for the addresses the proxy bound (`--addresses-file`) and takes them.
    fn read_addresses(&mut self, path: &Path, order: &[String]) -> anyhow::Result<()> {
        // A proxy may write the file and exit at once (a refused token): the file comes first.
        let text = eventually(Duration::from_secs(30), || {
            if let Ok(text) = std::fs::read_to_string(path) {
                return Some(Some(text));
            }
            match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(_))) => Some(std::fs::read_to_string(path).ok()),
                _ => None,
            }
        })
        .flatten();
        let Some(text) = text else {
            bail!(
                "proxy {} did not report its addresses; log:\n{}",
                self.identity,
                self.log_text()
            );
        };
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let addr = |v: &serde_json::Value| -> anyhow::Result<SocketAddr> {
            Ok(v.as_str().context("an address is not a string")?.parse()?)
        };
        self.inbound = addr(&v["inbound"])?;
        self.admin = addr(&v["admin"])?;
        // The harness's own --upstream flags come first, in order; flags a test adds itself
        // (a second listener for the same service, say) follow and are not ours.
        for (i, name) in order.iter().enumerate() {
            let entry = &v["upstreams"][i];
            anyhow::ensure!(
                entry["service"] == name.as_str(),
                "the proxy's upstream {i} is {}, not {name}",
                entry["service"]
            );
            self.upstreams
                .insert(name.clone(), addr(&entry["address"])?);
        }
        Ok(())
    }

    /// The token file the proxy reads when it needs a certificate without a valid one.
    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    /// Waits until `/ready` answers 200.
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let ready = eventually(timeout, || {
            self.admin_get("/ready")
                .filter(|(s, _)| *s == 200)
                .map(|_| ())
        });
        if ready.is_none() {
            bail!(
                "proxy {} did not become ready; log:\n{}",
                self.identity,
                self.log_text()
            );
        }
        Ok(())
    }

    /// The outbound listener for `service`.
    pub fn upstream(&self, service: &str) -> SocketAddr {
        *self
            .upstreams
            .get(service)
            .unwrap_or_else(|| panic!("no upstream {service}"))
    }

    /// A GET on the admin port: (status, body), or `None` when it does not answer.
    pub fn admin_get(&self, path: &str) -> Option<(u16, String)> {
        crate::http_get(&self.admin, path)
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> String {
        self.admin_get("/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// Everything the proxy logged so far. The proxy writes its log in batches at least every
    /// 100 ms, so this first waits out one batch.
    pub fn log_text(&self) -> String {
        if self.child.is_some() {
            std::thread::sleep(Duration::from_millis(250));
        }
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Applies a policy document (YAML text) through the CLI.
pub fn apply_policy(cp: &ControlPlane, yaml: &str) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let f = cp.scratch().join(format!(
        "policy-{}.yaml",
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&f, yaml).unwrap_or_else(|e| panic!("{e}"));
    cp.moat_ok(&["policy", "apply", "-f", &f.display().to_string()]);
}
