//! Where the Kubernetes API server is and how the control plane proves itself to it (the pod's
//! service-account token as bearer, the cluster CA), shared by the trust-bundle publisher and
//! the policy controller; and a kube-rs client for it.

use std::path::{Path, PathBuf};

/// Why a call to the API server, or setting up for one, failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("KUBERNETES_SERVICE_HOST is not set: not running in a pod? pass --kube-api")]
    NotInCluster,
    #[error("--kube-api {0:?} is not an https://host[:port] URL")]
    ApiUrl(String),
    #[error("cannot read the cluster CA {path}: {source}")]
    ClusterCa {
        path: PathBuf,
        #[source]
        source: moat_tls::cred_dir::CredDirError,
    },
    #[error("cannot read the service-account token {path}: {source}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// The API server and the control plane's credentials for it.
#[derive(Clone, Debug)]
pub struct ApiServer {
    /// `https://host:port`.
    pub url: String,
    /// The bearer token (the pod's projected service-account token: it rotates, so it is read
    /// again before it is used).
    pub token_file: PathBuf,
    /// The cluster CA that signed the API server's certificate.
    pub ca_file: PathBuf,
}

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

impl ApiServer {
    /// The in-cluster defaults: the API server from the service environment, the pod's
    /// service-account token and CA.
    pub fn in_cluster() -> Result<Self, KubeError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| KubeError::NotInCluster)?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        Ok(Self::at(format!("https://{host}:{port}"), None, None))
    }

    /// `url`, with the given token and CA files or the pod's.
    pub fn at(url: String, token_file: Option<PathBuf>, ca_file: Option<PathBuf>) -> Self {
        let sa = Path::new(SERVICE_ACCOUNT);
        ApiServer {
            url,
            token_file: token_file.unwrap_or_else(|| sa.join("token")),
            ca_file: ca_file.unwrap_or_else(|| sa.join("ca.crt")),
        }
    }

    /// A kube-rs client: TLS verified with the cluster CA (aws-lc-rs, as everywhere in moat),
    /// the token file as bearer (kube re-reads it every minute, as projected tokens rotate).
    pub fn client(&self) -> Result<kube::Client, KubeError> {
        let uri: http::Uri = self
            .url
            .parse()
            .map_err(|_| KubeError::ApiUrl(self.url.clone()))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err(KubeError::ApiUrl(self.url.clone()));
        }
        // Read both now, so a wrong path fails at start with its name.
        let ca = moat_tls::cred_dir::read_bundle(&self.ca_file).map_err(|source| {
            KubeError::ClusterCa {
                path: self.ca_file.clone(),
                source,
            }
        })?;
        std::fs::metadata(&self.token_file).map_err(|source| KubeError::Token {
            path: self.token_file.clone(),
            source,
        })?;
        let mut cfg = kube::Config::new(uri);
        cfg.root_cert = Some(ca.roots().iter().map(|c| c.to_vec()).collect());
        cfg.auth_info.token_file = Some(self.token_file.display().to_string());
        Ok(kube::Client::try_from(cfg)?)
    }
}
