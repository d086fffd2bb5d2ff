//! popivr's benchmarks, all in one run on one machine: per-call mode,
//! serve mode and scale, each beside its floor and beside a comparison
//! peer (what an admin would write instead: benches/peer/slixmpp_pop.py).
//! Results and how to read them: BENCHMARKS.md.
//!
//!     cargo bench --bench suite                  # everything, ~15 minutes
//!     BENCH_ONLY=percall,serve cargo bench --bench suite
//!
//! It starts a throw-away prosody on 127.0.0.1 (as the tests do), logs in
//! the test agents, subscribes them to popivr's account the way
//! `popivr check` does (so the default `presence = available` profiles pop
//! them), and measures — medians and percentiles over many calls, never
//! single times; nothing here fails on a time:
//!
//! 1. exec → first audio command (`S,` read from the child's stdout);
//! 2. pop latency: exec (per call) or connect (serve) → the agent holds
//!    the pop; per call with `presence = available` and `= any`;
//! 3. reply → action: the agent's "1" leaves → the `E` line is read;
//! 4. peak RSS of one per-call process, CPU per call, and serve's extra
//!    RSS per concurrent call;
//! 5. scale: serve with N concurrent calls, per-call with M processes
//!    started at once.
//!
//! Side by side in the same rounds (interleaved, so all see the same
//! machine load): the floor (popivr's own login + one message, in this
//! process and in a fresh one; tokio-xmpp's stock client; one message on
//! an open session for serve) and the Python/slixmpp peer, whose venv the
//! bench makes itself (`$CARGO_TARGET_TMPDIR/bench-venv`, from PyPI).
//!
//! Output: a Markdown table on stdout and in
//! `$CARGO_TARGET_TMPDIR/suite/report.md`, raw samples in `samples.csv`,
//! and the latency distribution plot `latency.png` (matplotlib, from the
//! same venv) beside them.
//!
//! Knobs (environment): `BENCH_ONLY` (comma list of percall, serve, scale,
//! burst, phases), `BENCH_N` rounds of single calls (40), `BENCH_PEER_N`
//! rounds that include the peer (20), `BENCH_SCALE` serve calls per round
//! (100,500,1000,2000), `BENCH_RATE` serve call arrivals per second (200),
//! `BENCH_AGENTS` agents for the scale runs (25), `BENCH_BURST` per-call
//! processes at once (50,200), `BENCH_PEER_BURST` (50), `BENCH_GAP_MS`
//! pause before each single call (250), `BENCH_POPIVR` another popivr
//! build, `BENCH_POPIVR_B` a second build whose per-call calls run
//! interleaved with this one's (A B A B …; rows `B:` and B/A ratios),
//! `BENCH_NO_PEER=1`, `BENCH_SMOKE=1` (one of each, no verdicts),
//! `BENCH_SMAPS=<prefix>` (smaps of the first call of each kind),
//! `BENCH_STRACE=<file>` (one more call under strace, not counted).
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it does
//! nothing: benchmarks are not tests.

#[path = "../../tests/support/mod.rs"]
mod support;

mod asterisk;
mod calls;
mod serve;
mod stats;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use asterisk::Program;
use calls::{PopSeries, Start};
use popivr::call::{OutgoingMessage, XmppStatus};
use popivr::xmpp::XmppEvent;
use popivr_testkit::testbed::{Ejabberd, Server};
use stats::{Goal, Phases, Report, Samples, loadavg, machine, ms};
use support::{Prosody, TestAgent};

/// Set in the environment of this bench re-run as a fresh process
/// ([`child_main`]): `login` or `pop`.
const CHILD_MODE: &str = "BENCH_CHILD";

const PBX: &str = "pbx";
const AGENT: &str = "alice";
const PBX_PASSWORD: &str = "bench-pbx-pw";
const AGENT_PASSWORD: &str = "bench-alice-pw";
const SCALE_PASSWORD: &str = "bench-scale-pw";

