//! Plain HTTP to the demo's own processes (admin ports, the services' front doors): what the
//! process starter waits on and what the narrated checks ask.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// An HTTP/1.1 client for GETs without a body.
pub type Http = Client<HttpConnector, Empty<Bytes>>;

pub fn client() -> Http {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET `http://addr{path}` → (status, parsed JSON body).
pub async fn get(
    c: &Http,
    addr: SocketAddr,
    path: &str,
) -> Result<(u16, serde_json::Value), String> {
    let uri: http::Uri = format!("http://{addr}{path}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), c.get(uri))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    ))
}

/// Whether a sidecar's admin port says it is ready.
pub async fn ready(admin: SocketAddr) -> bool {
    matches!(get(&client(), admin, "/ready").await, Ok((200, _)))
}
