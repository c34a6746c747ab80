//! The recorder: one long-lived thread that writes results (and settles
//! job files) for the slots, so a slot can start its next job while the
//! last one's result is synced.
//!
//! Slots send each finished run or rejection down a channel; the thread
//! takes whatever has queued up, writes the batch with one journal commit
//! (see [`Staged`](crate::spool::Staged)), and applies the outcomes to the
//! shared state: the ids are freed and counted. Only a failure, or the
//! worker going quiet, is told to the event loop.

use std::sync::{Arc, mpsc};
use std::thread;

use tracing::error;

use super::slots::{PanicAlarm, Shared};
use super::{Ran, log_result};
use crate::spool::{JobId, JobResult, Spool, SpoolError};
use crate::worker::settle::{self, Prepared, Settled};

/// A result waiting to be recorded.
pub(super) enum Record {
    /// A run whose process ended (its job file still locked in `running/`).
    Run(Box<Ran>),
    /// The rejection of bad input.
    Rejection(JobResult),
    /// A result a previous worker could not write (the disk was full) and
    /// kept in `completed/.held-results`; its job file, if still in
    /// `running/`, goes once the result is in place.
    Held(JobResult),
}

/// What became of one record.
#[expect(
    clippy::large_enum_variant,
    reason = "a record lives only between the recorder and the loop, in batches of at most \
              MAX_BATCH; the large variant is the rare failure (a full disk), and boxing it \
              would change the loop's handling of held records for no gain"
)]
pub(super) enum Recorded {
    /// The result was recorded (or the job re-queued); the id is free.
    Settled { id: JobId, outcome: Settled },
    /// Recording failed (a full disk, say); the record comes back to be
    /// held and retried.
    Failed {
        id: JobId,
        record: Record,
        error: SpoolError,
    },
}

struct Order {
    id: JobId,
    record: Record,
    max_attempts: u32,
}

/// The recorder thread.
pub(super) struct Recorder {
    orders: Option<mpsc::Sender<Order>>,
    thread: Option<thread::JoinHandle<()>>,
}

/// Where slots (and the loop's retry) send records.
#[derive(Clone)]
pub(super) struct RecordSender(mpsc::Sender<Order>);

impl Recorder {
    /// Starts the thread.
    pub fn start(spool: Spool, shared: Arc<Shared>) -> std::io::Result<Self> {
        let (orders, inbox) = mpsc::channel::<Order>();
        let thread = thread::Builder::new()
            .name("recorder".into())
            .spawn(move || serve(&spool, &inbox, &shared))?;
        Ok(Recorder {
            orders: Some(orders),
            thread: Some(thread),
        })
    }

    /// A handle to send records with.
    pub fn sender(&self) -> Option<RecordSender> {
        self.orders.clone().map(RecordSender)
    }

    /// Lets the thread finish what it has and waits for it. Every
    /// [`RecordSender`] must be gone first.
    pub fn shutdown(&mut self) {
        self.orders = None;
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            error!("the result recorder panicked");
        }
    }
}

impl RecordSender {
    /// Queues a record, already counted in the shared `in_flight`.
    pub fn send(&self, shared: &Shared, id: JobId, record: Record, max_attempts: u32) {
        let order = Order {
            id,
            record,
            max_attempts,
        };
        // The thread only ends when every sender is gone, or by a panic
        // (which stops the worker): the job stays in running/ and the next
        // start records it interrupted.
        if let Err(mpsc::SendError(order)) = self.0.send(order) {
            error!(cmd_id = %order.id, "the result recorder has stopped; the result is lost and the job will be recorded interrupted at the next start");
            shared.unsent();
        }
    }
}

/// Most records written in one batch, so outcomes keep flowing while new
/// records keep arriving.
const MAX_BATCH: usize = 32;

fn serve(spool: &Spool, inbox: &mpsc::Receiver<Order>, shared: &Shared) {
    let _alarm = PanicAlarm {
        shared,
        what: "the result recorder",
    };
    while let Ok(first) = inbox.recv() {
        let mut orders = vec![first];
        while orders.len() < MAX_BATCH
            && let Ok(next) = inbox.try_recv()
        {
            orders.push(next);
        }
        // Every result of the batch is written before any is synced, so
        // that one journal commit makes them all durable (see `Staged`).
        let prepared: Vec<_> = orders
            .into_iter()
            .map(|o| {
                let p = prepare(spool, &o);
                (o, p)
            })
            .collect();
        let batch = prepared
            .into_iter()
            .map(|(o, p)| conclude(spool, o, p))
            .collect();
        shared.recorded(batch, true);
    }
}

/// Records one result on the calling thread (the recorder's, or a slot's
/// when nothing else is going on).
pub(super) fn record_now(spool: &Spool, id: JobId, record: Record, max_attempts: u32) -> Recorded {
    let order = Order {
        id,
        record,
        max_attempts,
    };
    let prepared = prepare(spool, &order);
    conclude(spool, order, prepared)
}

/// The job file of a held result's run, left in `running/` by the worker
/// that could not write the result, is removed now that the result is in
/// place (unless a live worker holds it: a new run of the id).
fn remove_left_job_file(spool: &Spool, r: &JobResult) {
    let Ok(id) = crate::spool::JobId::new(&r.id) else {
        return;
    };
    if let Some((crate::spool::QueueState::Running, path)) = spool.find_queued(&id)
        && let Ok(f) = crate::spool::open_job_file(&path)
        && f.try_lock().is_ok()
    {
        let _ = std::fs::remove_file(&path);
    }
}

/// Re-queues the order's job, or stages its result.
fn prepare(spool: &Spool, order: &Order) -> Result<Prepared, SpoolError> {
    match &order.record {
        Record::Run(ran) => settle::prepare(
            spool,
            &ran.running_path,
            Some(&ran.job),
            &ran.result,
            order.max_attempts,
        ),
        Record::Rejection(r) | Record::Held(r) => spool.stage_result(r).map(Prepared::Staged),
    }
}

/// Puts a staged result in place and settles its job file.
fn conclude(spool: &Spool, order: Order, prepared: Result<Prepared, SpoolError>) -> Recorded {
    let Order { id, record, .. } = order;
    let outcome = prepared.and_then(|p| match p {
        Prepared::Done(settled) => Ok(settled),
        Prepared::Staged(staged) => match &record {
            Record::Run(ran) => settle::finish(spool, &ran.running_path, ran.result.status, staged),
            Record::Rejection(r) => staged.commit().map(|()| Settled::Recorded(r.status)),
            Record::Held(r) => staged.commit().map(|()| {
                remove_left_job_file(spool, r);
                Settled::Recorded(r.status)
            }),
        },
    });
    match outcome {
        Ok(outcome) => {
            if let (Record::Run(ran), Settled::Recorded(_)) = (&record, &outcome) {
                log_result(&ran.result, ran.command.as_ref());
            }
            // Dropping a run releases its lock, only now that its job file
            // has left running/.
            drop(record);
            Recorded::Settled { id, outcome }
        }
        Err(error) => Recorded::Failed { id, record, error },
    }
}
