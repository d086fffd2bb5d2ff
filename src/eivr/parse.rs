//! Event lines from Asterisk: `<tag>,<10-digit unix time>[,<data>]`.
//!
//! Asterisk writes them with `fprintf("%c,%10d[,%s]\n")`. Anything else on
//! stdin (a stray newline inside a channel variable, a test typing by hand)
//! is reported as a typed [`ParseError`] that the caller logs and skips.

use nom::{
    IResult, Parser,
    branch::alt,
    bytes::complete::{tag as literal, take_while_m_n},
    character::complete::{anychar, char},
    combinator::{eof, map_res, opt, peek, rest},
    sequence::{preceded, terminated},
};

use super::{Event, EventLine, excerpt};

/// The longest event line accepted, newline excluded. Asterisk's longest
/// events are `G` answers (a 2048-byte buffer) and `P` (the program
/// arguments); this leaves room for both and bounds what a reader buffers.
pub const MAX_EVENT_LINE: usize = 4096;

/// Every tag Asterisk sends: the DTMF keys, then the events.
const TAGS: &str = "0123456789ABCD*#HEZTFPGI";

/// Why an event line was rejected. Each message quotes a short, escaped
/// excerpt of the line, so it can go to a log as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty event line")]
    Empty,
    #[error("event line too long ({len} bytes, limit {MAX_EVENT_LINE}): \"{excerpt}\"")]
    TooLong { len: usize, excerpt: String },
    #[error("NUL byte in event line: \"{excerpt}\"")]
    Nul { excerpt: String },
    #[error("event line is not valid UTF-8: \"{excerpt}\"")]
    InvalidUtf8 { excerpt: String },
    #[error("unknown event tag: \"{excerpt}\"")]
    UnknownTag { excerpt: String },
    #[error("no comma after the event tag: \"{excerpt}\"")]
    MissingComma { excerpt: String },
    #[error("bad timestamp (want exactly 10 digits): \"{excerpt}\"")]
    BadTimestamp { excerpt: String },
    #[error("event {tag} without its data: \"{excerpt}\"")]
    MissingData { tag: char, excerpt: String },
    #[error("event {tag} takes no data: \"{excerpt}\"")]
    UnexpectedData { tag: char, excerpt: String },
}

type NomError<'a> = nom::error::Error<&'a str>;

/// Ten ASCII digits, followed by the end or the data's comma (so an
/// eleven-digit time is refused rather than split).
fn timestamp(i: &str) -> IResult<&str, u64> {
    terminated(
        map_res(
            take_while_m_n(10, 10, |c: char| c.is_ascii_digit()),
            str::parse,
        ),
        peek(alt((eof, literal(",")))),
    )
    .parse(i)
}

/// `,data` to the end of the line, if there is a comma.
fn data(i: &str) -> IResult<&str, Option<&str>> {
    opt(preceded(char(','), rest)).parse(i)
}

/// C's `isspace` in the "C" locale, which is what Asterisk's `ast_strip` uses.
fn is_c_space(b: &u8) -> bool {
    b.is_ascii_whitespace() || *b == 0x0b
}

