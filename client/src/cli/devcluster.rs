//! `cairn dev-cluster`: a local cluster on 127.0.0.1 from the sibling binaries, in the
//! foreground. Data lives under one directory; restarting with the same directory restarts the
//! same cluster. It writes a CLI config (and makes it the default unless the user has their own)
//! and, on first start, creates the tenant `default` with a generated password.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cairn_client::{Cluster, Repository};
use cairn_proto::coord_client::CoordClient;
use cairn_proto::metadata::{ClusterStatusRequest, ListNodesRequest, SetReplicationRequest};
use cairn_proto::types::NodeState;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::config::DEV_MARKER;

/// Options of `dev-cluster`.
pub struct DevOptions {
    pub dir: PathBuf,
    pub coordinators: usize,
    pub nodes: usize,
    pub replicas: Option<u32>,
    pub zones: usize,
}

#[derive(Serialize, Deserialize)]
struct State {
    coordinators: Vec<String>,
}

/// `n` distinct free ports: every listener is held until all are chosen, since a port released
/// at once can be handed out again by the next bind.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(held
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<_>>()?)
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe
        .parent()
        .context("executable has no directory")?
        .join(name);
    if !p.exists() {
        bail!(
            "{} not found next to {} (build the whole workspace: cargo build --release)",
            name,
            exe.display()
        );
    }
    Ok(p)
}

struct Proc {
    name: String,
    child: Child,
}

fn spawn(
    name: &str,
    bin: &Path,
    args: &[String],
    env: &[(&str, &str)],
    log: &Path,
) -> anyhow::Result<Proc> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new(bin)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Proc {
        name: name.to_string(),
        child,
    })
}

