//! popivr never outlives its call: it exits on stdin EOF, on a broken
//! stdout (EPIPE), and on SIGTERM/SIGHUP, whatever it is waiting for.
//! Asterisk does not kill the child, so a popivr that lingers is left
//! behind for good.
//!
//! The bounds here are generous (the machines are shared); the 100 ms
//! target is measured by `cargo bench --bench exit`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const BOUND: Duration = Duration::from_secs(3);

/// A profile that waits a long time: nothing but the process's own exit
/// rules can end these calls in time.
const KEYS: &str =
    "[wait]\ntype = profile\nhold = moh/a\nkey = 1 -> continue desk\ntimeout = 600\n";

fn config(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn start(conf: &tempfile::NamedTempFile, profile: &str) -> (Child, BufReader<ChildStdout>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_popivr"))
        .arg(profile)
        .env("POPIVR_CONFIG", conf.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    // The call is under way once the hold audio has been asked for.
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.starts_with("S,moh/a"), "{first:?}");
    (child, out)
}

/// Wait for the child to exit; kill it and fail if it does not in time.
fn exits_within(child: &mut Child, bound: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return t0.elapsed();
        }
        if t0.elapsed() > bound {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("popivr still running {bound:?} after it should have exited");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0);
}

#[test]
fn exits_on_stdin_eof() {
    let conf = config(KEYS);
    let (mut child, _out) = start(&conf, "wait");
    drop(child.stdin.take());
    exits_within(&mut child, BOUND);
}

#[test]
fn exits_on_sigterm() {
    let conf = config(KEYS);
    let (mut child, _out) = start(&conf, "wait");
    signal(&child, libc::SIGTERM);
    exits_within(&mut child, BOUND);
}

#[test]
fn exits_on_sighup() {
    let conf = config(KEYS);
    let (mut child, _out) = start(&conf, "wait");
    signal(&child, libc::SIGHUP);
    exits_within(&mut child, BOUND);
}

#[test]
fn exits_when_asterisk_stops_reading_its_output() {
    let conf = config(KEYS);
    let (mut child, out) = start(&conf, "wait");
    drop(out);
    // The next command popivr writes (the hold file queued again) meets a
    // closed pipe.
    let stdin = child.stdin.as_mut().unwrap();
    stdin.write_all(b"F,1700000000,moh/a\n").unwrap();
    stdin.flush().unwrap();
    exits_within(&mut child, BOUND);
}

#[test]
fn exits_on_eof_while_the_xmpp_login_hangs() {
    // A server that accepts the connection and then says nothing: the
    // login would wait for its whole timeout.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let conf = config(&format!(
        "[pbx]\ntype = client\nusername = popivr@localhost\nsecret = x\n\
         serverhost = 127.0.0.1\nport = {port}\ntimeout = 60\n\n\
         [pop]\ntype = profile\naccount = pbx\ntargets = alice@localhost\n\
         hold = moh/a\ntimeout = 600\n"
    ));
    let (mut child, _out) = start(&conf, "pop");
    let (_conn, _) = silent.accept().unwrap();
    drop(child.stdin.take());
    exits_within(&mut child, BOUND);
}

#[test]
fn keeps_draining_stdin_while_asterisk_floods_it() {
    // Asterisk writes events from the channel's thread: if popivr stopped
    // reading, the pipe would fill and the caller's audio would freeze.
    // Far more than a pipe holds, while popivr is waiting for a reply.
    let conf = config(KEYS);
    let (mut child, mut out) = start(&conf, "wait");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let line = b"T,1700000000,moh/a\n";
        for _ in 0..(4 << 20) / line.len() {
            stdin.write_all(line).unwrap();
        }
        // Then a key that decides the call: it must still be heard.
        stdin.write_all(b"1,1700000000\n").unwrap();
        stdin
    });
    let t0 = Instant::now();
    let mut seen = String::new();
    while !seen.contains("E,") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no E after the flood: {seen}"
        );
        let mut chunk = [0u8; 4096];
        let n = out.read(&mut chunk).unwrap();
        assert!(n > 0, "popivr closed its output early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
    assert!(seen.contains("V,POPIVR_ACTION=desk"), "{seen}");
    drop(writer.join().unwrap());
    exits_within(&mut child, BOUND);
}
