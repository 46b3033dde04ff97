//! The store contract, one suite run against both backends: the embedded redb store, and the
//! etcd store on a real 3-member etcd cluster (Debian's `etcd-server`, started on loopback by
//! `moat_test_util::etcd`). Then what only a distributed store can do to its users: a member
//! dies under a watch, etcd compacts history a watcher still needed, and the cluster loses its
//! quorum (writes are refused with a clear error; nothing acknowledged is lost).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use moat_store::{
    Compare, EmbeddedStore, EtcdConfig, EtcdStore, EventKind, Op, Store, StoreError, Txn,
    WatchStream,
};
use moat_test_util::etcd::EtcdCluster;

fn put(k: &str, v: &str) -> Op {
    Op::Put(k.to_owned(), v.as_bytes().to_vec())
}

/// The next watch event as (kind, key, value), failing after 10 s.
async fn next(w: &mut WatchStream) -> (EventKind, String, String) {
    let e = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("a watch event within 10 s")
        .expect("not lagged")
        .expect("the store is still there");
    (e.kind, e.key, String::from_utf8(e.value).unwrap())
}

async fn keys(s: &dyn Store, prefix: &str, limit: usize, reverse: bool) -> Vec<String> {
    s.range(prefix, limit, reverse)
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect()
}

/// Revisions, compare-and-swap with both branches, ranges, deletes, and the watch that sees
/// exactly the committed changes under its prefix, in order.
async fn revisions_transactions_ranges_and_watch(s: &dyn Store) {
    s.put("c/before", b"0".to_vec()).await.unwrap();
    let mut w = s.watch("c/").await.unwrap();
    let r1 = s.put("c/a", b"1".to_vec()).await.unwrap();
    let r2 = s.put("c/b", b"2".to_vec()).await.unwrap();
    assert_eq!(r2, r1 + 1, "one revision per write transaction");
    s.put("other/x", b"3".to_vec()).await.unwrap();
    let a = s.get("c/a").await.unwrap().unwrap();
    assert_eq!((a.create_revision, a.mod_revision), (r1, r1));
    assert!(s.get("c/none").await.unwrap().is_none());

    // A stale compare fails and applies the failure branch.
    let stale = s
        .txn(Txn {
            compares: vec![Compare::ModRevision("c/a".into(), r1 + 100)],
            success: vec![put("c/a", "x")],
            failure: vec![put("c/failed", "f")],
        })
        .await
        .unwrap();
    assert!(!stale.succeeded);
    assert_eq!(s.get("c/a").await.unwrap().unwrap().value, b"1");
    assert_eq!(s.get("c/failed").await.unwrap().unwrap().value, b"f");

    let fresh = s
        .txn(Txn {
            compares: vec![Compare::ModRevision("c/a".into(), r1)],
            success: vec![put("c/a", "y"), Op::Delete("c/b".into())],
            ..Txn::default()
        })
        .await
        .unwrap();
    assert!(fresh.succeeded);
    let a = s.get("c/a").await.unwrap().unwrap();
    assert_eq!(
        (a.value.as_slice(), a.create_revision, a.mod_revision),
        (&b"y"[..], r1, fresh.revision)
    );
    assert!(s.get("c/b").await.unwrap().is_none());

    // Mod revision 0 means "absent": create-if-absent holds once.
    let create = || Txn {
        compares: vec![Compare::ModRevision("c/new".into(), 0)],
        success: vec![put("c/new", "n")],
        ..Txn::default()
    };
    assert!(s.txn(create()).await.unwrap().succeeded);
    assert!(!s.txn(create()).await.unwrap().succeeded);

    assert_eq!(
        keys(s, "c/", 0, false).await,
        ["c/a", "c/before", "c/failed", "c/new"]
    );
    assert_eq!(keys(s, "c/", 2, true).await, ["c/new", "c/failed"]);
    assert_eq!(keys(s, "c/", 1, false).await, ["c/a"]);

    let seen = [
        next(&mut w).await,
        next(&mut w).await,
        next(&mut w).await,
        next(&mut w).await,
        next(&mut w).await,
        next(&mut w).await,
    ];
    let expect = [
        (EventKind::Put, "c/a", "1"),
        (EventKind::Put, "c/b", "2"),
        (EventKind::Put, "c/failed", "f"),
        (EventKind::Put, "c/a", "y"),
        (EventKind::Delete, "c/b", ""),
        (EventKind::Put, "c/new", "n"),
    ];
    for ((kind, key, value), (ek, ekey, evalue)) in seen.iter().zip(expect) {
        assert_eq!((*kind, key.as_str(), value.as_str()), (ek, ekey, evalue));
    }
    let quiet = tokio::time::timeout(Duration::from_millis(300), w.next()).await;
    assert!(
        quiet.is_err(),
        "nothing else under c/ changed: {quiet:?} (c/before predates the watch, other/x is outside it)"
    );
}

