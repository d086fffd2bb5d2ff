use super::*;
use crate::call::OutKind;
use crate::serve::router::tests::{reply, threaded};

const ALICE: &str = "alice@example.org";
const BOB: &str = "bob@example.org";

/// A per-call process as the tests see it: its claims and its full JID.
struct Proc {
    jid: String,
    claims: Claims,
}

/// The account's sessions, with the server's presence broadcast between
/// them done at once (what the ordering argument in the module promises).
#[derive(Default)]
struct Account {
    procs: Vec<Proc>,
    /// The account's private storage: each agent's last unanswered call.
    storage: BTreeMap<String, Ended>,
    /// The wall clock, ms since the Unix epoch.
    now: u64,
}

/// When the tests' replies come, unless a test moves the clock.
const NOW: u64 = 1_765_000_000_000;

impl Account {
    fn start(&mut self, call: &str) -> usize {
        if self.now == 0 {
            self.now = NOW;
        }
        let jid = format!("pbx@example.org/{call}");
        let mut claims = Claims::new(call);
        // A new session hears the others' current presence at login.
        for p in &self.procs {
            let said = p.claims.announcement();
            let said = (!said.agents.is_empty()).then_some(said);
            claims.sibling(&p.jid, true, said.as_ref());
        }
        self.procs.push(Proc { jid, claims });
        self.procs.len() - 1
    }

    fn broadcast(&mut self, from: usize, a: Option<Announcement>) {
        let Some(a) = a else { return };
        let jid = self.procs[from].jid.clone();
        let mut again = Vec::new();
        for (i, p) in self.procs.iter_mut().enumerate() {
            if i != from
                && let Some(b) = p.claims.sibling(&jid, true, Some(&a))
            {
                again.push((i, b));
            }
        }
        for (i, b) in again {
            self.broadcast(i, Some(b));
        }
    }

    fn pop(&mut self, i: usize, agent: &str) {
        let call = self.procs[i].claims.call.clone();
        let msg = OutgoingMessage::chat(agent, "Call from 555", Some(call));
        let a = self.procs[i].claims.sending(&msg);
        let first = a.is_some();
        self.broadcast(i, a);
        // The shell reads the storage right after the pop; the server
        // answers before the agent can see the pop.
        if first {
            let stored = self.storage.get(agent).cloned();
            self.procs[i].claims.recalled(agent, stored);
        }
    }

    /// Call `i` takes its action (an answer, a key, the timeout): it
    /// leaves its end for every agent it popped in the storage first.
    fn decide(&mut self, i: usize) {
        let call = self.procs[i].claims.call.clone();
        for agent in self.procs[i].claims.popped.clone() {
            let ended = Ended {
                call: call.clone(),
                at: self.now,
                window: LATE_REPLY,
            };
            self.storage.insert(agent, ended);
        }
        let a = self.procs[i].claims.decided();
        self.broadcast(i, a);
    }

    fn end(&mut self, i: usize) {
        let jid = self.procs.remove(i).jid;
        for p in &mut self.procs {
            p.claims.sibling(&jid, false, None);
        }
    }

    /// `msg` reaches every session (a bare-JID chat, or one for a session
    /// that is gone); what each makes of it.
    fn deliver(&self, msg: &IncomingMessage) -> Vec<Claim> {
        self.procs
            .iter()
            .map(|p| p.claims.claim(msg.clone(), self.now))
            .collect()
    }

    /// Exactly one session acts on `msg`: `Ok(i)` if session `i` takes it
    /// for its call, `Err(text)` if one tells the agent `text`.
    fn outcome(&self, msg: &IncomingMessage) -> Result<usize, String> {
        let got = self.deliver(msg);
        // `Mine` for an agent a call never popped is the core's to ignore.
        let popped = |i: usize| self.procs[i].claims.popped.contains(&msg.from_bare);
        let acting: Vec<(usize, &Claim)> = got
            .iter()
            .enumerate()
            .filter(|(i, c)| match c {
                Claim::Ignore(_) => false,
                Claim::Mine(_) => popped(*i),
                Claim::Answer(_) => true,
                Claim::Wait(_) => panic!("the storage answers before any reply"),
            })
            .collect();
        match acting.as_slice() {
            [(i, Claim::Mine(_))] => Ok(*i),
            [(_, Claim::Answer(m))] => Err(m.body.clone()),
            other => panic!("not exactly one session acts on {msg:?}: {other:?}"),
        }
    }
}

