//! A whole per-call run (the real binary, the Asterisk simulator, real
//! agents) against prosody **and** a stock ejabberd: what differs between
//! the servers an admin may run.
//!
//! `cargo test --test servers -- --nocapture` prints the figures.

mod support;

use std::time::{Duration, Instant};

use popivr_testkit::sim::replay::{Outcome, Runner};
use popivr_testkit::sim::script::Script;
use popivr_testkit::testbed::{Ejabberd, Server};
use support::{Prosody, TestAgent, body};

const PBX_PW: &str = "pbx-Secret-0a9d";
const ALICE_PW: &str = "alice-Secret-3b71";
const BOB_PW: &str = "bob-Secret-c4e2";

const BIN: &str = env!("CARGO_BIN_EXE_popivr");

fn prosody() -> Prosody {
    Prosody::builder()
        .user("pbx", PBX_PW)
        .user("alice", ALICE_PW)
        .user("bob", BOB_PW)
        .start()
}

fn ejabberd() -> Ejabberd {
    Ejabberd::builder()
        .user("pbx", PBX_PW)
        .user("alice", ALICE_PW)
        .user("bob", BOB_PW)
        .start()
}

/// A call whose profile pops `targets` (available ones only, the
/// default), waits `timeout` seconds and ends with the default action.
fn call(server: &impl Server, targets: &[&str], timeout: u32) -> Script {
    let targets: Vec<String> = targets.iter().map(|t| server.jid(t)).collect();
    let config = format!(
        "{}[sales]\ntype = profile\naccount = pbx\ntargets = {}\nhold = moh/a\n\
         template = call from $caller$\nreply = 1 -> continue desk\n\
         timeout = {timeout}\ndefault = continue timeout\n",
        support::server::account_section(server, "pbx", PBX_PW),
        targets.join(", ")
    );
    let config: String = config.lines().map(|l| format!("  {l}\n")).collect();
    let text = format!(
        "config:\n{config}end\ncall: popivr(sales)\nvar: POPIVR_CALLER_NUM = 2001\n\
         sound: moh/a 1s\nignore: G,*\nignore: A,moh/a\nexpect: S,moh/a\n\
         expect-within: {}s\nexpect: V,POPIVR_ACTION=*\nexpect: E,*\nexits-within: 3s\n",
        timeout + 5
    );
    Script::parse("servers", &text).unwrap_or_else(|e| panic!("{e}"))
}

/// Run one call while `alice` waits for its pop: how long from the start
/// of the popivr process until the pop reached her, and the outcome.
async fn time_to_pop(script: &Script, alice: &mut TestAgent) -> (Duration, Outcome) {
    let t0 = Instant::now();
    let runner = Runner::new(BIN);
    let (outcome, arrived) = tokio::join!(runner.run(script), async {
        alice
            .expect_message(|m| body(m).is_some_and(|b| b.starts_with("call from 2001")))
            .await;
        t0.elapsed()
    });
    (arrived, outcome.unwrap_or_else(|f| panic!("{f}")))
}

/// alice online, bob subscribed but offline: the pop to alice must not
/// wait for news of bob. prosody answers the presence probe for an
/// offline contact at once; ejabberd never does, so before the fix every
/// pop on ejabberd waited the whole `presence_wait` (1.5 s).
async fn an_offline_target_does_not_delay_the_pop(server: &impl Server) -> Duration {
    let mut alice = TestAgent::login(server, "alice", ALICE_PW).await;
    alice.subscribe_popivr(server, PBX_PW).await;
    let mut bob = TestAgent::login(server, "bob", BOB_PW).await;
    bob.subscribe_popivr(server, PBX_PW).await;
    bob.close().await;

    let script = call(server, &["alice", "bob"], 1);
    let mut times = Vec::new();
    for _ in 0..5 {
        let (took, _) = time_to_pop(&script, &mut alice).await;
        times.push(took);
    }
    times.sort();
    let median = times[times.len() / 2];
    println!(
        "{}: start -> pop at the online agent, one target offline: median {:.1} ms of {:?}",
        server.name(),
        median.as_secs_f64() * 1000.0,
        times
    );
    assert!(
        median < Duration::from_millis(1000),
        "{}: the pop waited for the offline target ({median:?})",
        server.name()
    );
    alice.close().await;
    median
}

#[tokio::test]
async fn an_offline_target_does_not_delay_the_pop_on_prosody() {
    an_offline_target_does_not_delay_the_pop(&prosody()).await;
}

#[tokio::test]
async fn an_offline_target_does_not_delay_the_pop_on_ejabberd() {
    an_offline_target_does_not_delay_the_pop(&ejabberd()).await;
}
