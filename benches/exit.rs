//! How fast a per-call popivr goes away when its call does.
//!
//!     cargo bench --bench exit               # 30 runs per way out
//!     EXIT_BENCH_N=100 cargo bench --bench exit
//!
//! Asterisk does not kill an ExternalIVR child: it closes the child's
//! stdin (and, for a hung-up channel, stops reading its stdout), and an
//! admin or systemd may send SIGTERM or SIGHUP. Each way out is measured
//! from the moment it happens (the signal sent, the pipe closed, the event
//! that makes popivr write into a closed pipe) to the moment `waitpid`
//! returns, while popivr waits for a 600 s call; the goal is 100 ms every
//! time. Two more runs do the same while the XMPP login hangs on a server
//! that accepted the connection and says nothing. popivr starts no
//! programs; each run checks that the waiting process has no child.
//! `tests/lifecycle.rs` asserts the same ways out with generous bounds.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const GOAL_MS: f64 = 100.0;

const KEYS: &str =
    "[wait]\ntype = profile\nhold = moh/a\nkey = 1 -> continue desk\ntimeout = 600\n";

#[derive(Clone, Copy)]
enum Way {
    StdinEof,
    Sigterm,
    Sighup,
    StdoutClosed,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::StdinEof => "stdin EOF",
            Way::Sigterm => "SIGTERM",
            Way::Sighup => "SIGHUP",
            Way::StdoutClosed => "stdout closed (next write gets EPIPE)",
        }
    }
}

fn start(conf: &std::path::Path) -> (Child, BufReader<ChildStdout>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_popivr"))
        .arg("wait")
        .env("POPIVR_CONFIG", conf)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start popivr");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first).expect("first command");
    assert!(first.starts_with("S,moh/a"), "{first:?}");
    (child, out)
}

/// Children of `pid` still alive (popivr should never have any).
fn children(pid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|ppid| ppid.parse::<u32>().ok())
                == Some(pid)
        })
        .count()
}

/// One call ended one way: the time from the trigger to `waitpid`.
fn once(conf: &std::path::Path, way: Way) -> Duration {
    let (mut child, out) = start(conf);
    // Let the call settle into its wait.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(children(child.id()), 0, "popivr started a child");
    let t0;
    match way {
        Way::StdinEof => {
            t0 = Instant::now();
            drop(child.stdin.take());
        }
        Way::Sigterm | Way::Sighup => {
            let sig = if matches!(way, Way::Sigterm) {
                libc::SIGTERM
            } else {
                libc::SIGHUP
            };
            t0 = Instant::now();
            let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
            assert_eq!(rc, 0);
        }
        Way::StdoutClosed => {
            drop(out);
            // The hold file "finished": popivr queues it again and meets
            // the closed pipe.
            let stdin = child.stdin.as_mut().expect("stdin");
            t0 = Instant::now();
            stdin.write_all(b"F,1700000000,moh/a\n").expect("event");
            stdin.flush().expect("flush");
        }
    }
    child.wait().expect("wait");
    t0.elapsed()
}

/// The same while the XMPP login hangs on a silent server.
fn once_hanging_login(way: Way) -> Duration {
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("popivr.conf");
    std::fs::write(
        &conf,
        format!(
            "[pbx]\ntype = client\nusername = popivr@localhost\nsecret = x\n\
             serverhost = 127.0.0.1\nport = {port}\ntimeout = 60\n\n\
             [wait]\ntype = profile\naccount = pbx\ntargets = alice@localhost\n\
             hold = moh/a\ntimeout = 600\n"
        ),
    )
    .expect("config");
    let (mut child, _out) = start(&conf);
    let (_conn, _) = silent.accept().expect("popivr connects");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(children(child.id()), 0, "popivr started a child");
    let t0 = Instant::now();
    match way {
        Way::StdinEof => drop(child.stdin.take()),
        _ => {
            let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            assert_eq!(rc, 0);
        }
    }
    child.wait().expect("wait");
    t0.elapsed()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(name: &str, mut samples: Vec<f64>) -> bool {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    let max = *samples.last().expect("samples");
    let met = max <= GOAL_MS;
    println!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} | every exit ≤ {GOAL_MS} ms: {} |",
        samples.len(),
        at(0.5),
        at(0.9),
        max,
        if met { "met" } else { "MISSED" }
    );
    met
}

fn main() {
    // Benchmarks are not tests: `cargo test --all-targets` runs this binary
    // without `--bench`, and then it does nothing.
    if !std::env::args().any(|a| a == "--bench") {
        println!("run with `cargo bench --bench exit`");
        return;
    }
    let n: usize = std::env::var("EXIT_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("popivr.conf");
    std::fs::write(&conf, KEYS).expect("config");
    // Broken pipes are the child's business, not the bench's.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };

    println!("popivr exit after its call ends ({n} runs each, release build)\n");
    println!("| way out | n | median ms | p90 ms | max ms | goal |");
    println!("|---|--:|--:|--:|--:|---|");
    let mut all_met = true;
    for way in [Way::StdinEof, Way::Sigterm, Way::Sighup, Way::StdoutClosed] {
        let samples = (0..n).map(|_| ms(once(&conf, way))).collect();
        all_met &= report(way.name(), samples);
    }
    for way in [Way::StdinEof, Way::Sigterm] {
        let samples = (0..n).map(|_| ms(once_hanging_login(way))).collect();
        let name = format!("{} while the XMPP login hangs", way.name());
        all_met &= report(&name, samples);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("\nload average after the run: {}", load.trim());
    if !all_met {
        println!("at least one exit took longer than {GOAL_MS} ms");
    }
}
