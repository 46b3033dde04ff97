//! The outbound service table a proxy folds from the snapshots of its streams, and the digests
//! that let a proxy which reconnects — to the same replica or to another — resume from the table
//! it holds instead of receiving the whole table again.
//!
//! The table is cut into [`BUCKETS`] buckets by the first byte of the SHA-256 of each service's
//! SPIFFE ID. A service's digest is the SHA-256 of its ID, its endpoint count and its endpoints
//! in table order, every string preceded by its length (u32, big-endian), so that no two entries
//! share an encoding. A bucket's digest is the SHA-256 of its services' digests, in byte order of
//! their IDs. Both ends compute the digests the same way from what they hold: the control plane
//! needs no history of what it, or a replica that has since died, sent.
//!
//! The proxy's table keeps each service's digest from when the service arrived, so the digests
//! it announces on a reconnect hash 32 bytes per service instead of re-reading every endpoint of
//! a table that has long left the CPU's caches (bench/results/service_table.md).

use std::collections::BTreeMap;

use moat_api::v1 as pb;
use sha2::{Digest, Sha256};

/// How many buckets a table is cut into.
pub const BUCKETS: usize = 64;

/// The SHA-256 digest of one bucket.
pub type BucketDigest = [u8; 32];

/// The SHA-256 digest of one service's entry: its ID and endpoints.
pub type ServiceDigest = [u8; 32];

/// Why a message cannot be folded into the table, or announced digests are malformed.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("the control plane sent service changes before a complete table")]
    NoBase,
    #[error("services_reset_buckets names bucket {0}, but there are only {BUCKETS}")]
    Bucket(u32),
    #[error("announce.table_digests has {0} entries; a proxy sends none or {BUCKETS}")]
    DigestCount(usize),
    #[error("announce.table_digests entry {index} is {len} bytes; each is a 32-byte SHA-256")]
    DigestLength { index: usize, len: usize },
}

/// The bucket of the service `id`.
pub fn bucket_of(id: &str) -> usize {
    usize::from(Sha256::digest(id.as_bytes())[0]) % BUCKETS
}

/// The digest of service `id` listing `endpoints`, encoded in one buffer and hashed at once
/// (a hasher fed string by string spends more on its block buffer than on SHA-256).
pub fn service_digest(id: &str, endpoints: &[String]) -> ServiceDigest {
    let strings = 1 + endpoints.len();
    let bytes = id.len() + endpoints.iter().map(String::len).sum::<usize>();
    let mut buf = Vec::with_capacity(4 * (strings + 2) + bytes);
    let mut put = |b: &[u8]| {
        buf.extend_from_slice(&(b.len() as u32).to_be_bytes());
        buf.extend_from_slice(b);
    };
    put(id.as_bytes());
    put(&(endpoints.len() as u32).to_be_bytes());
    for e in endpoints {
        put(e.as_bytes());
    }
    Sha256::digest(&buf).into()
}

/// The digest of one bucket from its services' digests, which must come in byte order of the
/// services' IDs.
pub fn bucket_digest<'a>(services: impl IntoIterator<Item = &'a ServiceDigest>) -> BucketDigest {
    let mut h = Sha256::new();
    for d in services {
        h.update(d);
    }
    h.finalize().into()
}

/// Sorts one bucket's services by ID and returns the bucket's digest; `entry` gives a service's
/// ID and endpoints.
pub fn sort_and_digest<T>(
    bucket: &mut [T],
    entry: impl Fn(&T) -> (&str, &[String]),
) -> BucketDigest {
    bucket.sort_unstable_by(|x, y| entry(x).0.cmp(entry(y).0));
    let services: Vec<ServiceDigest> = bucket
        .iter()
        .map(|s| {
            let (id, endpoints) = entry(s);
            service_digest(id, endpoints)
        })
        .collect();
    bucket_digest(&services)
}

/// The digests of every bucket of a table given in any order.
pub fn table_digests<'a>(
    services: impl IntoIterator<Item = (&'a str, &'a [String])>,
) -> Vec<BucketDigest> {
    let mut buckets: Vec<Vec<(&str, &[String])>> = vec![Vec::new(); BUCKETS];
    for (id, endpoints) in services {
        buckets[bucket_of(id)].push((id, endpoints));
    }
    buckets
        .iter_mut()
        .map(|b| sort_and_digest(b, |&(id, endpoints)| (id, endpoints)))
        .collect()
}

