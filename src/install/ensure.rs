//! `ensure-running`: the cron fallback's keeper. A lock file, not
//! `ps | grep`, decides whether a worker runs: the worker holds an
//! exclusive lock on `<spool>/.worker.lock` for its whole life (and writes
//! its pid there), so "the lock is held" means "a worker is alive".

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The worker's lock file in a spool.
pub fn worker_lock_path(spool: &Path) -> PathBuf {
    spool.join(".worker.lock")
}

/// Where a cron-started worker's output goes.
pub fn worker_log_path(spool: &Path) -> PathBuf {
    spool.join("worker.log")
}

/// A held worker lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct WorkerLock {
    _file: File,
}

/// Takes the worker lock for this process and records its pid, or says
/// which worker holds it.
pub fn acquire_worker_lock(path: &Path) -> anyhow::Result<WorkerLock> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o640)
        .open(path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let pid =
                read_pid(&mut file).map_or_else(|| "unknown pid".into(), |p| format!("pid {p}"));
            bail!("another worker ({pid}) holds {}", path.display());
        }
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    file.sync_all()?;
    Ok(WorkerLock { _file: file })
}

fn read_pid(file: &mut File) -> Option<i32> {
    let mut s = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// The pid of the worker holding the lock, or `None` if none does.
pub fn running_worker(spool: &Path) -> anyhow::Result<Option<i32>> {
    let path = worker_lock_path(spool);
    let mut file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    match file.try_lock() {
        Ok(()) => Ok(None),
        Err(TryLockError::WouldBlock) => Ok(Some(read_pid(&mut file).unwrap_or(0))),
        Err(TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// What `ensure-running` found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    /// A worker was already running (its pid).
    AlreadyRunning(i32),
    /// A worker was started (its pid).
    Started(i32),
}

/// Starts a detached worker on `spool` unless one holds the lock. Safe to
/// call many times at once: calls are serialized by a second lock, and the
/// worker lock itself admits one worker only.
pub fn ensure_running(spool: &Path, config: Option<&Path>) -> anyhow::Result<Ensured> {
    crate::spool::Spool::new(spool).ensure_layout()?;
    let serial_path = spool.join(".ensure-running.lock");
    let serial = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o640)
        .open(&serial_path)
        .with_context(|| format!("opening {}", serial_path.display()))?;
    serial
        .lock()
        .with_context(|| format!("locking {}", serial_path.display()))?;

    if let Some(pid) = running_worker(spool)? {
        return Ok(Ensured::AlreadyRunning(pid));
    }
    let exe = std::env::current_exe().context("finding this program's path")?;
    let log_path = worker_log_path(spool);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = Command::new(exe);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.arg("--spool")
        .arg(spool)
        .args(["--log-target", "stderr", "run", "--lock-file"])
        .arg(worker_lock_path(spool))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a terminal's Ctrl-C or cron's end does not
        // reach it; it outlives this command.
        .process_group(0);
    let mut child = cmd.spawn().context("starting the worker")?;
    let pid = child.id() as i32;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        if running_worker(spool)?.is_some() {
            // Reaped by init once we exit; we do not wait for it.
            drop(child);
            return Ok(Ensured::Started(pid));
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the worker exited at once ({status}); see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "the worker did not take its lock within 15 s; see {}",
        log_path.display()
    )
}

/// Stops a lock-holding worker with SIGTERM and waits for it to let go of
/// the lock. Returns its pid, or `None` if none ran.
pub fn stop_worker(spool: &Path) -> anyhow::Result<Option<i32>> {
    let Some(pid) = running_worker(spool)? else {
        return Ok(None);
    };
    if pid > 0 {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if running_worker(spool)?.is_none() {
            return Ok(Some(pid));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("worker {pid} did not stop within 60 s")
}
