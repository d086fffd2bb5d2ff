//! Runs every replay script under protocol-tests/ against the popivr
//! binary, all at once, and reports each. `POPIVR_REPLAY=text` runs only
//! the files whose name contains `text`.
//!
//! Also checks the runner itself against a small stand-in child.

use std::path::{Path, PathBuf};
use std::time::Duration;

use popivr::sim::replay::{Failure, Runner};
use popivr::sim::script::Script;

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

    let program = PathBuf::from(env!("CARGO_BIN_EXE_popivr"));
    let runs: Vec<_> = files
        .iter()
        .map(|file| {
            let (file, runner) = (file.clone(), Runner::new(&program));
            tokio::spawn(async move { runner.run_file(&file).await })
        })
        .collect();

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
}

/// A stand-in for popivr: hold audio from its first argument, key 1 →
/// desk, F → re-queue.
fn stand_in() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("popivr-replay-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("stand-in");
    let body = r#"#!/usr/bin/env python3
import sys
def send(line):
    sys.stdout.write(line + "\n"); sys.stdout.flush()
hold = sys.argv[1]
send("S," + hold)
send("A," + hold)
send("G,CALLERID(name)")
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
var: CALLERID(name) = Doe, John
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
    assert!(f.message.contains("G,CALLERID(name)"), "{f}");
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
