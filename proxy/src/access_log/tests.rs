use super::*;
use crate::split::Target;

fn config(format: LineFormat, query: QueryPolicy) -> AccessLogConfig {
    AccessLogConfig {
        sink: LogSink::Stdout,
        format,
        sample: 1.0,
        errors_only: false,
        query,
    }
}

/// A worker's log whose writer is never started: lines stay in its batch.
fn worker_log(config: AccessLogConfig) -> (WorkerLog, Receiver<Batch>) {
    let (batches, received) = mpsc::sync_channel(1);
    let log = Arc::new(AccessLog {
        config,
        batches,
        spare_batches: Mutex::new(Vec::new()),
        counters: Arc::default(),
    });
    (WorkerLog::new(log, 7), received)
}

fn facts(target: &'static [u8]) -> RequestFacts<'static> {
    RequestFacts {
        request_id: b"abc123",
        trace_id: Some(b"4bf92f3577b34da6a3ce929d0e0e4736"),
        client: b"127.0.0.1",
        method: b"GET",
        authority: b"example.com",
        target,
        version: Version::HTTP_11,
        tls: false,
    }
}

fn settled(status: u16, class: OutcomeClass) -> Settled {
    Settled {
        upstream: Some(Target::Canary),
        status,
        class,
        bytes_in: 3,
        bytes_out: 1234,
        upstream_time: Some(Duration::from_micros(1500)),
        total_time: Duration::from_micros(2001),
    }
}

fn lines(log: &WorkerLog) -> Vec<String> {
    String::from_utf8(log.batch.borrow().clone())
        .expect("lines are UTF-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_json_line_has_every_field() {
    let (log, _rx) = worker_log(config(LineFormat::Json, QueryPolicy::Keep));
    let line = log.begin(&facts(b"/a?b=1"));
    log.finish(line, &settled(503, OutcomeClass::Error));
    let lines = lines(&log);
    assert_eq!(lines.len(), 1);
    let v: serde_json::Value = serde_json::from_str(&lines[0]).expect("valid JSON");
    assert_eq!(v["request_id"], "abc123");
    assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(v["client"], "127.0.0.1");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["authority"], "example.com");
    assert_eq!(v["path"], "/a?b=1");
    assert_eq!(v["protocol"], "HTTP/1.1");
    assert_eq!(v["upstream"], "canary");
    assert_eq!(v["status"], 503);
    assert_eq!(v["outcome"], "error");
    assert_eq!(v["bytes_in"], 3);
    assert_eq!(v["bytes_out"], 1234);
    assert_eq!(v["upstream_ms"], 1.5);
    assert_eq!(v["total_ms"], 2.001);
    let time = v["time"].as_str().expect("time is a string");
    assert_eq!(time.len(), 24, "{time}");
    assert!(time.ends_with('Z') && time.as_bytes()[10] == b'T', "{time}");
}

#[test]
fn a_text_line_is_logfmt() {
    let (log, _rx) = worker_log(config(LineFormat::Text, QueryPolicy::Keep));
    let mut f = facts(b"/a b?x=\"1\"");
    f.trace_id = None;
    let line = log.begin(&f);
    let mut s = settled(200, OutcomeClass::Success);
    s.upstream_time = None;
    log.finish(line, &s);
    let line = &lines(&log)[0];
    assert!(line.starts_with("time=2"), "{line}");
    assert!(
        line.contains(" request_id=abc123 trace_id=- client=127.0.0.1 method=GET authority=example.com path=\"/a b?x=\\\"1\\\"\" protocol=HTTP/1.1 upstream=canary status=200 outcome=success bytes_in=3 bytes_out=1234 upstream_ms=- total_ms=2.001"),
        "{line}"
    );
}

#[test]
fn hostile_bytes_stay_valid_json() {
    let (log, _rx) = worker_log(config(LineFormat::Json, QueryPolicy::Keep));
    let mut f = facts(b"/\x01\"\\\xff");
    f.authority = b"a\nb";
    let line = log.begin(&f);
    log.finish(line, &settled(200, OutcomeClass::Success));
    let v: serde_json::Value = serde_json::from_str(&lines(&log)[0]).expect("valid JSON");
    assert_eq!(v["path"], "/\u{1}\"\\\u{fffd}");
    assert_eq!(v["authority"], "a\nb");
}

#[test]
fn the_query_is_kept_dropped_or_redacted() {
    let cases = [
        (QueryPolicy::Keep, "/p?token=s3&page=2"),
        (QueryPolicy::Drop, "/p"),
        (
            QueryPolicy::Redact(vec![]),
            "/p?token=REDACTED&page=REDACTED",
        ),
        (
            QueryPolicy::Redact(vec!["token".into()]),
            "/p?token=REDACTED&page=2",
        ),
    ];
    for (policy, want) in cases {
        let (log, _rx) = worker_log(config(LineFormat::Json, policy.clone()));
        let line = log.begin(&facts(b"/p?token=s3&page=2"));
        log.finish(line, &settled(200, OutcomeClass::Success));
        let v: serde_json::Value = serde_json::from_str(&lines(&log)[0]).expect("valid JSON");
        assert_eq!(v["path"], want, "{policy:?}");
    }
}

#[test]
fn errors_only_and_sampling_keep_every_error() {
    let mut errors_only = config(LineFormat::Json, QueryPolicy::Keep);
    errors_only.errors_only = true;
    let mut none_sampled = config(LineFormat::Json, QueryPolicy::Keep);
    none_sampled.sample = 0.0;
    for config in [errors_only, none_sampled] {
        let (log, _rx) = worker_log(config);
        for (status, class) in [
            (200, OutcomeClass::Success),
            (404, OutcomeClass::Success),
            (429, OutcomeClass::Refused),
            (502, OutcomeClass::Error),
            (200, OutcomeClass::Fallback),
            (503, OutcomeClass::Refused),
        ] {
            let line = log.begin(&facts(b"/"));
            log.finish(line, &settled(status, class));
        }
        let statuses: Vec<u64> = lines(&log)
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["status"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(statuses, [502, 200, 503]);
    }
}

#[test]
fn sampling_keeps_about_its_share() {
    let mut half = config(LineFormat::Text, QueryPolicy::Keep);
    half.sample = 0.5;
    let (log, _rx) = worker_log(half);
    for _ in 0..1000 {
        let line = log.begin(&facts(b"/"));
        log.finish(line, &settled(200, OutcomeClass::Success));
        log.batch.borrow_mut().truncate(0);
    }
    let kept = log.batch_lines.get();
    // Lines handed over are counted too: none are (the batch is cleared).
    assert!((400..=600).contains(&kept), "{kept} of 1000 kept at 0.5");
}

#[test]
fn a_full_batch_is_handed_over_and_a_stuck_writer_costs_lines_not_waits() {
    let (log, rx) = worker_log(config(LineFormat::Json, QueryPolicy::Keep));
    let mut sent = 0u64;
    for _ in 0..20_000 {
        let line = log.begin(&facts(b"/some/path"));
        log.finish(line, &settled(200, OutcomeClass::Success));
        sent += 1;
    }
    // The channel holds one batch; nobody reads it: the worker's own batch
    // fills to its cap and the rest are dropped, without blocking.
    let queued = rx.try_recv().expect("one batch was handed over");
    assert!(queued.bytes.len() >= FLUSH_BYTES);
    assert!(log.batch.borrow().len() <= MAX_BATCH_BYTES);
    let dropped = log.shared.counters.dropped.load(Ordering::Relaxed);
    assert!(dropped > 0);
    assert_eq!(queued.lines + log.batch_lines.get() + dropped, sent);
}

#[test]
fn a_file_sink_writes_lines_and_follows_rotation() {
    let dir = std::env::temp_dir().join(format!("serin-access-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("access.log");
    let mut sink = Sink::open(&LogSink::File(path.clone())).expect("opens");
    sink.write(b"one\n").unwrap();
    std::fs::rename(&path, dir.join("access.log.1")).unwrap();
    if let Sink::File { checked, .. } = &mut sink {
        *checked -= REOPEN_CHECK;
    }
    sink.write(b"two\n").unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("access.log.1")).unwrap(),
        "one\n"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn redaction_matches_names_without_case_or_percent_encoding_and_hides_bare_values() {
    let redacted = |target: &str, policy: &QueryPolicy| {
        let mut out = Vec::new();
        redact_target(target.as_bytes(), policy, |p| out.extend_from_slice(p));
        String::from_utf8(out).unwrap()
    };
    let token = QueryPolicy::Redact(vec!["token".into()]);
    assert_eq!(redacted("/p?Token=s3&x=1", &token), "/p?Token=REDACTED&x=1");
    assert_eq!(redacted("/p?tok%65n=s3", &token), "/p?tok%65n=REDACTED");
    assert_eq!(redacted("/p?TOK%45N=s3", &token), "/p?TOK%45N=REDACTED");
    assert_eq!(redacted("/p?tokens=s3&tok=1", &token), "/p?tokens=s3&tok=1");
    assert_eq!(
        redacted("/p?s3cret", &token),
        "/p?s3cret",
        "a bare value has no name to match"
    );
    let all = QueryPolicy::Redact(vec![]);
    assert_eq!(redacted("/p?s3cret&a=1&", &all), "/p?REDACTED&a=REDACTED&");
    assert_eq!(redacted("/p", &all), "/p");
    assert_eq!(redacted("/p?a=1", &QueryPolicy::Drop), "/p");
    assert_eq!(redacted("/p?a=1", &QueryPolicy::Keep), "/p?a=1");
}

#[test]
fn a_stalled_writer_costs_counted_lines_and_a_recovered_one_takes_them_again() {
    let (log, rx) = worker_log(config(LineFormat::Json, QueryPolicy::Keep));
    let shared = log.shared.clone();
    let dropped = || shared.counters.dropped.load(Ordering::Relaxed);
    let mut sent = 0u64;
    let mut fill = |n: usize| {
        for _ in 0..n {
            let line = log.begin(&facts(b"/some/path"));
            log.finish(line, &settled(200, OutcomeClass::Success));
            sent += 1;
        }
    };
    // Nobody reads: one batch queued, the worker's own full, the rest dropped.
    fill(5_000);
    let dropped_while_stalled = dropped();
    assert!(dropped_while_stalled > 0);
    // The writer takes the queued batch: the very next line hands the full
    // batch over instead of being dropped.
    let first = rx.try_recv().expect("a batch was queued");
    fill(1);
    assert_eq!(
        dropped(),
        dropped_while_stalled,
        "a line was dropped though there was room"
    );
    let second = rx
        .try_recv()
        .expect("the full batch went as soon as there was room");
    // The worker stops with the writer gone: what is left is counted, so
    // every line is written (here: taken) or dropped.
    drop(rx);
    drop(log);
    assert_eq!(first.lines + second.lines + dropped(), sent);
}