fn main() {
    if let Ok(mode) = std::env::var(CHILD_MODE) {
        child_main(&mode);
        return;
    }
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmarks run with `cargo bench --bench suite` (see BENCHMARKS.md)");
        return;
    }
    quiet_client_teardown();
    let plan = Plan::from_env();
    let mut report = Report::default();
    let started = Instant::now();
    let load_before = loadavg();
    report.note(format!("machine: {}", machine()));
    report.note(format!("load average at the start: {load_before}"));
    report.note(format!("popivr binary: {}", popivr_bin().display()));

    let venv = if plan.peer {
        match peer_venv() {
            Ok(v) => Some(v),
            Err(e) => {
                report.note(format!("comparison peer unavailable: {e}"));
                None
            }
        }
    } else {
        None
    };

    let mut users = vec![
        (PBX.to_string(), PBX_PASSWORD),
        (AGENT.to_string(), AGENT_PASSWORD),
    ];
    users.extend((0..plan.agents).map(|k| (scale_agent(k), SCALE_PASSWORD)));
    // BENCH_SERVER=ejabberd: a stock ejabberd (its shaper and session
    // limit included) instead of prosody.
    let server: Box<dyn Server + Sync> = match std::env::var("BENCH_SERVER").as_deref() {
        Ok("ejabberd") => {
            let mut builder = Ejabberd::builder();
            for (user, password) in &users {
                builder = builder.user(user, password);
            }
            Box::new(builder.start())
        }
        _ => {
            let mut builder = Prosody::builder();
            for (user, password) in &users {
                builder = builder.user(user, password);
            }
            Box::new(builder.start())
        }
    };
    let server = server.as_ref();
    report.note(format!(
        "{} start-up {:.0} ms",
        server.name(),
        ms(server.base().startup_time())
    ));
    let conf = write_config(server, &plan);
    // The peer with presence = available and = any.
    let peers = venv.as_deref().map(|v| {
        (
            peer_program(v, &write_peer_config(server, &conf, "available")),
            peer_program(v, &write_peer_config(server, &conf, "any")),
        )
    });
    let account = popivr::config::load_file(&conf)
        .expect("bench config")
        .accounts
        .get(PBX)
        .cloned()
        .expect("pbx account");

    // Scale agents live on a runtime of their own (popivr sessions, many
    // tasks); the single calls use one thread, as the test agent wants.
    let scale_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let mut agents = (plan.agents > 0 && (plan.has("scale"))).then(|| {
        let accounts = (0..plan.agents)
            .map(|k| server.account(&scale_agent(k), SCALE_PASSWORD))
            .collect();
        let pbx_bare = server.jid(PBX);
        scale_rt.block_on(async {
            let agents = serve::Agents::login(accounts, &pbx_bare).await;
            let contacts: Vec<String> = (0..plan.agents)
                .map(|k| server.jid(&scale_agent(k)))
                .collect();
            let states = popivr::xmpp::survey(&account, &contacts, Duration::from_secs(5))
                .await
                .expect("survey the scale agents");
            let subscribed = states.iter().filter(|s| s.subscribed).count();
            assert_eq!(subscribed, contacts.len(), "scale agents subscribed");
            agents
        })
    });

    let mut agent = rt.block_on(async {
        let mut agent = TestAgent::login(server, AGENT, AGENT_PASSWORD).await;
        // As `popivr check` does: ask, and the agent accepts.
        let contacts = vec![agent.bare()];
        let pbx_bare = server.jid(PBX);
        let t = Instant::now();
        let (states, ok) = tokio::join!(
            popivr::xmpp::survey(&account, &contacts, Duration::from_secs(5)),
            agent.approve_subscription(&pbx_bare, asterisk::WAIT)
        );
        let states = states.expect("survey");
        assert!(ok && states[0].subscribed, "alice subscribed: {states:?}");
        report.note(format!(
            "subscription set up (survey + accept) in {:.0} ms",
            ms(t.elapsed())
        ));
        agent
    });

    if plan.has("percall") {
        rt.block_on(percall(
            &mut report,
            &plan,
            &conf,
            server,
            &account,
            &mut agent,
            peers.as_ref(),
        ));
    }
    let wants_serve = plan.has("serve") || plan.has("scale");
    let daemon = match wants_serve && serve::Daemon::available(&popivr_bin()) {
        true => Some(serve::Daemon::start(&popivr_bin(), &conf)),
        false if wants_serve => {
            report.note("`popivr serve` is not in this build: serve figures left out".into());
            None
        }
        false => None,
    };
    if let Some(daemon) = &daemon
        && plan.has("serve")
    {
        rt.block_on(serve_single(
            &mut report,
            &plan,
            daemon,
            &account,
            &mut agent,
        ));
    }
    if let (Some(daemon), Some(agents)) = (&daemon, agents.as_mut())
        && plan.has("scale")
    {
        scale(
            &mut report,
            &plan,
            daemon,
            server.base().pid(),
            agents,
            &scale_rt,
        );
    }
    drop(daemon);
    rt.block_on(async {
        if plan.has("burst") {
            bursts(
                &mut report,
                &plan,
                &conf,
                &mut agent,
                peers.as_ref().map(|p| &p.0),
            )
            .await;
        }
        if plan.has("phases") {
            phases(&mut report, &plan, &conf, &account).await;
        }
        agent.close().await;
    });
    if let Some(agents) = agents {
        agents.close();
    }
    report.note(format!("load average at the end: {}", loadavg()));
    report.note(format!(
        "whole run {:.1} minutes",
        started.elapsed().as_secs_f64() / 60.0
    ));

    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("suite");
    println!("\n{}", report.markdown(!plan.smoke));
    match report.write_files(&dir, !plan.smoke) {
        Ok(csv) => {
            println!("table and raw samples: {}", dir.display());
            if let Some(venv) = &venv {
                plot(venv, &csv, &dir.join("latency.png"));
            }
        }
        Err(e) => eprintln!("cannot write {}: {e}", dir.display()),
    }
}

