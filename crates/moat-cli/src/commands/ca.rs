//! `moat ca show|bundle`.

use clap::Subcommand;
use moat_api::v1::{CaCertificate, ShowCaRequest};

use super::{admin, time};
use crate::Global;
use crate::connect::status;

#[derive(Subcommand, Debug)]
pub enum CaCmd {
    /// Show the trust domain, roots and issuing intermediate with their expiry.
    Show,
    /// Print the trust bundle (every root, PEM) for proxies and other clients to trust.
    Bundle,
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
    let ca = admin(global)
        .await?
        .show_ca(ShowCaRequest {})
        .await
        .map_err(|s| status("ca show", s))?
        .into_inner();
    match cmd {
        CaCmd::Show => {
            println!("trust domain  {}", ca.trust_domain);
            println!("default ttl   {}s", ca.default_ttl_seconds);
            for r in &ca.roots {
                line("root", r);
            }
            if let Some(i) = &ca.intermediate {
                line("intermediate", i);
            }
        }
        CaCmd::Bundle => print!("{}", ca.bundle_pem),
    }
    Ok(())
}
