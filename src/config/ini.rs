//! Asterisk's INI dialect, as `config.c` reads it.
//!
//! What is understood:
//! - `[name]` sections; `[name](!)` templates; `[name](tmpl1,tmpl2)` and
//!   `[name](!,tmpl)` inheritance (the template's entries are copied at that
//!   point, so it must come first); `[name](+)` adds to an earlier section.
//! - `key = value` and `key => value`; keys are case-insensitive (kept
//!   lower-case), values trimmed. A key given twice is kept twice: the loader
//!   decides between "last one counts" and "repeatable".
//! - `;` comments, also trailing; `\;` is a literal semicolon; `;--` … `--;`
//!   block comments (which may nest and span lines; `;---…` is a plain
//!   comment, as in Asterisk).
//! - `#include "file"` / `#tryinclude "file"` (quotes or `<>` optional),
//!   relative to the including file; `#exec` is refused; any other `#` line
//!   is a comment.
//!
//! Every entry keeps its file and line. Errors never quote the text of a
//! line: it may hold a password.

use std::fmt;
use std::path::{Path, PathBuf};

use nom::branch::alt;
use nom::bytes::complete::{take_till, take_while1};
use nom::character::complete::{char, space0, space1};
use nom::combinator::{all_consuming, opt, rest};
use nom::multi::separated_list1;
use nom::sequence::{delimited, preceded, terminated};
use nom::{IResult, Parser};

/// One file may hold at most this much.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// All files of one parse together.
pub const MAX_TOTAL_BYTES: u64 = 4 * 1024 * 1024;
/// `#include` nesting depth.
pub const MAX_INCLUDE_DEPTH: usize = 8;
/// Files read by one parse, the first one included.
pub const MAX_FILES: usize = 64;
/// Asterisk's own limit on category names.
pub const MAX_SECTION_NAME: usize = 80;
/// Block comments nest at most this deep.
const MAX_COMMENT_NESTING: usize = 16;

/// Keys whose values are never shown, not even in `Debug` output: the
/// password keys, anything that looks like one, and near misspellings of
/// `secret` (a typo must not put the password in a log).
pub fn is_secret_key(key: &str) -> bool {
    ["secret", "pass", "token", "pwd"]
        .iter()
        .any(|word| key.contains(word))
        || edit_distance(key, "secret") <= 2
}

/// Levenshtein distance, for short keys.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// A place in a configuration file. Line 0 means the file as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    pub file: String,
    pub line: usize,
}

impl Location {
    pub fn new(file: impl Into<String>, line: usize) -> Self {
        Location {
            file: file.into(),
            line,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.file)
        } else {
            write!(f, "{}:{}", self.file, self.line)
        }
    }
}

/// `key = value`, with where it was written.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    /// Lower-case.
    pub key: String,
    pub value: String,
    pub at: Location,
    /// The template this entry was copied from, if it was inherited.
    pub inherited_from: Option<String>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value: &dyn fmt::Debug = if is_secret_key(&self.key) {
            &"<hidden>"
        } else {
            &self.value
        };
        f.debug_struct("Entry")
            .field("key", &self.key)
            .field("value", value)
            .field("at", &self.at)
            .field("inherited_from", &self.inherited_from)
            .finish()
    }
}

/// A `[section]` with its entries in file order, inherited ones first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    /// Defined with `(!)`: only there to be inherited from.
    pub template: bool,
    /// The templates named in the header, in order.
    pub inherits: Vec<String>,
    pub entries: Vec<Entry>,
    /// The header line.
    pub at: Location,
}

impl Section {
    /// The entry that counts for a single-valued key: the last one.
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().rev().find(|e| e.key == key)
    }

    /// Every entry of a key, in order.
    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries.iter().filter(move |e| e.key == key)
    }
}

/// A parsed file with its includes.
#[derive(Debug, Clone, Default)]
pub struct Ini {
    /// In order of appearance, templates included.
    pub sections: Vec<Section>,
    /// Every file read from disk (the first one, then includes).
    pub files: Vec<PathBuf>,
}

impl Ini {
    /// The last section of that name, templates included.
    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().rev().find(|s| s.name == name)
    }
}

