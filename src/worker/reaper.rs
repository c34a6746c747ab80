//! Nothing a job starts outlives it.
//!
//! A job runs in a process group of its own, but a process can leave the
//! group (`setsid`), and one whose parent exits (`nohup cmd &` in a job
//! that then ends, a double fork `( cmd & )`) would be adopted by init and
//! run on unseen. So the worker is a *child subreaper*
//! (`PR_SET_CHILD_SUBREAPER`): every process a job starts stays a
//! descendant of the worker, whatever it does, and an orphan becomes the
//! worker's own child. This module keeps track of them:
//!
//! - each running job is registered by the pid of its main process (which
//!   is also its process group id) and its id;
//! - a child of the worker that is not a job's main process is an orphan.
//!   It belongs to a running job when it is in that job's process group or
//!   carries its `AI_CMD_EXECUTOR_JOB_ID` (every job process inherits it),
//!   and is left alone until that job ends. Otherwise it belongs to a job
//!   that ended, or to none that can be told: it is sent SIGTERM, with its
//!   descendants, and SIGKILL once `kill_grace` has passed (from the end of
//!   its job, or from the moment it was found);
//! - when a job's main process ends, its process group is sent SIGTERM at
//!   once, and a scan looks for its orphans (scans are at least
//!   [`SCAN_GAP`] apart, so a busy worker does not scan per job).
//!
//! Processes marked for killing are followed through pidfds, so a pid that
//! is reused later is never signalled; the worker's orphans are reaped
//! here (by pid, never `waitpid(-1)`, which would take a job's status from
//! its slot). At a stop the worker waits for all of them before it exits.
//!
//! A scan runs only while no job is being started: a child seen between
//! `posix_spawn` and its registration would look like an orphan.
//!
//! Where the worker has a cgroup subtree (`cgroup.rs`), each job also has
//! a cgroup, which everything it starts stays in: signals then go to every
//! member of it as well, the final kill is `cgroup.kill`, and a job has
//! ended only once its cgroup is empty and removed.
//!
//! What this cannot do: a process that leaves the worker's tree by other
//! means (`systemd-run`, `at`, `ssh localhost`) is not a descendant; and a
//! worker killed with SIGKILL kills nothing. Under systemd the unit's
//! cgroup covers that: when the main process dies, systemd kills what is
//! left in the unit (`KillMode=mixed`), job cgroups included.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use tracing::{info, warn};

use super::cgroup;

/// The shortest time between two scans prompted by jobs ending.
const SCAN_GAP: Duration = Duration::from_millis(20);
/// How often orphans are looked for while jobs run (to reap ones that
/// ended, and to find ones no running job owns).
const SCAN_WHILE_RUNNING: Duration = Duration::from_secs(1);
/// How often a scan runs while processes are being killed.
const SCAN_WHILE_KILLING: Duration = Duration::from_millis(50);
/// How long a stopping worker waits, past the last kill deadline, for
/// killed processes to go.
const FINISH_MARGIN: Duration = Duration::from_secs(2);

/// The variable that ties a process to its job.
const JOB_ID_VAR: &[u8] = b"AI_CMD_EXECUTOR_JOB_ID=";

#[derive(Default)]
struct State {
    /// The reaper thread runs: this process is a subreaper.
    active: bool,
    grace: Duration,
    /// Jobs being started right now (see the module's comment).
    spawning: usize,
    /// Running jobs: main process id (= process group id) → job id.
    running: HashMap<i32, String>,
    /// Their cgroups, where jobs have them.
    cgroups: HashMap<i32, PathBuf>,
    /// Jobs whose main process ended, until their leftovers' kill deadline.
    ended: VecDeque<Ended>,
    /// Processes sent SIGTERM, to be sent SIGKILL at their deadline.
    doomed: Vec<Doomed>,
    /// A job ended since the last scan.
    scan_due: bool,
    last_scan: Option<Instant>,
    /// The worker is stopping: the thread ends once nothing is left.
    finishing: bool,
    /// The thread has ended.
    done: bool,
}