/// tokio-xmpp 6.0's `Client` panics in its worker task once the client
/// is dropped after `send_end` ("All clients have been dropped."); the
/// runtime catches it, but each one would print a backtrace. The floor
/// series drops a client per round: keep those quiet, show the rest.
fn quiet_client_teardown() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let ours = info.payload().downcast_ref::<String>().map(String::as_str)
            == Some("All clients have been dropped.")
            || info.payload().downcast_ref::<&str>() == Some(&"All clients have been dropped.");
        if !ours {
            default(info);
        }
    }));
}

/// What one run does.
struct Plan {
    only: Option<Vec<String>>,
    smoke: bool,
    rounds: usize,
    peer_rounds: usize,
    warmup: usize,
    gap: Duration,
    scale: Vec<usize>,
    rate: f64,
    agents: usize,
    burst: Vec<usize>,
    peer_burst: Vec<usize>,
    peer: bool,
}

impl Plan {
    fn from_env() -> Plan {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let num =
            |name: &str, default: usize| var(name).and_then(|v| v.parse().ok()).unwrap_or(default);
        let list = |name: &str, default: &[usize]| -> Vec<usize> {
            var(name).map_or_else(
                || default.to_vec(),
                |v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
            )
        };
        let smoke = var("BENCH_SMOKE").is_some();
        let only = var("BENCH_ONLY").map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
        if smoke {
            return Plan {
                only,
                smoke,
                rounds: 1,
                peer_rounds: 1,
                warmup: 0,
                gap: Duration::ZERO,
                scale: vec![5],
                rate: 50.0,
                agents: 2,
                burst: vec![2],
                peer_burst: vec![2],
                peer: var("BENCH_NO_PEER").is_none(),
            };
        }
        Plan {
            only,
            smoke,
            rounds: num("BENCH_N", 40).max(1),
            peer_rounds: num("BENCH_PEER_N", 20),
            warmup: 3,
            gap: Duration::from_millis(num("BENCH_GAP_MS", 250) as u64),
            scale: list("BENCH_SCALE", &[100, 500, 1000, 2000]),
            rate: num("BENCH_RATE", 200).max(1) as f64,
            agents: num("BENCH_AGENTS", 25).max(1),
            burst: list("BENCH_BURST", &[50, 200]),
            peer_burst: list("BENCH_PEER_BURST", &[50]),
            peer: var("BENCH_NO_PEER").is_none(),
        }
    }

    fn has(&self, part: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|p| p == part))
    }
}

// ---------------------------------------------------------------------------
// Per-call mode, one call at a time.

