//! Replay scripts (`protocol-tests/*.eivr`): one call each, as a header
//! that sets up the channel and a list of steps. `protocol-tests/README.md`
//! describes the format for script writers; this is its parser.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use super::glob::{Glob, unescape};
use super::invocation::separate_args;

/// A parsed script.
#[derive(Debug, Clone)]
pub struct Script {
    /// Shown in messages (usually the file's path).
    pub name: String,
    /// The `config:` block (dedented), written to a file for `POPIVR_CONFIG`.
    pub config: Option<String>,
    /// The data of `ExternalIVR(...)`, options included; the word `popivr`
    /// at its start stands for the program under test.
    pub call: String,
    pub vars: Vec<(String, String)>,
    pub sounds: Vec<(String, Duration)>,
    pub env: Vec<(String, String)>,
    pub steps: Vec<Step>,
}

/// One step with the line it came from.
#[derive(Debug, Clone)]
pub struct Step {
    pub line: usize,
    /// The line as written (comments cut), for transcripts.
    pub text: String,
    pub kind: StepKind,
}

#[derive(Debug, Clone)]
pub enum StepKind {
    /// The next command (skipping ignored ones) must match.
    Expect(Glob),
    /// From here on, commands matching this may come in between.
    Ignore(Glob),
    /// Take back an `ignore:` with the same pattern.
    Unignore(Glob),
    /// The wait bound of `expect`, `stderr-has`, `sent` from here on.
    ExpectWithin(Duration),
    /// No command (other than ignored ones) for this long.
    NoCommand(Duration),
    /// Wait until this long after the start.
    At(Duration),
    /// Wait this long.
    Wait(Duration),
    Key(char),
    /// A raw line for the child; `<ts>` becomes the current timestamp.
    Send(String),
    Hangup,
    Close,
    VarIs(String, String),
    VarUnset(String),
    NoFunctionWrites,
    StderrHas(Glob),
    StderrLacks(Glob),
    /// An event line matching this was sent (waits like `expect`).
    Sent(Glob),
    /// The session is over and the child exits within this long of the close.
    ExitsWithin(Duration),
    /// A step run by an [`crate::sim::replay::Extension`].
    Ext(ExtStep),
}

/// A step the runner does not know itself, e.g. `agent alice says: 1`:
/// `keyword` `agent`, `words` `["alice", "says"]`, `arg` `1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtStep {
    pub keyword: String,
    pub words: Vec<String>,
    pub arg: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub name: String,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.name, self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

/// Step keywords the XMPP work will add; reserved so no script uses them
/// for anything else.
pub const RESERVED: &[&str] = &["agent"];

