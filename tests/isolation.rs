//! One caller cannot stall or cut off another: an attacker crafts HTTP/2 frames with the `h2`
//! crate — a rapid reset, a delayed rapid reset, a zero flow-control window, stream slots held
//! with request bodies that never finish — while a second, well-behaved caller fetches small
//! and 20 MB responses over HTTP/2 and HTTP/1.1. Each attack runs twice: against sidecar `b`'s
//! inbound, by a holder of a valid certificate for the allowed caller `a` (the well-behaved
//! caller is `c`), and through sidecar `a`'s outbound listener, by one of its local clients (the
//! well-behaved caller is another local client of `a`). The well-behaved caller must get every
//! response in full, and the attacker's connection must be closed.

// Scenario helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt as _, Empty};
use moat_test_util::{ControlPlane, Proxy, apply_policy};

/// Where the attack comes in.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// Straight to `b`'s inbound, with `a`'s certificate.
    Inbound,
    /// To `a`'s outbound listener for `b`, as a local client of `a`.
    Outbound,
}

/// A connection the test drives.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Sidecar `b` in front of the app and sidecar `a` with an outbound listener for `b`, both with
/// short stall timeouts so a test sees them fire, and credentials for `a` and `c`.
struct Mesh {
    cp: ControlPlane,
    b: Proxy,
    sidecar_a: Proxy,
    a: moat_tls::Credential,
    c: moat_tls::Credential,
    seen: moat_test_util::apps::ByCaller,
}

impl Mesh {
    /// A connection for the attacker (`attacker`) or the well-behaved caller, offering `alpn`.
    async fn open(&self, via: Via, attacker: bool, alpn: &[u8]) -> Box<dyn Io> {
        match via {
            Via::Inbound => {
                let who = if attacker { &self.a } else { &self.c };
                Box::new(dial(&self.cp, &self.b, who, alpn).await)
            }
            Via::Outbound => Box::new(
                tokio::net::TcpStream::connect(self.sidecar_a.upstream("b"))
                    .await
                    .unwrap(),
            ),
        }
    }

    /// Asserts both sidecars stayed within 150 MiB of resident memory.
    fn memory_bounded(&self) {
        for p in [&self.b, &self.sidecar_a] {
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", p.pid().unwrap())).unwrap();
            let kib: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap();
            assert!(kib < 150 * 1024, "{} holds {kib} KiB", p.identity);
        }
    }

    /// How many requests of `who`'s the app received.
    fn reached(&self, who: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .get(&id(who).to_string())
            .copied()
            .unwrap_or(0)
    }

    /// How many connections the sidecar the attack reaches first closed for `reason`.
    fn closed(&self, via: Via, reason: &str) -> f64 {
        match via {
            Via::Inbound => closed_by(&self.b, "inbound", reason),
            Via::Outbound => closed_by(&self.sidecar_a, "outbound", reason),
        }
    }
}

impl Mesh {
    /// Through `a`'s outbound, `b` never had cause to close a mesh connection, which `a` shares
    /// among its local clients (too-many-resets includes b's HTTP/2 layer's own GOAWAY
    /// ENHANCE_YOUR_CALM).
    fn far_side_closed_nothing(&self, via: Via) {
        if let Via::Outbound = via {
            for reason in ["too-many-resets", "response-stalled", "request-stalled"] {
                assert_eq!(
                    closed_by(&self.b, "inbound", reason),
                    0.0,
                    "b closed a connection {via:?} ({reason})"
                );
            }
        }
    }
}

