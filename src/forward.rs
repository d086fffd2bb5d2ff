//! Which numbers an agent may forward a call to: a FILTER-like check with
//! Asterisk's extension patterns.
//!
//! A pattern starts with `_`; then `X` is 0-9, `Z` 1-9, `N` 2-9 (lower case
//! too), `[15-7]` a set with ranges, `.` one or more further characters,
//! `!` zero or more; `.` and `!` must end the pattern. Anything else is
//! literal. Without `_` the pattern is a literal number. As in Asterisk,
//! `-` and spaces outside `[…]` are only there for reading and are ignored.
//!
//! Numbers are limited to `0-9 * # +` and [`MAX_NUMBER_LEN`] characters, so
//! whatever passes is safe to hand to the dialplan.

/// Longest number accepted.
pub const MAX_NUMBER_LEN: usize = 32;
/// Longest pattern accepted.
pub const MAX_PATTERN_LEN: usize = 80;

/// Whether `number` is a well-formed number: 1 to [`MAX_NUMBER_LEN`] of
/// `0-9 * # +`.
pub fn valid_number(number: &str) -> bool {
    (1..=MAX_NUMBER_LEN).contains(&number.len())
        && number
            .bytes()
            .all(|b| b.is_ascii_digit() || b"*#+".contains(&b))
}

/// Whether `number` may be forwarded to: it is well-formed and matches one
/// of `patterns`. Invalid patterns match nothing.
pub fn allowed(number: &str, patterns: &[String]) -> bool {
    valid_number(number)
        && patterns
            .iter()
            .any(|p| Pattern::parse(p).is_ok_and(|p| p.matches(number)))
}

/// Why a pattern is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("pattern is empty")]
    Empty,
    #[error("pattern is longer than {MAX_PATTERN_LEN} characters")]
    TooLong,
    #[error("`[` without a closing `]`")]
    UnclosedSet,
    #[error("empty set `[]`")]
    EmptySet,
    #[error("range `{0}-{1}` runs backwards")]
    BackwardRange(char, char),
    #[error("`{0}` cannot appear in a number (only 0-9, *, # and +)")]
    BadChar(char),
    #[error("nothing may follow `{0}`: it already matches the rest of the number")]
    AfterWildcard(char),
    #[error("a literal number may only hold 0-9, *, # and + (start patterns with `_`)")]
    BadLiteral,
}

/// Checks a pattern for the loader.
pub fn validate_pattern(pattern: &str) -> Result<(), PatternError> {
    Pattern::parse(pattern).map(drop)
}

/// One position of a pattern: the set of bytes it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Set(u128);

impl Set {
    fn range(lo: u8, hi: u8) -> Set {
        Set((lo..=hi).fold(0, |acc, b| acc | 1u128 << b))
    }

    fn one(b: u8) -> Set {
        Set(1u128 << b)
    }

