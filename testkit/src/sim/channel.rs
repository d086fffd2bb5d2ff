//! Asterisk's side of one ExternalIVR call as a plain state machine: the
//! channel, its variables and the playlist generator. No I/O and no clock
//! reads; [`crate::sim::Sim`] drives it from a real child process.
//!
//! It follows `eivr_comm()` and the generator of `app_externalivr.c`:
//! commands are dispatched on their first byte with the data from the third
//! byte on, the playlist's head is the file playing, and the generator
//! picks up changes on its next 20 ms frame.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::invocation::{Invocation, Options};

/// One audio frame: the generator notices playlist changes and file ends
/// at this granularity.
pub const FRAME: Duration = Duration::from_millis(20);

/// What the generator plays when the playlist is empty.
pub const SILENCE: &str = "silence/10";

/// Names `pbx_retrieve_variable` computes instead of storing them: `G`
/// (`pbx_builtin_getvar_helper`) does not see them, nor any dialplan
/// function (a name ending in `)`), and reads them as empty.
const BUILTINS: &[&str] = &[
    "CALLERID",
    "CALLERIDNUM",
    "CALLERIDNAME",
    "CALLINGPRES",
    "CALLINGANI2",
    "CALLINGTON",
    "CALLINGTNS",
    "DNID",
    "RDNIS",
    "EXTEN",
    "CONTEXT",
    "PRIORITY",
    "CHANNEL",
    "UNIQUEID",
    "HANGUPCAUSE",
    "LANGUAGE",
    "ACCOUNTCODE",
    "HINT",
    "HINTNAME",
    "EPOCH",
    "SYSTEMNAME",
    "ENTITYID",
];

/// An event line to send, without its timestamp (added when it is written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub tag: char,
    pub data: Option<String>,
}

impl Event {
    fn new(tag: char, data: impl Into<String>) -> Self {
        Event {
            tag,
            data: Some(data.into()),
        }
    }

    fn bare(tag: char) -> Self {
        Event { tag, data: None }
    }

    /// The wire form, `send_eivr_event`'s `"%c,%10d[,%s]\n"`.
    pub fn render(&self, unix_time: u64) -> String {
        match &self.data {
            Some(d) => format!("{},{unix_time:>10},{d}\n", self.tag),
            None => format!("{},{unix_time:>10}\n", self.tag),
        }
    }
}

/// Why Asterisk stopped talking to the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The child sent `E`; Asterisk answered `E`.
    Exit,
    /// The child sent `H`; Asterisk answered `H`.
    Hangup,
    /// The child sent the deprecated `X`: Asterisk leaves without an answer.
    DeprecatedExit,
    /// The caller hung up; Asterisk sent `H`.
    CallerHangup,
    /// The child closed its stdout (exited).
    ChildWentAway,
    /// The test closed the session without any event.
    Closed,
    /// `ivr://`: no address of the host accepted the connection, so
    /// ExternalIVR failed before any event.
    ConnectFailed,
    /// Option `d` without `n`: the channel is not up, and
    /// `app_externalivr.c` refuses to answer a dead channel, so it fails
    /// before starting anything.
    Refused,
}

/// What one input made Asterisk do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Event(Event),
    /// Something Asterisk would log (warnings, `L` messages, ignored input).
    Note(String),
    /// Stop reading, close the pipes.
    End(EndReason),
}

#[derive(Debug)]
struct Stream {
    file: String,
    ends_at: Instant,
}

/// The playlist generator (`gen_state` and the playlist fields of `ivr_localuser`).
#[derive(Debug)]
struct Generator {
    active: bool,
    /// Head = the file playing (while not `playing_silence`).
    playlist: VecDeque<String>,
    current: Option<Stream>,
    playing_silence: bool,
    abort_current_sound: bool,
    /// Finished files whose `F` is not sent yet.
    finished: Vec<String>,
}

impl Generator {
    fn new(active: bool) -> Self {
        Generator {
            active,
            playlist: VecDeque::new(),
            current: None,
            playing_silence: true,
            abort_current_sound: false,
            finished: Vec::new(),
        }
    }

