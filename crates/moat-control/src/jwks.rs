//! Reading token issuers' key sets: each trusted issuer's JWKS (inline, a file on this host, or
//! an HTTPS URL), checked, the last good one kept per issuer, files and URLs re-read at their
//! refresh interval. The leader runs the reads (`mesh_follow::refresh_jwks`) and stores what
//! they give; every replica serves the stored key sets (`key_sets`).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Empty, Limited};
use moat_policy::jwt::{Jwks, JwksError, MAX_JWKS_BYTES};
use moat_policy::{JwksSource, JwtIssuer, MeshConfig};
use tokio_rustls::rustls;

/// How long a JWKS fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an issuer's key set could not be read: the kind of failure, with what to fix.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is {size} bytes; the limit is {MAX_JWKS_BYTES}")]
    TooLarge { path: String, size: u64 },
    #[error("caFile {path}: {detail}")]
    CaFile { path: String, detail: String },
    #[error("no system root certificates found: give jwks.caFile for this issuer")]
    NoSystemRoots,
    #[error("fetching {url} timed out after {FETCH_TIMEOUT:?}")]
    Timeout { url: String },
    #[error("{url}: {detail}")]
    Fetch { url: String, detail: String },
    #[error("TLS set-up: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Keys(#[from] JwksError),
}

/// Reads `issuer`'s JWKS from its source and checks it; the error says what to fix.
pub async fn resolve(issuer: &JwtIssuer) -> Result<String, SourceError> {
    let json = match &issuer.jwks {
        JwksSource::Inline(json) => json.clone(),
        JwksSource::File { path, .. } => read_file(path)?,
        JwksSource::Url {
            url,
            ca_file,
            token_file,
            ..
        } => {
            // Projected tokens rotate: read the token for every fetch.
            let token = token_file
                .as_deref()
                .map(|path| {
                    std::fs::read_to_string(path)
                        .map(|t| t.trim().to_owned())
                        .map_err(|source| SourceError::Read {
                            path: path.to_owned(),
                            source,
                        })
                })
                .transpose()?;
            tokio::time::timeout(
                FETCH_TIMEOUT,
                fetch(url, ca_file.as_deref(), token.as_deref()),
            )
            .await
            .map_err(|_| SourceError::Timeout { url: url.clone() })??
        }
    };
    Jwks::parse(&json, &issuer.algorithms)?;
    Ok(json)
}

fn read_file(path: &str) -> Result<String, SourceError> {
    let read = |source| SourceError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read)?;
    if meta.len() > MAX_JWKS_BYTES as u64 {
        return Err(SourceError::TooLarge {
            path: path.to_owned(),
            size: meta.len(),
        });
    }
    std::fs::read_to_string(path).map_err(read)
}

fn tls_config(ca_file: Option<&str>) -> Result<rustls::ClientConfig, SourceError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let bad = |detail: String| SourceError::CaFile {
                path: path.to_owned(),
                detail,
            };
            let certs = moat_tls::cred_dir::read_bundle(std::path::Path::new(path))
                .map_err(|e| bad(e.to_string()))?;
            for c in certs.roots() {
                roots.add(c.clone()).map_err(|e| bad(e.to_string()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                // A system root rustls cannot use is skipped, like every TLS client does.
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(SourceError::NoSystemRoots);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// GET `url` over HTTPS (HTTP/1.1), verifying the server against `ca_file` or the system roots,
/// with `token` as the bearer token when given.
async fn fetch(
    url: &str,
    ca_file: Option<&str>,
    token: Option<&str>,
) -> Result<String, SourceError> {
    let failed = |detail: String| SourceError::Fetch {
        url: url.to_owned(),
        detail,
    };
    let uri: http::Uri = url.parse().map_err(|e| failed(format!("{e}")))?;
    let host = uri
        .host()
        .ok_or_else(|| failed("the URL has no host".into()))?
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let name =
        rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| failed(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(ca_file)?));
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| failed(format!("cannot connect to {host}:{port}: {e}")))?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| failed(format!("TLS with {host}:{port} failed: {e}")))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| failed(e.to_string()))?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut req = http::Request::get(path)
        .header(http::header::HOST, &host)
        .header(http::header::ACCEPT, "application/json");
    if let Some(token) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| failed(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let status = resp.status();
    if matches!(status.as_u16(), 401 | 403) {
        return Err(failed(match token {
            None => format!(
                "answered {status}: it wants an authenticated caller; give jwks.tokenFile (on Kubernetes the control plane's service-account token, /var/run/secrets/kubernetes.io/serviceaccount/token)"
            ),
            Some(_) => format!(
                "answered {status} to the token in jwks.tokenFile: check that the token is current and its service account may read {path}"
            ),
        }));
    }
    if !status.is_success() {
        return Err(failed(format!("answered {status}")));
    }
    let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| failed(format!("{e} (the limit is {MAX_JWKS_BYTES} bytes)")))?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| failed("the answer is not UTF-8 text".into()))
}

