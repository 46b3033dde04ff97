//! The etcd backend (cargo feature `etcd`), for several control-plane replicas sharing one
//! store. It maps the [`Store`](crate::Store) contract onto etcd's v3 API one to one: keys live
//! under one prefix, revisions are etcd's own (store-wide, one per write transaction), a
//! compare-and-swap is an etcd `Txn` comparing `mod_revision`, and a watch is etcd's prefix
//! watch started at the revision after the one current when it was asked for. etcd
//! acknowledges a write once a majority of its members has it on disk.
//!
//! Uses the `etcd-client` crate (tonic, the same gRPC stack as the rest of moat) rather than
//! hand-written gRPC stubs for etcd's protocol.

use std::time::Duration;

use etcd_client as etcd;
use tokio::sync::mpsc;

use crate::model::{
    Compare, Event, EventKind, KeyValue, Lagged, LeaseId, Op, StoreError, Txn, TxnResult,
    WatchStream,
};

/// How long one attempt at an etcd request may take. A write forwarded to a leader that has
/// just died is lost by etcd and only ends with this timeout.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a request is retried (a new leader is elected well within this) before it is
/// answered as unavailable.
const REQUEST_DEADLINE: Duration = Duration::from_secs(8);
/// How many changes a watch buffers for a slow reader before it waits on etcd.
const WATCH_BUFFER: usize = 256;

/// Where the etcd cluster is and how to authenticate to it.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// `host:port` of each member (any subset of the cluster will do; more is better).
    pub members: Vec<String>,
    /// Every moat key is stored under this prefix (default `/moat/`).
    pub prefix: String,
    /// TLS to etcd: the CA that signed the members' certificates, and optionally a client
    /// certificate and key (PEM) for etcd's client-certificate authentication.
    pub tls: Option<EtcdTls>,
}

/// TLS material for etcd, PEM.
#[derive(Clone)]
pub struct EtcdTls {
    pub ca: Vec<u8>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

/// Why an `etcd://` address was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EtcdUrlError {
    #[error("{0:?} is not an etcd store address: write etcd://HOST:PORT[,HOST:PORT...]")]
    Scheme(String),
    #[error("etcd member {0:?} is not HOST:PORT (for example etcd-0.etcd:2379)")]
    Member(String),
}

