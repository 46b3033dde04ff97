//! `moat.v1.Mesh`: one stream per proxy. The proxy's identity is its mTLS certificate; its first
//! message announces where it listens (and, after a reconnect, the table it holds). The stream
//! then sends its proxy a snapshot from each new view of the mesh state (`mesh_state`), if what
//! that proxy needs actually changed, and takes in its acknowledgements, reports and tap events.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use moat_api::v1::mesh_server::Mesh;
use moat_api::v1::{ProxyMessage, Snapshot, proxy_message};
use moat_identity::SpiffeId;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::listener::ConnInfo;
use crate::mesh_proto::Announced;
use crate::mesh_state::MeshState;
use crate::mesh_view::{Base, MeshView, PART_BUDGET, Sent, into_parts, next_snapshot};
use crate::registry::ProxyEntry;

const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(10);
/// Mesh streams one identity may have open to one replica from one source address (unless
/// `--announce-any-address`): a sidecar keeps one, and a restarted one briefly two.
pub const STREAMS_PER_HOST: usize = 16;

/// The Mesh service.
#[derive(Clone, Debug)]
pub struct MeshService {
    pub ca: Arc<crate::ca::CaManager>,
    pub state: Arc<MeshState>,
    /// Take an announced address whatever host it names (`--announce-any-address`), instead of
    /// only the IP address the announcing connection comes from.
    pub announce_any_address: bool,
}

/// One open stream: whose it is and what it announced.
struct Stream {
    number: u64,
    id: SpiffeId,
    /// The serial of the certificate the connection presented.
    tls_serial: String,
    /// That certificate's NotAfter, Unix seconds.
    cert_not_after: i64,
    address: String,
    /// The generation from which views list this proxy's endpoint.
    joined: u64,
    /// The digests of the table the proxy announced it holds.
    resume: Option<Vec<moat_wire::table::BucketDigest>>,
}

#[tonic::async_trait]
impl Mesh for MeshService {
    type StreamStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<Snapshot, Status>> + Send + 'static>,
    >;

    async fn stream(
        &self,
        req: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let conn = req.extensions().get::<ConnInfo>().cloned();
        let Some((peer, remote)) = conn.and_then(|c| c.peer.map(|p| (p, c.remote))) else {
            return Err(Status::unauthenticated(
                "the mesh stream needs mutual TLS with the proxy's certificate",
            ));
        };
        let mut inbound = req.into_inner();
        let announce = match tokio::time::timeout(ANNOUNCE_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(ProxyMessage {
                message: Some(proxy_message::Message::Announce(a)),
            }))) => a,
            Ok(Err(s)) => return Err(s),
            Err(_) => return Err(Status::deadline_exceeded("no announce within 10 s")),
            Ok(_) => {
                return Err(Status::invalid_argument(
                    "the first message on the mesh stream must be an announce",
                ));
            }
        };
        let announced = Announced::check(announce, &peer.verified)?;
        if !self.announce_any_address {
            crate::mesh_proto::check_announced_source(&announced.inbound_address, remote.ip())?;
        }
        let id = peer.verified.id.clone();
        let number = self.state.next_stream_id();
        let entry = ProxyEntry {
            proxy_version: announced.proxy_version,
            cert_serial: peer.verified.serial.clone(),
            cert_not_after: peer.verified.not_after,
            cert_issuer: peer.issuer_sha256.clone(),
            cert_refresh_after: announced.cert_refresh_after,
            ..ProxyEntry::connected(
                id.clone(),
                announced.inbound_address.clone(),
                remote.to_string(),
                SystemTime::now(),
            )
        };
        tracing::info!(%id, address = %announced.inbound_address, %remote, "proxy connected");
        // The first snapshot comes from a view that already holds this proxy's endpoint. Where
        // announces are tied to the connection, one pod's identity gets a bounded number of
        // streams (and so of endpoints in every table) from its address.
        let per_host = (!self.announce_any_address).then_some((remote.ip(), STREAMS_PER_HOST));
        let joined = self.state.join(number, entry, per_host).map_err(|open| {
            Status::resource_exhausted(format!(
                "{id} already has {open} mesh streams open from {}: one sidecar needs one (a restarted sidecar's old stream ends with its connection); stop the others, or start the control plane with --announce-any-address where many sidecars share an address behind NAT",
                remote.ip().to_canonical()
            ))
        })?;
        let stream = Stream {
            number,
            id,
            tls_serial: peer.verified.serial,
            cert_not_after: peer.verified.not_after,
            address: announced.inbound_address,
            joined,
            resume: announced.resume,
        };
        // One message in flight per stream: while the proxy is slow to take it, later changes
        // fold into the next diff instead of queueing. Boxed: the channel's slots are
        // allocated in blocks, and 10,000 streams' worth of whole snapshots add up.
        let (tx, rx) = mpsc::channel::<Box<Snapshot>>(1);
        tokio::spawn(self.clone().serve(stream, inbound, tx));
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|part| Ok(*part)),
        )))
    }
}

