//! Placeholder rendering for pops and confirmations.
//!
//! | placeholder       | value                                              |
//! |-------------------|----------------------------------------------------|
//! | `$caller$`        | `CALLERID(num)`                                    |
//! | `$caller_name$`   | `CALLERID(name)`                                   |
//! | `$number$`        | `EXTEN`, the called extension                      |
//! | `$called$`        | `DNID` (the caller sets it; falls back to `EXTEN`) |
//! | `$outcome$`       | what was done with the call (confirm texts)        |
//! | `$agent$`         | the agent's bare JID                               |
//! | `$tag$`           | the call's short id (prefix a reply with `#tag`)   |
//! | `$name$`          | a per-agent custom value                           |
//! | `[sip.X-Header]`  | a SIP header read with `PJSIP_HEADER(read,…)`      |
//! | `${NAME}`         | any channel variable read, or a program argument   |
//! | `$$`              | a literal `$`                                      |
//!
//! One pass over the template: a substituted value is never scanned again,
//! so a caller name like `$caller$ ${X} [sip.Y]` comes out literally.
//! Unknown placeholders render empty; [`placeholders`] lists them for
//! `check`. Values are cleaned of control and bidi/format characters and cut
//! to [`MAX_VALUE_CHARS`] before insertion.

use std::collections::BTreeMap;

/// A substituted value is cut to this many characters.
pub const MAX_VALUE_CHARS: usize = 256;
/// Longest name inside `$…$`, `${…}` or `[sip.…]`; longer is literal text.
const MAX_NAME: usize = 128;

/// The `$word$` placeholders with a fixed meaning.
pub const BUILTIN: [&str; 7] = [
    "caller",
    "caller_name",
    "number",
    "called",
    "outcome",
    "agent",
    "tag",
];

/// What a call knows, for rendering.
///
/// `vars` holds the channel variables by the name they were read with
/// (`CALLERID(num)`); `args` the `key=value` program arguments. `${NAME}`
/// looks in `args` first, then `vars`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Values {
    pub caller: String,
    pub caller_name: String,
    pub number: String,
    pub called: String,
    pub outcome: String,
    pub agent: String,
    /// The call's short id.
    pub tag: String,
    /// SIP headers by name (matched without regard to case).
    pub sip: BTreeMap<String, String>,
    /// Channel variables by name.
    pub vars: BTreeMap<String, String>,
    /// Program arguments by key.
    pub args: BTreeMap<String, String>,
    /// Per-agent custom values, `$name$`.
    pub custom: BTreeMap<String, String>,
}

impl Values {
    fn word(&self, name: &str) -> Option<&str> {
        Some(match name {
            "caller" => &self.caller,
            "caller_name" => &self.caller_name,
            "number" => &self.number,
            "called" if self.called.is_empty() => &self.number,
            "called" => &self.called,
            "outcome" => &self.outcome,
            "agent" => &self.agent,
            "tag" => &self.tag,
            _ => return self.custom.get(name).map(String::as_str),
        })
    }

    fn var(&self, name: &str) -> Option<&str> {
        lookup(&self.args, name).or_else(|| lookup(&self.vars, name))
    }

    fn sip(&self, name: &str) -> Option<&str> {
        lookup(&self.sip, name)
    }

    fn value(&self, p: &Token<'_>) -> Option<&str> {
        match *p {
            Token::Word(w) => self.word(w),
            Token::Var(v) => self.var(v),
            Token::Sip(h) => self.sip(h),
            Token::Text(_) | Token::Dollar => None,
        }
    }
}

/// Exact name first, then without regard to ASCII case (Asterisk function
/// names and SIP header names are case-insensitive).
fn lookup<'a>(map: &'a BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    map.get(name)
        .or_else(|| {
            map.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
        .map(String::as_str)
}

/// A placeholder as written in a template.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Placeholder {
    /// `$word$`: one of [`BUILTIN`] or a per-agent custom name.
    Word(String),
    /// `${NAME}`.
    Var(String),
    /// `[sip.NAME]`.
    Sip(String),
}

impl Placeholder {
    pub fn is_builtin(&self) -> bool {
        matches!(self, Placeholder::Word(w) if BUILTIN.contains(&w.as_str()))
    }
}