impl EtcdConfig {
    /// Parses `etcd://HOST:PORT[,HOST:PORT...]`, without TLS and with the default prefix.
    pub fn parse(url: &str) -> Result<Self, EtcdUrlError> {
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| EtcdUrlError::Scheme(url.to_owned()))?;
        let members = rest
            .split(',')
            .map(|m| {
                let m = m.trim().trim_end_matches('/');
                match m.rsplit_once(':') {
                    Some((host, port))
                        if !host.is_empty()
                            && !host.contains('/')
                            && port.parse::<u16>().is_ok_and(|p| p != 0) =>
                    {
                        Ok(m.to_owned())
                    }
                    _ => Err(EtcdUrlError::Member(m.to_owned())),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(EtcdConfig {
            members,
            prefix: "/moat/".to_owned(),
            tls: None,
        })
    }
}

/// The etcd backend. Cheap to clone; every clone shares one connection pool.
#[derive(Clone)]
pub struct EtcdStore {
    client: etcd::Client,
    prefix: String,
    /// The members, for messages.
    members: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("members", &self.members)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to the cluster and reads from it once, so that a wrong address or credential
    /// fails here with a clear message rather than at the first write.
    pub async fn connect(cfg: &EtcdConfig) -> Result<Self, StoreError> {
        let members = cfg.members.join(",");
        let scheme = if cfg.tls.is_some() { "https" } else { "http" };
        let endpoints: Vec<String> = cfg
            .members
            .iter()
            .map(|m| format!("{scheme}://{m}"))
            .collect();
        let mut options = etcd::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(ATTEMPT_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            // A member cut off from the majority refuses at once instead of serving stale
            // reads or holding writes until the timeout.
            .with_require_leader(true);
        if let Some(tls) = &cfg.tls {
            let mut t =
                etcd::TlsOptions::new().ca_certificate(etcd::Certificate::from_pem(&tls.ca));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(etcd::Identity::from_pem(cert, key));
            }
            options = options.with_tls(t);
        }
        let client = etcd::Client::connect(&endpoints, Some(options))
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "etcd at {members}: {e} (check the --store addresses and that etcd is up)"
                ))
            })?;
        let store = EtcdStore {
            client,
            prefix: cfg.prefix.clone(),
            members,
        };
        store.revision().await.map_err(|e| match e {
            StoreError::Unavailable(m) => StoreError::Unavailable(format!(
                "{m}; at start, also check the --store addresses and the etcd TLS flags"
            )),
            other => other,
        })?;
        Ok(store)
    }

    /// The cluster's current revision.
    pub async fn revision(&self) -> Result<u64, StoreError> {
        let resp = self
            .call(Request::Read, |mut kv| {
                let key = self.prefix.clone();
                async move {
                    kv.get(key, Some(etcd::GetOptions::new().with_count_only()))
                        .await
                }
            })
            .await?;
        Ok(header_revision(resp.header()))
    }

    /// Changes under `prefix` from revision `from` on (a reader that has seen everything up to
    /// revision R resumes with R + 1). If etcd has compacted `from` away, the first item is
    /// `Lagged` and the changes continue from the oldest revision etcd kept.
    pub fn watch_from(&self, prefix: &str, from: u64) -> WatchStream {
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(follow(
            self.client.clone(),
            self.prefix.clone(),
            self.full(prefix),
            revision_i64(from),
            tx,
        ));
        WatchStream::events(rx)
    }

    /// Discards etcd's history before `revision` (what etcd's auto-compaction does on a
    /// schedule); watches that need it get `Lagged`.
    pub async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        self.call(Request::Write, |mut kv| async move {
            kv.compact(revision_i64(revision), None).await
        })
        .await?;
        Ok(())
    }

    /// Runs one request, sending it again while that is safe and [`REQUEST_DEADLINE`] allows:
    /// a request that never left (a member is down and the client's balancer picked it), any
    /// read, and an unconditional write (writing the same values twice changes nothing). A
    /// conditional write whose outcome is unknown (its member or the leader died while it was
    /// in flight) is not repeated, because a second attempt would fail its own compare; its
    /// error says the outcome is unknown.
    async fn call<T, F, Fut>(&self, kind: Request, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut(etcd::KvClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd::Error>>,
    {
        let deadline = tokio::time::Instant::now() + REQUEST_DEADLINE;
        let mut wait = Duration::from_millis(20);
        loop {
            match op(self.client.kv_client()).await {
                Ok(v) => return Ok(v),
                Err(e)
                    if tokio::time::Instant::now() + wait < deadline
                        && (never_sent(&e)
                            || (kind != Request::ConditionalWrite && unreachable(&e))) =>
                {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(self.error(e, kind)),
            }
        }
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn key_value(&self, kv: &etcd::KeyValue) -> Result<KeyValue, StoreError> {
        Ok(KeyValue {
            key: strip(&self.prefix, kv.key())?,
            value: kv.value().to_vec(),
            create_revision: u64::try_from(kv.create_revision()).unwrap_or(0),
            mod_revision: u64::try_from(kv.mod_revision()).unwrap_or(0),
        })
    }

    /// Maps an etcd client error: anything that means "could not reach a working majority"
    /// is [`StoreError::Unavailable`]; a refusal of the request itself is an I/O error that
    /// quotes etcd.
    fn error(&self, e: etcd::Error, kind: Request) -> StoreError {
        match e {
            e if unreachable(&e) => {
                let what = match (kind, never_sent(&e)) {
                    (Request::Read, _) => "",
                    (_, true) => "; nothing was written",
                    (Request::Write, false) => {
                        "; the write may or may not have been applied: repeat it once etcd is back"
                    }
                    (Request::ConditionalWrite, false) => {
                        "; the write may or may not have been applied: read the current state before trying again"
                    }
                };
                StoreError::Unavailable(format!(
                    "etcd at {}: {}{what} (check that a majority of the etcd members is up)",
                    self.members,
                    match &e {
                        etcd::Error::GRpcStatus(s) => s.message().to_owned(),
                        other => other.to_string(),
                    }
                ))
            }
            etcd::Error::GRpcStatus(s) => StoreError::Io(format!(
                "etcd at {} refused the request: {}",
                self.members,
                s.message()
            )),
            other => StoreError::Io(format!("etcd at {}: {other}", self.members)),
        }
    }
}

/// What a request does, which decides whether it may be sent twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Read,
    /// Puts and deletes with no compare.
    Write,
    ConditionalWrite,
}

/// Whether the error means "no working majority could be reached" (as opposed to etcd
/// refusing the request itself).
fn unreachable(e: &etcd::Error) -> bool {
    use tonic::Code;
    match e {
        etcd::Error::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
        ),
        etcd::Error::TransportError(_) | etcd::Error::IoError(_) => true,
        _ => false,
    }
}

/// Whether the request was certainly not applied: the connection to the member chosen for it
/// could not be made (tonic reports hyper's connect error as `Unavailable`), or the member
/// refused it up front because it has no leader (etcd's "no leader", sent before anything is
/// proposed; we ask for it with `require_leader`).
fn never_sent(e: &etcd::Error) -> bool {
    match e {
        etcd::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable
                && (s.message().contains("connect error") || s.message().contains("no leader"))
        }
        _ => false,
    }
}

