//! Property tests for the ExternalIVR codec: the parser never panics, events
//! survive a trip through the wire, and no command, whatever it holds, can
//! break the line rules Asterisk reads by.

use popivr::eivr::{
    Command, Event, EventLine, MAX_LINE, WireError, parse_event, render, sanitize_value,
    valid_var_name,
};
use proptest::prelude::*;

/// Characters that have bitten line protocols before, mixed with anything.
fn nasty_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => any::<char>(),
        4 => prop::char::range('a', 'z'),
        6 => prop::sample::select(vec![
            ',', '=', '(', ')', '\r', '\n', '\0', ' ', '\t', '\u{0b}', '\u{1b}', '\u{85}',
            '\u{202E}', '\u{2066}', '\u{2069}', '\u{200E}', '\u{200F}', '\u{FEFF}', '\u{2028}',
            'é', '€', '😀', '\u{A0}',
        ]),
    ]
}

/// Up to `max` chars; long enough (given `max`) to overflow a line.
fn nasty_string(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(nasty_char(), 0..max).prop_map(String::from_iter)
}

/// Long text made cheaply: a short nasty string repeated, so lines overflow
/// without generating thousands of values one by one.
fn long_nasty() -> impl Strategy<Value = String> {
    (nasty_string(40), 1..60usize).prop_map(|(s, n)| s.repeat(n))
}

fn var_name() -> impl Strategy<Value = String> {
    prop_oneof![4 => "[A-Za-z_][A-Za-z0-9_]{0,15}", 1 => nasty_string(12)]
}

fn file_name() -> impl Strategy<Value = String> {
    prop_oneof![3 => "[a-z0-9_/.-]{1,40}", 1 => nasty_string(40)]
}

fn command() -> impl Strategy<Value = Command> {
    let vars = prop::collection::vec((var_name(), long_nasty()), 0..6);
    let names = prop::collection::vec(
        prop_oneof!["[A-Z_]{1,10}(\\([a-z,]{0,8}\\))?", nasty_string(10)],
        0..6,
    );
    let digits = prop_oneof!["[0-9A-D*#wW]{1,30}", nasty_string(10)];
    prop_oneof![
        file_name().prop_map(Command::Play),
        file_name().prop_map(Command::Append),
        Just(Command::Interrupt),
        any::<bool>().prop_map(Command::Autoclear),
        vars.prop_map(Command::SetVars),
        names.prop_map(Command::GetVars),
        Just(Command::Answer),
        (digits, any::<Option<u32>>(), any::<Option<u32>>()).prop_map(
            |(digits, interval_ms, duration_ms)| Command::SendDtmf {
                digits,
                interval_ms,
                duration_ms,
            }
        ),
        long_nasty().prop_map(Command::Log),
        Just(Command::GetParams),
        long_nasty().prop_map(Command::Exit),
        long_nasty().prop_map(Command::Hangup),
    ]
}

fn letter(cmd: &Command) -> char {
    match cmd {
        Command::Play(_) => 'S',
        Command::Append(_) => 'A',
        Command::Interrupt => 'I',
        Command::Autoclear(_) => 'O',
        Command::SetVars(_) => 'V',
        Command::GetVars(_) => 'G',
        Command::Answer => 'T',
        Command::SendDtmf { .. } => 'D',
        Command::Log(_) => 'L',
        Command::GetParams => 'P',
        Command::Exit(_) => 'E',
        Command::Hangup(_) => 'H',
    }
}

/// What Asterisk's `ast_eivr_setvariable` does with the data of a `V`: split
/// on every comma, then each piece on its first `=`.
fn asterisk_split_v(data: &str) -> Vec<(&str, &str)> {
    data.split(',')
        .map(|piece| piece.split_once('=').unwrap_or((piece, "")))
        .collect()
}

/// Invisible characters from the nasty set that reorder or hide text.
const INVISIBLE: [char; 7] = [
    '\u{202E}', '\u{2066}', '\u{2069}', '\u{200E}', '\u{200F}', '\u{FEFF}', '\u{2028}',
];

/// Unicode's format characters (category Cf: soft hyphen, bidi and
/// zero-width controls, tags…) and the line and paragraph separators,
/// with the unassigned points inside their blocks: invisible in a log or
/// a dialplan, so a name holding one is not one an admin wrote.
fn is_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061C}'
            | '\u{06DD}'
            | '\u{070F}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{E0000}'..='\u{E007F}'
    )
}

/// A name `G` can carry: no comma (Asterisk splits on each), no white
/// space, control or invisible character.
fn plausible_get_name(n: &str) -> bool {
    !n.is_empty()
        && !n.contains(',')
        && !n.contains(char::is_whitespace)
        && !n.contains(char::is_control)
        && !n.contains(is_format)
}

/// The bytes C's `isspace` strips (Asterisk's `ast_strip`).
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\u{0b}' | '\u{0c}' | '\r')
}

