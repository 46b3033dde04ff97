//! The demo's processes: finding (or building) the binaries, starting the control plane, the
//! apps and their sidecars on free loopback ports, and stopping all of them.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// Paths of the binaries the demo runs.
#[derive(Debug, Clone)]
pub struct Bins {
    pub control: PathBuf,
    pub proxy: PathBuf,
    pub app: PathBuf,
    pub moat: PathBuf,
}

const SPINNER: &[char] = &['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

/// A one-line progress indicator on stderr (only on a terminal).
pub fn progress(started: Instant, tick: usize, what: &str) {
    use std::io::IsTerminal as _;
    let mut err = std::io::stderr();
    if !err.is_terminal() {
        return;
    }
    let _ = write!(
        err,
        "\r\x1b[2K  {} {what} ({}s)",
        SPINNER[tick % SPINNER.len()],
        started.elapsed().as_secs()
    );
    let _ = err.flush();
}

/// Finds the binaries next to this `moat`. Run through `cargo run`, builds them first (same
/// profile) so a fresh clone needs nothing else.
pub async fn binaries() -> anyhow::Result<Bins> {
    let moat = std::env::current_exe().context("cannot locate the moat binary")?;
    let dir = moat.parent().map(Path::to_path_buf).unwrap_or_default();
    if let (Ok(cargo), Ok(_)) = (std::env::var("CARGO"), std::env::var("CARGO_MANIFEST_DIR")) {
        let release = dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "-p",
            "moat-control",
            "-p",
            "moat-proxy",
            "-p",
            "moat-demo-app",
        ]);
        if release {
            cmd.arg("--release");
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run cargo to build the demo")?;
        let stderr = child.stderr.take().context("no cargo output")?;
        let mut lines = BufReader::new(stderr).lines();
        let started = Instant::now();
        let mut last = String::from("building the control plane, the sidecar and the demo apps");
        let mut log = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(120));
        let mut n = 0;
        loop {
            tokio::select! {
                line = lines.next_line() => match line {
                    Ok(Some(l)) => {
                        if let Some(rest) = l.trim().strip_prefix("Compiling ") {
                            last = format!("building: compiling {}", rest.split_whitespace().next().unwrap_or(rest));
                        }
                        log.push(l);
                    }
                    _ => break,
                },
                _ = tick.tick() => { n += 1; progress(started, n, &last); }
            }
        }
        let status = child.wait().await?;
        clear_line();
        if !status.success() {
            bail!("building the demo failed:\n{}", log.join("\n"));
        }
        eprintln!("  ✓ built in {}s", started.elapsed().as_secs());
    }
    let bins = Bins {
        control: dir.join("moat-control"),
        proxy: dir.join("moat-proxy"),
        app: dir.join("moat-demo-app"),
        moat,
    };
    for b in [&bins.control, &bins.proxy, &bins.app] {
        if !b.exists() {
            bail!(
                "{} is missing: run the demo with `cargo run --release -p moat-cli -- demo`, or build the workspace first",
                b.display()
            );
        }
    }
    Ok(bins)
}

/// Clears the progress line (only on a terminal).
fn clear_line() {
    use std::io::IsTerminal as _;
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K");
    }
}

/// A free loopback address for one of the demo's processes to listen on, taken below the
/// kernel's ephemeral range: a port from that range (what binding port 0 gives) can become the
/// local port of an outgoing connection before the process meant to listen on it starts.
fn free_addr() -> anyhow::Result<SocketAddr> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    if ephemeral_low > 12_000 {
        let span = ephemeral_low - 11_000;
        let seed = std::process::id().wrapping_mul(2_654_435_761) % span;
        for _ in 0..span {
            let port = 10_000 + (seed + NEXT.fetch_add(7919, Ordering::Relaxed)) % span;
            if let Ok(port) = u16::try_from(port)
                && let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port))
            {
                return Ok(l.local_addr()?);
            }
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// One meshed service: its app and its sidecar.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: &'static str,
    pub app: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    /// Outbound listeners: (service, local address).
    pub upstreams: Vec<(&'static str, SocketAddr)>,
}

impl Service {
    fn new(name: &'static str, upstreams: &[&'static str]) -> anyhow::Result<Self> {
        Ok(Service {
            name,
            app: free_addr()?,
            inbound: free_addr()?,
            admin: free_addr()?,
            upstreams: upstreams
                .iter()
                .map(|u| Ok((*u, free_addr()?)))
                .collect::<anyhow::Result<_>>()?,
        })
    }
}

/// The running demo mesh.
#[derive(Debug)]
pub struct Mesh {
    pub bins: Bins,
    pub dir: PathBuf,
    pub control_plane: String,
    pub frontend: Service,
    pub orders: Service,
    pub payments: Service,
    children: Vec<(String, Child)>,
}

impl Mesh {
    /// Plans the mesh (ports) without starting anything.
    pub fn new(bins: Bins, dir: PathBuf) -> Self {
        let plan = || -> anyhow::Result<(Service, Service, Service)> {
            Ok((
                Service::new("frontend", &["orders", "payments"])?,
                Service::new("orders", &["payments"])?,
                Service::new("payments", &[])?,
            ))
        };
        // Binding 127.0.0.1:0 only fails when the machine has no loopback at all.
        let (frontend, orders, payments) =
            plan().unwrap_or_else(|e| panic!("no free loopback ports: {e}"));
        Mesh {
            bins,
            dir,
            control_plane: String::new(),
            frontend,
            orders,
            payments,
            children: Vec::new(),
        }
    }

    /// The admin credential directory.
    pub fn credentials(&self) -> PathBuf {
        self.dir.join("data/admin")
    }

