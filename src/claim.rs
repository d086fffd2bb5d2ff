//! Which replies a per-call process takes, when every call of a profile
//! logs in with the same account. Pure: no I/O, no clock; the per-call
//! shell feeds it what its call sends and what the account's other
//! sessions announce, and carries out its [`Claim`]s.
//!
//! Every session of the account may get one reply: a server hands a chat
//! to the bare JID to all of the account's sessions of the highest
//! priority, or to all available ones (RFC 6121 §8.5.2.1.1 allows both),
//! and one for a session that is gone to the others (§8.5.3.2.1). Most
//! clients show all of an account's sessions in one chat, drop the thread
//! and write to the bare JID. So each process announces, in its presence,
//! its call id and the agents it popped ([`Announcement`]), *before* its
//! first pop, and that it took its action *after* its last word to them.
//! The server delivers our presence to the account's other sessions
//! before the pop that follows it, so no agent can answer a pop before
//! every other session knows of it.
//!
//! A reply from an agent this call popped is this call's when:
//!
//! 1. its thread is this call's id (each pop carries it), or
//! 2. it starts with this call's tag (`#<id> 1`; the tag is removed), or
//! 3. it carries neither another call's thread nor tag, is addressed to
//!    this session or to the bare JID (not to another session's full JID),
//!    no other call was waiting for this agent at any moment since this
//!    call popped them ("contested" below), and no other call that popped
//!    them ended less than its [`LATE_REPLY`] ago.
//!
//! The last rule is for a late answer to a call that is over (a first
//! answer, or a second one from the agent who decided it): some servers
//! (ejabberd) hand a chat for a session that is gone to another one as if
//! written to it, and most clients send no thread, so only the time tells
//! it from an answer to the next pop. A process cannot ask the one that
//! ended, so each leaves the time it ended, per agent it popped, in the
//! account's private storage (XEP-0049: stock on prosody and
//! ejabberd), and each reads it for the agents it pops, just after the
//! pop ([`Claims::recalled`]); a reply that comes before that answer waits
//! for it ([`Claim::Wait`]). The server handles our stanzas in order, so
//! a call that ended before this one popped the agent either wrote its
//! time before our read, or was still waiting when we popped them (and
//! its announcement made the agent contested).
//!
//! Otherwise it steers nothing here, and one session tells the agent why:
//! the one it was addressed to, or, when all got it, the one with the
//! lowest call id among the live sessions that popped this agent.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::call::{Addressed, Announcement, IncomingMessage, MsgKind, OutgoingMessage};
use crate::serve::router::split_tag;

/// For how long after a call that popped an agent ended a reply of theirs
/// with no thread or tag moves no other call: it may be a late answer to
/// the call that ended, written before the agent saw it end (or saw the
/// next pop). Both modes; the default of the profile key `late_reply`,
/// which the call that ended brings.
pub const LATE_REPLY: Duration = Duration::from_secs(10);

/// A call that popped an agent and ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// Its id.
    pub call: String,
    /// When, in milliseconds since the Unix epoch.
    pub at: u64,
    /// How long a late answer to it is expected (its profile's
    /// `late_reply`).
    pub window: Duration,
}

impl Ended {
    /// Whether a reply at `now` (ms since the Unix epoch) may still be a
    /// late answer to this call. A time ahead of ours (another host's
    /// clock) counts as now, unless it is further ahead than the window
    /// itself: that is a wrong clock, not a call.
    pub fn recent(&self, now: u64) -> Option<Duration> {
        let window = self.window.as_millis() as u64;
        let ago = now.abs_diff(self.at);
        (ago < window).then(|| Duration::from_millis(now.saturating_sub(self.at)))
    }
}

/// The notice for a reply that may be a late answer to call `ended`
/// (tags with their `#`), in both modes.
pub fn late_notice(ended: &str, ago: Duration, tag: &str, body: &str) -> String {
    let example: String = body.chars().take(20).collect();
    format!(
        "Call {ended} also popped you and ended {} s ago, so your reply did nothing: it may \
         have been meant for that call. To answer call {tag}, start your reply with its tag, \
         e.g. \"{tag} {example}\".",
        ago.as_secs().max(1)
    )
}

/// What to do with an incoming message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Hand it (its tag removed) to our call.
    Mine(IncomingMessage),
    /// Not ours: send the agent this instead.
    Answer(OutgoingMessage),
    /// Not ours, and another session answers (or nobody need); the reason
    /// is for a debug log.
    Ignore(&'static str),
    /// Ours unless the agent's last call ended just before:
    /// ask again once the storage has answered ([`Claims::recalled`]).
    Wait(IncomingMessage),
}

/// What one other session of the account said last.
#[derive(Debug, Clone)]
struct Sibling {
    call: String,
    waiting: bool,
    agents: BTreeSet<String>,
    contested: BTreeSet<String>,
}

