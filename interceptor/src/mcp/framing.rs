//! A watch on HTTP/1 request framing, beside hyper.
//!
//! hyper resolves ambiguous framing the way RFC 9112 allows — identical duplicate
//! `Content-Length` headers are collapsed, `Content-Length` next to `Transfer-Encoding` is
//! dropped (and the connection closed afterwards) — so by the time a request reaches the
//! service, the evidence is gone. A policy point should refuse such requests outright, so this
//! wrapper watches the bytes hyper reads: it parses each request head with `httparse` (hyper's
//! own parser) and skips bodies by their framing (`httparse::parse_chunk_size` for chunked ones)
//! to stay aligned with pipelined requests. It never changes a byte; it only queues a verdict
//! per request head, which the service takes in order.

use std::{
    collections::VecDeque,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest request head accepted; a longer one is refused and the watch stops (the
/// connection is closed with the refusal).
const MAX_HEAD: usize = 64 * 1024;
const HEAD_TOO_LONG: &str = "request head over 64 KiB";
const MAX_HEADERS: usize = 128;
/// Most empty-line bytes (CR, LF) accepted before a request head (RFC 9112 asks servers to
/// skip at least one). More, and the connection is cut: hyper parses its whole buffer again
/// at each read ending in a blank line, so a flood of them trickled in would cost the square
/// of its length.
const MAX_BLANK: usize = 1024;

/// Whether `data`, read after `pending` (the start of a request head), may end the head: a
/// blank line (`\r\n\r\n`, or `\n\n` which httparse also takes) in `data` or across the two.
fn ends_head(pending: &[u8], data: &[u8]) -> bool {
    let tail = &pending[pending.len().saturating_sub(3)..];
    let mut seam = [0u8; 6];
    let n = tail.len() + data.len().min(3);
    seam[..tail.len()].copy_from_slice(tail);
    seam[tail.len()..n].copy_from_slice(&data[..data.len().min(3)]);
    let blank =
        |w: &[u8]| w.windows(2).any(|p| p == b"\n\n") || w.windows(3).any(|p| p == b"\n\r\n");
    blank(&seam[..n]) || blank(data)
}

/// Verdicts, one per request head, in order: `Err(reason)` for ambiguous framing.
pub type Verdicts = Arc<Mutex<VecDeque<Result<(), String>>>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd(usize),
    Trailers,
    /// Not HTTP/1 (h2c preface) or lost: stop watching.
    Off,
}

/// The byte watcher (separate from I/O so it can be tested directly).
#[derive(Debug)]
pub struct Scanner {
    state: State,
    pending: Vec<u8>,
    verdicts: Verdicts,
    /// Empty-line bytes read before the next head.
    blank: usize,
    /// Over [`MAX_BLANK`]: the connection is to be cut.
    cut: bool,
}

impl Scanner {
    pub fn new(verdicts: Verdicts) -> Self {
        Self {
            state: State::Head,
            pending: Vec::new(),
            verdicts,
            blank: 0,
            cut: false,
        }
    }

    /// Feeds bytes as hyper reads them. Only an incomplete head or chunk line is kept between
    /// reads (usually nothing: an idle connection holds no copy of its last request).
    pub fn feed(&mut self, data: &[u8]) {
        if self.state == State::Off {
            return;
        }
        let mut data = data;
        if self.state == State::Head && self.pending.is_empty() {
            // Empty lines before a head are skipped (by httparse too), not kept.
            let blank = data
                .iter()
                .take_while(|b| matches!(b, b'\r' | b'\n'))
                .count();
            self.blank = if blank < data.len() {
                0
            } else {
                self.blank + blank
            };
            if self.blank > MAX_BLANK {
                self.cut = true;
                self.state = State::Off;
                return;
            }
            data = &data[blank..];
            if data.is_empty() {
                return;
            }
        }
        let mut pending = std::mem::take(&mut self.pending);
        if self.state == State::Head && !pending.is_empty() && !ends_head(&pending, data) {
            // A head is parsed once it is whole, not again at every read of a trickled one
            // (parsing from its start each time would cost the square of its length; hyper
            // waits for the blank line the same way).
            pending.extend_from_slice(data);
        } else if pending.is_empty() {
            let used = self.consume(data);
            pending.extend_from_slice(&data[used..]);
        } else {
            pending.extend_from_slice(data);
            let used = self.consume(&pending);
            pending.drain(..used);
            if pending.is_empty() {
                // Give the capacity back.
                pending = Vec::new();
            }
        }
        if self.state == State::Head
            && !pending.is_empty()
            && pending.iter().all(|b| matches!(b, b'\r' | b'\n'))
        {
            // Empty lines after a request, in the same read: skipped and counted as above.
            self.blank += pending.len();
            pending.clear();
            if self.blank > MAX_BLANK {
                self.cut = true;
                self.state = State::Off;
            }
        }
        if self.state == State::Head && pending.len() > MAX_HEAD {
            // Refused, not followed further (hyper would take up to ~400 KiB).
            self.push(Err(HEAD_TOO_LONG.to_owned()));
            self.state = State::Off;
        }
        if self.state == State::Off {
            pending = Vec::new();
        }
        self.pending = pending;
    }

    fn push(&self, verdict: Result<(), String>) {
        self.verdicts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(verdict);
    }

    /// Steps through `buf` as far as it can; returns how many bytes were consumed.
    fn consume(&mut self, buf: &[u8]) -> usize {
        let mut used = 0;
        while let Some(n) = self.step(&buf[used..]) {
            used += n;
            if self.state == State::Off {
                return buf.len();
            }
        }
        used
    }

    /// Consumes what it can from the front of `buf`; `None` when more bytes are needed.
    fn step(&mut self, buf: &[u8]) -> Option<usize> {
        if buf.is_empty() {
            return None;
        }
        match self.state {
            State::Off => None,
            State::Head => {
                if buf.starts_with(b"PRI * HTTP/2.0")
                    || (buf.len() < 14 && b"PRI * HTTP/2.0".starts_with(buf))
                {
                    if buf.len() >= 14 {
                        self.state = State::Off;
                        return Some(0);
                    }
                    return None;
                }
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(buf) {
                    Ok(httparse::Status::Complete(n)) => {
                        let (verdict, next) = judge(req.headers);
                        self.push(if n > MAX_HEAD {
                            Err(HEAD_TOO_LONG.to_owned())
                        } else {
                            verdict
                        });
                        self.state = next;
                        Some(n)
                    }
                    Ok(httparse::Status::Partial) => None,
                    // hyper answers malformed heads itself.
                    Err(_) => {
                        self.state = State::Off;
                        Some(0)
                    }
                }
            }
            State::Body(rem) => {
                let n = usize::try_from(rem).unwrap_or(usize::MAX).min(buf.len());
                let left = rem - n as u64;
                self.state = if left == 0 {
                    State::Head
                } else {
                    State::Body(left)
                };
                Some(n)
            }
            State::ChunkSize => match httparse::parse_chunk_size(buf) {
                Ok(httparse::Status::Complete((n, 0))) => {
                    self.state = State::Trailers;
                    Some(n)
                }
                Ok(httparse::Status::Complete((n, size))) => {
                    self.state = State::ChunkData(size);
                    Some(n)
                }
                Ok(httparse::Status::Partial) => None,
                Err(_) => {
                    self.state = State::Off;
                    Some(0)
                }
            },
            State::ChunkData(rem) => {
                let n = usize::try_from(rem).unwrap_or(usize::MAX).min(buf.len());
                let left = rem - n as u64;
                self.state = if left == 0 {
                    State::ChunkEnd(2)
                } else {
                    State::ChunkData(left)
                };
                Some(n)
            }
            State::ChunkEnd(k) => {
                let n = k.min(buf.len());
                self.state = if n == k {
                    State::ChunkSize
                } else {
                    State::ChunkEnd(k - n)
                };
                Some(n)
            }
            State::Trailers => {
                if buf.starts_with(b"\r\n") {
                    self.state = State::Head;
                    return Some(2);
                }
                let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
                self.state = State::Head;
                Some(end + 4)
            }
        }
    }
}

/// The verdict on one head, and how its body is framed (as hyper will read it).
fn judge(headers: &[httparse::Header<'_>]) -> (Result<(), String>, State) {
    let named = |n: &str| -> Vec<&[u8]> {
        headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(n))
            .map(|h| h.value)
            .collect()
    };
    let cls = named("content-length");
    let tes = named("transfer-encoding");
    let plain_number = |v: &[u8]| {
        let v = v.trim_ascii();
        !v.is_empty() && v.iter().all(u8::is_ascii_digit)
    };
    let verdict = if cls.len() > 1 {
        Err("more than one Content-Length header".to_owned())
    } else if cls.first().is_some_and(|v| !plain_number(v)) {
        // "5, 5" is a list hyper folds into one length.
        Err("a Content-Length that is not one plain number".to_owned())
    } else if !cls.is_empty() && !tes.is_empty() {
        Err("both Content-Length and Transfer-Encoding".to_owned())
    } else if tes.len() > 1 || tes.first().is_some_and(|v| *v != b"chunked") {
        Err("Transfer-Encoding other than a single \"chunked\"".to_owned())
    } else {
        Ok(())
    };
    // Follow hyper: Transfer-Encoding wins; chunked if it ends in chunked.
    let next = if let Some(last) = tes.last() {
        let v = String::from_utf8_lossy(last).to_ascii_lowercase();
        if v.trim_end().ends_with("chunked") {
            State::ChunkSize
        } else {
            State::Off
        }
    } else if let Some(cl) = cls.first() {
        match std::str::from_utf8(cl)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            Some(0) => State::Head,
            Some(len) => State::Body(len),
            None => State::Off,
        }
    } else {
        State::Head
    };
    (verdict, next)
}

