//! The hyper adapter: HTTP/2 clients (h2c, or ALPN `h2` under TLS), uploads,
//! upgrades, and every HTTP/1.1 connection serin's own loop hands over.
//!
//! It turns hyper's request into the policy's terms ([`crate::policy`]) and
//! the policy's decisions back into hyper's: it moves the request to the
//! upstream (HTTP/1.1 heads are encoded by the same functions as on the own
//! loop; h2c heads go into a header map), the response head into the form
//! the sending side takes ([`ResponseFields`]: for hyper a header map that
//! shares the upstream's bytes, for the own HTTP/2 loop an HPACK block), and
//! the body through [`ProxyBody`], which settles the request's outcome at
//! its end.

use std::convert::Infallible;
use std::rc::Rc;

use bytes::Bytes;
use http::header::{CONNECTION, COOKIE, HOST, UPGRADE};
use http::request::Parts;
use http::uri::Authority;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::client_body::ClientBody;
use crate::fields::{keeps_alive, FieldSink, Fields, MapSink, ResponseFields};
use crate::http1::head::write_request_line;
use crate::outcome::{Observation, OutcomeRecord, RequestFacts, Settled};
use crate::policy::{
    admit, canary_failed, limit_rate, local_answer, may_fall_back, write_local_fields,
    write_request_fields, write_response_fields, Admitted, Answering, BodyLength, ConnMeta,
    Forwarding, Refusal, RequestHead, X_REQUEST_ID,
};
use crate::shadow::{self, class_of, ShadowCopy, FAILED, SHADOW_HEADER};
use crate::split::Target;
use crate::stats::ShadowSkip;
use crate::trace::TraceContext;
use crate::upstream::{
    H1Request, RequestBody, RequestFraming, Tunnel, UploadEnd, UpstreamBody, UpstreamError,
    UpstreamProtocol, UpstreamResponse,
};
use crate::worker::Worker;

/// Serves one request from hyper.
pub(crate) async fn proxy(
    worker: Rc<Worker>,
    meta: Rc<ConnMeta>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let version = req.version();
    // hyper keeps an HTTP/1.0 connection open only when the response says so.
    let keep_alive_10 = version == Version::HTTP_10 && keeps_alive(req.headers(), 0);
    let answered: Answered<HeaderMap> = answer(worker, meta, req.map(ClientBody::Hyper)).await;
    let mut resp = Response::new(answered.body);
    *resp.status_mut() = answered.status;
    *resp.headers_mut() = answered.fields;
    *resp.version_mut() = version;
    if keep_alive_10 && !resp.headers().contains_key(CONNECTION) {
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("keep-alive"));
    }
    Ok(resp)
}

/// An answer to one request: its status, its fields in the form `H` that the
/// side sending it takes ([`ResponseFields`]), and its body.
pub(crate) struct Answered<H> {
    pub(crate) status: StatusCode,
    pub(crate) fields: H,
    pub(crate) body: ProxyBody,
}

