//! The worker: one event loop that claims jobs from `pending/`, runs them,
//! and records their results.
//!
//! It waits on inotify events for `pending/`, child exits, finished result
//! writes, signals and a slow safety-net rescan; nothing polls while it is
//! idle. Start-up: load the config, ensure the layout, recover `running/`,
//! scan `pending/`, then serve.

mod claim;
mod exec;
mod record;
mod settle;
mod spawn;

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, TryLockError};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchMask};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::client::change_time;
use crate::config::{Config, LoadedConfig};
use crate::logging::message_id;
use crate::spool::id::parse_job_file_name;
use crate::spool::job::Job;
use crate::spool::{
    JobId, JobResult, Spool, SpoolError, Status, Timestamp, log_started, move_into, open_job_file,
};
use crate::systemd::notify::Notifier;

use claim::{Claim, ClaimCtx};
use record::{Record, Recorded, Recorder};
pub use settle::{Settled, settle};

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

/// Runs the worker until SIGTERM or SIGINT. Builds its own single-threaded
/// runtime: one thread claims, runs and reaps every job, and one more (the
/// recorder) writes results, so the loop never waits on an `fsync`.
pub fn run(opts: WorkerOptions) -> Result<(), WorkerError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(setup("starting the async runtime"))?;
    rt.block_on(async move {
        let (recorder, recorded) = Recorder::start(Spool::new(opts.spool.clone()))
            .map_err(setup("starting the result recorder"))?;
        let mut worker = Worker::new(opts, recorder);
        let served = worker.serve(recorded).await;
        worker.recorder.shutdown();
        served
    })
}

/// First and longest pause before recording is retried (and claiming
/// resumed) after a write failed.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// A job being run, and how to interrupt it.
struct ActiveJob {
    cancel: oneshot::Sender<()>,
    started: Instant,
    /// Timeout plus kill grace: past this the job should have been reaped.
    limit: Duration,
}

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
/// the heartbeat is withheld (the loop is then not doing its job).
const OVERDUE_MARGIN: Duration = Duration::from_secs(10);

/// A run whose process has ended.
struct Ran {
    id: JobId,
    job: Job,
    running_path: PathBuf,
    /// The lock on the job file, held (never read) until it has left
    /// `running/`.
    _lock: File,
    result: JobResult,
}

#[derive(Default)]
struct Counters {
    succeeded: u64,
    failed: u64,
    rejected: u64,
}

struct Worker {
    spool: Spool,
    config: Config,
    config_path: Option<PathBuf>,
    /// File names in arrival order.
    queue: VecDeque<OsString>,
    /// Names in `queue` or `deferred`, with when they were queued, so no
    /// name is queued twice.
    queued: HashMap<OsString, Timestamp>,
    /// Names whose id is busy; they go back to the queue when it is free.
    deferred: Vec<(JobId, OsString)>,
    /// Ids with a run in progress or a result being written.
    busy: HashSet<JobId>,
    /// Running jobs, with the way to interrupt each.
    active: HashMap<JobId, ActiveJob>,
    /// One task per running job; each ends with the finished run.
    tasks: JoinSet<Box<Ran>>,
    /// The thread that writes results.
    recorder: Recorder,
    /// Results for the recorder, sent after this turn's claims.
    to_record: Vec<(JobId, Record)>,
    /// Set when SIGTERM arrived: when running jobs will be interrupted.
    stop_at: Option<tokio::time::Instant>,
    interrupted_all: bool,
    counters: Counters,
    /// Results that could not be written yet, retried at `retry_at`.
    unrecorded: Vec<(JobId, Record)>,
    /// No claims until the retry: a log file could not be created.
    paused: bool,
    retry_at: Option<tokio::time::Instant>,
    retry_delay: Duration,
    notifier: Notifier,
    /// What claims need (rebuilt on reload).
    claim_ctx: ClaimCtx,
    /// When `STATUS=` was last sent, of which kind, and when a held-back
    /// update is due (see [`Worker::update_status`]).
    status_sent_at: Option<tokio::time::Instant>,
    status_sent_kind: StatusKind,
    status_due: Option<tokio::time::Instant>,
    /// Turns of the event loop, and the count at the last watchdog ping.
    turns: u64,
    turns_at_ping: u64,
}

