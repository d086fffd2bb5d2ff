//! What the real-Asterisk suites share: the shipped dialplan snippets,
//! `popivr serve` as a child process, and what a test reads back from a
//! test Asterisk (`popivr_testkit::testbed::asterisk`) about a call.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use popivr_testkit::testbed::Event;
use popivr_testkit::testbed::asterisk::{Asterisk, Call};

use super::WAIT;

pub const BIN: &str = env!("CARGO_BIN_EXE_popivr");

pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `popivr --config CONFIG check EXTRA…`: its output and stdout + stderr
/// as text, which must hold none of `secrets`.
pub fn popivr_check(
    config: &Path,
    extra: &[&str],
    secrets: &[&str],
) -> (std::process::Output, String) {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .arg("check")
        .args(extra)
        .output()
        .expect("run popivr check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for secret in secrets {
        assert!(!text.contains(secret), "a secret was printed:\n{text}");
    }
    (out, text)
}

/// A shipped dialplan snippet (`dialplan/NAME`), as an admin copies it.
pub fn shipped(name: &str) -> String {
    std::fs::read_to_string(repo("dialplan").join(name)).expect("shipped snippet")
}

pub fn is(e: &Event, key: &str, value: &str) -> bool {
    e.get(key).is_some_and(|v| v == value)
}

/// The value the dialplan gave variable `name` on `call` (the next such
/// `VarSet` not yet taken by an earlier wait).
pub async fn var_set(pbx: &Asterisk, call: &Call, name: &str, within: Duration) -> String {
    let set = pbx
        .wait_event(
            |e| call.owns(e) && is(e, "Event", "VarSet") && is(e, "Variable", name),
            within,
        )
        .await;
    set.get("Value").cloned().unwrap_or_default()
}

/// The value the dialplan gave POPIVR_ACTION on `call`.
pub async fn action(pbx: &Asterisk, call: &Call, within: Duration) -> String {
    var_set(pbx, call, "POPIVR_ACTION", within).await
}

/// The next application the dialplan runs on `call` that is one of
/// `apps`, with its data.
pub async fn branch(pbx: &Asterisk, call: &Call, apps: &[&str]) -> (String, String) {
    let e = pbx
        .wait_event(
            |e| {
                call.owns(e)
                    && is(e, "Event", "Newexten")
                    && e.get("Application")
                        .is_some_and(|a| apps.contains(&a.as_str()))
            },
            WAIT,
        )
        .await;
    (e["Application"].clone(), e["AppData"].clone())
}

/// Every variable set on `call` so far, by anyone, in order.
pub fn variables_set(pbx: &Asterisk, call: &Call) -> Vec<String> {
    pbx.events()
        .iter()
        .filter(|e| call.owns(e) && is(e, "Event", "VarSet"))
        .filter_map(|e| e.get("Variable").cloned())
        .collect()
}

/// Asserts that no channel is inside ExternalIVR (waits a little for the
/// last to leave).
pub async fn none_left_in_externalivr(pbx: &Asterisk) {
    let deadline = Instant::now() + WAIT;
    loop {
        let n = pbx.channels_in_app("ExternalIVR").await;
        if n == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} channels left in ExternalIVR"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts that no popivr process Asterisk started is still running
/// (waits a little for the last to exit). Asterisk's children stay in its
/// process group, whose id is Asterisk's pid.
pub async fn no_popivr_left(pbx: &Asterisk) {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = popivr_processes(pbx);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "popivr processes left running: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The popivr processes Asterisk started that still run.
pub fn popivr_processes(pbx: &Asterisk) -> Vec<u32> {
    let group = pbx.pid().expect("Asterisk runs");
    let exe = std::fs::canonicalize(BIN).expect("popivr's binary");
    processes_in_group(group, &exe)
}

/// Pids in process group `group` running `exe`.
fn processes_in_group(group: u32, exe: &Path) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // /proc/PID/stat: "pid (comm) state ppid pgrp ..."; comm may
            // hold blanks, so count from its closing parenthesis.
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let pgrp = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(2))
                .and_then(|g| g.parse::<u32>().ok());
            pgrp == Some(group)
                && std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == exe)
        })
        .collect()
}

/// `popivr serve` on 127.0.0.1:`port`, killed on drop.
pub struct Daemon(Child);

impl Daemon {
    pub fn start(conf: &Path, port: u16) -> Daemon {
        Self::spawn(conf, port, None)
    }

    /// Like [`start`](Self::start), at `-v` (pops, replies and actions
    /// too), its stderr in `log` (for counting warnings).
    pub fn start_logged(conf: &Path, port: u16, log: &Path) -> Daemon {
        Self::spawn(conf, port, Some(log))
    }

    fn spawn(conf: &Path, port: u16, log: Option<&Path>) -> Daemon {
        let mut command = Command::new(BIN);
        command.args(["serve", "--listen", &format!("127.0.0.1:{port}")]);
        let stderr = match log {
            Some(path) => {
                command.arg("-v");
                Stdio::from(std::fs::File::create(path).expect("daemon log"))
            }
            None => Stdio::null(),
        };
        let child = command
            .env("POPIVR_CONFIG", conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("popivr serve starts");
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "popivr serve does not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon(child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One `#[tokio::test]` for each line `name: Server => scenario(args);`,
/// running `scenario::<Server>(args)`: the real-Asterisk suites run each
/// scenario on prosody and on a stock ejabberd (names ending
/// `_on_ejabberd`), and the test names stay plain to grep for.
macro_rules! tests_on {
    ($($name:ident: $server:ty => $scenario:ident($($arg:expr),*);)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            $scenario::<$server>($($arg),*).await;
        }
    )*};
}
pub(crate) use tests_on;

/// For a failing test's output: the last `n` lines of `log` (what
/// `name` said) on stderr.
pub fn print_tail(name: &str, log: &str, n: usize) {
    let tail: Vec<&str> = log.lines().rev().take(n).collect();
    eprintln!("--- {name} log, last lines ---");
    for line in tail.iter().rev() {
        eprintln!("{line}");
    }
}
