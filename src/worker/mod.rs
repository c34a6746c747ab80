//! The worker: an event loop that finds jobs in `pending/`, and one slot
//! thread per unit of `max_parallel` that claims, runs and hands on each
//! (see [`slots`]).
//!
//! The loop waits on inotify events for `pending/`, signals, messages from
//! the slots and the recorder, and a slow safety-net rescan; nothing polls
//! while the worker is idle. Start-up: load the config, ensure the layout,
//! recover `running/`, scan `pending/`, start the slots, then serve.

mod cgroup;
mod claim;
mod exec;
pub mod handover;
pub mod isolation;
mod limits;
mod reaper;
mod record;
mod settle;
mod slots;
mod spawn;
mod vfork;

use std::ffi::OsString;
use std::fs::{self, File, TryLockError};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchMask};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tracing::{debug, error, info, warn};

use crate::client::change_time;
use crate::config::{Config, LoadedConfig};
use crate::logging::{CommandDigest, message_id};
use crate::spool::id::parse_job_file_name;
use crate::spool::job::Job;
use crate::spool::result::Submitter;
use crate::spool::serving::{SERVE_WAIT, Serving};
use crate::spool::{
    JobId, JobResult, Spool, SpoolError, Status, Timestamp, log_started, move_into, open_job_file,
    reserve,
};
use crate::systemd::notify::Notifier;

use claim::ClaimCtx;
use isolation::Confinement;
use record::{Record, RecordSender, Recorder};
pub use settle::{Settled, settle};
use slots::{Shared, State, ToLoop};

/// Errors that stop the worker from starting or keep it from going on.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The spool could not be prepared.
    #[error("preparing the spool: {0}")]
    Spool(#[from] SpoolError),
    /// inotify, signals or the runtime could not be set up.
    #[error("{what}: {source}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn setup(what: &'static str) -> impl FnOnce(io::Error) -> WorkerError {
    move |source| WorkerError::Setup { what, source }
}

/// How the worker was asked to run.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The configuration file named on the command line, re-read on SIGHUP.
    pub config_path: Option<PathBuf>,
    /// The loaded configuration.
    pub loaded: LoadedConfig,
    /// The spool root.
    pub spool: PathBuf,
}

/// How the worker ended.
#[derive(Debug)]
pub enum Exit {
    /// Stopped (SIGTERM or SIGINT).
    Stopped,
    /// Its binary was replaced and a reload asked it to hand over: its
    /// running jobs are set aside, to pass to the new binary (see
    /// [`handover`]).
    Handover(handover::Handover),
}

/// Runs the worker until SIGTERM or SIGINT, or until it hands over to a
/// new binary; `inherited` is what a previous worker handed over to this
/// one. The event loop runs on a single-threaded runtime on this thread;
/// the slots and the recorder (which writes results, so no slot waits on
/// an `fsync` while others queue up) are threads of their own.
pub fn run(opts: WorkerOptions, inherited: handover::Inherited) -> Result<Exit, WorkerError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(setup("starting the async runtime"))?;
    rt.block_on(async move {
        let spool = Spool::new(opts.spool.clone());
        let (to_loop, inbox) = unbounded_channel();
        let config = &opts.loaded.config;
        let (confinement, weaker) = Confinement::new(
            config.isolation,
            spool.root(),
            cgroup::locate().ok().as_deref(),
        )
        .map_err(|e| WorkerError::Setup {
            what: "isolating jobs",
            source: io::Error::other(e),
        })?;
        let confinement = Arc::new(confinement);
        let shared = Arc::new(Shared::new(
            spool.clone(),
            ClaimCtx::new(spool.clone(), config, Arc::clone(&confinement)),
            config.max_parallel.get(),
            config.max_attempts.get(),
            to_loop,
        ));
        let recorder = Recorder::start(spool, Arc::clone(&shared))
            .map_err(setup("starting the result recorder"))?;
        let mut worker = Worker::new(opts, Arc::clone(&shared), recorder, confinement, weaker);
        let served = worker.serve(inbox, inherited).await?;
        // Every slot is idle now; a failed loop leaves them, and the
        // process exit ends them.
        worker.shutdown();
        let handing = served.is_some();
        if !handing {
            // What the jobs left behind is gone before the worker is.
            reaper::finish();
            if let Some(tree) = cgroup::tree() {
                tree.drain();
            }
        }
        if let Some((mut sigterm, mut sigint)) = served {
            // The only thread left blocks the stop signals: one that comes
            // from now on stays pending across `execve`, for the new worker.
            // One the runtime's handler took already is read when it parks:
            // a moment for that (nothing new can come now).
            handover::block_loop_signals();
            let late = tokio::time::timeout(Duration::from_millis(20), async {
                tokio::select! {
                    _ = sigterm.recv() => "SIGTERM",
                    _ = sigint.recv() => "SIGINT",
                }
            })
            .await;
            if let Ok(signal) = late
                && worker.stop_signal.is_none()
            {
                info!("{signal}: the new worker stops once it has taken over");
                worker.stop_signal = Some(signal.into());
            }
        }
        Ok(match worker.handover_to.take() {
            Some(binary) if handing => {
                let jobs = std::mem::take(&mut shared.lock().handed);
                Exit::Handover(handover::Handover::new(
                    binary,
                    jobs,
                    worker.serving.take(),
                    worker.stop_signal.take(),
                ))
            }
            _ => Exit::Stopped,
        })
    })
}

/// First and longest pause before recording is retried (and claiming
/// resumed) after a write failed.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// How long the worker stays idle before it gives memory back.
const TRIM_AFTER: Duration = Duration::from_millis(200);

/// The shortest time between two `STATUS=` updates of the same kind.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// What a `STATUS=` line reports, broadly; a change of kind is sent at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatusKind {
    Idle,
    Running,
    /// Results waiting to be written, or claiming paused.
    Trouble,
    Stopping,
}

/// How long past its timeout and kill grace a job may stay unreaped before
/// the heartbeat is withheld (its slot is then not doing its job).
const OVERDUE_MARGIN: Duration = Duration::from_secs(10);

/// A run whose process has ended.
struct Ran {
    job: Job,
    running_path: PathBuf,
    /// The lock on the job file, held (never read) until it has left
    /// `running/`.
    _lock: File,
    result: JobResult,
    /// What it ran, for the journal entry of its end, when known.
    command: Option<CommandDigest>,
}

