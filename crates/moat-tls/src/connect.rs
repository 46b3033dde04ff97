//! Dialling a gRPC server in the mesh (the control plane): TCP, then TLS 1.3 that accepts only
//! a server proving `expected` under `bundle`. The identity check happens inside the handshake,
//! before any request, token or credential is sent.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use moat_identity::{SpiffeId, TrustBundle};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::{Credential, client_config};

/// Why a channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid address {0:?}: expected https://HOST:PORT")]
    Address(String),
    #[error(transparent)]
    Tls(#[from] crate::CredentialError),
    #[error(
        "cannot reach {expected} at {addr}: {detail}\n(on a certificate error the server did not prove it is {expected} under the trust anchors: check the address and the bundle)"
    )]
    Connect {
        addr: String,
        expected: String,
        detail: String,
    },
}

/// `host:port` from `https://host:port`, `host:port` or `https://host` (port 7443), parsed as a
/// URI (`http::Uri`): https only, no path, query or user info.
pub fn authority(url: &str) -> Result<String, ConnectError> {
    let bad = || ConnectError::Address(url.to_owned());
    let full = if url.contains("://") {
        url.to_owned()
    } else {
        format!("https://{url}")
    };
    let uri: http::Uri = full.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("https")
        || uri
            .path_and_query()
            .is_some_and(|p| !matches!(p.as_str(), "" | "/"))
    {
        return Err(bad());
    }
    let authority = uri.authority().ok_or_else(bad)?;
    if authority.as_str().contains('@') || authority.host().is_empty() {
        return Err(bad());
    }
    let host = authority.host();
    let port = match authority.as_str().strip_prefix(host) {
        Some("") => 7443,
        _ => authority.port_u16().ok_or_else(bad)?,
    };
    Ok(format!("{host}:{port}"))
}

/// Opens a gRPC channel to `url`, presenting `cred` when given.
pub async fn channel(
    url: &str,
    bundle: TrustBundle,
    expected: SpiffeId,
    cred: Option<&Credential>,
) -> Result<Channel, ConnectError> {
    channel_from(url, bundle, expected, cred, None).await
}

/// [`channel`], with its TCP connections made from the local address `source` when given (the
/// benchmarks give each simulated proxy its own loopback address, as each sidecar has its own).
pub async fn channel_from(
    url: &str,
    bundle: TrustBundle,
    expected: SpiffeId,
    cred: Option<&Credential>,
    source: Option<std::net::IpAddr>,
) -> Result<Channel, ConnectError> {
    let addr = authority(url)?;
    let config = client_config(cred, Arc::new(bundle), expected.clone(), crate::ALPN_H2)?;
    let connector = TlsConnector::from(config);
    let target = addr.clone();
    let service = tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let connector = connector.clone();
        let target = target.clone();
        async move {
            let tcp = match source {
                None => TcpStream::connect(&target).await?,
                Some(ip) => {
                    let to = tokio::net::lookup_host(&target)
                        .await?
                        .next()
                        .ok_or_else(|| {
                            std::io::Error::other(format!("{target} resolves to no address"))
                        })?;
                    let socket = if to.is_ipv4() {
                        tokio::net::TcpSocket::new_v4()?
                    } else {
                        tokio::net::TcpSocket::new_v6()?
                    };
                    socket.bind(std::net::SocketAddr::new(ip, 0))?;
                    socket.connect(to).await?
                }
            };
            tcp.set_nodelay(true)?;
            // The name is not checked (identity is the SPIFFE ID); rustls only needs a valid one.
            let name = ServerName::try_from("moat.invalid").map_err(std::io::Error::other)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| ConnectError::Address(url.to_owned()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    endpoint
        .connect_with_connector(service)
        .await
        .map_err(|e| ConnectError::Connect {
            addr,
            expected: expected.to_string(),
            detail: error_chain(&e),
        })
}

/// Every distinct message in an error's source chain, joined with `: `.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_forms() {
        assert_eq!(authority("https://cp:9000").unwrap(), "cp:9000");
        assert_eq!(authority("cp:9000").unwrap(), "cp:9000");
        assert_eq!(authority("https://cp").unwrap(), "cp:7443");
        assert_eq!(authority("https://[::1]:7443/").unwrap(), "[::1]:7443");
        assert_eq!(authority("[::1]").unwrap(), "[::1]:7443");
        for bad in [
            "",
            "http://cp:1",
            "https://cp/path",
            "https://cp?x=1",
            "https://user@cp:1",
            "https://cp:notaport",
        ] {
            assert!(authority(bad).is_err(), "{bad:?}");
        }
    }
}
