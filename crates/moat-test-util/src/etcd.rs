//! A real etcd cluster on loopback for the tests of the etcd store backend and of replicated
//! control planes: `etcd` from Debian's `etcd-server` package (scripts/test installs it), one
//! process per member, each with its own data directory, client and peer port.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::{ReservedPort, eventually, http_get};

/// One member: its ports are kept for its whole life, so it restarts on the same addresses.
#[derive(Debug)]
struct Member {
    name: String,
    client: ReservedPort,
    peer: ReservedPort,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster; every member is killed on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    _dir: tempfile::TempDir,
}

/// The `etcd` binary, or a panic that says how to install it.
fn etcd_binary() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("etcd"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "etcd is not installed: these tests run a real etcd cluster. Run scripts/test \
             (it installs Debian's etcd-server package) or `apt-get install etcd-server`"
        )
    })
}

impl EtcdCluster {
    /// Starts `size` members and waits until every one reports healthy.
    pub fn start(size: usize) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut members: Vec<Member> = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client: ReservedPort::loopback(),
                peer: ReservedPort::loopback(),
                data: dir.path().join(format!("m{i}.etcd")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer.addr()))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!(
            "moat-test-{}-{}",
            std::process::id(),
            members[0].client.port()
        );
        let mut cluster = EtcdCluster {
            members: Vec::new(),
            initial_cluster,
            token,
            _dir: dir,
        };
        for m in &mut members {
            m.child = Some(cluster.spawn(m)?);
        }
        cluster.members = members;
        for i in 0..size {
            cluster.wait_healthy(i)?;
        }
        Ok(cluster)
    }

    fn spawn(&self, m: &Member) -> anyhow::Result<Child> {
        let client = format!("http://{}", m.client.addr());
        let peer = format!("http://{}", m.peer.addr());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)?;
        Command::new(etcd_binary())
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            // Loopback: elect within half a second instead of the WAN-friendly default.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start etcd member {}", m.name))
    }

    fn wait_healthy(&self, i: usize) -> anyhow::Result<()> {
        let m = &self.members[i];
        let healthy = eventually(Duration::from_secs(30), || {
            http_get(&m.client.addr(), "/health")
                .filter(|(status, body)| *status == 200 && body.contains("\"true\""))
        });
        if healthy.is_none() {
            bail!(
                "etcd member {} did not become healthy; its log:\n{}",
                m.name,
                std::fs::read_to_string(&m.log).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// `etcd://HOST:PORT,...` for `moat-control serve --store`.
    pub fn store_url(&self) -> String {
        format!("etcd://{}", self.members_list())
    }

    /// `HOST:PORT,...` of every member's client port.
    pub fn members_list(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client.addr().to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `host:port` of each member.
    pub fn member_addrs(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| m.client.addr().to_string())
            .collect()
    }

    /// The member that is the Raft leader now (from its `etcd_server_is_leader` metric).
    pub fn leader(&self) -> Option<usize> {
        self.members.iter().position(|m| {
            m.child.is_some()
                && http_get(&m.client.addr(), "/metrics").is_some_and(|(_, body)| {
                    body.lines().any(|l| l.trim() == "etcd_server_is_leader 1")
                })
        })
    }

    /// `kill -9` member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data directory and waits until the cluster has it back.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        let child = self.spawn(&self.members[i])?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Waits until member `i` reports healthy (it has a leader and a quorum).
    pub fn wait_member(&self, i: usize) -> anyhow::Result<()> {
        self.wait_healthy(i)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