struct Worker {
    spool: Spool,
    config: Config,
    config_path: Option<PathBuf>,
    /// The queue and bookkeeping shared with the slots.
    shared: Arc<Shared>,
    /// The thread that writes results, and a way to send it records.
    recorder: Recorder,
    record_tx: Option<RecordSender>,
    slot_threads: Vec<JoinHandle<()>>,
    /// Set when SIGTERM arrived: when running jobs will be interrupted.
    stop_at: Option<tokio::time::Instant>,
    /// Results that could not be written yet, retried at `retry_at`.
    unrecorded: Vec<(JobId, Record)>,
    /// Ids whose result a previous worker held (the disk was full) and that
    /// could not be written yet: recovery leaves their job files alone.
    held_ids: std::collections::HashSet<JobId>,
    retry_at: Option<tokio::time::Instant>,
    retry_delay: Duration,
    /// The shared count of settled results when the last retry was
    /// scheduled: one settled since resets the back-off.
    settled_seen: u64,
    notifier: Notifier,
    /// When `STATUS=` was last sent, of which kind and with which text, and
    /// when a held-back or refreshing update is due (see
    /// [`Worker::update_status`]).
    status_sent_at: Option<tokio::time::Instant>,
    status_sent_kind: StatusKind,
    status_sent: String,
    status_due: Option<tokio::time::Instant>,
    /// Turns of the event loop, and the count at the last watchdog ping.
    turns: u64,
    turns_at_ping: u64,
    /// The shared hold that says a worker serves this spool.
    serving: Option<Serving>,
    /// Handing over to this (replaced) binary.
    handover_to: Option<PathBuf>,
    /// A stop that arrived during the hand-over, for the new worker.
    stop_signal: Option<String>,
    /// How jobs are isolated (fixed at start), and why that is less than
    /// the strongest level when `isolation = "auto"` settled for less.
    confinement: Arc<Confinement>,
    weaker: Option<String>,
    /// When the worker, idle since, gives memory back.
    trim_at: Option<tokio::time::Instant>,
}

impl Worker {
    fn new(
        opts: WorkerOptions,
        shared: Arc<Shared>,
        recorder: Recorder,
        confinement: Arc<Confinement>,
        weaker: Option<String>,
    ) -> Self {
        let record_tx = recorder.sender();
        Worker {
            spool: Spool::new(opts.spool),
            config: opts.loaded.config,
            config_path: opts.config_path,
            shared,
            recorder,
            record_tx,
            slot_threads: Vec::new(),
            stop_at: None,
            unrecorded: Vec::new(),
            held_ids: std::collections::HashSet::new(),
            retry_at: None,
            retry_delay: RETRY_FIRST,
            settled_seen: 0,
            notifier: Notifier::from_env(),
            status_sent_at: None,
            status_sent_kind: StatusKind::Idle,
            status_sent: String::new(),
            status_due: None,
            turns: 0,
            turns_at_ping: 0,
            serving: None,
            handover_to: None,
            stop_signal: None,
            confinement,
            weaker,
            trim_at: None,
        }
    }

    /// Ends the (idle) slots, then the recorder once they are gone.
    fn shutdown(&mut self) {
        self.shared.shutdown();
        for t in self.slot_threads.drain(..) {
            if t.join().is_err() {
                error!("a job slot panicked");
            }
        }
        self.record_tx = None;
        self.recorder.shutdown();
    }

    /// Starts slot threads up to `max_parallel`.
    fn ensure_slots(&mut self) -> Result<(), WorkerError> {
        let Some(tx) = self.record_tx.as_ref() else {
            return Ok(());
        };
        // Jobs handed over run at once, even beyond a lowered max_parallel.
        let adopted = self.shared.lock().adopted.len();
        let started = self
            .shared
            .ensure_slots(self.config.max_parallel.get().max(adopted), tx)
            .map_err(setup("starting job slots"))?;
        self.slot_threads.extend(started);
        Ok(())
    }