    fn contains(self, b: u8) -> bool {
        b < 128 && self.0 & (1u128 << b) != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tail {
    /// The number must end here.
    End,
    /// `.`: one or more characters follow.
    OneOrMore,
    /// `!`: zero or more.
    ZeroOrMore,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    positions: Vec<Set>,
    tail: Tail,
}

impl Pattern {
    fn parse(pattern: &str) -> Result<Pattern, PatternError> {
        let pattern = pattern.trim();
        if pattern.chars().count() > MAX_PATTERN_LEN {
            return Err(PatternError::TooLong);
        }
        let Some(body) = pattern.strip_prefix('_') else {
            return Self::literal(pattern);
        };
        let mut positions = Vec::new();
        let mut tail = Tail::End;
        let mut chars = body.chars();
        while let Some(c) = chars.next() {
            if tail != Tail::End {
                let wildcard = if tail == Tail::OneOrMore { '.' } else { '!' };
                return Err(PatternError::AfterWildcard(wildcard));
            }
            let set = match c {
                '-' | ' ' => continue,
                'X' | 'x' => Set::range(b'0', b'9'),
                'Z' | 'z' => Set::range(b'1', b'9'),
                'N' | 'n' => Set::range(b'2', b'9'),
                '.' => {
                    tail = Tail::OneOrMore;
                    continue;
                }
                '!' => {
                    tail = Tail::ZeroOrMore;
                    continue;
                }
                '[' => Self::set(&mut chars)?,
                c if c.is_ascii_digit() || "*#+".contains(c) => Set::one(c as u8),
                c => return Err(PatternError::BadChar(c)),
            };
            positions.push(set);
        }
        if positions.is_empty() && tail == Tail::End {
            return Err(PatternError::Empty);
        }
        Ok(Pattern { positions, tail })
    }

    fn literal(pattern: &str) -> Result<Pattern, PatternError> {
        let mut positions = Vec::new();
        for c in pattern.chars().filter(|&c| c != '-' && c != ' ') {
            if !(c.is_ascii_digit() || "*#+".contains(c)) {
                return Err(PatternError::BadLiteral);
            }
            positions.push(Set::one(c as u8));
        }
        if positions.is_empty() {
            return Err(PatternError::Empty);
        }
        Ok(Pattern {
            positions,
            tail: Tail::End,
        })
    }

    /// The inside of `[…]`, the `[` already taken. Letters are accepted (as
    /// Asterisk does) though a number never holds one.
    fn set(chars: &mut std::str::Chars<'_>) -> Result<Set, PatternError> {
        let mut set = Set(0);
        let mut prev: Option<u8> = None;
        loop {
            let c = chars.next().ok_or(PatternError::UnclosedSet)?;
            match c {
                ']' if set.0 == 0 => return Err(PatternError::EmptySet),
                ']' => return Ok(set),
                '-' if prev.is_some()
                    && chars.as_str().chars().next().is_some_and(|n| n != ']') =>
                {
                    let lo = prev.take().unwrap_or_default();
                    let hi = chars.next().ok_or(PatternError::UnclosedSet)?;
                    let hi = Self::set_char(hi)?;
                    if hi < lo {
                        return Err(PatternError::BackwardRange(lo as char, hi as char));
                    }
                    set.0 |= Set::range(lo, hi).0;
                }
                c => {
                    let b = Self::set_char(c)?;
                    set.0 |= Set::one(b).0;
                    prev = Some(b);
                }
            }
        }
    }

    fn set_char(c: char) -> Result<u8, PatternError> {
        if c.is_ascii_alphanumeric() || "*#+".contains(c) {
            Ok(c as u8)
        } else {
            Err(PatternError::BadChar(c))
        }
    }

    fn matches(&self, number: &str) -> bool {
        let n = number.as_bytes();
        if n.len() < self.positions.len() {
            return false;
        }
        let (head, rest) = n.split_at(self.positions.len());
        let head_ok = head
            .iter()
            .zip(&self.positions)
            .all(|(&b, set)| set.contains(b));
        head_ok
            && match self.tail {
                Tail::End => rest.is_empty(),
                Tail::OneOrMore => !rest.is_empty(),
                Tail::ZeroOrMore => true,
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(number: &str, pattern: &str) -> bool {
        allowed(number, &[pattern.to_string()])
    }

    #[test]
    fn pattern_letters() {
        assert!(allow("2001", "_2XXX"));
        assert!(!allow("200", "_2XXX"));
        assert!(!allow("20011", "_2XXX"));
        assert!(!allow("3001", "_2XXX"));
        assert!(allow("1", "_Z"));
        assert!(!allow("0", "_Z"));
        assert!(allow("2", "_N"));
        assert!(!allow("1", "_N"));
        assert!(allow("2125551212", "_NXXNXXXXXX"));
        assert!(!allow("1125551212", "_NXXNXXXXXX"));
        assert!(!allow("2121551212", "_NXXNXXXXXX"));
        assert!(allow("2001", "_2xxx"), "lower case too");
    }

    #[test]
    fn sets_and_ranges() {
        assert!(allow("3", "_[1-5]"));
        assert!(!allow("6", "_[1-5]"));
        assert!(allow("7", "_[1-57]"));
        assert!(allow("*", "_[*#]"));
        assert!(allow("9", "_[1-5a9]"));
        assert!(!allow("a", "_[1-5a]"), "numbers never hold letters");
        assert_eq!(validate_pattern("_[1-]"), Err(PatternError::BadChar('-')));
        assert_eq!(validate_pattern("_[-1]"), Err(PatternError::BadChar('-')));
    }

    #[test]
    fn wildcards() {
        assert!(allow("01", "_0."));
        assert!(allow("0123456", "_0."));
        assert!(!allow("0", "_0."));
        assert!(allow("0", "_0!"));
        assert!(allow("0123", "_0!"));
        assert!(allow("+4930123", "_+49."));
        assert!(!allow("+4830123", "_+49."));
    }

    #[test]
    fn literals() {
        assert!(allow("2001", "2001"));
        assert!(!allow("20011", "2001"));
        assert!(!allow("200", "2001"));
        assert!(allow("5551212", "555-1212"));
        assert!(allow("5551212", "_555-XXXX"));
        assert!(allow("*97", "*97"));
    }

    #[test]
    fn bad_numbers_never_pass() {
        let any = ["_!".to_string(), "_X.".to_string()];
        assert!(allowed("2001", &any));
        for n in ["", "20 01", "2001,1", "20a1", "2001\n", "1)=x", "٣"] {
            assert!(!allowed(n, &any), "{n:?}");
        }
        assert!(!allowed(&"1".repeat(MAX_NUMBER_LEN + 1), &any));
        assert!(allowed(&"1".repeat(MAX_NUMBER_LEN), &any));
    }

    #[test]
    fn no_patterns_allow_nothing() {
        assert!(!allowed("2001", &[]));
    }

    #[test]
    fn invalid_patterns() {
        use PatternError::*;
        for (p, e) in [
            ("", Empty),
            ("_", Empty),
            ("_[12", UnclosedSet),
            ("_[]", EmptySet),
            ("_[5-1]", BackwardRange('5', '1')),
            ("_2Y", BadChar('Y')),
            ("_2(", BadChar('(')),
            ("_X.1", AfterWildcard('.')),
            ("_X!X", AfterWildcard('!')),
            ("20a1", BadLiteral),
            ("2001,1", BadLiteral),
        ] {
            assert_eq!(validate_pattern(p), Err(e), "{p:?}");
        }
        assert_eq!(validate_pattern(&"_X".repeat(41)), Err(TooLong));
        // Invalid patterns match nothing, even at run time.
        assert!(!allow("2", "_[2"));
    }

    #[test]
    fn valid_patterns() {
        for p in [
            "_2XXX",
            "_NXXNXXXXXX",
            "_[1-5a]X",
            "_.",
            "_!",
            "_+1NXX-NXX-XXXX",
            "2001",
        ] {
            assert_eq!(validate_pattern(p), Ok(()), "{p:?}");
        }
    }
}