impl std::fmt::Display for Placeholder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Placeholder::Word(w) => write!(f, "${w}$"),
            Placeholder::Var(v) => write!(f, "${{{v}}}"),
            Placeholder::Sip(h) => write!(f, "[sip.{h}]"),
        }
    }
}

/// Every placeholder in the template, in order of appearance, repeats
/// included.
pub fn placeholders(template: &str) -> Vec<Placeholder> {
    Scanner::new(template)
        .filter_map(|t| match t {
            Token::Word(w) => Some(Placeholder::Word(w.to_string())),
            Token::Var(v) => Some(Placeholder::Var(v.to_string())),
            Token::Sip(h) => Some(Placeholder::Sip(h.to_string())),
            Token::Text(_) | Token::Dollar => None,
        })
        .collect()
}

/// Fills in the template. Unknown placeholders render empty.
pub fn render(template: &str, values: &Values) -> String {
    render_with(template, values, |out, v| out.push_str(v))
}

/// Like [`render`], but every substituted value is percent-encoded (only
/// RFC 3986 unreserved characters are kept), for links into a CRM. The
/// template's own text is copied as it is.
pub fn render_url(template: &str, values: &Values) -> String {
    render_with(template, values, percent_encode)
}

fn render_with(template: &str, values: &Values, insert: impl Fn(&mut String, &str)) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    let mut clean_buf = String::new();
    for token in Scanner::new(template) {
        match token {
            Token::Text(t) => out.push_str(t),
            Token::Dollar => out.push('$'),
            ref p => {
                if let Some(v) = values.value(p) {
                    clean_into(v, &mut clean_buf);
                    insert(&mut out, &clean_buf);
                }
            }
        }
    }
    out
}

/// Cleans a value for insertion into `buf`: line breaks and tabs become a
/// space, other control and bidi/format characters go, and the result is
/// cut to [`MAX_VALUE_CHARS`].
fn clean_into(value: &str, buf: &mut String) {
    buf.clear();
    let mut n = 0;
    for c in value.chars() {
        if n == MAX_VALUE_CHARS {
            break;
        }
        let c = match c {
            '\t' | '\n' | '\r' | '\u{2028}' | '\u{2029}' | '\u{85}' => ' ',
            // The wire's own list: control, bidi and invisible format characters.
            c if crate::eivr::is_unsafe(c) => continue,
            c => c,
        };
        buf.push(c);
        n += 1;
    }
}

/// Cleans a value the way [`render`] does before inserting it.
pub fn clean(value: &str) -> String {
    let mut buf = String::new();
    clean_into(value, &mut buf);
    buf
}

/// Undo `%XX` escapes (Asterisk's `URIENCODE()`); anything else, a stray
/// `%` included, stays as it is, and bytes that are not UTF-8 become U+FFFD.
/// The result is raw text: it is cleaned like any value when rendered.
pub fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `value` percent-encoded, as Asterisk's `URIENCODE()` gives it.
pub fn percent_encoded(value: &str) -> String {
    let mut out = String::new();
    percent_encode(&mut out, value);
    out
}

