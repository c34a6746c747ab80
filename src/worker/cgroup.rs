//! A cgroup per job, where the worker has a cgroup v2 subtree of its own.
//!
//! Under systemd with `Delegate=yes` (the packaged unit), the service's
//! cgroup is the worker's to manage: systemd marks it with the
//! `user.delegate` (and `trusted.delegate`) extended attribute and, for a
//! service with `User=`, hands its `cgroup.procs` and
//! `cgroup.subtree_control` to that user. There the worker:
//!
//! - moves itself into a leaf of its own, `worker/` (a cgroup with
//!   children may hold no process: the "no internal processes" rule);
//! - enables the `memory`, `pids` and `cpu` controllers its cgroup offers
//!   for its children;
//! - starts each job in a cgroup of its own, `run-N/`, which the job's
//!   first process enters before `exec`, so everything it ever starts is
//!   in it, daemonised or not: `cgroup.kill` ends them all at once;
//! - sets the job's limits there (`memory.max` with `memory.oom.group`, so
//!   that an out-of-memory kill takes the whole job, `pids.max`,
//!   `cpu.max`), where the controller is available;
//! - reads what the whole tree used (`cpu.stat`, `memory.peak`) and
//!   whether a limit was hit (`memory.events`, `pids.events`) when the job
//!   ends, and once the cgroup is empty gives it to a later job (the
//!   counters' growth is each job's) or, with the memory controller, whose
//!   `memory.peak` cannot start again, removes it.
//!
//! Without such a subtree (a worker started by hand, cron, an older
//! systemd, cgroup v1 controllers), the reaper's process group and child
//! subreaper contain the job, and limits are rlimits (see `limits.rs`).

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::spool::limits::Limits;

/// The leaf the worker moves itself into.
pub const WORKER_LEAF: &str = "worker";
/// Jobs' cgroups are this prefix and a number: `run-1`, `run-2`, ….
pub const RUN_PREFIX: &str = "run-";
/// The most empty cgroups kept for reuse.
const POOL_MAX: usize = 64;
/// The period of `cpu.max`, in microseconds (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;
/// How long removing a stale job cgroup waits for it to empty.
const STALE_WAIT: Duration = Duration::from_secs(2);

/// The worker's delegated cgroup and the controllers it gives its jobs.
#[derive(Debug)]
pub struct Tree {
    root: PathBuf,
    /// Empty job cgroups, ready for the next jobs: creating and removing a
    /// cgroup per job costs the kernel more than the rest of the worker's
    /// work on it (BENCHMARKS.md). Not with the memory controller, whose
    /// `memory.peak` cannot be started again for another job.
    /// Each with its counters as they were when it was given back (the
    /// next job's usage is their growth), read off the jobs' path.
    pool: Option<Mutex<Vec<(PathBuf, Counters)>>>,
    /// The number of the next new job cgroup.
    next: AtomicU64,
    /// Cgroups `cgroup.kill` was written to, and those of jobs handed over
    /// (which may have been): never reused, because a process later
    /// created in such a cgroup with `CLONE_INTO_CGROUP` is killed at
    /// once (seen on Linux 6.18: the kill is still counted against it).
    killed: Mutex<std::collections::HashSet<PathBuf>>,
    /// `memory.max`, `memory.peak` and OOM kills per job.
    pub memory: bool,
    /// `pids.max` per job.
    pub pids: bool,
    /// `cpu.max` per job.
    pub cpu: bool,
}

static TREE: OnceLock<Result<Tree, String>> = OnceLock::new();

/// The worker's cgroup subtree, once [`init`] found one.
pub fn tree() -> Option<&'static Tree> {
    TREE.get().and_then(|t| t.as_ref().ok())
}

/// Finds the worker's delegated cgroup, moves the worker into its leaf and
/// enables the controllers (once per process; call it holding the spool's
/// serving lock). Job cgroups a previous worker left (one killed outside
/// systemd, or what ended jobs left before a hand-over) are emptied and
/// removed, but those of the running jobs `keep` (handed over). Returns
/// the tree, or why jobs run without one.
pub fn init(keep: &[&Path]) -> Result<&'static Tree, &'static str> {
    TREE.get_or_init(|| setup(keep))
        .as_ref()
        .map_err(String::as_str)
}

