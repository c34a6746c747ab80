//! Running one job: a child in its own process group, output streamed into
//! a capped log, a timeout (TERM, then KILL after a grace period), and an
//! interrupt for a stopping worker.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::EventFd;
use nix::sys::signal::Signal;

use super::reaper;
use super::spawn::{Child, Spawner, Spec};
use crate::spool::job::SubmittedVia;
use crate::spool::job::{Job, JobBody};
use crate::spool::limits::{Applied, Limits};
use crate::spool::result::Submitter;
use crate::spool::{JobId, JobResult, Status, Timestamp, Usage};

/// Everything a job run needs.
#[derive(Debug)]
pub struct Run {
    /// The job id.
    pub id: JobId,
    /// The parsed job.
    pub job: Job,
    /// The job file, now in `running/`.
    pub running_path: PathBuf,
    /// This run's log file, already created.
    pub log: File,
    /// The log's path relative to the spool root.
    pub log_rel: String,
    /// The shell.
    pub shell: PathBuf,
    /// Effective timeout.
    pub timeout: Duration,
    /// Time between TERM and KILL.
    pub kill_grace: Duration,
    /// Log cap.
    pub log_max_bytes: u64,
    /// When the spawn began.
    pub started_at: Timestamp,
    /// The same moment, for the duration.
    pub t0: Instant,
    /// Who submitted it (the owner of its job file), for its result.
    pub submitted_by: Option<Submitter>,
    /// Its resource limits (the job's, else the configured ones).
    pub limits: Limits,
    /// How they are enforced, once [`spawn`] has planned it.
    pub applied: Option<Applied>,
}

/// A started job process and the (non-blocking) read end of its output
/// pipe.
pub type Spawned = (JobProcess, File);

/// Why the worker signalled the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KillReason {
    Timeout,
    Interrupt,
    /// Its submitter or root asked (see [`Kill::cancelled_by`]).
    Cancel,
}

/// Why a slot's interrupt woke it, as the slot's owner tells it.
pub(super) enum Wake {
    /// Cancelled by this user.
    Cancel(Submitter),
    /// The worker is stopping and the stop grace ran out.
    Interrupt,
    /// Nothing for this job (a wake-up meant for one that ended first).
    Stale,
}

/// Where the kill sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Running,
    Terminating,
    Killed,
}

/// The job's kill sequence: TERM (on timeout or interrupt), then KILL once
/// the grace has passed.
pub(super) struct Kill {
    pgid: nix::unistd::Pid,
    pub(super) grace: Duration,
    pub(super) phase: Phase,
    reason: Option<KillReason>,
    /// The last signal sent.
    signal: Option<Signal>,
    /// Who cancelled it, for [`KillReason::Cancel`].
    cancelled_by: Option<Submitter>,
    /// When the job times out, or (terminating) gets KILL; `None` if that
    /// moment is beyond what the clock can represent (never, in effect:
    /// timeouts and graces are bounded far below it).
    deadline: Option<Instant>,
}

impl Kill {
    fn begin(&mut self, why: KillReason) {
        self.reason = Some(why);
        self.send(Signal::SIGTERM);
        self.phase = Phase::Terminating;
        self.deadline = Instant::now().checked_add(self.grace);
    }

    /// Whether the current deadline has passed.
    fn due(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    fn finish(&mut self) {
        self.send(Signal::SIGKILL);
        self.phase = Phase::Killed;
    }

    fn send(&mut self, sig: Signal) {
        self.signal = Some(sig);
        // The group, and whatever left it (`setsid`) below the main process.
        reaper::signal_job(self.pgid, sig);
    }

    /// When whatever the job leaves behind must be gone: the KILL already
    /// due if the job was being stopped, else a grace from now.
    fn leftovers_by(&self) -> Instant {
        let now = Instant::now();
        match self.phase {
            Phase::Running => now.checked_add(self.grace).unwrap_or(now),
            Phase::Terminating => self.deadline.unwrap_or(now).min(now + self.grace),
            Phase::Killed => now,
        }
    }
}

/// A started job process, stopped and reaped if the slot unwinds (a
/// panic) from the moment it is started until it is waited for, so that no
/// process outlives the run it belonged to. Only a panic triggers that:
/// every other way out keeps its own behaviour.
pub struct JobProcess {
    child: Child,
    /// The job's cgroup, where jobs have them.
    cgroup: Option<super::cgroup::Assigned>,
    /// The process has been waited for: its pid (and group id) may belong
    /// to someone else now, so it must not be signalled any more.
    reaped: bool,
}

/// How long an unwinding slot waits for a killed job to end.
const REAP_ON_PANIC_WAIT_MS: u16 = 10_000;

impl JobProcess {
    fn new(child: Child, cgroup: Option<super::cgroup::Assigned>) -> Self {
        JobProcess {
            child,
            cgroup,
            reaped: false,
        }
    }

