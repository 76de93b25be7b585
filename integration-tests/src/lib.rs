//! Harness for tests that run Cairn's real binaries on 127.0.0.1.
//!
//! [`TestCluster`] starts N coordinators and M storage nodes from the workspace's built
//! binaries, on free ports, in a temporary directory; any process can be killed (`SIGKILL`),
//! stopped (`SIGTERM`), paused (`SIGSTOP`), resumed and restarted with its data. Tests wait on
//! conditions ([`wait_for`]), never on fixed sleeps, and every process is killed when the
//! cluster is dropped, even when a test fails.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_proto::chunk::chunk_store_client::ChunkStoreClient;
use cairn_proto::chunk::{ListChunksRequest, NodeStatsReply, NodeStatsRequest};
use cairn_proto::coord_client::CoordClient;
use cairn_proto::metadata::{
    ClusterStatusReply, ClusterStatusRequest, ListNodesRequest, SetReplicationRequest,
};
use cairn_proto::types::NodeState;
use cairn_proto::ChunkId;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Directory holding the workspace's built binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    for b in ["cairn", "cairn-coordinator", "cairn-storage-node"] {
        assert!(
            dir.join(b).exists(),
            "{} is missing: build the workspace first (cargo build --workspace)",
            dir.join(b).display()
        );
    }
    dir
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct free TCP ports on 127.0.0.1: every listener is held until all are chosen, since
/// a port released at once can be handed out again by the next bind.
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Polls `cond` every 50 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One child process with what it takes to restart it.
pub struct Proc {
    /// Name, for messages.
    pub name: String,
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn start(name: String, bin: PathBuf, args: Vec<String>, log: PathBuf) -> Self {
        let mut p = Self {
            name,
            bin,
            args,
            log,
            child: None,
        };
        p.restart();
        p
    }

    /// Starts the process again (after a kill or stop) with the same arguments and data.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{} is still running", self.name);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(&self.bin)
            .args(&self.args)
            .env(
                "RUST_LOG",
                "info,openraft=warn,h2=warn,tower=warn,hyper=warn",
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("process running").id() as i32)
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Graceful stop (SIGTERM), waiting for exit (SIGKILL after 10 s).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP.
    pub fn pause(&self) {
        kill(self.pid(), Signal::SIGSTOP).unwrap();
    }

    /// SIGCONT.
    pub fn resume(&self) {
        kill(self.pid(), Signal::SIGCONT).unwrap();
    }

    /// Whether the process is running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
        }
        self.kill9();
    }
}

/// How to build a test cluster.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Coordinators.
    pub coordinators: usize,
    /// Storage nodes.
    pub nodes: usize,
    /// Redundancy factor.
    pub replicas: u32,
    /// Build a Raft snapshot after this many entries.
    pub snapshot_logs: u64,
    /// Node Down timeout.
    pub node_down_ms: u64,
    /// Node Out timeout.
    pub node_out_ms: u64,
    /// Zones to spread nodes over.
    pub zones: usize,
    /// Storage nodes' anti-entropy period.
    pub resync_ms: u64,
    /// Storage nodes' pause between scrub passes.
    pub scrub_ms: u64,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            coordinators: 3,
            nodes: 3,
            replicas: 3,
            snapshot_logs: 1000,
            node_down_ms: 3000,
            node_out_ms: 600_000,
            zones: 3,
            resync_ms: 500,
            scrub_ms: 3_600_000,
        }
    }
}

/// A running cluster of real processes.
pub struct TestCluster {
    /// Data, logs and scratch space.
    pub dir: tempfile::TempDir,
    /// Coordinator processes, index = id - 1.
    pub coordinators: Vec<Proc>,
    /// Their addresses.
    pub coordinator_addrs: Vec<String>,
    /// Storage node processes.
    pub nodes: Vec<Proc>,
    /// Their addresses.
    pub node_addrs: Vec<String>,
    /// The spec it was built from.
    pub spec: Spec,
    bins: PathBuf,
}

/// The password tests use.
pub const PASSWORD: &str = "correct horse battery staple";