/// What is wrong, without where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IniErrorKind {
    #[error("cannot read: {0}")]
    Io(String),
    #[error("file is {size} bytes; popivr reads at most {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("the configuration with its includes exceeds {0} bytes")]
    TotalTooLarge(u64),
    #[error("more than {0} files included")]
    TooManyFiles(usize),
    #[error("line is not valid UTF-8")]
    NotUtf8,
    #[error("expected `[section]`, `key = value` or a `#` directive")]
    Syntax,
    #[error("no `=` in this line: expected `key = value`")]
    MissingEquals,
    #[error("key is empty")]
    EmptyKey,
    #[error("key contains white space")]
    KeyWithSpace,
    #[error("`key = value` before any [section]")]
    OutsideSection,
    #[error("bad section header: expected `[name]`, `[name](!)` or `[name](template,...)`")]
    BadHeader,
    #[error("section name is empty")]
    EmptySectionName,
    #[error("section name is longer than {MAX_SECTION_NAME} characters")]
    LongSectionName,
    #[error("[{name}] is already defined at {first}; use `[{name}](+)` to add to it")]
    DuplicateSection { name: String, first: Location },
    #[error("[{0}](+) adds to a section that is not defined before")]
    AppendToUnknown(String),
    #[error("unknown template [{0}]: a template must be defined before it is used")]
    UnknownTemplate(String),
    #[error("`#exec` is not supported: popivr never runs programs named in its configuration")]
    Exec,
    #[error("`#{0}` needs a file name")]
    IncludeWithoutFile(&'static str),
    #[error("wildcards in `#include` are not supported")]
    IncludeGlob,
    #[error("`#include` nested deeper than {MAX_INCLUDE_DEPTH} files")]
    IncludeTooDeep,
    #[error("`#include` loop: {0} is already being read")]
    IncludeLoop(String),
    #[error("block comment `;--` opened here is never closed with `--;`")]
    UnclosedComment,
    #[error("block comments nested deeper than {MAX_COMMENT_NESTING}")]
    CommentTooDeep,
}

/// An error with the place it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {kind}")]
pub struct IniError {
    pub at: Location,
    pub kind: IniErrorKind,
}

impl IniError {
    fn new(at: Location, kind: IniErrorKind) -> Self {
        IniError { at, kind }
    }
}

/// Parses a file and its includes. Collects every error it can find.
pub fn parse_ini(path: &Path) -> Result<Ini, Vec<IniError>> {
    let mut p = Reader::default();
    p.read_file(path, None, 0, false);
    p.finish()
}

/// Parses text that did not come from a file. `origin` names it in
/// messages; `#include` is relative to its directory.
pub fn parse_ini_str(text: &str, origin: &str) -> Result<Ini, Vec<IniError>> {
    let mut p = Reader::default();
    if text.len() as u64 > MAX_FILE_BYTES {
        p.errors.push(IniError::new(
            Location::new(origin, 0),
            IniErrorKind::TooLarge {
                size: text.len() as u64,
                limit: MAX_FILE_BYTES,
            },
        ));
    } else {
        p.total_bytes = text.len() as u64;
        p.parse_text(text.as_bytes(), origin, Path::new(origin), 0);
    }
    p.finish()
}

/// One line after comments are taken out.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    Header {
        name: &'a str,
        options: Vec<&'a str>,
    },
    Directive {
        name: &'a str,
        arg: &'a str,
    },
    Pair {
        key: &'a str,
        value: &'a str,
    },
}

fn header(input: &str) -> IResult<&str, Line<'_>> {
    let name = delimited(
        char::<&str, _>('['),
        take_till(|c: char| c == ']'),
        char(']'),
    );
    let option = delimited(space0, take_till(|c: char| c == ',' || c == ')'), space0);
    let options = delimited(
        preceded(space0, char('(')),
        separated_list1(char(','), option),
        char(')'),
    );
    all_consuming(terminated((name, opt(options)), space0))
        .map(|(name, options)| Line::Header {
            name: name.trim(),
            options: options
                .unwrap_or_default()
                .into_iter()
                .map(str::trim)
                .collect(),
        })
        .parse(input)
}

