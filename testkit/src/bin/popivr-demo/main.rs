//! `popivr-demo`: the main job, end to end, on this machine (`.ci/demo`).
//!
//! A throw-away prosody on 127.0.0.1 (installed with apt-get if missing),
//! two accounts on it (popivr's and the agent's), an embedded
//! configuration in a private temp file, and one call: the simulated
//! Asterisk starts the real popivr binary as `ExternalIVR()` would
//! (`popivr sales queue=Support`, config through `POPIVR_CONFIG`), a
//! scripted agent gets the pop and replies. Both sides' lines are printed
//! with their times. Nothing is left running, also on Ctrl-C or an error:
//! everything started is owned by a value whose drop stops or removes it.

mod agent;
mod config;
mod show;

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use popivr::{call, template};
use popivr_testkit::sim::{Dir, Sim, SimConfig, Transcript};
use popivr_testkit::testbed::{self, Install, Prosody};
use tokio::signal::unix::{SignalKind, signal};

pub use agent::Script;
use config::{AGENT_USER, PBX_USER};
use show::{AgentLog, Printer, Side};

/// Exit status after Ctrl-C, as shells report a SIGINT death.
const INTERRUPTED: u8 = 130;

/// The longest the call may take: the profile's 30 s timeout, the agent's
/// think time and a margin.
const CALL_BOUND: Duration = Duration::from_secs(40);

/// Options of `popivr demo`.
#[derive(Debug, Clone)]
pub struct Options {
    pub script: Script,
    /// Print the configuration the call runs with (secret masked).
    pub show_config: bool,
}

/// One call end to end on this machine, both sides shown.
///
/// Starts a throw-away prosody on 127.0.0.1 (installing the Debian package
/// with apt-get when missing: root or sudo), registers a popivr account
/// and an agent, runs the real popivr binary (the one beside this program,
/// or $POPIVR_BIN) under a simulated Asterisk with an embedded
/// configuration, and has a scripted agent reply to the pop. Prints the
/// caller's audio commands, the pop as the agent sees it, the reply and
/// the action, with times. Leaves nothing running.
#[derive(clap::Parser)]
#[command(name = "popivr-demo", version)]
struct Cli {
    /// What the agent replies: 1 (desk), 2 (voicemail, with a prompt),
    /// `fwd 2001` (forward), h (hang up), or anything else (help text,
    /// then the timeout after 30 s).
    #[arg(long, default_value = "1", value_name = "TEXT")]
    reply: String,
    /// Seconds the agent takes to reply after the pop (0 to 60).
    #[arg(long, default_value = "1.5", value_name = "SECONDS")]
    think: f64,
    /// Also print the configuration the call runs with (secret masked).
    #[arg(long)]
    show_config: bool,
}

fn main() -> ExitCode {
    let cli = <Cli as clap::Parser>::parse();
    let think = Duration::try_from_secs_f64(cli.think)
        .ok()
        .filter(|d| *d <= Duration::from_secs(60));
    let Some(think) = think else {
        eprintln!("popivr-demo: --think takes seconds from 0 to 60");
        return ExitCode::FAILURE;
    };
    let options = Options {
        script: Script {
            reply: cli.reply,
            think,
        },
        show_config: cli.show_config,
    };
    match run(options) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("popivr-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Run the demo; the exit code says whether the call went as scripted.
fn run(options: Options) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async {
        // Registered before anything starts, so an early Ctrl-C is seen
        // too (and does not kill us before the cleanup).
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        let why = tokio::select! {
            result = demo(&options) => return result,
            _ = int.recv() => "interrupted",
            _ = term.recv() => "terminated",
            _ = hup.recv() => "hung up",
        };
        // The demo's future is dropped by now: prosody is stopped, the
        // popivr child killed and the temp files removed.
        println!("{why}: stopped, nothing left running");
        Ok(ExitCode::from(INTERRUPTED))
    })
}

