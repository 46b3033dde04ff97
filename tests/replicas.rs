//! Several control-plane replicas on one real etcd cluster (3 members from Debian's
//! `etcd-server` on loopback, `moat_test_util::etcd`), each a full peer: a change made through
//! one reaches the proxies of the others; the fleet view, the CA and rotation commands are
//! shared; a replica killed under load costs no request and its proxies move to the others; a
//! root rotation survives the loss of the leader and takes no step while the dead leader's
//! proxies are away; only the leader reads token issuers' keys, which every replica serves; a
//! one-use token yields one certificate however many replicas it is raced on; and the mesh
//! rides out etcd losing one member, then its quorum.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use moat_test_util::apps::{http_echo, recording_http};
use moat_test_util::etcd::EtcdCluster;
use moat_test_util::{ControlPlane, Proxy, apply_policy, eventually};
use serde_json::Value;

/// A 3-member etcd cluster and `n` replicas on it (started one after the other: the first
/// creates the CA, the others load it).
fn replicas(n: usize) -> (EtcdCluster, Vec<ControlPlane>) {
    let etcd = EtcdCluster::start(3).unwrap();
    let url = etcd.store_url();
    let cps = (0..n)
        .map(|_| ControlPlane::start_with(&["--store", &url]).unwrap())
        .collect();
    (etcd, cps)
}

/// `--control-plane` naming every replica, for sidecars that fail over.
fn all_urls(cps: &[ControlPlane]) -> String {
    cps.iter().map(|c| c.url()).collect::<Vec<_>>().join(",")
}

/// The replica that says it leads (`moat_replica_leader 1`), once exactly one does.
fn leader(cps: &[ControlPlane]) -> usize {
    eventually(Duration::from_secs(15), || {
        let leading: Vec<usize> = (0..cps.len())
            .filter(|i| {
                cps[*i]
                    .admin_get("/metrics")
                    .is_some_and(|(_, body)| body.lines().any(|l| l == "moat_replica_leader 1"))
            })
            .collect();
        (leading.len() == 1).then(|| leading[0])
    })
    .expect("exactly one replica leads")
}

fn status(cp: &ControlPlane) -> Value {
    serde_json::from_str(&cp.moat_ok(&["status", "-o", "json"])).unwrap()
}

