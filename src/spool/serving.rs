//! `<spool>/.serving.lock`: who serves the spool.
//!
//! Every live worker holds a shared `flock` on it for its whole life (two
//! workers on one spool both do). Whoever would set queued jobs aside as
//! "nobody will run them" (cleanup's expiry of stale jobs) first takes it
//! exclusively, without waiting: that succeeds only while no worker lives,
//! and a worker that starts meanwhile waits the moment until it is let go.
//! So a job is never expired while a worker could still pick it up, and no
//! job gets two results.
//!
//! The lock is on an open file description: it survives the worker's
//! `execve` when it hands over to a new binary (see `worker::handover`).

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The lock file's name in the spool root.
pub const SERVING_LOCK: &str = ".serving.lock";

/// How long a starting worker waits for an expiry pass to let go.
pub const SERVE_WAIT: Duration = Duration::from_secs(60);

/// The lock file of the spool at `root`.
pub fn serving_lock_path(root: &Path) -> PathBuf {
    root.join(SERVING_LOCK)
}

fn open(root: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o640)
        // A job may have put a link here: never open through it; nor block
        // on a FIFO.
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(serving_lock_path(root))?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file; refusing to use it"));
    }
    Ok(file)
}

/// A worker's shared hold on the spool; let go when dropped (or when the
/// process dies).
#[derive(Debug)]
pub struct Serving {
    file: File,
}

impl Serving {
    /// Takes the shared hold, waiting up to `wait` while an expiry pass
    /// holds the lock exclusively.
    pub fn take(root: &Path, wait: Duration) -> io::Result<Serving> {
        let file = open(root).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("opening {}: {e}", serving_lock_path(root).display()),
            )
        })?;
        let start = Instant::now();
        loop {
            match file.try_lock_shared() {
                Ok(()) => return Ok(Serving { file }),
                Err(TryLockError::WouldBlock) if start.elapsed() < wait => {
                    // An expiry pass moves files for milliseconds.
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        format!(
                            "{} has been held exclusively for {}: another process claims the spool is not served",
                            serving_lock_path(root).display(),
                            humantime::format_duration(wait)
                        ),
                    ));
                }
                Err(TryLockError::Error(e)) => return Err(e),
            }
        }
    }

    /// The descriptor, kept open across `execve` (close-on-exec cleared),
    /// for a new worker to take over with [`Serving::from_fd`].
    pub fn into_inheritable(self) -> io::Result<i32> {
        let fd: OwnedFd = self.file.into();
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )?;
        Ok(fd.into_raw_fd())
    }

    /// Takes over the hold a previous worker passed on (see
    /// [`Serving::into_inheritable`]).
    pub fn from_owned(fd: OwnedFd) -> io::Result<Serving> {
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
        Ok(Serving {
            file: File::from(fd),
        })
    }
}

/// An exclusive hold, taken only while no worker serves the spool: held,
/// no worker can start serving it. `None` when a worker serves it now.
pub fn hold_unserved(root: &Path) -> io::Result<Option<File>> {
    let file = open(root).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("opening {}: {e}", serving_lock_path(root).display()),
        )
    })?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// Whether a worker serves the spool now (without taking anything).
pub fn served(root: &Path) -> io::Result<bool> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(serving_lock_path(root))
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    match file.try_lock() {
        Ok(()) => Ok(false),
        Err(TryLockError::WouldBlock) => Ok(true),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_share_the_hold_and_exclude_an_expiry_pass() {
        let d = tempfile::tempdir().unwrap();
        assert!(!served(d.path()).unwrap());
        let a = Serving::take(d.path(), Duration::ZERO).unwrap();
        let b = Serving::take(d.path(), Duration::ZERO).unwrap();
        assert!(served(d.path()).unwrap());
        assert!(hold_unserved(d.path()).unwrap().is_none());
        drop((a, b));
        assert!(!served(d.path()).unwrap());
        let held = hold_unserved(d.path()).unwrap().expect("no worker serves");
        let err = Serving::take(d.path(), Duration::from_millis(50)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        drop(held);
        Serving::take(d.path(), Duration::ZERO).unwrap();
    }

    #[test]
    fn a_linked_lock_file_is_never_opened() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("elsewhere");
        std::fs::write(&target, "").unwrap();
        std::os::unix::fs::symlink(&target, serving_lock_path(d.path())).unwrap();
        assert!(Serving::take(d.path(), Duration::ZERO).is_err());
        assert!(hold_unserved(d.path()).is_err());
    }
}
