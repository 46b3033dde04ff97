//! The trust lifecycle as an attacker tries it: a revoked admin credential trying to lift its
//! own revocation, a proxy lying about its certificate to shorten a revocation, an expired
//! certificate renewing over a resumed TLS session, and connections kept open past the
//! certificate that opened them. Each must be refused, or ended, by the control plane and the
//! sidecars.

// Scenario helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use moat_api::v1::identity_client::IdentityClient;
use moat_api::v1::mesh_client::MeshClient;
use moat_api::v1::{Ack, Announce, CertifyRequest, ProxyMessage, certify_request, proxy_message};
use moat_test_util::mesh::Admin;
use moat_test_util::{ControlPlane, Proxy, apply_policy};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;

/// Runs `moat` with the credential in `creds`.
fn moat_as(cp: &ControlPlane, creds: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(moat_test_util::bin("moat"))
        .args(args)
        .env("MOAT_CONTROL_PLANE", cp.url())
        .env("MOAT_CREDENTIALS", creds)
        .output()
        .unwrap()
}

/// The serial of the first certificate in `dir/cert.pem`.
fn serial_of(dir: &std::path::Path) -> String {
    let pem = std::fs::read(dir.join("cert.pem")).unwrap();
    let bundle = std::fs::read(dir.join("bundle.pem")).unwrap();
    let cred = moat_tls::Credential::from_pem(
        &pem,
        &std::fs::read(dir.join("key.pem")).unwrap(),
        &moat_identity::TrustBundle::from_pem(&bundle).unwrap(),
    )
    .unwrap();
    cred.leaf().serial.clone()
}