fn stop_all(procs: &mut [Proc]) {
    for p in procs.iter().rev() {
        let _ = kill(Pid::from_raw(p.child.id() as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for p in procs.iter_mut().rev() {
        loop {
            match p.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// Runs the dev cluster until Ctrl-C.
pub async fn run(o: DevOptions, json: bool) -> anyhow::Result<()> {
    if o.coordinators == 0 || o.nodes == 0 {
        bail!("a dev cluster needs at least one coordinator and one storage node");
    }
    let coord_bin = sibling("cairn-coordinator")?;
    let node_bin = sibling("cairn-storage-node")?;
    std::fs::create_dir_all(o.dir.join("logs"))?;
    let dir = std::fs::canonicalize(&o.dir)?;
    let state_path = dir.join("cluster.toml");
    let state: State = match std::fs::read_to_string(&state_path) {
        Ok(s) => toml::from_str(&s).context("reading cluster.toml")?,
        Err(_) => State {
            coordinators: free_ports(o.coordinators)?
                .into_iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect(),
        },
    };
    std::fs::write(&state_path, toml::to_string(&state)?)?;
    let peers: Vec<String> = state
        .coordinators
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect();
    let mut procs = Vec::new();
    let result = async {
        for (i, addr) in state.coordinators.iter().enumerate() {
            let id = i + 1;
            let mut args = vec![
                "--id".into(),
                id.to_string(),
                "--listen".into(),
                addr.clone(),
                "--data-dir".into(),
                dir.join(format!("coordinator-{id}")).display().to_string(),
            ];
            for p in &peers {
                args.push("--peer".into());
                args.push(p.clone());
            }
            procs.push(spawn(&format!("coordinator-{id}"), &coord_bin, &args, &[], &dir.join(format!("logs/coordinator-{id}.log")))?);
        }
        let coord = CoordClient::new(state.coordinators.clone())?.with_deadline(Duration::from_secs(60));
        let status = coord.call(|mut c| async move { c.cluster_status(ClusterStatusRequest {}).await }).await?;
        let replicas = o.replicas.unwrap_or(3.min(o.nodes as u32));
        if status.replicas != replicas {
            coord
                .call(|mut c| async move { c.set_replication(SetReplicationRequest { replicas, write_quorum: 0 }).await })
                .await?;
        }
        let joined = state.coordinators.join(",");
        let secret = hex::encode(rand::random::<[u8; 16]>());
        for j in 1..=o.nodes {
            let args = vec![
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--data-dir".into(),
                dir.join(format!("node-{j}")).display().to_string(),
                "--coordinator".into(),
                joined.clone(),
                "--zone".into(),
                format!("zone-{}", (j - 1) % o.zones.max(1) + 1),
            ];
            procs.push(spawn(
                &format!("node-{j}"),
                &node_bin,
                &args,
                // In the environment: a command line is readable by every user.
                &[("CAIRN_CLUSTER_SECRET", &secret)],
                &dir.join(format!("logs/node-{j}.log")),
            )?);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let nodes = coord.call(|mut c| async move { c.list_nodes(ListNodesRequest {}).await }).await?;
            let active = nodes
                .nodes
                .iter()
                .filter(|n| n.state == NodeState::Active as i32 && n.heartbeat_age_ms.is_some_and(|a| a < 5000))
                .count();
            // A process that exited (a coordinator whose port was taken, say) fails the start
            // even if the rest reached quorum without it.
            for p in procs.iter_mut() {
                if let Ok(Some(st)) = p.child.try_wait() {
                    bail!("{} exited ({st}); see {}/logs/{}.log", p.name, dir.display(), p.name);
                }
            }
            if active >= o.nodes {
                break;
            }
            if Instant::now() > deadline {
                bail!("storage nodes did not become active; see {}/logs", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Tenant and CLI configuration.
        let pw_path = dir.join("password");
        if !pw_path.exists() {
            std::fs::write(&pw_path, hex::encode(rand::random::<[u8; 16]>()))?;
        }
        let cfg_path = dir.join("cairn.toml");
        let cfg = format!(
            "{DEV_MARKER}\ncoordinator = [{}]\ntenant = \"default\"\npassword-file = \"{}\"\n",
            state.coordinators.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", "),
            pw_path.display()
        );
        std::fs::write(&cfg_path, &cfg)?;
        if let Some(user) = super::config::default_path() {
            let ours = std::fs::read_to_string(&user).map(|s| s.starts_with(DEV_MARKER)).unwrap_or(true);
            if ours {
                std::fs::create_dir_all(user.parent().expect("config dir"))?;
                std::fs::write(&user, &cfg)?;
            }
        }
        let cluster = Cluster::connect(state.coordinators.clone()).await?;
        let pw = std::fs::read(&pw_path)?;
        match Repository::open(cluster.clone(), "default", &pw).await {
            Ok(_) => {}
            Err(cairn_client::Error::NoTenant(_)) => {
                Repository::init(cluster, "default", &pw).await?;
            }
            Err(e) => return Err(e.into()),
        }
        if json {
            println!(
                "{}",
                serde_json::json!({"ready": true, "coordinators": state.coordinators, "nodes": o.nodes, "replicas": replicas, "config": cfg_path, "dir": dir})
            );
        } else {
            println!("dev cluster ready: {} coordinators, {} storage nodes, R={replicas}", state.coordinators.len(), o.nodes);
            println!("  data and logs: {}", dir.display());
            println!("  the cairn CLI finds it through: export CAIRN_CONFIG={}", cfg_path.display());
            println!("  tenant 'default' is unlocked by {}", pw_path.display());
            println!("  press Ctrl-C to stop");
        }
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return Ok(()),
                _ = term.recv() => return Ok(()),
                _ = tick.tick() => {
                    for p in procs.iter_mut() {
                        if let Ok(Some(st)) = p.child.try_wait() {
                            bail!("{} exited ({st}); see {}/logs/{}.log", p.name, dir.display(), p.name);
                        }
                    }
                }
            }
        }
    }
    .await;
    eprintln!("stopping the dev cluster");
    stop_all(&mut procs);
    result
}