    /// Serves until stopped; when handing over, returns the stop signals'
    /// streams, for a signal taken but not yet read (see [`run`]).
    async fn serve(
        &mut self,
        mut inbox: UnboundedReceiver<ToLoop>,
        inherited: handover::Inherited,
    ) -> Result<Option<(Signal, Signal)>, WorkerError> {
        self.spool.ensure_layout()?;
        let handover::Inherited {
            jobs: adopted,
            serving,
            stop,
        } = inherited;
        self.serving = Some(match serving {
            Some(s) => s,
            None => Serving::take(self.spool.root(), SERVE_WAIT)
                .map_err(setup("holding the spool's serving lock"))?,
        });
        let mut sigterm = signal(SignalKind::terminate()).map_err(setup("handling SIGTERM"))?;
        let mut sigint = signal(SignalKind::interrupt()).map_err(setup("handling SIGINT"))?;
        let mut sighup = signal(SignalKind::hangup()).map_err(setup("handling SIGHUP"))?;
        // Handlers in place: signals that came while a previous worker
        // handed over (pending, blocked across `execve`) are taken now.
        handover::unblock_loop_signals();
        let inotify = Inotify::init().map_err(setup("starting inotify"))?;
        let mut events = inotify
            .into_event_stream(vec![0u8; 64 * 1024])
            .map_err(setup("starting inotify"))?;
        let mut watched = self.watch_pending(&events);
        let cancel_wd = self.watch_cancel(&events);
        // Results the last worker could not write go in first, so that
        // recovery does not take their jobs for interrupted.
        self.deliver_held();
        let taken_over = adopted.len();
        // Job cgroups a worker killed outside systemd left are cleared;
        // those of jobs handed over stay theirs.
        let keep: Vec<&std::path::Path> = adopted
            .iter()
            .filter_map(|h| h.followed.cgroup_dir())
            .collect();
        let contained = cgroup::describe(cgroup::init(&keep));
        if taken_over > 0 {
            // Before recovery, which then passes over their files (locked).
            self.shared.adopt(adopted);
        }
        // Orphans of the jobs are this process's from here on; the jobs
        // taken over are registered (by `Followed::from_wire`).
        reaper::start(self.config.kill_grace.get())
            .map_err(setup("becoming the subreaper of the jobs' processes"))?;
        self.recover();
        if let Err(e) = reserve::ensure(&self.spool) {
            warn!("{e}; results held at a stop with the disk full could be lost");
        }
        self.rescan();
        // Cancels asked while no worker ran.
        self.cancel_waiting();
        self.shared.lock().reports_status = self.notifier.enabled();
        self.ensure_slots()?;
        if let Some(why) = self.weaker.take() {
            warn!(
                message_id = message_id::ISOLATION_LIMITED,
                isolation = self.confinement.level().as_str(),
                "{why}"
            );
        }
        info!(message_id = message_id::CONTAINMENT, "{contained}");
        info!(
            message_id = message_id::WORKER_READY,
            spool = %self.spool.root().display(),
            max_parallel = self.config.max_parallel.get(),
            isolation = self.confinement.level().as_str(),
            watchdog = self.notifier.watchdog_interval().map(|d| humantime::format_duration(d * 2).to_string()).unwrap_or_else(|| "off".into()),
            "worker ready; {} job(s) queued{}",
            self.shared.lock().queue.len(),
            if taken_over > 0 {
                format!("; {taken_over} running job(s) taken over from the previous worker")
            } else {
                String::new()
            }
        );
        let status = self.status_line(&self.shared.lock());
        self.notifier.ready(&status);
        let mut heartbeat = self.notifier.watchdog_interval().map(|every| {
            let mut t = tokio::time::interval(every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let mut rescan = tokio::time::interval(self.config.rescan_interval.get());
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rescan.reset();
        // When to look again at files left in pending/ as not whole yet.
        let mut recheck_at: Option<tokio::time::Instant> = None;
        if let Some(signal) = stop {
            self.begin_stop(&signal);
        }

        loop {
            self.turns += 1;
            if self.handover_to.is_some() && self.shared.lock().quiet() {
                // Every running job is set aside and every result due is
                // written (or kept in the reserve for the new worker).
                while let Ok(msg) = inbox.try_recv() {
                    if let ToLoop::Failed(failed) = msg {
                        let (id, record, _) = *failed;
                        self.unrecorded.push((id, record));
                    }
                }
                self.keep_held();
                let handed = self.shared.lock().handed.len();
                info!(
                    message_id = message_id::WORKER_HANDOVER,
                    "handing {handed} running job(s) over to the new binary"
                );
                return Ok(Some((sigterm, sigint)));
            }
            if self.notifier.enabled() {
                self.update_status(false);
            }
            // Stopping: wait for running jobs and for results still to be
            // written, until the stop grace has run out.
            let stopped = {
                let st = self.shared.lock();
                st.stopping && st.quiet() && (self.unrecorded.is_empty() || st.interrupted_all)
            };
            if stopped {
                // A record the recorder failed on may have been sent just
                // before the worker went quiet: it is held with the rest.
                while let Ok(msg) = inbox.try_recv() {
                    if let ToLoop::Failed(failed) = msg {
                        let (id, record, _) = *failed;
                        self.unrecorded.push((id, record));
                    }
                }
                self.keep_held();
                break;
            }
            self.arm_trim();
            let trim_at = self.trim_at;
            let stop_at = self.stop_at.filter(|_| !self.shared.lock().interrupted_all);
            let retry_at = self.retry_at;
            let status_due = self.status_due;
            tokio::select! {
                ev = events.next() => match ev {
                    Some(Ok(ev)) if cancel_wd.as_ref() == Some(&ev.wd) => {
                        if let Some(name) = ev.name {
                            self.on_cancel(name);
                        }
                    }
                    Some(Ok(ev)) => {
                        if ev.mask.contains(EventMask::Q_OVERFLOW) {
                            warn!("inotify queue overflowed; rescanning pending/");
                            // Closes may have been lost with the rest.
                            self.shared.lock().writing.clear();
                            self.rescan();
                        } else if ev.mask.intersects(EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF) {
                            watched = false;
                        } else if let Some(name) = ev.name {
                            self.on_event(name, ev.mask);
                        }
                    }
                    Some(Err(e)) => {
                        warn!("reading inotify events: {e}; rescanning pending/");
                        self.rescan();
                    }
                    None => return Err(WorkerError::Setup {
                        what: "reading inotify events",
                        source: io::Error::other("the event stream ended"),
                    }),
                },
                msg = inbox.recv() => match msg {
                    Some(ToLoop::Kick) => {}
                    Some(ToLoop::Paused) => self.schedule_retry(),
                    Some(ToLoop::NotYet) => {
                        let at = tokio::time::Instant::now() + claim::SETTLE;
                        recheck_at = Some(recheck_at.map_or(at, |r| r.min(at)));
                    }
                    Some(ToLoop::Failed(failed)) => {
                        let (id, record, error) = *failed;
                        self.on_failed(id, record, &error);
                    }
                    // A thread that owned jobs or results is gone: stop, and
                    // let the next start record what is left in running/.
                    Some(ToLoop::Panicked(what)) => return Err(WorkerError::Setup {
                        what: "running jobs",
                        source: io::Error::other(format!("{what} thread panicked")),
                    }),
                    None => return Err(WorkerError::Setup {
                        what: "running jobs",
                        source: io::Error::other("the slots' channel closed"),
                    }),
                },
                _ = sigterm.recv() => self.begin_stop("SIGTERM"),
                _ = sigint.recv() => self.begin_stop("SIGINT"),
                _ = sighup.recv() => self.reload(),
                _ = async { heartbeat.as_mut().expect("guarded").tick().await }, if heartbeat.is_some() => {
                    self.heartbeat();
                }
                () = async { tokio::time::sleep_until(retry_at.expect("guarded")).await }, if retry_at.is_some() => {
                    self.retry();
                }
                _ = rescan.tick() => {
                    if !watched {
                        watched = self.rewatch(&events);
                    }
                    self.rescan();
                }
                () = async { tokio::time::sleep_until(stop_at.expect("guarded")).await }, if stop_at.is_some() => {
                    self.shared.interrupt_all("the job outlived the stop grace");
                }
                () = async { tokio::time::sleep_until(status_due.expect("guarded")).await }, if status_due.is_some() => {
                    self.update_status(true);
                }
                () = async { tokio::time::sleep_until(trim_at.expect("guarded")).await }, if trim_at.is_some() => {
                    self.release_memory();
                }
                () = async { tokio::time::sleep_until(recheck_at.expect("guarded")).await }, if recheck_at.is_some() => {
                    recheck_at = None;
                    self.rescan();
                }
            }
            if !watched {
                watched = self.rewatch(&events);
            }
        }
        let st = self.shared.lock();
        info!(
            message_id = message_id::WORKER_STOPPING,
            succeeded = st.counters.succeeded,
            failed = st.counters.failed,
            rejected = st.counters.rejected,
            "worker stopped"
        );
        Ok(None)
    }

    fn watch_pending<T>(&self, events: &inotify::EventStream<T>) -> bool
    where
        T: AsMut<[u8]> + AsRef<[u8]>,
    {
        let mask = WatchMask::MOVED_TO
            | WatchMask::CLOSE_WRITE
            | WatchMask::CREATE
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF
            | WatchMask::ONLYDIR;
        match events.watches().add(self.spool.pending(), mask) {
            Ok(_) => true,
            Err(e) => {
                error!("cannot watch {}: {e}", self.spool.pending().display());
                false
            }
        }
    }

    /// Watches `cancel/` for requests (renamed in, or written and closed),
    /// and for what never gets a close (a link, a directory, a FIFO), which
    /// is removed at once.
    fn watch_cancel<T>(&self, events: &inotify::EventStream<T>) -> Option<inotify::WatchDescriptor>
    where
        T: AsMut<[u8]> + AsRef<[u8]>,
    {
        let mask =
            WatchMask::MOVED_TO | WatchMask::CLOSE_WRITE | WatchMask::CREATE | WatchMask::ONLYDIR;
        match events.watches().add(self.spool.cancel(), mask) {
            Ok(wd) => Some(wd),
            Err(e) => {
                error!(
                    "cannot watch {}: {e}; jobs cannot be cancelled until the worker restarts",
                    self.spool.cancel().display()
                );
                None
            }
        }
    }

    /// Takes every request waiting in `cancel/`.
    fn cancel_waiting(&mut self) {
        let Ok(entries) = fs::read_dir(self.spool.cancel()) else {
            return;
        };
        let names: Vec<OsString> = entries.flatten().map(|e| e.file_name()).collect();
        for name in names {
            self.on_cancel(name);
        }
    }

    /// A cancel request `cancel/<name>`: its owner asks to cancel job
    /// `<name>`. The request is removed whatever comes of it; the job is
    /// withdrawn if pending, stopped if running, and only for its submitter,
    /// root or the worker's own user.
    fn on_cancel(&mut self, name: OsString) {
        let path = self.spool.cancel().join(&name);
        let shown = name.to_string_lossy().into_owned();
        // Who asks is the owner of the request; a link is not followed.
        let Ok(meta) = fs::symlink_metadata(&path) else {
            return;
        };
        let removed = if meta.is_dir() {
            fs::remove_dir(&path)
        } else {
            fs::remove_file(&path)
        };
        if let Err(e) = removed
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!("cannot remove the cancel request cancel/{shown}: {e}");
        }
        if !meta.is_file() {
            warn!("cancel/{shown} is not a regular file: removed, nothing cancelled");
            return;
        }
        // A hard link to someone else's file would speak as its owner.
        if meta.nlink() > 1 {
            warn!("cancel/{shown} has other hard links: removed, nothing cancelled");
            return;
        }
        let Ok(id) = shown.parse::<JobId>() else {
            warn!("cancel/{shown} does not name a job id: removed, nothing cancelled");
            return;
        };
        let ctx = Arc::clone(&self.shared.lock().ctx);
        let (by, _) = ctx.submitters.owner(meta.uid());
        let outcome = match self.shared.cancel(&id, &by) {
            Some(done) => Some(done),
            None => match self.withdraw(&id, &by, &ctx) {
                Some(done) => Some(done),
                // Claimed meanwhile, or not there at all.
                None => self.shared.cancel(&id, &by),
            },
        };
        match outcome {
            Some(Ok(what)) => info!(cmd_id = %id, cancelled_by = by.uid, "cancel: {what}"),
            Some(Err(why)) => {
                warn!(cmd_id = %id, requester = by.uid, "cancel refused: {why}; the job goes on");
            }
            None => info!(
                cmd_id = %id,
                requester = by.uid,
                "cancel: no pending or running job {id}; nothing to do"
            ),
        }
    }

    /// Withdraws the pending job `id` for `by`: its file goes to
    /// `archive/cancelled/` and it gets a `cancelled` result. `None` when
    /// no file of it is pending, or a slot has just taken it.
    fn withdraw(
        &mut self,
        id: &JobId,
        by: &Submitter,
        ctx: &claim::ClaimCtx,
    ) -> Option<Result<&'static str, String>> {
        // The id is held, so that no slot claims it meanwhile.
        if !self.shared.lock().busy.insert(id.clone()) {
            return None;
        }
        let mut done = None;
        for kind in ["json", "sh"] {
            let path = self.spool.pending().join(format!("{id}.{kind}"));
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if !slots::may_cancel(by.uid, Some(meta.uid())) {
                done = Some(Err(slots::refusal(Some(meta.uid()))));
                break;
            }
            // The result first, while the file is still in pending/ (and
            // the id held): a client never finds the job in no state.
            let (submitter, _) = ctx.submitters.owner(meta.uid());
            let mut r = JobResult::not_run(
                id,
                Status::Cancelled,
                format!("cancelled before it ran by {}", who(by)),
                1,
                Some(submitter),
            );
            r.cancelled_by = Some(by.clone());
            // What the file says of itself, if it can be read.
            let job_kind = if kind == "sh" {
                crate::spool::JobKind::Script
            } else {
                crate::spool::JobKind::Json
            };
            let job = crate::spool::open_job_file(&path).ok().and_then(|f| {
                let mut bytes = Vec::new();
                io::Read::read_to_end(&mut io::Read::take(f, ctx.max_job_bytes), &mut bytes)
                    .ok()?;
                Job::parse(job_kind, &bytes).ok()
            });
            if let Some(job) = job {
                r.submitted_via = Some(job.submitted_via);
                r.attempt = job.attempt;
            }
            let max_attempts = self.config.max_attempts.get();
            if let record::Recorded::Failed { error, .. } =
                record::record_now(&self.spool, id.clone(), Record::Rejection(r), max_attempts)
            {
                done = Some(Err(format!("cannot write its result: {error}")));
                break;
            }
            match crate::spool::move_into(&path, &self.spool.archive_cancelled()) {
                Ok(_) => {
                    done = Some(Ok("pending: withdrawn"));
                    break;
                }
                // Removed by hand meanwhile: withdrawn all the same.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    done = Some(Ok("pending: withdrawn"));
                    break;
                }
                Err(e) => {
                    // Its result is written: it must not run. Removed, then.
                    warn!(cmd_id = %id, "cannot move the cancelled job file to archive/cancelled/: {e}; removing it");
                    done = Some(match fs::remove_file(&path) {
                        Ok(()) => Ok("pending: withdrawn (its file removed)"),
                        Err(e) => Err(format!(
                            "its result says cancelled, but its file stays in pending/: {e}"
                        )),
                    });
                    break;
                }
            }
        }
        let mut st = self.shared.lock();
        let freed = st.release(id);
        self.shared.wake(&st, freed);
        done
    }

