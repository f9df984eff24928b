//! The `serin` binary: parses the command line and wires the data plane and
//! the control plane together.

use std::process::ExitCode;

use clap::Parser;
use serin_control::cli::{Cli, Command, RunArgs};
use serin_control::config::{Config, Overrides};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Demo(_) => {
            eprintln!("serin demo arrives with the control plane; for now try `serin run --stable URL --canary URL`");
            ExitCode::from(2)
        }
        Command::Inject(args) => inject(*args),
        Command::Check { config } => match Config::load(Some(&config), &Overrides::default()) {
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

fn run(args: RunArgs) -> ExitCode {
    let config = match Config::load(args.config.as_deref(), &args.overrides()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("serin: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    serin_control::init_logging(&config.log);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("serin: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serin_control::serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("serin: {e}");
            ExitCode::FAILURE
        }
    }
}

fn inject(args: serin_control::inject::InjectArgs) -> ExitCode {
    serin_control::init_logging("info");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("serin: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serin_control::inject::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("serin inject: {e}");
            ExitCode::from(2)
        }
    }
}