/// Parse one event line, without its newline. Surrounding white space
/// (including a trailing `\r`) is ignored, as Asterisk ignores it.
pub fn parse_event(line: &[u8]) -> Result<EventLine, ParseError> {
    let ex = || excerpt(line);
    if line.len() > MAX_EVENT_LINE {
        return Err(ParseError::TooLong {
            len: line.len(),
            excerpt: ex(),
        });
    }
    let start = line
        .iter()
        .position(|b| !is_c_space(b))
        .unwrap_or(line.len());
    let end = line
        .iter()
        .rposition(|b| !is_c_space(b))
        .map_or(start, |e| e + 1);
    let trimmed = &line[start..end];
    if trimmed.is_empty() {
        return Err(ParseError::Empty);
    }
    if trimmed.contains(&0) {
        return Err(ParseError::Nul { excerpt: ex() });
    }
    let text =
        std::str::from_utf8(trimmed).map_err(|_| ParseError::InvalidUtf8 { excerpt: ex() })?;

    let (i, tag) = anychar::<_, NomError>(text).map_err(|_| ParseError::Empty)?;
    if !TAGS.contains(tag) {
        return Err(ParseError::UnknownTag { excerpt: ex() });
    }
    let (i, _) = char::<_, NomError>(',')
        .parse(i)
        .map_err(|_| ParseError::MissingComma { excerpt: ex() })?;
    let (i, ts) = timestamp(i).map_err(|_| ParseError::BadTimestamp { excerpt: ex() })?;
    // `timestamp` leaves either nothing or ",..." behind, so this cannot fail.
    let (_, data) = data(i).map_err(|_| ParseError::BadTimestamp { excerpt: ex() })?;

    // Events that carry data need a non-empty one; Asterisk never sends an
    // empty file name or argument list.
    let required = || match data {
        Some(d) if !d.is_empty() => Ok(d.to_string()),
        _ => Err(ParseError::MissingData { tag, excerpt: ex() }),
    };
    let event = match tag {
        // A bare `D` is the key D; `D,<ts>,<file>` is a dropped file.
        'D' if data.is_some() => Event::Dropped(required()?),
        'Z' => Event::Failed(data.filter(|d| !d.is_empty()).map(str::to_string)),
        'T' => Event::Interrupted(required()?),
        'F' => Event::Finished(required()?),
        'P' => Event::Params(required()?.split(',').map(str::to_string).collect()),
        // Raw text, split later by `split_vars`; empty data is kept as is.
        'G' => Event::Vars(
            data.ok_or_else(|| ParseError::MissingData { tag, excerpt: ex() })?
                .to_string(),
        ),
        'I' => Event::Inform(required()?),
        _ if data.is_some() => return Err(ParseError::UnexpectedData { tag, excerpt: ex() }),
        'H' => Event::Hangup,
        'E' => Event::Exit,
        key => Event::Dtmf(key),
    };
    Ok(EventLine { ts, event })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TS: u64 = 1_700_000_000;

    fn ok(line: &str) -> Event {
        let parsed = parse_event(line.as_bytes()).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert_eq!(parsed.ts, TS, "{line:?}");
        parsed.event
    }

    fn err(line: &[u8]) -> ParseError {
        parse_event(line).expect_err(&String::from_utf8_lossy(line))
    }

    #[test]
    fn every_dtmf_key() {
        for key in "0123456789ABCD*#".chars() {
            assert_eq!(ok(&format!("{key},{TS}")), Event::Dtmf(key));
        }
    }

    #[test]
    fn bare_d_is_a_key_and_d_with_data_is_dropped() {
        assert_eq!(ok("D,1700000000"), Event::Dtmf('D'));
        assert_eq!(
            ok("D,1700000000,custom/hold"),
            Event::Dropped("custom/hold".into())
        );
    }

    #[test]
    fn hangup_and_exit() {
        assert_eq!(ok("H,1700000000"), Event::Hangup);
        assert_eq!(ok("E,1700000000"), Event::Exit);
    }

    #[test]
    fn failed_with_and_without_data() {
        assert_eq!(ok("Z,1700000000"), Event::Failed(None));
        assert_eq!(ok("Z,1700000000,"), Event::Failed(None));
        assert_eq!(
            ok("Z,1700000000,silence/1"),
            Event::Failed(Some("silence/1".into()))
        );
        assert_eq!(
            ok("Z,1700000000,ANSWER_FAILURE"),
            Event::Failed(Some("ANSWER_FAILURE".into()))
        );
    }

    #[test]
    fn file_events() {
        assert_eq!(ok("T,1700000000,hold"), Event::Interrupted("hold".into()));
        assert_eq!(
            ok("F,1700000000,custom/hold-music"),
            Event::Finished("custom/hold-music".into())
        );
    }

    #[test]
    fn params_split_on_commas() {
        assert_eq!(
            ok("P,1700000000,/usr/bin/popivr,sales,lang=de"),
            Event::Params(vec![
                "/usr/bin/popivr".into(),
                "sales".into(),
                "lang=de".into()
            ])
        );
        assert_eq!(
            ok("P,1700000000,/usr/bin/popivr"),
            Event::Params(vec!["/usr/bin/popivr".into()])
        );
    }

    #[test]
    fn vars_keep_raw_data() {
        assert_eq!(
            ok("G,1700000000,CALLERID(name)=Doe, John,EXTEN=200"),
            Event::Vars("CALLERID(name)=Doe, John,EXTEN=200".into())
        );
        assert_eq!(ok("G,1700000000,"), Event::Vars(String::new()));
    }

    #[test]
    fn inform() {
        assert_eq!(ok("I,1700000000,HANGUP"), Event::Inform("HANGUP".into()));
    }

    #[test]
    fn timestamp_value_is_kept() {
        let e = parse_event(b"H,0000000042").unwrap();
        assert_eq!(
            e,
            EventLine {
                ts: 42,
                event: Event::Hangup
            }
        );
        assert_eq!(parse_event(b"H,9999999999").unwrap().ts, 9_999_999_999);
    }

    #[test]
    fn surrounding_white_space_and_cr_are_ignored() {
        assert_eq!(ok("F,1700000000,hold\r"), Event::Finished("hold".into()));
        assert_eq!(ok("  5,1700000000 \t\r\n"), Event::Dtmf('5'));
        assert_eq!(ok("H,1700000000\x0b"), Event::Hangup);
    }

    #[test]
    fn data_keeps_inner_white_space() {
        assert_eq!(ok("F,1700000000, a b"), Event::Finished(" a b".into()));
    }

    #[test]
    fn empty_lines() {
        assert_eq!(err(b""), ParseError::Empty);
        assert_eq!(err(b" \r"), ParseError::Empty);
    }

    #[test]
    fn unknown_tags() {
        for line in [
            &b"X,1700000000"[..],
            b"a,1700000000",
            b"hello",
            b",1700000000",
        ] {
            assert!(
                matches!(err(line), ParseError::UnknownTag { .. }),
                "{line:?}"
            );
        }
    }

    #[test]
    fn missing_comma_after_tag() {
        assert!(matches!(
            err(b"H1700000000"),
            ParseError::MissingComma { .. }
        ));
        assert!(matches!(err(b"H"), ParseError::MissingComma { .. }));
    }

    #[test]
    fn timestamps_of_other_lengths_or_digits() {
        for line in [
            "H,",
            "H,123456789",
            "H,12345678901",
            "H,170000000x",
            "H,17000000 0",
            "F,123,file",
            "F,12345678901,file",
            "H,-170000000",
            "H,+170000000",
            // Non-ASCII digits are not digits here.
            "H,١٧٠٠٠٠٠٠٠٠",
        ] {
            assert!(
                matches!(err(line.as_bytes()), ParseError::BadTimestamp { .. }),
                "{line:?}"
            );
        }
    }

    #[test]
    fn events_that_need_data() {
        for (line, want) in [
            ("T,1700000000", 'T'),
            ("T,1700000000,", 'T'),
            ("F,1700000000", 'F'),
            ("D,1700000000,", 'D'),
            ("P,1700000000", 'P'),
            ("G,1700000000", 'G'),
            ("I,1700000000", 'I'),
        ] {
            match err(line.as_bytes()) {
                ParseError::MissingData { tag, .. } => assert_eq!(tag, want, "{line:?}"),
                e => panic!("{line:?}: {e:?}"),
            }
        }
    }

    #[test]
    fn events_that_take_no_data() {
        for (line, want) in [
            ("H,1700000000,x", 'H'),
            ("E,1700000000,", 'E'),
            ("5,1700000000,x", '5'),
        ] {
            match err(line.as_bytes()) {
                ParseError::UnexpectedData { tag, .. } => assert_eq!(tag, want, "{line:?}"),
                e => panic!("{line:?}: {e:?}"),
            }
        }
    }

    #[test]
    fn nul_bytes_are_refused() {
        assert!(matches!(
            err(b"F,1700000000,ho\0ld"),
            ParseError::Nul { .. }
        ));
        assert!(matches!(err(b"\0"), ParseError::Nul { .. }));
    }

    #[test]
    fn invalid_utf8_is_refused() {
        assert!(matches!(
            err(b"F,1700000000,\xc3\x28"),
            ParseError::InvalidUtf8 { .. }
        ));
        assert!(matches!(
            err(b"F,1700000000,\xff"),
            ParseError::InvalidUtf8 { .. }
        ));
        // Checked before the tag, so a bad first byte is an encoding error.
        assert!(matches!(
            err(b"\xff,1700000000"),
            ParseError::InvalidUtf8 { .. }
        ));
    }

    #[test]
    fn too_long_lines_are_refused() {
        let mut line = b"F,1700000000,".to_vec();
        line.resize(MAX_EVENT_LINE, b'a');
        assert!(parse_event(&line).is_ok());
        line.push(b'a');
        assert_eq!(
            err(&line),
            ParseError::TooLong {
                len: MAX_EVENT_LINE + 1,
                excerpt: excerpt(&line)
            }
        );
    }

    #[test]
    fn messages_are_log_safe_and_short() {
        let mut line = b"F,170000000,\x1b[31m\xe2\x80\xae\n\r".to_vec();
        line.extend(std::iter::repeat_n(b'x', 500));
        let msg = err(&line).to_string();
        assert!(msg.starts_with("bad timestamp"), "{msg}");
        assert!(msg.is_ascii(), "{msg}");
        assert!(!msg.bytes().any(|b| b.is_ascii_control()), "{msg}");
        assert!(msg.contains(r"\x1b[31m\xe2\x80\xae\n\r"), "{msg}");
        assert!(msg.len() < 200, "{msg}");
        assert!(msg.ends_with("...\""), "{msg}");
    }
}
