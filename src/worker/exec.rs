//! Running one job: a child in its own process group, output streamed into
//! a capped log, a timeout (TERM, then KILL after a grace period), and an
//! interrupt for a stopping worker.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::EventFd;
use nix::sys::signal::{Signal, killpg};

use super::spawn::{Child, Spawner, Spec};
use crate::spool::job::{Job, JobBody};
use crate::spool::result::Submitter;
use crate::spool::{JobId, JobResult, Status, Timestamp};

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
}

/// A started job process and the (non-blocking) read end of its output
/// pipe.
pub type Spawned = (JobProcess, File);

/// Why the worker signalled the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillReason {
    Timeout,
    Interrupt,
}

/// Where the kill sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Terminating,
    Killed,
}

/// The job's kill sequence: TERM (on timeout or interrupt), then KILL once
/// the grace has passed.
struct Kill {
    pgid: nix::unistd::Pid,
    grace: Duration,
    phase: Phase,
    reason: Option<KillReason>,
    /// The last signal sent.
    signal: Option<Signal>,
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
        // ESRCH: the group is already gone.
        let _ = killpg(self.pgid, sig);
    }
}

/// A started job process, stopped and reaped if the slot unwinds (a
/// panic) from the moment it is started until it is waited for, so that no
/// process outlives the run it belonged to. Only a panic triggers that:
/// every other way out keeps its own behaviour.
pub struct JobProcess {
    child: Child,
    /// The process has been waited for: its pid (and group id) may belong
    /// to someone else now, so it must not be signalled any more.
    reaped: bool,
}

/// How long an unwinding slot waits for a killed job to end.
const REAP_ON_PANIC_WAIT_MS: u16 = 10_000;

impl JobProcess {
    fn new(child: Child) -> Self {
        JobProcess {
            child,
            reaped: false,
        }
    }

    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
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
        let _ = killpg(self.child.pid(), Signal::SIGKILL);
        let mut fds = [PollFd::new(self.child.exit_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(REAP_ON_PANIC_WAIT_MS));
        let _ = self.child.try_wait();
    }
}

/// A log file that keeps at most `cap` bytes.
struct LogSink {
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

/// Follows a started job to the end and returns its result, blocking the
/// calling slot thread: it sleeps in `poll` on the job's output, its exit
/// and `interrupt` (set when the worker gives up waiting for it: the stop
/// grace passed) until the next of them or of its timeouts. `interrupted`
/// says the interrupt came before the job started.
pub fn execute(
    run: Run,
    spawned: io::Result<Spawned>,
    interrupt: &EventFd,
    interrupted: bool,
) -> JobResult {
    let started_at = run.started_at;
    let t0 = run.t0;
    let result = |status, exit_code, signal: Option<Signal>, error, truncated| JobResult {
        id: run.id.to_string(),
        status,
        exit_code,
        signal: signal.map(|s| s.as_str().to_owned()),
        started_at,
        finished_at: Timestamp::now(),
        duration_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
        log: Some(run.log_rel.clone()),
        output_truncated: truncated,
        error,
        attempt: run.job.attempt,
        submitted_by: run.submitted_by.clone(),
    };

    let mut sink = LogSink {
        file: run.log,
        written: 0,
        cap: run.log_max_bytes,
        truncated: false,
        broken: None,
    };

    let (mut child, reader) = match spawned {
        Ok(x) => x,
        Err(e) => {
            let msg = format!("could not start the job: {e}");
            sink.write(format!("ai-cmd-executor: {msg}\n").as_bytes());
            let (truncated, _) = sink.finish();
            return result(Status::Failed, None, None, Some(msg), truncated);
        }
    };
    let mut reader = Some(reader);
    // Pipe reads rarely exceed a page or two; the slot thread's stack
    // holds the buffer, so a job costs no allocation for it.
    let mut buf = [0u8; 16 * 1024];
    let mut kill = Kill {
        pgid: child.child.pid(),
        grace: run.kill_grace,
        phase: Phase::Running,
        reason: None,
        signal: None,
        deadline: t0.checked_add(run.timeout),
    };
    if interrupted {
        kill.begin(KillReason::Interrupt);
    }

    let status: io::Result<ExitStatus> = loop {
        let timeout = match kill.deadline {
            Some(deadline) if kill.phase != Phase::Killed => {
                poll_timeout(deadline.saturating_duration_since(Instant::now()))
            }
            _ => PollTimeout::NONE,
        };
        let (exited, interrupt_set, output) = {
            let mut fds = [
                PollFd::new(child.child.exit_fd(), PollFlags::POLLIN),
                PollFd::new(interrupt.as_fd(), PollFlags::POLLIN),
                PollFd::new(
                    reader.as_ref().map_or(interrupt.as_fd(), |r| r.as_fd()),
                    PollFlags::POLLIN,
                ),
            ];
            let n = if reader.is_some() { 3 } else { 2 };
            match poll(&mut fds[..n], timeout) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => break Err(e.into()),
            }
            let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]), n == 3 && ready(&fds[2]))
        };
        if output && let Some(r) = reader.as_mut() {
            // Read what is there; more wakes the next poll.
            loop {
                match r.read(&mut buf) {
                    Ok(0) => {
                        reader = None;
                        break;
                    }
                    Ok(n) => sink.write(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        reader = None;
                        break;
                    }
                }
            }
        }
        if exited {
            match child.try_wait() {
                Ok(Some(st)) => break Ok(st),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
        }
        if interrupt_set {
            let _ = interrupt.read();
            if kill.phase == Phase::Running {
                kill.begin(KillReason::Interrupt);
            }
        }
        if kill.phase != Phase::Killed && kill.due() {
            if kill.phase == Phase::Running {
                kill.begin(KillReason::Timeout);
            } else {
                kill.finish();
            }
        }
    };

    // Whatever the job wrote before it exited is in the pipe now; take it
    // without waiting for an end-of-file that a background grandchild
    // holding the pipe open would delay for ever.
    if let Some(mut r) = reader {
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => sink.write(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
    let (truncated, log_error) = sink.finish();

    let status = match status {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("lost track of the job process: {e}");
            return result(Status::Failed, None, None, Some(msg), truncated);
        }
    };
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
                humantime::format_duration(run.timeout),
                kill_signal.map_or("nothing", Signal::as_str)
            )),
            truncated,
        ),
        Some(KillReason::Interrupt) => result(
            Status::Interrupted,
            exit_code,
            signal,
            with_note(format!(
                "the worker was stopping and the job outlived the stop grace; sent {}",
                kill_signal.map_or("nothing", Signal::as_str)
            )),
            truncated,
        ),
        None if status.success() => result(
            Status::Succeeded,
            exit_code,
            None,
            log_note.map(|n| n.trim_start_matches("; ").to_owned()),
            truncated,
        ),
        None => result(
            Status::Failed,
            exit_code,
            signal,
            log_note.map(|n| n.trim_start_matches("; ").to_owned()),
            truncated,
        ),
    }
}