    /// `pending/` went away or was replaced: re-create the layout and watch
    /// the new directory. Retried on every rescan tick until it works.
    fn rewatch<T>(&mut self, events: &inotify::EventStream<T>) -> bool
    where
        T: AsMut<[u8]> + AsRef<[u8]>,
    {
        warn!("pending/ was removed or moved; re-creating the spool layout");
        if let Err(e) = self.spool.ensure_layout() {
            error!("{e}; will retry at the next rescan");
            return false;
        }
        let ok = self.watch_pending(events);
        if ok {
            self.rescan();
        }
        ok
    }

    fn on_event(&mut self, name: OsString, mask: EventMask) {
        if mask.contains(EventMask::CREATE) {
            // A plain file being created is handled when it is closed. What
            // never gets a close (a directory, symlink, FIFO, or a hard link
            // made into pending/) is handled now.
            let path = self.spool.pending().join(&name);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_file() && m.nlink() < 2 => {
                    // Open for writing until its close: rescans leave it.
                    self.shared.lock().writing.insert(name);
                    return;
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
        let ino = fs::symlink_metadata(self.spool.pending().join(&name)).map(|m| m.ino());
        let mut st = self.shared.lock();
        // Closed by its writer, or renamed in whole.
        st.writing.remove(&name);
        st.unsure.remove(&name);
        if let Some(stuck) = st.stuck.get(&name) {
            if ino.as_ref().is_ok_and(|i| i == stuck) {
                // The same item that was reported (the event of the
                // worker's own rename aside, say): passed over.
                return;
            }
            // Something new under the name: it is looked at again.
            st.stuck.remove(&name);
        }
        if st.enqueue(name) {
            self.shared.wake(&st, 1);
        }
    }

    /// Queues every file in `pending/` not queued yet, oldest arrival first.
    fn rescan(&mut self) {
        let dir = self.spool.pending();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => {
                error!("cannot list {}: {e}", dir.display());
                return;
            }
        };
        let names: Vec<fs::DirEntry> = rd.filter_map(Result::ok).collect();
        // Only files not queued yet are looked at (a large backlog is
        // listed on every rescan); the lock is not held meanwhile.
        let new: Vec<fs::DirEntry> = {
            let st = self.shared.lock();
            names
                .into_iter()
                .filter(|e| {
                    let name = e.file_name();
                    !st.queued.contains_key(&name)
                        && !st.writing.contains(&name)
                        && st.stuck.get(&name) != Some(&std::os::unix::fs::DirEntryExt::ino(e))
                })
                .collect()
        };
        debug!("rescanned pending/: {} new name(s)", new.len());
        let mut found: Vec<(Timestamp, OsString)> = new
            .into_iter()
            .map(|e| {
                let t = e
                    .metadata()
                    .map(|m| change_time(&m))
                    .unwrap_or_else(|_| Timestamp::now());
                (t, e.file_name())
            })
            .collect();
        found.sort();
        let mut st = self.shared.lock();
        let mut added = 0;
        for (_, name) in found {
            if st.enqueue(name.clone()) {
                st.unsure.insert(name);
                added += 1;
            }
        }
        if added > 0 {
            debug!("rescan found {added} file(s)");
            self.shared.wake(&st, added);
        }
    }

    /// Stopping with results not written (the disk was full): one last try
    /// now, in case space has returned; what still fails is stored in the
    /// reserve (`completed/.held-results`), which the next start delivers.
    fn keep_held(&mut self) {
        if self.unrecorded.is_empty() {
            return;
        }
        let max_attempts = self.config.max_attempts.get();
        let mut kept = Vec::new();
        for (id, record) in std::mem::take(&mut self.unrecorded) {
            match record::record_now(&self.spool, id, record, max_attempts) {
                record::Recorded::Settled { .. } => {}
                record::Recorded::Failed { id, record, .. } => kept.push((id, record)),
            }
        }
        if kept.is_empty() {
            info!("the results held while the disk was full were written before stopping");
            return;
        }
        let results = held_results(&kept);
        match reserve::store(&self.spool, &results) {
            Ok(n) if n == results.len() => warn!(
                "{n} result(s) could not be written before stopping (the disk is full); \
                 kept in completed/{}, the next start writes them",
                reserve::RESERVE_NAME
            ),
            Ok(n) => error!(
                "{} result(s) could not be written before stopping; {n} kept in completed/{}, \
                 the others' jobs will be recorded interrupted at the next start",
                results.len(),
                reserve::RESERVE_NAME
            ),
            Err(e) => error!(
                "{} result(s) could not be written before stopping, nor kept: {e}; \
                 their jobs will be recorded interrupted at the next start",
                results.len()
            ),
        }
    }

    /// At start: writes the results the last worker kept in the reserve,
    /// unless a newer result of the id is in place. What cannot be written
    /// yet is held and retried like any result, and its job file in
    /// `running/` waits for it rather than being recovered as interrupted.
    fn deliver_held(&mut self) {
        let held = match reserve::take(&self.spool) {
            Ok(h) => h,
            Err(e) => {
                error!("{e}; results kept by the last worker may be lost");
                return;
            }
        };
        if held.is_empty() {
            return;
        }
        let max_attempts = self.config.max_attempts.get();
        let mut waiting = Vec::new();
        let mut failed = Vec::new();
        for r in held {
            let Ok(id) = JobId::new(&r.id) else { continue };
            let newer = self
                .spool
                .read_result(&id)
                .ok()
                .flatten()
                .is_some_and(|old| old.finished_at >= r.finished_at);
            if newer {
                continue;
            }
            match record::record_now(
                &self.spool,
                id.clone(),
                Record::Held(r.clone()),
                max_attempts,
            ) {
                record::Recorded::Settled { .. } => {
                    info!(cmd_id = %id, "wrote the result the last worker kept while the disk was full");
                    log_result(&r, None);
                }
                record::Recorded::Failed { id, record, error } => {
                    waiting.push(r);
                    self.held_ids.insert(id.clone());
                    failed.push((id, record, error));
                }
            }
        }
        // What is written leaves the reserve; what waits stays in it.
        if let Err(e) = reserve::store(&self.spool, &waiting) {
            warn!("{e}");
        }
        for (id, record, error) in failed {
            self.on_failed(id, record, &error);
        }
    }

    /// Recording failed (a full disk, say): hold the result, claim nothing
    /// new, and retry with a growing pause.
    fn on_failed(&mut self, id: JobId, record: Record, error: &SpoolError) {
        self.unrecorded.push((id.clone(), record));
        // Kept on disk too, in the room reserved for it, so that not even
        // a kill loses what the jobs did.
        if let Err(e) = reserve::store(&self.spool, &held_results(&self.unrecorded)) {
            warn!("{e}; the held results are in memory only");
        }
        self.shared.lock().paused = true;
        self.schedule_retry();
        let wait = self
            .retry_at
            .map(|t| t.saturating_duration_since(tokio::time::Instant::now()))
            .unwrap_or_default();
        error!(
            cmd_id = %id,
            "recording the result failed: {error}; held in memory, claiming paused, retrying in {}s",
            wait.as_secs_f32().ceil()
        );
    }

    fn schedule_retry(&mut self) {
        if self.retry_at.is_none() {
            let settled = self.shared.lock().settled;
            if settled != self.settled_seen {
                // Results were written since the last failure.
                self.settled_seen = settled;
                self.retry_delay = RETRY_FIRST;
            }
            self.retry_at = Some(tokio::time::Instant::now() + self.retry_delay);
            self.retry_delay = (self.retry_delay * 2).min(RETRY_MAX);
        }
    }

    /// Retries what could not be written, and resumes claiming.
    fn retry(&mut self) {
        self.retry_at = None;
        let held = std::mem::take(&mut self.unrecorded);
        let max_attempts = self.config.max_attempts.get();
        let mut st = self.shared.lock();
        st.paused = false;
        st.in_flight += held.len();
        self.shared.wake(&st, usize::MAX);
        drop(st);
        for (id, record) in held {
            match &self.record_tx {
                Some(tx) => tx.send(&self.shared, id, record, max_attempts),
                None => self.shared.unsent(),
            }
        }
    }

    fn begin_stop(&mut self, signal: &str) {
        if self.handover_to.is_some() {
            info!("{signal}: the new worker stops once it has taken over");
            self.stop_signal = Some(signal.to_owned());
            return;
        }
        if self.stop_at.is_some() {
            info!("{signal} again: stopping now, without waiting for the stop grace");
            self.shared
                .interrupt_all(&format!("a second {signal} stopped it at once"));
            return;
        }
        let running = {
            let mut st = self.shared.lock();
            st.stopping = true;
            st.active().count() + st.adopted.len()
        };
        let grace = self.config.stop_grace.get();
        info!(
            message_id = message_id::WORKER_STOPPING,
            "{signal}: no new jobs; {running} running job(s) get {} to finish",
            humantime::format_duration(grace)
        );
        self.stop_at = Some(tokio::time::Instant::now() + grace);
        self.notifier
            .stopping(&format!("stopping: waiting for {running} running job(s)"));
    }

    /// Once the worker has gone idle after running jobs, memory is given
    /// back [`TRIM_AFTER`] later; work before then puts that off.
    fn arm_trim(&mut self) {
        let st = self.shared.lock();
        let idle = st.untrimmed && st.quiet() && st.queue.is_empty();
        drop(st);
        if !idle {
            self.trim_at = None;
        } else if self.trim_at.is_none() {
            self.trim_at = Some(tokio::time::Instant::now() + TRIM_AFTER);
        }
    }

    /// Gives back what a burst of jobs left allocated: the queue's grown
    /// collections, then the allocator's free memory (glibc keeps it, so
    /// a worker that ran 20,000 queued jobs would otherwise stay megabytes
    /// larger when idle).
    fn release_memory(&mut self) {
        self.trim_at = None;
        let mut st = self.shared.lock();
        if !(st.quiet() && st.queue.is_empty()) {
            return;
        }
        st.untrimmed = false;
        st.shrink();
        drop(st);
        self.unrecorded.shrink_to_fit();
        #[cfg(target_env = "gnu")]
        #[allow(unsafe_code)]
        // SAFETY: `malloc_trim` has no preconditions: it takes the
        // allocator's own locks and returns free pages to the kernel.
        unsafe {
            nix::libc::malloc_trim(0);
        }
    }

    fn reload(&mut self) {
        if self.handover_to.is_some() {
            return;
        }
        self.notifier.reloading();
        if let Some(binary) = handover::replaced_binary() {
            if self.stop_at.is_some() {
                info!(
                    "{} was replaced; the worker is stopping, so the next start runs it",
                    binary.display()
                );
            } else {
                match self.check_handover(&binary) {
                    Ok(()) => {
                        let running = self.shared.lock().active().count();
                        info!(
                            message_id = message_id::WORKER_HANDOVER,
                            "{} was replaced: handing over to it; {running} running job(s) carry on",
                            binary.display()
                        );
                        self.notifier.status("handing over to the new binary");
                        self.shared.begin_handover();
                        self.handover_to = Some(binary);
                        return;
                    }
                    Err(e) => error!(
                        "{} was replaced, but this worker does not hand over to it: {e:#}; it carries on with the binary it started from",
                        binary.display()
                    ),
                }
            }
        }
        match Config::load(self.config_path.as_deref()) {
            Ok(loaded) => {
                if loaded.config.spool.is_some() && loaded.config.spool != self.config.spool {
                    warn!("the spool cannot change on reload; restart the worker to move it");
                }
                if loaded.config.isolation != self.config.isolation {
                    warn!(
                        "isolation = \"{}\" takes effect when the worker next starts; it stays \"{}\" until then",
                        loaded.config.isolation, self.config.isolation
                    );
                }
                let (spool, isolation) = (self.config.spool.clone(), self.config.isolation);
                self.config = loaded.config;
                self.config.spool = spool;
                self.config.isolation = isolation;
                reaper::set_grace(self.config.kill_grace.get());
                let ctx = ClaimCtx::new(
                    self.spool.clone(),
                    &self.config,
                    Arc::clone(&self.confinement),
                );
                {
                    let mut st = self.shared.lock();
                    st.ctx = Arc::new(ctx);
                    st.max_parallel = self.config.max_parallel.get();
                    st.max_attempts = self.config.max_attempts.get();
                    self.shared.wake(&st, usize::MAX);
                }
                if let Err(e) = self.ensure_slots() {
                    error!("{e}; running with the slots there are");
                }
                info!(
                    max_parallel = self.config.max_parallel.get(),
                    "configuration reloaded"
                );
            }
            Err(e) => error!("reload failed, keeping the running configuration: {e}"),
        }
        let status = self.status_line(&self.shared.lock());
        self.notifier.ready(&status);
    }

    /// Whether the worker can hand over to `binary`: it runs, and the
    /// configuration the new worker will read loads.
    fn check_handover(&self, binary: &Path) -> anyhow::Result<()> {
        handover::runs(binary)?;
        Config::load(self.config_path.as_deref())
            .map_err(|e| anyhow::anyhow!("the configuration does not load: {e}"))?;
        Ok(())
    }

    /// Sends `STATUS=` when what the worker is doing changed kind (idle,
    /// running, stopping, in trouble), and otherwise at most every
    /// [`STATUS_EVERY`], and only when the text changed: each message costs
    /// systemd (PID 1) some work and a D-Bus signal, and a busy worker
    /// changes its counts hundreds of times a second. While jobs run, an
    /// update is due a second after each one sent (`due` says it is that
    /// one), so the counts keep up without the slots waking the loop; when
    /// none is due (idle, or nothing changed in the last second), the next
    /// job a slot starts or ends wakes it. An idle worker never wakes.
    fn update_status(&mut self, due: bool) {
        let now = tokio::time::Instant::now();
        let mut st = self.shared.lock();
        let kind = self.status_kind(&st);
        let recent = self
            .status_sent_at
            .is_some_and(|t| now.duration_since(t) < STATUS_EVERY);
        if !due && kind == self.status_sent_kind && recent {
            if self.status_due.is_none() {
                self.status_due = self.status_sent_at.map(|t| t + STATUS_EVERY);
            }
            st.status_waits = self.status_due.is_none();
            return;
        }
        if kind == StatusKind::Running && st.active().next().is_none() {
            // Between two jobs, or a claim under way: the job's start
            // (which wakes the loop, see `status_waits`) says more, and
            // sending this too would double the updates of a busy worker.
            st.status_waits = true;
            self.status_due = Some(now + STATUS_EVERY);
            return;
        }
        let line = self.status_line(&st);
        if line == self.status_sent {
            // Nothing new: no refresh is due until a slot starts or ends a
            // job (see `status_waits`) or the loop wakes for another reason.
            self.status_due = None;
            st.status_waits = true;
            return;
        }
        self.status_due = (kind != StatusKind::Idle).then(|| now + STATUS_EVERY);
        st.status_waits = self.status_due.is_none();
        drop(st);
        self.notifier.status(&line);
        self.status_sent_at = Some(now);
        self.status_sent_kind = kind;
        self.status_sent = line;
    }

    fn status_kind(&self, st: &State) -> StatusKind {
        if st.stopping {
            StatusKind::Stopping
        } else if !self.unrecorded.is_empty() || st.paused {
            StatusKind::Trouble
        } else if st.quiet() && st.queue.is_empty() {
            // Not merely between two jobs, which would flip the kind (and
            // send an update) whenever the loop looked in that gap.
            StatusKind::Idle
        } else {
            StatusKind::Running
        }
    }

    /// What the worker is doing, for `STATUS=` (shown by `systemctl status`).
    fn status_line(&self, st: &State) -> String {
        let c = &st.counters;
        let pending = st.queue.len() + st.deferred.len();
        let tail = format!(
            "{pending} pending, {} done, {} failed, {} rejected",
            c.succeeded + c.failed,
            c.failed,
            c.rejected
        );
        let tail = if self.unrecorded.is_empty() && !st.paused {
            tail
        } else {
            format!(
                "{tail}; CANNOT WRITE to the spool (disk full?): {} result(s) held in memory{}, retrying",
                self.unrecorded.len(),
                if st.paused { ", claiming paused" } else { "" }
            )
        };
        let mut ids: Vec<&str> = st.active().map(|j| j.id.as_str()).collect();
        if st.stopping {
            return format!("stopping: waiting for {} running job(s); {tail}", ids.len());
        }
        if ids.is_empty() {
            let starting = st.working > 0 || (!st.queue.is_empty() && !st.paused);
            if starting {
                return format!("starting the next job; {tail}");
            }
            return format!("idle; {tail}");
        }
        ids.sort_unstable();
        let shown = ids.iter().take(5).copied().collect::<Vec<_>>().join(", ");
        let more = if ids.len() > 5 { ", ..." } else { "" };
        format!("running {} job(s): {shown}{more}; {tail}", ids.len())
    }

    /// A watchdog tick: ping only if the self-check passes, else say why.
    fn heartbeat(&mut self) {
        match self.self_check() {
            Ok(()) => {
                self.turns_at_ping = self.turns;
                self.notifier.watchdog();
            }
            Err(reason) => warn!(
                message_id = message_id::HEARTBEAT_WITHHELD,
                "watchdog ping withheld: {reason}"
            ),
        }
    }

    /// The worker is healthy when its loop keeps turning, the spool's
    /// `pending/` is a usable directory, and no job has outlived its timeout
    /// and kill grace without being reaped.
    fn self_check(&self) -> Result<(), String> {
        if self.turns == self.turns_at_ping {
            return Err("the event loop has not turned since the last ping".into());
        }
        let pending = self.spool.pending();
        match fs::metadata(&pending) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("{} is not a directory", pending.display())),
            Err(e) => return Err(format!("{} is unreachable: {e}", pending.display())),
        }
        if let Err(e) = nix::unistd::access(
            &pending,
            nix::unistd::AccessFlags::R_OK
                | nix::unistd::AccessFlags::W_OK
                | nix::unistd::AccessFlags::X_OK,
        ) {
            return Err(format!("{} is not usable: {e}", pending.display()));
        }
        for job in self.shared.lock().active() {
            let ran = job.started.elapsed();
            if ran > job.limit.saturating_add(OVERDUE_MARGIN) {
                return Err(format!(
                    "job {} has run {} although it should have been killed after {}",
                    job.id,
                    humantime::format_duration(Duration::from_secs(ran.as_secs())),
                    humantime::format_duration(job.limit)
                ));
            }
        }
        Ok(())
    }

    /// Settles what a previous worker left in `running/`. A file another
    /// live worker holds (locked) is left alone.
    fn recover(&mut self) {
        let dir = self.spool.running();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => {
                error!("cannot list {}: {e}", dir.display());
                return;
            }
        };
        let mut last_extend = Instant::now();
        let ctx = Arc::clone(&self.shared.lock().ctx);
        for (n, entry) in rd.filter_map(Result::ok).enumerate() {
            if last_extend.elapsed() > Duration::from_secs(5) {
                // A long recovery must not make systemd give up on the start.
                last_extend = Instant::now();
                self.notifier.extend_timeout(
                    Duration::from_secs(30),
                    &format!("recovering jobs left in running/ ({n} done)"),
                );
            }
            let path = entry.path();
            let Ok((id, kind)) = parse_job_file_name(&entry.file_name()) else {
                archive_nameless(
                    &self.spool,
                    &path,
                    "found in running/ without a valid job name",
                    true,
                );
                continue;
            };
            let Ok(mut file) = open_job_file(&path) else {
                archive_nameless(
                    &self.spool,
                    &path,
                    "found in running/ and cannot be opened",
                    true,
                );
                continue;
            };
            if let Err(TryLockError::WouldBlock) = file.try_lock() {
                debug!(cmd_id = %id, "running/{} belongs to a live worker", id);
                continue;
            }
            if self.held_ids.contains(&id) {
                debug!(cmd_id = %id, "running/{id} waits for the result the last worker kept");
                continue;
            }
            let bytes = claim::read_bounded(&mut file, u64::MAX).ok();
            let job = bytes.as_deref().and_then(|b| Job::parse(kind, b).ok());
            let command = job
                .as_ref()
                .zip(bytes.as_deref())
                .map(|(j, b)| claim::digest(j, b));
            let submitted_by = file
                .metadata()
                .ok()
                .map(|m| ctx.submitters.owner(m.uid()).0);
            match self.recover_one(&id, &path, job.as_ref(), submitted_by, command.as_ref()) {
                Ok(()) => {}
                Err((e, None)) => error!(cmd_id = %id, "recovering {}: {e}", path.display()),
                Err((e, Some(result))) => {
                    // Most likely a full disk: held and retried like any
                    // result, so the job file is settled when space returns.
                    let ran = Ran {
                        job: job.unwrap_or_else(Job::placeholder),
                        running_path: path.clone(),
                        _lock: file,
                        result: *result,
                        command,
                    };
                    self.on_failed(id, Record::Run(Box::new(ran)), &e);
                }
            }
        }
    }

    fn recover_one(
        &mut self,
        id: &JobId,
        path: &Path,
        job: Option<&Job>,
        submitted_by: Option<Submitter>,
        command: Option<&CommandDigest>,
    ) -> Result<(), (SpoolError, Option<Box<JobResult>>)> {
        let latest = self.spool.latest_log(id).map_err(|e| (e, None))?;
        let latest_rel = latest.as_deref().map(|p| self.spool.relative(p));
        let previous = self.spool.read_result(id).ok().flatten();
        if latest_rel.is_some()
            && previous.as_ref().and_then(|r| r.log.as_deref()) == latest_rel.as_deref()
        {
            // The result of this run was written; only the clean-up was lost.
            return match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err((SpoolError::io("removing", path, e), None))
                }
                _ => Ok(()),
            };
        }
        let started_at = latest
            .as_deref()
            .and_then(log_started)
            .or_else(|| fs::metadata(path).ok().map(|m| change_time(&m)))
            .unwrap_or_else(Timestamp::now);
        let finished_at = Timestamp::now();
        let result = JobResult {
            id: id.to_string(),
            status: Status::Interrupted,
            exit_code: None,
            signal: None,
            started_at,
            finished_at,
            duration_ms: u64::try_from(finished_at.since(started_at).as_millis()).unwrap_or(u64::MAX),
            log: latest_rel,
            output_truncated: false,
            error: Some(
                "the worker stopped unexpectedly (crash, kill or power loss) while this job ran; it was not run again"
                    .into(),
            ),
            attempt: job.map_or(1, |j| j.attempt),
            submitted_by,
            usage: crate::spool::Usage::default(),
            limits: None,
            submitted_via: job.map(|j| j.submitted_via),
            cancelled_by: None,
        };
        let settled = settle(
            &self.spool,
            path,
            job,
            &result,
            self.config.max_attempts.get(),
        );
        match settled.map_err(|e| (e, Some(Box::new(result.clone()))))? {
            Settled::Requeued { attempt } => {
                info!(cmd_id = %id, attempt, "job interrupted by the previous worker re-queued");
            }
            Settled::Recorded(_) => {
                log_result(&result, command);
                self.shared.lock().counters.failed += 1;
            }
        }
        Ok(())
    }
}

