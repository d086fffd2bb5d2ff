//! "One reply moves at most one call, and only the call it was written
//! for", checked on random histories: calls start, pop agents, time out,
//! end, the clock moves, and agents answer a call they saw popped (in its
//! thread, with its tag, or plainly; to the bare JID or to the full JID
//! the pop came from, live or gone). The same histories drive per-call
//! processes ([`Claims`], with the server's presence broadcast and the
//! account's private storage between them, on a server that keeps the
//! address of a gone session's chat and on one that rewrites it) and
//! `serve`'s [`Router`].
//!
//! What may move another call than the one written for is exactly what
//! the README and SECURITY.md leave open: a plain answer to a call that
//! ended more than its `late_reply` before.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::{Claim, Claims, Ended, LATE_REPLY};
use crate::call::{Addressed, Announcement, IncomingMessage, MsgKind, OutgoingMessage};
use crate::serve::router::{Route, Router};

const AGENTS: [&str; 2] = ["alice@example.org", "bob@example.org"];
const T0: u64 = 1_765_000_000_000;

#[derive(Debug, Clone)]
enum Op {
    Start,
    /// A waiting call (picked by number) pops an agent.
    Pop(usize, usize),
    /// A waiting call takes its default action.
    Timeout(usize),
    /// A live call ends (the caller hangs up if it still waits).
    End(usize),
    Wait(u64),
    /// An agent answers a call that popped them (picked by number).
    Reply(usize, usize, Form, To),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Thread,
    Tag,
    Plain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum To {
    Bare,
    /// The full JID the pop came from.
    Full,
}

fn op() -> impl Strategy<Value = Op> {
    let form = prop_oneof![Just(Form::Thread), Just(Form::Tag), Just(Form::Plain)];
    let to = prop_oneof![Just(To::Bare), Just(To::Full)];
    prop_oneof![
        2 => Just(Op::Start),
        3 => (0..8usize, 0..2usize).prop_map(|(c, a)| Op::Pop(c, a)),
        1 => (0..8usize).prop_map(Op::Timeout),
        1 => (0..8usize).prop_map(Op::End),
        2 => (0..14_000u64).prop_map(Op::Wait),
        5 => (0..2usize, 0..8usize, form, to).prop_map(|(a, c, f, t)| Op::Reply(a, c, f, t)),
    ]
}

/// The code under test, as the history drives it.
trait Side {
    /// The id the call's thread and tag carry.
    fn wire(&self, id: &str) -> String;
    fn start(&mut self, id: &str);
    fn pop(&mut self, id: &str, agent: &str);
    /// The call took its action at `now`; it had asked these agents.
    fn decided(&mut self, id: &str, unanswered: &[&str], now: u64);
    fn end(&mut self, id: &str);
    /// The reply, come at `now`, as the server delivers it (`to` the full
    /// JID of call `written_for`, `gone` or not); the calls that take it.
    fn reply(
        &mut self,
        msg: IncomingMessage,
        to: To,
        written_for: (&str, bool),
        now: u64,
    ) -> Vec<String>;
}

/// What happened to a call, whatever the code under test thinks.
#[derive(Debug)]
struct Rec {
    id: String,
    popped: Vec<usize>,
    waiting: bool,
    live: bool,
    decided_at: Option<u64>,
}

fn run(side: &mut dyn Side, ops: &[Op]) -> Result<(), String> {
    let mut calls: Vec<Rec> = Vec::new();
    let mut now = T0;
    let mut log = Vec::new();
    for op in ops {
        log.push(format!("{op:?} at +{} ms", now - T0));
        let pick = |calls: &[Rec], k: usize, ok: &dyn Fn(&Rec) -> bool| {
            let fit: Vec<usize> = (0..calls.len()).filter(|&i| ok(&calls[i])).collect();
            (!fit.is_empty()).then(|| fit[k % fit.len()])
        };
        match *op {
            Op::Start => {
                let id = format!("{:08x}", calls.len() + 1);
                side.start(&id);
                calls.push(Rec {
                    id,
                    popped: Vec::new(),
                    waiting: true,
                    live: true,
                    decided_at: None,
                });
            }
            Op::Pop(k, a) => {
                let Some(i) = pick(&calls, k, &|c| c.waiting && !c.popped.contains(&a)) else {
                    continue;
                };
                side.pop(&calls[i].id, AGENTS[a]);
                calls[i].popped.push(a);
            }
            Op::Timeout(k) | Op::End(k) => {
                let ending = matches!(op, Op::End(_));
                let Some(i) = pick(&calls, k, &|c| c.live && (ending || c.waiting)) else {
                    continue;
                };
                if calls[i].waiting {
                    let all: Vec<&str> = calls[i].popped.iter().map(|&a| AGENTS[a]).collect();
                    side.decided(&calls[i].id, &all, now);
                    calls[i].waiting = false;
                    calls[i].decided_at = Some(now);
                }
                if ending {
                    side.end(&calls[i].id);
                    calls[i].live = false;
                }
            }
            Op::Wait(ms) => now += ms,
            Op::Reply(a, k, form, to) => {
                let Some(i) = pick(&calls, k, &|c| c.popped.contains(&a)) else {
                    continue;
                };
                let wire = side.wire(&calls[i].id);
                let (body, thread) = match form {
                    Form::Thread => ("1".to_string(), Some(wire)),
                    Form::Tag => (format!("#{wire} 1"), None),
                    Form::Plain => ("1".to_string(), None),
                };
                let msg = IncomingMessage {
                    from_bare: AGENTS[a].to_string(),
                    from_full: format!("{}/desk", AGENTS[a]),
                    kind: MsgKind::Chat,
                    body: Some(body),
                    delayed: false,
                    forwarded: false,
                    thread,
                    to: Addressed::Bare,
                };
                let taken = side.reply(msg, to, (&calls[i].id, !calls[i].live), now);
                let movers: Vec<usize> = taken
                    .iter()
                    .filter_map(|id| calls.iter().position(|c| &c.id == id))
                    .filter(|&m| calls[m].waiting)
                    .collect();
                log.push(format!("  taken by {taken:?}"));
                if movers.len() > 1 {
                    return Err(format!("one reply moved {movers:?}:\n{}", log.join("\n")));
                }
                let Some(&m) = movers.first() else { continue };
                let written_for = &calls[i];
                let late = written_for
                    .decided_at
                    .is_some_and(|at| now >= at + LATE_REPLY.as_millis() as u64);
                let left_open = form == Form::Plain && !written_for.waiting && late;
                if m != i && !left_open {
                    return Err(format!(
                        "a reply written for {} moved {}:\n{}",
                        written_for.id,
                        calls[m].id,
                        log.join("\n")
                    ));
                }
                let asked: Vec<&str> = calls[m].popped.iter().map(|&o| AGENTS[o]).collect();
                side.decided(&calls[m].id, &asked, now);
                calls[m].waiting = false;
                calls[m].decided_at = Some(now);
            }
        }
    }
    Ok(())
}

/// Per-call processes of one account, by call id, with the server's
/// presence broadcast done at once and the storage read right after each
/// pop (the order the module's argument rests on).
struct PerCall {
    procs: BTreeMap<String, Claims>,
    storage: BTreeMap<String, Ended>,
    /// The server hands a chat for a gone session to the others as if
    /// written to them (ejabberd), else with its address (prosody).
    rewrites_to: bool,
}

fn jid(id: &str) -> String {
    format!("pbx@example.org/{id}")
}

impl PerCall {
    fn new(rewrites_to: bool) -> Self {
        PerCall {
            procs: BTreeMap::new(),
            storage: BTreeMap::new(),
            rewrites_to,
        }
    }