/// The answer to one request, from hyper or from serin's own HTTP/2 loop:
/// the upstream's, or serin's own.
pub(crate) async fn answer<H: ResponseFields>(
    worker: Rc<Worker>,
    meta: Rc<ConnMeta>,
    req: Request<ClientBody>,
) -> Answered<H> {
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    let client_id = parts.headers.get(&X_REQUEST_ID).cloned();
    let generated_id = client_id.is_none().then(|| worker.next_request_id_bytes());
    let request_id = match (&client_id, &generated_id) {
        (Some(id), _) => id.as_bytes(),
        (None, Some(id)) => &id[..],
        (None, None) => &[],
    };
    let authority = parts.uri.authority().cloned();
    let head = RequestHead {
        method: &parts.method,
        version: parts.version,
        fields: &parts.headers,
    };
    let admitted = admit(&head, worker.inflight(), worker.config()).and_then(|admitted| {
        limit_rate(worker.rate_limiter(), &parts.headers, &meta).map(|()| admitted)
    });
    let trace = worker.trace_context(&parts.headers);
    let observation = worker.observe(
        || RequestFacts {
            request_id,
            trace_id: trace.as_ref().map(TraceContext::trace_id),
            client: meta.client_ip.as_bytes(),
            method: parts.method.as_str().as_bytes(),
            authority: match &authority {
                Some(authority) => authority.as_str().as_bytes(),
                None => parts.headers.value(&HOST).unwrap_or_default(),
            },
            target: parts
                .uri
                .path_and_query()
                .map_or(b"/", |p| p.as_str().as_bytes()),
            version: parts.version,
            tls: meta.tls(),
        },
        trace.as_ref(),
    );
    let version = parts.version;
    let to = Asker {
        version,
        head: parts.method == Method::HEAD,
    };
    let refused = |refusal: &Refusal, observation| {
        refuse(&worker, refusal, observation, request_id, to, start)
    };
    let admitted = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => return refused(&refusal, observation),
    };
    let decision = worker.decide(&parts.headers, meta.identity());
    let target = decision.target;
    // HTTP/1.1 upgrades (WebSocket and the like) pass through: the handshake
    // is forwarded with its `Upgrade` header and, after a 101, the two
    // connections are spliced together. Only the handshake is judged.
    let upgrade = requested_upgrade(&parts);
    let client_upgrade = upgrade
        .as_ref()
        .and_then(|_| parts.extensions.remove::<OnUpgrade>());
    if parts.version == Version::HTTP_2 {
        join_cookie_crumbs(&mut parts.headers);
    }
    let bodiless = body.is_end_stream();
    let copy = decision
        .shadow
        .then(|| shadow_plan(&worker, &parts.method, admitted.body, upgrade.is_some()))
        .flatten();
    let fallback = may_fall_back(
        worker.config(),
        target,
        &parts.method,
        bodiless,
        upgrade.is_some(),
    );
    let mut buffered = None;
    let (body, upload) = if let Some(Some(_)) = copy {
        // The copy needs the body: it is read whole (its length is known
        // and at most `shadow.max_body_bytes`), then sent to stable with the
        // head in one piece, and to the canary.
        match body.collect().await {
            Ok(collected) => {
                let bytes = collected.to_bytes();
                let ended = UploadEnd::default();
                ended.bytes.set(bytes.len() as u64);
                ended.ended.set(Some(Instant::now()));
                buffered = Some(bytes);
                (RequestBody::Empty, Some(ended))
            }
            Err(source) => {
                let refusal = Refusal::Upstream(target, UpstreamError::ClientAborted { source });
                return refused(&refusal, observation);
            }
        }
    } else if bodiless {
        (RequestBody::Client(body), None)
    } else {
        let ended = UploadEnd::default();
        (
            RequestBody::Upload {
                body,
                ended: ended.clone(),
            },
            Some(ended),
        )
    };
    let request = Outgoing {
        worker: &worker,
        parts: &parts,
        meta: &meta,
        admitted,
        authority: authority.as_ref(),
        generated_id: generated_id.as_ref().map(|id| &id[..]),
        traceparent: trace.as_ref().and_then(TraceContext::forward),
        upgrade: upgrade.as_ref(),
        buffered: buffered.as_ref(),
    };
    let record = OutcomeRecord::new(worker.clone(), target, start, bodiless, observation);
    let mut record = match record {
        Ok(record) => record,
        Err((refusal, observation)) => return refused(&refusal, observation),
    };
    if let Some(upload) = &upload {
        record.uploading(upload);
    }
    let mut result = request.send(target, body, start, upload.as_ref()).await;
    // The copy, once stable has answered: its own task, which nothing here
    // waits for, and which starts after this answer is written.
    if copy.is_some() {
        let stable = result.as_ref().map_or(FAILED, |a| class_of(a.status()));
        shadow::start(&worker, stable, || request.shadow_copy());
    }
    let mut fell_back = false;
    if fallback
        && canary_failed(
            &worker.shared.classifier,
            result.as_ref().ok().map(Answer::status),
        )
    {
        record.fall_back();
        fell_back = true;
        drop(result);
        // Boxed: a rare path, kept out of every request's future.
        result =
            Box::pin(request.send(Target::Stable, RequestBody::Empty, Instant::now(), None)).await;
    }
    let served_by = record.target();
    let answering = Answering {
        config: worker.config(),
        served_by,
        fell_back,
        request_id,
    };
    match result {
        Err(e) => {
            record.failed(&e);
            tracing::debug!(
                request_id = %String::from_utf8_lossy(request_id),
                upstream = %served_by,
                error = %e,
                "upstream request failed"
            );
            let (resp, sent) = answer_locally(
                &worker,
                &Refusal::Upstream(served_by, e),
                fell_back,
                request_id,
                to,
            );
            record.body_sent(sent);
            resp
        }
        Ok(Answer::Http1(resp)) => {
            record.headers(resp.status(), &resp.fields());
            let status = resp.status();
            // The policy drops `Upgrade` as hop-by-hop; a 101 puts it back.
            let protocol = (status == StatusCode::SWITCHING_PROTOCOLS)
                .then(|| resp.fields().value(&UPGRADE).map(HeaderValue::from_bytes))
                .flatten()
                .and_then(Result::ok);
            let mut fields = H::with_capacity(resp.fields().spans.len() + 3);
            let mut body = resp_split(resp, &answering, &mut fields);
            if status == StatusCode::SWITCHING_PROTOCOLS {
                if let (Some(client), Some(tunnel), Some(protocol)) =
                    (client_upgrade, body.take_tunnel(), protocol)
                {
                    // An upgrade is rare and long: its id is copied for its logs.
                    let id = String::from_utf8_lossy(request_id).into_owned();
                    tokio::task::spawn_local(splice(client, tunnel, id));
                    let mut sink = fields.sink(None);
                    sink.field(b"connection", b"upgrade");
                    sink.field(b"upgrade", protocol.as_bytes());
                }
            }
            Answered {
                status,
                fields,
                body: ProxyBody::upstream(UpstreamBody::Http1(body), record),
            }
        }
        Ok(Answer::Http2(resp)) => {
            record.headers(resp.status(), resp.headers());
            let (head, body) = resp.into_parts();
            let mut fields = H::with_capacity(head.headers.len() + 3);
            write_response_fields(&head.headers, &answering, &mut fields.sink(None));
            Answered {
                status: head.status,
                fields,
                body: ProxyBody::upstream(UpstreamBody::Http2(body), record),
            }
        }
    }
}

