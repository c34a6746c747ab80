//! Handing the worker over to a new binary while its jobs run on.
//!
//! An upgrade replaces `/usr/bin/ai-cmd-executor` and reloads the service.
//! When a reload (`SIGHUP`) finds that the file the worker was started
//! from has been replaced, the worker re-executes itself, as nginx and
//! systemd do for their own upgrades:
//!
//! 1. It checks that the new binary runs (`--version`) and that the
//!    configuration loads; otherwise it carries on as it is.
//! 2. It stops claiming. Each slot stops following its job, without
//!    signalling it, and sets it aside: the process (a child of this
//!    process, which `execve` keeps), the read end of its output pipe, its
//!    log file with the bytes written so far, its kill sequence and
//!    deadlines, and the locked job file in `running/`. Results already
//!    due are written first.
//! 3. It writes that state as JSON into a memfd, clears close-on-exec on
//!    the descriptors it names, and `execve`s the new binary with the same
//!    arguments and [`ENV`] naming the memfd. The process id stays the
//!    same, so systemd's main pid, the watchdog and the jobs' parent do
//!    too.
//! 4. The new worker takes the descriptors back, follows each job from
//!    where it was (its output, timeout and result), recovers `running/`
//!    around them and serves as usual, then sends `READY=1`.
//!
//! If `execve` fails, this process takes the jobs back the same way. A new
//! binary that cannot read the state (a format it does not know) kills
//! the jobs' process groups and records them `interrupted`, as a restart
//! would have: the state never silently disappears.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::claim;
use super::exec::{Followed, WireJob, inheritable, set_cloexec};
use super::slots::{Handed, InHand};
use crate::spool::id::parse_job_file_name;
use crate::spool::job::Job;
use crate::spool::serving::Serving;

/// The environment variable that names the hand-over's memfd.
pub const ENV: &str = "AI_CMD_EXECUTOR_HANDOVER";

/// The format of the state; a worker takes over only a format it knows.
const FORMAT: u32 = 1;

/// The largest state read back (a few hundred bytes per job).
const MAX_STATE: u64 = 64 << 20;

/// What one worker passes to the next across `execve`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Wire {
    /// The state's format ([`FORMAT`]).
    pub format: u32,
    /// The cron fallback's worker lock (`run --lock-file`), if held.
    pub lock_fd: Option<i32>,
    /// The spool's serving lock.
    pub serving_fd: Option<i32>,
    /// A stop that arrived during the hand-over (`SIGTERM`, `SIGINT`): the
    /// new worker begins it at once.
    pub stop: Option<String>,
    /// The running jobs.
    pub jobs: Vec<WireSlotJob>,
}

/// A running job as passed on: its file in `running/`, the locked
/// descriptor of that file, and how it is followed.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireSlotJob {
    /// The job's file in `running/`.
    pub running_path: PathBuf,
    /// That file, open and locked.
    pub job_fd: i32,
    /// Its process, output and log.
    pub followed: WireJob,
}

/// What a new worker takes over: the jobs, the serving lock, and a stop to
/// begin.
#[derive(Debug, Default)]
pub struct Inherited {
    pub(super) jobs: Vec<Handed>,
    pub(super) serving: Option<Serving>,
    pub(super) stop: Option<String>,
}

impl std::fmt::Debug for Handed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handed")
            .field("id", &self.followed.id)
            .field("running_path", &self.held.running_path)
            .finish_non_exhaustive()
    }
}

/// A worker that has stopped following its jobs and is ready to hand them
/// to `binary`.
#[derive(Debug)]
pub struct Handover {
    /// The binary to execute.
    pub binary: PathBuf,
    /// What it is given.
    pub wire: Wire,
}

impl Handover {
    /// Builds the state from the jobs set aside and the serving lock.
    pub(super) fn new(
        binary: PathBuf,
        jobs: Vec<Handed>,
        serving: Option<Serving>,
        stop: Option<String>,
    ) -> Handover {
        let mut wire = Wire {
            format: FORMAT,
            stop,
            ..Wire::default()
        };
        wire.serving_fd = serving.and_then(|s| s.into_inheritable().ok());
        for h in jobs {
            let id = h.followed.id.clone();
            let job_fd = match inheritable(h.held.lock.into()) {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::error!(cmd_id = %id, "cannot pass the job file on: {e}");
                    continue;
                }
            };
            match h.followed.into_wire() {
                Ok(followed) => wire.jobs.push(WireSlotJob {
                    running_path: h.held.running_path,
                    job_fd,
                    followed,
                }),
                Err(e) => tracing::error!(cmd_id = %id, "cannot pass the job on: {e}"),
            }
        }
        Handover { binary, wire }
    }

    /// Re-executes `binary` with this process's arguments and the state.
    /// Returns only if that failed: with the state, for this process to
    /// take back ([`Inherited::take`]).
    pub fn exec(self) -> (anyhow::Error, Wire) {
        let memfd = match write_state(&self.wire) {
            Ok(fd) => fd,
            Err(e) => return (e, self.wire),
        };
        let mut args = std::env::args_os();
        let argv0 = args.next().unwrap_or_else(|| self.binary.clone().into());
        let err = std::process::Command::new(&self.binary)
            .arg0(argv0)
            .args(args)
            .env(ENV, memfd.to_string())
            .exec();
        // Still here: the memfd is ours to close.
        drop(adopt_fd(memfd));
        (
            anyhow::Error::new(err).context(format!("executing {}", self.binary.display())),
            self.wire,
        )
    }
}