async fn demo(options: &Options) -> Result<ExitCode> {
    let t0 = Instant::now();
    let exe = popivr_binary()?;
    println!("popivr demo: one call through {}", exe.display());
    println!();

    if testbed::ensure_installed(Install::Never).is_err() {
        println!("  prosody is not installed: installing it with apt-get (root or sudo) ...");
    }
    testbed::ensure_installed(Install::Interactive).map_err(anyhow::Error::msg)?;
    let pbx_secret = config::random_secret().context("no random numbers")?;
    let agent_secret = config::random_secret().context("no random numbers")?;
    let server = Prosody::builder()
        .user(PBX_USER, &pbx_secret)
        .user(AGENT_USER, &agent_secret)
        .install(Install::Interactive)
        .try_start()
        .map_err(anyhow::Error::msg)?;
    let pbx = server.jid(PBX_USER);
    let alice = server.jid(AGENT_USER);
    println!(
        "  XMPP server  prosody on {} (domain {}, private test CA), pid {}, started in {:.2} s",
        server.addr(),
        server.domain(),
        server.pid().unwrap_or(0),
        server.startup_time().as_secs_f64()
    );
    println!("  accounts     {pbx} (popivr), {alice} (the agent), random passwords");

    let dir = tempfile::Builder::new()
        .prefix("popivr-demo-")
        .tempdir()
        .context("cannot make a temp dir")?;
    let conf = dir.path().join("popivr.conf");
    let text = config::render(&server, &pbx_secret);
    testbed::write_private(&conf, text.as_bytes())
        .with_context(|| format!("cannot write {}", conf.display()))?;
    // The binary would say the same at the call's start; here it is said
    // once, clearly, before anything runs.
    popivr::config::load_file(&conf).context("the demo's own configuration")?;
    println!(
        "  config       {} (mode 600; handed over as POPIVR_CONFIG)",
        conf.display()
    );
    println!(
        "  temp dirs    {} {}",
        dir.path().display(),
        server.scratch_dir().display()
    );
    if options.show_config {
        println!();
        for line in text.lines() {
            match line.starts_with("secret =") {
                true => println!("    secret = ********"),
                false => println!("    {line}"),
            }
        }
    }

    let agent_session = agent::login(server.account(AGENT_USER, &agent_secret), &pbx).await?;
    println!("  agent        {alice} is online and waits for calls");
    // popivr pops only agents it sees online: subscribe to the agent's
    // presence once, as `popivr check` does on a real server.
    let pbx_account = server.account(PBX_USER, &pbx_secret);
    let roster = popivr::xmpp::survey(
        &pbx_account,
        std::slice::from_ref(&alice),
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| anyhow::anyhow!("popivr's account could not log in: {e}"))?;
    if !roster.iter().all(|c| c.subscribed) {
        anyhow::bail!("the agent did not accept popivr's presence subscription");
    }
    println!("  roster       {pbx} sees {alice}'s presence (subscription accepted)");

    let data = invocation(&exe)?;
    println!("  Asterisk     simulated: ExternalIVR({data})");
    println!(
        "  caller       \"{}\" <{}> dials {}; hold audio {} ({:.1} s, looped)",
        config::CALLER_NAME,
        config::CALLER_NUM,
        config::EXTEN,
        config::HOLD,
        config::HOLD_SECONDS
    );
    println!(
        "  the agent    replies {:?} {:.1} s after the pop",
        options.script.reply,
        options.script.think.as_secs_f64()
    );
    println!();

    let sim_config = SimConfig::new(data)
        .env("POPIVR_CONFIG", conf.display().to_string())
        // Info lines (pop sent, reply taken, action) show how popivr's
        // lines read in Asterisk's log.
        .env("POPIVR_LOG", "info")
        // As the shipped popivr-calldata context sets them: URIENCODE()d.
        .var(
            call::CALLER_NUM,
            template::percent_encoded(config::CALLER_NUM),
        )
        .var(
            call::CALLER_NAME,
            template::percent_encoded(config::CALLER_NAME),
        )
        .var(call::EXTEN, config::EXTEN)
        .var(call::DNID, config::EXTEN)
        .var(call::UNIQUEID, "1700000000.42")
        .sound(config::HOLD, Duration::from_secs_f64(config::HOLD_SECONDS))
        .sound("vm-intro", Duration::from_millis(1500));
    let agent_log = AgentLog::default();
    let mut sim = Sim::start(sim_config).context("cannot start popivr")?;
    let argv = sim.invocation().argv.join(" ");
    let mut printer = Printer::new(format!("runs {argv} (ExternalIVR, process mode)"));
    let agent_task = tokio::spawn(agent::play(
        agent_session,
        pbx.clone(),
        options.script.clone(),
        agent_log.clone(),
    ));

    while sim.wait_end(Duration::from_millis(40)).await.is_none() {
        printer.flush(&sim, &agent_log, false);
        if sim.elapsed() > CALL_BOUND {
            printer.flush(&sim, &agent_log, true);
            bail!("the call did not end within {CALL_BOUND:?}");
        }
    }
    let exit = sim.wait_exit(Duration::from_secs(2)).await;
    // The confirmation is sent as the call ends; give it time to arrive.
    let agent_result = tokio::time::timeout(Duration::from_secs(5), agent_task).await;
    printer.flush(&sim, &agent_log, true);
    println!();

    let transcript = sim.transcript();
    let mut ok = true;
    match &exit {
        Ok(report) if report.status.success() => {}
        Ok(report) => {
            ok = false;
            println!("popivr exited with {}", report.status);
        }
        Err(e) => {
            ok = false;
            println!("popivr did not exit: {e}");
        }
    }
    match agent_result {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => {
            ok = false;
            println!("the agent: {e:#}");
        }
        Ok(Err(e)) => {
            ok = false;
            println!("the agent's task failed: {e}");
        }
        Err(_) => {
            ok = false;
            println!("the agent was still waiting at the end");
        }
    }
    let vars = [
        "POPIVR_ACTION",
        "POPIVR_REPLY",
        "POPIVR_AGENT",
        "POPIVR_TARGET",
    ];
    let set: Vec<String> = vars
        .iter()
        .filter_map(|v| sim.var(v).map(|value| format!("{v}={value}")))
        .collect();
    println!("channel variables: {}", set.join(" "));
    match sim.var("POPIVR_ACTION") {
        Some(action) if action == "hangup" => println!("the caller is hung up"),
        Some(action) => println!(
            "the dialplan goes on at the next priority, e.g. GotoIf($[\"${{POPIVR_ACTION}}\" = \"{action}\"]?{action},1)"
        ),
        None => {
            ok = false;
            println!("no action reached Asterisk");
        }
    }
    summary(&transcript, &agent_log, &sim);
    drop(sim);

    server_down(server, dir)?;
    println!(
        "cleaned up: prosody stopped, temp dirs removed; the demo took {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(match ok {
        true => ExitCode::SUCCESS,
        false => ExitCode::FAILURE,
    })
}

