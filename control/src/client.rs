//! The CLI's client side: `serin status|weight|rollout|shadow|pause|resume|
//! promote|rollback` talk to a running serin's control API and print a readable
//! summary (or the raw JSON with `--json`). A failed call exits non-zero with
//! the server's own error message.

use std::io::IsTerminal;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Why a control API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The admin address is not usable.
    #[error("bad admin address {0:?}: write host:port or http://host:port, e.g. 127.0.0.1:9901")]
    Address(String),
    /// serin could not be reached.
    #[error("cannot reach serin's control API at {url}: {reason} (is `serin run` running? set --admin or SERIN_ADMIN)")]
    Unreachable { url: String, reason: String },
    /// serin answered with an error.
    #[error("serin answered {status}: {message}")]
    Refused { status: StatusCode, message: String },
}

/// Where the control API is and how to authenticate.
#[derive(Clone, Debug)]
pub struct AdminTarget {
    authority: String,
    token: Option<String>,
}

impl AdminTarget {
    /// `addr` is `host:port` or `http://host:port`.
    pub fn new(addr: &str, token: Option<String>) -> Result<Self, ClientError> {
        let authority = addr
            .strip_prefix("http://")
            .unwrap_or(addr)
            .trim_end_matches('/')
            .to_string();
        if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
            return Err(ClientError::Address(addr.to_string()));
        }
        Ok(Self {
            authority,
            token: token.filter(|t| !t.is_empty()),
        })
    }

    /// Calls `method path` with an optional JSON body; returns the JSON answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let url = format!("http://{}{}", self.authority, path);
        let unreachable = |reason: String| ClientError::Unreachable {
            url: url.clone(),
            reason,
        };
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(self.authority.as_str()),
        )
        .await
        .map_err(|_| unreachable("connect timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.authority.as_str())
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(token) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req = req
            .body(Full::new(body))
            .map_err(|e| unreachable(e.to_string()))?;
        let (status, bytes) =
            tokio::time::timeout(Duration::from_secs(10), send(TokioIo::new(tcp), req))
                .await
                .map_err(|_| unreachable("no answer within 10s".into()))?
                .map_err(unreachable)?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            Ok(json)
        } else {
            let message = json
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| json.to_string());
            Err(ClientError::Refused { status, message })
        }
    }
}