/// Takes ownership of descriptor `fd`, which a previous worker (this
/// process before its `execve`) left open to pass something on: the state's
/// memfd, a lock, a job's pipe or log. Each number the state names is
/// taken once, by the one piece of code that reads that field.
///
/// One of the crate's three `unsafe` blocks (the others reap a job with
/// `wait4` and call `malloc_trim`): Rust cannot know who owns an inherited
/// descriptor number. It
/// refuses numbers that cannot be such a descriptor (standard streams,
/// negative) or that are not open.
pub fn adopt_fd(fd: i32) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(io::Error::other(format!(
            "descriptor {fd} cannot be one a worker passed on"
        )));
    }
    // Open, and not one of the runtime's own (those are close-on-exec and
    // so were closed by the `execve`; the state names only what it kept).
    std::fs::symlink_metadata(format!("/proc/self/fd/{fd}"))
        .map_err(|e| io::Error::new(e.kind(), format!("descriptor {fd} is not open: {e}")))?;
    #[allow(unsafe_code)]
    // SAFETY: `fd` is open (checked above) and was left open across
    // `execve` by the previous worker for exactly this hand-over; no other
    // code in this process owns it or has taken it (each number is adopted
    // once, by the reader of the field that names it).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(owned)
}

/// Writes the state into a memfd that stays open across `execve`.
fn write_state(wire: &Wire) -> anyhow::Result<i32> {
    let fd = rustix::fs::memfd_create("ai-cmd-executor-handover", rustix::fs::MemfdFlags::empty())
        .context("creating the hand-over memfd")?;
    let mut file = File::from(fd);
    serde_json::to_writer(&mut file, wire).context("writing the hand-over state")?;
    file.flush()?;
    file.rewind()?;
    Ok(inheritable(file.into())?)
}

/// The state a previous worker passed on, if this process was started by
/// a hand-over: read from the memfd [`ENV`] names, which is closed.
pub fn from_env() -> anyhow::Result<Option<Wire>> {
    let Some(value) = std::env::var_os(ENV) else {
        return Ok(None);
    };
    let fd: i32 = std::str::from_utf8(value.as_bytes())
        .ok()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{ENV}={} is not a descriptor number", value.display()))?;
    // A variable set by someone else than a previous worker names a
    // descriptor that is not a memfd: refuse it rather than read it.
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .with_context(|| format!("{ENV}={fd}: no such descriptor"))?;
    anyhow::ensure!(
        link.as_os_str()
            .as_bytes()
            .starts_with(b"/memfd:ai-cmd-executor-handover"),
        "{ENV}={fd} does not name a hand-over state (it is {})",
        link.display()
    );
    let mut file = File::from(adopt_fd(fd)?);
    let mut text = Vec::new();
    (&mut file)
        .take(MAX_STATE)
        .read_to_end(&mut text)
        .context("reading the hand-over state")?;
    let value: serde_json::Value =
        serde_json::from_slice(&text).context("reading the hand-over state")?;
    let format = value.get("format").and_then(serde_json::Value::as_u64);
    if format != Some(u64::from(FORMAT)) {
        // A format from a newer binary (a downgrade): the jobs cannot be
        // followed. Their processes are stopped, and recovery records them.
        abandon(&value);
        anyhow::bail!(
            "the previous worker passed its jobs on in format {format:?}, which this version does not know; they were stopped and are recorded interrupted"
        );
    }
    Ok(Some(
        serde_json::from_value(value).context("reading the hand-over state")?,
    ))
}

/// Stops the processes named in a state that cannot be taken over.
fn abandon(value: &serde_json::Value) {
    let jobs = value.get("jobs").and_then(serde_json::Value::as_array);
    for job in jobs.into_iter().flatten() {
        let pid = job
            .pointer("/followed/pid")
            .and_then(serde_json::Value::as_i64)
            .and_then(|p| i32::try_from(p).ok());
        if let Some(pid) = pid.filter(|p| *p > 1) {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
        }
    }
}

