//! `cairn-bench`: Cairn against restic on the same generated data, alternating, several runs.
//!
//! ```sh
//! cargo build --release --workspace && cargo run --release -p cairn-bench -- --size-gb 3.5 --runs 3
//! ```
//!
//! For each run, both tools get a fresh repository (Cairn: a fresh local dev cluster of 3
//! storage nodes with R=3, encryption and compression on; restic: a local repository on the
//! same disk) and do: first backup, backup with no change, backup after changing 1% of the
//! files (appends, inserts at the start, in-place overwrites), full restore, check --read-data.
//! It records wall time, CPU seconds (for Cairn: the client plus every cluster process), the
//! client's peak memory and the repository size, then prints medians and Cairn/restic ratios
//! against the targets and writes them as markdown and JSON into `--out`.
//!
//! Nothing is deleted between the measured steps: each run's dataset is rewritten in place and
//! the restored trees are kept until every run is done (about 3.5 GB per tool and run). Where the
//! file system has no journal, ext4 passes over inodes freed in the last minutes when it
//! allocates new ones, so deleting 100k files just before would slow whichever tool restores next.
//! For the same reason, trees left by an interrupted invocation are renamed out of the way and
//! deleted only at the end, and an invocation started within 6 minutes of another's removal of
//! its trees first waits for those minutes to pass (it says so).
//!
//! Before each restore and each `check --read-data`, the repository's files (restic's
//! repository; the cluster's data directories) and every tree restored so far are dropped from
//! the page cache (`POSIX_FADV_DONTNEED`; the steps before were synced): a restore reads a
//! repository that is not in memory, as after a loss, and each tool's restores start with the
//! same free memory rather than with the earlier runs' restored trees to reclaim. The dataset
//! stays cached, so every first backup reads it from memory.
//!
//! Then (unless `--growth 0`) it checks that the client's memory stays flat as a repository
//! grows: both tools back up `--growth` differently seeded datasets of the same size into one
//! repository each, and the peak memory of every backup is reported (1× … N× the data).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;

#[derive(Parser)]
#[command(about = "Cairn against restic on the same data")]
struct Args {
    /// Approximate dataset size in GB.
    #[arg(long, default_value_t = 3.5)]
    size_gb: f64,
    /// Runs per tool (alternating).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Working directory (dataset, repositories, restores).
    #[arg(long, default_value = "target/bench-work")]
    work: PathBuf,
    /// Where the results go.
    #[arg(long, default_value = "bench/out")]
    out: PathBuf,
    /// Backups of new data into one growing repository for the memory-flatness check
    /// (peak client memory at 1× and at this many times the data); 0 skips it.
    #[arg(long, default_value_t = 4)]
    growth: u32,
}

const PASSWORD: &str = "bench password";

// ---------- dataset ----------

fn text(r: &mut impl Rng, len: usize) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "the", "backup", "cluster", "of", "storage", "nodes", "restores", "every", "snapshot",
        "config", "value", "=", "true", "error", "INFO", "\n",
    ];
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        v.extend_from_slice(WORDS[r.gen_range(0..WORDS.len())].as_bytes());
        v.push(if r.gen_bool(0.1) { b'\n' } else { b' ' });
        if r.gen_bool(0.05) {
            v.extend_from_slice(format!("{}", r.gen::<u32>()).as_bytes());
        }
    }
    v.truncate(len);
    v
}

