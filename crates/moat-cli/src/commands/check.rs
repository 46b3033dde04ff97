//! `moat check`: pre-flight and health checks, one line each, non-zero exit when any fails (for
//! CI and cron). Ends with the fleet's outage budget: how long the mesh survives a control-plane
//! outage (until the first proxy certificate expires).

use std::time::{Duration, Instant};

use moat_api::v1::{
    ListProxiesRequest, ListProxiesResponse, ProxyStatus, ShowCaRequest, ShowCaResponse,
};
use moat_identity::{Usage, verify_chain};
use rustls_pki_types::UnixTime;

use serde_json::{Value, json};

use super::{admin, duration, time};
use crate::Global;
use crate::connect::status;
use crate::creds::CredDir;
use crate::output::Output;

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Root and intermediate must stay valid at least this long.
    #[arg(long, default_value = "30d", value_parser = duration)]
    horizon: Duration,
    /// A proxy not heard from for this long counts as disconnected.
    #[arg(long, default_value = "30s", value_parser = duration)]
    stale_after: Duration,
    /// Largest tolerated clock difference between this machine and the control plane.
    #[arg(long, default_value = "30s", value_parser = duration)]
    max_skew: Duration,
    /// table: one line per check as it completes; json/yaml: every check, then the verdict.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

/// The checks so far: printed as they complete for people, gathered for -o json/yaml.
struct Report {
    output: Output,
    checks: Vec<Value>,
    failed: usize,
    outage_budget: Option<Value>,
}

impl Report {
    fn new(output: Output) -> Self {
        Report {
            output,
            checks: Vec::new(),
            failed: 0,
            outage_budget: None,
        }
    }

    fn line(&mut self, ok: bool, name: &str, detail: String) {
        if !ok {
            self.failed += 1;
        }
        if self.output.is_table() {
            println!("{} {name:<26} {detail}", if ok { "ok  " } else { "FAIL" });
        }
        self.checks
            .push(json!({ "name": name, "ok": ok, "detail": detail }));
    }

    /// Prints the gathered report (-o json/yaml), then fails if any check did.
    fn finish(self) -> anyhow::Result<()> {
        let data = json!({
            "checks": self.checks,
            "failed": self.failed,
            "outage_budget": self.outage_budget,
        });
        let failed = self.failed;
        self.output.print(&data, || {
            if failed == 0 {
                println!("all checks passed");
            }
        })?;
        if failed > 0 {
            anyhow::bail!("{failed} check(s) failed");
        }
        Ok(())
    }
}

/// How long past its refresh point a proxy may take to land a renewal (seconds).
const RENEWAL_GRACE: i64 = 5;

fn human(secs: i64) -> String {
    humantime::format_duration(Duration::from_secs(secs.max(0) as u64)).to_string()
}

pub async fn run(global: &Global, args: CheckArgs) -> anyhow::Result<()> {
    let mut r = Report::new(args.output);
    let started = Instant::now();
    let mut client = match admin(global).await {
        Ok(c) => c,
        Err(e) => {
            r.line(false, "control plane reachable", format!("{e:#}"));
            return r.finish();
        }
    };
    let ca = client
        .show_ca(ShowCaRequest {})
        .await
        .map_err(|s| status("check", s))?
        .into_inner();
    r.line(
        true,
        "control plane reachable",
        format!(
            "{} in {} ms",
            global.control_plane,
            started.elapsed().as_millis()
        ),
    );
    let dir = CredDir::load(&global.credentials)?;
    check_ca(&mut r, &ca, &dir, args.horizon);
    let fleet = client
        .list_proxies(ListProxiesRequest {})
        .await
        .map_err(|s| status("check", s))?
        .into_inner();
    check_fleet(&mut r, &fleet, &args);
    outage_budget(&mut r, &fleet);
    r.finish()
}

/// The CA: the CLI's own credential, issued by the CA now in use, verifies under the bundle,
/// and neither a root nor the intermediate expires within `horizon`.
fn check_ca(r: &mut Report, ca: &ShowCaResponse, dir: &CredDir, horizon: Duration) {
    // The CLI's own credential was issued by the CA now in use: its chain must verify.
    let chain_ok = verify_chain(
        dir.credential.chain(),
        &dir.bundle,
        dir.credential.id().trust_domain(),
        UnixTime::now(),
        Usage::Client,
    );
    r.line(
        chain_ok.is_ok(),
        "CA chain valid",
        match &chain_ok {
            Ok(_) => format!(
                "intermediate {} under the bundle's roots",
                ca.intermediate
                    .as_ref()
                    .map(|i| i.subject.as_str())
                    .unwrap_or("?")
            ),
            Err(e) => e.to_string(),
        },
    );
    let horizon = horizon.as_secs() as i64;
    let now = moat_identity::clock::unix_now();
    for root in &ca.roots {
        let left = root.not_after_unix - now;
        r.line(
            left > horizon,
            "root expiry",
            format!(
                "{} expires {} (in {})",
                root.subject,
                time(root.not_after_unix),
                human(left)
            ),
        );
    }
    if let Some(i) = &ca.intermediate {
        let left = i.not_after_unix - now;
        r.line(
            left > horizon,
            "intermediate expiry",
            format!(
                "{} expires {} (in {})",
                i.subject,
                time(i.not_after_unix),
                human(left)
            ),
        );
    }
}

