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
//!
//! One job never stops the worker: a panic while a slot claims or runs a
//! job is caught ([`contain`]). The job's process group is killed and
//! reaped (see `exec`), the job gets a `failed` result with the panic
//! message in `error`, its file leaves `pending/` or `running/` as any
//! other job's does, and the slot takes the next job. Recording a result
//! is not covered: it is the recorder's code too, and a panic there still
//! stops the worker ([`ToLoop::Panicked`]).

use std::any::Any;
use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::TryLockError;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
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
use crate::spool::job::Job;
use crate::spool::result::Submitter;
use crate::spool::{
    JobId, JobKind, JobResult, Spool, SpoolError, Status, Timestamp, log_started, move_into,
    open_job_file,
};

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
    /// A file found by a rescan was left in `pending/` as not whole yet
    /// (see [`Claim::NotYet`]): look again once it has settled, in case
    /// no event comes for it (it was renamed in before the watch began).
    NotYet,
}

/// A job being run: what the heartbeat's overdue check and `STATUS=` need.
pub(super) struct ActiveJob {
    pub id: JobId,
    /// The uid of its submitter (the owner of its job file), if known.
    pub submitter: Option<u32>,
    pub started: Instant,
    /// Timeout plus kill grace: past this the job should have been reaped.
    pub limit: Duration,
}

/// What a run's record needs besides its result: the job, its file in
/// `running/` and the lock on it, and what it runs.
pub(super) struct InHand {
    pub job: Job,
    pub running_path: std::path::PathBuf,
    pub lock: std::fs::File,
    pub command: Option<crate::logging::CommandDigest>,
}

/// A running job passed from one worker to the next (see `handover`).
pub(super) struct Handed {
    pub followed: Box<exec::Followed>,
    pub held: InHand,
}

/// One slot, as the loop sees it.
pub(super) struct Slot {
    pub job: Option<ActiveJob>,
    /// A cancel of the slot's job, and who asked; the slot reads it when
    /// its interrupt wakes it (see [`Shared::wake_of`]).
    pub cancel: Option<(JobId, Submitter)>,
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
    /// Names in `pending/` that could not be moved out, with their inode:
    /// reported once, then passed over by the rescans while unchanged.
    pub stuck: HashMap<OsString, u64>,
    /// Names created in `pending/` whose writer has not closed them yet
    /// (`IN_CREATE` seen, `IN_CLOSE_WRITE` not): the rescans pass over them.
    pub writing: HashSet<OsString>,
    /// Names queued by a rescan rather than by an event that says the file
    /// is whole: a parse failure of a file just written waits for its writer.
    pub unsure: HashSet<OsString>,
    /// Names whose id is busy; they go back to the queue when it is free.
    pub deferred: Vec<(JobId, OsString)>,
    /// Ids with a run in progress or a result being written.
    pub busy: HashSet<JobId>,
    /// Cancels of jobs being claimed (busy, not yet running), with who
    /// asked: the slot takes its job's when it starts it.
    pub cancels: HashMap<JobId, Submitter>,
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
    /// Why running jobs are being interrupted (for their results).
    pub interrupt_why: Option<String>,
    /// Handing over to a new worker (see `handover`): no new claims, and
    /// running jobs are set aside in `handed` rather than followed.
    pub handing_over: bool,
    /// Running jobs set aside for the new worker.
    pub handed: Vec<Handed>,
    /// Jobs a previous worker handed over, not yet taken up by a slot.
    pub adopted: VecDeque<Handed>,
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
    /// Jobs were recorded since the worker last gave memory back: the loop
    /// wants to hear when it goes idle (see `Worker::release_memory`).
    pub untrimmed: bool,
    /// What claims need (rebuilt on reload).
    pub ctx: Arc<ClaimCtx>,
    pub max_attempts: u32,
    /// Slot threads waiting for work.
    waiting: usize,
}

/// Whether the user `requester` may cancel a job of `submitter`: its
/// submitter, root, or the worker's own user.
pub(super) fn may_cancel(requester: u32, submitter: Option<u32>) -> bool {
    requester == 0 || requester == nix::unistd::geteuid().as_raw() || Some(requester) == submitter
}

/// Why a cancel was refused.
pub(super) fn refusal(submitter: Option<u32>) -> String {
    match submitter {
        Some(uid) => format!("only its submitter (uid {uid}) or root may cancel it"),
        None => "only its submitter or root may cancel it".into(),
    }
}

