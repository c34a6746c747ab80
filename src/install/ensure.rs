//! `ensure-running`: the cron fallback's keeper. A lock file, not
//! `ps | grep`, decides whether a worker runs: the worker holds an
//! exclusive lock on `<spool>/.worker.lock` for its whole life (and writes
//! its pid there), so "the lock is held" means "a worker is alive".
//!
//! An administrator's `stop` leaves `<spool>/.stopped` (the time, RFC 3339),
//! and `ensure-running` starts no worker while it is there: cron's call every
//! five minutes respects the stop; `start` removes it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::spool::Timestamp;
use crate::spool::safe::SafeDir;

const NOFOLLOW: i32 = nix::fcntl::OFlag::O_NOFOLLOW.bits();

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

impl WorkerLock {
    /// The descriptor, kept open across `execve` (close-on-exec cleared),
    /// for a worker that hands over to a new binary.
    pub fn into_inheritable(self) -> std::io::Result<i32> {
        use std::os::fd::{IntoRawFd, OwnedFd};
        let fd: OwnedFd = self._file.into();
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )?;
        Ok(fd.into_raw_fd())
    }

    /// Takes over the lock a previous worker passed on (see
    /// [`WorkerLock::into_inheritable`]).
    pub fn from_owned(fd: std::os::fd::OwnedFd) -> std::io::Result<WorkerLock> {
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
        Ok(WorkerLock {
            _file: File::from(fd),
        })
    }
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
        // A job may have put a link here: never write through it.
        .custom_flags(NOFOLLOW)
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
    // Read-only and not through a link: whoever asks (root's health check
    // included) only looks. `flock` works on a read-only descriptor.
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(&path)
    {
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

/// An exclusive hold on the spool's serving lock
/// ([`crate::spool::serving`]), taken only while no worker serves the
/// spool: `None` when one does. While it is held, a worker that starts
/// waits for it.
pub fn hold_idle_spool(spool: &Path) -> anyhow::Result<Option<File>> {
    crate::spool::serving::hold_unserved(spool).with_context(|| {
        format!(
            "locking {}",
            crate::spool::serving::serving_lock_path(spool).display()
        )
    })
}

/// How a worker that serves a spool was started, as far as the spool
/// tells: cron's `ensure-running` (it holds the worker lock), or anything
/// else (`ai-cmd-executor run` in a terminal, say: only the serving lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// By the cron fallback (or `start` in cron mode).
    Cron,
    /// In the foreground, by hand: nothing restarts it if it dies.
    Foreground,
}

/// The worker serving the spool where systemd does not run, and how it was
/// started: the cron worker (the worker lock), else a foreground one (the
/// serving lock only).
pub fn local_worker(spool: &Path) -> anyhow::Result<Option<(i32, Started)>> {
    if let Some(pid) = running_worker(spool)? {
        return Ok(Some((pid, Started::Cron)));
    }
    Ok(serving_worker(spool)?.map(|pid| (pid, Started::Foreground)))
}