fn directive(input: &str) -> IResult<&str, Line<'_>> {
    let name = take_while1(|c: char| c.is_ascii_alphabetic());
    let arg = alt((preceded(space1, rest), rest));
    preceded(char('#'), (name, arg))
        .map(|(name, arg): (&str, &str)| Line::Directive {
            name,
            arg: arg.trim(),
        })
        .parse(input)
}

fn pair(input: &str) -> IResult<&str, Line<'_>> {
    let key = take_till(|c: char| c == '=');
    let value = preceded(char('='), preceded(opt(char('>')), rest));
    all_consuming((key, value))
        .map(|(key, value): (&str, &str)| Line::Pair {
            key: key.trim(),
            value: value.trim(),
        })
        .parse(input)
}

/// Classifies a comment-free, trimmed, non-empty line.
fn classify(line: &str) -> Result<Line<'_>, IniErrorKind> {
    if line.starts_with('[') {
        return header(line)
            .map(|(_, l)| l)
            .map_err(|_| IniErrorKind::BadHeader);
    }
    if line.starts_with('#') {
        return match directive(line) {
            Ok((_, l)) => Ok(l),
            // `#` followed by no word: a comment line.
            Err(_) => Ok(Line::Directive { name: "", arg: "" }),
        };
    }
    if !line.contains('=') {
        return Err(IniErrorKind::MissingEquals);
    }
    pair(line).map(|(_, l)| l).map_err(|_| IniErrorKind::Syntax)
}

/// Takes `;` comments out of one line, tracking block comments across
/// lines the way Asterisk's `config.c` does.
#[derive(Default)]
struct CommentState {
    /// Lines where the open block comments started.
    open: Vec<usize>,
}

impl CommentState {
    fn strip(&mut self, line: &[u8], lineno: usize) -> Result<Vec<u8>, IniErrorKind> {
        let mut out = Vec::with_capacity(line.len());
        // Where the text after the last comment marker starts: `--;` only
        // closes if both dashes come after it (so `;--;` does not).
        let mut seg = 0;
        let mut i = 0;
        while i < line.len() {
            let c = line[i];
            if c == b'\\' && line.get(i + 1) == Some(&b';') {
                if self.open.is_empty() {
                    out.push(b';');
                }
                i += 2;
                continue;
            }
            if c != b';' {
                if self.open.is_empty() {
                    out.push(c);
                }
                i += 1;
                continue;
            }
            if line[i..].starts_with(b";--") && line.get(i + 3) != Some(&b'-') {
                if self.open.len() >= MAX_COMMENT_NESTING {
                    return Err(IniErrorKind::CommentTooDeep);
                }
                self.open.push(lineno);
                i += 3;
                seg = i;
            } else if !self.open.is_empty() && i >= seg + 2 && &line[i - 2..i] == b"--" {
                self.open.pop();
                i += 1;
                seg = i;
            } else if self.open.is_empty() {
                break;
            } else {
                i += 1;
                seg = i;
            }
        }
        Ok(out)
    }
}

#[derive(Default)]
struct Reader {
    ini: Ini,
    errors: Vec<IniError>,
    /// Index into `ini.sections` of the section keys go to. `None` with
    /// `broken` set: the header was bad, so its keys are skipped quietly.
    current: Option<usize>,
    broken: bool,
    /// Canonical paths of the files being read, outermost first.
    stack: Vec<PathBuf>,
    total_bytes: u64,
}

impl Reader {
    fn finish(self) -> Result<Ini, Vec<IniError>> {
        if self.errors.is_empty() {
            Ok(self.ini)
        } else {
            Err(self.errors)
        }
    }

    fn error(&mut self, at: Location, kind: IniErrorKind) {
        self.errors.push(IniError::new(at, kind));
    }