impl TestCluster {
    /// Starts coordinators and nodes and waits until the cluster serves.
    pub async fn start(spec: Spec) -> Self {
        let bins = bin_dir();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        let coordinator_addrs: Vec<String> = free_ports(spec.coordinators)
            .into_iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let mut c = Self {
            dir,
            coordinators: Vec::new(),
            coordinator_addrs,
            nodes: Vec::new(),
            node_addrs: Vec::new(),
            spec: spec.clone(),
            bins,
        };
        for i in 0..spec.coordinators {
            let p = c.coordinator_proc(i as u64 + 1, &c.coordinator_addrs[i].clone(), false);
            c.coordinators.push(p);
        }
        let coord = c.coord();
        let replicas = spec.replicas;
        coord
            .call(|mut cl| async move {
                cl.set_replication(SetReplicationRequest {
                    replicas,
                    write_quorum: 0,
                })
                .await
            })
            .await
            .expect("set replication");
        for _ in 0..spec.nodes {
            c.add_node().await;
        }
        c
    }

    /// Process for coordinator `id` at `addr` (`join`: never bootstrap).
    pub fn coordinator_proc(&self, id: u64, addr: &str, join: bool) -> Proc {
        let mut args = vec![
            "--id".to_string(),
            id.to_string(),
            "--listen".into(),
            addr.to_string(),
            "--data-dir".into(),
            self.dir
                .path()
                .join(format!("coordinator-{id}"))
                .display()
                .to_string(),
            "--snapshot-logs".into(),
            self.spec.snapshot_logs.to_string(),
            "--node-down-ms".into(),
            self.spec.node_down_ms.to_string(),
            "--node-out-ms".into(),
            self.spec.node_out_ms.to_string(),
        ];
        if join {
            args.push("--join".into());
        } else {
            for (i, a) in self.coordinator_addrs.iter().enumerate() {
                args.push("--peer".into());
                args.push(format!("{}={a}", i + 1));
            }
        }
        Proc::start(
            format!("coordinator-{id}"),
            self.bins.join("cairn-coordinator"),
            args,
            self.dir.path().join(format!("logs/coordinator-{id}.log")),
        )
    }

