//! Real TLS handshakes over an in-memory duplex: who gets in and who does not.

// Test helpers panic on anything unexpected, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use moat_ca::{CertTtl, CertificateAuthority, Kek};
use moat_identity::{SpiffeId, TrustBundle, TrustDomain, ValidatedCsr, WorkloadKey};
use moat_tls::{
    ClientAuth, Credential, SuiteOrder, client_config, client_config_ordered, peer_identity,
    server_config, server_config_ordered,
};
use rustls::pki_types::{PrivateKeyDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse_with_default(s, &TrustDomain::default_domain()).unwrap()
}

fn new_ca() -> CertificateAuthority {
    let (kek, _) = Kek::generate().unwrap();
    CertificateAuthority::generate(&TrustDomain::default_domain(), &kek)
        .unwrap()
        .0
}

fn credential(ca: &CertificateAuthority, who: &str) -> Credential {
    let wk = WorkloadKey::generate(&id(who)).unwrap();
    let csr = ValidatedCsr::from_der(wk.csr_der()).unwrap();
    let leaf = ca.issue(&csr.spki_der, &csr.id, CertTtl::DEFAULT).unwrap();
    let key = PrivateKeyDer::try_from(wk.private_key_der()).unwrap();
    Credential::new(leaf.chain, key, ca.bundle()).unwrap()
}

fn bundle(ca: &CertificateAuthority) -> Arc<TrustBundle> {
    Arc::new(ca.bundle().clone())
}

/// Runs one handshake; returns the server's view of the client identity or the client's error.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> Result<Option<SpiffeId>, String> {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let srv = tokio::spawn(async move {
        let tls = TlsAcceptor::from(server)
            .accept(b)
            .await
            .map_err(|e| e.to_string())?;
        let (_, conn) = tls.get_ref();
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(
            conn.negotiated_key_exchange_group().map(|g| g.name()),
            Some(rustls::NamedGroup::X25519MLKEM768)
        );
        Ok::<_, String>(peer_identity(conn.peer_certificates()).map(|p| p.id))
    });
    let name = ServerName::try_from("moat.invalid").unwrap();
    let cli = TlsConnector::from(client).connect(name, a).await;
    let srv = srv.await.unwrap();
    cli.map_err(|e| e.to_string())?;
    srv
}

#[tokio::test]
async fn mutual_tls_proves_both_identities_with_pq_key_exchange() {
    let ca = new_ca();
    let server = server_config(
        &credential(&ca, "shop/orders"),
        bundle(&ca),
        ClientAuth::Required,
        &[moat_tls::ALPN_H2],
    )
    .unwrap();
    let client = client_config(
        Some(&credential(&ca, "shop/frontend")),
        bundle(&ca),
        id("shop/orders"),
        moat_tls::ALPN_H2,
    )
    .unwrap();
    assert_eq!(
        handshake(server, client).await.unwrap(),
        Some(id("shop/frontend"))
    );
}

#[tokio::test]
async fn client_refuses_a_server_with_the_wrong_identity() {
    let ca = new_ca();
    let server = server_config(
        &credential(&ca, "shop/impostor"),
        bundle(&ca),
        ClientAuth::Required,
        &[moat_tls::ALPN_H2],
    )
    .unwrap();
    let client = client_config(
        Some(&credential(&ca, "shop/frontend")),
        bundle(&ca),
        id("shop/orders"),
        moat_tls::ALPN_H2,
    )
    .unwrap();
    let err = handshake(server, client).await.unwrap_err();
    assert!(
        err.contains("WrongIdentity") && err.contains("impostor"),
        "{err}"
    );
}

#[tokio::test]
async fn client_refuses_a_server_from_a_foreign_ca() {
    let ca = new_ca();
    let foreign = new_ca();
    let server = server_config(
        &credential(&foreign, "shop/orders"),
        bundle(&foreign),
        ClientAuth::Optional,
        &[moat_tls::ALPN_H2],
    )
    .unwrap();
    let client = client_config(None, bundle(&ca), id("shop/orders"), moat_tls::ALPN_H2).unwrap();
    let err = handshake(server, client).await.unwrap_err();
    assert!(
        err.to_lowercase().contains("unknownissuer") || err.contains("UnknownIssuer"),
        "{err}"
    );
}

#[tokio::test]
async fn server_requires_a_valid_client_certificate_when_mandatory() {
    let ca = new_ca();
    let foreign = new_ca();
    let required = server_config(
        &credential(&ca, "shop/orders"),
        bundle(&ca),
        ClientAuth::Required,
        &[moat_tls::ALPN_H2],
    )
    .unwrap();
    let anonymous = client_config(None, bundle(&ca), id("shop/orders"), moat_tls::ALPN_H2).unwrap();
    assert!(
        handshake(required.clone(), anonymous.clone())
            .await
            .is_err()
    );
    let stranger = client_config(
        Some(&credential(&foreign, "shop/frontend")),
        bundle(&ca),
        id("shop/orders"),
        moat_tls::ALPN_H2,
    )
    .unwrap();
    assert!(handshake(required, stranger.clone()).await.is_err());

    // Optional client auth lets an anonymous client in, but still refuses a bad certificate.
    let optional = server_config(
        &credential(&ca, "shop/orders"),
        bundle(&ca),
        ClientAuth::Optional,
        &[moat_tls::ALPN_H2],
    )
    .unwrap();
    assert_eq!(handshake(optional.clone(), anonymous).await.unwrap(), None);
    assert!(handshake(optional, stranger).await.is_err());
}

#[test]
fn credential_refuses_a_mismatched_key() {
    let ca = new_ca();
    let good = credential(&ca, "orders");
    let other = WorkloadKey::generate(&id("orders")).unwrap();
    let key = PrivateKeyDer::try_from(other.private_key_der()).unwrap();
    let err = Credential::new(good.chain().to_vec(), key, ca.bundle()).unwrap_err();
    assert!(err.to_string().contains("private key"), "{err}");
}

