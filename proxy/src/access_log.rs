//! The access log: one line per request, written without ever making a
//! request wait for it.
//!
//! An on-call engineer's first question of a proxy is which requests
//! failed, on which upstream, and why; nginx's `access_log` and Envoy's
//! access logs answer it. serin's line is rendered in two halves:
//! - when a request is admitted, what is known of it then (time, request
//!   and trace ids, client, method, authority, path, protocol) goes into a
//!   line buffer taken from the worker's free list ([`WorkerLog::begin`]);
//! - when its outcome is settled ([`crate::outcome::OutcomeRecord`]'s drop,
//!   or a refusal; both through [`crate::worker::Worker::settle`]), the rest (upstream, status, outcome class, bytes, times)
//!   is appended and the line is copied into the worker's batch
//!   ([`WorkerLog::finish`]).
//!
//! A worker hands a batch to the one writer thread when it passes
//! [`FLUSH_BYTES`], and at least every [`FLUSH_INTERVAL`]. The hand-over is
//! a `try_send` on a bounded channel: when the writer is behind (a slow
//! disk, a pipe nobody reads), the worker keeps filling its batch up to
//! [`MAX_BATCH_BYTES`] and then drops lines, counting them. Nothing on the
//! request path blocks, locks, or allocates in steady state (line buffers
//! and batches are reused).
//!
//! A file sink is reopened when the path stops naming the open file, so
//! logrotate's default rename-and-create works without a signal.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::{self, Write as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Version;

use crate::outcome::{OutcomeClass, RequestFacts, Settled};
use crate::split::FastRng;
use crate::wallclock;

/// A worker hands its batch over once it holds this many bytes.
const FLUSH_BYTES: usize = 32 * 1024;
/// A worker's batch never grows past this: lines beyond it are dropped.
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// A batch that is not full is handed over at least this often.
pub(crate) const FLUSH_INTERVAL: Duration = Duration::from_millis(500);
/// Batches queued for the writer, for all workers together.
const QUEUED_BATCHES: usize = 16;
/// Line buffers a worker keeps for reuse (requests in flight beyond this
/// allocate their own).
const SPARE_LINES: usize = 256;
/// How long a stopping worker waits for the writer to take its last batch.
const FINAL_FLUSH: Duration = Duration::from_secs(2);
/// How long `Proxy::wait` waits for the writer to write what it was given.
pub(crate) const WRITER_EXIT: Duration = Duration::from_secs(5);
/// How often the writer checks whether its file was rotated.
const REOPEN_CHECK: Duration = Duration::from_secs(1);

/// Where the lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogSink {
    /// serin's standard output (its own logs go to standard error).
    Stdout,
    /// A file, appended to and created if missing.
    File(PathBuf),
}

/// How each line is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineFormat {
    /// One JSON object per line.
    Json,
    /// logfmt: `key=value` pairs, values quoted when they need it.
    Text,
}

/// What of a request's query string the log keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueryPolicy {
    /// The whole query, as sent.
    Keep,
    /// No query: the path only.
    Drop,
    /// Each value replaced by `REDACTED`, for every parameter (empty list)
    /// or only the parameters named.
    Redact(Vec<String>),
}

/// The access log's settings (`[access_log]`).
#[derive(Clone, Debug)]
pub struct AccessLogConfig {
    /// Where the lines go.
    pub sink: LogSink,
    /// JSON or text.
    pub format: LineFormat,
    /// The share of requests that were not errors that is logged (0 to 1).
    /// Errors are always logged.
    pub sample: f64,
    /// Log errors only (5xx answers, and requests the judge counted as
    /// errors or that fell back to stable).
    pub errors_only: bool,
    /// What of the query is kept.
    pub query: QueryPolicy,
}

/// Why the access log could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the access log {path}: {source} (check [access_log] path and the directory's permissions)")]
pub struct AccessLogError {
    path: PathBuf,
    source: io::Error,
}

/// The access log's counters, read by the metrics.
#[derive(Debug, Default)]
pub struct AccessLogCounters {
    /// Lines written to the sink.
    pub written: AtomicU64,
    /// Lines dropped: the writer was behind, or the sink failed.
    pub dropped: AtomicU64,
}

