//! Streams the proxy can speak into: 2024-11-05 SSE sessions (the POST URL an `endpoint` event
//! announced, bound to the identity that opened the stream) and every live server-to-agent
//! stream (for `notifications/tools/list_changed` after a policy reload).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
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
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub exe: Option<String>,
}

/// Most requests awaiting a response on one legacy stream (beyond it, responses go unaudited
/// as `mcp.response` — the requests themselves are always audited).
pub const MAX_PENDING: usize = 4096;

/// Most live legacy sessions per identity: each may hold [`MAX_PENDING`] requests' records,
/// so one agent opening streams without end must not hold memory without end.
#[cfg(not(test))]
pub const MAX_LEGACY_PER_OWNER: usize = 64;
#[cfg(test)]
pub const MAX_LEGACY_PER_OWNER: usize = 2;

/// A 2024-11-05 SSE session.
pub struct LegacySession {
    pub owner: Owner,
    /// Events the proxy adds to the stream (errors for denied requests).
    pub inject: mpsc::Sender<Bytes>,
    /// Requests posted to the session whose responses will arrive on the stream; `None` once
    /// the stream has ended (its unanswered requests are then audited).
    pub pending: Mutex<Option<super::PendingMap>>,
    /// What those records hold of the poster's cgroup's buffer budget (`None` until the first
    /// is moved in; followed up as requests are moved in, given back when the session goes):
    /// an agent that posts without end and never reads its stream must not hold memory
    /// without end.
    pub charged: Mutex<Option<super::budget::Held>>,
}

/// Live legacy sessions, keyed by [`session_key`].
pub type Sessions = Mutex<LegacySessions>;

/// Live legacy sessions, and what names them (see [`request_names`]): a
/// URL that is not a session's key but reaches its session anyway would otherwise skip the
/// owner check.
#[derive(Default)]
pub struct LegacySessions {
    /// By key: the session, and what names it (counted in `names`).
    live: HashMap<String, (Arc<LegacySession>, Vec<String>)>,
    /// What names a live session, counted, per server: its message path, the name of the
    /// query parameter that carries its id, and the id ([`loose_path`], [`loose_name`],
    /// [`loose_value`]: as lenient servers read them).
    names: HashMap<String, usize>,
    /// Live sessions per workload (at most [`MAX_LEGACY_PER_OWNER`]; copies of one binary
    /// do not make more room).
    per_owner: HashMap<Owner, usize>,
}

/// A path as lenient routers match it: without case (Express, ASP.NET Core), a trailing
/// slash (Express) or repeated slashes.
fn loose_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c.to_ascii_lowercase());
        }
    }
    while out.len() > 1 && out.ends_with('/') {
        out.pop();
    }
    out
}