/// How many connections `proxy` closed for `reason`, on its `direction` side.
fn closed_by(proxy: &Proxy, direction: &str, reason: &str) -> f64 {
    proxy
        .metrics()
        .lines()
        .find(|l| {
            l.starts_with("moat_connections_closed_total{")
                && l.contains(&format!("direction=\"{direction}\""))
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(0.0)
}

const SHORT_TIMEOUTS: &[&str] = &[
    "--response-idle-timeout",
    "3s",
    "--request-idle-timeout",
    "3s",
];

async fn mesh() -> Mesh {
    mesh_with(SHORT_TIMEOUTS).await
}

/// [`mesh`], with `flags` for both sidecars instead of the short stall timeouts.
async fn mesh_with(flags: &[&str]) -> Mesh {
    let cp = tokio::task::block_in_place(ControlPlane::start).unwrap();
    tokio::task::block_in_place(|| apply_policy(&cp, &common::allow("b", &["a", "c"])));
    let (addr, seen) = moat_test_util::apps::bulk_http().await;
    let (b, sidecar_a) = tokio::task::block_in_place(|| {
        (
            Proxy::builder(&cp, "b")
                .app(addr)
                .args(flags)
                .start()
                .unwrap(),
            Proxy::builder(&cp, "a")
                .app(addr)
                .upstreams(&["b"])
                .args(flags)
                .start()
                .unwrap(),
        )
    });
    let (a, c) =
        tokio::task::block_in_place(|| (credential_for(&cp, "a"), credential_for(&cp, "c")));
    tokio::task::block_in_place(|| wait_for_services(&sidecar_a, &["b"]));
    Mesh {
        cp,
        b,
        sidecar_a,
        a,
        c,
        seen,
    }
}

/// GET `path` on an HTTP/2 or HTTP/1.1 connection of `c`'s; (status, body length).
async fn fetch_h2(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    path: &str,
) -> Result<(u16, usize), String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let req = http::Request::get(format!("http://b{path}"))
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, body.to_bytes().len()))
}

/// The well-behaved caller's round: small and 20 MB responses over HTTP/2 and HTTP/1.1, every
/// one in full and within 20 s. Returns what failed.
async fn well_behaved_round(m: &Mesh, via: Via) -> Vec<String> {
    let mut failed = Vec::new();
    let mut check = |what: &str,
                     r: Result<Result<(u16, usize), String>, tokio::time::error::Elapsed>,
                     len: usize| match r {
        Ok(Ok((200, n))) if n == len => {}
        Ok(Ok((s, n))) => failed.push(format!("{what}: status {s}, {n} bytes")),
        Ok(Err(e)) => failed.push(format!("{what}: {e}")),
        Err(_) => failed.push(format!("{what}: no answer within 20 s")),
    };
    let limit = Duration::from_secs(20);
    // HTTP/2.
    let tls = m.open(via, false, moat_tls::ALPN_H2).await;
    let (mut h2, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake::<_, Empty<Bytes>>(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    for i in 0..5 {
        let r = tokio::time::timeout(limit, fetch_h2(&mut h2, "/small")).await;
        check(&format!("h2 small {i}"), r, 2);
    }
    let r = tokio::time::timeout(limit, fetch_h2(&mut h2, "/big")).await;
    check("h2 20 MB", r, moat_test_util::apps::BULK);
    // HTTP/1.1.
    for (path, len) in [("/small", 2), ("/big", moat_test_util::apps::BULK)] {
        let tls = m.open(via, false, moat_tls::ALPN_HTTP1).await;
        let (mut h1, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let r = tokio::time::timeout(limit, async {
            let req = http::Request::get(path)
                .header("host", "b")
                .body(Empty::new())
                .unwrap();
            let resp = h1.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            Ok((status, body.to_bytes().len()))
        })
        .await;
        check(&format!("h1 {path}"), r, len);
    }
    failed
}

/// An HTTP/2 connection of the attacker's, frames under its control (`window`: the initial
/// stream window it grants the sidecar). The handle finishes when the sidecar closes it.
async fn attacker(
    m: &Mesh,
    via: Via,
    window: u32,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tls = m.open(via, true, moat_tls::ALPN_H2).await;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(window)
        .max_concurrent_reset_streams(100_000)
        .handshake::<_, Bytes>(tls)
        .await
        .unwrap();
    (send, tokio::spawn(conn))
}

fn get(path: &str) -> http::Request<()> {
    http::Request::get(format!("https://b{path}"))
        .body(())
        .unwrap()
}

/// Waits until the attacker's connection is closed by the sidecar.
async fn closed_within(
    driver: tokio::task::JoinHandle<Result<(), h2::Error>>,
    limit: Duration,
) -> bool {
    tokio::time::timeout(limit, driver).await.is_ok()
}

async fn zero_window(via: Via) {
    let m = mesh().await;
    let (send, driver) = attacker(&m, via, 0).await;
    // Three 20 MB responses it never lets the sidecar send.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = send.clone().ready().await.unwrap();
        held.push(s.send_request(get("/big"), true).unwrap().0);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let failed = well_behaved_round(&m, via).await;
    assert!(
        failed.is_empty(),
        "the well-behaved caller suffered: {failed:?}"
    );
    assert!(
        closed_within(driver, Duration::from_secs(15)).await,
        "the stalling connection is closed"
    );
    assert!(m.closed(via, "response-stalled") >= 1.0, "{via:?}");
    m.far_side_closed_nothing(via);
    m.memory_bounded();
    drop(held);
}

/// HEADERS for 100 streams, RST_STREAM `delay` later, over and over on one connection. With
/// `upload`, each stream starts a request body it never finishes: the sidecar sees the body
/// fail, not only the response given up.
fn rapid_reset(
    send: h2::client::SendRequest<Bytes>,
    delay: Duration,
    upload: bool,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut sent = 0usize;
        'attack: for _ in 0..200 {
            let mut batch = Vec::new();
            for _ in 0..100 {
                let Ok(mut s) = send.clone().ready().await else {
                    break 'attack;
                };
                match s.send_request(get("/slow"), !upload) {
                    Ok((resp, mut body)) => {
                        if upload {
                            let _ = body.send_data(Bytes::from_static(b"part of a body"), false);
                        }
                        batch.push((resp, body));
                    }
                    Err(_) => break 'attack,
                }
                sent += 1;
            }
            tokio::time::sleep(delay).await;
            // Dropping the responses and bodies resets the streams (RST_STREAM CANCEL).
            drop(batch);
        }
        sent
    })
}

