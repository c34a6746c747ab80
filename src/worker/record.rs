//! The recorder: one long-lived thread that writes results (and settles
//! job files), so the event loop never waits on an `fsync`.
//!
//! The loop sends each finished run or rejection down a channel; the thread
//! takes whatever has queued up, records it, and answers with one message
//! per batch, so a busy worker pays one wake-up of the loop per batch rather
//! than one per result. A dedicated thread, rather than a task on a pool,
//! also means one wake-up of the writer per batch instead of a pool hand-off
//! per result.

use std::sync::mpsc;
use std::thread;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tracing::error;

use super::{Ran, log_result};
use crate::spool::{JobId, JobResult, Spool, SpoolError, Status};
use crate::worker::settle::{self, Prepared, Settled};

/// A result waiting to be recorded.
pub(super) enum Record {
    /// A run whose process ended (its job file still locked in `running/`).
    Run(Box<Ran>),
    /// The rejection of bad input.
    Rejection(JobResult),
}

/// What became of one record.
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

/// The handle the loop keeps: where to send records, and where their
/// outcomes come back.
pub(super) struct Recorder {
    orders: Option<mpsc::Sender<Order>>,
    thread: Option<thread::JoinHandle<()>>,
    /// Records sent and not answered yet.
    in_flight: usize,
}

impl Recorder {
    /// Starts the thread. Outcomes arrive on the returned receiver, a batch
    /// per message.
    pub fn start(spool: Spool) -> std::io::Result<(Self, UnboundedReceiver<Vec<Recorded>>)> {
        let (orders, inbox) = mpsc::channel::<Order>();
        let (outbox, outcomes) = unbounded_channel();
        let thread = thread::Builder::new()
            .name("recorder".into())
            .spawn(move || serve(&spool, &inbox, &outbox))?;
        Ok((
            Recorder {
                orders: Some(orders),
                thread: Some(thread),
                in_flight: 0,
            },
            outcomes,
        ))
    }

    /// Queues a record.
    pub fn send(&mut self, id: JobId, record: Record, max_attempts: u32) {
        let order = Order {
            id,
            record,
            max_attempts,
        };
        let Some(orders) = self.orders.as_ref() else {
            return;
        };
        match orders.send(order) {
            Ok(()) => self.in_flight += 1,
            // The thread is gone (it only ends when told to, or by a
            // panic): the job stays in running/ and the next start records
            // it interrupted.
            Err(mpsc::SendError(order)) => {
                error!(cmd_id = %order.id, "the result recorder has stopped; the result is lost and the job will be recorded interrupted at the next start");
            }
        }
    }

    /// One record was answered.
    pub fn answered(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Records sent and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Lets the thread finish what it has and waits for it.
    pub fn shutdown(&mut self) {
        self.orders = None;
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            error!("the result recorder panicked");
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Most records answered in one message, so answers keep flowing while
/// new records keep arriving.
const MAX_BATCH: usize = 32;

fn serve(spool: &Spool, inbox: &mpsc::Receiver<Order>, outbox: &UnboundedSender<Vec<Recorded>>) {
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
        if outbox.send(batch).is_err() {
            // The loop has gone; nothing is waiting for the answers.
            return;
        }
    }
}

/// Records one result on the calling thread (the recorder's, or the loop's
/// when it has nothing else to do).
pub(super) fn record_now(spool: &Spool, id: JobId, record: Record, max_attempts: u32) -> Recorded {
    let order = Order {
        id,
        record,
        max_attempts,
    };
    let prepared = prepare(spool, &order);
    conclude(spool, order, prepared)
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
        Record::Rejection(r) => spool.stage_result(r).map(Prepared::Staged),
    }
}

/// Puts a staged result in place and settles its job file.
fn conclude(spool: &Spool, order: Order, prepared: Result<Prepared, SpoolError>) -> Recorded {
    let Order { id, record, .. } = order;
    let outcome = prepared.and_then(|p| match p {
        Prepared::Done(settled) => Ok(settled),
        Prepared::Staged(staged) => match &record {
            Record::Run(ran) => settle::finish(spool, &ran.running_path, ran.result.status, staged),
            Record::Rejection(_) => staged
                .commit()
                .map(|()| Settled::Recorded(Status::Rejected)),
        },
    });
    match outcome {
        Ok(outcome) => {
            if let (Record::Run(ran), Settled::Recorded(_)) = (&record, &outcome) {
                log_result(&ran.result);
            }
            // Dropping a run releases its lock, only now that its job file
            // has left running/.
            drop(record);
            Recorded::Settled { id, outcome }
        }
        Err(error) => Recorded::Failed { id, record, error },
    }
}