/// `ExternalIVR()`'s data for the demo call: the program with its
/// arguments inside the parentheses, as in a dialplan.
fn invocation(exe: &Path) -> Result<String> {
    let path = exe.display().to_string();
    // Asterisk's argument syntax has no quoting for these.
    if path.contains([',', '(', ')', '|', '"']) {
        bail!("popivr's path {path:?} holds a character ExternalIVR cannot pass");
    }
    let mut args = vec![config::PROFILE];
    args.extend(config::ARGS);
    Ok(format!("{path}({})", args.join(",")))
}

/// Timings worth knowing, from the two logs.
fn summary(transcript: &Transcript, agent: &AgentLog, sim: &Sim) {
    let first_audio = transcript
        .entries
        .iter()
        .find(|e| e.dir == Dir::Command)
        .map(|e| e.at);
    let leave = transcript
        .entries
        .iter()
        .find(|e| e.dir == Dir::Command && (e.text.starts_with('E') || e.text.starts_with('H')))
        .map(|e| e.at);
    let pop = agent.first(sim.started(), Side::Received);
    let reply = agent.first(sim.started(), Side::Sent);
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    let mut parts = Vec::new();
    if let Some(t) = first_audio {
        parts.push(format!("first audio {} after start", ms(t)));
    }
    if let Some(t) = pop {
        parts.push(format!(
            "pop at the agent {} after start (XMPP login included)",
            ms(t)
        ));
    }
    if let (Some(r), Some(l)) = (reply, leave) {
        parts.push(format!("reply to E/H {}", ms(l.saturating_sub(r))));
    }
    if !parts.is_empty() {
        println!("timings: {}", parts.join("; "));
    }
}

/// Stop prosody politely and remove the temp dirs; say if that failed.
fn server_down(mut server: Prosody, dir: tempfile::TempDir) -> Result<()> {
    server.stop();
    drop(server);
    dir.close().context("cannot remove the demo's temp dir")
}

/// The popivr binary the call runs: $POPIVR_BIN, else the one built beside
/// this program (`cargo build` puts both in one directory).
fn popivr_binary() -> Result<std::path::PathBuf> {
    if let Some(bin) = std::env::var_os("POPIVR_BIN") {
        return Ok(bin.into());
    }
    let me = std::env::current_exe().context("cannot find this program's path")?;
    let beside = me.with_file_name("popivr");
    if !beside.is_file() {
        bail!(
            "no popivr binary beside {} (build it: cargo build --release -p popivr; or set \
             POPIVR_BIN)",
            me.display()
        );
    }
    Ok(beside)
}
