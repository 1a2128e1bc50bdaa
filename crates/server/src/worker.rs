//! The one generation thread and the bounded queue in front of it: requests run one at a time
//! in arrival order; a full queue is refused at once (429), never waited on.
//!
//! Cancellation: each accepted request gets a [`CancelGuard`]; dropping it (the client went
//! away, so its handler or response stream was dropped) stops the generation before its next
//! forward pass, or skips it if it had not started.
//!
//! Shutdown ([`Queue::shutdown`]): the running generation is cancelled the same way and answered
//! 503, as is every queued request and every later submission.
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};

use flashmoe_runtime::{Engine, Event, FinishReason, GenerationRequest, PromptInput, RuntimeError};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;

use crate::error::ApiError;
use crate::metrics::Metrics;

/// What the generation thread sends back for one request.
pub enum Msg {
    Event(Event),
    Error(ApiError),
}

/// The next event of a submitted generation, or its error. The first one tells whether the
/// engine accepted the request (context checks, template errors) before a status is sent.
pub async fn recv_event(rx: &mut UnboundedReceiver<Msg>) -> Result<Event, ApiError> {
    match rx.recv().await {
        Some(Msg::Event(ev)) => Ok(ev),
        Some(Msg::Error(e)) => Err(e),
        None => Err(ApiError::internal("the generation ended without a result")),
    }
}

struct Job {
    req: GenerationRequest,
    reply: Reply,
}

/// Where a job's answer goes: a generation's events, or only its prompt's token count
/// (Anthropic's `count_tokens`; runs the template and the tokenizer, not the model).
enum Reply {
    Events(UnboundedSender<Msg>),
    Count(oneshot::Sender<Result<usize, ApiError>>),
}