fn percent_encode(out: &mut String, value: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in value.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    Text(&'a str),
    /// `$$`.
    Dollar,
    Word(&'a str),
    Var(&'a str),
    Sip(&'a str),
}

struct Scanner<'a> {
    rest: &'a str,
}

impl<'a> Scanner<'a> {
    fn new(template: &'a str) -> Self {
        Scanner { rest: template }
    }

    /// A placeholder at the start of `s` and its length in bytes.
    fn placeholder(s: &'a str) -> Option<(Token<'a>, usize)> {
        let b = s.as_bytes();
        match b {
            [b'$', b'$', ..] => Some((Token::Dollar, 2)),
            [b'$', b'{', ..] => {
                let inner = &s[2..];
                let end = inner.bytes().take(MAX_NAME + 1).position(|c| c == b'}')?;
                if end == 0 {
                    return None;
                }
                let name = &inner[..end];
                let ok = name
                    .chars()
                    .all(|c| !c.is_whitespace() && !c.is_control() && !matches!(c, '{' | '$'));
                ok.then_some((Token::Var(name), end + 3))
            }
            [b'$', ..] => {
                let inner = &s[1..];
                let end = inner
                    .bytes()
                    .take(MAX_NAME + 1)
                    .position(|c| !(c.is_ascii_alphanumeric() || c == b'_'))?;
                (end > 0 && inner.as_bytes()[end] == b'$')
                    .then(|| (Token::Word(&inner[..end]), end + 2))
            }
            [b'[', ..] => {
                let inner = s.strip_prefix("[sip.")?;
                let end = inner.bytes().take(MAX_NAME + 1).position(|c| {
                    !(c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
                })?;
                (end > 0 && inner.as_bytes()[end] == b']')
                    .then(|| (Token::Sip(&inner[..end]), end + 6))
            }
            _ => None,
        }
    }
}

impl<'a> Iterator for Scanner<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        if self.rest.is_empty() {
            return None;
        }
        if let Some((token, len)) = Self::placeholder(self.rest) {
            self.rest = &self.rest[len..];
            return Some(token);
        }
        // Literal text up to the next `$` or `[` that could start a
        // placeholder (the first character is literal: it did not).
        let skip = self.rest.chars().next().map_or(0, char::len_utf8);
        let end = self.rest[skip..]
            .find(['$', '['])
            .map_or(self.rest.len(), |i| i + skip);
        let (text, rest) = self.rest.split_at(end);
        self.rest = rest;
        Some(Token::Text(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> Values {
        let mut v = Values {
            caller: "+4930123".into(),
            caller_name: "Alice".into(),
            number: "2000".into(),
            called: "0301234".into(),
            outcome: "desk".into(),
            agent: "bob@example.org".into(),
            ..Values::default()
        };
        v.sip.insert("X-Customer-Id".into(), "C42".into());
        v.vars.insert("CALLERID(num)".into(), "+4930123".into());
        v.vars.insert("UNIQUEID".into(), "1700000000.1".into());
        v.args.insert("queue".into(), "sales".into());
        v.custom.insert("desk".into(), "7".into());
        v
    }

    fn named(caller_name: &str) -> Values {
        Values {
            caller_name: caller_name.into(),
            ..Values::default()
        }
    }

    #[test]
    fn invisible_characters_are_removed_as_on_the_wire() {
        // Zero-width and word-joiner characters can hide text from an agent
        // just as bidi overrides can: one list serves the wire and the pops.
        let v = named("Bo\u{200B}b\u{2060} Sm\u{202E}ith\u{FEFF}");
        assert_eq!(render("$caller_name$", &v), "Bob Smith");
    }

    #[test]
    fn every_placeholder_kind() {
        let t = "$caller_name$ <$caller$> to $number$/$called$: $outcome$ by $agent$ \
                 desk $desk$ id [sip.X-Customer-Id] ${UNIQUEID} ${queue} ${CALLERID(num)} $$5";
        assert_eq!(
            render(t, &values()),
            "Alice <+4930123> to 2000/0301234: desk by bob@example.org \
             desk 7 id C42 1700000000.1 sales +4930123 $5"
        );
    }

    #[test]
    fn called_falls_back_to_number() {
        let v = Values {
            number: "2000".into(),
            ..Values::default()
        };
        assert_eq!(render("$called$", &v), "2000");
    }

    #[test]
    fn unknown_placeholders_render_empty() {
        let t = "[$nope$|${NOPE}|[sip.X-None]]";
        assert_eq!(render(t, &values()), "[||]");
    }

    #[test]
    fn lookups_ignore_case_for_headers_and_functions() {
        let t = "[sip.x-customer-id] ${callerid(num)}";
        assert_eq!(render(t, &values()), "C42 +4930123");
    }

    #[test]
    fn args_win_over_channel_variables() {
        let mut v = values();
        v.vars.insert("queue".into(), "from-channel".into());
        assert_eq!(render("${queue}", &v), "sales");
    }

    #[test]
    fn things_that_are_not_placeholders_stay() {
        let v = values();
        for t in [
            "$",
            "$5",
            "cost $ 5",
            "$a b$",
            "${}",
            "${a b}",
            "${unclosed",
            "[",
            "[sip.]",
            "[sip.X",
            "[sip.a b]",
            "[sipX]",
            "[x]",
            "$caller",
            "a$",
        ] {
            assert_eq!(render(t, &v), t, "{t:?}");
        }
        assert_eq!(render("$5$ $$caller$", &v), " $caller$");
    }

    #[test]
    fn substituted_values_are_never_expanded_again() {
        let mut v = values();
        v.caller_name = "$caller$ ${UNIQUEID} [sip.X-Customer-Id] $$ $desk$".into();
        assert_eq!(
            render("<$caller_name$>", &v),
            "<$caller$ ${UNIQUEID} [sip.X-Customer-Id] $$ $desk$>"
        );
        v.caller_name = "${".into();
        v.caller = "EXTEN}".into();
        assert_eq!(render("$caller_name$$caller$", &v), "${EXTEN}");
    }

    #[test]
    fn control_and_bidi_characters_are_removed() {
        let v = named("Ev\u{202E}il\u{2066}x\u{2069}\u{200F}\u{061C}\u{0007}\0 Co\r\nrp\tX");
        assert_eq!(render("$caller_name$", &v), "Evilx Co  rp X");
        // Ordinary non-ASCII text is kept.
        let v = named("Jürgen Müller 😀 عربي");
        assert_eq!(render("$caller_name$", &v), "Jürgen Müller 😀 عربي");
    }

    #[test]
    fn values_are_length_bounded() {
        let v = named(&"é".repeat(MAX_VALUE_CHARS * 3));
        let out = render("<$caller_name$>", &v);
        assert_eq!(out.chars().count(), MAX_VALUE_CHARS + 2);
    }

    #[test]
    fn template_text_itself_is_kept() {
        // The admin's own text may hold anything, control characters too.
        let t = "line one\u{202E}\n$caller$";
        assert_eq!(render(t, &values()), "line one\u{202E}\n+4930123");
    }

    #[test]
    fn percent_decoding_undoes_uriencode() {
        assert_eq!(percent_decode("Doe%2C%20John"), "Doe, John");
        assert_eq!(percent_decode("M%C3%BCller"), "Müller");
        assert_eq!(percent_decode("a%0AE%2Cbye"), "a\nE,bye");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%FF"), "\u{FFFD}");
        let mut encoded = String::new();
        percent_encode(&mut encoded, "\"O'Brien\" (Sales), ☎ <1>");
        assert_eq!(percent_decode(&encoded), "\"O'Brien\" (Sales), ☎ <1>");
    }

    #[test]
    fn url_rendering_encodes_values_only() {
        let mut v = values();
        v.caller_name = "A&B Co/ü=?#%".into();
        let out = render_url(
            "https://crm.example/s?q=$caller$&n=$caller_name$&id=[sip.X-Customer-Id]",
            &v,
        );
        assert_eq!(
            out,
            "https://crm.example/s?q=%2B4930123&n=A%26B%20Co%2F%C3%BC%3D%3F%23%25&id=C42"
        );
        v.caller_name = "aZ09-._~".into();
        assert_eq!(render_url("$caller_name$", &v), "aZ09-._~");
    }

    #[test]
    fn url_rendering_cleans_before_encoding() {
        let v = named("a\u{202E}\nb");
        assert_eq!(render_url("$caller_name$", &v), "a%20b");
    }

    #[test]
    fn placeholders_are_listed_in_order() {
        let p = placeholders("$caller$ $x$ ${A(b)} [sip.H] $$ $caller$");
        assert_eq!(
            p,
            [
                Placeholder::Word("caller".into()),
                Placeholder::Word("x".into()),
                Placeholder::Var("A(b)".into()),
                Placeholder::Sip("H".into()),
                Placeholder::Word("caller".into()),
            ]
        );
        assert!(p[0].is_builtin());
        assert!(!p[1].is_builtin());
        let shown: Vec<String> = p.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["$caller$", "$x$", "${A(b)}", "[sip.H]", "$caller$"]);
    }

    #[test]
    fn names_are_length_bounded() {
        let long = "a".repeat(MAX_NAME + 1);
        let t = format!("${long}$");
        assert!(placeholders(&t).is_empty());
        assert_eq!(render(&t, &values()), t);
        let ok = "a".repeat(MAX_NAME);
        assert_eq!(placeholders(&format!("${{{ok}}}")).len(), 1);
    }
}