    /// `T` for the playing file, `D` for each queued one (S, I, autoclear).
    fn clear(&mut self, out: &mut Vec<Output>) {
        if !self.abort_current_sound
            && !self.playing_silence
            && let Some(head) = self.playlist.pop_front()
        {
            out.push(Output::Event(Event::new('T', head)));
        }
        for dropped in self.playlist.drain(..) {
            out.push(Output::Event(Event::new('D', dropped)));
        }
        if !self.playing_silence {
            self.abort_current_sound = true;
        }
    }

    fn next_file(&mut self, now: Instant, sounds: &BTreeMap<String, Duration>) {
        self.abort_current_sound = false;
        self.playing_silence = false;
        self.current = self.playlist.front().map(|file| Stream {
            file: file.clone(),
            ends_at: now + sounds.get(file).copied().unwrap_or_default(),
        });
        if self.current.is_none() {
            self.playing_silence = true;
        }
    }

    /// One frame (`gen_readframe`).
    fn frame(&mut self, now: Instant, sounds: &BTreeMap<String, Duration>) {
        if self.abort_current_sound || (self.playing_silence && !self.playlist.is_empty()) {
            self.next_file(now, sounds);
        }
        // Several short files may end within one frame.
        while let Some(stream) = self.current.take_if(|s| s.ends_at <= now) {
            self.playlist.pop_front();
            self.finished.push(stream.file);
            self.next_file(stream.ends_at, sounds);
        }
    }
}

/// Asterisk builds the `P` answer in `ast_str_alloca(100)`: a buffer on
/// the stack cannot grow, so the comma-joined argv is cut to 99 bytes.
pub const PARAMS_MAX: usize = 99;

fn params_answer(invocation: &Invocation) -> String {
    let mut params = invocation.params();
    let mut end = params.len().min(PARAMS_MAX);
    while !params.is_char_boundary(end) {
        end -= 1;
    }
    params.truncate(end);
    params
}

/// The channel as ExternalIVR sees it.
#[derive(Debug)]
pub struct Channel {
    options: Options,
    params: String,
    up: bool,
    hung_up: bool,
    hangup_info_sent: bool,
    autoclear: bool,
    player: Generator,
    sounds: BTreeMap<String, Duration>,
    vars: BTreeMap<String, String>,
    function_writes: Vec<(String, String)>,
    dtmf_sent: Vec<String>,
    logs: Vec<String>,
    /// Keys pressed while the channel is not up: Asterisk reads no frames
    /// then, so they wait in the channel's queue.
    pending_keys: VecDeque<char>,
}

