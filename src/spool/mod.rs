//! The spool: the directory tree that is the contract with agents.
//!
//! `tmp/` (writers stage files) → `pending/` (queued jobs) → `running/`
//! (claimed by a worker) → `completed/<id>.json` (latest result), with
//! `logs/<shard>/<id>@<stamp>.log` (one log per run) and `archive/` (bad input,
//! interrupted jobs, rotated logs). See `docs/PROTOCOL.md`.

pub mod acl;
pub mod id;
pub mod job;
pub mod limits;
pub mod reserve;
pub mod result;
pub mod safe;
pub mod serving;

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};

pub use id::{JobId, JobKind};
pub use result::{JobResult, Status, Timestamp, Usage};

/// Errors from spool file operations. Each carries the path involved.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// An I/O call failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done ("creating", "reading", ...).
        what: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A result file does not parse.
    #[error("reading result {}: {source}", path.display())]
    BadResult {
        /// The result file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

impl SpoolError {
    /// Wraps an I/O error with what was being done and to which path.
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        SpoolError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

/// The sub-directories of a spool, with the modes they are created with.
/// `tmp/` and `pending/` are group-writable so that members of the spool's
/// group can submit; the set-group-id bit makes new files inherit the group,
/// and the sticky bit keeps a member from removing or replacing another's
/// file (their default ACL keeps it unreadable too: [`acl`]).
pub const LAYOUT: [(&str, u32); 7] = [
    ("tmp", 0o3770),
    ("pending", 0o3770),
    ("cancel", 0o3770),
    ("running", 0o2750),
    ("completed", 0o2750),
    ("logs", 0o2750),
    ("archive", 0o2750),
];

/// Mode of the spool root when the worker creates it.
pub const ROOT_MODE: u32 = 0o750;

/// Where the parts of one spool live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spool {
    root: PathBuf,
}

impl Spool {
    /// A spool rooted at `root` (nothing is touched on disk).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The spool root.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `tmp/`: where writers stage files before renaming them into `pending/`.
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }
    /// `pending/`: queued jobs.
    pub fn pending(&self) -> PathBuf {
        self.root.join("pending")
    }
    /// `cancel/`: cancel requests, one file per job id, named by the id.
    pub fn cancel(&self) -> PathBuf {
        self.root.join("cancel")
    }
    /// `running/`: jobs a worker has claimed.
    pub fn running(&self) -> PathBuf {
        self.root.join("running")
    }
    /// `completed/`: the latest result of each id.
    pub fn completed(&self) -> PathBuf {
        self.root.join("completed")
    }
    /// `logs/`: one file per run, in 256 shard directories.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    /// `archive/`: bad input, interrupted jobs, rotated logs.
    pub fn archive(&self) -> PathBuf {
        self.root.join("archive")
    }
    /// `archive/rejected/`: job files that were bad input.
    pub fn archive_rejected(&self) -> PathBuf {
        self.archive().join("rejected")
    }
    /// `archive/cancelled/`: job files withdrawn from `pending/` by a cancel.
    pub fn archive_cancelled(&self) -> PathBuf {
        self.archive().join("cancelled")
    }
    /// `archive/interrupted/`: job files whose run was interrupted.
    pub fn archive_interrupted(&self) -> PathBuf {
        self.archive().join("interrupted")
    }

    /// `completed/<id>.json`.
    pub fn result_path(&self, id: &JobId) -> PathBuf {
        self.completed().join(format!("{id}.json"))
    }

    /// `logs/<shard>/`: the directory that holds the logs of `id`.
    pub fn log_dir(&self, id: &JobId) -> PathBuf {
        self.logs().join(log_shard(id))
    }

    /// `logs/<shard>/<id>@<stamp>.log`: the log of the run of `id` started
    /// at `started`.
    pub fn log_path(&self, id: &JobId, started: Timestamp) -> PathBuf {
        self.log_dir(id)
            .join(format!("{id}@{}.log", started.file_stamp()))
    }

    /// Creates any missing part of the layout with the modes of [`LAYOUT`].
    /// Existing directories are left as they are.
    ///
    /// The queue directories it owns get what keeps members' jobs apart
    /// whether new or not: the sticky bit and the default ACL of
    /// [`acl`] naming this process's user, so a spool made before those
    /// existed gets them at the worker's next start.
    pub fn ensure_layout(&self) -> Result<(), SpoolError> {
        create_dir_with_mode(&self.root, ROOT_MODE, true)?;
        for (name, mode) in LAYOUT {
            create_dir_with_mode(&self.root.join(name), mode, false)?;
        }
        let me = nix::unistd::geteuid().as_raw();
        let root = safe::SafeDir::open(&self.root)
            .map_err(|e| SpoolError::io("opening", &self.root, io::Error::other(e)))?;
        for name in acl::QUEUE_DIRS {
            let dir = root.dir(name).map_err(|e| {
                SpoolError::io("opening", self.root.join(name), io::Error::other(e))
            })?;
            let meta = dir
                .meta()
                .map_err(|e| SpoolError::io("opening", dir.path(), io::Error::other(e)))?;
            if meta.uid != me {
                continue;
            }
            if meta.perm() & 0o1000 == 0 {
                dir.set_mode(meta.perm() | 0o1000).map_err(|e| {
                    SpoolError::io("setting the sticky bit of", dir.path(), io::Error::other(e))
                })?;
            }
            if acl::state(&dir, me)
                .map_err(|e| SpoolError::io("reading the ACL of", dir.path(), e))?
                == acl::AclState::Missing
            {
                acl::set(&dir, me)
                    .map_err(|e| SpoolError::io("setting the default ACL of", dir.path(), e))?;
            }
        }
        Ok(())
    }

    /// Reads `completed/<id>.json`, `None` if there is none.
    pub fn read_result(&self, id: &JobId) -> Result<Option<JobResult>, SpoolError> {
        let path = self.result_path(id);
        // Not through a link a job planted in place of the result.
        let read = OpenOptions::new()
            .read(true)
            .custom_flags(libc_flags::O_NOFOLLOW | libc_flags::O_NONBLOCK)
            .open(&path)
            .and_then(|mut f| {
                let mut bytes = Vec::new();
                io::Read::read_to_end(&mut f, &mut bytes).map(|_| bytes)
            });
        match read {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| SpoolError::BadResult { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SpoolError::io("reading", path, e)),
        }
    }

    /// Writes `completed/<id>.json` atomically: a temporary file in the same
    /// directory, written, fsynced, then renamed over the old result.
    pub fn write_result(&self, result: &JobResult) -> Result<(), SpoolError> {
        self.stage_result(result)?.commit()
    }

    /// The first half of [`Spool::write_result`]: the result written to its
    /// temporary file, not yet synced or in place. See [`Staged`].
    pub fn stage_result(&self, result: &JobResult) -> Result<Staged, SpoolError> {
        let dir = self.completed();
        let name = format!("{}.json", result.id);
        Staged::write(&dir, &name, &result_bytes(result), 0o640)
    }

    /// The newest log of `id` (the greatest of its names in its shard).
    pub fn latest_log(&self, id: &JobId) -> Result<Option<PathBuf>, SpoolError> {
        let dir = self.log_dir(id);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(SpoolError::io("listing", dir, e)),
        };
        let mut best: Option<String> = None;
        for entry in entries {
            let entry = entry.map_err(|e| SpoolError::io("listing", &dir, e))?;
            if let Some(name) = entry.file_name().to_str()
                && log_name_parts(name).is_some_and(|(of, _)| of == id.as_str())
                && best.as_deref().is_none_or(|b| name > b)
            {
                best = Some(name.to_owned());
            }
        }
        Ok(best.map(|b| dir.join(b)))
    }

    /// A path under the spool written relative to its root, as results hold it.
    pub fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned()
    }

    /// Where the job file of `id` is, if it is pending or running.
    pub fn find_queued(&self, id: &JobId) -> Option<(QueueState, PathBuf)> {
        for (state, dir) in [
            (QueueState::Pending, self.pending()),
            (QueueState::Running, self.running()),
        ] {
            for kind in JobKind::ALL {
                let p = dir.join(id::job_file_name(id, kind));
                if fs::symlink_metadata(&p).is_ok() {
                    return Some((state, p));
                }
            }
        }
        None
    }
}

