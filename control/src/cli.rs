//! The command line: every subcommand and flag of `serin`, with the
//! `SERIN_*` environment variable of each flag. Parsing only; the work is
//! done by `main.rs` and the modules it calls.
//!
//! The flags of `serin run` have no clap default: clap would fill it in and
//! it would beat the config file (flags > environment > file > defaults).
//! Their help shows the default all the same, appended by `with_default`
//! from [`crate::defaults`], so the help cannot drift from what
//! [`crate::config::Config::from_raw`] uses.

use std::fmt::Display;
use std::path::PathBuf;

use clap::{Arg, Args, Parser, Subcommand};

use crate::config::Overrides;
use crate::defaults::{self, duration_text, steps_text};

/// Appends ` [default: {shown}]` to a flag's help, for a flag whose default
/// is applied after the config file rather than by clap.
fn with_default(shown: impl Display) -> impl FnOnce(Arg) -> Arg {
    let shown = shown.to_string();
    move |arg| {
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        arg.help(format!("{help} [default: {shown}]"))
    }
}

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
    #[command(
        mut_arg("steps", with_default(format_args!(
            "the server's rollout.steps, {} unless configured",
            steps_text(&defaults::ROLLOUT_STEPS)
        ))),
        mut_arg("hold", with_default(format_args!(
            "the server's rollout.hold, {} unless configured",
            duration_text(defaults::ROLLOUT_HOLD)
        ))),
    )]
    Rollout {
        /// Steps in percent, comma-separated.
        #[arg(long, value_delimiter = ',')]
        steps: Option<Vec<f64>>,
        /// Minimum time on each step, e.g. 60s or 5m.
        #[arg(long)]
        hold: Option<String>,
        /// Shadow the canary this long before the first step (phase `shadowing`), e.g. 60s.
        #[arg(long)]
        shadow: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Copy a share of stable's requests to the canary and judge its answers, with no user
    /// sent to it: phase `shadowing`.
    #[command(mut_arg("percent", with_default(format_args!(
        "the server's shadow.percent, {} unless configured",
        defaults::SHADOW_PERCENT
    ))))]
    Shadow {
        /// Share of stable's eligible requests copied, (0, 100].
        #[arg(allow_negative_numbers = true)]
        percent: Option<f64>,
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
    /// Print the SerinRollout CustomResourceDefinition (YAML) for `kubectl apply -f -`.
    Crd,
    /// Validate a config file and print what is wrong and where.
    Check {
        /// The TOML config file to check.
        #[arg(long, short, env = "SERIN_CONFIG")]
        config: PathBuf,
    },
}

/// Flags of `serin run`. Each overrides the config file.
#[derive(Debug, Args)]
#[command(
    mut_arg("listen", with_default(defaults::LISTEN)),
    mut_arg("canary_weight", with_default(defaults::CANARY_WEIGHT)),
    mut_arg("admin", with_default(defaults::ADMIN)),
    mut_arg("state_dir", with_default(defaults::STATE_DIR)),
    mut_arg("workers", with_default(defaults::WORKERS)),
    mut_arg("judge_max_error_rate", with_default(defaults::MAX_ERROR_RATE)),
    mut_arg("judge_max_p95", with_default(duration_text(defaults::MAX_P95))),
    mut_arg("log_format", with_default(defaults::LOG_FORMAT)),
    mut_arg(
        "fleet_report_interval",
        with_default(duration_text(defaults::FLEET_REPORT_INTERVAL))
    ),
    mut_arg(
        "fleet_lease_duration",
        with_default(duration_text(defaults::FLEET_LEASE_DURATION))
    )
)]
pub struct RunArgs {
    /// TOML config file (optional; flags and SERIN_* variables override it).
    #[arg(long, short, env = "SERIN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Client-facing listen address.
    #[arg(long, env = "SERIN_LISTEN")]
    pub listen: Option<String>,
    /// Stable upstream URL, e.g. http://127.0.0.1:8081.
    #[arg(long, env = "SERIN_STABLE")]
    pub stable: Option<String>,
    /// Canary upstream URL, e.g. http://127.0.0.1:8082.
    #[arg(long, env = "SERIN_CANARY")]
    pub canary: Option<String>,
    /// Starting canary weight in percent (used when no saved state exists).
    #[arg(long, env = "SERIN_CANARY_WEIGHT")]
    pub canary_weight: Option<f64>,
    /// Control API listen address.
    #[arg(long, env = "SERIN_ADMIN")]
    pub admin: Option<String>,
    /// Bearer token required by mutating control API calls.
    #[arg(long, env = "SERIN_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Directory for durable state.
    #[arg(long, env = "SERIN_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Worker threads, each with its own listener and pools.
    #[arg(long, env = "SERIN_WORKERS")]
    pub workers: Option<usize>,
    /// Judge: absolute ceiling on the canary error rate, 0..1.
    #[arg(long, env = "SERIN_JUDGE_MAX_ERROR_RATE")]
    pub judge_max_error_rate: Option<f64>,
    /// Judge: absolute ceiling on the canary p95, e.g. 800ms.
    #[arg(long, env = "SERIN_JUDGE_MAX_P95")]
    pub judge_max_p95: Option<String>,
    /// serin's own log lines: auto (text on a terminal, JSON otherwise), text or json.
    #[arg(long, env = "SERIN_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Write an access log line per request, to "stdout" or a file (see [access_log] for the rest).
    #[arg(long, env = "SERIN_ACCESS_LOG", value_name = "stdout|PATH")]
    pub access_log: Option<String>,
    /// Join the fleet of this SerinRollout (NAMESPACE/NAME): one rollout for every member.
    #[arg(long, env = "SERIN_FLEET")]
    pub fleet: Option<String>,
    /// This member's name in the fleet [default: the host name, which is the pod's name].
    #[arg(long, env = "SERIN_FLEET_MEMBER")]
    pub fleet_member: Option<String>,
    /// How often a fleet member reports its windows.
    #[arg(long, env = "SERIN_FLEET_REPORT_INTERVAL")]
    pub fleet_report_interval: Option<String>,
    /// How long the fleet's leader may go without renewing its Lease.
    #[arg(long, env = "SERIN_FLEET_LEASE_DURATION")]
    pub fleet_lease_duration: Option<String>,
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
            log_format: self.log_format.clone(),
            access_log: self.access_log.clone(),
            fleet: self.fleet.clone(),
            fleet_member: self.fleet_member.clone(),
            fleet_report_interval: self.fleet_report_interval.clone(),
            fleet_lease_duration: self.fleet_lease_duration.clone(),
        }
    }
}