/// Call `a` popped alice, then call `b` did (while `a` still waited).
fn both_popped_alice() -> (Account, usize, usize) {
    let mut acc = Account::default();
    let a = acc.start("aaaaaa01");
    acc.pop(a, ALICE);
    let b = acc.start("bbbbbb02");
    acc.pop(b, ALICE);
    (acc, a, b)
}

/// Call `aaaaaa01` popped alice, took its action without her answer (a
/// key, the timeout) and is gone.
fn alice_missed_a_call() -> Account {
    let mut acc = Account::default();
    let old = acc.start("aaaaaa01");
    acc.pop(old, ALICE);
    acc.decide(old);
    acc.end(old);
    acc
}

fn to(msg: IncomingMessage, to: Addressed) -> IncomingMessage {
    IncomingMessage { to, ..msg }
}

#[test]
fn the_only_call_that_popped_an_agent_takes_a_bare_reply() {
    let mut acc = Account::default();
    let a = acc.start("aaaaaa01");
    let b = acc.start("bbbbbb02");
    acc.pop(a, ALICE);
    acc.pop(b, BOB);
    assert_eq!(acc.outcome(&reply(ALICE, "1")), Ok(a));
    assert_eq!(acc.outcome(&reply(BOB, "1")), Ok(b));
    // To its own full JID too.
    let mine = to(reply(ALICE, "1"), Addressed::Me);
    assert!(matches!(
        acc.procs[a].claims.claim(mine, NOW),
        Claim::Mine(_)
    ));
}

/// Three calls pop alice: a bare, thread-less `1` steers none of them,
/// and one of them (the lowest id) tells her how to answer.
#[test]
fn a_bare_reply_to_several_waiting_calls_steers_none_and_is_answered_once() {
    let mut acc = Account::default();
    let calls = ["cccccc03", "aaaaaa01", "bbbbbb02"];
    for call in calls {
        let i = acc.start(call);
        acc.pop(i, ALICE);
    }
    let text = acc.outcome(&reply(ALICE, "1")).unwrap_err();
    assert!(text.starts_with("Several calls popped you"), "{text}");
    assert!(text.contains("#aaaaaa01, #bbbbbb02, #cccccc03"), "{text}");
    let got = acc.deliver(&reply(ALICE, "1"));
    assert!(matches!(got[1], Claim::Answer(_)), "{got:?}");
    // Thread or tag: exactly that call.
    assert_eq!(acc.outcome(&threaded(ALICE, "1", "bbbbbb02")), Ok(2));
    assert_eq!(acc.outcome(&reply(ALICE, "#CCCCCC03: 2")), Ok(0));
    match acc.procs[0].claims.claim(reply(ALICE, "#cccccc03 2"), NOW) {
        Claim::Mine(m) => assert_eq!(m.body.as_deref(), Some("2")),
        other => panic!("{other:?}"),
    }
}

/// A call that pops alice while another still waits for her makes both
/// contested, whichever popped first, and stays so after the other
/// decides: she may still answer the first pop.
#[test]
fn an_overlap_is_remembered_after_the_other_call_decides() {
    let (mut acc, a, _) = both_popped_alice();
    acc.decide(a);
    let text = acc.outcome(&reply(ALICE, "1")).unwrap_err();
    assert!(text.contains("Waiting: #bbbbbb02."), "{text}");
    acc.end(a);
    let text = acc.outcome(&reply(ALICE, "1")).unwrap_err();
    assert!(text.starts_with("Several calls popped you"), "{text}");
    assert_eq!(acc.outcome(&threaded(ALICE, "1", "bbbbbb02")), Ok(0));
}