/// Sets the request's cancel flag when dropped.
pub struct CancelGuard(pub(crate) Arc<AtomicBool>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What the request handlers and the generation thread share about shutting down.
#[derive(Default)]
struct Shutdown {
    /// Set once; guarded by the same lock as `running` so that a job the generation thread
    /// starts is either seen by [`Queue::shutdown`] or sees the flag itself.
    state: Mutex<ShutdownState>,
}

#[derive(Default)]
struct ShutdownState {
    shutting_down: bool,
    /// The cancel flag of the generation that runs now.
    running: Option<Arc<AtomicBool>>,
}

impl Shutdown {
    fn lock(&self) -> MutexGuard<'_, ShutdownState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

#[derive(Clone)]
pub struct Queue {
    tx: SyncSender<Job>,
    metrics: Arc<Metrics>,
    shutdown: Arc<Shutdown>,
}

impl Queue {
    /// Starts the generation thread, which owns the engine. `capacity`: requests that may wait
    /// while one runs.
    /// `replies`: scripted texts streamed in turn instead of generating (front-end tests).
    pub fn start(
        engine: Engine,
        capacity: usize,
        metrics: Arc<Metrics>,
        replies: Vec<String>,
    ) -> std::io::Result<Queue> {
        let (tx, rx) = sync_channel::<Job>(capacity);
        let m = metrics.clone();
        let shutdown = Arc::new(Shutdown::default());
        let sd = shutdown.clone();
        std::thread::Builder::new()
            .name("flashmoe-generate".into())
            .spawn(move || {
                let mut engine = engine;
                let mut replies = replies.into_iter().cycle();
                for job in rx {
                    m.queue_depth.fetch_sub(1, Ordering::Relaxed);
                    let tx = match job.reply {
                        Reply::Count(tx) => {
                            let n = if sd.lock().shutting_down {
                                Err(ApiError::shutting_down())
                            } else {
                                // As a generation's, a panic must not end this thread.
                                std::panic::catch_unwind(AssertUnwindSafe(|| {
                                    count_tokens(&engine, &job.req)
                                }))
                                .unwrap_or_else(|_| {
                                    Err(ApiError::internal("counting the prompt failed"))
                                })
                            };
                            let _ = tx.send(n);
                            continue;
                        }
                        Reply::Events(tx) => tx,
                    };
                    {
                        let mut st = sd.lock();
                        if st.shutting_down {
                            let _ = tx.send(Msg::Error(ApiError::shutting_down()));
                            continue;
                        }
                        st.running = job.req.cancel.clone();
                    }
                    run_job(&mut engine, replies.next(), job.req, tx, &m, &sd);
                    sd.lock().running = None;
                }
            })?;
        Ok(Queue {
            tx,
            metrics,
            shutdown,
        })
    }

    /// Queues a request; its events arrive on the receiver. Refused when the queue is full or
    /// the server is shutting down.
    pub fn submit(
        &self,
        mut req: GenerationRequest,
    ) -> Result<(UnboundedReceiver<Msg>, CancelGuard), ApiError> {
        if self.shutdown.lock().shutting_down {
            return Err(ApiError::shutting_down());
        }
        let flag = Arc::new(AtomicBool::new(false));
        req.cancel = Some(flag.clone());
        let (tx, rx) = unbounded_channel();
        self.enqueue(Job {
            req,
            reply: Reply::Events(tx),
        })?;
        Ok((rx, CancelGuard(flag)))
    }

    /// The number of tokens the request's prompt renders to, counted on the generation thread
    /// (which owns the tokenizer) in turn with the generations; refused as `submit` is.
    pub async fn count(&self, req: GenerationRequest) -> Result<usize, ApiError> {
        if self.shutdown.lock().shutting_down {
            return Err(ApiError::shutting_down());
        }
        let (tx, rx) = oneshot::channel();
        self.enqueue(Job {
            req,
            reply: Reply::Count(tx),
        })?;
        rx.await
            .map_err(|_| ApiError::internal("the generation thread has stopped"))?
    }

    fn enqueue(&self, job: Job) -> Result<(), ApiError> {
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
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

    /// Refuses new requests from now on, cancels the running generation (its client gets 503)
    /// and lets the queued ones be answered 503. Returns (running, queued) at the moment.
    pub fn shutdown(&self) -> (usize, usize) {
        let mut st = self.shutdown.lock();
        st.shutting_down = true;
        let running = match &st.running {
            Some(flag) => {
                flag.store(true, Ordering::Relaxed);
                1
            }
            None => 0,
        };
        (running, self.metrics.queue_depth.load(Ordering::Relaxed))
    }
}

/// Time per token of a scripted reply: slow enough that a client sees it arrive in pieces, and
/// that a test polling a browser on a loaded CI machine still sees an answer mid-stream.
const REPLY_PACE: std::time::Duration = std::time::Duration::from_millis(60);

/// The parameter a prompt error names: what the client sent the prompt as.
fn prompt_param(req: &GenerationRequest) -> &'static str {
    match req.prompt {
        PromptInput::Messages { .. } => "messages",
        PromptInput::Text(_) | PromptInput::Ids(_) => "prompt",
    }
}

/// Renders and tokenizes the prompt as a generation would (tool choice applied), without the
/// context checks: a prompt too long for the context still has a count.
fn count_tokens(engine: &Engine, req: &GenerationRequest) -> Result<usize, ApiError> {
    let n = engine
        .render(&req.prompt, &req.tool_choice)
        .and_then(|text| Ok(engine.tokenizer().encode(&text)?.len()));
    n.map_err(|e| ApiError::from_runtime(e, prompt_param(req)))
}

fn run_job(
    engine: &mut Engine,
    reply: Option<String>,
    req: GenerationRequest,
    tx: UnboundedSender<Msg>,
    metrics: &Metrics,
    shutdown: &Shutdown,
) {
    if req.is_cancelled() || tx.is_closed() {
        return;
    }
    metrics.busy.store(1, Ordering::Relaxed);
    // Counted as the Done event passes, before the client can see it: a client that reads
    // /metrics right after its answer must find that answer counted.
    let mut counted = false;
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let on_event = |ev| {
            if let Event::Done(d) = &ev {
                metrics.finished(d);
                counted = true;
            }
            if tx.send(Msg::Event(ev)).is_err() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        match &reply {
            Some(text) => engine.replay(&req, text, REPLY_PACE, on_event),
            None => engine.generate(&req, on_event),
        }
    }));
    metrics.busy.store(0, Ordering::Relaxed);
    match result {
        Ok(Ok(done)) => {
            if !counted {
                metrics.finished(&done);
            }
            if done.finish_reason == FinishReason::Cancelled && shutdown.lock().shutting_down {
                let _ = tx.send(Msg::Error(ApiError::shutting_down()));
            }
        }
        Ok(Err(e)) => {
            if matches!(e, RuntimeError::Core(_) | RuntimeError::Text(_)) {
                eprintln!("flashmoe serve: generation failed: {e}");
            }
            let _ = tx.send(Msg::Error(ApiError::from_runtime(e, prompt_param(&req))));
        }
        Err(_) => {
            // The state may be half-updated: start the next request from scratch.
            engine.reset();
            eprintln!("flashmoe serve: generation panicked; session reset");
            let _ = tx.send(Msg::Error(ApiError::internal("the generation failed")));
        }
    }
}
