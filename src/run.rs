//! The per-call shell: Asterisk on stdin/stdout, one XMPP client, one
//! [`Call`]. It decides nothing; it carries inputs to the call and its
//! outputs to the world.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::Arc;

use anyhow::Result;
use tokio::io::BufReader;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio::time::{Instant, sleep_until};

use crate::call::{Call, Input, Output, TimerId};
use crate::config::{Account, Config, Profile};
use crate::eivr::{self, Command, LineReader};
use crate::logging::Logger;
use crate::xmpp;

/// Run one call on stdin/stdout until it is over. Returns once the call is
/// done; the caller exits the process.
pub async fn run_call(setup: CallSetup, log: Logger) -> Result<()> {
    let id = call_id();
    let log = log.with_prefix(format!("popivr[{id}]"));
    let CallSetup {
        profile,
        account,
        agent_values,
        args,
    } = setup;
    let mut call = Call::new(profile, id, args).with_agent_values(agent_values);
    let (tx, mut rx) = unbounded_channel();
    let mut out = Stdout;

    // Audio first: the hold commands go out before anything else is started.
    let first = call.start();
    let mut shell = Shell {
        log,
        timers: HashMap::new(),
        account,
        xmpp: None,
    };
    if !shell.apply(first, &mut out) {
        return Ok(());
    }
    spawn_stdin_reader(tx.clone(), shell.log.clone());
    spawn_signal_watch(tx);

    loop {
        let next_timer = shell
            .timers
            .iter()
            .min_by_key(|(_, at)| **at)
            .map(|(id, at)| (*id, *at));
        let input = tokio::select! {
            biased;
            Some(ev) = recv_xmpp(&mut shell.xmpp) => match ev.into_input() {
                Some(input) => input,
                None => continue,
            },
            msg = rx.recv() => match msg {
                Some(ShellInput::Call(input)) => input,
                Some(ShellInput::Stop(why)) => {
                    shell.log.info(&format!("stopping: {why}"));
                    break;
                }
                None => Input::Closed,
            },
            _ = sleep(next_timer.map(|(_, at)| at)) => {
                let id = next_timer.expect("a timer fired").0;
                shell.timers.remove(&id);
                Input::Timer(id)
            }
        };
        let outputs = call.handle(input);
        if !shell.apply(outputs, &mut out) || call.is_done() {
            break;
        }
    }
    shell.close().await;
    Ok(())
}

/// Everything a call needs from the configuration and its arguments.
pub struct CallSetup {
    pub profile: Arc<Profile>,
    /// The profile's account; `None` for a keys-only profile.
    pub account: Option<Account>,
    /// The targets' own `$name$` values, by bare JID.
    pub agent_values: BTreeMap<String, BTreeMap<String, String>>,
    /// `key=value` program arguments.
    pub args: Vec<(String, String)>,
}

impl CallSetup {
    /// The setup for `profile` of `config`, with the program arguments
    /// (`key=value`; anything else is ignored).
    pub fn new(config: &Config, profile: &Profile, args: &[String]) -> Self {
        let agent_values = profile
            .targets
            .iter()
            .filter_map(|t| config.agent_values(t).map(|v| (t.clone(), v.clone())))
            .collect();
        CallSetup {
            profile: Arc::new(profile.clone()),
            account: match profile.targets.is_empty() {
                true => None,
                false => config.account_for(profile).cloned(),
            },
            agent_values,
            args: args
                .iter()
                .filter_map(|a| a.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.to_string()))
                .collect(),
        }
    }
}

/// What reaches the shell's loop.
pub(crate) enum ShellInput {
    Call(Input),
    Stop(&'static str),
}

struct Shell {
    log: Logger,
    timers: HashMap<TimerId, Instant>,
    account: Option<Account>,
    xmpp: Option<xmpp::Session>,
}

impl Shell {
    /// Carry out the outputs in order. `false` once the call is over or
    /// Asterisk can no longer be written to.
    fn apply(&mut self, outputs: Vec<Output>, out: &mut Stdout) -> bool {
        let mut go_on = true;
        for output in outputs {
            match output {
                Output::Command(cmd) => {
                    if let Err(e) = out.send(&cmd, &self.log) {
                        self.log
                            .info(&format!("Asterisk's side is closed ({e}); ending the call"));
                        return false;
                    }
                }
                Output::Connect => self.connect(),
                Output::Send(msg) => match &self.xmpp {
                    Some(session) => session.send(msg),
                    None => self
                        .log
                        .warn(&format!("IM to {} not sent: no XMPP session", msg.to)),
                },
                Output::SetTimer(id, after) => {
                    self.timers.insert(id, Instant::now() + after);
                }
                Output::CancelTimer(id) => {
                    self.timers.remove(&id);
                }
                Output::Log(level, text) => self.log.at(level, &text),
                Output::Done => go_on = false,
            }
        }
        go_on
    }

    fn connect(&mut self) {
        match self.account.take() {
            Some(account) => self.xmpp = Some(xmpp::spawn(account)),
            None => self.log.error("the profile has targets but no account"),
        }
    }

    async fn close(self) {
        if let Some(session) = self.xmpp {
            session.close().await;
        }
    }
}

/// The next XMPP event; pends for ever without a session.
async fn recv_xmpp(session: &mut Option<xmpp::Session>) -> Option<xmpp::XmppEvent> {
    match session {
        Some(s) => {
            let ev = s.recv().await;
            if ev.is_none() {
                // The session task is gone: stop polling it.
                *session = None;
            }
            ev
        }
        None => std::future::pending().await,
    }
}

async fn sleep(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Commands go straight to fd 1, flushed one by one: Asterisk acts on each
/// line as it arrives.
struct Stdout;

impl Stdout {
    fn send(&mut self, cmd: &Command, log: &Logger) -> std::io::Result<()> {
        let line = match eivr::render(cmd) {
            Ok(line) => line,
            Err(e) => {
                log.error(&format!("command not sent: {e}"));
                return Ok(());
            }
        };
        log.debug(&format!("> {}", line.trim_end()));
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(line.as_bytes())?;
        stdout.flush()
    }
}

/// Drain stdin on its own task, whatever the call is doing: Asterisk
/// writes events from the channel's thread, and a full pipe would freeze
/// the caller's audio.
fn spawn_stdin_reader(tx: UnboundedSender<ShellInput>, log: Logger) {
    tokio::spawn(async move {
        let mut reader = LineReader::new(BufReader::new(tokio::io::stdin()));
        loop {
            match reader.next_event().await {
                Ok(Some(Ok(event))) => {
                    log.debug(&format!("< {}", event.to_wire().trim_end()));
                    if tx.send(ShellInput::Call(Input::Event(event))).is_err() {
                        return;
                    }
                }
                Ok(Some(Err(e))) => log.warn(&format!("event line skipped: {e}")),
                Ok(None) | Err(_) => {
                    let _ = tx.send(ShellInput::Call(Input::Closed));
                    return;
                }
            }
        }
    });
}

fn spawn_signal_watch(tx: UnboundedSender<ShellInput>) {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut hup), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        let why = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = hup.recv() => "SIGHUP",
            _ = int.recv() => "SIGINT",
        };
        let _ = tx.send(ShellInput::Stop(why));
    });
}

/// A short, unique-enough id: names the call in logs and threads its pop.
fn call_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}{:05x}", std::process::id(), nanos & 0xfffff)
}
