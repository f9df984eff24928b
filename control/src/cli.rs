//! The command line: every subcommand and flag of `serin`, with the
//! `SERIN_*` environment variable of each flag. Parsing only; the work is
//! done by `main.rs` and the modules it calls.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Overrides;

/// serin: a canary proxy that splits traffic between stable and canary,
/// judges the canary from the requests it forwards, and reverts it in
/// milliseconds when it breaks.
#[derive(Debug, Parser)]
#[command(name = "serin", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy and the control API.
    Run(Box<RunArgs>),
    /// A self-contained tour: demo upstreams, a rollout, a breaking canary, the auto-revert.
    Demo(DemoArgs),
    /// Add the serin sidecar to Kubernetes manifests, or serve the injection webhook.
    Inject(Box<crate::inject::InjectArgs>),
    /// Show the phase, weight, reason and both upstreams' windows.
    Status {
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Set the canary weight by hand (percent, e.g. 12.5): phase `manual`.
    Weight {
        /// Canary share of traffic, 0..=100.
        #[arg(allow_negative_numbers = true)]
        percent: f64,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Start a progressive rollout: phase `progressing`.
    Rollout {
        /// Steps in percent, comma-separated [default: 5,25,50,100].
        #[arg(long, value_delimiter = ',')]
        steps: Option<Vec<f64>>,
        /// Minimum time on each step, e.g. 60s or 5m [default: 60s].
        #[arg(long)]
        hold: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Freeze a running rollout (the judge still guards it).
    Pause(AdminArgs),
    /// Continue a paused rollout, or return a rolled-back canary to where it was.
    Resume(AdminArgs),
    /// Send all traffic to the canary: phase `promoted`.
    Promote(AdminArgs),
    /// Send no traffic to the canary, latched: phase `rolled_back`.
    Rollback(AdminArgs),
    /// Validate a config file and print what is wrong and where.
    Check {
        /// The TOML config file to check.
        #[arg(long, short, env = "SERIN_CONFIG")]
        config: PathBuf,
    },
}

/// Flags of `serin run`. Each overrides the config file.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML config file (optional; flags and SERIN_* variables override it).
    #[arg(long, short, env = "SERIN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Client-facing listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "SERIN_LISTEN")]
    pub listen: Option<String>,
    /// Stable upstream URL, e.g. http://127.0.0.1:8081.
    #[arg(long, env = "SERIN_STABLE")]
    pub stable: Option<String>,
    /// Canary upstream URL, e.g. http://127.0.0.1:8082.
    #[arg(long, env = "SERIN_CANARY")]
    pub canary: Option<String>,
    /// Starting canary weight in percent (used when no saved state exists) [default: 0].
    #[arg(long, env = "SERIN_CANARY_WEIGHT")]
    pub canary_weight: Option<f64>,
    /// Control API listen address [default: 127.0.0.1:9901].
    #[arg(long, env = "SERIN_ADMIN")]
    pub admin: Option<String>,
    /// Bearer token required by mutating control API calls.
    #[arg(long, env = "SERIN_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Directory for durable state [default: ./serin-state].
    #[arg(long, env = "SERIN_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Worker threads, each with its own listener and pools [default: 1].
    #[arg(long, env = "SERIN_WORKERS")]
    pub workers: Option<usize>,
    /// Judge: absolute ceiling on the canary error rate, 0..1 [default: 0.05].
    #[arg(long, env = "SERIN_JUDGE_MAX_ERROR_RATE")]
    pub judge_max_error_rate: Option<f64>,
    /// Judge: absolute ceiling on the canary p95, e.g. 800ms [default: 1000ms].
    #[arg(long, env = "SERIN_JUDGE_MAX_P95")]
    pub judge_max_p95: Option<String>,
}

impl RunArgs {
    /// The values that override the config file.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            stable: self.stable.clone(),
            canary: self.canary.clone(),
            canary_weight: self.canary_weight,
            admin: self.admin.clone(),
            admin_token: self.admin_token.clone(),
            state_dir: self.state_dir.clone(),
            workers: self.workers,
            max_error_rate: self.judge_max_error_rate,
            max_p95: self.judge_max_p95.clone(),
        }
    }
}

/// How the client subcommands reach a running serin.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The control API, host:port or http://host:port.
    #[arg(long, env = "SERIN_ADMIN", default_value = "127.0.0.1:9901")]
    pub admin: String,
    /// Bearer token for mutating calls.
    #[arg(long, env = "SERIN_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the server's JSON answer instead of a summary.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `serin demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Plain output without colours or live redraws (for logs and CI).
    #[arg(long)]
    pub plain: bool,
}
