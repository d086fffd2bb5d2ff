//! Pieces for many calls on a real Asterisk (the testbed's): an agent that
//! answers every pop and a follower of many calls' AMI events. The
//! snippets, the daemon and the read-backs are in `pbx`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use popivr::call::{OutgoingMessage, XmppStatus};
use popivr::xmpp::XmppEvent;
use popivr_testkit::testbed::{Event, event_time};

use super::{Prosody, WAIT, account_section};

/// The hold file of [`sales_conf`]'s profile.
pub const HOLD: &str = "custom/hold";

/// popivr's configuration for the many-calls suites and the real bench:
/// account `pbx` (password `pbx_pw`) and the profile `sales` that the
/// shipped snippets name, popping alice with the caller's data; `extra`
/// adds profile lines.
pub fn sales_conf(xmpp: &Prosody, pbx_pw: &str, extra: &str) -> String {
    format!(
        "{account}[sales]\ntype = profile\naccount = pbx\ntargets = {alice}\nhold = {HOLD}\n\
         template = Call from $caller_name$ <$caller$> to $number$. Reply 1 desk\n\
         reply = 1 -> continue desk\ntimeout = 90\ndefault = continue voicemail\n{extra}",
        account = account_section(xmpp, "pbx", pbx_pw),
        alice = xmpp.jid("alice"),
    )
}

/// A popivr XMPP session for `account`, once online (an agent for the
/// load tests and benches: see [`answer_every_pop`]).
pub async fn online(account: popivr::config::Account) -> popivr::xmpp::Session {
    let mut session = popivr::xmpp::spawn(account, Default::default());
    loop {
        match tokio::time::timeout(WAIT, session.recv()).await {
            Ok(Some(XmppEvent::Status(XmppStatus::Online))) => return session,
            Ok(Some(XmppEvent::Status(XmppStatus::Failed(why)))) => panic!("agent: {why}"),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => panic!("agent not online within {WAIT:?}"),
        }
    }
}

/// What the agent saw of one call: when its pop arrived and when the
/// answer left.
#[derive(Debug, Clone, Copy)]
pub struct Answered {
    pub popped: SystemTime,
    pub replied: SystemTime,
}

/// What alice saw: the pops she answered, keyed by the caller number
/// between `<` and `>`, and the bodies of every other message.
#[derive(Debug, Default)]
pub struct Seen {
    pub pops: HashMap<String, Answered>,
    pub duplicates: Vec<String>,
    pub others: Vec<String>,
}

/// alice answers every pop at once with "1", in its thread, to the JID it
/// came from.
///
/// alice is popivr's own XMPP session here, answering from a task of its
/// own while the test starts calls. (The first version used tokio-xmpp
/// 6's `Client`, which stopped reading its socket after some hundreds of
/// messages at this rate; the cause, and why `TestAgent` no longer uses
/// it, is in `support/agent.rs`.)
pub fn answer_every_pop(
    mut alice: popivr::xmpp::Session,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let record = seen.clone();
    let task = tokio::spawn(async move {
        while !stop.load(Ordering::SeqCst) {
            let event = tokio::time::timeout(Duration::from_millis(200), alice.recv()).await;
            let pop = match event {
                Ok(Some(XmppEvent::Message(m))) => m,
                Ok(Some(XmppEvent::Status(XmppStatus::Failed(why))))
                | Ok(Some(XmppEvent::RoomFailed(_, why))) => {
                    panic!("alice's session failed: {why}")
                }
                Ok(None) => panic!("alice's session ended"),
                Ok(Some(_)) | Err(_) => continue,
            };
            let text = pop.body.clone().unwrap_or_default();
            if !text.ends_with("Reply 1 desk") {
                record.lock().unwrap().others.push(text);
                continue;
            }
            let popped = SystemTime::now();
            let number = text
                .split_once('<')
                .and_then(|(_, rest)| rest.split_once('>'))
                .map(|(n, _)| n.to_string())
                .unwrap_or_default();
            let replied = SystemTime::now();
            alice.send(OutgoingMessage::chat(
                pop.from_full.clone(),
                "1",
                pop.thread.clone(),
            ));
            let mut seen = record.lock().unwrap();
            match seen.pops.entry(number) {
                std::collections::hash_map::Entry::Occupied(_) => seen.duplicates.push(text),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(Answered { popped, replied });
                }
            }
        }
        alice.close().await;
    });
    (seen, task)
}

/// What the dialplan did on one call, from AMI events.
#[derive(Debug, Default, Clone)]
pub struct Progress {
    /// ExternalIVR (or the TryExec around it) started.
    pub exec: Option<SystemTime>,
    pub action: Option<String>,
    /// The first application after ExternalIVR (the snippet's GotoIf).
    pub after: Option<SystemTime>,
}

/// Follows every AMI event once, keeping each call's progress by its
/// `Linkedid` (the caller half's unique id, [`Call::id`]).
pub fn follow(
    pbx: popivr_testkit::testbed::Ami,
    stop: Arc<AtomicBool>,
) -> (
    Arc<Mutex<HashMap<String, Progress>>>,
    tokio::task::JoinHandle<()>,
) {
    let calls = Arc::new(Mutex::new(HashMap::<String, Progress>::new()));
    let state = calls.clone();
    let task = tokio::spawn(async move {
        let mut seen = 0;
        while !stop.load(Ordering::SeqCst) {
            let events = pbx.events_after(seen, Duration::from_millis(200)).await;
            seen += events.len();
            let mut calls = state.lock().unwrap();
            for e in &events {
                let Some(call) = e.get("Linkedid") else {
                    continue;
                };
                let p = calls.entry(call.clone()).or_default();
                track(p, e);
            }
        }
    });
    (calls, task)
}

fn track(p: &mut Progress, e: &Event) {
    let get = |k: &str| e.get(k).map(String::as_str);
    match (get("Event"), get("Application")) {
        // What starts the pop: popivr (the TryExec around it for ivr://),
        // or Asterisk's own JabberSend.
        (Some("Newexten"), Some("ExternalIVR" | "TryExec" | "JabberSend")) if p.exec.is_none() => {
            p.exec = event_time(e);
        }
        // What runs once the answer is in: the snippets' first GotoIf, or
        // the Set that reads JABBER_RECEIVE's answer.
        (Some("Newexten"), Some(app))
            if p.exec.is_some()
                && p.after.is_none()
                && (app == "GotoIf"
                    || (app == "Set"
                        && get("AppData").is_some_and(|d| d.starts_with("POPIVR_ACTION=")))) =>
        {
            p.after = event_time(e);
        }
        (Some("VarSet"), _) if get("Variable") == Some("POPIVR_ACTION") => {
            p.action = get("Value").map(str::to_string);
        }
        _ => {}
    }
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn summary(what: &str, mut d: Vec<Duration>) -> String {
    d.sort();
    format!(
        "{what}: median {:.1} ms, p99 {:.1} ms, max {:.1} ms (n = {})",
        percentile(&d, 0.5).as_secs_f64() * 1e3,
        percentile(&d, 0.99).as_secs_f64() * 1e3,
        d.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        d.len()
    )
}