/// An I/O stream whose reads are watched by a [`Scanner`].
pub struct Watched<T> {
    inner: T,
    scanner: Scanner,
}

impl<T> Watched<T> {
    pub fn new(inner: T, verdicts: Verdicts) -> Self {
        Self {
            inner,
            scanner: Scanner::new(verdicts),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            this.scanner.feed(&buf.filled()[before..]);
            if this.scanner.cut {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "over 1 KiB of empty lines before a request head",
                )));
            }
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(input: &[&[u8]]) -> Vec<Result<(), String>> {
        let v = Verdicts::default();
        let mut s = Scanner::new(v.clone());
        for chunk in input {
            s.feed(chunk);
        }
        v.lock().unwrap().iter().cloned().collect()
    }

    #[test]
    fn pipelined_requests_are_judged_in_order() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloPOST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nPOST /c HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhiGET /d HTTP/1.1\r\n\r\n";
        let v = verdicts(&[stream]);
        assert_eq!(v.len(), 4);
        assert!(v[0].is_ok() && v[1].is_ok() && v[3].is_ok());
        assert!(
            v[2].as_ref()
                .unwrap_err()
                .contains("more than one Content-Length")
        );
        // Byte by byte gives the same answer.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(verdicts(&bytes), v);
    }

    #[test]
    fn a_trickled_head_is_parsed_once_it_can_be_whole() {
        // The blank line that ends a head, in the new bytes or across the seam.
        assert!(ends_head(b"POST / HTTP/1.1\r\nA: b\r", b"\n\r\n"));
        assert!(ends_head(b"POST / HTTP/1.1\r\nA: b\r\n\r", b"\n"));
        assert!(ends_head(b"POST / HTTP/1.1\nA: b\n", b"\n"));
        assert!(ends_head(b"P", b"OST / HTTP/1.1\r\n\r\n"));
        assert!(!ends_head(b"POST / HTTP/1.1\r\nA: b\r", b"\n"));
        assert!(!ends_head(b"POST / HTTP/1.1\r\n", b"A: b\r\n"));
        // Bare line feeds, byte by byte: judged as in one read.
        let head: &[u8] = b"POST / HTTP/1.1\nContent-Length: 2\nContent-Length: 2\n\nhi";
        let bytes: Vec<&[u8]> = head.chunks(1).collect();
        let v = verdicts(&bytes);
        assert_eq!(v, verdicts(&[head]));
        assert!(v[0].is_err(), "{v:?}");
    }

    #[test]
    fn empty_lines_before_a_head_are_skipped_up_to_a_bound() {
        let v = Verdicts::default();
        let mut s = Scanner::new(v.clone());
        for _ in 0..100 {
            s.feed(b"\r\n");
        }
        assert!(s.pending.is_empty() && !s.cut, "kept: {}", s.pending.len());
        s.feed(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(v.lock().unwrap().len(), 1);
        // A flood of them trickled in is cut, not parsed again and again; also after a
        // request in the same read.
        let mut s = Scanner::new(Verdicts::default());
        for _ in 0..=MAX_BLANK {
            s.feed(b"\n");
        }
        assert!(s.cut);
        let mut s = Scanner::new(Verdicts::default());
        s.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\r\n");
        assert!(s.pending.is_empty());
        for _ in 0..MAX_BLANK {
            s.feed(b"\r\n");
        }
        assert!(s.cut && s.pending.is_empty());
    }

    #[test]
    fn only_an_incomplete_head_is_kept_between_reads() {
        let v = Verdicts::default();
        let mut s = Scanner::new(v.clone());
        s.feed(b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhel");
        assert_eq!(
            s.pending.capacity(),
            0,
            "a body in flight is skipped, not kept"
        );
        s.feed(b"loPOST /b HTTP/1.1\r\nContent-");
        assert_eq!(s.pending, b"POST /b HTTP/1.1\r\nContent-");
        s.feed(b"Length: 0\r\n\r\n");
        assert_eq!(s.pending.capacity(), 0, "an idle connection holds no copy");
        assert_eq!(v.lock().unwrap().len(), 2);
    }

    #[test]
    fn ambiguous_heads_are_flagged() {
        let v = verdicts(&[
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ]);
        assert!(v[0].as_ref().unwrap_err().contains("both"));
        let v = verdicts(&[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n",
        ]);
        assert!(v[0].is_err());
        let v = verdicts(&[b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello"]);
        assert!(v[0].as_ref().unwrap_err().contains("plain number"), "{v:?}");
        let v = verdicts(&[b"POST / HTTP/1.1\r\nTransfer-Encoding:  chunked\r\n\r\n0\r\n\r\n"]);
        assert!(v[0].is_ok(), "{v:?}");
    }

    #[test]
    fn heads_over_the_limit_are_refused_in_one_read_or_many() {
        let head = format!("POST / HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        let whole = verdicts(&[head.as_bytes()]);
        let pieces: Vec<&[u8]> = head.as_bytes().chunks(8192).collect();
        for v in [whole, verdicts(&pieces)] {
            assert_eq!(v, vec![Err(HEAD_TOO_LONG.to_owned())]);
        }
    }

    #[test]
    fn an_unparseable_chunk_size_leaves_later_requests_without_a_verdict() {
        let v = verdicts(&[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n000000000000000003\r\nabc\r\n0\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        ]);
        // One verdict for the first head; the service refuses a request it has none for.
        assert_eq!(v, vec![Ok(())]);
    }

    #[test]
    fn h2c_preface_turns_the_watch_off() {
        assert!(verdicts(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]).is_empty());
    }
}
