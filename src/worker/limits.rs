//! Enforcing a run's resource limits (`limits` in the job file, `[limits]`
//! in the configuration).
//!
//! Where the worker has a cgroup subtree (see `cgroup.rs`) with the
//! controller, a limit holds for the job as a whole: `memory.max` (with an
//! OOM kill of the whole job when it is reached, named in the result),
//! `pids.max` (a fork past it fails, and the result says how many did),
//! `cpu.max` (a throttle: the job gets that share of a CPU, for as long as
//! its timeout allows).
//!
//! Otherwise each limit becomes an rlimit of each of the job's processes,
//! set in the child between `fork` and `exec` and inherited by everything
//! the job starts:
//!
//! - `memory_max`: `RLIMIT_DATA`, the process's private writable memory
//!   (heap and anonymous mappings). An allocation past it fails with
//!   `ENOMEM` in the process that asks; nothing is killed.
//! - `tasks_max`: `RLIMIT_NPROC`, which the kernel counts per user: the
//!   tasks the worker's user has when the job starts, plus `tasks_max`. A
//!   fork past it fails with `EAGAIN`. Root, and a process with
//!   `CAP_SYS_RESOURCE` or `CAP_SYS_ADMIN`, is exempt: the result says
//!   it was not enforced.
//! - `cpu_max`: `RLIMIT_CPU`, the quota's share of the job's timeout in
//!   CPU seconds (at least 1): `SIGXCPU` when a process has used that
//!   much, `SIGKILL` a second later. It caps the total, it does not
//!   throttle; a throttle needs the cpu controller.
//!
//! Each result records which applied (`limits.enforced_by`).

use std::fs;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::OnceLock;
use std::time::Duration;

use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::Signal;

use super::cgroup::{Tree, TreeUsage};
use crate::spool::Usage;
use crate::spool::limits::{Applied, CpuQuota, Limits};

/// The rlimits a job's process is started with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Rlimits {
    data: Option<u64>,
    nproc: Option<u64>,
    cpu_secs: Option<u64>,
}

impl Rlimits {
    /// Whether none is set (the job starts with `posix_spawn`).
    pub fn is_empty(&self) -> bool {
        *self == Rlimits::default()
    }

    /// Sets them on the calling process: run in the child before `exec`.
    /// Only `setrlimit` calls, which are async-signal-safe.
    pub fn apply(&self) -> io::Result<()> {
        if let Some(bytes) = self.data {
            setrlimit(Resource::RLIMIT_DATA, bytes, bytes)?;
        }
        if let Some(n) = self.nproc {
            setrlimit(Resource::RLIMIT_NPROC, n, n)?;
        }
        if let Some(secs) = self.cpu_secs {
            setrlimit(Resource::RLIMIT_CPU, secs, secs.saturating_add(1))?;
        }
        Ok(())
    }
}

/// The CPU seconds `RLIMIT_CPU` allows a process of a job with `quota`
/// and `timeout`: the quota's share of the timeout, rounded up, at least 1.
pub(super) fn cpu_secs(quota: CpuQuota, timeout: Duration) -> u64 {
    let ms = u128::from(quota.get()) * timeout.as_millis() / 100;
    u64::try_from(ms.div_ceil(1000)).unwrap_or(u64::MAX).max(1)
}

/// How `limits` are enforced for a run with `timeout`: the rlimits to set
/// and what its result records. `None` for a run with no limits.
pub(super) fn plan(
    limits: &Limits,
    timeout: Duration,
    tree: Option<&Tree>,
) -> io::Result<(Rlimits, Option<Applied>)> {
    if limits.is_empty() {
        return Ok((Rlimits::default(), None));
    }
    let mut rl = Rlimits::default();
    let mut applied = Applied {
        memory_max: limits.memory_max,
        tasks_max: limits.tasks_max,
        cpu_max: limits.cpu_max,
        ..Applied::default()
    };
    let privileged = privileged();
    let raisable = if privileged {
        "; root can raise it"
    } else {
        ""
    };
    let by_cgroup = |file: &str| format!("cgroup {file}");
    if limits.memory_max.is_some() && tree.is_some_and(|t| t.memory) {
        applied.enforced_by.insert(
            "memory_max".into(),
            by_cgroup("memory.max (the whole job; an OOM kill ends it)"),
        );
    } else if let Some(m) = limits.memory_max {
        rl.data = Some(m.get());
        applied.enforced_by.insert(
            "memory_max".into(),
            format!("RLIMIT_DATA per process{raisable}"),
        );
    }
    if limits.tasks_max.is_some() && tree.is_some_and(|t| t.pids) {
        applied
            .enforced_by
            .insert("tasks_max".into(), by_cgroup("pids.max"));
    } else if let Some(t) = limits.tasks_max {
        let by = if privileged {
            "not enforced: root and CAP_SYS_RESOURCE are exempt from RLIMIT_NPROC".to_owned()
        } else {
            let now = user_tasks(nix::unistd::getuid().as_raw())?;
            rl.nproc = Some(now.saturating_add(u64::from(t.get())));
            format!(
                "RLIMIT_NPROC {} (the worker's user had {now} tasks)",
                now + u64::from(t.get())
            )
        };
        applied.enforced_by.insert("tasks_max".into(), by);
    }
    if limits.cpu_max.is_some() && tree.is_some_and(|t| t.cpu) {
        applied.enforced_by.insert(
            "cpu_max".into(),
            by_cgroup("cpu.max (a throttle on the whole job)"),
        );
    } else if let Some(q) = limits.cpu_max {
        let secs = cpu_secs(q, timeout);
        rl.cpu_secs = Some(secs);
        applied.enforced_by.insert(
            "cpu_max".into(),
            format!("RLIMIT_CPU {secs}s per process{raisable}"),
        );
    }
    Ok((rl, Some(applied)))
}