/// Stops the worker that serves the spool where no systemd service does:
/// cron's (through its lock, [`stop_worker`]), else one started by hand,
/// found as the holder of the serving lock that the kernel names (never a
/// pid a file gives). Sends SIGTERM and waits for it to let go. Returns
/// its pid and how it was started, or `None` if none ran.
pub fn stop_local_worker(spool: &Path) -> anyhow::Result<Option<(i32, Started)>> {
    use std::os::unix::fs::MetadataExt;
    if let Some(pid) = stop_worker(spool)? {
        return Ok(Some((pid, Started::Cron)));
    }
    let Some(pid) = serving_worker(spool)? else {
        return Ok(None);
    };
    let lock = crate::spool::serving::serving_lock_path(spool);
    ensure!(
        pid != 0,
        "a worker serves {}, but which process holds {} cannot be told; not signalling any",
        spool.display(),
        lock.display()
    );
    // A worker runs as the spool's owner. Whoever could replace the lock
    // file (a job, where jobs may write the spool) could make it a link to
    // a file another process holds locked: such a process is not signalled.
    let owner = std::fs::metadata(spool)
        .with_context(|| format!("reading {}", spool.display()))?
        .uid();
    let uid = std::fs::metadata(format!("/proc/{pid}"))
        .with_context(|| format!("reading /proc/{pid}"))?
        .uid();
    ensure!(
        uid == owner,
        "pid {pid} holds {}, but runs as uid {uid}, not as the spool's owner (uid {owner}) as a worker does; not signalling it",
        lock.display()
    );
    match kill(Pid::from_raw(pid), Signal::SIGTERM) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => return Err(e).with_context(|| format!("signalling worker pid {pid}")),
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let gone = kill(Pid::from_raw(pid), None).is_err();
        if gone || lock_holder(&lock)? != Some(pid) {
            return Ok(Some((pid, Started::Foreground)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("worker {pid} did not stop within 60 s")
}

/// The pid of a worker serving the spool (any worker, in any mode: each
/// holds the serving lock), `Some(0)` when one serves it but its pid
/// cannot be told, `None` when none does.
pub fn serving_worker(spool: &Path) -> anyhow::Result<Option<i32>> {
    let path = crate::spool::serving::serving_lock_path(spool);
    if !crate::spool::serving::served(spool)
        .with_context(|| format!("locking {}", path.display()))?
    {
        return Ok(None);
    }
    Ok(Some(lock_holder(&path).ok().flatten().unwrap_or(0)))
}

/// The pid that holds the `flock` on the file at `path`, from
/// `/proc/locks` (matched by device and inode), if any.
pub fn lock_holder(path: &Path) -> anyhow::Result<Option<i32>> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => m,
        Ok(_) => bail!("{} is not a regular file", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let dev = meta.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    // The kernel writes /proc/locks a page per `read` and resumes each
    // read by position in its list, so a lock let go elsewhere meanwhile
    // (a busy host, a test suite) can shift a held one out of a copy:
    // about one read in seventy under heavy churn here. A lock that is
    // held shows in some read of a few.
    for _ in 0..PROC_LOCKS_READS {
        let locks = std::fs::read_to_string("/proc/locks").context("reading /proc/locks")?;
        if let Some(pid) = holder_in(&locks, major, minor, meta.ino(), |pid| {
            has_open(pid, dev, meta.ino())
        }) {
            return Ok(Some(pid));
        }
    }
    Ok(None)
}

/// How many copies of `/proc/locks` [`lock_holder`] reads before it
/// concludes that nobody holds the lock.
const PROC_LOCKS_READS: usize = 5;

/// Whether process `pid` has the file `dev:ino` open, as far as this
/// process may look (its own processes, or any as root).
fn has_open(pid: i32, dev: u64, ino: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| (m.dev(), m.ino()) == (dev, ino)))
}

/// The pid of the `FLOCK` entry on `major:minor:ino` in `/proc/locks`
/// text. On a stacked file system (overlayfs) the lock sits on the lower
/// file's inode, whose device `stat` does not show: then the only entry
/// with the inode number, else the one entry (of those with the inode
/// number, or of all if none has it) whose process has the file open
/// (`holds`), and none if that leaves several.
fn holder_in(
    locks: &str,
    major: u64,
    minor: u64,
    ino: u64,
    holds: impl Fn(i32) -> bool,
) -> Option<i32> {
    // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; a waiter's line
    // has "->" after the number.
    let entries: Vec<(u64, u64, u64, i32)> = locks
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 || f[1] != "FLOCK" {
                return None;
            }
            let mut parts = f[5].split(':');
            let (ma, mi, i) = (parts.next()?, parts.next()?, parts.next()?);
            Some((
                u64::from_str_radix(ma, 16).ok()?,
                u64::from_str_radix(mi, 16).ok()?,
                i.parse().ok()?,
                f[4].parse().ok()?,
            ))
        })
        .collect();
    if let Some(e) = entries
        .iter()
        .find(|e| (e.0, e.1, e.2) == (major, minor, ino))
    {
        return Some(e.3);
    }
    let same: Vec<i32> = entries.iter().filter(|e| e.2 == ino).map(|e| e.3).collect();
    if let [pid] = same.as_slice() {
        return Some(*pid);
    }
    let candidates = if same.is_empty() {
        entries.iter().map(|e| e.3).collect()
    } else {
        same
    };
    let mut holding = candidates.into_iter().filter(|&pid| holds(pid));
    match (holding.next(), holding.next()) {
        (Some(pid), None) => Some(pid),
        _ => None,
    }
}

/// The name of the stop marker in the spool root.
pub const STOPPED_MARKER: &str = ".stopped";