/// A query parameter's name as lenient parsers read it: without case (ASP.NET Core), and
/// with brackets taken apart (`qs` reads `sessionId[]`, `sessionId[0]` and `[sessionId]` as
/// `sessionId`).
fn loose_name(name: &str) -> String {
    name.split(['[', ']'])
        .find(|part| !part.is_empty())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// An id as lenient parsers read it: Python's `UUID(hex=…)` drops `urn:` and `uuid:`, braces
/// and hyphens, ignores case, and `int(…, 16)` takes `_` between digits and leading zeros.
/// Letters and digits only, lower case, and a hexadecimal value without its leading zeros.
fn loose_value(value: &str) -> String {
    let lower = value
        .to_ascii_lowercase()
        .replace("urn:", "")
        .replace("uuid:", "");
    let alnum: String = lower.chars().filter(char::is_ascii_alphanumeric).collect();
    if alnum.chars().all(|c| c.is_ascii_hexdigit()) {
        alnum.trim_start_matches('0').to_owned()
    } else {
        alnum
    }
}

/// The query pairs of a session URL that carry its id, and whether their names say so:
/// those whose name says `session`, or (none does) every pair with a value long enough to be
/// an id — then known by value only (see [`names_of`]).
fn id_params(query: &str) -> (Vec<(String, String)>, bool) {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let named: Vec<(String, String)> = pairs
        .iter()
        .filter(|(k, _)| k.to_ascii_lowercase().contains("session"))
        .cloned()
        .collect();
    if named.is_empty() {
        let long = pairs
            .into_iter()
            .filter(|(_, v)| loose_value(v).len() >= 16)
            .collect();
        (long, false)
    } else {
        (named, true)
    }
}

/// What names the session of `key`, reached at `path_and_query` (compared with a request's
/// [`request_names`]).
fn names_of(key: &str, path_and_query: &str) -> Vec<String> {
    let server = key.split_once(' ').map_or("", |(s, _)| s);
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let path = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let mut names = vec![format!("{server} path {}", loose_path(&path))];
    let (params, named) = id_params(query);
    for (name, value) in params {
        // Only a name that says what it carries: another (`token=…`) may be in every
        // request of the server's other endpoints too.
        if named {
            names.push(format!("{server} name {}", loose_name(&name)));
        }
        // Short values would match unrelated requests; ids are long.
        let value = loose_value(&value);
        if value.len() >= 8 {
            names.push(format!("{server} value {value}"));
        }
    }
    names
}

/// What a request to `key` (at the raw `path_and_query`) names, compared with what live
/// sessions are named by: its path (first), each query parameter's name and each query value, as
/// lenient servers read them. Servers route more than one path to their message handler (the
/// Python SDK's `/messages/` mount takes any path below it; Express and ASP.NET Core ignore
/// case) and read the id leniently (`/messages/x?session_id=uuid:<A>` reaches the session
/// `/messages/?session_id=<A>` in the Python SDK): a request naming a live session must name
/// it exactly. Built before the session table is locked (a query may hold thousands of pairs).
pub fn request_names(key: &str, path_and_query: &str) -> Vec<String> {
    let server = key.split_once(' ').map_or("", |(s, _)| s);
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let path = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let mut names = vec![format!("{server} path {}", loose_path(&path))];
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        names.push(format!("{server} name {}", loose_name(&name)));
        names.push(format!("{server} value {}", loose_value(&value)));
    }
    names
}

impl LegacySessions {
    pub fn get(&self, key: &str) -> Option<&Arc<LegacySession>> {
        self.live.get(key).map(|(session, _)| session)
    }

    /// Whether any session is live (then requests are looked up by [`Self::names_any`]).
    pub fn any_live(&self) -> bool {
        !self.names.is_empty()
    }

    /// Whether a request with these [`request_names`] (not a live session's key itself)
    /// could reach a live session anyway.
    pub fn names_any(&self, names: &[String]) -> bool {
        names.iter().any(|n| self.names.contains_key(n))
    }

    /// Registers `session` under `key`, reached at `path_and_query` (its endpoint).
    /// Registers `session` under `key`; `false` (nothing registered) when its identity has
    /// [`MAX_LEGACY_PER_OWNER`] live sessions already.
    pub fn insert(
        &mut self,
        key: String,
        path_and_query: &str,
        session: Arc<LegacySession>,
    ) -> bool {
        let replacing = self.live.contains_key(&key);
        let own = self
            .per_owner
            .get(&workload(&session.owner))
            .copied()
            .unwrap_or(0);
        if !replacing && own >= MAX_LEGACY_PER_OWNER {
            return false;
        }
        let names = names_of(&key, path_and_query);
        for name in &names {
            *self.names.entry(name.clone()).or_default() += 1;
        }
        *self.per_owner.entry(workload(&session.owner)).or_default() += 1;
        if let Some((replaced, names)) = self.live.insert(key, (session, names)) {
            self.forget(&replaced, &names);
        }
        true
    }

    /// Removes `key` if it is still `session` (a reconnect may have replaced it).
    pub fn remove(&mut self, key: &str, session: &Arc<LegacySession>) {
        if !self
            .live
            .get(key)
            .is_some_and(|(s, _)| Arc::ptr_eq(s, session))
        {
            return;
        }
        if let Some((session, names)) = self.live.remove(key) {
            self.forget(&session, &names);
        }
    }