/// What every worker shares: the channel to the writer, spare batches, the
/// counters and the settings.
pub(crate) struct AccessLog {
    config: AccessLogConfig,
    batches: SyncSender<Batch>,
    spare_batches: Mutex<Vec<Vec<u8>>>,
    pub(crate) counters: Arc<AccessLogCounters>,
}

struct Batch {
    bytes: Vec<u8>,
    lines: u64,
}

impl AccessLog {
    /// Opens the sink and starts the writer thread. The thread ends, after
    /// writing what it was sent, once every worker has dropped the log.
    pub(crate) fn start(
        config: AccessLogConfig,
    ) -> Result<(Arc<AccessLog>, JoinHandle<()>), AccessLogError> {
        let sink = Sink::open(&config.sink)?;
        let (batches, received) = mpsc::sync_channel(QUEUED_BATCHES);
        let log = Arc::new(AccessLog {
            config,
            batches,
            spare_batches: Mutex::new(Vec::new()),
            counters: Arc::default(),
        });
        let writer = Writer {
            sink,
            torn: false,
            counters: log.counters.clone(),
            last_warning: None,
        };
        let spares = Arc::downgrade(&log);
        let handle = std::thread::Builder::new()
            .name("serin-access-log".into())
            .spawn(move || writer.run(received, spares))
            .map_err(|source| AccessLogError {
                path: "(writer thread)".into(),
                source,
            })?;
        Ok((log, handle))
    }
}

// === the writer thread ===

enum Sink {
    Stdout(io::Stdout),
    File {
        path: PathBuf,
        file: File,
        checked: std::time::Instant,
    },
}

impl Sink {
    fn open(sink: &LogSink) -> Result<Sink, AccessLogError> {
        Ok(match sink {
            LogSink::Stdout => Sink::Stdout(io::stdout()),
            LogSink::File(path) => Sink::File {
                file: open_append(path).map_err(|source| AccessLogError {
                    path: path.clone(),
                    source,
                })?,
                path: path.clone(),
                checked: std::time::Instant::now(),
            },
        })
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stdout(out) => {
                let mut out = out.lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Sink::File {
                path,
                file,
                checked,
            } => {
                if checked.elapsed() >= REOPEN_CHECK {
                    *checked = std::time::Instant::now();
                    if rotated(path, file) {
                        *file = open_append(path)?;
                    }
                }
                file.write_all(bytes)
            }
        }
    }
}

fn open_append(path: &PathBuf) -> io::Result<File> {
    File::options().create(true).append(true).open(path)
}

/// The path no longer names the open file (renamed or removed by logrotate).
fn rotated(path: &PathBuf, file: &File) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(path), file.metadata()) {
        (Ok(now), Ok(open)) => now.ino() != open.ino() || now.dev() != open.dev(),
        (Err(_), _) => true,
        (_, Err(_)) => false,
    }
}

struct Writer {
    sink: Sink,
    /// A write failed part-way: the next batch starts on a new line.
    torn: bool,
    counters: Arc<AccessLogCounters>,
    last_warning: Option<std::time::Instant>,
}

impl Writer {
    fn run(mut self, batches: Receiver<Batch>, log: std::sync::Weak<AccessLog>) {
        while let Ok(mut batch) = batches.recv() {
            if self.torn && self.sink.write(b"\n").is_ok() {
                self.torn = false;
            }
            match self.sink.write(&batch.bytes) {
                Ok(()) => self
                    .counters
                    .written
                    .fetch_add(batch.lines, Ordering::Relaxed),
                Err(e) => {
                    self.torn = true;
                    self.warn(&e);
                    self.counters
                        .dropped
                        .fetch_add(batch.lines, Ordering::Relaxed)
                }
            };
            batch.bytes.clear();
            if let Some(log) = log.upgrade() {
                let mut spares = log.spare_batches.lock().unwrap_or_else(|e| e.into_inner());
                if spares.len() < QUEUED_BATCHES {
                    spares.push(batch.bytes);
                }
            }
        }
    }

    /// Warns about a failing sink at most once a minute.
    fn warn(&mut self, error: &io::Error) {
        let due = self
            .last_warning
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(60));
        if due {
            self.last_warning = Some(std::time::Instant::now());
            let sink = match &self.sink {
                Sink::Stdout(_) => "standard output".to_owned(),
                Sink::File { path, .. } => path.display().to_string(),
            };
            tracing::warn!(%sink, error = %error, "cannot write the access log; lines are being dropped (serin_access_log_dropped_lines_total counts them)");
        }
    }
}