/// The most the stop marker is read of: one line with a time.
const MARKER_MAX: u64 = 256;

/// An administrator's `stop`, as the stop marker records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopMark {
    /// When the worker was stopped (the first `stop`, if there were more).
    pub since: Timestamp,
}

/// Takes the lock that serializes `ensure-running` calls (and the stop
/// marker's creation against them); held until the file is dropped.
fn serial_lock(spool: &Path) -> anyhow::Result<File> {
    let serial_path = spool.join(".ensure-running.lock");
    let serial = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o640)
        .custom_flags(NOFOLLOW)
        .open(&serial_path)
        .with_context(|| format!("opening {}", serial_path.display()))?;
    serial
        .lock()
        .with_context(|| format!("locking {}", serial_path.display()))?;
    Ok(serial)
}

/// Records an administrator's stop in `<spool>/.stopped`, unless one is
/// recorded already (the first stop's time stands). Works as the spool's
/// owner and follows no link: a link or anything but a regular file under
/// that name is refused. Returns the mark in place.
pub fn mark_stopped(spool: &Path) -> anyhow::Result<StopMark> {
    let _as_owner = crate::privilege::lower(spool)?;
    // An `ensure-running` that is starting a worker finishes first (and its
    // worker is then seen and stopped); one that comes later sees the mark.
    let _serial = serial_lock(spool)?;
    if let Some(mark) = read_mark(spool)? {
        return Ok(mark);
    }
    let dir = SafeDir::open(spool)?;
    let since = Timestamp::now();
    let mut file = dir.create_new(STOPPED_MARKER, 0o644)?;
    let path = dir.join(STOPPED_MARKER);
    file.write_all(format!("{since}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(StopMark { since })
}

/// The administrator's stop recorded in `<spool>/.stopped`, if there is
/// one. Read as the spool's owner, through no link.
pub fn stop_mark(spool: &Path) -> anyhow::Result<Option<StopMark>> {
    let _as_owner = crate::privilege::lower(spool)?;
    read_mark(spool)
}

fn read_mark(spool: &Path) -> anyhow::Result<Option<StopMark>> {
    let dir = match SafeDir::open(spool) {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if dir.lstat(STOPPED_MARKER)?.is_none() {
        return Ok(None);
    }
    let file = dir.open_file(STOPPED_MARKER)?;
    let mut text = String::new();
    let path = dir.join(STOPPED_MARKER);
    (&file)
        .take(MARKER_MAX)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(StopMark {
        since: parse_mark(&text).unwrap_or_else(|| {
            // Written by hand, or cut short: the file's own time.
            Timestamp(
                file.metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or_else(|_| std::time::SystemTime::now()),
            )
        }),
    }))
}

/// The time in a stop marker's text (its first line, RFC 3339).
fn parse_mark(text: &str) -> Option<Timestamp> {
    humantime::parse_rfc3339_weak(text.lines().next()?.trim())
        .ok()
        .map(Timestamp)
}

/// Removes the stop marker (the name itself, never what a link there
/// points to), as the spool's owner. Returns whether there was one.
pub fn clear_stopped(spool: &Path) -> anyhow::Result<bool> {
    let _as_owner = crate::privilege::lower(spool)?;
    let dir = match SafeDir::open(spool) {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    if dir.lstat(STOPPED_MARKER)?.is_none() {
        return Ok(false);
    }
    match dir.remove_file(STOPPED_MARKER) {
        Ok(()) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// What `ensure-running` found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    /// A worker was already running (its pid).
    AlreadyRunning(i32),
    /// A worker was started (its pid).
    Started(i32),
    /// None runs, and none was started: an administrator stopped it
    /// (`ai-cmd-executor start` resumes it).
    Stopped(StopMark),
}

/// Starts a detached worker on `spool` unless one holds the lock, or an
/// administrator stopped it (the stop marker). Safe to call many times at
/// once: calls are serialized by a second lock, and the worker lock itself
/// admits one worker only.
pub fn ensure_running(spool: &Path, config: Option<&Path>) -> anyhow::Result<Ensured> {
    crate::spool::Spool::new(spool).ensure_layout()?;
    let _serial = serial_lock(spool)?;

    if let Some(pid) = running_worker(spool)? {
        return Ok(Ensured::AlreadyRunning(pid));
    }
    if let Some(mark) = read_mark(spool)? {
        return Ok(Ensured::Stopped(mark));
    }
    let exe = std::env::current_exe().context("finding this program's path")?;
    let log_path = worker_log_path(spool);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(NOFOLLOW)
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
    // The pid in the file is only a hint that anyone who can write the
    // spool could change: the signal goes to the process that the kernel
    // says holds the lock, and to no other.
    match lock_holder(&worker_lock_path(spool))? {
        Some(holder) if holder == pid => {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        Some(holder) => bail!(
            "{} names pid {pid}, but pid {holder} holds its lock; not signalling either",
            worker_lock_path(spool).display()
        ),
        None => bail!(
            "cannot tell which process holds {}; not signalling pid {pid}",
            worker_lock_path(spool).display()
        ),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_holder_is_read_from_proc_locks() {
        let text = "1: POSIX  ADVISORY  WRITE 10 08:01:77 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 fd:01:77 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 99 fd:01:77 0 EOF\n";
        let none = |_| false;
        assert_eq!(holder_in(text, 0xfd, 1, 77, none), Some(4242));
        assert_eq!(
            holder_in(text, 8, 2, 77, none),
            Some(4242),
            "overlayfs: the one flock on the inode"
        );
        assert_eq!(holder_in(text, 0xfd, 1, 78, none), None);
        let two = "1: FLOCK  ADVISORY  WRITE 5 08:01:77 0 EOF\n\
                   2: FLOCK  ADVISORY  WRITE 6 08:02:77 0 EOF\n";
        assert_eq!(holder_in(two, 8, 3, 77, none), None, "ambiguous");
        assert_eq!(
            holder_in(two, 8, 3, 77, |pid| pid == 6),
            Some(6),
            "the one that has the file open"
        );
        assert_eq!(
            holder_in(two, 8, 3, 99, |pid| pid == 5),
            Some(5),
            "no entry with the inode number (overlayfs xino): the one that has it open"
        );
        assert_eq!(holder_in(two, 8, 3, 99, |_| true), None, "ambiguous");
    }

    #[test]
    fn a_held_lock_is_found_while_other_locks_come_and_go() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let d = tempfile::tempdir().unwrap();
        let path = worker_lock_path(d.path());
        let _lock = acquire_worker_lock(&path).unwrap();
        // Locks taken after ours and let go in the order taken: each
        // release shifts the entries behind it in the kernel's list.
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            for t in 0..2 {
                let (dir, stop) = (d.path(), &stop);
                s.spawn(move || {
                    let files: Vec<File> = (0..75)
                        .map(|i| File::create(dir.join(format!("churn-{t}-{i}"))).unwrap())
                        .collect();
                    while !stop.load(Ordering::Relaxed) {
                        files.iter().for_each(|f| f.lock().unwrap());
                        files.iter().for_each(|f| f.unlock().unwrap());
                    }
                });
            }
            let missed = (0..300)
                .filter(|_| lock_holder(&path).unwrap() != Some(std::process::id() as i32))
                .count();
            stop.store(true, Ordering::Relaxed);
            assert_eq!(
                missed, 0,
                "the held lock was missed in {missed} of 300 looks"
            );
        });
    }

    #[test]
    fn a_held_lock_names_this_process_and_a_planted_pid_is_not_signalled() {
        let d = tempfile::tempdir().unwrap();
        let path = worker_lock_path(d.path());
        let lock = acquire_worker_lock(&path).unwrap();
        assert_eq!(lock_holder(&path).unwrap(), Some(std::process::id() as i32));
        assert_eq!(
            running_worker(d.path()).unwrap(),
            Some(std::process::id() as i32)
        );
        // Whoever can write the spool rewrites the pid: stop refuses.
        std::fs::write(&path, "1\n").unwrap();
        let err = stop_worker(d.path()).unwrap_err();
        assert!(err.to_string().contains("not signalling"), "{err:#}");
        drop(lock);
        assert_eq!(lock_holder(&path).unwrap(), None);
    }

    #[test]
    fn a_lock_holder_that_is_not_the_spools_owner_is_not_signalled() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        // This process holds the serving lock, as a worker would; the
        // spool belongs to someone else (as root: nobody; else this user
        // owns it, and the check cannot be shown).
        let _held = crate::spool::serving::Serving::take(d.path(), Duration::ZERO).unwrap();
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        std::os::unix::fs::chown(d.path(), Some(65534), Some(65534)).unwrap();
        let err = stop_local_worker(d.path()).unwrap_err();
        assert!(err.to_string().contains("not signalling it"), "{err:#}");
        assert!(
            err.to_string()
                .contains(&format!("pid {} holds", std::process::id()))
        );
        assert_eq!(std::fs::metadata(d.path()).unwrap().uid(), 65534);
    }

    #[test]
    fn a_stop_is_marked_once_read_back_and_cleared() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(stop_mark(d.path()).unwrap(), None);
        let first = mark_stopped(d.path()).unwrap();
        assert_eq!(stop_mark(d.path()).unwrap(), Some(first));
        // RFC 3339 on disk, for people too.
        let text = std::fs::read_to_string(d.path().join(STOPPED_MARKER)).unwrap();
        assert_eq!(parse_mark(&text), Some(first.since), "{text}");
        // A second stop keeps the first one's time.
        assert_eq!(mark_stopped(d.path()).unwrap(), first);
        assert!(clear_stopped(d.path()).unwrap());
        assert!(!clear_stopped(d.path()).unwrap());
        assert_eq!(stop_mark(d.path()).unwrap(), None);
        // A spool that is not there has no mark.
        assert_eq!(stop_mark(&d.path().join("absent")).unwrap(), None);
        assert!(!clear_stopped(&d.path().join("absent")).unwrap());
    }

    #[test]
    fn a_marked_stop_keeps_ensure_running_from_starting_a_worker() {
        let d = tempfile::tempdir().unwrap();
        let mark = mark_stopped(d.path()).unwrap();
        // It returns before it would start anything (this test binary).
        assert_eq!(
            ensure_running(d.path(), None).unwrap(),
            Ensured::Stopped(mark)
        );
        assert_eq!(running_worker(d.path()).unwrap(), None);
    }

    #[test]
    fn a_linked_stop_marker_is_refused_and_only_the_link_is_removed() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, d.path().join(STOPPED_MARKER)).unwrap();
        assert!(stop_mark(d.path()).is_err());
        assert!(mark_stopped(d.path()).is_err());
        assert!(ensure_running(d.path(), None).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        assert!(clear_stopped(d.path()).unwrap());
        assert!(target.exists());
        // Text that is no time: the file's own time stands in.
        std::fs::write(d.path().join(STOPPED_MARKER), "by hand\n").unwrap();
        assert!(stop_mark(d.path()).unwrap().is_some());
    }

    #[test]
    fn an_idle_spool_is_held_and_a_served_one_is_not() {
        use crate::spool::serving::{Serving, serving_lock_path};
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let path = serving_lock_path(d.path());
        // Missing: created (0640 at most: the umask may take more), held.
        let held = hold_idle_spool(d.path()).unwrap().expect("nobody holds it");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o137, 0, "{mode:o}");
        // Held so, a worker cannot start serving.
        assert!(Serving::take(d.path(), Duration::ZERO).is_err());
        assert_eq!(
            serving_worker(d.path()).unwrap(),
            Some(std::process::id() as i32)
        );
        drop(held);
        let worker = Serving::take(d.path(), Duration::ZERO).unwrap();
        assert!(hold_idle_spool(d.path()).unwrap().is_none(), "a worker");
        assert_eq!(
            serving_worker(d.path()).unwrap(),
            Some(std::process::id() as i32)
        );
        drop(worker);
        assert_eq!(serving_worker(d.path()).unwrap(), None);
        assert!(hold_idle_spool(d.path()).unwrap().is_some());
    }

    #[test]
    fn an_idle_spool_is_never_held_through_a_link_or_a_fifo() {
        use crate::spool::serving::serving_lock_path;
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("target");
        let path = serving_lock_path(d.path());
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(hold_idle_spool(d.path()).is_err());
        assert!(!target.exists(), "nothing created through the link");
        std::fs::remove_file(&path).unwrap();
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = hold_idle_spool(d.path()).unwrap_err();
        assert!(format!("{err:#}").contains("not a regular file"), "{err:#}");
    }

    #[test]
    fn a_linked_lock_file_is_never_written() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, worker_lock_path(d.path())).unwrap();
        assert!(acquire_worker_lock(&worker_lock_path(d.path())).is_err());
        assert!(running_worker(d.path()).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }
}