/// The response head into `out`, through the policy; returns the body.
fn resp_split(
    resp: UpstreamResponse,
    answering: &Answering<'_>,
    out: &mut impl ResponseFields,
) -> crate::upstream::ResponseBody {
    resp.split(|fields, head| write_response_fields(&fields, answering, &mut out.sink(Some(head))))
}

/// An upstream's answer, as each protocol gives it.
enum Answer {
    Http1(UpstreamResponse),
    Http2(Response<Incoming>),
}

impl Answer {
    fn status(&self) -> StatusCode {
        match self {
            Answer::Http1(resp) => resp.status(),
            Answer::Http2(resp) => resp.status(),
        }
    }
}

/// A request on its way to an upstream: what [`Outgoing::send`] needs to
/// send it to either one (the canary fallback sends it twice).
struct Outgoing<'a> {
    worker: &'a Worker,
    parts: &'a Parts,
    meta: &'a ConnMeta,
    admitted: Admitted,
    authority: Option<&'a Authority>,
    generated_id: Option<&'a [u8]>,
    traceparent: Option<&'a [u8]>,
    upgrade: Option<&'a HeaderValue>,
    /// The body, read whole for a shadow copy: sent after the head.
    buffered: Option<&'a Bytes>,
}

impl Outgoing<'_> {
    fn forwarding<'f>(&'f self, upstream_authority: &'f [u8]) -> Forwarding<'f> {
        Forwarding {
            conn: self.meta,
            version: self.parts.version,
            config: self.worker.config(),
            admitted: self.admitted,
            authority: self.authority.map(|a| a.as_str().as_bytes()),
            upstream_authority,
            generated_id: self.generated_id,
            traceparent: self.traceparent,
        }
    }

    /// Sends the request to `target` under the response timeout, counted
    /// from `sent_at` or, for an upload, from the upload's end (as Envoy's
    /// route timeout does: a slow upload is not the upstream's fault).
    async fn send(
        &self,
        target: Target,
        body: RequestBody,
        sent_at: Instant,
        upload: Option<&UploadEnd>,
    ) -> Result<Answer, UpstreamError> {
        let pool = self.worker.pool(target);
        let upstream = pool.upstream();
        let timeout = self.worker.config().response_timeout;
        let send = async {
            // The protocol the pool has learned, else learned now. Boxed:
            // learning connects (with TLS), a future half the size of the
            // rest of the request's, and needed once per `auto` upstream.
            let h2 = match pool.protocol() {
                UpstreamProtocol::Http1 => false,
                UpstreamProtocol::Http2 => true,
                UpstreamProtocol::Auto => Box::pin(pool.speaks_h2(sent_at)).await?,
            };
            if h2 {
                // Boxed: HTTP/2's future is large and rare; unboxed it would
                // grow every request's future.
                Box::pin(self.send_h2(target, body, sent_at))
                    .await
                    .map(Answer::Http2)
            } else {
                self.send_h1(target, body, sent_at).await.map(Answer::Http1)
            }
        };
        let mut send = std::pin::pin!(send);
        let mut deadline = sent_at + timeout;
        loop {
            match tokio::time::timeout_at(deadline, send.as_mut()).await {
                Ok(result) => return result,
                Err(_) => match upload.map(|u| u.ended.get()) {
                    // Still uploading: look again one timeout from now.
                    Some(None) => deadline = Instant::now() + timeout,
                    Some(Some(end)) if end + timeout > deadline => deadline = end + timeout,
                    _ => {
                        return Err(UpstreamError::Timeout {
                            url: upstream.url.clone(),
                            timeout,
                        })
                    }
                },
            }
        }
    }

    async fn send_h1(
        &self,
        target: Target,
        body: RequestBody,
        sent_at: Instant,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let framing = if body.is_end_stream() {
            RequestFraming::None
        } else if matches!(self.admitted.body, BodyLength::Known(_)) {
            RequestFraming::Length
        } else {
            RequestFraming::Chunked
        };
        let request = H1Request {
            method: &self.parts.method,
            encode: |out: &mut Vec<u8>| self.encode_h1(target, framing, false, out),
            body,
            framing,
            upgrade: self.upgrade.is_some(),
        };
        self.worker.pool(target).send_h1(request, sent_at).await
    }

    /// Writes the HTTP/1.1 request for `target`: the head as the policy
    /// rewrites it (with a shadow copy's marker), then the body if it was
    /// read whole.
    fn encode_h1(&self, target: Target, framing: RequestFraming, shadow: bool, out: &mut Vec<u8>) {
        let parts = self.parts;
        let forwarding = self.forwarding(self.worker.pool(target).upstream().authority.as_bytes());
        let target_form = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        write_request_line(
            out,
            parts.method.as_str().as_bytes(),
            target_form.as_bytes(),
        );
        write_request_fields(&parts.headers, &forwarding, out);
        if framing == RequestFraming::Chunked {
            out.field(b"transfer-encoding", b"chunked");
        }
        if let Some(protocol) = self.upgrade {
            out.field(b"connection", b"upgrade");
            out.field(b"upgrade", protocol.as_bytes());
        }
        if shadow {
            out.field(SHADOW_HEADER.as_bytes(), b"1");
        }
        out.extend_from_slice(b"\r\n");
        if let Some(body) = self.buffered {
            out.extend_from_slice(body);
        }
    }

    /// The request's copy for the canary ([`crate::shadow`]).
    fn shadow_copy(&self) -> ShadowCopy {
        match self.worker.pool(Target::Canary).protocol() {
            // `shadow::start` copies to an `auto` canary only once its
            // protocol is known.
            UpstreamProtocol::Http1 | UpstreamProtocol::Auto => {
                let mut message = Vec::new();
                self.encode_h1(Target::Canary, RequestFraming::None, true, &mut message);
                ShadowCopy::Http1 {
                    method: self.parts.method.clone(),
                    message,
                }
            }
            UpstreamProtocol::Http2 => ShadowCopy::Http2(Box::new(self.h2_request(
                Target::Canary,
                RequestBody::Empty,
                true,
            ))),
        }
    }

    async fn send_h2(
        &self,
        target: Target,
        body: RequestBody,
        sent_at: Instant,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let request = self.h2_request(target, body, false);
        self.worker.pool(target).send_h2(request, sent_at).await
    }

    /// The h2c request for `target` (with a shadow copy's marker).
    fn h2_request(&self, target: Target, body: RequestBody, shadow: bool) -> Request<RequestBody> {
        let parts = self.parts;
        let mut headers = HeaderMap::with_capacity(parts.headers.len() + 4);
        let forwarding = self.forwarding(self.worker.pool(target).upstream().authority.as_bytes());
        write_request_fields(
            &parts.headers,
            &forwarding,
            &mut MapSink {
                map: &mut headers,
                shared: None,
            },
        );
        // HTTP/2 has no `Connection` (the policy's `connection: te` is for
        // HTTP/1.1), and carries the authority in the URI, not in Host.
        headers.remove(CONNECTION);
        let host = headers.remove(HOST);
        let authority = host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let scheme = if self.worker.pool(target).upstream().tls.is_some() {
            "https"
        } else {
            "http"
        };
        let uri = Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query(path)
            .build()
            .unwrap_or_else(|_| Uri::from_static("/"));
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_2;
        if shadow {
            headers.insert(SHADOW_HEADER, HeaderValue::from_static("1"));
        }
        *req.headers_mut() = headers;
        req
    }
}

