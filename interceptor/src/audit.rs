//! The audit log: one JSON object per line, hash-chained, written ahead of forwarding.
//!
//! - [`Audit::record`] returns once the event is in the file (`write`, the default: it survives
//!   a daemon crash; `fdatasync` runs at least every 50 ms), on stable storage (`fsync`: one
//!   `fdatasync` shared by every event written together — group commit), or queued (`async`).
//! - Each line ends with `"hash"`: the SHA-256 (hex) of the line's text up to that member plus
//!   the closing brace, i.e. of the event with its `seq` and `prev_hash` (the previous line's
//!   hash). Editing, deleting, reordering or inserting a line breaks the chain; rotation keeps
//!   it (the first line of a new file names the last hash of the previous one).
//! - A torn last line (the daemon died mid-write) is cut off at the next start and the repair is
//!   recorded as an `audit.repair` event.
//! - If the file cannot be written (disk full, removed and not re-creatable, permission), the
//!   error is returned, counted and logged, and callers refuse to forward: fail closed.
//!
//! The schema is documented in `docs/audit.md`.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime},
};

use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tracing::{error, info, warn};

/// Version of the event schema (`"v"` in every event).
pub const SCHEMA_VERSION: u64 = 1;
/// `prev_hash` of the very first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Default `[audit] path`.
pub const DEFAULT_PATH: &str = "/var/log/interceptor/audit.jsonl";
/// In `write` mode, the longest an event waits for `fdatasync`.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(50);
/// Most events written (and synced) together.
const MAX_BATCH: usize = 1024;

/// When an event counts as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// In the file (survives a daemon crash); `fdatasync` at least every 50 ms.
    #[default]
    Write,
    /// On stable storage (survives power loss); concurrent events share one `fdatasync`.
    Fsync,
    /// Queued; the tail may be lost on a crash.
    Async,
}

/// `[audit]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAudit {
    /// The log file (rotated files sit beside it as `<path>.<UTC time>`).
    pub path: PathBuf,
    /// `write` (default), `fsync` or `async`.
    pub durability: Durability,
    /// Rotate when the file would grow past this many bytes.
    pub max_file_bytes: u64,
    /// Argument keys containing any of these (case-insensitive) are written as "[REDACTED]".
    pub redact_keys: Vec<String>,
    /// Arguments longer than this (serialised, after redaction) are replaced by a marker with
    /// their length and SHA-256.
    pub max_argument_bytes: usize,
}

impl Default for RawAudit {
    fn default() -> Self {
        Self {
            path: PathBuf::from(DEFAULT_PATH),
            durability: Durability::Write,
            max_file_bytes: 100 << 20,
            redact_keys: [
                "password",
                "secret",
                "token",
                "authorization",
                "api_key",
                "cookie",
            ]
            .map(String::from)
            .to_vec(),
            max_argument_bytes: 4096,
        }
    }
}

/// Audit errors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The log could not be opened or prepared at start.
    #[error("audit log {path}: {message}")]
    Open { path: PathBuf, message: String },
    /// An event could not be written; requests are refused until writing works again.
    #[error("audit log unavailable ({0}); requests are refused until it is writable again")]
    Unavailable(String),
}

