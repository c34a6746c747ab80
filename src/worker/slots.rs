//! The job slots: one thread per unit of `max_parallel`. A slot takes the
//! next queued file, claims it, starts its process, sleeps in `poll` until
//! the job ends, hands the result on, and takes the next, so the slots
//! never wait for each other, and the thread woken when a job exits is the
//! one that starts the next (often on the CPU the job just left).
//!
//! The event loop fills the queue (inotify, rescans) and handles signals,
//! the heartbeat, `STATUS=` and retries. Slots and loop share the queue and
//! the bookkeeping below under one mutex, held only for a few field
//! updates. A slot wakes the loop only when it goes idle (and the loop
//! sends `STATUS=` or is stopping), or when a job starts or ends while no
//! `STATUS=` refresh is due; a busy worker's loop wakes at most once a
//! second.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, error, info, warn};

use super::claim::{self, Claim, ClaimCtx};
use super::exec;
use super::record::{self, Record, RecordSender, Recorded};
use super::settle::Settled;
use super::{Ran, archive_nameless};
use crate::logging::message_id;
use crate::spool::id::parse_job_file_name;
use crate::spool::{JobId, JobKind, JobResult, Spool, SpoolError, Status, Timestamp, log_started};

/// What the slots and the recorder tell the event loop.
pub(super) enum ToLoop {
    /// A result could not be written (a full disk, say): hold it, pause
    /// claiming, retry.
    Failed(Box<(JobId, Record, SpoolError)>),
    /// A claim could not use the spool; claiming is paused until a retry.
    Paused,
    /// A slot went idle, the worker went quiet, or a job started after an
    /// idle `STATUS=`: time to look at the status and at a pending stop.
    Kick,
    /// A thread of the worker panicked; it cannot go on.
    Panicked(&'static str),
}

/// A job being run: what the heartbeat's overdue check and `STATUS=` need.
pub(super) struct ActiveJob {
    pub id: JobId,
    pub started: Instant,
    /// Timeout plus kill grace: past this the job should have been reaped.
    pub limit: Duration,
}

/// One slot, as the loop sees it.
pub(super) struct Slot {
    pub job: Option<ActiveJob>,
    /// Set by the loop to interrupt the slot's job (the stop grace ran
    /// out). Only ever set once the worker is stopping, when no slot takes
    /// new work, so a count left by a job that ended first never reaches
    /// another job.
    interrupt: Arc<EventFd>,
}

#[derive(Default)]
pub(super) struct Counters {
    pub succeeded: u64,
    pub failed: u64,
    pub rejected: u64,
}

/// Everything the loop and the slots share.
pub(super) struct State {
    /// File names in arrival order.
    pub queue: VecDeque<OsString>,
    /// Names in `queue` or `deferred`, with when they were queued, so no
    /// name is queued twice.
    pub queued: HashMap<OsString, Timestamp>,
    /// Names whose id is busy; they go back to the queue when it is free.
    pub deferred: Vec<(JobId, OsString)>,
    /// Ids with a run in progress or a result being written.
    pub busy: HashSet<JobId>,
    pub slots: Vec<Slot>,
    /// Slots claiming or running a job, or recording its result.
    pub working: usize,
    pub max_parallel: usize,
    /// Records sent to the recorder and not settled yet.
    pub in_flight: usize,
    /// No claims until the loop's retry: the spool could not be used.
    pub paused: bool,
    /// SIGTERM arrived: no new claims.
    pub stopping: bool,
    /// The stop grace ran out: running jobs are being interrupted.
    pub interrupted_all: bool,
    shutdown: bool,
    pub counters: Counters,
    /// Results recorded (or jobs re-queued) so far.
    pub settled: u64,
    /// No `STATUS=` refresh is due (the worker was idle, or nothing had
    /// changed): the next job a slot starts or ends wakes the loop.
    pub status_waits: bool,
    /// `STATUS=` is sent (under systemd), so the loop wants to hear when
    /// the worker goes idle.
    pub reports_status: bool,
    /// What claims need (rebuilt on reload).
    pub ctx: Arc<ClaimCtx>,
    pub max_attempts: u32,
    /// Slot threads waiting for work.
    waiting: usize,
}

impl State {
    /// Queues a file name unless it is queued already.
    pub fn enqueue(&mut self, name: OsString) -> bool {
        match self.queued.entry(name) {
            std::collections::hash_map::Entry::Vacant(e) => {
                self.queue.push_back(e.key().clone());
                e.insert(Timestamp::now());
                true
            }
            std::collections::hash_map::Entry::Occupied(_) => false,
        }
    }

