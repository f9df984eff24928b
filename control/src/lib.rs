//! serin's control plane and the process around it: configuration, the CLI,
//! the judge, the rollout state machine, the state store, the controller that
//! ties them to the data plane's route table and stats, the control API,
//! metrics and webhooks, and [`serve`], which runs it all until SIGTERM/SIGINT.
//!
//! Nothing here runs on the request path. The data plane only ever sees the
//! results: a new route table swapped in whole.

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod controller;
pub mod defaults;
pub mod demo;
pub mod fleet;

pub mod inject;
pub mod judge;
pub mod metrics;
pub mod rollout;
pub mod store;
pub mod webhook;

#[cfg(test)]
mod test_support;

use std::net::SocketAddr;
use std::sync::Arc;

pub use controller::{
    Controller, ControllerConfig, ControllerError, Notification, Status, UpstreamStatus, Upstreams,
};
pub use judge::{Evidence, Judge, JudgePolicy, Look, PolicyError, Verdict};
pub use rollout::{
    parse_hold, Actor, Event, Phase, Rollout, RolloutError, RolloutSnapshot, RolloutState,
    Transition,
};
pub use store::{PersistedState, StateStore, StoreError};

use serin_proxy::{Proxy, RouteTable, Routes};
use tokio::sync::{mpsc, watch};

use crate::api::Api;
use crate::config::{Config, LogFormat};
use crate::fleet::member::{Member, MemberSettings};
use crate::metrics::Metrics;
use crate::webhook::{RetryPolicy, WebhookEvent, Webhooks};

