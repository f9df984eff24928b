//! Writing a request to an upstream: the encoded head, then the body.
//!
//! What the body has ready is gathered into one write. A response may
//! arrive while the body is still being sent (an early 413, say): the caller
//! polls the response side alongside, and the upload simply stops.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http_body::Body;
use tokio::io::AsyncWrite;

use super::socket::UpstreamIo;
use super::RequestBody;
use crate::http1::chunked::{encode_chunk, encode_last_chunk};

/// Request body bytes gathered before they are written.
const WRITE_BATCH: usize = 64 * 1024;

/// How the request body is framed for the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RequestFraming {
    /// No body.
    None,
    /// The client's `Content-Length`, forwarded among the fields, stands.
    Length,
    /// Length unknown (a chunked HTTP/1.1 upload, or HTTP/2 without
    /// `content-length`): chunked, and the adapter adds
    /// `transfer-encoding: chunked` to the head.
    Chunked,
}

pub(crate) enum UploadError {
    Io(io::Error),
    Client(crate::client_body::ClientBodyError),
}

/// Writes the encoded head and then the request body.
pub(crate) struct Upload {
    body: RequestBody,
    framing: RequestFraming,
    /// Bytes of the write buffer already written.
    written: usize,
    /// The body has ended (its last bytes may still be in the buffer).
    finished: bool,
    /// Everything is written.
    pub(crate) done: bool,
}

impl Upload {
    pub(crate) fn new(body: RequestBody, framing: RequestFraming) -> Self {
        Self {
            body,
            framing,
            written: 0,
            finished: framing == RequestFraming::None,
            done: false,
        }
    }

    /// The body has ended: a chunked body gets its last chunk. Request
    /// trailers are not forwarded: HTTP/1.1 upstreams rarely accept them.
    fn finish(&mut self, out: &mut Vec<u8>) {
        self.finished = true;
        if self.framing == RequestFraming::Chunked {
            encode_last_chunk(out, None);
        }
    }

    /// Writes what is in `out`, then what the body has ready, until the
    /// body waits or everything is written.
    pub(crate) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut UpstreamIo,
        out: &mut Vec<u8>,
    ) -> Poll<Result<(), UploadError>> {
        loop {
            let mut body_pending = false;
            while !self.finished && out.len() < WRITE_BATCH {
                match Pin::new(&mut self.body).poll_frame(cx) {
                    Poll::Pending => {
                        body_pending = true;
                        break;
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(UploadError::Client(e))),
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            if self.framing == RequestFraming::Chunked {
                                encode_chunk(out, &data);
                            } else {
                                out.extend_from_slice(&data);
                            }
                        }
                    }
                    Poll::Ready(None) => self.finish(out),
                }
                if !self.finished && self.body.is_end_stream() {
                    self.finish(out);
                }
            }
            while self.written < out.len() {
                match ready!(Pin::new(&mut *io).poll_write(cx, &out[self.written..])) {
                    Ok(0) => {
                        return Poll::Ready(Err(UploadError::Io(io::ErrorKind::WriteZero.into())))
                    }
                    Ok(n) => self.written += n,
                    Err(e) => return Poll::Ready(Err(UploadError::Io(e))),
                }
            }
            out.clear();
            self.written = 0;
            // Over TLS, rustls may still hold records the socket would not
            // take: push them out before waiting on the body or the answer
            // (a no-op on plain TCP).
            if let Err(e) = ready!(Pin::new(&mut *io).poll_flush(cx)) {
                return Poll::Ready(Err(UploadError::Io(e)));
            }
            if self.finished {
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            if body_pending {
                // The body's waker is registered: it wakes this task.
                return Poll::Pending;
            }
        }
    }
}
