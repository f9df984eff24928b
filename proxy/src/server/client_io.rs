//! The socket under one client connection ([`crate::socket`]), and what
//! serin's own HTTP/1.1 loop ([`super::own_h1`]) needs of it beyond reads
//! and writes.
//!
//! The own loop serves clients over plain TCP and over TLS alike, so that a
//! sidecar terminating TLS keeps the cheap path. Two things differ by kind:
//! - watching a client whose request is at the upstream: on plain TCP a
//!   one-byte peek, which costs no system call until the client sends
//!   something; over TLS a read through rustls (a peek would see a
//!   `close_notify` alert as data), whose request bytes, if it finds any,
//!   are kept for the loop's next read;
//! - writing: over TLS a write is flushed, so that no record stays in
//!   rustls's buffer.
//!
//! When hyper takes a connection over ([`super::hyper`]), it gets the socket
//! itself, after the bytes the loop had already read ([`super::rewind`]).

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::socket::Socket;

/// A client connection's socket.
pub(crate) type ClientSocket = Socket<TlsStream<TcpStream>>;

/// A client connection's socket, as the own loop uses it.
pub(crate) struct ClientIo {
    socket: ClientSocket,
    /// Request bytes that arrived over TLS while an exchange watched for a
    /// close (a pipelined request), handed to the loop's next read.
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
    /// A connection on `socket` (over TLS, its handshake done).
    pub(crate) fn new(socket: ClientSocket) -> Self {
        Self {
            socket,
            early: BytesMut::new(),
        }
    }

    /// Whether ALPN chose HTTP/2, which the own HTTP/2 loop serves.
    pub(crate) fn is_h2(&self) -> bool {
        self.socket.is_h2()
    }

    /// Reads what has arrived into `buf`'s spare room; `Ok(0)` is the end.
    pub(crate) fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        if !self.early.is_empty() {
            let n = self.early.len();
            buf.extend_from_slice(&self.early);
            self.early.clear();
            return Poll::Ready(Ok(n));
        }
        let read = ready!(self.socket.poll_fill(cx, buf));
        // A short read on plain TCP took all the socket had: clear its
        // readable mark, as tokio's own `poll_read` does. (Under TLS, rustls
        // decides when the socket is empty.)
        if let (Ok(1..), Socket::Plain(_)) = (&read, &self.socket) {
            if buf.capacity() > buf.len() {
                self.socket.clear_read_mark();
            }
        }
        Poll::Ready(read)
    }

    /// Watches a client whose request is at the upstream: `Ready` once it
    /// leaves or sends more. A client that has sent more is not read any
    /// further, as a peek would see those bytes again: a close behind them
    /// is the loop's to find, and what a client sends meanwhile stays in the
    /// socket, where TCP's flow control holds it back.
    pub(crate) fn poll_watch(&mut self, cx: &mut Context<'_>) -> Poll<Watched> {
        if !self.early.is_empty() {
            return Poll::Ready(Watched::Sent);
        }
        let read = match &mut self.socket {
            Socket::Plain(tcp) => {
                let mut probe = [0u8; 1];
                ready!(tcp.poll_peek(cx, &mut ReadBuf::new(&mut probe)))
            }
            Socket::Tls(tls) => {
                if self.early.capacity() < 1024 {
                    self.early.reserve(4096);
                }
                ready!(pin!(tls.read_buf(&mut self.early)).poll(cx))
            }
        };
        match read {
            Ok(0) | Err(_) => Poll::Ready(Watched::Left),
            Ok(_) => Poll::Ready(Watched::Sent),
        }
    }

    /// Writes all of `bytes` to the client; over TLS, to the socket and not
    /// only into rustls.
    pub(crate) async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.socket.write_all(bytes).await?;
        if let Socket::Tls(tls) = &mut self.socket {
            tls.flush().await?;
        }
        Ok(())
    }

    /// Writes some of `bytes` (serin's own HTTP/2 loop, which batches its
    /// frames and flushes once per batch).
    pub(crate) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write(cx, bytes)
    }

    /// Over TLS, pushes rustls's records to the socket; a no-op on plain TCP.
    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    /// Ends the connection from serin's side (over TLS, with a
    /// `close_notify` first).
    pub(crate) async fn shutdown(&mut self) -> io::Result<()> {
        self.socket.shutdown().await
    }

    /// Bytes already read for the loop and not yet handed to it: they go to
    /// hyper, after the loop's own, when hyper takes the connection over.
    pub(crate) fn take_early(&mut self) -> BytesMut {
        std::mem::take(&mut self.early)
    }

    /// The socket, for hyper, once nothing read is left here.
    pub(crate) fn into_socket(self) -> ClientSocket {
        debug_assert!(self.early.is_empty(), "bytes read and never served");
        self.socket
    }
}