/// The results among held records that the reserve keeps. An interrupted
/// run is not among them: the next start recovers it (and re-queues it if
/// it asked) anyway.
fn held_results(held: &[(JobId, Record)]) -> Vec<JobResult> {
    held.iter()
        .filter_map(|(_, r)| match r {
            Record::Run(ran) if ran.result.status != Status::Interrupted => {
                Some(ran.result.clone())
            }
            Record::Run(_) => None,
            Record::Rejection(r) | Record::Held(r) => Some(r.clone()),
        })
        .collect()
}

/// A file whose name gives no id: it cannot have a result, so it is only
/// moved aside, with the reason in the log.
/// Returns false if it could not be moved (and says so, if `report`).
fn archive_nameless(spool: &Spool, path: &Path, reason: &str, report: bool) -> bool {
    match move_into(path, &spool.archive_rejected()) {
        Ok(dest) => warn!(
            "{} is not a job file ({reason}); moved to {}",
            path.display(),
            spool.relative(&dest)
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            if report {
                error!(
                    "{} is not a job file ({reason}) and cannot be moved: {e}; \
                     left where it is, where `ai-cmd-executor diagnose` lists it for removal",
                    path.display()
                );
            } else {
                debug!("{} still cannot be moved: {e}", path.display());
            }
            return false;
        }
    }
    true
}