    fn try_wait(&mut self) -> io::Result<Option<(ExitStatus, Usage)>> {
        let r = self.child.try_wait();
        // An error means the process cannot be followed any more: treat
        // it as gone rather than signal a pid that may have been reused.
        if !matches!(r, Ok(None)) {
            self.reaped = true;
        }
        r
    }
}

impl Drop for JobProcess {
    fn drop(&mut self) {
        if !thread::panicking() || self.reaped {
            return;
        }
        // The group id is the job's pid, which cannot be reused before the
        // process is reaped, so this reaches only the job's own processes.
        reaper::signal_job(self.child.pid(), Signal::SIGKILL);
        let mut fds = [PollFd::new(self.child.exit_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(REAP_ON_PANIC_WAIT_MS));
        let _ = self.child.try_wait();
        reaper::ended(self.child.pid(), Instant::now());
    }
}

/// A log file that keeps at most `cap` bytes.
pub(super) struct LogSink {
    file: File,
    written: u64,
    cap: u64,
    truncated: bool,
    broken: Option<std::io::Error>,
}

impl LogSink {
    fn write(&mut self, data: &[u8]) {
        if self.broken.is_some() {
            return;
        }
        let room = self.cap.saturating_sub(self.written);
        let take = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if take < data.len() {
            self.truncated = true;
        }
        if take > 0 {
            match self.file.write_all(&data[..take]) {
                Ok(()) => self.written += take as u64,
                Err(e) => self.broken = Some(e),
            }
        }
    }

    fn finish(mut self) -> (bool, Option<std::io::Error>) {
        if self.truncated && self.broken.is_none() {
            let note = format!(
                "\n[ai-cmd-executor: output truncated after {} bytes (log_max_bytes)]\n",
                self.cap
            );
            if let Err(e) = self.file.write_all(note.as_bytes()) {
                self.broken = Some(e);
            }
        }
        (self.truncated, self.broken)
    }
}

/// What became of a followed job.
#[expect(
    clippy::large_enum_variant,
    reason = "returned once per job by the slot that followed it and consumed at once; nearly \
              every job ends in the large variant, so boxing it would add an allocation per job"
)]
pub enum Outcome {
    /// It ended (or could not start): its result.
    Done(JobResult),
    /// The worker is handing over to a new copy of itself (see
    /// `handover`): the job runs on, and this is what the new worker needs
    /// to follow it.
    Handed(Box<Followed>),
}

/// A job being followed: its process, output pipe, log and kill sequence,
/// and what its result needs. It outlives the worker process when the
/// worker hands over to a new copy of itself.
pub struct Followed {
    pub id: JobId,
    pub attempt: u32,
    pub started_at: Timestamp,
    /// The start, on this process's monotonic clock.
    pub t0: Instant,
    pub timeout: Duration,
    pub log_rel: String,
    pub submitted_by: Option<Submitter>,
    /// Its limits and how they were enforced.
    pub limits: Option<Applied>,
    /// How it was submitted.
    pub submitted_via: SubmittedVia,
    pub(super) child: JobProcess,
    pub(super) reader: Option<File>,
    pub(super) sink: LogSink,
    pub(super) kill: Kill,
}