/// Many writers racing on one compare-and-swap (a single-use join token): exactly one wins.
async fn one_winner_per_compare_and_swap(s: Arc<dyn Store>) {
    let rev = s.put("t/token", b"unused".to_vec()).await.unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.txn(Txn {
                    compares: vec![Compare::ModRevision("t/token".into(), rev)],
                    success: vec![put("t/token", &format!("used by {i}"))],
                    ..Txn::default()
                })
                .await
                .unwrap()
                .succeeded
            })
        })
        .collect();
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap());
    }
    assert_eq!(winners, 1, "exactly one use of a single-use token");
    let v = s.get("t/token").await.unwrap().unwrap().value;
    assert!(v.starts_with(b"used by "));
}

/// A key written under a lease lives while the lease is renewed and goes (with a delete event)
/// once it is not.
async fn leased_keys_live_as_long_as_their_lease(s: &dyn Store) {
    let mut w = s.watch("l/").await.unwrap();
    let lease = s.grant_lease(Duration::from_secs(2)).await.unwrap();
    s.txn(Txn {
        success: vec![Op::PutLeased("l/replica".into(), b"a".to_vec(), lease)],
        ..Txn::default()
    })
    .await
    .unwrap();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(s.renew_lease(lease).await.unwrap(), "renewed in time");
    }
    assert!(s.get("l/replica").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(!s.renew_lease(lease).await.unwrap(), "expired");
    assert!(s.get("l/replica").await.unwrap().is_none());
    assert_eq!(next(&mut w).await.0, EventKind::Put);
    let (kind, key, _) = next(&mut w).await;
    assert_eq!((kind, key.as_str()), (EventKind::Delete, "l/replica"));
    assert!(
        !s.renew_lease(lease + 1000).await.unwrap(),
        "an unknown lease"
    );
}

async fn contract(s: Arc<dyn Store>) {
    revisions_transactions_ranges_and_watch(s.as_ref()).await;
    leased_keys_live_as_long_as_their_lease(s.as_ref()).await;
    one_winner_per_compare_and_swap(s).await;
}

/// A 3-member cluster, started off the async runtime (it waits on the members' health).
async fn cluster() -> EtcdCluster {
    tokio::task::spawn_blocking(|| EtcdCluster::start(3))
        .await
        .unwrap()
        .unwrap()
}

async fn connect(cluster: &EtcdCluster, prefix: &str) -> EtcdStore {
    let mut cfg = EtcdConfig::parse(&cluster.store_url()).unwrap();
    cfg.prefix = prefix.to_owned();
    EtcdStore::connect(&cfg).await.unwrap()
}