/// A user for messages: `alice (uid 1000)`, or `uid 1000`.
pub(super) fn who(s: &Submitter) -> String {
    match &s.name {
        Some(n) => format!("{n} (uid {})", s.uid),
        None => format!("uid {}", s.uid),
    }
}

/// One log line per recorded result, with the fields an operator filters on
/// and the audit trail: the id in the message, who submitted the job (from
/// the result), and what it ran (`command`, when known: not for a result
/// the last worker kept while the disk was full), and what it used.
fn log_result(r: &JobResult, command: Option<&CommandDigest>) {
    let exit = r
        .exit_code
        .map_or_else(|| "-".to_owned(), |c| c.to_string());
    let signal = r.signal.as_deref().unwrap_or("-");
    let submitter_uid = r.submitted_by.as_ref().map(|s| s.uid);
    let submitter = r.submitted_by.as_ref().and_then(|s| s.name.as_deref());
    let cmd = command.map(|c| c.excerpt.as_str());
    let cmd_sha256 = command.map(|c| c.sha256.as_str());
    let (cpu_user_ms, cpu_system_ms, max_rss_bytes, memory_peak_bytes) = (
        r.usage.cpu_user_ms,
        r.usage.cpu_system_ms,
        r.usage.max_rss_bytes,
        r.usage.memory_peak_bytes,
    );
    let limits = r.limits.as_ref().map(ToString::to_string);
    let limits = limits.as_deref();
    match r.status {
        Status::Succeeded => info!(
            message_id = message_id::JOB_FINISHED,
            cmd_id = %r.id, cmd_status = %r.status, exit_code = %exit, duration_ms = r.duration_ms,
            submitter_uid, submitter, cmd, cmd_sha256, cpu_user_ms, cpu_system_ms, max_rss_bytes, memory_peak_bytes, limits,
            "job {} finished: succeeded", r.id
        ),
        _ => {
            let outcome = match (&r.error, r.exit_code, &r.signal) {
                (Some(e), _, _) => e.clone(),
                (None, Some(code), _) => format!("{} (exit code {code})", r.status),
                (None, None, Some(sig)) => format!("{} ({sig})", r.status),
                (None, None, None) => r.status.to_string(),
            };
            warn!(
                message_id = message_id::JOB_FINISHED,
                cmd_id = %r.id, cmd_status = %r.status, exit_code = %exit, signal, duration_ms = r.duration_ms,
                submitter_uid, submitter, cmd, cmd_sha256, cpu_user_ms, cpu_system_ms, max_rss_bytes, memory_peak_bytes, limits,
                "job {} finished: {outcome}", r.id
            );
        }
    }
}