impl Sibling {
    /// Whether this session takes a reply from `agent` that carries no
    /// thread or tag and went to every session.
    fn takes(&self, agent: &str) -> bool {
        self.waiting && self.agents.contains(agent) && !self.contested.contains(agent)
    }
}

#[derive(Debug)]
pub struct Claims {
    /// Our call's id.
    call: String,
    /// The agents our call popped, in order.
    popped: Vec<String>,
    /// Our call took no action yet.
    waiting: bool,
    /// The live sessions of the account that announced a call, by full JID.
    siblings: BTreeMap<String, Sibling>,
    /// Agents for whom another call was waiting at some moment since we
    /// popped them: a reply of theirs needs a thread or a tag.
    contested: BTreeSet<String>,
    /// Agents whose last ended call we asked the storage for.
    recalling: BTreeSet<String>,
    /// The last other call that popped each agent and ended.
    ended: BTreeMap<String, Ended>,
}

impl Claims {
    pub fn new(call: &str) -> Self {
        Claims {
            call: call.to_string(),
            popped: Vec::new(),
            waiting: true,
            siblings: BTreeMap::new(),
            contested: BTreeSet::new(),
            recalling: BTreeSet::new(),
            ended: BTreeMap::new(),
        }
    }

    /// Our call's id.
    pub fn call(&self) -> &str {
        &self.call
    }

    /// Our call is about to send `msg`. Returns the announcement to send
    /// first when it is a pop to an agent we had not popped yet; the shell
    /// then reads that agent's last ended call from the storage, after
    /// the pop, and hands the answer to [`Claims::recalled`].
    pub fn sending(&mut self, msg: &OutgoingMessage) -> Option<Announcement> {
        let pop = msg.thread.as_deref() == Some(self.call.as_str())
            && msg.kind != crate::call::OutKind::Groupchat;
        if !pop || !self.waiting || self.popped.contains(&msg.to) {
            return None;
        }
        self.popped.push(msg.to.clone());
        self.recalling.insert(msg.to.clone());
        let elsewhere = self
            .siblings
            .values()
            .any(|s| s.waiting && s.agents.contains(&msg.to));
        if elsewhere {
            self.contested.insert(msg.to.clone());
        }
        Some(self.announcement())
    }

    /// The storage's answer for `agent`: the last call that ended without
    /// their answer, if any (`None` too when the storage failed: then a
    /// late answer cannot be told from a reply to us; the shell logs it).
    pub fn recalled(&mut self, agent: &str, ended: Option<Ended>) {
        self.recalling.remove(agent);
        match ended.filter(|e| e.call != self.call) {
            Some(e) => {
                self.ended.insert(agent.to_string(), e);
            }
            None => {
                self.ended.remove(agent);
            }
        }
    }

    /// Whether a reply from `agent` waits for the storage.
    pub fn recalling(&self, agent: &str) -> bool {
        self.recalling.contains(agent)
    }

    /// The storage will not answer (the link is gone).
    pub fn forget_recalls(&mut self) {
        self.recalling.clear();
    }

    /// Our call took its action (its last words to the agents are sent).
    /// Returns the announcement to send, if anyone was popped.
    pub fn decided(&mut self) -> Option<Announcement> {
        if !self.waiting {
            return None;
        }
        self.waiting = false;
        (!self.popped.is_empty()).then(|| self.announcement())
    }

    fn announcement(&self) -> Announcement {
        Announcement {
            call: self.call.clone(),
            waiting: self.waiting,
            agents: self.popped.clone(),
            contested: self.contested.iter().cloned().collect(),
        }
    }

    /// Another session of the account (`from_full`) is online with this
    /// announcement (`None`: it announces no call), or is gone. Returns
    /// our announcement again when it changed (an agent became
    /// contested), for the others to know we no longer take their
    /// replies.
    pub fn sibling(
        &mut self,
        from_full: &str,
        online: bool,
        said: Option<&Announcement>,
    ) -> Option<Announcement> {
        let Some(a) = said.filter(|_| online).filter(|a| a.call != self.call) else {
            self.siblings.remove(from_full);
            return None;
        };
        let sibling = Sibling {
            call: a.call.clone(),
            waiting: a.waiting,
            agents: a.agents.iter().cloned().collect(),
            contested: a.contested.iter().cloned().collect(),
        };
        let mut changed = false;
        if sibling.waiting && self.waiting {
            for agent in &self.popped {
                if sibling.agents.contains(agent) {
                    changed |= self.contested.insert(agent.clone());
                }
            }
        }
        self.siblings.insert(from_full.to_string(), sibling);
        changed.then(|| self.announcement())
    }

