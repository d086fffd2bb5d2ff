//! Which call an incoming message answers, when one account serves many
//! calls. Pure: no I/O, no clock; the hub feeds it what it sends and
//! receives and carries out its [`Route`]s.
//!
//! An agent may have several calls waiting. In order:
//!
//! 1. a tag the agent typed first (`#17 1`, `#17: fwd 2001`) names the
//!    call; the tag is removed before the call sees the text;
//! 2. a XEP-0201 thread that is one of our call ids (every pop carries its
//!    call's id as thread; clients that keep threads echo it);
//! 3. otherwise the agent's only waiting call, unless another call popped
//!    them while it waited, or one that popped them ended less than
//!    [`crate::claim::LATE_REPLY`] ago (the reply may be a late answer to
//!    it: [`crate::claim`]).
//!
//! Anything else is never guessed: two or more waiting calls get a
//! question back that lists them with their tags, a tag or thread for a
//! call that is over gets a short notice, an unknown tag says so. Tags and
//! threads that look like another daemon's ids (another prefix) are left
//! alone, so daemons sharing an account do not answer each other's agents.
//! Only one-to-one messages that are not delayed or forwarded ever get an
//! answer from here; the rest is delivered when it is unambiguous and
//! dropped otherwise.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::call::{Addressed, IncomingMessage, MsgKind, OutKind, OutgoingMessage};
use crate::claim::{Ended, late_notice};

/// Ended calls remembered for notices about late replies.
pub const ENDED_KEPT: usize = 256;
/// A pop's first line, cut to this many characters, names the call in a
/// question.
const LABEL_CHARS: usize = 48;
/// Longest tag prefix (`--id-prefix`).
pub const MAX_PREFIX: usize = 8;

/// What to do with an incoming message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Hand the message (its tag removed) to call number `n`.
    Deliver(u64, IncomingMessage),
    /// Answer the sender with this instead.
    Answer(OutgoingMessage),
    /// Nothing to do; the reason is for a debug log.
    Ignore(&'static str),
}

#[derive(Debug, Clone)]
struct Entry {
    /// Bare JIDs (or rooms) the call wrote to: only they may answer it.
    agents: Vec<String>,
    /// The rooms among them: nothing is ever said back into a room (our
    /// own words come back from it).
    rooms: Vec<String>,
    label: String,
    /// `Some` once the call took its action.
    outcome: Option<String>,
    /// Still connected; `false` for ended calls.
    live: bool,
    /// Agents another call was waiting for at some moment since this call
    /// popped them: their replies need a tag or thread to reach it.
    contested: BTreeSet<String>,
    /// The agents it asked for an answer, and when it decided (or
    /// ended): a plain reply of theirs soon after may be for it.
    asked: Vec<String>,
    ended_at: Option<u64>,
    /// How long after that a late answer is expected.
    late_window: std::time::Duration,
}

#[derive(Debug, Default)]
pub struct Router {
    prefix: String,
    /// Live calls by id, in the order they were opened (ids count up).
    calls: BTreeMap<Key, Entry>,
    /// Ended calls, oldest first, at most [`ENDED_KEPT`].
    ended: VecDeque<Key>,
}

/// Call ids are the prefix and a number; ordered by the number.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key(u64);

impl Router {
    /// A router for ids `<prefix><n>` (`prefix` lower-case ASCII letters,
    /// at most [`MAX_PREFIX`]; may be empty).
    pub fn new(prefix: &str) -> Self {
        Router {
            prefix: prefix.to_ascii_lowercase(),
            ..Router::default()
        }
    }

    /// The id of call number `n`, as the call and its tag show it.
    pub fn id(&self, n: u64) -> String {
        format!("{}{n}", self.prefix)
    }

    /// A call started (number `n`, id [`Router::id`]).
    pub fn open(&mut self, n: u64) {
        self.calls.insert(
            Key(n),
            Entry {
                agents: Vec::new(),
                rooms: Vec::new(),
                label: String::new(),
                outcome: None,
                live: true,
                contested: BTreeSet::new(),
                asked: Vec::new(),
                ended_at: None,
                late_window: std::time::Duration::ZERO,
            },
        );
    }

    /// Whether call `n` has written to `to`.
    pub fn wrote_to(&self, n: u64, to: &str) -> bool {
        self.calls
            .get(&Key(n))
            .is_some_and(|e| e.agents.iter().any(|a| a == to))
    }