#[test]
fn a_revoked_admin_can_do_nothing_not_even_lift_its_own_revocation() {
    let cp = ControlPlane::start_with(&[
        "--admin-identity",
        "moat-system/moat-admin",
        "--admin-identity",
        "ops/backup",
    ])
    .unwrap();
    let admin = cp.admin_dir();
    let backup = cp.scratch().join("backup");
    cp.moat_ok(&[
        "cert",
        "issue",
        "--identity",
        "ops/backup",
        "--out",
        backup.to_str().unwrap(),
    ]);

    // Revoked by serial: refused everything, its own undo included.
    let serial = serial_of(&admin);
    cp.moat_ok(&["revoke", "--serial", &serial, "--reason", "stolen laptop"]);
    for args in [
        vec!["ca", "show"],
        vec!["revoke", "--serial", &serial, "--undo"],
        vec![
            "cert",
            "issue",
            "--identity",
            "shop/orders",
            "--out",
            "/nonexistent",
        ],
    ] {
        let out = moat_as(&cp, &admin, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?} went through");
        assert!(
            stderr(&out).contains("revoked"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    // Another admin lifts it.
    let out = moat_as(&cp, &backup, &["revoke", "--serial", &serial, "--undo"]);
    assert!(out.status.success(), "{}", stderr(&out));
    cp.moat_ok(&["ca", "show"]);

    // Revoked by identity: the same.
    cp.moat_ok(&["revoke", "--identity", "moat-system/moat-admin"]);
    let out = moat_as(
        &cp,
        &admin,
        &["revoke", "--identity", "moat-system/moat-admin", "--undo"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("revoked"), "{}", stderr(&out));
    let out = moat_as(
        &cp,
        &backup,
        &["revoke", "--identity", "moat-system/moat-admin", "--undo"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    cp.moat_ok(&["ca", "show"]);
    let metrics = cp.admin_get("/metrics").unwrap().1;
    assert!(
        metrics.contains("moat_callers_refused_total{reason=\"revoked\"}"),
        "{metrics}"
    );
    let audit = moat_as(&cp, &backup, &["audit", "--outcome", "refused"]);
    assert!(
        String::from_utf8_lossy(&audit.stdout).contains("moat.v1.Admin"),
        "{}",
        String::from_utf8_lossy(&audit.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_proxy_says_of_its_certificate_never_shortens_a_revocation() {
    let cp = ControlPlane::start().unwrap();
    let mut admin = Admin::connect(&cp).await.unwrap();
    let cred = admin.credential("b").await.unwrap();
    let real = cred.leaf().clone();
    let url = cp.url();
    let channel = || moat_tls::connect::channel(&url, bundle(&cp), control_id(), Some(&cred));
    let announce = |serial: &str, not_after: i64| ProxyMessage {
        message: Some(proxy_message::Message::Announce(Announce {
            inbound_address: "127.0.0.1:7143".into(),
            cert_serial: serial.into(),
            cert_not_after_unix: not_after,
            ..Announce::default()
        })),
    };
    // An announce that misstates the certificate is refused.
    for (serial, not_after) in [(real.serial.as_str(), 1), ("ab".repeat(16).as_str(), 0)] {
        let err = MeshClient::new(channel().await.unwrap())
            .stream(tokio_stream::iter(vec![announce(serial, not_after)]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    // A truthful one is taken; an ack claiming another certificate, with no chain to show for
    // it, changes nothing the control plane believes.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(announce(&real.serial, real.not_after))
        .await
        .unwrap();
    let mut stream = MeshClient::new(channel().await.unwrap())
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    tx.send(ProxyMessage {
        message: Some(proxy_message::Message::Ack(Ack {
            version: first.version,
            applied: true,
            cert_serial: "cd".repeat(16),
            cert_not_after_unix: 1,
            ..Ack::default()
        })),
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status: serde_json::Value =
        serde_json::from_str(&cp.moat_ok(&["status", "-o", "json"])).unwrap();
    let b = status["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["identity"] == id("b").to_string())
        .unwrap()
        .clone();
    assert_eq!(b["cert_serial"], real.serial.as_str(), "{b}");
    assert_eq!(b["cert_not_after_unix"], real.not_after, "{b}");

    // The revocation lasts as long as any certificate the CA issued until now could.
    let out = cp.moat_ok(&["revoke", "--serial", &real.serial[..8]]);
    assert!(out.contains(&real.serial), "{out}");
    let listed = cp.moat_ok(&["revoke", "--list"]);
    let line = listed
        .lines()
        .find(|l| l.contains(&real.serial))
        .unwrap_or_else(|| panic!("{listed}"));
    let until = line.split_whitespace().nth(3).unwrap();
    let until = humantime::parse_rfc3339_weak(until.trim_end_matches('Z'))
        .unwrap_or_else(|e| panic!("{until}: {e}"));
    let until = until
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(until >= real.not_after, "{line}");

    // The revoked certificate's stream ends, and it can neither stream nor renew again.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = stream.message().await {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the revoked certificate's stream stayed open"
    );
    let err = MeshClient::new(channel().await.unwrap())
        .stream(tokio_stream::iter(vec![announce(
            &real.serial,
            real.not_after,
        )]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let key = moat_identity::WorkloadKey::generate(&id("b")).unwrap();
    let err = IdentityClient::new(channel().await.unwrap())
        .certify(CertifyRequest {
            csr_der: key.csr_der().to_vec(),
            ttl_seconds: 0,
            credential: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

/// A channel to the control plane over `cfg`, one TLS connection per `connect`; `resumed`
/// tells whether the last handshake resumed an earlier session.
async fn channel_over(
    cp: &ControlPlane,
    cfg: Arc<rustls::ClientConfig>,
    resumed: Arc<AtomicBool>,
) -> tonic::transport::Channel {
    let addr: std::net::SocketAddr = cp.url().trim_start_matches("https://").parse().unwrap();
    tonic::transport::Endpoint::from_static("http://moat.invalid")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let (cfg, resumed) = (cfg.clone(), resumed.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect("moat.invalid".try_into().unwrap(), tcp)
                    .await?;
                resumed.store(
                    tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
                    Ordering::SeqCst,
                );
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_cannot_renew_over_a_resumed_session() {
    let cp = ControlPlane::start_with(&["--min-cert-ttl", "1s"]).unwrap();
    let tok = token(&cp, "b", &[]);
    let key = moat_identity::WorkloadKey::generate(&id("b")).unwrap();
    let issued = identity_client(&cp, None)
        .await
        .certify(CertifyRequest {
            csr_der: key.csr_der().to_vec(),
            ttl_seconds: 4,
            credential: Some(certify_request::Credential::JoinToken(tok)),
        })
        .await
        .unwrap()
        .into_inner();
    let cred = moat_tls::Credential::new(
        issued
            .chain_der
            .into_iter()
            .map(rustls_pki_types::CertificateDer::from)
            .collect(),
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.private_key_der().into()),
        &bundle(&cp),
    )
    .unwrap();
    let cfg = moat_tls::client_config(
        Some(&cred),
        Arc::new(bundle(&cp)),
        control_id(),
        moat_tls::ALPN_H2,
    )
    .unwrap();
    let renew = |channel| async move {
        let next = moat_identity::WorkloadKey::generate(&id("b")).unwrap();
        IdentityClient::new(channel)
            .certify(CertifyRequest {
                csr_der: next.csr_der().to_vec(),
                ttl_seconds: 60,
                credential: None,
            })
            .await
    };
    // While valid: a renewal works, and the session is remembered.
    let resumed = Arc::new(AtomicBool::new(false));
    renew(channel_over(&cp, cfg.clone(), resumed.clone()).await)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Past its NotAfter, over a resumed session (no chain verification in the handshake).
    let err = renew(channel_over(&cp, cfg, resumed.clone()).await)
        .await
        .unwrap_err();
    assert!(
        resumed.load(Ordering::SeqCst),
        "the second connection did not resume the session, so this test proves nothing"
    );
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("expired"), "{err:?}");
}

/// Echoes through `frontend`'s listener for ledger until the connection closes (at most 20 s);
/// how many echoes it carried.
async fn echo_until_closed(frontend: &Proxy, ledger: &Proxy) -> usize {
    let mut tcp = tokio::net::TcpStream::connect(frontend.upstream("ledger"))
        .await
        .unwrap();
    let start = std::time::Instant::now();
    let mut echoed = 0;
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the connection outlived two certificate lifetimes ({echoed} echoes):\n{}\n{}",
            frontend.log_text(),
            ledger.log_text()
        );
        if tcp.write_all(b"ping").await.is_err() {
            return echoed;
        }
        let mut buf = [0u8; 4];
        match tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut buf)).await {
            Ok(Ok(_)) => assert_eq!(&buf, b"ping"),
            Ok(Err(_)) => return echoed,
            Err(_) => panic!("the connection hung instead of closing"),
        }
        echoed += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A new connection through `frontend` to ledger carries an echo.
async fn echoes_anew(frontend: &Proxy) {
    let mut again = tokio::net::TcpStream::connect(frontend.upstream("ledger"))
        .await
        .unwrap();
    again.write_all(b"back").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), again.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"back");
}

/// frontend calls ledger (an echo over opaque TCP); `short` of the two gets an 8 s
/// certificate, renewed about every 4 s.
async fn pair_with_short_certificate(cp: &ControlPlane, short: &str) -> (Proxy, Proxy) {
    apply_policy(cp, &allow("ledger", &["frontend"]));
    let ttl = |name: &str| {
        if name == short {
            vec!["--cert-ttl", "8s"]
        } else {
            vec![]
        }
    };
    let ledger = Proxy::builder(cp, "ledger")
        .app(moat_test_util::apps::tcp_echo().await)
        .args(&ttl("ledger"))
        .start()
        .unwrap();
    let frontend = Proxy::builder(cp, "frontend")
        .app(moat_test_util::apps::http_echo().await)
        .upstreams(&["ledger"])
        .args(&ttl("frontend"))
        .start()
        .unwrap();
    wait_for_services(&frontend, &["ledger"]);
    (frontend, ledger)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_ends_when_the_callers_certificate_expires() {
    let cp = ControlPlane::start_with(&["--min-cert-ttl", "2s"]).unwrap();
    let (frontend, ledger) = pair_with_short_certificate(&cp, "frontend").await;
    // The certificate frontend opened the connection with expires within 8 s, and ledger's
    // sidecar closes it then, renewal or not.
    let echoed = echo_until_closed(&frontend, &ledger).await;
    assert!(echoed >= 2, "closed after only {echoed} echoes");
    let log = ledger.log_text();
    assert!(
        log.contains("the certificate the caller opened it with has expired"),
        "{log}"
    );
    let closed =
        r#"moat_connections_closed_total{direction="inbound",reason="certificate-expired"} 1"#;
    assert!(ledger.metrics().contains(closed), "{}", ledger.metrics());
    // frontend renewed meanwhile: a new connection, opened with its new certificate, works.
    echoes_anew(&frontend).await;

    // The renewals frontend showed (and proved) on its mesh stream kept the stream open past
    // the certificate it connected with, which expired at least 2 s ago.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cp_log = cp.log_text();
    assert!(frontend.log_text().contains("renewed our certificate"));
    assert!(
        !cp_log.contains("closing the mesh stream: the newest certificate"),
        "{cp_log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_ends_when_the_servers_certificate_expires() {
    let cp = ControlPlane::start_with(&["--min-cert-ttl", "2s"]).unwrap();
    let (frontend, ledger) = pair_with_short_certificate(&cp, "ledger").await;
    // Now the caller's certificate outlives the test; ledger's, presented when the connection
    // opened, expires within 8 s, and frontend's sidecar closes the connection then.
    let echoed = echo_until_closed(&frontend, &ledger).await;
    assert!(echoed >= 2, "closed after only {echoed} echoes");
    let log = frontend.log_text();
    assert!(
        log.contains("the far side's certificate is no longer good")
            && log.contains("reason=\"certificate-expired\""),
        "{log}"
    );
    let closed =
        r#"moat_connections_closed_total{direction="outbound",reason="certificate-expired"} 1"#;
    assert!(
        frontend.metrics().contains(closed),
        "{}",
        frontend.metrics()
    );
    echoes_anew(&frontend).await;
}

/// A mesh stream opened with `cred`, announced from loopback, its first snapshot taken: the
/// stream and the sender of the proxy's messages.
async fn open_stream(
    cp: &ControlPlane,
    cred: &moat_tls::Credential,
) -> (
    tonic::Streaming<moat_api::v1::Snapshot>,
    tokio::sync::mpsc::Sender<ProxyMessage>,
    u64,
) {
    let leaf = cred.leaf().clone();
    let channel = moat_tls::connect::channel(&cp.url(), bundle(cp), control_id(), Some(cred))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(ProxyMessage {
        message: Some(proxy_message::Message::Announce(Announce {
            inbound_address: "127.0.0.1:7143".into(),
            cert_serial: leaf.serial.clone(),
            cert_not_after_unix: leaf.not_after,
            ..Announce::default()
        })),
    })
    .await
    .unwrap();
    let mut stream = MeshClient::new(channel)
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    (stream, tx, first.version)
}

/// An ack showing `renewed` on a stream, with `proof`.
fn renewal_ack(version: u64, renewed: &moat_tls::Credential, proof: Vec<u8>) -> ProxyMessage {
    ProxyMessage {
        message: Some(proxy_message::Message::Ack(Ack {
            version,
            applied: true,
            cert_serial: renewed.leaf().serial.clone(),
            cert_not_after_unix: renewed.leaf().not_after,
            cert_chain_der: renewed.chain().iter().map(|c| c.to_vec()).collect(),
            cert_proof: proof,
            ..Ack::default()
        })),
    }
}

/// Whether `stream` is still open `after` from now: it ended (or failed) otherwise.
async fn still_open(
    stream: &mut tonic::Streaming<moat_api::v1::Snapshot>,
    after: Duration,
) -> bool {
    tokio::time::timeout(after, async {
        while let Ok(Some(_)) = stream.message().await {}
    })
    .await
    .is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_stream_ends_when_the_newest_certificate_shown_on_it_expires() {
    let cp = ControlPlane::start_with(&["--min-cert-ttl", "1s"]).unwrap();
    // Another replica's fresh certificate for the same identity: its chain is public.
    let sibling = short_credential(&cp, "b", 60).await;

    // A stream whose 4 s certificate is never renewed ends once it expires, even when it shows
    // the sibling's chain: without a signature by that chain's key, a renewal is not taken.
    let cred = short_credential(&cp, "b", 4).await;
    let (mut stream, tx, version) = open_stream(&cp, &cred).await;
    tx.send(renewal_ack(version, &sibling, b"not a signature".to_vec()))
        .await
        .unwrap();
    assert!(
        !still_open(&mut stream, Duration::from_secs(15)).await,
        "the stream outlived its certificate"
    );
    assert!(
        moat_identity::clock::unix_now() >= cred.leaf().not_after,
        "the stream ended before its certificate expired"
    );
    let log = cp.log_text();
    assert!(
        log.contains("comes without a valid proof of its key"),
        "{log}"
    );
    assert!(
        log.contains(
            "closing the mesh stream: the newest certificate the proxy showed on it has expired"
        ),
        "{log}"
    );
    // A signature the sibling made for its own stream proves nothing on this one.
    let cred = short_credential(&cp, "b", 4).await;
    let (mut stream, tx, version) = open_stream(&cp, &cred).await;
    let elsewhere = sibling.sign_renewal(&"ab".repeat(16)).unwrap();
    tx.send(renewal_ack(version, &sibling, elsewhere))
        .await
        .unwrap();
    assert!(
        !still_open(&mut stream, Duration::from_secs(15)).await,
        "a proof made for another stream was taken"
    );

    // The proxy that holds the renewed key proves it, bound to its stream's connection: the
    // stream outlives the certificate it opened with.
    let cred = short_credential(&cp, "b", 4).await;
    let renewed = short_credential(&cp, "b", 60).await;
    let (mut stream, tx, version) = open_stream(&cp, &cred).await;
    let proof = renewed.sign_renewal(&cred.leaf().serial).unwrap();
    tx.send(renewal_ack(version, &renewed, proof))
        .await
        .unwrap();
    let past = Duration::from_secs(
        u64::try_from(cred.leaf().not_after - moat_identity::clock::unix_now()).unwrap_or(0) + 3,
    );
    assert!(
        still_open(&mut stream, past).await,
        "a proven renewal did not keep the stream:\n{}",
        cp.log_text()
    );
    drop(tx);
}