fn header_revision(h: Option<&etcd::ResponseHeader>) -> u64 {
    h.map_or(0, |h| u64::try_from(h.revision()).unwrap_or(0))
}

fn strip(prefix: &str, key: &[u8]) -> Result<String, StoreError> {
    std::str::from_utf8(key)
        .ok()
        .and_then(|k| k.strip_prefix(prefix))
        .map(str::to_owned)
        .ok_or_else(|| {
            StoreError::Corrupt(format!(
                "etcd returned key {:?} outside the prefix {prefix:?}",
                String::from_utf8_lossy(key)
            ))
        })
}

fn revision_i64(r: u64) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}

#[async_trait::async_trait]
impl crate::Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = self.full(key);
        let resp = self
            .call(Request::Read, |mut kv| {
                let key = key.clone();
                async move { kv.get(key, None).await }
            })
            .await?;
        resp.kvs().first().map(|kv| self.key_value(kv)).transpose()
    }

    async fn range(
        &self,
        prefix: &str,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let order = if reverse {
            etcd::SortOrder::Descend
        } else {
            etcd::SortOrder::Ascend
        };
        let mut options = etcd::GetOptions::new()
            .with_prefix()
            .with_sort(etcd::SortTarget::Key, order);
        if limit > 0 {
            options = options.with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        }
        let key = self.full(prefix);
        let resp = self
            .call(Request::Read, |mut kv| {
                let (key, options) = (key.clone(), options.clone());
                async move { kv.get(key, Some(options)).await }
            })
            .await?;
        resp.kvs().iter().map(|kv| self.key_value(kv)).collect()
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        let ops = |ops: Vec<Op>| -> Vec<etcd::TxnOp> {
            ops.into_iter()
                .map(|op| match op {
                    Op::Put(k, v) => etcd::TxnOp::put(self.full(&k), v, None),
                    Op::PutLeased(k, v, lease) => etcd::TxnOp::put(
                        self.full(&k),
                        v,
                        Some(etcd::PutOptions::new().with_lease(lease)),
                    ),
                    Op::Delete(k) => etcd::TxnOp::delete(self.full(&k), None),
                })
                .collect()
        };
        let compares: Vec<etcd::Compare> = txn
            .compares
            .iter()
            .map(|c| match c {
                // etcd reads the mod revision of an absent key as 0, as the contract does.
                Compare::ModRevision(k, r) => etcd::Compare::mod_revision(
                    self.full(k),
                    etcd::CompareOp::Equal,
                    revision_i64(*r),
                ),
            })
            .collect();
        let kind = if txn.compares.is_empty() {
            Request::Write
        } else {
            Request::ConditionalWrite
        };
        let request = etcd::Txn::new()
            .when(compares)
            .and_then(ops(txn.success))
            .or_else(ops(txn.failure));
        let resp = self
            .call(kind, |mut kv| {
                let request = request.clone();
                async move { kv.txn(request).await }
            })
            .await?;
        Ok(TxnResult {
            succeeded: resp.succeeded(),
            revision: header_revision(resp.header()),
        })
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError> {
        let from = self.revision().await? + 1;
        Ok(self.watch_from(prefix, from))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let mut lease = self.client.lease_client();
        let resp = lease
            .grant(secs, None)
            .await
            .map_err(|e| self.error(e, Request::Write))?;
        Ok(resp.id())
    }

    async fn renew_lease(&self, lease: LeaseId) -> Result<bool, StoreError> {
        let mut client = self.client.lease_client();
        let renewed = tokio::time::timeout(ATTEMPT_TIMEOUT, async {
            let (mut keeper, mut responses) = client.keep_alive(lease).await?;
            keeper.keep_alive().await?;
            responses.message().await
        })
        .await
        .map_err(|_| {
            StoreError::Unavailable(format!(
                "etcd at {}: renewing lease {lease:x} timed out",
                self.members
            ))
        })?;
        match renewed {
            // etcd answers a lease that has expired with a time to live of 0, or, once it has
            // forgotten it, "lease not found".
            Ok(r) => Ok(r.is_some_and(|r| r.ttl() > 0)),
            Err(etcd::Error::LeaseKeepAliveError(e)) if e.contains("lease not found") => Ok(false),
            Err(e) => Err(self.error(e, Request::Write)),
        }
    }
}