#[allow(clippy::too_many_arguments)]
async fn percall(
    report: &mut Report,
    plan: &Plan,
    conf: &Path,
    server: &(dyn Server + Sync),
    account: &popivr::config::Account,
    agent: &mut TestAgent,
    peers: Option<&(Program, Program)>,
) {
    report.section("Per-call mode, one call at a time");
    let keys_prog = popivr_program(conf, "keys");
    let b_bin = std::env::var_os("BENCH_POPIVR_B").map(PathBuf::from);
    let b_program = |profile: &str| {
        b_bin.as_ref().map(|bin| Program {
            path: bin.clone(),
            ..popivr_program(conf, profile)
        })
    };
    let b_keys_prog = b_program("keys");
    let mut exec = Samples::default();
    let mut key_to_e = Samples::default();
    let mut hwm = Samples::default();
    let mut exit = Samples::default();
    let mut b_hwm = Samples::default();
    for i in 0..plan.warmup + plan.rounds {
        let c = calls::keys_call(&keys_prog, i).await;
        if i >= plan.warmup {
            exec.push(c.exec_to_s);
            key_to_e.push(c.action);
            hwm.push_kib_as_mib(c.mem.hwm);
            exit.push(c.exit);
        }
        if let Some(b) = &b_keys_prog {
            let c = calls::keys_call(b, i).await;
            if i >= plan.warmup {
                b_hwm.push_kib_as_mib(c.mem.hwm);
            }
        }
    }

    // Calls with a target, interleaved with the floors and the peer so
    // that all see the same share of whatever else the machine is doing.
    // Each waits `gap` first: prosody leaves Nagle on and the agent's
    // kernel delays its ACKs after replying, so a pop that follows the
    // previous confirmation closely waits for that ACK (BENCHMARKS.md).
    let avail_prog = popivr_program(conf, "pop");
    let any_prog = popivr_program(conf, "popany");
    let b_avail_prog = b_program("pop");
    let mut b_avail = PopSeries::default();
    let mut avail = PopSeries::default();
    let mut any = PopSeries::default();
    let mut peer_avail = PopSeries::default();
    let mut peer_any = PopSeries::default();
    let mut floor = Samples::default();
    let mut cold = Samples::default();
    let mut client = Samples::default();
    let gap = || tokio::time::sleep(plan.gap);
    for i in 0..plan.warmup + plan.rounds {
        let counted = i >= plan.warmup;
        let n = 1000 + 10 * i;
        gap().await;
        avail.take(
            calls::pop_call(Start::Process(&avail_prog), agent, n).await,
            counted,
        );
        if let Some(b) = &b_avail_prog {
            gap().await;
            b_avail.take(
                calls::pop_call(Start::Process(b), agent, n + 5).await,
                counted,
            );
        }
        gap().await;
        any.take(
            calls::pop_call(Start::Process(&any_prog), agent, n + 1).await,
            counted,
        );
        gap().await;
        let d = calls::floor_message(account, agent, n).await;
        if counted {
            floor.push(d);
        }
        gap().await;
        let d = calls::cold_floor_message(conf, agent, n).await;
        if counted {
            cold.push(d);
        }
        gap().await;
        let d = calls::client_message(server, PBX, PBX_PASSWORD, agent, n).await;
        if counted {
            client.push(d);
        }
        if let Some((pa, pn)) = peers
            && i < plan.warmup + plan.peer_rounds
        {
            gap().await;
            peer_avail.take(
                calls::pop_call(Start::Process(pa), agent, n + 2).await,
                counted,
            );
            gap().await;
            peer_any.take(
                calls::pop_call(Start::Process(pn), agent, n + 3).await,
                counted,
            );
        }
    }
    let single = Some("single");
    let reply = Some("reply");
    let rows: Vec<(&str, &Samples, Goal, Option<&'static str>)> = vec![
        (
            "exec → S, keys-only profile",
            &exec,
            Goal::MedianMs(5.0),
            None,
        ),
        (
            "exec → S, profile with a target",
            &avail.exec,
            Goal::MedianMs(5.0),
            None,
        ),
        (
            "exec → S, peer (Python/slixmpp)",
            &peer_avail.exec,
            Goal::None,
            None,
        ),
        (
            "exec → pop, presence = available (default)",
            &avail.pop,
            Goal::MedianMs(15.0),
            single,
        ),
        (
            "exec → pop, presence = any",
            &any.pop,
            Goal::MedianMs(15.0),
            single,
        ),
        (
            "exec → last G read, available",
            &avail.last_g,
            Goal::None,
            None,
        ),
        (
            "last G read → pop, available",
            &avail.g_to_pop,
            Goal::None,
            None,
        ),
        ("last G read → pop, any", &any.g_to_pop, Goal::None, None),
        (
            "floor: popivr login + 1 message, in-process",
            &floor,
            Goal::None,
            single,
        ),
        (
            "floor: exec + popivr login + 1 message, fresh process",
            &cold,
            Goal::None,
            single,
        ),
        (
            "tokio-xmpp Client login + 1 message, in-process",
            &client,
            Goal::None,
            single,
        ),
        (
            "peer: exec → pop, presence = available",
            &peer_avail.pop,
            Goal::None,
            single,
        ),
        (
            "peer: exec → pop, presence = any",
            &peer_any.pop,
            Goal::None,
            single,
        ),
        (
            "agent reply → E, per-call",
            &avail.reply,
            Goal::MedianMs(1.5),
            reply,
        ),
        (
            "peer: agent reply → E",
            &peer_avail.reply,
            Goal::None,
            reply,
        ),
        ("caller key → E, keys-only", &key_to_e, Goal::None, None),
        ("peak RSS (VmHWM), keys-only", &hwm, Goal::MaxMib(4.0), None),
        (
            "peak RSS (VmHWM), with a target",
            &avail.hwm,
            Goal::MaxMib(4.0),
            None,
        ),
        (
            "  of which anonymous at the end (RssAnon)",
            &avail.anon,
            Goal::None,
            None,
        ),
        (
            "  of which file-backed at the end (RssFile)",
            &avail.file,
            Goal::None,
            None,
        ),
        ("peer: peak RSS (VmHWM)", &peer_avail.hwm, Goal::None, None),
        (
            "CPU time per call (user + sys), with a target",
            &avail.cpu,
            Goal::None,
            None,
        ),
        ("peer: CPU time per call", &peer_avail.cpu, Goal::None, None),
        (
            "stdin EOF → exit, keys-only",
            &exit,
            Goal::MaxMs(100.0),
            None,
        ),
        (
            "stdin EOF → exit, with a target (after E)",
            &avail.exit,
            Goal::MaxMs(100.0),
            None,
        ),
        ("peer: stdin EOF → exit", &peer_avail.exit, Goal::None, None),
    ];
    for (name, samples, goal, plot) in rows {
        report.row_plot(name, samples.clone(), goal, plot);
    }
    if let Some(bin) = &b_bin {
        let b = "B: the BENCH_POPIVR_B build";
        report.note(format!("{b} is {}", bin.display()));
        for (name, samples) in [
            ("B: exec → pop, presence = available", &b_avail.pop),
            ("B: agent reply → E, per-call", &b_avail.reply),
            ("B: peak RSS (VmHWM), keys-only", &b_hwm),
            ("B: peak RSS (VmHWM), with a target", &b_avail.hwm),
        ] {
            report.row_plot(name, samples.clone(), Goal::None, None);
        }
        report.ratio(
            "exec → pop, presence = available",
            &avail.pop,
            &b_avail.pop,
            b,
        );
        report.ratio("agent reply → E", &avail.reply, &b_avail.reply, b);
        report.ratio("peak RSS, keys-only", &hwm, &b_hwm, b);
        report.ratio("peak RSS, with a target", &avail.hwm, &b_avail.hwm, b);
    }
    // One more call under strace, on request: where a pop's time goes.
    if let Some(file) = std::env::var_os("BENCH_STRACE") {
        let mut traced = popivr_program(conf, "pop");
        let mut args: Vec<String> = ["-f", "-tt", "-T", "-o"].map(String::from).to_vec();
        args.push(PathBuf::from(&file).display().to_string());
        args.push("-e".into());
        args.push("trace=network,read,write,writev,execve,poll,epoll_wait".into());
        args.push(traced.path.display().to_string());
        args.append(&mut traced.args);
        traced.args = args;
        traced.path = PathBuf::from("strace");
        tokio::time::sleep(plan.gap).await;
        let c = calls::pop_call(Start::Process(&traced), agent, 999).await;
        report.note(format!(
            "traced call (strace, not in the figures): pop {:?}; trace in {}",
            c.map(|c| ms(c.pop)),
            PathBuf::from(file).display()
        ));
    }
    let presence_cost = diff_of_medians(&avail.pop, &any.pop);
    report.note(format!(
        "presence step (pop available − pop any, medians): {presence_cost:.2} ms"
    ));
    for (what, s) in [
        ("available", &avail),
        ("any", &any),
        ("peer available", &peer_avail),
        ("peer any", &peer_any),
    ] {
        report.note(format!(
            "{what}: pops missing {}, confirmations missing {}",
            s.missing, s.unconfirmed
        ));
    }
    let peer = "Python/slixmpp peer";
    report.ratio("exec → S", &avail.exec, &peer_avail.exec, peer);
    report.ratio(
        "exec → pop, presence = available",
        &avail.pop,
        &peer_avail.pop,
        peer,
    );
    report.ratio("exec → pop, presence = any", &any.pop, &peer_any.pop, peer);
    report.ratio("agent reply → E", &avail.reply, &peer_avail.reply, peer);
    report.ratio("peak RSS", &avail.hwm, &peer_avail.hwm, peer);
    report.ratio("CPU time per call", &avail.cpu, &peer_avail.cpu, peer);
    report.ratio("stdin EOF → exit", &avail.exit, &peer_avail.exit, peer);
    report.ratio(
        "exec → pop, presence = any",
        &any.pop,
        &cold,
        "floor, fresh process",
    );
    report.ratio(
        "exec → pop, presence = any",
        &any.pop,
        &floor,
        "floor, in-process",
    );
    report.ratio(
        "exec → pop, presence = available",
        &avail.pop,
        &cold,
        "floor, fresh process",
    );
    report.ratio(
        "exec → pop, presence = available",
        &avail.pop,
        &any.pop,
        "presence = any",
    );
    report.ratio("floor, in-process", &floor, &client, "tokio-xmpp Client");
}

