//! Arbitrary templates and values into the template renderer
//! (`template::render`, `template::render_url`): it must never panic, a
//! value must never bring a control, bidi or invisible format character
//! into the output, and rendering is a single pass: the output is exactly
//! the template with each placeholder replaced by its cleaned value, which
//! is never scanned again (checked against a rendering in which every value
//! is a unique marker character that no template holds).
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use popivr::eivr::clean_text;
use popivr::template::{Values, clean, render, render_url};

#[derive(Debug, Arbitrary)]
struct Input {
    template: String,
    caller: String,
    caller_name: String,
    number: String,
    called: String,
    outcome: String,
    agent: String,
    tag: String,
    sip: Vec<(String, String)>,
    vars: Vec<(String, String)>,
    args: Vec<(String, String)>,
    custom: Vec<(String, String)>,
}

/// Markers: supplementary private-use characters (plane 15), which no
/// cleaning removes and no placeholder syntax uses.
const MARK_BASE: u32 = 0xF0000;
const MARKS: u32 = 0xFFFE;

fn is_mark(c: char) -> bool {
    (MARK_BASE..MARK_BASE + MARKS).contains(&u32::from(c))
}

fn percent_encode(value: &str) -> String {
    let mut out = String::new();
    for &b in value.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `values` and a copy whose every value is a unique marker, with the
/// value each marker stands for.
fn marked(values: &Values) -> (Values, Vec<String>) {
    let mut originals = Vec::new();
    let mut mark = |v: &String| -> String {
        let c = char::from_u32(MARK_BASE + originals.len() as u32).expect("marker");
        originals.push(v.clone());
        c.to_string()
    };
    let map = |m: &BTreeMap<String, String>, mark: &mut dyn FnMut(&String) -> String| {
        m.iter().map(|(k, v)| (k.clone(), mark(v))).collect()
    };
    let marked = Values {
        caller: mark(&values.caller),
        caller_name: mark(&values.caller_name),
        number: mark(&values.number),
        // An empty `called` falls back to `number`: keep it empty.
        called: match values.called.is_empty() {
            true => String::new(),
            false => mark(&values.called),
        },
        outcome: mark(&values.outcome),
        agent: mark(&values.agent),
        tag: mark(&values.tag),
        sip: map(&values.sip, &mut mark),
        vars: map(&values.vars, &mut mark),
        args: map(&values.args, &mut mark),
        custom: map(&values.custom, &mut mark),
    };
    (marked, originals)
}

fn expand(out: &str, originals: &[String], insert: impl Fn(&str) -> String) -> String {
    out.chars()
        .map(|c| match is_mark(c) {
            true => insert(&originals[(u32::from(c) - MARK_BASE) as usize]),
            false => c.to_string(),
        })
        .collect()
}

fuzz_target!(|input: Input| {
    let to_map = |v: Vec<(String, String)>| v.into_iter().collect::<BTreeMap<_, _>>();
    let values = Values {
        caller: input.caller,
        caller_name: input.caller_name,
        number: input.number,
        called: input.called,
        outcome: input.outcome,
        agent: input.agent,
        tag: input.tag,
        sip: to_map(input.sip),
        vars: to_map(input.vars),
        args: to_map(input.args),
        custom: to_map(input.custom),
    };
    // Whatever the template, no panic.
    let _ = render(&input.template, &values);
    let _ = render_url(&input.template, &values);

    // A template that holds no unsafe character and no marker.
    let template: String = clean_text(&input.template)
        .chars()
        .filter(|&c| !is_mark(c))
        .collect();
    let out = render(&template, &values);
    assert_eq!(clean_text(&out), out, "a value brought an unsafe character");

    let (marked, originals) = marked(&values);
    if originals.len() as u32 > MARKS {
        return;
    }
    let shape = render(&template, &marked);
    assert_eq!(out, expand(&shape, &originals, clean), "{template:?}");

    // The same for links, with `%` kept out of the template so that an
    // encoded marker cannot be confused with template text.
    let template: String = template.chars().filter(|&c| c != '%').collect();
    let out = render_url(&template, &values);
    assert_eq!(clean_text(&out), out, "a value brought an unsafe character");
    let shape = render(&template, &marked);
    let want = expand(&shape, &originals, |v| percent_encode(&clean(v)));
    assert_eq!(out, want, "{template:?}");
});