/// An event named `name` with the members of `fields` (a JSON object).
pub fn event(name: &str, fields: Value) -> Map<String, Value> {
    let mut m = match fields {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    m.insert("event".into(), Value::from(name));
    m
}

/// Replaces values of secret-looking keys at any depth and truncates large payloads.
pub fn redact(cfg: &RawAudit, arguments: &Value) -> Value {
    fn walk(v: &Value, keys: &[String]) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| {
                        let lower = k.to_lowercase();
                        if keys.iter().any(|p| lower.contains(p.as_str())) {
                            (k.clone(), Value::from("[REDACTED]"))
                        } else {
                            (k.clone(), walk(v, keys))
                        }
                    })
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.iter().map(|v| walk(v, keys)).collect()),
            other => other.clone(),
        }
    }
    let keys: Vec<String> = cfg.redact_keys.iter().map(|k| k.to_lowercase()).collect();
    let redacted = walk(arguments, &keys);
    let text = serde_json::to_string(&redacted).unwrap_or_default();
    if text.len() > cfg.max_argument_bytes {
        return json!({
            "[TRUNCATED]": true,
            "bytes": text.len(),
            "sha256": hex(&Sha256::digest(text.as_bytes())),
        });
    }
    redacted
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// RFC 3339, UTC, microseconds.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// Builds the line for `event` (which already has `seq` and `prev_hash`): its canonical text
/// with `"hash"` appended as the last member; returns (line, hash).
fn seal(event: &Map<String, Value>) -> (String, String) {
    let body = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    let hash = hex(&Sha256::digest(body.as_bytes()));
    let mut line = String::with_capacity(body.len() + 80);
    line.push_str(&body[..body.len() - 1]);
    if body.len() > 2 {
        line.push(',');
    }
    line.push_str("\"hash\":\"");
    line.push_str(&hash);
    line.push_str("\"}\n");
    (line, hash)
}

/// Splits a line into (the sealed body, the hash it claims); `None` when the line does not end
/// in a hash member.
fn unseal(line: &str) -> Option<(String, &str)> {
    const TAIL: usize = ",\"hash\":\"".len() + 64 + 2;
    if line.len() < TAIL + 1 || !line.ends_with("\"}") {
        return None;
    }
    let split = line.len() - TAIL;
    // A tampered line may put a multi-byte character across the split: not a valid seal.
    if !line.is_char_boundary(split) {
        return None;
    }
    let (body, tail) = line.split_at(split);
    let hash = tail.strip_prefix(",\"hash\":\"")?.strip_suffix("\"}")?;
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((format!("{body}}}"), hash))
}

struct Job {
    events: Vec<Map<String, Value>>,
    ack: Option<tokio::sync::oneshot::Sender<Result<(), Error>>>,
}

/// Counters the audit log keeps (for status and metrics).
#[derive(Debug, Default)]
pub struct Stats {
    pub events: AtomicU64,
    pub failures: AtomicU64,
    pub syncs: AtomicU64,
    /// Total fdatasync time, µs.
    pub sync_micros: AtomicU64,
}

/// The audit log handle shared by the daemon.
pub struct Audit {
    tx: mpsc::Sender<Job>,
    durability: Durability,
    healthy: Arc<AtomicBool>,
    pub stats: Arc<Stats>,
    pub config: RawAudit,
}