async fn rapid_reset_before_acceptance(via: Via) {
    let m = mesh().await;
    let (send, driver) = attacker(&m, via, 65_535).await;
    let attack = rapid_reset(send, Duration::from_millis(1), false);
    let failed = well_behaved_round(&m, via).await;
    assert!(
        failed.is_empty(),
        "the well-behaved caller suffered: {failed:?}"
    );
    let sent = tokio::time::timeout(Duration::from_secs(60), attack)
        .await
        .expect("the attack ends: its connection is closed")
        .unwrap();
    assert!(
        sent < 20_000,
        "the sidecar closed the connection before the attack ended"
    );
    m.far_side_closed_nothing(via);
    m.memory_bounded();
    assert!(closed_within(driver, Duration::from_secs(10)).await);
}

async fn delayed_rapid_reset(via: Via, upload: bool) {
    let m = mesh().await;
    let (send, driver) = attacker(&m, via, 65_535).await;
    // Reset only once the sidecar has accepted the streams and asked the app.
    let attack = rapid_reset(send, Duration::from_millis(50), upload);
    let failed = well_behaved_round(&m, via).await;
    assert!(
        failed.is_empty(),
        "the well-behaved caller suffered: {failed:?}"
    );
    let sent = tokio::time::timeout(Duration::from_secs(60), attack)
        .await
        .expect("the attack ends: its connection is closed")
        .unwrap();
    assert!(
        sent < 20_000,
        "the sidecar closed the connection before the attack ended"
    );
    assert!(closed_within(driver, Duration::from_secs(10)).await);
    assert!(m.closed(via, "too-many-resets") >= 1.0, "{via:?}");
    m.far_side_closed_nothing(via);
    m.memory_bounded();
    let reached = m
        .seen
        .lock()
        .unwrap()
        .get(&id("a").to_string())
        .copied()
        .unwrap_or(0);
    assert!(
        reached < 2_000,
        "{reached} cancelled requests reached the app"
    );
}

