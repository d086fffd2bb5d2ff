//! popivr under load on a real Asterisk 23.4.1 with a real prosody: 1,000
//! calls through `popivr serve` with 50 at once, and 200 per-call
//! processes started in bursts of 50, both driven by the shipped snippets.
//!
//! Every call must be popped with its own caller's data, be answered by
//! the agent and leave ExternalIVR with the agent's action. That is the
//! proof that no command line was stranded: Asterisk handles lines in
//! order and the `E` is the last line popivr writes, so a call whose `E`
//! was handled had every line before it handled, and a stranded line
//! would have left its call inside ExternalIVR. Nothing may be left
//! behind: no channel in ExternalIVR, no popivr process, no "no answer
//! from Asterisk" warning.
//!
//! The profile pops with `presence = any`: what is under test here is the
//! ExternalIVR wire, not how long a busy server takes to tell presence.
//! Times are printed (exec → pop at the agent, the agent's reply → the
//! dialplan goes on), never asserted: the machine is shared.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use popivr::call::{OutgoingMessage, XmppStatus};
use popivr::testbed::asterisk::{Asterisk, Call, Originate};
use popivr::testbed::{Event, event_time, free_port};
use popivr::xmpp::XmppEvent;
use support::real::{BIN, Daemon, popivr_children, shipped};
use support::{Prosody, WAIT};

const PBX_PW: &str = "pbx-Load-51c0e2";
const ALICE_PW: &str = "alice-Load-8d17f4";
/// A call not out of ExternalIVR this long after it started is stuck.
const STUCK: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    PerCall,
    Serve,
}

fn config(xmpp: &Prosody) -> String {
    format!(
        "[pbx]\ntype = client\nserverhost = 127.0.0.1\nport = {port}\nusername = {pbx}\n\
         secret = {PBX_PW}\nca_file = {ca}\n\n\
         [sales]\ntype = profile\naccount = pbx\ntargets = {alice}\npresence = any\n\
         hold = custom/hold\n\
         template = Call from $caller_name$ <$caller$> to $number$. Reply 1 desk\n\
         reply = 1 -> continue desk\ntimeout = 90\ndefault = continue voicemail\n",
        port = xmpp.port(),
        pbx = xmpp.jid("pbx"),
        ca = xmpp.ca_pem().display(),
        alice = xmpp.jid("alice"),
    )
}

/// What the agent saw of one call: when its pop arrived and when the
/// answer left.
#[derive(Debug, Clone, Copy)]
struct Answered {
    popped: SystemTime,
    replied: SystemTime,
}

/// What alice saw: the pops she answered, keyed by the caller number
/// between `<` and `>`, and the bodies of every other message.
#[derive(Debug, Default)]
struct Seen {
    pops: HashMap<String, Answered>,
    duplicates: Vec<String>,
    others: Vec<String>,
}

/// alice answers every pop at once with "1", in its thread, to the JID it
/// came from.
///
/// alice is popivr's own XMPP session here, not the tests' `TestAgent`:
/// tokio-xmpp 6's client stopped reading its socket after some hundreds
/// of messages at this rate (its receive queue grew while prosody kept
/// sending), which left calls to their timeout for reasons that have
/// nothing to do with the ExternalIVR wire under test.
fn answer_every_pop(
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
struct Progress {
    /// ExternalIVR (or the TryExec around it) started.
    exec: Option<SystemTime>,
    action: Option<String>,
    /// The first application after ExternalIVR (the snippet's GotoIf).
    after: Option<SystemTime>,
}

/// Follows every AMI event once, keeping each call's progress by its
/// `Linkedid` (the caller half's unique id, [`Call::id`]).
fn follow(
    pbx: popivr::testbed::Ami,
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
        (Some("Newexten"), Some("ExternalIVR" | "TryExec")) if p.exec.is_none() => {
            p.exec = event_time(e);
        }
        (Some("Newexten"), Some("GotoIf")) if p.exec.is_some() && p.after.is_none() => {
            p.after = event_time(e);
        }
        (Some("VarSet"), _) if get("Variable") == Some("POPIVR_ACTION") => {
            p.action = get("Value").map(str::to_string);
        }
        _ => {}
    }
}

struct Lab {
    pbx: Asterisk,
    _daemon: Option<Daemon>,
    daemon_log: std::path::PathBuf,
    xmpp: Prosody,
    _dir: tempfile::TempDir,
}

