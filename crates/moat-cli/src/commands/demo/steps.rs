//! The narrated checks. Each step makes real requests through the mesh and says what it saw;
//! `narrate` returns whether every check held.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_identity::{SpiffeId, TrustDomain};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::http::{Http, client, get};
use super::procs::Mesh;

const DEMO_POLICY: &str = include_str!("../../../../../examples/policies/demo.yaml");
const CANCEL_POLICY: &str = include_str!("../../../../../examples/policies/demo-allow-cancel.yaml");
const ALLOW_ALL: &str = "apiVersion: moat.dev/v1\nkind: MeshConfig\nmetadata: { name: mesh }\nspec: { defaultPosture: allow-authenticated }\n";
/// payments only watching: audit mode, admitting nobody (every call is a would-deny, recorded).
const PAYMENTS_AUDIT: &str = "apiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: { name: payments }\nspec:\n  target: payments\n  mode: audit\n  rules:\n    - from: [nobody]\n";

fn id(name: &str) -> String {
    format!("spiffe://moat.local/ns/default/sa/{name}")
}

struct Narrator {
    ok: bool,
    n: usize,
}

impl Narrator {
    fn step(&mut self, title: &str) {
        self.n += 1;
        println!("\n▸ {}. {title}", self.n);
    }

    fn check(&mut self, what: &str, ok: bool, detail: &str) {
        self.ok &= ok;
        let mark = if ok { "✓" } else { "✗" };
        println!("  {mark} {what}");
        if !detail.is_empty() {
            for line in detail.lines() {
                println!("      {line}");
            }
        }
    }
}

