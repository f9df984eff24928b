//! A TCP socket, plain or under TLS: what both a client connection
//! ([`crate::server`]) and an upstream connection ([`crate::upstream`]) run on.
//!
//! serin reads a plain socket by readiness (wait until readable, then
//! `try_read` into the buffer), which keeps a keep-alive request at one read
//! and one write a side. Over TLS the bytes must pass through rustls, so
//! reads and writes go through the TLS stream's `AsyncRead`/`AsyncWrite`;
//! the readiness tricks still apply to the TCP socket underneath. Both kinds
//! are one type, so that the code above never asks which it holds.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A TLS stream over TCP: rustls's client or server side.
pub(crate) trait TlsOverTcp: AsyncRead + AsyncWrite + Unpin {
    /// The TCP socket underneath.
    fn tcp(&self) -> &TcpStream;
    /// The protocol ALPN chose, if any.
    fn alpn(&self) -> Option<&[u8]>;
}

impl TlsOverTcp for tokio_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }

    fn alpn(&self) -> Option<&[u8]> {
        self.get_ref().1.alpn_protocol()
    }
}

impl TlsOverTcp for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }

    fn alpn(&self) -> Option<&[u8]> {
        self.get_ref().1.alpn_protocol()
    }
}

/// A connection's socket: plain TCP, or TLS (`S`) over TCP.
pub(crate) enum Socket<S> {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP; boxed, as rustls's state is large.
    Tls(Box<S>),
}

impl<S: TlsOverTcp> Socket<S> {
    /// The TCP socket, under TLS or not.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Socket::Plain(tcp) => tcp,
            Socket::Tls(tls) => tls.tcp(),
        }
    }

    /// Whether ALPN chose HTTP/2 (TLS only).
    pub(crate) fn is_h2(&self) -> bool {
        match self {
            Socket::Plain(_) => false,
            Socket::Tls(tls) => tls.alpn() == Some(b"h2"),
        }
    }

    /// Reads what has arrived into `buf`'s spare room; `Ok(0)` is the end.
    pub(crate) fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        match self {
            Socket::Plain(tcp) => loop {
                ready!(tcp.poll_read_ready(cx))?;
                match tcp.try_read_buf(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    read => return Poll::Ready(read),
                }
            },
            Socket::Tls(tls) => {
                // tokio's `read_buf` fills the spare room without zeroing it
                // first; the future holds only references, so one made per
                // poll loses nothing.
                pin!(tls.read_buf(buf)).poll(cx)
            }
        }
    }

    /// Clears the TCP socket's readable mark (no system call), once serin
    /// knows the socket has nothing more to read: without this the next
    /// wait pays a `recv(2)` that finds nothing. Data or a close that
    /// arrives later sets it anew.
    pub(crate) fn clear_read_mark(&self) {
        let _ = self.tcp().try_io(Interest::READABLE, || {
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
    }
}

impl<S: TlsOverTcp> AsyncRead for Socket<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Socket::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
        }
    }
}

impl<S: TlsOverTcp> AsyncWrite for Socket<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Socket::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Socket::Tls(tls) => Pin::new(&mut **tls).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Socket::Plain(tcp) => tcp.is_write_vectored(),
            Socket::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Socket::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Socket::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
        }
    }
}