/// Writes the dataset: ~100k text-like files of realistic sizes in a nested tree (scaled with
/// the size), one incompressible file and one partly compressible binary file.
/// The seed decides the content and the file names; the shape is the same for every seed.
/// With `rewrite`, writes it again even if it is there (over the same files, in place).
fn generate_seeded(dir: &Path, size_gb: f64, seed: u64, rewrite: bool) -> Result<u64> {
    let marker = dir.join(".generated");
    let spec = format!("v2 {size_gb} {seed}");
    let last = std::fs::read_to_string(&marker).ok();
    if !rewrite && last.as_deref() == Some(spec.as_str()) {
        return dir_size(dir);
    }
    // The same dataset again (after a 1% change) is rewritten in place: on a file system without
    // a journal, ext4 passes over inodes freed in the last minutes when it allocates new ones, so
    // deleting 100k files would slow whichever tool restores next.
    let _ = std::fs::remove_file(&marker);
    if dir.exists() && last.as_deref() != Some(spec.as_str()) {
        std::fs::remove_dir_all(dir)?;
    }
    let total = (size_gb * 1e9) as u64;
    let small_budget = total * 35 / 100;
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut written = 0u64;
    let mut i = 0u64;
    while written < small_budget {
        // Log-uniform sizes from 100 B to 120 KB (median about 3.5 KB, mean about 12 KB).
        let len = (100.0 * (1200f64).powf(r.gen::<f64>())) as usize;
        // About 50 files per directory, three levels deep.
        let d = dir.join(format!(
            "src/d{:02}/e{:02}/f{:02}",
            (i / 20_000) % 37,
            (i / 1_000) % 20,
            (i / 50) % 20
        ));
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(format!("file{seed}-{i}.txt")), text(&mut r, len))?;
        written += len as u64;
        i += 1;
    }
    let big = (total - written) / 2;
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("random.bin"))?);
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..big >> 20 {
        r.fill_bytes(&mut buf);
        f.write_all(&buf)?;
    }
    drop(f);
    // Partly compressible: random blocks, zero runs and repeated structures.
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("mixed.bin"))?);
    for k in 0..big >> 20 {
        match k % 4 {
            0 => r.fill_bytes(&mut buf),
            1 => buf.iter_mut().for_each(|b| *b = 0),
            2 => buf
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (j % 251) as u8 ^ (k as u8)),
            _ => {
                r.fill_bytes(&mut buf[..1 << 18]);
                let (a, rest) = buf.split_at_mut(1 << 18);
                for c in rest.chunks_mut(1 << 18) {
                    c.copy_from_slice(&a[..c.len()]);
                }
            }
        }
        f.write_all(&buf)?;
    }
    drop(f);
    std::fs::write(&marker, spec)?;
    eprintln!(
        "generated {i} small files and two large ones in {}",
        dir.display()
    );
    dir_size(dir)
}

/// Changes 1% of the files: appends, inserts at the start and in-place overwrites in turn.
fn change_one_percent(dir: &Path, round: u64) -> Result<usize> {
    let mut files = Vec::new();
    let mut stack = vec![dir.join("src")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p)
            } else {
                files.push(p)
            }
        }
    }
    files.sort();
    let mut r = rand::rngs::StdRng::seed_from_u64(1000 + round);
    let mut n = 0;
    for (k, p) in files.iter().enumerate().filter(|(k, _)| k % 100 == 7) {
        let mut data = std::fs::read(p)?;
        let patch = text(&mut r, 1024);
        match k % 3 {
            0 => data.extend_from_slice(&patch),
            1 => {
                data.splice(0..0, patch);
            }
            _ => {
                let at = data.len() / 2;
                let end = (at + patch.len()).min(data.len());
                data[at..end].copy_from_slice(&patch[..end - at]);
            }
        };
        std::fs::write(p, data)?;
        n += 1;
    }
    Ok(n)
}

fn dir_size(p: &Path) -> Result<u64> {
    du(p, "-sb")
}

/// Bytes a directory takes on disk (allocated blocks, as `du -s -B1`): the storage node's index
/// journal is preallocated as a sparse file, so its apparent size overstates it.
fn disk_usage(p: &Path) -> Result<u64> {
    du(p, "-sB1")
}

fn du(p: &Path, flag: &str) -> Result<u64> {
    let out = Command::new("du").arg(flag).arg(p).output()?;
    let s = String::from_utf8_lossy(&out.stdout);
    Ok(s.split_whitespace()
        .next()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0))
}

// ---------- restored trees ----------