impl Audit {
    /// Opens (or creates) the log, repairs a torn last line, and starts the writer thread.
    pub fn open(config: RawAudit) -> Result<Self, Error> {
        let open_err = |message: String| Error::Open {
            path: config.path.clone(),
            message,
        };
        if let Some(dir) = config.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| open_err(format!("creating {}: {e}", dir.display())))?;
        }
        let mut file = open_log(&config.path).map_err(|e| open_err(e.to_string()))?;
        // One writer per log: a second daemon would see the first one's line in progress as
        // torn, cut it, and fork the chain.
        lock_exclusive(&file).map_err(|e| {
            open_err(format!(
                "{e}; another interceptor daemon is writing this log (one daemon per node)"
            ))
        })?;
        let mut tail = read_tail(&mut file).map_err(|e| open_err(e.to_string()))?;
        if tail.valid_len == 0 && tail.torn.is_none() {
            // A new or emptied file (rotation, logrotate, removal): continue the chain from the
            // newest rotated file beside it.
            if let Some((seq, hash)) = newest_rotated_head(&config.path) {
                tail.last_seq = seq;
                tail.last_hash = hash;
            }
        }
        let (tx, rx) = mpsc::channel();
        let healthy = Arc::new(AtomicBool::new(true));
        let stats = Arc::new(Stats::default());
        let mut writer = Writer {
            path: config.path.clone(),
            file,
            len: tail.valid_len,
            seq: tail.last_seq,
            prev_hash: tail.last_hash.clone(),
            durability: config.durability,
            max_file_bytes: config.max_file_bytes,
            last_sync: Instant::now(),
            dirty: false,
            healthy: healthy.clone(),
            stats: stats.clone(),
        };
        if let Some(torn) = &tail.torn {
            warn!(
                bytes = torn.len(),
                "audit log ends in a torn line; cutting it off"
            );
            writer
                .file
                .set_len(tail.valid_len)
                .map_err(|e| open_err(format!("truncating the torn last line: {e}")))?;
            let mut repair = Map::new();
            repair.insert("event".into(), "audit.repair".into());
            repair.insert("ts".into(), timestamp(SystemTime::now()).into());
            repair.insert("torn_bytes".into(), torn.len().into());
            repair.insert("torn_sha256".into(), hex(&Sha256::digest(torn)).into());
            writer
                .write_batch(vec![repair])
                .map_err(|e| open_err(format!("recording the repair: {e}")))?;
        }
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| open_err(format!("starting the writer thread: {e}")))?;
        Ok(Self {
            tx,
            durability: config.durability,
            healthy,
            stats,
            config,
        })
    }

    /// Whether the last write succeeded.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records `event` (an object with at least `event`); returns when it is durable according
    /// to the configured mode. Adds `v` and `ts`; the writer adds `seq`, `prev_hash`, `hash`.
    pub async fn record(&self, event: Map<String, Value>) -> Result<(), Error> {
        self.record_all(vec![event]).await
    }

    /// Records `events` together (one write, all or none); returns when they are durable
    /// according to the configured mode.
    pub async fn record_all(&self, events: Vec<Map<String, Value>>) -> Result<(), Error> {
        if events.is_empty() {
            // Nothing to write: no verdict on the log's health either way.
            return if self.healthy() {
                Ok(())
            } else {
                Err(Error::Unavailable("the last write failed".into()))
            };
        }
        let events: Vec<_> = events.into_iter().map(stamp).collect();
        if self.durability == Durability::Async {
            if !self.healthy() {
                return Err(Error::Unavailable("the last write failed".into()));
            }
            return self
                .tx
                .send(Job { events, ack: None })
                .map_err(|_| Error::Unavailable("the writer has stopped".into()));
        }
        let (ack, done) = tokio::sync::oneshot::channel();
        self.tx
            .send(Job {
                events,
                ack: Some(ack),
            })
            .map_err(|_| Error::Unavailable("the writer has stopped".into()))?;
        done.await
            .map_err(|_| Error::Unavailable("the writer has stopped".into()))?
    }

    /// Records `event` without waiting (events that gate nothing: responses, closes).
    pub fn record_later(&self, event: Map<String, Value>) {
        let _ = self.tx.send(Job {
            events: vec![stamp(event)],
            ack: None,
        });
    }

    /// Records `event` and waits, from synchronous code (start-up, shutdown, admin).
    pub fn record_blocking(&self, event: Map<String, Value>) -> Result<(), Error> {
        let (ack, done) = tokio::sync::oneshot::channel();
        self.tx
            .send(Job {
                events: vec![stamp(event)],
                ack: Some(ack),
            })
            .map_err(|_| Error::Unavailable("the writer has stopped".into()))?;
        done.blocking_recv()
            .map_err(|_| Error::Unavailable("the writer has stopped".into()))?
    }
}

fn stamp(mut event: Map<String, Value>) -> Map<String, Value> {
    event.insert("v".into(), SCHEMA_VERSION.into());
    event
        .entry("ts")
        .or_insert_with(|| timestamp(SystemTime::now()).into());
    event
}