/// A call decided (its last words sent) before the next one popped is no
/// rival once a late answer to it can no longer be on its way: the next
/// call takes a bare reply [`LATE_REPLY`] after it ended, not before.
#[test]
fn a_call_decided_before_the_pop_is_no_rival_once_late_answers_are_over() {
    let mut acc = Account::default();
    let a = acc.start("aaaaaa01");
    acc.pop(a, ALICE);
    acc.decide(a);
    let b = acc.start("bbbbbb02");
    acc.pop(b, ALICE);
    let text = acc.outcome(&reply(ALICE, "1")).unwrap_err();
    assert!(text.starts_with("Call #aaaaaa01 also popped you"), "{text}");
    acc.now += LATE_REPLY.as_millis() as u64 - 1;
    assert!(acc.outcome(&reply(ALICE, "1")).is_err());
    acc.now += 1;
    assert_eq!(acc.outcome(&reply(ALICE, "1")), Ok(b));
}

/// alice answers a call whose session is gone, without thread or tag, to
/// its full JID; the server (ejabberd) hands it to the next call's session
/// as if written to it, or to the bare JID. Within [`LATE_REPLY`] of the
/// end no call takes it and the next call's session tells her how to
/// answer it; her tagged answer counts at once.
#[test]
fn a_late_answer_to_a_finished_call_moves_no_other() {
    let mut acc = alice_missed_a_call();
    acc.now += 3_000;
    let next = acc.start("bbbbbb02");
    acc.pop(next, ALICE);
    acc.now += 1_500;
    for msg in [reply(ALICE, "1"), to(reply(ALICE, "1"), Addressed::Me)] {
        let text = acc.outcome(&msg).unwrap_err();
        assert_eq!(
            text,
            "Call #aaaaaa01 also popped you and ended 4 s ago, so your reply did nothing: it \
             may have been meant for that call. To answer call #bbbbbb02, start your reply \
             with its tag, e.g. \"#bbbbbb02 1\"."
        );
    }
    assert_eq!(acc.outcome(&reply(ALICE, "#bbbbbb02 1")), Ok(next));
    assert_eq!(acc.outcome(&threaded(ALICE, "1", "bbbbbb02")), Ok(next));
}

/// The agent whose answer decided a call may still send it a second one
/// (a correction, a client that sends again after a reconnect): for a
/// while their plain reply moves no other call either, like the one of an
/// agent who did not answer.
#[test]
fn the_agent_who_answered_is_held_to_the_tag_too() {
    let mut acc = Account::default();
    let old = acc.start("aaaaaa01");
    acc.pop(old, ALICE);
    acc.pop(old, BOB);
    acc.decide(old);
    acc.end(old);
    let next = acc.start("bbbbbb02");
    acc.pop(next, ALICE);
    acc.pop(next, BOB);
    for agent in [ALICE, BOB] {
        let text = acc.outcome(&reply(agent, "1")).unwrap_err();
        assert!(text.starts_with("Call #aaaaaa01 also popped you"), "{text}");
    }
    acc.now += LATE_REPLY.as_millis() as u64;
    assert_eq!(acc.outcome(&reply(ALICE, "1")), Ok(next));
}

/// A reply that comes before the storage has answered for its sender
/// waits for that answer (in practice the answer is always first: the
/// server handles our read before our pop).
#[test]
fn a_reply_before_the_storage_answers_waits_for_it() {
    let mut c = Claims::new("bbbbbb02");
    c.sending(&OutgoingMessage::chat(
        ALICE,
        "pop",
        Some("bbbbbb02".into()),
    ));
    assert!(matches!(c.claim(reply(ALICE, "1"), NOW), Claim::Wait(_)));
    let old = Ended {
        call: "aaaaaa01".into(),
        at: NOW - 2_000,
        window: LATE_REPLY,
    };
    c.recalled(ALICE, Some(old.clone()));
    assert!(matches!(c.claim(reply(ALICE, "1"), NOW), Claim::Answer(_)));
    // Our own end (a retried store) is not another call's.
    c.recalled(
        ALICE,
        Some(Ended {
            call: "bbbbbb02".into(),
            ..old
        }),
    );
    assert!(matches!(c.claim(reply(ALICE, "1"), NOW), Claim::Mine(_)));
    // A link that broke lets the reply through rather than hold it.
    let mut d = Claims::new("cccccc03");
    d.sending(&OutgoingMessage::chat(
        ALICE,
        "pop",
        Some("cccccc03".into()),
    ));
    d.forget_recalls();
    assert!(matches!(d.claim(reply(ALICE, "1"), NOW), Claim::Mine(_)));
}

