//! One call, from the first hold-audio command to `E`/`H`.
//!
//! The machine never blocks and never looks at a clock: the shell feeds it
//! [`Input`]s and carries out the [`Output`]s it returns, in order.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use super::{
    IncomingMessage, IncomingPresence, Input, Level, MsgKind, OutgoingMessage, Output, RealJids,
    RosterItem, Show, TimerId, XmppStatus,
};
use crate::config::{Action, ActionKind, Agent, Mode, Nobody, PresencePolicy, Profile};
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
/// The call's data as the shipped `popivr-calldata` dialplan line sets
/// it (dialplan/popivr-calldata.conf): Asterisk's `G` reads plain channel
/// variables only, never `CALLERID(num)` or `EXTEN` themselves.
pub const CALLER_NUM: &str = "POPIVR_CALLER_NUM";
pub const CALLER_NAME: &str = "POPIVR_CALLER_NAME";
pub const EXTEN: &str = "POPIVR_EXTEN";
pub const DNID: &str = "POPIVR_DNID";
pub const UNIQUEID: &str = "POPIVR_UNIQUEID";
/// Variables named so are `URIENCODE()`d by the dialplan, so that no
/// caller-chosen comma, quote or line break reaches the wire, and decoded
/// here.
pub const ENCODED_PREFIX: &str = "POPIVR_";
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
    fn values(&self, tag: &str, outcome: &str, agent: &str) -> template::Values {
        let mut v = template::Values {
            caller: self.var(CALLER_NUM).to_string(),
            caller_name: self.var(CALLER_NAME).to_string(),
            number: self.var(EXTEN).to_string(),
            called: self.var(DNID).to_string(),
            outcome: outcome.to_string(),
            agent: agent.to_string(),
            tag: tag.to_string(),
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
    /// An agent's reply; `jid` is their bare JID, or `room/nick` for a
    /// room occupant whose real JID is hidden.
    Agent {
        jid: String,
        reply: String,
        from: Peer,
    },
    Key(char),
    Timeout,
    /// No target was available (or XMPP failed) in a mode that does not
    /// wait for replies, or `nobody = default`.
    Unavailable(String),
    /// A mode that leaves by itself: notify, route or missed.
    Mode {
        agents: Vec<String>,
        exten: String,
    },
}

/// Where an agent's reply came from, so answers go back the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Peer {
    Chat(String),
    /// A room occupant: answers go to the room, addressed to the nick.
    Room(String),
}

/// A group chat room the call pops into.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RoomState {
    Unused,
    Joining,
    Joined,
    Failed,
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

/// The channel variables a call of `profile` reads with `G`: the
/// profile's `variables`, then one per SIP header it shows.
pub fn reads(profile: &Profile) -> impl Iterator<Item = String> + '_ {
    let sip = profile
        .sip_headers
        .iter()
        .map(|h| format!("{SIP_HEADER_PREFIX}{h}"));
    profile.variables.iter().cloned().chain(sip)
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
    /// Names the shell asked with `G` before this call knew its profile
    /// (serve mode), in the order it asked them.
    asked: Vec<String>,
    link: Link,
    /// Bare JIDs the pop went to; only they may steer the call.
    popped: Vec<String>,
    /// The pop went into the room.
    room_popped: bool,
    /// Who gets the pop has been decided (it may be nobody).
    decided: bool,
    /// Contacts whose presence we are subscribed to; `None` until the
    /// roster is in.
    roster: Option<BTreeSet<String>>,
    /// Last presence of each resource of each target, by bare JID.
    presence: BTreeMap<String, BTreeMap<String, Show>>,
    /// The presence window is over (all subscribed targets heard, or the
    /// `Presence` timer fired).
    presence_ready: bool,
    /// The server has handled our initial presence, this long after it
    /// went out (`Input::Settled`).
    settled: Option<Duration>,
    /// The presence window ran out before the server had settled.
    window_over: bool,
    room: RoomState,
    /// Room occupants by nick: their real bare JID when the room shows it.
    occupants: BTreeMap<String, Option<String>>,
    /// Set once: the action that was taken, for late replies.
    outcome: Option<String>,
    /// The `type = agent` sections, by bare JID: `$name$` values, exten,
    /// priority.
    agents: Arc<BTreeMap<String, Agent>>,
}