    fn log(&self, name: &str) -> anyhow::Result<std::fs::File> {
        std::fs::create_dir_all(self.dir.join("logs"))?;
        Ok(std::fs::File::create(
            self.dir.join("logs").join(format!("{name}.log")),
        )?)
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command) -> anyhow::Result<()> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log(name)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.children.push((name.to_owned(), child));
        self.record()?;
        Ok(())
    }

    /// Writes `pids` and `ports` into the working directory (for the curious, and for tests
    /// that check nothing is left behind).
    fn record(&self) -> anyhow::Result<()> {
        let pids: String = self
            .children
            .iter()
            .filter_map(|(_, c)| c.id())
            .map(|p| format!("{p}\n"))
            .collect();
        std::fs::write(self.dir.join("pids"), pids)?;
        let mut ports = Vec::new();
        for s in [&self.frontend, &self.orders, &self.payments] {
            ports.extend([s.app, s.inbound, s.admin]);
            ports.extend(s.upstreams.iter().map(|(_, a)| *a));
        }
        if let Some(cp) = self.control_plane.strip_prefix("https://") {
            ports.push(cp.parse()?);
        }
        std::fs::write(
            self.dir.join("ports"),
            ports.iter().map(|p| format!("{p}\n")).collect::<String>(),
        )?;
        Ok(())
    }

    /// Runs the `moat` CLI against the demo's control plane.
    pub fn moat(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(&self.bins.moat)
            .args(args)
            .env("MOAT_CONTROL_PLANE", &self.control_plane)
            .env("MOAT_CREDENTIALS", self.credentials())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bins.moat.display()))
    }

    /// Starts `moat` with `args` in the background, its stdout piped.
    pub fn moat_spawn(&self, args: &[&str]) -> std::io::Result<std::process::Child> {
        std::process::Command::new(&self.bins.moat)
            .args(args)
            .env("MOAT_CONTROL_PLANE", &self.control_plane)
            .env("MOAT_CREDENTIALS", self.credentials())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
    }

    fn moat_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.moat(args);
        if !out.status.success() {
            bail!(
                "moat {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts everything and waits until every sidecar is ready.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        progress(started, 0, "starting the control plane");
        let data = self.dir.join("data");
        let mut cmd = Command::new(&self.bins.control);
        cmd.args([
            "serve",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--min-cert-ttl",
            "5s",
            "--data-dir",
        ])
        .arg(&data)
        .env_remove("MOAT_KEK")
        .env_remove("MOAT_KEK_FILE");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(self.log("control-plane")?)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start moat-control")?;
        let stdout = child.stdout.take().context("no control-plane output")?;
        self.children.push(("control-plane".into(), child));
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("the control plane did not start within 30 s")??
            .context("the control plane exited")?;
        let addr = line
            .strip_prefix("listening on ")
            .context("unexpected control-plane output")?;
        self.control_plane = format!("https://{addr}");
        // Keep draining its stdout so it never blocks.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.record()?;

        for svc in [
            self.payments.clone(),
            self.orders.clone(),
            self.frontend.clone(),
        ] {
            progress(
                started,
                3,
                &format!("starting {} and its sidecar", svc.name),
            );
            let mut app = Command::new(&self.bins.app);
            app.arg("--listen").arg(svc.app.to_string()).arg(svc.name);
            for (up, addr) in &svc.upstreams {
                app.arg(format!("--{up}")).arg(addr.to_string());
            }
            self.spawn(svc.name, &mut app)?;
            let token = self.moat_ok(&["token", "create", "--identity", svc.name])?;
            let token_file = self.dir.join(format!("{}.token", svc.name));
            std::fs::write(&token_file, token.trim())?;
            let mut proxy = Command::new(&self.bins.proxy);
            proxy
                .args([
                    "--control-plane",
                    &self.control_plane,
                    "--identity",
                    svc.name,
                    "--token-file",
                ])
                .arg(&token_file)
                .arg("--trust-anchors")
                .arg(self.credentials().join("bundle.pem"))
                .args([
                    "--app",
                    &svc.app.to_string(),
                    "--inbound",
                    &svc.inbound.to_string(),
                ])
                .args(["--admin", &svc.admin.to_string(), "--cert-ttl", "8s"]);
            for (up, addr) in &svc.upstreams {
                proxy.arg("--upstream").arg(format!("{up}={addr}"));
            }
            self.spawn(&format!("{}-proxy", svc.name), &mut proxy)?;
        }
        for svc in [&self.payments, &self.orders, &self.frontend] {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut n = 4;
            while !super::http::ready(svc.admin).await {
                if Instant::now() > deadline {
                    eprintln!();
                    bail!(
                        "the {} sidecar did not become ready (see {}/logs)",
                        svc.name,
                        self.dir.display()
                    );
                }
                n += 1;
                progress(started, n, &format!("waiting for the {} sidecar", svc.name));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        clear_line();
        eprintln!(
            "  ✓ mesh up in {}s: control plane, 3 services, 3 sidecars",
            started.elapsed().as_secs()
        );
        Ok(())
    }

    /// Stops every process: SIGTERM, then SIGKILL for anything still running after 5 s.
    pub async fn stop(&mut self) {
        for (_, c) in self.children.iter().rev() {
            if let Some(pid) = c.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
        }
        for (name, c) in self.children.iter_mut().rev() {
            if tokio::time::timeout(Duration::from_secs(5), c.wait())
                .await
                .is_err()
            {
                eprintln!("  {name} did not stop on SIGTERM; killing it");
                let _ = c.kill().await;
            }
        }
        self.children.clear();
    }
}
