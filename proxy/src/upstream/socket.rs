//! The socket under one upstream connection: plain TCP, or TLS over TCP.
//!
//! Serin's HTTP/1.1 client reads a plain socket by readiness (wait until
//! readable, then `try_read` into the buffer), which is what keeps a
//! keep-alive request at one read and one write a side. Over TLS the bytes
//! must pass through rustls, so reads and writes go through the TLS stream's
//! `AsyncRead`/`AsyncWrite`; the readiness tricks still apply to the TCP
//! socket underneath. Both kinds are one type so that the pool, the body
//! state machine, uploads and upgrade tunnels never ask which they hold.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// An upstream connection's socket.
pub(crate) enum UpstreamIo {
    /// Plain TCP (`http://`).
    Plain(TcpStream),
    /// TLS over TCP (`https://`); boxed, as rustls's state is large.
    Tls(Box<TlsStream<TcpStream>>),
}

impl UpstreamIo {
    fn tcp(&self) -> &TcpStream {
        match self {
            UpstreamIo::Plain(tcp) => tcp,
            UpstreamIo::Tls(tls) => tls.get_ref().0,
        }
    }

    /// Reads what has arrived into `buf`'s spare room; `Ok(0)` is the end.
    pub(crate) fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        match self {
            UpstreamIo::Plain(tcp) => loop {
                ready!(tcp.poll_read_ready(cx))?;
                match tcp.try_read_buf(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    read => return Poll::Ready(read),
                }
            },
            UpstreamIo::Tls(tls) => {
                // tokio's `read_buf` fills the spare room without zeroing it
                // first; the future holds only references, so one made per
                // poll loses nothing.
                let read = tls.read_buf(buf);
                std::pin::pin!(read).poll(cx)
            }
        }
    }

    /// True if an idle connection can no longer carry a request: the
    /// upstream closed it or sent something unasked. Costs no system call
    /// unless the socket has reported readable since it went idle. Over TLS
    /// a readable socket may only hold a session ticket (TLS 1.3 servers
    /// send them after the handshake): rustls takes it, and the connection
    /// is still good if no data and no close came with it.
    pub(crate) fn closed_while_idle(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.tcp().poll_read_ready(&mut cx) {
            Poll::Pending => return false,
            Poll::Ready(Err(_)) => return true,
            Poll::Ready(Ok(())) => {}
        }
        let mut byte = [0u8; 1];
        match self {
            UpstreamIo::Plain(tcp) => !matches!(
                tcp.try_read(&mut byte),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            ),
            UpstreamIo::Tls(tls) => {
                let mut read = ReadBuf::new(&mut byte);
                !Pin::new(&mut **tls)
                    .poll_read(&mut cx, &mut read)
                    .is_pending()
            }
        }
    }

    /// Whether ALPN chose HTTP/2 (TLS only).
    pub(crate) fn is_h2(&self) -> bool {
        match self {
            UpstreamIo::Plain(_) => false,
            UpstreamIo::Tls(tls) => tls.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }

    /// Clears the socket's readable mark after a response was read to its
    /// end (no system call), so that the next exchange and the idle check
    /// can trust it again: without this each request paid one `recv(2)`
    /// that found nothing. A close or data that arrives later sets it anew.
    pub(crate) fn clear_read_mark(&self) {
        let _ = self.tcp().try_io(Interest::READABLE, || {
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            UpstreamIo::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            UpstreamIo::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(tls) => Pin::new(&mut **tls).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(tcp) => tcp.is_write_vectored(),
            UpstreamIo::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            UpstreamIo::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            UpstreamIo::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
        }
    }
}