fn diff_of_medians(a: &Samples, b: &Samples) -> f64 {
    a.median().unwrap_or(f64::NAN) - b.median().unwrap_or(f64::NAN)
}

// ---------------------------------------------------------------------------
// Serve mode.

async fn serve_single(
    report: &mut Report,
    plan: &Plan,
    daemon: &serve::Daemon,
    account: &popivr::config::Account,
    agent: &mut TestAgent,
) {
    report.section("Serve mode (ivr://), one call at a time");
    let rss_start = daemon.rss_kib();
    // A session of our own that stays up: one message on it is the floor
    // of any pop once the login is out of the way.
    let mut open = popivr::xmpp::spawn(account.clone(), Default::default());
    loop {
        match open.recv().await {
            Some(XmppEvent::Status(XmppStatus::Online)) => break,
            Some(XmppEvent::Status(XmppStatus::Failed(e))) => panic!("floor session: {e}"),
            Some(_) => {}
            None => panic!("floor session ended"),
        }
    }
    let mut s = PopSeries::default();
    let mut floor = Samples::default();
    for i in 0..plan.warmup + plan.rounds {
        let counted = i >= plan.warmup;
        let n = 5000 + i;
        tokio::time::sleep(plan.gap).await;
        let call = calls::pop_call(Start::Serve(&daemon.addr, "pop"), agent, n).await;
        if call.is_none() {
            eprintln!("serve log:\n{}", daemon.log_tail());
        }
        s.take(call, counted);
        tokio::time::sleep(plan.gap).await;
        let d = calls::open_session_message(&open, agent, n).await;
        if counted {
            floor.push(d);
        }
    }
    open.close().await;
    let plot = Some("single");
    report.row("connect → S", s.exec.clone(), Goal::None);
    report.row("connect → last G read", s.last_g.clone(), Goal::None);
    report.row(
        "last G read → pop at the agent",
        s.g_to_pop.clone(),
        Goal::None,
    );
    report.row_plot(
        "connect → pop (res_xmpp ≈ 1.2 ms)",
        s.pop.clone(),
        Goal::MedianMs(1.2),
        plot,
    );
    report.row_plot(
        "floor: 1 message on an open session",
        floor.clone(),
        Goal::None,
        plot,
    );
    report.row_plot(
        "agent reply → E, serve",
        s.reply.clone(),
        Goal::MedianMs(1.5),
        Some("reply"),
    );
    report.ratio("pop, serve", &s.pop, &floor, "1 message on an open session");
    report.note(format!(
        "serve: pops missing {}, confirmations missing {}; daemon RSS {:.2} MiB at the start of the series",
        s.missing,
        s.unconfirmed,
        rss_start as f64 / 1024.0
    ));
}