    /// Reads one file. `from` is the `#include` line that named it.
    fn read_file(&mut self, path: &Path, from: Option<&Location>, depth: usize, optional: bool) {
        let display = path.display().to_string();
        let at = from.cloned().unwrap_or_else(|| Location::new(&display, 0));
        // Name the file in the message unless the location already does.
        let io = |what: &dyn fmt::Display| match from {
            Some(_) => IniErrorKind::Io(format!("{display}: {what}")),
            None => IniErrorKind::Io(what.to_string()),
        };
        if depth > MAX_INCLUDE_DEPTH {
            return self.error(at, IniErrorKind::IncludeTooDeep);
        }
        if self.ini.files.len() >= MAX_FILES {
            return self.error(at, IniErrorKind::TooManyFiles(MAX_FILES));
        }
        let canonical = match path.canonicalize() {
            Ok(c) => c,
            Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => return self.error(at, io(&e)),
        };
        if self.stack.contains(&canonical) {
            return self.error(at, IniErrorKind::IncludeLoop(display));
        }
        let size = match std::fs::metadata(&canonical) {
            Ok(m) if !m.is_file() => {
                let kind = io(&"not a regular file");
                return self.error(at, kind);
            }
            Ok(m) => m.len(),
            Err(e) => return self.error(at, io(&e)),
        };
        if size > MAX_FILE_BYTES {
            let limit = MAX_FILE_BYTES;
            return self.error(
                Location::new(&display, 0),
                IniErrorKind::TooLarge { size, limit },
            );
        }
        if self.total_bytes + size > MAX_TOTAL_BYTES {
            return self.error(at, IniErrorKind::TotalTooLarge(MAX_TOTAL_BYTES));
        }
        // Read through a bounded reader: the file may grow after the stat.
        let bytes = match read_bounded(&canonical, MAX_FILE_BYTES) {
            Ok(Some(b)) => b,
            Ok(None) => {
                let kind = IniErrorKind::TooLarge {
                    size: MAX_FILE_BYTES + 1,
                    limit: MAX_FILE_BYTES,
                };
                return self.error(Location::new(&display, 0), kind);
            }
            Err(e) => return self.error(at, io(&e)),
        };
        self.total_bytes += bytes.len() as u64;
        self.ini.files.push(path.to_path_buf());
        self.stack.push(canonical);
        self.parse_text(&bytes, &display, path, depth);
        self.stack.pop();
    }

    fn parse_text(&mut self, bytes: &[u8], display: &str, path: &Path, depth: usize) {
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        let mut comments = CommentState::default();
        for (idx, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let at = Location::new(display, idx + 1);
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let stripped = match comments.strip(raw, at.line) {
                Ok(s) => s,
                Err(kind) => {
                    self.error(at, kind);
                    continue;
                }
            };
            let Ok(text) = std::str::from_utf8(&stripped) else {
                self.error(at, IniErrorKind::NotUtf8);
                continue;
            };
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            match classify(text) {
                Ok(line) => self.line(line, at, path, depth),
                Err(kind) => self.error(at, kind),
            }
        }
        if let Some(&first) = comments.open.first() {
            self.error(Location::new(display, first), IniErrorKind::UnclosedComment);
        }
    }

    fn line(&mut self, line: Line<'_>, at: Location, path: &Path, depth: usize) {
        match line {
            Line::Header { name, options } => self.header(name, &options, at),
            Line::Pair { key, value } => self.pair(key, value, at),
            Line::Directive { name, arg } => self.directive(name, arg, at, path, depth),
        }
    }

    fn header(&mut self, name: &str, options: &[&str], at: Location) {
        self.current = None;
        self.broken = true;
        if name.is_empty() {
            return self.error(at, IniErrorKind::EmptySectionName);
        }
        if name.chars().count() > MAX_SECTION_NAME {
            return self.error(at, IniErrorKind::LongSectionName);
        }
        let mut template = false;
        let mut append = false;
        let mut inherits = Vec::new();
        for &opt in options {
            match opt {
                "!" => template = true,
                "+" => append = true,
                "" => return self.error(at, IniErrorKind::BadHeader),
                t => inherits.push(t.to_string()),
            }
        }
        if append {
            if template || !inherits.is_empty() {
                return self.error(at, IniErrorKind::BadHeader);
            }
            match self.ini.sections.iter().rposition(|s| s.name == name) {
                Some(i) => {
                    self.current = Some(i);
                    self.broken = false;
                }
                None => self.error(at, IniErrorKind::AppendToUnknown(name.to_string())),
            }
            return;
        }
        if let Some(first) = self.ini.section(name).map(|s| s.at.clone()) {
            let name = name.to_string();
            return self.error(at, IniErrorKind::DuplicateSection { name, first });
        }
        let mut entries = Vec::new();
        let mut ok = true;
        for t in &inherits {
            match self.ini.section(t) {
                Some(s) => entries.extend(s.entries.iter().map(|e| Entry {
                    inherited_from: Some(t.clone()),
                    ..e.clone()
                })),
                None => {
                    self.error(at.clone(), IniErrorKind::UnknownTemplate(t.clone()));
                    ok = false;
                }
            }
        }
        if !ok {
            return;
        }
        self.ini.sections.push(Section {
            name: name.to_string(),
            template,
            inherits,
            entries,
            at,
        });
        self.current = Some(self.ini.sections.len() - 1);
        self.broken = false;
    }