    /// What `msg`, come at `now` (ms since the Unix epoch), is to our call.
    pub fn claim(&self, mut msg: IncomingMessage, now: u64) -> Claim {
        let from = msg.from_bare.clone();
        let plain =
            matches!(msg.kind, MsgKind::Chat | MsgKind::Normal) && !msg.delayed && !msg.forwarded;
        // The call core decides what anything else means (a room, a
        // stranger, a carbon): none of it can be another call's reply.
        if !plain || !self.popped.contains(&from) {
            return Claim::Mine(msg);
        }
        let body = msg.body.as_deref().map(str::trim).unwrap_or("");
        if let Some((tag, rest)) = split_tag(body, looks_like_call_id) {
            if tag == self.call {
                msg.body = Some(rest.to_string());
                return Claim::Mine(msg);
            }
            return self.elsewhere(&tag, &msg);
        }
        let ours = |t: &&str| looks_like_call_id(t) && t.bytes().all(|b| !b.is_ascii_uppercase());
        if let Some(thread) = msg.thread.as_deref().filter(ours) {
            if thread == self.call {
                return Claim::Mine(msg);
            }
            return self.elsewhere(thread, &msg);
        }
        if body.is_empty() {
            // A chat state or receipt: nothing to steer or to answer.
            return Claim::Mine(msg);
        }
        let to_me = msg.to == Addressed::Me;
        if let Addressed::Other(_) = msg.to {
            return self.notice(&msg, "That pop's call is over: your reply did nothing.");
        }
        if self.waiting && !self.contested.contains(&from) {
            if self.recalling.contains(&from) {
                return Claim::Wait(msg);
            }
            if let Some((e, ago)) = self
                .ended
                .get(&from)
                .and_then(|e| Some((e, e.recent(now)?)))
            {
                // We are the only call waiting for them: the others leave
                // the notice to us (Sibling::takes).
                let text = late_notice(
                    &format!("#{}", e.call),
                    ago,
                    &format!("#{}", self.call),
                    body,
                );
                return Claim::Answer(OutgoingMessage::chat(&from, text, None));
            }
            return Claim::Mine(msg);
        }
        // Another call may take it only when ours is decided: while ours
        // waits, the other one knew of our pop before the agent could
        // answer both (our announcement came first), so it is contested
        // too, even if its saying so has not reached us yet.
        if !self.waiting && !to_me && self.siblings.values().any(|s| s.takes(&from)) {
            return Claim::Ignore("another session's call takes it");
        }
        let others_wait = self
            .siblings
            .values()
            .any(|s| s.waiting && s.agents.contains(&from));
        if !self.waiting && !others_wait {
            // Only our call, already decided: the core says so, once.
            return match to_me || self.elected(&from) {
                true => Claim::Mine(msg),
                false => Claim::Ignore("another session tells the agent"),
            };
        }
        self.notice(
            &msg,
            "Several calls popped you, so your reply did nothing: it could be for any of them.",
        )
    }

    /// A thread or tag that names call `id`, not ours.
    fn elsewhere(&self, id: &str, msg: &IncomingMessage) -> Claim {
        match self.siblings.values().any(|s| s.call == id) {
            // That call's own session has it and answers.
            true => Claim::Ignore("another running call's reply"),
            false => self.notice(msg, &format!("Call #{id} is over: your reply did nothing.")),
        }
    }

    /// This session is the one to answer `agent` about a reply every
    /// session got: the live one with the lowest call id that popped them.
    fn elected(&self, agent: &str) -> bool {
        self.siblings
            .values()
            .filter(|s| s.agents.contains(agent))
            .all(|s| s.call > self.call)
    }

    /// Tell the sender why their reply did nothing, if this session is
    /// the one to: the one it was addressed to, else the elected one.
    fn notice(&self, msg: &IncomingMessage, text: &str) -> Claim {
        let agent = msg.from_bare.as_str();
        if msg.to != Addressed::Me && !self.elected(agent) {
            return Claim::Ignore("another session tells the agent");
        }
        let mut waiting: Vec<&str> = self
            .siblings
            .values()
            .filter(|s| s.waiting && s.agents.contains(agent))
            .map(|s| s.call.as_str())
            .collect();
        if self.waiting {
            waiting.push(&self.call);
        }
        waiting.sort_unstable();
        let how = match waiting.first() {
            None => " No call is waiting for you now.".to_string(),
            Some(one) => {
                let tags: Vec<String> = waiting.iter().map(|c| format!("#{c}")).collect();
                format!(
                    " Waiting: {}. Answer in the pop's own thread, or start your reply with \
                     the call's tag, e.g. \"#{one} 1\".",
                    tags.join(", ")
                )
            }
        };
        Claim::Answer(OutgoingMessage::chat(agent, format!("{text}{how}"), None))
    }
}

/// A per-call id ([`crate::run`]'s shape): 6 to 16 hex digits (a typed
/// tag may be in upper case).
pub fn looks_like_call_id(s: &str) -> bool {
    (6..=16).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
