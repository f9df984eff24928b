//! The control API (default 127.0.0.1:9901): status, weights, rollouts,
//! history, metrics and probes, as JSON over HTTP/1.1. The contract is in
//! README.md, "Control API".
//!
//! [`Api::handle`] is the whole router as one async function over a request,
//! so tests drive it without a socket; [`serve`] puts it on a listener.
//! Mutating calls need `Authorization: Bearer <token>` when a token is set;
//! without it the answer is 401 and nothing changes. Bad bodies get 400 with
//! `{"error": "..."}`. Nothing here touches the request path beyond the
//! atomic reads that status and metrics make.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::controller::{Controller, ControllerError};
use crate::fleet::member::Member;
use crate::fleet::ops::FleetError;
use crate::metrics::Metrics;
use crate::rollout::{parse_hold, RolloutError};

/// Largest request body the API reads.
const MAX_BODY: usize = 64 * 1024;

/// The control API's state.
pub struct Api {
    /// Set once the saved state is loaded; until then only the probes answer.
    plane: OnceLock<ControlPlane>,
    token: Option<String>,
    ready: AtomicBool,
}

/// What the API drives once serin has started.
struct ControlPlane {
    controller: Controller,
    metrics: Arc<Metrics>,
    /// Set on a fleet member: mutating calls act on the fleet's object.
    fleet: Option<Member>,
}

/// `PUT /weight`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightBody {
    canary: f64,
}

/// `POST /rollout`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutBody {
    steps: Option<Vec<f64>>,
    hold: Option<String>,
    /// The hold of a shadow step before the first weight step.
    shadow: Option<String>,
}

/// `POST /shadow`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShadowBody {
    percent: Option<f64>,
}

/// A `POST /rollout` body, its durations parsed.
struct RolloutRequest {
    steps: Option<Vec<f64>>,
    hold: Option<Duration>,
    shadow: Option<Duration>,
}

type ApiResponse = Response<Full<Bytes>>;

fn json_response(status: StatusCode, value: serde_json::Value) -> ApiResponse {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> ApiResponse {
    json_response(status, json!({ "error": message.to_string() }))
}

fn ok<T: serde::Serialize>(value: &T) -> ApiResponse {
    json_response(
        StatusCode::OK,
        serde_json::to_value(value).expect("serialisable"),
    )
}

fn controller_error(e: ControllerError) -> ApiResponse {
    match e {
        ControllerError::Rollout(
            RolloutError::Latched
            | RolloutError::NotProgressing { .. }
            | RolloutError::NothingToResume { .. },
        ) => error(StatusCode::CONFLICT, e),
        ControllerError::Rollout(_) | ControllerError::Policy(_) => {
            error(StatusCode::BAD_REQUEST, e)
        }
        ControllerError::Store(_) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

impl Api {
    /// An API that answers its probes (not ready) until [`Api::attach`];
    /// `token` guards mutating calls.
    pub fn starting(token: Option<String>) -> Self {
        Self {
            plane: OnceLock::new(),
            token,
            ready: AtomicBool::new(false),
        }
    }

    /// The saved state is loaded: every endpoint answers from now on.
    /// On a fleet member (`fleet`), every mutating call changes the fleet's
    /// `SerinRollout`, which every member (this one included) then applies.
    pub fn attach(&self, controller: Controller, metrics: Arc<Metrics>, fleet: Option<Member>) {
        let _ = self.plane.set(ControlPlane {
            controller,
            metrics,
            fleet,
        });
    }

    /// Marks the service ready (listener bound, state loaded): `/readyz` → 200.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    fn authorised<B>(&self, req: &Request<B>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        // The scheme is case-insensitive (RFC 9110 §11.1); the token is not.
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token.trim());
        constant_time_eq(given.as_bytes(), token.as_bytes())
    }

    /// Answers one request. Never panics on bad input.
    pub async fn handle<B>(&self, req: Request<B>) -> ApiResponse
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let allowed: &[Method] = match path.as_str() {
            "/status" | "/history" | "/metrics" | "/healthz" | "/readyz" => &[Method::GET],
            "/weight" => &[Method::PUT],
            "/rollout" | "/shadow" | "/pause" | "/resume" | "/promote" | "/rollback" => {
                &[Method::POST]
            }
            _ => {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("no such endpoint {path}; see GET /status"),
                )
            }
        };
        if !allowed.contains(&method) {
            let mut resp = error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{path} takes {}", allowed[0]),
            );
            resp.headers_mut().insert(
                ALLOW,
                http::HeaderValue::from_str(allowed[0].as_str()).expect("method"),
            );
            return resp;
        }
        if method != Method::GET && !self.authorised(&req) {
            // Read what the client sent first: answering before its body has
            // arrived makes hyper close the connection under the client's
            // next request on it.
            let _ = Limited::new(req.into_body(), MAX_BODY).collect().await;
            let mut resp = error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token; send Authorization: Bearer <token>",
            );
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"serin\""),
            );
            return resp;
        }
        match path.as_str() {
            "/healthz" => return json_response(StatusCode::OK, json!({"status": "ok"})),
            "/readyz" if self.ready.load(Ordering::SeqCst) => {
                return json_response(StatusCode::OK, json!({"status": "ready"}))
            }
            "/readyz" => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: starting (loading the saved state) or shutting down",
                )
            }
            _ => {}
        }
        let Some(plane) = self.plane.get() else {
            let _ = Limited::new(req.into_body(), MAX_BODY).collect().await;
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "serin is starting: the saved state is loading; retry in a moment",
            );
        };
        let c = &plane.controller;
        if let (Some(member), false) = (&plane.fleet, method == Method::GET) {
            return fleet_call(member, &path, req).await;
        }
        match path.as_str() {
            "/status" => match &plane.fleet {
                None => ok(&c.status().await),
                Some(member) => {
                    let mut status = serde_json::to_value(c.status().await).expect("serialisable");
                    status["fleet"] =
                        serde_json::to_value(member.status().await).expect("serialisable");
                    json_response(StatusCode::OK, status)
                }
            },
            "/history" => ok(&c.history().await),
            "/metrics" => {
                let status = c.status().await;
                plane.metrics.set_rollout_step(status.rollout.step as i64);
                let mut resp = Response::new(Full::new(Bytes::from(plane.metrics.render())));
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                resp
            }
            "/weight" => match read_json::<WeightBody, B>(req).await {
                Ok(Some(body)) => c
                    .set_weight(body.canary)
                    .await
                    .map_or_else(controller_error, |s| ok(&s)),
                Ok(None) => error(StatusCode::BAD_REQUEST, "body required: {\"canary\": 12.5}"),
                Err(resp) => resp,
            },
            "/rollout" => match read_rollout(req).await {
                Ok(r) => c
                    .rollout(r.steps, r.hold, r.shadow)
                    .await
                    .map_or_else(controller_error, |s| ok(&s)),
                Err(resp) => resp,
            },
            "/shadow" => match read_json::<ShadowBody, B>(req).await {
                Ok(body) => c
                    .shadow(body.unwrap_or_default().percent)
                    .await
                    .map_or_else(controller_error, |s| ok(&s)),
                Err(resp) => resp,
            },
            "/pause" => c.pause().await.map_or_else(controller_error, |s| ok(&s)),
            "/resume" => c.resume().await.map_or_else(controller_error, |s| ok(&s)),
            "/promote" => c.promote().await.map_or_else(controller_error, |s| ok(&s)),
            "/rollback" => c.rollback().await.map_or_else(controller_error, |s| ok(&s)),
            _ => unreachable!("paths were matched above"),
        }
    }
}

