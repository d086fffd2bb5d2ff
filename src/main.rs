mod check;
mod demo;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use popivr::call::Level;
use popivr::config;
use popivr::logging::Logger;

/// Interactive screen pops for Asterisk over XMPP.
///
/// While a caller hears hold audio, popivr sends the call's details to
/// agents as an instant message; the agent's reply ("1", "2", "fwd 2001")
/// decides where the call goes next. Asterisk starts popivr once per call
/// with ExternalIVR, program arguments inside the parentheses:
///
///   exten => 100,n,ExternalIVR(/usr/bin/popivr(sales,queue=eu))
///
/// which runs `popivr sales queue=eu`, the same as `popivr run sales
/// queue=eu`. popivr then sets POPIVR_ACTION (and POPIVR_REPLY,
/// POPIVR_AGENT, POPIVR_TARGET) for the dialplan to act on.
#[derive(Parser)]
#[command(
    name = "popivr",
    version,
    about,
    long_about,
    after_help = "Try it: `popivr demo` runs one call end to end on this machine.",
    after_long_help = "\
EXAMPLES:
    popivr demo                  one call end to end with a throw-away XMPP server
    popivr check                 validate /etc/asterisk/popivr.conf and log in
    popivr --config my.conf check --offline
    popivr sales queue=eu        what ExternalIVR(/usr/bin/popivr(sales,queue=eu)) runs

LOGS:
    Log lines go to stderr, one per event: `popivr[CALL]: LEVEL: text`. Under
    ExternalIVR Asterisk copies them into its log as NOTICEs prefixed `stderr:`.
    Warnings and errors by default; -v adds the call's steps, -vv the whole
    ExternalIVR conversation, -q leaves only errors. POPIVR_LOG sets the base
    level where argv is awkward. Secrets are never logged.

FILES:
    /etc/asterisk/popivr.conf    the configuration (see popivr.conf.sample)"
)]
struct Cli {
    /// Configuration file.
    #[arg(
        short,
        long,
        global = true,
        value_name = "FILE",
        env = "POPIVR_CONFIG",
        default_value = config::DEFAULT_PATH
    )]
    config: PathBuf,

    /// More log lines on stderr: -v info (pops, replies, actions),
    /// -vv debug (every ExternalIVR line). Repeatable.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Fewer log lines on stderr: -q errors only.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    quiet: u8,

    /// Base log level, before -v and -q.
    #[arg(
        long,
        global = true,
        value_name = "LEVEL",
        env = "POPIVR_LOG",
        default_value = "warn",
        hide_env_values = true
    )]
    log_level: LogLevel,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