    fn broadcast(&mut self, from: &str, a: Option<Announcement>) {
        let Some(a) = a else { return };
        let mut again = Vec::new();
        for (id, c) in self.procs.iter_mut().filter(|(id, _)| *id != from) {
            if let Some(b) = c.sibling(&jid(from), true, Some(&a)) {
                again.push((id.clone(), b));
            }
        }
        for (id, b) in again {
            self.broadcast(&id, Some(b));
        }
    }
}

impl Side for PerCall {
    fn wire(&self, id: &str) -> String {
        id.to_string()
    }

    fn start(&mut self, id: &str) {
        let mut claims = Claims::new(id);
        for (other, c) in &self.procs {
            let said = c.announcement();
            let said = (!said.agents.is_empty()).then_some(said);
            claims.sibling(&jid(other), true, said.as_ref());
        }
        self.procs.insert(id.to_string(), claims);
    }

    fn pop(&mut self, id: &str, agent: &str) {
        let msg = OutgoingMessage::chat(agent, "pop", Some(id.to_string()));
        let c = self.procs.get_mut(id).expect("a live call");
        let a = c.sending(&msg);
        let first = a.is_some();
        self.broadcast(id, a);
        if first {
            let stored = self.storage.get(agent).cloned();
            let c = self.procs.get_mut(id).expect("a live call");
            c.recalled(agent, stored);
        }
    }

