//! The one generation thread and the bounded queue in front of it: requests run one at a time
//! in arrival order; a full queue is refused at once (429), never waited on.
//!
//! Cancellation: each accepted request gets a [`CancelGuard`]; dropping it (the client went
//! away, so its handler or response stream was dropped) stops the generation before its next
//! forward pass, or skips it if it had not started.
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;

use flashmoe_runtime::{Engine, Event, GenerationRequest, RuntimeError};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// What the generation thread sends back for one request.
pub enum Msg {
    Event(Event),
    Error(ApiError),
}

struct Job {
    req: GenerationRequest,
    tx: UnboundedSender<Msg>,
}

/// Sets the request's cancel flag when dropped.
pub struct CancelGuard(Arc<AtomicBool>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[derive(Clone)]
pub struct Queue {
    tx: SyncSender<Job>,
    metrics: Arc<Metrics>,
}

impl Queue {
    /// Starts the generation thread, which owns the engine. `capacity`: requests that may wait
    /// while one runs.
    pub fn start(engine: Engine, capacity: usize, metrics: Arc<Metrics>) -> std::io::Result<Queue> {
        let (tx, rx) = sync_channel::<Job>(capacity);
        let m = metrics.clone();
        std::thread::Builder::new()
            .name("flashmoe-generate".into())
            .spawn(move || {
                let mut engine = engine;
                for job in rx {
                    m.queue_depth.fetch_sub(1, Ordering::Relaxed);
                    run_job(&mut engine, job, &m);
                }
            })?;
        Ok(Queue { tx, metrics })
    }

    /// Queues a request; its events arrive on the receiver. Refused when the queue is full.
    pub fn submit(
        &self,
        mut req: GenerationRequest,
    ) -> Result<(UnboundedReceiver<Msg>, CancelGuard), ApiError> {
        let flag = Arc::new(AtomicBool::new(false));
        req.cancel = Some(flag.clone());
        let (tx, rx) = unbounded_channel();
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Job { req, tx }) {
            Ok(()) => Ok((rx, CancelGuard(flag))),
            Err(e) => {
                self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                match e {
                    TrySendError::Full(_) => {
                        self.metrics.rejected();
                        Err(ApiError::queue_full(
                            self.metrics.queue_depth.load(Ordering::Relaxed),
                        ))
                    }
                    TrySendError::Disconnected(_) => {
                        Err(ApiError::internal("the generation thread has stopped"))
                    }
                }
            }
        }
    }
}

fn run_job(engine: &mut Engine, job: Job, metrics: &Metrics) {
    let Job { req, tx } = job;
    if req.is_cancelled() || tx.is_closed() {
        return;
    }
    metrics.busy.store(1, Ordering::Relaxed);
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        engine.generate(&req, |ev| {
            if tx.send(Msg::Event(ev)).is_err() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
    }));
    metrics.busy.store(0, Ordering::Relaxed);
    match result {
        Ok(Ok(done)) => metrics.finished(&done),
        Ok(Err(e)) => {
            if matches!(e, RuntimeError::Core(_) | RuntimeError::Text(_)) {
                eprintln!("flashmoe serve: generation failed: {e}");
            }
            let _ = tx.send(Msg::Error(e.into()));
        }
        Err(_) => {
            // The state may be half-updated: start the next request from scratch.
            engine.reset();
            eprintln!("flashmoe serve: generation panicked; session reset");
            let _ = tx.send(Msg::Error(ApiError::internal("the generation failed")));
        }
    }
}