impl Call {
    /// A call for `profile`. `id` names the call in logs and as the thread
    /// of its pop; `args` are the `key=value` program arguments.
    pub fn new(profile: Arc<Profile>, id: String, args: Vec<(String, String)>) -> Self {
        let link = if profile.uses_xmpp() {
            Link::Connecting
        } else {
            Link::Unused
        };
        let room = if profile.room.is_some() {
            RoomState::Joining
        } else {
            RoomState::Unused
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
            asked: Vec::new(),
            link,
            popped: Vec::new(),
            room_popped: false,
            decided: false,
            roster: None,
            presence: BTreeMap::new(),
            presence_ready: false,
            settled: None,
            window_over: false,
            room,
            occupants: BTreeMap::new(),
            outcome: None,
            agents: Arc::default(),
        }
    }

    /// The `G` reads the shell already sent, in order, before the profile
    /// was known (`popivr serve` reads the variables every profile reads in
    /// the same write as `P`). Their answers come first; [`Call::start`]
    /// asks only for what they miss, and keeps only what the profile reads.
    pub fn with_asked(mut self, names: Vec<String>) -> Self {
        self.asked = names;
        self
    }

    /// Give the `type = agent` sections (their `$name$` values, `exten`
    /// and `priority`), by bare JID.
    pub fn with_agents(mut self, agents: Arc<BTreeMap<String, Agent>>) -> Self {
        self.agents = agents;
        self
    }

