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
//! from Asterisk" warning. And every agent gets its call's confirmation,
//! in both modes: a per-call popivr that exits right after its `E` must
//! still get it to the server first.
//!
//! The profile pops with `presence = any`: what is under test here is the
//! ExternalIVR wire, not how long a busy server takes to tell presence.
//! Times are printed (exec → pop at the agent, the agent's reply → the
//! dialplan goes on), never asserted: the machine is shared.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use popivr_testkit::testbed::asterisk::{Asterisk, Call, Originate};
use popivr_testkit::testbed::free_port;
use support::Prosody;
use support::pbx::{BIN, Daemon, popivr_processes, shipped};
use support::real::{HOLD, answer_every_pop, follow, online, sales_conf, summary};

const PBX_PW: &str = "pbx-Load-51c0e2";
const ALICE_PW: &str = "alice-Load-8d17f4";
/// A call not out of ExternalIVR this long after it started is stuck.
const STUCK: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    PerCall,
    Serve,
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
    let alice = online(xmpp.account("alice", ALICE_PW)).await;
    let dir = tempfile::Builder::new()
        .prefix("popivr-load-")
        .tempdir()
        .unwrap();
    let conf = dir.path().join("popivr.conf");
    std::fs::write(&conf, sales_conf(&xmpp, PBX_PW, "presence = any\n")).unwrap();
    let daemon_log = dir.path().join("serve.log");
    let (snippet, daemon) = match mode {
        Mode::PerCall => (
            shipped("interactive-pop.conf").replace("/usr/bin/popivr", BIN),
            None,
        ),
        Mode::Serve => {
            let port = free_port();
            let daemon = Daemon::start_logged(&conf, port, &daemon_log);
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
        .sound(HOLD, Duration::from_secs(120))
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
    let mut left = popivr_processes(&lab.pbx);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = popivr_processes(&lab.pbx);
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
    let unconfirmed: Vec<String> = (0..total)
        .map(number)
        .filter(|n| !confirmed.contains(n))
        .collect();
    println!(
        "  {} of {total} confirmations to the agent missing: {unconfirmed:?}",
        unconfirmed.len()
    );
    assert!(
        unconfirmed.is_empty(),
        "calls whose agent got no confirmation; logs in {}",
        kept.display()
    );
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
