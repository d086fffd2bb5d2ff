//! The library's throw-away real Asterisk (`popivr_testkit::testbed::asterisk`):
//! that it starts and leaves nothing behind, and that what other tests
//! rely on really happens on a real Asterisk — caller ID and DTMF from the
//! caller half of a Local channel reach the PBX half, generated sounds
//! play for their length, and an ExternalIVR child runs and hands the call
//! back to the dialplan. No mocks: each test starts its own Asterisk.

use std::path::Path;
use std::time::{Duration, Instant};

use popivr_testkit::testbed::asterisk::{Asterisk, Originate};

const WAIT: Duration = Duration::from_secs(15);

/// `%XX` decoding of `URIENCODE()` output: UserEvent arguments are split
/// on commas, so values that may hold one travel encoded.
fn uri_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn process_exists(pid: i32) -> bool {
    // Signal 0 checks existence; a zombie still counts, so look at its
    // state too (a killed grandchild is reaped by init, not by us).
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn group_exists(pgid: i32) -> bool {
    unsafe { libc::kill(-pgid, 0) == 0 }
}

async fn wait_for_file(path: &Path) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && text.ends_with('\n')
        {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} never written",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Start, answer on AMI, stop: no process (not even an ExternalIVR child
/// that ignores the end of its call) and no directory is left.
#[tokio::test]
async fn start_and_drop_leave_nothing_behind() {
    // A child that never answers and never exits by itself.
    let stubborn = "#!/bin/sh\necho $$ > \"$1.tmp\" && mv \"$1.tmp\" \"$1\"\nexec sleep 300\n";
    let pbx = Asterisk::builder()
        .executable("stubborn.sh", stubborn)
        .dialplan(
            "[from-pbx]\n\
             exten => 100,1,ExternalIVR(${ASTETCDIR}/stubborn.sh(${ASTETCDIR}/stubborn.pid))\n \
             same => n,Hangup()\n",
        )
        .start()
        .await;
    let version = pbx.command("core show version").await;
    assert!(version.contains("Asterisk"), "{version}");
    let pid = pbx.pid().expect("running") as i32;
    let dir = pbx.dir().to_owned();
    assert!(
        dir.join("run/asterisk.ctl").exists(),
        "private control socket"
    );
    eprintln!("started in {:?}", pbx.startup_time());

    pbx.originate(Originate::new("Local/100@from-pbx"))
        .await
        .unwrap();
    let child = wait_for_file(&pbx.etc_dir().join("stubborn.pid")).await;
    let child: i32 = child.trim().parse().unwrap();
    assert!(process_exists(child));
    assert_eq!(pbx.channels_in_app("ExternalIVR").await, 1);

    let t0 = Instant::now();
    drop(pbx);
    eprintln!("stopped in {:?}", t0.elapsed());
    assert!(!dir.exists(), "temp dir left: {}", dir.display());
    assert!(!process_exists(pid), "asterisk {pid} still running");
    // Killed processes become zombies until init reaps them: give it a
    // moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while (process_exists(child) || group_exists(pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !process_exists(child),
        "ExternalIVR child {child} left running"
    );
    assert!(!group_exists(pid), "process group {pid} not empty");
}

