//! One server span per sampled request, for the OTLP exporter
//! ([`crate::otlp`]), collected on the worker without waiting for anything.
//!
//! What a span needs of its request (method, host, target, request id, the
//! trace's ids, the wall-clock start) is copied into a [`SpanStart`] when
//! the request is admitted, because a response body can outlive the
//! request head it came from. When the outcome settles, the span is encoded
//! straight into the worker's batch ([`crate::otlp::encode_span`]). A batch
//! goes to the exporter's thread every [`crate::access_log::FLUSH_INTERVAL`]
//! or at [`FLUSH_BYTES`]; when its queue is full the batch is dropped (the
//! exporter counts the spans), never waited for. `SpanStart`s and batches
//! are reused, so a steady state allocates nothing.

use std::cell::{Cell, RefCell};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{StatusCode, Version};

use crate::access_log::{redact_target, QueryPolicy};
use crate::otlp::{encode_span, Exporter, SpanFields};
use crate::outcome::{OutcomeClass, RequestFacts, Settled, CLIENT_CLOSED};
use crate::trace::{SpanIds, TraceContext};

/// A worker hands its batch over once it holds this many bytes.
const FLUSH_BYTES: usize = 64 * 1024;
/// `SpanStart`s a worker keeps for reuse.
const SPARE_STARTS: usize = 256;

/// What a span keeps of its request from admission to the end.
pub(crate) struct SpanStart {
    /// method, host, target and request id, one after the other.
    text: Vec<u8>,
    /// Where each of them ends in `text`.
    ends: [usize; 4],
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    start_unix_nanos: u64,
    tls: bool,
    client: IpAddr,
    version: Version,
}

/// One worker's spans: its batch, its spare starts, the exporter.
pub(crate) struct WorkerSpans {
    exporter: Arc<Exporter>,
    /// What of a request's query its span keeps (`[trace] query`).
    query: QueryPolicy,
    batch: RefCell<Vec<u8>>,
    spans: Cell<u32>,
    /// Boxes, not values: a request carries its start boxed (it would
    /// otherwise grow every request's future), and reusing the box is the
    /// point.
    #[allow(clippy::vec_box)]
    spare: RefCell<Vec<Box<SpanStart>>>,
}

impl WorkerSpans {
    pub(crate) fn new(exporter: Arc<Exporter>, query: QueryPolicy) -> Self {
        Self {
            exporter,
            query,
            batch: RefCell::new(Vec::with_capacity(FLUSH_BYTES + 4096)),
            spans: Cell::new(0),
            spare: RefCell::new(Vec::new()),
        }
    }

    /// Starts the span of an admitted request, if its trace is sampled and
    /// serin made a span for it.
    pub(crate) fn begin(
        &self,
        facts: &RequestFacts<'_>,
        trace: &TraceContext,
    ) -> Option<Box<SpanStart>> {
        if !trace.sampled() {
            return None;
        }
        let SpanIds {
            trace_id,
            span_id,
            parent,
        } = trace.span_ids()?;
        let mut start = self.spare.borrow_mut().pop().unwrap_or_else(|| {
            Box::new(SpanStart {
                text: Vec::new(),
                ends: [0; 4],
                trace_id,
                span_id,
                parent,
                start_unix_nanos: 0,
                tls: false,
                client: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                version: Version::HTTP_11,
            })
        });
        start.text.clear();
        start.text.extend_from_slice(facts.method);
        start.ends[0] = start.text.len();
        start.text.extend_from_slice(facts.authority);
        start.ends[1] = start.text.len();
        redact_target(facts.target, &self.query, |piece| {
            start.text.extend_from_slice(piece)
        });
        start.ends[2] = start.text.len();
        start.text.extend_from_slice(facts.request_id);
        start.ends[3] = start.text.len();
        start.trace_id = trace_id;
        start.span_id = span_id;
        start.parent = parent;
        start.start_unix_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        start.tls = facts.tls;
        start.client = std::str::from_utf8(facts.client)
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        start.version = facts.version;
        Some(start)
    }

    /// Ends the span with its request's outcome and adds it to the batch.
    pub(crate) fn finish(&self, start: Box<SpanStart>, settled: &Settled) {
        let text = &start.text;
        let [method, host, target, id] = start.ends;
        let target = &text[host..target];
        let (path, query) = match target.iter().position(|&b| b == b'?') {
            Some(at) => (&target[..at], Some(&target[at + 1..])),
            None => (target, None),
        };
        let fields = SpanFields {
            trace_id: start.trace_id,
            span_id: start.span_id,
            parent_span_id: start.parent,
            start_unix_nanos: start.start_unix_nanos,
            end_unix_nanos: start.start_unix_nanos + settled.total_time.as_nanos() as u64,
            method: &text[..method],
            tls: start.tls,
            host: &text[method..host],
            path,
            query,
            client_address: start.client,
            version: start.version,
            status: (settled.status != CLIENT_CLOSED)
                .then(|| StatusCode::from_u16(settled.status).ok())
                .flatten(),
            error: settled.status >= 500 || settled.class == OutcomeClass::Error,
            upstream: settled.upstream,
            outcome: settled.class,
            request_id: &text[start.ends[2]..id],
        };
        let mut batch = self.batch.borrow_mut();
        encode_span(&mut batch, &fields);
        self.spans.set(self.spans.get() + 1);
        if batch.len() >= FLUSH_BYTES {
            self.hand_over(&mut batch);
        }
        drop(batch);
        let mut spare = self.spare.borrow_mut();
        if spare.len() < SPARE_STARTS && start.text.capacity() <= 4096 {
            spare.push(start);
        }
    }

    /// Hands the batch to the exporter now, if it has anything.
    pub(crate) fn flush(&self) {
        let mut batch = self.batch.borrow_mut();
        if !batch.is_empty() {
            self.hand_over(&mut batch);
        }
    }

    fn hand_over(&self, batch: &mut Vec<u8>) {
        let full = std::mem::take(batch);
        let spans = self.spans.replace(0);
        *batch = match self.exporter.try_send(full, spans) {
            Ok(()) => self
                .exporter
                .recycled()
                .unwrap_or_else(|| Vec::with_capacity(FLUSH_BYTES + 4096)),
            // The queue is full: the exporter has counted these spans as
            // dropped, and the buffer is used again.
            Err(mut back) => {
                back.clear();
                back
            }
        };
    }
}

impl Drop for WorkerSpans {
    /// A stopping worker's last spans (its requests' records, which held
    /// the worker, have all settled by now); the exporter counts them as
    /// dropped if its queue is full.
    fn drop(&mut self) {
        self.flush();
    }
}