    fn forget(&mut self, session: &LegacySession, names: &[String]) {
        let owner = workload(&session.owner);
        if let Some(n) = self.per_owner.get_mut(&owner) {
            *n -= 1;
            if *n == 0 {
                self.per_owner.remove(&owner);
            }
        }
        for name in names {
            if let Some(n) = self.names.get_mut(name) {
                *n -= 1;
                if *n == 0 {
                    self.names.remove(name);
                }
            }
        }
    }
}

/// `owner` without its executable: the workload (uid, gid, cgroup).
fn workload(owner: &Owner) -> Owner {
    Owner {
        exe: None,
        ..owner.clone()
    }
}

/// A canonical key for a session URL of the upstream `scope` (a server's `session_scope`): the percent-decoded path and the decoded query pairs in
/// sorted order, so the same URL written differently (`%5F` for `_`, reordered parameters)
/// finds the same session. A repeated parameter is ambiguous and refused.
pub fn session_key(scope: usize, path_and_query: &str) -> Result<String, String> {
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
    Ok(format!("{scope} {path}?{}", query.join("&")))
}

/// Most Streamable HTTP sessions whose owner is kept; beyond, those idle longest are forgotten.
#[cfg(not(test))]
const MAX_BOUND_SESSIONS: usize = 65_536;
#[cfg(test)]
const MAX_BOUND_SESSIONS: usize = 16;
/// Most sessions kept per identity: beyond, its own idle longest go, so that one identity
/// opening sessions in a loop cannot push other identities' bindings out.
#[cfg(not(test))]
const MAX_SESSIONS_PER_OWNER: usize = 1024;
#[cfg(test)]
const MAX_SESSIONS_PER_OWNER: usize = 4;

/// Streamable HTTP sessions (`Mcp-Session-Id`) bound to the identity that opened them (uid,
/// gid, cgroup), so that another identity that learns a session id cannot attach to its
/// stream, answer its server's requests or end it. The upstream is the authority on which
/// sessions exist: a session is bound when an answer of the upstream names it (the answer to
/// `initialize`), and one the daemon has not seen (opened before it started) is bound to the
/// first identity whose request with it the upstream accepts. It is forgotten, closed, when it
/// is ended (`DELETE`). Beyond the caps, the sessions idle longest are forgotten *closed*: their ids
/// are remembered as no one's (up to as many again per identity and in all; an identity's
/// own churn ages out only its own), answered 404 — the owner's client starts a new session,
/// as the specification has it for an expired one — so that a forgotten session cannot be
/// taken over as one never seen. Keyed by a digest of server and id (ids are
/// the server's, of any length).
#[derive(Default)]
pub struct BoundSessions {
    inner: Mutex<Bound>,
}

#[derive(Default)]
struct Bound {
    map: HashMap<[u8; 32], (Owner, std::time::Instant)>,
    /// Sessions bound per owner (the per-owner cap, without counting the map).
    per_owner: HashMap<Owner, usize>,
    /// Sessions forgotten for room: no one's now; by whose they were.
    forgotten: HashMap<[u8; 32], Owner>,
    /// The same per owner, oldest first: an identity's own churn ages out only its own
    /// (one identity opening sessions in a loop must not age out another's, which could then
    /// be taken over as never seen).
    forgotten_of: HashMap<Owner, VecDeque<[u8; 32]>>,
}

/// What [`BoundSessions::check`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionUse {
    /// The caller's own session.
    Own,
    /// Another identity's.
    Foreign,
    /// Not bound (yet): bound to the caller once the upstream accepts the request.
    Unbound,
    /// Forgotten for room: no one's any more (answered as an expired session).
    Forgotten,
}

fn session_digest(scope: usize, session: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update((scope as u64).to_le_bytes());
    h.update(session);
    h.finalize().into()
}

