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
//! - starts each job in a new cgroup `job-ID/`, which the job's first
//!   process enters before `exec`, so everything it ever starts is in it,
//!   daemonised or not: `cgroup.kill` ends them all at once;
//! - sets the job's limits there (`memory.max` with `memory.oom.group`, so
//!   that an out-of-memory kill takes the whole job, `pids.max`,
//!   `cpu.max`), where the controller is available;
//! - reads what the whole tree used (`cpu.stat`, `memory.peak`) and
//!   whether a limit was hit (`memory.events`, `pids.events`) when the job
//!   ends, then removes the cgroup once it is empty.
//!
//! Without such a subtree (a worker started by hand, cron, an older
//! systemd, cgroup v1 controllers), the reaper's process group and child
//! subreaper contain the job, and limits are rlimits (see `limits.rs`).

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::spool::limits::Limits;

/// The leaf the worker moves itself into.
pub const WORKER_LEAF: &str = "worker";
/// A job's cgroup is this prefix and the job's id.
pub const JOB_PREFIX: &str = "job-";
/// The period of `cpu.max`, in microseconds (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;
/// How long removing a stale job cgroup waits for it to empty.
const STALE_WAIT: Duration = Duration::from_secs(2);

/// The worker's delegated cgroup and the controllers it gives its jobs.
#[derive(Debug)]
pub struct Tree {
    root: PathBuf,
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
pub fn init(keep: &[&str]) -> Result<&'static Tree, &'static str> {
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

fn setup(keep: &[&str]) -> Result<Tree, String> {
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
    for entry in fs::read_dir(&root).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let kept = name
            .strip_prefix(JOB_PREFIX)
            .is_some_and(|id| keep.contains(&id));
        if name.starts_with(JOB_PREFIX) && !kept {
            let _ = remove_stale(&entry.path());
        }
    }
    let offered = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let enable = |name: &str| {
        offered.split_whitespace().any(|c| c == name)
            && fs::write(root.join("cgroup.subtree_control"), format!("+{name}")).is_ok()
    };
    Ok(Tree {
        memory: enable("memory"),
        pids: enable("pids"),
        cpu: enable("cpu"),
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
    /// `cgroup.procs`, open for writing: the child writes `0` to it
    /// before `exec`.
    pub procs: OwnedFd,
}

impl Tree {
    /// The cgroup of job `id`.
    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.root.join(format!("{JOB_PREFIX}{id}"))
    }

    /// A tree with the given controllers, for tests of what uses one.
    #[cfg(test)]
    pub fn for_test(memory: bool, pids: bool, cpu: bool) -> Tree {
        Tree {
            root: PathBuf::from("/nonexistent"),
            memory,
            pids,
            cpu,
        }
    }

    /// Creates job `id`'s cgroup with `limits` set where this tree has the
    /// controller (the caller enforces the others another way). A cgroup
    /// left by an earlier run of the same job is emptied and replaced.
    pub fn create(&self, id: &str, limits: &Limits) -> io::Result<JobCgroup> {
        let dir = self.job_dir(id);
        if let Err(e) = fs::create_dir(&dir) {
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(annotate(e, "creating", &dir));
            }
            remove_stale(&dir)?;
            fs::create_dir(&dir).map_err(|e| annotate(e, "creating", &dir))?;
        }
        let set = |file: &str, value: String| {
            fs::write(dir.join(file), value).map_err(|e| annotate(e, "writing", &dir.join(file)))
        };
        let configured = (|| {
            if self.memory
                && let Some(m) = limits.memory_max
            {
                set("memory.max", m.get().to_string())?;
                // No swap: the limit is the memory, and reaching it ends
                // the whole job rather than leaving half of it.
                if dir.join("memory.swap.max").exists() {
                    set("memory.swap.max", "0".into())?;
                }
                set("memory.oom.group", "1".into())?;
            }
            if self.pids
                && let Some(t) = limits.tasks_max
            {
                set("pids.max", t.get().to_string())?;
            }
            if self.cpu
                && let Some(q) = limits.cpu_max
            {
                let quota = u64::from(q.get()) * CPU_PERIOD_US / 100;
                set("cpu.max", format!("{quota} {CPU_PERIOD_US}"))?;
            }
            let procs = rustix::fs::open(
                dir.join("cgroup.procs"),
                rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| annotate(e.into(), "opening", &dir.join("cgroup.procs")))?;
            Ok(JobCgroup { procs })
        })();
        if configured.is_err() {
            let _ = fs::remove_dir(&dir);
        }
        configured
    }
}

fn annotate(e: io::Error, doing: &str, path: &Path) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("{doing} the job's cgroup {}: {e}", path.display()),
    )
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

/// Reads what the job in the cgroup at `dir` used, and (with `limits`)
/// whether it hit them; `None` if it has no cgroup. Only the files that
/// can say something are read: this is on every job's path.
pub fn usage(tree: &Tree, dir: &Path, limits: Option<&Limits>) -> Option<TreeUsage> {
    let cpu = fs::read_to_string(dir.join("cpu.stat")).ok()?;
    let key = |text: &str, k: &str| {
        text.lines().find_map(|l| {
            let (name, v) = l.split_once(' ')?;
            (name == k).then(|| v.trim().parse::<u64>().ok()).flatten()
        })
    };
    let events = |limited: bool, file: &str, k: &str| {
        limited
            .then(|| fs::read_to_string(dir.join(file)).ok())
            .flatten()
            .and_then(|t| key(&t, k))
            .unwrap_or(0)
    };
    let memory_limited = tree.memory && limits.is_some_and(|l| l.memory_max.is_some());
    let pids_limited = tree.pids && limits.is_some_and(|l| l.tasks_max.is_some());
    Some(TreeUsage {
        cpu_user_ms: key(&cpu, "user_usec").map(|us| us / 1000),
        cpu_system_ms: key(&cpu, "system_usec").map(|us| us / 1000),
        memory_peak_bytes: tree
            .memory
            .then(|| fs::read_to_string(dir.join("memory.peak")).ok())
            .flatten()
            .and_then(|t| t.trim().parse().ok()),
        oom_kills: events(memory_limited, "memory.events", "oom_kill"),
        pids_refused: events(pids_limited, "pids.events", "max"),
    })
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