struct Ended {
    id: String,
    pgid: i32,
    kill_by: Instant,
    /// The job's cgroup, while processes are left in it.
    cgroup: Option<PathBuf>,
}

struct Doomed {
    pid: i32,
    pidfd: OwnedFd,
    kill_by: Instant,
    killed: bool,
}

fn shared() -> &'static (Mutex<State>, Condvar) {
    static SHARED: OnceLock<(Mutex<State>, Condvar)> = OnceLock::new();
    SHARED.get_or_init(Default::default)
}

fn lock() -> MutexGuard<'static, State> {
    // The state stays consistent across a panic (plain bookkeeping).
    shared().0.lock().unwrap_or_else(|p| p.into_inner())
}

fn notify() {
    shared().1.notify_all();
}

/// Makes this process a child subreaper and starts the thread that kills
/// and reaps what jobs leave behind. Call it once jobs handed over by a
/// previous worker are registered (they are this process's children
/// already). `grace` is the time between SIGTERM and SIGKILL.
pub fn start(grace: Duration) -> io::Result<()> {
    rustix::process::set_child_subreaper(rustix::process::getpid().into())?;
    let mut st = lock();
    st.grace = grace;
    if st.active {
        return Ok(());
    }
    st.active = true;
    st.finishing = false;
    st.done = false;
    drop(st);
    let spawned = std::thread::Builder::new()
        .name("reaper".into())
        .stack_size(256 << 10)
        .spawn(run);
    if let Err(e) = spawned {
        lock().active = false;
        return Err(e);
    }
    Ok(())
}

/// Sets the time between SIGTERM and SIGKILL (after a reload).
pub fn set_grace(grace: Duration) {
    lock().grace = grace;
}

/// A job being started: no scan runs until it is registered or given up.
pub(super) struct Spawning {
    registered: bool,
}

/// Marks the start of a job's process; see [`Spawning::started`].
pub(super) fn spawning() -> Spawning {
    lock().spawning += 1;
    Spawning { registered: false }
}

impl Spawning {
    /// The job `id` runs as `pid` (its process group too), in `cgroup`.
    pub fn started(mut self, pid: Pid, id: &str, cgroup: Option<PathBuf>) {
        let mut st = lock();
        st.running.insert(pid.as_raw(), id.to_owned());
        if let Some(dir) = cgroup {
            st.cgroups.insert(pid.as_raw(), dir);
        }
        st.spawning -= 1;
        self.registered = true;
        if st.spawning == 0 {
            notify();
        }
    }
}

impl Drop for Spawning {
    fn drop(&mut self) {
        if !self.registered {
            let mut st = lock();
            st.spawning -= 1;
            if st.spawning == 0 {
                notify();
            }
        }
    }
}

/// Registers a running job taken over from a previous worker.
pub(super) fn adopt(pid: Pid, id: &str, cgroup: Option<PathBuf>) {
    let mut st = lock();
    st.running.insert(pid.as_raw(), id.to_owned());
    if let Some(dir) = cgroup {
        st.cgroups.insert(pid.as_raw(), dir);
    }
}

/// The main process `pid` of a job has exited and is not reaped yet (so
/// its process group id cannot have been reused): what is left in its
/// process group is sent SIGTERM now (and SIGKILL later, see [`ended`]).
pub(super) fn main_exited(pid: Pid) {
    // ESRCH: nothing is left in the group. What left the group is found by
    // the scan its end asks for (and, in a cgroup, killed with it).
    let _ = killpg(pid, Signal::SIGTERM);
}

/// The cgroup of the running job whose main process is `pid`, where jobs
/// have cgroups.
fn cgroup_of(pid: Pid) -> Option<PathBuf> {
    lock().cgroups.get(&pid.as_raw()).cloned()
}

