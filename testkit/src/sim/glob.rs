//! Glob patterns for replay scripts: `*` any run of characters (commas
//! included), `?` one character; backslash escapes for the rest.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Char(char),
    Any,
    One,
}

/// A compiled glob; `Display` shows it as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    source: String,
    tokens: Vec<Token>,
}

impl Glob {
    /// Compile `pattern`. Escapes: `\*` `\?` `\\` literal, `\r` `\n` `\t`,
    /// `\xHH` any byte below 0x80.
    pub fn new(pattern: &str) -> Result<Self, String> {
        let mut tokens = Vec::new();
        let mut chars = pattern.chars();
        while let Some(c) = chars.next() {
            tokens.push(match c {
                '*' => Token::Any,
                '?' => Token::One,
                '\\' => Token::Char(unescape_one(&mut chars)?),
                c => Token::Char(c),
            });
        }
        Ok(Glob {
            source: pattern.to_string(),
            tokens,
        })
    }

    /// A glob that matches `text` exactly.
    pub fn literal(text: &str) -> Self {
        Glob {
            source: escape(text),
            tokens: text.chars().map(Token::Char).collect(),
        }
    }

    pub fn matches(&self, text: &str) -> bool {
        let text: Vec<char> = text.chars().collect();
        let (mut t, mut p) = (0, 0);
        // Where the last `*` was and how much text it has taken so far.
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            match self.tokens.get(p) {
                Some(Token::Any) => {
                    star = Some((p, t));
                    p += 1;
                }
                Some(Token::One) => {
                    p += 1;
                    t += 1;
                }
                Some(Token::Char(c)) if *c == text[t] => {
                    p += 1;
                    t += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        p = sp + 1;
                        t = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        self.tokens[p..].iter().all(|tok| *tok == Token::Any)
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Resolve the escape after a backslash. Shared by globs and the plain
/// text fields of replay scripts.
pub fn unescape_one(chars: &mut std::str::Chars<'_>) -> Result<char, String> {
    match chars.next() {
        Some('r') => Ok('\r'),
        Some('n') => Ok('\n'),
        Some('t') => Ok('\t'),
        Some('x') => {
            let hex: String = chars.by_ref().take(2).collect();
            u8::from_str_radix(&hex, 16)
                .ok()
                .filter(|b| b.is_ascii())
                .map(char::from)
                .ok_or_else(|| format!("bad escape \\x{hex}: want two hex digits below 80"))
        }
        Some(c @ ('\\' | '*' | '?' | '#')) => Ok(c),
        Some(c) => Err(format!("unknown escape \\{c}")),
        None => Err("a lone backslash at the end".to_string()),
    }
}

/// Resolve every escape in `text` (see [`unescape_one`]).
pub fn unescape(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' {
            unescape_one(&mut chars)?
        } else {
            c
        });
    }
    Ok(out)
}

/// Show `text` the way a script would write it: control characters escaped.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\\' | '*' | '?' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() && c.is_ascii() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, t: &str) -> bool {
        Glob::new(p).unwrap().matches(t)
    }

    #[test]
    fn stars_and_question_marks() {
        assert!(m(
            "V,POPIVR_ACTION=desk,*",
            "V,POPIVR_ACTION=desk,POPIVR_REPLY=1"
        ));
        assert!(m("E,*", "E,"));
        assert!(m("*", ""));
        assert!(m("A,moh/?", "A,moh/a"));
        assert!(!m("A,moh/?", "A,moh/ab"));
        assert!(m("*,b,*", "a,b,c"));
        assert!(m("a*b*c", "aXbYbZc"));
        assert!(!m("a*b*c", "aXbYbZ"));
        assert!(!m("S,x", "S,xy"));
        assert!(!m("S,x*", "A,x"));
    }

    #[test]
    fn escapes() {
        assert!(m("V,POPIVR_REPLY=\\*", "V,POPIVR_REPLY=*"));
        assert!(!m("V,POPIVR_REPLY=\\*", "V,POPIVR_REPLY=1"));
        assert!(m("a\\rb\\x01", "a\rb\x01"));
        assert!(Glob::new("a\\q").is_err());
        assert!(Glob::new("a\\").is_err());
    }

    #[test]
    fn literal_and_escape_round_trip() {
        let text = "G,CALLERID(name)=a*b?\r\n\\";
        assert!(Glob::literal(text).matches(text));
        assert_eq!(unescape(&escape(text)).unwrap(), text);
        assert!(Glob::new(&escape(text)).unwrap().matches(text));
    }
}
