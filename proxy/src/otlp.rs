//! Trace export: the data plane's spans, sent to an OpenTelemetry collector
//! over OTLP/HTTP (protobuf), from one thread of its own.
//!
//! A worker encodes each request's span into a batch buffer it owns
//! ([`encode_span`], no allocation), and hands a full batch over with
//! [`Exporter::try_send`], which never blocks: when the queue is full the
//! batch comes back and its spans are counted as dropped. The `serin-otlp`
//! thread wraps what is queued in one `ExportTraceServiceRequest` and POSTs
//! it; emptied buffers come back through [`Exporter::recycled`], so the
//! steady state allocates nothing.
//!
//! What it must never do: slow the request path. A collector that is down,
//! slow or answering errors costs spans, never waiting: the batch is dropped
//! and counted, the thread backs off (at most [`MAX_BACKOFF`]) while it keeps
//! emptying the queue by dropping, so memory stays bounded, and it warns at
//! most once per [`MAX_BACKOFF`] with what to check.
//!
//! The messages are encoded by hand ([`encode`]) and sent by a small blocking
//! client ([`client`]): the generated OTLP crates bring gRPC and an HTTP
//! client stack, more to build than the whole data plane.

mod client;
mod encode;
#[cfg(test)]
mod tests;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::defaults;
use client::{Client, Endpoint, ExportError};
use encode::Envelope;

pub(crate) use encode::{encode_span, SpanFields};

/// The longest pause after failed exports, and the shortest time between
/// two warnings about them.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The pause after the first failed export; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Where and how spans are exported.
#[derive(Clone, Debug)]
pub(crate) struct OtlpConfig {
    /// The collector's OTLP/HTTP traces URL, `http://` only (default
    /// [`defaults::OTLP_ENDPOINT`], the collector's own default).
    pub(crate) endpoint: String,
    /// The resource's `service.name` (default [`defaults::OTLP_SERVICE_NAME`]).
    pub(crate) service_name: String,
    /// Bounds one export, connect to answer, and shutdown's final export
    /// (default [`defaults::OTLP_TIMEOUT`]).
    pub(crate) timeout: Duration,
    /// Batches waiting for the thread before [`Exporter::try_send`] refuses
    /// more (default [`defaults::OTLP_MAX_QUEUED_BATCHES`]).
    pub(crate) max_queued_batches: usize,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: defaults::OTLP_ENDPOINT.to_string(),
            service_name: defaults::OTLP_SERVICE_NAME.to_string(),
            timeout: defaults::OTLP_TIMEOUT,
            max_queued_batches: defaults::OTLP_MAX_QUEUED_BATCHES,
        }
    }
}

/// What the exporter has done, for metrics. Each only grows.
#[derive(Debug, Default)]
pub struct ExportCounters {
    /// Spans the collector accepted (a 2xx answer).
    pub spans_exported: AtomicU64,
    /// Spans lost: refused by a full queue, dropped while backing off, or in
    /// a failed export.
    pub spans_dropped: AtomicU64,
    /// Export requests that failed (no connection, no answer in time, or
    /// not a 2xx).
    pub export_failures: AtomicU64,
}

/// A batch of encoded spans on its way to the thread.
struct Batch {
    bytes: Vec<u8>,
    spans: u32,
}

// === impl Exporter ===

/// The handle on the `serin-otlp` thread. Shared by every worker (`Sync`);
/// dropping it ends the thread after a final export of what is queued.
pub(crate) struct Exporter {
    queue: Option<SyncSender<Batch>>,
    /// Emptied buffers; `try_lock`ed, so a worker never waits on another.
    recycled: Mutex<Receiver<Vec<u8>>>,
    counters: Arc<ExportCounters>,
    timeout: Duration,
}

impl Exporter {
    /// Checks `config` and starts the thread. An `https://` endpoint, a URL
    /// that is not `http://`, a zero timeout or queue are refused with an
    /// [`io::ErrorKind::InvalidInput`] error that says what to write.
    pub(crate) fn start(config: &OtlpConfig) -> io::Result<Exporter> {
        let endpoint = Endpoint::parse(&config.endpoint)?;
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
        if config.timeout.is_zero() {
            return Err(invalid(format!(
                "the OTLP export timeout must be more than 0; the default is {:?}",
                defaults::OTLP_TIMEOUT
            )));
        }
        if config.max_queued_batches == 0 {
            return Err(invalid(format!(
                "the OTLP export queue must hold at least 1 batch; the default is {}",
                defaults::OTLP_MAX_QUEUED_BATCHES
            )));
        }
        let (queue, batches) = mpsc::sync_channel(config.max_queued_batches);
        let (recycle, recycled) = mpsc::sync_channel(config.max_queued_batches);
        let counters = Arc::new(ExportCounters::default());
        let thread = ExportThread {
            batches,
            recycle,
            counters: counters.clone(),
            client: Client::new(endpoint, config.timeout),
            envelope: Envelope::new(&config.service_name),
            max_merged: config.max_queued_batches,
            backoff: Backoff::default(),
        };
        std::thread::Builder::new()
            .name("serin-otlp".to_string())
            .spawn(move || thread.run())?;
        Ok(Exporter {
            queue: Some(queue),
            recycled: Mutex::new(recycled),
            counters,
            timeout: config.timeout,
        })
    }