impl Script {
    pub fn from_file(path: &Path) -> Result<Script, ParseError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ParseError {
            name: name.clone(),
            line: 0,
            message: e.to_string(),
        })?;
        Script::parse(&name, &text)
    }

    pub fn parse(name: &str, text: &str) -> Result<Script, ParseError> {
        let err = |line: usize, message: String| ParseError {
            name: name.to_string(),
            line,
            message,
        };
        let mut script = Script {
            name: name.to_string(),
            config: None,
            call: String::new(),
            vars: Vec::new(),
            sounds: Vec::new(),
            env: Vec::new(),
            steps: Vec::new(),
        };
        let mut call_line = None;
        let mut options = None;
        let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
        while let Some((n, raw)) = lines.next() {
            let line = cut_comment(raw).trim();
            if line.is_empty() {
                continue;
            }
            let (head, arg) = match line.split_once(':') {
                Some((h, a)) => (h.trim(), Some(a.trim())),
                None => (line, None),
            };
            let words: Vec<&str> = head.split_whitespace().collect();
            let keyword = words[0];
            let header = matches!(
                keyword,
                "config" | "call" | "options" | "var" | "sound" | "env"
            );
            if header && !script.steps.is_empty() {
                return Err(err(
                    n,
                    format!("`{keyword}:` belongs before the first step"),
                ));
            }
            if words.len() > 1 && is_builtin(keyword) {
                return Err(err(
                    n,
                    format!("`{keyword}` takes no words before the colon"),
                ));
            }
            let need = |what: &str| {
                arg.filter(|a| !a.is_empty())
                    .ok_or_else(|| err(n, format!("`{keyword}:` needs {what}")))
            };
            let step = |kind| Step {
                line: n,
                text: line.to_string(),
                kind,
            };
            match keyword {
                "config" => {
                    if script.config.is_some() {
                        return Err(err(n, "a second `config:` block".into()));
                    }
                    if arg.is_some_and(|a| !a.is_empty()) {
                        return Err(err(n, "the config block starts on the next line".into()));
                    }
                    let mut block = Vec::new();
                    loop {
                        match lines.next() {
                            Some((_, l)) if l.trim() == "end" => break,
                            Some((_, l)) => block.push(l),
                            None => return Err(err(n, "`config:` block without `end`".into())),
                        }
                    }
                    script.config = Some(dedent(&block));
                }
                "call" => {
                    script.call =
                        need("the data of ExternalIVR(), e.g. popivr(sales)")?.to_string();
                    call_line = Some(n);
                }
                "options" => options = Some((n, need("option letters")?.to_string())),
                "var" => {
                    let (name, value) = need("NAME = value")?
                        .split_once('=')
                        .ok_or_else(|| err(n, "`var:` wants NAME = value".into()))?;
                    let value = unescape(value.trim()).map_err(|e| err(n, e))?;
                    script.vars.push((name.trim().to_string(), value));
                }
                "sound" => {
                    let spec = need("a file name and a length, e.g. moh/a 1.5s")?;
                    let (file, len) = spec
                        .split_once(char::is_whitespace)
                        .ok_or_else(|| err(n, "`sound:` wants FILE LENGTH".into()))?;
                    let len = parse_duration(len.trim()).map_err(|e| err(n, e))?;
                    script.sounds.push((file.to_string(), len));
                }
                "env" => {
                    let (name, value) = need("NAME=value")?
                        .split_once('=')
                        .ok_or_else(|| err(n, "`env:` wants NAME=value".into()))?;
                    let value = unescape(value.trim()).map_err(|e| err(n, e))?;
                    script.env.push((name.trim().to_string(), value));
                }
                "expect" => {
                    script
                        .steps
                        .push(step(StepKind::Expect(glob(need("a pattern")?, n, &err)?)))
                }
                "ignore" => {
                    script
                        .steps
                        .push(step(StepKind::Ignore(glob(need("a pattern")?, n, &err)?)))
                }
                "unignore" => {
                    script
                        .steps
                        .push(step(StepKind::Unignore(glob(need("a pattern")?, n, &err)?)))
                }
                "expect-within" | "no-command" | "at" | "wait" | "exits-within" => {
                    let d = parse_duration(need("a duration, e.g. 500ms or 1.5s")?)
                        .map_err(|e| err(n, e))?;
                    script.steps.push(step(match keyword {
                        "expect-within" => StepKind::ExpectWithin(d),
                        "no-command" => StepKind::NoCommand(d),
                        "at" => StepKind::At(d),
                        "wait" => StepKind::Wait(d),
                        _ => StepKind::ExitsWithin(d),
                    }));
                }
                "key" => {
                    let key = need("a key: 0-9, A-D, * or #")?;
                    let mut chars = key.chars();
                    match (chars.next(), chars.next()) {
                        (Some(k @ ('0'..='9' | 'A'..='D' | '*' | '#')), None) => {
                            script.steps.push(step(StepKind::Key(k)))
                        }
                        _ => {
                            return Err(err(
                                n,
                                format!("`{key}` is not a DTMF key (0-9, A-D, *, #)"),
                            ));
                        }
                    }
                }
                "send" => {
                    let raw = unescape(need("a line")?).map_err(|e| err(n, e))?;
                    script.steps.push(step(StepKind::Send(raw)));
                }
                "hangup" | "close" | "no-function-writes" => {
                    if arg.is_some() {
                        return Err(err(n, format!("`{keyword}` takes no argument")));
                    }
                    script.steps.push(step(match keyword {
                        "hangup" => StepKind::Hangup,
                        "close" => StepKind::Close,
                        _ => StepKind::NoFunctionWrites,
                    }));
                }
                "var-is" => {
                    let (name, value) = need("NAME = value")?
                        .split_once('=')
                        .ok_or_else(|| err(n, "`var-is:` wants NAME = value".into()))?;
                    let value = unescape(value.trim()).map_err(|e| err(n, e))?;
                    script
                        .steps
                        .push(step(StepKind::VarIs(name.trim().to_string(), value)));
                }
                "var-unset" => script
                    .steps
                    .push(step(StepKind::VarUnset(need("a name")?.to_string()))),
                "stderr-has" => script.steps.push(step(StepKind::StderrHas(glob(
                    need("a pattern")?,
                    n,
                    &err,
                )?))),
                "stderr-lacks" => script.steps.push(step(StepKind::StderrLacks(glob(
                    need("a pattern")?,
                    n,
                    &err,
                )?))),
                "sent" => {
                    let pattern = need("a pattern")?.replace("<ts>", "??????????");
                    script
                        .steps
                        .push(step(StepKind::Sent(glob(&pattern, n, &err)?)));
                }
                _ => {
                    let Some(arg) = arg else {
                        return Err(err(n, format!("unknown step `{line}`")));
                    };
                    let ext = ExtStep {
                        keyword: keyword.to_string(),
                        words: words[1..].iter().map(|w| w.to_string()).collect(),
                        arg: arg.to_string(),
                    };
                    script.steps.push(step(StepKind::Ext(ext)));
                }
            }
        }
        let Some(call_line) = call_line else {
            return Err(err(1, "no `call:` line".into()));
        };
        if let Some((n, options)) = options {
            if separate_args(&script.call, 2).len() > 1 {
                return Err(err(
                    n,
                    format!("options given twice: here and in `call:` (line {call_line})"),
                ));
            }
            script.call = format!("{},{options}", script.call);
        }
        Ok(script)
    }
}