impl MeshService {
    /// Sends `stream`'s proxy a snapshot from each view until the stream ends, then takes the
    /// proxy out of the mesh state. The stream ends too when the newest certificate the proxy
    /// has proved on it (the connection's, or a renewal it acknowledged with its chain and
    /// `cert_proof`) is revoked or expires
    /// (decision 48): a proxy that renews keeps its stream, one that cannot is let go.
    async fn serve(
        self,
        stream: Stream,
        mut inbound: Streaming<ProxyMessage>,
        tx: mpsc::Sender<Box<Snapshot>>,
    ) {
        let Stream {
            number,
            ref id,
            ref tls_serial,
            cert_not_after,
            ref address,
            joined,
            mut resume,
        } = stream;
        let mut views = self.state.views();
        let mut last: Option<Sent> = None;
        // The newest certificate shown on this stream, and the wait for its expiry.
        let mut shown = tls_serial.clone();
        let mut expiry = Box::pin(moat_tls::expiry::expired(cert_not_after));
        loop {
            // A stream whose certificate (the connection's, or the newest shown) is revoked now
            // ends; the proxy's reconnection is refused by the caller check.
            if self.state.is_revoked(id, Some(tls_serial))
                || self.state.is_revoked(id, Some(&shown))
            {
                tracing::info!(%id, serial = %tls_serial, newest = %shown, "closing the mesh stream of a revoked certificate");
                break;
            }
            let view = views.borrow_and_update().clone();
            // A view from before the join is good enough when it lists the proxy already (it
            // moved here from a replica that died): it need not wait for the next build.
            let early =
                |v: &MeshView| last.is_none() && v.generation < joined && !v.lists(id, address);
            if let Some(view) = view.as_ref().filter(|v| early(v)) {
                view.handled();
            } else if let Some(view) = view {
                let policies = view.policies_for(id);
                let rotation = self.state.rotation_of(id);
                let taps = self.state.taps.filters_for(id);
                let base = match (&last, &resume) {
                    (Some(sent), _) => Base::Sent(sent),
                    (None, Some(digests)) => Base::Announced(digests),
                    (None, None) => Base::Nothing,
                };
                match next_snapshot(base, &view, policies, rotation, &taps) {
                    Some(snap) => {
                        if last.is_none() {
                            self.state.first_snapshots.count(&snap);
                            if resume.is_some() {
                                tracing::info!(%id, buckets_resent = snap.services_reset_buckets.len(), services = snap.services.len(), "resumed the proxy's service table");
                            }
                        }
                        self.state.record_sent(number, &snap, &view);
                        let mut gone = false;
                        for part in into_parts(snap, PART_BUDGET) {
                            gone = tx.send(Box::new(part)).await.is_err();
                            if gone {
                                break;
                            }
                        }
                        view.handled();
                        if gone {
                            break;
                        }
                        if last.is_none() {
                            self.state.remember(id, address).await;
                        }
                        last = Some(Sent {
                            policies: policies.to_vec(),
                            view,
                            rotation,
                            taps,
                        });
                        // Later snapshots build on what was sent.
                        resume = None;
                    }
                    // Nothing this proxy needs changed: diff the next view against this one
                    // (and let the older one go).
                    None => {
                        view.handled();
                        if let Some(last) = last.as_mut() {
                            last.view = view;
                        }
                    }
                }
            }
            tokio::select! {
                changed = views.changed() => if changed.is_err() { break },
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => {
                        if let Some((serial, not_after)) = self.on_message(number, id, tls_serial, m) {
                            shown = serial;
                            expiry = Box::pin(moat_tls::expiry::expired(not_after));
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(%id, error = %e, "mesh stream failed");
                        break;
                    }
                },
                () = tx.closed() => break,
                () = &mut expiry => {
                    tracing::info!(%id, serial = %shown, "closing the mesh stream: the newest certificate the proxy showed on it has expired");
                    break;
                }
            }
        }
        self.state.leave(number, id, address).await;
        tracing::info!(%id, "proxy disconnected");
    }
}

