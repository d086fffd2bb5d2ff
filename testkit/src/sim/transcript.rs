//! A timed record of everything that crossed the simulated wire.

use std::fmt;
use std::time::Duration;

/// What one transcript line is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// An event line Asterisk sent to the child.
    Event,
    /// A command line Asterisk read from the child (as stripped).
    Command,
    /// A line the child wrote on stderr.
    Stderr,
    /// What the simulator did or noticed (cues, warnings, the end).
    Note,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Time since the child was started.
    pub at: Duration,
    pub dir: Dir,
    /// The line without its newline.
    pub text: String,
}

#[derive(Debug, Clone, Default)]
pub struct Transcript {
    pub entries: Vec<Entry>,
}

impl Transcript {
    pub fn push(&mut self, at: Duration, dir: Dir, text: impl Into<String>) {
        self.entries.push(Entry {
            at,
            dir,
            text: text.into(),
        });
    }

    /// The lines of one direction, in order.
    pub fn lines(&self, dir: Dir) -> impl Iterator<Item = &str> {
        self.entries
            .iter()
            .filter(move |e| e.dir == dir)
            .map(|e| e.text.as_str())
    }
}

impl fmt::Display for Transcript {
    /// One line per entry: time, direction (`->` to the child, `<-` from
    /// it, `err` its stderr, `..` a note), then the text with control
    /// characters escaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.entries {
            let arrow = match e.dir {
                Dir::Event => "->",
                Dir::Command => "<-",
                Dir::Stderr => "err",
                Dir::Note => "..",
            };
            writeln!(
                f,
                "{:>9.3}s {arrow:<3} {}",
                e.at.as_secs_f64(),
                show(&e.text)
            )?;
        }
        Ok(())
    }
}

/// Control characters and backslashes escaped, everything else as is.
fn show(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
    out
}
