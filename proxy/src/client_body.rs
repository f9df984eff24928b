//! A client's request body, whichever adapter read it: hyper (HTTP/1.1
//! uploads) or serin's own HTTP/2 loop ([`crate::server::own_h2`]).
//!
//! The request path ([`crate::server::hyper::answer`], the upstream's
//! upload) takes one body type, [`ClientBody`]. An HTTP/2 stream's body is
//! an [`Inbox`] its connection fills with DATA frames; the body hands the
//! connection its flow-control credit back as the upstream consumes the
//! bytes, so a slow upstream slows the client down instead of filling
//! serin's memory.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// A client's request body.
pub enum ClientBody {
    /// Read by hyper.
    Hyper(Incoming),
    /// Read by serin's own HTTP/2 loop.
    Http2(StreamBody),
}

/// Why a client's request body broke off.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    /// As hyper reports it.
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    /// The client reset the HTTP/2 stream, broke its rules, or closed the
    /// connection before the body's end.
    #[error("the client reset the HTTP/2 stream before the body's end")]
    Reset,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        match self.get_mut() {
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(ClientBodyError::from),
            ClientBody::Http2(b) => b.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(b) => b.is_end_stream(),
            ClientBody::Http2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(b) => b.size_hint(),
            ClientBody::Http2(b) => b.size_hint(),
        }
    }
}

/// One HTTP/2 stream's request body: what its connection has received
/// and the body has not yet handed on.
pub struct StreamBody {
    /// `None` for a request that ended with its head.
    inbox: Option<Rc<RefCell<Inbox>>>,
    stream: u32,
    credit: Rc<Credit>,
    /// The request's `content-length`, if it sent one.
    length: Option<u64>,
}

/// What the connection has received for a stream and the body has not yet
/// taken: filled by the connection, drained by the body.
#[derive(Default)]
pub(crate) struct Inbox {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    /// The body's last frame has arrived (`Ok`), or the stream was reset
    /// (`Err`).
    end: Option<Result<(), ()>>,
    waker: Option<Waker>,
    /// The body was dropped: what still arrives is released at once.
    dropped: bool,
}

impl Inbox {
    /// A DATA frame's bytes; `false` when the body is gone and the bytes
    /// must be released by the caller.
    pub(crate) fn push(&mut self, data: Bytes) -> bool {
        if self.dropped {
            return false;
        }
        self.chunks.push_back(data);
        self.wake();
        true
    }

    /// The body ended, with these trailers.
    pub(crate) fn end(&mut self, trailers: Option<HeaderMap>) {
        self.trailers = trailers;
        self.end = Some(Ok(()));
        self.wake();
    }

    /// The stream was reset or the connection lost.
    pub(crate) fn reset(&mut self) {
        if self.end.is_none() {
            self.end = Some(Err(()));
            self.wake();
        }
    }

    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// Flow-control credit the bodies of one connection hand back: the
/// connection turns it into WINDOW_UPDATE frames. A body may be read by
/// another task (an h2c upstream's), so handing credit back wakes the
/// connection.
#[derive(Default)]
pub(crate) struct Credit {
    /// `(stream, bytes)`; stream 0: bytes for the connection's window only.
    released: RefCell<Vec<(u32, u32)>>,
    waker: RefCell<Option<Waker>>,
}

impl Credit {
    fn release(&self, stream: u32, bytes: usize) {
        let mut released = self.released.borrow_mut();
        let was_empty = released.is_empty();
        released.push((stream, bytes as u32));
        drop(released);
        if was_empty {
            if let Some(waker) = self.waker.borrow().as_ref() {
                waker.wake_by_ref();
            }
        }
    }

    /// Takes what was released since the last call into `into`, and
    /// remembers `waker` to wake when more is.
    pub(crate) fn take(&self, waker: &Waker, into: &mut Vec<(u32, u32)>) {
        let mut current = self.waker.borrow_mut();
        if !current.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *current = Some(waker.clone());
        }
        into.append(&mut self.released.borrow_mut());
    }
}

impl StreamBody {
    /// The body of a request that ended with its head.
    pub(crate) fn empty(stream: u32, credit: Rc<Credit>) -> Self {
        Self {
            inbox: None,
            stream,
            credit,
            length: Some(0),
        }
    }

    /// A body the connection will fill through `inbox`.
    pub(crate) fn streamed(
        inbox: Rc<RefCell<Inbox>>,
        stream: u32,
        credit: Rc<Credit>,
        length: Option<u64>,
    ) -> Self {
        Self {
            inbox: Some(inbox),
            stream,
            credit,
            length,
        }
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let Some(inbox) = &self.inbox else {
            return Poll::Ready(None);
        };
        let mut inbox = inbox.borrow_mut();
        if let Some(data) = inbox.chunks.pop_front() {
            self.credit.release(self.stream, data.len());
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        match inbox.end {
            Some(Ok(())) => Poll::Ready(inbox.trailers.take().map(|t| Ok(Frame::trailers(t)))),
            Some(Err(())) => Poll::Ready(Some(Err(ClientBodyError::Reset))),
            None => {
                if !inbox
                    .waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    inbox.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inbox.as_ref().is_none_or(|inbox| {
            let inbox = inbox.borrow();
            inbox.chunks.is_empty() && inbox.end == Some(Ok(())) && inbox.trailers.is_none()
        })
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(length) => SizeHint::with_exact(length),
            None => SizeHint::default(),
        }
    }
}

impl Drop for StreamBody {
    /// What the body never took is released: the connection's window must
    /// not shrink for a body nobody reads.
    fn drop(&mut self) {
        if let Some(inbox) = &self.inbox {
            let mut inbox = inbox.borrow_mut();
            inbox.dropped = true;
            let unread: usize = inbox.chunks.drain(..).map(|c| c.len()).sum();
            if unread > 0 {
                // To the stream's window too, while the client may still
                // send on it (the connection checks).
                self.credit.release(self.stream, unread);
            }
        }
    }
}