impl Bound {
    /// Forgets the eighth of the sessions of `of` (all owners' with `None`) idle longest,
    /// closed (amortised: not a scan per new session).
    fn forget_oldest(&mut self, of: Option<&Owner>, entries: usize) {
        let mine = |o: &Owner| of.is_none_or(|of| of == o);
        let mut ages: Vec<std::time::Instant> = self
            .map
            .values()
            .filter(|(o, _)| mine(o))
            .map(|(_, t)| *t)
            .collect();
        ages.sort_unstable();
        let Some(&cut) = ages.get(entries / 8) else {
            return;
        };
        let gone: Vec<[u8; 32]> = self
            .map
            .iter()
            .filter(|(_, (o, t))| mine(o) && *t <= cut)
            .map(|(k, _)| *k)
            .collect();
        for key in gone {
            if let Some((owner, _)) = self.map.get(&key).cloned() {
                self.remove(&key);
                self.tombstone(key, owner);
            }
        }
    }

    /// Remembers `key`, forgotten, as no one's; `owner`'s oldest such beyond its cap go, and
    /// beyond the total, an eighth of the longest queue (`owner`'s own on a tie).
    fn tombstone(&mut self, key: [u8; 32], owner: Owner) {
        let queue = self.forgotten_of.entry(owner.clone()).or_default();
        queue.push_back(key);
        let aged = (queue.len() > MAX_SESSIONS_PER_OWNER)
            .then(|| queue.pop_front())
            .flatten();
        let mine = queue.len();
        self.forgotten.insert(key, owner.clone());
        if let Some(aged) = aged {
            self.forgotten.remove(&aged);
        }
        if self.forgotten.len() <= MAX_BOUND_SESSIONS {
            return;
        }
        let longest = self
            .forgotten_of
            .iter()
            .filter(|(_, q)| q.len() > mine)
            .max_by_key(|(_, q)| q.len())
            .map_or(owner, |(o, _)| o.clone());
        if let Some(queue) = self.forgotten_of.get_mut(&longest) {
            let n = queue.len().div_ceil(8);
            for key in queue.drain(..n) {
                self.forgotten.remove(&key);
            }
            if queue.is_empty() {
                self.forgotten_of.remove(&longest);
            }
        }
    }

    /// `key` is someone's again (the upstream named it): no longer a tombstone.
    fn revive(&mut self, key: &[u8; 32]) {
        if let Some(owner) = self.forgotten.remove(key)
            && let Some(queue) = self.forgotten_of.get_mut(&owner)
        {
            queue.retain(|k| k != key);
            if queue.is_empty() {
                self.forgotten_of.remove(&owner);
            }
        }
    }

    fn remove(&mut self, key: &[u8; 32]) {
        if let Some((owner, _)) = self.map.remove(key)
            && let Some(n) = self.per_owner.get_mut(&owner)
        {
            *n -= 1;
            if *n == 0 {
                self.per_owner.remove(&owner);
            }
        }
    }
}

impl BoundSessions {
    /// Whose `session` is, seen from `owner`.
    pub fn check(&self, scope: usize, session: &[u8], owner: &Owner) -> SessionUse {
        let key = session_digest(scope, session);
        let mut b = lock(&self.inner);
        let Bound { map, forgotten, .. } = &mut *b;
        match map.get_mut(&key) {
            Some((bound, _)) if bound != owner => SessionUse::Foreign,
            Some((_, used)) => {
                *used = std::time::Instant::now();
                SessionUse::Own
            }
            None if forgotten.contains_key(&key) => SessionUse::Forgotten,
            None => SessionUse::Unbound,
        }
    }

