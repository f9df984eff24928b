//! The socket under one upstream connection: plain TCP (`http://`), or TLS
//! over TCP (`https://`) as rustls's client ([`crate::socket`]), and what
//! the pool asks of an idle one.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::socket::Socket;

/// An upstream connection's socket.
pub(crate) type UpstreamIo = Socket<TlsStream<TcpStream>>;

impl UpstreamIo {
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
            Socket::Plain(tcp) => !matches!(
                tcp.try_read(&mut byte),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            ),
            Socket::Tls(tls) => {
                let mut read = ReadBuf::new(&mut byte);
                !Pin::new(&mut **tls)
                    .poll_read(&mut cx, &mut read)
                    .is_pending()
            }
        }
    }
}