fn scale(
    report: &mut Report,
    plan: &Plan,
    daemon: &serve::Daemon,
    prosody: Option<u32>,
    agents: &mut serve::Agents,
    rt: &tokio::runtime::Runtime,
) {
    report.section(&format!(
        "Serve mode at scale: N calls at once, arriving {} a second, {} agents",
        plan.rate,
        agents.len()
    ));
    // Settle, then the daemon's resident size with no call.
    std::thread::sleep(Duration::from_millis(500));
    let idle = daemon.rss_kib();
    let mut per_call = Samples::default();
    let mut first = 100_000;
    for &n in &plan.scale {
        let r = rt.block_on(serve::round(
            daemon, prosody, agents, first, n, plan.rate, idle,
        ));
        first += n;
        let goal = if n == 1000 {
            Goal::P99Ms(50.0)
        } else {
            Goal::None
        };
        report.row_plot(
            &format!("N = {n}: connect → pop"),
            r.pop.clone(),
            goal,
            Some("scale"),
        );
        report.row(
            &format!("N = {n}: agent reply → E"),
            r.reply.clone(),
            Goal::None,
        );
        if let Some(k) = r.kib_per_call {
            per_call.push_value(k, "KiB");
        }
        let per = |d: Duration| ms(d) / n as f64;
        let share = |d: Duration| 100.0 * d.as_secs_f64() / r.wall.as_secs_f64();
        report.note(format!(
            "N = {n}: pops missing {}, E missing {}; round {:.1} s; CPU per call: daemon {:.3} ms, prosody {:.3} ms, bench {:.3} ms; CPU share of the round (one core = 100 %): daemon {:.0} %, prosody {:.0} %, bench {:.0} %; daemon RSS with all calls waiting − idle, per call: {}",
            r.missing_pops,
            r.missing_e,
            r.wall.as_secs_f64(),
            per(r.cpu_daemon),
            per(r.cpu_prosody),
            per(r.cpu_bench),
            share(r.cpu_daemon),
            share(r.cpu_prosody),
            share(r.cpu_bench),
            r.kib_per_call.map_or("—".into(), |k| format!("{k:.1} KiB")),
        ));
    }
    report.row(
        "daemon RSS per concurrent call (one value per N)",
        per_call,
        Goal::MaxKib(64.0),
    );
    report.note(format!(
        "daemon RSS idle before the rounds: {:.2} MiB",
        idle as f64 / 1024.0
    ));
}

// ---------------------------------------------------------------------------
// Per-call mode, many processes at once.

