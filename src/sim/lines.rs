//! Reading lines the way Asterisk does: `fgets` into a 1024-byte buffer,
//! then `ast_strip`.

/// The most bytes Asterisk takes as one line (`fgets` with a 1024-byte
/// buffer). The rest of a longer line is read as a line of its own.
pub const MAX_READ: usize = 1023;

/// Splits a byte stream into the chunks successive `fgets` calls return.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
}

impl LineSplitter {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete chunk: through the first `\n`, or [`MAX_READ`]
    /// bytes when no newline comes that soon.
    pub fn next_line(&mut self) -> Option<Vec<u8>> {
        let window = &self.buf[..self.buf.len().min(MAX_READ)];
        let end = match window.iter().position(|&b| b == b'\n') {
            Some(nl) => nl + 1,
            None if window.len() == MAX_READ => MAX_READ,
            None => return None,
        };
        Some(self.buf.drain(..end).collect())
    }

    /// At end of file: what is left, as `fgets` returns a last line without
    /// a newline.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        (!self.buf.is_empty()).then(|| std::mem::take(&mut self.buf))
    }
}

/// What Asterisk sees of a chunk: C string semantics (a NUL ends it), then
/// `ast_strip`, which drops every byte below 33 (space and all control
/// characters, CR included) at both ends.
pub fn ast_strip(raw: &[u8]) -> String {
    let raw = raw.split(|&b| b == 0).next().unwrap_or_default();
    let start = raw.iter().position(|&b| b > b' ').unwrap_or(raw.len());
    let end = raw.iter().rposition(|&b| b > b' ').map_or(start, |i| i + 1);
    String::from_utf8_lossy(&raw[start..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<Vec<u8>> {
        let mut s = LineSplitter::default();
        s.push(input);
        let mut out = Vec::new();
        while let Some(l) = s.next_line() {
            out.push(l);
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn splits_at_newlines_and_keeps_a_partial_last_line() {
        assert_eq!(
            lines(b"S,a\nA,b\nE,x"),
            vec![b"S,a\n".to_vec(), b"A,b\n".to_vec(), b"E,x".to_vec()]
        );
    }

    #[test]
    fn a_long_line_is_cut_at_1023_bytes() {
        let mut input = vec![b'x'; 1500];
        input.push(b'\n');
        let got = lines(&input);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].len(), MAX_READ);
        assert_eq!(got[1].len(), 1500 - MAX_READ + 1);
    }

    #[test]
    fn a_newline_right_after_1023_bytes_starts_an_empty_line() {
        let mut input = vec![b'x'; MAX_READ];
        input.push(b'\n');
        assert_eq!(lines(&input), vec![vec![b'x'; MAX_READ], b"\n".to_vec()]);
    }

    #[test]
    fn waits_for_more_bytes_when_no_newline_yet() {
        let mut s = LineSplitter::default();
        s.push(b"S,a");
        assert_eq!(s.next_line(), None);
        s.push(b"b\n");
        assert_eq!(s.next_line(), Some(b"S,ab\n".to_vec()));
    }

    #[test]
    fn strip_drops_control_bytes_and_stops_at_nul() {
        assert_eq!(ast_strip(b" \t S,a b \r\n"), "S,a b");
        assert_eq!(ast_strip(b"\x01\x02L,x\x7f\x1b"), "L,x\x7f");
        assert_eq!(ast_strip(b"V,a=1\0,FILE(x)=y\n"), "V,a=1");
        assert_eq!(ast_strip(b"\r\n"), "");
    }
}