    fn pair(&mut self, key: &str, value: &str, at: Location) {
        if key.is_empty() {
            return self.error(at, IniErrorKind::EmptyKey);
        }
        if key.contains(char::is_whitespace) {
            return self.error(at, IniErrorKind::KeyWithSpace);
        }
        let Some(i) = self.current else {
            if !self.broken {
                self.error(at, IniErrorKind::OutsideSection);
            }
            return;
        };
        self.ini.sections[i].entries.push(Entry {
            key: key.to_ascii_lowercase(),
            value: value.to_string(),
            at,
            inherited_from: None,
        });
    }

    fn directive(&mut self, name: &str, arg: &str, at: Location, path: &Path, depth: usize) {
        let (optional, which) = match name.to_ascii_lowercase().as_str() {
            "include" => (false, "include"),
            "tryinclude" => (true, "tryinclude"),
            "exec" | "tryexec" => return self.error(at, IniErrorKind::Exec),
            // Asterisk warns about unknown directives and skips them; the
            // popivr format calls such lines comments.
            _ => return,
        };
        let file = strip_quotes(arg);
        if file.is_empty() {
            return self.error(at, IniErrorKind::IncludeWithoutFile(which));
        }
        if file.contains(['*', '?', '[']) {
            return self.error(at, IniErrorKind::IncludeGlob);
        }
        let target = match path.parent() {
            Some(dir) if Path::new(file).is_relative() => dir.join(file),
            _ => PathBuf::from(file),
        };
        self.read_file(&target, Some(&at), depth + 1, optional);
    }
}

fn strip_quotes(arg: &str) -> &str {
    let arg = arg.trim();
    for (open, close) in [('"', '"'), ('<', '>')] {
        if let Some(inner) = arg.strip_prefix(open).and_then(|a| a.strip_suffix(close)) {
            return inner.trim();
        }
    }
    arg
}

