//! Arbitrary text into the configuration parser and loader
//! (`parse_ini_str`, then `load_str`): it must never panic, every error
//! must say where it is (`file:line`, a line that exists), and a secret
//! written in the text must never come back in an error, a warning or a
//! `Debug` dump of what was loaded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use popivr::config::{load_str, parse_ini_str};

/// A path whose directory does not exist: relative `#include`,
/// `xmpp_conf` and `ca_file` paths fail instead of reading the disk.
const ORIGIN: &str = "/nonexistent/popivr-fuzz/popivr.conf";

fuzz_target!(|data: &[u8]| {
    // The loader takes text; invalid UTF-8 lines are its parser's business
    // only through files, so feed both a lossy and a strict view.
    let text = String::from_utf8_lossy(data);
    let lines = text.split('\n').count();
    let located = |file: &str, line: usize, shown: &str| {
        assert!(!file.is_empty(), "no file: {shown}");
        if file == ORIGIN {
            assert!(
                (1..=lines).contains(&line),
                "line {line} of {lines}: {shown}"
            );
        }
        assert!(
            shown.starts_with(file),
            "message does not start with its place: {shown}"
        );
    };

    let secrets = match parse_ini_str(&text, ORIGIN) {
        Ok(ini) => ini
            .sections
            .iter()
            .flat_map(|s| &s.entries)
            .filter(|e| {
                ["secret", "pass", "token", "pwd"]
                    .iter()
                    .any(|w| e.key.contains(w))
            })
            // Long enough to mean something, and written nowhere else.
            .filter(|e| e.value.len() >= 8 && e.value.chars().all(|c| c.is_ascii_alphanumeric()))
            .filter(|e| text.matches(e.value.as_str()).count() == 1)
            .map(|e| e.value.clone())
            .collect::<Vec<_>>(),
        Err(errors) => {
            assert!(!errors.is_empty());
            for e in &errors {
                located(&e.at.file, e.at.line, &e.to_string());
            }
            Vec::new()
        }
    };

    let mut shown = Vec::new();
    match load_str(&text, ORIGIN) {
        Ok(config) => {
            for w in &config.warnings {
                if let Some(rest) = w.strip_prefix(ORIGIN) {
                    let line: usize = rest
                        .strip_prefix(':')
                        .and_then(|r| r.split(':').next())
                        .and_then(|n| n.parse().ok())
                        .unwrap_or_else(|| panic!("warning without a line: {w}"));
                    assert!((1..=lines).contains(&line), "{w}");
                }
                shown.push(w.clone());
            }
            shown.push(format!("{config:?}"));
        }
        Err(e) => {
            assert!(!e.problems.is_empty());
            for p in &e.problems {
                let text = p.to_string();
                located(&p.at.file, p.at.line, &text);
                shown.push(text);
            }
            shown.push(e.to_string());
            shown.push(format!("{e:?}"));
        }
    }
    for secret in &secrets {
        for s in &shown {
            assert!(!s.contains(secret.as_str()), "secret {secret:?} shown: {s}");
        }
    }
});