/// How long ext4 without a journal passes over freed inodes when it allocates new ones: 60 s
/// after the deletion, or 360 s while the inode's table block is still dirty
/// (`recently_deleted` in `fs/ext4/ialloc.c`). Restores made within it create their files
/// several times slower.
const RECENTLY_DELETED: Duration = Duration::from_secs(360);

/// Written when restored trees were removed, to time [`RECENTLY_DELETED`] from.
const REMOVED_MARKER: &str = ".restores-removed";

/// Moves restored trees left by an interrupted invocation out of the way (a rename frees no
/// inode); [`remove_restores`] deletes them once every restore has been measured.
fn set_aside_restores(work: &Path) -> Result<()> {
    let old = work.join("restores");
    if old.exists() {
        let stale = work.join(format!("restores-stale-{}", std::process::id()));
        std::fs::rename(&old, &stale)?;
        eprintln!("restored trees of an interrupted run set aside, to be removed at the end");
    }
    Ok(())
}

/// Removes every restored tree, this invocation's and those set aside, and notes when.
fn remove_restores(work: &Path) -> Result<()> {
    for e in std::fs::read_dir(work)?.flatten() {
        if e.file_name().to_string_lossy().starts_with("restores") {
            std::fs::remove_dir_all(e.path())?;
        }
    }
    std::fs::write(work.join(REMOVED_MARKER), b"")?;
    Ok(())
}

/// Waits until the last removal of restored trees (by an invocation just before this one) is
/// [`RECENTLY_DELETED`] old, so that this invocation's restores do not pay for it.
fn wait_out_recent_deletions(work: &Path) {
    let age = std::fs::metadata(work.join(REMOVED_MARKER))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok());
    if let Some(left) = age.and_then(|a| RECENTLY_DELETED.checked_sub(a)) {
        eprintln!(
            "waiting {} s: the last run removed its restored trees {} s ago, and ext4 creates files slowly next to inodes freed that recently",
            left.as_secs(),
            RECENTLY_DELETED.saturating_sub(left).as_secs()
        );
        std::thread::sleep(left);
    }
}

// ---------- measuring ----------

/// Drops every regular file under `roots` from the page cache (after a `sync`, so no page is
/// dirty). Files that vanish meanwhile are skipped.
fn evict(roots: &[&Path]) -> Result<()> {
    if !Command::new("sync").status()?.success() {
        bail!("sync failed");
    }
    let mut stack: Vec<PathBuf> = roots.iter().map(|r| r.to_path_buf()).collect();
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            for e in std::fs::read_dir(&p)?.flatten() {
                stack.push(e.path());
            }
        } else if meta.is_file() {
            let Ok(f) = std::fs::File::open(&p) else {
                continue;
            };
            nix::fcntl::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            )
            .with_context(|| format!("posix_fadvise {}", p.display()))?;
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Measure {
    wall_s: f64,
    cpu_s: f64,
    peak_rss_kb: u64,
}

/// Runs a command under GNU time; returns wall, CPU and peak RSS of the command. Dirty pages
/// left by the step before (a restore, the dataset written again) are flushed first, so the
/// kernel's write-back of one step does not run on the CPU time of the next.
fn timed(cmd: &mut Command) -> Result<Measure> {
    let synced = Command::new("sync").status()?;
    if !synced.success() {
        bail!("sync failed");
    }
    let tf = std::env::temp_dir().join(format!("cairn-bench-time-{}", std::process::id()));
    let prog = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let envs: Vec<_> = cmd
        .get_envs()
        .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
        .collect();
    let mut t = Command::new("/usr/bin/time");
    t.arg("-f")
        .arg("%e %U %S %M")
        .arg("-o")
        .arg(&tf)
        .arg(&prog)
        .args(&args);
    for (k, v) in envs {
        match v {
            Some(v) => t.env(k, v),
            None => t.env_remove(k),
        };
    }
    let out = t.stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
    if !out.status.success() && out.status.code() != Some(3) {
        bail!(
            "{:?} failed: {}",
            prog,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let s = std::fs::read_to_string(&tf)?;
    let v: Vec<f64> = s
        .lines()
        .last()
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() != 4 {
        bail!("could not read GNU time output: {s}");
    }
    Ok(Measure {
        wall_s: v[0],
        cpu_s: v[1] + v[2],
        peak_rss_kb: v[3] as u64,
    })
}

/// CPU seconds used so far by a process and all its descendants.
fn tree_cpu(root: u32) -> f64 {
    let tick = 100.0;
    let mut total = 0.0;
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut cpu: BTreeMap<u32, f64> = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ppid: u32 = f.get(1).and_then(|x| x.parse().ok()).unwrap_or(0);
            let ut: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0);
            let st: f64 = f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
            children.entry(ppid).or_default().push(pid);
            cpu.insert(pid, (ut + st) / tick);
        }
    }
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        total += cpu.get(&p).copied().unwrap_or(0.0);
        if let Some(c) = children.get(&p) {
            stack.extend(c);
        }
    }
    total
}

