//! popivr on a real Asterisk 23.4.1 against Asterisk's own XMPP module,
//! in one run through one prosody: the same pop and wait for the agent's
//! "1", four ways, interleaved call by call (A B C D A B C D …) so that
//! the machine's load and the host's cost of waking an idle process fall
//! on all four alike.
//!
//! - **per-call**: the shipped `interactive-pop.conf`, popivr started by
//!   `ExternalIVR()` for the call;
//! - **serve**: the shipped `ivr-daemon.conf`, `ExternalIVR(ivr://…)` to a
//!   running `popivr serve`;
//! - **res_xmpp**: `JabberSend` then `JABBER_RECEIVE` in the dialplan, on
//!   res_xmpp's session (open before the call, like serve's);
//! - **simulator**: the per-call profile under `popivr_testkit::sim` (Asterisk's
//!   part played in-process: one command line per wake-up, `G` reads plain
//!   variables), the figure the per-call goal is measured against.
//!
//! The times: "exec" is the AMI `Newexten` of the application that starts
//! the pop (`ExternalIVR`, the `TryExec` around it, or `JabberSend`), as
//! Asterisk timestamps it (`timestampevents`), or for the simulator the
//! instant before it starts the child; "pop" is when the agent's client
//! has the message; "reply → dialplan" runs from the instant before the
//! agent sends "1" to the `Newexten` of the first application after the
//! wait (the snippets' `GotoIf`, or the `Set` that reads
//! `JABBER_RECEIVE`'s answer), or for the simulator to the `E` it read.
//! Asterisk and the bench read the same clock.
//!
//! Nothing here fails on a time. `cargo bench --bench real`; knobs:
//! `BENCH_N` (rounds, 40), `BENCH_GAP_MS` (pause between calls, 250).
//! Output: the tables on stdout and in `$CARGO_TARGET_DIR/tmp/real/`.

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "suite/stats.rs"]
#[allow(dead_code)]
mod stats;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use popivr_testkit::sim::{Next, Sim, SimConfig};
use popivr_testkit::testbed::asterisk::{Asterisk, Call, Originate};
use popivr_testkit::testbed::free_port;
use stats::{Goal, Report, Samples, loadavg, machine};
use support::pbx::{BIN, Daemon, shipped};
use support::real::{HOLD, Progress, follow, sales_conf};
use support::{Prosody, TestAgent, TestMessage, body, subscribe};

const PBX_PW: &str = "pbx-Real-Bench-3a91";
const AST_PW: &str = "ast-Real-Bench-77c2";
const ALICE_PW: &str = "alice-Real-Bench-d40e";
const WAIT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Way {
    PerCall,
    Serve,
    ResXmpp,
    Simulator,
}

const WAYS: [Way; 4] = [Way::PerCall, Way::Serve, Way::ResXmpp, Way::Simulator];

impl Way {
    fn label(self) -> &'static str {
        match self {
            Way::PerCall => "popivr per-call",
            Way::Serve => "popivr serve",
            Way::ResXmpp => "res_xmpp JabberSend + JABBER_RECEIVE",
            Way::Simulator => "popivr per-call, simulator",
        }
    }

    /// The dialplan context the call enters.
    fn context(self) -> &'static str {
        match self {
            Way::PerCall => "percall",
            Way::Serve => "serve",
            Way::ResXmpp | Way::Simulator => "jabber",
        }
    }
}

/// One call's two figures.
struct Figures {
    pop: Duration,
    reply: Duration,
}

