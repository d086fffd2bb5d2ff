//! popivr's command line, in the library so that tools beside the binary
//! (the man pages, built at packaging time by `popivr-man` in the testkit
//! crate) render exactly what the binary parses.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use crate::call::Level;
use crate::config;

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
    after_long_help = "\
EXAMPLES:
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
pub struct Cli {
    /// Configuration file.
    #[arg(
        short,
        long,
        global = true,
        value_name = "FILE",
        env = "POPIVR_CONFIG",
        default_value = config::DEFAULT_PATH
    )]
    pub config: PathBuf,

    /// More log lines on stderr: -v info (pops, replies, actions),
    /// -vv debug (every ExternalIVR line). Repeatable.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Fewer log lines on stderr: -q errors only.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub quiet: u8,

    /// Base log level, before -v and -q.
    #[arg(
        long,
        global = true,
        value_name = "LEVEL",
        env = "POPIVR_LOG",
        default_value = "warn",
        hide_env_values = true
    )]
    pub log_level: LogLevel,

    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

#[derive(Subcommand)]
pub enum Cmd {
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
    /// running one kept). See /usr/share/doc/popivr/serve.md (docs/serve.md
    /// in the source).
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
}

/// The stderr log level: the base level moved up by -v and down by -q.
pub fn level(cli: &Cli) -> Level {
    const ORDER: [Level; 4] = [Level::Error, Level::Warn, Level::Info, Level::Debug];
    let base = cli.log_level as i32;
    let i = (base + i32::from(cli.verbose) - i32::from(cli.quiet)).clamp(0, 3);
    ORDER[i as usize]
}

/// Asterisk passes the profile as the first argument: `popivr sales ...`
/// means `popivr run sales ...`.
pub fn with_default_subcommand(mut argv: Vec<OsString>) -> Vec<OsString> {
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
            with_default_subcommand(argv(&["popivr", "--log-level", "info", "serve"])),
            argv(&["popivr", "--log-level", "info", "serve"])
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