impl Worker {
    fn new(opts: WorkerOptions, recorder: Recorder) -> Self {
        let spool = Spool::new(opts.spool);
        let claim_ctx = ClaimCtx::new(spool.clone(), &opts.loaded.config);
        Worker {
            spool,
            config: opts.loaded.config,
            config_path: opts.config_path,
            queue: VecDeque::new(),
            queued: HashMap::new(),
            deferred: Vec::new(),
            busy: HashSet::new(),
            active: HashMap::new(),
            tasks: JoinSet::new(),
            recorder,
            to_record: Vec::new(),
            stop_at: None,
            interrupted_all: false,
            counters: Counters::default(),
            unrecorded: Vec::new(),
            paused: false,
            retry_at: None,
            retry_delay: RETRY_FIRST,
            notifier: Notifier::from_env(),
            claim_ctx,
            status_sent_at: None,
            status_sent_kind: StatusKind::Idle,
            status_due: None,
            turns: 0,
            turns_at_ping: 0,
        }
    }

    async fn serve(
        &mut self,
        mut recorded: tokio::sync::mpsc::UnboundedReceiver<Vec<Recorded>>,
    ) -> Result<(), WorkerError> {
        self.spool.ensure_layout()?;
        let mut sigterm = signal(SignalKind::terminate()).map_err(setup("handling SIGTERM"))?;
        let mut sigint = signal(SignalKind::interrupt()).map_err(setup("handling SIGINT"))?;
        let mut sighup = signal(SignalKind::hangup()).map_err(setup("handling SIGHUP"))?;
        let inotify = Inotify::init().map_err(setup("starting inotify"))?;
        let mut events = inotify
            .into_event_stream(vec![0u8; 64 * 1024])
            .map_err(setup("starting inotify"))?;
        let mut watched = self.watch_pending(&events);
        self.recover();
        self.rescan();
        info!(
            message_id = message_id::WORKER_READY,
            spool = %self.spool.root().display(),
            max_parallel = self.config.max_parallel.get(),
            watchdog = self.notifier.watchdog_interval().map(|d| humantime::format_duration(d * 2).to_string()).unwrap_or_else(|| "off".into()),
            "worker ready; {} job(s) queued",
            self.queue.len()
        );
        let status = self.status_line();
        self.notifier.ready(&status);
        let mut heartbeat = self.notifier.watchdog_interval().map(|every| {
            let mut t = tokio::time::interval(every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let mut rescan = tokio::time::interval(self.config.rescan_interval.get());
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rescan.reset();

        loop {
            self.turns += 1;
            // Start what can start first: a freed slot should not wait for
            // the hand-off of the result that freed it.
            loop {
                self.dispatch();
                // A result written on the loop frees its id, which may let
                // a waiting run of it start.
                if !self.flush_records() {
                    break;
                }
            }
            if self.notifier.enabled() {
                self.update_status(false);
            }
            // Stopping: wait for running jobs and for results still to be
            // written, until the stop grace has run out.
            if self.stop_at.is_some()
                && self.tasks.is_empty()
                && self.recorder.in_flight() == 0
                && (self.unrecorded.is_empty() || self.interrupted_all)
            {
                if !self.unrecorded.is_empty() {
                    error!(
                        "{} result(s) could not be written before stopping; their jobs will be recorded interrupted at the next start",
                        self.unrecorded.len()
                    );
                }
                break;
            }
            let stop_at = self.stop_at.filter(|_| !self.interrupted_all);
            let retry_at = self.retry_at;
            let status_due = self.status_due;
            tokio::select! {
                ev = events.next() => match ev {
                    Some(Ok(ev)) => {
                        if ev.mask.contains(EventMask::Q_OVERFLOW) {
                            warn!("inotify queue overflowed; rescanning pending/");
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
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => match done {
                    Ok(ran) => self.on_ran(ran),
                    Err(e) => error!("a job task failed: {e}"),
                },
                batch = recorded.recv() => match batch {
                    Some(batch) => {
                        for r in batch {
                            self.recorder.answered();
                            self.on_recorded(r);
                        }
                    }
                    // Only a panic ends the recorder early. Results could
                    // no longer be written: stop, and let the next start
                    // record what is left in running/.
                    None => return Err(WorkerError::Setup {
                        what: "recording results",
                        source: io::Error::other("the recorder thread stopped unexpectedly"),
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
                    self.interrupt_all();
                }
                () = async { tokio::time::sleep_until(status_due.expect("guarded")).await }, if status_due.is_some() => {
                    self.update_status(true);
                }
            }
            if !watched {
                watched = self.rewatch(&events);
            }
        }
        info!(
            message_id = message_id::WORKER_STOPPING,
            succeeded = self.counters.succeeded,
            failed = self.counters.failed,
            rejected = self.counters.rejected,
            "worker stopped"
        );
        Ok(())
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
                Ok(m) if m.is_file() && m.nlink() < 2 => return,
                Ok(_) => {}
                Err(_) => return,
            }
        }
        self.enqueue(name);
    }

    fn enqueue(&mut self, name: OsString) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.queued.entry(name.clone()) {
            e.insert(Timestamp::now());
            self.queue.push_back(name);
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
        let mut found: Vec<(Timestamp, OsString)> = rd
            .filter_map(Result::ok)
            .filter(|e| !self.queued.contains_key(&e.file_name()))
            .map(|e| {
                let t = e
                    .metadata()
                    .map(|m| change_time(&m))
                    .unwrap_or_else(|_| Timestamp::now());
                (t, e.file_name())
            })
            .collect();
        found.sort();
        if !found.is_empty() {
            debug!("rescan found {} file(s)", found.len());
        }
        for (_, name) in found {
            self.enqueue(name);
        }
    }

    /// Starts queued jobs while there are free slots.
    fn dispatch(&mut self) {
        while self.stop_at.is_none()
            && !self.paused
            && self.active.len() < self.config.max_parallel.get()
        {
            let Some(name) = self.queue.pop_front() else {
                break;
            };
            let since = self.queued.remove(&name).unwrap_or_else(Timestamp::now);
            self.claim(name, since);
        }
    }

    /// Claims a queued file (queued at `since`) and starts it; see
    /// [`claim::claim`].
    fn claim(&mut self, name: OsString, since: Timestamp) {
        let (id, kind) = match parse_job_file_name(&name) {
            Ok(x) => x,
            Err(e) => {
                let path = self.spool.pending().join(&name);
                return self.archive_nameless(&path, &e.to_string());
            }
        };
        if self.busy.contains(&id) {
            // Runs of one id never overlap; this one waits for the other.
            self.queued.insert(name.clone(), since);
            self.deferred.push((id, name));
            return;
        }
        self.busy.insert(id.clone());
        let claimed = claim::claim(&mut self.claim_ctx, name, id, kind, since);
        self.on_claimed(claimed);
    }

    fn on_claimed(&mut self, claimed: Claim) {
        match claimed {
            Claim::Started(started) => {
                let claim::Started {
                    run,
                    spawned,
                    lock,
                    began,
                } = *started;
                let id = run.id.clone();
                let (tx, rx) = oneshot::channel();
                let limit = run.timeout + run.kill_grace;
                let job = run.job.clone();
                let running_path = run.running_path.clone();
                self.active.insert(
                    id.clone(),
                    ActiveJob {
                        cancel: tx,
                        started: began,
                        limit,
                    },
                );
                if self.interrupted_all {
                    // It started just as the stop grace ran out.
                    self.interrupt(&id);
                }
                self.tasks.spawn(async move {
                    let result = exec::execute(run, spawned, rx).await;
                    Box::new(Ran {
                        id,
                        job,
                        running_path,
                        _lock: lock,
                        result,
                    })
                });
            }
            Claim::Rejected { id, reason } => self.record_rejection(id, reason),
            Claim::Vanished { id, name, since } => {
                if !self.vanished(id.clone(), &name, since) {
                    self.release(id);
                }
            }
            Claim::Retry { id, name, since } => {
                self.queued.insert(name.clone(), since);
                self.queue.push_front(name);
                self.paused = true;
                self.schedule_retry();
                self.release(id);
            }
            Claim::Dropped { id } => self.release(id),
        }
    }

    /// A job's process ended: its result goes to the recorder.
    fn on_ran(&mut self, ran: Box<Ran>) {
        self.active.remove(&ran.id);
        let id = ran.id.clone();
        self.record(id, Record::Run(ran));
    }

    fn on_recorded(&mut self, recorded: Recorded) {
        match recorded {
            Recorded::Settled { id, outcome } => {
                match outcome {
                    Settled::Recorded(Status::Succeeded) => self.counters.succeeded += 1,
                    Settled::Recorded(Status::Rejected) => self.counters.rejected += 1,
                    Settled::Recorded(_) => self.counters.failed += 1,
                    Settled::Requeued { attempt } => {
                        info!(cmd_id = %id, attempt, "interrupted job re-queued for another attempt");
                    }
                }
                if self.unrecorded.is_empty() {
                    self.retry_delay = RETRY_FIRST;
                }
                self.release(id);
            }
            Recorded::Failed { id, record, error } => {
                // Results cannot be written (a full disk, say): hold them,
                // claim nothing new, and retry with a growing pause.
                self.unrecorded.push((id.clone(), record));
                self.paused = true;
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
        }
    }

    /// Queues a result for the recorder thread; sent at the next turn of
    /// the loop, after the claims.
    fn record(&mut self, id: JobId, record: Record) {
        self.to_record.push((id, record));
    }

    /// Sends queued results to the recorder; or, when nothing else is
    /// running or waiting, writes the one result on the loop itself: the
    /// loop would only sleep meanwhile, and the agent waiting for that
    /// result is spared the wake-up of another thread.
    /// Returns whether it wrote one on the loop.
    fn flush_records(&mut self) -> bool {
        let max_attempts = self.config.max_attempts.get();
        if self.to_record.len() == 1
            && self.active.is_empty()
            && self.queue.is_empty()
            && self.recorder.in_flight() == 0
        {
            let (id, record) = self.to_record.pop().expect("one");
            let done = record::record_now(&self.spool, id, record, max_attempts);
            self.on_recorded(done);
            return true;
        }
        for (id, record) in self.to_record.drain(..) {
            self.recorder.send(id, record, max_attempts);
        }
        false
    }

    /// The id is free again: waiting runs of it go first, in their order.
    fn release(&mut self, id: JobId) {
        self.busy.remove(&id);
        let mut waiting: Vec<OsString> = Vec::new();
        self.deferred.retain(|(d, name)| {
            if *d == id {
                waiting.push(name.clone());
                false
            } else {
                true
            }
        });
        for name in waiting.into_iter().rev() {
            self.queue.push_front(name);
        }
    }

    fn schedule_retry(&mut self) {
        if self.retry_at.is_none() {
            self.retry_at = Some(tokio::time::Instant::now() + self.retry_delay);
            self.retry_delay = (self.retry_delay * 2).min(RETRY_MAX);
        }
    }

    /// Retries what could not be written, and resumes claiming.
    fn retry(&mut self) {
        self.retry_at = None;
        self.paused = false;
        for (id, record) in std::mem::take(&mut self.unrecorded) {
            self.record(id, record);
        }
    }

    fn record_rejection(&mut self, id: JobId, reason: String) {
        warn!(
            message_id = message_id::JOB_REJECTED,
            cmd_id = %id,
            cmd_status = "rejected",
            exit_code = "-",
            duration_ms = 0,
            "job rejected: {reason}"
        );
        let now = Timestamp::now();
        let result = JobResult {
            id: id.to_string(),
            status: Status::Rejected,
            exit_code: None,
            signal: None,
            started_at: now,
            finished_at: now,
            duration_ms: 0,
            log: None,
            output_truncated: false,
            error: Some(reason),
            attempt: 1,
        };
        self.busy.insert(id.clone());
        self.record(id, Record::Rejection(result));
    }

    /// A file whose name gives no id: it cannot have a result, so it is only
    /// moved aside, with the reason in the log.
    fn archive_nameless(&mut self, path: &Path, reason: &str) {
        match move_into(path, &self.spool.archive_rejected()) {
            Ok(dest) => warn!(
                "{} is not a job file ({reason}); moved to {}",
                path.display(),
                self.spool.relative(&dest)
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => error!(
                "{} is not a job file ({reason}) and cannot be moved: {e}",
                path.display()
            ),
        }
    }

    /// The file was announced (at `since`) but is gone. Unless another
    /// worker claimed it, the agent gets a result that says so. Another
    /// worker's claim shows as the file in `running/`, or as a log of this id
    /// begun about when the file arrived (a worker creates the log before
    /// it renames the file, and the event reached us soon after arrival).
    /// Returns whether a rejection is being recorded.
    fn vanished(&mut self, id: JobId, name: &OsStr, since: Timestamp) -> bool {
        if self.spool.running().join(name).exists() {
            return false;
        }
        let window = Timestamp(since.0 - Duration::from_secs(2));
        let claimed_elsewhere = self
            .spool
            .latest_log(&id)
            .ok()
            .flatten()
            .and_then(|p| log_started(&p))
            .is_some_and(|started| started >= window);
        if claimed_elsewhere {
            debug!(cmd_id = %id, "the job file was claimed by another worker");
            return false;
        }
        self.record_rejection(
            id,
            "the job file vanished from pending/ before it could be read (withdrawn, or replaced while being read)".into(),
        );
        true
    }

    fn begin_stop(&mut self, signal: &str) {
        if self.stop_at.is_some() {
            info!("{signal} again: interrupting running jobs now");
            self.interrupt_all();
            return;
        }
        let grace = self.config.stop_grace.get();
        info!(
            message_id = message_id::WORKER_STOPPING,
            "{signal}: no new jobs; {} running job(s) get {} to finish",
            self.active.len(),
            humantime::format_duration(grace)
        );
        self.stop_at = Some(tokio::time::Instant::now() + grace);
        self.notifier.stopping(&format!(
            "stopping: waiting for {} running job(s)",
            self.active.len()
        ));
    }

    fn interrupt_all(&mut self) {
        self.interrupted_all = true;
        let ids: Vec<JobId> = self.active.keys().cloned().collect();
        for id in ids {
            self.interrupt(&id);
        }
    }

    fn interrupt(&mut self, id: &JobId) {
        if let Some(job) = self.active.remove(id) {
            info!(cmd_id = %id, "interrupting job: the stop grace has passed");
            let _ = job.cancel.send(());
        }
    }

    fn reload(&mut self) {
        self.notifier.reloading();
        match Config::load(self.config_path.as_deref()) {
            Ok(loaded) => {
                if loaded.config.spool.is_some() && loaded.config.spool != self.config.spool {
                    warn!("the spool cannot change on reload; restart the worker to move it");
                }
                let spool = self.config.spool.clone();
                self.config = loaded.config;
                self.config.spool = spool;
                self.claim_ctx = ClaimCtx::new(self.spool.clone(), &self.config);
                info!(
                    max_parallel = self.config.max_parallel.get(),
                    "configuration reloaded"
                );
            }
            Err(e) => error!("reload failed, keeping the running configuration: {e}"),
        }
        let status = self.status_line();
        self.notifier.ready(&status);
    }

    /// Sends `STATUS=` when what the worker is doing changed kind (idle,
    /// running, stopping, in trouble) or `due` is set, and otherwise at
    /// most every [`STATUS_EVERY`]: each message costs systemd (PID 1)
    /// some work and a D-Bus signal, and a busy worker changes its counts
    /// hundreds of times a second. A held-back update is sent when
    /// `status_due` comes; an idle worker has none, so it never wakes.
    fn update_status(&mut self, due: bool) {
        let kind = self.status_kind();
        let now = tokio::time::Instant::now();
        let recent = self
            .status_sent_at
            .is_some_and(|t| now.duration_since(t) < STATUS_EVERY);
        if !due && kind == self.status_sent_kind && recent {
            if self.status_due.is_none() {
                self.status_due = self.status_sent_at.map(|t| t + STATUS_EVERY);
            }
            return;
        }
        let status = self.status_line();
        self.notifier.status(&status);
        self.status_sent_at = Some(now);
        self.status_sent_kind = kind;
        self.status_due = None;
    }

    fn status_kind(&self) -> StatusKind {
        if self.stop_at.is_some() {
            StatusKind::Stopping
        } else if !self.unrecorded.is_empty() || self.paused {
            StatusKind::Trouble
        } else if self.active.is_empty() {
            StatusKind::Idle
        } else {
            StatusKind::Running
        }
    }

    /// What the worker is doing, for `STATUS=` (shown by `systemctl status`).
    fn status_line(&self) -> String {
        let c = &self.counters;
        let pending = self.queue.len() + self.deferred.len();
        let tail = format!(
            "{pending} pending, {} done, {} failed, {} rejected",
            c.succeeded + c.failed,
            c.failed,
            c.rejected
        );
        let tail = if self.unrecorded.is_empty() && !self.paused {
            tail
        } else {
            format!(
                "{tail}; CANNOT WRITE to the spool (disk full?): {} result(s) held in memory{}, retrying",
                self.unrecorded.len(),
                if self.paused { ", claiming paused" } else { "" }
            )
        };
        if self.stop_at.is_some() {
            return format!(
                "stopping: waiting for {} running job(s); {tail}",
                self.active.len()
            );
        }
        if self.active.is_empty() {
            return format!("idle; {tail}");
        }
        let mut ids: Vec<&str> = self.active.keys().map(JobId::as_str).collect();
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
        for (id, job) in &self.active {
            let ran = job.started.elapsed();
            if ran > job.limit + OVERDUE_MARGIN {
                return Err(format!(
                    "job {id} has run {} although it should have been killed after {}",
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
                self.archive_nameless(&path, "found in running/ without a valid job name");
                continue;
            };
            let Ok(mut file) = open_job_file(&path) else {
                self.archive_nameless(&path, "found in running/ and cannot be opened");
                continue;
            };
            if let Err(TryLockError::WouldBlock) = file.try_lock() {
                debug!(cmd_id = %id, "running/{} belongs to a live worker", id);
                continue;
            }
            let job = claim::read_bounded(&mut file, u64::MAX)
                .ok()
                .and_then(|b| Job::parse(kind, &b).ok());
            if let Err(e) = self.recover_one(&id, &path, job.as_ref()) {
                error!(cmd_id = %id, "recovering {}: {e}", path.display());
            }
        }
    }

    fn recover_one(
        &mut self,
        id: &JobId,
        path: &Path,
        job: Option<&Job>,
    ) -> Result<(), SpoolError> {
        let latest = self.spool.latest_log(id)?;
        let latest_rel = latest.as_deref().map(|p| self.spool.relative(p));
        let previous = self.spool.read_result(id).ok().flatten();
        if latest_rel.is_some()
            && previous.as_ref().and_then(|r| r.log.as_deref()) == latest_rel.as_deref()
        {
            // The result of this run was written; only the clean-up was lost.
            return match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(SpoolError::io("removing", path, e))
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
        };
        match settle(
            &self.spool,
            path,
            job,
            &result,
            self.config.max_attempts.get(),
        )? {
            Settled::Requeued { attempt } => {
                info!(cmd_id = %id, attempt, "job interrupted by the previous worker re-queued");
            }
            Settled::Recorded(_) => {
                log_result(&result);
                self.counters.failed += 1;
            }
        }
        Ok(())
    }
}

/// One log line per recorded result, with the fields an operator filters on.
fn log_result(r: &JobResult) {
    let exit = r
        .exit_code
        .map_or_else(|| "-".to_owned(), |c| c.to_string());
    let signal = r.signal.as_deref().unwrap_or("-");
    match r.status {
        Status::Succeeded => info!(
            message_id = message_id::JOB_FINISHED,
            cmd_id = %r.id, cmd_status = %r.status, exit_code = %exit, duration_ms = r.duration_ms,
            "job finished"
        ),
        _ => warn!(
            message_id = message_id::JOB_FINISHED,
            cmd_id = %r.id, cmd_status = %r.status, exit_code = %exit, signal, duration_ms = r.duration_ms,
            "job finished: {}", r.error.as_deref().unwrap_or(r.status.as_str())
        ),
    }
}