fn apply(mesh: &Mesh, name: &str, text: &str) -> Result<String, String> {
    let file = mesh.dir.join(name);
    std::fs::write(&file, text).map_err(|e| e.to_string())?;
    let out = mesh.moat(&["policy", "apply", "-f", &file.display().to_string()]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Polls `path` on the frontend until `want` (policy changes arrive within milliseconds, but
/// asynchronously).
async fn until(
    c: &Http,
    addr: SocketAddr,
    path: &str,
    want: u16,
) -> Result<(u16, serde_json::Value), String> {
    let start = Instant::now();
    loop {
        let r = get(c, addr, path).await?;
        if r.0 == want || start.elapsed() > Duration::from_secs(5) {
            return Ok(r);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TLS client with no certificate at `addr`: does it get anything back?
async fn intruder_tls(mesh: &Mesh, addr: SocketAddr) -> Result<String, String> {
    let bundle = moat_tls::cred_dir::read_bundle(&mesh.credentials().join("bundle.pem"))
        .map_err(|e| e.to_string())?;
    let expected = SpiffeId::parse_with_default("orders", &TrustDomain::default_domain())
        .map_err(|e| e.to_string())?;
    let cfg = moat_tls::client_config(None, Arc::new(bundle), expected, moat_tls::ALPN_HTTP1)
        .map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name =
        rustls::pki_types::ServerName::try_from("moat.invalid").map_err(|e| e.to_string())?;
    let mut tls = match tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
    {
        Ok(t) => t,
        Err(e) => return Ok(format!("handshake refused: {e}")),
    };
    let _ = tls
        .write_all(b"GET /orders/42 HTTP/1.1\r\nHost: orders\r\n\r\n")
        .await;
    let mut out = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await {
        Ok(Err(e)) if out.is_empty() => Ok(format!("refused: {e}")),
        _ if out.is_empty() => Ok("connection closed without an answer".into()),
        _ => Err(String::from_utf8_lossy(&out)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()),
    }
}

async fn plaintext(addr: SocketAddr) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return true;
    };
    let _ = s
        .write_all(b"GET /orders/42 HTTP/1.1\r\nHost: orders\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    !String::from_utf8_lossy(&out).contains("HTTP/1.1 200")
}

/// What the frontend answered, in one line.
fn answer(r: &Result<(u16, serde_json::Value), String>) -> String {
    match r {
        Ok((s, v)) => match v["deny_reason"].as_str() {
            Some(reason) => format!("HTTP {s}, x-moat-deny-reason: {reason}"),
            None => format!("HTTP {s}"),
        },
        Err(e) => e.clone(),
    }
}

fn serials(body: &[(u16, serde_json::Value)]) -> Vec<String> {
    body.iter()
        .map(|(_, v)| v["certificate"]["serial"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// Runs every step; true when all checks held.
pub async fn narrate(mesh: &mut Mesh, break_enforcement: bool) -> bool {
    let mut n = Narrator { ok: true, n: 0 };
    let c = client();
    zero_trust(&mut n, mesh, &c).await;
    apply_allow_list(&mut n, mesh, break_enforcement).await;
    call_chain(&mut n, mesh, &c).await;
    intruder(&mut n, mesh).await;
    bypass(&mut n, mesh, &c).await;
    live_change(&mut n, mesh, &c).await;
    suggest_from_traffic(&mut n, mesh, &c).await;
    rotation_under_load(&mut n, mesh, &c).await;
    println!();
    if n.ok {
        println!("All checks held.");
    } else {
        println!("Some checks FAILED: the mesh did not behave as it must.");
    }
    n.ok
}

/// With no policy, the frontend's call to orders is refused (no-policy).
async fn zero_trust(n: &mut Narrator, mesh: &Mesh, c: &Http) {
    let fe = mesh.frontend.app;
    n.step("Zero trust: with no policy, nobody may call anybody");
    let r = get(c, fe, "/").await;
    let denied = matches!(&r, Ok((403, v)) if v["deny_reason"] == "no-policy");
    n.check(
        "frontend → orders is refused: 403, reason no-policy",
        denied,
        &answer(&r),
    );
}

/// Applies the example allow-list (or, to prove the checks can fail, an allow-everything config).
async fn apply_allow_list(n: &mut Narrator, mesh: &Mesh, break_enforcement: bool) {
    n.step("Apply the allow-list (examples/policies/demo.yaml)");
    let applied = if break_enforcement {
        apply(mesh, "demo.yaml", ALLOW_ALL)
    } else {
        apply(mesh, "demo.yaml", DEMO_POLICY)
    };
    n.check(
        "frontend may GET orders; orders may call payments' Charge; nothing else",
        applied.is_ok(),
        &applied.unwrap_or_else(|e| e),
    );
}

/// A call through frontend → orders → payments, each hop seeing its caller's verified identity.
async fn call_chain(n: &mut Narrator, mesh: &Mesh, c: &Http) {
    let fe = mesh.frontend.app;
    n.step("A real call chain: you → frontend → orders (HTTP) → payments (gRPC)");
    let r = until(c, fe, "/", 200).await;
    let chain_ok = matches!(&r, Ok((200, v))
        if v["orders"]["caller"] == id("frontend") && v["orders"]["payments"]["caller"] == id("orders"));
    let detail = match &r {
        Ok((s, v)) => format!(
            "HTTP {s}\norders saw caller   {}\npayments saw caller {}\npayments said       {}",
            v["orders"]["caller"],
            v["orders"]["payments"]["caller"],
            v["orders"]["payments"]["status"]
        ),
        Err(e) => e.clone(),
    };
    n.check(
        "each hop saw the caller's verified SPIFFE ID (x-moat-peer-id, set by its sidecar)",
        chain_ok,
        &detail,
    );
}

/// A client without a mesh certificate is refused by a sidecar, over TLS and in plain text.
async fn intruder(n: &mut Narrator, mesh: &Mesh) {
    n.step("An intruder without a mesh certificate knocks on orders' sidecar");
    let tls = intruder_tls(mesh, mesh.orders.inbound).await;
    n.check(
        "TLS without a client certificate: refused",
        tls.is_ok(),
        &tls.unwrap_or_else(|e| format!("it answered: {e}")),
    );
    let plain = plaintext(mesh.orders.inbound).await;
    n.check("plain HTTP: refused", plain, "");
}

/// frontend calling payments directly is refused by payments' sidecar.
async fn bypass(n: &mut Narrator, mesh: &Mesh, c: &Http) {
    let fe = mesh.frontend.app;
    n.step("frontend tries to skip orders and charge payments directly");
    let r = get(c, fe, "/pay-directly").await;
    let refused = matches!(&r, Ok((403, v))
        if v["payments"]["grpc_code"] == 7 && v["payments"]["deny_reason"] == "identity-not-allowed");
    n.check(
        "refused by payments' sidecar: gRPC status 7, reason identity-not-allowed",
        refused,
        &match &r {
            Ok((s, v)) => format!(
                "HTTP {s}: {}",
                v["payments"]["error"]
                    .as_str()
                    .or(v["payments"]["status"].as_str())
                    .unwrap_or("")
            ),
            Err(e) => e.clone(),
        },
    );
}

/// A policy change allows a route at once, with no restart.
async fn live_change(n: &mut Narrator, mesh: &Mesh, c: &Http) {
    let fe = mesh.frontend.app;
    n.step("A live policy change: allow frontend to cancel orders");
    let r = get(c, fe, "/cancel").await;
    let before = matches!(&r, Ok((403, v)) if v["deny_reason"] == "route-not-allowed");
    n.check(
        "before: DELETE /orders/42 is refused, reason route-not-allowed",
        before,
        &answer(&r),
    );
    let applied = apply(mesh, "demo-allow-cancel.yaml", CANCEL_POLICY);
    let r = until(c, fe, "/cancel", 200).await;
    let after = applied.is_ok() && matches!(&r, Ok((200, v)) if v["orders"]["cancelled"] == "42");
    n.check("after `moat policy apply -f examples/policies/demo-allow-cancel.yaml`: allowed, no restart", after, "");
}

/// From watching to enforcing: payments' policy in audit mode records what its callers do,
/// `moat policy suggest` writes the least-privilege policy from it, and once applied it admits
/// that traffic and refuses anything else.
async fn suggest_from_traffic(n: &mut Narrator, mesh: &Mesh, c: &Http) {
    let fe = mesh.frontend.app;
    n.step("Least privilege from observed traffic: payments watches, moat writes its policy");
    let watching = apply(mesh, "payments-audit.yaml", PAYMENTS_AUDIT);
    n.check(
        "payments' policy in audit mode: nothing refused, every call recorded",
        watching.is_ok(),
        &watching.unwrap_or_else(|e| e),
    );
    let (ok, failed) = load(c, fe, 20, Duration::from_secs(2)).await;
    // The sidecar reports what it saw every 5 s.
    let start = Instant::now();
    let suggested = loop {
        let out = mesh.moat(&["policy", "suggest", "--for", "payments"]);
        let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
        if (out.status.success() && yaml.contains("sa/orders"))
            || start.elapsed() > Duration::from_secs(15)
        {
            break yaml;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let rules: Vec<&str> = suggested
        .lines()
        .filter(|l| {
            l.contains("from:") || l.contains("methods:") || l.trim_start().starts_with("- \"/")
        })
        .map(str::trim)
        .collect();
    n.check(
        &format!("{ok} calls through the chain ({failed} failed); `moat policy suggest --for payments` admits exactly them"),
        failed == 0 && suggested.contains("sa/orders") && !suggested.contains("sa/frontend"),
        &rules.join("\n"),
    );
    let applied = apply(mesh, "payments-suggested.yaml", &suggested);
    let chain = until(c, fe, "/", 200).await;
    // Watch the refusal live, as an operator would.
    let tap = Tap::open(
        mesh,
        c,
        &["--to", "payments", "--decision", "deny", "--limit", "1"],
    )
    .await;
    let direct = until(c, fe, "/pay-directly", 403).await;
    let seen = tap.line().await;
    n.check(
        "`moat tap --to payments --decision deny` shows the refusal as it happens",
        seen.as_deref().is_ok_and(|l| {
            l.contains("frontend -> payments") && l.contains("deny identity-not-allowed")
        }),
        &seen.unwrap_or_else(|e| e),
    );
    let enforced = applied.is_ok()
        && matches!(&chain, Ok((200, _)))
        && matches!(&direct, Ok((403, v)) if v["payments"]["deny_reason"] == "identity-not-allowed");
    n.check(
        "applied in enforce mode: the chain still works, frontend → payments is refused",
        enforced,
        &format!("chain: {}\ndirect: {}", answer(&chain), answer(&direct)),
    );
}

/// A `moat tap` running in the background.
struct Tap(Result<std::process::Child, String>);

impl Tap {
    /// Starts `moat tap ARGS` and waits until payments' sidecar serves it.
    async fn open(mesh: &Mesh, c: &Http, args: &[&str]) -> Tap {
        let mut all = vec!["tap"];
        all.extend_from_slice(args);
        let child = mesh
            .moat_spawn(&all)
            .map_err(|e| format!("cannot run moat tap: {e}"));
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok((_, v)) = get(c, mesh.payments.admin, "/config").await
                && v["taps_open"].as_u64() > Some(0)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Tap(child)
    }

    /// The first line it printed (it ends at its `--limit`), within 5 s.
    async fn line(self) -> Result<String, String> {
        let mut child = self.0?;
        let stdout = child.stdout.take().ok_or("moat tap has no stdout")?;
        let read = tokio::task::spawn_blocking(move || {
            use std::io::BufRead as _;
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .map(|_| line)
        });
        let line = tokio::time::timeout(Duration::from_secs(5), read).await;
        let _ = child.kill();
        let _ = child.wait();
        match line {
            Ok(Ok(Ok(l))) if !l.is_empty() => Ok(format!(
                "$ moat tap --to payments --decision deny\n{}",
                l.trim_end()
            )),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            _ => Err("moat tap printed nothing within 5 s".into()),
        }
    }
}

/// Certificates rotate on every sidecar while requests flow, none failing.
async fn rotation_under_load(n: &mut Narrator, mesh: &Mesh, c: &Http) {
    let fe = mesh.frontend.app;
    n.step("Certificate rotation under load (certificates here live 8 s and renew every ~4 s)");
    let admins = [mesh.frontend.admin, mesh.orders.admin, mesh.payments.admin];
    let mut before = Vec::new();
    for a in admins {
        before.push(
            get(c, a, "/config")
                .await
                .unwrap_or((0, serde_json::Value::Null)),
        );
    }
    let (ok, failed) = load(c, fe, 40, Duration::from_secs(10)).await;
    let mut after = Vec::new();
    for a in admins {
        after.push(
            get(c, a, "/config")
                .await
                .unwrap_or((0, serde_json::Value::Null)),
        );
    }
    let (s0, s1) = (serials(&before), serials(&after));
    let rotated = s0
        .iter()
        .zip(&s1)
        .all(|(a, b)| !a.is_empty() && !b.is_empty() && a != b);
    n.check(
        &format!("{ok} requests through the whole chain in 10 s, {failed} failed"),
        failed == 0 && ok > 0,
        "",
    );
    n.check(
        "every sidecar now holds a new certificate (new key, new serial)",
        rotated,
        &s0.iter()
            .zip(&s1)
            .zip(["frontend", "orders", "payments"])
            .map(|((a, b), name)| format!("{name:<9} {a} → {b}"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
}

async fn load(c: &Http, addr: SocketAddr, rps: u32, d: Duration) -> (usize, usize) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rps)));
    let end = Instant::now() + d;
    let mut tasks = Vec::new();
    while Instant::now() < end {
        tick.tick().await;
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            matches!(get(&c, addr, "/").await, Ok((200, _)))
        }));
    }
    let (mut ok, mut failed) = (0, 0);
    for t in tasks {
        if t.await.unwrap_or(false) {
            ok += 1;
        } else {
            failed += 1;
        }
    }
    (ok, failed)
}

/// Copy-paste commands for exploring the running mesh.
pub fn try_it_yourself(mesh: &Mesh) {
    let moat = mesh.bins.moat.display();
    println!("\nTry it yourself (in another terminal):");
    println!(
        "  curl -s http://{}/              # the chain, with each hop's caller",
        mesh.frontend.app
    );
    println!(
        "  curl -s http://{}/pay-directly  # refused: identity-not-allowed",
        mesh.frontend.app
    );
    println!(
        "  export MOAT_CONTROL_PLANE={} MOAT_CREDENTIALS={}",
        mesh.control_plane,
        mesh.credentials().display()
    );
    println!("  {moat} policy status");
    println!(
        "  {moat} policy explain --from frontend --to payments --method POST --path /demo.Payments/Charge"
    );
    println!("  {moat} policy get -o yaml");
    println!("  {moat} top                      # per-edge rate, success, latency, denials");
    println!(
        "  curl -s http://{}/metrics | grep moat_authz",
        mesh.payments.admin
    );
    println!("  curl -s http://{}/config", mesh.orders.admin);
    println!("  logs: {}/logs", mesh.dir.display());
}