/// Whether this process is exempt from `RLIMIT_NPROC` and may raise hard
/// limits: root, or `CAP_SYS_RESOURCE` or `CAP_SYS_ADMIN` in effect.
fn privileged() -> bool {
    static PRIVILEGED: OnceLock<bool> = OnceLock::new();
    *PRIVILEGED.get_or_init(|| {
        if nix::unistd::getuid().is_root() {
            return true;
        }
        const CAP_SYS_ADMIN: u32 = 21;
        const CAP_SYS_RESOURCE: u32 = 24;
        fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
                u64::from_str_radix(hex.trim(), 16).ok()
            })
            .is_none_or(|eff| eff & (1 << CAP_SYS_ADMIN | 1 << CAP_SYS_RESOURCE) != 0)
    })
}

/// The tasks (threads) whose real user is `uid`, as `RLIMIT_NPROC` counts
/// them, from `/proc`.
fn user_tasks(uid: u32) -> io::Result<u64> {
    let mut n = 0u64;
    for entry in fs::read_dir("/proc")?.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // Gone since the listing, or not readable: not counted.
        let Ok(status) = fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        };
        if field("Uid:") == Some(u64::from(uid)) {
            n += field("Threads:").unwrap_or(1);
        }
    }
    Ok(n)
}

/// Which limit ended a run that was not stopped by the worker, as its
/// result's error says it: `None` when no limit can be told to have.
/// A job's cgroup counts OOM kills and refused forks (`tree`); of the
/// rlimits only `RLIMIT_CPU` leaves a trace (the signal, and the CPU time).
/// An allocation or fork refused at an rlimit is the job's own failure, so
/// a failed run with limits names them as in force.
pub(super) fn reached(
    applied: &Applied,
    timeout: Duration,
    status: &ExitStatus,
    usage: &Usage,
    tree: Option<&TreeUsage>,
) -> Option<String> {
    if let Some(t) = tree {
        if let Some(m) = applied.memory_max
            && t.oom_kills > 0
        {
            return Some(format!(
                "memory limit {m} reached (killed by the OOM killer: the job's cgroup memory.max)"
            ));
        }
        if let Some(n) = applied.tasks_max
            && t.pids_refused > 0
            && !status.success()
        {
            return Some(format!(
                "task limit {n} reached: {} fork(s) refused (the job's cgroup pids.max)",
                t.pids_refused
            ));
        }
    }
    let cpu_ms = usage
        .cpu_user_ms
        .unwrap_or(0)
        .saturating_add(usage.cpu_system_ms.unwrap_or(0));
    if let (Some(q), Some(by)) = (applied.cpu_max, applied.enforced_by.get("cpu_max"))
        && by.starts_with("RLIMIT_CPU")
    {
        let secs = cpu_secs(q, timeout);
        let xcpu = Signal::SIGXCPU as i32;
        // rusage splits CPU time by tick samples, so it may read below
        // what the kernel counted against the limit: SIGXCPU itself is the
        // proof; SIGKILL (the hard limit) or 128+SIGXCPU (a shell's report
        // of a command killed by it) count with most of the time used.
        let near = cpu_ms >= secs.saturating_mul(800);
        let reached = match status.signal() {
            Some(s) if s == xcpu => true,
            Some(s) => s == Signal::SIGKILL as i32 && near,
            None => status.code() == Some(128 + xcpu) && near,
        };
        if reached {
            return Some(format!(
                "cpu limit {q} reached: a process used its {secs} s of CPU, the limit's share of the {} timeout (RLIMIT_CPU)",
                humantime::format_duration(timeout)
            ));
        }
    }
    if status.success() {
        return None;
    }
    Some(format!(
        "it failed with limits in force: {applied}; an allocation or a fork past a limit fails"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_quota_is_its_share_of_the_timeout() {
        let q = |p| CpuQuota::percent(p).unwrap();
        assert_eq!(cpu_secs(q(50), Duration::from_secs(10)), 5);
        assert_eq!(cpu_secs(q(25), Duration::from_secs(3)), 1);
        assert_eq!(cpu_secs(q(1), Duration::from_secs(1)), 1, "at least 1");
        assert_eq!(cpu_secs(q(200), Duration::from_secs(3600)), 7200);
    }

    #[test]
    fn a_cpu_kill_is_named_and_other_failures_list_the_limits() {
        let (_, applied) = plan(
            &serde_json::from_str(r#"{"memory_max":"64M","cpu_max":"50%"}"#).unwrap(),
            Duration::from_secs(4),
            None,
        )
        .unwrap();
        let applied = applied.unwrap();
        let used = |ms| Usage {
            cpu_user_ms: Some(ms),
            cpu_system_ms: Some(0),
            max_rss_bytes: None,
            memory_peak_bytes: None,
        };
        let t = Duration::from_secs(4);
        let xcpu = ExitStatus::from_raw(Signal::SIGXCPU as i32);
        let named = reached(&applied, t, &xcpu, &used(2000), None).unwrap();
        assert!(
            named.starts_with("cpu limit 50% reached: a process used its 2 s"),
            "{named}"
        );
        // SIGXCPU is proof whatever rusage says.
        let early = reached(&applied, t, &xcpu, &used(1500), None).unwrap();
        assert!(early.starts_with("cpu limit"), "{early}");
        let killed = ExitStatus::from_raw(Signal::SIGKILL as i32);
        let other = reached(&applied, t, &killed, &used(100), None).unwrap();
        assert!(!other.starts_with("cpu limit"), "{other}");
        let by_shell = ExitStatus::from_raw((128 + Signal::SIGXCPU as i32) << 8);
        assert!(
            reached(&applied, t, &by_shell, &used(2010), None)
                .unwrap()
                .starts_with("cpu limit")
        );
        // Exit 1 with little CPU: not the CPU limit, but the limits show.
        let one = ExitStatus::from_raw(1 << 8);
        let other = reached(&applied, t, &one, &used(10), None).unwrap();
        assert!(other.contains("memory_max 64M (RLIMIT_DATA"), "{other}");
        assert_eq!(
            reached(&applied, t, &ExitStatus::from_raw(0), &used(10), None),
            None
        );
    }

    #[test]
    fn a_cgroup_names_the_limit_a_job_reached() {
        let tree = Tree::for_test(true, true, false);
        let (rl, applied) = plan(
            &serde_json::from_str(r#"{"memory_max":"64M","tasks_max":8,"cpu_max":"50%"}"#).unwrap(),
            Duration::from_secs(4),
            Some(&tree),
        )
        .unwrap();
        let applied = applied.unwrap();
        assert!(applied.enforced_by["memory_max"].starts_with("cgroup memory.max"));
        assert!(applied.enforced_by["tasks_max"].starts_with("cgroup pids.max"));
        // No cpu controller here: the rlimit stands in.
        assert!(applied.enforced_by["cpu_max"].starts_with("RLIMIT_CPU"));
        assert_eq!(
            rl,
            Rlimits {
                data: None,
                nproc: None,
                cpu_secs: Some(2)
            }
        );
        let killed = ExitStatus::from_raw(Signal::SIGKILL as i32);
        let usage = Usage::default();
        let oom = TreeUsage {
            oom_kills: 1,
            ..TreeUsage::default()
        };
        let named = reached(
            &applied,
            Duration::from_secs(4),
            &killed,
            &usage,
            Some(&oom),
        );
        assert_eq!(
            named.as_deref(),
            Some(
                "memory limit 64M reached (killed by the OOM killer: the job's cgroup memory.max)"
            )
        );
        let forks = TreeUsage {
            pids_refused: 3,
            ..TreeUsage::default()
        };
        let one = ExitStatus::from_raw(1 << 8);
        let named = reached(&applied, Duration::from_secs(4), &one, &usage, Some(&forks)).unwrap();
        assert!(
            named.starts_with("task limit 8 reached: 3 fork(s) refused"),
            "{named}"
        );
    }
}