/// The last good key set of one issuer.
#[derive(Clone, Debug)]
struct Entry {
    source: JwksSource,
    json: String,
    fetched: Instant,
}

/// The last good key set of every trusted issuer.
#[derive(Debug, Default)]
pub struct JwksCache {
    entries: RwLock<HashMap<String, Entry>>,
    /// When a failing source was last attempted (so failures are retried at the refresh pace).
    failed: RwLock<HashMap<String, Instant>>,
}

impl JwksCache {
    /// Every key set read, by slot (an issuer's `iss`, or [`KUBERNETES`]).
    pub fn entries(&self) -> Vec<(String, String)> {
        self.entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(slot, e)| (slot.clone(), e.json.clone()))
            .collect()
    }

    /// Brings the cache in line with `mesh`: drops issuers no longer trusted, reads those that are
    /// new, whose source changed or whose refresh is due. Returns whether any key set changed.
    pub async fn sync(&self, mesh: &MeshConfig) -> bool {
        let mut changed = false;
        let wanted = slots(mesh);
        {
            let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
            let before = entries.len();
            entries.retain(|slot, _| wanted.iter().any(|(s, _)| s == slot));
            changed |= entries.len() != before;
        }
        for (slot, issuer) in wanted {
            let refresh = match &issuer.jwks {
                JwksSource::Inline(_) => None,
                JwksSource::File { refresh, .. } | JwksSource::Url { refresh, .. } => {
                    Some(*refresh)
                }
            };
            let current = self
                .entries
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&slot)
                .cloned();
            let due = match &current {
                None => true,
                Some(e) if e.source != issuer.jwks => true,
                Some(e) => refresh.is_some_and(|r| e.fetched.elapsed() >= r),
            };
            let last_failure = self
                .failed
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&slot)
                .copied();
            let source_changed = current.as_ref().is_none_or(|e| e.source != issuer.jwks);
            let backing_off = last_failure.is_some_and(|t| {
                !source_changed && t.elapsed() < refresh.unwrap_or(Duration::from_secs(30))
            });
            if !due || backing_off {
                continue;
            }
            match resolve(issuer).await {
                Ok(json) => {
                    self.failed
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&slot);
                    let new = current.as_ref().is_none_or(|e| e.json != json);
                    if new {
                        tracing::info!(issuer = %issuer.issuer, "read a new key set for the issuer");
                    }
                    changed |= new;
                    self.entries
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(
                            slot.clone(),
                            Entry {
                                source: issuer.jwks.clone(),
                                json,
                                fetched: Instant::now(),
                            },
                        );
                }
                Err(e) => {
                    tracing::warn!(issuer = %issuer.issuer, error = %e, "cannot refresh the issuer's key set; keeping the last good one");
                    self.failed
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(slot.clone(), Instant::now());
                }
            }
        }
        changed
    }
}

/// The cache slot of the Kubernetes service-account issuer (end-user issuers use their `iss`).
pub const KUBERNETES: &str = "kubernetes:service-accounts";

/// The slots of every issuer `mesh` trusts.
pub fn slot_names(mesh: &MeshConfig) -> Vec<String> {
    slots(mesh).into_iter().map(|(slot, _)| slot).collect()
}

/// Every issuer `mesh` trusts, by cache slot.
fn slots(mesh: &MeshConfig) -> Vec<(String, &JwtIssuer)> {
    mesh.jwt_issuers
        .iter()
        .map(|i| (i.issuer.clone(), i))
        .chain(
            mesh.kubernetes
                .iter()
                .map(|k| (KUBERNETES.to_owned(), &k.issuer)),
        )
        .collect()
}