    /// Call `n` sent `msg`: its recipient may answer it. The first message
    /// (the pop) also gives the call its label.
    pub fn sent(&mut self, n: u64, msg: &OutgoingMessage) {
        let Some(entry) = self.calls.get_mut(&Key(n)) else {
            return;
        };
        let first = !entry.agents.contains(&msg.to);
        if first {
            entry.agents.push(msg.to.clone());
        }
        if msg.kind == OutKind::Groupchat && !entry.rooms.contains(&msg.to) {
            entry.rooms.push(msg.to.clone());
        }
        if entry.label.is_empty() {
            entry.label = label(&msg.body);
        }
        if !first || entry.outcome.is_some() || msg.kind == OutKind::Groupchat {
            return;
        }
        // A pop while another call waits for the same agent: one chat
        // window shows both, so a reply without tag or thread could be
        // for either, now and after one of them is decided.
        let rivals: Vec<Key> = self
            .calls
            .iter()
            .filter(|(k, e)| {
                k.0 != n && e.live && e.outcome.is_none() && e.agents.contains(&msg.to)
            })
            .map(|(k, _)| k.clone())
            .collect();
        if rivals.is_empty() {
            return;
        }
        for key in rivals.into_iter().chain([Key(n)]) {
            if let Some(e) = self.calls.get_mut(&key) {
                e.contested.insert(msg.to.clone());
            }
        }
    }

    /// Call `n` took its action.
    pub fn decided(&mut self, n: u64, outcome: &str) {
        if let Some(entry) = self.calls.get_mut(&Key(n)) {
            entry.outcome = Some(outcome.to_string());
        }
    }

    /// Call `n` took its action, or ended without one, at `now` (ms since
    /// the Unix epoch): answers these agents wrote for it may still come
    /// within `window`.
    pub fn answers_may_follow(
        &mut self,
        n: u64,
        agents: Vec<String>,
        now: u64,
        window: std::time::Duration,
    ) {
        if let Some(entry) = self.calls.get_mut(&Key(n)) {
            entry.asked = agents;
            entry.ended_at = Some(now);
            entry.late_window = window;
        }
    }

    /// The latest call but `n` that asked `agent` and ended less than its
    /// window ([`crate::claim::LATE_REPLY`]) before `now`, and how long ago.
    fn late(&self, agent: &str, n: u64, now: u64) -> Option<(u64, std::time::Duration)> {
        self.calls
            .iter()
            .filter(|(k, e)| k.0 != n && e.asked.iter().any(|a| a == agent))
            .filter_map(|(k, e)| {
                let at = e.ended_at?;
                let ended = Ended {
                    call: self.id(k.0),
                    at,
                    window: e.late_window,
                };
                Some((at, k.0, ended.recent(now)?))
            })
            .max()
            .map(|(_, m, ago)| (m, ago))
    }

    /// Call `n` is over; it is remembered a while for late replies.
    pub fn close(&mut self, n: u64) {
        let key = Key(n);
        let Some(entry) = self.calls.get_mut(&key) else {
            return;
        };
        entry.live = false;
        if entry.agents.is_empty() {
            // Nobody can ask about a call that wrote to nobody.
            self.calls.remove(&key);
            return;
        }
        self.ended.push_back(key);
        while self.ended.len() > ENDED_KEPT {
            if let Some(old) = self.ended.pop_front() {
                self.calls.remove(&old);
            }
        }
    }

    /// Live calls.
    pub fn live(&self) -> usize {
        self.calls.values().filter(|e| e.live).count()
    }