/// Reads at most `limit` bytes; `None` if the file holds more.
fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut buf)?;
    Ok((buf.len() as u64 <= limit).then_some(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Ini {
        parse_ini_str(text, "t.conf").unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn errors(text: &str) -> Vec<String> {
        parse_ini_str(text, "t.conf")
            .expect_err("should fail")
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn pairs(s: &Section) -> Vec<(&str, &str)> {
        s.entries
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect()
    }

    #[test]
    fn sections_keys_and_both_separators() {
        let ini = parse("[a]\nKey = v 1 \nexten => 1,1,NoOp\n[b]\nx=\n");
        assert_eq!(ini.sections.len(), 2);
        assert_eq!(
            pairs(&ini.sections[0]),
            [("key", "v 1"), ("exten", "1,1,NoOp")]
        );
        assert_eq!(pairs(&ini.sections[1]), [("x", "")]);
        assert_eq!(ini.sections[0].entries[1].at, Location::new("t.conf", 3));
    }

    #[test]
    fn comments_trailing_escaped_and_block() {
        let ini = parse(
            "; top\n[a] ; trailing\nk = a\\;b ; c\n;-- block\nhidden = 1\nstill --; shown = 2\n\
             ;----- plain comment\nafter = 3\n;--;\nin = 4\n--;\n",
        );
        assert_eq!(
            pairs(&ini.sections[0]),
            [("k", "a;b"), ("shown", "2"), ("after", "3")]
        );
    }

    #[test]
    fn nested_block_comments() {
        let ini = parse("[a]\n;-- one ;-- two --; still one\nx = 1\n--;\ny = 2\n");
        assert_eq!(pairs(&ini.sections[0]), [("y", "2")]);
    }

    #[test]
    fn unclosed_block_comment_points_at_its_start() {
        let e = errors("[a]\nx = 1\n;-- never closed\ny = 2\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("t.conf:3: block comment"), "{e:?}");
    }

    #[test]
    fn hash_lines_are_comments_but_exec_is_refused() {
        let ini = parse("# a comment\n[a]\n#\n#note x = 1\nk = v\n");
        assert_eq!(pairs(&ini.sections[0]), [("k", "v")]);
        let e = errors("[a]\n#exec /bin/date\n");
        assert!(
            e[0].starts_with("t.conf:2: `#exec` is not supported"),
            "{e:?}"
        );
    }

    #[test]
    fn templates_and_inheritance() {
        let ini =
            parse("[t1](!)\na = 1\nr = x\n[t2](!,t1)\nb = 2\n[s](t2, t1)\na = 9\nr = y\n[u](s)\n");
        let t2 = ini.section("t2").unwrap();
        assert!(t2.template);
        assert_eq!(pairs(t2), [("a", "1"), ("r", "x"), ("b", "2")]);
        let s = ini.section("s").unwrap();
        assert!(!s.template);
        assert_eq!(s.inherits, ["t2", "t1"]);
        assert_eq!(s.get("a").unwrap().value, "9");
        assert_eq!(
            s.all("r").map(|e| e.value.as_str()).collect::<Vec<_>>(),
            ["x", "x", "y"]
        );
        assert_eq!(s.entries[0].inherited_from.as_deref(), Some("t2"));
        assert_eq!(s.entries[0].at, Location::new("t.conf", 2));
        // A plain section can be inherited from too.
        assert_eq!(ini.section("u").unwrap().get("a").unwrap().value, "9");
    }

    #[test]
    fn append_with_plus() {
        let ini = parse("[a]\nx = 1\n[b]\n[a](+)\ny = 2\n");
        assert_eq!(pairs(ini.section("a").unwrap()), [("x", "1"), ("y", "2")]);
        assert_eq!(ini.sections.len(), 2);
    }

    #[test]
    fn header_errors() {
        let e =
            errors("[a]\n[a]\n[b](nope)\nk = skipped quietly\n[]\n[c\n[d](+)\n[e](!,)\n[f] junk\n");
        let want = [
            "t.conf:2: [a] is already defined at t.conf:1",
            "t.conf:3: unknown template [nope]",
            "t.conf:5: section name is empty",
            "t.conf:6: bad section header",
            "t.conf:7: [d](+) adds to a section",
            "t.conf:8: bad section header",
            "t.conf:9: bad section header",
        ];
        assert_eq!(e.len(), want.len(), "{e:#?}");
        for (got, want) in e.iter().zip(want) {
            assert!(got.starts_with(want), "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn line_errors_do_not_quote_the_line() {
        let e = errors("k = v\n[a]\nsecret hunter2\n = x\nse cret = x\n");
        assert_eq!(e.len(), 4, "{e:#?}");
        assert!(e[0].starts_with("t.conf:1: `key = value` before any [section]"));
        assert!(e[1].starts_with("t.conf:3: no `=`"));
        assert!(e[2].starts_with("t.conf:4: key is empty"));
        assert!(e[3].starts_with("t.conf:5: key contains white space"));
        assert!(e.iter().all(|m| !m.contains("hunter2")));
    }

    #[test]
    fn invalid_utf8_is_named() {
        let e = parse_ini_str("[a]\n", "x").map(|_| ()); // sanity
        assert!(e.is_ok());
        let tmp = tempdir();
        let dir = tmp.path();
        let f = dir.join("bad.conf");
        std::fs::write(&f, b"[a]\nk = \xff\n").unwrap();
        let e = parse_ini(&f).unwrap_err();
        assert_eq!(e[0].kind, IniErrorKind::NotUtf8);
        assert_eq!(e[0].at.line, 2);
    }

    #[test]
    fn secret_values_are_hidden_in_debug() {
        let ini = parse(
            "[a]\nsecret = hunter2\nSecert = hunter2\noauth_secret = hunter2\n\
             refresh_token = hunter2\npassword = hunter2\nother = visible\n",
        );
        let dbg = format!("{ini:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("visible"));
        assert!(!is_secret_key("targets") && !is_secret_key("key") && !is_secret_key("select"));
    }

    #[test]
    fn oversized_text_is_refused() {
        let big = "; x\n".repeat((MAX_FILE_BYTES / 4 + 1) as usize);
        let e = parse_ini_str(&big, "big.conf").unwrap_err();
        assert!(matches!(e[0].kind, IniErrorKind::TooLarge { .. }));
        assert!(e[0].to_string().starts_with("big.conf: file is"));
    }

    /// A directory removed when the test ends (also when it fails).
    fn tempdir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("popivr-ini-")
            .tempdir()
            .unwrap()
    }

    #[test]
    fn include_relative_to_the_including_file() {
        let tmp = tempdir();
        let dir = tmp.path();
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(
            dir.join("main.conf"),
            "[a]\nx = 1\n#include \"sub/inc.conf\"\n[c]\n#tryinclude <missing.conf>\n",
        )
        .unwrap();
        std::fs::write(dir.join("sub/inc.conf"), "y = 2\n[b]\n#include more.conf\n").unwrap();
        std::fs::write(dir.join("sub/more.conf"), "z = 3\n").unwrap();
        let ini = parse_ini(&dir.join("main.conf")).unwrap();
        assert_eq!(pairs(ini.section("a").unwrap()), [("x", "1"), ("y", "2")]);
        assert_eq!(pairs(ini.section("b").unwrap()), [("z", "3")]);
        let z = &ini.section("b").unwrap().entries[0];
        assert!(z.at.file.ends_with("sub/more.conf"), "{:?}", z.at);
        assert_eq!(z.at.line, 1);
        assert_eq!(ini.files.len(), 3);
    }

    #[test]
    fn include_errors_name_the_include_line() {
        let tmp = tempdir();
        let dir = tmp.path();
        std::fs::write(dir.join("loop.conf"), "[a]\n#include loop.conf\n").unwrap();
        let e = parse_ini(&dir.join("loop.conf")).unwrap_err();
        assert!(matches!(e[0].kind, IniErrorKind::IncludeLoop(_)));
        assert_eq!(e[0].at.line, 2);

        std::fs::write(dir.join("m.conf"), "[a]\n\n#include \"gone.conf\"\n").unwrap();
        let e = parse_ini(&dir.join("m.conf")).unwrap_err();
        assert!(e[0].to_string().contains("m.conf:3: cannot read"), "{e:?}");

        std::fs::write(dir.join("g.conf"), "#include *.conf\n").unwrap();
        let e = parse_ini(&dir.join("g.conf")).unwrap_err();
        assert_eq!(e[0].kind, IniErrorKind::IncludeGlob);
    }

    #[test]
    fn include_depth_is_limited() {
        let tmp = tempdir();
        let dir = tmp.path();
        for i in 0..=MAX_INCLUDE_DEPTH + 1 {
            std::fs::write(
                dir.join(format!("d{i}.conf")),
                format!("#include d{}.conf\n", i + 1),
            )
            .unwrap();
        }
        let e = parse_ini(&dir.join("d0.conf")).unwrap_err();
        assert_eq!(e[0].kind, IniErrorKind::IncludeTooDeep);
        assert!(
            e[0].at
                .file
                .ends_with(&format!("d{MAX_INCLUDE_DEPTH}.conf"))
        );
    }

    #[test]
    fn oversized_file_is_refused() {
        let tmp = tempdir();
        let dir = tmp.path();
        let f = dir.join("huge.conf");
        std::fs::write(&f, vec![b';'; MAX_FILE_BYTES as usize + 1]).unwrap();
        let e = parse_ini(&f).unwrap_err();
        assert!(matches!(e[0].kind, IniErrorKind::TooLarge { .. }));
    }

    #[test]
    fn crlf_and_bom() {
        let ini = parse("\u{feff}[a]\r\nk = v\r\n");
        assert_eq!(pairs(&ini.sections[0]), [("k", "v")]);
    }
}