#[derive(Subcommand)]
enum Cmd {
    /// Handle one call on stdin/stdout (what Asterisk's ExternalIVR runs).
    ///
    /// The word `run` may be left out: `popivr sales` is `popivr run sales`.
    /// Commands go to stdout, events come on stdin, logs go to stderr.
    /// popivr exits when Asterisk closes stdin, on SIGTERM or SIGHUP, and
    /// after its own E or H.
    Run {
        /// The profile section of the configuration.
        profile: String,
        /// `key=value` values for the texts (`${key}`). Others are ignored.
        args: Vec<String>,
    },
    /// Check the configuration and the XMPP accounts; exit 1 on a problem.
    ///
    /// Validates the file (every problem with file:line), points out risky
    /// settings (plaintext XMPP, open forward patterns, odd timeouts …),
    /// logs in with each account a profile uses and reports TLS and
    /// authentication results, then each target's presence subscription
    /// and presence (asking targets for a subscription where it is
    /// missing). Secrets are never printed. Exit status 0 when all is well,
    /// 1 otherwise (also when a target has not accepted the subscription
    /// and so gets no pops).
    Check {
        /// Only validate the file; don't log in.
        #[arg(long)]
        offline: bool,
        /// Fail on warnings and risky settings too.
        #[arg(long)]
        strict: bool,
        /// Seconds to wait for the targets' presence after login.
        #[arg(long, default_value = "3", value_name = "SECONDS")]
        presence_wait: f64,
    },
    /// Serve many calls as a daemon over ivr:// (one XMPP session per account).
    ///
    /// Asterisk connects with
    /// ExternalIVR(ivr://HOST:2949(PROFILE[,key=value...]),OPTIONS);
    /// each connection is one call. Logs go to stderr with the call's id
    /// (`popivr[17]`). SIGTERM drains (no new calls; running ones end or
    /// take their default action after --drain-timeout), SIGHUP reloads
    /// the configuration for new calls (a broken file is reported and the
    /// running one kept). See docs/serve.md.
    Serve {
        /// Address to listen on (repeatable). Default 127.0.0.1:2949 and
        /// [::1]:2949: this host only, since the protocol has no
        /// authentication; give the PBX-facing address to reach further.
        #[arg(long, value_name = "HOST:PORT")]
        listen: Vec<String>,
        /// Calls at once; one more is sent on with the dialplan (E).
        #[arg(long, value_name = "N", default_value_t = 1000)]
        max_calls: usize,
        /// On SIGTERM, calls still running after this many seconds take
        /// their default action.
        #[arg(long, value_name = "SECONDS", default_value_t = 20)]
        drain_timeout: u64,
        /// Call ids and tags (#a17) start with these letters: give each
        /// daemon that shares an XMPP account its own.
        #[arg(long, value_name = "LETTERS", default_value = "")]
        id_prefix: String,
    },
    /// Run one call end to end on this machine and show both sides.
    ///
    /// Starts a throw-away prosody on 127.0.0.1 (installing the Debian
    /// package with apt-get when missing: root or sudo), registers a
    /// popivr account and an agent, runs the real popivr binary under a
    /// simulated Asterisk with an embedded configuration, and has a
    /// scripted agent reply to the pop. Prints the caller's audio
    /// commands, the pop as the agent sees it, the reply and the action,
    /// with times. Leaves nothing running. Ignores --config.
    Demo {
        /// What the agent replies: 1 (desk), 2 (voicemail, with a prompt),
        /// `fwd 2001` (forward), h (hang up), or anything else (help text,
        /// then the timeout after 30 s).
        #[arg(long, default_value = "1", value_name = "TEXT")]
        reply: String,
        /// Seconds the agent takes to reply after the pop.
        #[arg(long, default_value = "1.5", value_name = "SECONDS")]
        think: f64,
        /// Also print the configuration the call runs with (secret masked).
        #[arg(long)]
        show_config: bool,
    },
    /// Print the man page (roff) on stdout, or write the pages of popivr
    /// and each subcommand (popivr.1, popivr-run.1, ...) into DIR.
    #[command(hide = true)]
    Man {
        /// Where to write the pages.
        dir: Option<PathBuf>,
    },
}

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
        Cmd::Demo {
            reply,
            think,
            show_config,
        } => demo(reply, think, show_config),
        Cmd::Man { dir } => man(dir),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            log.error(&format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// The stderr log level: the base level moved up by -v and down by -q.
fn level(cli: &Cli) -> Level {
    const ORDER: [Level; 4] = [Level::Error, Level::Warn, Level::Info, Level::Debug];
    let base = cli.log_level as i32;
    let i = (base + i32::from(cli.verbose) - i32::from(cli.quiet)).clamp(0, 3);
    ORDER[i as usize]
}

/// Asterisk passes the profile as the first argument: `popivr sales ...`
/// means `popivr run sales ...`.
fn with_default_subcommand(mut argv: Vec<OsString>) -> Vec<OsString> {
    let cli = Cli::command();
    let known: Vec<&str> = cli
        .get_subcommands()
        .flat_map(|c| std::iter::once(c.get_name()).chain(c.get_all_aliases()))
        .chain(["help"])
        .collect();
    // Options that take a value as the next argument.
    let with_value: Vec<String> = cli
        .get_arguments()
        .filter(|a| a.get_action().takes_values())
        .flat_map(|a| {
            let long = a.get_long().map(|l| format!("--{l}"));
            let short = a.get_short().map(|s| format!("-{s}"));
            long.into_iter().chain(short)
        })
        .collect();
    let mut i = 1;
    while let Some(arg) = argv.get(i).and_then(|a| a.to_str()) {
        match arg {
            a if with_value.iter().any(|w| w == a) => i += 2,
            "--" => return argv,
            a if a.starts_with('-') => i += 1,
            a if known.contains(&a) => return argv,
            _ => {
                argv.insert(i, "run".into());
                return argv;
            }
        }
    }
    argv
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

fn demo(reply: String, think: f64, show_config: bool) -> Result<ExitCode> {
    let think = seconds(think, "--think")?;
    demo::main(demo::Options {
        script: demo::Script { reply, think },
        show_config,
    })
}

fn man(dir: Option<PathBuf>) -> Result<ExitCode> {
    if let Some(dir) = dir {
        clap_mangen::generate_to(Cli::command(), &dir)
            .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut out)
        .context("cannot render the man page")?;
    use std::io::Write;
    std::io::stdout()
        .write_all(&out)
        .context("cannot write the man page")?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_profile_first_means_run() {
        assert_eq!(
            with_default_subcommand(argv(&["popivr", "sales", "queue=eu"])),
            argv(&["popivr", "run", "sales", "queue=eu"])
        );
        assert_eq!(
            with_default_subcommand(argv(&["popivr", "-v", "--config", "x.conf", "sales"])),
            argv(&["popivr", "-v", "--config", "x.conf", "run", "sales"])
        );
        assert_eq!(
            with_default_subcommand(argv(&["popivr", "-c", "x.conf", "check"])),
            argv(&["popivr", "-c", "x.conf", "check"])
        );
        assert_eq!(
            with_default_subcommand(argv(&["popivr", "--log-level", "info", "demo"])),
            argv(&["popivr", "--log-level", "info", "demo"])
        );
    }

    #[test]
    fn verbosity_moves_the_base_level() {
        let level_of = |args: &[&str]| {
            let cli = Cli::try_parse_from(with_default_subcommand(argv(args))).unwrap();
            level(&cli)
        };
        assert_eq!(level_of(&["popivr", "sales"]), Level::Warn);
        assert_eq!(level_of(&["popivr", "-v", "sales"]), Level::Info);
        assert_eq!(level_of(&["popivr", "-vvv", "sales"]), Level::Debug);
        assert_eq!(level_of(&["popivr", "-q", "sales"]), Level::Error);
        assert_eq!(
            level_of(&["popivr", "--log-level", "info", "-q", "sales"]),
            Level::Warn
        );
    }

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
