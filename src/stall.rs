//! A client that stops reading an answer is let go: its connection, the backend connection
//! feeding it and its in-flight count are not held for longer than `routing.idle_timeout`
//! without a byte written.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// How long a write to a client may wait for room; a reload changes it for every connection.
#[derive(Debug)]
pub struct StallLimit(AtomicU64);

impl StallLimit {
    pub fn new(limit: Duration) -> Arc<StallLimit> {
        Arc::new(StallLimit(AtomicU64::new(millis(limit))))
    }

    pub fn set(&self, limit: Duration) {
        self.0.store(millis(limit), Ordering::Relaxed);
    }

    pub fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

pub fn stalled() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the client read nothing for routing.idle_timeout",
    )
}

pin_project_lite::pin_project! {
    /// A connection whose writes fail once one has waited for room longer than the limit.
    /// A timer exists only while a write waits: a client that keeps up costs none.
    pub struct WriteStall<I> {
        #[pin]
        io: I,
        limit: Arc<StallLimit>,
        waiting: Option<Pin<Box<Sleep>>>,
    }
}

impl<I> WriteStall<I> {
    pub fn new(io: I, limit: Arc<StallLimit>) -> Self {
        WriteStall {
            io,
            limit,
            waiting: None,
        }
    }
}

/// What a write that may wait does: `Pending` starts (or goes on with) the wait, anything else
/// ends it.
fn watch<T>(
    polled: Poll<io::Result<T>>,
    waiting: &mut Option<Pin<Box<Sleep>>>,
    limit: &StallLimit,
    cx: &mut Context<'_>,
) -> Poll<io::Result<T>> {
    match polled {
        Poll::Pending => {
            let timer = waiting.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit.get())));
            match timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(stalled())),
                Poll::Pending => Poll::Pending,
            }
        }
        done => {
            *waiting = None;
            done
        }
    }
}

impl<I: AsyncWrite> AsyncWrite for WriteStall<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write(cx, buf);
        watch(polled, this.waiting, this.limit, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write_vectored(cx, bufs);
        watch(polled, this.waiting, this.limit, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let polled = this.io.poll_flush(cx);
        watch(polled, this.waiting, this.limit, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let polled = this.io.poll_shutdown(cx);
        watch(polled, this.waiting, this.limit, cx)
    }
}

impl<I: AsyncRead> AsyncRead for WriteStall<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}
