//! The accept loop: HTTP/1.1 connections with a cap on how many are open, timeouts for clients
//! that stall, and a graceful stop.
//!
//! - Headers: a client must send a request's headers within `header_timeout` of connecting or
//!   of its previous response (so an idle keep-alive connection is closed after as long).
//! - Stalls: a response the client stops reading for `idle_timeout` closes the connection (which
//!   cancels its generation); a request body is read within `idle_timeout` (see the routes).
//! - Cap: beyond `max_connections` open connections, a new one is answered 503 and closed.
//! - Stop: when `stop` turns true the listener is closed, idle connections are closed, and busy
//!   ones finish their response (the worker cancels or refuses every generation first), for at
//!   most [`DRAIN`].
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Sleep;

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Longest wait, after a stop, for open connections to finish their responses.
pub const DRAIN: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `stop` is true, then drains (see the module header).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) {
    // The drain below acquires them all at once, which takes a u32.
    let max = limits
        .max_connections
        .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let permits = Arc::new(Semaphore::new(max));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    loop {
        let stream = tokio::select! {
            _ = stopped(&mut stop) => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                // Out of file descriptors and the like: wait for connections to close.
                Err(e) => {
                    eprintln!("flashmoe serve: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(refuse(stream, max));
            continue;
        };
        let io = TokioIo::new(StallGuard::new(stream, limits.idle_timeout));
        let conn = builder.serve_connection(io, TowerToHyperService::new(app.clone()));
        let mut stop = stop.clone();
        let m = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            m.connections_open.fetch_add(1, Ordering::Relaxed);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.as_mut().await;
                }
            }
            m.connections_open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(listener);
    // Every connection holds a permit until it closes.
    let _ = tokio::time::timeout(DRAIN, permits.acquire_many(max as u32)).await;
}

/// Resolves once `stop` is true (at once if it already is).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The returned guard must not live across an await: dropped here.
    let _ = stop.wait_for(|s| *s).await;
}

/// Answers a connection over the cap with 503 and closes it, reading what the client sent so
/// that the close is not a reset that could destroy the answer before the client reads it.
async fn refuse(mut stream: TcpStream, max: usize) {
    let body = ApiError::too_many_connections(max).body().to_string();
    let msg = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        stream.write_all(msg.as_bytes()).await?;
        stream.shutdown().await?;
        let mut buf = [0u8; 4096];
        while stream.read(&mut buf).await? > 0 {}
        io::Result::Ok(())
    })
    .await;
}

/// A stream whose writes fail once one has waited `limit` for the client to read.
struct StallGuard {
    io: TcpStream,
    limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl StallGuard {
    fn new(io: TcpStream, limit: Duration) -> Self {
        StallGuard {
            io,
            limit,
            stalled: None,
        }
    }

    /// Called when a write is pending: an error once it has been for `limit`.
    fn check<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let t = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match t.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading the response",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => self.check(cx),
            r => {
                self.stalled = None;
                r
            }
        }
    }
}

impl AsyncRead for StallGuard {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for StallGuard {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.progress(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.progress(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.progress(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
