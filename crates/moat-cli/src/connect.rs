//! The CLI's view of the control plane: its SPIFFE ID and readable errors. Dialling itself is
//! `moat_tls::connect`.

use moat_identity::{SpiffeId, TrustBundle, TrustDomain};
use moat_tls::Credential;
use moat_tls::connect::error_chain;
use tonic::transport::Channel;

/// Opens a channel to the control plane at `url`, verified against `bundle`. `url` may name
/// several replicas, comma-separated: the first one that answers is used, and when none does
/// the error lists why for each.
pub async fn channel(
    url: &str,
    bundle: TrustBundle,
    td: &TrustDomain,
    cred: Option<&Credential>,
) -> anyhow::Result<Channel> {
    let urls: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    let mut failures = Vec::new();
    for u in &urls {
        match moat_tls::connect::channel(u, bundle.clone(), SpiffeId::control_plane(td), cred).await
        {
            Ok(c) => return Ok(c),
            Err(e) if urls.len() == 1 => return Err(e.into()),
            Err(e) => failures.push(format!("{u}: {e}")),
        }
    }
    if failures.is_empty() {
        anyhow::bail!(
            "--control-plane is empty: give https://HOST:PORT (comma-separated for several replicas)"
        );
    }
    anyhow::bail!(
        "no control-plane replica answered:\n  {}",
        failures.join("\n  ")
    )
}

/// Turns a gRPC failure into a readable error.
pub fn status(action: &str, s: tonic::Status) -> anyhow::Error {
    if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown {
        let source = std::error::Error::source(&s)
            .map(error_chain)
            .unwrap_or_default();
        return anyhow::anyhow!(
            "{action}: control plane unavailable: {} {source}",
            s.message()
        );
    }
    anyhow::anyhow!(
        "{action}: refused by the control plane ({:?}): {}",
        s.code(),
        s.message()
    )
}