impl State {
    /// Has slot `index`'s job stopped for `by`: its interrupt wakes it,
    /// and it reads the cancel (see [`Shared::wake_of`]).
    fn cancel_running(&mut self, index: usize, by: Submitter) {
        let Some(id) = self.slots[index].job.as_ref().map(|j| j.id.clone()) else {
            return;
        };
        info!(cmd_id = %id, cancelled_by = by.uid, "cancelling job");
        self.slots[index].cancel = Some((id.clone(), by));
        if let Err(e) = self.slots[index].interrupt.write(1) {
            error!(cmd_id = %id, "cannot wake the job's slot to cancel it: {e}");
        }
    }

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
    pub(super) fn release(&mut self, id: &JobId) -> usize {
        self.busy.remove(id);
        self.cancels.remove(id);
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
        self.reports_status || self.stopping || self.handing_over || self.untrimmed
    }

    /// Lets go of the room the queue's collections grew to in a burst
    /// (20,000 queued names hold megabytes); called when the worker is idle.
    pub fn shrink(&mut self) {
        const KEEP: usize = 64;
        self.queue.shrink_to(KEEP);
        self.queued.shrink_to(KEEP);
        self.stuck.shrink_to(KEEP);
        self.writing.shrink_to(KEEP);
        self.unsure.shrink_to(KEEP);
        self.deferred.shrink_to(KEEP);
        self.busy.shrink_to(KEEP);
    }

    /// No job is being claimed, run or recorded, nor waits to be taken up
    /// after a hand-over.
    pub fn quiet(&self) -> bool {
        self.working == 0 && self.in_flight == 0 && self.adopted.is_empty()
    }

    /// The jobs running now.
    pub fn active(&self) -> impl Iterator<Item = &ActiveJob> {
        self.slots.iter().filter_map(|s| s.job.as_ref())
    }
}

/// The shared state, the slots' wake-up, and the way to the loop.
pub(super) struct Shared {
    state: Mutex<State>,
    /// Set (before the slots are woken) when the worker hands over: see
    /// [`exec::follow`].
    handover: AtomicBool,
    work: Condvar,
    to_loop: UnboundedSender<ToLoop>,
    spool: Spool,
}

/// How far a slot got with a job: what is left to settle if a panic cuts
/// the work short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Being claimed: the job file is in `pending/`, or already renamed
    /// into `running/`.
    Claiming,
    /// Claimed: the job is this slot's to settle (its file is in
    /// `running/`, or was rejected or vanished).
    Claimed,
    /// Nothing of the job is left to this slot (another worker has it, it
    /// waits for a retry, or it was dropped).
    Released,
}