/// The digests a proxy announced: `None` when it sent none (it holds no table).
pub fn digests_from_proto(raw: &[Vec<u8>]) -> Result<Option<Vec<BucketDigest>>, TableError> {
    if raw.is_empty() {
        return Ok(None);
    }
    if raw.len() != BUCKETS {
        return Err(TableError::DigestCount(raw.len()));
    }
    raw.iter()
        .enumerate()
        .map(|(index, d)| {
            BucketDigest::try_from(d.as_slice()).map_err(|_| TableError::DigestLength {
                index,
                len: d.len(),
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Service identity → endpoints, as the snapshots of one stream or several built it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceTable {
    /// Per bucket, its services by ID.
    buckets: Vec<BTreeMap<String, Entry>>,
    /// Endpoints listed in all, kept as the table changes.
    endpoints: usize,
}

/// One service's endpoints, with the digest of its entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    digest: ServiceDigest,
    endpoints: Vec<String>,
}

impl Default for ServiceTable {
    fn default() -> Self {
        ServiceTable {
            buckets: vec![BTreeMap::new(); BUCKETS],
            endpoints: 0,
        }
    }
}

impl ServiceTable {
    /// Folds `msg`'s service changes (taking them out of it) into `table`: a message that is not
    /// incremental starts a new table; an incremental one changes the table held, which is an
    /// error when there is none. Nothing changes when the message is refused.
    pub fn fold(
        table: &mut Option<ServiceTable>,
        msg: &mut pb::Snapshot,
    ) -> Result<(), TableError> {
        let mut reset = [false; BUCKETS];
        for &b in &msg.services_reset_buckets {
            *reset.get_mut(b as usize).ok_or(TableError::Bucket(b))? = true;
        }
        let t = if msg.services_incremental {
            table.as_mut().ok_or(TableError::NoBase)?
        } else {
            table.insert(ServiceTable::default())
        };
        for (bucket, _) in reset.iter().enumerate().filter(|(_, r)| **r) {
            let dropped = std::mem::take(&mut t.buckets[bucket]);
            t.endpoints -= dropped.values().map(|e| e.endpoints.len()).sum::<usize>();
        }
        for removed in std::mem::take(&mut msg.services_removed) {
            t.endpoints -= t.buckets[bucket_of(&removed)]
                .remove(&removed)
                .map_or(0, |e| e.endpoints.len());
        }
        for svc in std::mem::take(&mut msg.services) {
            let entry = Entry {
                digest: service_digest(&svc.spiffe_id, &svc.endpoints),
                endpoints: svc.endpoints,
            };
            t.endpoints += entry.endpoints.len();
            t.endpoints -= t.buckets[bucket_of(&svc.spiffe_id)]
                .insert(svc.spiffe_id, entry)
                .map_or(0, |e| e.endpoints.len());
        }
        msg.services_reset_buckets.clear();
        Ok(())
    }

    /// The digest of every bucket, in the form an announce carries.
    pub fn digests(&self) -> Vec<Vec<u8>> {
        self.buckets
            .iter()
            .map(|b| bucket_digest(b.values().map(|e| &e.digest)).to_vec())
            .collect()
    }

    /// Every service with its endpoints: bucket by bucket, each in byte order of the IDs.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.buckets
            .iter()
            .flatten()
            .map(|(id, e)| (id.as_str(), e.endpoints.as_slice()))
    }

    /// The whole table in wire form.
    pub fn to_proto(&self) -> Vec<pb::Service> {
        self.iter()
            .map(|(id, endpoints)| pb::Service {
                spiffe_id: id.to_owned(),
                endpoints: endpoints.to_vec(),
            })
            .collect()
    }

    /// How many endpoints the table lists in all.
    pub fn endpoints(&self) -> usize {
        self.endpoints
    }

    /// The endpoints of service `id`.
    pub fn get(&self, id: &str) -> Option<&[String]> {
        self.buckets[bucket_of(id)]
            .get(id)
            .map(|e| e.endpoints.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(id: &str, endpoints: &[&str]) -> pb::Service {
        pb::Service {
            spiffe_id: id.to_owned(),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
        }
    }

    fn table(services: Vec<pb::Service>) -> ServiceTable {
        let mut t = None;
        let mut msg = pb::Snapshot {
            services,
            ..pb::Snapshot::default()
        };
        ServiceTable::fold(&mut t, &mut msg).unwrap();
        t.unwrap()
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("spiffe://example.org/ns/shop/sa/svc-{i}"))
            .collect()
    }

    #[test]
    fn digests_depend_on_content_not_on_order() {
        let ids = ids(200);
        let forward: Vec<_> = ids.iter().map(|id| svc(id, &["10.0.0.1:1"])).collect();
        let mut backward = forward.clone();
        backward.reverse();
        let a = table(forward);
        assert_eq!(a.digests(), table(backward).digests());
        assert_eq!(a.digests().len(), BUCKETS);
        // The control plane's form of the same table (any order) agrees.
        let pairs: Vec<(String, Vec<String>)> = ids
            .iter()
            .rev()
            .map(|id| (id.clone(), vec!["10.0.0.1:1".to_owned()]))
            .collect();
        let cp: Vec<Vec<u8>> = table_digests(pairs.iter().map(|(i, e)| (i.as_str(), e.as_slice())))
            .iter()
            .map(|d| d.to_vec())
            .collect();
        assert_eq!(a.digests(), cp);
    }

    #[test]
    fn digests_are_the_documented_encoding() {
        // What the module documents, spelled out: a service's digest hashes its length-prefixed
        // strings; a bucket's hashes its services' digests; an empty bucket hashes nothing.
        let t = table(vec![svc("a", &["1:1", "2:2"])]);
        let mut enc = Vec::new();
        for s in [b"a".as_slice(), &2u32.to_be_bytes(), b"1:1", b"2:2"] {
            enc.extend_from_slice(&(s.len() as u32).to_be_bytes());
            enc.extend_from_slice(s);
        }
        let service: [u8; 32] = Sha256::digest(&enc).into();
        let bucket: [u8; 32] = Sha256::digest(service).into();
        let empty: [u8; 32] = Sha256::digest([]).into();
        for (b, d) in t.digests().iter().enumerate() {
            let want = if b == bucket_of("a") { bucket } else { empty };
            assert_eq!(d.as_slice(), want, "bucket {b}");
        }
        let whole = t.to_proto();
        assert_eq!(whole, vec![svc("a", &["1:1", "2:2"])]);
    }

    #[test]
    fn one_changed_endpoint_changes_exactly_its_bucket() {
        let ids = ids(200);
        let before = table(ids.iter().map(|id| svc(id, &["10.0.0.1:1"])).collect());
        let mut changed: Vec<_> = ids.iter().map(|id| svc(id, &["10.0.0.1:1"])).collect();
        changed[17].endpoints.push("10.0.0.2:1".into());
        let after = table(changed);
        let differ: Vec<usize> = (0..BUCKETS)
            .filter(|&b| before.digests()[b] != after.digests()[b])
            .collect();
        assert_eq!(differ, [bucket_of(&ids[17])]);
        // Lengths are written, so moving a character between strings is a change too.
        let x = table(vec![svc("ab", &["c"])]);
        let y = table(vec![svc("a", &["bc"])]);
        assert_ne!(x.digests(), y.digests());
    }

    #[test]
    fn a_resumed_table_replaces_only_the_reset_buckets() {
        let ids = ids(100);
        let mut t = Some(table(
            ids.iter().map(|id| svc(id, &["10.0.0.1:1"])).collect(),
        ));
        let stale = bucket_of(&ids[3]);
        // The control plane has ids[3] with a new endpoint, and lost every other service of
        // that bucket; it resends the bucket.
        let mut msg = pb::Snapshot {
            services_incremental: true,
            services_reset_buckets: vec![stale as u32],
            services: vec![svc(&ids[3], &["10.0.0.9:1"])],
            ..pb::Snapshot::default()
        };
        ServiceTable::fold(&mut t, &mut msg).unwrap();
        let t = t.unwrap();
        assert_eq!(t.get(&ids[3]).unwrap(), ["10.0.0.9:1"]);
        assert_eq!(t.endpoints(), t.iter().map(|(_, e)| e.len()).sum::<usize>());
        for id in &ids[..] {
            if bucket_of(id) == stale && id != &ids[3] {
                assert!(t.get(id).is_none(), "{id} was in the reset bucket");
            } else if id != &ids[3] {
                assert_eq!(t.get(id).unwrap(), ["10.0.0.1:1"]);
            }
        }
    }

    #[test]
    fn bad_messages_and_digests_are_refused_without_changing_anything() {
        let mut none = None;
        let mut inc = pb::Snapshot {
            services_incremental: true,
            ..pb::Snapshot::default()
        };
        assert!(matches!(
            ServiceTable::fold(&mut none, &mut inc),
            Err(TableError::NoBase)
        ));
        let mut t = Some(table(vec![svc("a", &["1:1"])]));
        let mut bad = pb::Snapshot {
            services_incremental: true,
            services_reset_buckets: vec![0, BUCKETS as u32],
            ..pb::Snapshot::default()
        };
        let err = ServiceTable::fold(&mut t, &mut bad).unwrap_err();
        assert!(err.to_string().contains("bucket 64"), "{err}");
        assert_eq!(t.unwrap().get("a").unwrap(), ["1:1"]);

        assert!(digests_from_proto(&[]).unwrap().is_none());
        let err = digests_from_proto(&vec![vec![0; 32]; 3]).unwrap_err();
        assert!(err.to_string().contains("has 3 entries"), "{err}");
        let mut raw = vec![vec![0; 32]; BUCKETS];
        raw[5] = vec![0; 31];
        let err = digests_from_proto(&raw).unwrap_err();
        assert!(err.to_string().contains("entry 5 is 31 bytes"), "{err}");
    }
}
