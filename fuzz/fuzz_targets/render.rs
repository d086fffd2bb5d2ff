//! Arbitrary commands into the writer: every line it accepts must keep the
//! wire rules, and a `V` line must split, the way Asterisk splits it, into
//! exactly the names it was given.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use popivr::eivr::{Command, MAX_LINE, render};

/// `Command` lives in the main crate without `Arbitrary`; this mirrors it.
#[derive(Debug, Arbitrary)]
enum Cmd {
    Play(String),
    Append(String),
    Interrupt,
    Autoclear(bool),
    SetVars(Vec<(String, String)>),
    GetVars(Vec<String>),
    Answer,
    SendDtmf(String, Option<u32>, Option<u32>),
    Log(String),
    GetParams,
    Exit(String),
    Hangup(String),
}

impl From<Cmd> for Command {
    fn from(c: Cmd) -> Self {
        match c {
            Cmd::Play(f) => Command::Play(f),
            Cmd::Append(f) => Command::Append(f),
            Cmd::Interrupt => Command::Interrupt,
            Cmd::Autoclear(on) => Command::Autoclear(on),
            Cmd::SetVars(v) => Command::SetVars(v),
            Cmd::GetVars(n) => Command::GetVars(n),
            Cmd::Answer => Command::Answer,
            Cmd::SendDtmf(digits, interval_ms, duration_ms) => Command::SendDtmf {
                digits,
                interval_ms,
                duration_ms,
            },
            Cmd::Log(m) => Command::Log(m),
            Cmd::GetParams => Command::GetParams,
            Cmd::Exit(m) => Command::Exit(m),
            Cmd::Hangup(m) => Command::Hangup(m),
        }
    }
}

fuzz_target!(|cmd: Cmd| {
    let cmd = Command::from(cmd);
    let Ok(line) = render(&cmd) else { return };
    let body = line.strip_suffix('\n').expect("line ends with \\n");
    assert!((3..=MAX_LINE).contains(&body.len()), "{line:?}");
    assert!(!body.chars().any(char::is_control), "{line:?}");
    // Asterisk strips white space, then ignores lines under 3 characters.
    assert!(body.trim_ascii().len() >= 3, "{line:?}");
    if let Command::SetVars(vars) = &cmd {
        let data = body.trim_ascii().strip_prefix("V,").expect("V line");
        let got: Vec<&str> = data
            .split(',')
            .map(|p| p.split_once('=').map_or(p, |(n, _)| n))
            .collect();
        let want: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
        // Whole assignments may be dropped at the end, never renamed.
        assert!(!got.is_empty() && want.starts_with(&got), "{line:?}");
    }
});
