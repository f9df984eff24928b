//! serin's control plane and process wiring: configuration, the CLI, and
//! [`serve`], which starts the data plane and runs until SIGTERM/SIGINT.

pub mod cli;
pub mod client;
pub mod config;
pub mod inject;
pub mod metrics;
pub mod webhook;

use serin_proxy::{Proxy, RouteTable, Routes};

use crate::config::Config;

/// Why `serve` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data plane could not start.
    #[error(transparent)]
    Proxy(#[from] serin_proxy::StartError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Logs to stderr with the given filter (e.g. "info", "serin_proxy=debug"),
/// overridden by `RUST_LOG` when set.
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs serin with a validated config until SIGTERM or SIGINT, then drains
/// in-flight requests and returns.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ServeError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Signals)?;

    let routes = Routes::new(RouteTable::new(config.canary_weight_bp));
    let proxy = Proxy::start(config.proxy.clone(), routes)?;
    println!(
        "serin: proxy listening on {} (stable {}, canary {} at {}%)",
        proxy.local_addr(),
        config.proxy.stable.url,
        config.proxy.canary.url,
        f64::from(config.canary_weight_bp) / 100.0
    );
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
    proxy.shutdown();
    proxy.wait().await;
    tracing::info!("stopped");
    Ok(())
}