/// The job whose main process was `pid` has been reaped: its leftovers
/// outside its process group are looked for, and killed by `kill_by`.
pub(super) fn ended(pid: Pid, kill_by: Instant) {
    let mut st = lock();
    // Given back by the reaper's next scan, off the slot's path, once
    // empty (killed first if processes are left in it at the deadline).
    let cgroup = st.cgroups.remove(&pid.as_raw());
    let Some(id) = st.running.remove(&pid.as_raw()) else {
        return;
    };
    if !st.active {
        if let (Some(dir), Some(tree)) = (cgroup, cgroup::tree())
            && !tree.release(&dir)
        {
            tree.kill(&dir);
        }
        return;
    }
    st.ended.push_back(Ended {
        id,
        pgid: pid.as_raw(),
        kill_by,
        cgroup,
    });
    st.scan_due = true;
    notify();
}

/// Sends `sig` to a running job: its process group and every descendant of
/// its main process `pid`, in whatever group or session.
pub(super) fn signal_job(pid: Pid, sig: Signal) {
    let _ = killpg(pid, sig);
    for p in descendants(pid.as_raw()) {
        let _ = kill(Pid::from_raw(p), sig);
    }
    if let Some(dir) = cgroup_of(pid) {
        if sig == Signal::SIGKILL {
            if let Some(tree) = cgroup::tree() {
                tree.kill(&dir);
            }
        } else {
            cgroup::signal_all(&dir, sig);
        }
    }
}

/// Waits (at a stop) until everything jobs left behind is gone: killed by
/// its deadline, then reaped; a process that outlives SIGKILL by
/// [`FINISH_MARGIN`] (stuck in the kernel) is reported and left.
pub fn finish() {
    let mut st = lock();
    if !st.active {
        return;
    }
    st.finishing = true;
    notify();
    while !st.done {
        st = shared().1.wait(st).unwrap_or_else(|p| p.into_inner());
    }
    st.active = false;
}

