//! Rendering commands: the one place that enforces the wire rules.
//!
//! How Asterisk reads a command (app_externalivr.c): `fgets` into 1024 bytes,
//! strip surrounding white space, ignore lines under 3 characters, take the
//! first byte as the letter and everything from the third byte on as data.
//! So, for every line we write:
//! - no CR, LF or NUL anywhere (a newline would start a second command);
//! - 3..=[`MAX_LINE`] bytes before the `\n`, counted after that strip, so
//!   an empty or blank message is padded and long text is cut on a UTF-8
//!   boundary instead of spilling into a second command;
//! - `V` is split on every comma and then on the first `=`, and a name
//!   ending in `)` would be a dialplan function write, so names are plain
//!   variable names and values never hold a comma;
//! - `G` is split on every comma, so a name can never hold one.
//!
//! Free text (messages, values) is cleaned, since it ends up in Asterisk's
//! log or the dialplan: line breaks and tabs become spaces, other control
//! characters and Unicode bidi/format characters are removed. Names and
//! sound files are not cleaned but refused: a silently changed file name
//! would no longer match the `F`/`Z` events the call waits for, and a
//! changed variable name would set the wrong variable.

use std::borrow::Cow;

use super::{Command, Event, EventLine, excerpt};

/// The longest command line, in bytes, not counting its `\n`: Asterisk's
/// `fgets(input, 1024, …)` takes 1023 bytes, and the newline must be among
/// them or the rest of the line is read as the next command.
pub const MAX_LINE: usize = 1022;

/// Room for data after `<letter>,`.
const MAX_DATA: usize = MAX_LINE - 2;

/// Sent instead of an empty message: `E,` alone is under 3 characters and
/// Asterisk would ignore it, leaving the call stuck in ExternalIVR.
const EMPTY_MESSAGE: &str = "popivr";

/// Why a command cannot be written. Each message quotes a short, escaped
/// excerpt of the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("invalid variable name \"{0}\" (want [A-Za-z_][A-Za-z0-9_]*)")]
    BadVarName(String),
    #[error(
        "invalid variable name to read \"{0}\" (empty, or holds a comma, space or control character)"
    )]
    BadGetName(String),
    #[error(
        "invalid sound file name \"{0}\" (empty, or holds a comma, space or control character)"
    )]
    BadFileName(String),
    #[error("invalid DTMF digits \"{0}\" (want [0-9A-D*#wW]+)")]
    BadDigits(String),
    #[error("{0} command with nothing in it")]
    Empty(char),
    #[error("{0} command does not fit in one line of {MAX_LINE} bytes")]
    TooLong(char),
}

/// Render one command as the line Asterisk reads, `\n` included.
pub fn render(cmd: &Command) -> Result<String, WireError> {
    let (letter, data): (char, Cow<str>) = match cmd {
        Command::Play(file) => ('S', file_name(file)?.into()),
        Command::Append(file) => ('A', file_name(file)?.into()),
        // Commands without data still need a third character.
        Command::Interrupt => ('I', "x".into()),
        Command::Answer => ('T', "x".into()),
        Command::GetParams => ('P', "x".into()),
        Command::Autoclear(on) => ('O', if *on { "autoclear" } else { "noautoclear" }.into()),
        Command::SetVars(vars) => ('V', set_vars(vars)?.into()),
        Command::GetVars(names) => ('G', get_vars(names)?.into()),
        Command::SendDtmf {
            digits,
            interval_ms,
            duration_ms,
        } => ('D', dtmf(digits, *interval_ms, *duration_ms)?.into()),
        Command::Log(msg) => ('L', message(msg).into()),
        Command::Exit(msg) => ('E', message(msg).into()),
        Command::Hangup(msg) => ('H', message(msg).into()),
    };
    let line = format!("{letter},{data}\n");
    debug_assert!((4..=MAX_LINE + 1).contains(&line.len()), "{line:?}");
    debug_assert!(
        !line[..line.len() - 1].chars().any(char::is_control),
        "{line:?}"
    );
    Ok(line)
}