// === one worker's side ===

/// One worker's access log: its batch, its spare line buffers, its clock
/// cache. Lives on the worker's thread only.
pub(crate) struct WorkerLog {
    shared: Arc<AccessLog>,
    batch: RefCell<Vec<u8>>,
    batch_lines: Cell<u64>,
    spare_lines: RefCell<Vec<Vec<u8>>>,
    /// The last second rendered, and its `YYYY-MM-DDTHH:MM:SS`.
    stamp: Cell<(u64, [u8; 19])>,
    rng: FastRng,
}

impl WorkerLog {
    pub(crate) fn new(shared: Arc<AccessLog>, salt: u64) -> Self {
        Self {
            shared,
            batch: RefCell::new(Vec::with_capacity(FLUSH_BYTES + 1024)),
            batch_lines: Cell::new(0),
            spare_lines: RefCell::new(Vec::new()),
            stamp: Cell::new((u64::MAX, [0; 19])),
            rng: FastRng::from_entropy(salt),
        }
    }

    /// Renders what is known of an admitted request into a line buffer,
    /// which [`WorkerLog::finish`] completes.
    pub(crate) fn begin(&self, facts: &RequestFacts<'_>) -> Vec<u8> {
        let mut line = self.spare_lines.borrow_mut().pop().unwrap_or_default();
        let config = &self.shared.config;
        let mut out = Fields::new(&mut line, config.format);
        out.raw("time", &self.timestamp());
        out.str("request_id", facts.request_id);
        out.opt_str("trace_id", facts.trace_id);
        out.str("client", facts.client);
        out.str("method", facts.method);
        out.str("authority", facts.authority);
        out.target("path", facts.target, &config.query);
        out.str(
            "protocol",
            match facts.version {
                Version::HTTP_10 => b"HTTP/1.0",
                Version::HTTP_2 => b"HTTP/2",
                _ => b"HTTP/1.1",
            },
        );
        line
    }

    /// Completes a line begun by [`WorkerLog::begin`] and queues it, unless
    /// sampling or `errors_only` leaves it out.
    pub(crate) fn finish(&self, mut line: Vec<u8>, settled: &Settled) {
        if self.keeps(settled) {
            let mut out = Fields::resume(&mut line, self.shared.config.format);
            out.opt_str("upstream", settled.upstream.map(|t| t.as_str().as_bytes()));
            out.number("status", u64::from(settled.status));
            out.str("outcome", settled.class.as_str().as_bytes());
            out.number("bytes_in", settled.bytes_in);
            out.number("bytes_out", settled.bytes_out);
            out.millis("upstream_ms", settled.upstream_time);
            out.millis("total_ms", Some(settled.total_time));
            out.end();
            self.queue(&line);
        }
        line.clear();
        let mut spares = self.spare_lines.borrow_mut();
        if spares.len() < SPARE_LINES && line.capacity() <= 4096 {
            spares.push(line);
        }
    }

    fn keeps(&self, settled: &Settled) -> bool {
        let error = settled.status >= 500
            || matches!(settled.class, OutcomeClass::Error | OutcomeClass::Fallback);
        let config = &self.shared.config;
        if error {
            return true;
        }
        if config.errors_only {
            return false;
        }
        self.rng.chance(config.sample)
    }