fn is_builtin(keyword: &str) -> bool {
    const BUILTIN: &[&str] = &[
        "config",
        "call",
        "options",
        "var",
        "sound",
        "env",
        "expect",
        "ignore",
        "unignore",
        "expect-within",
        "no-command",
        "at",
        "wait",
        "exits-within",
        "key",
        "send",
        "hangup",
        "close",
        "no-function-writes",
        "var-is",
        "var-unset",
        "stderr-has",
        "stderr-lacks",
        "sent",
    ];
    BUILTIN.contains(&keyword)
}

fn glob(
    pattern: &str,
    n: usize,
    err: &impl Fn(usize, String) -> ParseError,
) -> Result<Glob, ParseError> {
    Glob::new(pattern).map_err(|e| err(n, e))
}

/// A `#` at the start of a line, or one between white space and white
/// space (or the end), starts a comment. `key: #` is the key.
fn cut_comment(line: &str) -> &str {
    if line.trim_start().starts_with('#') {
        return "";
    }
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'#'
            && i > 0
            && bytes[i - 1].is_ascii_whitespace()
            && bytes.get(i + 1).is_some_and(u8::is_ascii_whitespace)
        {
            return &line[..i];
        }
    }
    line
}

fn dedent(block: &[&str]) -> String {
    let indent = block
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let mut out = String::new();
    for l in block {
        out.push_str(l.get(indent..).unwrap_or("").trim_end());
        out.push('\n');
    }
    out
}