/// The worker's delegated cgroup, without changing anything: where
/// [`init`] will put the jobs' cgroups (which jobs must not be able to
/// write: see `isolation.rs`).
pub fn locate() -> Result<PathBuf, String> {
    let proc_cgroup = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let rel = unified_path(&proc_cgroup).ok_or("the worker is in no cgroup v2 hierarchy")?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let mount = cgroup2_mount(&mountinfo).ok_or("no cgroup v2 file system is mounted")?;
    let here = mount.join(rel.trim_start_matches('/'));
    // A worker that re-executed itself (an upgrade) is in its leaf already.
    match here.parent() {
        Some(parent) if here.ends_with(WORKER_LEAF) && delegated(parent) => Ok(parent.to_owned()),
        _ if delegated(&here) => Ok(here),
        _ => Err(format!(
            "its cgroup {} is not delegated to it (Delegate=yes in its unit)",
            here.display()
        )),
    }
}

fn setup(keep: &[&Path]) -> Result<Tree, String> {
    let root = locate()?;
    let leaf = root.join(WORKER_LEAF);
    match fs::create_dir(&leaf) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            return Err(format!("cannot create {}: {e}", leaf.display()));
        }
        _ => {}
    }
    // "0": the writing process, all its threads.
    fs::write(leaf.join("cgroup.procs"), "0")
        .map_err(|e| format!("cannot move into {}: {e}", leaf.display()))?;
    let mut next = 1;
    for entry in fs::read_dir(&root).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(n) = name
            .to_string_lossy()
            .strip_prefix(RUN_PREFIX)
            .map(str::to_owned)
        else {
            continue;
        };
        if keep.contains(&entry.path().as_path()) {
            next = next.max(n.parse::<u64>().map_or(next, |n| n + 1));
        } else {
            let _ = remove_stale(&entry.path());
        }
    }
    let offered = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let enable = |name: &str| {
        offered.split_whitespace().any(|c| c == name)
            && fs::write(root.join("cgroup.subtree_control"), format!("+{name}")).is_ok()
    };
    let memory = enable("memory");
    let killed = keep.iter().map(|p| p.to_path_buf()).collect();
    Ok(Tree {
        killed: Mutex::new(killed),
        memory,
        pids: enable("pids"),
        cpu: enable("cpu"),
        pool: (!memory).then(|| Mutex::new(Vec::new())),
        next: AtomicU64::new(next),
        root,
    })
}

/// The path in the unified hierarchy from `/proc/self/cgroup` (its `0::`
/// line).
fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// Where the cgroup v2 file system is mounted, from `/proc/self/mountinfo`
/// (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` in the hybrid layout).
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (mount, fs) = l.split_once(" - ")?;
        if fs.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        // Fields: id parent major:minor root mount-point …; the kernel
        // escapes spaces in paths as \040.
        let point = mount.split_whitespace().nth(4)?;
        Some(PathBuf::from(point.replace("\\040", " ")))
    })
}

/// Whether systemd delegated the cgroup at `dir` (its `user.delegate` or
/// `trusted.delegate` attribute is `1`) and this process may manage it.
fn delegated(dir: &Path) -> bool {
    let marked = ["user.delegate", "trusted.delegate"].iter().any(|name| {
        let mut buf = [0u8; 8];
        rustix::fs::getxattr(dir, *name, &mut buf).is_ok_and(|n| &buf[..n] == b"1")
    });
    let writable = |p: &Path| rustix::fs::access(p, rustix::fs::Access::WRITE_OK).is_ok();
    marked
        && writable(dir)
        && writable(&dir.join("cgroup.procs"))
        && writable(&dir.join("cgroup.subtree_control"))
}

/// A job's cgroup, ready for its first process to enter.
pub struct JobCgroup {
    pub assigned: Assigned,
    /// The cgroup's directory, open: the child is created in it.
    pub fd: OwnedFd,
}

/// Which cgroup a job runs in, and what it had counted before the job
/// (a cgroup is reused): handed over with the job at an upgrade.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Assigned {
    pub dir: PathBuf,
    #[serde(default)]
    pub before: Counters,
}

/// The cumulative counters of a cgroup that a job's usage is the growth of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    pub cpu_user_us: u64,
    pub cpu_system_us: u64,
    pub oom_kills: u64,
    pub pids_refused: u64,
}

impl Tree {
    /// A tree with the given controllers, for tests of what uses one.
    #[cfg(test)]
    pub fn for_test(memory: bool, pids: bool, cpu: bool) -> Tree {
        Tree {
            root: PathBuf::from("/nonexistent"),
            memory,
            pids,
            cpu,
            pool: None,
            next: AtomicU64::new(1),
            killed: Mutex::default(),
        }
    }