async fn bursts(
    report: &mut Report,
    plan: &Plan,
    conf: &Path,
    agent: &mut TestAgent,
    peer: Option<&Program>,
) {
    report.section("Per-call mode: M processes started at once");
    let prog = popivr_program(conf, "pop");
    let mut first = 200_000;
    let mut runs: Vec<(String, calls::Burst)> = Vec::new();
    for &m in &plan.burst {
        tokio::time::sleep(Duration::from_secs(1)).await;
        runs.push((
            format!("popivr, M = {m}"),
            calls::burst(Start::Process(&prog), agent, first, m).await,
        ));
        first += m;
    }
    if let Some(peer) = peer {
        for &m in &plan.peer_burst {
            tokio::time::sleep(Duration::from_secs(1)).await;
            runs.push((
                format!("peer, M = {m}"),
                calls::burst(Start::Process(peer), agent, first, m).await,
            ));
            first += m;
        }
    }
    for (name, b) in &runs {
        report.row_plot(
            &format!("{name}: exec → pop"),
            b.pop.clone(),
            Goal::None,
            Some("burst"),
        );
        report.row(
            &format!("{name}: agent reply → E"),
            b.reply.clone(),
            Goal::None,
        );
        report.row(
            &format!("{name}: CPU per process"),
            b.cpu.clone(),
            Goal::None,
        );
        report.note(format!(
            "{name}: pops missing {}, no E after the answer {}, failed or killed exits {}; all done in {:.2} s",
            b.missing,
            b.no_e,
            b.bad_exits,
            b.wall.as_secs_f64()
        ));
        for (why, count) in &b.why_missing {
            report.note(format!("{name}: {count} without a pop logged: {why}"));
        }
    }
    let find = |prefix: &str| runs.iter().find(|(n, _)| n == prefix).map(|(_, b)| b);
    for &m in &plan.peer_burst {
        if let (Some(a), Some(b)) = (
            find(&format!("popivr, M = {m}")),
            find(&format!("peer, M = {m}")),
        ) {
            let peer = "Python/slixmpp peer";
            report.ratio(&format!("M = {m}: exec → pop"), &a.pop, &b.pop, peer);
            report.ratio(&format!("M = {m}: CPU per process"), &a.cpu, &b.cpu, peer);
        }
    }
}

// ---------------------------------------------------------------------------
// Where a login's time goes.

async fn phases(report: &mut Report, plan: &Plan, conf: &Path, account: &popivr::config::Account) {
    let mut warm = Phases::default();
    for _ in 0..plan.rounds {
        let t = Instant::now();
        let conn = popivr::xmpp::login(account).await.expect("login");
        warm.add(t.elapsed(), &conn.timings);
    }
    report.phases("login phases, warm (in-process)", warm);
    let mut cold = Phases::default();
    for _ in 0..plan.rounds {
        cold.merge(cold_login(conf));
    }
    report.phases("login phases, cold (fresh process)", cold);
}

/// One login in a fresh process; its phases as the child reports them.
fn cold_login(conf: &Path) -> Phases {
    let out = child_command(conf, "login")
        .stdout(Stdio::piped())
        .output()
        .expect("run the bench as a child");
    assert!(out.status.success(), "cold login child failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut phases = Phases::default();
    for line in text.lines() {
        let Some((name, ms)) = line.split_once('\t') else {
            continue;
        };
        let d = Duration::from_secs_f64(ms.parse::<f64>().expect("ms") / 1000.0);
        phases.push(name, d);
    }
    phases
}

pub(crate) fn child_command(conf: &Path, mode: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("own path"));
    cmd.env_clear()
        .env(CHILD_MODE, mode)
        .env("POPIVR_CONFIG", conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd
}

/// This bench as a fresh process: `login` logs in once and prints each
/// phase (`name<TAB>ms`); `pop` logs in and sends one message, as a
/// per-call process without popivr's call logic would.
fn child_main(mode: &str) {
    let conf = std::env::var("POPIVR_CONFIG").expect("POPIVR_CONFIG");
    let started = Instant::now();
    let config = popivr::config::load_file(&conf).expect("config");
    let account = config.accounts.get(PBX).cloned().expect("pbx account");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        match mode {
            "login" => {
                let before = started.elapsed();
                let t = Instant::now();
                let conn = popivr::xmpp::login(&account).await.expect("login");
                let wall = t.elapsed();
                let mut out = String::new();
                let _ = writeln!(out, "process start → login call\t{}", ms(before));
                for (phase, d) in &conn.timings.phases {
                    let _ = writeln!(out, "{phase}\t{}", ms(*d));
                }
                let _ = writeln!(
                    out,
                    "set-up before connect (CA file, TLS config)\t{}",
                    ms(wall.saturating_sub(conn.timings.total))
                );
                let _ = writeln!(out, "login() wall\t{}", ms(wall));
                print!("{out}");
            }
            "pop" => {
                let to = std::env::var("BENCH_TO").expect("BENCH_TO");
                let body = std::env::var("BENCH_BODY").expect("BENCH_BODY");
                let mut session = popivr::xmpp::spawn(account, Default::default());
                session.send(OutgoingMessage::chat(to, body, None));
                // The message goes out right after Online; the close
                // queued behind it waits for it.
                while let Some(ev) = session.recv().await {
                    match ev {
                        XmppEvent::Status(XmppStatus::Online) => break,
                        XmppEvent::Status(XmppStatus::Failed(e)) => panic!("login: {e}"),
                        _ => {}
                    }
                }
                session.close().await;
            }
            other => panic!("unknown {CHILD_MODE} {other:?}"),
        }
    });
}