    /// Where `msg`, come at `now` (ms since the Unix epoch), goes.
    pub fn route(&self, mut msg: IncomingMessage, now: u64) -> Route {
        let from = msg.from_bare.clone();
        let talkative = matches!(msg.kind, MsgKind::Chat | MsgKind::Normal)
            && !msg.delayed
            && !msg.forwarded
            && !self.calls.values().any(|e| e.rooms.contains(&from));
        if !self.calls.values().any(|e| e.agents.contains(&from)) {
            // Only the people our calls wrote to ever hear from us.
            return Route::Ignore("not from an agent of any call");
        }
        let Some(body) = msg.body.as_deref().map(str::trim).filter(|b| !b.is_empty()) else {
            return Route::Ignore("no text");
        };
        if let Some((tag, rest)) = split_tag(body, looks_like_id) {
            let rest = rest.to_string();
            return match self.ours(&tag) {
                None => Route::Ignore("another daemon's tag"),
                Some(n) => match self.calls.get(&Key(n)).filter(|e| e.agents.contains(&from)) {
                    Some(entry) if entry.live => {
                        msg.body = Some(rest);
                        Route::Deliver(n, msg)
                    }
                    Some(entry) => self.answer(talkative, &from, self.over(n, entry)),
                    None => {
                        let text = format!("No call {} is waiting for you.", self.tag(n));
                        self.answer(talkative, &from, self.with_waiting(&from, text))
                    }
                },
            };
        }
        let thread = msg.thread.as_deref().filter(|t| looks_like_id(t));
        if let Some(thread) = thread {
            return match self.ours(thread) {
                None => Route::Ignore("another daemon's thread"),
                Some(n) => match self.calls.get(&Key(n)).filter(|e| e.agents.contains(&from)) {
                    Some(entry) if entry.live => Route::Deliver(n, msg),
                    Some(entry) => self.answer(talkative, &from, self.over(n, entry)),
                    // Not a call of ours any more (long over, or a restart):
                    // fall back to the agent's calls.
                    None => self.by_agent(talkative, &from, msg, now),
                },
            };
        }
        if let Addressed::Other(_) = msg.to {
            // Written for another session of the account (one that is
            // gone: a daemon before its restart), not for any call here.
            let text = "That pop's call is over: your reply did nothing.".to_string();
            return self.answer(talkative, &from, self.with_waiting(&from, text));
        }
        self.by_agent(talkative, &from, msg, now)
    }

    /// No tag, no usable thread: the agent's own calls decide.
    fn by_agent(&self, talkative: bool, from: &str, msg: IncomingMessage, now: u64) -> Route {
        let mine: Vec<(u64, &Entry)> = self
            .calls
            .iter()
            .filter(|(_, e)| e.agents.iter().any(|a| a == from))
            .map(|(k, e)| (k.0, e))
            .collect();
        let waiting: Vec<&(u64, &Entry)> = mine
            .iter()
            .filter(|(_, e)| e.live && e.outcome.is_none())
            .collect();
        let live: Vec<&(u64, &Entry)> = mine.iter().filter(|(_, e)| e.live).collect();
        match waiting.as_slice() {
            [(n, e)] if !e.contested.contains(from) => match self.late(from, *n, now) {
                None => Route::Deliver(*n, msg),
                Some((m, ago)) => {
                    let body = msg.body.as_deref().unwrap_or("").trim();
                    let text = late_notice(&self.tag(m), ago, &self.tag(*n), body);
                    self.answer(talkative, from, text)
                }
            },
            [(n, _)] => {
                let text = format!(
                    "Other calls popped you while call {tag} waited, so your reply did \
                     nothing: it could be for any of them. Start it with the tag, e.g. \
                     \"{tag} 1\", or answer in the pop's own thread.",
                    tag = self.tag(*n)
                );
                self.answer(talkative, from, text)
            }
            [] => match (live.as_slice(), mine.as_slice()) {
                // The call core answers "already handled" itself.
                ([(n, _)], _) => Route::Deliver(*n, msg),
                ([], []) => Route::Ignore("not from an agent of any call"),
                ([], [(n, e)]) => self.answer(talkative, from, self.over(*n, e)),
                _ => self.answer(
                    talkative,
                    from,
                    "No call is waiting for your answer.".to_string(),
                ),
            },
            several => {
                let text = msg.body.as_deref().unwrap_or("").trim();
                let example = text.chars().take(20).collect::<String>();
                let list: Vec<String> = several.iter().map(|(n, e)| self.item(*n, e)).collect();
                let first = self.tag(several[0].0);
                self.answer(
                    talkative,
                    from,
                    format!(
                        "Several calls are waiting for you: {}. Which one? Start your reply \
                         with its tag, e.g. \"{first} {example}\".",
                        list.join("; ")
                    ),
                )
            }
        }
    }

    fn answer(&self, talkative: bool, to: &str, body: String) -> Route {
        match talkative {
            true => Route::Answer(chat(to, body)),
            false => Route::Ignore("unclear, and not a message to answer"),
        }
    }

    /// The notice for a reply to call `n`, which is over.
    fn over(&self, n: u64, entry: &Entry) -> String {
        match &entry.outcome {
            Some(outcome) => format!("Call {} was already handled: {outcome}.", self.tag(n)),
            None => format!("Call {} is over.", self.tag(n)),
        }
    }

