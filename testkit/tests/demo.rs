//! The demo (`.ci/demo`, `popivr-demo`) as a new user runs it: the built
//! popivr binary beside it, its own throw-away prosody, one call. The transcript must show the whole story
//! in order, and nothing may be left behind, also after Ctrl-C.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

/// The demo program, run as `.ci/demo` runs it: it finds the popivr
/// binary beside itself (`cargo test --workspace` builds both into one
/// directory).
fn popivr() -> Command {
    let demo = Path::new(env!("CARGO_BIN_EXE_popivr-demo"));
    assert!(
        demo.with_file_name("popivr").is_file(),
        "no popivr binary beside {}: run the tests with --workspace (or cargo build -p popivr)",
        demo.display()
    );
    let mut cmd = Command::new(demo);
    cmd.env_remove("POPIVR_BIN");
    // The demo must not depend on the caller's configuration.
    cmd.env("POPIVR_CONFIG", "/nonexistent/popivr.conf");
    cmd
}

/// The position of the first line at or after `from` that holds all of
/// `parts`.
fn find(lines: &[String], from: usize, parts: &[&str]) -> usize {
    lines
        .iter()
        .enumerate()
        .skip(from)
        .find(|(_, l)| parts.iter().all(|p| l.contains(p)))
        .map(|(i, _)| i)
        .unwrap_or_else(|| {
            panic!(
                "no line with {parts:?} after line {from}:\n{}",
                lines.join("\n")
            )
        })
}

/// The prosody pid and the temp dirs the demo announced.
fn leftovers(lines: &[String]) -> (i32, Vec<String>) {
    let server = &lines[find(lines, 0, &["XMPP server", "pid "])];
    let pid = server
        .split("pid ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {server:?}"));
    let dirs = &lines[find(lines, 0, &["temp dirs"])];
    let dirs = dirs
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(str::to_string)
        .collect();
    (pid, dirs)
}

fn assert_nothing_left(lines: &[String]) {
    let (pid, dirs) = leftovers(lines);
    assert!(pid > 0);
    // The demo reaps prosody before it exits, so the pid is free again.
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "prosody (pid {pid}) still runs"
    );
    assert_eq!(dirs.len(), 2, "two temp dirs announced: {dirs:?}");
    for dir in dirs {
        assert!(!Path::new(&dir).exists(), "{dir} was not removed");
    }
}

#[test]
fn the_demo_shows_a_pop_a_reply_and_the_action() {
    let out = popivr()
        .args(["--think", "0.3"])
        .output()
        .expect("run popivr demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<String> = stdout.lines().map(str::to_string).collect();
    assert!(
        out.status.success(),
        "popivr demo failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let table = find(&lines, 0, &["time", "who", "what"]);
    // The caller hears hold audio before anything else happens.
    let audio = find(
        &lines,
        table,
        &["popivr -> asterisk", "S,custom/hold-music"],
    );
    let pop = find(
        &lines,
        audio,
        &[
            "agent <- xmpp",
            "pop from pbx@popivr.test",
            "Call from Jane Doe <+4930555123> to 200 (Support)",
        ],
    );
    let reply = find(
        &lines,
        pop,
        &["agent -> xmpp", "reply to pbx@popivr.test: 1"],
    );
    let vars = find(
        &lines,
        reply,
        &["popivr -> asterisk", "V,", "POPIVR_ACTION=desk"],
    );
    let leave = find(&lines, vars, &["popivr -> asterisk", "E,"]);
    find(&lines, vars, &["agent <- xmpp", "sent to desk"]);
    find(
        &lines,
        leave,
        &[
            "channel variables:",
            "POPIVR_ACTION=desk",
            "POPIVR_AGENT=alice@popivr.test",
        ],
    );
    // Secrets stay in the private config file.
    assert!(!stdout.contains("secret ="), "{stdout}");
    assert_nothing_left(&lines);
}

#[test]
fn ctrl_c_leaves_nothing_running() {
    let mut child = popivr()
        // A long think keeps the call waiting until the signal.
        .args(["--think", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run popivr demo");
    let mut lines = Vec::new();
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    // Wait until the call runs (the pop has reached the agent), then
    // press Ctrl-C.
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).expect("read stdout") == 0 {
            panic!("demo ended early:\n{}", lines.join("\n"));
        }
        lines.push(line.trim_end().to_string());
        if line.contains("pop from pbx@popivr.test") {
            break;
        }
    }
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    for line in stdout.lines() {
        lines.push(line.expect("read stdout"));
    }
    let status = child.wait().expect("wait for the demo");
    assert_eq!(status.code(), Some(130), "{}", lines.join("\n"));
    find(&lines, 0, &["interrupted", "nothing left running"]);
    assert_nothing_left(&lines);
}
