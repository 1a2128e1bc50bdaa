//! SIGINT and SIGTERM: the first stops the server (says so, stops accepting, cancels the
//! running generation and answers the queued ones 503, then lets connections finish); a second
//! exits at once.
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

use crate::worker::Queue;

pub struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    /// Takes over SIGINT and SIGTERM (from now on they no longer kill the process).
    pub fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    /// The next signal: its name and number.
    async fn next(&mut self) -> (&'static str, i32) {
        tokio::select! {
            _ = self.int.recv() => ("SIGINT", 2),
            _ = self.term.recv() => ("SIGTERM", 15),
        }
    }

    /// Waits for the first signal, stops `queue` and sets `stop`; on a second signal exits the
    /// process with 128 + its number.
    pub async fn run(mut self, queue: Queue, stop: watch::Sender<bool>) {
        let (name, _) = self.next().await;
        let (running, queued) = queue.shutdown();
        println!(
            "flashmoe serve: {name}: shutting down: no new connections; {running} running \
             generation(s) cancelled and {queued} queued request(s) answered 503; waiting up to \
             {}s for responses to finish (a second signal exits at once)",
            crate::listen::DRAIN.as_secs()
        );
        let _ = stop.send(true);
        let (name, num) = self.next().await;
        println!("flashmoe serve: {name} again: exiting now");
        std::process::exit(128 + num);
    }
}
