//! Incremental Server-Sent Events framing: bytes in, complete events out as they arrive (no
//! buffering of a whole stream). An event the proxy does not change is re-emitted byte for byte.

use bytes::{Bytes, BytesMut};

/// One complete event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The event exactly as received, including its terminating blank line.
    pub raw: Bytes,
    /// `event:` (empty = "message").
    pub event: String,
    /// `data:` lines joined with `\n`.
    pub data: String,
    /// `id:`, if any.
    pub id: Option<String>,
}

impl Event {
    /// A new event with the same type and id and different data.
    pub fn with_data(&self, data: &str) -> Bytes {
        let mut out = String::new();
        if !self.event.is_empty() {
            out.push_str("event: ");
            out.push_str(&self.event);
            out.push('\n');
        }
        if let Some(id) = &self.id {
            out.push_str("id: ");
            out.push_str(id);
            out.push('\n');
        }
        for line in data.split('\n') {
            out.push_str("data: ");
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
        Bytes::from(out)
    }

    /// A `message` event carrying `data`.
    pub fn message(data: &str) -> Bytes {
        Bytes::from(format!("event: message\ndata: {data}\n\n"))
    }
}

/// Accumulates bytes and splits them into events.
#[derive(Debug)]
pub struct Parser {
    buf: BytesMut,
    /// Bytes of `buf` already searched for an event end (minus a little overlap).
    scanned: usize,
    /// Largest event accepted.
    max_event: usize,
    /// Past the stream's start (where a UTF-8 byte order mark is dropped, as the SSE spec
    /// has clients do: an event behind it must be judged, not taken for an unknown field).
    started: bool,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// An event grew past the parser's limit.
#[derive(Debug, thiserror::Error)]
#[error("an SSE event is larger than {0} bytes (proxy.max_response_bytes)")]
pub struct TooLarge(pub usize);

impl Parser {
    pub fn new(max_event: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            scanned: 0,
            max_event,
            started: false,
        }
    }

    /// Feeds `chunk`; returns every event it completed, and whether the event left incomplete
    /// is over the size limit (the events before it are whole and returned all the same).
    pub fn push(&mut self, chunk: &[u8]) -> (Vec<Event>, Result<(), TooLarge>) {
        self.buf.extend_from_slice(chunk);
        if !self.started {
            if self.buf.len() < BOM.len() && BOM.starts_with(&self.buf) {
                return (Vec::new(), Ok(()));
            }
            if self.buf.starts_with(BOM) {
                let _ = self.buf.split_to(BOM.len());
            }
            self.started = true;
        }
        let mut events = Vec::new();
        // Resume the search where the last one stopped (3 bytes back: a terminator may straddle
        // two chunks), so a large event arriving in small chunks is scanned once.
        while let Some(end) = event_end(&self.buf, self.scanned.saturating_sub(3)) {
            let raw = self.buf.split_to(end).freeze();
            events.push(parse_event(raw));
            self.scanned = 0;
        }
        self.scanned = self.buf.len();
        if self.buf.len() > self.max_event {
            return (events, Err(TooLarge(self.max_event)));
        }
        (events, Ok(()))
    }

    /// Bytes of an incomplete event still held.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Drops what is held of an event not complete yet (the stream ends).
    pub fn clear(&mut self) {
        self.buf = BytesMut::new();
        self.scanned = 0;
    }

    /// What is left at end of stream: an unterminated event, parsed like the others so it is
    /// judged the same way (some clients act on it).
    pub fn finish(&mut self) -> Option<Event> {
        if self.buf.is_empty() {
            return None;
        }
        Some(parse_event(self.buf.split().freeze()))
    }
}

/// Index just past the blank line that ends the first event (`\n\n`, `\r\n\r\n`, `\r\r`),
/// searching from `from`.
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        let line_end = match buf[i] {
            b'\n' => i + 1,
            b'\r' if buf.get(i + 1) == Some(&b'\n') => i + 2,
            b'\r' if i + 1 < buf.len() => i + 1,
            b'\r' => return None, // might be the start of \r\n
            _ => {
                i += 1;
                continue;
            }
        };
        // A line break immediately followed by another one ends the event.
        match buf.get(line_end) {
            Some(b'\n') => return Some(line_end + 1),
            Some(b'\r') => match buf.get(line_end + 1) {
                Some(b'\n') => return Some(line_end + 2),
                Some(_) => return Some(line_end + 1),
                None => return None,
            },
            _ => i = line_end,
        }
    }
    None
}

fn parse_event(raw: Bytes) -> Event {
    let text = String::from_utf8_lossy(&raw);
    let mut event = String::new();
    let mut data: Vec<&str> = Vec::new();
    let mut id = None;
    for line in text.split(['\n', '\r']) {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => event = value.to_owned(),
            "data" => data.push(value),
            "id" => id = Some(value.to_owned()),
            _ => {}
        }
    }
    Event {
        event,
        data: data.join("\n"),
        id,
        raw: raw.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminators_split_across_chunks_and_size_limits() {
        let mut p = Parser::new(64);
        let mut got = Vec::new();
        for b in b"data: a\r\n\r\ndata: b\n\n".iter() {
            got.extend(p.push(&[*b]).0);
        }
        assert_eq!(
            got.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(p.push(&[b'x'; 65]).1.is_err());
        let mut p = Parser::new(64);
        assert!(p.push(b"data: tail").1.is_ok());
        assert_eq!(p.finish().map(|e| e.data), Some("tail".to_owned()));
    }

    #[test]
    fn a_byte_order_mark_at_the_start_is_dropped() {
        let stream = b"\xEF\xBB\xBFdata: {\"a\":1}\n\n\xEF\xBB\xBFdata: x\n\n";
        for size in [1, 2, stream.len()] {
            let mut p = Parser::new(1024);
            let mut got = Vec::new();
            for chunk in stream.chunks(size) {
                got.extend(p.push(chunk).0);
            }
            assert_eq!(got.len(), 2, "chunks of {size}");
            assert_eq!(got[0].data, "{\"a\":1}");
            assert_eq!(&got[0].raw[..], b"data: {\"a\":1}\n\n");
            // Only at the start: later it is part of a field name.
            assert_eq!(got[1].data, "");
        }
    }

    #[test]
    fn splits_events_across_chunks() {
        let mut p = Parser::new(1024);
        assert!(p.push(b"event: endpoint\ndata: /messages?s").0.is_empty());
        let e = p.push(b"ession_id=1\n\nid: 7\ndata: {\"a\":\n").0;
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].event, "endpoint");
        assert_eq!(e[0].data, "/messages?session_id=1");
        assert_eq!(
            &e[0].raw[..],
            b"event: endpoint\ndata: /messages?session_id=1\n\n"
        );
        let e = p.push(b"data: 1}\r\n\r\n: comment\n\n").0;
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].data, "{\"a\":\n1}");
        assert_eq!(e[0].id.as_deref(), Some("7"));
        assert_eq!(p.pending(), 0);
    }

    #[test]
    fn rewrites_keep_type_and_id() {
        let mut p = Parser::new(1024);
        let e = p.push(b"event: message\nid: 3\ndata: old\n\n").0.remove(0);
        assert_eq!(
            &e.with_data("new")[..],
            b"event: message\nid: 3\ndata: new\n\n"
        );
    }
}
