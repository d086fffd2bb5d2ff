mod check;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;

use popivr::cli::{Cli, Cmd, level, with_default_subcommand};
use popivr::config;
use popivr::logging::Logger;

fn main() -> ExitCode {
    let cli = Cli::parse_from(with_default_subcommand(std::env::args_os().collect()));
    let log = Logger::new("popivr", level(&cli));
    let result = match cli.command {
        Cmd::Run { profile, args } => run(&cli.config, &profile, &args, log.clone()),
        Cmd::Check {
            offline,
            strict,
            presence_wait,
        } => seconds(presence_wait, "--presence-wait").and_then(|presence_wait| {
            check::check(
                &cli.config,
                check::Options {
                    offline,
                    strict,
                    presence_wait,
                },
            )
        }),
        Cmd::Serve {
            listen,
            max_calls,
            drain_timeout,
            id_prefix,
        } => serve(
            popivr::serve::Options {
                config: cli.config.clone(),
                listen,
                max_calls,
                drain_timeout: Duration::from_secs(drain_timeout),
                id_prefix,
            },
            log.clone(),
        ),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            log.error(&format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

fn run(path: &std::path::Path, profile: &str, args: &[String], log: Logger) -> Result<ExitCode> {
    let config = config::load_file(path)?;
    let profile = config
        .profiles
        .get(profile)
        .with_context(|| format!("no profile [{profile}] in {}", path.display()))?;
    let setup = popivr::run::CallSetup::new(&config, profile, args);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(popivr::run::run_call(setup, log))?;
    // The stdin reader may still sit in a blocking read; the call is over.
    std::process::exit(0)
}

fn serve(opts: popivr::serve::Options, log: Logger) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(popivr::serve::serve(opts, log))?;
    // Blocking reads may linger in the runtime's pool; the daemon is done.
    std::process::exit(0)
}

/// A command-line duration: 0 to 60 seconds.
fn seconds(value: f64, option: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| *d <= Duration::from_secs(60))
        .with_context(|| format!("{option} takes seconds from 0 to 60"))
}