/// How the client subcommands reach a running serin.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The control API, host:port or http://host:port.
    #[arg(long, env = "SERIN_ADMIN", default_value = defaults::ADMIN)]
    pub admin: String,
    /// Bearer token for mutating calls.
    #[arg(long, env = "SERIN_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the server's JSON answer instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// Act on a fleet's SerinRollout (NAMESPACE/NAME) through kubeconfig, as kubectl does,
    /// instead of one serin's control API.
    #[arg(long, env = "SERIN_FLEET")]
    pub fleet: Option<String>,
}

/// Flags of `serin demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Plain output without colours or live redraws (for logs and CI).
    #[arg(long)]
    pub plain: bool,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// The long help of `serin <sub>`, one entry per flag: `(flag, text)`,
    /// with the text's whitespace collapsed.
    fn flag_help(sub: &str) -> Vec<(String, String)> {
        let mut cli = Cli::command();
        let help = cli
            .find_subcommand_mut(sub)
            .unwrap()
            .render_long_help()
            .to_string();
        let mut flags: Vec<(String, String)> = Vec::new();
        for line in help.lines() {
            let words = line.split_whitespace().collect::<Vec<_>>();
            match words.iter().position(|w| w.starts_with("--")) {
                Some(at) if line.trim_start().starts_with('-') => {
                    let rest = words[at + 1..].join(" ");
                    let rest = rest.split_once("> ").map_or("", |(_, text)| text);
                    flags.push((words[at].to_string(), rest.to_string()));
                }
                _ => {
                    if let Some((_, text)) = flags.last_mut() {
                        text.push(' ');
                        text.push_str(&words.join(" "));
                    }
                }
            }
        }
        flags
    }

    fn assert_shows(sub: &str, flag: &str, default: &str) {
        let flags = flag_help(sub);
        let (_, text) = flags
            .iter()
            .find(|(f, _)| f == flag)
            .unwrap_or_else(|| panic!("`serin {sub} --help` has no {flag}: {flags:?}"));
        assert!(
            text.contains(&format!("[default: {default}]")),
            "`serin {sub} --help` should show {flag}'s default {default:?}, shows: {text}"
        );
    }

    #[test]
    fn run_help_shows_the_defaults_from_the_constants() {
        assert_shows("run", "--listen", defaults::LISTEN);
        assert_shows(
            "run",
            "--canary-weight",
            &defaults::CANARY_WEIGHT.to_string(),
        );
        assert_shows("run", "--admin", defaults::ADMIN);
        assert_shows("run", "--state-dir", defaults::STATE_DIR);
        assert_shows("run", "--workers", &defaults::WORKERS.to_string());
        assert_shows(
            "run",
            "--judge-max-error-rate",
            &defaults::MAX_ERROR_RATE.to_string(),
        );
        assert_shows("run", "--judge-max-p95", &duration_text(defaults::MAX_P95));
        // Literal, so a broken `duration_text` cannot hide a wrong value.
        assert_shows("run", "--listen", "127.0.0.1:8080");
        assert_shows("run", "--judge-max-p95", "1s");
    }

    #[test]
    fn rollout_and_client_help_show_the_defaults_from_the_constants() {
        assert_shows(
            "rollout",
            "--steps",
            &format!(
                "the server's rollout.steps, {} unless configured",
                steps_text(&defaults::ROLLOUT_STEPS)
            ),
        );
        assert_shows(
            "rollout",
            "--hold",
            &format!(
                "the server's rollout.hold, {} unless configured",
                duration_text(defaults::ROLLOUT_HOLD)
            ),
        );
        // The client subcommands have no config file, so clap's own default is right.
        assert_shows("status", "--admin", defaults::ADMIN);
    }

    /// A clap default would fill in a value the config file should provide
    /// (flags > environment > file > defaults).
    #[test]
    fn run_flags_have_no_clap_default() {
        let cli = Cli::command();
        let run = cli.find_subcommand("run").unwrap();
        for arg in run.get_arguments() {
            assert!(
                arg.get_default_values().is_empty(),
                "`serin run --{}` has a clap default; show it in the help instead",
                arg.get_id()
            );
        }
        let Command::Run(args) = Cli::try_parse_from(["serin", "run"]).unwrap().command else {
            panic!("not run");
        };
        let o = args.overrides();
        assert!(o.listen.is_none() && o.workers.is_none() && o.admin.is_none());
    }
}