    fn with_waiting(&self, agent: &str, text: String) -> String {
        let waiting: Vec<String> = self
            .calls
            .iter()
            .filter(|(_, e)| e.live && e.outcome.is_none() && e.agents.iter().any(|a| a == agent))
            .map(|(k, e)| self.item(k.0, e))
            .collect();
        match waiting.is_empty() {
            true => text,
            false => format!("{text} Waiting: {}.", waiting.join("; ")),
        }
    }

    fn item(&self, n: u64, entry: &Entry) -> String {
        match entry.label.is_empty() {
            true => self.tag(n),
            false => format!("{} {}", self.tag(n), entry.label),
        }
    }

    fn tag(&self, n: u64) -> String {
        format!("#{}", self.id(n))
    }

    /// The number of an id with our prefix.
    fn ours(&self, id: &str) -> Option<u64> {
        let digits = id.get(..self.prefix.len()).and_then(|p| {
            p.eq_ignore_ascii_case(&self.prefix)
                .then(|| &id[self.prefix.len()..])
        })?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    }
}

/// A call id of any daemon: up to [`MAX_PREFIX`] letters, then digits.
fn looks_like_id(s: &str) -> bool {
    let letters = s.bytes().take_while(u8::is_ascii_alphabetic).count();
    let digits = &s[letters..];
    letters <= MAX_PREFIX
        && !digits.is_empty()
        && digits.len() <= 19
        && digits.bytes().all(|b| b.is_ascii_digit())
}

/// `#17 1` → (`17`, `1`); `#a17: fwd 2001` → (`a17`, `fwd 2001`). The tag
/// ends at white space, `:`, `,`, `.`, `)` or the end of the text, and
/// counts only when `is_id` takes it.
pub(crate) fn split_tag(body: &str, is_id: fn(&str) -> bool) -> Option<(String, &str)> {
    let rest = body.strip_prefix('#')?;
    let end = rest
        .find(|c: char| c.is_whitespace() || matches!(c, ':' | ',' | '.' | ')'))
        .unwrap_or(rest.len());
    let tag = &rest[..end];
    if !is_id(tag) {
        return None;
    }
    let after = rest[end..].trim_start();
    let after = after
        .strip_prefix([':', ',', '.', ')'])
        .unwrap_or(after)
        .trim_start();
    Some((tag.to_ascii_lowercase(), after))
}

/// The first line of a pop, shortened.
fn label(body: &str) -> String {
    let line = body.lines().map(str::trim).find(|l| !l.is_empty());
    let line = line.unwrap_or("");
    let mut out: String = line.chars().take(LABEL_CHARS).collect();
    if line.chars().count() > LABEL_CHARS {
        out.push('…');
    }
    out
}