/// Whether a request picked for the shadow is copied: `Some(None)` without
/// its body, `Some(Some(length))` with it, or `None` (the reason counted).
/// A body is copied only between HTTP/1.1 upstreams, where it can be sent
/// whole after the head.
fn shadow_plan(
    worker: &Worker,
    method: &Method,
    body: BodyLength,
    upgrade: bool,
) -> Option<Option<u64>> {
    let config = worker.config();
    let plan = shadow::eligibility(&config.shadow, method, body, upgrade).and_then(|length| {
        let both_h1 = config.stable.protocol == UpstreamProtocol::Http1
            && config.canary.protocol == UpstreamProtocol::Http1;
        match length {
            Some(_) if !both_h1 => Err(ShadowSkip::Body),
            length => Ok(length),
        }
    });
    plan.map_err(|why| worker.shadow_stats().record_skipped(why))
        .ok()
}

/// serin's answer to an HTTP/2 request whose head the own HTTP/2 loop
/// could not take in (too large): there is no request to hand over.
pub(crate) fn refuse_head<H: ResponseFields>(worker: &Worker, refusal: &Refusal) -> Answered<H> {
    let to = Asker {
        version: Version::HTTP_2,
        head: false,
    };
    refuse(worker, refusal, None, &[], to, Instant::now())
}