// ---------------------------------------------------------------------------
// Set-up.

/// The popivr binary under test (release under `cargo bench`), unless
/// `BENCH_POPIVR` names another build.
fn popivr_bin() -> PathBuf {
    std::env::var_os("BENCH_POPIVR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_popivr")))
}

fn popivr_program(conf: &Path, profile: &str) -> Program {
    Program {
        path: popivr_bin(),
        args: vec![profile.to_string()],
        env: vec![("POPIVR_CONFIG".into(), conf.to_path_buf())],
    }
}

fn scale_agent(k: usize) -> String {
    format!("a{k:03}")
}

/// popivr.conf for the test server: a keys-only profile, the agent as the
/// target with presence as by default and with `presence = any`, and one
/// profile per scale agent. `${n}` (a call argument) tells calls apart.
fn write_config(server: &dyn Server, plan: &Plan) -> PathBuf {
    let path = server.scratch_dir().join("popivr.conf");
    let pop = |name: &str, target: &str, extra: &str| {
        format!(
            "[{name}]
type = profile
account = {PBX}
targets = {target}
hold = moh/a, moh/b
template = Call from $caller_name$ <$caller$> to $number$ #${{n}}. Reply 1 desk, h hang up
confirm = #${{n}}: $outcome$
reply = 1, desk -> continue desk
reply = h -> hangup
key = 0 -> continue operator
timeout = 30
{extra}
"
        )
    };
    let mut conf = format!(
        "[{PBX}]
type = client
username = {pbx_jid}
secret = {PBX_PASSWORD}
serverhost = 127.0.0.1
port = {port}
usetls = yes
ca_file = {ca}
timeout = 5

[keys]
type = profile
hold = moh/a, moh/b
key = 0 -> continue operator
timeout = 30

",
        pbx_jid = server.jid(PBX),
        port = server.port(),
        ca = server.ca_pem().display(),
    );
    let alice = server.jid(AGENT);
    conf.push_str(&pop("pop", &alice, ""));
    conf.push_str(&pop("popany", &alice, "presence = any"));
    for k in 0..plan.agents {
        conf.push_str(&pop(&format!("s{k}"), &server.jid(&scale_agent(k)), ""));
    }
    popivr_testkit::testbed::write_private(&path, conf.as_bytes()).expect("write popivr.conf");
    path
}

/// The peer's settings (`peer-<presence>.ini` beside popivr.conf).
fn write_peer_config(server: &dyn Server, conf: &Path, presence: &str) -> PathBuf {
    let path = conf.with_file_name(format!("peer-{presence}.ini"));
    let text = format!(
        "[peer]
jid = {jid}
password = {PBX_PASSWORD}
host = 127.0.0.1
port = {port}
ca_file = {ca}
target = {target}
presence = {presence}
presence_wait = 1.5
timeout = 30
",
        jid = server.jid(PBX),
        port = server.port(),
        ca = server.ca_pem().display(),
        target = server.jid(AGENT),
    );
    popivr_testkit::testbed::write_private(&path, text.as_bytes())
        .expect("write the peer's config");
    path
}

fn peer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peer")
}

fn peer_program(venv: &Path, config: &Path) -> Program {
    Program {
        path: venv.join("bin/python"),
        args: vec![peer_dir().join("slixmpp_pop.py").display().to_string()],
        env: vec![("POPIVR_PEER_CONFIG".into(), config.to_path_buf())],
    }
}

/// A venv with the peer's packages (benches/peer/requirements.txt), made
/// once and kept while the requirements stay the same.
fn peer_venv() -> Result<PathBuf, String> {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-venv");
    let wanted = std::fs::read_to_string(peer_dir().join("requirements.txt"))
        .map_err(|e| format!("requirements.txt: {e}"))?;
    let stamp = venv.join("requirements.installed");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(venv);
    }
    println!(
        "making the comparison peer's venv in {} (PyPI)…",
        venv.display()
    );
    let run = |cmd: &mut Command| -> Result<(), String> {
        let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
        status
            .success()
            .then_some(())
            .ok_or_else(|| format!("{cmd:?}: {status}"))
    };
    let _ = std::fs::remove_dir_all(&venv);
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "-r"])
        .arg(peer_dir().join("requirements.txt")))?;
    std::fs::write(&stamp, wanted).map_err(|e| e.to_string())?;
    Ok(venv)
}

fn plot(venv: &Path, csv: &Path, png: &Path) {
    let status = Command::new(venv.join("bin/python"))
        .arg(peer_dir().join("plot.py"))
        .arg(csv)
        .arg(png)
        .status();
    match status {
        Ok(s) if s.success() => println!("plot: {}", png.display()),
        other => eprintln!("plot failed: {other:?}"),
    }
}