#[derive(Default)]
struct Series {
    pop: Samples,
    reply: Samples,
    missing: usize,
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("run with `cargo bench --bench real` (see BENCHMARKS.md)");
        return;
    }
    let rounds: usize = env_or("BENCH_N", 40);
    let gap = Duration::from_millis(env_or("BENCH_GAP_MS", 250));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(rounds, gap));
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// res_xmpp's account `asterisk`, as an admin would write it for prosody.
fn xmpp_conf(xmpp: &Prosody) -> String {
    format!(
        "[general]\ndebug = no\nautoprune = no\nautoregister = no\n\
         collection_nodes = no\npubsub_autocreate = no\nauth_policy = accept\n\n\
         [asterisk]\ntype = client\nserverhost = 127.0.0.1\nport = {}\n\
         username = {}/bench\nsecret = {AST_PW}\npriority = 1\nusetls = yes\n\
         usesasl = yes\nstatus = available\nstatusmessage = \"bench\"\ntimeout = 5\n",
        xmpp.port(),
        xmpp.jid("ast"),
    )
}

/// The dialplan: the two shipped snippets in contexts of their own (their
/// `[from-trunk]` renamed, the program path and the daemon's address
/// filled in), and the same pop and wait written with res_xmpp.
fn dialplan(xmpp: &Prosody, serve_port: u16) -> String {
    let percall = shipped("interactive-pop.conf")
        .replace("[from-trunk]", "[percall]")
        .replace("/usr/bin/popivr", BIN);
    let serve = shipped("ivr-daemon.conf")
        .replace("[from-trunk]", "[serve]")
        .replace("popivr.example.org", &format!("127.0.0.1:{serve_port}"));
    let alice = xmpp.jid("alice");
    format!(
        "{percall}\n{serve}\n\
         [jabber]\n\
         exten => 100,1,NoOp(Sales line via res_xmpp)\n\
          same => n,Answer()\n\
          same => n,JabberSend(asterisk,{alice},Call from ${{CALLERID(name)}} <${{CALLERID(num)}}> to ${{EXTEN}}. Reply 1 desk)\n\
          same => n,Set(REPLY=${{JABBER_RECEIVE(asterisk,{alice},60)}})\n\
          same => n,Set(POPIVR_ACTION=${{IF($[\"${{REPLY}}\" = \"1\"]?desk:voicemail)}})\n\
          same => n,Hangup()\n\n\
         [caller]\nexten => listen,1,Wait(120)\n"
    )
}