/// What a slot took from the queue.
enum Task {
    /// A running job a previous worker handed over.
    Adopt {
        handed: Box<Handed>,
        ctx: Arc<ClaimCtx>,
        max_attempts: u32,
    },
    /// A file whose name gives no id.
    Nameless { name: OsString, reason: String },
    Claim {
        name: OsString,
        id: JobId,
        kind: JobKind,
        since: Timestamp,
        ctx: Arc<ClaimCtx>,
        max_attempts: u32,
        /// Queued by an event that says the file is whole.
        complete: bool,
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
                stuck: HashMap::new(),
                cancels: HashMap::new(),
                writing: HashSet::new(),
                unsure: HashSet::new(),
                deferred: Vec::new(),
                busy: HashSet::new(),
                slots: Vec::new(),
                working: 0,
                max_parallel,
                in_flight: 0,
                paused: false,
                stopping: false,
                interrupted_all: false,
                interrupt_why: None,
                handing_over: false,
                handed: Vec::new(),
                adopted: VecDeque::new(),
                shutdown: false,
                counters: Counters::default(),
                settled: 0,
                status_waits: false,
                reports_status: false,
                untrimmed: false,
                ctx: Arc::new(ctx),
                max_attempts,
                waiting: 0,
            }),
            handover: AtomicBool::new(false),
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
                cancel: None,
                interrupt,
            });
            started.push(handle);
        }
        self.work.notify_all();
        Ok(started)
    }

    /// Interrupts every running job (the stop grace ran out), and any that
    /// starts from now on.
    pub fn interrupt_all(&self, why: &str) {
        let mut st = self.lock();
        st.interrupted_all = true;
        st.interrupt_why = Some(why.to_owned());
        for slot in &st.slots {
            if let Some(job) = &slot.job {
                info!(cmd_id = %job.id, "interrupting job: {why}");
                if let Err(e) = slot.interrupt.write(1) {
                    error!(cmd_id = %job.id, "cannot interrupt the job: {e}");
                }
            }
        }
    }

    /// Why slot `index`'s interrupt woke it while it runs `id`.
    pub fn wake_of(&self, index: usize, id: &JobId) -> exec::Wake {
        let mut st = self.lock();
        match st.slots[index].cancel.take() {
            Some((cancelled, by)) if cancelled == *id => return exec::Wake::Cancel(by),
            _ => {}
        }
        if st.interrupted_all {
            exec::Wake::Interrupt
        } else {
            exec::Wake::Stale
        }
    }

    /// Cancels `id` for `by` if it is running or being claimed: `Some`
    /// with what was done, or the refusal; `None` if it is neither (it may
    /// be pending, or gone).
    pub fn cancel(&self, id: &JobId, by: &Submitter) -> Option<Result<&'static str, String>> {
        let mut st = self.lock();
        if let Some(index) = st
            .slots
            .iter()
            .position(|s| s.job.as_ref().is_some_and(|j| j.id == *id))
        {
            let submitter = st.slots[index].job.as_ref().and_then(|j| j.submitter);
            if !may_cancel(by.uid, submitter) {
                return Some(Err(refusal(submitter)));
            }
            st.cancel_running(index, by.clone());
            return Some(Ok("running: stopping it"));
        }
        if st.busy.contains(id) {
            // Being claimed: checked against its submitter when it starts.
            st.cancels.insert(id.clone(), by.clone());
            return Some(Ok("starting: stopping it once started"));
        }
        None
    }

    /// Starts a hand-over: no new claims, and every running job is set
    /// aside (its slot wakes, gives it up, and goes idle).
    pub fn begin_handover(&self) {
        let mut st = self.lock();
        st.handing_over = true;
        self.handover.store(true, Ordering::Release);
        for slot in &st.slots {
            if let Some(job) = &slot.job
                && let Err(e) = slot.interrupt.write(1)
            {
                error!(cmd_id = %job.id, "cannot wake the job's slot for the hand-over: {e}");
            }
        }
        drop(st);
        self.work.notify_all();
    }

    /// Jobs handed over by a previous worker: the slots take them up
    /// first. Their ids are busy until their results are recorded.
    pub fn adopt(&self, jobs: Vec<Handed>) {
        let mut st = self.lock();
        for h in jobs {
            st.busy.insert(h.followed.id.clone());
            st.adopted.push_back(h);
        }
        drop(st);
        self.work.notify_all();
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
        st.untrimmed = true;
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

    /// `path` in `pending/` could not be moved out and was reported: the
    /// rescans pass over it while it is the same file (by inode).
    fn mark_stuck(&self, path: &std::path::Path) {
        use std::os::unix::fs::MetadataExt;
        if let (Some(name), Ok(meta)) = (path.file_name(), std::fs::symlink_metadata(path)) {
            self.lock().stuck.insert(name.to_owned(), meta.ino());
        }
    }

    /// A slot thread: takes work until the worker shuts down.
    fn serve_slot(&self, index: usize, interrupt: &EventFd, recorder: &RecordSender) {
        let _alarm = PanicAlarm {
            shared: self,
            what: "a job slot",
        };
        let mut held = false;
        while let Some(task) = self.take(index, held) {
            held = true;
            match task {
                Task::Nameless { name, reason } => {
                    // The worker's own rename aside of an item it could not
                    // move (see claim::reject) was reported with the id's
                    // rejection; its event may arrive before it is marked.
                    let aside = name.to_string_lossy().contains(".unmovable-");
                    let path = self.spool.pending().join(name);
                    match contain(|| archive_nameless(&self.spool, &path, &reason, !aside)) {
                        Ok(true) => {}
                        // Reported once: the rescans pass over it.
                        Ok(false) => self.mark_stuck(&path),
                        Err(panic) => error!(
                            "a job slot panicked while archiving {}: {panic}; the slot goes on",
                            path.display()
                        ),
                    }
                }
                Task::Adopt {
                    handed,
                    ctx,
                    max_attempts,
                } => {
                    let name = handed
                        .held
                        .running_path
                        .file_name()
                        .unwrap_or_default()
                        .to_owned();
                    let id = handed.followed.id.clone();
                    let kind = parse_job_file_name(&name).map_or(JobKind::Script, |(_, k)| k);
                    let file = JobFile {
                        ctx: &ctx,
                        name: &name,
                        kind,
                        max_attempts,
                    };
                    self.handle(index, recorder, id, &file, |stage| {
                        self.follow_adopted(index, interrupt, *handed, stage)
                    });
                }
                Task::Claim {
                    name,
                    id,
                    kind,
                    since,
                    ctx,
                    max_attempts,
                    complete,
                } => {
                    let file = JobFile {
                        ctx: &ctx,
                        name: &name,
                        kind,
                        max_attempts,
                    };
                    let claim_id = id.clone();
                    self.handle(index, recorder, id, &file, |stage| {
                        let claimed =
                            claim::claim(&ctx, name.clone(), claim_id, kind, since, complete);
                        self.on_claimed(index, interrupt, claimed, stage)
                    });
                }
            }
        }
    }

    /// Handles the job `id` in `file`: `work` claims and runs it, keeping
    /// `stage` up to date, and what it returns is handed on. A panic in
    /// `work` is contained: see [`Shared::after_panic`].
    fn handle(
        &self,
        index: usize,
        recorder: &RecordSender,
        id: JobId,
        file: &JobFile<'_>,
        work: impl FnOnce(&mut Stage) -> Option<(JobId, Record)>,
    ) {
        let mut stage = Stage::Claiming;
        match contain(|| work(&mut stage)) {
            Ok(Some((id, record))) => {
                self.hand_on(index, recorder, id, record, file.max_attempts);
            }
            Ok(None) => {}
            Err(panic) => self.after_panic(index, recorder, id, file, stage, &panic),
        }
    }

    /// The next task for slot `index`, waiting for one. `held`: the caller
    /// finished one and still counts as working.
    fn take(&self, index: usize, held: bool) -> Option<Task> {
        let mut st = self.lock();
        if held {
            st.working -= 1;
        }
        let mut going_idle = held && st.watched();
        loop {
            if st.shutdown {
                return None;
            }
            if let Some(handed) = st.adopted.pop_front() {
                // Already running: taken up whatever the limits, and shown
                // running from this moment (a stop that comes before the
                // slot follows it counts it).
                st.working += 1;
                st.slots[index].job = Some(ActiveJob {
                    id: handed.followed.id.clone(),
                    submitter: handed.followed.submitted_by.as_ref().map(|s| s.uid),
                    started: handed.followed.t0,
                    limit: handed
                        .followed
                        .timeout
                        .saturating_add(handed.followed.kill.grace),
                });
                return Some(Task::Adopt {
                    handed: Box::new(handed),
                    ctx: Arc::clone(&st.ctx),
                    max_attempts: st.max_attempts,
                });
            }
            while !st.stopping && !st.handing_over && !st.paused && st.working < st.max_parallel {
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
                        let complete = !st.unsure.remove(&name);
                        return Some(Task::Claim {
                            name,
                            id,
                            kind,
                            since,
                            ctx: Arc::clone(&st.ctx),
                            max_attempts: st.max_attempts,
                            complete,
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

    /// Runs a claimed job, or does what the claim calls for, and returns
    /// the record to hand on, if any. `stage` follows the way (see
    /// [`Shared::after_panic`]).
    fn on_claimed(
        &self,
        index: usize,
        interrupt: &EventFd,
        claimed: Claim,
        stage: &mut Stage,
    ) -> Option<(JobId, Record)> {
        *stage = match &claimed {
            Claim::Started(_) | Claim::Rejected { .. } | Claim::Vanished { .. } => Stage::Claimed,
            Claim::Retry { .. } | Claim::Dropped { .. } | Claim::NotYet { .. } => Stage::Released,
        };
        match claimed {
            Claim::Started(started) => {
                let claim::Started {
                    run,
                    spawned,
                    lock,
                    began,
                    command,
                } = *started;
                let id = run.id.clone();
                let job = run.job.clone();
                let running_path = run.running_path.clone();
                let limit = run.timeout.saturating_add(run.kill_grace);
                let submitter = run.submitted_by.as_ref().map(|s| s.uid);
                let interrupted = self.occupy(index, &id, submitter, began, limit);
                if interrupted {
                    // It started just as the stop grace ran out.
                    info!(cmd_id = %id, "interrupting job: the stop grace has passed");
                }
                let started_at = run.started_at;
                let log_rel = run.log_rel.clone();
                let submitted_by = run.submitted_by.clone();
                let handover = &self.handover;
                let wake = |id: &JobId| self.wake_of(index, id);
                let outcome = contain(|| {
                    exec::execute(run, spawned, interrupt, interrupted, handover, &wake)
                });
                let held = InHand {
                    job,
                    running_path,
                    lock,
                    command: Some(command),
                };
                self.after_run(index, id, outcome, held, |id, job, panic| {
                    let mut r = panicked_result(id, job.attempt, panic);
                    r.started_at = started_at;
                    r.duration_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
                    r.log = Some(log_rel);
                    r.submitted_by = submitted_by;
                    r
                })
            }
            Claim::Rejected {
                id,
                reason,
                stuck,
                submitter,
            } => {
                if let Some(path) = stuck {
                    self.mark_stuck(&path);
                }
                Some(rejection(id, reason, submitter))
            }
            Claim::Vanished { id, name, since } => {
                if self.claimed_elsewhere(&id, &name, since) {
                    *stage = Stage::Released;
                    self.release(&id);
                    None
                } else {
                    Some(rejection(
                        id,
                        "the job file vanished from pending/ before it could be read (withdrawn, or replaced while being read)".into(),
                        None,
                    ))
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
                None
            }
            Claim::Dropped { id } => {
                self.release(&id);
                None
            }
            Claim::NotYet { id } => {
                self.release(&id);
                self.send(ToLoop::NotYet);
                None
            }
        }
    }

    /// A panic cut short the handling of the job `id` in `file` at
    /// `stage`; `panic` is its message. The job gets a `failed` result with
    /// the message, its file is settled as a finished or rejected job's is
    /// (see [`JobFile::salvage`]), and the slot's bookkeeping is set
    /// straight, so the slot can go on.
    fn after_panic(
        &self,
        index: usize,
        recorder: &RecordSender,
        id: JobId,
        file: &JobFile<'_>,
        stage: Stage,
        panic: &str,
    ) {
        error!(
            cmd_id = %id,
            "a job slot panicked while handling this job: {panic}; settling the job, and the slot goes on"
        );
        let record = match contain(|| file.salvage(&id, stage, panic)) {
            Ok(record) => record,
            Err(again) => {
                error!(
                    cmd_id = %id,
                    "settling the job after the panic panicked too: {again}; its file is left where it is"
                );
                None
            }
        };
        match record {
            Some(record) => self.hand_on(index, recorder, id, record, file.max_attempts),
            None => {
                debug!(cmd_id = %id, "nothing of the job was left to this slot to settle");
                self.lock().slots[index].job = None;
                self.release(&id);
            }
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

    /// Marks slot `index` as running job `id`; returns whether the stop
    /// grace has run out (the job is to be interrupted at once).
    fn occupy(
        &self,
        index: usize,
        id: &JobId,
        submitter: Option<u32>,
        began: Instant,
        limit: Duration,
    ) -> bool {
        let mut st = self.lock();
        st.slots[index].job = Some(ActiveJob {
            id: id.clone(),
            submitter,
            started: began,
            limit,
        });
        // A cancel that came while it was being claimed.
        if let Some(by) = st.cancels.remove(id) {
            if may_cancel(by.uid, submitter) {
                st.cancel_running(index, by);
            } else {
                warn!(cmd_id = %id, requester = by.uid, "cancel refused: {}", refusal(submitter));
            }
        }
        let interrupted = st.interrupted_all;
        let kick = std::mem::take(&mut st.status_waits);
        drop(st);
        if kick {
            self.kick();
        }
        interrupted
    }

    /// What follows a run: its record to hand on; or, when the worker is
    /// handing over, nothing: the job is kept for the new worker with what
    /// its result will need. A panic while following it gives the result
    /// `panicked` makes.
    fn after_run(
        &self,
        index: usize,
        id: JobId,
        outcome: Result<exec::Outcome, String>,
        held: InHand,
        panicked: impl FnOnce(&JobId, &Job, &str) -> JobResult,
    ) -> Option<(JobId, Record)> {
        let result = match outcome {
            Ok(exec::Outcome::Done(mut result)) => {
                if result.status == Status::Interrupted
                    && let Some(why) = self.lock().interrupt_why.clone()
                    && let Some(e) = result.error.as_mut()
                {
                    *e = e.replace("the job outlived the stop grace", &why);
                }
                result
            }
            Ok(exec::Outcome::Handed(followed)) => {
                debug!(cmd_id = %id, "job kept running for the new worker");
                let mut st = self.lock();
                st.slots[index].job = None;
                st.handed.push(Handed { followed, held });
                return None;
            }
            Err(panic) => {
                error!(
                    cmd_id = %id,
                    "a job slot panicked while running this job: {panic}; its processes were killed, it is recorded failed, and the slot goes on"
                );
                panicked(&id, &held.job, &panic)
            }
        };
        let ran = Box::new(Ran {
            job: held.job,
            running_path: held.running_path,
            _lock: held.lock,
            result,
            command: held.command,
        });
        Some((id, Record::Run(ran)))
    }

    /// Follows a job a previous worker handed over, to its end.
    fn follow_adopted(
        &self,
        index: usize,
        interrupt: &EventFd,
        adopted: Handed,
        stage: &mut Stage,
    ) -> Option<(JobId, Record)> {
        *stage = Stage::Claimed;
        let Handed { followed, held } = adopted;
        let id = followed.id.clone();
        let limit = followed.timeout.saturating_add(followed.kill.grace);
        let (started_at, t0) = (followed.started_at, followed.t0);
        let (log_rel, submitted_by) = (followed.log_rel.clone(), followed.submitted_by.clone());
        let submitter = followed.submitted_by.as_ref().map(|s| s.uid);
        let interrupted = self.occupy(index, &id, submitter, t0, limit);
        if interrupted && followed.kill.phase == exec::Phase::Running {
            info!(cmd_id = %id, "interrupting job: the stop grace has passed");
            let _ = interrupt.write(1);
        }
        let handover = &self.handover;
        let wake = |id: &JobId| self.wake_of(index, id);
        let outcome = contain(|| exec::follow(*followed, interrupt, handover, &wake));
        self.after_run(index, id, outcome, held, |id, job, panic| {
            let mut r = panicked_result(id, job.attempt, panic);
            r.started_at = started_at;
            r.duration_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
            r.log = Some(log_rel);
            r.submitted_by = submitted_by;
            r
        })
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
        let window = Timestamp(
            since
                .0
                .checked_sub(Duration::from_secs(2))
                .unwrap_or(since.0),
        );
        let elsewhere = self
            .spool
            .latest_log(id)
            .ok()
            .flatten()
            .and_then(|p| log_started(&p))
            .is_some_and(|started| started >= window)
            // Or settled without a run since: withdrawn by a cancel.
            || self
                .spool
                .read_result(id)
                .ok()
                .flatten()
                .is_some_and(|r| r.status == Status::Cancelled && r.finished_at >= window);
        if elsewhere {
            debug!(cmd_id = %id, "the job file was claimed by another worker");
        }
        elsewhere
    }
}

/// Bad input: a `rejected` result with the reason, and the owner of the
/// file when it could be inspected.
fn rejection(id: JobId, reason: String, submitter: Option<Submitter>) -> (JobId, Record) {
    warn!(
        message_id = message_id::JOB_REJECTED,
        cmd_id = %id,
        cmd_status = "rejected",
        exit_code = "-",
        duration_ms = 0,
        submitter_uid = submitter.as_ref().map(|s| s.uid),
        submitter = submitter.as_ref().and_then(|s| s.name.as_deref()),
        "job {id} rejected: {reason}"
    );
    let result = JobResult::not_run(&id, Status::Rejected, reason, 1, submitter);
    (id, Record::Rejection(result))
}

/// Runs `f`; a panic in it comes back as its message instead of unwinding
/// further, so one job cannot take its slot, and the worker, down with it.
/// What `f` had borrowed may be half-updated after a panic: the caller
/// settles it (see [`Shared::after_panic`]).
fn contain<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| panic_message(payload.as_ref()))
}

/// The text a panic was raised with.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

/// The `failed` result of a job whose handling panicked.
fn panicked_result(id: &JobId, attempt: u32, panic: &str) -> JobResult {
    JobResult::not_run(
        id,
        Status::Failed,
        format!(
            "the worker failed while handling this job (a bug in ai-cmd-executor; please report it): panic: {panic}"
        ),
        attempt,
        None,
    )
}

/// The job file a slot works on, and the rules it is settled by.
struct JobFile<'a> {
    ctx: &'a ClaimCtx,
    /// Its name in `pending/` (and `running/`).
    name: &'a OsStr,
    kind: JobKind,
    max_attempts: u32,
}

impl JobFile<'_> {
    /// What to hand on for the job after a panic at `stage`: a `failed`
    /// result with the panic message, with its job file, wherever the
    /// slot had got to, settled as a finished or rejected job's is. `None`
    /// when there is nothing of the job left to this slot.
    ///
    /// Whatever the slot held (the job file's lock, the process) was let go
    /// while the panic unwound. A job file in `running/` that nobody holds
    /// is this slot's (a live worker holds its own until the file has left
    /// `running/`), so it is recorded as a finished run. Otherwise a job
    /// still being claimed is moved from `pending/` to `archive/rejected/`
    /// (left there, it would be claimed, and panic, again); a claimed job
    /// whose file is gone gets the result alone.
    fn salvage(&self, id: &JobId, stage: Stage, panic: &str) -> Option<Record> {
        if stage == Stage::Released {
            return None;
        }
        let running = self.ctx.spool.running().join(self.name);
        if let Ok(mut file) = open_job_file(&running)
            && !matches!(file.try_lock(), Err(TryLockError::WouldBlock))
        {
            let bytes = claim::read_bounded(&mut file, self.ctx.max_job_bytes).ok();
            let job = bytes
                .as_deref()
                .and_then(|b| Job::parse(self.kind, b).ok())
                .unwrap_or_else(Job::placeholder);
            let command = bytes.as_deref().map(|b| claim::digest(&job, b));
            let mut result = panicked_result(id, job.attempt, panic);
            result.submitted_by = file
                .metadata()
                .ok()
                .map(|m| self.ctx.submitters.owner(m.uid()).0);
            return Some(Record::Run(Box::new(Ran {
                job,
                running_path: running,
                _lock: file,
                result,
                command,
            })));
        }
        let result = panicked_result(id, 1, panic);
        if stage == Stage::Claiming {
            let pending = self.ctx.spool.pending().join(self.name);
            match move_into(&pending, &self.ctx.spool.archive_rejected()) {
                Ok(dest) => {
                    debug!(cmd_id = %id, "job file kept as {}", self.ctx.spool.relative(&dest));
                }
                // Gone, or another worker's now.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
                Err(e) => {
                    error!(cmd_id = %id, "cannot move the job file out of pending/: {e}");
                    return None;
                }
            }
        }
        Some(Record::Rejection(result))
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

#[cfg(test)]
mod tests {
    use std::fs;

    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    use super::super::record::Recorder;
    use super::*;
    use crate::config::Config;

    #[test]
    fn contain_turns_a_panic_into_its_message() {
        assert_eq!(contain(|| 7), Ok(7));
        assert_eq!(
            contain(|| -> u8 { panic!("static text") }),
            Err("static text".to_owned())
        );
        let n = 3;
        assert_eq!(
            contain(|| -> u8 { panic!("formatted {n}") }),
            Err("formatted 3".to_owned())
        );
        let other = contain(|| std::panic::panic_any(42u8)).unwrap_err();
        assert!(other.contains("without a message"), "{other}");
        // The panic that once stopped the worker: a deadline past the end
        // of the clock.
        let overflow = contain(|| Instant::now() + Duration::from_secs(u64::MAX)).unwrap_err();
        assert!(overflow.contains("overflow"), "{overflow}");
    }

    /// The slots' shared state and a recorder on a fresh spool, with one
    /// slot that no thread serves: the test drives it.
    struct Rig {
        _dir: tempfile::TempDir,
        spool: Spool,
        shared: Arc<Shared>,
        recorder: Recorder,
        sender: Option<RecordSender>,
        ctx: Arc<ClaimCtx>,
        _inbox: UnboundedReceiver<ToLoop>,
    }

    impl Rig {
        fn new() -> Rig {
            let dir = tempfile::tempdir().unwrap();
            let spool = Spool::new(dir.path().join("spool"));
            spool.ensure_layout().unwrap();
            let (to_loop, inbox) = unbounded_channel();
            let config = Config::default();
            let shared = Arc::new(Shared::new(
                spool.clone(),
                ClaimCtx::new(
                    spool.clone(),
                    &config,
                    Arc::new(super::super::isolation::Confinement::none()),
                ),
                1,
                3,
                to_loop,
            ));
            shared.lock().slots.push(Slot {
                job: None,
                cancel: None,
                interrupt: Arc::new(EventFd::new().unwrap()),
            });
            let recorder = Recorder::start(spool.clone(), Arc::clone(&shared)).unwrap();
            let sender = recorder.sender();
            let ctx = Arc::clone(&shared.lock().ctx);
            Rig {
                _dir: dir,
                spool,
                shared,
                recorder,
                sender,
                ctx,
                _inbox: inbox,
            }
        }

        /// Queues `pending/<id>.json`, takes it as a slot's `take` would,
        /// and hands it to [`Shared::handle`] with `work`.
        fn run(&self, id: &str, work: impl FnOnce(&Spool, &mut Stage) -> Option<(JobId, Record)>) {
            let name = OsString::from(format!("{id}.json"));
            fs::write(self.spool.pending().join(&name), r#"{"command":"true"}"#).unwrap();
            let id = JobId::new(id).unwrap();
            {
                let mut st = self.shared.lock();
                st.busy.insert(id.clone());
                st.working += 1;
            }
            let file = JobFile {
                ctx: &self.ctx,
                name: &name,
                kind: JobKind::Json,
                max_attempts: 3,
            };
            let sender = self.sender.as_ref().unwrap();
            self.shared
                .handle(0, sender, id, &file, |stage| work(&self.spool, stage));
            // As the slot's next `take` does.
            self.shared.lock().working -= 1;
        }

        /// Waits (with a deadline) until every result handed on is written.
        fn settle(&self) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.shared.lock().quiet() {
                assert!(Instant::now() < deadline, "results still unwritten");
                thread::sleep(Duration::from_millis(5));
            }
        }

        fn result(&self, id: &str) -> Option<JobResult> {
            self.spool.read_result(&JobId::new(id).unwrap()).unwrap()
        }

        fn names(&self, dir: &std::path::Path) -> Vec<String> {
            fs::read_dir(dir)
                .map(|rd| {
                    rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        }

        /// The slot is free, the id released, nothing left in the spool's
        /// queues.
        fn assert_clean(&self) {
            let st = self.shared.lock();
            assert!(st.busy.is_empty(), "ids still busy");
            assert!(st.slots[0].job.is_none(), "the slot still has a job");
            drop(st);
            assert!(self.names(&self.spool.pending()).is_empty());
            assert!(self.names(&self.spool.running()).is_empty());
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            self.sender = None;
            self.recorder.shutdown();
        }
    }

    fn assert_failed_by_panic(r: Option<JobResult>, message: &str) {
        let r = r.expect("a result");
        assert_eq!(r.status, Status::Failed, "{r:?}");
        let error = r.error.unwrap_or_default();
        assert!(error.contains(message), "{error}");
    }

    #[test]
    fn a_panic_while_claiming_fails_the_job_and_archives_its_file() {
        let rig = Rig::new();
        rig.run("early", |_, _| panic!("boom before the rename"));
        rig.settle();
        assert_failed_by_panic(rig.result("early"), "boom before the rename");
        assert!(
            rig.names(&rig.spool.archive_rejected())
                .iter()
                .any(|n| n.starts_with("early.json.")),
            "the job file is kept in archive/rejected/"
        );
        rig.assert_clean();
    }

    #[test]
    fn a_panic_after_the_claim_settles_the_file_in_running() {
        let rig = Rig::new();
        rig.run("late", |spool, stage| {
            fs::rename(
                spool.pending().join("late.json"),
                spool.running().join("late.json"),
            )
            .unwrap();
            *stage = Stage::Claimed;
            rig.shared.lock().slots[0].job = Some(ActiveJob {
                id: JobId::new("late").unwrap(),
                submitter: None,
                started: Instant::now(),
                limit: Duration::from_secs(1),
            });
            panic!("boom while running")
        });
        rig.settle();
        assert_failed_by_panic(rig.result("late"), "boom while running");
        rig.assert_clean();
        // A second job on the same slot runs as usual.
        rig.run("next", |_, _| None);
        rig.settle();
        assert!(rig.result("next").is_none());
        assert_eq!(
            rig.names(&rig.spool.pending()),
            vec!["next.json".to_owned()],
            "work that hands nothing on leaves the file alone"
        );
    }

    #[test]
    fn a_panic_after_the_job_was_released_records_nothing() {
        let rig = Rig::new();
        rig.run("elsewhere", |spool, stage| {
            *stage = Stage::Released;
            fs::remove_file(spool.pending().join("elsewhere.json")).unwrap();
            panic!("boom after release")
        });
        rig.settle();
        assert!(rig.result("elsewhere").is_none());
        rig.assert_clean();
    }
}