impl Inherited {
    /// Takes over what `wire` names: descriptors become this process's
    /// again (close-on-exec set), and each job is read back from its file.
    /// A job that cannot be taken over is stopped; recovery records it.
    pub fn take(wire: Wire) -> Inherited {
        let mut out = Inherited {
            stop: wire.stop,
            ..Inherited::default()
        };
        if let Some(fd) = wire.serving_fd {
            match adopt_fd(fd).and_then(Serving::from_owned) {
                Ok(s) => out.serving = Some(s),
                Err(e) => tracing::warn!("cannot take over the serving lock: {e}"),
            }
        }
        for job in wire.jobs {
            let id = job.followed.id.clone();
            let pid = job.followed.pid;
            match take_job(job) {
                Ok(h) => out.jobs.push(h),
                Err(e) => {
                    tracing::error!(cmd_id = %id, "cannot take over the job: {e:#}; it is stopped and recorded interrupted");
                    if pid > 1 {
                        let pid = nix::unistd::Pid::from_raw(pid);
                        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
                        let _ = nix::sys::wait::waitpid(pid, None);
                    }
                }
            }
        }
        out
    }
}

fn take_job(job: WireSlotJob) -> anyhow::Result<Handed> {
    let fd = adopt_fd(job.job_fd)?;
    set_cloexec(&fd)?;
    let mut lock = File::from(fd);
    // The descriptor must still be the file in running/ (same inode).
    let on_disk = std::fs::symlink_metadata(&job.running_path)
        .with_context(|| format!("{}", job.running_path.display()))?;
    let held = lock.metadata()?;
    anyhow::ensure!(
        on_disk.ino() == held.ino() && on_disk.dev() == held.dev(),
        "{} is no longer the job's file",
        job.running_path.display()
    );
    let name = job
        .running_path
        .file_name()
        .context("a job file path without a name")?;
    let (_, kind) = parse_job_file_name(name).map_err(|e| anyhow::anyhow!("{e}"))?;
    lock.rewind()?;
    let bytes = claim::read_bounded(&mut lock, MAX_STATE)
        .map_err(|_| anyhow::anyhow!("reading {}", job.running_path.display()))?;
    let parsed = Job::parse(kind, &bytes).ok();
    let command = parsed.as_ref().map(|j| claim::digest(j, &bytes));
    let followed = Followed::from_wire(job.followed)?;
    let job_spec = parsed.unwrap_or_else(|| {
        let mut j = Job::placeholder();
        j.attempt = followed.attempt;
        j
    });
    Ok(Handed {
        followed: Box::new(followed),
        held: InHand {
            job: job_spec,
            running_path: job.running_path,
            lock,
            command,
        },
    })
}

/// The signals the event loop handles. At a hand-over, once the slot and
/// recorder threads are gone, the loop's thread (the only one left) blocks
/// them: a signal that comes then stays pending across `execve` for the new
/// worker, instead of being taken by a handler whose process image is about
/// to go; one taken before is read from the runtime and passed on.
fn loop_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set
}

/// Blocks the loop's signals in the calling thread (see [`loop_signals`]).
pub(super) fn block_loop_signals() {
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_BLOCK,
        Some(&loop_signals()),
        None,
    );
}

/// Unblocks them in the calling thread: the event loop's, once its
/// handlers are in place (a worker started by a hand-over inherits them
/// blocked, with any that came meanwhile pending).
pub(super) fn unblock_loop_signals() {
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_UNBLOCK,
        Some(&loop_signals()),
        None,
    );
}

/// The binary this process was started from, if it has been replaced
/// since (an upgrade): the path to re-execute.
pub fn replaced_binary() -> Option<PathBuf> {
    let link = std::fs::read_link("/proc/self/exe").ok()?;
    let bytes = link.as_os_str().as_bytes();
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(
        bytes.strip_suffix(b" (deleted)").unwrap_or(bytes),
    ));
    let running = std::fs::metadata("/proc/self/exe").ok()?;
    let on_disk = std::fs::metadata(&path).ok()?;
    let same = running.dev() == on_disk.dev() && running.ino() == on_disk.ino();
    (!same).then_some(path)
}

/// Whether `binary` runs at all: `--version` exits 0 within a few seconds.
pub fn runs(binary: &Path) -> anyhow::Result<()> {
    let mut child = std::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("running {} --version", binary.display()))?;
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::ensure!(
                status.success(),
                "{} --version failed ({status})",
                binary.display()
            );
            return Ok(());
        }
        if start.elapsed() > std::time::Duration::from_secs(5) {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{} --version did not finish in 5 s", binary.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