fn lock_exclusive(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid fd; flock has no memory effects.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// (seq, hash) of the last event in the newest `<path>.<time>` file beside `path`.
fn newest_rotated_head(path: &Path) -> Option<(u64, String)> {
    let dir = path.parent()?;
    let prefix = format!("{}.", path.file_name()?.to_string_lossy());
    let newest = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .max()?;
    let mut f = File::open(newest).ok()?;
    let t = read_tail(&mut f).ok()?;
    (t.last_seq > 0).then_some((t.last_seq, t.last_hash))
}

fn open_log(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// What the end of an existing log says.
struct Tail {
    valid_len: u64,
    last_seq: u64,
    last_hash: String,
    torn: Option<Vec<u8>>,
}

/// Reads the last complete line for `seq`/`hash` and detects a torn last line.
fn read_tail(file: &mut File) -> io::Result<Tail> {
    let len = file.metadata()?.len();
    // Enough to hold the last complete line and whatever follows it: grow the window until it
    // holds a line break before the last line (or reaches the start of the file).
    let mut window = len.min(1 << 20);
    let mut buf;
    loop {
        file.seek(SeekFrom::Start(len - window))?;
        buf = Vec::with_capacity(window as usize);
        file.read_to_end(&mut buf)?;
        let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let breaks = body.iter().filter(|&&b| b == b'\n').count();
        if window == len || breaks >= 2 {
            break;
        }
        window = (window * 4).min(len);
    }
    let mut valid_end = buf.len();
    let mut torn = None;
    if !buf.is_empty() && buf.last() != Some(&b'\n') {
        let start = buf.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        torn = Some(buf[start..].to_vec());
        valid_end = start;
    }
    let complete = &buf[..valid_end];
    let last_line = complete
        .strip_suffix(b"\n")
        .unwrap_or(complete)
        .rsplit(|&b| b == b'\n')
        .next()
        .unwrap_or(&[]);
    let (mut last_seq, mut last_hash) = (0, GENESIS.to_owned());
    if !last_line.is_empty() {
        let text = String::from_utf8_lossy(last_line);
        match (serde_json::from_str::<Value>(&text), unseal(&text)) {
            (Ok(v), Some((_, hash))) => {
                last_seq = v["seq"].as_u64().unwrap_or(0);
                last_hash = hash.to_owned();
            }
            // A complete but unreadable last line: treat it as torn too.
            _ => {
                let start = complete[..complete.len().saturating_sub(1)]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |p| p + 1);
                let mut t = complete[start..].to_vec();
                t.extend(torn.take().unwrap_or_default());
                torn = Some(t);
                valid_end = start;
                if start > 0 {
                    return read_tail_prefix(file, len - window + start as u64, torn);
                }
            }
        }
    }
    Ok(Tail {
        valid_len: len - window + valid_end as u64,
        last_seq,
        last_hash,
        torn,
    })
}

/// Like [`read_tail`] for a file whose valid part ends at `valid_len`.
fn read_tail_prefix(file: &mut File, valid_len: u64, torn: Option<Vec<u8>>) -> io::Result<Tail> {
    let window = valid_len.min(1 << 20);
    file.seek(SeekFrom::Start(valid_len - window))?;
    let mut buf = vec![0; window as usize];
    file.read_exact(&mut buf)?;
    let last = buf
        .strip_suffix(b"\n")
        .unwrap_or(&buf)
        .rsplit(|&b| b == b'\n')
        .next()
        .unwrap_or(&[]);
    let text = String::from_utf8_lossy(last);
    let (seq, hash) = match (serde_json::from_str::<Value>(&text), unseal(&text)) {
        (Ok(v), Some((_, h))) => (v["seq"].as_u64().unwrap_or(0), h.to_owned()),
        _ => (0, GENESIS.to_owned()),
    };
    Ok(Tail {
        valid_len,
        last_seq: seq,
        last_hash: hash,
        torn,
    })
}

struct Writer {
    path: PathBuf,
    file: File,
    len: u64,
    seq: u64,
    prev_hash: String,
    durability: Durability,
    max_file_bytes: u64,
    last_sync: Instant,
    dirty: bool,
    healthy: Arc<AtomicBool>,
    stats: Arc<Stats>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        loop {
            let first = match rx.recv_timeout(SYNC_INTERVAL) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.periodic_sync();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.periodic_sync();
                    return;
                }
            };
            let mut jobs = vec![first];
            while jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            let mut events = Vec::new();
            let mut acks = Vec::new();
            for job in jobs {
                events.extend(job.events);
                acks.push(job.ack);
            }
            let n = events.len() as u64;
            let result = if events.is_empty() {
                Ok(())
            } else {
                self.write_batch(events).map_err(|e| e.to_string())
            };
            match &result {
                Ok(()) => {
                    self.stats.events.fetch_add(n, Ordering::Relaxed);
                    if !self.healthy.swap(true, Ordering::Relaxed) {
                        info!("audit log writable again");
                    }
                }
                Err(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    if self.healthy.swap(false, Ordering::Relaxed) {
                        error!(error = %e, path = %self.path.display(), "audit log write failed; refusing requests until it recovers");
                    }
                }
            }
            for ack in acks.into_iter().flatten() {
                let _ = ack.send(result.clone().map_err(Error::Unavailable));
            }
            if self.durability == Durability::Write {
                self.periodic_sync();
            }
        }
    }

    fn periodic_sync(&mut self) {
        if self.dirty && self.last_sync.elapsed() >= SYNC_INTERVAL {
            let _ = self.sync();
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        let started = Instant::now();
        self.file.sync_data()?;
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        self.stats
            .sync_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.last_sync = Instant::now();
        self.dirty = false;
        Ok(())
    }

    /// Seals and writes `events` in one `write`, rolling back a partial write so a failure
    /// never leaves half a line in the middle of the chain.
    fn write_batch(&mut self, events: Vec<Map<String, Value>>) -> io::Result<()> {
        self.ensure_file()?;
        let (mut seq, mut prev) = (self.seq, self.prev_hash.clone());
        let mut buf = String::new();
        for mut event in events {
            seq += 1;
            event.insert("seq".into(), seq.into());
            event.insert("prev_hash".into(), Value::from(prev.as_str()));
            let (line, hash) = seal(&event);
            buf.push_str(&line);
            prev = hash;
        }
        if self.len > 0 && self.len + buf.len() as u64 > self.max_file_bytes {
            self.rotate()?;
        }
        if let Err(e) = self.file.write_all(buf.as_bytes()) {
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        if self.durability == Durability::Fsync
            && let Err(e) = self.sync()
        {
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.dirty = true;
        self.len += buf.len() as u64;
        self.seq = seq;
        self.prev_hash = prev;
        Ok(())
    }

    /// Re-creates the file if it was removed (or replaced) under us.
    fn ensure_file(&mut self) -> io::Result<()> {
        let current = self.file.metadata()?;
        let on_disk = std::fs::metadata(&self.path).ok();
        let same = on_disk
            .as_ref()
            .is_some_and(|m| m.ino() == current.ino() && m.dev() == current.dev());
        if current.nlink() > 0 && same {
            return Ok(());
        }
        warn!(path = %self.path.display(), "audit log was removed or replaced; re-creating it");
        self.file = open_log(&self.path)?;
        self.len = self.file.metadata()?.len();
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let _ = self.sync();
        let stamp = humantime::format_rfc3339_micros(SystemTime::now())
            .to_string()
            .replace(':', "");
        let rotated = PathBuf::from(format!("{}.{stamp}", self.path.display()));
        std::fs::rename(&self.path, &rotated)?;
        self.file = open_log(&self.path)?;
        self.len = 0;
        info!(rotated = %rotated.display(), "audit log rotated");
        Ok(())
    }
}

/// The outcome of verifying one or more files (in chain order).
#[derive(Debug, Default)]
pub struct Verification {
    pub events: u64,
    /// The first broken record: (file, line number, reason).
    pub broken: Option<(PathBuf, usize, String)>,
    /// A torn last line at the very end (a crash mid-write), not a break in the chain.
    pub torn_tail: Option<(PathBuf, usize)>,
}

/// Verifies the chain across `paths`, in the order given (oldest first).
pub fn verify(paths: &[PathBuf]) -> io::Result<Verification> {
    let mut out = Verification::default();
    let mut prev: Option<String> = None;
    let mut prev_seq: Option<u64> = None;
    for (fi, path) in paths.iter().enumerate() {
        let file = File::open(path)?;
        let mut reader = BufReader::new(file);
        let mut line = String::new();
        let mut n = 0;
        loop {
            line.clear();
            let read = reader.read_line(&mut line)?;
            if read == 0 {
                break;
            }
            n += 1;
            let last_of_all = fi + 1 == paths.len() && reader.fill_buf()?.is_empty();
            let Some(text) = line.strip_suffix('\n') else {
                if last_of_all {
                    out.torn_tail = Some((path.clone(), n));
                    return Ok(out);
                }
                out.broken = Some((path.clone(), n, "line is not terminated".into()));
                return Ok(out);
            };
            let fail = |why: String| Some((path.clone(), n, why));
            let Some((body, hash)) = unseal(text) else {
                out.broken = fail("no hash at the end of the line (edited or truncated)".into());
                return Ok(out);
            };
            if hex(&Sha256::digest(body.as_bytes())) != hash {
                out.broken = fail("hash mismatch: the line was edited".into());
                return Ok(out);
            }
            let Ok(v) = serde_json::from_str::<Value>(&body) else {
                out.broken = fail("not JSON".into());
                return Ok(out);
            };
            let (Some(seq), Some(p)) = (v["seq"].as_u64(), v["prev_hash"].as_str()) else {
                out.broken = fail("seq or prev_hash missing".into());
                return Ok(out);
            };
            if let Some(expected) = &prev
                && p != expected
            {
                out.broken = fail(format!(
                    "prev_hash does not match the previous record (seq {}): a record was deleted, inserted or reordered",
                    prev_seq.unwrap_or(0)
                ));
                return Ok(out);
            }
            if let Some(ps) = prev_seq
                && Some(seq) != ps.checked_add(1)
            {
                out.broken = fail(format!(
                    "seq {seq} follows {ps}: records are missing or reordered"
                ));
                return Ok(out);
            }
            prev = Some(hash.to_owned());
            prev_seq = Some(seq);
            out.events += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path, durability: Durability) -> RawAudit {
        RawAudit {
            path: dir.join("audit.jsonl"),
            durability,
            ..Default::default()
        }
    }

    fn event(name: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("event".into(), name.into());
        m
    }

    #[test]
    fn seal_and_unseal_round_trip() {
        let mut e = event("x");
        e.insert("seq".into(), 1.into());
        let (line, hash) = seal(&e);
        let (body, h) = unseal(line.trim_end()).unwrap();
        assert_eq!(h, hash);
        assert_eq!(hex(&Sha256::digest(body.as_bytes())), hash);
    }

    #[test]
    fn redaction_at_any_depth_and_truncation() {
        let c = RawAudit::default();
        let v = redact(
            &c,
            &json!({"path":"/a","nested":{"API_Key":"k","list":[{"password":"p"}]},"AccessToken":"t"}),
        );
        assert_eq!(v["path"], "/a");
        assert_eq!(v["nested"]["API_Key"], "[REDACTED]");
        assert_eq!(v["nested"]["list"][0]["password"], "[REDACTED]");
        assert_eq!(v["AccessToken"], "[REDACTED]");
        let big = redact(
            &c,
            &json!({"blob": "x".repeat(5000), "token": "secret-value"}),
        );
        assert_eq!(big["[TRUNCATED]"], true);
        assert!(!big.to_string().contains("secret-value"));
    }

    #[tokio::test]
    async fn chain_survives_restart_and_detects_edits() {
        let dir = tempfile::tempdir().unwrap();
        {
            let a = Audit::open(cfg(dir.path(), Durability::Fsync)).unwrap();
            for i in 0..3 {
                a.record(event(&format!("e{i}"))).await.unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        {
            let a = Audit::open(cfg(dir.path(), Durability::Write)).unwrap();
            a.record(event("after-restart")).await.unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        let path = dir.path().join("audit.jsonl");
        let v = verify(std::slice::from_ref(&path)).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert_eq!(v.events, 4);

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // Edit
        let edited = text.replace("\"e1\"", "\"eX\"");
        std::fs::write(&path, &edited).unwrap();
        let v = verify(std::slice::from_ref(&path)).unwrap();
        assert_eq!(v.broken.as_ref().map(|b| b.1), Some(2), "{:?}", v.broken);
        // Delete a line in the middle
        let deleted = format!("{}\n{}\n{}\n", lines[0], lines[2], lines[3]);
        std::fs::write(&path, &deleted).unwrap();
        let v = verify(std::slice::from_ref(&path)).unwrap();
        assert_eq!(v.broken.as_ref().map(|b| b.1), Some(2), "{:?}", v.broken);
        // Swap two lines
        let swapped = format!("{}\n{}\n{}\n{}\n", lines[0], lines[2], lines[1], lines[3]);
        std::fs::write(&path, &swapped).unwrap();
        assert!(
            verify(std::slice::from_ref(&path))
                .unwrap()
                .broken
                .is_some()
        );
        // Torn tail: reported as such, then repaired at the next start.
        std::fs::write(&path, format!("{text}{{\"event\":\"half")).unwrap();
        let v = verify(std::slice::from_ref(&path)).unwrap();
        assert!(v.broken.is_none() && v.torn_tail.is_some(), "{v:?}");
        {
            let a = Audit::open(cfg(dir.path(), Durability::Fsync)).unwrap();
            a.record(event("after-repair")).await.unwrap();
        }
        let v = verify(std::slice::from_ref(&path)).unwrap();
        assert!(v.broken.is_none() && v.torn_tail.is_none(), "{v:?}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"audit.repair\""));
        assert_eq!(v.events, 6);
    }

    #[tokio::test]
    async fn one_writer_per_log_and_a_fresh_file_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path(), Durability::Fsync);
        c.max_file_bytes = 4096;
        let a = Audit::open(c.clone()).unwrap();
        let e = Audit::open(c.clone())
            .err()
            .expect("a second writer is refused");
        assert!(e.to_string().contains("another interceptor daemon"), "{e}");
        for i in 0..30 {
            a.record(event(&format!("padding-event-{i:04}-{}", "x".repeat(40))))
                .await
                .unwrap();
        }
        drop(a);
        std::thread::sleep(Duration::from_millis(100));
        // The live file vanishes (logrotate, an operator): the next start continues the chain
        // from the newest rotated file.
        std::fs::remove_file(dir.path().join("audit.jsonl")).unwrap();
        let a = Audit::open(c).unwrap();
        a.record(event("after")).await.unwrap();
        drop(a);
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p != &dir.path().join("audit.jsonl"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no rotation happened");
        files.push(dir.path().join("audit.jsonl"));
        let v = verify(&files).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        // The new file's first event continues the sequence of the rotated ones.
        let live = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        let first: Value = serde_json::from_str(live.lines().next().unwrap()).unwrap();
        assert!(first["seq"].as_u64() > Some(1), "{first}");
    }

    #[test]
    fn tampered_multibyte_lines_do_not_panic() {
        assert!(unseal(&format!("{{\"a\":\"{}\"}}", "é".repeat(60))).is_none());
    }

    #[tokio::test]
    async fn rotation_keeps_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path(), Durability::Fsync);
        c.max_file_bytes = 600;
        let a = Audit::open(c).unwrap();
        for i in 0..10 {
            a.record(event(&format!("event-number-{i}"))).await.unwrap();
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p != &dir.path().join("audit.jsonl"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no rotation happened");
        files.push(dir.path().join("audit.jsonl"));
        let v = verify(&files).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert_eq!(v.events, 10);
    }
}