/// Follows a started job to the end and returns its result, blocking the
/// calling slot thread: it sleeps in `poll` on the job's output, its exit
/// and `interrupt` (set when the worker gives up waiting for it: the stop
/// grace passed) until the next of them or of its timeouts. `interrupted`
/// says the interrupt came before the job started. When `handover` is set
/// as `interrupt` fires (or from the start), the job is handed on instead
/// of stopped.
pub fn execute(
    run: Run,
    spawned: io::Result<Spawned>,
    interrupt: &EventFd,
    interrupted: bool,
    handover: &AtomicBool,
    wake: &dyn Fn(&JobId) -> Wake,
) -> Outcome {
    let mut sink = LogSink {
        file: run.log,
        written: 0,
        cap: run.log_max_bytes,
        truncated: false,
        broken: None,
    };
    let (child, reader) = match spawned {
        Ok(x) => x,
        Err(e) => {
            let msg = format!("could not start the job: {e}");
            sink.write(format!("ai-cmd-executor: {msg}\n").as_bytes());
            let (truncated, _) = sink.finish();
            return Outcome::Done(JobResult {
                id: run.id.to_string(),
                status: Status::Failed,
                exit_code: None,
                signal: None,
                started_at: run.started_at,
                finished_at: Timestamp::now(),
                duration_ms: u64::try_from(run.t0.elapsed().as_millis()).unwrap_or(u64::MAX),
                log: Some(run.log_rel),
                output_truncated: truncated,
                error: Some(msg),
                attempt: run.job.attempt,
                submitted_by: run.submitted_by,
                usage: Usage::default(),
                limits: run.applied,
                submitted_via: Some(run.job.submitted_via),
                cancelled_by: None,
            });
        }
    };
    let mut followed = Followed {
        kill: Kill {
            pgid: child.child.pid(),
            grace: run.kill_grace,
            phase: Phase::Running,
            reason: None,
            signal: None,
            cancelled_by: None,
            deadline: run.t0.checked_add(run.timeout),
        },
        id: run.id,
        attempt: run.job.attempt,
        started_at: run.started_at,
        t0: run.t0,
        timeout: run.timeout,
        log_rel: run.log_rel,
        submitted_by: run.submitted_by,
        limits: run.applied,
        submitted_via: run.job.submitted_via,
        child,
        reader: Some(reader),
        sink,
    };
    if interrupted && !handover.load(Ordering::Acquire) {
        followed.kill.begin(KillReason::Interrupt);
    }
    follow(followed, interrupt, handover, wake)
}

/// Follows a job to its end (see [`execute`]); also where a new worker
/// takes up a job handed over to it.
pub fn follow(
    mut f: Followed,
    interrupt: &EventFd,
    handover: &AtomicBool,
    wake: &dyn Fn(&JobId) -> Wake,
) -> Outcome {
    if handover.load(Ordering::Acquire) {
        return Outcome::Handed(Box::new(f));
    }
    // Pipe reads rarely exceed a page or two; the slot thread's stack
    // holds the buffer, so a job costs no allocation for it.
    let mut buf = [0u8; 16 * 1024];
    let status: io::Result<(ExitStatus, Usage)> = loop {
        let timeout = match f.kill.deadline {
            Some(deadline) if f.kill.phase != Phase::Killed => {
                poll_timeout(deadline.saturating_duration_since(Instant::now()))
            }
            _ => PollTimeout::NONE,
        };
        let (exited, interrupt_set, output) = {
            let mut fds = [
                PollFd::new(f.child.child.exit_fd(), PollFlags::POLLIN),
                PollFd::new(interrupt.as_fd(), PollFlags::POLLIN),
                PollFd::new(
                    f.reader.as_ref().map_or(interrupt.as_fd(), |r| r.as_fd()),
                    PollFlags::POLLIN,
                ),
            ];
            let n = if f.reader.is_some() { 3 } else { 2 };
            match poll(&mut fds[..n], timeout) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => break Err(e.into()),
            }
            let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]), n == 3 && ready(&fds[2]))
        };
        if output && let Some(r) = f.reader.as_mut() {
            // Read what is there; more wakes the next poll.
            loop {
                match r.read(&mut buf) {
                    Ok(0) => {
                        f.reader = None;
                        break;
                    }
                    Ok(n) => f.sink.write(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        f.reader = None;
                        break;
                    }
                }
            }
        }
        if exited {
            // Not reaped yet: its group id is still its own.
            reaper::main_exited(f.child.child.pid());
            match f.child.try_wait() {
                Ok(Some(st)) => break Ok(st),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
        }
        if interrupt_set {
            let _ = interrupt.read();
            if handover.load(Ordering::Acquire) {
                return Outcome::Handed(Box::new(f));
            }
            match wake(&f.id) {
                Wake::Cancel(by) if f.kill.reason != Some(KillReason::Cancel) => {
                    // A cancel overrides a timeout or stop in progress:
                    // the result says who stopped it.
                    f.kill.cancelled_by = Some(by);
                    if f.kill.phase == Phase::Running {
                        f.kill.begin(KillReason::Cancel);
                    } else {
                        f.kill.reason = Some(KillReason::Cancel);
                    }
                }
                Wake::Interrupt if f.kill.phase == Phase::Running => {
                    f.kill.begin(KillReason::Interrupt);
                }
                _ => {}
            }
        }
        if f.kill.phase != Phase::Killed && f.kill.due() {
            if f.kill.phase == Phase::Running {
                f.kill.begin(KillReason::Timeout);
            } else {
                f.kill.finish();
            }
        }
    };
    // What the whole tree used, read before its cgroup is removed.
    let tree = super::cgroup::tree()
        .zip(f.child.cgroup.as_ref())
        .map(|(t, a)| super::cgroup::usage(t, a));
    reaper::ended(f.child.child.pid(), f.kill.leftovers_by());
    Outcome::Done(f.finish(status, tree, &mut buf))
}