/// A plain channel variable name, `[A-Za-z_][A-Za-z0-9_]*`. This is all `V`
/// ever writes to: no `(`/`)`, so never a dialplan function write, and no
/// `,`/`=`, so a name cannot split into several assignments.
pub fn valid_var_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Control characters (C0, DEL, C1: CR, LF, NUL, ESC…) and the invisible
/// Unicode format characters that reorder or hide text in a log or an IM
/// client: bidi embeddings, overrides, isolates and marks, zero-width
/// characters, line/paragraph separators, the BOM and tag characters.
pub(crate) fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{061C}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
                | '\u{E0000}'..='\u{E007F}'
        )
}

/// `text` without control and bidi/format characters (see the module doc):
/// line breaks and tabs become a space, so words on two lines stay two
/// words; the others are removed. Commas and `=` are kept: they are harmless
/// outside `V`.
pub fn clean_text(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return text.into();
    }
    text.chars()
        .filter_map(|c| match c {
            c if is_unsafe(c) && c.is_whitespace() => Some(' '),
            c if is_unsafe(c) => None,
            c => Some(c),
        })
        .collect::<String>()
        .into()
}

/// A value that is safe in a `V` assignment: [`clean_text`], then each `,`
/// becomes a space (Asterisk would start a new assignment there), then
/// surrounding white space is trimmed (Asterisk strips it from the last
/// value of the line anyway; trimming all keeps a value the same wherever it
/// stands). `=` is kept: Asterisk splits an assignment on its first `=`
/// only, and our names never hold one, so a later `=` is plain data.
pub fn sanitize_value(value: &str) -> String {
    clean_text(value).replace(',', " ").trim().to_string()
}

/// The longest prefix of `s` that fits in `max` bytes without cutting a
/// character.
fn cut(s: &str, max: usize) -> &str {
    &s[..s.floor_char_boundary(max)]
}

/// Free text for `L`, `E` and `H`: cleaned, cut to fit, never blank (after
/// Asterisk's strip a blank message would leave `E,`, which it ignores).
fn message(msg: &str) -> String {
    let cleaned = clean_text(msg);
    let fitted = cut(cleaned.trim(), MAX_DATA).trim_end();
    if fitted.is_empty() {
        EMPTY_MESSAGE
    } else {
        fitted
    }
    .to_string()
}

fn file_name(file: &str) -> Result<&str, WireError> {
    let bad = file.is_empty()
        || file.len() > MAX_DATA
        || file
            .chars()
            .any(|c| c == ',' || c.is_whitespace() || is_unsafe(c));
    if bad {
        Err(WireError::BadFileName(excerpt(file.as_bytes())))
    } else {
        Ok(file)
    }
}

/// `name=value,…`. Names must be valid; values are sanitized. When the line
/// would be too long, values are shortened fairly (the longest first) so
/// every name still gets set; only when the names alone do not fit are the
/// last assignments dropped whole. A name is never cut.
fn set_vars(vars: &[(String, String)]) -> Result<String, WireError> {
    if let Some((bad, _)) = vars.iter().find(|(name, _)| !valid_var_name(name)) {
        return Err(WireError::BadVarName(excerpt(bad.as_bytes())));
    }
    // Bytes taken by the names, `=` and separating commas of the kept prefix.
    let mut fixed = 0;
    let mut kept = 0;
    for (name, _) in vars {
        let need = fixed + usize::from(kept > 0) + name.len() + 1;
        if need > MAX_DATA {
            break;
        }
        fixed = need;
        kept += 1;
    }
    if kept == 0 {
        return Err(if vars.is_empty() {
            WireError::Empty('V')
        } else {
            WireError::TooLong('V')
        });
    }
    let vars = &vars[..kept];
    let values: Vec<String> = vars.iter().map(|(_, v)| sanitize_value(v)).collect();
    let lens: Vec<usize> = values.iter().map(String::len).collect();
    let cap = fair_cap(&lens, MAX_DATA - fixed);
    let assignments: Vec<String> = vars
        .iter()
        .zip(&values)
        .map(|((name, _), value)| format!("{name}={}", cut(value, cap).trim_end()))
        .collect();
    Ok(assignments.join(","))
}