/// Why `serve` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data plane could not start.
    #[error(transparent)]
    Proxy(#[from] serin_proxy::StartError),
    /// The control API could not bind.
    #[error("cannot listen on {addr} for the control API: {source} (pick another with --admin)")]
    AdminBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The controller refused the policy.
    #[error(transparent)]
    Controller(#[from] ControllerError),
    /// Fleet mode could not start (no Kubernetes configuration).
    #[error(transparent)]
    Fleet(#[from] crate::fleet::ops::FleetError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Logs to stderr with the given filter (e.g. "info", "serin_proxy=debug"),
/// overridden by `RUST_LOG` when set, in `format`: `Auto` is text on a
/// terminal and JSON lines otherwise. Colour codes only on a terminal: a
/// file, a pipe or a log collector never gets escape codes.
pub fn init_logging(filter: &str, format: LogFormat) {
    use std::io::IsTerminal;
    let terminal = std::io::stderr().is_terminal();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !terminal,
    };
    let _ = if json {
        builder.json().with_ansi(false).try_init()
    } else {
        builder.with_ansi(terminal).try_init()
    };
}

/// A running serin: data plane, controller and control API.
pub struct Running {
    /// The data plane.
    pub proxy: Proxy,
    /// The controller (judge loop, rollout, state).
    pub controller: Controller,
    /// The control API's address.
    pub admin_addr: SocketAddr,
    api: Arc<Api>,
    stop_api: watch::Sender<bool>,
}

impl Running {
    /// Starts everything `config` describes. Binds the proxy and the control
    /// API, loads the saved state, and starts the judge loop. Until the
    /// state is loaded the route table is closed (every request to stable,
    /// overrides included), so a rolled-back canary is never reachable, and
    /// the control API's `/readyz` answers 503.
    pub async fn start(config: Config) -> Result<Self, ServeError> {
        // A fleet member needs its Kubernetes client before anything binds,
        // so a missing kubeconfig fails fast and says so.
        let kube = match &config.fleet {
            Some(_) => Some(
                kube::Client::try_default()
                    .await
                    .map_err(|e| crate::fleet::ops::FleetError::Config(e.to_string()))?,
            ),
            None => None,
        };
        let routes = Routes::new(RouteTable::closed());
        let proxy = Proxy::start(config.proxy.clone(), routes.clone())?;
        let admin = config.admin.listen;
        let listener = tokio::net::TcpListener::bind(admin)
            .await
            .map_err(|source| ServeError::AdminBind {
                addr: admin,
                source,
            })?;
        let admin_addr = listener
            .local_addr()
            .map_err(|source| ServeError::AdminBind {
                addr: admin,
                source,
            })?;

        // The API answers from now on: its probes say "not ready" until the
        // saved state is loaded, and every other call says to retry.
        let api = Arc::new(Api::starting(config.admin.token.clone()));
        let (stop_api, stopped) = watch::channel(false);
        tokio::spawn(api::serve(listener, api.clone(), stopped));

        let (events, notifications) = mpsc::channel(256);
        let controller_config = ControllerConfig {
            policy: config.judge.policy.clone(),
            interval: config.judge.interval,
            min_requests_per_step: config.rollout.min_requests_per_step,
            default_steps: config.rollout.steps.clone(),
            default_hold: config.rollout.hold,
            default_shadow_hold: config.rollout.shadow,
            default_shadow_percent: config.rollout.shadow_percent,
            initial_weight: f64::from(config.canary_weight_bp) / 100.0,
            stable_url: config.proxy.stable.url.clone(),
            canary_url: config.proxy.canary.url.clone(),
            fleet_member: config.fleet.is_some(),
            ..ControllerConfig::default()
        };
        let controller = Controller::start(
            controller_config,
            routes,
            proxy.stats().clone(),
            StateStore::new(&config.state_dir),
            Some(events),
        )
        .await?;
        let webhooks = Webhooks::start(config.webhooks.clone(), RetryPolicy::default());
        let metrics = Arc::new(Metrics::new(controller.clone(), webhooks.stats().clone()));
        tokio::spawn(forward_notifications(notifications, webhooks));

        let member = match (&config.fleet, kube) {
            (Some(fleet), Some(client)) => {
                let mut settings = MemberSettings::new(
                    fleet.target.clone(),
                    fleet.member.clone(),
                    config.judge.clone(),
                );
                settings.report_interval = fleet.report_interval;
                settings.lease_duration = fleet.lease_duration;
                let member = Member::with_client(client, settings, controller.clone());
                metrics.attach_fleet(member.clone());
                Some(member)
            }
            _ => None,
        };
        api.attach(controller.clone(), metrics, member.clone());
        api.set_ready(true);
        Ok(Self {
            proxy,
            controller,
            admin_addr,
            api,
            stop_api,
        })
    }

    /// Stops accepting, drains in-flight requests, then stops the API.
    pub async fn shutdown(self) {
        self.api.set_ready(false);
        self.proxy.shutdown();
        self.proxy.wait().await;
        let _ = self.stop_api.send(true);
    }
}

/// Turns controller notifications into webhook deliveries.
async fn forward_notifications(
    mut notifications: mpsc::Receiver<Notification>,
    webhooks: Webhooks,
) {
    // The controller logs every event; this only forwards them.
    let mut seq = 0u64;
    let boot = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    while let Some(n) = notifications.recv().await {
        seq += 1;
        webhooks.notify(WebhookEvent {
            id: format!("{boot:x}-{seq}"),
            event: n.event.as_str().to_string(),
            at: n.at,
            canary_weight: n.canary_weight,
            phase: n.phase.as_str().to_string(),
            reason: n.reason,
            upstreams: serde_json::to_value(&n.upstreams).unwrap_or_default(),
        });
    }
}

/// Runs serin with a validated config until SIGTERM or SIGINT, then drains
/// in-flight requests and returns.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ServeError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Signals)?;

    let running = Running::start(config.clone()).await?;
    let status = running.controller.status().await;
    // Standard output is the access log's when it writes there: only its
    // lines go there then, so a collector can parse every one.
    let banner = |line: String| match &config.proxy.access_log {
        Some(log) if log.sink == serin_proxy::access_log::LogSink::Stdout => eprintln!("{line}"),
        _ => println!("{line}"),
    };
    banner(format!(
        "serin: control API listening on {}",
        running.admin_addr
    ));
    banner(format!(
        "serin: proxy listening on {} (stable {}, canary {} at {}%, phase {})",
        running.proxy.local_addr(),
        config.proxy.stable.url,
        config.proxy.canary.url,
        status.rollout.canary_weight,
        status.rollout.phase.as_str(),
    ));
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}
