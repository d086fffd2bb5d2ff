//! One call, from the first hold-audio command to `E`/`H`.
//!
//! The machine never blocks and never looks at a clock: the shell feeds it
//! [`Input`]s and carries out the [`Output`]s it returns, in order.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use super::{IncomingMessage, Input, Level, MsgKind, OutgoingMessage, Output, TimerId, XmppStatus};
use crate::config::{Action, ActionKind, Profile};
use crate::eivr::{Command, Event, split_vars};
use crate::template;

/// How long Asterisk gets to answer the `G` reads before the pop goes out
/// with what is known.
const SETUP_WAIT: Duration = Duration::from_secs(2);
/// How long a prompt may play before we leave anyway (its `F` may be lost).
const PROMPT_GUARD: Duration = Duration::from_secs(30);
/// SIP headers are read from channel variables named with this prefix:
/// `G` splits its names on commas, so `PJSIP_HEADER(read,X)` cannot be
/// read with it. The dialplan copies the header first:
/// `Set(POPIVR_SIP_X-Customer-Id=${PJSIP_HEADER(read,X-Customer-Id)})`.
pub const SIP_HEADER_PREFIX: &str = "POPIVR_SIP_";
/// Sent to the agents who got the pop when the caller leaves first.
const MISSED_NOTICE: &str = "Missed call from $caller$ $caller_name$: the caller hung up.";
/// `POPIVR_REPLY` carries at most this many characters of an agent's text.
const MAX_REPLY_CHARS: usize = 64;

/// What the call knows about itself: the program arguments and the channel
/// variables read with `G`.
#[derive(Debug, Clone, Default)]
pub struct CallData {
    /// `key=value` program arguments (after the profile name).
    pub args: Vec<(String, String)>,
    /// Channel variables by the name they were read with (`CALLERID(num)`).
    pub vars: BTreeMap<String, String>,
}

impl CallData {
    pub fn var(&self, name: &str) -> &str {
        self.vars.get(name).map(String::as_str).unwrap_or("")
    }

    /// Template values for this call, plus the per-message extras.
    fn values(&self, outcome: &str, agent: &str) -> template::Values {
        let mut v = template::Values {
            caller: self.var("CALLERID(num)").to_string(),
            caller_name: self.var("CALLERID(name)").to_string(),
            number: self.var("EXTEN").to_string(),
            called: self.var("DNID").to_string(),
            outcome: outcome.to_string(),
            agent: agent.to_string(),
            args: self.args.iter().cloned().collect(),
            ..template::Values::default()
        };
        for (name, value) in &self.vars {
            if let Some(header) = name.strip_prefix(SIP_HEADER_PREFIX) {
                v.sip.insert(header.to_string(), value.clone());
            }
            v.vars.insert(name.clone(), value.clone());
        }
        v
    }
}

/// Who chose the action.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Agent { jid: String, reply: String },
    Key(char),
    Timeout,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Hold audio plays; waiting for a reply, a key or the timeout.
    Waiting,
    /// The action's prompt plays; `end` goes out when it finishes.
    Prompting {
        prompt: String,
        end: Command,
    },
    /// `E`/`H` sent; waiting for Asterisk's answer or EOF.
    Ending,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// The profile has no targets: no XMPP at all.
    Unused,
    Connecting,
    Online,
    Failed,
}

pub struct Call {
    profile: Arc<Profile>,
    /// A short id for this call, used as the XMPP thread of its pop.
    id: String,
    data: CallData,
    phase: Phase,
    /// Hold files still in rotation (a `Z` removes one).
    hold: Vec<String>,
    /// Names asked with `G`, in the order their answers will come.
    pending_reads: VecDeque<String>,
    link: Link,
    /// Bare JIDs the pop went to; only they may steer the call.
    popped: Vec<String>,
    /// Set once: the action that was taken, for late replies.
    outcome: Option<String>,
    /// Per-agent `$name$` values, by bare JID.
    agent_values: BTreeMap<String, BTreeMap<String, String>>,
}

impl Call {
    /// A call for `profile`. `id` names the call in logs and as the thread
    /// of its pop; `args` are the `key=value` program arguments.
    pub fn new(profile: Arc<Profile>, id: String, args: Vec<(String, String)>) -> Self {
        let link = if profile.targets.is_empty() {
            Link::Unused
        } else {
            Link::Connecting
        };
        Call {
            hold: profile.hold.clone(),
            profile,
            id,
            data: CallData {
                args,
                ..CallData::default()
            },
            phase: Phase::Waiting,
            pending_reads: VecDeque::new(),
            link,
            popped: Vec::new(),
            outcome: None,
            agent_values: BTreeMap::new(),
        }
    }

