//! The demo's three services. They know nothing about the mesh: each listens in plaintext on
//! 127.0.0.1, calls the next one at a plain local address (its sidecar's outbound listener), and
//! reports the caller identity its own sidecar put in `x-moat-peer-id`.
//!
//! - `payments`: gRPC `demo.Payments/Charge`.
//! - `orders`: HTTP `GET|DELETE /orders/{id}`; a GET charges the order through payments.
//! - `frontend`: HTTP `GET /` (the storefront: loads order 42 from orders), `GET /cancel`
//!   (cancels order 42 at orders) and `GET /pay-directly` (tries to skip orders and charge
//!   payments itself).

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;

mod pb {
    #![allow(missing_docs, clippy::all, missing_debug_implementations)]
    tonic::include_proto!("demo");
}

#[derive(Parser, Debug)]
#[command(
    name = "moat-demo-app",
    about = "moat demo services (no mesh code inside)"
)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand, Debug, Clone)]
enum Role {
    /// The gRPC payment service.
    Payments,
    /// The order service; calls payments at PAYMENTS (host:port: a sidecar's local listener,
    /// or a service name under transparent interception).
    Orders {
        #[arg(long)]
        payments: String,
    },
    /// The storefront; calls orders at ORDERS, and payments at PAYMENTS for /pay-directly.
    Frontend {
        #[arg(long)]
        orders: String,
        #[arg(long)]
        payments: String,
    },
}

fn caller<T>(req: &Request<T>) -> String {
    req.headers()
        .get("x-moat-peer-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(none)")
        .to_owned()
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

#[derive(Debug, Default)]
struct PaymentsSvc;

#[tonic::async_trait]
impl pb::payments_server::Payments for PaymentsSvc {
    async fn charge(
        &self,
        req: tonic::Request<pb::ChargeRequest>,
    ) -> Result<tonic::Response<pb::ChargeReply>, tonic::Status> {
        let caller = req
            .metadata()
            .get("x-moat-peer-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("(none)")
            .to_owned();
        let r = req.into_inner();
        Ok(tonic::Response::new(pb::ChargeReply {
            status: format!("charged {} cents for order {}", r.amount_cents, r.order_id),
            caller,
        }))
    }
}

/// Why a charge failed, as the JSON the app answers with: the message, and for a refusal the
/// gRPC status code and the sidecar's deny reason (`x-moat-deny-reason`), each in its own field.
fn charge_failed(error: String, status: Option<&tonic::Status>) -> serde_json::Value {
    json!({
        "error": error,
        "grpc_code": status.map(|s| s.code() as i32),
        "deny_reason": status
            .and_then(|s| s.metadata().get("x-moat-deny-reason"))
            .and_then(|v| v.to_str().ok()),
    })
}

async fn charge(payments: &str, order: &str) -> Result<pb::ChargeReply, serde_json::Value> {
    let mut client = pb::payments_client::PaymentsClient::connect(format!("http://{payments}"))
        .await
        .map_err(|e| charge_failed(format!("cannot reach payments: {e}"), None))?;
    client
        .charge(pb::ChargeRequest {
            order_id: order.to_owned(),
            amount_cents: 4200,
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| {
            charge_failed(
                format!("payments refused: {:?}: {}", s.code(), s.message()),
                Some(&s),
            )
        })
}

async fn orders(req: Request<Incoming>, payments: String) -> Response<Full<Bytes>> {
    let seen = caller(&req);
    let Some(id) = req.uri().path().strip_prefix("/orders/").map(str::to_owned) else {
        return reply(StatusCode::NOT_FOUND, json!({"error": "try /orders/{id}"}));
    };
    match *req.method() {
        http::Method::DELETE => reply(
            StatusCode::OK,
            json!({"service": "orders", "cancelled": id, "caller": seen}),
        ),
        http::Method::GET => match charge(&payments, &id).await {
            Ok(p) => reply(
                StatusCode::OK,
                json!({"service": "orders", "order": id, "caller": seen,
                       "payments": {"status": p.status, "caller": p.caller}}),
            ),
            Err(e) => reply(
                StatusCode::BAD_GATEWAY,
                json!({"service": "orders", "caller": seen, "payments": e}),
            ),
        },
        _ => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "GET or DELETE"}),
        ),
    }
}

async fn frontend(
    req: Request<Incoming>,
    orders: String,
    payments: String,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        path @ ("/" | "/cancel") => {
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            let method = if path == "/cancel" {
                http::Method::DELETE
            } else {
                http::Method::GET
            };
            let call = Request::builder()
                .method(method)
                .uri(format!("http://{orders}/orders/42"))
                .body(Full::new(Bytes::new()));
            let Ok(call) = call else {
                return reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": "bad request"}),
                );
            };
            match client.request(call).await {
                Ok(resp) => {
                    let status = resp.status();
                    let reason = resp
                        .headers()
                        .get("x-moat-deny-reason")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let inner: serde_json::Value = serde_json::from_slice(&body)
                        .unwrap_or_else(|_| json!(String::from_utf8_lossy(&body)));
                    reply(
                        status,
                        json!({"service": "frontend", "orders": inner, "deny_reason": reason}),
                    )
                }
                Err(e) => reply(
                    StatusCode::BAD_GATEWAY,
                    json!({"service": "frontend", "error": e.to_string()}),
                ),
            }
        }
        "/pay-directly" => match charge(&payments, "42").await {
            Ok(p) => reply(
                StatusCode::OK,
                json!({"service": "frontend", "payments": {"status": p.status, "caller": p.caller}}),
            ),
            Err(e) => reply(
                StatusCode::FORBIDDEN,
                json!({"service": "frontend", "payments": e}),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            json!({"error": "try /, /cancel or /pay-directly"}),
        ),
    }
}

async fn serve_http<F, Fut>(listen: SocketAddr, handler: F) -> anyhow::Result<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send,
{
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.role {
        Role::Payments => {
            let listener = tokio::net::TcpListener::bind(args.listen).await?;
            tonic::transport::Server::builder()
                .add_service(pb::payments_server::PaymentsServer::new(PaymentsSvc))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await?;
            Ok(())
        }
        Role::Orders { payments } => {
            serve_http(args.listen, move |req| orders(req, payments.clone())).await
        }
        Role::Frontend { orders, payments } => {
            serve_http(args.listen, move |req| {
                frontend(req, orders.clone(), payments.clone())
            })
            .await
        }
    }
}