    fn queue(&self, line: &[u8]) {
        let mut batch = self.batch.borrow_mut();
        if batch.len() + line.len() > MAX_BATCH_BYTES {
            // Full: the writer may have caught up since the last try.
            self.hand_over(&mut batch);
        }
        if batch.len() + line.len() > MAX_BATCH_BYTES {
            // The writer is behind and this worker's batch is full.
            self.shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        batch.extend_from_slice(line);
        self.batch_lines.set(self.batch_lines.get() + 1);
        if batch.len() >= FLUSH_BYTES {
            self.hand_over(&mut batch);
        }
    }

    /// Hands the batch to the writer now, if it has anything (the worker's
    /// timer calls this every [`FLUSH_INTERVAL`], and its shutdown once more).
    pub(crate) fn flush(&self) {
        let mut batch = self.batch.borrow_mut();
        if !batch.is_empty() {
            self.hand_over(&mut batch);
        }
    }

    /// Hands `batch` to the writer if its queue has room; returns whether
    /// the writer is still there to take it (later).
    fn hand_over(&self, batch: &mut Vec<u8>) -> bool {
        let full = Batch {
            bytes: std::mem::take(batch),
            lines: self.batch_lines.replace(0),
        };
        match self.shared.batches.try_send(full) {
            Ok(()) => {
                *batch = self
                    .shared
                    .spare_batches
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pop()
                    .unwrap_or_else(|| Vec::with_capacity(FLUSH_BYTES + 1024));
                true
            }
            // The writer is behind: keep collecting into the same batch
            // until it reaches its cap.
            Err(TrySendError::Full(back)) => {
                *batch = back.bytes;
                self.batch_lines.set(back.lines);
                true
            }
            Err(TrySendError::Disconnected(back)) => {
                *batch = back.bytes;
                self.batch_lines.set(back.lines);
                false
            }
        }
    }

    /// The worker's last hand-over, when it stops: every line its requests
    /// settled is then in the batch (their records held the worker). The
    /// writer gets [`FINAL_FLUSH`] to make room; what still does not fit is
    /// counted as dropped, so written plus dropped stays every line.
    fn final_flush(&self) {
        let mut batch = self.batch.borrow_mut();
        let deadline = std::time::Instant::now() + FINAL_FLUSH;
        while !batch.is_empty() && std::time::Instant::now() < deadline {
            if !self.hand_over(&mut batch) {
                break;
            }
            if !batch.is_empty() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let lost = self.batch_lines.replace(0);
        self.shared
            .counters
            .dropped
            .fetch_add(lost, Ordering::Relaxed);
    }

    /// `YYYY-MM-DDTHH:MM:SS.mmmZ` for now, the second's part cached.
    fn timestamp(&self) -> [u8; 24] {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let secs = now.as_secs();
        let (cached, mut second) = self.stamp.get();
        if cached != secs {
            second = wallclock::utc_second(secs);
            self.stamp.set((secs, second));
        }
        wallclock::with_millis(second, now.subsec_millis())
    }
}

impl Drop for WorkerLog {
    fn drop(&mut self) {
        self.final_flush();
    }
}

// === rendering ===

/// Writes `key: value` pairs in the chosen format.
struct Fields<'a> {
    out: &'a mut Vec<u8>,
    format: LineFormat,
    first: bool,
}

impl<'a> Fields<'a> {
    fn new(out: &'a mut Vec<u8>, format: LineFormat) -> Self {
        if format == LineFormat::Json {
            out.push(b'{');
        }
        Self {
            out,
            format,
            first: true,
        }
    }

    /// Continues a line [`Fields::new`] began.
    fn resume(out: &'a mut Vec<u8>, format: LineFormat) -> Self {
        Self {
            out,
            format,
            first: false,
        }
    }

    fn key(&mut self, key: &str) {
        match self.format {
            LineFormat::Json => {
                if !self.first {
                    self.out.push(b',');
                }
                self.out.push(b'"');
                self.out.extend_from_slice(key.as_bytes());
                self.out.extend_from_slice(b"\":");
            }
            LineFormat::Text => {
                if !self.first {
                    self.out.push(b' ');
                }
                self.out.extend_from_slice(key.as_bytes());
                self.out.push(b'=');
            }
        }
        self.first = false;
    }

    /// A value that needs no escaping in either format, as a string.
    fn raw(&mut self, key: &str, value: &[u8]) {
        self.key(key);
        let quote = self.format == LineFormat::Json;
        self.quoted(|out| out.extend_from_slice(value), quote);
    }

    fn str(&mut self, key: &str, value: &[u8]) {
        self.key(key);
        let format = self.format;
        let needs_quotes = format == LineFormat::Json || text_needs_quotes(value);
        self.quoted(|out| escape(out, value), needs_quotes);
    }

    fn opt_str(&mut self, key: &str, value: Option<&[u8]>) {
        match value {
            Some(value) => self.str(key, value),
            None => self.null(key),
        }
    }

    fn null(&mut self, key: &str) {
        self.key(key);
        let none: &[u8] = match self.format {
            LineFormat::Json => b"null",
            LineFormat::Text => b"-",
        };
        self.out.extend_from_slice(none);
    }