impl MeshService {
    /// The facts of the certificate an ack reports, from the chain it carries, once its proof
    /// shows that the proxy on this stream (whose connection presented `connection_serial`)
    /// holds its key: a chain alone is public, and anyone who ever talked to a sibling replica
    /// has one to show.
    fn verify_renewed(
        &self,
        id: &SpiffeId,
        connection_serial: &str,
        ack: &moat_api::v1::Ack,
    ) -> Result<(moat_identity::VerifiedPeer, String), String> {
        let chain: Vec<rustls_pki_types::CertificateDer<'_>> = ack
            .cert_chain_der
            .iter()
            .map(|c| rustls_pki_types::CertificateDer::from(c.as_slice()))
            .collect();
        let ca = self.ca.current();
        let verified = moat_identity::verify::verify_chain(
            &chain,
            ca.bundle(),
            ca.trust_domain(),
            rustls_pki_types::UnixTime::now(),
            moat_identity::verify::Usage::Client,
        )
        .map_err(|e| format!("the acknowledged certificate does not verify: {e}"))?;
        if &verified.id != id || verified.serial != ack.cert_serial {
            return Err(format!(
                "the acknowledged chain is {} serial {}, not {id} serial {}",
                verified.id, verified.serial, ack.cert_serial
            ));
        }
        if !chain.first().is_some_and(|leaf| {
            moat_identity::verify::renewal_proof_valid(
                leaf,
                connection_serial,
                &verified.serial,
                &ack.cert_proof,
            )
        }) {
            return Err(format!(
                "the acknowledged certificate (serial {}) comes without a valid proof of its key (cert_proof): this stream keeps its connection's certificate, and ends when that one expires",
                verified.serial
            ));
        }
        let issuer = chain
            .split_first()
            .map_or_else(String::new, |(leaf, rest)| {
                moat_identity::issuer_sha256(leaf, rest, moat_identity::Usage::Client)
            });
        Ok((verified, issuer))
    }

    /// Records what the proxy said; returns the serial and NotAfter of a renewed certificate
    /// it proved (see [`Self::verify_renewed`]) on the stream whose connection presented
    /// `connection_serial`.
    fn on_message(
        &self,
        stream: u64,
        id: &SpiffeId,
        connection_serial: &str,
        m: ProxyMessage,
    ) -> Option<(String, i64)> {
        if let Some(proxy_message::Message::Tap(batch)) = m.message {
            let proxy = self
                .state
                .registry()
                .get_mut(stream)
                .map(|e| e.inbound_address.clone())
                .unwrap_or_default();
            if self.state.taps.deliver(id, &proxy, batch) {
                self.state.bump();
            }
            return None;
        }
        let mut reg = self.state.registry();
        let entry = reg.get_mut(stream)?;
        entry.last_seen = SystemTime::now();
        match m.message {
            Some(proxy_message::Message::Ack(ack)) => {
                if ack.applied {
                    entry.applied_version = ack.version;
                    entry.last_error = None;
                    if let Some(sent) = &entry.sent
                        && sent.version == ack.version
                    {
                        entry.applied_policies = sent.policies.clone();
                        entry.applied_bundle = sent.bundle.clone();
                    }
                } else {
                    let error = crate::mesh_proto::bounded_ack_error(&ack.error);
                    tracing::warn!(%id, version = ack.version, %error, "proxy refused a snapshot");
                    entry.last_error = Some(error);
                }
                if !ack.cert_serial.is_empty() {
                    entry.cert_refresh_after = ack.cert_refresh_after_unix;
                }
                // A new serial counts only with its chain, sent once: later acks repeat the
                // serial alone (also after a renewal that was not taken).
                if !ack.cert_serial.is_empty()
                    && ack.cert_serial != entry.cert_serial
                    && !ack.cert_chain_der.is_empty()
                {
                    // A renewed certificate counts once the proxy shows it: a chain that
                    // verifies under the mesh's roots, for this identity, with that serial.
                    match self.verify_renewed(id, connection_serial, &ack) {
                        Ok((verified, issuer)) => {
                            entry.cert_serial.clone_from(&verified.serial);
                            entry.cert_not_after = verified.not_after;
                            entry.cert_issuer = issuer;
                            return Some((verified.serial, verified.not_after));
                        }
                        Err(why) => {
                            tracing::warn!(%id, serial = %ack.cert_serial, error = %why, "ignored a certificate the proxy did not prove");
                            entry.last_error = Some(why);
                        }
                    }
                }
            }
            Some(proxy_message::Message::Report(r)) => {
                match (
                    crate::mesh_proto::observed_from_proto(&r),
                    crate::mesh_proto::edges_from_proto(&r),
                    crate::mesh_proto::hits_from_proto(r),
                ) {
                    (Ok(observed), Ok(edges), Ok(hits)) => {
                        entry.hits = hits;
                        entry.edges = edges;
                        entry.observe(observed, moat_identity::clock::unix_now());
                    }
                    (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                        tracing::warn!(%id, error = %e, "ignored a malformed report")
                    }
                }
            }
            Some(proxy_message::Message::Leave(_)) => {
                tracing::info!(%id, "proxy is leaving (shutting down)");
                entry.left = true;
            }
            Some(proxy_message::Message::Announce(_) | proxy_message::Message::Tap(_)) | None => {
                tracing::warn!(%id, "unexpected message on the mesh stream; ignored");
            }
        }
        None
    }
}