/// Event data as Asterisk could send it: no NUL or line break, and not
/// ending in white space (which the line strip would eat).
fn event_data() -> impl Strategy<Value = String> {
    nasty_string(60).prop_filter_map("blank", |s| {
        let s = s.replace(['\0', '\n', '\r'], "");
        let s = s.trim_end_matches(is_c_space);
        (!s.is_empty()).then(|| s.to_string())
    })
}

fn event() -> impl Strategy<Value = Event> {
    let params = prop::collection::vec(
        nasty_string(12).prop_map(|s| s.replace([',', '\0', '\n', '\r'], "")),
        1..5,
    )
    .prop_filter("not wire-safe", |args| {
        let joined = args.join(",");
        !joined.is_empty() && !joined.ends_with(is_c_space)
    });
    prop_oneof![
        prop::sample::select("0123456789ABCD*#".chars().collect::<Vec<_>>()).prop_map(Event::Dtmf),
        Just(Event::Hangup),
        Just(Event::Exit),
        prop::option::of(event_data()).prop_map(Event::Failed),
        event_data().prop_map(Event::Interrupted),
        event_data().prop_map(Event::Dropped),
        event_data().prop_map(Event::Finished),
        params.prop_map(Event::Params),
        prop_oneof![Just(String::new()), event_data()].prop_map(Event::Vars),
        event_data().prop_map(Event::Inform),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn parse_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse_event(&bytes);
    }

    #[test]
    fn parse_never_panics_on_near_valid_lines(
        tag in any::<u8>(),
        ts in "[0-9]{8,12}",
        tail in prop::collection::vec(any::<u8>(), 0..100),
    ) {
        let mut line = vec![tag, b','];
        line.extend(ts.as_bytes());
        line.extend(tail);
        if let Err(e) = parse_event(&line) {
            // Whatever the input, the message is one printable ASCII line.
            let msg = e.to_string();
            prop_assert!(msg.bytes().all(|b| (0x20..0x7f).contains(&b)), "{}", msg);
        }
    }

    #[test]
    fn events_round_trip(ts in 0u64..=9_999_999_999, event in event()) {
        let original = EventLine { ts, event };
        let wire = original.to_wire();
        prop_assert!(wire.ends_with('\n'));
        let parsed = parse_event(wire.trim_end_matches('\n').as_bytes());
        prop_assert_eq!(parsed, Ok(original), "{:?}", wire);
    }

    #[test]
    fn every_rendered_line_keeps_the_wire_rules(cmd in command()) {
        let Ok(line) = render(&cmd) else { return Ok(()) };
        prop_assert!(line.ends_with('\n'), "{:?}", line);
        let body = &line[..line.len() - 1];
        prop_assert!(!body.contains(['\n', '\r', '\0']), "{:?}", line);
        prop_assert!(!body.chars().any(char::is_control), "{:?}", line);
        prop_assert!(!body.contains(INVISIBLE), "{:?}", line);
        prop_assert!((4..=MAX_LINE + 1).contains(&line.len()), "{} bytes", line.len());
        // Asterisk strips white space and ignores what is then under 3 chars.
        prop_assert!(body.trim_matches(is_c_space).len() >= 3, "{:?}", line);
        let prefix = format!("{},", letter(&cmd));
        prop_assert!(line.starts_with(&prefix), "{:?}", line);
    }

    #[test]
    fn set_vars_split_into_exactly_the_given_names(
        vars in prop::collection::vec((var_name(), long_nasty()), 1..6),
    ) {
        let result = render(&Command::SetVars(vars.clone()));
        let all_valid = vars.iter().all(|(n, _)| valid_var_name(n));
        prop_assert_eq!(result.is_ok(), all_valid, "{:?}", result);
        let Ok(line) = result else {
            prop_assert!(matches!(result, Err(WireError::BadVarName(_))));
            return Ok(());
        };
        let data = line.trim_end_matches('\n').trim_matches(is_c_space).strip_prefix("V,").unwrap();
        let split = asterisk_split_v(data);
        let got: Vec<&str> = split.iter().map(|(n, _)| *n).collect();
        let want: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
        prop_assert_eq!(got, want);
        for ((_, value), (_, original)) in split.iter().zip(&vars) {
            prop_assert!(sanitize_value(original).starts_with(value), "{:?} / {:?}", value, original);
        }
    }

    #[test]
    fn get_vars_split_into_exactly_the_given_names(
        names in prop::collection::vec(prop_oneof!["[A-Z_]{1,10}(\\([a-z-]{1,8}\\))?", nasty_string(10)], 1..6),
    ) {
        if let Ok(line) = render(&Command::GetVars(names.clone())) {
            let data = line.strip_prefix("G,").unwrap().strip_suffix('\n').unwrap();
            prop_assert_eq!(data.split(',').collect::<Vec<_>>(), names);
        } else {
            prop_assert!(names.iter().any(|n| !plausible_get_name(n)), "{:?}", names);
        }
    }

    #[test]
    fn file_names_are_sent_unchanged_or_refused(file in file_name()) {
        match render(&Command::Play(file.clone())) {
            Ok(line) => prop_assert_eq!(line, format!("S,{file}\n")),
            Err(e) => prop_assert!(matches!(e, WireError::BadFileName(_))),
        }
    }
}