/// Sends one HTTP/1.1 request on `io` and reads the whole answer.
pub(crate) async fn send<I>(io: I, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

// === the subcommands ===

/// One client subcommand.
#[derive(Debug, Clone)]
pub enum Call {
    /// `serin status [--watch]`.
    Status {
        /// Refresh every second.
        watch: bool,
    },
    /// `serin weight PCT`.
    Weight(f64),
    /// `serin rollout [--steps] [--hold] [--shadow]`.
    Rollout {
        /// Steps in percent.
        steps: Option<Vec<f64>>,
        /// Hold, e.g. `60s`.
        hold: Option<String>,
        /// Hold of a shadow step before the first weight step, e.g. `60s`.
        shadow: Option<String>,
    },
    /// `serin shadow [PCT]`.
    Shadow(Option<f64>),
    /// `serin pause`.
    Pause,
    /// `serin resume`.
    Resume,
    /// `serin promote`.
    Promote,
    /// `serin rollback`.
    Rollback,
}

/// Runs a client subcommand against the control API and prints the answer:
/// a summary for people, or the JSON with `json`.
pub async fn run(call: Call, admin: &AdminTarget, json: bool) -> Result<(), ClientError> {
    let (method, path, body) = match &call {
        Call::Status { .. } => (Method::GET, "/status", None),
        Call::Weight(pct) => (
            Method::PUT,
            "/weight",
            Some(serde_json::json!({ "canary": pct })),
        ),
        Call::Rollout {
            steps,
            hold,
            shadow,
        } => {
            let mut body = serde_json::Map::new();
            if let Some(steps) = steps {
                body.insert("steps".into(), serde_json::json!(steps));
            }
            if let Some(hold) = hold {
                body.insert("hold".into(), serde_json::json!(hold));
            }
            if let Some(shadow) = shadow {
                body.insert("shadow".into(), serde_json::json!(shadow));
            }
            (Method::POST, "/rollout", Some(Value::Object(body)))
        }
        Call::Shadow(pct) => (
            Method::POST,
            "/shadow",
            Some(match pct {
                Some(pct) => serde_json::json!({ "percent": pct }),
                None => serde_json::json!({}),
            }),
        ),
        Call::Pause => (Method::POST, "/pause", None),
        Call::Resume => (Method::POST, "/resume", None),
        Call::Promote => (Method::POST, "/promote", None),
        Call::Rollback => (Method::POST, "/rollback", None),
    };
    let watch = matches!(call, Call::Status { watch: true });
    let tty = stdout_is_tty();
    loop {
        let answer = admin.call(method.clone(), path, body.clone()).await?;
        if watch && tty {
            // Clear the screen and home the cursor before each redraw.
            print!("\x1b[2J\x1b[H");
        }
        if json {
            println!("{answer}");
        } else {
            print!("{}", render_status(&answer, tty));
        }
        if !watch {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        if !tty {
            println!();
        }
    }
}

// === rendering ===

struct Style {
    colour: bool,
}

impl Style {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
}

/// Renders a `/status` answer for people. Colour only when `colour` is set.
pub fn render_status(status: &Value, colour: bool) -> String {
    let style = Style { colour };
    let phase = status["phase"].as_str().unwrap_or("?");
    let phase_code = match phase {
        "rolled_back" => "1;31",
        "promoted" => "1;32",
        "progressing" => "1;36",
        "paused" => "1;33",
        "shadowing" => "1;35",
        _ => "1",
    };
    let mut out = String::new();
    let weight = status["canary_weight"].as_f64().unwrap_or(0.0);
    out.push_str(&format!("phase    {}\n", style.paint(phase_code, phase)));
    out.push_str(&format!("canary   {weight}% of traffic\n"));
    if let (Some(step), Some(steps)) = (status["step"].as_u64(), status["steps"].as_array()) {
        if phase == "progressing" || phase == "paused" {
            let list: Vec<String> = steps.iter().map(|s| format!("{s}%")).collect();
            out.push_str(&format!(
                "step     {} of {} ({})\n",
                step,
                steps.len(),
                list.join(" → ")
            ));
        }
    }
    let shadow = &status["shadow"];
    if phase == "shadowing" {
        out.push_str(&format!(
            "shadow   {}% of eligible requests copied; {} sent, {} skipped; \
             status class differs in {} of {} compared ({:.2}%)\n",
            shadow["percent"].as_f64().unwrap_or(0.0),
            shadow["requests"].as_u64().unwrap_or(0),
            shadow["skipped"].as_u64().unwrap_or(0),
            shadow["mismatches"].as_u64().unwrap_or(0),
            shadow["compared"].as_u64().unwrap_or(0),
            shadow["mismatch_rate"].as_f64().unwrap_or(0.0) * 100.0,
        ));
    }
    if let Some(reason) = status["reason"].as_str().filter(|r| !r.is_empty()) {
        out.push_str(&format!("reason   {reason}\n"));
    }
    out.push_str(&format!(
        "\n{:<8} {:>9} {:>7} {:>8} {:>9} {:>9} {:>9}\n",
        "", "requests", "errors", "error%", "p50", "p95", "p99"
    ));
    for name in ["stable", "canary"] {
        let u = &status["upstreams"][name];
        let rate = u["error_rate"].as_f64().unwrap_or(0.0) * 100.0;
        let line = format!(
            "{:<8} {:>9} {:>7} {:>7.2}% {:>7.1}ms {:>7.1}ms {:>7.1}ms",
            name,
            u["requests"].as_u64().unwrap_or(0),
            u["errors"].as_u64().unwrap_or(0),
            rate,
            u["p50_ms"].as_f64().unwrap_or(0.0),
            u["p95_ms"].as_f64().unwrap_or(0.0),
            u["p99_ms"].as_f64().unwrap_or(0.0),
        );
        out.push_str(&line);
        if let Some(url) = u["url"].as_str() {
            out.push_str(&format!("  {}", style.paint("2", url)));
        }
        out.push('\n');
    }
    out
}

/// True when stdout is a terminal (colour and live redraws allowed).
pub fn stdout_is_tty() -> bool {
    std::io::stdout().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses() {
        assert!(AdminTarget::new("127.0.0.1:9901", None).is_ok());
        assert!(AdminTarget::new("http://127.0.0.1:9901/", None).is_ok());
        assert!(AdminTarget::new("localhost", None).is_err());
        assert!(AdminTarget::new("http://x:1/path", None).is_err());
    }

    #[test]
    fn status_renders_for_people() {
        let status = serde_json::json!({
            "phase": "rolled_back", "canary_weight": 0.0, "step": 1, "steps": [5, 25, 50, 100],
            "reason": "canary error rate 31.0% > 5.0% over 412 requests (window 10s)",
            "upstreams": {
                "stable": {"url": "http://s", "requests": 900, "errors": 1, "error_rate": 0.0011, "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 3.0},
                "canary": {"url": "http://c", "requests": 412, "errors": 128, "error_rate": 0.31, "p50_ms": 1.5, "p95_ms": 2.5, "p99_ms": 3.5}
            }
        });
        let text = render_status(&status, false);
        assert!(text.contains("phase    rolled_back"), "{text}");
        assert!(text.contains("canary error rate 31.0%"));
        assert!(
            text.contains("canary         412     128   31.00%"),
            "{text}"
        );
        assert!(!text.contains('\x1b'));
        assert!(render_status(&status, true).contains("\x1b[1;31mrolled_back"));
    }
}