/// Feeds one [`WatchStream`] from etcd until its reader goes away. A broken connection is
/// re-established from the revision after the last one delivered, so nothing is skipped; if
/// etcd has compacted that history meanwhile, the reader gets `Lagged` (and re-reads the
/// range) and the watch resumes at the oldest revision etcd still has.
async fn follow(
    mut client: etcd::Client,
    strip_prefix: String,
    key: String,
    mut from: i64,
    tx: mpsc::Sender<Result<Event, Lagged>>,
) {
    let mut wait = Duration::from_millis(100);
    loop {
        let options = etcd::WatchOptions::new()
            .with_prefix()
            .with_start_revision(from);
        let opened = tokio::select! {
            r = client.watch(key.as_bytes(), Some(options)) => r,
            () = tx.closed() => return,
        };
        if let Ok(mut stream) = opened {
            loop {
                let message = tokio::select! {
                    m = stream.message() => m,
                    () = tx.closed() => return,
                };
                let Ok(Some(resp)) = message else { break };
                wait = Duration::from_millis(100);
                if resp.compact_revision() > 0 {
                    let missed = u64::try_from(resp.compact_revision() - from).unwrap_or(0);
                    if tx.send(Err(Lagged(missed.max(1)))).await.is_err() {
                        return;
                    }
                    from = resp.compact_revision();
                    break;
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let Ok(key) = strip(&strip_prefix, kv.key()) else {
                        continue;
                    };
                    let kind = match ev.event_type() {
                        etcd::EventType::Put => EventKind::Put,
                        etcd::EventType::Delete => EventKind::Delete,
                    };
                    let event = Event {
                        kind,
                        key,
                        value: kv.value().to_vec(),
                        revision: u64::try_from(kv.mod_revision()).unwrap_or(0),
                    };
                    from = kv.mod_revision() + 1;
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                if resp.canceled() {
                    break;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = tx.closed() => return,
        }
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_addresses() {
        let c = EtcdConfig::parse("etcd://a:2379,127.0.0.1:23790").unwrap();
        assert_eq!(c.members, ["a:2379", "127.0.0.1:23790"]);
        assert_eq!(c.prefix, "/moat/");
        assert!(matches!(
            EtcdConfig::parse("http://a:2379"),
            Err(EtcdUrlError::Scheme(_))
        ));
        for bad in [
            "etcd://",
            "etcd://a",
            "etcd://a:0",
            "etcd://a:x",
            "etcd://a:1,",
        ] {
            let e = EtcdConfig::parse(bad).unwrap_err();
            assert!(
                e.to_string().contains("HOST:PORT"),
                "{bad}: {e} should say what to write"
            );
        }
    }
}
