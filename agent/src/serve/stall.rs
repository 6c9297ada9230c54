//! A stream whose writes must make progress: a response write (or flush) that stays
//! pending for longer than the limit fails with `TimedOut`, which ends the
//! connection. A client that stops reading cannot hold a connection, its buffers
//! and its slot forever; a slow one that keeps reading is not cut.
//!
//! Must not: bound reads (hyper's header read timeout does), or the total time of
//! a response (`/v1/flows?follow=true` streams for as long as the client reads).
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct WriteStall<S> {
    inner: S,
    limit: Duration,
    /// Running while a write is pending; reset by any progress.
    pending_since: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteStall<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            pending_since: None,
        }
    }

    /// After a pending write or flush: an error once the stall outlasts the limit.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let limit = self.limit;
        let sleep = self
            .pending_since
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteStall<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteStall<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(result) => {
                self.pending_since = None;
                Poll::Ready(result)
            }
            Poll::Pending => self.stalled(cx).map(Err),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Ready(result) => {
                self.pending_since = None;
                Poll::Ready(result)
            }
            Poll::Pending => self.stalled(cx).map(Err),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes all of `data` (tokio's `write_all` needs a feature the agent does
    /// not build with).
    async fn write_all<S: AsyncWrite + Unpin>(s: &mut S, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let n = std::future::poll_fn(|cx| Pin::new(&mut *s).poll_write(cx, data)).await?;
            data = &data[n..];
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_reader_that_stops_ends_the_write_after_the_limit() {
        let (near, _far) = tokio::net::UnixStream::pair().expect("pair");
        let mut stream = WriteStall::new(near, Duration::from_millis(300));
        let t0 = tokio::time::Instant::now();
        // Far more than the socket buffers hold.
        let error = write_all(&mut stream, &vec![0u8; 16 << 20])
            .await
            .expect_err("nobody reads");
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert!(t0.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn a_reader_that_keeps_reading_is_never_cut() {
        let (near, far) = tokio::net::UnixStream::pair().expect("pair");
        const TOTAL: usize = 4 << 20;
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 256 << 10];
            let mut total = 0;
            // Slow but steady: a read every 100 ms, under the limit each time,
            // for longer than the limit in all.
            while total < TOTAL {
                tokio::time::sleep(Duration::from_millis(100)).await;
                far.readable().await.expect("readable");
                match far.try_read(&mut buf) {
                    Ok(n) => total += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
        });
        let mut stream = WriteStall::new(near, Duration::from_millis(300));
        let t0 = tokio::time::Instant::now();
        write_all(&mut stream, &vec![0u8; TOTAL])
            .await
            .expect("progress");
        reader.await.expect("reader");
        assert!(
            t0.elapsed() > Duration::from_millis(300),
            "{:?}",
            t0.elapsed()
        );
    }
}
