//! `moat ca show|bundle|rotate-root|rotate-intermediate`.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Subcommand;
use moat_api::v1::{
    CaCertificate, CaRotationStatus, RotateIntermediateRequest, RotateRootRequest, ShowCaRequest,
};

use super::{admin, duration, time};
use crate::Global;
use crate::connect::status;
use crate::output::Output;

/// How often a rotation polls the control plane.
const POLL: Duration = Duration::from_millis(300);

#[derive(Subcommand, Debug)]
pub enum CaCmd {
    /// Show the trust domain, roots and issuing intermediate with their expiry.
    Show {
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
    /// Print the trust bundle (every root, PEM) for proxies and other clients to trust.
    Bundle,
    /// Replace the root without downtime: (1) add a new root to the bundle, (2) issue from a new
    /// intermediate under it and have every proxy renew, (3) retire the old root. Each step
    /// waits until every connected proxy acknowledged the previous one. Interrupted, it resumes
    /// where it stopped when run again.
    RotateRoot {
        /// Only show where the rotation stands.
        #[arg(long)]
        status: bool,
        /// How long to wait for the fleet before giving up (the rotation stays where it is).
        #[arg(long, default_value = "10m", value_parser = duration)]
        timeout: Duration,
    },
    /// Issue from a new intermediate under the same root and have every proxy renew.
    RotateIntermediate {
        /// Only show how many proxies hold a certificate from the current intermediate.
        #[arg(long)]
        status: bool,
        #[arg(long, default_value = "5m", value_parser = duration)]
        timeout: Duration,
    },
}

/// Expiry closer than this is flagged by `moat ca show`.
const EXPIRY_WARNING: i64 = 30 * 86400;

fn short(sha: &str) -> &str {
    sha.get(..16).unwrap_or(sha)
}

fn print_status(s: &CaRotationStatus) {
    println!("phase         {}", s.phase);
    if !s.new_root_sha256.is_empty() {
        println!(
            "roots         old {} → new {} (started {})",
            short(&s.old_root_sha256),
            short(&s.new_root_sha256),
            time(s.started_unix)
        );
    }
    let bundle: Vec<&str> = s.bundle_sha256.iter().map(|b| short(b)).collect();
    println!("bundle        {}", bundle.join(", "));
    println!("intermediate  {}", short(&s.intermediate_sha256));
    println!(
        "proxies       {} connected, {} on the current bundle, {} on the current intermediate",
        s.proxies, s.on_current_bundle, s.on_current_intermediate
    );
    if !s.waiting_for.is_empty() {
        println!("waiting for   {}", s.waiting_for);
        for w in &s.waiting {
            println!("  … {w}");
        }
    }
}

/// Whether the fleet has fully caught up with the CA in force.
fn settled(s: &CaRotationStatus) -> bool {
    s.waiting_for.is_empty()
}

async fn rotate_root(global: &Global, status_only: bool, timeout: Duration) -> anyhow::Result<()> {
    let call = |start: bool, advance: bool| async move {
        // A fresh connection each time: the control plane rewrites the admin credential and its
        // bundle when the CA changes, and serves under the new root after step 2.
        admin(global)
            .await?
            .rotate_root(RotateRootRequest { start, advance })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| status("ca rotate-root", s))
    };
    if status_only {
        print_status(&call(false, false).await?);
        return Ok(());
    }
    let before = call(false, false).await?;
    if rotating(&before) {
        println!("resuming the root rotation in phase {}", before.phase);
    }
    let first = call(true, true).await?;
    let deadline = Instant::now() + timeout;
    let mut s = first;
    let mut last_wait = String::new();
    loop {
        if !s.step_taken.is_empty() {
            println!("✓ {}", s.step_taken);
        }
        if !rotating(&s) && settled(&s) {
            println!(
                "root rotation complete: {} proxies trust only {} and hold certificates from it",
                s.proxies,
                s.bundle_sha256.join(", ")
            );
            return Ok(());
        }
        let wait = format!(
            "{} ({}/{} bundle, {}/{} intermediate)",
            s.waiting_for, s.on_current_bundle, s.proxies, s.on_current_intermediate, s.proxies
        );
        if wait != last_wait && !s.waiting_for.is_empty() {
            println!("  waiting for {wait}");
            last_wait = wait;
        }
        if Instant::now() > deadline {
            print_status(&s);
            bail!(
                "the fleet did not catch up within {}s; the rotation stays in phase {} — fix the proxies named above (or wait for them to disconnect) and run `moat ca rotate-root` again to resume",
                timeout.as_secs(),
                s.phase
            );
        }
        tokio::time::sleep(POLL).await;
        s = call(false, true).await?;
    }
}

