//! The socket under one client connection: plain TCP, or TLS over TCP.
//!
//! serin's own HTTP/1.1 loop ([`super::own_h1`]) serves both kinds, so that a
//! sidecar terminating TLS keeps the cheap path; only the socket differs.
//! A plain socket is read by readiness (wait until readable, then `try_read`
//! into the buffer) and watched with a one-byte peek, costing no system call
//! until the client sends something. Over TLS the bytes pass through rustls:
//! reads go through the TLS stream, and a write is flushed so that no record
//! stays in rustls's buffer. Watching a TLS client for a close reads through
//! rustls too (a peek would see the `close_notify` alert as data); whatever
//! request bytes that read finds are kept for the loop's next read.
//!
//! When hyper takes a connection over ([`super::hyper`]), it reads the same
//! socket through [`AsyncRead`] and [`AsyncWrite`], after the bytes the loop
//! had already read ([`super::rewind`]).

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// A client connection's socket.
pub(crate) enum ClientIo {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP; boxed, as rustls's state is large.
    Tls(Box<TlsClient>),
}

/// A TLS client connection, and what was read from it while it was watched.
pub(crate) struct TlsClient {
    stream: TlsStream<TcpStream>,
    /// Request bytes that arrived while an exchange watched for a close
    /// (a pipelined request), handed to the loop's next read.
    early: BytesMut,
}

/// What a watched client did.
pub(crate) enum Watched {
    /// It closed or reset the connection.
    Left,
    /// It sent more bytes (a pipelined request); it is not watched further.
    Sent,
}

impl ClientIo {
    /// A TLS connection whose handshake is done.
    pub(crate) fn tls(stream: TlsStream<TcpStream>) -> Self {
        ClientIo::Tls(Box::new(TlsClient {
            stream,
            early: BytesMut::new(),
        }))
    }

    /// Whether ALPN chose HTTP/2, which only hyper serves.
    pub(crate) fn is_h2(&self) -> bool {
        match self {
            ClientIo::Plain(_) => false,
            ClientIo::Tls(tls) => tls.stream.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }

    /// Reads what has arrived into `buf`'s spare room; `Ok(0)` is the end.
    pub(crate) fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        match self {
            ClientIo::Plain(tcp) => loop {
                ready!(tcp.poll_read_ready(cx))?;
                match tcp.try_read_buf(buf) {
                    Ok(n) if n > 0 && buf.capacity() > buf.len() => {
                        // A short read took all the socket had: clear its
                        // readable mark (no system call), as tokio's own
                        // `poll_read` does, or the next wait pays a recv(2)
                        // that finds nothing.
                        let _ = tcp.try_io(Interest::READABLE, || {
                            Err::<(), _>(io::ErrorKind::WouldBlock.into())
                        });
                        return Poll::Ready(Ok(n));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    read => return Poll::Ready(read),
                }
            },
            ClientIo::Tls(tls) => {
                if !tls.early.is_empty() {
                    let n = tls.early.len();
                    buf.extend_from_slice(&tls.early);
                    tls.early.clear();
                    return Poll::Ready(Ok(n));
                }
                // tokio's `read_buf` fills the spare room without zeroing it
                // first; the future holds only references, so one made per
                // poll loses nothing.
                pin!(tls.stream.read_buf(buf)).poll(cx)
            }
        }
    }

    /// Watches a client whose request is at the upstream: `Ready` once it
    /// leaves or sends more. Costs no system call until its socket turns
    /// readable.
    pub(crate) fn poll_watch(&mut self, cx: &mut Context<'_>) -> Poll<Watched> {
        match self {
            ClientIo::Plain(tcp) => {
                let mut probe = [0u8; 1];
                match ready!(tcp.poll_peek(cx, &mut ReadBuf::new(&mut probe))) {
                    Ok(0) | Err(_) => Poll::Ready(Watched::Left),
                    Ok(_) => Poll::Ready(Watched::Sent),
                }
            }
            ClientIo::Tls(tls) => {
                let TlsClient { stream, early } = &mut **tls;
                if early.capacity() - early.len() < 1024 {
                    early.reserve(4096);
                }
                match ready!(pin!(stream.read_buf(early)).poll(cx)) {
                    Ok(0) | Err(_) => Poll::Ready(Watched::Left),
                    Ok(_) => Poll::Ready(Watched::Sent),
                }
            }
        }
    }

    /// Writes all of `bytes` to the client; over TLS, to the socket and not
    /// only into rustls.
    pub(crate) async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            ClientIo::Plain(tcp) => tcp.write_all(bytes).await,
            ClientIo::Tls(tls) => {
                tls.stream.write_all(bytes).await?;
                tls.stream.flush().await
            }
        }
    }

    /// Bytes already read for the loop and not yet handed to it: they go to
    /// hyper, after the loop's own, when hyper takes the connection over.
    pub(crate) fn take_early(&mut self) -> Option<BytesMut> {
        match self {
            ClientIo::Tls(tls) if !tls.early.is_empty() => Some(std::mem::take(&mut tls.early)),
            _ => None,
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            ClientIo::Tls(tls) => Pin::new(&mut tls.stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            ClientIo::Tls(tls) => Pin::new(&mut tls.stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            ClientIo::Tls(tls) => Pin::new(&mut tls.stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientIo::Plain(tcp) => tcp.is_write_vectored(),
            ClientIo::Tls(tls) => tls.stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            ClientIo::Tls(tls) => Pin::new(&mut tls.stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            ClientIo::Tls(tls) => Pin::new(&mut tls.stream).poll_shutdown(cx),
        }
    }
}
