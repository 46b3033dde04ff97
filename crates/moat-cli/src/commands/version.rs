//! `moat version`: this CLI's release and, unless `--client`, the control plane's (over the
//! Admin API, so it also shows which control plane the credentials reach).

use moat_api::v1::VersionRequest;
use serde_json::json;

use super::admin;
use crate::Global;
use crate::connect::status;
use crate::output::Output;

#[derive(clap::Args, Debug)]
pub struct VersionArgs {
    /// Only this CLI's version; do not contact the control plane.
    #[arg(long)]
    client: bool,
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

pub async fn run(global: &Global, args: VersionArgs) -> anyhow::Result<()> {
    let client = env!("CARGO_PKG_VERSION");
    if args.client {
        return args.output.print(&json!({ "client": client }), || {
            println!("client         {client}");
        });
    }
    let server = admin(global)
        .await?
        .version(VersionRequest {})
        .await
        .map_err(|s| status("version", s))?
        .into_inner();
    let data = json!({
        "client": client,
        "control_plane": {
            "version": server.version,
            "url": global.control_plane,
            "trust_domain": server.trust_domain,
        },
    });
    args.output.print(&data, || {
        println!("client         {client}");
        println!(
            "control plane  {} ({}, trust domain {})",
            server.version, global.control_plane, server.trust_domain
        );
    })
}