/// The reaper thread.
fn run() {
    let mut st = lock();
    let mut finish_by: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let since_scan = st.last_scan.map(|t| now.saturating_duration_since(t));
        let emptying = st.ended.iter().any(|e| e.cgroup.is_some());
        let every = if !st.doomed.is_empty() || st.finishing || emptying {
            Some(SCAN_WHILE_KILLING)
        } else if !st.running.is_empty() {
            // An idle worker with nothing to kill does not wake: what a job
            // left is found by the scan its end asks for.
            Some(SCAN_WHILE_RUNNING)
        } else {
            None
        };
        let wanted = st.scan_due || st.finishing;
        let due = match since_scan {
            None => wanted || every.is_some(),
            Some(gap) => {
                (wanted && gap >= SCAN_GAP)
                    || every.is_some_and(|e| gap >= e)
                    || st.doomed.iter().any(|d| !d.killed && d.kill_by <= now)
            }
        };
        if !due {
            let mut wait = every.map(|e| e.saturating_sub(since_scan.unwrap_or_default()));
            if wanted {
                let gap = SCAN_GAP.saturating_sub(since_scan.unwrap_or_default());
                wait = Some(wait.map_or(gap, |w| w.min(gap)));
            }
            if let Some(next) = st
                .doomed
                .iter()
                .filter(|d| !d.killed)
                .map(|d| d.kill_by)
                .min()
            {
                let left = next.saturating_duration_since(now);
                wait = Some(wait.map_or(left, |w| w.min(left)));
            }
            st = match wait {
                Some(w) => {
                    shared()
                        .1
                        .wait_timeout(st, w.max(Duration::from_millis(1)))
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => shared().1.wait(st).unwrap_or_else(|p| p.into_inner()),
            };
            continue;
        }
        while st.spawning > 0 {
            st = shared().1.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let left = scan(&mut st);
        st.scan_due = false;
        st.last_scan = Some(Instant::now());
        if st.finishing {
            let by = *finish_by.get_or_insert_with(|| {
                let last = st.doomed.iter().map(|d| d.kill_by).max();
                last.unwrap_or(now).max(now) + FINISH_MARGIN
            });
            if left == 0 && st.doomed.is_empty() && !st.ended.iter().any(|e| e.cgroup.is_some()) {
                break;
            }
            if Instant::now() >= by {
                warn!(
                    "{} process(es) left by jobs did not end after SIGKILL; the worker stops without them",
                    st.doomed.len().max(left)
                );
                break;
            }
        }
    }
    st.done = true;
    st.doomed.clear();
    st.ended.clear();
    notify();
}

/// One look at this process's children: reaps orphans that ended, marks
/// for killing those no running job owns (with their descendants), sends
/// SIGKILL where due. Returns how many orphans are alive.
fn scan(st: &mut State) -> usize {
    let now = Instant::now();
    // Job cgroups with processes left: everything in them is killed at the
    // deadline, and each goes once it is empty.
    for e in st.ended.iter_mut() {
        if let Some(dir) = &e.cgroup {
            if cgroup::tree().is_none_or(|t| t.release(dir)) {
                e.cgroup = None;
            } else if e.kill_by <= now
                && let Some(tree) = cgroup::tree()
            {
                tree.kill(dir);
            }
        }
    }
    while st
        .ended
        .front()
        .is_some_and(|e| e.kill_by + SCAN_WHILE_RUNNING < now && e.cgroup.is_none())
    {
        st.ended.pop_front();
    }
    let me = std::process::id() as i32;
    let running_ids: HashSet<&str> = st.running.values().map(String::as_str).collect();
    let doomed: HashSet<i32> = st.doomed.iter().map(|d| d.pid).collect();
    let mut alive = 0;
    let mut found: Vec<(i32, Option<String>, Instant)> = Vec::new();
    for pid in children(me) {
        if st.running.contains_key(&pid) {
            continue;
        }
        let Some((state, pgid)) = stat(pid) else {
            continue;
        };
        if state == 'Z' {
            let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
            continue;
        }
        alive += 1;
        if doomed.contains(&pid) || st.running.contains_key(&pgid) {
            continue;
        }
        let tag = job_id_of(pid);
        if tag.as_deref().is_some_and(|id| running_ids.contains(id)) {
            continue;
        }
        let owner = st
            .ended
            .iter()
            .rev()
            .find(|e| e.pgid == pgid || tag.as_deref() == Some(e.id.as_str()));
        let (job, kill_by) = match owner {
            Some(e) => (Some(e.id.clone()), e.kill_by),
            None => (None, now + st.grace),
        };
        found.push((pid, job, kill_by));
    }
    // Per job, the number of processes sent a signal, and their deadline.
    let mut told: Vec<(Option<String>, usize, Instant)> = Vec::new();
    for (pid, job, kill_by) in found {
        let mut n = 0;
        for p in std::iter::once(pid).chain(descendants(pid)) {
            if doomed.contains(&p) || st.doomed.iter().any(|d| d.pid == p) {
                continue;
            }
            if let Some(d) = doom(p, kill_by, now) {
                st.doomed.push(d);
                n += 1;
            }
        }
        match told.iter_mut().find(|(j, ..)| *j == job) {
            Some(entry) => entry.1 += n,
            None if n > 0 => told.push((job, n, kill_by)),
            None => {}
        }
    }
    for (job, n, kill_by) in told {
        let left = kill_by.saturating_duration_since(now).as_millis();
        let then = match left {
            0 => "SIGKILL (its kill grace had passed)".to_owned(),
            ms => format!(
                "SIGTERM; SIGKILL in {}",
                humantime::format_duration(Duration::from_secs(ms.div_ceil(1000) as u64))
            ),
        };
        match job {
            Some(id) => info!(
                job_id = %id,
                "job {id} left {n} process(es) running after it ended: sent {then}"
            ),
            None => warn!(
                "{n} process(es) that no running job owns (orphans outside their job's process group and without its AI_CMD_EXECUTOR_JOB_ID): sent {then}"
            ),
        }
    }
    // SIGKILL where due; forget processes that have gone.
    st.doomed.retain_mut(|d| {
        if has_exited(&d.pidfd) {
            return false;
        }
        if !d.killed && d.kill_by <= now {
            d.killed = true;
            let _ = rustix::process::pidfd_send_signal(&d.pidfd, rustix::process::Signal::KILL);
        }
        true
    });
    // With no job running and no process of ours left, nothing can turn
    // up to be told apart: the ended jobs are forgotten now, not at the
    // next job's scan (after a burst they were thousands, held while idle).
    if alive == 0
        && st.running.is_empty()
        && st.doomed.is_empty()
        && st.ended.iter().all(|e| e.cgroup.is_none())
    {
        st.ended = VecDeque::new();
    }
    alive
}

/// Opens a pidfd on `pid` and sends it SIGTERM (SIGKILL if `kill_by` has
/// passed); `None` if it is gone already.
fn doom(pid: i32, kill_by: Instant, now: Instant) -> Option<Doomed> {
    let p = rustix::process::Pid::from_raw(pid)?;
    let pidfd = rustix::process::pidfd_open(p, rustix::process::PidfdFlags::NONBLOCK).ok()?;
    let killed = kill_by <= now;
    let sig = if killed {
        rustix::process::Signal::KILL
    } else {
        rustix::process::Signal::TERM
    };
    let _ = rustix::process::pidfd_send_signal(&pidfd, sig);
    Some(Doomed {
        pid,
        pidfd,
        kill_by,
        killed,
    })
}

/// Whether the process behind `pidfd` has exited.
fn has_exited(pidfd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// The children of `pid` (of all its threads).
fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let mut path = task.path();
        path.push("children");
        if let Ok(text) = fs::read_to_string(&path) {
            out.extend(
                text.split_ascii_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    out
}

/// Every descendant of `pid`, parents before children.
fn descendants(pid: i32) -> Vec<i32> {
    let mut out = children(pid);
    let mut i = 0;
    while i < out.len() {
        let more = children(out[i]);
        out.extend(more);
        i += 1;
        if out.len() > 1 << 16 {
            break;
        }
    }
    out
}

/// A process's state letter and process group, from `/proc/PID/stat`.
fn stat(pid: i32) -> Option<(char, i32)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgid = fields.next()?.parse().ok()?;
    Some((state, pgid))
}

/// The job id a process carries in its environment, if any.
fn job_id_of(pid: i32) -> Option<String> {
    let mut buf = Vec::new();
    fs::File::open(format!("/proc/{pid}/environ"))
        .ok()?
        .take(256 << 10)
        .read_to_end(&mut buf)
        .ok()?;
    buf.split(|b| *b == 0)
        .find_map(|e| e.strip_prefix(JOB_ID_VAR))
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_reads_state_and_group_past_an_odd_name() {
        let (state, pgid) = stat(std::process::id() as i32).unwrap();
        assert!(state == 'R' || state == 'S', "{state}");
        assert_eq!(pgid, nix::unistd::getpgrp().as_raw());
    }

    #[test]
    fn children_and_descendants_see_a_grandchild() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        let grandchild: i32 = line.trim().parse().unwrap();
        let me = std::process::id() as i32;
        let pid = child.id() as i32;
        assert!(children(me).contains(&pid));
        let all = descendants(pid);
        assert!(all.contains(&grandchild), "{all:?}");
        let _ = kill(Pid::from_raw(grandchild), Signal::SIGKILL);
        child.wait().unwrap();
    }

    #[test]
    fn the_job_id_is_read_from_the_environment() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env("AI_CMD_EXECUTOR_JOB_ID", "build-7")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // The parent of a `vfork` resumes a moment before the kernel has
        // set up the new program's environment.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = job_id_of(pid);
        while seen.is_none() && Instant::now() < deadline {
            std::thread::yield_now();
            seen = job_id_of(pid);
        }
        assert_eq!(seen.as_deref(), Some("build-7"));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(job_id_of(std::process::id() as i32), None);
    }
}