/// The largest `cap` such that the lengths, each limited to `cap`, sum to at
/// most `budget`: cutting every value to `cap` shortens only the longest.
fn fair_cap(lens: &[usize], budget: usize) -> usize {
    let total = |cap: usize| lens.iter().map(|&l| l.min(cap)).sum::<usize>();
    let (mut lo, mut hi) = (0, lens.iter().copied().max().unwrap_or(0));
    if total(hi) <= budget {
        return hi;
    }
    // total(lo) <= budget < total(hi)
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if total(mid) <= budget {
            lo = mid
        } else {
            hi = mid
        }
    }
    lo
}

/// A name for `G`: a variable, or a function read such as `CALLERID(num)`.
/// Asterisk splits the data of `G` on every comma, parentheses or not, so a
/// name with a comma (`PJSIP_HEADER(read,X-Foo)`) can never be asked for,
/// alone or not: it is refused. White space is refused too, since Asterisk
/// strips it from the end of the line and the answer would name something
/// else. Dropping a name to make the line fit would shift the answer that
/// the caller matches by position, so a line that does not fit is an error.
///
/// Beware: Asterisk answers `G` with `pbx_builtin_getvar_helper`, which
/// looks up channel and global variables only. A function (`CALLERID(num)`)
/// or a built-in (`EXTEN`, `UNIQUEID`) is not evaluated and comes back
/// empty; the dialplan has to copy such values into variables first.
fn get_vars(names: &[String]) -> Result<String, WireError> {
    if names.is_empty() {
        return Err(WireError::Empty('G'));
    }
    for name in names {
        let bad = name.is_empty()
            || name
                .chars()
                .any(|c| c == ',' || c.is_whitespace() || is_unsafe(c));
        if bad {
            return Err(WireError::BadGetName(excerpt(name.as_bytes())));
        }
    }
    let data = names.join(",");
    if data.len() > MAX_DATA {
        return Err(WireError::TooLong('G'));
    }
    Ok(data)
}

/// `digits[,interval][,duration]`. Digits are checked, not cleaned: sending
/// a different number than asked is worse than sending none.
fn dtmf(
    digits: &str,
    interval_ms: Option<u32>,
    duration_ms: Option<u32>,
) -> Result<String, WireError> {
    let ok = !digits.is_empty()
        && digits
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'D' | b'*' | b'#' | b'w' | b'W'));
    if !ok {
        return Err(WireError::BadDigits(excerpt(digits.as_bytes())));
    }
    let options = match (interval_ms, duration_ms) {
        (None, None) => String::new(),
        (Some(i), None) => format!(",{i}"),
        // An empty interval keeps the duration in its place.
        (i, Some(d)) => format!(",{},{d}", i.map_or(String::new(), |i| i.to_string())),
    };
    let data = format!("{digits}{options}");
    if data.len() > MAX_DATA {
        return Err(WireError::TooLong('D'));
    }
    Ok(data)
}