    /// Starts one more storage node and waits until it is Active.
    pub async fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let addr = format!("127.0.0.1:{}", free_port());
        let args = vec![
            "--listen".to_string(),
            addr.clone(),
            "--data-dir".into(),
            self.node_dir(i).display().to_string(),
            "--coordinator".into(),
            self.coordinator_addrs.join(","),
            "--zone".into(),
            format!("zone-{}", i % self.spec.zones.max(1)),
            "--heartbeat-ms".into(),
            "300".into(),
            "--resync-ms".into(),
            self.spec.resync_ms.to_string(),
            "--scrub-ms".into(),
            self.spec.scrub_ms.to_string(),
            // One secret per test cluster: forwarded puts take the CRC-32 path.
            "--cluster-secret".into(),
            self.cluster_secret(),
        ];
        self.nodes.push(Proc::start(
            format!("node-{i}"),
            self.bins.join("cairn-storage-node"),
            args,
            self.dir.path().join(format!("logs/node-{i}.log")),
        ));
        self.node_addrs.push(addr.clone());
        let coord = self.coord();
        wait_for("storage node to register", Duration::from_secs(60), || {
            let coord = &coord;
            let addr = addr.clone();
            async move {
                let nodes = coord
                    .call(|mut c| async move { c.list_nodes(ListNodesRequest {}).await })
                    .await
                    .ok()?;
                nodes
                    .nodes
                    .iter()
                    .any(|n| n.address == addr && n.state == NodeState::Active as i32)
                    .then_some(())
            }
        })
        .await;
        i
    }

    /// Data directory of node `i`.
    /// The secret its storage nodes share (`--cluster-secret`).
    pub fn cluster_secret(&self) -> String {
        format!("test cluster {}", self.dir.path().display())
    }

    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node-{i}"))
    }

    /// A coordinator client that follows the leader.
    pub fn coord(&self) -> CoordClient {
        CoordClient::new(self.coordinator_addrs.clone())
            .unwrap()
            .with_deadline(Duration::from_secs(60))
    }

    /// Status as coordinator `i` (0-based) sees it.
    pub async fn status_of(&self, i: usize) -> Option<ClusterStatusReply> {
        let c = CoordClient::new(vec![self.coordinator_addrs[i].clone()])
            .ok()?
            .with_deadline(Duration::from_millis(500));
        c.call(|mut c| async move { c.cluster_status(ClusterStatusRequest {}).await })
            .await
            .ok()
    }

    /// Waits for a leader among the running coordinators; returns its 0-based index.
    pub async fn leader(&mut self) -> usize {
        let running: Vec<bool> = self.coordinators.iter_mut().map(|c| c.running()).collect();
        let this = &*self;
        wait_for("a coordinator leader", Duration::from_secs(30), || {
            let running = running.clone();
            async move {
                for (i, up) in running.iter().enumerate() {
                    if !up {
                        continue;
                    }
                    if let Some(s) = this.status_of(i).await {
                        if s.state == "Leader" {
                            return Some(i);
                        }
                    }
                }
                None
            }
        })
        .await
    }

    /// A client for storage node `i`.
    pub fn node_client(&self, i: usize) -> ChunkStoreClient<tonic::transport::Channel> {
        let ch = cairn_proto::coord_client::endpoint(&self.node_addrs[i])
            .unwrap()
            .connect_lazy();
        ChunkStoreClient::new(ch)
            .max_decoding_message_size(cairn_proto::MAX_MESSAGE_SIZE)
            .max_encoding_message_size(cairn_proto::MAX_MESSAGE_SIZE)
    }

    /// Node `i`'s stats (admin RPC).
    pub async fn node_stats(&self, i: usize) -> Option<NodeStatsReply> {
        let mut c = self.node_client(i);
        tokio::time::timeout(Duration::from_secs(2), c.node_stats(NodeStatsRequest {}))
            .await
            .ok()?
            .ok()
            .map(|r| r.into_inner())
    }

    /// Chunk ids node `i` holds (admin RPC).
    pub async fn node_chunks(&self, i: usize) -> Option<Vec<ChunkId>> {
        let mut c = self.node_client(i);
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            c.list_chunks(ListChunksRequest {
                partition_start: 0,
                partition_end: 0,
            }),
        )
        .await
        .ok()?
        .ok()?;
        Some(
            r.into_inner()
                .ids
                .iter()
                .map(|b| ChunkId::from_slice(b).unwrap())
                .collect(),
        )
    }

    /// Runs the `cairn` CLI against this cluster.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_env(args, &[])
    }

    /// Runs the `cairn` CLI with extra environment.
    pub fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(self.bins.join("cairn"));
        cmd.args(args)
            .env("CAIRN_COORDINATOR", self.coordinator_addrs.join(","))
            .env("CAIRN_PASSWORD", PASSWORD)
            .env("XDG_CONFIG_HOME", self.dir.path().join("xdg"))
            .env_remove("CAIRN_CONFIG")
            .env_remove("CAIRN_PASSWORD_FILE")
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("running cairn")
    }

    /// Runs the CLI with `--json` and parses its output; panics with stderr on failure.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.cli(&a);
        assert!(
            out.status.success(),
            "cairn {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "cairn {args:?}: bad JSON {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// A library handle on the `default` tenant (created if needed).
    pub async fn repo(&self) -> cairn_client::Repository {
        let cluster = cairn_client::Cluster::connect(self.coordinator_addrs.clone())
            .await
            .unwrap();
        match cairn_client::Repository::open(cluster.clone(), "default", PASSWORD.as_bytes()).await
        {
            Ok(r) => r,
            Err(cairn_client::Error::NoTenant(_)) => cairn_client::Repository::init_with_kdf(
                cluster,
                "default",
                PASSWORD.as_bytes(),
                "argon2id:m=8192,t=1,p=1",
            )
            .await
            .unwrap(),
            Err(e) => panic!("{e}"),
        }
    }
}

pub mod docker;
pub mod fixtures;

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in self.coordinators.iter().chain(&self.nodes) {
                let log = p.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- last lines of {} ----", p.name);
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// Shares a value between a test and its background tasks.
pub type Shared<T> = Arc<std::sync::Mutex<T>>;