/// A result as its file holds it: pretty JSON and a final newline.
fn result_bytes(result: &JobResult) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(result).expect("a result always serializes");
    bytes.push(b'\n');
    bytes
}

/// Writes `<id>.json` into `completed`, the opened `completed/`, as
/// [`Spool::write_result`] does (a temporary file, written, synced, then
/// renamed into place), except that it replaces nothing and follows no
/// link: the temporary file `.<id>.json.<pid>.<n>.tmp` is created with
/// `O_EXCL | O_NOFOLLOW` in the opened directory, and the rename is
/// `RENAME_NOREPLACE`. For the tools that record a result while no worker
/// runs (an expired job), in a directory that jobs can write.
///
/// Returns the inode of the result it wrote, or `None` when the name is
/// taken (by a result, or by anything else: a planted link stays as it is).
pub fn create_result(
    completed: &safe::SafeDir,
    result: &JobResult,
) -> Result<Option<u64>, safe::SafeError> {
    use std::os::unix::fs::MetadataExt;
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = format!("{}.json", result.id);
    let mut tries = 0;
    let (tmp, mut file) = loop {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = format!(".{name}.{}.{seq}.tmp", std::process::id());
        match completed.create_new(&tmp, 0o640) {
            Ok(f) => break (tmp, f),
            Err(safe::SafeError::Io { source, .. })
                if source.kind() == io::ErrorKind::AlreadyExists && tries < 100 =>
            {
                tries += 1;
            }
            Err(e) => return Err(e),
        }
    };
    let written = (|| {
        let io_err = |e| safe::SafeError::Io {
            what: "writing",
            path: completed.join(&tmp),
            source: e,
        };
        file.write_all(&result_bytes(result)).map_err(io_err)?;
        file.sync_all().map_err(io_err)?;
        let ino = file.metadata().map_err(io_err)?.ino();
        Ok(completed
            .rename_noreplace(&tmp, completed, &name)?
            .then_some(ino))
    })();
    if !matches!(written, Ok(Some(_))) {
        let _ = completed.remove_file(&tmp);
    }
    written
}