fn chat(to: &str, body: String) -> OutgoingMessage {
    OutgoingMessage::chat(to, body, None)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const ALICE: &str = "alice@example.org";
    const BOB: &str = "bob@example.org";
    /// When the tests' replies come (ms since the Unix epoch).
    const NOW: u64 = 1_765_000_000_000;

    fn pop(router: &mut Router, n: u64, to: &str, text: &str) {
        let msg = OutgoingMessage::chat(to, text, Some(router.id(n)));
        router.sent(n, &msg);
    }

    pub(crate) fn reply(from: &str, body: &str) -> IncomingMessage {
        IncomingMessage {
            from_bare: from.to_string(),
            from_full: format!("{from}/desk"),
            kind: MsgKind::Chat,
            body: Some(body.to_string()),
            delayed: false,
            forwarded: false,
            thread: None,
            to: Addressed::Bare,
        }
    }

    pub(crate) fn threaded(from: &str, body: &str, thread: &str) -> IncomingMessage {
        IncomingMessage {
            thread: Some(thread.to_string()),
            ..reply(from, body)
        }
    }

    /// Call `n` popped to `agents`.
    fn router_with(calls: &[(u64, &[&str])]) -> Router {
        let mut r = Router::new("");
        for (n, agents) in calls {
            r.open(*n);
            for a in *agents {
                pop(&mut r, *n, a, &format!("Call from 55500{n}\nmore"));
            }
        }
        r
    }

    fn delivered(route: Route) -> (String, String) {
        match route {
            Route::Deliver(n, msg) => (n.to_string(), msg.body.unwrap_or_default()),
            other => panic!("not delivered: {other:?}"),
        }
    }

    fn answered(route: Route) -> (String, String) {
        match route {
            Route::Answer(m) => (m.to, m.body),
            other => panic!("not answered: {other:?}"),
        }
    }

    #[test]
    fn a_single_waiting_call_takes_the_reply() {
        let r = router_with(&[(1, &[ALICE, BOB]), (2, &[BOB])]);
        assert_eq!(
            delivered(r.route(reply(ALICE, "1"), NOW)),
            ("1".into(), "1".into())
        );
    }

    #[test]
    fn a_tag_picks_the_call_and_is_removed() {
        let r = router_with(&[(16, &[ALICE]), (17, &[ALICE])]);
        for (text, want) in [
            ("#17 1", "1"),
            ("  #17: fwd 2001", "fwd 2001"),
            ("#17, vm", "vm"),
            ("#17", ""),
            ("#16\t2", "2"),
        ] {
            let id = if text.contains("16") { "16" } else { "17" };
            assert_eq!(
                delivered(r.route(reply(ALICE, text), NOW)),
                (id.into(), want.into()),
                "{text}"
            );
        }
    }

    #[test]
    fn a_thread_picks_the_call_and_the_tag_beats_it() {
        let r = router_with(&[(16, &[ALICE]), (17, &[ALICE])]);
        assert_eq!(
            delivered(r.route(threaded(ALICE, "1", "16"), NOW)),
            ("16".into(), "1".into())
        );
        // A client may echo the last thread it saw; what the agent typed wins.
        assert_eq!(
            delivered(r.route(threaded(ALICE, "#16 2", "17"), NOW)),
            ("16".into(), "2".into())
        );
    }

    #[test]
    fn two_waiting_calls_and_no_tag_get_a_question_never_a_guess() {
        let r = router_with(&[(16, &[ALICE]), (17, &[ALICE]), (18, &[BOB])]);
        let (to, text) = answered(r.route(reply(ALICE, "1"), NOW));
        assert_eq!(to, ALICE);
        assert!(text.contains("#16 Call from 5550016"), "{text}");
        assert!(text.contains("#17 Call from 5550017"), "{text}");
        assert!(!text.contains("#18"), "{text}");
        assert!(text.contains("\"#16 1\""), "{text}");
        // A thread that is not a call id (some clients make their own) does
        // not settle it either.
        let (_, again) = answered(r.route(threaded(ALICE, "1", "e8f1-4c2a-thread"), NOW));
        assert_eq!(again, text);
    }

    /// Call 16 was decided before call 17 popped alice and ended more than
    /// its window before her reply: no answer to 16 can still be on its
    /// way, so her plain reply is 17's.
    #[test]
    fn a_call_decided_before_the_next_pop_no_longer_counts_once_its_window_is_over() {
        let window = crate::claim::LATE_REPLY;
        let mut r = router_with(&[(16, &[ALICE])]);
        r.decided(16, "sent to desk");
        r.answers_may_follow(
            16,
            vec![ALICE.into()],
            NOW - window.as_millis() as u64,
            window,
        );
        r.open(17);
        pop(&mut r, 17, ALICE, "Call from 555017");
        assert_eq!(delivered(r.route(reply(ALICE, "1"), NOW)).0, "17");
        // Alone, a decided call still gets the reply: the call core answers
        // that it was already handled.
        r.decided(17, "hung up");
        r.close(16);
        assert_eq!(delivered(r.route(reply(ALICE, "1"), NOW)).0, "17");
    }

    /// Call 16 timed out without alice's answer just before call 17 popped
    /// her: her plain `1` may be a late answer to 16, so for
    /// [`LATE_REPLY`](crate::claim::LATE_REPLY) after 16 ended it moves
    /// nothing and she is told to use 17's tag; the tag works at once.
    /// Over or still connected, the ended call counts the same.
    #[test]
    fn a_plain_reply_soon_after_an_unanswered_call_moves_nothing() {
        let window = crate::claim::LATE_REPLY.as_millis() as u64;
        for close in [false, true] {
            let mut r = router_with(&[(16, &[ALICE, BOB])]);
            r.decided(16, "timeout");
            r.answers_may_follow(
                16,
                vec![ALICE.into(), BOB.into()],
                NOW - 2_000,
                crate::claim::LATE_REPLY,
            );
            if close {
                r.close(16);
            }
            r.open(17);
            pop(&mut r, 17, ALICE, "Call from 555017");
            let (to, text) = answered(r.route(reply(ALICE, "1"), NOW));
            assert_eq!(to, ALICE);
            assert_eq!(
                text,
                "Call #16 also popped you and ended 2 s ago, so your reply \
                 did nothing: it may have been meant for that call. To answer call #17, start \
                 your reply with its tag, e.g. \"#17 1\"."
            );
            assert_eq!(delivered(r.route(reply(ALICE, "#17 1"), NOW)).0, "17");
            assert_eq!(delivered(r.route(threaded(ALICE, "1", "17"), NOW)).0, "17");
            let later = NOW - 2_000 + window;
            assert_eq!(delivered(r.route(reply(ALICE, "1"), later)).0, "17");
        }
    }

    /// `late_reply = 0` on the call that ended: no window at all.
    #[test]
    fn a_call_with_no_late_reply_window_holds_nothing_back() {
        let mut r = router_with(&[(16, &[ALICE])]);
        r.decided(16, "timeout");
        r.answers_may_follow(16, vec![ALICE.into()], NOW, std::time::Duration::ZERO);
        r.open(17);
        pop(&mut r, 17, ALICE, "Call from 555017");
        assert_eq!(delivered(r.route(reply(ALICE, "1"), NOW)).0, "17");
    }

    /// Both pops were in alice's chat while both calls waited: after one
    /// is decided, a bare `1` could still be her late answer to it.
    #[test]
    fn an_overlap_outlives_the_decision() {
        let mut r = router_with(&[(16, &[ALICE, BOB]), (17, &[ALICE])]);
        r.decided(16, "sent to desk");
        let (to, text) = answered(r.route(reply(ALICE, "1"), NOW));
        assert_eq!(to, ALICE);
        assert!(text.contains("\"#17 1\""), "{text}");
        assert_eq!(delivered(r.route(reply(ALICE, "#17 1"), NOW)).0, "17");
        assert_eq!(delivered(r.route(threaded(ALICE, "1", "17"), NOW)).0, "17");
        // bob's call had no rival.
        r.open(18);
        pop(&mut r, 18, BOB, "Call from 555018");
        assert_eq!(delivered(r.route(reply(BOB, "1"), NOW)).0, "18");
    }

    /// A reply to another session's full JID (the daemon's before a
    /// restart) was written for a call this daemon never had.
    #[test]
    fn a_reply_to_another_session_is_no_ones() {
        let r = router_with(&[(1, &[ALICE])]);
        let old = IncomingMessage {
            to: Addressed::Other("pbx@example.org/old".into()),
            ..reply(ALICE, "1")
        };
        let (_, text) = answered(r.route(old.clone(), NOW));
        assert!(text.starts_with("That pop's call is over"), "{text}");
        assert!(text.contains("#1"), "{text}");
        let tagged = IncomingMessage {
            body: Some("#1 2".into()),
            ..old
        };
        assert_eq!(delivered(r.route(tagged, NOW)), ("1".into(), "2".into()));
    }

    #[test]
    fn replies_for_ended_calls_get_a_notice() {
        let mut r = router_with(&[(16, &[ALICE]), (17, &[ALICE])]);
        r.decided(16, "sent to desk");
        r.close(16);
        r.close(17);
        let (_, text) = answered(r.route(reply(ALICE, "#16 1"), NOW));
        assert_eq!(text, "Call #16 was already handled: sent to desk.");
        let (_, text) = answered(r.route(threaded(ALICE, "1", "17"), NOW));
        assert_eq!(text, "Call #17 is over.");
        let (_, text) = answered(r.route(reply(ALICE, "1"), NOW));
        assert_eq!(text, "No call is waiting for your answer.");
        let mut one = router_with(&[(5, &[BOB])]);
        one.close(5);
        assert_eq!(
            answered(one.route(reply(BOB, "1"), NOW)).1,
            "Call #5 is over."
        );
    }

    #[test]
    fn tags_of_calls_the_agent_never_got_are_unknown() {
        let r = router_with(&[(16, &[ALICE]), (17, &[BOB])]);
        let (to, text) = answered(r.route(reply(ALICE, "#17 1"), NOW));
        assert_eq!(to, ALICE);
        assert_eq!(
            text,
            "No call #17 is waiting for you. Waiting: #16 Call from 5550016."
        );
        let (_, text) = answered(r.route(reply(ALICE, "#99 1"), NOW));
        assert!(
            text.starts_with("No call #99 is waiting for you."),
            "{text}"
        );
    }

    #[test]
    fn strangers_are_ignored() {
        let r = router_with(&[(16, &[ALICE])]);
        assert!(matches!(
            r.route(reply("mallory@example.org", "1"), NOW),
            Route::Ignore(_)
        ));
        // Not even a notice: strangers cannot make us write to them.
        assert!(matches!(
            r.route(reply("mallory@example.org", "#16 1"), NOW),
            Route::Ignore(_)
        ));
    }

    #[test]
    fn only_plain_chats_get_answers() {
        let r = router_with(&[(16, &[ALICE]), (17, &[ALICE])]);
        for msg in [
            IncomingMessage {
                delayed: true,
                ..reply(ALICE, "1")
            },
            IncomingMessage {
                kind: MsgKind::Groupchat,
                ..reply(ALICE, "1")
            },
            IncomingMessage {
                kind: MsgKind::Error,
                ..reply(ALICE, "#99 1")
            },
            IncomingMessage {
                body: Some("  ".into()),
                ..reply(ALICE, "")
            },
        ] {
            assert!(
                matches!(r.route(msg.clone(), NOW), Route::Ignore(_)),
                "{msg:?}"
            );
        }
        // Unambiguous ones are still delivered: the call core decides
        // what a delayed or group message means.
        let delayed = IncomingMessage {
            delayed: true,
            ..reply(ALICE, "#16 1")
        };
        assert_eq!(delivered(r.route(delayed, NOW)).0, "16");
    }

    #[test]
    fn nothing_is_said_back_into_a_room() {
        const ROOM: &str = "desk@conference.example.org";
        let mut r = Router::new("");
        for n in [1, 2] {
            r.open(n);
            r.sent(n, &OutgoingMessage::groupchat(ROOM, format!("Call {n}")));
        }
        let from_room = |kind, body: &str| IncomingMessage {
            from_full: format!("{ROOM}/alice"),
            kind,
            ..reply(ROOM, body)
        };
        // Two calls wait in the room: no question, not even privately.
        let group = r.route(from_room(MsgKind::Groupchat, "1"), NOW);
        assert!(matches!(group, Route::Ignore(_)), "{group:?}");
        let private = r.route(from_room(MsgKind::Chat, "1"), NOW);
        assert!(matches!(private, Route::Ignore(_)), "{private:?}");
        let tagged = r.route(from_room(MsgKind::Groupchat, "#2 1"), NOW);
        assert_eq!(delivered(tagged).0, "2");
    }

    #[test]
    fn other_daemons_tags_and_threads_are_left_alone() {
        let mut r = Router::new("a");
        r.open(16);
        pop(&mut r, 16, ALICE, "Call");
        assert_eq!(r.id(16), "a16");
        assert_eq!(delivered(r.route(reply(ALICE, "#A16 1"), NOW)).0, "16");
        assert_eq!(delivered(r.route(threaded(ALICE, "1", "a16"), NOW)).0, "16");
        assert_eq!(
            r.route(reply(ALICE, "#b16 1"), NOW),
            Route::Ignore("another daemon's tag")
        );
        assert_eq!(
            r.route(threaded(ALICE, "1", "b3"), NOW),
            Route::Ignore("another daemon's thread")
        );
        // Not a tag at all: text for the call.
        assert_eq!(
            delivered(r.route(reply(ALICE, "#hashtag"), NOW)).1,
            "#hashtag"
        );
    }

    #[test]
    fn ended_calls_are_forgotten_in_time() {
        let mut r = Router::new("");
        for n in 0..(ENDED_KEPT as u64 + 10) {
            r.open(n);
            pop(&mut r, n, ALICE, "Call");
            r.close(n);
        }
        assert_eq!(r.calls.len(), ENDED_KEPT);
        assert_eq!(r.live(), 0);
        // A call that wrote to nobody leaves nothing behind.
        r.open(1000);
        r.close(1000);
        assert_eq!(r.calls.len(), ENDED_KEPT);
    }

    #[test]
    fn labels_are_the_first_line_shortened() {
        assert_eq!(
            label("\n  Call from 5551234 Alice \nmore"),
            "Call from 5551234 Alice"
        );
        let long = "x".repeat(100);
        assert_eq!(label(&long).chars().count(), LABEL_CHARS + 1);
    }
}