/// The suite a handshake between a server and a client with the given orders negotiates.
async fn negotiated_suite(server: SuiteOrder, client: SuiteOrder) -> rustls::CipherSuite {
    let ca = new_ca();
    let server = server_config_ordered(
        &credential(&ca, "shop/orders"),
        bundle(&ca),
        ClientAuth::Required,
        &[moat_tls::ALPN_H2],
        server,
    )
    .unwrap();
    let client = client_config_ordered(
        Some(&credential(&ca, "shop/frontend")),
        bundle(&ca),
        id("shop/orders"),
        moat_tls::ALPN_H2,
        client,
    )
    .unwrap();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let srv = tokio::spawn(async move { TlsAcceptor::from(server).accept(b).await.unwrap() });
    let name = ServerName::try_from("moat.invalid").unwrap();
    let cli = TlsConnector::from(client).connect(name, a).await.unwrap();
    let srv = srv.await.unwrap();
    let suite = |c: Option<rustls::SupportedCipherSuite>| c.unwrap().suite();
    let picked = suite(srv.get_ref().1.negotiated_cipher_suite());
    assert_eq!(picked, suite(cli.get_ref().1.negotiated_cipher_suite()));
    picked
}

#[tokio::test]
async fn the_server_order_picks_the_suite() {
    use SuiteOrder::{Aes128First, Aes256First};
    use rustls::CipherSuite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    assert_eq!(
        negotiated_suite(Aes256First, Aes256First).await,
        TLS13_AES_256_GCM_SHA384
    );
    assert_eq!(
        negotiated_suite(Aes128First, Aes128First).await,
        TLS13_AES_128_GCM_SHA256
    );
    // Mid-change, sidecars disagree: the serving side decides, and the handshake still succeeds.
    assert_eq!(
        negotiated_suite(Aes128First, Aes256First).await,
        TLS13_AES_128_GCM_SHA256
    );
    assert_eq!(
        negotiated_suite(Aes256First, Aes128First).await,
        TLS13_AES_256_GCM_SHA384
    );
}

/// Starts a client connection (its ClientHello takes a ticket now, as a sidecar's dial does)
/// and returns it with a fresh server connection, to finish later.
fn start(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
) -> (rustls::ClientConnection, rustls::ServerConnection) {
    let name = ServerName::try_from("moat.invalid").unwrap();
    (
        rustls::ClientConnection::new(client.clone(), name).unwrap(),
        rustls::ServerConnection::new(server.clone()).unwrap(),
    )
}

/// Moves bytes between the two ends in memory until both have finished the handshake and the
/// client has read the server's session tickets; returns the kind of handshake.
fn finish(
    (mut c, mut s): (rustls::ClientConnection, rustls::ServerConnection),
) -> rustls::HandshakeKind {
    let mut wire = Vec::new();
    while c.is_handshaking() || s.is_handshaking() || s.wants_write() {
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let mut rd = wire.as_slice();
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
            s.process_new_packets().unwrap();
        }
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire).unwrap();
        }
        let mut rd = wire.as_slice();
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().unwrap();
        }
    }
    c.handshake_kind().unwrap()
}

/// A sidecar opens many connections to one endpoint at once (ten in bench/run-compare's
/// new-connection test): each needs a ticket of its own to resume. rustls' own store keeps 8
/// per server name, so one handshake in six was a full one; the sidecar's configs keep more,
/// per endpoint, and every one of twelve connections started together resumes.
#[test]
fn many_connections_at_once_to_one_endpoint_all_resume() {
    let ca = new_ca();
    let live = moat_tls::LiveTls::empty(moat_tls::Serving {
        client_auth: ClientAuth::Required,
        alpn: &[moat_tls::ALPN_TCP],
    });
    live.publish(credential(&ca, "shop/frontend"), ca.bundle().clone(), 0)
        .unwrap();
    let state = live.current().unwrap();
    let server = server_config(
        &credential(&ca, "shop/orders"),
        bundle(&ca),
        ClientAuth::Required,
        &[moat_tls::ALPN_TCP],
    )
    .unwrap();
    let orders = id("shop/orders");
    let client = state
        .client_for(&orders, moat_tls::ALPN_TCP, "10.0.0.1:15006")
        .unwrap();
    // The same endpoint gets the same config (and tickets); another endpoint its own.
    assert!(Arc::ptr_eq(
        &client,
        &state
            .client_for(&orders, moat_tls::ALPN_TCP, "10.0.0.1:15006")
            .unwrap()
    ));
    let other = state
        .client_for(&orders, moat_tls::ALPN_TCP, "10.0.0.2:15006")
        .unwrap();
    assert!(!Arc::ptr_eq(&client, &other));

    // One connection after another: the first is full, each later one resumes and leaves a
    // ticket more than it took (the server sends two).
    assert_eq!(finish(start(&server, &client)), rustls::HandshakeKind::Full);
    for _ in 0..15 {
        assert_eq!(
            finish(start(&server, &client)),
            rustls::HandshakeKind::Resumed
        );
    }
    // Twelve at once: each ClientHello takes its own ticket before any handshake finishes.
    let started: Vec<_> = (0..12).map(|_| start(&server, &client)).collect();
    let kinds: Vec<_> = started.into_iter().map(finish).collect();
    assert!(
        kinds.iter().all(|k| *k == rustls::HandshakeKind::Resumed),
        "{kinds:?}"
    );
    // The other endpoint's config holds none of those tickets: its first handshake is full.
    assert_eq!(finish(start(&server, &other)), rustls::HandshakeKind::Full);
}
