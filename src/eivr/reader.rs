//! Reading event lines with bounded memory.
//!
//! The shells must drain stdin (or the `ivr://` socket) at all times, and a
//! peer that never sends a newline must not make us buffer without end: a
//! line longer than the limit is counted and skipped up to its newline,
//! keeping only its first bytes for the error message.

use tokio::io::{self, AsyncBufRead, AsyncBufReadExt};

use super::{EventLine, MAX_EVENT_LINE, ParseError, excerpt, parse_event};

/// Splits an async byte stream into lines (without the `\n`), never holding
/// more than `limit + 1` bytes of one line.
///
/// [`next_line`](Self::next_line) and [`next_event`](Self::next_event) are
/// cancel safe: a partial line read before the future was dropped is kept
/// and completed by the next call, so they can sit in a `tokio::select!`.
#[derive(Debug)]
pub struct LineReader<R> {
    inner: R,
    limit: usize,
    /// The current line, or its first `limit + 1` bytes when it is longer.
    buf: Vec<u8>,
    /// Bytes of the current line seen so far, kept or not.
    len: usize,
    /// `buf` holds a line already handed out; clear it before reading on.
    handed_out: bool,
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    /// A reader whose limit is [`MAX_EVENT_LINE`], the longest event accepted.
    pub fn new(inner: R) -> Self {
        Self::with_limit(inner, MAX_EVENT_LINE)
    }

    pub fn with_limit(inner: R, limit: usize) -> Self {
        Self {
            inner,
            limit,
            // Sized once: the buffer never grows past this.
            buf: Vec::with_capacity(limit + 1),
            len: 0,
            handed_out: false,
        }
    }

    /// The next line without its `\n`, `Err(ParseError::TooLong)` for a line
    /// over the limit, or `None` at end of input. A last line without a
    /// newline is still returned.
    pub async fn next_line(&mut self) -> io::Result<Option<Result<&[u8], ParseError>>> {
        if self.handed_out {
            self.buf.clear();
            self.len = 0;
            self.handed_out = false;
        }
        loop {
            let avail = self.inner.fill_buf().await?;
            if avail.is_empty() {
                if self.len == 0 {
                    return Ok(None);
                }
                break;
            }
            let newline = avail.iter().position(|&b| b == b'\n');
            let chunk = &avail[..newline.unwrap_or(avail.len())];
            let keep = chunk.len().min(self.limit + 1 - self.buf.len());
            self.buf.extend_from_slice(&chunk[..keep]);
            self.len += chunk.len();
            // No await between `fill_buf` and `consume`: what is consumed is
            // already in `self`, which is what makes this cancel safe.
            let used = chunk.len() + usize::from(newline.is_some());
            self.inner.consume(used);
            if newline.is_some() {
                break;
            }
        }
        self.handed_out = true;
        if self.len > self.limit {
            return Ok(Some(Err(ParseError::TooLong {
                len: self.len,
                excerpt: excerpt(&self.buf),
            })));
        }
        Ok(Some(Ok(&self.buf)))
    }

    /// The next line, parsed. Malformed lines come back as `Some(Err(_))` so
    /// the caller can log them and read on.
    pub async fn next_event(&mut self) -> io::Result<Option<Result<EventLine, ParseError>>> {
        Ok(self
            .next_line()
            .await?
            .map(|line| line.and_then(parse_event)))
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eivr::Event;
    use futures::FutureExt;
    use tokio::io::{AsyncWriteExt, BufReader};

    /// All lines of `input`, read through a tiny buffer so lines span reads.
    async fn lines(input: &[u8], limit: usize) -> Vec<Result<Vec<u8>, ParseError>> {
        let mut r = LineReader::with_limit(BufReader::with_capacity(3, input), limit);
        let mut out = Vec::new();
        while let Some(line) = r.next_line().await.unwrap() {
            out.push(line.map(<[u8]>::to_vec));
        }
        out
    }

    #[tokio::test]
    async fn splits_lines_across_reads() {
        let got = lines(b"H,1700000000\n\nF,1700000000,hold\r\nlast", 100).await;
        let want: Vec<Result<Vec<u8>, ParseError>> = vec![
            Ok(b"H,1700000000".to_vec()),
            Ok(b"".to_vec()),
            Ok(b"F,1700000000,hold\r".to_vec()),
            Ok(b"last".to_vec()),
        ];
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn empty_input_is_end() {
        assert!(lines(b"", 10).await.is_empty());
    }

    #[tokio::test]
    async fn long_line_is_skipped_to_its_newline() {
        let mut input = b"5,1700000000\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 25));
        input.extend(b"\n6,1700000000\n");
        let got = lines(&input, 20).await;
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0], Ok(b"5,1700000000".to_vec()));
        assert_eq!(
            got[1],
            Err(ParseError::TooLong {
                len: 25,
                excerpt: "x".repeat(21)
            })
        );
        assert_eq!(got[2], Ok(b"6,1700000000".to_vec()));
    }

    #[tokio::test]
    async fn line_at_the_limit_is_kept() {
        let got = lines(b"0123456789\n01234567890\n", 10).await;
        assert_eq!(got[0], Ok(b"0123456789".to_vec()));
        assert!(matches!(got[1], Err(ParseError::TooLong { len: 11, .. })));
    }

    #[tokio::test]
    async fn memory_stays_bounded() {
        let huge = vec![b'a'; 1 << 20];
        let mut r = LineReader::with_limit(BufReader::new(&huge[..]), 64);
        let cap = r.buf.capacity();
        assert!(
            matches!(r.next_line().await.unwrap(), Some(Err(ParseError::TooLong { len, .. })) if len == 1 << 20)
        );
        assert_eq!(r.buf.capacity(), cap);
        assert!(cap < 1024);
    }

    #[tokio::test]
    async fn partial_line_survives_cancellation() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut r = LineReader::new(BufReader::new(rx));
        tx.write_all(b"F,1700000000,ho").await.unwrap();
        // One poll reads what is there, then the future is dropped.
        assert!(r.next_event().now_or_never().is_none());
        tx.write_all(b"ld\nH,1700000000\n").await.unwrap();
        drop(tx);
        let ev = r.next_event().await.unwrap().unwrap().unwrap();
        assert_eq!(ev.event, Event::Finished("hold".into()));
        let ev = r.next_event().await.unwrap().unwrap().unwrap();
        assert_eq!(ev.event, Event::Hangup);
        assert!(r.next_event().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn next_event_reports_malformed_lines_and_reads_on() {
        let input = &b"X,1\n3,1700000000\n"[..];
        let mut r = LineReader::new(input);
        assert!(matches!(
            r.next_event().await.unwrap(),
            Some(Err(ParseError::UnknownTag { .. }))
        ));
        assert_eq!(
            r.next_event().await.unwrap().unwrap().unwrap().event,
            Event::Dtmf('3')
        );
        assert!(r.next_event().await.unwrap().is_none());
    }
}