/// `500ms`, `1.5s`, `2s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("`{text}` is not a duration (e.g. 500ms, 1.5s)");
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(bad());
    };
    let value: f64 = number.trim().parse().map_err(|_| bad())?;
    if !value.is_finite() || value < 0.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(value * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
# hold audio loops; key 1 goes to the desk
config:
  [keys]
  type = profile
  hold = moh/a, moh/b   ; INI comments stay
  key = 1 -> continue desk
end
call: popivr(keys)            # the dialplan's ExternalIVR()
options: n
var: CALLERID(num) = 5551234
var: CALLERID(name) = Doe, John\r\nE,x
sound: moh/a 1.0s
sound: moh/b 500ms
env: RUST_LOG=debug
ignore: G,*
expect: S,moh/a              # in order
at: 1.2s
key: #
key: 1
send: F,<ts>,moh/a
expect: V,POPIVR_ACTION=desk,*
var-is: POPIVR_ACTION = desk
sent: E,<ts>
agent alice receives: Call from*
exits-within: 2s
"#;

    #[test]
    fn parses_the_example() {
        let s = Script::parse("ex.eivr", EXAMPLE).unwrap();
        assert_eq!(
            s.config.as_deref(),
            Some(
                "[keys]\ntype = profile\nhold = moh/a, moh/b   ; INI comments stay\nkey = 1 -> continue desk\n"
            )
        );
        assert_eq!(s.call, "popivr(keys),n");
        assert_eq!(
            s.vars[1],
            ("CALLERID(name)".to_string(), "Doe, John\r\nE,x".to_string())
        );
        assert_eq!(
            s.sounds,
            [
                ("moh/a".to_string(), Duration::from_secs(1)),
                ("moh/b".to_string(), Duration::from_millis(500))
            ]
        );
        assert_eq!(s.env, [("RUST_LOG".to_string(), "debug".to_string())]);
        let kinds: Vec<String> = s.steps.iter().map(|st| format!("{:?}", st.kind)).collect();
        assert!(kinds[0].starts_with("Ignore"));
        assert!(matches!(s.steps[3].kind, StepKind::Key('#')));
        assert!(matches!(&s.steps[5].kind, StepKind::Send(l) if l == "F,<ts>,moh/a"));
        match &s.steps[8].kind {
            StepKind::Sent(g) => assert!(g.matches("E,1700000000")),
            other => panic!("{other:?}"),
        }
        match &s.steps[9].kind {
            StepKind::Ext(e) => {
                assert_eq!(e.keyword, "agent");
                assert_eq!(e.words, ["alice", "receives"]);
                assert_eq!(e.arg, "Call from*");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.steps[1].line, 17);
    }

    #[test]
    fn errors_name_the_line() {
        let e = Script::parse("x", "call: popivr(a)\nkey: 1\nvar: A = 1\n").unwrap_err();
        assert_eq!(
            (e.line, e.to_string().contains("before the first step")),
            (3, true)
        );
        let e = Script::parse("x", "call: popivr(a)\nkey: 12\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = Script::parse("x", "call: popivr(a)\nwait: 5\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = Script::parse("x", "call: popivr(a),n\noptions: i\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = Script::parse("x", "key: 1\n").unwrap_err();
        assert!(e.message.contains("call"));
        let e = Script::parse("x", "call: popivr(a)\nconfig:\n[x]\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = Script::parse("x", "call: popivr(a)\nbogus\n").unwrap_err();
        assert!(e.message.contains("unknown step"));
        let e = Script::parse("x", "call: popivr(a)\nexpect: \\q\n").unwrap_err();
        assert_eq!(e.line, 2);
    }

    #[test]
    fn comments() {
        assert_eq!(cut_comment("key: #"), "key: #");
        assert_eq!(cut_comment("key: 1  # one"), "key: 1  ");
        assert_eq!(cut_comment("  # all"), "");
        assert_eq!(cut_comment("expect: V,A=#,B"), "expect: V,A=#,B");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("1.5").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