/// Another host's clock may be a little ahead (counts as just now) or
/// wrong by more than the window (ignored: a reply is never held back for
/// good by a bad clock).
#[test]
fn an_end_time_from_another_clock() {
    let at = |at| Ended {
        call: "aaaaaa01".into(),
        at,
        window: LATE_REPLY,
    };
    assert_eq!(at(NOW + 2_000).recent(NOW), Some(Duration::ZERO));
    assert_eq!(at(NOW + 3_600_000).recent(NOW), None);
    assert_eq!(at(NOW - 9_000).recent(NOW), Some(Duration::from_secs(9)));
    assert_eq!(at(NOW - 10_000).recent(NOW), None);
}

/// The announcement of the second pop reaches the first call later (it
/// was in flight when the first popped): the first call learns the
/// overlap then and says so again.
#[test]
fn a_late_announcement_contests_the_earlier_call() {
    let mut first = Claims::new("aaaaaa01");
    let pop = OutgoingMessage::chat(ALICE, "pop", Some("aaaaaa01".into()));
    let said = first.sending(&pop).unwrap();
    first.recalled(ALICE, None);
    assert!(said.contested.is_empty());
    assert!(matches!(
        first.claim(reply(ALICE, "1"), NOW),
        Claim::Mine(_)
    ));
    let other = Announcement {
        call: "bbbbbb02".into(),
        waiting: true,
        agents: vec![ALICE.into()],
        contested: vec![ALICE.into()],
    };
    let again = first.sibling("pbx@example.org/b", true, Some(&other));
    assert_eq!(again.unwrap().contested, vec![ALICE.to_string()]);
    assert!(matches!(
        first.claim(reply(ALICE, "1"), NOW),
        Claim::Answer(_)
    ));
    // Nothing new: nothing to say again.
    assert_eq!(first.sibling("pbx@example.org/b", true, Some(&other)), None);
}

/// Both calls wait for alice; ours has not yet heard that the other is
/// contested too (its saying so is on the way). The other cannot take the
/// reply (it knew of our pop before alice could answer both), so ours,
/// the elected one, must tell her: silence would leave her guessing.
#[test]
fn a_stale_view_of_the_other_call_does_not_silence_the_notice() {
    let mut ours = Claims::new("aaaaaa01");
    let pop = OutgoingMessage::chat(ALICE, "pop", Some("aaaaaa01".into()));
    ours.sending(&pop);
    let stale = Announcement {
        call: "bbbbbb02".into(),
        waiting: true,
        agents: vec![ALICE.into()],
        contested: vec![],
    };
    ours.sibling("pbx@example.org/b", true, Some(&stale));
    assert!(matches!(
        ours.claim(reply(ALICE, "1"), NOW),
        Claim::Answer(_)
    ));
}

/// alice answers a finished call's pop: to its full JID (the server hands
/// it to the sessions left, `to` unchanged) or in its thread. No call
/// takes it; one tells her.
#[test]
fn a_reply_for_a_finished_call_steers_nothing() {
    let mut acc = alice_missed_a_call();
    let next = acc.start("bbbbbb02");
    acc.pop(next, ALICE);
    let gone = Addressed::Other("pbx@example.org/aaaaaa01".into());
    let text = acc
        .outcome(&to(reply(ALICE, "1"), gone.clone()))
        .unwrap_err();
    assert!(text.starts_with("That pop's call is over"), "{text}");
    let text = acc
        .outcome(&to(threaded(ALICE, "1", "aaaaaa01"), gone))
        .unwrap_err();
    assert!(text.starts_with("Call #aaaaaa01 is over"), "{text}");
    assert!(text.contains("#bbbbbb02"), "{text}");
    // Without the address (ejabberd) only the time tells, while it can.
    let text = acc.outcome(&reply(ALICE, "1")).unwrap_err();
    assert!(text.starts_with("Call #aaaaaa01 also popped you"), "{text}");
    acc.now += LATE_REPLY.as_millis() as u64;
    assert_eq!(acc.outcome(&reply(ALICE, "1")), Ok(0));
}