    fn decided(&mut self, id: &str, unanswered: &[&str], now: u64) {
        for agent in unanswered {
            let ended = Ended {
                call: id.to_string(),
                at: now,
                window: LATE_REPLY,
            };
            self.storage.insert(agent.to_string(), ended);
        }
        let a = self.procs.get_mut(id).and_then(Claims::decided);
        self.broadcast(id, a);
    }

    fn end(&mut self, id: &str) {
        self.procs.remove(id);
        for c in self.procs.values_mut() {
            c.sibling(&jid(id), false, None);
        }
    }

    fn reply(
        &mut self,
        msg: IncomingMessage,
        to: To,
        (written_for, gone): (&str, bool),
        now: u64,
    ) -> Vec<String> {
        let delivery: Vec<(String, Addressed)> = match (to, gone) {
            (To::Full, false) => vec![(written_for.to_string(), Addressed::Me)],
            (To::Full, true) if self.rewrites_to => self
                .procs
                .keys()
                .map(|id| (id.clone(), Addressed::Me))
                .collect(),
            (To::Full, true) => {
                let to = Addressed::Other(jid(written_for));
                self.procs
                    .keys()
                    .map(|id| (id.clone(), to.clone()))
                    .collect()
            }
            (To::Bare, _) => self
                .procs
                .keys()
                .map(|id| (id.clone(), Addressed::Bare))
                .collect(),
        };
        let mut taken = Vec::new();
        for (id, to) in delivery {
            let c = &self.procs[&id];
            let msg = IncomingMessage { to, ..msg.clone() };
            match c.claim(msg, now) {
                Claim::Mine(m) if c.popped.contains(&m.from_bare) => taken.push(id),
                Claim::Wait(_) => panic!("the storage answers before any reply"),
                _ => {}
            }
        }
        taken
    }
}

/// `serve`: one router, one JID.
struct Serve {
    router: Router,
    numbers: BTreeMap<String, u64>,
}

impl Side for Serve {
    fn wire(&self, id: &str) -> String {
        self.router.id(self.numbers[id])
    }

    fn start(&mut self, id: &str) {
        let n = self.numbers.len() as u64 + 1;
        self.numbers.insert(id.to_string(), n);
        self.router.open(n);
    }

    fn pop(&mut self, id: &str, agent: &str) {
        let n = self.numbers[id];
        let msg = OutgoingMessage::chat(agent, "pop", Some(self.router.id(n)));
        self.router.sent(n, &msg);
    }

    fn decided(&mut self, id: &str, unanswered: &[&str], now: u64) {
        let n = self.numbers[id];
        self.router.decided(n, "done");
        let agents = unanswered.iter().map(|a| a.to_string()).collect();
        self.router.answers_may_follow(n, agents, now, LATE_REPLY);
    }

    fn end(&mut self, id: &str) {
        self.router.close(self.numbers[id]);
    }

    fn reply(&mut self, msg: IncomingMessage, to: To, _: (&str, bool), now: u64) -> Vec<String> {
        let to = match to {
            To::Full => Addressed::Me,
            To::Bare => Addressed::Bare,
        };
        match self.router.route(IncomingMessage { to, ..msg }, now) {
            Route::Deliver(n, _) => {
                let id = self
                    .numbers
                    .iter()
                    .find(|(_, m)| **m == n)
                    .map(|(id, _)| id);
                id.into_iter().cloned().collect()
            }
            _ => Vec::new(),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// Per-call processes, on a server that keeps a gone session's address
    /// (prosody) and on one that rewrites it (ejabberd).
    #[test]
    fn per_call_a_reply_moves_at_most_the_call_it_was_written_for(
        ops in proptest::collection::vec(op(), 1..48),
        rewrites_to in any::<bool>(),
    ) {
        let outcome = run(&mut PerCall::new(rewrites_to), &ops);
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }

    #[test]
    fn serve_a_reply_moves_at_most_the_call_it_was_written_for(
        ops in proptest::collection::vec(op(), 1..48),
    ) {
        let mut side = Serve { router: Router::new(""), numbers: BTreeMap::new() };
        let outcome = run(&mut side, &ops);
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }
}
