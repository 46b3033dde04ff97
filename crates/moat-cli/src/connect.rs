//! The CLI's view of the control plane: its SPIFFE ID and readable errors. Dialling itself is
//! `moat_tls::connect`.

use moat_identity::{SpiffeId, TrustBundle, TrustDomain};
use moat_tls::Credential;
use moat_tls::connect::error_chain;
use tonic::transport::Channel;

/// Opens a channel to the control plane at `url`, verified against `bundle`.
pub async fn channel(
    url: &str,
    bundle: TrustBundle,
    td: &TrustDomain,
    cred: Option<&Credential>,
) -> anyhow::Result<Channel> {
    Ok(moat_tls::connect::channel(url, bundle, SpiffeId::control_plane(td), cred).await?)
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