#[tokio::test]
async fn the_embedded_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    contract(Arc::new(EmbeddedStore::open(dir.path()).unwrap())).await;
    // The process that held a lease is gone once the store is opened again: so are its keys.
    {
        let s = EmbeddedStore::open(&dir.path().join("again")).unwrap();
        let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
        s.txn(Txn {
            success: vec![Op::PutLeased("l/x".into(), vec![], lease), put("kept", "k")],
            ..Txn::default()
        })
        .await
        .unwrap();
    }
    let s = EmbeddedStore::open(&dir.path().join("again")).unwrap();
    assert!(s.get("l/x").await.unwrap().is_none());
    assert!(s.get("kept").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_store_keeps_the_contract() {
    let cluster = cluster().await;
    contract(Arc::new(connect(&cluster, "/contract/").await)).await;
    // Two stores on different prefixes of one cluster do not see each other's keys.
    let other = connect(&cluster, "/elsewhere/").await;
    assert!(other.range("", 0, false).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_watch_survives_a_member_loss_and_reports_compacted_history() {
    let mut cluster = cluster().await;
    let s = connect(&cluster, "/m/").await;
    let mut w = s.watch("k/").await.unwrap();
    // Writes keep being acknowledged while a member dies; each acknowledged one is seen once,
    // in order, whichever member the watch was attached to.
    // The leader dies (the worst member to lose: writes in flight to it are lost by etcd and
    // a new leader must be elected). Nothing is visible: no write fails.
    let leader = cluster.leader().expect("the cluster has a leader");
    let mut acked = Vec::new();
    for i in 0..60 {
        if i == 20 {
            cluster.kill(leader);
        }
        let key = format!("k/{i:03}");
        if let Err(e) = s.put(&key, vec![]).await {
            panic!("write {i} failed after one of three members died: {e}");
        }
        acked.push(key);
    }
    for key in &acked {
        assert_eq!(&next(&mut w).await.1, key);
    }
    assert_eq!(keys(&s, "k/", 0, false).await, acked);

    // A watcher that resumes from history etcd has compacted is told to re-read.
    let old = s.put("k/old", vec![]).await.unwrap();
    let now = s.put("k/new", vec![]).await.unwrap();
    s.compact(now).await.unwrap();
    let mut resumed = s.watch_from("k/", old);
    let lag = tokio::time::timeout(Duration::from_secs(10), resumed.next())
        .await
        .unwrap();
    assert!(lag.is_err(), "compacted history is reported: {lag:?}");
    assert_eq!(next(&mut resumed).await.1, "k/new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_writes_are_refused_clearly_and_nothing_acknowledged_is_lost() {
    let mut cluster = cluster().await;
    let s = connect(&cluster, "/q/").await;
    let mut w = s.watch("k/").await.unwrap();
    s.put("k/1", b"before".to_vec()).await.unwrap();
    cluster.kill(1);
    cluster.kill(2);
    let err = tokio::time::timeout(Duration::from_secs(15), s.put("k/2", b"lost".to_vec()))
        .await
        .expect("a write without quorum is answered, not left hanging")
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, StoreError::Unavailable(_))
            && (text.contains("nothing was written") || text.contains("may or may not"))
            && text.contains("majority of the etcd members is up"),
        "{text}"
    );
    cluster.restart(1).unwrap();
    cluster.restart(2).unwrap();
    let _cluster = tokio::task::spawn_blocking(move || {
        for i in 0..3 {
            cluster.wait_member(i).unwrap();
        }
        cluster
    })
    .await
    .unwrap();
    s.put("k/3", b"after".to_vec()).await.unwrap();
    assert_eq!(s.get("k/1").await.unwrap().unwrap().value, b"before");
    // The refused write may or may not have been committed by the surviving member's log; a
    // refusal never claims success, and whatever the store holds, the watch reports in order.
    let first = next(&mut w).await;
    assert_eq!((first.1.as_str(), first.2.as_str()), ("k/1", "before"));
    let mut rest = vec![next(&mut w).await.1];
    if rest[0] == "k/2" {
        rest.push(next(&mut w).await.1);
    }
    assert_eq!(rest.last().map(String::as_str), Some("k/3"));
}
