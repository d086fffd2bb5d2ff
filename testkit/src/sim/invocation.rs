//! The data of `ExternalIVR(...)`, taken apart the way `app_externalivr.c`
//! does: program and its arguments inside parentheses, then the options.

use std::fmt;

/// Asterisk passes at most this many argv entries (program included).
pub const MAX_ARGS: usize = 32;

/// ExternalIVR's options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// `n`: do not answer; playback commands fail with `Z` until `T`.
    pub no_answer: bool,
    /// `i`: on hangup send `I,<ts>,HANGUP` and keep talking until `H`.
    pub inform_hangup: bool,
    /// `d`: the channel is already hung up; no hangup is ever reported.
    pub dead: bool,
}

impl Options {
    /// `ast_app_parse_options` for `n`, `i` and `d`; other letters are
    /// ignored as Asterisk ignores them.
    pub fn parse(s: &str) -> Self {
        Options {
            no_answer: s.contains('n'),
            inform_hangup: s.contains('i'),
            dead: s.contains('d'),
        }
    }
}

/// What Asterisk would exec for one `ExternalIVR()` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// argv as exec'd: `argv[0]` is the program path, no `PATH` search.
    pub argv: Vec<String>,
    pub options: Options,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvocationError {
    /// `ExternalIVR()` with nothing in it.
    Empty,
    /// `prog(args` with no `)`.
    MissingParen,
}

impl fmt::Display for InvocationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InvocationError::Empty => "ExternalIVR requires a command to execute",
            InvocationError::MissingParen => "parse error, missing closing parenthesis",
        })
    }
}

impl std::error::Error for InvocationError {}

impl Invocation {
    /// Take apart the data of `ExternalIVR(<data>)`, e.g.
    /// `/usr/bin/popivr(sales,x=1),n`.
    pub fn parse(data: &str) -> Result<Self, InvocationError> {
        let top = separate_args(data, 2);
        let application = top
            .first()
            .filter(|a| !a.is_empty())
            .ok_or(InvocationError::Empty)?;
        // Only the first ','-separated word of the options counts.
        let options = top.get(1).map(|o| o.split(',').next().unwrap_or_default());

        // `prog(a,b)` → `prog,a,b`: first '(' becomes a comma, the last ')' ends it.
        let application = match application.find('(') {
            Some(open) => {
                let close = application.rfind(')').filter(|&c| c > open);
                let close = close.ok_or(InvocationError::MissingParen)?;
                format!("{},{}", &application[..open], &application[open + 1..close])
            }
            None => application.clone(),
        };
        let argv = separate_args(&application, MAX_ARGS);
        Ok(Invocation {
            argv,
            options: Options::parse(options.unwrap_or_default()),
        })
    }

    pub fn program(&self) -> &str {
        &self.argv[0]
    }

    /// `ivr://HOST[:PORT]` (socket mode): the `HOST[:PORT]` part.
    pub fn socket(&self) -> Option<&str> {
        self.argv[0].strip_prefix("ivr://")
    }

    pub fn args(&self) -> &[String] {
        &self.argv[1..]
    }

    /// The data of the `P` event: argv, program included, comma-joined.
    pub fn params(&self) -> String {
        self.argv.join(",")
    }
}

/// `HOST[:PORT]` taken apart like `ast_sockaddr_split_hostport(.., 0)`:
/// `[v6]:port`, `[v6]`, `host:port`, or a host with no port; a host with
/// two or more colons and no brackets is an IPv6 address without port.
/// `None` for what Asterisk would not parse either.
pub fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?.parse().ok()?))),
        };
    }
    match s.matches(':').count() {
        1 => {
            let (host, port) = s.split_once(':')?;
            Some((host, Some(port.parse().ok()?)))
        }
        _ => Some((s, None)),
    }
}