/// The identities in `moat status` through `cp` (the whole fleet), sorted.
fn fleet(cp: &ControlPlane) -> Vec<String> {
    let mut ids: Vec<String> = status(cp)["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["identity"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// A recording app behind `orders` (its sidecar on `orders_on`) and a `frontend` sidecar (on
/// `frontend_on`) with an outbound listener for orders, once the frontend knows orders' endpoint.
async fn orders_and_frontend(
    orders_on: &ControlPlane,
    frontend_on: &ControlPlane,
) -> (moat_test_util::apps::Recording, Proxy, Proxy) {
    let (app, seen) = recording_http().await;
    let orders = Proxy::builder(orders_on, "orders")
        .app(app)
        .start()
        .unwrap();
    let frontend = Proxy::builder(frontend_on, "frontend")
        .app(app)
        .upstreams(&["orders"])
        .start()
        .unwrap();
    wait_for_services(&frontend, &["orders"]);
    (seen, orders, frontend)
}

const ORDERS_GET: &str = "apiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: { name: orders }\nspec:\n  target: orders\n  rules:\n    - from: [frontend]\n      http: [{ methods: [GET], paths: [/orders/*] }]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_replica_reaches_the_proxies_of_the_others() {
    let (_etcd, cps) = tokio::task::block_in_place(|| replicas(3));
    let (a, b, c) = (&cps[0], &cps[1], &cps[2]);
    leader(&cps);

    // orders on B, frontend on C: C's frontend learns orders' endpoint from what B publishes.
    let (seen, _orders, frontend) = orders_and_frontend(b, c).await;

    // A policy applied through A is enforced by the sidecar on B, on what the app receives.
    apply_policy(a, ORDERS_GET);
    let applied = eventually(Duration::from_secs(10), || {
        let s: Value =
            serde_json::from_str(&a.moat_ok(&["policy", "status", "-o", "json"])).ok()?;
        let p = &s["policies"][0];
        (p["proxies"] == 1 && p["applied"] == 1).then_some(())
    });
    assert!(
        applied.is_some(),
        "A sees B's proxy apply the policy: {}",
        a.moat_ok(&["policy", "status"])
    );
    let client = h1_client();
    let url = |path: &str| format!("http://{}{path}", frontend.upstream("orders"));
    let (code, _, _) = get(&client, "GET", &url("/orders/1"), &[]).await.unwrap();
    assert_eq!(code, 200);
    let (code, headers, _) = get(&client, "DELETE", &url("/orders/1"), &[])
        .await
        .unwrap();
    assert_eq!(
        (code, &headers["x-moat-deny-reason"]),
        (403, &"route-not-allowed".parse().unwrap())
    );
    let methods: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.method.clone())
        .collect();
    assert_eq!(methods, ["GET"], "the DELETE never reached the app");

    // Every replica shows the whole fleet.
    let both = vec![id("frontend").to_string(), id("orders").to_string()];
    for cp in &cps {
        assert_eq!(
            eventually(Duration::from_secs(10), || Some(fleet(cp))
                .filter(|f| *f == both)),
            Some(both.clone())
        );
    }

    // A revocation through C reaches the proxy on B: the frontend is refused.
    c.moat_ok(&["revoke", "--identity", "frontend"]);
    let refused = eventually(Duration::from_secs(10), || {
        let client = h1_client();
        let url = url("/orders/2");
        let r = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(get(&client, "GET", &url, &[]))
        });
        (!matches!(r, Ok((200, _, _)))).then_some(())
    });
    assert!(
        refused.is_some(),
        "the revocation reached orders' sidecar on B"
    );
    let after = get(&h1_client(), "GET", &url("/orders/3"), &[]).await;
    assert!(!matches!(after, Ok((200, _, _))), "{after:?}");
    assert!(
        !seen.lock().unwrap().iter().any(|r| r.path() == "/orders/3"),
        "no request of the revoked caller reached the app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_reads_token_keys_and_every_replica_serves_them() {
    let (_etcd, cps) = tokio::task::block_in_place(|| replicas(3));
    let l = leader(&cps);
    let (b, c) = (&cps[(l + 1) % 3], &cps[(l + 2) % 3]);
    let signer = common::tokens::Signer::ed("ed-1");
    let jwks_file = b.scratch().join("jwks.json");
    std::fs::write(&jwks_file, common::tokens::jwks(&[&signer])).unwrap();
    let issuer = "https://id.moat.test";
    // Applied through a replica that does not lead.
    apply_policy(
        b,
        &format!(
            "apiVersion: moat.dev/v1\nkind: MeshConfig\nmetadata: {{ name: mesh }}\nspec:\n  jwtIssuers:\n    - issuer: {issuer}\n      jwks: {{ file: {}, refresh: 1s }}\n      algorithms: [EdDSA]\n---\napiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: {{ name: orders }}\nspec:\n  target: orders\n  rules:\n    - from: [frontend]\n      jwt: {{ issuers: [{issuer}], audiences: [orders] }}\n",
            jwks_file.display()
        ),
    );
    // orders' sidecar on B and the frontend's on C, neither on the leader.
    let (seen, _orders, frontend) = orders_and_frontend(b, c).await;
    let now = common::tokens::now();
    let token = signer.sign(&serde_json::json!({
        "iss": issuer, "aud": "orders", "sub": "alice", "exp": now + 300, "iat": now,
    }));
    let url = format!("http://{}/orders/1", frontend.upstream("orders"));
    let auth = format!("Bearer {token}");
    let accepted = eventually(Duration::from_secs(15), || {
        let r = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(get(
                &h1_client(),
                "GET",
                &url,
                &[("authorization", &auth), ("x-moat-user", "mallory")],
            ))
        });
        matches!(r, Ok((200, _, _))).then_some(())
    });
    assert!(accepted.is_some(), "the token was never accepted on B");
    // The app received the verified subject, not the one the caller wrote.
    let users: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .flat_map(|r| r.headers.iter())
        .filter(|(k, _)| k == "x-moat-user")
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(users, ["alice"]);
    // One replica read the key set: the leader. The others served it from the store.
    let readers: Vec<usize> = (0..3)
        .filter(|i| {
            cps[*i]
                .log_text()
                .contains("read a new key set for the issuer")
        })
        .collect();
    assert_eq!(readers, [l], "only the leader reads key sets");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_use_token_raced_on_every_replica_yields_one_certificate() {
    use moat_api::v1::identity_client::IdentityClient;
    use moat_api::v1::{CertifyRequest, certify_request};
    let (_etcd, cps) = tokio::task::block_in_place(|| replicas(3));
    let token = cps[0]
        .moat_ok(&["token", "create", "--identity", "orders"])
        .trim()
        .to_owned();
    let anchors = moat_identity::TrustBundle::from_pem(
        &std::fs::read(cps[0].admin_dir().join("bundle.pem")).unwrap(),
    )
    .unwrap();
    let calls: Vec<_> = (0..12)
        .map(|i| {
            let url = cps[i % 3].url();
            let (token, anchors) = (token.clone(), anchors.clone());
            tokio::spawn(async move {
                let key = moat_identity::WorkloadKey::generate(&id("orders")).unwrap();
                let channel = moat_tls::connect::channel(&url, anchors, control_id(), None)
                    .await
                    .unwrap();
                IdentityClient::new(channel)
                    .certify(CertifyRequest {
                        csr_der: key.csr_der().to_vec(),
                        ttl_seconds: 600,
                        credential: Some(certify_request::Credential::JoinToken(token)),
                    })
                    .await
            })
        })
        .collect();
    let mut issued = 0;
    let mut refusals = Vec::new();
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => issued += 1,
            Err(s) => refusals.push(s),
        }
    }
    assert_eq!(issued, 1, "refusals: {refusals:?}");
    assert!(
        refusals
            .iter()
            .all(|s| s.code() == tonic::Code::ResourceExhausted
                && s.message().contains("used up (1 of 1 uses)")),
        "{refusals:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_costs_no_request_and_its_proxies_move() {
    let (_etcd, mut cps) = tokio::task::block_in_place(|| replicas(3));
    let urls = all_urls(&cps);
    let services = ["svc0", "svc1", "svc2"];
    let mut policy = String::new();
    for s in services {
        policy.push_str(&format!(
            "---\napiVersion: moat.dev/v1\nkind: AccessPolicy\nmetadata: {{ name: {s} }}\nspec:\n  target: {s}\n  rules:\n    - from: [loadgen]\n"
        ));
    }
    apply_policy(&cps[0], &policy);
    let app = http_echo().await;
    let mut proxies = Vec::new();
    for s in services {
        proxies.push(
            Proxy::builder(&cps[0], s)
                .app(app)
                .args(&["--control-plane", &urls])
                .start()
                .unwrap(),
        );
    }
    let loadgen = Proxy::builder(&cps[0], "loadgen")
        .app(app)
        .upstreams(&services)
        .args(&["--control-plane", &urls])
        .start()
        .unwrap();
    wait_for_services(&loadgen, &services);

    // Steady load: each service at 50 req/s (150 in all) for 15 s.
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = services
        .iter()
        .map(|s| {
            let url = format!("http://{}/x", loadgen.upstream(s));
            let stop = stop.clone();
            tokio::spawn(async move {
                let client = h1_client();
                let (mut ok, mut failed) = (0u32, Vec::new());
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    match get(&client, "GET", &url, &[]).await {
                        Ok((200, _, _)) => ok += 1,
                        other => failed.push(format!("{other:?}")),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(4)).await;

    // Kill the replica most of the proxies are connected to (each starts at a random one).
    let local = |cp: &ControlPlane| {
        status(cp)["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| !p["remote"].as_str().unwrap_or("").contains("via replica"))
            .count()
    };
    let counts: Vec<usize> = cps.iter().map(local).collect();
    let victim = (0..3).max_by_key(|i| counts[*i]).unwrap();
    assert!(counts[victim] > 0, "{counts:?}");
    let killed_at = Instant::now();
    cps[victim].kill9();

    // Every proxy is back on a survivor, and the survivors' fleet view has all four, once.
    let survivor = &cps[(victim + 1) % 3];
    let all: Vec<String> = {
        let mut v: Vec<String> = ["loadgen", "svc0", "svc1", "svc2"]
            .iter()
            .map(|s| id(s).to_string())
            .collect();
        v.sort();
        v
    };
    let survivors: Vec<&ControlPlane> = (0..3).filter(|i| *i != victim).map(|i| &cps[i]).collect();
    // Re-attached: the survivors have all four connected to them between them.
    let moved = tokio::task::block_in_place(|| {
        eventually(Duration::from_secs(10), || {
            let local: usize = survivors.iter().map(|cp| local(cp)).sum();
            (local == 4).then(|| killed_at.elapsed())
        })
    });
    let Some(moved) = moved else {
        panic!("not re-attached: {}", survivor.moat_ok(&["status"]));
    };
    // And the dead replica's registrations are gone once its lease ends: each proxy once.
    let victim_id = cps[victim]
        .log_text()
        .lines()
        .find_map(|l| {
            l.split("replica=").nth(1).map(|r| {
                r.split_whitespace()
                    .next()
                    .unwrap_or("")
                    .trim_matches('"')
                    .to_owned()
            })
        })
        .unwrap();
    assert_eq!(victim_id.len(), 12, "a replica id: {victim_id:?}");
    let clean = tokio::task::block_in_place(|| {
        eventually(Duration::from_secs(15), || {
            let s = status(survivor);
            let via_dead = s["proxies"]
                .as_array()?
                .iter()
                .any(|p| p["remote"].as_str().unwrap_or("").contains(&victim_id));
            let connected = proxies
                .iter()
                .chain([&loadgen])
                .all(|p| p.metrics().contains("moat_control_plane_connected 1"));
            (!via_dead && connected && fleet(survivor) == all).then(|| killed_at.elapsed())
        })
    });
    let Some(clean) = clean else {
        panic!(
            "the dead replica's proxies are still listed: {}",
            survivor.moat_ok(&["status"])
        );
    };
    tokio::time::sleep(Duration::from_secs(11).saturating_sub(killed_at.elapsed())).await;
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for l in load {
        let (o, f) = l.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok >= 100 * 15, "{ok} requests in 15 s");
    // The moved proxies announced the tables they held, and the survivors resumed them rather
    // than resending the whole table (the requests above show the resumed tables route).
    let resumed: f64 = survivors
        .iter()
        .filter_map(|cp| cp.admin_get("/metrics"))
        .map(|(_, text)| {
            moat_test_util::metric_sum(&text, "moat_mesh_first_snapshots_total{table=\"resumed\"}")
        })
        .sum();
    assert!(
        resumed >= counts[victim] as f64,
        "{resumed} resumed first snapshots for {} moved proxies",
        counts[victim]
    );
    eprintln!(
        "every proxy re-attached {moved:?} after the kill, the dead replica's entries gone after {clean:?}; {ok} requests, none failed; proxies per replica before: {counts:?}"
    );
    drop(cps.remove(victim));
}

/// The replica `proxy` is connected to (the one whose `moat status` lists it as its own), once
/// one does.
fn replica_of(cps: &[ControlPlane], proxy: &Proxy) -> usize {
    let address = proxy.inbound.to_string();
    tokio::task::block_in_place(|| {
        eventually(Duration::from_secs(10), || {
            (0..cps.len()).find(|i| {
                status(&cps[*i])["proxies"].as_array().is_some_and(|ps| {
                    ps.iter().any(|p| {
                        p["address"] == address.as_str()
                            && !p["remote"].as_str().unwrap_or("").contains("via replica")
                    })
                })
            })
        })
    })
    .expect("the proxy is connected to a replica")
}

fn kill(signal: &str, proxy: &Proxy) {
    let pid = proxy.pid().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_completes_after_the_leader_running_it_dies() {
    let (_etcd, mut cps) = tokio::task::block_in_place(|| replicas(3));
    let urls = all_urls(&cps);
    let app = http_echo().await;
    let l = tokio::task::block_in_place(|| leader(&cps));
    let start = |service: &str| {
        Proxy::builder(&cps[0], service)
            .app(app)
            .args(&["--control-plane", &urls])
            .start()
            .unwrap()
    };
    // `orders` on the leader (a sidecar starts at a random replica: started again until it
    // is), `payments` wherever it lands.
    let orders = (0..30)
        .map(|_| start("orders"))
        .find(|p| replica_of(&cps, p) == l)
        .expect("orders reached the leader in 30 starts");
    let _payments = start("payments");
    // Step 1 through the leader, then it dies while the command waits for the fleet, and
    // `orders` is held (SIGSTOP) so that it cannot reconnect to a survivor yet.
    let out = tokio::task::block_in_place(|| run_rotation_until(&cps[l], "step 1"));
    assert!(out.contains("step 1"), "{out}");
    kill("-STOP", &orders);
    cps[l].kill9();
    let dead_url = cps[l].url();
    let rest: Vec<ControlPlane> = {
        let dead = cps.remove(l);
        drop(dead);
        cps
    };
    // Another replica leads within the lease's time to live.
    let started = Instant::now();
    let new_leader = tokio::task::block_in_place(|| leader(&rest));
    eprintln!("new leader after {:?}", started.elapsed());
    // The operator runs the command again, naming the dead replica first: the CLI uses the
    // first that answers, and the rotation resumes. While `orders` has not reconnected, the
    // old root stays: it may still hold a certificate from it. (Step 2, which takes no trust
    // away, may pass on what the dead leader last published of `orders`, in the moment before
    // the survivors have turned it into an orphan.)
    let urls = format!("{},{}", dead_url, rest[new_leader].url());
    let rotate = |timeout: &str| {
        let out = tokio::task::block_in_place(|| {
            rest[new_leader].moat(&[
                "--control-plane",
                &urls,
                "ca",
                "rotate-root",
                "--timeout",
                timeout,
            ])
        });
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (done, out) = rotate("8s");
    let awaited = format!(
        "{} at {}: not reconnected since its control-plane replica died",
        id("orders"),
        orders.inbound
    );
    assert!(!done && out.contains(&awaited), "{out}");
    assert!(!out.contains("✓ step 3"), "{out}");
    // Once it is back (on a survivor), the rotation completes with it.
    kill("-CONT", &orders);
    let (done, out) = rotate("40s");
    assert!(done, "{out}");
    for step in ["✓ step 2", "✓ step 3", "root rotation complete: 2 proxies"] {
        assert!(out.contains(step), "{out}");
    }
    // The other survivor sees the same, once the proxies' last acknowledgements are
    // published (the cross-replica view trails by up to about a second).
    let on_new_root = eventually(Duration::from_secs(10), || {
        let s = status(&rest[(new_leader + 1) % 2]);
        let proxies = s["proxies"].as_array()?;
        (proxies.len() == 2 && proxies.iter().all(|p| p["bundle_current"] == true)).then_some(())
    });
    assert!(
        on_new_root.is_some(),
        "{}",
        rest[(new_leader + 1) % 2].moat_ok(&["status"])
    );

    // Revocation works through the new leadership too: given through one survivor, the
    // revoked proxy's certificate renewal is refused by the other.
    rest[new_leader].moat_ok(&["revoke", "--identity", "payments", "--reason", "test"]);
    let other = &rest[(new_leader + 1) % 2];
    assert!(other.moat_ok(&["revoke", "--list"]).contains("payments"));
    let gone = eventually(Duration::from_secs(10), || {
        (!fleet(other).contains(&id("payments").to_string())).then_some(())
    });
    assert!(
        gone.is_some(),
        "the revoked proxy's stream was closed: {}",
        other.moat_ok(&["status"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_rides_out_etcd_losing_a_member_then_its_quorum() {
    let (mut etcd, cps) = tokio::task::block_in_place(|| replicas(2));
    let (a, b) = (&cps[0], &cps[1]);
    let (_seen, _orders, frontend) = orders_and_frontend(b, a).await;
    apply_policy(a, ORDERS_GET);
    let client = h1_client();
    let url = format!("http://{}/orders/1", frontend.upstream("orders"));
    let ok = || async {
        eventually(Duration::from_secs(10), || {
            let r = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(get(&client, "GET", &url, &[]))
            });
            matches!(r, Ok((200, _, _))).then_some(())
        })
        .is_some()
    };
    assert!(ok().await);

    // One member (the leader) dies: nothing is visible.
    let l = etcd.leader().unwrap();
    etcd.kill(l);
    let policy2 = ORDERS_GET.replace("[GET]", "[GET, HEAD]");
    apply_policy(a, &policy2);
    assert!(ok().await);

    // A second one: writes are refused with a clear error; traffic keeps flowing.
    let other = (0..3).find(|i| *i != l).unwrap();
    etcd.kill(other);
    let file = a.scratch().join("lost.yaml");
    std::fs::write(&file, ORDERS_GET.replace("[GET]", "[GET, POST]")).unwrap();
    let out = a.moat(&["policy", "apply", "-f", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unavailable") && err.contains("majority of the etcd members"),
        "{err}"
    );
    eprintln!("a write without quorum: {}", err.trim());
    assert!(ok().await, "sidecars keep serving on their last snapshot");

    // Quorum returns: writes work again and nothing acknowledged was lost.
    etcd.restart(l).unwrap();
    etcd.restart(other).unwrap();
    let back = eventually(Duration::from_secs(30), || {
        a.moat(&["policy", "apply", "-f", file.to_str().unwrap()])
            .status
            .success()
            .then_some(())
    });
    assert!(back.is_some(), "writes resume once quorum returns");
    let shown = b.moat_ok(&["policy", "get", "orders", "-o", "yaml"]);
    assert!(shown.contains("POST"), "{shown}");
    assert!(ok().await);
}
