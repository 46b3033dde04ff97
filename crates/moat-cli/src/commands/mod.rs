//! One module per command group. Each `run` returns `anyhow::Result`; `main` turns errors into
//! exit code 1 with the message.

pub mod audit;
pub mod ca;
pub mod cert;
pub mod check;
pub mod demo;
pub mod edges;
pub mod explain;
pub mod inject;
pub mod install;
pub mod policy;
pub mod policy_files;
pub mod revoke;
pub mod status;
pub mod suggest;
pub mod tap;
pub mod token;
pub mod version;

use moat_api::v1::admin_client::AdminClient;
use tonic::transport::Channel;

use crate::Global;
use crate::connect;
use crate::creds::CredDir;

/// An Admin client authenticated with the credential directory in `global`.
pub async fn admin(global: &Global) -> anyhow::Result<AdminClient<Channel>> {
    let dir = CredDir::load(&global.credentials)?;
    let td = dir.credential.id().trust_domain().clone();
    let channel = connect::channel(
        &global.control_plane,
        dir.bundle.clone(),
        &td,
        Some(&dir.credential),
    )
    .await?;
    Ok(AdminClient::new(channel))
}

/// Formats Unix seconds as RFC 3339 (UTC).
pub fn time(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Parses a duration flag such as `1h` or `30m`.
pub fn duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 30m, 1h, 12h)"))
}