// ---------- the two tools ----------

#[derive(Debug, Clone, Default, Serialize)]
struct Run {
    first_backup: Measure,
    nochange_backup: Measure,
    change_backup: Measure,
    restore: Measure,
    check_read_data: Measure,
    repo_bytes: u64,
    /// CPU of the first backup including server processes (Cairn: client + cluster).
    first_backup_total_cpu_s: f64,
}

struct DevCluster {
    child: Child,
    config: PathBuf,
}

impl DevCluster {
    fn start(bin: &Path, dir: &Path) -> Result<Self> {
        let mut child = Command::new(bin.join("cairn"))
            .args(["dev-cluster", "--dir"])
            .arg(dir)
            .env("XDG_CONFIG_HOME", dir.join("xdg"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("dev-cluster stdout")?;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("dev cluster ready") => break,
                Some(_) if Instant::now() < deadline => {}
                _ => bail!("dev cluster did not start; see {}/logs", dir.display()),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Ok(Self {
            child,
            config: dir.join("cairn.toml"),
        })
    }
    fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn cairn_run(bin: &Path, work: &Path, data: &Path, round: u64) -> Result<Run> {
    let dir = work.join("cairn-cluster");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let cluster = DevCluster::start(bin, &dir)?;
    let cli = || {
        let mut c = Command::new(bin.join("cairn"));
        c.env("CAIRN_CONFIG", &cluster.config).arg("--quiet");
        c
    };
    let mut r = Run::default();
    let before = tree_cpu(cluster.child.id());
    r.first_backup = timed(cli().arg("backup").arg(data))?;
    r.first_backup_total_cpu_s = r.first_backup.cpu_s + tree_cpu(cluster.child.id()) - before;
    r.nochange_backup = timed(cli().arg("backup").arg(data))?;
    change_one_percent(data, round)?;
    r.change_backup = timed(cli().arg("backup").arg(data))?;
    let target = work.join(format!("restores/cairn-{round}"));
    let _ = std::fs::remove_dir_all(&target);
    evict(&[&dir, &work.join("restores")])?;
    r.restore = timed(cli().args(["restore", "latest", "--target"]).arg(&target))?;
    evict(&[&dir, &work.join("restores")])?;
    r.check_read_data = timed(cli().args(["check", "--read-data"]))?;
    // One replica's worth, everything a replica keeps (as restic's size counts its packs, index
    // and snapshots): the nodes' segments and chunk indexes over R=3, plus one coordinator's
    // catalog.
    let mut stored = 0;
    for n in 1..=3 {
        stored += disk_usage(&dir.join(format!("node-{n}")))?;
    }
    r.repo_bytes = stored / 3 + disk_usage(&dir.join("coordinator-1"))?;
    cluster.stop();
    Ok(r)
}

/// A fresh restic repository (any old one at the same place is removed first).
struct Restic {
    repo: PathBuf,
    cache: PathBuf,
}

impl Restic {
    fn init(repo: PathBuf, cache: PathBuf) -> Result<Self> {
        let _ = std::fs::remove_dir_all(&repo);
        let _ = std::fs::remove_dir_all(&cache);
        let r = Self { repo, cache };
        let out = r.cmd().arg("init").output()?;
        if !out.status.success() {
            bail!("restic init: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(r)
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("restic");
        c.env("RESTIC_REPOSITORY", &self.repo)
            .env("RESTIC_PASSWORD", PASSWORD)
            .env("RESTIC_CACHE_DIR", &self.cache)
            .arg("--quiet");
        c
    }
}

fn restic_run(work: &Path, data: &Path, round: u64) -> Result<Run> {
    let restic = Restic::init(work.join("restic-repo"), work.join("restic-cache"))?;
    let cmd = || restic.cmd();
    let repo = &restic.repo;
    let mut r = Run::default();
    r.first_backup = timed(cmd().arg("backup").arg(data))?;
    r.first_backup_total_cpu_s = r.first_backup.cpu_s;
    r.nochange_backup = timed(cmd().arg("backup").arg(data))?;
    change_one_percent(data, round)?;
    r.change_backup = timed(cmd().arg("backup").arg(data))?;
    let target = work.join(format!("restores/restic-{round}"));
    let _ = std::fs::remove_dir_all(&target);
    evict(&[repo, &work.join("restores")])?;
    r.restore = timed(cmd().args(["restore", "latest", "--target"]).arg(&target))?;
    evict(&[repo, &work.join("restores")])?;
    r.check_read_data = timed(cmd().args(["check", "--read-data"]))?;
    r.repo_bytes = disk_usage(repo)?;
    Ok(r)
}

fn ensure_restic() -> Result<String> {
    if Command::new("restic").arg("version").output().is_err() {
        eprintln!("installing restic from the Debian packages");
        let ok = Command::new("sh")
            .arg("-c")
            .arg("(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq restic) >/dev/null")
            .status()?;
        if !ok.success() {
            bail!("could not install restic");
        }
    }
    let v = Command::new("restic").arg("version").output()?;
    Ok(String::from_utf8_lossy(&v.stdout).trim().to_string())
}

/// The processor's model name, as the kernel reports it.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "processor unknown".into())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        0.0
    } else if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    }
}

#[derive(Serialize)]
struct Row {
    measure: String,
    cairn: f64,
    restic: f64,
    ratio: f64,
    target: String,
    met: bool,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let bin = std::env::current_exe()?
        .parent()
        .context("bin dir")?
        .to_path_buf();
    if !bin.join("cairn-storage-node").exists() {
        bail!("build the workspace first: cargo build --release --workspace");
    }
    let restic_version = ensure_restic()?;
    std::fs::create_dir_all(&a.work)?;
    let work = std::fs::canonicalize(&a.work)?;
    let data = work.join("data");
    set_aside_restores(&work)?;
    wait_out_recent_deletions(&work);
    // Written again even if present: an earlier invocation leaves its 1% change behind.
    let size = generate_fresh(&data, a.size_gb)?;
    eprintln!("dataset: {:.2} GB in {}", size as f64 / 1e9, data.display());
    let mut cairn = Vec::new();
    let mut restic = Vec::new();
    for run in 0..a.runs {
        // Fresh, identical data for every run; alternate which tool goes first.
        if run > 0 {
            generate_fresh(&data, a.size_gb)?;
        }
        let round = run as u64;
        if run % 2 == 0 {
            restic.push(restic_run(&work, &data, round)?);
            generate_fresh(&data, a.size_gb)?;
            cairn.push(cairn_run(&bin, &work, &data, round)?);
        } else {
            cairn.push(cairn_run(&bin, &work, &data, round)?);
            generate_fresh(&data, a.size_gb)?;
            restic.push(restic_run(&work, &data, round)?);
        }
        eprintln!(
            "run {} done: cairn {:?}\n  restic {:?}",
            run + 1,
            cairn.last().unwrap(),
            restic.last().unwrap()
        );
    }
    // Restored trees are removed only now, for the reason `generate_seeded` rewrites in place.
    remove_restores(&work)?;
    let gb = size as f64 / 1e9;
    let m = |runs: &[Run], f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let mut rows = Vec::new();
    let mut row = |name: &str, c: f64, r: f64, target: &str, met: bool| {
        rows.push(Row {
            measure: name.into(),
            cairn: c,
            restic: r,
            ratio: if r > 0.0 { c / r } else { 0.0 },
            target: target.into(),
            met,
        });
    };
    let (c1, r1) = (
        m(&cairn, &|r| gb * 1000.0 / r.first_backup.wall_s),
        m(&restic, &|r| gb * 1000.0 / r.first_backup.wall_s),
    );
    row("first backup, MB/s", c1, r1, ">= 2x restic", c1 >= 2.0 * r1);
    let (c2, r2) = (
        m(&cairn, &|r| r.nochange_backup.wall_s),
        m(&restic, &|r| r.nochange_backup.wall_s),
    );
    row(
        "no-change backup, s",
        c2,
        r2,
        "<= 0.25x restic",
        c2 <= 0.25 * r2,
    );
    let (c3, r3) = (
        m(&cairn, &|r| r.change_backup.wall_s),
        m(&restic, &|r| r.change_backup.wall_s),
    );
    row(
        "1% change backup, s",
        c3,
        r3,
        "<= 0.3x restic",
        c3 <= 0.3 * r3,
    );
    let (c4, r4) = (
        m(&cairn, &|r| gb * 1000.0 / r.restore.wall_s),
        m(&restic, &|r| gb * 1000.0 / r.restore.wall_s),
    );
    row("full restore, MB/s", c4, r4, ">= 2x restic", c4 >= 2.0 * r4);
    let (c5, r5) = (
        m(&cairn, &|r| r.check_read_data.wall_s),
        m(&restic, &|r| r.check_read_data.wall_s),
    );
    row("check --read-data, s", c5, r5, "(reported)", true);
    let (c6, r6) = (
        m(&cairn, &|r| gb * 1000.0 / r.first_backup_total_cpu_s),
        m(&restic, &|r| gb * 1000.0 / r.first_backup_total_cpu_s),
    );
    row(
        "first backup, MB per CPU-second (all processes)",
        c6,
        r6,
        ">= 2x restic",
        c6 >= 2.0 * r6,
    );
    let (c7, r7) = (
        m(&cairn, &|r| r.first_backup.peak_rss_kb as f64 / 1024.0),
        m(&restic, &|r| r.first_backup.peak_rss_kb as f64 / 1024.0),
    );
    row(
        "client peak memory (first backup), MiB",
        c7,
        r7,
        "<= restic",
        c7 <= r7,
    );
    let (c8, r8) = (
        m(&cairn, &|r| r.repo_bytes as f64 / 1e9),
        m(&restic, &|r| r.repo_bytes as f64 / 1e9),
    );
    row(
        "repository size on disk (Cairn: one replica), GB",
        c8,
        r8,
        "<= restic",
        c8 <= r8,
    );

    let growth = if a.growth > 1 {
        let g = growth(&bin, &work, &data, a.size_gb, a.growth)?;
        let (c1x, c4x) = (
            g.cairn_kb[0] as f64 / 1024.0,
            *g.cairn_kb.last().unwrap() as f64 / 1024.0,
        );
        let r4x = *g.restic_kb.last().unwrap() as f64 / 1024.0;
        row(
            &format!(
                "client peak memory, repository at {}x the data, MiB",
                a.growth
            ),
            c4x,
            r4x,
            "<= restic, within 10% of 1x",
            c4x <= r4x && c4x <= 1.1 * c1x,
        );
        Some(g)
    } else {
        None
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = cpu_model();
    let mut md = format!(
        "# Cairn vs restic\n\n{} on {:.2} GB ({} runs each, alternating; medians). Cairn: local dev cluster, 3 storage nodes, R=3, on this machine ({} cores, {}).\n\n| measure | Cairn | restic | Cairn/restic | target | met |\n|---|---|---|---|---|---|\n",
        restic_version, gb, a.runs, cores, cpu
    );
    for r in &rows {
        md += &format!(
            "| {} | {:.2} | {:.2} | {:.2} | {} | {} |\n",
            r.measure,
            r.cairn,
            r.restic,
            r.ratio,
            r.target,
            if r.met { "yes" } else { "NO" }
        );
    }
    let client_cpu = m(&cairn, &|r| r.first_backup.cpu_s);
    let cluster_cpu = m(&cairn, &|r| {
        r.first_backup_total_cpu_s - r.first_backup.cpu_s
    });
    md += &format!(
        "\nCPU of the first backup, medians: Cairn's client {client_cpu:.2} CPU-s and its cluster (storage nodes and coordinators) {cluster_cpu:.2} CPU-s; restic {:.2} CPU-s.\n",
        m(&restic, &|r| r.first_backup_total_cpu_s)
    );
    if let Some(g) = &growth {
        md += &format!(
            "\nMemory as the repository grows: {n} backups of {gb:.2} GB of new data each into one repository (Cairn: one dev cluster; restic: one repository); client peak memory, MiB:\n\n| backup into a repository of | Cairn | restic |\n|---|---|---|\n",
            n = g.cairn_kb.len()
        );
        for (i, (c, r)) in g.cairn_kb.iter().zip(&g.restic_kb).enumerate() {
            md += &format!(
                "| {}x the data | {:.1} | {:.1} |\n",
                i + 1,
                *c as f64 / 1024.0,
                *r as f64 / 1024.0
            );
        }
    } else {
        md += "\nMemory at 1x and 4x the data: not measured in this run (--growth 0).\n";
    }
    println!("{md}");
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join("results.md"), &md)?;
    let json = serde_json::json!({"restic": restic_version, "cpu": cpu, "cores": cores, "dataset_bytes": size, "runs": a.runs, "rows": rows, "cairn_runs": cairn, "restic_runs": restic, "growth": growth});
    std::fs::write(
        a.out.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    eprintln!("wrote {}/results.md and results.json", a.out.display());
    Ok(())
}

/// Peak client memory of successive backups of new data into one growing repository.
#[derive(Serialize)]
struct Growth {
    cairn_kb: Vec<u64>,
    restic_kb: Vec<u64>,
}

fn growth(bin: &Path, work: &Path, data: &Path, size_gb: f64, steps: u32) -> Result<Growth> {
    let dir = work.join("growth-cluster");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let cluster = DevCluster::start(bin, &dir)?;
    let repo = Restic::init(work.join("growth-restic"), work.join("growth-restic-cache"))?;
    let restic = || repo.cmd();
    let mut g = Growth {
        cairn_kb: Vec::new(),
        restic_kb: Vec::new(),
    };
    for step in 0..steps {
        generate_seeded(data, size_gb, 1000 + u64::from(step), false)?;
        let c = timed(
            Command::new(bin.join("cairn"))
                .env("CAIRN_CONFIG", &cluster.config)
                .arg("--quiet")
                .arg("backup")
                .arg(data),
        )?;
        let r = timed(restic().arg("backup").arg(data))?;
        eprintln!(
            "growth step {}: cairn {} KiB, restic {} KiB",
            step + 1,
            c.peak_rss_kb,
            r.peak_rss_kb
        );
        g.cairn_kb.push(c.peak_rss_kb);
        g.restic_kb.push(r.peak_rss_kb);
    }
    cluster.stop();
    for d in [&dir, &repo.repo, &repo.cache] {
        let _ = std::fs::remove_dir_all(d);
    }
    // Leave the standard dataset behind for the next invocation.
    generate_fresh(data, size_gb)?;
    Ok(g)
}

/// The standard dataset, written again: undoes a 1% change.
fn generate_fresh(data: &Path, size_gb: f64) -> Result<u64> {
    generate_seeded(data, size_gb, 42, true)
}