    /// Binds `session` to `owner` after the upstream accepted a request of `owner` with it, or
    /// named it in an answer to `owner`. `named`: the upstream named it (authoritative: a
    /// binding made before is replaced); else it is bound only if it is not already (nor
    /// forgotten).
    pub fn bind(&self, scope: usize, session: &[u8], owner: &Owner, named: bool) {
        let key = session_digest(scope, session);
        let now = std::time::Instant::now();
        let mut b = lock(&self.inner);
        if let Some((bound, _)) = b.map.get(&key) {
            if named || bound == owner {
                b.remove(&key);
                b.insert(key, owner, now);
            }
            return;
        }
        if b.forgotten.contains_key(&key) {
            if !named {
                return;
            }
            // The upstream named it again, to this owner.
            b.revive(&key);
        }
        let own = b.per_owner.get(owner).copied().unwrap_or(0);
        if own >= MAX_SESSIONS_PER_OWNER {
            b.forget_oldest(Some(owner), own);
        }
        if b.map.len() >= MAX_BOUND_SESSIONS {
            let all = b.map.len();
            b.forget_oldest(None, all);
        }
        b.insert(key, owner, now);
    }

    /// Forgets `session` (ended by `by`), closed: remembered as no one's, as a session
    /// forgotten for room is (a server that answers DELETE but keeps the session must not have
    /// it taken by the next identity that names it) — one never bound too (opened before the
    /// daemon started), counted as its ender's.
    pub fn end(&self, scope: usize, session: &[u8], by: &Owner) {
        let key = session_digest(scope, session);
        let mut b = lock(&self.inner);
        let owner = match b.map.get(&key).cloned() {
            Some((owner, _)) => {
                b.remove(&key);
                owner
            }
            None if b.forgotten.contains_key(&key) => return,
            None => by.clone(),
        };
        b.tombstone(key, owner);
    }

    /// Sessions bound now.
    pub fn count(&self) -> usize {
        lock(&self.inner).map.len()
    }
}

impl Bound {
    fn insert(&mut self, key: [u8; 32], owner: &Owner, now: std::time::Instant) {
        self.map.insert(key, (owner.clone(), now));
        *self.per_owner.entry(owner.clone()).or_default() += 1;
    }
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
    fn a_url_that_reaches_a_live_legacy_session_is_recognised_however_written() {
        let (tx, _rx) = mpsc::channel(1);
        let session = Arc::new(LegacySession {
            owner: owner(1),
            inject: tx,
            pending: Mutex::new(None),
            charged: Mutex::new(None),
        });
        let id = "0a1b2c3d4e5f60718293a4b5c6d7e8f9";
        let endpoint = format!("/messages/?session_id={id}&tenant=acme-production");
        let key = session_key(0, &endpoint).unwrap();
        let mut live = LegacySessions::default();
        assert!(live.insert(key.clone(), &endpoint, session.clone()));
        let names = |live: &LegacySessions, pq: &str| {
            live.names_any(&request_names(&session_key(0, pq).unwrap(), pq))
        };
        let upper = id.to_uppercase();
        let trimmed = id.trim_start_matches('0');
        for other in [
            format!("/messages/?session_id={id}&x=1"),
            format!("/MESSAGES?session_id={upper}"),
            format!("/messages//x?session_id=uuid:{id}"),
            format!("/messages/x?session_id=urn:{{{id}}}"),
            "/elsewhere?SESSION_ID=whatever".to_owned(),
            "/elsewhere?[session_id]=whatever".to_owned(),
            "/elsewhere?session_id[0]=whatever".to_owned(),
            format!("/elsewhere?other={trimmed}"),
            format!("/elsewhere?other=0_{trimmed}"),
        ] {
            assert!(names(&live, &other), "{other}");
        }
        for unrelated in [
            "/mcp",
            "/mcp?tenant=acme-production",
            "/mcp?x=",
            "/mcp?id=0000",
        ] {
            assert!(!names(&live, unrelated), "{unrelated}");
        }
        // The path is named first (GETs and DELETEs are judged by the rest: a session's
        // message path may be where streams are opened too).
        let names_of_request = request_names(&key, "/messages/");
        assert!(live.names_any(&names_of_request[..1]));
        assert!(!live.names_any(&names_of_request[1..]));
        // Another server's requests are not this session's business.
        let pq = format!("/messages/?session_id={id}");
        assert!(!live.names_any(&request_names(&session_key(1, &pq).unwrap(), &pq)));
        live.remove(&key, &session);
        assert!(!names(&live, &format!("/messages/?session_id={id}&x=1")));
        assert!(live.names.is_empty());
        assert!(live.per_owner.is_empty());
    }