    /// A cgroup for a job, empty, with `limits` set where this tree has
    /// the controller (the caller enforces the others another way): one
    /// from the pool, else a new one.
    pub fn create(&self, limits: &Limits) -> io::Result<JobCgroup> {
        let pooled = self
            .pool
            .as_ref()
            .and_then(|p| p.lock().unwrap_or_else(|e| e.into_inner()).pop());
        // A new cgroup has counted nothing yet.
        let (dir, before) = match pooled {
            Some(entry) => entry,
            None => loop {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                let dir = self.root.join(format!("{RUN_PREFIX}{n}"));
                match fs::create_dir(&dir) {
                    Ok(()) => break (dir, Counters::default()),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(annotate(e, "creating", &dir)),
                }
            },
        };
        let set = |file: &str, value: String| {
            fs::write(dir.join(file), value).map_err(|e| annotate(e, "writing", &dir.join(file)))
        };
        let configured = (|| {
            // Every controller's limit is written, "max" where the job has
            // none: the cgroup may have had another job's.
            if self.memory {
                let max = limits
                    .memory_max
                    .map_or("max".into(), |m| m.get().to_string());
                set("memory.max", max)?;
                // No swap: the limit is the memory, and reaching it ends
                // the whole job rather than leaving half of it.
                if dir.join("memory.swap.max").exists() {
                    set("memory.swap.max", "0".into())?;
                }
                set("memory.oom.group", "1".into())?;
            }
            if self.pids {
                set(
                    "pids.max",
                    limits
                        .tasks_max
                        .map_or("max".into(), |t| t.get().to_string()),
                )?;
            }
            if self.cpu {
                let quota = limits.cpu_max.map_or("max".into(), |q| {
                    (u64::from(q.get()) * CPU_PERIOD_US / 100).to_string()
                });
                set("cpu.max", format!("{quota} {CPU_PERIOD_US}"))?;
            }
            let fd = rustix::fs::open(
                &dir,
                rustix::fs::OFlags::RDONLY
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| annotate(e.into(), "opening", &dir))?;
            Ok(JobCgroup {
                assigned: Assigned {
                    dir: dir.clone(),
                    before,
                },
                fd,
            })
        })();
        if configured.is_err() {
            let _ = fs::remove_dir(&dir);
        }
        configured
    }

    /// Gives back a job's cgroup once it is empty, for another job (or
    /// removes it): `true` once done, `false` while a process is left in it.
    pub fn release(&self, dir: &Path) -> bool {
        let killed = self
            .killed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(dir);
        let Some(pool) = self.pool.as_ref().filter(|_| !killed) else {
            let gone = remove(dir);
            if gone && killed {
                self.killed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(dir);
            }
            return gone;
        };
        match fs::read_to_string(dir.join("cgroup.events")) {
            Ok(events) if events.lines().any(|l| l == "populated 0") => {
                let counted = counters(self, dir);
                let mut pool = pool.lock().unwrap_or_else(|e| e.into_inner());
                if pool.len() < POOL_MAX {
                    pool.push((dir.to_owned(), counted));
                    true
                } else {
                    drop(pool);
                    remove(dir)
                }
            }
            Ok(_) => false,
            Err(_) => true,
        }
    }

    /// Removes the pooled cgroups (at the worker's stop).
    pub fn drain(&self) {
        if let Some(pool) = &self.pool {
            for (dir, _) in pool.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
                remove(&dir);
            }
        }
    }
}

/// The counters of the cgroup at `dir` that `tree` has.
fn counters(tree: &Tree, dir: &Path) -> Counters {
    let cpu = fs::read_to_string(dir.join("cpu.stat")).unwrap_or_default();
    let events = |on: bool, file: &str, k: &str| {
        on.then(|| fs::read_to_string(dir.join(file)).ok())
            .flatten()
            .and_then(|t| key(&t, k))
            .unwrap_or(0)
    };
    Counters {
        cpu_user_us: key(&cpu, "user_usec").unwrap_or(0),
        cpu_system_us: key(&cpu, "system_usec").unwrap_or(0),
        oom_kills: events(tree.memory, "memory.events", "oom_kill"),
        pids_refused: events(tree.pids, "pids.events", "max"),
    }
}

/// The value of `k` in a flat-keyed cgroup file (`user_usec 1234`).
fn key(text: &str, k: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (name, v) = l.split_once(' ')?;
        (name == k).then(|| v.trim().parse::<u64>().ok()).flatten()
    })
}

