//! The simulator against externalivr-protocol.md, with small children
//! written as shell or Python scripts.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use popivr_testkit::sim::{Dir, EndReason, ExitError, Next, Sim, SimConfig};

const WAIT: Duration = Duration::from_secs(5);

/// Write an executable child program and return its path.
fn child(body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("popivr-sim-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("child{}", N.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&path, body.trim_start()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A Python child: `send(line)` writes a command, `event()` reads one
/// event line (echoing it on stderr), `until(want)` reads events up to one
/// that is `want` without its timestamp (`F,a`; `D,*` for any `D,…`;
/// `""` for end of file).
fn py(body: &str) -> PathBuf {
    child(&format!(
        r#"#!/usr/bin/env python3
import array, fcntl, sys, termios, time
def send(line):
    # One line per read, as Asterisk handles them: write only once it has
    # read everything before (FIONREAD on our end of the pipe).
    pending = array.array("i", [0])
    while fcntl.ioctl(1, termios.FIONREAD, pending) == 0 and pending[0] > 0:
        time.sleep(0.0002)
    sys.stdout.write(line + "\n"); sys.stdout.flush()
def event():
    line = sys.stdin.readline()
    sys.stderr.write("got " + line); sys.stderr.flush()
    return line
def plain(line):
    parts = line.rstrip("\n").split(",", 2)
    return ",".join(parts[:1] + parts[2:])
def until(want):
    while True:
        line = event()
        if line == "":
            if want == "":
                return line
            sys.exit("end of file while waiting for " + want)
        got = plain(line)
        if got == want or (want.endswith("*") and got.startswith(want[:-1])):
            return line
{body}
"#
    ))
}

async fn next(sim: &mut Sim) -> String {
    match sim.next_command(WAIT).await {
        Next::Command(c) => c.line,
        other => panic!("no command: {other:?}\n{}", sim.transcript()),
    }
}

fn events(sim: &Sim) -> Vec<String> {
    sim.transcript()
        .lines(Dir::Event)
        .map(str::to_string)
        .collect()
}

/// Event lines with the timestamp cut out (`F,1700000000,a` → `F,a`).
fn events_no_ts(sim: &Sim) -> Vec<String> {
    events(sim)
        .iter()
        .map(|e| {
            let mut parts = e.splitn(3, ',');
            let tag = parts.next().unwrap();
            let ts = parts.next().unwrap_or_default();
            assert!(
                ts.len() == 10 && ts.bytes().all(|b| b.is_ascii_digit()),
                "bad timestamp in {e:?}"
            );
            match parts.next() {
                Some(data) => format!("{tag},{data}"),
                None => tag.to_string(),
            }
        })
        .collect()
}

async fn finish(sim: &mut Sim) {
    let end = sim.wait_end(WAIT).await;
    assert!(end.is_some(), "session did not end\n{}", sim.transcript());
    let exit = sim.wait_exit(Duration::from_secs(2)).await;
    assert!(exit.is_ok(), "{exit:?}\n{}", sim.transcript());
}

#[tokio::test]
async fn commands_are_read_and_answered_as_asterisk_does() {
    let long = format!("L,{}", "x".repeat(1021)); // exactly 1023 bytes
    let prog = py(&format!(
        r#"
send("S,f")
sys.stdout.write("{long}P,x\n"); sys.stdout.flush()
send("L," + "y" * 1498)
send("P")
send("  P,x \r")
send("G,a,b,CALLERID(name)")
send("V,a=1,FILE(x)=y,c")
send("A,nope")
send("X")
send("O,bogus")
send("E,bye")
until("E")
until("")  # end of file
"#
    ));
    let config = SimConfig::new(format!("{}(one,two words,x=1)", prog.display()))
        .var("a", "va")
        .var("CALLERID(name)", "Doe, John")
        .sound("f", Duration::from_secs(5));
    let mut sim = Sim::start(config).unwrap();
    let mut got = Vec::new();
    loop {
        match sim.next_command(WAIT).await {
            Next::Command(c) => got.push(c.line),
            Next::Ended => break,
            Next::TimedOut => panic!("timed out\n{}", sim.transcript()),
        }
    }
    assert_eq!(
        got,
        [
            "S,f",
            &long,
            "P,x", // the rest of the over-long line: a command of its own
            &format!("L,{}", "y".repeat(1021)),
            &"y".repeat(477), // read, dispatched on `y`: no such command
            "P,x",
            "G,a,b,CALLERID(name)",
            "V,a=1,FILE(x)=y,c",
            "A,nope",
            "O,bogus",
            "E,bye",
        ],
        "{}",
        sim.transcript()
    );
    let params = format!("P,{},one,two words,x=1", prog.display());
    assert_eq!(
        events_no_ts(&sim),
        [
            params.as_str(),
            params.as_str(),
            // G reads plain variables only: a function reads as empty.
            "G,a=va,b=,CALLERID(name)=",
            "Z,nope",
            "E"
        ]
        .map(String::from),
        "{}",
        sim.transcript()
    );
    assert_eq!(sim.var("a").as_deref(), Some("1"));
    assert_eq!(sim.var("c").as_deref(), Some(""));
    assert_eq!(
        sim.function_writes(),
        [("FILE(x)".to_string(), "y".to_string())]
    );
    assert_eq!(sim.end().unwrap().reason, EndReason::Exit);
    finish(&mut sim).await;
    // The child saw the E answer and then end of file.
    assert!(
        sim.stderr().iter().any(|l| l.starts_with("got E,")),
        "{}",
        sim.transcript()
    );
}

#[tokio::test]
async fn the_child_gets_its_arguments_without_a_shell_and_a_clean_environment() {
    let prog = py(r#"
import os
sys.stderr.write("argv=%r\n" % sys.argv[1:])
sys.stderr.write("env=%r\n" % sorted(os.environ))
send("E,x")
until("")
"#);
    let config = SimConfig::new(format!("{}($HOME,a;b,\"c,d\"),n", prog.display()))
        .env("POPIVR_CONFIG", "/x");
    let mut sim = Sim::start(config).unwrap();
    assert_eq!(next(&mut sim).await, "E,x");
    finish(&mut sim).await;
    let stderr = sim.stderr();
    assert!(
        stderr.contains(&"argv=['$HOME', 'a;b', 'c', 'd']".to_string()),
        "{stderr:?}"
    );
    // (the Python launcher may add variables of its own)
    let env = stderr.iter().find(|l| l.starts_with("env=")).unwrap();
    assert!(
        env.contains("'POPIVR_CONFIG'") && env.contains("'PATH'"),
        "{env}"
    );
    assert!(!env.contains("'HOME'") && !env.contains("'CARGO"), "{env}");
}

#[tokio::test]
async fn the_playlist_plays_in_real_time() {
    let prog = py(r#"
send("S,a")
send("A,b")
until("F,b")
send("A,b")       # appended while silence plays: starts at once
until("F,b")
send("S,a")
send("A,b")
import time; time.sleep(0.2)  # `a` starts on the generator's next frame
send("I,x")       # T for a, D for b
until("D,*")
send("E,x")
until("")
"#);
    let config = SimConfig::new(prog.display().to_string())
        .sound("a", Duration::from_millis(300))
        .sound("b", Duration::from_millis(200));
    let mut sim = Sim::start(config).unwrap();
    for want in ["S,a", "A,b", "A,b", "S,a", "A,b", "I,x", "E,x"] {
        assert_eq!(next(&mut sim).await, want);
    }
    finish(&mut sim).await;
    assert_eq!(
        events_no_ts(&sim),
        ["F,a", "F,b", "F,b", "T,a", "D,b", "E"],
        "{}",
        sim.transcript()
    );

    let t = sim.transcript();
    let time_of = |dir: Dir, text: &str, nth: usize| {
        let mut hits = t
            .entries
            .iter()
            .filter(|e| e.dir == dir && e.text.contains(text));
        hits.nth(nth).map(|e| e.at).unwrap()
    };
    // Files never end early; the upper bounds are only sanity checks.
    let s = time_of(Dir::Command, "S,a", 0);
    let (fa, fb) = (time_of(Dir::Event, "F,", 0), time_of(Dir::Event, "F,", 1));
    assert!(fa >= s + Duration::from_millis(300), "{t}");
    assert!(fb >= s + Duration::from_millis(500), "{t}");
    assert!(fb < s + Duration::from_secs(3), "{t}");
    let (append, fb2) = (
        time_of(Dir::Command, "A,b", 1),
        time_of(Dir::Event, "F,", 2),
    );
    assert!(fb2 >= append + Duration::from_millis(200), "{t}");
    assert!(fb2 < append + Duration::from_secs(2), "{t}");
}

#[tokio::test]
async fn option_n_fails_playback_until_answered_and_holds_keys() {
    let prog = py(r#"
send("S,a")
until("Z")
send("T,x")
send("S,a")
until("F,a")
send("E,x")
until("")
"#);
    let config =
        SimConfig::new(format!("{}(),n", prog.display())).sound("a", Duration::from_millis(50));
    let mut sim = Sim::start(config).unwrap();
    sim.key('5');
    for want in ["S,a", "T,x", "S,a", "E,x"] {
        assert_eq!(next(&mut sim).await, want);
    }
    finish(&mut sim).await;
    let ev = events_no_ts(&sim);
    assert_eq!(
        ev[0],
        "Z",
        "a bare Z: the channel is not up\n{}",
        sim.transcript()
    );
    assert!(
        ev.contains(&"5".to_string()) && ev.contains(&"F,a".to_string()),
        "{ev:?}"
    );
    assert_eq!(ev.last().unwrap(), "E");
}

#[tokio::test]
async fn a_caller_hangup_sends_h_and_closes_stdin() {
    let prog = py(r#"
send("L,ready")
until("")
sys.stderr.write("eof\n")
"#);
    let mut sim = Sim::start(SimConfig::new(prog.display().to_string())).unwrap();
    assert_eq!(next(&mut sim).await, "L,ready");
    sim.hangup();
    assert_eq!(sim.next_command(WAIT).await, Next::Ended);
    assert_eq!(sim.end().unwrap().reason, EndReason::CallerHangup);
    assert_eq!(events_no_ts(&sim), ["H"]);
    let exit = sim.wait_exit(Duration::from_secs(2)).await.unwrap();
    assert!(exit.status.success());
    assert!(exit.after_close < Duration::from_secs(2));
}

#[tokio::test]
async fn option_i_informs_and_waits_for_the_childs_h() {
    let prog = py(r#"
send("L,ready")
until("I,HANGUP")
send("A,a")
until("Z")
send("H,bye")
until("H")
until("")
"#);
    let config =
        SimConfig::new(format!("{}(),i", prog.display())).sound("a", Duration::from_secs(1));
    let mut sim = Sim::start(config).unwrap();
    assert_eq!(next(&mut sim).await, "L,ready");
    sim.hangup();
    assert_eq!(next(&mut sim).await, "A,a");
    assert_eq!(next(&mut sim).await, "H,bye");
    finish(&mut sim).await;
    assert_eq!(events_no_ts(&sim), ["I,HANGUP", "Z", "H"]);
    assert_eq!(sim.end().unwrap().reason, EndReason::Hangup);
}

#[tokio::test]
async fn option_d_runs_on_a_dead_channel_with_n_and_is_refused_without() {
    let prog = py(r#"
send("S,a")
until("Z")
send("G,x")
until("G,*")
send("E,done")
until("")
"#);
    // Plain `d`: the channel is not up and Asterisk will not answer a
    // dead one, so ExternalIVR fails before it starts anything.
    let mut refused = Sim::start(SimConfig::new(format!("{}(),d", prog.display()))).unwrap();
    let end = refused.wait_end(WAIT).await.unwrap();
    assert_eq!(end.reason, EndReason::Refused);
    assert_eq!(refused.next_command(WAIT).await, Next::Ended);
    let t = refused.transcript();
    assert!(t.lines(Dir::Note).any(|n| n.contains("'d'ead flag")), "{t}");

    let config = SimConfig::new(format!("{}(),nd", prog.display()))
        .sound("a", Duration::from_secs(1))
        .var("x", "1");
    let mut sim = Sim::start(config).unwrap();
    sim.hangup(); // no effect: nobody looks for hangups with d
    for want in ["S,a", "G,x", "E,done"] {
        assert_eq!(next(&mut sim).await, want);
    }
    finish(&mut sim).await;
    assert_eq!(events_no_ts(&sim), ["Z", "G,x=1", "E"]);
}

#[tokio::test]
async fn autoclear_clears_the_playlist_on_a_key() {
    let prog = py(r#"
send("O,autoclear")
send("S,a")
send("A,b")
send("L,ready")
until("D,*")
send("E,x")
until("")
"#);
    let config = SimConfig::new(prog.display().to_string())
        .sound("a", Duration::from_secs(5))
        .sound("b", Duration::from_secs(5));
    let mut sim = Sim::start(config).unwrap();
    for want in ["O,autoclear", "S,a", "A,b", "L,ready"] {
        assert_eq!(next(&mut sim).await, want);
    }
    tokio::time::sleep(Duration::from_millis(100)).await; // let `a` start
    sim.key('#');
    assert_eq!(next(&mut sim).await, "E,x");
    finish(&mut sim).await;
    assert_eq!(events_no_ts(&sim), ["#", "T,a", "D,b", "E"]);
}

#[tokio::test]
async fn a_child_that_goes_away_ends_the_session_and_its_last_partial_line_counts() {
    let prog = child("#!/bin/sh\nprintf 'L,one\\nL,partial'\n");
    let mut sim = Sim::start(SimConfig::new(prog.display().to_string())).unwrap();
    assert_eq!(next(&mut sim).await, "L,one");
    assert_eq!(next(&mut sim).await, "L,partial");
    assert_eq!(sim.next_command(WAIT).await, Next::Ended);
    assert_eq!(sim.end().unwrap().reason, EndReason::ChildWentAway);
    assert!(events(&sim).is_empty());
    let exit = sim.wait_exit(Duration::from_secs(2)).await.unwrap();
    assert!(exit.status.success());
    assert!(exit.after_close < Duration::from_secs(2));
}

#[tokio::test]
async fn a_child_that_never_exits_is_detected_and_killed() {
    // `sleep` keeps running after stdin closes.
    let prog = child("#!/bin/sh\necho E,x\nexec sleep 60\n");
    let mut sim = Sim::start(SimConfig::new(prog.display().to_string())).unwrap();
    assert_eq!(next(&mut sim).await, "E,x");
    sim.wait_end(WAIT).await.unwrap();
    match sim.wait_exit(Duration::from_millis(300)).await {
        Err(ExitError::NotExited { waited }) => assert_eq!(waited, Duration::from_millis(300)),
        other => panic!("{other:?}"),
    }
    let t = sim.transcript();
    assert!(
        t.lines(Dir::Note)
            .any(|n| n.contains("child exited") && n.contains("9")),
        "killed by SIGKILL\n{t}"
    );
}

#[tokio::test]
async fn a_child_that_does_not_read_stdin_never_blocks_the_simulator() {
    let prog = child("#!/bin/sh\nsleep 1\necho E,x\nexec sleep 60\n");
    let mut sim = Sim::start(SimConfig::new(prog.display().to_string())).unwrap();
    // Far more than a pipe holds.
    for n in 0..3000 {
        sim.send_raw(format!("L,{n:0>100}"));
    }
    assert_eq!(next(&mut sim).await, "E,x");
    let end = sim.wait_end(WAIT).await;
    assert_eq!(end.map(|e| e.reason), Some(EndReason::Exit));
    let t = sim.transcript();
    assert!(
        t.lines(Dir::Note)
            .any(|n| n.contains("does not read its stdin")),
        "{t}"
    );
    assert!(matches!(
        sim.wait_exit(Duration::from_millis(200)).await,
        Err(ExitError::NotExited { .. })
    ));
}

#[tokio::test]
async fn close_ends_the_session_without_an_event() {
    let prog = py(r#"
send("L,ready")
until("")
"#);
    let mut sim = Sim::start(SimConfig::new(prog.display().to_string())).unwrap();
    assert_eq!(next(&mut sim).await, "L,ready");
    sim.close();
    assert_eq!(sim.next_command(WAIT).await, Next::Ended);
    assert_eq!(sim.end().unwrap().reason, EndReason::Closed);
    finish(&mut sim).await;
    assert!(events(&sim).is_empty());
}

#[tokio::test]
async fn stderr_lines_are_kept_and_stripped() {
    let prog =
        child("#!/bin/sh\necho '  first  ' >&2\nprintf 'second\\r\\n' >&2\necho E,x\nread x\n");
    let mut sim = Sim::start(SimConfig::new(prog.display().to_string())).unwrap();
    assert_eq!(next(&mut sim).await, "E,x");
    finish(&mut sim).await;
    assert_eq!(sim.stderr(), ["first", "second"]);
}

#[test]
fn a_missing_program_fails_to_start() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        assert!(Sim::start(SimConfig::new("/nonexistent/popivr(x)")).is_err());
        assert!(Sim::start(SimConfig::new("/bin/true(x")).is_err());
    });
}

/// `ivr://`: the simulator connects, and the same conversation runs on the
/// socket; the `P` answer starts with the URL's host and port, there is no
/// stderr, and the socket is closed after `E`.
#[tokio::test]
async fn ivr_mode_talks_over_one_socket() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let wake = std::sync::Arc::new(tokio::sync::Notify::new());
    let woken = wake.clone();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (rd, mut wr) = stream.into_split();
        let mut lines = BufReader::new(rd).lines();
        wr.write_all(b"P,x\n").await.unwrap();
        let params = lines.next_line().await.unwrap().unwrap();
        // Two lines in one write: Asterisk handles the first now and the
        // second only when the socket wakes it again.
        wr.write_all(b"L,hello\nE,bye\n").await.unwrap();
        woken.notified().await;
        wr.write_all(b"\n").await.unwrap();
        let mut rest = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push(line);
        }
        (params, rest)
    });
    let data = format!("ivr://127.0.0.1:{port}(sales,x=1),n");
    let mut sim = Sim::start(SimConfig::new(data)).unwrap();
    assert!(sim.is_socket());
    assert_eq!(next(&mut sim).await, "P,x");
    assert_eq!(next(&mut sim).await, "L,hello");
    assert_eq!(
        sim.next_command(Duration::from_millis(300)).await,
        Next::TimedOut,
        "E,bye must wait for the next wake-up\n{}",
        sim.transcript()
    );
    wake.notify_one();
    assert_eq!(next(&mut sim).await, "E,bye");
    assert_eq!(sim.wait_end(WAIT).await.unwrap().reason, EndReason::Exit);
    let (params, rest) = server.await.unwrap();
    let (tag, data) = params.split_once(',').unwrap();
    assert_eq!(tag, "P");
    assert_eq!(
        data.split_once(',').unwrap().1,
        format!("ivr://127.0.0.1:{port},sales,x=1")
    );
    // The answer to E, then end of file: Asterisk closed the socket.
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert!(rest[0].starts_with("E,"), "{rest:?}");
    assert!(sim.stderr().is_empty());
    assert!(matches!(
        sim.wait_exit(WAIT).await,
        Err(ExitError::NoProcess)
    ));
}

#[tokio::test]
async fn ivr_mode_with_nobody_listening_fails_before_any_event() {
    // A port that was free a moment ago: nothing accepts there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut sim = Sim::start(SimConfig::new(format!("ivr://127.0.0.1:{port}(sales)"))).unwrap();
    let end = sim.wait_end(WAIT).await.unwrap();
    assert_eq!(end.reason, EndReason::ConnectFailed);
    assert_eq!(sim.next_command(WAIT).await, Next::Ended);
    let t = sim.transcript();
    assert!(
        t.lines(Dir::Note)
            .any(|n| n.contains("Could not connect to any host")),
        "{t}"
    );
}
