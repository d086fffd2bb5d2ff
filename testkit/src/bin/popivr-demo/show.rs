//! The demo's transcript: the simulated Asterisk's wire log and the
//! agent's view, merged by time and printed as the call goes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use popivr_testkit::sim::{Dir, Entry, Sim};

/// Lines younger than this wait for the other side's lines of the same
/// moment, so the merged output stays in time order.
const SETTLE: Duration = Duration::from_millis(60);

/// What the agent saw and did, with times.
#[derive(Clone, Default)]
pub struct AgentLog(Arc<Mutex<Vec<(Instant, Side, String)>>>);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Side {
    /// A message reached the agent.
    Received,
    /// The agent sent a message.
    Sent,
    /// Something about the agent's client.
    Note,
}

impl AgentLog {
    pub fn push(&self, side: Side, text: impl Into<String>) {
        let mut log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        log.push((Instant::now(), side, text.into()));
    }

    fn since(&self, start: Instant, from: usize) -> Vec<Line> {
        let log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        log.iter()
            .skip(from)
            .map(|(at, side, text)| Line {
                at: at.saturating_duration_since(start),
                who: match side {
                    Side::Received => "agent <- xmpp",
                    Side::Sent => "agent -> xmpp",
                    Side::Note => "agent",
                },
                text: text.clone(),
                about: "",
            })
            .collect()
    }

    /// When the agent first did `side`, from `start`.
    pub fn first(&self, start: Instant, side: Side) -> Option<Duration> {
        let log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        log.iter()
            .find(|(_, s, _)| *s == side)
            .map(|(at, _, _)| at.saturating_duration_since(start))
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

struct Line {
    at: Duration,
    who: &'static str,
    text: String,
    about: &'static str,
}

/// Prints the merged transcript, a little behind real time.
pub struct Printer {
    sim_seen: usize,
    agent_seen: usize,
    held: Vec<Line>,
    /// Shown instead of the simulator's own start note.
    start: String,
    /// Every line printed, for the caller's checks and summary.
    pub printed: Vec<String>,
}

impl Printer {
    /// `start` says how Asterisk started popivr.
    pub fn new(start: String) -> Self {
        println!("     time  {:<19} what", "who");
        Printer {
            sim_seen: 0,
            agent_seen: 0,
            held: Vec::new(),
            start,
            printed: Vec::new(),
        }
    }

    /// Print what is old enough; everything when `all`.
    pub fn flush(&mut self, sim: &Sim, agent: &AgentLog, all: bool) {
        let transcript = sim.transcript();
        for e in transcript.entries.iter().skip(self.sim_seen) {
            if let Some(line) = sim_line(e, &self.start) {
                self.held.push(line);
            }
        }
        self.sim_seen = transcript.entries.len();
        self.held
            .extend(agent.since(sim.started(), self.agent_seen));
        self.agent_seen = agent.len();
        self.held.sort_by_key(|l| l.at);
        let horizon = sim.elapsed().saturating_sub(SETTLE);
        let ready = match all {
            true => self.held.len(),
            false => self.held.iter().take_while(|l| l.at <= horizon).count(),
        };
        for line in self.held.drain(..ready) {
            let mut text = format!(
                "{:>8.3}s  {:<19} {}",
                line.at.as_secs_f64(),
                line.who,
                shown(&line.text)
            );
            if !line.about.is_empty() {
                text = format!("{text:<78} ({})", line.about);
            }
            println!("{text}");
            self.printed.push(text);
        }
    }
}

fn sim_line(e: &Entry, start: &str) -> Option<Line> {
    let (who, about) = match e.dir {
        Dir::Event => ("asterisk -> popivr", event_about(&e.text)),
        Dir::Command => ("popivr -> asterisk", command_about(&e.text)),
        Dir::Stderr => ("asterisk log", ""),
        Dir::Note => ("asterisk", ""),
    };
    let text = match e.dir {
        // Asterisk copies each stderr line into its log like this.
        Dir::Stderr => format!("stderr: {}", e.text),
        Dir::Note if e.text.starts_with("started ") => start.to_string(),
        _ => e.text.clone(),
    };
    Some(Line {
        at: e.at,
        who,
        text,
        about,
    })
}

/// A few words on what a command does, for readers new to ExternalIVR.
fn command_about(line: &str) -> &'static str {
    match line.as_bytes().first() {
        Some(b'S') => "play now, dropping the playlist",
        Some(b'A') => "add to the playlist",
        Some(b'G') => "read channel variables",
        Some(b'V') => "set channel variables",
        Some(b'E') => "leave ExternalIVR: the dialplan goes on",
        Some(b'H') => "hang up",
        Some(b'I') => "interrupt the playlist",
        Some(b'L') => "log a line in Asterisk",
        _ => "",
    }
}

fn event_about(line: &str) -> &'static str {
    match line.as_bytes().first() {
        Some(b'F') => "a file finished playing",
        Some(b'G') => "the variables' values",
        Some(b'T') | Some(b'D') => "playlist cleared",
        Some(b'Z') => "file not found",
        Some(b'H') => "hung up",
        Some(b'E') => "exit acknowledged",
        Some(b'0'..=b'9') | Some(b'*') | Some(b'#') => "the caller pressed a key",
        _ => "",
    }
}

/// Control characters escaped, so every line stays one line.
fn shown(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            c if c.is_control() => c.escape_default().to_string(),
            c => c.to_string(),
        })
        .collect()
}
