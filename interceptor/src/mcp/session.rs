//! Streams the proxy can speak into: 2024-11-05 SSE sessions (the POST URL an `endpoint` event
//! announced, bound to the identity that opened the stream) and every live server-to-agent
//! stream (for `notifications/tools/list_changed` after a policy reload).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::bpf::lock;

/// Events queued for one stream before the proxy gives up on a reader that does not read.
pub const INJECT_QUEUE: usize = 64;

/// Who opened a legacy session; only the same identity may post into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub exe: Option<String>,
}

/// Most requests awaiting a response on one legacy stream (beyond it, responses go unaudited
/// as `mcp.response` — the requests themselves are always audited).
pub const MAX_PENDING: usize = 4096;

/// A 2024-11-05 SSE session.
pub struct LegacySession {
    pub owner: Owner,
    /// Events the proxy adds to the stream (errors for denied requests).
    pub inject: mpsc::Sender<Bytes>,
    /// Requests posted to the session whose responses will arrive on the stream; `None` once
    /// the stream has ended (its unanswered requests are then audited).
    pub pending: Mutex<Option<super::PendingMap>>,
}

/// Live legacy sessions, keyed by [`session_key`].
pub type Sessions = Mutex<HashMap<String, Arc<LegacySession>>>;

/// A canonical key for a session URL: the percent-decoded path and the decoded query pairs in
/// sorted order, so the same URL written differently (`%5F` for `_`, reordered parameters)
/// finds the same session. A repeated parameter is ambiguous and refused.
pub fn session_key(server_id: usize, path_and_query: &str) -> Result<String, String> {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let path = percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .map_err(|_| "the request path is not valid UTF-8 once decoded".to_owned())?;
    let mut pairs = BTreeMap::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if pairs
            .insert(k.clone().into_owned(), v.into_owned())
            .is_some()
        {
            return Err(format!("query parameter {k:?} is repeated"));
        }
    }
    let query: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    Ok(format!("{server_id} {path}?{}", query.join("&")))
}

/// Live server-to-agent streams, where notifications can be injected.
#[derive(Default)]
pub struct Streams {
    next: AtomicU64,
    live: Mutex<HashMap<u64, mpsc::Sender<Bytes>>>,
}

impl Streams {
    pub fn register(&self, tx: mpsc::Sender<Bytes>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.live).insert(id, tx);
        id
    }

    pub fn remove(&self, id: u64) {
        lock(&self.live).remove(&id);
    }

    /// Sends `event` to every live stream that has room; returns how many got it.
    pub fn broadcast(&self, event: &Bytes) -> usize {
        lock(&self.live)
            .values()
            .filter(|tx| tx.try_send(event.clone()).is_ok())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_session_however_its_url_is_written() {
        let k = session_key(0, "/messages/?session_id=abc").unwrap();
        assert_eq!(session_key(0, "/messages/?session%5Fid=abc").unwrap(), k);
        assert_eq!(session_key(0, "/messages%2F?session_id=abc").unwrap(), k);
        assert_ne!(session_key(1, "/messages/?session_id=abc").unwrap(), k);
        assert_eq!(
            session_key(0, "/m?b=2&a=1").unwrap(),
            session_key(0, "/m?a=1&b=2").unwrap()
        );
        assert!(session_key(0, "/m?session_id=a&session_id=b").is_err());
    }
}