async fn held_stream_slots(via: Via) {
    let m = mesh().await;
    let mut drivers = Vec::new();
    let mut held = Vec::new();
    for _ in 0..6 {
        let (send, driver) = attacker(&m, via, 65_535).await;
        drivers.push(driver);
        for _ in 0..200 {
            // Request bodies that start and never finish (no END_STREAM, no data).
            let Ok(Ok(mut s)) =
                tokio::time::timeout(Duration::from_millis(200), send.clone().ready()).await
            else {
                break;
            };
            let req = http::Request::post("https://b/upload").body(()).unwrap();
            if let Ok(stream) = s.send_request(req, false) {
                held.push(stream);
            }
        }
    }
    let failed = well_behaved_round(&m, via).await;
    assert!(
        failed.is_empty(),
        "the well-behaved caller suffered: {failed:?}"
    );
    for d in drivers {
        assert!(
            closed_within(d, Duration::from_secs(15)).await,
            "a connection holding stalled request bodies is closed"
        );
    }
    assert!(m.closed(via, "request-stalled") >= 1.0, "{via:?}");
    m.far_side_closed_nothing(via);
    m.memory_bounded();
    drop(held);
}

/// What local HTTP/1.1 clients of `a` (a request at a time each, on as many connections as they
/// like) can do to the other local clients' requests and to the far side.
#[derive(Clone, Copy, Debug)]
enum Http1Abuse {
    /// 2,000 requests, each given up 50 ms after it was sent (the client closes its connection).
    GiveUp,
    /// Three 20 MB responses never read.
    Unread,
    /// 100 request bodies that start and never finish.
    UnfinishedBodies,
}

async fn http1_clients(abuse: Http1Abuse) {
    use tokio::io::AsyncWriteExt as _;
    let m = mesh().await;
    // Requests that run to completion never count against a shared connection.
    let failed = well_behaved_round(&m, Via::Outbound).await;
    assert!(failed.is_empty(), "without an attack: {failed:?}");
    assert_eq!(
        closed_by(&m.sidecar_a, "upstream", "reset-budget"),
        0.0,
        "finished requests were counted as resets"
    );
    let addr = m.sidecar_a.upstream("b");
    let open = move |head: &'static [u8]| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(head).await.unwrap();
        s
    };
    let attack = tokio::spawn(async move {
        let mut held = Vec::new();
        match abuse {
            Http1Abuse::GiveUp => {
                for _ in 0..20 {
                    let mut batch = Vec::new();
                    for _ in 0..100 {
                        batch.push(open(b"GET /slow HTTP/1.1\r\nhost: b\r\n\r\n").await);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    drop(batch);
                }
            }
            Http1Abuse::Unread => {
                for _ in 0..3 {
                    held.push(open(b"GET /big HTTP/1.1\r\nhost: b\r\n\r\n").await);
                }
            }
            Http1Abuse::UnfinishedBodies => {
                for _ in 0..100 {
                    held.push(
                        open(b"POST /upload HTTP/1.1\r\nhost: b\r\ncontent-length: 100000\r\n\r\nstart")
                            .await,
                    );
                }
            }
        }
        held
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let failed = well_behaved_round(&m, Via::Outbound).await;
    assert!(
        failed.is_empty(),
        "{abuse:?}: the well-behaved local client suffered: {failed:?}"
    );
    let held = attack.await.unwrap();
    match abuse {
        // HTTP/1.1 shares the HTTP/2 mesh connections (decision 52), so a given-up request is a
        // reset there: past the budget (64 per connection) a connection takes no new streams
        // and ends once its last one has, gracefully (the well-behaved requests above all
        // finished, and the far side closes nothing, below). One per 64, not one per request
        // as when HTTP/1.1 had connections of its own.
        Http1Abuse::GiveUp => {
            let retired = closed_by(&m.sidecar_a, "upstream", "reset-budget");
            assert!(
                (1.0..=(2000 / 64 + 1) as f64).contains(&retired),
                "{retired} shared connections retired for 2,000 given-up requests"
            );
        }
        // The stalled local clients are cut off by `a` itself.
        Http1Abuse::Unread => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert!(closed_by(&m.sidecar_a, "outbound", "response-stalled") >= 3.0);
        }
        Http1Abuse::UnfinishedBodies => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert!(closed_by(&m.sidecar_a, "outbound", "request-stalled") >= 100.0);
        }
    }
    m.far_side_closed_nothing(Via::Outbound);
    m.memory_bounded();
    drop(held);
}