async fn lab(mode: Mode) -> (Lab, popivr::xmpp::Session) {
    let xmpp = Prosody::builder()
        .user("pbx", PBX_PW)
        .user("alice", ALICE_PW)
        .start();
    let mut alice = popivr::xmpp::spawn(xmpp.account("alice", ALICE_PW), Default::default());
    loop {
        match tokio::time::timeout(WAIT, alice.recv()).await {
            Ok(Some(XmppEvent::Status(XmppStatus::Online))) => break,
            Ok(Some(XmppEvent::Status(XmppStatus::Failed(why)))) => panic!("alice: {why}"),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => panic!("alice is not online"),
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("popivr-load-")
        .tempdir()
        .unwrap();
    let conf = dir.path().join("popivr.conf");
    std::fs::write(&conf, config(&xmpp)).unwrap();
    let daemon_log = dir.path().join("serve.log");
    let (snippet, daemon) = match mode {
        Mode::PerCall => (
            shipped("interactive-pop.conf").replace("/usr/bin/popivr", BIN),
            None,
        ),
        Mode::Serve => {
            let port = free_port();
            let daemon = Daemon::start(&conf, port, Some(&daemon_log));
            let text = shipped("ivr-daemon.conf")
                .replace("popivr.example.org", &format!("127.0.0.1:{port}"));
            (text, Some(daemon))
        }
    };
    let pbx = Asterisk::builder()
        .dialplan(&format!(
            "{snippet}\n[caller]\nexten => listen,1,Wait(120)\n"
        ))
        .module("app_dial")
        .env("POPIVR_CONFIG", &conf.display().to_string())
        // Longer than any call here: no `F` event wakes Asterisk's reads,
        // so only popivr's own writes can get its lines handled.
        .sound("custom/hold", Duration::from_secs(120))
        .start()
        .await;
    let lab = Lab {
        pbx,
        _daemon: daemon,
        daemon_log,
        xmpp,
        _dir: dir,
    };
    (lab, alice)
}

fn number(n: usize) -> String {
    format!("55{n:05}")
}

async fn start_call(pbx: &Asterisk, n: usize) -> (Call, Instant) {
    let call = pbx
        .originate(
            Originate::new("Local/100@from-trunk")
                .caller_id(&number(n), &format!("Load, Caller {n}"))
                .exten("caller", "listen"),
        )
        .await
        .expect("originate");
    (call, Instant::now())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(what: &str, mut d: Vec<Duration>) -> String {
    d.sort();
    format!(
        "{what}: median {:.1} ms, p99 {:.1} ms, max {:.1} ms (n = {})",
        percentile(&d, 0.5).as_secs_f64() * 1e3,
        percentile(&d, 0.99).as_secs_f64() * 1e3,
        d.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        d.len()
    )
}

/// `total` calls, at most `at_once` in ExternalIVR at a time; with
/// `bursts`, each group of `at_once` starts together and the next starts
/// once all of it is done, else a new call starts as soon as one ends.
async fn load(mode: Mode, total: usize, at_once: usize, bursts: bool) {
    let (lab, alice) = lab(mode).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, agent) = answer_every_pop(alice, stop.clone());
    let (progress, follower) = follow(lab.pbx.ami(), stop.clone());
    let done = |call: &Call| {
        progress
            .lock()
            .unwrap()
            .get(&call.id)
            .is_some_and(|p| p.after.is_some())
    };

    let started = Instant::now();
    let mut calls: Vec<(usize, Call)> = Vec::new();
    let mut waiting: Vec<(usize, Call, Instant)> = Vec::new();
    let mut stuck = Vec::new();
    let mut next = 0;
    while next < total || !waiting.is_empty() {
        let may_start = if bursts {
            waiting.is_empty()
        } else {
            waiting.len() < at_once
        };
        if may_start {
            while next < total && waiting.len() < at_once {
                let (call, at) = start_call(&lab.pbx, next).await;
                waiting.push((next, call, at));
                next += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        waiting.retain(|(n, call, at)| {
            if done(call) {
                calls.push((*n, call.clone()));
                false
            } else if at.elapsed() > STUCK {
                stuck.push((*n, call.clone()));
                false
            } else {
                true
            }
        });
    }
    let elapsed = started.elapsed();

    // Let the last channels hang up (the snippet's branches end the call).
    let in_ivr = lab.pbx.channels_in_app("ExternalIVR").await;
    let gone = lab.pbx.wait_no_channels(Duration::from_secs(30)).await;
    let asterisk = lab.pbx.pid().expect("Asterisk runs");
    let mut left = popivr_children(asterisk);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = popivr_children(asterisk);
    }
    // The confirmations leave with the last `E`: give them a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while answered.lock().unwrap().others.len() < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    agent.await.expect("the agent answered until the end");
    let _ = follower.await;

    let progress = progress.lock().unwrap().clone();
    let seen = std::mem::take(&mut *answered.lock().unwrap());
    let answered = &seen.pops;
    let mut wrong = Vec::new();
    let (mut pops, mut replies) = (Vec::new(), Vec::new());
    for (n, call) in &calls {
        let p = &progress[&call.id];
        let Some(a) = answered.get(&number(*n)) else {
            wrong.push(format!(
                "call {n}: left ExternalIVR ({:?}) without a pop",
                p.action
            ));
            continue;
        };
        if p.action.as_deref() != Some("desk") {
            wrong.push(format!("call {n}: action {:?}", p.action));
        }
        let since = |later: SystemTime, earlier: SystemTime| {
            later.duration_since(earlier).unwrap_or_default()
        };
        if let Some(exec) = p.exec {
            pops.push(since(a.popped, exec));
        }
        if let Some(after) = p.after {
            replies.push(since(after, a.replied));
        }
    }
    let log = lab.pbx.log();
    let daemon_log = std::fs::read_to_string(&lab.daemon_log).unwrap_or_default();
    // The logs of the run, kept for a look after a failure.
    let kept = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("load-{mode:?}"));
    std::fs::create_dir_all(&kept).unwrap();
    std::fs::write(kept.join("asterisk.log"), &log).unwrap();
    std::fs::write(kept.join("serve.log"), &daemon_log).unwrap();
    std::fs::write(kept.join("prosody.log"), lab.xmpp.log()).unwrap();
    let no_answer = log
        .lines()
        .chain(daemon_log.lines())
        .filter(|l| l.contains("no answer from Asterisk"))
        .count();

    println!(
        "{mode:?}: {total} calls, {at_once} at once{}, in {:.1} s",
        if bursts { " (bursts)" } else { "" },
        elapsed.as_secs_f64()
    );
    println!("  {}", summary("exec -> pop at the agent", pops));
    println!("  {}", summary("reply -> dialplan goes on", replies));
    let stuck: Vec<String> = stuck
        .iter()
        .map(|(n, call)| {
            format!(
                "call {n} ({}): {:?}, agent: {:?}",
                call.id,
                progress.get(&call.id),
                answered.get(&number(*n))
            )
        })
        .collect();
    assert!(
        stuck.is_empty(),
        "{} calls stuck in ExternalIVR: {:#?}\nlogs in {}",
        stuck.len(),
        &stuck[..stuck.len().min(5)],
        kept.display()
    );
    assert!(
        wrong.is_empty(),
        "{} calls went wrong: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    // Besides the pops, exactly one confirmation per call (the profile's
    // default `confirm`), nothing twice.
    let mut confirmed = std::collections::HashSet::new();
    let mut unexpected = Vec::new();
    for text in &seen.others {
        match text
            .strip_prefix("Call from ")
            .and_then(|rest| rest.strip_suffix(": sent to desk"))
        {
            Some(n) if confirmed.insert(n.to_string()) => {}
            _ => unexpected.push(text.clone()),
        }
    }
    assert!(
        seen.duplicates.is_empty(),
        "pops twice: {:?}",
        seen.duplicates
    );
    assert!(unexpected.is_empty(), "unexpected messages: {unexpected:?}");
    assert_eq!(confirmed.len(), total, "confirmations");
    assert_eq!(calls.len(), total);
    assert_eq!(in_ivr, 0, "channels left in ExternalIVR");
    assert!(gone, "channels left: {:?}", lab.pbx.channels().await);
    assert!(left.is_empty(), "popivr processes left: {left:?}");
    assert_eq!(no_answer, 0, "popivr waited for Asterisk's answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_a_thousand_calls_fifty_at_once() {
    load(Mode::Serve, 1000, 50, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_call_two_hundred_processes_in_bursts_of_fifty() {
    load(Mode::PerCall, 200, 50, true).await;
}