/// `AST_STANDARD_APP_ARGS`: split on commas outside `()`, `[]` and `"…"`,
/// removing quotes and the backslash of `\x` escapes. At most `max`
/// pieces; the last one takes the unparsed rest.
pub fn separate_args(input: &str, max: usize) -> Vec<String> {
    let chars: Vec<char> = input.chars().collect();
    let mut args = Vec::new();
    let (mut paren, mut bracket, mut quote) = (0u32, 0u32, false);
    let mut i = 0;
    let mut ended_on_delim = false;
    while i < chars.len() && args.len() + 1 < max {
        let mut cur = String::new();
        ended_on_delim = false;
        while i < chars.len() {
            let c = chars[i];
            i += 1;
            match c {
                '(' => paren += 1,
                ')' => paren = paren.saturating_sub(1),
                '[' => bracket += 1,
                ']' => bracket = bracket.saturating_sub(1),
                '"' => {
                    quote = !quote;
                    continue;
                }
                '\\' => {
                    if let Some(&next) = chars.get(i) {
                        cur.push(next);
                        i += 1;
                    }
                    continue;
                }
                ',' if paren == 0 && bracket == 0 && !quote => {
                    ended_on_delim = true;
                    break;
                }
                _ => {}
            }
            cur.push(c);
        }
        args.push(cur);
    }
    if i < chars.len() {
        args.push(chars[i..].iter().collect());
    } else if ended_on_delim {
        args.push(String::new());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(data: &str) -> Invocation {
        Invocation::parse(data).unwrap()
    }

    #[test]
    fn program_args_in_parentheses_and_options_after() {
        let i = inv("/usr/bin/popivr(sales,x=1),n");
        assert_eq!(i.argv, ["/usr/bin/popivr", "sales", "x=1"]);
        assert_eq!(
            i.options,
            Options {
                no_answer: true,
                ..Options::default()
            }
        );
        assert_eq!(i.params(), "/usr/bin/popivr,sales,x=1");
    }

    #[test]
    fn a_plain_comma_argument_is_the_options() {
        let i = inv("/usr/bin/popivr,sales");
        assert_eq!(i.argv, ["/usr/bin/popivr"]);
        // `sales` has none of the letters n, i, d.
        assert_eq!(i.options, Options::default());
        let i = inv("/usr/bin/popivr,dialin");
        assert_eq!(
            i.options,
            Options {
                no_answer: true,
                inform_hangup: true,
                dead: true
            }
        );
    }

    #[test]
    fn only_the_first_option_word_counts() {
        assert_eq!(
            inv("/p(a),i,n").options,
            Options {
                inform_hangup: true,
                ..Options::default()
            }
        );
    }

    #[test]
    fn nested_parentheses_quotes_and_escapes() {
        assert_eq!(inv("/p(a(b,c),[d,e])").argv, ["/p", "a(b,c)", "[d,e]"]);
        // The data is split twice (options, then program arguments), each
        // pass removing quotes and backslashes: one level protects nothing.
        assert_eq!(inv("/p(\"d,e\",f\\,g)").argv, ["/p", "d", "e", "f", "g"]);
        assert_eq!(inv("/p(f\\\\\\,g)").argv, ["/p", "f,g"]);
        // `()` is `prog,` to Asterisk: one empty argument.
        assert_eq!(inv("/p()").argv, ["/p", ""]);
        assert_eq!(inv("/p(a,)").argv, ["/p", "a", ""]);
    }

    #[test]
    fn errors() {
        assert_eq!(Invocation::parse(""), Err(InvocationError::Empty));
        assert_eq!(
            Invocation::parse("/p(a"),
            Err(InvocationError::MissingParen)
        );
    }

    #[test]
    fn socket_mode_keeps_the_url_as_the_first_argument() {
        let i = inv("ivr://pbx.example.org:2950(sales,q=1),n");
        assert_eq!(i.socket(), Some("pbx.example.org:2950"));
        assert_eq!(i.params(), "ivr://pbx.example.org:2950,sales,q=1");
        assert!(i.options.no_answer);
        assert_eq!(inv("/usr/bin/popivr(sales)").socket(), None);
    }

    #[test]
    fn host_and_port_are_split_like_ast_sockaddr_split_hostport() {
        for (input, host, port) in [
            ("127.0.0.1", "127.0.0.1", None),
            ("127.0.0.1:2950", "127.0.0.1", Some(2950)),
            ("pbx.example.org", "pbx.example.org", None),
            ("pbx:2950", "pbx", Some(2950)),
            ("[::1]:2950", "::1", Some(2950)),
            ("[::1]", "::1", None),
            ("::1", "::1", None),
            ("fe80::1:2:3", "fe80::1:2:3", None),
        ] {
            assert_eq!(split_host_port(input), Some((host, port)), "{input}");
        }
        assert_eq!(split_host_port("[::1"), None);
        assert_eq!(split_host_port("host:port"), None);
    }

    #[test]
    fn at_most_32_pieces_the_last_keeps_the_rest() {
        let args: Vec<String> = (0..40).map(|n| n.to_string()).collect();
        let i = inv(&format!("/p({})", args.join(",")));
        assert_eq!(i.argv.len(), MAX_ARGS);
        assert_eq!(i.argv[MAX_ARGS - 1], args[30..].join(","));
    }
}
