//! The proxy's end of `Mesh.Stream`: announce, apply each snapshot (or NACK it and keep the last
//! good one), acknowledge, and reconnect with backoff and jitter whenever the stream breaks. The
//! proxy keeps serving with its last snapshot while the control plane is away, and keeps the
//! service table the streams built: the next stream, to whichever replica, starts from it (the
//! announce carries its digests) rather than from nothing.

use std::sync::Arc;
use std::time::Duration;

use moat_api::v1::mesh_client::MeshClient;
use moat_api::v1::{
    Ack, Announce, EdgeCounters, ObservedCall, ProxyMessage, ReasonCount, Report, RuleCounter,
    proxy_message,
};
use moat_identity::SpiffeId;
use moat_wire::table::ServiceTable;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::config::ProxyConfig;
use crate::metrics::Metrics;
use crate::snapshot::{Snapshot, from_proto};
use moat_policy::CipherPreference;
use moat_tls::{LiveTls, SuiteOrder};

/// How often the proxy reports its authorization counters.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// Runs the stream until the process ends.
pub async fn run(
    cfg: Arc<ProxyConfig>,
    tls: Arc<LiveTls>,
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    metrics: Arc<Metrics>,
    rotate_now: Arc<tokio::sync::Notify>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let control = SpiffeId::control_plane(&cfg.trust_domain);
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(250), Duration::from_secs(15));
    // The service table as the streams built it, kept from one stream to the next.
    let mut table: Option<ServiceTable> = None;
    loop {
        // The session itself watches `shutdown` once connected, to say goodbye.
        let url = cfg.control_plane.current().to_owned();
        let result = session(
            &cfg,
            &url,
            &control,
            &tls,
            &snapshots,
            &metrics,
            &rotate_now,
            &shutdown,
            &mut table,
        )
        .await;
        // A session that delivered a snapshot starts the backoff over; otherwise it grows.
        if metrics.reset_backoff() {
            backoff.reset();
        }
        // Whatever ended the session, the next one tries the next replica: this one is
        // down, draining, or was left by the stream on purpose.
        if !shutdown.is_cancelled() {
            cfg.control_plane.failed(&url);
        }
        let retry_in = backoff.next_delay();
        match result {
            Ok(()) if shutdown.is_cancelled() => return,
            Ok(()) => tracing::info!("mesh stream closed by the control plane; reconnecting"),
            Err(e) => {
                tracing::warn!(error = %e, ?retry_in, "mesh stream failed; keeping the last snapshot")
            }
        }
        metrics.control_plane_connected.set(0);
        tokio::select! {
            () = tokio::time::sleep(retry_in) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    cfg: &ProxyConfig,
    url: &str,
    control: &SpiffeId,
    tls: &LiveTls,
    snapshots: &watch::Sender<Option<Arc<Snapshot>>>,
    metrics: &Metrics,
    rotate_now: &tokio::sync::Notify,
    shutdown: &tokio_util::sync::CancellationToken,
    table: &mut Option<ServiceTable>,
) -> Result<(), String> {
    let current = tls.current().ok_or("no certificate yet")?;
    let channel = moat_tls::connect::channel(
        url,
        (*current.bundle).clone(),
        control.clone(),
        Some(&current.credential),
    )
    .await
    .map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel(8);
    let leaf = current.credential.leaf().clone();
    // The serial the control plane knows for this stream: the connection's own certificate,
    // which every renewal shown on it is bound to.
    let connection = leaf.serial.clone();
    let mut reported = leaf.serial.clone();
    tx.send(ProxyMessage {
        message: Some(proxy_message::Message::Announce(Announce {
            inbound_address: cfg.advertise.clone(),
            proxy_version: env!("CARGO_PKG_VERSION").to_owned(),
            cert_serial: leaf.serial,
            cert_not_after_unix: leaf.not_after,
            cert_issuer_sha256: current.issuer_sha256(),
            cert_refresh_after_unix: current.refresh_after,
            table_digests: table
                .as_ref()
                .map(ServiceTable::digests)
                .unwrap_or_default(),
        })),
    })
    .await
    .map_err(|_| "stream closed")?;
    let mut inbound = MeshClient::new(channel)
        .stream(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    metrics.control_plane_connected.set(1);
    // The taps open on this proxy belong to this stream: they close with it.
    let _taps = CloseTaps(&metrics.tap);
    let mut tap_events = metrics.tap.events.lock().await;
    // Events left from an earlier stream belong to taps that closed with it.
    while tap_events.try_recv().is_ok() {}
    let mut report = tokio::time::interval(REPORT_EVERY);
    let mut certs = tls.subscribe();
    // The rotation generation of this stream's first snapshot; a later, larger one is a command.
    let mut rotation: Option<u64> = None;
    let mut last_version = 0;
    loop {
        let msg = tokio::select! {
            changed = certs.changed() => {
                if changed.is_err() {
                    return Err("the proxy is shutting down".into());
                }
                // Tell the control plane about a new certificate at once (moat status, cert rotate).
                let ack = ack(last_version, true, String::new(), tls, &connection, &mut reported);
                send(&tx, proxy_message::Message::Ack(ack)).await?;
                continue;
            }
            m = inbound.message() => match m.map_err(|s| format!("{:?}: {}", s.code(), s.message()))? {
                Some(m) => m,
                None => return Ok(()),
            },
            () = shutdown.cancelled() => {
                // Say goodbye, so the control plane forgets us rather than reporting us lost.
                send(&tx, proxy_message::Message::Leave(moat_api::v1::Leave {})).await?;
                drop(tx);
                // Half-close and wait for the control plane to end the stream: then it has
                // processed the goodbye.
                let _ = tokio::time::timeout(std::time::Duration::from_millis(1500), async {
                    while let Ok(Some(_)) = inbound.message().await {}
                })
                .await;
                return Ok(());
            }
            Some(first) = tap_events.recv() => {
                let batch = metrics.tap.batch(first, &mut tap_events);
                send(&tx, proxy_message::Message::Tap(batch)).await?;
                continue;
            }
            _ = report.tick() => {
                send(&tx, proxy_message::Message::Report(report_of(metrics))).await?;
                continue;
            }
        };
        let version = msg.version;
        let generation = msg.rotate_generation;
        // The table follows what the control plane sent, applied or not, so that the next change
        // lands on the same table the control plane diffed against.
        let Some(mut msg) = table_update(table, msg)? else {
            continue; // more parts of this snapshot follow
        };
        metrics.tap.set(std::mem::take(&mut msg.taps));
        let (applied, error) = match apply(msg, cfg, tls, snapshots) {
            Ok(()) => {
                if rotation.is_some_and(|seen| generation > seen) {
                    rotate_now.notify_one();
                }
                rotation = Some(generation);
                last_version = version;
                metrics.snapshot_version.set(version as i64);
                metrics.mark_snapshot();
                tracing::info!(version, "applied snapshot");
                (true, String::new())
            }
            Err(e) => {
                tracing::warn!(version, error = %e, "refused snapshot; keeping the last one");
                (false, e)
            }
        };
        let ack = ack(version, applied, error, tls, &connection, &mut reported);
        send(&tx, proxy_message::Message::Ack(ack)).await?;
    }
}

/// Closes every tap when the stream that opened them ends.
struct CloseTaps<'a>(&'a crate::tap::Tap);

impl Drop for CloseTaps<'_> {
    fn drop(&mut self) {
        self.0.set(Vec::new());
    }
}