    /// Queues a batch of `spans` encoded spans ([`encode_span`]'s output,
    /// concatenated). Never blocks: when the queue is full (or the thread is
    /// gone) the buffer comes back, and its spans are counted as dropped.
    pub(crate) fn try_send(&self, batch: Vec<u8>, spans: u32) -> Result<(), Vec<u8>> {
        let queue = self
            .queue
            .as_ref()
            .expect("open until the exporter is dropped");
        match queue.try_send(Batch {
            bytes: batch,
            spans,
        }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(batch) | TrySendError::Disconnected(batch)) => {
                self.counters
                    .spans_dropped
                    .fetch_add(u64::from(batch.spans), Relaxed);
                Err(batch.bytes)
            }
        }
    }

    /// An emptied buffer that was sent before, with its capacity, if one is
    /// back (never waits; `None` when another worker is taking one).
    pub(crate) fn recycled(&self) -> Option<Vec<u8>> {
        self.recycled.try_lock().ok()?.try_recv().ok()
    }

    /// The counters, for metrics.
    pub(crate) fn counters(&self) -> &Arc<ExportCounters> {
        &self.counters
    }
}

impl Drop for Exporter {
    /// Closes the queue and waits, at most the timeout, for the thread to
    /// export what was queued and end (it ends on its own after that).
    fn drop(&mut self) {
        self.queue = None;
        let recycled = self
            .recycled
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let deadline = Instant::now() + self.timeout;
        // The thread's end closes the recycle channel; buffers still on
        // their way back are freed.
        while recycled
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
        {}
    }
}

// === impl ExportThread ===

/// The `serin-otlp` thread's state.
struct ExportThread {
    batches: Receiver<Batch>,
    recycle: SyncSender<Vec<u8>>,
    counters: Arc<ExportCounters>,
    client: Client,
    envelope: Envelope,
    /// The most batches merged into one request.
    max_merged: usize,
    backoff: Backoff,
}

impl ExportThread {
    /// Exports until every sender is gone and the queue is empty.
    fn run(mut self) {
        let mut pending = Vec::with_capacity(self.max_merged);
        while let Ok(first) = self.batches.recv() {
            pending.push(first);
            while pending.len() < self.max_merged {
                match self.batches.try_recv() {
                    Ok(batch) => pending.push(batch),
                    Err(_) => break,
                }
            }
            self.export(&pending);
            for batch in pending.drain(..) {
                let mut bytes = batch.bytes;
                bytes.clear();
                // A full return channel: workers have enough; this one goes.
                let _ = self.recycle.try_send(bytes);
            }
        }
    }

    /// Sends `batches` as one request, or drops them while backing off.
    fn export(&mut self, batches: &[Batch]) {
        let spans: u64 = batches.iter().map(|b| u64::from(b.spans)).sum();
        let now = Instant::now();
        if self.backoff.waiting(now) {
            self.dropped(spans);
            return;
        }
        let spans_len = batches.iter().map(|b| b.bytes.len()).sum();
        let envelope = &self.envelope;
        let result = self.client.post(envelope.request_len(spans_len), |body| {
            envelope.write_head(body, spans_len);
            for batch in batches {
                body.extend_from_slice(&batch.bytes);
            }
        });
        match result {
            Ok(()) => {
                self.counters.spans_exported.fetch_add(spans, Relaxed);
                if let Some(dropped) = self.backoff.succeeded() {
                    tracing::info!(
                        endpoint = %self.client.endpoint(),
                        "OTLP export to {} works again ({dropped} spans were dropped)",
                        self.client.endpoint()
                    );
                }
            }
            Err(error) => {
                self.counters.export_failures.fetch_add(1, Relaxed);
                self.dropped(spans);
                self.failed(&error, Instant::now());
            }
        }
    }

    fn dropped(&mut self, spans: u64) {
        self.counters.spans_dropped.fetch_add(spans, Relaxed);
        self.backoff.dropped += spans;
    }

    fn failed(&mut self, error: &ExportError, now: Instant) {
        if let Some(dropped) = self.backoff.failed(now) {
            tracing::warn!(
                endpoint = %self.client.endpoint(),
                %error,
                "OTLP export to {}: {error}; spans are being dropped ({dropped} so far)",
                self.client.endpoint()
            );
        }
    }
}

// === impl Backoff ===

/// When to try the collector again after failed exports, and when to warn.
/// Time is passed in, so it is tested without waiting.
#[derive(Debug, Default)]
struct Backoff {
    /// The current pause; zero while exports succeed.
    delay: Duration,
    /// No export before this.
    until: Option<Instant>,
    last_warning: Option<Instant>,
    /// Spans dropped since exports last succeeded.
    dropped: u64,
}

impl Backoff {
    fn waiting(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }

    /// An export failed at `now`: pause longer. Returns the spans dropped so
    /// far when it is time to warn (the first failure, then at most once per
    /// [`MAX_BACKOFF`]).
    fn failed(&mut self, now: Instant) -> Option<u64> {
        self.delay = (self.delay * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
        self.until = Some(now + self.delay);
        let warn = self
            .last_warning
            .is_none_or(|at| now.duration_since(at) >= MAX_BACKOFF);
        warn.then(|| {
            self.last_warning = Some(now);
            self.dropped
        })
    }

    /// An export succeeded. Returns the spans dropped meanwhile if exports
    /// had been failing. The time of the last warning stays: a collector
    /// that comes and goes still gets one warning per [`MAX_BACKOFF`].
    fn succeeded(&mut self) -> Option<u64> {
        let was_failing = self.until.take().is_some();
        self.delay = Duration::ZERO;
        was_failing.then(|| std::mem::take(&mut self.dropped))
    }
}