async fn rotate_intermediate(
    global: &Global,
    status_only: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let call = |start: bool| async move {
        admin(global)
            .await?
            .rotate_intermediate(RotateIntermediateRequest { start })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| status("ca rotate-intermediate", s))
    };
    let mut s = call(!status_only).await?;
    if status_only {
        print_status(&s);
        return Ok(());
    }
    println!("✓ {}", s.step_taken);
    let deadline = Instant::now() + timeout;
    while !settled(&s) {
        if Instant::now() > deadline {
            print_status(&s);
            bail!(
                "{} of {} proxies still hold certificates from the previous intermediate after {}s (they stay valid until they expire)",
                s.proxies - s.on_current_intermediate,
                s.proxies,
                timeout.as_secs()
            );
        }
        tokio::time::sleep(POLL).await;
        s = call(false).await?;
    }
    println!(
        "intermediate rotation complete: {} proxies hold certificates from {}",
        s.proxies,
        short(&s.intermediate_sha256)
    );
    Ok(())
}

fn line(kind: &str, c: &CaCertificate) {
    println!("{kind:<13} {}", c.subject);
    println!("{:<13} sha256 {}", "", c.sha256_fingerprint);
    println!(
        "{:<13} valid {} .. {}",
        "",
        time(c.not_before_unix),
        time(c.not_after_unix)
    );
}

pub async fn run(global: &Global, cmd: CaCmd) -> anyhow::Result<()> {
    match cmd {
        CaCmd::RotateRoot { status, timeout } => return rotate_root(global, status, timeout).await,
        CaCmd::RotateIntermediate { status, timeout } => {
            return rotate_intermediate(global, status, timeout).await;
        }
        CaCmd::Show { .. } | CaCmd::Bundle => {}
    }
    let ca = admin(global)
        .await?
        .show_ca(ShowCaRequest {})
        .await
        .map_err(|s| status("ca show", s))?
        .into_inner();
    match cmd {
        CaCmd::Show { output } if !output.is_table() => {
            let cert = |c: &CaCertificate| {
                serde_json::json!({
                    "subject": c.subject,
                    "sha256": c.sha256_fingerprint,
                    "not_before_unix": c.not_before_unix,
                    "not_after_unix": c.not_after_unix,
                })
            };
            let data = serde_json::json!({
                "trust_domain": ca.trust_domain,
                "default_ttl_seconds": ca.default_ttl_seconds,
                "roots": ca.roots.iter().map(cert).collect::<Vec<_>>(),
                "intermediate": ca.intermediate.as_ref().map(cert),
            });
            output.print(&data, || {})?;
        }
        CaCmd::Show { .. } => {
            println!("trust domain  {}", ca.trust_domain);
            println!("default ttl   {}s", ca.default_ttl_seconds);
            for r in &ca.roots {
                line("root", r);
            }
            if let Some(i) = &ca.intermediate {
                line("intermediate", i);
            }
            let now = moat_identity::clock::unix_now();
            for c in ca.roots.iter().chain(ca.intermediate.as_ref()) {
                if c.not_after_unix - now < EXPIRY_WARNING {
                    println!(
                        "warning       {} expires {}: rotate it (`moat ca rotate-root` / `moat ca rotate-intermediate`)",
                        c.subject,
                        time(c.not_after_unix)
                    );
                }
            }
        }
        CaCmd::Bundle => print!("{}", ca.bundle_pem),
        CaCmd::RotateRoot { .. } | CaCmd::RotateIntermediate { .. } => {}
    }
    Ok(())
}

/// Whether a root rotation is in progress: only then has it a start time. (The phase is a word
/// for people; the control plane owns its spelling.)
fn rotating(s: &CaRotationStatus) -> bool {
    s.started_unix != 0
}