/// Folds `msg`'s service changes into `table` and returns `msg` with the whole table, or `None`
/// for a part that more parts follow. An incremental snapshot without a table to change breaks
/// the stream (the reconnect starts over with a complete one).
fn table_update(
    table: &mut Option<ServiceTable>,
    mut msg: moat_api::v1::Snapshot,
) -> Result<Option<moat_api::v1::Snapshot>, String> {
    ServiceTable::fold(table, &mut msg).map_err(|e| e.to_string())?;
    if msg.continued {
        return Ok(None);
    }
    msg.services = table
        .as_ref()
        .map(ServiceTable::to_proto)
        .unwrap_or_default();
    msg.services_incremental = false;
    Ok(Some(msg))
}

/// An acknowledgement carrying the certificate the proxy holds now, with its chain and the
/// proof that we hold its key when the control plane has not seen it on this stream yet
/// (`reported`: the serial it last saw; `connection`: the serial the stream's connection
/// presented, which the proof is bound to).
fn ack(
    version: u64,
    applied: bool,
    error: String,
    tls: &LiveTls,
    connection: &str,
    reported: &mut String,
) -> Ack {
    let current = tls.current();
    let leaf = current.as_ref().map(|g| g.credential.leaf().clone());
    let serial = leaf.as_ref().map(|l| l.serial.clone()).unwrap_or_default();
    let (cert_chain_der, cert_proof) = match &current {
        Some(g) if serial != *reported => {
            reported.clone_from(&serial);
            let proof = g.credential.sign_renewal(connection).unwrap_or_else(|e| {
                // Our own key, just loaded by the TLS configs: this does not happen. Without a
                // proof the control plane keeps the stream only until the connection's
                // certificate expires, and the reconnection uses this one.
                tracing::warn!(error = %e, "cannot sign the proof of our renewed certificate");
                Vec::new()
            });
            let chain = g.credential.chain().iter().map(|c| c.to_vec()).collect();
            (chain, proof)
        }
        _ => (Vec::new(), Vec::new()),
    };
    Ack {
        version,
        applied,
        error,
        cert_serial: serial,
        cert_not_after_unix: leaf.map(|l| l.not_after).unwrap_or_default(),
        cert_issuer_sha256: current
            .as_ref()
            .map(|g| g.issuer_sha256())
            .unwrap_or_default(),
        cert_refresh_after_unix: current.map(|g| g.refresh_after).unwrap_or_default(),
        cert_chain_der,
        cert_proof,
    }
}