fn annotate(e: io::Error, doing: &str, path: &Path) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("{doing} the job's cgroup {}: {e}", path.display()),
    )
}

impl Tree {
    /// Kills everything in the job cgroup at `dir` (see [`kill_all`]);
    /// the cgroup is removed, not reused, once empty.
    pub fn kill(&self, dir: &Path) {
        self.killed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dir.to_owned());
        kill_all(dir);
    }
}

/// Kills everything in the cgroup at `dir` (`cgroup.kill`; on a kernel
/// before 5.14, SIGKILL to each member). Nothing to do if it is gone.
pub fn kill_all(dir: &Path) {
    match fs::write(dir.join("cgroup.kill"), "1") {
        Err(e) if e.kind() == io::ErrorKind::NotFound && dir.exists() => {
            signal_all(dir, Signal::SIGKILL);
        }
        _ => {}
    }
}

/// Sends `sig` to every process in the cgroup at `dir`.
pub fn signal_all(dir: &Path, sig: Signal) {
    let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) else {
        return;
    };
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// Removes the cgroup at `dir` if it is empty: `true` once it is gone,
/// `false` while a process is left in it.
pub fn remove(dir: &Path) -> bool {
    match fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    }
}

/// Kills what is in the cgroup at `dir` and removes it, waiting up to
/// [`STALE_WAIT`] for it to empty.
fn remove_stale(dir: &Path) -> io::Result<()> {
    kill_all(dir);
    let until = Instant::now() + STALE_WAIT;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= until => {
                return Err(annotate(e, "removing the stale", dir));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// What a job's whole tree used and hit, from its cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeUsage {
    pub cpu_user_ms: Option<u64>,
    pub cpu_system_ms: Option<u64>,
    /// `memory.peak`: the most memory the tree held at once.
    pub memory_peak_bytes: Option<u64>,
    /// Processes the OOM killer ended for reaching `memory.max`.
    pub oom_kills: u64,
    /// Forks refused for reaching `pids.max`.
    pub pids_refused: u64,
}

/// What the job in the cgroup `a` used and hit since it was given it.
pub fn usage(tree: &Tree, a: &Assigned) -> TreeUsage {
    let now = counters(tree, &a.dir);
    let was = a.before;
    TreeUsage {
        cpu_user_ms: Some(now.cpu_user_us.saturating_sub(was.cpu_user_us) / 1000),
        cpu_system_ms: Some(now.cpu_system_us.saturating_sub(was.cpu_system_us) / 1000),
        // A cgroup with the memory controller serves one job only.
        memory_peak_bytes: tree
            .memory
            .then(|| fs::read_to_string(a.dir.join("memory.peak")).ok())
            .flatten()
            .and_then(|t| t.trim().parse().ok()),
        oom_kills: now.oom_kills.saturating_sub(was.oom_kills),
        pids_refused: now.pids_refused.saturating_sub(was.pids_refused),
    }
}

/// A line for the worker's log at start: how jobs are contained.
pub fn describe(tree: Result<&Tree, &str>) -> String {
    match tree {
        Ok(t) => {
            let on: Vec<&str> = [(t.memory, "memory"), (t.pids, "pids"), (t.cpu, "cpu")]
                .into_iter()
                .filter_map(|(on, name)| on.then_some(name))
                .collect();
            format!(
                "each job runs in a cgroup of its own under {}; limits by cgroup controller: {}",
                t.root.display(),
                if on.is_empty() {
                    "none offered, so rlimits".to_owned()
                } else {
                    on.join(", ")
                }
            )
        }
        Err(why) => format!(
            "jobs are contained by their process group and the worker as child subreaper, not a cgroup: {why}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unified_path_is_the_0_line() {
        let v1 = "9:name=systemd:/system.slice/x.service\n0::/system.slice/x.service\n";
        assert_eq!(unified_path(v1), Some("/system.slice/x.service"));
        assert_eq!(unified_path("4:memory:/a\n"), None);
    }

    #[test]
    fn the_cgroup2_mount_is_found_among_others() {
        let info = "\
35 25 0:30 / /sys/fs/cgroup/memory rw,relatime shared:12 - cgroup cgroup rw,memory
41 25 0:36 / /sys/fs/cgroup/unified rw,relatime shared:18 - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/sda rw\n"), None);
    }

    #[test]
    fn a_directory_without_the_mark_is_not_delegated() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!delegated(dir.path()));
    }
}