impl EventLine {
    /// The line as Asterisk writes it, `\n` included. The time is written
    /// with 10 digits (zero-padded), the only form [`super::parse_event`]
    /// accepts; a time past 9999999999 would not parse back.
    pub fn to_wire(&self) -> String {
        let (tag, data): (char, Option<Cow<str>>) = match &self.event {
            Event::Dtmf(key) => (*key, None),
            Event::Hangup => ('H', None),
            Event::Exit => ('E', None),
            Event::Failed(what) => ('Z', what.as_deref().map(Cow::from)),
            Event::Interrupted(file) => ('T', Some(file.into())),
            Event::Dropped(file) => ('D', Some(file.into())),
            Event::Finished(file) => ('F', Some(file.into())),
            Event::Params(args) => ('P', Some(args.join(",").into())),
            Event::Vars(data) => ('G', Some(data.into())),
            Event::Inform(what) => ('I', Some(what.into())),
        };
        match data {
            Some(d) => format!("{tag},{:010},{d}\n", self.ts),
            None => format!("{tag},{:010}\n", self.ts),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(cmd: Command) -> String {
        render(&cmd).unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
    }

    fn vars(pairs: &[(&str, &str)]) -> Command {
        Command::SetVars(
            pairs
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// What Asterisk's `ast_eivr_setvariable` makes of a `V` line.
    fn asterisk_split_v(line: &str) -> Vec<(String, String)> {
        let data = line
            .trim_end_matches('\n')
            .trim()
            .strip_prefix("V,")
            .unwrap();
        data.split(',')
            .map(|piece| match piece.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None => (piece.to_string(), String::new()),
            })
            .collect()
    }

    #[test]
    fn every_simple_command() {
        assert_eq!(line(Command::Play("custom/hold".into())), "S,custom/hold\n");
        assert_eq!(line(Command::Append("silence/1".into())), "A,silence/1\n");
        assert_eq!(line(Command::Autoclear(true)), "O,autoclear\n");
        assert_eq!(line(Command::Autoclear(false)), "O,noautoclear\n");
        assert_eq!(
            line(Command::Log("call 1 popped".into())),
            "L,call 1 popped\n"
        );
        assert_eq!(line(Command::Exit("desk".into())), "E,desk\n");
        assert_eq!(
            line(Command::Hangup("agent, said h".into())),
            "H,agent, said h\n"
        );
    }

    #[test]
    fn commands_without_data_are_three_characters() {
        assert_eq!(line(Command::Interrupt), "I,x\n");
        assert_eq!(line(Command::Answer), "T,x\n");
        assert_eq!(line(Command::GetParams), "P,x\n");
    }

    #[test]
    fn empty_or_blank_messages_are_padded() {
        for msg in ["", "   ", "\r\n", "\u{202E}", " \t\u{200B} "] {
            assert_eq!(line(Command::Exit(msg.into())), "E,popivr\n", "{msg:?}");
            assert_eq!(line(Command::Hangup(msg.into())), "H,popivr\n", "{msg:?}");
            assert_eq!(line(Command::Log(msg.into())), "L,popivr\n", "{msg:?}");
        }
    }

    #[test]
    fn messages_lose_control_and_bidi_characters() {
        let got = line(Command::Log(
            "a\r\nE,x\0b\u{1b}[2J\u{202E}c\u{2066}d\u{200F}e\u{85}f".into(),
        ));
        assert_eq!(got, "L,a  E,xb[2Jcde f\n");
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        // 'é' is two bytes; 2000 of them cannot end on an even cut by luck.
        let msg = format!("x{}", "é".repeat(2000));
        let got = line(Command::Exit(msg.clone()));
        assert!(got.len() <= MAX_LINE + 1, "{}", got.len());
        assert!(got.len() >= MAX_LINE, "cut too short: {}", got.len());
        assert!(msg.starts_with(&got[2..got.len() - 1]));
        assert_eq!(got.matches('\n').count(), 1);
    }

    #[test]
    fn messages_end_without_white_space_after_a_cut() {
        let msg = format!("{}  tail", "a".repeat(MAX_DATA - 1));
        let got = line(Command::Log(msg));
        assert_eq!(got, format!("L,{}\n", "a".repeat(MAX_DATA - 1)));
    }

    #[test]
    fn file_names_are_checked() {
        for bad in [
            "",
            "a,b",
            "hold music",
            "hold\n",
            "hold\r",
            "ho\0ld",
            " hold",
            "hold\u{202E}",
        ] {
            assert!(
                matches!(
                    render(&Command::Play(bad.into())),
                    Err(WireError::BadFileName(_))
                ),
                "{bad:?}"
            );
            assert!(
                matches!(
                    render(&Command::Append(bad.into())),
                    Err(WireError::BadFileName(_))
                ),
                "{bad:?}"
            );
        }
        let long = "a".repeat(MAX_DATA + 1);
        assert!(matches!(
            render(&Command::Play(long)),
            Err(WireError::BadFileName(_))
        ));
        let longest = "a".repeat(MAX_DATA);
        assert_eq!(line(Command::Play(longest.clone())).len(), MAX_LINE + 1);
    }

    #[test]
    fn var_names_are_plain() {
        for ok in ["A", "_", "POPIVR_ACTION", "x9_"] {
            assert!(valid_var_name(ok), "{ok:?}");
        }
        for bad in [
            "",
            "9X",
            "CALLERID(name)",
            "A=B",
            "A,B",
            "A B",
            "Ä",
            "A-B",
            "A\n",
            "DB(x)",
        ] {
            assert!(!valid_var_name(bad), "{bad:?}");
            assert!(
                matches!(
                    render(&vars(&[("OK", "1"), (bad, "v")])),
                    Err(WireError::BadVarName(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn var_values_cannot_inject_assignments() {
        let got = line(vars(&[
            ("POPIVR_REPLY", "1,FILE(/tmp/x)=y"),
            ("POPIVR_AGENT", "a@b"),
        ]));
        assert_eq!(got, "V,POPIVR_REPLY=1 FILE(/tmp/x)=y,POPIVR_AGENT=a@b\n");
        let names: Vec<String> = asterisk_split_v(&got).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["POPIVR_REPLY", "POPIVR_AGENT"]);
    }

    #[test]
    fn sanitize_value_rules() {
        assert_eq!(sanitize_value("a,b"), "a b");
        assert_eq!(sanitize_value("k=v=w"), "k=v=w");
        assert_eq!(sanitize_value(" padded ,"), "padded");
        assert_eq!(sanitize_value("x\r\ny\0z"), "x  yz");
        assert_eq!(
            sanitize_value("\u{202E}evil\u{2066}\u{2069}\u{200E}\u{200F}\u{FEFF}"),
            "evil"
        );
        assert_eq!(sanitize_value("Grüße 👋"), "Grüße 👋");
    }

    #[test]
    fn var_values_are_sanitized_in_the_line() {
        let got = line(vars(&[("R", "a\nH,x\u{202E}"), ("S", "")]));
        assert_eq!(got, "V,R=a H x,S=\n");
    }

    #[test]
    fn empty_set_and_get_are_errors() {
        assert_eq!(
            render(&Command::SetVars(vec![])),
            Err(WireError::Empty('V'))
        );
        assert_eq!(
            render(&Command::GetVars(vec![])),
            Err(WireError::Empty('G'))
        );
    }

    #[test]
    fn long_values_are_shortened_fairly_and_every_name_kept() {
        let long = "v".repeat(3000);
        let got = line(vars(&[
            ("POPIVR_ACTION", "forward"),
            ("POPIVR_REPLY", &long),
            ("POPIVR_AGENT", &long),
            ("POPIVR_TARGET", "2001"),
        ]));
        assert!(got.len() <= MAX_LINE + 1, "{}", got.len());
        let split = asterisk_split_v(&got);
        let names: Vec<&str> = split.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "POPIVR_ACTION",
                "POPIVR_REPLY",
                "POPIVR_AGENT",
                "POPIVR_TARGET"
            ]
        );
        assert_eq!(split[0].1, "forward");
        assert_eq!(split[3].1, "2001");
        // The two long values share what is left.
        assert_eq!(split[1].1.len(), split[2].1.len());
        assert!(split[1].1.len() > 400, "{}", split[1].1.len());
    }

    #[test]
    fn shortened_values_are_cut_on_a_char_boundary() {
        let got = line(vars(&[("A", &"€".repeat(1000))]));
        assert!(got.len() <= MAX_LINE + 1);
        assert!(got[4..got.len() - 1].chars().all(|c| c == '€'));
    }

    #[test]
    fn assignments_whose_names_do_not_fit_are_dropped_whole() {
        let name_a = "A".repeat(600);
        let name_b = "B".repeat(600);
        let got = line(vars(&[(&name_a, "1"), (&name_b, "2")]));
        assert_eq!(got, format!("V,{name_a}=1\n"));
        let too_long = "C".repeat(MAX_DATA);
        assert_eq!(
            render(&vars(&[(&too_long, "1")])),
            Err(WireError::TooLong('V'))
        );
    }

    #[test]
    fn get_names_may_be_function_reads_without_commas() {
        let names = vec![
            "CALLERID(num)".to_string(),
            "EXTEN".into(),
            "DB(a/b)".into(),
        ];
        assert_eq!(
            line(Command::GetVars(names)),
            "G,CALLERID(num),EXTEN,DB(a/b)\n"
        );
    }

    #[test]
    fn get_names_with_commas_or_junk_are_refused() {
        for bad in [
            "PJSIP_HEADER(read,X-Foo)",
            "",
            "A B",
            "A\n",
            "A\r",
            "A\0",
            "A\u{202E}",
            "A ",
        ] {
            let cmd = Command::GetVars(vec!["EXTEN".into(), bad.into()]);
            assert!(
                matches!(render(&cmd), Err(WireError::BadGetName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn get_lines_that_do_not_fit_are_errors() {
        let names: Vec<String> = (0..200).map(|i| format!("VARIABLE_{i:04}")).collect();
        assert_eq!(
            render(&Command::GetVars(names)),
            Err(WireError::TooLong('G'))
        );
    }

    #[test]
    fn dtmf_forms() {
        let d = |digits: &str, i, d| Command::SendDtmf {
            digits: digits.into(),
            interval_ms: i,
            duration_ms: d,
        };
        assert_eq!(
            line(d("0123456789ABCD*#wW", None, None)),
            "D,0123456789ABCD*#wW\n"
        );
        assert_eq!(line(d("1", Some(100), None)), "D,1,100\n");
        assert_eq!(line(d("1", None, Some(200))), "D,1,,200\n");
        assert_eq!(line(d("1", Some(100), Some(200))), "D,1,100,200\n");
    }

    #[test]
    fn dtmf_digits_are_checked() {
        for bad in ["", "12a", "1,2", "1 2", "E", "1\n", "١"] {
            let cmd = Command::SendDtmf {
                digits: bad.into(),
                interval_ms: None,
                duration_ms: None,
            };
            assert!(
                matches!(render(&cmd), Err(WireError::BadDigits(_))),
                "{bad:?}"
            );
        }
        let cmd = Command::SendDtmf {
            digits: "1".repeat(MAX_DATA),
            interval_ms: Some(1),
            duration_ms: None,
        };
        assert_eq!(render(&cmd), Err(WireError::TooLong('D')));
    }

    #[test]
    fn error_messages_are_log_safe() {
        let err = render(&Command::Play("a\nb\u{202E}".repeat(100)))
            .unwrap_err()
            .to_string();
        assert!(
            err.is_ascii() && !err.bytes().any(|b| b.is_ascii_control()),
            "{err}"
        );
        assert!(err.len() < 400, "{err}");
    }

    #[test]
    fn events_render_as_asterisk_writes_them() {
        let ev = |event| EventLine {
            ts: 1_700_000_000,
            event,
        };
        assert_eq!(ev(Event::Dtmf('#')).to_wire(), "#,1700000000\n");
        assert_eq!(ev(Event::Hangup).to_wire(), "H,1700000000\n");
        assert_eq!(ev(Event::Exit).to_wire(), "E,1700000000\n");
        assert_eq!(ev(Event::Failed(None)).to_wire(), "Z,1700000000\n");
        assert_eq!(
            ev(Event::Failed(Some("x".into()))).to_wire(),
            "Z,1700000000,x\n"
        );
        assert_eq!(
            ev(Event::Interrupted("f".into())).to_wire(),
            "T,1700000000,f\n"
        );
        assert_eq!(ev(Event::Dropped("f".into())).to_wire(), "D,1700000000,f\n");
        assert_eq!(
            ev(Event::Finished("f".into())).to_wire(),
            "F,1700000000,f\n"
        );
        assert_eq!(
            ev(Event::Params(vec!["/p".into(), "a".into()])).to_wire(),
            "P,1700000000,/p,a\n"
        );
        assert_eq!(
            ev(Event::Vars("A=1,B=2".into())).to_wire(),
            "G,1700000000,A=1,B=2\n"
        );
        assert_eq!(
            ev(Event::Inform("HANGUP".into())).to_wire(),
            "I,1700000000,HANGUP\n"
        );
        assert_eq!(
            EventLine {
                ts: 7,
                event: Event::Hangup
            }
            .to_wire(),
            "H,0000000007\n"
        );
    }
}