/// A head too large for the mesh is answered on the side it comes from, for that request alone:
/// an app's response head 502 by `b`, a local client's request head 431 by `a`. Sent on, either
/// would end the shared connection under `a`'s other local clients (h2 ends a connection for a
/// block past four times its bound, over the bound in more than one frame, or in more than six
/// frames). Heads that fit cross whole, bytes outside ASCII too (HPACK's Huffman code makes
/// them up to 3.75 times longer: 33,000 of them would take eight frames of HTTP/2's default
/// 16 KiB, which a new connection uses until the far side's SETTINGS come).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_heads_too_large_for_the_mesh_cut_no_shared_connection() {
    let m = mesh().await;
    let addr = m.sidecar_a.upstream("b");
    let exchange = move |head: Vec<u8>| async move { exchange_bytes(addr, &head).await };
    let get = move |path: String, extra: Vec<u8>| {
        let mut head =
            format!("GET {path} HTTP/1.1\r\nhost: b\r\nconnection: close\r\n").into_bytes();
        head.extend_from_slice(&extra);
        head.extend_from_slice(b"\r\n");
        exchange(head)
    };
    let has = |answer: &[u8], part: &[u8]| answer.windows(part.len()).any(|w| w == part);
    let filler = |byte: u8, n: usize| {
        let mut line = b"\r\nx-filler: ".to_vec();
        line.extend(std::iter::repeat_n(byte, n));
        line.extend_from_slice(b"\r\n");
        line
    };
    let shown =
        |answer: &[u8]| String::from_utf8_lossy(&answer[..answer.len().min(300)]).into_owned();
    let obs = {
        let mut line = b"x-obs: ".to_vec();
        line.extend(std::iter::repeat_n(0xDC, 33_000));
        line.extend_from_slice(b"\r\n");
        line
    };
    // The first request, on a connection whose far side's SETTINGS (its 64 KiB frames) have not
    // come yet: 33,000 bytes outside ASCII, whole.
    let answer = get("/small".into(), obs.clone()).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200 ") && answer.ends_with(b"ok"),
        "{}",
        shown(&answer)
    );
    // Fits: 60,000 bytes of one header, whole.
    let answer = get("/head/60000".into(), Vec::new()).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200 ") && has(&answer, &filler(b'f', 60_000)),
        "{}",
        shown(&answer)
    );
    // Again and again while a well-behaved local client's round runs on the same shared
    // connection: too large, by a little and by far (answered 502), and 33,000 bytes outside
    // ASCII each way (whole).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let heads = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut answers = Vec::new();
            while answers.len() < 40 || !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (path, extra) in [
                    ("/head/70000", Vec::new()),
                    ("/head/300000", Vec::new()),
                    ("/obs-head/33000", Vec::new()),
                    ("/small", obs.clone()),
                ] {
                    answers.push((path, get(path.into(), extra).await));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            answers
        }
    });
    let failed = well_behaved_round(&m, Via::Outbound).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        failed.is_empty(),
        "the well-behaved local client suffered: {failed:?}"
    );
    for (path, answer) in heads.await.unwrap() {
        let fine = match path {
            "/obs-head/33000" => {
                answer.starts_with(b"HTTP/1.1 200 ") && has(&answer, &filler(0xDC, 33_000))
            }
            "/small" => answer.starts_with(b"HTTP/1.1 200 ") && answer.ends_with(b"ok"),
            _ => {
                answer.starts_with(b"HTTP/1.1 502 ")
                    && has(&answer, b"the app's response head is ")
                    && has(&answer, b"over the 65536 the mesh carries")
            }
        };
        assert!(fine, "{path}: {}", shown(&answer));
    }
    // A request head within the 64 KiB an HTTP/1.1 client may send, over the mesh's bound once
    // each field counts 32 bytes more: answered by `a`, never sent.
    let before = m.reached("a");
    let mut extra = b"x-big: ".to_vec();
    extra.extend(std::iter::repeat_n(b'f', 64_500));
    extra.extend_from_slice(b"\r\n");
    for i in 0..30 {
        extra.extend_from_slice(format!("a{i:02}: x\r\n").as_bytes());
    }
    let answer = get("/small".into(), extra.clone()).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 431 ")
            && has(&answer, b"the request head is ")
            && has(&answer, b"the mesh carries less than 65536"),
        "{}",
        shown(&answer)
    );
    assert_eq!(m.reached("a"), before);
    // A gRPC client learns both as gRPC statuses a retry policy would not retry: 8
    // (RESOURCE_EXHAUSTED) for its own head, 13 (INTERNAL) for the app's, which already ran. Each
    // answer carries its request id, and the sidecar that gave it logs what it said under it.
    let grpc = b"content-type: application/grpc\r\n".to_vec();
    let mut big = grpc.clone();
    big.extend_from_slice(&extra);
    let mut answers = vec![(get("/small".into(), big).await, "8", &m.sidecar_a)];
    assert_eq!(m.reached("a"), before);
    answers.push((get("/head/70000".into(), grpc).await, "13", &m.b));
    for (answer, code, sidecar) in answers {
        let head = String::from_utf8_lossy(&answer);
        let head = head.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
        let field = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .map(str::to_owned)
        };
        assert_eq!(field("grpc-status").as_deref(), Some(code), "{head}");
        let message = field("grpc-message").unwrap_or_default();
        assert!(message.contains("as http/2 counts it"), "{head}");
        let id = field("x-request-id").unwrap_or_else(|| panic!("no request id: {head}"));
        let logged = tokio::task::block_in_place(|| {
            moat_test_util::eventually(Duration::from_secs(5), || {
                sidecar
                    .log_text()
                    .lines()
                    .find(|l| l.contains(&format!("request_id={id}")))
                    .map(str::to_owned)
            })
        });
        let line = logged.unwrap_or_else(|| panic!("{id} not logged: {}", sidecar.log_text()));
        assert!(line.contains("as HTTP/2 counts it"), "{line}");
    }
    // One shared connection carried all of it, and `b` closed none.
    let metrics = m.sidecar_a.metrics();
    assert!(
        metrics.contains(r#"moat_upstream_connections_total{protocol="h2"} 1"#),
        "{metrics}"
    );
    m.far_side_closed_nothing(Via::Outbound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_http1_clients_giving_up_never_cut_a_shared_connection() {
    http1_clients(Http1Abuse::GiveUp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_http1_clients_not_reading_never_stall_a_shared_connection() {
    http1_clients(Http1Abuse::Unread).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_http1_clients_with_unfinished_bodies_never_stall_a_shared_connection() {
    http1_clients(Http1Abuse::UnfinishedBodies).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_a_zero_window_caller_stalls_only_itself_and_is_closed() {
    zero_window(Via::Inbound).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_a_zero_window_caller_stalls_only_itself_and_is_closed() {
    zero_window(Via::Outbound).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_a_rapid_reset_before_acceptance_is_closed_by_the_http2_layer() {
    rapid_reset_before_acceptance(Via::Inbound).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_a_rapid_reset_before_acceptance_is_closed_by_the_http2_layer() {
    rapid_reset_before_acceptance(Via::Outbound).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_a_delayed_rapid_reset_is_closed_and_never_reaches_the_well_behaved_caller() {
    delayed_rapid_reset(Via::Inbound, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_a_delayed_rapid_reset_is_closed_and_never_reaches_the_well_behaved_caller() {
    delayed_rapid_reset(Via::Outbound, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_a_delayed_rapid_reset_of_unfinished_uploads_never_reaches_the_well_behaved_caller()
{
    delayed_rapid_reset(Via::Inbound, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_a_delayed_rapid_reset_of_unfinished_uploads_never_reaches_the_well_behaved_caller()
 {
    delayed_rapid_reset(Via::Outbound, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_held_stream_slots_starve_only_their_holder_and_are_closed() {
    held_stream_slots(Via::Inbound).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_held_stream_slots_starve_only_their_holder_and_are_closed() {
    held_stream_slots(Via::Outbound).await;
}

/// One identity holding requests open over several connections gets at most its share of the
/// app (`--max-requests-per-caller`): the rest are answered 429 `caller-busy` without reaching
/// the app, another caller is served meanwhile, and a place given back is taken again.
async fn one_callers_share() {
    let m = mesh_with(&["--max-requests-per-caller", "8"]).await;
    let from_a = || m.reached("a");
    // 3 connections × 4 uploads whose bodies start and never finish: 12 requests of a's.
    let (mut answers, mut bodies, mut drivers) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        let (send, driver) = attacker(&m, Via::Inbound, 65_535).await;
        drivers.push(driver);
        for _ in 0..4 {
            let mut s = send.clone().ready().await.unwrap();
            let req = http::Request::post("https://b/upload").body(()).unwrap();
            let (answer, mut body) = s.send_request(req, false).unwrap();
            body.send_data(Bytes::from_static(b"x"), false).unwrap();
            answers.push(tokio::spawn(answer));
            bodies.push(body);
        }
    }
    let settled = tokio::time::Instant::now() + Duration::from_secs(10);
    while (from_a() < 8 || answers.iter().filter(|a| a.is_finished()).count() < 4)
        && tokio::time::Instant::now() < settled
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(from_a(), 8, "the app got exactly a's share of requests");
    let mut waiting = None;
    let mut refused = 0;
    for (i, answer) in answers.iter_mut().enumerate() {
        if !answer.is_finished() {
            waiting.get_or_insert(i);
            continue;
        }
        let resp = answer.await.unwrap().unwrap();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["x-moat-deny-reason"], "caller-busy");
        assert!(resp.headers().contains_key("retry-after"));
        refused += 1;
    }
    assert_eq!(
        refused, 4,
        "the requests over a's share were answered at once"
    );
    let failed = well_behaved_round(&m, Via::Inbound).await;
    assert!(failed.is_empty(), "another caller suffered: {failed:?}");
    // One of a's held requests ends; its place goes to a's next request.
    let i = waiting.unwrap();
    bodies[i].send_data(Bytes::from_static(b"y"), true).unwrap();
    let resp = (&mut answers[i]).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got, b"2", "the app received the whole body");
    let (send, _driver) = attacker(&m, Via::Inbound, 65_535).await;
    let mut status = 0;
    for _ in 0..50 {
        let mut s = send.clone().ready().await.unwrap();
        let (answer, _) = s.send_request(get("/small"), true).unwrap();
        status = answer.await.unwrap().status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200, "a place given back is taken again");
    assert_eq!(from_a(), 9, "the refused retries never reached the app");
    let refusals =
        m.b.metrics()
            .lines()
            .filter(|l| l.starts_with("moat_authz_decisions_total{") && l.contains("caller-busy"))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum::<f64>();
    assert!(
        refusals >= 4.0,
        "caller-busy refusals are counted: {refusals}"
    );
    drop((bodies, drivers));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_one_caller_gets_at_most_its_share_of_the_app() {
    one_callers_share().await;
}

/// Writes one HTTP/1.1 request for `/small` on `io` and reads its answer (`ok`, 2 bytes) to the
/// end; the answer, or what went wrong.
async fn small_on(io: &mut Box<dyn Io>) -> Result<String, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    io.write_all(b"GET /small HTTP/1.1\r\nhost: b\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    while !(answer.ends_with(b"\r\n\r\nok")) {
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(Duration::from_secs(10), io.read(&mut chunk)).await {
            Err(_) => return Err("no answer within 10 s".into()),
            Ok(Err(e)) => return Err(format!("read: {e}")),
            Ok(Ok(0)) => return Err(format!("closed after {answer:?}")),
            Ok(Ok(n)) => answer.extend_from_slice(&chunk[..n]),
        }
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// How long the sidecar takes to close `io`, on which the peer writes nothing more (or, with
/// `drip`, one header line every 200 ms, a head that never ends); `None` if it is still open
/// after 8 s.
async fn closed_after(io: &mut Box<dyn Io>, drip: bool) -> Option<Duration> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(8) {
        if drip && io.write_all(b"x-drip: 1\r\n").await.is_err() {
            return Some(start.elapsed());
        }
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(200), io.read(&mut chunk)).await {
            Err(_) => {}
            Ok(Ok(0) | Err(_)) => return Some(start.elapsed()),
            Ok(Ok(n)) => panic!(
                "the sidecar answered an unfinished head: {:?}",
                String::from_utf8_lossy(&chunk[..n])
            ),
        }
    }
    None
}

/// The HTTP/1 head deadline (`--header-read-timeout`, 1 s here) runs from a head's first byte:
/// a keep-alive connection idle between requests for longer than that still carries the next
/// request (a client's pool keeps connections far longer: hyper's and Go's for 90 s, so a proxy
/// that closed them there would reset requests sent as it closes), while a head that arrives
/// too slowly — on a new connection, or after a kept connection's response, whether it stops or
/// drips a line at a time — is cut (`header-read-timeout`) and never reaches the app.
async fn http1_heads_are_timed_from_their_first_byte(via: Via) {
    use tokio::io::AsyncWriteExt as _;
    let m = mesh_with(&["--header-read-timeout", "1s"]).await;
    let reached = || m.seen.lock().unwrap().values().sum::<usize>();

    let mut kept = m.open(via, true, moat_tls::ALPN_HTTP1).await;
    let first = small_on(&mut kept).await.unwrap();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let second = small_on(&mut kept)
        .await
        .expect("a keep-alive connection idle for 2.5 s was closed under the next request");
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert_eq!(reached(), 2);

    // After a response on the kept connection, a head that drips a line every 200 ms.
    kept.write_all(b"GET /small HTTP/1.1\r\nhost: b\r\n")
        .await
        .unwrap();
    let dripped = closed_after(&mut kept, true).await;
    // On a new connection, a head that stops halfway.
    let mut fresh = m.open(via, true, moat_tls::ALPN_HTTP1).await;
    fresh
        .write_all(b"GET /small HTTP/1.1\r\nhost: b\r\n")
        .await
        .unwrap();
    let stopped = closed_after(&mut fresh, false).await;
    for (what, after) in [("dripping", dripped), ("stopped", stopped)] {
        let after = after.unwrap_or_else(|| panic!("a {what} head was still open after 8 s"));
        assert!(
            after >= Duration::from_millis(900),
            "a {what} head was cut after {after:?}, before the 1 s deadline"
        );
    }
    assert_eq!(reached(), 2, "an unfinished head reached the app");
    assert!(m.closed(via, "header-read-timeout") >= 2.0, "{via:?}");
    m.far_side_closed_nothing(via);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_http1_heads_are_timed_from_their_first_byte() {
    http1_heads_are_timed_from_their_first_byte(Via::Inbound).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_http1_heads_are_timed_from_their_first_byte() {
    http1_heads_are_timed_from_their_first_byte(Via::Outbound).await;
}

/// One identity holds at most `--max-connections-per-caller` mesh connections to a sidecar (3
/// here), however idle: a fourth of `a`'s is closed after its handshake and its request never
/// reaches the app, another caller still connects and is served, and a connection `a` closes
/// gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_one_caller_holds_at_most_its_share_of_connections() {
    let m = mesh_with(&["--max-connections-per-caller", "3"]).await;
    let reached = |who: &str| m.reached(who);
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut io = m.open(Via::Inbound, true, moat_tls::ALPN_HTTP1).await;
        let answer = small_on(&mut io).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        held.push(io);
    }
    let mut over = m.open(Via::Inbound, true, moat_tls::ALPN_HTTP1).await;
    let refused = small_on(&mut over).await;
    assert!(
        refused.is_err(),
        "a fourth connection was served: {refused:?}"
    );
    assert_eq!(
        reached("a"),
        3,
        "the fourth connection's request reached the app"
    );
    assert_eq!(m.closed(Via::Inbound, "too-many-connections"), 1.0);

    let mut other = m.open(Via::Inbound, false, moat_tls::ALPN_HTTP1).await;
    let answer = small_on(&mut other).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "another caller: {answer}"
    );
    assert_eq!(reached("c"), 1);

    drop(held.pop());
    let mut again = Err(String::new());
    for _ in 0..50 {
        let mut io = m.open(Via::Inbound, true, moat_tls::ALPN_HTTP1).await;
        again = small_on(&mut io).await;
        if again.is_ok() {
            held.push(io);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer = again.expect("a place given back is taken again");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        reached("a"),
        4,
        "a refused connection's request reached the app"
    );
}
