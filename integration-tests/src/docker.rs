//! Harness for the multi-host docker suite: a compose project of `deploy/docker-compose.yml`
//! (3 coordinators, 5 storage nodes in 2 zones, each container with its own address), faults
//! through the docker engine (kill, network disconnect, pause, restart, volume removal, tc), and
//! a client workload that loops backup and restore from the host and remembers what every
//! acknowledged snapshot must contain. Projects are removed with their volumes on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::fixtures::random_bytes;

/// Whether the docker suite should run (`CAIRN_DOCKER_TESTS=1`, set by `.ci/run` when an engine
/// and the `cairn:local` image are there).
pub fn enabled() -> bool {
    if std::env::var("CAIRN_DOCKER_TESTS").as_deref() == Ok("1") {
        return true;
    }
    eprintln!("docker suite skipped: set CAIRN_DOCKER_TESTS=1 (needs a Docker engine and deploy/build-images.sh)");
    false
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Runs `docker ARGS`, panicking with its output on failure.
pub fn docker(args: &[&str]) -> String {
    let out = run(Command::new("docker").args(args));
    assert!(
        out.status.success(),
        "docker {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A running compose project.
pub struct Compose {
    /// Project name.
    pub project: String,
    /// First three octets of the subnet.
    pub net: String,
    env: Vec<(String, String)>,
    /// Scratch space (workload data, restores).
    pub dir: tempfile::TempDir,
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

impl Compose {
    /// Starts a project with extra environment (e.g. `CAIRN_TEST_NODE_OUT_MS`) and waits until
    /// all five storage nodes are Active.
    pub fn up(env: &[(&str, &str)]) -> Self {
        let mut last = String::new();
        for _ in 0..6 {
            let project = format!("cairnt{}", hex::encode(rand::random::<[u8; 4]>()));
            let net = format!("172.31.{}", 100 + rand::random::<u8>() % 150);
            let mut e: Vec<(String, String)> = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            e.push(("CAIRN_NET".into(), net.clone()));
            let c = Self {
                project,
                net,
                env: e,
                dir: tempfile::tempdir().unwrap(),
            };
            let out = c.compose(&["up", "-d"]);
            if out.status.success() {
                c.wait_nodes_active(5, Duration::from_secs(120));
                return c;
            }
            last = String::from_utf8_lossy(&out.stderr).to_string();
            let _ = c.compose(&["down", "-v", "--remove-orphans", "-t", "1"]);
        }
        panic!("docker-compose up failed: {last}");
    }

    fn compose(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("docker-compose");
        cmd.arg("-p")
            .arg(&self.project)
            .arg("-f")
            .arg(deploy_dir().join("docker-compose.yml"))
            .args(args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        run(&mut cmd)
    }

    /// The container of a service (`coord1`, `node3`, ...).
    pub fn container(&self, svc: &str) -> String {
        format!("{}_{svc}_1", self.project)
    }

    /// The network's docker name.
    pub fn network(&self) -> String {
        format!("{}_cairn", self.project)
    }

    /// A service's address on the network.
    pub fn ip(&self, svc: &str) -> String {
        let host = match svc {
            "coord1" => 11,
            "coord2" => 12,
            "coord3" => 13,
            s => {
                20 + s
                    .trim_start_matches("node")
                    .parse::<u32>()
                    .expect("service name")
            }
        };
        format!("{}.{host}", self.net)
    }

    /// Coordinator addresses for the CLI.
    pub fn coordinators(&self) -> String {
        ["coord1", "coord2", "coord3"]
            .map(|s| format!("{}:7000", self.ip(s)))
            .join(",")
    }

    /// Runs the host's `cairn` against the project.
    pub fn cli(&self, args: &[&str]) -> Output {
        run(Command::new(crate::bin_dir().join("cairn"))
            .arg("--json")
            .args(args)
            .env("CAIRN_COORDINATOR", self.coordinators())
            .env("CAIRN_PASSWORD", crate::PASSWORD)
            .env("XDG_CONFIG_HOME", self.dir.path().join("xdg"))
            .env_remove("CAIRN_CONFIG"))
    }

    /// Runs the CLI and parses its JSON, panicking on failure.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "cairn {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The CLI's JSON if it succeeds.
    pub fn try_json(&self, args: &[&str]) -> Option<serde_json::Value> {
        let out = self.cli(args);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// Polls `cond` every 200 ms until it holds, or panics after `timeout`.
    pub fn wait(&self, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until `cairn check` finds no chunk missing and none below R.
    pub fn wait_redundancy(&self, timeout: Duration) {
        self.wait("every chunk back at R", timeout, || {
            self.try_json(&["check"]).is_some_and(|r| {
                r["under_replicated"] == 0 && r["missing"].as_array().is_some_and(|m| m.is_empty())
            })
        });
    }

    /// Waits until `n` storage nodes are Active and heard from.
    pub fn wait_nodes_active(&self, n: usize, timeout: Duration) {
        self.wait("storage nodes to be active", timeout, || {
            self.try_json(&["cluster", "nodes"]).is_some_and(|v| {
                v.as_array()
                    .unwrap()
                    .iter()
                    .filter(|x| {
                        x["state"] == "Active"
                            && x["heartbeat_age_ms"].as_u64().is_some_and(|a| a < 5000)
                    })
                    .count()
                    >= n
            })
        });
    }

    /// The service name of the current coordinator leader.
    pub fn leader(&self) -> String {
        let mut svc = String::new();
        self.wait("a leader", Duration::from_secs(60), || {
            match self
                .try_json(&["cluster", "status"])
                .and_then(|s| s["leader"].as_u64())
            {
                Some(id) => {
                    svc = format!("coord{id}");
                    true
                }
                None => false,
            }
        });
        svc
    }

    /// Disconnects a service from the network (a partition of that host).
    pub fn disconnect(&self, svc: &str) {
        docker(&[
            "network",
            "disconnect",
            &self.network(),
            &self.container(svc),
        ]);
    }

    /// Reconnects it with its address.
    pub fn connect(&self, svc: &str) {
        docker(&[
            "network",
            "connect",
            "--ip",
            &self.ip(svc),
            &self.network(),
            &self.container(svc),
        ]);
    }

    /// Where a volume's files are on the host.
    pub fn volume_path(&self, vol: &str) -> PathBuf {
        PathBuf::from(docker(&[
            "volume",
            "inspect",
            "-f",
            "{{.Mountpoint}}",
            &format!("{}_{vol}", self.project),
        ]))
    }

    /// Brings the tenant up.
    pub fn init(&self) {
        let out = self.cli(&["init"]);
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.compose(&["logs", "--no-color", "--tail", "30"]);
            eprintln!("{}", String::from_utf8_lossy(&logs.stdout));
        }
        let _ = self.compose(&["down", "-v", "--remove-orphans", "-t", "2"]);
    }
}

/// An acknowledged snapshot and a copy of what it must contain.
#[derive(Debug, Clone)]
pub struct Acked {
    /// Snapshot id.
    pub id: String,
    /// Copy of the source directory when it was taken.
    pub copy: PathBuf,
}

/// A client looping backup (and restore) while faults happen.
pub struct Workload {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    handle: Option<JoinHandle<()>>,
    /// The backed-up directory.
    pub src: PathBuf,
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// Compares the files (names and bytes) of two trees.
pub fn same_content(a: &Path, b: &Path) -> Result<(), String> {
    let list = |root: &Path| {
        let mut v = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))? {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    v.push((
                        p.strip_prefix(root).unwrap().to_path_buf(),
                        *blake3::hash(&std::fs::read(&p).unwrap()).as_bytes(),
                    ));
                }
            }
        }
        v.sort();
        Ok::<_, String>(v)
    };
    let (x, y) = (list(a)?, list(b)?);
    if x == y {
        Ok(())
    } else {
        Err(format!("{} and {} differ", a.display(), b.display()))
    }
}

impl Workload {
    /// Starts looping: change a file, back up, remember the acknowledged snapshot.
    pub fn start(c: &Compose) -> Self {
        let src = c.dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        let versions = c.dir.path().join("versions");
        let (stop, acked) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(Mutex::new(Vec::new())),
        );
        let (s, a) = (stop.clone(), acked.clone());
        let bin = crate::bin_dir().join("cairn");
        let coords = c.coordinators();
        let xdg = c.dir.path().join("xdg");
        let src2 = src.clone();
        let handle = std::thread::spawn(move || {
            let mut i: u64 = 0;
            while !s.load(Ordering::Relaxed) {
                let f = src2.join(format!("file{}", i % 6));
                std::fs::write(&f, random_bytes(i, 200_000 + (i as usize % 5) * 300_000)).unwrap();
                let out = Command::new(&bin)
                    .args(["--json", "backup"])
                    .arg(&src2)
                    .env("CAIRN_COORDINATOR", &coords)
                    .env("CAIRN_PASSWORD", crate::PASSWORD)
                    .env("XDG_CONFIG_HOME", &xdg)
                    .output()
                    .unwrap();
                if out.status.success() {
                    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                    let id = v["snapshot"].as_str().unwrap().to_string();
                    let copy = versions.join(&id);
                    copy_dir(&src2, &copy);
                    a.lock().unwrap().push(Acked { id, copy });
                }
                i += 1;
            }
        });
        Self {
            stop,
            acked,
            handle: Some(handle),
            src,
        }
    }

    /// Acknowledged snapshots so far.
    pub fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits for `n` more acknowledged backups.
    pub fn wait_more(&self, c: &Compose, n: usize, timeout: Duration) {
        let target = self.count() + n;
        c.wait(&format!("{n} more acknowledged backups"), timeout, || {
            self.count() >= target
        });
    }

    /// Stops the loop and checks that every acknowledged snapshot restores ([`verify`]).
    pub fn finish(self, c: &Compose) {
        let src = self.src.clone();
        let acked = self.stop();
        verify(c, &acked, &src);
    }

    /// Stops the loop and returns what was acknowledged.
    pub fn stop(mut self) -> Vec<Acked> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        self.acked.lock().unwrap().clone()
    }
}

/// Every acknowledged snapshot is in the catalog and restores byte-identical.
pub fn verify(c: &Compose, acked: &[Acked], src: &Path) {
    assert!(!acked.is_empty(), "the workload acknowledged no backup");
    let list = c.cli_json(&["snapshots"]);
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    for a in acked {
        assert!(
            ids.contains(&a.id.as_str()),
            "acknowledged snapshot {} lost from the catalog",
            a.id
        );
        let target = c.dir.path().join("restore").join(&a.id);
        let out = c.cli(&[
            "restore",
            &a.id,
            "--target",
            target.to_str().unwrap(),
            "--verify",
        ]);
        assert!(
            out.status.success(),
            "restore {}: {}",
            a.id,
            String::from_utf8_lossy(&out.stderr)
        );
        same_content(&a.copy, &target.join(src.strip_prefix("/").unwrap())).unwrap();
    }
}