    /// The id is free again: waiting runs of it go first, in their order.
    /// Returns how many names went back to the queue.
    fn release(&mut self, id: &JobId) -> usize {
        self.busy.remove(id);
        if self.deferred.is_empty() {
            return 0;
        }
        let mut waiting: Vec<OsString> = Vec::new();
        self.deferred.retain(|(d, name)| {
            if d == id {
                waiting.push(name.clone());
                false
            } else {
                true
            }
        });
        let n = waiting.len();
        for name in waiting.into_iter().rev() {
            self.queue.push_front(name);
        }
        n
    }

    /// The loop wants to hear when a slot or the worker goes idle: for
    /// `STATUS=`, or to finish a stop.
    fn watched(&self) -> bool {
        self.reports_status || self.stopping
    }

    /// No job is being claimed, run or recorded.
    pub fn quiet(&self) -> bool {
        self.working == 0 && self.in_flight == 0
    }

    /// The jobs running now.
    pub fn active(&self) -> impl Iterator<Item = &ActiveJob> {
        self.slots.iter().filter_map(|s| s.job.as_ref())
    }
}

/// The shared state, the slots' wake-up, and the way to the loop.
pub(super) struct Shared {
    state: Mutex<State>,
    work: Condvar,
    to_loop: UnboundedSender<ToLoop>,
    spool: Spool,
}

/// What a slot took from the queue.
enum Task {
    /// A file whose name gives no id.
    Nameless { name: OsString, reason: String },
    Claim {
        name: OsString,
        id: JobId,
        kind: JobKind,
        since: Timestamp,
        ctx: Arc<ClaimCtx>,
        max_attempts: u32,
    },
}

impl Shared {
    pub fn new(
        spool: Spool,
        ctx: ClaimCtx,
        max_parallel: usize,
        max_attempts: u32,
        to_loop: UnboundedSender<ToLoop>,
    ) -> Self {
        Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                queued: HashMap::new(),
                deferred: Vec::new(),
                busy: HashSet::new(),
                slots: Vec::new(),
                working: 0,
                max_parallel,
                in_flight: 0,
                paused: false,
                stopping: false,
                interrupted_all: false,
                shutdown: false,
                counters: Counters::default(),
                settled: 0,
                status_waits: false,
                reports_status: false,
                ctx: Arc::new(ctx),
                max_attempts,
                waiting: 0,
            }),
            work: Condvar::new(),
            to_loop,
            spool,
        }
    }

    /// The shared state. A panic elsewhere stops the worker (see
    /// [`ToLoop::Panicked`]); until then the state stays usable.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes up to `n` idle slots: there is new work for them.
    pub fn wake(&self, st: &State, n: usize) {
        if st.waiting == 0 || n == 0 {
            return;
        }
        if n >= st.waiting {
            self.work.notify_all();
        } else {
            for _ in 0..n {
                self.work.notify_one();
            }
        }
    }

    fn send(&self, msg: ToLoop) {
        // Only a loop that has returned drops the receiver; then nobody
        // needs to hear.
        let _ = self.to_loop.send(msg);
    }

    fn kick(&self) {
        self.send(ToLoop::Kick);
    }

    /// Starts slot threads until there are `n`.
    pub fn ensure_slots(
        self: &Arc<Self>,
        n: usize,
        recorder: &RecordSender,
    ) -> io::Result<Vec<thread::JoinHandle<()>>> {
        let mut started = Vec::new();
        let mut st = self.lock();
        while st.slots.len() < n {
            let index = st.slots.len();
            let interrupt = Arc::new(EventFd::from_value_and_flags(
                0,
                EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
            )?);
            let shared = Arc::clone(self);
            let fd = Arc::clone(&interrupt);
            let recorder = recorder.clone();
            let handle = thread::Builder::new()
                .name(format!("slot-{index}"))
                .spawn(move || shared.serve_slot(index, &fd, &recorder))?;
            st.slots.push(Slot {
                job: None,
                interrupt,
            });
            started.push(handle);
        }
        self.work.notify_all();
        Ok(started)
    }

    /// Interrupts every running job (the stop grace ran out), and any that
    /// starts from now on.
    pub fn interrupt_all(&self) {
        let mut st = self.lock();
        st.interrupted_all = true;
        for slot in &st.slots {
            if let Some(job) = &slot.job {
                info!(cmd_id = %job.id, "interrupting job: the stop grace has passed");
                if let Err(e) = slot.interrupt.write(1) {
                    error!(cmd_id = %job.id, "cannot interrupt the job: {e}");
                }
            }
        }
    }

    /// Ends the slot threads once they are idle.
    pub fn shutdown(&self) {
        let mut st = self.lock();
        st.shutdown = true;
        drop(st);
        self.work.notify_all();
    }

    /// Applies what the recorder (`counted`: the records were counted in
    /// `in_flight`) or a slot recorded.
    pub fn recorded(&self, batch: Vec<Recorded>, counted: bool) {
        let n = batch.len();
        let mut settled = Vec::with_capacity(n);
        for r in batch {
            match r {
                Recorded::Settled { id, outcome } => {
                    if let Settled::Requeued { attempt } = outcome {
                        info!(cmd_id = %id, attempt, "interrupted job re-queued for another attempt");
                    }
                    settled.push((id, outcome));
                }
                // Sent before `in_flight` drops, so a stopping loop cannot
                // see the worker quiet and miss it.
                Recorded::Failed { id, record, error } => {
                    self.send(ToLoop::Failed(Box::new((id, record, error))));
                }
            }
        }
        let mut st = self.lock();
        let mut freed = 0;
        for (id, outcome) in settled {
            match outcome {
                Settled::Recorded(Status::Succeeded) => st.counters.succeeded += 1,
                Settled::Recorded(Status::Rejected) => st.counters.rejected += 1,
                Settled::Recorded(_) => st.counters.failed += 1,
                Settled::Requeued { .. } => {}
            }
            st.settled += 1;
            freed += st.release(&id);
        }
        if counted {
            st.in_flight = st.in_flight.saturating_sub(n);
        }
        self.wake(&st, freed);
        let kick = counted && st.quiet() && st.watched();
        drop(st);
        if kick {
            self.kick();
        }
    }

    /// A record was counted in `in_flight` but could not be sent.
    pub fn unsent(&self) {
        let mut st = self.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        let kick = st.quiet() && st.watched();
        drop(st);
        if kick {
            self.kick();
        }
    }

    /// A slot thread: takes work until the worker shuts down.
    fn serve_slot(&self, index: usize, interrupt: &EventFd, recorder: &RecordSender) {
        let _alarm = PanicAlarm {
            shared: self,
            what: "a job slot",
        };
        let mut held = false;
        while let Some(task) = self.take(held) {
            held = true;
            match task {
                Task::Nameless { name, reason } => {
                    archive_nameless(&self.spool, &self.spool.pending().join(name), &reason);
                }
                Task::Claim {
                    name,
                    id,
                    kind,
                    since,
                    ctx,
                    max_attempts,
                } => {
                    let claimed = claim::claim(&ctx, name, id, kind, since);
                    self.on_claimed(index, interrupt, recorder, claimed, max_attempts);
                }
            }
        }
    }

    /// The next task, waiting for one. `held`: the caller finished one and
    /// still counts as working.
    fn take(&self, held: bool) -> Option<Task> {
        let mut st = self.lock();
        if held {
            st.working -= 1;
        }
        let mut going_idle = held && st.watched();
        loop {
            if st.shutdown {
                return None;
            }
            while !st.stopping && !st.paused && st.working < st.max_parallel {
                let Some(name) = st.queue.pop_front() else {
                    break;
                };
                let since = st.queued.remove(&name).unwrap_or_else(Timestamp::now);
                match parse_job_file_name(&name) {
                    Err(e) => {
                        st.working += 1;
                        return Some(Task::Nameless {
                            name,
                            reason: e.to_string(),
                        });
                    }
                    Ok((id, _)) if st.busy.contains(&id) => {
                        // Runs of one id never overlap; this one waits.
                        st.queued.insert(name.clone(), since);
                        st.deferred.push((id, name));
                    }
                    Ok((id, kind)) => {
                        st.busy.insert(id.clone());
                        st.working += 1;
                        return Some(Task::Claim {
                            name,
                            id,
                            kind,
                            since,
                            ctx: Arc::clone(&st.ctx),
                            max_attempts: st.max_attempts,
                        });
                    }
                }
            }
            if going_idle {
                going_idle = false;
                self.kick();
            }
            st.waiting += 1;
            st = self.work.wait(st).unwrap_or_else(PoisonError::into_inner);
            st.waiting -= 1;
        }
    }

    fn on_claimed(
        &self,
        index: usize,
        interrupt: &EventFd,
        recorder: &RecordSender,
        claimed: Claim,
        max_attempts: u32,
    ) {
        match claimed {
            Claim::Started(started) => {
                let claim::Started {
                    run,
                    spawned,
                    lock,
                    began,
                } = *started;
                let id = run.id.clone();
                let job = run.job.clone();
                let running_path = run.running_path.clone();
                let mut st = self.lock();
                st.slots[index].job = Some(ActiveJob {
                    id: id.clone(),
                    started: began,
                    limit: run.timeout + run.kill_grace,
                });
                let interrupted = st.interrupted_all;
                let kick = std::mem::take(&mut st.status_waits);
                drop(st);
                if kick {
                    self.kick();
                }
                if interrupted {
                    // It started just as the stop grace ran out.
                    info!(cmd_id = %id, "interrupting job: the stop grace has passed");
                }
                let result = exec::execute(run, spawned, interrupt, interrupted);
                let ran = Box::new(Ran {
                    job,
                    running_path,
                    _lock: lock,
                    result,
                });
                self.hand_on(index, recorder, id, Record::Run(ran), max_attempts);
            }
            Claim::Rejected { id, reason } => {
                self.reject(index, recorder, id, reason, max_attempts);
            }
            Claim::Vanished { id, name, since } => {
                if self.claimed_elsewhere(&id, &name, since) {
                    self.release(&id);
                } else {
                    self.reject(
                        index,
                        recorder,
                        id,
                        "the job file vanished from pending/ before it could be read (withdrawn, or replaced while being read)".into(),
                        max_attempts,
                    );
                }
            }
            Claim::Retry { id, name, since } => {
                let mut st = self.lock();
                st.queued.insert(name.clone(), since);
                st.queue.push_front(name);
                st.paused = true;
                st.release(&id);
                drop(st);
                self.send(ToLoop::Paused);
            }
            Claim::Dropped { id } => self.release(&id),
        }
    }

    fn release(&self, id: &JobId) {
        let mut st = self.lock();
        let freed = st.release(id);
        self.wake(&st, freed);
    }

    /// Records a result: on this thread when nothing else is running or
    /// waiting (the agent waiting for it is spared another thread's
    /// wake-up), else through the recorder, so this slot can start the next
    /// job while the result is synced.
    fn hand_on(
        &self,
        index: usize,
        recorder: &RecordSender,
        id: JobId,
        record: Record,
        max_attempts: u32,
    ) {
        let mut st = self.lock();
        let was_running = st.slots[index].job.take().is_some();
        let alone = st.working == 1 && st.queue.is_empty() && st.in_flight == 0;
        if !alone {
            st.in_flight += 1;
        }
        // A job ended while no STATUS= refresh was due: the loop should
        // say so (unless this slot goes idle now, which tells it anyway).
        let kick = was_running && !alone && std::mem::take(&mut st.status_waits);
        drop(st);
        if kick {
            self.kick();
        }
        if alone {
            let done = record::record_now(&self.spool, id, record, max_attempts);
            self.recorded(vec![done], false);
        } else {
            recorder.send(self, id, record, max_attempts);
        }
    }

    /// Bad input: a `rejected` result with the reason.
    fn reject(
        &self,
        index: usize,
        recorder: &RecordSender,
        id: JobId,
        reason: String,
        max_attempts: u32,
    ) {
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
        self.hand_on(index, recorder, id, Record::Rejection(result), max_attempts);
    }

    /// The file was announced (at `since`) but is gone: was it claimed by
    /// another worker? That shows as the file in `running/`, or as a log of
    /// this id begun about when the file arrived (a worker creates the log
    /// before it renames the file, and the event reached us soon after
    /// arrival). If not, the agent gets a result that says it vanished.
    fn claimed_elsewhere(&self, id: &JobId, name: &OsStr, since: Timestamp) -> bool {
        if self.spool.running().join(name).exists() {
            return true;
        }
        let window = Timestamp(since.0 - Duration::from_secs(2));
        let elsewhere = self
            .spool
            .latest_log(id)
            .ok()
            .flatten()
            .and_then(|p| log_started(&p))
            .is_some_and(|started| started >= window);
        if elsewhere {
            debug!(cmd_id = %id, "the job file was claimed by another worker");
        }
        elsewhere
    }
}

/// Tells the loop when the thread it guards unwinds.
pub(super) struct PanicAlarm<'a> {
    pub shared: &'a Shared,
    pub what: &'static str,
}

impl Drop for PanicAlarm<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.shared.send(ToLoop::Panicked(self.what));
        }
    }
}