/// What serin's own answers depend on of the request they answer.
#[derive(Clone, Copy)]
struct Asker {
    version: Version,
    /// A HEAD request: hyper sends the answer's length, not its body.
    head: bool,
}

/// The response serin makes itself for `refusal`, and the body bytes the
/// client gets.
fn answer_locally<H: ResponseFields>(
    worker: &Worker,
    refusal: &Refusal,
    fell_back: bool,
    request_id: &[u8],
    to: Asker,
) -> (Answered<H>, u64) {
    let answer = local_answer(refusal);
    let mut fields = H::with_capacity(6);
    {
        let mut sink = fields.sink(None);
        write_local_fields(&answer, worker.config(), fell_back, request_id, &mut sink);
        if answer.close && to.version < Version::HTTP_2 {
            sink.field(b"connection", b"close");
        }
    }
    let sent = if to.head { 0 } else { answer.text.len() as u64 };
    let answered = Answered {
        status: answer.status,
        fields,
        body: ProxyBody::fixed(answer.text),
    };
    (answered, sent)
}

/// serin's answer to a request it refuses before sending it anywhere, with
/// its access-log line and span settled.
fn refuse<H: ResponseFields>(
    worker: &Worker,
    refusal: &Refusal,
    observation: Option<Observation>,
    request_id: &[u8],
    to: Asker,
    start: Instant,
) -> Answered<H> {
    let (resp, sent) = answer_locally(worker, refusal, false, request_id, to);
    if let Some(observation) = observation {
        let upstream = local_answer(refusal).upstream;
        let settled = Settled::refused(upstream, resp.status, sent, start.elapsed());
        worker.settle(observation, &settled);
    }
    resp
}

/// HTTP/2 clients may send each cookie as its own field; HTTP/1.1 needs them
/// in one `Cookie` header, joined with "; " (RFC 9113 §8.2.3).
fn join_cookie_crumbs(headers: &mut HeaderMap) {
    if headers.get_all(COOKIE).iter().nth(1).is_none() {
        return;
    }
    let mut joined = Vec::new();
    for (i, crumb) in headers.get_all(COOKIE).iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(crumb.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, value);
    }
}

/// The protocol an HTTP/1.1 request asks to upgrade to, if it asks.
fn requested_upgrade(parts: &Parts) -> Option<HeaderValue> {
    if parts.version != Version::HTTP_11 {
        return None;
    }
    let asks = crate::fields::tokens(&parts.headers, &CONNECTION)
        .any(|t| t.eq_ignore_ascii_case(b"upgrade"));
    asks.then(|| parts.headers.get(UPGRADE).cloned()).flatten()
}

/// Copies bytes both ways between an upgraded client connection and an
/// upgraded upstream connection until either side closes.
async fn splice(client: OnUpgrade, mut upstream: Tunnel, request_id: String) {
    let client = match client.await {
        Ok(client) => client,
        Err(e) => {
            tracing::debug!(%request_id, error = %e, "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    // What the upstream sent right after its 101 came in with the head.
    if !upstream.early.is_empty() {
        if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut client, &upstream.early).await {
            tracing::debug!(%request_id, error = %e, "upgraded connection ended");
            return;
        }
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream.io).await {
        tracing::debug!(%request_id, error = %e, "upgraded connection ended");
    }
}