fn fleet_error(e: FleetError) -> ApiResponse {
    match &e {
        FleetError::Refused(_) if e.is_state_conflict() => error(StatusCode::CONFLICT, e),
        FleetError::Refused(_) => error(StatusCode::BAD_REQUEST, e),
        FleetError::NotFound(_) => error(StatusCode::NOT_FOUND, e),
        _ => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// A mutating call on a fleet member: it changes the fleet's object, and
/// answers with the fleet's rollout (`fleet::ops::summary`).
async fn fleet_call<B>(member: &Member, path: &str, req: Request<B>) -> ApiResponse
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let fleet = member.fleet();
    let actor = member.api_actor();
    let done = match path {
        "/weight" => match read_json::<WeightBody, B>(req).await {
            Ok(Some(body)) => fleet.set_weight(body.canary, &actor).await,
            Ok(None) => return error(StatusCode::BAD_REQUEST, "body required: {\"canary\": 12.5}"),
            Err(resp) => return resp,
        },
        "/rollout" => match read_rollout(req).await {
            Ok(r) => fleet.rollout(r.steps, r.hold, r.shadow, &actor).await,
            Err(resp) => return resp,
        },
        "/shadow" => match read_json::<ShadowBody, B>(req).await {
            Ok(body) => {
                let pct = body.unwrap_or_default().percent;
                fleet
                    .shadow(pct.unwrap_or(fleet.defaults().shadow_percent), &actor)
                    .await
            }
            Err(resp) => return resp,
        },
        "/pause" => fleet.pause(&actor).await,
        "/resume" => fleet.resume(&actor).await,
        "/promote" => fleet.promote(&actor).await,
        "/rollback" => fleet.rollback(&actor).await,
        _ => unreachable!("paths were matched above"),
    };
    match done {
        Ok(object) => {
            let members = fleet.members().await.unwrap_or_default();
            json_response(
                StatusCode::OK,
                crate::fleet::ops::summary(&object, &members),
            )
        }
        Err(e) => fleet_error(e),
    }
}

/// Reads a `POST /rollout` body: its steps, hold and shadow hold, all
/// optional; a duration that is not one, or is 0, is a bad body.
async fn read_rollout<B>(req: Request<B>) -> Result<RolloutRequest, ApiResponse>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let body = read_json::<RolloutBody, B>(req).await?.unwrap_or_default();
    let duration = |key: &str, text: Option<&str>| match text.map(parse_hold).transpose() {
        Ok(Some(d)) if d.is_zero() => Err(format!("{key} must be longer than 0s, e.g. \"60s\"")),
        Ok(d) => Ok(d),
        Err(e) if key == "hold" => Err(e.to_string()),
        Err(e) => Err(format!("{key}: {e}")),
    };
    let bad = |message: String| error(StatusCode::BAD_REQUEST, message);
    Ok(RolloutRequest {
        hold: duration("hold", body.hold.as_deref()).map_err(bad)?,
        shadow: duration("shadow", body.shadow.as_deref()).map_err(bad)?,
        steps: body.steps,
    })
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes; `Ok(None)` when empty.
async fn read_json<T, B>(req: Request<B>) -> Result<Option<T>, ApiResponse>
where
    T: serde::de::DeserializeOwned,
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Err(
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("body larger than {MAX_BODY} bytes"),
                    )
                } else {
                    error(StatusCode::BAD_REQUEST, format!("could not read body: {e}"))
                },
            )
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves the API on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, api: Arc<Api>, mut shutdown: watch::Receiver<bool>) {
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "control API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let api = api.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(api.handle(req).await) }
            });
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "control API connection ended");
            }
        });
    }
}
