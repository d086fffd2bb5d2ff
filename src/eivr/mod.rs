//! The ExternalIVR wire: typed events (Asterisk → popivr) and commands
//! (popivr → Asterisk). `parse` reads event lines, `write` renders commands
//! and is the one place that enforces the wire rules.

mod pace;
mod parse;
mod reader;
mod write;

pub use pace::{Answers, CommandWriter, SYNC_VAR, drain_after_answer};
pub use parse::{MAX_EVENT_LINE, ParseError, parse_event};
pub use reader::LineReader;
pub(crate) use write::is_unsafe;
pub use write::{MAX_LINE, WireError, clean_text, render, sanitize_value, valid_var_name};

/// At most this many bytes of an offending line are quoted in an error.
const EXCERPT_BYTES: usize = 60;

/// A log-safe excerpt of raw wire bytes for error messages: at most
/// [`EXCERPT_BYTES`] bytes, with every byte that is not printable ASCII
/// escaped (`\n`, `\x00`, `\xe2`…), so no control, bidi override or invalid
/// UTF-8 from the other side can reach a log line. A cut is marked with `...`.
pub(crate) fn excerpt(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(EXCERPT_BYTES)];
    let mut out = shown.escape_ascii().to_string();
    if shown.len() < bytes.len() {
        out.push_str("...");
    }
    out
}

/// A DTMF key as Asterisk reports it: `0`-`9`, `A`-`D`, `*`, `#`.
pub type Key = char;

/// One event line from Asterisk: `<tag>,<10-digit unix time>[,<data>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLine {
    /// The timestamp exactly as Asterisk sent it (seconds since the epoch).
    pub ts: u64,
    pub event: Event,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The caller pressed a key.
    Dtmf(Key),
    /// `H`: the channel hung up (or the answer to our `H`).
    Hangup,
    /// `E`: the answer to our `E`.
    Exit,
    /// `Z`: the last command could not be done (file name, `ANSWER_FAILURE`, …).
    Failed(Option<String>),
    /// `T`: the playing file was interrupted.
    Interrupted(String),
    /// `D,file`: a queued file was dropped (a bare `D` is [`Event::Dtmf`]).
    Dropped(String),
    /// `F`: a file finished playing.
    Finished(String),
    /// `P`: the program path and its arguments.
    Params(Vec<String>),
    /// `G`: raw `name=value,name=value` text; see [`split_vars`].
    Vars(String),
    /// `I`: inform (option `i`), e.g. `HANGUP`.
    Inform(String),
}

/// Split the data of a `G` event into `(name, value)` pairs, given the names
/// that were asked for in that `G`. Values may themselves contain commas, so
/// the split is guided by the expected names, in order.
pub fn split_vars(data: &str, names: &[&str]) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(names.len());
    let mut rest = data;
    for (i, name) in names.iter().enumerate() {
        let Some(after) = rest.strip_prefix(name).and_then(|r| r.strip_prefix('=')) else {
            break;
        };
        // The value runs to the next ",<next name>=" or to the end.
        let end = names.get(i + 1).and_then(|next| {
            let pat = format!(",{next}=");
            after.find(&pat)
        });
        match end {
            Some(e) => {
                out.push((name.to_string(), after[..e].to_string()));
                rest = &after[e + 1..];
            }
            None => {
                out.push((name.to_string(), after.to_string()));
                rest = "";
            }
        }
    }
    out
}

/// One command to Asterisk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `S,file`: clear the playlist and play `file`.
    Play(String),
    /// `A,file`: append `file` to the playlist.
    Append(String),
    /// `I,x`: interrupt, clear the playlist.
    Interrupt,
    /// `O,autoclear` / `O,noautoclear`.
    Autoclear(bool),
    /// `V,name=value[,…]`: set channel variables.
    SetVars(Vec<(String, String)>),
    /// `G,name[,…]`: read channel variables.
    GetVars(Vec<String>),
    /// `T,x`: answer the channel.
    Answer,
    /// `D,digits[,interval][,duration]`: send DTMF.
    SendDtmf {
        digits: String,
        interval_ms: Option<u32>,
        duration_ms: Option<u32>,
    },
    /// `L,message`: write to the Asterisk log.
    Log(String),
    /// `P,x`: ask for the start parameters.
    GetParams,
    /// `E,message`: leave ExternalIVR, continue the dialplan.
    Exit(String),
    /// `H,message`: hang up.
    Hangup(String),
}
