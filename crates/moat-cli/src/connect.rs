//! Connecting to the control plane: TLS 1.3 to the address in `--control-plane`, accepting only
//! a server that proves the control plane's SPIFFE ID under our trust anchors — checked during
//! the handshake, before any token or request is sent.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use hyper_util::rt::TokioIo;
use moat_identity::{SpiffeId, TrustBundle, TrustDomain};
use moat_tls::Credential;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

/// The control plane's SPIFFE ID in `td`.
pub fn control_plane_id(td: &TrustDomain) -> anyhow::Result<SpiffeId> {
    Ok(SpiffeId::parse_with_default(
        "moat-system/moat-control",
        td,
    )?)
}

/// `host:port` from `https://host:port`, `host:port` or `https://host` (port 7443).
pub fn authority(url: &str) -> anyhow::Result<String> {
    let rest = url.strip_prefix("https://").unwrap_or(url);
    if rest.contains("://") {
        bail!("--control-plane {url:?}: use https://HOST:PORT (the control plane only speaks TLS)");
    }
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        bail!("--control-plane {url:?}: expected https://HOST:PORT");
    }
    let has_port = rest
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !rest.ends_with(']');
    Ok(if has_port {
        rest.to_owned()
    } else {
        format!("{rest}:7443")
    })
}

/// Opens a gRPC channel to the control plane at `url`, verified against `bundle`, presenting
/// `cred` when given.
pub async fn channel(
    url: &str,
    bundle: TrustBundle,
    td: &TrustDomain,
    cred: Option<&Credential>,
) -> anyhow::Result<Channel> {
    let addr = authority(url)?;
    let config = moat_tls::client_config(cred, Arc::new(bundle), control_plane_id(td)?)?;
    let connector = TlsConnector::from(config);
    let target = addr.clone();
    let service = tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let connector = connector.clone();
        let target = target.clone();
        async move {
            let tcp = TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            // The name is not checked (identity is the SPIFFE ID); rustls only needs a valid one.
            let name =
                ServerName::try_from("moat-control.moat-system").map_err(std::io::Error::other)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("invalid control-plane address {addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    endpoint.connect_with_connector(service).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the moat control plane at {addr}: {}\n(if this is a certificate error, the server did not prove it is this mesh's control plane: check --control-plane and the trust anchors)",
            error_chain(&e)
        )
    })
}

/// Every message in an error's source chain, joined.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !parts.iter().any(|p| p.contains(&m)) {
            parts.push(m);
        }
        cur = s.source();
    }
    parts.join(": ")
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