/// The fleet: clock skew, the default posture, each connected proxy, and proxies that left
/// without saying goodbye.
fn check_fleet(r: &mut Report, fleet: &ListProxiesResponse, args: &CheckArgs) {
    let skew = (fleet.server_time_unix_ms - (moat_identity::clock::unix_now() * 1000)).abs() / 1000;
    r.line(
        skew <= args.max_skew.as_secs() as i64,
        "clock skew",
        format!("{skew} s between this machine and the control plane"),
    );
    r.line(
        fleet.default_posture != moat_policy::DefaultPosture::AllowAuthenticated.as_str(),
        "default posture",
        if fleet.default_posture == moat_policy::DefaultPosture::AllowAuthenticated.as_str() {
            "allow-authenticated: services without a policy accept any mesh caller (migration mode)"
                .into()
        } else {
            "deny (zero trust)".into()
        },
    );
    let now_ms = moat_identity::clock::unix_now() * 1000;
    let stale_ms = args.stale_after.as_millis() as i64;
    for p in &fleet.proxies {
        check_proxy(r, p, now_ms, stale_ms);
    }
    for d in &fleet.disconnected {
        r.line(
            false,
            "proxy connected",
            format!(
                "{} {}: disconnected {} s ago without shutting down (crashed, killed or cut off)",
                d.spiffe_id,
                d.inbound_address,
                (now_ms - d.disconnected_unix_ms).max(0) / 1000
            ),
        );
    }
}

/// One connected proxy: heard from lately, up to date, renewing its certificate on time.
fn check_proxy(r: &mut Report, p: &ProxyStatus, now_ms: i64, stale_ms: i64) {
    let who = format!("{} {}", p.spiffe_id, p.inbound_address);
    let seen = (now_ms - p.last_seen_unix_ms).max(0);
    r.line(
        seen <= stale_ms,
        "proxy connected",
        format!("{who}: last seen {} s ago", seen / 1000),
    );
    let current =
        p.bundle_current && p.snapshot_applied == p.snapshot_sent && p.last_error.is_empty();
    r.line(
        current,
        "proxy up to date",
        if current {
            format!("{who}: snapshot {}, current bundle", p.snapshot_applied)
        } else {
            format!(
                "{who}: applied {} of {}, bundle current: {}, last NACK: {}",
                p.snapshot_applied, p.snapshot_sent, p.bundle_current, p.last_error
            )
        },
    );
    // A proxy renews at its refresh point (about half-life); one that is past it (plus a
    // moment for the renewal to land) is failing to renew.
    let now = moat_identity::clock::unix_now();
    let left = p.cert_not_after_unix - now;
    let overdue = now - p.cert_refresh_after_unix;
    r.line(
        overdue <= RENEWAL_GRACE && left > 0,
        "proxy certificate",
        if overdue <= RENEWAL_GRACE {
            format!("{who}: {} expires in {}", p.cert_serial, human(left))
        } else {
            format!(
                "{who}: {} is past its renewal point by {} without renewal (expires in {}): see the proxy's log for `certificate renewal failed`",
                p.cert_serial,
                human(overdue),
                human(left)
            )
        },
    );
}

/// How long the mesh survives a control-plane outage: until the first proxy certificate expires.
fn outage_budget(r: &mut Report, fleet: &ListProxiesResponse) {
    if fleet.proxies.is_empty() && r.output.is_table() {
        println!("note no proxies are connected");
    }
    if let Some(first) = fleet.proxies.iter().map(|p| p.cert_not_after_unix).min() {
        let left = first - moat_identity::clock::unix_now();
        if r.output.is_table() {
            println!(
                "outage budget: the mesh survives a control-plane outage for {} (first proxy certificate expires {})",
                human(left),
                time(first)
            );
        }
        r.outage_budget = Some(json!({ "seconds": left.max(0), "first_expiry_unix": first }));
    }
}