async fn run(rounds: usize, gap: Duration) {
    let mut report = Report::default();
    report.note(format!("machine: {}", machine()));
    report.note(format!("load average at the start: {}", loadavg()));
    report.note(format!("popivr binary: {BIN}"));

    let xmpp = Prosody::builder()
        .user("pbx", PBX_PW)
        .user("ast", AST_PW)
        .user("alice", ALICE_PW)
        .start();
    let mut alice = TestAgent::login(&xmpp, "alice", ALICE_PW).await;
    // As `popivr check` does it: pops go to agents popivr sees.
    subscribe(&xmpp, ("pbx", PBX_PW), &mut [&mut alice]).await;

    let dir = tempfile::Builder::new()
        .prefix("popivr-real-bench-")
        .tempdir()
        .expect("temp dir");
    let conf = dir.path().join("popivr.conf");
    popivr_testkit::testbed::write_private(&conf, sales_conf(&xmpp, PBX_PW, "").as_bytes())
        .expect("popivr.conf");
    let port = free_port();
    let _daemon = Daemon::start(&conf, port);

    let started = Asterisk::builder()
        .dialplan(&dialplan(&xmpp, port))
        .xmpp_conf(&xmpp_conf(&xmpp))
        .module("app_dial")
        .env("POPIVR_CONFIG", &conf.display().to_string())
        // Longer than any call: only popivr's writes wake Asterisk's reads.
        .sound(HOLD, Duration::from_secs(120))
        .try_start()
        .await;
    let pbx = match started {
        Ok(pbx) => pbx,
        Err(e) => {
            println!("no real Asterisk, no bench: {e}");
            std::process::exit(1);
        }
    };
    wait_res_xmpp_online(&pbx).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (progress, follower) = follow(pbx.ami(), stop.clone());
    let mut series: HashMap<Way, Series> = WAYS.iter().map(|w| (*w, Series::default())).collect();
    const WARM_UP: usize = 2;
    let t = std::time::Instant::now();
    for round in 0..rounds + WARM_UP {
        for way in WAYS {
            let n = round * WAYS.len() + way as usize;
            let result = match way {
                Way::Simulator => sim_call(&conf, &mut alice, n).await,
                _ => real_call(&pbx, &progress, way, &mut alice, n).await,
            };
            let s = series.get_mut(&way).unwrap();
            match result {
                Some(f) if round >= WARM_UP => {
                    s.pop.push(f.pop);
                    s.reply.push(f.reply);
                }
                Some(_) => {}
                None => s.missing += 1,
            }
            tokio::time::sleep(gap).await;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let _ = follower.await;
    report.note(format!(
        "{rounds} rounds of 4 calls (+{WARM_UP} warm-up rounds) in {:.0} s, {} ms apart",
        t.elapsed().as_secs_f64(),
        gap.as_millis()
    ));
    report.note(format!("load average at the end: {}", loadavg()));

    report.section("One call at a time, four ways, interleaved");
    let take =
        |series: &mut HashMap<Way, Series>, way| std::mem::take(series.get_mut(&way).unwrap());
    let per_call = take(&mut series, Way::PerCall);
    let serve = take(&mut series, Way::Serve);
    let jabber = take(&mut series, Way::ResXmpp);
    let sim = take(&mut series, Way::Simulator);
    for (way, s) in [
        (Way::PerCall, &per_call),
        (Way::Serve, &serve),
        (Way::ResXmpp, &jabber),
        (Way::Simulator, &sim),
    ] {
        report.row(
            &format!("{}: exec → pop", way.label()),
            s.pop.clone(),
            Goal::None,
        );
        report.row(
            &format!("{}: reply → dialplan", way.label()),
            s.reply.clone(),
            Goal::None,
        );
        if s.missing > 0 {
            report.note(format!(
                "{}: {} calls without a pop or an answer",
                way.label(),
                s.missing
            ));
        }
    }
    report.ratio(
        "serve: exec → pop (goal ≤ 1.0)",
        &serve.pop,
        &jabber.pop,
        "res_xmpp",
    );
    report.ratio(
        "serve: reply → dialplan (goal ≤ 1.0)",
        &serve.reply,
        &jabber.reply,
        "res_xmpp",
    );
    report.ratio(
        "per-call: exec → pop",
        &per_call.pop,
        &jabber.pop,
        "res_xmpp",
    );
    report.ratio(
        "per-call: reply → dialplan",
        &per_call.reply,
        &jabber.reply,
        "res_xmpp",
    );
    report.ratio("per-call: exec → pop", &per_call.pop, &sim.pop, "simulator");
    if let (Some(real), Some(simulated)) = (per_call.pop.median(), sim.pop.median()) {
        report.note(format!(
            "per-call pop, real Asterisk − simulator (medians): {:+.2} ms (goal: within 10 ms)",
            real - simulated
        ));
    }

    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("real");
    report.write_files(&out, true).expect("write the report");
    println!("\n{}", report.markdown(true));
    println!("report: {}", out.join("report.md").display());
    alice.close().await;
}

/// res_xmpp logs in on its own after Asterisk starts: wait until it says
/// its client is connected.
async fn wait_res_xmpp_online(pbx: &Asterisk) {
    let deadline = std::time::Instant::now() + WAIT;
    let mut shown = String::new();
    while std::time::Instant::now() < deadline {
        shown = pbx.ami().command("xmpp show connections").await;
        if shown.contains("Connected") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("res_xmpp never logged in: {shown}\n{}", pbx.log());
}

fn number(n: usize) -> String {
    format!("55{n:05}")
}

fn is_pop_of(m: &xmpp_parsers::message::Message, n: usize) -> bool {
    body(m).is_some_and(|b| b.contains(&format!("<{}>", number(n))) && b.ends_with("Reply 1 desk"))
}

/// What the agent did with call `n`'s pop.
#[derive(Debug, Clone, Copy)]
struct Answered {
    /// When its client had the pop.
    popped: SystemTime,
    /// Just before "1" went back, on both clocks.
    sent: SystemTime,
    sent_mono: std::time::Instant,
}

/// The agent's side: the pop of call `n`, and "1" sent back in its thread.
async fn answer(alice: &mut TestAgent, n: usize) -> Option<Answered> {
    let pop = alice.next_message_within(WAIT, |m| is_pop_of(m, n)).await?;
    let popped = SystemTime::now();
    let from = pop.from.as_ref().map(|j| j.to_string()).unwrap_or_default();
    let mut reply = TestMessage::chat(&from, "1");
    if let Some(thread) = &pop.thread {
        reply = reply.thread(&thread.id);
    }
    let (sent, sent_mono) = (SystemTime::now(), std::time::Instant::now());
    alice.send(reply).await;
    Some(Answered {
        popped,
        sent,
        sent_mono,
    })
}

fn since(later: SystemTime, earlier: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or_default()
}

async fn real_call(
    pbx: &Asterisk,
    progress: &Arc<Mutex<HashMap<String, Progress>>>,
    way: Way,
    alice: &mut TestAgent,
    n: usize,
) -> Option<Figures> {
    let call: Call = pbx
        .originate(
            Originate::new(&format!("Local/100@{}", way.context()))
                .caller_id(&number(n), &format!("Bench Caller {n}"))
                .exten("caller", "listen"),
        )
        .await
        .expect("originate");
    let answered = answer(alice, n).await;
    let deadline = std::time::Instant::now() + WAIT;
    let done = loop {
        let p = progress.lock().unwrap().get(&call.id).cloned();
        if let Some(p) = p.filter(|p| p.after.is_some()) {
            break Some(p);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // The snippets end the call once the dialplan goes on; make sure.
    if !pbx.wait_no_channels(Duration::from_secs(5)).await {
        pbx.hangup_all().await;
        pbx.wait_no_channels(WAIT).await;
    }
    let (a, p) = match (answered, done) {
        (Some(a), Some(p)) => (a, p),
        (a, p) => {
            eprintln!("{} call {n}: pop {a:?}, dialplan {p:?}", way.label());
            return None;
        }
    };
    if p.action.as_deref() != Some("desk") {
        eprintln!("{} call {n}: action {:?}", way.label(), p.action);
        return None;
    }
    Some(Figures {
        pop: since(a.popped, p.exec?),
        reply: since(p.after?, a.sent),
    })
}

/// The per-call profile under the simulator, the caller's data in the
/// channel variables the shipped `MSet` line fills.
async fn sim_call(conf: &std::path::Path, alice: &mut TestAgent, n: usize) -> Option<Figures> {
    let config = SimConfig::new(format!("{BIN}(sales,queue=sales)"))
        .env("POPIVR_CONFIG", conf.display().to_string())
        .sound(HOLD, Duration::from_secs(120))
        .var("POPIVR_CALLER_NUM", number(n))
        .var("POPIVR_CALLER_NAME", format!("Bench%20Caller%20{n}"))
        .var("POPIVR_EXTEN", "100")
        .var("POPIVR_DNID", "")
        .var("POPIVR_UNIQUEID", format!("1700000000.{n}"));
    let exec = SystemTime::now();
    let mut sim = Sim::start(config).expect("the simulator starts popivr");
    let answered = answer(alice, n).await;
    let mut e_at = None;
    if answered.is_some() {
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < deadline {
            match sim.next_command(WAIT).await {
                Next::Command(c) if c.line.starts_with("E,") => {
                    e_at = Some(sim.started() + c.at);
                    break;
                }
                Next::Command(_) => {}
                Next::TimedOut | Next::Ended => break,
            }
        }
    }
    sim.close();
    let _ = sim.wait_exit(Duration::from_secs(5)).await;
    let a = answered?;
    Some(Figures {
        pop: since(a.popped, exec),
        reply: e_at?.saturating_duration_since(a.sent_mono),
    })
}