    #[test]
    fn an_identity_has_at_most_so_many_live_legacy_sessions() {
        let mut live = LegacySessions::default();
        let session = |uid| {
            let (tx, _rx) = mpsc::channel(1);
            Arc::new(LegacySession {
                owner: owner(uid),
                inject: tx,
                pending: Mutex::new(None),
                charged: Mutex::new(None),
            })
        };
        let key = |i: usize| session_key(0, &format!("/messages/?session_id={i:032x}")).unwrap();
        let mine: Vec<_> = (0..MAX_LEGACY_PER_OWNER).map(|_| session(1)).collect();
        for (i, s) in mine.iter().enumerate() {
            assert!(live.insert(key(i), "/messages/", s.clone()));
        }
        assert!(!live.insert(key(100), "/messages/", session(1)));
        // Another identity is not held back; a reconnect replacing a session is no new one.
        assert!(live.insert(key(101), "/messages/", session(2)));
        assert!(live.insert(key(0), "/messages/", session(1)));
        live.remove(&key(1), &mine[1]);
        assert!(live.insert(key(102), "/messages/", session(1)));
    }

    fn owner(uid: u32) -> Owner {
        Owner {
            uid,
            gid: uid,
            cgroup_id: 7,
            exe: Some("/usr/bin/agent".into()),
        }
    }

    #[test]
    fn a_session_belongs_to_whoever_the_upstream_bound_it_to() {
        let s = BoundSessions::default();
        assert_eq!(s.check(0, b"abc", &owner(1)), SessionUse::Unbound);
        s.bind(0, b"abc", &owner(1), true);
        assert_eq!(s.check(0, b"abc", &owner(1)), SessionUse::Own);
        assert_eq!(s.check(0, b"abc", &owner(2)), SessionUse::Foreign);
        // First use of a session bound already changes nothing; the upstream naming it does.
        s.bind(0, b"abc", &owner(2), false);
        assert_eq!(s.check(0, b"abc", &owner(2)), SessionUse::Foreign);
        s.bind(0, b"abc", &owner(2), true);
        assert_eq!(s.check(0, b"abc", &owner(2)), SessionUse::Own);
        // Another server's session of the same id is another session.
        assert_eq!(s.check(1, b"abc", &owner(1)), SessionUse::Unbound);
        // Ended, it is no one's: not taken as never seen by the next identity naming it.
        s.end(0, b"abc", &owner(2));
        assert_eq!(s.check(0, b"abc", &owner(1)), SessionUse::Forgotten);
        s.bind(0, b"abc", &owner(1), false);
        assert_eq!(s.check(0, b"abc", &owner(1)), SessionUse::Forgotten);
        // So is one never bound (opened before the daemon started) that is ended.
        s.end(0, b"older", &owner(1));
        assert_eq!(s.check(0, b"older", &owner(2)), SessionUse::Forgotten);
    }

    #[test]
    fn one_identity_opening_sessions_cannot_push_out_anothers() {
        let s = BoundSessions::default();
        s.bind(0, b"victim", &owner(1), true);
        for i in 0..10 * MAX_BOUND_SESSIONS {
            s.bind(0, format!("s{i}").as_bytes(), &owner(2), true);
        }
        assert_eq!(s.check(0, b"victim", &owner(2)), SessionUse::Foreign);
        assert!(s.count() <= 1 + MAX_SESSIONS_PER_OWNER);
        // The flooding identity keeps its newest sessions.
        let last = format!("s{}", 10 * MAX_BOUND_SESSIONS - 1);
        assert_eq!(s.check(0, last.as_bytes(), &owner(2)), SessionUse::Own);
    }

