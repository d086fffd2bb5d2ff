//! Reading lines the way Asterisk does: `ast_iostream_gets` into a
//! 1024-byte buffer, one line per wake-up of the command fd, then
//! `ast_strip`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

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

/// How much one `read()` of `ast_iostream_gets` takes: the stream's
/// `rbuf[2048]`.
const READ_CHUNK: usize = 2048;

/// Asterisk's command input (the child's stdout, or the `ivr://` socket) as
/// `eivr_comm()` reads it: `poll()` on the fd, and for each wake-up one
/// `ast_iostream_gets()`, which returns a line already in the stream's
/// buffer without touching the fd, and otherwise reads up to 2048 bytes
/// (every line in them goes into the buffer) and returns the first.
///
/// So lines that arrive together are handled one per wake-up, and the
/// wake-ups come only from new bytes on the fd (or its end): the tail of a
/// burst waits in the buffer until the child writes again
/// (externalivr-protocol.md, "How Asterisk reads commands").
pub struct CommandInput {
    fd: AsyncFd<OwnedFd>,
    split: LineSplitter,
    eof: bool,
}

impl CommandInput {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        Ok(CommandInput {
            // SAFETY: the descriptor is owned here and stays open while
            // registered (`AsyncFd` owns it and deregisters on drop).
            fd: unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                .map_err(|e| io::Error::other(e.to_string()))?,
            split: LineSplitter::default(),
            eof: false,
        })
    }

    /// The next line Asterisk handles, after the next wake-up of the fd;
    /// `None` once the fd is at its end and the buffer is empty ("Child
    /// process went away"). Cancel-safe: nothing is read between awaits.
    pub async fn next(&mut self) -> Option<Vec<u8>> {
        loop {
            if self.eof {
                // A closed fd polls as ready (POLLHUP) on every turn: the
                // buffer drains one line per turn, a partial last line
                // included, then the read returns 0.
                return self.split.next_line().or_else(|| self.split.finish());
            }
            let mut guard = self.fd.readable().await.ok()?;
            // tokio keeps readiness until told otherwise; `poll` is
            // level-triggered and sees only bytes still in the fd.
            if !poll_readable(self.fd.get_ref()) {
                guard.clear_ready();
                continue;
            }
            if let Some(line) = self.split.next_line() {
                return Some(line);
            }
            let mut chunk = [0u8; READ_CHUNK];
            match read(self.fd.get_ref(), &mut chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.split.push(&chunk[..n]);
                    // A partial line: Asterisk's blocking read waits for
                    // the rest, as this loop does.
                    if let Some(line) = self.split.next_line() {
                        return Some(line);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.eof = true,
            }
        }
    }

    /// At the end of the session: the lines Asterisk never handled, those
    /// left in its buffer and those still in the fd.
    pub fn unread(&mut self) -> Vec<Vec<u8>> {
        let mut chunk = [0u8; READ_CHUNK];
        while let Ok(n @ 1..) = read(self.fd.get_ref(), &mut chunk) {
            self.split.push(&chunk[..n]);
        }
        let mut lines = Vec::new();
        while let Some(line) = self.split.next_line() {
            lines.push(line);
        }
        lines.extend(self.split.finish());
        lines
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with no pointers involved.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0
        || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `poll()` would wake for the fd now: bytes to read, or its end.
fn poll_readable(fd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents != 0
}

fn read(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
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
