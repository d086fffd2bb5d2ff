use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use popivr::call::Level;
use popivr::config;
use popivr::logging::Logger;

/// Interactive screen pops for Asterisk: the caller hears hold audio while
/// agents get an XMPP message and steer the call with their reply.
///
/// Asterisk starts popivr once per call:
///   ExternalIVR(/usr/bin/popivr(PROFILE[,key=value...]),OPTIONS)
/// which is the same as `popivr run PROFILE [key=value...]`.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "POPIVR_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,

    /// More log lines on stderr (-v info, -vv debug). Warnings and errors always.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Handle one call on stdin/stdout (what Asterisk's ExternalIVR runs).
    Run {
        /// The profile section of the configuration.
        profile: String,
        /// `key=value` values for the templates (`${key}`).
        args: Vec<String>,
    },
    /// Validate the configuration, log in with each account a profile uses,
    /// and report what it finds. Exit status 0 only if all is well.
    Check {
        /// Only validate the file; don't log in.
        #[arg(long)]
        offline: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(with_default_subcommand(std::env::args_os().collect()));
    let level = match cli.verbose {
        0 => Level::Warn,
        1 => Level::Info,
        _ => Level::Debug,
    };
    let log = Logger::new("popivr", level);
    let result = match cli.command {
        Cmd::Run { profile, args } => run(&cli.config, &profile, &args, log.clone()),
        Cmd::Check { offline } => check(&cli.config, offline),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log.error(&format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Asterisk passes the profile as the first argument: `popivr sales ...`
/// means `popivr run sales ...`.
fn with_default_subcommand(mut argv: Vec<OsString>) -> Vec<OsString> {
    const KNOWN: &[&str] = &["run", "check", "help"];
    let mut i = 1;
    while let Some(arg) = argv.get(i).and_then(|a| a.to_str()) {
        match arg {
            "--config" => i += 2,
            "--" => return argv,
            a if a.starts_with('-') => i += 1,
            a if KNOWN.contains(&a) => return argv,
            _ => {
                argv.insert(i, "run".into());
                return argv;
            }
        }
    }
    argv
}

fn run(path: &std::path::Path, profile: &str, args: &[String], log: Logger) -> Result<()> {
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

fn check(path: &std::path::Path, offline: bool) -> Result<()> {
    let config = config::load_file(path)?;
    println!("{}: configuration is valid", path.display());
    for w in &config.warnings {
        println!("warning: {w}");
    }
    for (name, p) in &config.profiles {
        println!(
            "profile [{name}]: {} target(s), {} reply rule(s), {} key(s), timeout {:?}",
            p.targets.len(),
            p.replies.len(),
            p.keys.len(),
            p.timeout
        );
    }
    if config.profiles.is_empty() {
        bail!("{} defines no profile", path.display());
    }
    let used: std::collections::BTreeSet<&str> = config
        .profiles
        .values()
        .filter(|p| !p.targets.is_empty())
        .map(|p| p.account.as_str())
        .collect();
    if offline || used.is_empty() {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let mut failed = 0;
    for name in used {
        let Some(account) = config.accounts.get(name) else {
            continue;
        };
        let server = account.serverhost.as_deref().unwrap_or("the JID's domain");
        match rt.block_on(popivr::xmpp::login(account)) {
            Ok(conn) => println!(
                "account [{name}]: logged in as {} via {server}:{} ({}, {})",
                conn.jid, account.port, conn.mechanism, conn.timings
            ),
            Err(e) => {
                failed += 1;
                println!(
                    "account [{name}]: login FAILED via {server}:{}: {e}",
                    account.port
                );
            }
        }
    }
    if failed > 0 {
        bail!("{failed} account(s) could not log in");
    }
    Ok(())
}
