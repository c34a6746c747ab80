//! Running one job: a child in its own process group, output streamed into
//! a capped log, a timeout (TERM, then KILL after a grace period), and an
//! interrupt for a stopping worker.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::time::{Instant as TokioInstant, sleep_until};

use super::spawn::{Child, Spawner, Spec};
use crate::spool::job::{Job, JobBody};
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
}

/// A started job process and the read end of its output pipe.
pub type Spawned = (Child, pipe::Receiver);

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

/// Follows a started job to the end and returns its result. `interrupt`
/// fires when the worker gives up waiting for it (stop grace passed).
pub async fn execute(
    run: Run,
    spawned: std::io::Result<Spawned>,
    interrupt: oneshot::Receiver<()>,
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
    };

    let mut sink = LogSink {
        file: match run.log.try_clone() {
            Ok(f) => f,
            Err(e) => {
                let msg = format!("could not use the log file: {e}");
                return result(Status::Failed, None, None, Some(msg), false);
            }
        },
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
            return result(Status::Failed, None, None, Some(msg), truncated);
        }
    };
    let pgid = Some(child.pid());

    let mut reader = Some(reader);
    // Pipe reads rarely exceed a page or two; a small buffer keeps the
    // per-job allocation cheap.
    let mut buf = vec![0u8; 16 * 1024];
    let mut interrupt = Some(interrupt);
    let mut phase = Phase::Running;
    let mut reason: Option<KillReason> = None;
    let mut kill_signal: Option<Signal> = None;
    let deadline = sleep_until(TokioInstant::from_std(t0) + run.timeout);
    tokio::pin!(deadline);

    let signal_group = |sig: Signal| {
        if let Some(pg) = pgid {
            // ESRCH: the group is already gone.
            let _ = killpg(pg, sig);
        }
    };

    let status: std::io::Result<ExitStatus> = loop {
        tokio::select! {
            r = async { reader.as_mut().expect("guarded").read(&mut buf).await }, if reader.is_some() => {
                match r {
                    Ok(0) | Err(_) => reader = None,
                    Ok(n) => sink.write(&buf[..n]),
                }
            }
            st = child.wait() => break st,
            () = &mut deadline, if phase != Phase::Killed => {
                if phase == Phase::Running {
                    reason = Some(KillReason::Timeout);
                    kill_signal = Some(Signal::SIGTERM);
                    signal_group(Signal::SIGTERM);
                    phase = Phase::Terminating;
                    deadline.as_mut().reset(TokioInstant::now() + run.kill_grace);
                } else {
                    kill_signal = Some(Signal::SIGKILL);
                    signal_group(Signal::SIGKILL);
                    phase = Phase::Killed;
                }
            }
            r = async { interrupt.as_mut().expect("guarded").await }, if interrupt.is_some() => {
                interrupt = None;
                if r.is_ok() && phase == Phase::Running {
                    reason = Some(KillReason::Interrupt);
                    kill_signal = Some(Signal::SIGTERM);
                    signal_group(Signal::SIGTERM);
                    phase = Phase::Terminating;
                    deadline.as_mut().reset(TokioInstant::now() + run.kill_grace);
                }
            }
        }
    };

    // Whatever the job wrote before it exited is in the pipe now; take it
    // without waiting for an end-of-file that a background grandchild
    // holding the pipe open would delay for ever.
    if let Some(r) = reader {
        loop {
            match r.try_read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => sink.write(&buf[..n]),
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
    match reason {
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

/// Starts the job's process; see [`Spawner::spawn`].
pub fn spawn(run: &Run, spawner: &Spawner) -> std::io::Result<Spawned> {
    let (args, argc) = match &run.job.body {
        JobBody::Command(c) => ([OsStr::new("-c"), OsStr::new(c.as_str())], 2),
        JobBody::Script => ([run.running_path.as_os_str(), OsStr::new("")], 1),
    };
    let attempt = run.job.attempt.to_string();
    spawner.spawn(&Spec {
        shell: &run.shell,
        args,
        argc,
        env: &run.job.env,
        extra_env: [
            ("AI_CMD_EXECUTOR_JOB_ID", run.id.as_str()),
            ("AI_CMD_EXECUTOR_ATTEMPT", &attempt),
        ],
        cwd: run.job.cwd.as_deref(),
    })
}