impl Followed {
    /// The result of a job whose process has ended (or was lost track of).
    fn finish(
        self,
        status: io::Result<(ExitStatus, Usage)>,
        tree: Option<super::cgroup::TreeUsage>,
        buf: &mut [u8],
    ) -> JobResult {
        let Followed {
            id,
            attempt,
            started_at,
            t0,
            timeout,
            log_rel,
            submitted_by,
            limits,
            submitted_via,
            reader,
            mut sink,
            kill,
            ..
        } = self;
        // Whatever the job wrote before it exited is in the pipe now; take
        // it without waiting for an end-of-file that a background
        // grandchild holding the pipe open would delay for ever.
        if let Some(mut r) = reader {
            loop {
                match r.read(buf) {
                    Ok(0) => break,
                    Ok(n) => sink.write(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        let (truncated, log_error) = sink.finish();
        let result = |status, exit_code, signal: Option<Signal>, error, usage| JobResult {
            id: id.to_string(),
            status,
            exit_code,
            signal: signal.map(|s| s.as_str().to_owned()),
            started_at,
            finished_at: Timestamp::now(),
            duration_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
            log: Some(log_rel.clone()),
            output_truncated: truncated,
            error,
            attempt,
            submitted_by: submitted_by.clone(),
            usage,
            limits: limits.clone(),
            submitted_via: Some(submitted_via),
            cancelled_by: None,
        };
        let (status, mut usage) = match status {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("lost track of the job process: {e}");
                return result(Status::Failed, None, None, Some(msg), Usage::default());
            }
        };
        if let Some(t) = &tree {
            // The whole tree's, background processes included.
            usage.cpu_user_ms = t.cpu_user_ms.or(usage.cpu_user_ms);
            usage.cpu_system_ms = t.cpu_system_ms.or(usage.cpu_system_ms);
            usage.memory_peak_bytes = t.memory_peak_bytes;
        }
        let exit_code = status.code();
        let signal = status.signal().and_then(|s| Signal::try_from(s).ok());
        let log_note = log_error.map(|e| format!("; writing its log failed: {e}"));
        let with_note = |s: String| Some(s + log_note.as_deref().unwrap_or(""));
        let kill_signal = kill.signal;
        match kill.reason {
            Some(KillReason::Timeout) => result(
                Status::TimedOut,
                exit_code,
                signal,
                with_note(format!(
                    "timed out after {}; sent {}",
                    humantime::format_duration(timeout),
                    kill_signal.map_or("nothing", Signal::as_str)
                )),
                usage,
            ),
            Some(KillReason::Cancel) => {
                let by = kill.cancelled_by.clone();
                let who = by
                    .as_ref()
                    .map_or_else(|| "its submitter".to_owned(), super::who);
                let mut r = result(
                    Status::Cancelled,
                    exit_code,
                    signal,
                    with_note(format!(
                        "cancelled by {who}; sent {}",
                        kill_signal.map_or("nothing", Signal::as_str)
                    )),
                    usage,
                );
                r.cancelled_by = by;
                r
            }
            Some(KillReason::Interrupt) => result(
                Status::Interrupted,
                exit_code,
                signal,
                with_note(format!(
                    "the worker was stopping and the job outlived the stop grace; sent {}",
                    kill_signal.map_or("nothing", Signal::as_str)
                )),
                usage,
            ),
            None if status.success() => result(
                Status::Succeeded,
                exit_code,
                None,
                log_note.map(|n| n.trim_start_matches("; ").to_owned()),
                usage,
            ),
            None => {
                let reached = limits.as_ref().and_then(|l| {
                    super::limits::reached(l, timeout, &status, &usage, tree.as_ref())
                });
                let error = match (reached, log_note) {
                    (Some(r), note) => Some(r + note.as_deref().unwrap_or("")),
                    (None, note) => note.map(|n| n.trim_start_matches("; ").to_owned()),
                };
                result(Status::Failed, exit_code, signal, error, usage)
            }
        }
    }
}

impl Followed {
    /// The job's cgroup, where jobs have them.
    pub fn cgroup_dir(&self) -> Option<&std::path::Path> {
        self.child.cgroup.as_ref().map(|a| a.dir.as_path())
    }

    /// What a new worker needs to follow this job, in a form that survives
    /// `execve`: the descriptors (process, output pipe, log) are kept open
    /// across it and named by number.
    pub fn into_wire(self) -> io::Result<WireJob> {
        let pid = self.child.child.pid().as_raw();
        let output_fd = match self.reader {
            Some(r) => Some(inheritable(r.into())?),
            None => None,
        };
        let log_fd = inheritable(self.sink.file.into())?;
        let now = Instant::now();
        let wire = WireJob {
            id: self.id.to_string(),
            attempt: self.attempt,
            started_at: self.started_at,
            elapsed_ms: millis(now.saturating_duration_since(self.t0)),
            timeout_ms: millis(self.timeout),
            log_rel: self.log_rel,
            submitted_by: self.submitted_by,
            limits: self.limits,
            submitted_via: Some(self.submitted_via),
            pid,
            output_fd,
            log_fd,
            log_written: self.sink.written,
            log_cap: self.sink.cap,
            log_truncated: self.sink.truncated,
            log_broken: self.sink.broken.map(|e| e.to_string()),
            kill_grace_ms: millis(self.kill.grace),
            kill_phase: match self.kill.phase {
                Phase::Running => "running",
                Phase::Terminating => "terminating",
                Phase::Killed => "killed",
            }
            .into(),
            kill_reason: self.kill.reason.map(|r| {
                match r {
                    KillReason::Timeout => "timeout",
                    KillReason::Interrupt => "interrupt",
                    KillReason::Cancel => "cancel",
                }
                .into()
            }),
            cancelled_by: self.kill.cancelled_by,
            kill_signal: self.kill.signal.map(|s| s.as_str().to_owned()),
            kill_deadline_in_ms: self
                .kill
                .deadline
                .map(|d| millis(d.saturating_duration_since(now))),
            cgroup: self.child.cgroup.clone(),
        };
        // The pidfd is not passed on (it closes at `execve`): the new worker
        // opens its own, as the job is still this process's child.
        drop(self.child);
        Ok(wire)
    }

    /// Takes up a job a previous worker handed over (see
    /// [`Followed::into_wire`]). The descriptors it names are this
    /// process's from now on.
    pub fn from_wire(w: WireJob) -> io::Result<Followed> {
        let id: JobId =
            w.id.parse()
                .map_err(|e| io::Error::other(format!("a handed-over job id: {e}")))?;
        let take = |fd: i32| -> io::Result<OwnedFd> {
            let fd = super::handover::adopt_fd(fd)?;
            set_cloexec(&fd)?;
            Ok(fd)
        };
        let reader = w.output_fd.map(take).transpose()?.map(File::from);
        let log = File::from(take(w.log_fd)?);
        let child = Child::track(nix::unistd::Pid::from_raw(w.pid))?;
        reaper::adopt(child.pid(), &w.id, w.cgroup.as_ref().map(|a| a.dir.clone()));
        let now = Instant::now();
        let t0 = now
            .checked_sub(Duration::from_millis(w.elapsed_ms))
            .unwrap_or(now);
        let phase = match w.kill_phase.as_str() {
            "terminating" => Phase::Terminating,
            "killed" => Phase::Killed,
            _ => Phase::Running,
        };
        let reason = w.kill_reason.as_deref().map(|r| match r {
            "timeout" => KillReason::Timeout,
            "cancel" => KillReason::Cancel,
            _ => KillReason::Interrupt,
        });
        Ok(Followed {
            kill: Kill {
                pgid: child.pid(),
                grace: Duration::from_millis(w.kill_grace_ms),
                phase,
                reason,
                signal: w.kill_signal.as_deref().and_then(|s| s.parse().ok()),
                cancelled_by: w.cancelled_by,
                deadline: w
                    .kill_deadline_in_ms
                    .and_then(|ms| now.checked_add(Duration::from_millis(ms))),
            },
            id,
            attempt: w.attempt,
            started_at: w.started_at,
            t0,
            timeout: Duration::from_millis(w.timeout_ms),
            log_rel: w.log_rel,
            submitted_by: w.submitted_by,
            limits: w.limits,
            submitted_via: w.submitted_via.unwrap_or(SubmittedVia::File),
            child: JobProcess::new(child, w.cgroup),
            reader,
            sink: LogSink {
                file: log,
                written: w.log_written,
                cap: w.log_cap,
                truncated: w.log_truncated,
                broken: w.log_broken.map(io::Error::other),
            },
        })
    }
}

/// A followed job as the hand-over passes it on: see
/// [`Followed::into_wire`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WireJob {
    /// The job id.
    pub id: String,
    /// Which run this is.
    pub attempt: u32,
    /// When it started.
    pub started_at: Timestamp,
    /// How long it had run at the hand-over.
    pub elapsed_ms: u64,
    /// Its timeout.
    pub timeout_ms: u64,
    /// Its log, relative to the spool root.
    pub log_rel: String,
    /// Who submitted it.
    pub submitted_by: Option<Submitter>,
    /// Its limits and how they were enforced.
    #[serde(default)]
    pub limits: Option<Applied>,
    /// How it was submitted.
    #[serde(default)]
    pub submitted_via: Option<SubmittedVia>,
    /// Its process (and process group) id.
    pub pid: i32,
    /// The read end of its output pipe, unless that reached end-of-file.
    pub output_fd: Option<i32>,
    /// Its log file.
    pub log_fd: i32,
    /// Bytes of output in the log so far.
    pub log_written: u64,
    /// The log's cap.
    pub log_cap: u64,
    /// Whether output was dropped at the cap.
    pub log_truncated: bool,
    /// Why writing the log failed, if it did.
    pub log_broken: Option<String>,
    /// Time between TERM and KILL.
    pub kill_grace_ms: u64,
    /// `running`, `terminating` or `killed`.
    pub kill_phase: String,
    /// Why it was signalled: `timeout` or `interrupt`.
    pub kill_reason: Option<String>,
    /// The last signal sent.
    pub kill_signal: Option<String>,
    /// Who cancelled it, if someone did.
    #[serde(default)]
    pub cancelled_by: Option<Submitter>,
    /// When the next step of the kill sequence is due (the timeout, or
    /// KILL), from the hand-over.
    pub kill_deadline_in_ms: Option<u64>,
    /// The job's cgroup, where jobs have them.
    #[serde(default)]
    pub cgroup: Option<super::cgroup::Assigned>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Clears close-on-exec on `fd` and gives up ownership of it: it stays
/// open across `execve`, under the returned number.
pub(super) fn inheritable(fd: OwnedFd) -> io::Result<i32> {
    use std::os::fd::IntoRawFd;
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )?;
    Ok(fd.into_raw_fd())
}

/// Sets close-on-exec again on a descriptor taken over from a previous
/// worker, so jobs do not inherit it.
pub(super) fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    Ok(())
}

/// A `poll` timeout that ends no earlier than `left` (whole milliseconds,
/// rounded up, so the loop does not spin through the last fraction).
fn poll_timeout(left: Duration) -> PollTimeout {
    let ms = left.as_nanos().div_ceil(1_000_000);
    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
}

/// Starts the job's process; see [`Spawner::spawn`].
pub fn spawn(run: &mut Run, spawner: &Spawner) -> std::io::Result<Spawned> {
    let tree = super::cgroup::tree();
    let (rlimits, applied) = super::limits::plan(&run.limits, run.timeout, tree)?;
    run.applied = applied;
    let (assigned, procs) = match tree.map(|t| t.create(&run.limits)).transpose()? {
        Some(c) => (Some(c.assigned), Some(c.fd)),
        None => (None, None),
    };
    let (args, argc) = match &run.job.body {
        JobBody::Command(c) => ([OsStr::new("-c"), OsStr::new(c.as_str())], 2),
        JobBody::Script => ([run.running_path.as_os_str(), OsStr::new("")], 1),
    };
    let attempt = run.job.attempt.to_string();
    let spawned = spawner.spawn(Spec {
        id: run.id.as_str(),
        shell: &run.shell,
        args,
        argc,
        env: &run.job.env,
        extra_env: [
            ("AI_CMD_EXECUTOR_JOB_ID", run.id.as_str()),
            ("AI_CMD_EXECUTOR_ATTEMPT", &attempt),
        ],
        cwd: run.job.cwd.as_deref(),
        rlimits,
        cgroup: procs,
        cgroup_dir: assigned.as_ref().map(|a| a.dir.clone()),
    });
    match spawned {
        Ok((child, output)) => Ok((JobProcess::new(child, assigned), output)),
        Err(e) => {
            // Nothing entered it: back to the pool.
            if let (Some(t), Some(a)) = (tree, &assigned) {
                t.release(&a.dir);
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::path::Path;

    use nix::sys::signal::{kill, killpg};
    use nix::unistd::Pid;

    use super::super::spawn::{Spawner, Spec};
    use super::*;

    /// Starts `sh -c <command>` as the worker starts a job.
    fn start(command: &str) -> Child {
        let env = BTreeMap::new();
        let (child, _output) = Spawner::new(std::sync::Arc::new(
            super::super::isolation::Confinement::none(),
        ))
        .spawn(Spec {
            id: "test",
            shell: Path::new("/bin/sh"),
            args: [OsStr::new("-c"), OsStr::new(command)],
            argc: 2,
            env: &env,
            extra_env: [
                ("AI_CMD_EXECUTOR_JOB_ID", "t"),
                ("AI_CMD_EXECUTOR_ATTEMPT", "1"),
            ],
            cwd: None,
            rlimits: super::super::limits::Rlimits::default(),
            cgroup: None,
            cgroup_dir: None,
        })
        .expect("starting the job");
        child
    }

    /// Waits (with a deadline) until `pid` is gone or a zombie.
    fn wait_dead(pid: Pid) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit(')').next().map(|r| r.trim_start().to_owned()));
            match state {
                None => return,
                Some(s) if s.starts_with('Z') => return,
                Some(_) if Instant::now() > deadline => panic!("{pid} still runs"),
                Some(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    #[test]
    fn a_panic_while_a_job_runs_kills_and_reaps_its_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("grandchild");
        let child = start(&format!(
            "sleep 60 & echo $! > {}.tmp && mv {0}.tmp {0}; wait",
            marker.display()
        ));
        let leader = child.pid();
        let deadline = Instant::now() + Duration::from_secs(10);
        let grandchild = loop {
            if let Some(pid) = std::fs::read_to_string(&marker)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break Pid::from_raw(pid);
            }
            assert!(Instant::now() < deadline, "the job never started its child");
            thread::sleep(Duration::from_millis(5));
        };
        let caught = catch_unwind(AssertUnwindSafe(|| {
            let _process = JobProcess::new(child, None);
            panic!("a bug while the job runs");
        }));
        assert!(caught.is_err());
        // The job's own process was killed and reaped (not even a zombie
        // is left), and so was the rest of its group.
        assert_eq!(kill(leader, None), Err(Errno::ESRCH));
        wait_dead(grandchild);
    }

    #[test]
    fn without_a_panic_the_reaper_leaves_the_job_alone() {
        let child = start("sleep 60");
        let pid = child.pid();
        drop(JobProcess::new(child, None));
        assert_eq!(kill(pid, None), Ok(()), "the job still runs");
        killpg(pid, Signal::SIGKILL).unwrap();
        nix::sys::wait::waitpid(pid, None).unwrap();
    }
}