/// The shard of `logs/` for `id`: the low byte, as two lower-case hex
/// digits, of the 32-bit FNV-1a hash of the id's bytes. Sharding keeps a
/// new id from costing a directory of its own (an inode allocation per job)
/// while a lookup by id still lists only 1/256 of the logs.
pub fn log_shard(id: &JobId) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in id.as_str().bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{:02x}", h & 0xff)
}

/// Splits a log file name `<id>@<stamp>.log` into the id and the time its
/// run started; `None` for any other name.
pub fn log_name_parts(name: &str) -> Option<(&str, Timestamp)> {
    let (id, stamp) = name.strip_suffix(".log")?.rsplit_once('@')?;
    if id.is_empty() || id.starts_with('.') {
        return None;
    }
    Some((id, Timestamp::from_file_stamp(stamp)?))
}

/// When the run whose log is at `path` started, from the log's name.
pub fn log_started(path: &Path) -> Option<Timestamp> {
    log_name_parts(path.file_name()?.to_str()?).map(|(_, t)| t)
}

/// Whether a job file is waiting or being run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueState {
    /// In `pending/`.
    Pending,
    /// In `running/`.
    Running,
}

fn create_dir_with_mode(path: &Path, mode: u32, recursive: bool) -> Result<(), SpoolError> {
    let made = if recursive {
        if path.is_dir() {
            Ok(false)
        } else {
            fs::create_dir_all(path).map(|()| true)
        }
    } else {
        match fs::create_dir(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(false),
            Err(e) => Err(e),
        }
    }
    .map_err(|e| SpoolError::io("creating directory", path, e))?;
    if made {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|e| SpoolError::io("setting the mode of", path, e))?;
    }
    Ok(())
}

/// Writes `dir/name` atomically: `dir/.name.<pid>.<n>.tmp`, fsync, rename.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), SpoolError> {
    Staged::write(dir, name, bytes, mode)?.commit()
}

/// A file on its way to `dir/name` by [`write_atomically`]'s steps, between
/// the write and the fsync: written in full to its temporary name, with its
/// write-back started, not yet synced or renamed into place.
///
/// Staging several files before committing any lets one journal commit make
/// them all durable: on ext4 (and other journaling file systems) the first
/// `fsync` commits the running transaction, which by then holds every staged
/// file's block allocation, so the later ones find their data already safe
/// and return without a commit of their own. Committed one at a time, each
/// result would cost a journal commit and a flush of the disk's cache.
///
/// Dropped without [`Staged::commit`], the temporary file is removed.
#[derive(Debug)]
pub struct Staged {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
}

