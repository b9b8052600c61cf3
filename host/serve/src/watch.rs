//! The write-stall watch: a connection whose client stops reading is noticed.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When the connection's current write began to wait for the client, if it does.
#[derive(Clone, Debug)]
pub(crate) struct StallClock {
    base: Instant,
    /// Milliseconds after `base` plus one when a write became pending; 0 when none is.
    since: Arc<AtomicU64>,
}

impl StallClock {
    pub(crate) fn new() -> Self {
        Self {
            base: Instant::now(),
            since: Arc::new(AtomicU64::new(0)),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn stalled(&self) {
        let now = self.now();
        let _ = self
            .since
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn moved(&self) {
        self.since.store(0, Ordering::Relaxed);
    }

    /// Returns once a write has waited for the client for `limit` without progress.
    pub(crate) async fn exceeded(&self, limit: Duration) {
        let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        loop {
            let since = self.since.load(Ordering::Relaxed);
            let wait = if since == 0 {
                limit
            } else {
                let waited = self.now().saturating_sub(since);
                if waited >= limit_ms {
                    return;
                }
                Duration::from_millis(limit_ms - waited)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// A stream that tells its [`StallClock`] when writes wait and when they move.
#[derive(Debug)]
pub(crate) struct Watched<T> {
    inner: T,
    clock: StallClock,
}

impl<T> Watched<T> {
    pub(crate) fn new(inner: T, clock: StallClock) -> Self {
        Self { inner, clock }
    }

    fn note<R>(&self, poll: Poll<R>) -> Poll<R> {
        match poll {
            Poll::Pending => self.clock.stalled(),
            Poll::Ready(_) => self.clock.moved(),
        }
        poll
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn only_a_write_that_waits_counts_as_a_stall() {
        let clock = StallClock::new();
        let limit = Duration::from_secs(60);
        // No write waiting: an hour passes without the watch firing.
        let idle = tokio::time::timeout(Duration::from_secs(3600), clock.exceeded(limit)).await;
        assert!(idle.is_err());
        clock.stalled();
        tokio::time::advance(Duration::from_secs(30)).await;
        clock.stalled(); // still the same stall: its start does not move
        let fired = tokio::time::timeout(Duration::from_secs(31), clock.exceeded(limit)).await;
        assert!(fired.is_ok(), "60 s after the write began to wait");
        clock.moved();
        let again = tokio::time::timeout(Duration::from_secs(120), clock.exceeded(limit)).await;
        assert!(again.is_err(), "progress ends the stall");
    }
}
