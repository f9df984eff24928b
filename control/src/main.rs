//! The `serin` binary: parses the command line and wires the data plane and
//! the control plane together.

use std::process::ExitCode;

use clap::Parser;
use serin_control::cli::{AdminArgs, Cli, Command, RunArgs};
use serin_control::client::{self, AdminTarget, Call};
use serin_control::config::{Config, Overrides};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Demo(args) => demo(args.plain),
        Command::Inject(args) => inject(*args),
        Command::Status { watch, admin } => call(Call::Status { watch }, admin),
        Command::Weight { percent, admin } => call(Call::Weight(percent), admin),
        Command::Rollout {
            steps,
            hold,
            shadow,
            admin,
        } => call(
            Call::Rollout {
                steps,
                hold,
                shadow,
            },
            admin,
        ),
        Command::Shadow { percent, admin } => call(Call::Shadow(percent), admin),
        Command::Pause(admin) => call(Call::Pause, admin),
        Command::Resume(admin) => call(Call::Resume, admin),
        Command::Promote(admin) => call(Call::Promote, admin),
        Command::Rollback(admin) => call(Call::Rollback, admin),
        Command::Crd => {
            print!("{}", serin_control::fleet::crd::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Check { config } => match Config::load(Some(&config), &Overrides::default())
            .and_then(|c| c.check_files().map(|()| c))
        {
            Ok(c) => {
                println!(
                    "{}: ok (listen {}, stable {}, canary {} at {}%, admin {})",
                    config.display(),
                    c.proxy.listen,
                    c.proxy.stable.url,
                    c.proxy.canary.url,
                    f64::from(c.canary_weight_bp) / 100.0,
                    c.admin.listen
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("serin check: {e}");
                ExitCode::from(2)
            }
        },
    }
}

/// Runs `work` on a current-thread runtime (the control plane's; the data
/// plane has its own worker threads) and turns its outcome into an exit code:
/// 0 on success, `failure` after printing the error with `context`.
fn finish<F, E>(context: &str, failure: u8, work: F) -> ExitCode
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{context}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{context}: {e}");
            ExitCode::from(failure)
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    let config = match Config::load(args.config.as_deref(), &args.overrides()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("serin: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    serin_control::init_logging(&config.log, config.log_format);
    finish("serin", 1, serin_control::serve(config))
}

fn inject(args: serin_control::inject::InjectArgs) -> ExitCode {
    serin_control::init_logging(
        serin_control::defaults::LOG,
        serin_control::config::LogFormat::Auto,
    );
    finish("serin inject", 2, serin_control::inject::run(args))
}

fn call(call: Call, args: AdminArgs) -> ExitCode {
    if let Some(fleet) = args.fleet {
        let target = match fleet.parse() {
            Ok(target) => target,
            Err(e) => {
                eprintln!("serin: {e}");
                return ExitCode::from(2);
            }
        };
        return finish("serin", 1, async move {
            serin_control::fleet::ops::run_cli(call, target, args.json).await
        });
    }
    finish("serin", 1, async move {
        let admin = AdminTarget::new(&args.admin, args.token)?;
        client::run(call, &admin, args.json).await
    })
}

fn demo(plain: bool) -> ExitCode {
    serin_control::init_logging("error", serin_control::config::LogFormat::Text);
    let state_dir = std::env::temp_dir().join(format!("serin-demo-{}", std::process::id()));
    let code = finish("serin demo", 1, serin_control::demo::run(plain, &state_dir));
    let _ = std::fs::remove_dir_all(&state_dir);
    code
}