    /// Give the agents' own `$name$` values (`type = agent` sections).
    pub fn with_agent_values(mut self, values: BTreeMap<String, BTreeMap<String, String>>) -> Self {
        self.agent_values = values;
        self
    }

    /// The text of `template` as sent to `to`: `$agent$` is the agent who
    /// answered, the `$name$` values are the recipient's own.
    fn text(&self, template: &str, outcome: &str, agent: &str, to: &str) -> String {
        let mut values = self.data.values(outcome, agent);
        if let Some(custom) = self.agent_values.get(to) {
            values.custom = custom.clone();
        }
        template::render(template, &values)
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The action taken, once one was (`sent to desk`, `hung up` …): a
    /// shell with many calls stops counting this one as waiting.
    pub fn outcome(&self) -> Option<&str> {
        self.outcome.as_deref()
    }

    /// The first outputs of the call: hold audio first of all, then the
    /// variable reads, the XMPP login and the reply timer.
    pub fn start(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        // One file is always queued behind the playing one, so the playlist
        // never runs dry between an `F` and our answer to it: each `F`
        // queues the file that ended again, which keeps the rotation's
        // order. A single file is queued behind itself.
        if let Some((first, rest)) = self.hold.split_first() {
            out.push(Output::Command(Command::Play(first.clone())));
            let queued = if rest.is_empty() {
                std::slice::from_ref(first)
            } else {
                rest
            };
            for file in queued {
                out.push(Output::Command(Command::Append(file.clone())));
            }
        }
        if self.link == Link::Connecting {
            out.push(Output::Connect);
        }
        let sip = self
            .profile
            .sip_headers
            .iter()
            .map(|h| format!("{SIP_HEADER_PREFIX}{h}"));
        for name in self.profile.variables.iter().cloned().chain(sip) {
            // One name per `G`: a value may hold commas.
            out.push(Output::Command(Command::GetVars(vec![name.clone()])));
            self.pending_reads.push_back(name);
        }
        if !self.pending_reads.is_empty() {
            out.push(Output::SetTimer(TimerId::Setup, SETUP_WAIT));
        }
        out.push(Output::SetTimer(TimerId::Reply, self.profile.timeout));
        out
    }

    pub fn handle(&mut self, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        if self.phase == Phase::Done {
            return out;
        }
        match input {
            Input::Event(line) => self.on_event(line.event, &mut out),
            Input::Xmpp(status) => self.on_link(status, &mut out),
            Input::Message(msg) => self.on_message(msg, &mut out),
            Input::Timer(id) => self.on_timer(id, &mut out),
            Input::Closed => {
                if self.outcome.is_none() {
                    self.missed("Asterisk closed the call", &mut out);
                }
                self.finish(&mut out);
            }
        }
        out
    }

    fn on_event(&mut self, event: Event, out: &mut Vec<Output>) {
        match event {
            Event::Dtmf(key) => {
                if self.phase != Phase::Waiting {
                    return;
                }
                match self.profile.keys.get(&key) {
                    Some(action) => {
                        let action = action.clone();
                        self.act(&action, Source::Key(key), None, out);
                    }
                    None => log(out, Level::Debug, format!("key {key} has no action")),
                }
            }
            Event::Hangup => {
                if self.outcome.is_none() {
                    self.missed("the caller hung up", out);
                }
                self.finish(out);
            }
            Event::Inform(what) if what == "HANGUP" => {
                // Option `i`: Asterisk keeps talking after the hangup and
                // waits for our `H`.
                if self.outcome.is_none() {
                    self.missed("the caller hung up", out);
                    self.outcome = Some("caller hung up".into());
                }
                if self.phase != Phase::Ending {
                    out.push(Output::Command(Command::Hangup("caller hung up".into())));
                    self.phase = Phase::Ending;
                }
            }
            Event::Inform(what) => log(out, Level::Info, format!("Asterisk informs: {what}")),
            Event::Exit => self.finish(out),
            Event::Failed(Some(file)) => self.on_missing_file(&file, out),
            Event::Failed(None) => log(
                out,
                Level::Warn,
                "Asterisk could not carry out a command (channel not up?)".into(),
            ),
            Event::Finished(file) => match &self.phase {
                Phase::Prompting { prompt, .. } if *prompt == file => self.leave(out),
                Phase::Waiting if self.hold.contains(&file) => {
                    out.push(Output::Command(Command::Append(file)));
                }
                _ => {}
            },
            Event::Interrupted(_) | Event::Dropped(_) | Event::Params(_) => {}
            Event::Vars(data) => self.on_vars(&data, out),
        }
    }

    fn on_missing_file(&mut self, file: &str, out: &mut Vec<Output>) {
        if matches!(&self.phase, Phase::Prompting { prompt, .. } if prompt == file) {
            log(
                out,
                Level::Warn,
                format!("prompt {file} is missing; leaving without it"),
            );
            self.leave(out);
            return;
        }
        let before = self.hold.len();
        self.hold.retain(|f| f != file);
        if self.hold.len() == before {
            log(out, Level::Warn, format!("Asterisk cannot play {file}"));
            return;
        }
        match self.hold.first() {
            Some(next) if self.phase == Phase::Waiting => {
                log(
                    out,
                    Level::Warn,
                    format!("hold file {file} is missing; skipped"),
                );
                out.push(Output::Command(Command::Append(next.clone())));
            }
            Some(_) => {}
            None => log(
                out,
                Level::Error,
                format!("hold file {file} is missing and no hold audio is left"),
            ),
        }
    }

    fn on_vars(&mut self, data: &str, out: &mut Vec<Output>) {
        let Some(name) = self.pending_reads.pop_front() else {
            log(out, Level::Debug, "unexpected G answer ignored".into());
            return;
        };
        match split_vars(data, &[name.as_str()]).pop() {
            Some((_, value)) => {
                self.data.vars.insert(name, value);
            }
            None => log(
                out,
                Level::Warn,
                format!("G answer for {name} not understood"),
            ),
        }
        if self.pending_reads.is_empty() {
            out.push(Output::CancelTimer(TimerId::Setup));
            self.maybe_pop(out);
        }
    }

    fn on_link(&mut self, status: XmppStatus, out: &mut Vec<Output>) {
        if self.link == Link::Unused {
            return;
        }
        match status {
            XmppStatus::Online => {
                self.link = Link::Online;
                self.maybe_pop(out);
            }
            XmppStatus::Failed(cause) => {
                if self.link != Link::Failed {
                    let then = if self.outcome.is_none() {
                        "; the default action follows at the timeout"
                    } else {
                        ""
                    };
                    log(
                        out,
                        Level::Error,
                        format!("XMPP unavailable: {cause}{then}"),
                    );
                }
                self.link = Link::Failed;
            }
        }
    }

    /// The pop goes out once we are logged in and know the caller.
    fn maybe_pop(&mut self, out: &mut Vec<Output>) {
        if self.link != Link::Online
            || !self.pending_reads.is_empty()
            || !self.popped.is_empty()
            || self.outcome.is_some()
        {
            return;
        }
        for target in &self.profile.targets {
            let body = self.text(&self.profile.template, "", "", target);
            out.push(self.message(target, body));
        }
        self.popped = self.profile.targets.clone();
        log(
            out,
            Level::Info,
            format!("pop sent to {}", self.popped.join(", ")),
        );
    }

    fn message(&self, to: &str, body: String) -> Output {
        Output::Send(OutgoingMessage {
            to: to.to_string(),
            body,
            thread: Some(self.id.clone()),
        })
    }

    fn on_message(&mut self, msg: IncomingMessage, out: &mut Vec<Output>) {
        let from = msg.from_bare.as_str();
        if !self.popped.iter().any(|t| t == from) {
            log(
                out,
                Level::Debug,
                format!("message from {from} ignored: not a target of this call"),
            );
            return;
        }
        if !matches!(msg.kind, MsgKind::Chat | MsgKind::Normal) || msg.delayed || msg.forwarded {
            log(
                out,
                Level::Debug,
                format!(
                    "message from {from} ignored ({:?}, delayed {}, forwarded {})",
                    msg.kind, msg.delayed, msg.forwarded
                ),
            );
            return;
        }
        let Some(text) = msg.body.as_deref().map(str::trim).filter(|t| !t.is_empty()) else {
            return;
        };
        if let Some(outcome) = &self.outcome {
            let body = format!("This call was already handled: {outcome}.");
            out.push(self.message(from, body));
            return;
        }
        let mut words = text.split_whitespace();
        let first = words.next().unwrap_or("").to_lowercase();
        let rule = self
            .profile
            .replies
            .iter()
            .find(|r| r.words.contains(&first));
        let Some(rule) = rule else {
            out.push(self.message(from, self.profile.help.clone()));
            return;
        };
        let action = rule.action.clone();
        let number = match &action.kind {
            ActionKind::Forward(None) => match words.next() {
                Some(n) if crate::forward::allowed(n, &self.profile.forward_allow) => {
                    Some(n.to_string())
                }
                Some(n) => {
                    let body = format!("{n} is not a number this call may be forwarded to.");
                    out.push(self.message(from, body));
                    return;
                }
                None => {
                    let body = format!("Say which number: {first} NUMBER");
                    out.push(self.message(from, body));
                    return;
                }
            },
            _ => None,
        };
        let source = Source::Agent {
            jid: from.to_string(),
            reply: text.to_string(),
        };
        self.act(&action, source, number, out);
    }

    fn on_timer(&mut self, id: TimerId, out: &mut Vec<Output>) {
        match id {
            TimerId::Reply if self.phase == Phase::Waiting => {
                let action = self.profile.default_action.clone();
                self.act(&action, Source::Timeout, None, out);
            }
            TimerId::Setup if !self.pending_reads.is_empty() => {
                let missing: Vec<_> = self.pending_reads.drain(..).collect();
                log(
                    out,
                    Level::Warn,
                    format!("no answer from Asterisk for {}", missing.join(", ")),
                );
                self.maybe_pop(out);
            }
            TimerId::Prompt if matches!(self.phase, Phase::Prompting { .. }) => self.leave(out),
            _ => {}
        }
    }

    /// Carry out `action`, once per call whatever else is in flight.
    fn act(
        &mut self,
        action: &Action,
        source: Source,
        number: Option<String>,
        out: &mut Vec<Output>,
    ) {
        if self.outcome.is_some() || self.phase != Phase::Waiting {
            return;
        }
        out.push(Output::CancelTimer(TimerId::Reply));
        let (label, target, end, outcome) = match &action.kind {
            ActionKind::Continue(label) => (
                label.clone(),
                String::new(),
                Command::Exit(format!("popivr: {label}")),
                format!("sent to {label}"),
            ),
            ActionKind::Forward(fixed) => {
                let to = fixed.clone().or(number).unwrap_or_default();
                (
                    "forward".to_string(),
                    to.clone(),
                    Command::Exit(format!("popivr: forward {to}")),
                    format!("forwarded to {to}"),
                )
            }
            ActionKind::Hangup => (
                "hangup".to_string(),
                String::new(),
                Command::Hangup("popivr: hangup".into()),
                "hung up".to_string(),
            ),
        };
        let (agent, reply, by) = match &source {
            Source::Agent { jid, reply } => (jid.clone(), filter_reply(reply), jid.clone()),
            Source::Key(k) => (String::new(), k.to_string(), format!("caller key {k}")),
            Source::Timeout => (String::new(), "timeout".to_string(), "timeout".to_string()),
        };
        log(
            out,
            Level::Info,
            format!("action {label} ({outcome}) by {by}"),
        );
        let vars = vec![
            ("POPIVR_ACTION".to_string(), label),
            ("POPIVR_REPLY".to_string(), reply),
            ("POPIVR_AGENT".to_string(), agent.clone()),
            ("POPIVR_TARGET".to_string(), target),
        ];
        // Tell the agents before Asterisk hears of it: once `E` is answered
        // Asterisk closes our input and the process ends.
        if self.link == Link::Online {
            let text = match &source {
                Source::Agent { .. } => outcome.clone(),
                _ => format!("{outcome} ({by})"),
            };
            for to in &self.popped {
                let body = self.text(&self.profile.confirm, &text, &agent, to);
                out.push(self.message(to, body));
            }
        }
        self.outcome = Some(outcome);
        match &action.prompt {
            Some(prompt) => {
                out.push(Output::Command(Command::Play(prompt.clone())));
                out.push(Output::Command(Command::SetVars(vars)));
                out.push(Output::SetTimer(TimerId::Prompt, PROMPT_GUARD));
                self.phase = Phase::Prompting {
                    prompt: prompt.clone(),
                    end,
                };
            }
            None => {
                out.push(Output::Command(Command::SetVars(vars)));
                out.push(Output::Command(end));
                self.phase = Phase::Ending;
            }
        }
    }

    /// The prompt is over: send the `E`/`H` it was holding back.
    fn leave(&mut self, out: &mut Vec<Output>) {
        if let Phase::Prompting { end, .. } = std::mem::replace(&mut self.phase, Phase::Ending) {
            out.push(Output::CancelTimer(TimerId::Prompt));
            out.push(Output::Command(end));
        }
    }

    /// The caller is gone before anything was decided.
    fn missed(&mut self, why: &str, out: &mut Vec<Output>) {
        log(
            out,
            Level::Info,
            format!("call ended before any action: {why}"),
        );
        if self.link == Link::Online && !self.popped.is_empty() {
            for to in &self.popped {
                let body = self.text(MISSED_NOTICE, "", "", to);
                out.push(self.message(to, body));
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<Output>) {
        self.phase = Phase::Done;
        out.push(Output::Done);
    }
}

fn log(out: &mut Vec<Output>, level: Level, text: String) {
    out.push(Output::Log(level, text));
}

/// The agent's reply as it may reach a channel variable: bounded here;
/// the command writer removes what the wire cannot carry.
fn filter_reply(reply: &str) -> String {
    reply.chars().take(MAX_REPLY_CHARS).collect()
}