    /// The text of `template` as sent to `to`: `$agent$` is the agent who
    /// answered, the `$name$` values are the recipient's own.
    fn text(&self, template: &str, outcome: &str, agent: &str, to: &str) -> String {
        let mut values = self.data.values(&self.id, outcome, agent);
        if let Some(agent) = self.agents.get(to) {
            values.custom = agent.values.clone();
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

    /// Everyone an interactive pop of this call asked for an answer. Once
    /// the call is over, an answer written for it (a first one, or a
    /// second) may still be on its way when the next call pops them, so a
    /// shell asks them for a tag or thread for a while
    /// ([`crate::claim::LATE_REPLY`]).
    pub fn asked(&self) -> Vec<String> {
        match self.profile.mode {
            Mode::Interactive => self.popped.clone(),
            _ => Vec::new(),
        }
    }

    /// How long after its end a plain reply of an agent it asked moves no
    /// other call (the profile's `late_reply`).
    pub fn late_reply(&self) -> Duration {
        self.profile.late_reply
    }

    /// The first outputs of the call: hold audio first of all, then the
    /// variable reads, the XMPP login and the reply timer.
    pub fn start(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        // One file is always queued behind the playing one, so the playlist
        // never runs dry between an `F` and our answer to it: each `F`
        // queues the file that ended again, which keeps the rotation's
        // order. A single file is queued behind itself. In `missed` mode
        // the channel is already hung up: no audio.
        if self.profile.mode == Mode::Missed {
            self.hold.clear();
        }
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
        self.pending_reads.extend(self.asked.iter().cloned());
        for name in reads(&self.profile) {
            if self.asked.contains(&name) {
                continue;
            }
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
            Input::Presence(p) => self.on_presence(p, &mut out),
            Input::Roster(items) => self.on_roster(&items, &mut out),
            Input::Settled(took) => self.on_settled(took, &mut out),
            Input::Joined(room, jids) => {
                self.warn_if_room_hides_jids(&room, jids, &mut out);
                self.on_room(&room, None, &mut out)
            }
            Input::RoomFailed(room, cause) => self.on_room(&room, Some(cause), &mut out),
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
            // `missed` mode runs on a channel that is already hung up
            // (option `d`): the notice still has to go out.
            Event::Hangup if self.profile.mode == Mode::Missed && self.outcome.is_none() => {
                log(out, Level::Debug, "hangup event in missed mode".into());
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
            // Read for another profile, on speculation.
            Some(_) if !self.reads(&name) => {}
            Some((_, value)) => {
                let value = match name.starts_with(ENCODED_PREFIX) {
                    true => template::percent_decode(&value),
                    false => value,
                };
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
            self.warn_if_no_data(out);
            self.maybe_pop(out);
        }
    }

    fn reads(&self, name: &str) -> bool {
        reads(&self.profile).any(|n| n == name)
    }

    /// Every variable read came back empty: the dialplan did not set them
    /// (most likely the `popivr-calldata` line is missing). Said once, with
    /// the fix, since every pop of such a call is blank.
    fn warn_if_no_data(&self, out: &mut Vec<Output>) {
        if self.data.vars.is_empty() || self.data.vars.values().any(|v| !v.is_empty()) {
            return;
        }
        let names: Vec<&str> = self.data.vars.keys().map(String::as_str).collect();
        log(
            out,
            Level::Warn,
            format!(
                "no call data: every variable read came back empty ({}). Asterisk's G reads \
                 plain channel variables only: set them before ExternalIVR with the MSet line \
                 of popivr-calldata.conf (in the dialplan snippets shipped with popivr)",
                names.join(", ")
            ),
        );
    }

    fn on_link(&mut self, status: XmppStatus, out: &mut Vec<Output>) {
        if self.link == Link::Unused {
            return;
        }
        match status {
            XmppStatus::Online => {
                self.link = Link::Online;
                if self.needs_presence() || self.room == RoomState::Joining {
                    out.push(Output::SetTimer(
                        TimerId::Presence,
                        self.profile.presence_wait,
                    ));
                } else {
                    self.presence_ready = true;
                }
                self.maybe_pop(out);
            }
            XmppStatus::Failed(cause) => {
                if self.link != Link::Failed {
                    let waits = self.profile.mode == Mode::Interactive;
                    let then = match self.outcome {
                        None if waits => "; the default action follows at the timeout",
                        None => "; taking the default action",
                        Some(_) => "",
                    };
                    log(
                        out,
                        Level::Error,
                        format!("XMPP unavailable: {cause}{then}"),
                    );
                }
                self.link = Link::Failed;
                if self.profile.mode != Mode::Interactive {
                    let action = self.profile.default_action.clone();
                    let why = "XMPP unavailable".to_string();
                    self.act(&action, Source::Unavailable(why), None, out);
                }
            }
        }
    }

    /// Whether the targets' presence decides who gets the pop.
    fn needs_presence(&self) -> bool {
        self.profile.presence != PresencePolicy::Any && !self.profile.targets.is_empty()
    }

    fn is_target(&self, jid: &str) -> bool {
        self.profile.targets.iter().any(|t| t == jid)
    }

    fn on_roster(&mut self, items: &[RosterItem], out: &mut Vec<Output>) {
        let subscribed: BTreeSet<String> = items
            .iter()
            .filter(|i| i.subscribed)
            .map(|i| i.jid.clone())
            .collect();
        if self.needs_presence() {
            let missing: Vec<&str> = self
                .profile
                .targets
                .iter()
                .filter(|t| !subscribed.contains(*t))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                log(
                    out,
                    Level::Warn,
                    format!(
                        "no presence subscription to {} (asked; until they accept, they count as offline; `popivr check` shows the roster)",
                        missing.join(", ")
                    ),
                );
            }
        }
        self.roster = Some(subscribed);
        self.check_presence_ready(out);
    }

    fn on_presence(&mut self, p: IncomingPresence, out: &mut Vec<Output>) {
        if let Some(muc) = &p.muc {
            let in_room = matches!(&self.profile.room, Some(r) if r.jid == p.from_bare);
            let nick = resource(&p.from_full);
            if in_room && !muc.is_self && !nick.is_empty() {
                if p.show == Show::Unavailable {
                    self.occupants.remove(nick);
                } else {
                    self.occupants
                        .insert(nick.to_string(), muc.real_jid.clone());
                }
            }
            return;
        }
        if !self.is_target(&p.from_bare) {
            return;
        }
        let was = self.available(&p.from_bare);
        self.presence
            .entry(p.from_bare.clone())
            .or_default()
            .insert(p.from_full.clone(), p.show);
        if !self.presence_ready {
            if !was && self.available(&p.from_bare) && self.pops_early(&p.from_bare) {
                self.presence_ready = true;
                out.push(Output::CancelTimer(TimerId::Presence));
                self.maybe_pop(out);
            } else {
                self.check_presence_ready(out);
            }
            return;
        }
        // A target who comes online while the call waits gets the pop too.
        if !was
            && self.available(&p.from_bare)
            && self.decided
            && self.profile.mode == Mode::Interactive
            && self.outcome.is_none()
            && !self.popped.contains(&p.from_bare)
            && (!self.popped.is_empty() || self.room_popped)
        {
            let to = p.from_bare.clone();
            let pop = self.pop_message(&to);
            out.push(pop);
            log(
                out,
                Level::Info,
                format!("pop sent to {to} (now available)"),
            );
            self.popped.push(to);
        }
    }

    /// The server has handled our initial presence, `took` after it went
    /// out. If the presence window is already over, the targets the server
    /// asks in turn get as long again to answer.
    fn on_settled(&mut self, took: Duration, out: &mut Vec<Output>) {
        self.settled = Some(took);
        if self.presence_ready {
            return;
        }
        self.check_presence_ready(out);
        if !self.presence_ready && self.window_over {
            out.push(Output::SetTimer(TimerId::Presence, took));
        }
    }

    /// Whether `jid`, just heard available, decides the pop without
    /// waiting for the other targets' presence. Servers need not answer
    /// the probe for an offline contact (ejabberd does not), so waiting to
    /// hear everyone would hold every pop for `presence_wait`.
    /// - interactive: yes; a target heard available later gets the pop
    ///   then ("now available").
    /// - route: when no target still unheard could rank before `jid`.
    /// - missed notices and a room still being joined: no, they go out
    ///   once, when the window is over.
    fn pops_early(&self, jid: &str) -> bool {
        if self.room == RoomState::Joining {
            return false;
        }
        match self.profile.mode {
            Mode::Interactive => true,
            Mode::Route => {
                let Some(roster) = &self.roster else {
                    return false;
                };
                let targets = &self.profile.targets;
                let rank = |t: &String| {
                    let index = targets.iter().position(|x| x == t);
                    (self.agent(t).map_or(0, |a| a.priority), index)
                };
                let Some(mine) = targets.iter().find(|t| t.as_str() == jid).map(rank) else {
                    return false;
                };
                targets
                    .iter()
                    .filter(|t| roster.contains(*t) && !self.presence.contains_key(*t))
                    .all(|t| rank(t) > mine)
            }
            _ => false,
        }
    }

    /// Every subscribed target has told us its presence: no need to wait
    /// for the rest of the window.
    fn check_presence_ready(&mut self, out: &mut Vec<Output>) {
        if self.presence_ready {
            return;
        }
        let Some(roster) = &self.roster else {
            return;
        };
        let all_heard = self
            .profile
            .targets
            .iter()
            .filter(|t| roster.contains(*t))
            .all(|t| self.presence.contains_key(t));
        if all_heard && self.room != RoomState::Joining {
            self.presence_ready = true;
            out.push(Output::CancelTimer(TimerId::Presence));
            self.maybe_pop(out);
        }
    }

    /// A room that hides real JIDs from popivr cannot tell it who
    /// answered: say so at once (a room an admin creates is like that on
    /// stock ejabberd and prosody), unless `room_allow` names nicks on
    /// purpose.
    fn warn_if_room_hides_jids(&self, room: &str, jids: RealJids, out: &mut Vec<Output>) {
        let Some(ours) = self.profile.room.as_ref().filter(|r| r.jid == room) else {
            return;
        };
        if jids == RealJids::Hidden && ours.allow_nicks.is_empty() {
            log(out, Level::Warn, room_hides_jids(room));
        }
    }

    fn on_room(&mut self, room: &str, failed: Option<String>, out: &mut Vec<Output>) {
        if !matches!(&self.profile.room, Some(r) if r.jid == room)
            || self.room != RoomState::Joining
        {
            return;
        }
        match failed {
            None => self.room = RoomState::Joined,
            Some(cause) => {
                log(
                    out,
                    Level::Error,
                    format!("cannot join room {room}: {cause}"),
                );
                self.room = RoomState::Failed;
            }
        }
        if self.link == Link::Online && (self.roster.is_some() || !self.needs_presence()) {
            if self.needs_presence() {
                self.check_presence_ready(out);
            } else {
                self.presence_ready = true;
                out.push(Output::CancelTimer(TimerId::Presence));
                self.maybe_pop(out);
            }
        }
    }

    /// `jid` has a resource whose presence the profile counts as available.
    fn available(&self, jid: &str) -> bool {
        let policy = self.profile.presence;
        if policy == PresencePolicy::Any {
            return true;
        }
        let Some(resources) = self.presence.get(jid) else {
            return false;
        };
        resources.values().any(|show| match show {
            Show::Online | Show::Chat => true,
            Show::Away => policy != PresencePolicy::Available,
            Show::Xa | Show::Dnd => policy == PresencePolicy::Busy,
            Show::Unavailable => false,
        })
    }

    /// How a target stands, for the log when nobody is available.
    fn describe(&self, jid: &str) -> String {
        let state = match self.presence.get(jid) {
            _ if self.roster.as_ref().is_some_and(|r| !r.contains(jid)) => "no subscription",
            None => "no presence",
            Some(res) => {
                let rank = |s: &Show| match s {
                    Show::Chat => 0,
                    Show::Online => 1,
                    Show::Away => 2,
                    Show::Xa => 3,
                    Show::Dnd => 4,
                    Show::Unavailable => 5,
                };
                match res.values().min_by_key(|s| rank(s)).copied() {
                    Some(Show::Online) => "online",
                    Some(Show::Chat) => "chat",
                    Some(Show::Away) => "away",
                    Some(Show::Xa) => "xa",
                    Some(Show::Dnd) => "dnd",
                    Some(Show::Unavailable) | None => "offline",
                }
            }
        };
        format!("{jid} ({state})")
    }

    /// The pop goes out once we are logged in, know the caller and know
    /// who is available.
    fn maybe_pop(&mut self, out: &mut Vec<Output>) {
        if self.link != Link::Online
            || !self.pending_reads.is_empty()
            || !self.presence_ready
            || self.decided
            || self.outcome.is_some()
        {
            return;
        }
        self.decided = true;
        let room = self.room == RoomState::Joined;
        let mut available = self.chosen();
        if available.is_empty() && !room {
            match self.nobody_available(out) {
                Some(everyone) => available = everyone,
                // The call took its action.
                None => return,
            }
        }
        match self.profile.mode {
            Mode::Missed => self.send_missed(&available, room, out),
            _ => self.send_pops(&available, room, out),
        }
        self.popped = available.clone();
        self.room_popped = room;
        self.act_for_mode(available, out);
    }

    /// The targets available by the profile's `presence` rule (in `route`
    /// mode the one with the lowest priority).
    fn chosen(&self) -> Vec<String> {
        let mut available: Vec<String> = self
            .profile
            .targets
            .iter()
            .filter(|t| self.available(t))
            .cloned()
            .collect();
        if self.profile.mode == Mode::Route {
            // Lowest priority first; equal ones keep the order of `targets`.
            let priority = |jid: &String| self.agent(jid).map_or(0, |a| a.priority);
            available.sort_by_key(priority);
            available.truncate(1);
        }
        available
    }

    /// Nobody is available: `nobody` decides. `Some(targets)` when every
    /// target gets the pop anyway; `None` when the call took its action.
    fn nobody_available(&mut self, out: &mut Vec<Output>) -> Option<Vec<String>> {
        let targets = self.profile.targets.clone();
        let states: Vec<String> = targets.iter().map(|t| self.describe(t)).collect();
        let who = match states.is_empty() {
            true => "the room is unavailable".to_string(),
            false => states.join(", "),
        };
        log(out, Level::Info, format!("nobody available: {who}"));
        let nobody = match self.profile.mode {
            // Routing to someone unavailable would ring nobody.
            Mode::Route if self.profile.nobody == Nobody::Pop => Nobody::Default,
            _ => self.profile.nobody,
        };
        if nobody == Nobody::Pop {
            return Some(targets);
        }
        if nobody == Nobody::Missed {
            for to in &targets {
                let body = self.text(&self.profile.missed, "", "", to);
                out.push(self.message(to, body));
            }
            self.popped = targets;
        }
        let action = self.profile.default_action.clone();
        let why = "nobody available".to_string();
        self.act(&action, Source::Unavailable(why), None, out);
        None
    }

    /// `mode = missed`: the missed-call notice instead of a pop.
    fn send_missed(&self, available: &[String], room: bool, out: &mut Vec<Output>) {
        for to in available {
            let body = self.text(&self.profile.missed, "", "", to);
            out.push(self.message(to, body));
        }
        if room {
            let body = self.text(&self.profile.missed, "", "", "");
            out.push(self.room_message(body));
        }
        let to = self.recipients(available, room);
        log(out, Level::Info, format!("missed-call notice sent to {to}"));
    }

    /// The pop, to each agent and into the room.
    fn send_pops(&self, available: &[String], room: bool, out: &mut Vec<Output>) {
        for to in available {
            let pop = self.pop_message(to);
            out.push(pop);
        }
        if room {
            let mut body = self.text(&self.profile.template, "", "", "");
            let url = self.url();
            if let Some(url) = &url {
                body = format!("{body}\n{url}");
            }
            out.push(Output::Send(OutgoingMessage {
                url,
                ..OutgoingMessage::groupchat(self.room_jid(), body)
            }));
        }
        let to = self.recipients(available, room);
        log(out, Level::Info, format!("pop sent to {to}"));
    }

    /// Every mode but `interactive` leaves as soon as its messages are out.
    fn act_for_mode(&mut self, available: Vec<String>, out: &mut Vec<Output>) {
        let label = match self.profile.mode {
            Mode::Interactive => return,
            Mode::Notify => "notify",
            Mode::Route => "route",
            Mode::Missed => "missed",
        };
        let exten = available
            .first()
            .and_then(|a| self.agent(a))
            .and_then(|a| a.exten.clone())
            .unwrap_or_default();
        let action = Action {
            kind: ActionKind::Continue(label.into()),
            prompt: None,
        };
        let source = Source::Mode {
            agents: available,
            exten,
        };
        self.act(&action, source, None, out);
    }

    fn recipients(&self, agents: &[String], room: bool) -> String {
        let mut all: Vec<&str> = agents.iter().map(String::as_str).collect();
        if room {
            all.push(self.room_jid());
        }
        all.join(", ")
    }

    fn agent(&self, jid: &str) -> Option<&Agent> {
        self.agents.get(jid)
    }

    fn room_jid(&self) -> &str {
        self.profile.room.as_ref().map_or("", |r| r.jid.as_str())
    }

    /// The CRM link for this call, if the profile has one.
    fn url(&self) -> Option<String> {
        let url = self.profile.url.as_deref()?;
        let link = template::render_url(url, &self.data.values(&self.id, "", ""));
        (!link.is_empty()).then_some(link)
    }

    /// The pop for one agent: their text, the link appended and attached.
    fn pop_message(&self, to: &str) -> Output {
        let mut body = self.text(&self.profile.template, "", "", to);
        let url = self.url();
        if let Some(url) = &url {
            body = format!("{body}\n{url}");
        }
        Output::Send(OutgoingMessage {
            url,
            ..OutgoingMessage::chat(to, body, Some(self.id.clone()))
        })
    }

    fn message(&self, to: &str, body: String) -> Output {
        Output::Send(OutgoingMessage::chat(to, body, Some(self.id.clone())))
    }

    fn room_message(&self, body: String) -> Output {
        Output::Send(OutgoingMessage::groupchat(self.room_jid(), body))
    }

    /// An answer to whoever spoke, the way they spoke.
    fn answer(&self, peer: &Peer, body: String) -> Output {
        match peer {
            Peer::Chat(jid) => self.message(jid, body),
            Peer::Room(nick) => self.room_message(format!("{nick}: {body}")),
        }
    }

    /// Who sent `msg`, if they may steer this call: a popped target in a
    /// one-to-one chat, or an allowed occupant of the popped room.
    fn steerer(&self, msg: &IncomingMessage, out: &mut Vec<Output>) -> Option<(String, Peer)> {
        let from = msg.from_bare.as_str();
        let ignore = |out: &mut Vec<Output>, why: &str| {
            log(
                out,
                Level::Debug,
                format!("message from {} ignored: {why}", msg.from_full),
            );
            None
        };
        if msg.delayed || msg.forwarded {
            return ignore(out, "delayed or forwarded");
        }
        match (&self.profile.room, msg.kind) {
            (Some(room), MsgKind::Groupchat) if room.jid == from => {
                let nick = resource(&msg.from_full);
                if !self.room_popped {
                    return ignore(out, "no pop in the room yet");
                }
                if nick.is_empty() || nick == room.nick {
                    return None;
                }
                let allowed = match self.occupants.get(nick) {
                    Some(Some(real)) => room.allow_jids.contains(real).then(|| real.clone()),
                    // The room hides real JIDs: nicks are all we have.
                    Some(None) if room.allow_nicks.is_empty() => {
                        let why = format!(
                            "answer from {nick} in {from} ignored: {}",
                            room_hides_jids(from)
                        );
                        log(out, Level::Warn, why);
                        return None;
                    }
                    Some(None) => room
                        .allow_nicks
                        .iter()
                        .any(|n| n == nick)
                        .then(|| format!("{from}/{nick}")),
                    None => None,
                };
                match allowed {
                    Some(who) => Some((who, Peer::Room(nick.to_string()))),
                    None => ignore(out, "occupant not allowed to answer"),
                }
            }
            (_, MsgKind::Chat | MsgKind::Normal) if self.popped.iter().any(|t| t == from) => {
                Some((from.to_string(), Peer::Chat(from.to_string())))
            }
            (_, MsgKind::Chat | MsgKind::Normal) => ignore(out, "not a target of this call"),
            (_, kind) => ignore(out, &format!("{kind:?} message")),
        }
    }

    fn on_message(&mut self, msg: IncomingMessage, out: &mut Vec<Output>) {
        let Some((who, peer)) = self.steerer(&msg, out) else {
            return;
        };
        let Some(text) = msg.body.as_deref().map(str::trim).filter(|t| !t.is_empty()) else {
            return;
        };
        if let Some(outcome) = &self.outcome {
            let body = format!("This call was already handled: {outcome}.");
            out.push(self.answer(&peer, body));
            return;
        }
        if self.profile.mode != Mode::Interactive {
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
            out.push(self.answer(&peer, self.profile.help.clone()));
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
                    out.push(self.answer(&peer, body));
                    return;
                }
                None => {
                    let body = format!("Say which number: {first} NUMBER");
                    out.push(self.answer(&peer, body));
                    return;
                }
            },
            _ => None,
        };
        let source = Source::Agent {
            jid: who,
            reply: text.to_string(),
            from: peer,
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
            TimerId::Presence if !self.presence_ready => {
                if self.needs_presence() && self.settled.is_none() && self.link == Link::Online {
                    // A busy server (a burst of logins) has not even
                    // handled our presence yet: nobody's absence is known.
                    // Wait for it (the reply timeout still bounds the call).
                    if !self.window_over {
                        log(
                            out,
                            Level::Info,
                            "the XMPP server is slow to answer: waiting for it before deciding who is available"
                                .into(),
                        );
                    }
                    self.window_over = true;
                    return;
                }
                if self.room == RoomState::Joining {
                    log(
                        out,
                        Level::Warn,
                        format!("room {} not joined in time", self.room_jid()),
                    );
                    self.room = RoomState::Failed;
                }
                if self.needs_presence() && self.roster.is_none() {
                    log(out, Level::Warn, "no roster from the server in time".into());
                }
                self.presence_ready = true;
                self.maybe_pop(out);
            }
            _ => {}
        }
    }

    /// The outcome, to everyone the call popped: the agent who answered
    /// gets `confirm`, the others `taken` (for a key or the timeout, all
    /// get `confirm` with what decided it).
    fn tell_agents(
        &self,
        source: &Source,
        outcome: &str,
        by: &str,
        agent: &str,
        out: &mut Vec<Output>,
    ) {
        let informs = matches!(
            source,
            Source::Agent { .. } | Source::Key(_) | Source::Timeout
        );
        if self.link != Link::Online || !informs {
            return;
        }
        let text = match source {
            Source::Agent { .. } => outcome.to_string(),
            _ => format!("{outcome} ({by})"),
        };
        let winner = match source {
            Source::Agent { from, .. } => Some(from),
            _ => None,
        };
        for to in &self.popped {
            // `agent` is the answerer's bare JID, also when they answered
            // in the room (its real JID): they are told the outcome, not
            // that someone took the call.
            let template = match winner {
                Some(_) if *to != agent => &self.profile.taken,
                _ => &self.profile.confirm,
            };
            let body = self.text(template, &text, agent, to);
            out.push(self.message(to, body));
        }
        if self.room_popped {
            let template = match winner {
                Some(Peer::Room(_)) | None => &self.profile.confirm,
                Some(Peer::Chat(_)) => &self.profile.taken,
            };
            let body = self.text(template, &text, agent, "");
            out.push(self.room_message(body));
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
        out.push(Output::CancelTimer(TimerId::Presence));
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
            Source::Agent { jid, reply, .. } => (jid.clone(), filter_reply(reply), jid.clone()),
            Source::Key(k) => (String::new(), k.to_string(), format!("caller key {k}")),
            Source::Timeout => (String::new(), "timeout".to_string(), "timeout".to_string()),
            Source::Unavailable(why) => (String::new(), String::new(), why.clone()),
            Source::Mode { agents, .. } => (agents.join(" "), String::new(), label.clone()),
        };
        log(
            out,
            Level::Info,
            format!("action {label} ({outcome}) by {by}"),
        );
        let exten = match &source {
            Source::Mode { exten, .. } => exten.clone(),
            Source::Agent { jid, .. } => self
                .agent(jid)
                .and_then(|a| a.exten.clone())
                .unwrap_or_default(),
            _ => String::new(),
        };
        let mut vars = vec![
            ("POPIVR_ACTION".to_string(), label),
            ("POPIVR_REPLY".to_string(), reply),
            ("POPIVR_AGENT".to_string(), agent.clone()),
            ("POPIVR_TARGET".to_string(), target),
        ];
        if !exten.is_empty() {
            vars.push(("POPIVR_AGENT_EXTEN".to_string(), exten));
        }
        // Tell the agents before Asterisk hears of it: once `E` is answered
        // Asterisk closes our input and the process ends.
        self.tell_agents(&source, &outcome, &by, &agent, out);
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
        if self.link == Link::Online && self.profile.mode == Mode::Interactive {
            for to in &self.popped {
                let body = self.text(&self.profile.missed, "", "", to);
                out.push(self.message(to, body));
            }
            if self.room_popped {
                let body = self.text(&self.profile.missed, "", "", "");
                out.push(self.room_message(body));
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

/// The resource of a full JID (a room occupant's nick).
fn resource(full: &str) -> &str {
    full.split_once('/').map_or("", |(_, r)| r)
}

/// Why answers in `room` cannot be checked, and what to do about it.
pub fn room_hides_jids(room: &str) -> String {
    format!(
        "room {room} hides its occupants' real JIDs from popivr, so answers there cannot be \
         checked against room_allow and are ignored. Make the room non-anonymous (ejabberd: \
         room option anonymous: false; prosody: whois = anyone), or make popivr's account a \
         moderator there, or name nicks in room_allow on purpose"
    )
}