impl Channel {
    /// A channel as `ExternalIVR(<invocation>)` leaves it before the child
    /// runs: answered with the generator playing silence unless `n`, hung
    /// up already with `d`.
    pub fn new(
        invocation: &Invocation,
        vars: BTreeMap<String, String>,
        sounds: BTreeMap<String, Duration>,
    ) -> Self {
        let options = invocation.options;
        Channel {
            options,
            params: params_answer(invocation),
            up: !options.no_answer,
            hung_up: options.dead,
            hangup_info_sent: false,
            autoclear: false,
            player: Generator::new(!options.no_answer),
            sounds,
            vars,
            function_writes: Vec::new(),
            dtmf_sent: Vec::new(),
            logs: Vec::new(),
            pending_keys: VecDeque::new(),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    pub fn is_hung_up(&self) -> bool {
        self.hung_up
    }

    pub fn var(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    pub fn vars(&self) -> &BTreeMap<String, String> {
        &self.vars
    }

    /// `V` assignments to names ending in `)`: dialplan function writes.
    pub fn function_writes(&self) -> &[(String, String)] {
        &self.function_writes
    }

    /// Data of every `D` command (DTMF sent on the channel).
    pub fn dtmf_sent(&self) -> &[String] {
        &self.dtmf_sent
    }

    /// Data of every `L` command.
    pub fn logs(&self) -> &[String] {
        &self.logs
    }

    /// The queue, playing file first (empty while silence plays).
    pub fn playlist(&self) -> Vec<String> {
        self.player.playlist.iter().cloned().collect()
    }

    /// The caller hangs up.
    pub fn hangup(&mut self) {
        self.hung_up = true;
        self.pending_keys.clear();
    }

    /// The check at the top of Asterisk's loop: report a hangup once.
    pub fn check_hangup(&mut self) -> Vec<Output> {
        if self.hangup_info_sent || self.options.dead || !self.hung_up {
            return Vec::new();
        }
        if self.options.inform_hangup {
            self.hangup_info_sent = true;
            vec![Output::Event(Event::new('I', "HANGUP"))]
        } else {
            vec![
                Output::Event(Event::bare('H')),
                Output::End(EndReason::CallerHangup),
            ]
        }
    }

    /// The caller presses `key`.
    pub fn key(&mut self, key: char) -> Vec<Output> {
        if self.hung_up {
            return vec![Output::Note(format!(
                "key {key} lost: the channel is hung up"
            ))];
        }
        if !self.up {
            self.pending_keys.push_back(key);
            return vec![Output::Note(format!(
                "key {key} waits: the channel is not up"
            ))];
        }
        self.deliver_key(key)
    }

    fn deliver_key(&mut self, key: char) -> Vec<Output> {
        let mut out = vec![Output::Event(Event::bare(key))];
        if self.autoclear {
            self.player.clear(&mut out);
        }
        out
    }

    /// Time passes: the generator plays frames up to `now`; `F` events for
    /// files that ended; keys that waited for the answer.
    pub fn tick(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if self.player.active && self.up && !self.hung_up {
            self.player.frame(now, &self.sounds);
        }
        if self.up {
            for file in self.player.finished.drain(..) {
                out.push(Output::Event(Event::new('F', file)));
            }
        }
        if self.up && !self.hung_up {
            while let Some(key) = self.pending_keys.pop_front() {
                out.extend(self.deliver_key(key));
            }
        }
        out
    }

    /// A command line from the child, already stripped and at least 3
    /// bytes long (Asterisk ignores shorter ones before dispatching).
    pub fn command(&mut self, line: &str) -> Vec<Output> {
        let Some(&tag) = line.as_bytes().first() else {
            return Vec::new();
        };
        let data =
            String::from_utf8_lossy(line.as_bytes().get(2..).unwrap_or_default()).into_owned();
        let mut out = Vec::new();
        let playable = self.up && !self.hung_up;
        match tag {
            b'P' => out.push(Output::Event(Event::new('P', self.params.clone()))),
            b'D' => self.dtmf_sent.push(data),
            b'T' => self.answer(&mut out),
            b'I' | b'S' | b'A' | b'O' if !playable => {
                out.push(Output::Note(format!(
                    "{} on a channel that is not up",
                    tag as char
                )));
                out.push(Output::Event(Event::bare('Z')));
            }
            b'I' => self.player.clear(&mut out),
            b'S' | b'A' if !self.sounds.contains_key(&data) => {
                out.push(Output::Note(format!("unknown file requested '{data}'")));
                out.push(Output::Event(Event::new('Z', data)));
            }
            b'S' => {
                self.player.clear(&mut out);
                self.player.playlist.push_back(data);
            }
            b'A' => self.player.playlist.push_back(data),
            b'G' => out.push(Output::Event(Event::new('G', self.get_vars(&data)))),
            b'V' => self.set_vars(&data, &mut out),
            b'L' => {
                out.push(Output::Note(format!("log message: {data}")));
                self.logs.push(data);
            }
            b'X' => out.push(Output::End(EndReason::DeprecatedExit)),
            b'E' => {
                out.push(Output::Event(Event::bare('E')));
                out.push(Output::End(EndReason::Exit));
            }
            b'H' => {
                out.push(Output::Event(Event::bare('H')));
                out.push(Output::End(EndReason::Hangup));
            }
            b'O' if data.eq_ignore_ascii_case("autoclear") => self.autoclear = true,
            b'O' if data.eq_ignore_ascii_case("noautoclear") => self.autoclear = false,
            b'O' => out.push(Output::Note(format!("unknown option requested: {data}"))),
            _ => out.push(Output::Note(format!("unknown command ignored: {line}"))),
        }
        out
    }

    fn answer(&mut self, out: &mut Vec<Output>) {
        if !self.up {
            if self.options.dead {
                out.push(Output::Event(Event::new('Z', "ANSWER_FAILURE")));
                return;
            }
            self.up = true;
        }
        self.player.active = true;
    }

    /// `ast_eivr_getvariable`: `name=value,` per name (missing → empty),
    /// the last comma dropped, cut to Asterisk's 2048-byte buffer. Only
    /// plain channel variables are found, as on a real Asterisk: a
    /// function or built-in in the table (`CALLERID(num)`, `EXTEN`) reads
    /// as empty.
    fn get_vars(&self, names: &str) -> String {
        let mut out = String::new();
        for name in names.split(',') {
            let readable = !(name.ends_with(')') || BUILTINS.contains(&name));
            let value = self
                .vars
                .get(name)
                .filter(|_| readable)
                .map_or("", String::as_str);
            out.push_str(&format!("{name}={value},"));
        }
        out.pop();
        truncate_bytes(&mut out, 2047);
        out
    }

    /// `ast_eivr_setvariable`: every comma separates an assignment, the
    /// first `=` splits name from value, a name ending in `)` is a
    /// dialplan function write.
    fn set_vars(&mut self, data: &str, out: &mut Vec<Output>) {
        for piece in data.split(',') {
            let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
            if name.ends_with(')') {
                out.push(Output::Note(format!("function write {name}={value}")));
                self.function_writes
                    .push((name.to_string(), value.to_string()));
            }
            self.vars.insert(name.to_string(), value.to_string());
        }
    }
}

fn truncate_bytes(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chan(data: &str) -> Channel {
        let vars = [("CALLERID(num)", "5551234"), ("CALLER_NAME", "Doe, John")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let sounds = [("a", 1000), ("b", 500), ("c", 10)]
            .into_iter()
            .map(|(k, ms)| (k.to_string(), Duration::from_millis(ms)))
            .collect();
        Channel::new(&Invocation::parse(data).unwrap(), vars, sounds)
    }

    fn events(out: &[Output]) -> Vec<String> {
        out.iter()
            .filter_map(|o| match o {
                Output::Event(e) => Some(e.render(1_700_000_000).trim_end().to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn event_rendering() {
        assert_eq!(Event::bare('H').render(1_700_000_000), "H,1700000000\n");
        assert_eq!(Event::new('F', "a").render(42), "F,        42,a\n");
    }

    #[test]
    fn params_and_get_and_set() {
        let mut c = chan("/bin/popivr(sales,x=1)");
        assert_eq!(
            events(&c.command("P,x")),
            ["P,1700000000,/bin/popivr,sales,x=1"]
        );
        assert_eq!(
            events(&c.command("G,CALLER_NAME,NOPE")),
            ["G,1700000000,CALLER_NAME=Doe, John,NOPE="]
        );
        assert_eq!(events(&c.command("G,a,")), ["G,1700000000,a=,="]);
        // The answer is cut to Asterisk's 99-byte buffer.
        let long = format!("/bin/popivr(sales,x={})", "é".repeat(60));
        let p = events(&chan(&long).command("P,x")).remove(0);
        let data = p.strip_prefix("P,1700000000,").unwrap();
        assert_eq!(data.len(), PARAMS_MAX - 1, "{data}");
        assert!(data.starts_with("/bin/popivr,sales,x=é"));
        c.command("V,a=1,FILE(/tmp/x)=y,b,c=d=e");
        assert_eq!(c.var("a"), Some("1"));
        assert_eq!(c.var("b"), Some(""));
        assert_eq!(c.var("c"), Some("d=e"));
        assert_eq!(
            c.function_writes(),
            [("FILE(/tmp/x)".to_string(), "y".to_string())]
        );
    }

    #[test]
    fn get_reads_no_functions_nor_builtins() {
        let mut c = chan("/p");
        c.command("V,MYVAR=x");
        c.vars.insert("EXTEN".into(), "100".into());
        assert_eq!(
            events(&c.command("G,CALLERID(num),EXTEN,MYVAR")),
            ["G,1700000000,CALLERID(num)=,EXTEN=,MYVAR=x"]
        );
    }

    #[test]
    fn dispatch_is_on_the_first_byte_only() {
        let mut c = chan("/p");
        assert_eq!(events(&c.command("Px")), ["P,1700000000,/p"]);
        assert!(events(&c.command("Q,x")).is_empty());
    }

    #[test]
    fn playlist_plays_queues_and_reports_finished_files() {
        let t0 = Instant::now();
        let mut c = chan("/p");
        assert!(events(&c.command("S,a")).is_empty());
        c.command("A,b");
        c.tick(t0);
        assert_eq!(c.playlist(), ["a", "b"]);
        assert!(events(&c.tick(t0 + Duration::from_millis(990))).is_empty());
        assert_eq!(
            events(&c.tick(t0 + Duration::from_millis(1000))),
            ["F,1700000000,a"]
        );
        assert_eq!(
            events(&c.tick(t0 + Duration::from_millis(1500))),
            ["F,1700000000,b"]
        );
        assert!(c.playlist().is_empty());
    }

    #[test]
    fn s_interrupts_the_playing_file_and_drops_the_queue() {
        let t0 = Instant::now();
        let mut c = chan("/p");
        c.command("S,a");
        c.command("A,b");
        c.command("A,a");
        c.tick(t0);
        assert_eq!(
            events(&c.command("S,c")),
            ["T,1700000000,a", "D,1700000000,b", "D,1700000000,a"]
        );
        // Before the next frame the new file has not started: a second S drops it.
        assert_eq!(events(&c.command("S,b")), ["D,1700000000,c"]);
        c.tick(t0 + FRAME);
        assert_eq!(events(&c.command("I,x")), ["T,1700000000,b"]);
        c.tick(t0 + FRAME * 2);
        assert!(
            events(&c.command("I,x")).is_empty(),
            "silence is never reported"
        );
    }

    #[test]
    fn unknown_files_and_unanswered_channels_fail_with_z() {
        let mut c = chan("/p");
        assert_eq!(events(&c.command("A,nope")), ["Z,1700000000,nope"]);
        let mut c = chan("/p,n");
        assert_eq!(events(&c.command("S,a")), ["Z,1700000000"]);
        assert_eq!(events(&c.command("O,autoclear")), ["Z,1700000000"]);
        assert!(events(&c.command("T,x")).is_empty());
        assert!(c.is_up());
        assert!(events(&c.command("S,a")).is_empty());
    }

    #[test]
    fn keys_wait_for_the_answer() {
        let t0 = Instant::now();
        let mut c = chan("/p,n");
        assert!(events(&c.key('1')).is_empty());
        assert!(events(&c.tick(t0)).is_empty());
        c.command("T,x");
        assert_eq!(events(&c.tick(t0)), ["1,1700000000"]);
    }

    #[test]
    fn autoclear_clears_on_a_key() {
        let t0 = Instant::now();
        let mut c = chan("/p");
        c.command("O,AutoClear");
        c.command("S,a");
        c.command("A,b");
        c.tick(t0);
        assert_eq!(
            events(&c.key('D')),
            ["D,1700000000", "T,1700000000,a", "D,1700000000,b"]
        );
    }

    #[test]
    fn hangup_ends_or_informs() {
        let mut c = chan("/p");
        c.hangup();
        assert_eq!(
            c.check_hangup(),
            [
                Output::Event(Event::bare('H')),
                Output::End(EndReason::CallerHangup)
            ]
        );

        let mut c = chan("/p,i");
        c.hangup();
        assert_eq!(events(&c.check_hangup()), ["I,1700000000,HANGUP"]);
        assert!(c.check_hangup().is_empty(), "I is sent once");
        assert_eq!(events(&c.command("A,a")), ["Z,1700000000"]);
        assert_eq!(
            c.command("H,x"),
            [
                Output::Event(Event::bare('H')),
                Output::End(EndReason::Hangup)
            ]
        );

        let mut c = chan("/p,d");
        assert!(c.check_hangup().is_empty());
        assert_eq!(events(&c.command("S,a")), ["Z,1700000000"]);
        assert_eq!(
            c.command("E,x"),
            [
                Output::Event(Event::bare('E')),
                Output::End(EndReason::Exit)
            ]
        );
    }

    #[test]
    fn no_f_events_while_the_channel_is_down() {
        let t0 = Instant::now();
        let mut c = chan("/p,i");
        c.command("S,c");
        c.tick(t0);
        c.hangup();
        assert!(events(&c.tick(t0 + Duration::from_secs(1))).is_empty());
    }
}