impl Staged {
    /// Writes `bytes` to a new temporary file beside `dir/name` and starts
    /// its write-back.
    pub fn write(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<Self, SpoolError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        // A new file, never an existing name: `O_EXCL` (which also refuses
        // a symbolic link, dangling or not) and `O_NOFOLLOW`, so a link
        // planted under the predictable name in a directory others can
        // write (`tmp/`) cannot redirect the write. A taken name is skipped.
        let mut tries = 0;
        let (tmp, mut f) = loop {
            let seq = SEQ.fetch_add(1, Ordering::Relaxed);
            let tmp = dir.join(format!(".{name}.{}.{seq}.tmp", std::process::id()));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc_flags::O_NOFOLLOW)
                .mode(mode)
                .open(&tmp)
            {
                Ok(f) => break (tmp, f),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 100 => tries += 1,
                Err(e) => return Err(SpoolError::io("writing", &tmp, e)),
            }
        };
        let mut staged = Staged {
            file: None,
            tmp,
            dest: dir.join(name),
        };
        // From here on, dropping `staged` removes the file.
        let written = f.write_all(bytes);
        staged.file = Some(f);
        written.map_err(|e| SpoolError::io("writing", &staged.tmp, e))?;
        if let Some(f) = &staged.file {
            start_writeback(f);
        }
        Ok(staged)
    }

    /// Syncs the file and renames it into place.
    pub fn commit(mut self) -> Result<(), SpoolError> {
        let Some(file) = self.file.take() else {
            unreachable!("a staged file is open until committed")
        };
        if let Err(e) = file.sync_all() {
            return Err(SpoolError::io("writing", &self.tmp, e));
        }
        drop(file);
        fs::rename(&self.tmp, &self.dest)
            .map_err(|e| SpoolError::io("renaming into place", &self.dest, e))?;
        // In place: nothing left for `drop` to remove.
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Starts writing `file`'s dirty pages to disk without waiting for them.
/// `POSIX_FADV_DONTNEED` does this first on Linux ("flush, then drop what
/// is clean"; pages still under write-back are kept), and is the one way to
/// ask for it that needs no `unsafe` (`sync_file_range` has no safe binding
/// in nix or rustix). Only a hint: a failure changes nothing but speed, and
/// the `fsync` in [`Staged::commit`] is what makes the file durable.
fn start_writeback(file: &File) {
    let _ = nix::fcntl::posix_fadvise(
        file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// Renames `from` to `to` unless `to` exists (`renameat2(RENAME_NOREPLACE)`).
/// Returns `Ok(false)` when `to` exists. File systems without the flag fall
/// back to link + unlink, which also never replaces.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<bool> {
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(true),
        Err(Errno::EEXIST) => Ok(false),
        Err(Errno::EINVAL | Errno::ENOSYS) => match fs::hard_link(from, to) {
            Ok(()) => fs::remove_file(from).map(|()| true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        },
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Moves `from` into directory `dir` under its own name plus a time stamp,
/// so nothing already there is replaced. Returns the new path.
pub fn move_into(from: &Path, dir: &Path) -> io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let name = from.file_name().unwrap_or(OsStr::new("unnamed"));
    let stamp = Timestamp::now().file_stamp();
    for n in 0u32.. {
        let mut target = name.to_os_string();
        target.push(format!(".{stamp}"));
        if n > 0 {
            target.push(format!(".{n}"));
        }
        let to = dir.join(&target);
        if rename_noreplace(from, &to)? {
            return Ok(to);
        }
    }
    unreachable!("u32 range exhausted")
}

/// Opens a file for reading without following a final symlink and without
/// blocking on a FIFO.
///
/// Also with `O_NOATIME` where allowed (the file's owner, or a process with
/// `CAP_FOWNER` such as a root worker): the first read of a new file would
/// otherwise update its access time (`relatime` updates it while it is not
/// after the modification time, which holds for every new job file), and on
/// a journaling file system that is an inode update, in the journal, on the
/// claim's path between two jobs, where it can wait behind a commit. Once
/// refused (`EPERM`: a file of another user, without the capability), the
/// flag is not tried again.
pub fn open_job_file(path: &Path) -> io::Result<File> {
    static NOATIME_REFUSED: AtomicBool = AtomicBool::new(false);
    let open = |extra: i32| {
        OpenOptions::new()
            .read(true)
            .custom_flags(
                libc_flags::O_NOFOLLOW | libc_flags::O_NONBLOCK | libc_flags::O_NOCTTY | extra,
            )
            .open(path)
    };
    if !NOATIME_REFUSED.load(Ordering::Relaxed) {
        match open(libc_flags::O_NOATIME) {
            Err(e) if e.raw_os_error() == Some(Errno::EPERM as i32) => {
                NOATIME_REFUSED.store(true, Ordering::Relaxed);
            }
            opened => return opened,
        }
    }
    open(0)
}

mod libc_flags {
    pub const O_NOATIME: i32 = nix::fcntl::OFlag::O_NOATIME.bits();
    pub const O_NOFOLLOW: i32 = nix::fcntl::OFlag::O_NOFOLLOW.bits();
    pub const O_NONBLOCK: i32 = nix::fcntl::OFlag::O_NONBLOCK.bits();
    pub const O_NOCTTY: i32 = nix::fcntl::OFlag::O_NOCTTY.bits();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_created_with_modes() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path().join("s"));
        spool.ensure_layout().unwrap();
        for (name, _) in LAYOUT {
            assert!(spool.root().join(name).is_dir(), "{name}");
        }
        let mode = fs::metadata(spool.pending()).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o3770);
        let mode = fs::metadata(spool.completed())
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o2750);
        spool.ensure_layout().unwrap();
    }

    #[test]
    fn results_are_written_atomically_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.ensure_layout().unwrap();
        let id = JobId::new("a").unwrap();
        assert!(spool.read_result(&id).unwrap().is_none());
        let t = Timestamp::now();
        let r = JobResult {
            id: "a".into(),
            status: Status::Succeeded,
            exit_code: Some(0),
            signal: None,
            started_at: t,
            finished_at: t,
            duration_ms: 1,
            log: None,
            output_truncated: false,
            error: None,
            attempt: 1,
            submitted_by: None,
            usage: crate::spool::Usage::default(),
            limits: None,
            submitted_via: None,
            cancelled_by: None,
        };
        spool.write_result(&r).unwrap();
        assert_eq!(spool.read_result(&id).unwrap().unwrap(), r);
        let names: Vec<_> = fs::read_dir(spool.completed()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn created_results_replace_nothing_and_follow_no_link() {
        use std::os::unix::fs::{MetadataExt, symlink};
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.ensure_layout().unwrap();
        let completed = safe::SafeDir::open(&spool.completed()).unwrap();
        let t = Timestamp::now();
        let mut r = JobResult {
            id: "a".into(),
            status: Status::Expired,
            exit_code: None,
            signal: None,
            started_at: t,
            finished_at: t,
            duration_ms: 0,
            log: None,
            output_truncated: false,
            error: Some("expired".into()),
            attempt: 1,
            submitted_by: None,
            usage: crate::spool::Usage::default(),
            limits: None,
            submitted_via: None,
            cancelled_by: None,
        };
        let ino = create_result(&completed, &r).unwrap().expect("written");
        let id = JobId::new("a").unwrap();
        assert_eq!(spool.read_result(&id).unwrap().unwrap(), r);
        assert_eq!(fs::metadata(spool.result_path(&id)).unwrap().ino(), ino);
        // Taken: by a result, or by a link to a file elsewhere.
        r.error = Some("second".into());
        assert_eq!(create_result(&completed, &r).unwrap(), None);
        assert_eq!(
            spool.read_result(&id).unwrap().unwrap().error.as_deref(),
            Some("expired")
        );
        let target = dir.path().join("target");
        fs::write(&target, "keep").unwrap();
        symlink(&target, spool.completed().join("b.json")).unwrap();
        r.id = "b".into();
        assert_eq!(create_result(&completed, &r).unwrap(), None);
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
        assert!(
            fs::symlink_metadata(spool.completed().join("b.json"))
                .unwrap()
                .is_symlink()
        );
        let mut names: Vec<_> = fs::read_dir(spool.completed())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["a.json", "b.json"], "no temporary file is left");
    }

    #[test]
    fn staged_files_appear_only_when_committed_and_vanish_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let names = || -> Vec<String> {
            let mut v: Vec<_> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        };
        fs::write(dir.path().join("a"), "old").unwrap();
        let a = Staged::write(dir.path(), "a", b"new a", 0o640).unwrap();
        let b = Staged::write(dir.path(), "b", b"new b", 0o600).unwrap();
        // Both staged: the old `a` is untouched and `b` has no name yet.
        assert_eq!(fs::read(dir.path().join("a")).unwrap(), b"old");
        assert!(!dir.path().join("b").exists());
        assert_eq!(names().len(), 3, "{:?}", names());
        a.commit().unwrap();
        drop(b);
        assert_eq!(names(), ["a"], "the dropped stage left nothing behind");
        assert_eq!(fs::read(dir.path().join("a")).unwrap(), b"new a");
        let mode = fs::metadata(dir.path().join("a")).unwrap().permissions();
        assert_eq!(
            mode.mode() & 0o007,
            0,
            "the staged mode, not the old file's"
        );
    }

    #[test]
    fn reading_a_job_file_leaves_its_access_time() {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        let fresh = |name: &str| {
            let path = dir.path().join(name);
            fs::write(&path, "{\"command\": \"true\"}").unwrap();
            let f = File::options().write(true).open(&path).unwrap();
            f.set_times(fs::FileTimes::new().set_accessed(hour_ago))
                .unwrap();
            path
        };
        let atime = |path: &Path| fs::metadata(path).unwrap().atime();
        // The control: a plain read updates it, unless the mount says
        // noatime, and then there is nothing to show.
        let plain = fresh("plain");
        let before = atime(&plain);
        fs::read(&plain).unwrap();
        if atime(&plain) == before {
            eprintln!(
                "skipped: {} does not update access times",
                dir.path().display()
            );
            return;
        }
        let job = fresh("job");
        let before = atime(&job);
        let mut text = String::new();
        open_job_file(&job)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "{\"command\": \"true\"}");
        assert_eq!(atime(&job), before, "O_NOATIME, as the owner of the file");
    }

    #[test]
    fn noreplace_rename_and_move_into() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        fs::write(&a, "1").unwrap();
        fs::write(&b, "2").unwrap();
        assert!(!rename_noreplace(&a, &b).unwrap());
        assert_eq!(fs::read_to_string(&b).unwrap(), "2");
        let arch = dir.path().join("arch");
        let p1 = move_into(&a, &arch).unwrap();
        fs::write(&a, "3").unwrap();
        let p2 = move_into(&a, &arch).unwrap();
        assert_ne!(p1, p2);
        assert_eq!(fs::read_to_string(p1).unwrap(), "1");
    }

    #[test]
    fn latest_log_is_the_greatest_name() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        let id = JobId::new("x").unwrap();
        assert!(spool.latest_log(&id).unwrap().is_none());
        fs::create_dir_all(spool.log_dir(&id)).unwrap();
        for n in [
            "x@20261126T000000.000001Z.log",
            "x@20261126T000000.000003Z.log",
            "x@20261126T000000.000002Z.log",
            // Other ids sharing the shard, and stray names, are not x's.
            "x.y@20261126T000000.000009Z.log",
            "y@20261126T000000.000009Z.log",
            "x@notastamp.log",
            "notes.txt",
        ] {
            fs::write(spool.log_dir(&id).join(n), "").unwrap();
        }
        let latest = spool.latest_log(&id).unwrap().unwrap();
        assert!(latest.ends_with("x@20261126T000000.000003Z.log"));
        assert_eq!(
            log_started(&latest),
            Timestamp::from_file_stamp("20261126T000000.000003Z")
        );
    }

    #[test]
    fn log_shards_are_stable_and_spread() {
        // The documented function (docs/PROTOCOL.md): FNV-1a 32-bit, low byte.
        assert_eq!(log_shard(&JobId::new("a").unwrap()), "2c");
        assert_eq!(
            log_shard(&JobId::new("build-7").unwrap()),
            log_shard(&JobId::new("build-7").unwrap())
        );
        let shards: std::collections::HashSet<String> = (0..2000)
            .map(|i| log_shard(&JobId::new(&format!("job-{i}")).unwrap()))
            .collect();
        assert_eq!(shards.len(), 256);
        let path = Spool::new("/s").log_path(
            &JobId::new("a").unwrap(),
            Timestamp::from_file_stamp("20261126T000000.000001Z").unwrap(),
        );
        assert_eq!(path, Path::new("/s/logs/2c/a@20261126T000000.000001Z.log"));
    }

    #[test]
    fn a_link_planted_under_a_staged_name_is_never_written_through() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, "keep").unwrap();
        let tmp = dir.path().join("tmp");
        fs::create_dir(&tmp).unwrap();
        // Every name the next writes could pick, for this process.
        for n in 0..400 {
            let name = format!(".r.{}.{n}.tmp", std::process::id());
            symlink(&target, tmp.join(name)).unwrap();
        }
        for _ in 0..3 {
            // Taken names are skipped or the write fails; neither writes
            // through a link.
            let _ = write_atomically(&tmp, "r", b"new", 0o640);
        }
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
    }
}