/// A `poll` timeout that ends no earlier than `left` (whole milliseconds,
/// rounded up, so the loop does not spin through the last fraction).
fn poll_timeout(left: Duration) -> PollTimeout {
    let ms = left.as_nanos().div_ceil(1_000_000);
    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
}

/// Starts the job's process; see [`Spawner::spawn`].
pub fn spawn(run: &Run, spawner: &Spawner) -> std::io::Result<Spawned> {
    let (args, argc) = match &run.job.body {
        JobBody::Command(c) => ([OsStr::new("-c"), OsStr::new(c.as_str())], 2),
        JobBody::Script => ([run.running_path.as_os_str(), OsStr::new("")], 1),
    };
    let attempt = run.job.attempt.to_string();
    let spawned = spawner.spawn(&Spec {
        shell: &run.shell,
        args,
        argc,
        env: &run.job.env,
        extra_env: [
            ("AI_CMD_EXECUTOR_JOB_ID", run.id.as_str()),
            ("AI_CMD_EXECUTOR_ATTEMPT", &attempt),
        ],
        cwd: run.job.cwd.as_deref(),
    });
    spawned.map(|(child, output)| (JobProcess::new(child), output))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::path::Path;

    use nix::sys::signal::kill;
    use nix::unistd::Pid;

    use super::super::spawn::{Spawner, Spec};
    use super::*;

    /// Starts `sh -c <command>` as the worker starts a job.
    fn start(command: &str) -> Child {
        let env = BTreeMap::new();
        let (child, _output) = Spawner::new()
            .spawn(&Spec {
                shell: Path::new("/bin/sh"),
                args: [OsStr::new("-c"), OsStr::new(command)],
                argc: 2,
                env: &env,
                extra_env: [
                    ("AI_CMD_EXECUTOR_JOB_ID", "t"),
                    ("AI_CMD_EXECUTOR_ATTEMPT", "1"),
                ],
                cwd: None,
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
            let _process = JobProcess::new(child);
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
        drop(JobProcess::new(child));
        assert_eq!(kill(pid, None), Ok(()), "the job still runs");
        killpg(pid, Signal::SIGKILL).unwrap();
        nix::sys::wait::waitpid(pid, None).unwrap();
    }
}