/// The caller's number and name given to Originate are what the PBX half
/// (`;2`, where ExternalIVR would run) sees in `CALLERID(num)` and
/// `CALLERID(name)`, including names with commas, quotes, parentheses,
/// backslashes and non-ASCII letters; variables reach it too.
#[tokio::test]
async fn caller_id_reaches_the_pbx_side() {
    let pbx = Asterisk::builder()
        .dialplan(
            "[from-pbx]\n\
             exten => 100,1,Answer()\n \
             same => n,UserEvent(Seen,NUM: ${URIENCODE(${CALLERID(num)})},\
             NAME: ${URIENCODE(${CALLERID(name)})},VAR: ${URIENCODE(${TESTVAR})})\n \
             same => n,Hangup()\n",
        )
        .start()
        .await;
    let cases = [
        ("+4930555123", "Jane Doe"),
        ("200", r#"Smith, John (Sales) "JJ" O'Neil"#),
        ("201", "Müller-Lüdenscheidt 東京 😀"),
        ("202", r"back\slash; semi|pipe [b] {c} <x> & %41"),
        ("203", ""),
        ("", "No Number"),
        ("*31#", "  spaced  "),
    ];
    let weird_var = r#"a,b "c" (d) \e [f]"#;
    for (num, name) in cases {
        let call = pbx
            .originate(
                Originate::new("Local/100@from-pbx")
                    .caller_id(num, name)
                    .var("TESTVAR", weird_var),
            )
            .await
            .unwrap();
        let seen = pbx.wait_user_event_for(&call, "Seen", WAIT).await;
        assert_eq!(uri_decode(&seen["NUM"]), num, "number of {name:?}");
        // Quoted, even blanks around the name stay.
        assert_eq!(uri_decode(&seen["NAME"]), name, "name of {num:?}");
        assert_eq!(uri_decode(&seen["VAR"]), weird_var);
        // The ;2 half sent the event.
        assert_eq!(seen["Uniqueid"], call.pbx_id);
        assert!(seen["Channel"].ends_with(";2"), "{}", seen["Channel"]);
    }

    // The longest caller ID Originate keeps whole (255 bytes as sent:
    // `"` + name + `" <1>`) arrives whole; one byte more is refused
    // rather than cut by Asterisk.
    let longest = format!("{}ü", "x".repeat(247));
    let call = pbx
        .originate(Originate::new("Local/100@from-pbx").caller_id("1", &longest))
        .await
        .unwrap();
    let seen = pbx.wait_user_event_for(&call, "Seen", WAIT).await;
    assert_eq!(uri_decode(&seen["NAME"]), longest);
    assert_eq!(uri_decode(&seen["NUM"]), "1");
    let too_long = format!("{longest}x");
    let refused = pbx
        .originate(Originate::new("Local/100@from-pbx").caller_id("1", &too_long))
        .await;
    assert!(refused.is_err(), "256-byte caller ID accepted");

    // What Asterisk's Originate changes: blanks and ()-. leave numbers.
    let call = pbx
        .originate(Originate::new("Local/100@from-pbx").caller_id("+49 (30) 555-12.3", "X"))
        .await
        .unwrap();
    let seen = pbx.wait_user_event_for(&call, "Seen", WAIT).await;
    assert_eq!(uri_decode(&seen["NUM"]), "+4930555123");
    assert!(pbx.wait_no_channels(WAIT).await, "calls left");
}

/// DTMF sent by the caller half reaches the PBX half (`Read()` there).
#[tokio::test]
async fn caller_dtmf_reaches_the_pbx_side() {
    let pbx = Asterisk::builder()
        .dialplan(
            "[from-pbx]\n\
             exten => 100,1,Answer()\n \
             same => n,Read(DIGITS,,3,,1,10)\n \
             same => n,UserEvent(Digits,DIGITS: ${DIGITS},STATUS: ${READSTATUS})\n \
             same => n,Hangup()\n\
             [caller]\n\
             exten => s,1,Wait(0.3)\n \
             same => n,SendDTMF(7#)\n \
             same => n,Wait(10)\n",
        )
        .start()
        .await;
    let call = pbx
        .originate(Originate::new("Local/100@from-pbx").exten("caller", "s"))
        .await
        .unwrap();
    let got = pbx.wait_user_event_for(&call, "Digits", WAIT).await;
    assert_eq!(got["DIGITS"], "7", "{}", pbx.log());
    assert_eq!(got["STATUS"], "OK");
    assert!(pbx.wait_no_channels(WAIT).await, "calls left");
}

/// A generated sound plays for about its length.
#[tokio::test]
async fn a_generated_sound_plays_for_its_length() {
    let pbx = Asterisk::builder()
        .sound("custom/hold", Duration::from_millis(1500))
        .dialplan(
            "[from-pbx]\n\
             exten => 100,1,Answer()\n \
             same => n,UserEvent(Before)\n \
             same => n,Playback(custom/hold)\n \
             same => n,UserEvent(After,STATUS: ${PLAYBACKSTATUS})\n \
             same => n,Playback(silence/10)\n \
             same => n,Hangup()\n",
        )
        .start()
        .await;
    assert!(pbx.sounds_dir().join("custom/hold.sln").is_file());
    assert!(pbx.sounds_dir().join("silence/10.sln").is_file());
    let call = pbx
        .originate(Originate::new("Local/100@from-pbx"))
        .await
        .unwrap();
    pbx.wait_user_event_for(&call, "Before", WAIT).await;
    let t0 = Instant::now();
    let after = pbx.wait_user_event_for(&call, "After", WAIT).await;
    let took = t0.elapsed();
    assert_eq!(after["STATUS"], "SUCCESS", "{}", pbx.log());
    assert!(
        took >= Duration::from_millis(1300) && took <= Duration::from_millis(2500),
        "1.5 s of sound played in {took:?}"
    );
    // silence/10 plays too (ExternalIVR's generator needs it); the caller
    // hangs up in the middle of it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pbx.channels_in_app("Playback").await, 1);
    pbx.hangup_call(&call).await.unwrap();
    assert!(pbx.wait_no_channels(WAIT).await, "calls left");
}

/// ExternalIVR runs a child, the child plays a sound, reads an event,
/// sets a variable and leaves with `E`: the dialplan goes on after
/// ExternalIVR with the variable, and no channel is left inside it.
#[tokio::test]
async fn an_externalivr_child_returns_to_the_dialplan() {
    // One command per write, with a pause before the next so Asterisk
    // has read each before the next arrives (see
    // shared/externalivr-protocol.md: lines sharing one read are
    // stranded). Events are read as they come; stdin EOF ends it.
    let child = r#"#!/bin/sh
echo $$ > "$1.tmp" && mv "$1.tmp" "$1"
echo "S,custom/hold"
read -r event
echo "child got: $event" >&2
sleep 0.1
echo "V,GOT=${event%%,*}"
sleep 0.1
echo "E,bye"
cat > /dev/null
"#;
    let pbx = Asterisk::builder()
        .sound("custom/hold", Duration::from_millis(500))
        .executable("child.sh", child)
        .dialplan(
            "[from-pbx]\n\
             exten => 100,1,Set(PID=${ASTETCDIR}/child.pid)\n \
             same => n,ExternalIVR(${ASTETCDIR}/child.sh(${PID}))\n \
             same => n,UserEvent(IvrDone,GOT: ${GOT})\n \
             same => n,Hangup()\n",
        )
        .start()
        .await;
    let call = pbx
        .originate(Originate::new("Local/100@from-pbx").caller_id("100", "Caller"))
        .await
        .unwrap();
    let done = pbx.wait_user_event_for(&call, "IvrDone", WAIT).await;
    // The hold sound finished: its F event was what the child read.
    assert_eq!(done["GOT"], "F", "{}", pbx.log());
    // The log is written by a thread of its own: it may lag the event.
    for line in [
        "got command 'S,custom/hold'",
        "got command 'E,bye'",
        "child got: F,",
    ] {
        assert!(
            pbx.wait_log(line, WAIT).await,
            "no {line:?} in\n{}",
            pbx.log()
        );
    }
    assert_eq!(pbx.channels_in_app("ExternalIVR").await, 0);
    assert!(pbx.wait_no_channels(WAIT).await, "calls left");
    // The child saw stdin close and exited.
    let pid: i32 = wait_for_file(&pbx.etc_dir().join("child.pid"))
        .await
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_exists(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!process_exists(pid), "ExternalIVR child still running");
}

/// `Gosub` (every shipped dialplan snippet uses it) works when the build
/// has app_stack's dependencies (res_agi, res_speech); otherwise the
/// start fails at once with a message that says what is missing, rather
/// than calls failing later.
#[tokio::test]
async fn gosub_runs_or_the_start_says_why_not() {
    let started = Asterisk::builder()
        .file(
            "sub.conf",
            "[sub]\nexten => s,1,Set(FROM_SUB=${ARG1})\n same => n,Return()\n",
        )
        .dialplan(
            "#include sub.conf\n\
             [from-pbx]\n\
             exten => 100,1,Gosub(sub,s,1(hello))\n \
             same => n,UserEvent(Subbed,FROM_SUB: ${FROM_SUB})\n \
             same => n,Hangup()\n",
        )
        .try_start()
        .await;
    let pbx = match started {
        Ok(pbx) => pbx,
        Err(why) => {
            let why = why.to_string();
            assert!(why.contains("Gosub") && why.contains("res_agi"), "{why}");
            eprintln!("no Gosub in this Asterisk build: {why}");
            return;
        }
    };
    let call = pbx
        .originate(Originate::new("Local/100@from-pbx"))
        .await
        .unwrap();
    let got = pbx.wait_user_event_for(&call, "Subbed", WAIT).await;
    assert_eq!(got["FROM_SUB"], "hello", "{}", pbx.log());
}