    #[test]
    fn the_sessions_idle_longest_go_beyond_the_cap() {
        let s = BoundSessions::default();
        for i in 0..MAX_BOUND_SESSIONS {
            // Each identity within its own cap.
            s.bind(0, format!("s{i}").as_bytes(), &owner(i as u32), true);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // s0 was used last: it stays when room is made.
        assert_eq!(s.check(0, b"s0", &owner(0)), SessionUse::Own);
        s.bind(0, b"new", &owner(99), true);
        assert!(s.count() <= MAX_BOUND_SESSIONS);
        assert_eq!(s.check(0, b"s0", &owner(1)), SessionUse::Foreign);
        // s1 was forgotten, closed: no one's, its owner's included (its client starts anew),
        // and another identity's request cannot bind it as a session never seen.
        assert_eq!(s.check(0, b"s1", &owner(2)), SessionUse::Forgotten);
        assert_eq!(s.check(0, b"s1", &owner(1)), SessionUse::Forgotten);
        s.bind(0, b"s1", &owner(2), false);
        assert_eq!(s.check(0, b"s1", &owner(2)), SessionUse::Forgotten);
        // Unless the upstream names it again (an answer to its owner's initialize).
        s.bind(0, b"s1", &owner(1), true);
        assert_eq!(s.check(0, b"s1", &owner(1)), SessionUse::Own);
        assert_eq!(s.check(0, b"never-seen", &owner(2)), SessionUse::Unbound);
    }

    #[test]
    fn one_identitys_churn_does_not_age_out_anothers_forgotten_sessions() {
        let s = BoundSessions::default();
        // The victim's session, forgotten for room (the victim's own churn).
        s.bind(0, b"victim", &owner(1), true);
        for i in 0..=MAX_SESSIONS_PER_OWNER {
            s.bind(0, format!("v{i}").as_bytes(), &owner(1), true);
        }
        assert_eq!(s.check(0, b"victim", &owner(2)), SessionUse::Forgotten);
        // Another identity opens sessions in a loop.
        for i in 0..20 * MAX_BOUND_SESSIONS {
            s.bind(0, format!("a{i}").as_bytes(), &owner(2), true);
        }
        assert_eq!(s.check(0, b"victim", &owner(2)), SessionUse::Forgotten);
        s.bind(0, b"victim", &owner(2), false);
        assert_eq!(s.check(0, b"victim", &owner(2)), SessionUse::Forgotten);
        let b = lock(&s.inner);
        assert!(b.forgotten.len() <= MAX_BOUND_SESSIONS);
        assert_eq!(
            b.forgotten_of.values().map(VecDeque::len).sum::<usize>(),
            b.forgotten.len()
        );
    }

    #[test]
    fn per_owner_counts_follow_binds_rebinds_and_ends() {
        let s = BoundSessions::default();
        for i in 0..MAX_SESSIONS_PER_OWNER {
            s.bind(0, format!("a{i}").as_bytes(), &owner(1), true);
        }
        // Rebinding (named to another owner) and ending move the counts: owner 1 has room
        // for two more without forgetting any of its own.
        s.bind(0, b"a0", &owner(2), true);
        s.end(0, b"a1", &owner(1));
        s.bind(0, b"b0", &owner(1), true);
        s.bind(0, b"b1", &owner(1), true);
        for i in 2..MAX_SESSIONS_PER_OWNER {
            assert_eq!(
                s.check(0, format!("a{i}").as_bytes(), &owner(1)),
                SessionUse::Own,
                "a{i}"
            );
        }
        assert_eq!(s.check(0, b"a0", &owner(2)), SessionUse::Own);
        let b = lock(&s.inner);
        assert_eq!(b.per_owner.get(&owner(1)), Some(&MAX_SESSIONS_PER_OWNER));
        assert_eq!(b.per_owner.get(&owner(2)), Some(&1));
        assert_eq!(b.per_owner.values().sum::<usize>(), b.map.len());
    }

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
