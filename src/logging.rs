//! Log lines on stderr, one event per line. In process mode Asterisk copies
//! each stderr line into its own log, so lines are short, single and plain.

use std::io::Write;
use std::sync::Arc;

use crate::call::Level;

#[derive(Clone)]
pub struct Logger {
    /// `popivr[<call id>]` or `popivr`.
    prefix: Arc<str>,
    max: Level,
}

impl Logger {
    pub fn new(prefix: impl Into<Arc<str>>, max: Level) -> Self {
        Logger {
            prefix: prefix.into(),
            max,
        }
    }

    pub fn with_prefix(&self, prefix: impl Into<Arc<str>>) -> Self {
        Logger {
            prefix: prefix.into(),
            max: self.max,
        }
    }

    pub fn enabled(&self, level: Level) -> bool {
        rank(level) <= rank(self.max)
    }

    pub fn at(&self, level: Level, text: &str) {
        if !self.enabled(level) {
            return;
        }
        let name = match level {
            Level::Error => "ERROR",
            Level::Warn => "WARNING",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        };
        // A newline in the text would forge a second log line, and bidi or
        // invisible characters (from caller data) would reorder or hide
        // text in Asterisk's log: the wire's own cleaning removes both.
        let text = crate::eivr::clean_text(text);
        let _ = writeln!(std::io::stderr().lock(), "{}: {name}: {text}", self.prefix);
    }

    pub fn error(&self, text: &str) {
        self.at(Level::Error, text)
    }
    pub fn warn(&self, text: &str) {
        self.at(Level::Warn, text)
    }
    pub fn info(&self, text: &str) {
        self.at(Level::Info, text)
    }
    pub fn debug(&self, text: &str) {
        self.at(Level::Debug, text)
    }
}

fn rank(level: Level) -> u8 {
    match level {
        Level::Error => 0,
        Level::Warn => 1,
        Level::Info => 2,
        Level::Debug => 3,
    }
}
