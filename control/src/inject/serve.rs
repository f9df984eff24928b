//! The mutating admission webhook: AdmissionReview v1 over HTTPS (rustls).
//!
//! It answers with a JSONPatch built by the same code as `serin inject`. A fleet pod gets
//! the fleet env only: the RBAC its service account needs must already exist. It is
//! failurePolicy-safe: a malformed review, or a pod that cannot be injected, gets an
//! *allowed* response with a warning. It must never panic on input, and never block a pod.
//!
//! Its TLS is the proxy listener's ([`serin_proxy::tls`]): the certificate and key are
//! re-read every few seconds, so a renewed Secret (cert-manager) is served to new
//! connections without a restart, and a bad file keeps the previous pair.

use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use serin_proxy::tls::{Acceptor, Listener};
use serin_proxy::TlsFiles;
use tokio::net::TcpListener;

use super::{describe, inject_object, patch, InjectArgs, InjectError, InjectOptions, Outcome};

/// Largest AdmissionReview body read (the API server's own limit is about 3 MiB).
const MAX_BODY: usize = 8 * 1024 * 1024;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Loads the server's certificate and key (ALPN: h2, http/1.1) and re-reads them every
/// `reload_interval`; dropping the returned listener stops the reloads.
pub fn tls(cert: &Path, key: &Path, reload_interval: Duration) -> Result<Listener, InjectError> {
    let files = TlsFiles {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        client_auth: None,
    };
    Listener::start(&files, reload_interval).map_err(|e| InjectError::Tls(e.to_string()))
}

/// Answers one AdmissionReview body. Never fails: problems become warnings on an allowed
/// response.
pub fn review(body: &[u8], opts: &InjectOptions) -> Value {
    let parsed: Result<Value, _> = serde_json::from_slice(body);
    let review = match parsed {
        Ok(v) if v.is_object() => v,
        Ok(_) => {
            return allowed(
                "",
                "malformed AdmissionReview: not a JSON object".to_owned(),
            )
        }
        Err(e) => return allowed("", format!("malformed AdmissionReview: {e}")),
    };
    let Some(request) = review.get("request").filter(|r| r.is_object()) else {
        return allowed("", "malformed AdmissionReview: no request".to_owned());
    };
    let Some(uid) = request.get("uid").and_then(Value::as_str) else {
        return allowed(
            "",
            "malformed AdmissionReview: request has no uid".to_owned(),
        );
    };
    let original = match request.get("object") {
        Some(o) if o.is_object() => o,
        // DELETE and CONNECT carry no object: nothing to inject.
        _ => return response(uid, None, Vec::new()),
    };
    let mut object = original.clone();
    if object.get("kind").is_none() {
        if let Some(kind) = request.pointer("/kind/kind").and_then(Value::as_str) {
            object["kind"] = json!(kind);
        }
    }
    let namespace = request.get("namespace").and_then(Value::as_str);
    let mut report = Vec::new();
    // The webhook can patch only the pod: a fleet pod gets its env, not its RBAC.
    if let Err(e) = inject_object(&mut object, opts, None, namespace, &mut report, None) {
        tracing::warn!(error = %e, "not injected");
        return response(uid, None, vec![format!("serin: not injected: {e}")]);
    }
    if object.get("kind") != original.get("kind") {
        // Only added above to dispatch on; not part of the patch.
        if let Some(o) = object.as_object_mut() {
            o.remove("kind");
        }
    }
    if !report
        .iter()
        .any(|r| matches!(r.outcome, Outcome::Injected(_)))
    {
        return response(uid, None, Vec::new());
    }
    let ops = patch::diff(original, &object);
    tracing::info!(object = %describe(original, namespace), ops = ops.len(), "injected");
    response(uid, Some(ops), Vec::new())
}

fn allowed(uid: &str, warning: String) -> Value {
    tracing::warn!(%warning, "admission review");
    response(uid, None, vec![format!("serin: {warning}")])
}

fn response(uid: &str, ops: Option<Vec<Value>>, warnings: Vec<String>) -> Value {
    let mut r = json!({"uid": uid, "allowed": true});
    if let Some(ops) = ops.filter(|o| !o.is_empty()) {
        let bytes = serde_json::to_vec(&ops).unwrap_or_default();
        r["patchType"] = json!("JSONPatch");
        r["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    if !warnings.is_empty() {
        r["warnings"] = json!(warnings);
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": r})
}

async fn handle(
    req: Request<Incoming>,
    opts: Arc<InjectOptions>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, ctype: &'static str, body: Vec<u8>| {
        let mut res = Response::new(Full::new(Bytes::from(body)));
        *res.status_mut() = status;
        res.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(ctype),
        );
        Ok(res)
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz" | "/readyz") => {
            reply(StatusCode::OK, "text/plain", b"ok\n".to_vec())
        }
        (&Method::POST, _) => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    let answer = allowed("", format!("cannot read the AdmissionReview body: {e}"));
                    let bytes = serde_json::to_vec(&answer).unwrap_or_default();
                    return reply(StatusCode::OK, "application/json", bytes);
                }
            };
            let answer = review(&body, &opts);
            reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec(&answer).unwrap_or_default(),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            b"POST an AdmissionReview\n".to_vec(),
        ),
    }
}

/// Serves the webhook on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    acceptor: Acceptor,
    opts: Arc<InjectOptions>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), InjectError> {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => return Ok(()),
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: keep serving the others.
                tracing::warn!(error = %e, "accept failed");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let opts = opts.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let service = hyper::service::service_fn(move |req| handle(req, opts.clone()));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// `serin inject --serve`: binds `--listen` and serves until SIGTERM or Ctrl-C.
pub(crate) async fn run_server(args: &InjectArgs, opts: InjectOptions) -> Result<(), InjectError> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Err(InjectError::Usage(
            "--serve needs --tls-cert and --tls-key".to_owned(),
        ));
    };
    let tls = tls(cert, key, serin_proxy::defaults::TLS_RELOAD_INTERVAL)?;
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| InjectError::Serve {
            addr: args.listen.to_string(),
            source,
        })?;
    tracing::info!(addr = %args.listen, "serving the serin injection webhook");
    // `tls` lives until the server ends: its reload thread with it.
    serve(listener, tls.acceptor(), Arc::new(opts), shutdown_signal()).await
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