/// Another running call's thread or tag is that call's own business: its
/// session answers, the others stay silent.
#[test]
fn another_running_calls_thread_or_tag_is_left_to_it() {
    let (acc, a, _) = both_popped_alice();
    for msg in [
        threaded(ALICE, "1", "bbbbbb02"),
        reply(ALICE, "#bbbbbb02 1"),
    ] {
        assert_eq!(
            acc.procs[a].claims.claim(msg.clone(), NOW),
            Claim::Ignore("another running call's reply"),
            "{msg:?}"
        );
    }
}

/// Addressed to one session, only that session gets it: it answers even
/// when it is not the elected one.
#[test]
fn a_reply_to_one_session_is_answered_by_it() {
    let (acc, _, b) = both_popped_alice();
    let msg = to(reply(ALICE, "1"), Addressed::Me);
    assert!(matches!(
        acc.procs[b].claims.claim(msg, NOW),
        Claim::Answer(_)
    ));
}

/// Two agents, two calls, each popped both: bare replies of either are
/// taken by neither call. Each in a thread, or with a tag: the right one.
#[test]
fn two_agents_two_calls() {
    let mut acc = Account::default();
    let a = acc.start("aaaaaa01");
    let b = acc.start("bbbbbb02");
    for i in [a, b] {
        acc.pop(i, ALICE);
        acc.pop(i, BOB);
    }
    assert!(acc.outcome(&reply(ALICE, "1")).is_err());
    assert!(acc.outcome(&reply(BOB, "2")).is_err());
    assert_eq!(acc.outcome(&threaded(ALICE, "1", "aaaaaa01")), Ok(a));
    assert_eq!(acc.outcome(&reply(BOB, "#bbbbbb02 2")), Ok(b));
}

/// What is not a plain reply from a popped agent is the call core's to
/// judge (it ignores carbons, delays, strangers); none of it is answered
/// here.
#[test]
fn the_rest_goes_to_the_core() {
    let (acc, a, _) = both_popped_alice();
    for msg in [
        IncomingMessage {
            forwarded: true,
            ..reply(ALICE, "1")
        },
        IncomingMessage {
            delayed: true,
            ..reply(ALICE, "1")
        },
        IncomingMessage {
            kind: MsgKind::Groupchat,
            ..reply(ALICE, "1")
        },
        reply("mallory@example.org", "1"),
        reply(ALICE, " "),
    ] {
        assert!(
            matches!(acc.procs[a].claims.claim(msg.clone(), NOW), Claim::Mine(_)),
            "{msg:?}"
        );
    }
}

/// Only a pop (our thread, one-to-one) counts as popping someone; a
/// notice after the action does not.
#[test]
fn only_pops_are_announced() {
    let mut c = Claims::new("aaaaaa01");
    let room = OutgoingMessage {
        kind: OutKind::Groupchat,
        ..OutgoingMessage::chat("room@conf.example.org", "pop", Some("aaaaaa01".into()))
    };
    assert_eq!(c.sending(&room), None);
    assert_eq!(c.sending(&OutgoingMessage::chat(ALICE, "x", None)), None);
    let pop = OutgoingMessage::chat(ALICE, "pop", Some("aaaaaa01".into()));
    assert!(c.sending(&pop).is_some());
    assert_eq!(c.sending(&pop), None, "announced once");
    let done = c.decided().unwrap();
    assert!(!done.waiting);
    assert_eq!(c.decided(), None);
    assert_eq!(
        c.sending(&OutgoingMessage::chat(BOB, "x", Some("aaaaaa01".into()))),
        None
    );
}
