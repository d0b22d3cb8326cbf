//! A read tap: an upstream whose received bytes are shown to a callback as they pass to the
//! relay (DNS answers over TCP are learned this way), writes untouched.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `inner`, with every byte read from it shown to `seen`.
pub struct Tap<S, F> {
    inner: S,
    seen: F,
}

impl<S: std::fmt::Debug, F> std::fmt::Debug for Tap<S, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap").field("inner", &self.inner).finish()
    }
}

impl<S, F: FnMut(&[u8])> Tap<S, F> {
    pub fn new(inner: S, seen: F) -> Tap<S, F> {
        Tap { inner, seen }
    }
}

impl<S: AsyncRead + Unpin, F: FnMut(&[u8]) + Unpin> AsyncRead for Tap<S, F> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        (this.seen)(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin, F: Unpin> AsyncWrite for Tap<S, F> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