async fn send(tx: &mpsc::Sender<ProxyMessage>, m: proxy_message::Message) -> Result<(), String> {
    tx.send(ProxyMessage { message: Some(m) })
        .await
        .map_err(|_| "stream closed".to_owned())
}

fn report_of(metrics: &Metrics) -> Report {
    Report {
        counters: metrics
            .rule_counters()
            .into_iter()
            .map(|((policy, rule, decision), version, count)| RuleCounter {
                policy,
                version,
                rule,
                decision: decision.to_owned(),
                count,
            })
            .collect(),
        observed: metrics
            .observed
            .calls()
            .into_iter()
            .map(|(c, count)| ObservedCall {
                peer: c.peer,
                port: u32::from(c.port),
                method: c.method,
                path: c.path,
                count,
                last_seen_unix: 0,
            })
            .collect(),
        edges: metrics
            .edges
            .readings()
            .into_iter()
            .map(|e| EdgeCounters {
                peer: e.peer,
                requests: e.requests,
                failures: e.failures,
                denied: e
                    .denied
                    .into_iter()
                    .map(|(reason, count)| ReasonCount {
                        reason: reason.to_owned(),
                        count,
                    })
                    .collect(),
                latency_buckets: e.buckets,
                // The control plane fills these in when it answers ListEdges.
                target: String::new(),
                proxies: 0,
            })
            .collect(),
    }
}