    fn number(&mut self, key: &str, value: u64) {
        self.key(key);
        let _ = write!(self.out, "{value}");
    }

    /// A duration in milliseconds, to the microsecond.
    fn millis(&mut self, key: &str, value: Option<Duration>) {
        let Some(value) = value else {
            return self.null(key);
        };
        self.key(key);
        let micros = value.as_micros();
        let _ = write!(self.out, "{}.{:03}", micros / 1000, micros % 1000);
    }

    /// The request target, its query kept, dropped or redacted.
    fn target(&mut self, key: &str, target: &[u8], policy: &QueryPolicy) {
        self.key(key);
        let quote = self.format == LineFormat::Json || text_needs_quotes(target);
        self.quoted(
            |out| redact_target(target, policy, |piece| escape(out, piece)),
            quote,
        );
    }

    fn quoted(&mut self, write: impl FnOnce(&mut Vec<u8>), quote: bool) {
        if quote {
            self.out.push(b'"');
        }
        write(self.out);
        if quote {
            self.out.push(b'"');
        }
    }

    fn end(self) {
        if self.format == LineFormat::Json {
            self.out.push(b'}');
        }
        self.out.push(b'\n');
    }
}

/// Passes `target` (path and query) to `emit` in pieces, its query kept,
/// dropped or redacted. Redacting replaces a parameter's value with
/// `REDACTED`: every parameter's (and every bare one, which may be a secret
/// itself), or the named ones', compared without case and after
/// percent-decoding, so `?Token=` and `?tok%65n=` are `token`.
pub(crate) fn redact_target(target: &[u8], policy: &QueryPolicy, mut emit: impl FnMut(&[u8])) {
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(at) => (&target[..at], &target[at + 1..]),
        None => return emit(target),
    };
    let names = match policy {
        QueryPolicy::Keep => return emit(target),
        QueryPolicy::Drop => return emit(path),
        QueryPolicy::Redact(names) => names,
    };
    emit(path);
    emit(b"?");
    for (i, pair) in query.split(|&b| b == b'&').enumerate() {
        if i > 0 {
            emit(b"&");
        }
        match pair.iter().position(|&b| b == b'=') {
            Some(eq) if names.is_empty() || names.iter().any(|n| same_name(&pair[..eq], n)) => {
                emit(&pair[..eq]);
                emit(b"=REDACTED");
            }
            None if names.is_empty() && !pair.is_empty() => emit(b"REDACTED"),
            _ => emit(pair),
        }
    }
}

/// A query parameter's name, as sent, is `name` (ASCII case aside, and
/// after percent-decoding).
fn same_name(sent: &[u8], name: &str) -> bool {
    let mut name = name.bytes();
    let mut rest = sent;
    while let Some((&b, tail)) = rest.split_first() {
        let (byte, tail) = match (b, tail) {
            (b'%', [h, l, tail @ ..]) => match (hex_digit(*h), hex_digit(*l)) {
                (Some(h), Some(l)) => (h << 4 | l, tail),
                _ => (b, tail),
            },
            _ => (b, tail),
        };
        match name.next() {
            Some(n) if n.eq_ignore_ascii_case(&byte) => rest = tail,
            _ => return false,
        }
    }
    name.next().is_none()
}

fn hex_digit(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// logfmt quotes a value that is empty or holds a space, `"`, `=` or a
/// control character.
fn text_needs_quotes(value: &[u8]) -> bool {
    value.is_empty()
        || value
            .iter()
            .any(|&b| b <= b' ' || b == b'"' || b == b'=' || b == b'\\' || b == 0x7f)
}

/// Escapes a value for a quoted string: `"` and `\` get a backslash,
/// control characters become `\u00XX`, and bytes that are not UTF-8
/// become U+FFFD, so every line is valid JSON (and valid UTF-8 in text).
fn escape(out: &mut Vec<u8>, value: &[u8]) {
    for chunk in value.utf8_chunks() {
        for &b in chunk.valid().as_bytes() {
            match b {
                b'"' | b'\\' => out.extend_from_slice(&[b'\\', b]),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0..=0x1f | 0x7f => {
                    let _ = write!(out, "\\u{b:04x}");
                }
                _ => out.push(b),
            }
        }
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{fffd}".as_bytes());
        }
    }
}

#[cfg(test)]
mod tests;
