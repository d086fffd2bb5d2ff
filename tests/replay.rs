//! Runs every replay script under protocol-tests/ against the popivr
//! binary, all at once, and reports each. `POPIVR_REPLAY=text` runs only
//! the files whose name contains `text`.
//!
//! Also checks the runner itself against a small stand-in child.

#[path = "support/replay_agents.rs"]
mod replay_agents;
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use popivr_testkit::sim::replay::{Failure, Outcome, Runner};
use popivr_testkit::sim::script::Script;
use replay_agents::{AgentThread, Plan, XmppWorld};
use support::TestAgent;
use xmpp_parsers::message::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_tests() {
    // cargo runs tests from the package root, so names stay short.
    let dir = Path::new("protocol-tests");
    let filter = std::env::var("POPIVR_REPLAY").unwrap_or_default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("protocol-tests/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "eivr"))
        .filter(|p| p.to_string_lossy().contains(&filter))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no protocol-tests/*.eivr matches {filter:?}"
    );

    // What each script needs from XMPP; one prosody serves them all.
    let jobs: Vec<Job> = files.iter().map(|f| Job::read(f)).collect();
    let (xmpp, plain): (Vec<_>, Vec<_>) = jobs
        .into_iter()
        .enumerate()
        .partition(|(_, j): &(usize, Job)| j.uses_xmpp());
    let program = PathBuf::from(env!("CARGO_BIN_EXE_popivr"));
    let spawn = |job: Job, world: Option<Arc<XmppWorld>>| {
        let runner = Runner::new(&program);
        tokio::spawn(async move { job.run(runner, world.as_deref()).await })
    };
    // The others run while the server starts (this blocks only the test's
    // own thread, which prosody's life is tied to).
    let mut runs: Vec<_> = plain
        .into_iter()
        .map(|(i, job)| (i, spawn(job, None)))
        .collect();
    let world = match xmpp.is_empty() {
        true => None,
        false => {
            let plans = xmpp
                .iter()
                .filter_map(|(_, j)| j.plan.as_ref().ok()?.as_ref());
            let world = Arc::new(XmppWorld::start(plans));
            println!(
                "replay: prosody with the accounts of {} scripts up in {:.1}s",
                xmpp.len(),
                world.startup_time().as_secs_f64()
            );
            Some(world)
        }
    };
    runs.extend(
        xmpp.into_iter()
            .map(|(i, job)| (i, spawn(job, world.clone()))),
    );
    runs.sort_by_key(|(i, _)| *i);
    let runs = runs.into_iter().map(|(_, run)| run);

    let mut failures = Vec::new();
    for (file, run) in files.iter().zip(runs) {
        match run.await.expect("replay task panicked") {
            Ok(outcome) => println!(
                "replay {} ... ok ({:.1}s)",
                file.display(),
                outcome.elapsed.as_secs_f64()
            ),
            Err(failure) => {
                println!("replay {} ... FAILED", file.display());
                failures.push(failure.to_string());
            }
        }
    }
    println!(
        "replays: {} passed, {} failed",
        files.len() - failures.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} replays failed:\n\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    drop(world);
}

/// One script file and its XMPP plan.
struct Job {
    name: String,
    text: Result<String, Failure>,
    plan: Result<Option<Plan>, Failure>,
}

impl Job {
    fn read(file: &Path) -> Job {
        let name = file.display().to_string();
        let fail = |line, message| Failure {
            name: name.clone(),
            line,
            message,
            transcript: None,
        };
        let text = std::fs::read_to_string(file).map_err(|e| fail(0, e.to_string()));
        // Scripts of one run share a server: the file's stem keeps their
        // accounts apart.
        let prefix = file.file_stem().unwrap().to_string_lossy().to_lowercase();
        let plan = match &text {
            Ok(t) => Plan::for_script(&name, t, &prefix).map_err(|e| fail(e.line, e.message)),
            Err(_) => Ok(None),
        };
        Job { name, text, plan }
    }

    /// Needs the XMPP server (a plan that could not be made fails on its
    /// own, without one).
    fn uses_xmpp(&self) -> bool {
        matches!(self.plan, Ok(Some(_)))
    }

    async fn run(self, mut runner: Runner, world: Option<&XmppWorld>) -> Result<Outcome, Failure> {
        let mut text = self.text?;
        if let Some(plan) = self.plan? {
            let world = world.expect("a server for every plan");
            text = plan.fill(world, &text);
            for ext in plan.extensions(world) {
                runner = runner.with_extension(ext);
            }
        }
        let script = Script::parse(&self.name, &text).map_err(|e| Failure {
            name: e.name,
            line: e.line,
            message: e.message,
            transcript: None,
        })?;
        runner.run(&script).await
    }
}

/// A stand-in for popivr: hold audio from its first argument, key 1 →
/// desk, F → re-queue.
fn stand_in() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("popivr-replay-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("stand-in");
    let body = r#"#!/usr/bin/env python3
import array, fcntl, sys, termios, time
def send(line):
    # One line per read, as Asterisk handles them: write only once it has
    # read everything before (FIONREAD on our end of the pipe).
    pending = array.array("i", [0])
    while fcntl.ioctl(1, termios.FIONREAD, pending) == 0 and pending[0] > 0:
        time.sleep(0.0002)
    sys.stdout.write(line + "\n"); sys.stdout.flush()
hold = sys.argv[1]
send("S," + hold)
send("A," + hold)
send("G,CALLER_NAME")
for line in sys.stdin:
    tag, _, data = line.rstrip("\n").split(",", 2) + [""] * (2 - line.count(","))
    if tag == "F":
        send("A," + data)
    elif tag == "1":
        sys.stderr.write("key 1: desk\n"); sys.stderr.flush()
        send("V,POPIVR_ACTION=desk,POPIVR_REPLY=1")
        send("E,desk")
"#;
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

async fn run_inline(text: &str) -> Result<(), Failure> {
    let script = Script::parse(
        "inline.eivr",
        &text.replace("STAND_IN", &stand_in().display().to_string()),
    )
    .expect("the script parses");
    Runner::new("/nonexistent").run(&script).await.map(drop)
}

const GOOD: &str = r#"
call: STAND_IN(moh/a)
var: CALLER_NAME = Doe, John
sound: moh/a 300ms
ignore: G,*
expect: S,moh/a
expect: A,moh/a
no-command: 200ms
expect: A,moh/a          # after F,moh/a at 0.3 s
sent: F,<ts>,moh/a
key: 1
expect: V,POPIVR_ACTION=desk,*
expect: E,*
var-is: POPIVR_ACTION = desk
var-unset: POPIVR_AGENT
no-function-writes
stderr-has: key 1*
stderr-lacks: *secret*
exits-within: 2s
"#;

#[tokio::test]
async fn a_script_that_matches_passes() {
    if let Err(f) = run_inline(GOOD).await {
        panic!("{f}");
    }
}

#[tokio::test]
async fn a_wrong_expectation_names_its_line_and_shows_the_transcript() {
    let bad = GOOD.replace("expect: S,moh/a", "expect: S,moh/b");
    let f = run_inline(&bad).await.unwrap_err();
    assert_eq!(f.line, 6, "{f}");
    assert!(f.message.contains("got `S,moh/a`"), "{f}");
    let text = f.to_string();
    assert!(text.starts_with("inline.eivr:6: "), "{text}");
    assert!(
        text.contains("<-  S,moh/a") && !text.contains("err key"),
        "{text}"
    );
}

#[tokio::test]
async fn an_unignored_command_in_between_fails() {
    let bad = GOOD.replace("ignore: G,*\n", "");
    let f = run_inline(&bad).await.unwrap_err();
    assert!(f.message.contains("G,CALLER_NAME"), "{f}");
}

#[tokio::test]
async fn a_command_during_no_command_fails() {
    let bad = GOOD.replace("no-command: 200ms", "no-command: 1s");
    let f = run_inline(&bad).await.unwrap_err();
    assert_eq!(f.line, 8, "{f}");
    assert!(f.message.contains("unexpected command `A,moh/a`"), "{f}");
}

#[tokio::test]
async fn a_call_left_up_fails_at_the_end() {
    let f = run_inline("call: STAND_IN(moh/a)\nsound: moh/a 5s\nexpect: S,moh/a\n")
        .await
        .unwrap_err();
    assert!(f.message.contains("still up"), "{f}");
}

#[tokio::test]
async fn a_wrong_variable_fails() {
    let bad = GOOD.replace("var-is: POPIVR_ACTION = desk", "var-is: POPIVR_ACTION = vm");
    let f = run_inline(&bad).await.unwrap_err();
    assert!(f.message.contains("POPIVR_ACTION is Some(\"desk\")"), "{f}");
}

#[tokio::test]
async fn xmpp_agent_steps_need_an_extension() {
    let script = "call: STAND_IN(moh/a)\nagent alice says: 1\n";
    let f = run_inline(script).await.unwrap_err();
    assert_eq!(f.line, 2);
    assert!(f.message.contains("XMPP"), "{f}");
}

#[test]
fn every_protocol_test_parses() {
    for entry in std::fs::read_dir("protocol-tests").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "eivr") {
            Script::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
            let text = std::fs::read_to_string(&path).unwrap();
            let name = path.display().to_string();
            if let Err(e) = Plan::for_script(&name, &text, "x") {
                panic!("{name}:{}: {}", e.line, e.message);
            }
        }
    }
}

#[tokio::test]
async fn timing_steps_wait() {
    let script =
        "call: STAND_IN(moh/a)\nsound: moh/a 5s\nignore: *\nat: 300ms\nwait: 200ms\nclose\n";
    let started = std::time::Instant::now();
    run_inline(script).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(500));
}

// The XMPP steps themselves, against a stand-in child and a test client
// that logs in with popivr's account and plays its part.

/// A script for the stand-in: the call ends with `close`.
const AGENTS: &str = r#"
call: STAND_IN(moh/a)
sound: moh/a 5s
ignore: *
expect-within: 10s
agent alice receives: Call from 555*
agent alice says: 1
agent alice says-delayed: 2
agent bob receives-nothing: 300ms
close
exits-within: 10s            # a Python start-up on a loaded machine
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_steps_talk_to_popivrs_account() {
    let variants = [
        ("steps-ok", AGENTS.to_string()),
        (
            "steps-glob",
            AGENTS.replace("receives: Call from 555*", "receives: Call from 666*"),
        ),
        (
            "steps-left",
            AGENTS.replace("agent alice receives: Call from 555*\n", ""),
        ),
    ];
    let plans: Vec<(String, Plan)> = variants
        .iter()
        .map(|(prefix, text)| {
            let text = text.replace("STAND_IN", &stand_in().display().to_string());
            let plan = Plan::for_script(prefix, &text, prefix)
                .unwrap_or_else(|e| panic!("{prefix}:{}: {}", e.line, e.message))
                .expect("the script uses XMPP");
            (text, plan)
        })
        .collect();
    let world = Arc::new(XmppWorld::start(plans.iter().map(|(_, p)| p)));

    let runs: Vec<_> = plans
        .into_iter()
        .map(|(text, plan)| {
            let world = world.clone();
            tokio::spawn(async move {
                // popivr's part: a test client on its account pops alice
                // (stored if she is not online yet) and keeps what comes.
                let (user, password) = plan.popivr_login();
                let (server, alice) = (world.server().clone(), plan.fill(&world, "{{JID:alice}}"));
                let thread = AgentThread::next();
                let popivr = thread
                    .run("popivr's stand-in", async move {
                        let mut popivr = TestAgent::login(&server, &user, &password).await;
                        popivr.send_chat(&alice, "Call from 5551234").await;
                        popivr
                    })
                    .await
                    .unwrap();
                let mut runner = Runner::new("/nonexistent");
                for ext in plan.extensions(&world) {
                    runner = runner.with_extension(ext);
                }
                let script = Script::parse("inline.eivr", &plan.fill(&world, &text)).unwrap();
                let result = runner.run(&script).await.map(drop);
                (result, (popivr, thread), plan.fill(&world, "{{JID:alice}}"))
            })
        })
        .collect();
    let mut results = Vec::new();
    for run in runs {
        results.push(run.await.expect("no panic"));
    }

    let (ok, (mut popivr, thread), alice) = results.remove(0);
    if let Err(f) = ok {
        panic!("{f}");
    }
    // What alice said reached popivr's bare JID in order, the delayed one
    // with its XEP-0203 mark.
    let (first, second) = thread
        .run("popivr's stand-in", async move {
            let from_alice = |m: &Message| {
                m.from
                    .as_ref()
                    .is_some_and(|j| j.to_bare().to_string() == alice)
            };
            let first = popivr.expect_message(from_alice).await;
            let second = popivr.expect_message(from_alice).await;
            (first, second)
        })
        .await
        .unwrap();
    let delayed = |m: &Message| m.payloads.iter().any(|p| p.is("delay", "urn:xmpp:delay"));
    assert_eq!((support::body(&first), delayed(&first)), (Some("1"), false));
    assert_eq!(
        (support::body(&second), delayed(&second)),
        (Some("2"), true)
    );

    let (glob, _, _) = results.remove(0);
    let f = glob.unwrap_err();
    assert_eq!(f.line, 6, "{f}");
    assert!(f.message.contains("got `Call from 5551234`"), "{f}");
    assert!(f.to_string().contains("agent alice got from"), "{f}");
    // It comes with what the server saw of the script's accounts.
    assert!(
        f.message.contains("Authenticated as steps-glob.alice@")
            && !f.message.contains("Authenticated as steps-ok"),
        "{f}"
    );

    let (left, _, _) = results.remove(0);
    let f = left.unwrap_err();
    assert!(
        f.message.contains("no step expected: `Call from 5551234`"),
        "{f}"
    );
}

#[test]
fn xmpp_plans_check_their_lines() {
    let plan = |text: &str| Plan::for_script("p.eivr", text, "p");
    let err = |text: &str| plan(text).unwrap_err();
    let base = "call: popivr(a)\n";
    assert!(plan(&format!("{base}key: 1\n")).unwrap().is_none());
    assert!(
        plan(&format!("{base}agent alice says: 1\n"))
            .unwrap()
            .is_some()
    );

    let e = err(&format!("{base}key: 1\nagent alice shouts: 1\n"));
    assert_eq!(e.line, 3);
    assert!(e.message.contains("shouts"), "{}", e.message);
    let e = err(&format!("{base}agent Alice says: 1\n"));
    assert!(e.message.contains("Alice"), "{}", e.message);
    let e = err(&format!("{base}agent alice receives-nothing: soon\n"));
    assert_eq!(e.line, 2);
    let e = err(&format!("{base}agent alice says-as-type: loud 1\n"));
    assert!(e.message.contains("loud"), "{}", e.message);
    let e = err(&format!("{base}key: 1\noffline alice says: 1\n"));
    assert!(
        e.message.contains("before every other step"),
        "{}",
        e.message
    );
    let e = err(&format!("{base}var-is: X = {{{{PORTS}}}}\n"));
    assert!(e.message.contains("PORTS"), "{}", e.message);
    // Secrets stay in the config block (steps are shown in transcripts).
    let e = err(&format!("{base}stderr-lacks: *{{{{POPIVR_SECRET}}}}*\n"));
    assert_eq!(e.line, 2);
    let config = "config:\n  secret = {{POPIVR_SECRET}}\nend\n";
    assert!(plan(&format!("{config}{base}")).unwrap().is_some());
}