fn apply(
    msg: moat_api::v1::Snapshot,
    cfg: &ProxyConfig,
    tls: &LiveTls,
    snapshots: &watch::Sender<Option<Arc<Snapshot>>>,
) -> Result<(), String> {
    let snap = from_proto(msg, &cfg.identity).map_err(|e| e.to_string())?;
    let current = tls.current().ok_or("no certificate yet")?;
    let order = match snap.mesh.cipher_preference {
        CipherPreference::Aes256Gcm => SuiteOrder::Aes256First,
        CipherPreference::Aes128Gcm => SuiteOrder::Aes128First,
    };
    let new_bundle = current.bundle.fingerprints() != snap.bundle.fingerprints();
    if new_bundle || current.order != order {
        // A new bundle: our own chain must still verify under it, or we would cut ourselves off.
        tls.publish_ordered(
            current.credential.clone(),
            snap.bundle.clone(),
            current.refresh_after,
            order,
        )
        .map_err(|e| match new_bundle {
            true => format!("our certificate does not verify under the new trust bundle: {e}"),
            false => format!("cannot rebuild the TLS configs for the new cipher preference: {e}"),
        })?;
        if new_bundle {
            tracing::info!(roots = ?snap.bundle.fingerprints(), "trust bundle changed");
        }
        if current.order != order {
            tracing::info!(
                cipher_preference = snap.mesh.cipher_preference.as_str(),
                "cipher preference changed: new connections use it"
            );
        }
    }
    snapshots.send_replace(Some(Arc::new(snap)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_api::v1::{Service, Snapshot as Pb};

    fn svc(id: &str, eps: &[&str]) -> Service {
        Service {
            spiffe_id: id.into(),
            endpoints: eps.iter().map(|e| e.to_string()).collect(),
        }
    }

    /// The services of `s` by ID (the table lists them bucket by bucket).
    fn ids(s: &Pb) -> Vec<(&str, usize)> {
        let mut ids: Vec<_> = s
            .services
            .iter()
            .map(|s| (s.spiffe_id.as_str(), s.endpoints.len()))
            .collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn incremental_snapshots_update_the_table_of_the_stream() {
        let mut table = None;
        let full = Pb {
            services: vec![svc("a", &["1:1"]), svc("b", &["2:1"])],
            ..Pb::default()
        };
        let s = table_update(&mut table, full).unwrap().unwrap();
        assert_eq!(ids(&s), [("a", 1), ("b", 1)]);
        let delta = Pb {
            services_incremental: true,
            services: vec![svc("a", &["1:1", "3:1"]), svc("c", &["4:1"])],
            services_removed: vec!["b".into()],
            ..Pb::default()
        };
        let s = table_update(&mut table, delta).unwrap().unwrap();
        assert_eq!(ids(&s), [("a", 2), ("c", 1)]);
        assert!(!s.services_incremental && s.services_removed.is_empty());
        // A complete table replaces everything.
        let s = table_update(&mut table, Pb::default()).unwrap().unwrap();
        assert!(s.services.is_empty());
    }

    #[test]
    fn a_snapshot_in_parts_is_applied_at_its_last_part() {
        let mut table = None;
        let first = Pb {
            services: vec![svc("a", &["1:1"])],
            continued: true,
            ..Pb::default()
        };
        assert!(table_update(&mut table, first).unwrap().is_none());
        let middle = Pb {
            services_incremental: true,
            services: vec![svc("b", &["2:1"])],
            continued: true,
            ..Pb::default()
        };
        assert!(table_update(&mut table, middle).unwrap().is_none());
        let last = Pb {
            version: 9,
            services_incremental: true,
            services: vec![svc("c", &["3:1"])],
            ..Pb::default()
        };
        let s = table_update(&mut table, last).unwrap().unwrap();
        assert_eq!(s.version, 9);
        assert_eq!(ids(&s), [("a", 1), ("b", 1), ("c", 1)]);
    }

    #[test]
    fn changes_before_a_complete_table_break_the_stream() {
        let delta = Pb {
            services_incremental: true,
            ..Pb::default()
        };
        let err = table_update(&mut None, delta).unwrap_err();
        assert!(err.contains("before a complete table"), "{err}");
    }
}
