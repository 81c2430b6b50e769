//! Two-tier authorisation: which MCP servers an identity may reach, then which tools (and other
//! methods) on each. Deny by default, deny wins. Patterns are literals, globs (`read_*`) or
//! regexes (`^…$`). Roles are bound to identities by selectors over the process identity.
//!
//! [`Policy::check`] is a pure function of (policy, subject, server, call) returning the
//! decision and the rule that made it; the proxy uses the same function to decide calls and to
//! filter `*/list` results.

use std::collections::HashMap;

use globset::{Candidate, GlobBuilder, GlobMatcher};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Methods a granted server always allows: the session plumbing and discovery. Everything else
/// must be granted by a role.
const ALWAYS_ALLOWED: [&str; 8] = [
    "initialize",
    "ping",
    "server/discover",
    // 2026-07-28's server stream (what a GET is to the older generations).
    "subscriptions/listen",
    "tools/list",
    "prompts/list",
    "resources/list",
    "resources/templates/list",
];

/// Agent input (a method, a tool name) as a rule quotes it: Debug-quoted, at most 128
/// characters (the audit event's `rule` is not capped otherwise).
fn quoted(s: &str) -> String {
    match s.char_indices().nth(128) {
        Some((cut, _)) => format!("{:?}…", &s[..cut]),
        None => format!("{s:?}"),
    }
}

/// Tool names outside this set are refused whatever the patterns say: invisible characters and
/// look-alikes are how a denied tool hides behind an allowed name.
fn valid_tool_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.chars().all(tool_char)
}

/// `[[role]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRole {
    /// Unique role name.
    pub name: String,
    /// Tier 1: server names (patterns) this role reaches.
    #[serde(default)]
    pub servers: Vec<String>,
    /// Tier 2: tools this role may call (patterns).
    #[serde(default)]
    pub allow_tools: Vec<String>,
    /// Tools this role may never call (patterns); deny wins over any allow.
    #[serde(default)]
    pub deny_tools: Vec<String>,
    /// Other MCP methods this role may use, e.g. `resources/read`, `prompts/*`.
    #[serde(default)]
    pub allow_methods: Vec<String>,
    /// Resource URIs (patterns) its `resources/read` and `resources/(un)subscribe` may name;
    /// empty: any.
    #[serde(default)]
    pub allow_resources: Vec<String>,
    /// Prompt names (patterns) its `prompts/get` may name; empty: any.
    #[serde(default)]
    pub allow_prompts: Vec<String>,
    /// Constraints on tool arguments.
    #[serde(default)]
    pub tool_args: Vec<RawToolArgs>,
}

/// `[[role.tool_args]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawToolArgs {
    /// Tool name (pattern) the constraint applies to.
    pub tool: String,
    /// JSON pointer into the call's `arguments`, e.g. `/path`.
    pub pointer: String,
    /// Allowed values (patterns; globs here treat `/` as a separator, `**` crosses it).
    pub allow: Vec<String>,
}

/// `[[binding]]` as written: which identities get a role. Every selector given must match.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBinding {
    /// The role granted.
    pub role: String,
    /// cgroup path patterns (relative to the cgroup v2 mount); `/a/**` also matches `/a`.
    #[serde(default)]
    pub cgroup: Option<OneOrMany>,
    /// uids: one, or a list.
    #[serde(default)]
    pub uid: Option<Ids>,
    /// gids: one, or a list.
    #[serde(default)]
    pub gid: Option<Ids>,
    /// Executable path patterns.
    #[serde(default)]
    pub exe: Option<OneOrMany>,
    /// `comm` patterns.
    #[serde(default)]
    pub comm: Option<OneOrMany>,
    /// Workload id patterns (see `[identity] workload_id`).
    #[serde(default)]
    pub workload_id: Option<OneOrMany>,
}

/// A string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A number (uid, gid) or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "an id from 0 to 4294967295, or a list of them")]
pub enum Ids {
    One(u32),
    Many(Vec<u32>),
}

impl Ids {
    fn to_vec(&self) -> Vec<u32> {
        match self {
            Ids::One(id) => vec![*id],
            Ids::Many(ids) => ids.clone(),
        }
    }
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// How a denied `tools/call` is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DenyStyle {
    /// -32602 with a message saying the call was refused by policy.
    #[default]
    Policy,
    /// -32602 `Unknown tool: <name>`, as if the tool did not exist.
    UnknownTool,
}

/// `[policy]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawPolicyOptions {
    /// Keep denied tools in `tools/list` results instead of hiding them.
    pub show_denied_tools: bool,
    /// Answer style for denied calls.
    pub deny_message: DenyStyle,
}

/// A compiled pattern: literal, glob, or `^regex$`.
#[derive(Debug, Clone)]
pub struct Pattern {
    text: String,
    kind: PatternKind,
    /// Matched without regard to ASCII case (see [`Pattern::new_folded`]).
    folded: bool,
}

#[derive(Debug, Clone)]
enum PatternKind {
    Literal,
    Glob(GlobMatcher),
    Regex(Regex),
}

impl Pattern {
    /// Compiles `text`. `paths`: globs treat `/` as a separator (`*` stays in one segment).
    pub fn new(text: &str, paths: bool) -> Result<Self, String> {
        Self::compile(text, paths, false)
    }

    /// [`Pattern::new`], matching without regard to ASCII case: for what denies (`deny_tools`,
    /// the tool a `tool_args` constrains), since a server may look tool names up in any case
    /// (`DELETE_file` would otherwise pass `delete_*` to run `delete_file`). Folding only adds
    /// denials.
    pub fn new_folded(text: &str, paths: bool) -> Result<Self, String> {
        Self::compile(text, paths, true)
    }

    fn compile(text: &str, paths: bool, folded: bool) -> Result<Self, String> {
        if text.is_empty() {
            return Err("empty pattern".into());
        }
        // Half an anchor is a regex written wrong: taken as a literal or glob it would match
        // nothing (no tool name or path has `^` or `$`), silently (a deny that denies nothing).
        if text.starts_with('^') != text.ends_with('$') {
            return Err(format!(
                "{text:?} looks like a regex but is not anchored at both ends: a regex is \
                 written ^…$ as a whole (\"^delete_.*$\"); a glob has no anchors (\"delete_*\")"
            ));
        }
        let kind = if text.len() >= 2 && text.starts_with('^') && text.ends_with('$') {
            // Anchored as a whole: "^a|b$" must not match "a-and-more".
            // Errors are reported against the pattern as written (the wrapped one would show
            // in the message, its positions shifted).
            Regex::new(text).map_err(|e| format!("invalid regex {text:?}: {e}"))?;
            let inner = &text[1..text.len() - 1];
            let flags = if folded { "(?i)" } else { "" };
            PatternKind::Regex(
                Regex::new(&format!("{flags}^(?:{inner})$"))
                    .map_err(|e| format!("invalid regex {text:?}: {e}"))?,
            )
        } else if text.contains(['*', '?', '[', '{']) {
            PatternKind::Glob(
                GlobBuilder::new(text)
                    .literal_separator(paths)
                    .case_insensitive(folded)
                    .build()
                    .map_err(|e| format!("invalid glob {text:?}: {e}"))?
                    .compile_matcher(),
            )
        } else {
            PatternKind::Literal
        };
        Ok(Self {
            text: text.to_owned(),
            kind,
            folded,
        })
    }

    /// Match of the whole string: exact and case-sensitive, or without regard to ASCII case
    /// for a [`Pattern::new_folded`] one.
    pub fn matches(&self, s: &str) -> bool {
        match &self.kind {
            PatternKind::Literal if self.folded => self.text.eq_ignore_ascii_case(s),
            PatternKind::Literal => self.text == s,
            PatternKind::Glob(g) => g.is_match(s),
            PatternKind::Regex(r) => r.is_match(s),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn is_literal(&self) -> bool {
        matches!(self.kind, PatternKind::Literal)
    }
}

fn compile(list: &[String], paths: bool, key: &str) -> Result<Vec<Pattern>, (String, String)> {
    list.iter()
        .enumerate()
        .map(|(i, p)| Pattern::new(p, paths).map_err(|m| (format!("{key}[{i}]"), m)))
        .collect()
}

/// [`compile`] for patterns of tool names that deny: matched without regard to ASCII case,
/// and refused when they can match no tool name.
fn compile_folded(list: &[String], key: &str) -> Result<Vec<Pattern>, (String, String)> {
    list.iter()
        .enumerate()
        .map(|(i, p)| tool_denial(p).map_err(|m| (format!("{key}[{i}]"), m)))
        .collect()
}

/// A pattern of tool names that denies (`deny_tools`, a `tool_args` `tool`), matched without
/// regard to ASCII case; a literal or glob with a character no tool name has (a space, a
/// look-alike letter, a stray quote) could never match: a deny that denies nothing, refused.
/// (A regex is taken as written.)
fn tool_denial(text: &str) -> Result<Pattern, String> {
    let pattern = Pattern::new_folded(text, false)?;
    let stray = match pattern.kind {
        PatternKind::Regex(_) => None,
        PatternKind::Literal => text.chars().find(|&c| !tool_char(c)),
        PatternKind::Glob(_) => glob_stray(text),
    };
    match stray {
        Some(c) => Err(format!(
            "{text:?} can never match a tool name: it has {c:?} where a character of the \
             name goes, and tool names hold only A-Z a-z 0-9 _ - . / (a deny that denies \
             nothing); remove it, or write two patterns for two (\"a_*\", \"b_*\")"
        )),
        None => Ok(pattern),
    }
}

/// Whether `c` may be in a tool name ([`valid_tool_name`]).
fn tool_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')
}

/// The first character of the glob `text` (as globset reads it) that stands for itself and
/// is no tool name's, or the `[` of a class no tool-name character is in: such a glob matches
/// no tool name. `*`, `?`, classes and `{…,…}` alternatives are syntax; a `,` outside braces,
/// a `]` or `}` that closes nothing, a `!` or `^` not opening a class stand for themselves,
/// as does the character after `\`.
fn glob_stray(text: &str) -> Option<char> {
    let mut chars = text.chars().peekable();
    let mut braces = 0usize;
    while let Some(c) = chars.next() {
        match c {
            '*' | '?' => {}
            '\\' => match chars.next() {
                Some(e) if tool_char(e) => {}
                Some(e) => return Some(e),
                None => return Some('\\'),
            },
            '{' => braces += 1,
            '}' if braces > 0 => braces -= 1,
            ',' if braces > 0 => {}
            '[' => {
                let negated = chars.next_if(|&n| n == '!' || n == '^').is_some();
                // A `]` right after the opening (and its negation) is a member.
                let mut members: Vec<char> = chars.next_if_eq(&']').into_iter().collect();
                let mut closed = false;
                for m in chars.by_ref() {
                    if m == ']' {
                        closed = true;
                        break;
                    }
                    members.push(m);
                }
                if !closed {
                    return Some('[');
                }
                // A range `a-z` counts by every character it spans.
                let mut any = false;
                let mut i = 0;
                while i < members.len() {
                    if i + 2 < members.len() && members[i + 1] == '-' {
                        any |= (members[i]..=members[i + 2]).any(tool_char);
                        i += 3;
                    } else {
                        any |= tool_char(members[i]);
                        i += 1;
                    }
                }
                // (A negated class matches some tool character unless it lists all of them:
                // not told apart.)
                if !negated && !any {
                    return Some('[');
                }
            }
            c if tool_char(c) => {}
            c => return Some(c),
        }
    }
    None
}

#[derive(Debug, Clone)]
struct ArgRule {
    tool: Pattern,
    pointer: String,
    /// `pointer`'s members, unescaped.
    members: Vec<String>,
    /// Their [`loose_member`] forms.
    loose_members: Vec<String>,
    allow: Vec<Pattern>,
}

/// Tier 1 of a decision for one (identity, server): the granting roles in role order (or the
/// denial), and a mask over all roles for the pattern indexes.
#[derive(Debug, Clone)]
pub struct Grant {
    roles: Result<Vec<usize>, Decision>,
    mask: Vec<bool>,
    /// The granting roles that constrain tool arguments (usually none), so a call does not
    /// walk every granting role to find out.
    constraining: Vec<usize>,
}

impl Grant {
    /// Whether a role of the identity grants the server (its tools are judged next).
    pub fn grants_server(&self) -> bool {
        self.roles.is_ok()
    }
}

/// A compiled role.
#[derive(Debug, Clone)]
pub struct Role {
    pub name: String,
    /// Position in the policy (for the pattern indexes).
    index: usize,
    servers: Vec<Pattern>,
    allow_tools: Vec<Pattern>,
    /// The decision rule of each `allow_tools` pattern, written once at compile time.
    allow_rules: Vec<String>,
    deny_tools: Vec<Pattern>,
    allow_methods: Vec<Pattern>,
    /// URI patterns for the resource methods (empty: any URI).
    allow_resources: Vec<Pattern>,
    /// Name patterns for `prompts/get` (empty: any prompt).
    allow_prompts: Vec<Pattern>,
    tool_args: Vec<ArgRule>,
}

impl Role {
    /// The target patterns that bound `method` for this role, if it has any: `Some(patterns)`
    /// for a resource method with `allow_resources`, `prompts/get` with `allow_prompts`.
    /// Every resource or prompt method but the lists (always allowed) and
    /// `resources/unsubscribe` (ending a subscription needs no bound): a method this proxy
    /// does not know names no target and so is refused where a bound applies. A
    /// `completion/complete` is bounded as what its reference names: a prompt's arguments by
    /// `allow_prompts`, a resource template's by `allow_resources` (a reference of another
    /// kind is refused where either bound applies).
    fn targets(&self, call: &Call<'_>) -> Option<&[Pattern]> {
        let list = match (call.method, call.reference) {
            (
                "resources/list"
                | "resources/templates/list"
                | "resources/unsubscribe"
                | "prompts/list",
                _,
            ) => return None,
            ("completion/complete", Some(Reference::Prompt)) => &self.allow_prompts,
            ("completion/complete", Some(Reference::Resource)) => &self.allow_resources,
            ("completion/complete", _) => {
                let bounded = !self.allow_prompts.is_empty() || !self.allow_resources.is_empty();
                return bounded.then_some(&[]);
            }
            (m, _) if m.starts_with("resources/") => &self.allow_resources,
            (m, _) if m.starts_with("prompts/") => &self.allow_prompts,
            _ => return None,
        };
        (!list.is_empty()).then_some(list.as_slice())
    }
}

#[derive(Debug, Clone)]
struct Binding {
    index: usize,
    role: usize,
    cgroup: Option<Vec<Pattern>>,
    /// For each `cgroup` glob ending in `/**`, what precedes it, as a pattern of its own: the
    /// cgroup it names matches too (`/teams/{a,b}/**` binds `/teams/a`, not a cgroup named
    /// `/teams/{a,b}`).
    cgroup_bases: Vec<Pattern>,
    uid: Option<Vec<u32>>,
    gid: Option<Vec<u32>>,
    exe: Option<Vec<Pattern>>,
    comm: Option<Vec<Pattern>>,
    workload_id: Option<Vec<Pattern>>,
}

/// The compiled policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    roles: Vec<Role>,
    bindings: Vec<Binding>,
    pub show_denied_tools: bool,
    pub deny_style: DenyStyle,
    /// Identifies the policy source: equal fingerprints mean the same policy.
    pub fingerprint: String,
    /// Every role's `allow_tools` in one matcher (a decision is one pass, not roles × patterns).
    allow_index: ToolIndex,
    /// Every role's `deny_tools` in one matcher.
    deny_index: ToolIndex,
    /// Role `servers` globs and regexes that match no configured server (see
    /// [`Policy::warnings`]).
    unmatched_servers: Vec<String>,
}

/// Tool patterns of every role compiled together: literals in a hash map, globs in one
/// `GlobSet`, regexes in one `RegexSet`; a match names (role, pattern) pairs.
#[derive(Debug, Clone, Default)]
struct ToolIndex {
    /// Names are matched without regard to ASCII case (literals are kept lower-cased).
    fold: bool,
    literals: HashMap<String, Vec<(usize, usize)>>,
    globs: globset::GlobSet,
    glob_ids: Vec<(usize, usize)>,
    regexes: regex::RegexSet,
    regex_ids: Vec<(usize, usize)>,
}

impl ToolIndex {
    /// `fold`: match without regard to ASCII case (the deny patterns; see
    /// [`Pattern::new_folded`]).
    fn build(
        roles: &[Role],
        patterns: fn(&Role) -> &Vec<Pattern>,
        fold: bool,
    ) -> Result<Self, String> {
        let mut literals: HashMap<String, Vec<(usize, usize)>> = HashMap::new();
        let mut globs = globset::GlobSetBuilder::new();
        let mut glob_ids = Vec::new();
        let mut regex_sources = Vec::new();
        let mut regex_ids = Vec::new();
        for role in roles {
            for (i, p) in patterns(role).iter().enumerate() {
                let id = (role.index, i);
                match &p.kind {
                    PatternKind::Literal if fold => literals
                        .entry(p.text.to_ascii_lowercase())
                        .or_default()
                        .push(id),
                    PatternKind::Literal => literals.entry(p.text.clone()).or_default().push(id),
                    PatternKind::Glob(_) => {
                        globs.add(
                            GlobBuilder::new(&p.text)
                                .literal_separator(false)
                                .case_insensitive(fold)
                                .build()
                                .map_err(|e| e.to_string())?,
                        );
                        glob_ids.push(id);
                    }
                    PatternKind::Regex(r) => {
                        regex_sources.push(r.as_str().to_owned());
                        regex_ids.push(id);
                    }
                }
            }
        }
        Ok(Self {
            fold,
            literals,
            globs: globs.build().map_err(|e| e.to_string())?,
            glob_ids,
            regexes: regex::RegexSet::new(&regex_sources).map_err(|e| e.to_string())?,
            regex_ids,
        })
    }

    /// Every (role, pattern) that matches `name` (`candidate` is the same name prepared for
    /// glob matching), ordered by role then pattern. Nothing is allocated when nothing matches,
    /// the usual case for deny patterns, and the regex set is only asked which patterns match
    /// once its DFA has said that one does.
    fn matches(&self, name: &str, candidate: &Candidate<'_>) -> Vec<(usize, usize)> {
        let literal = if self.fold && name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.literals.get(&name.to_ascii_lowercase())
        } else {
            self.literals.get(name)
        };
        let mut out: Vec<(usize, usize)> = literal.cloned().unwrap_or_default();
        let mut globs = Vec::new();
        self.globs.matches_candidate_into(candidate, &mut globs);
        out.extend(globs.into_iter().map(|i| self.glob_ids[i]));
        if self.regexes.is_match(name) {
            out.extend(
                self.regexes
                    .matches(name)
                    .into_iter()
                    .map(|i| self.regex_ids[i]),
            );
        }
        if out.len() > 1 {
            out.sort_unstable();
        }
        out
    }

    /// The first (role, pattern) matching `name` whose role is `granted`.
    fn first_granted(
        &self,
        name: &str,
        candidate: &Candidate<'_>,
        granted: &[bool],
    ) -> Option<(usize, usize)> {
        self.matches(name, candidate)
            .into_iter()
            .find(|(r, _)| granted[*r])
    }
}

/// Who is asking: the parts of the process identity bindings select on.
#[derive(Debug, Clone, Default)]
pub struct Subject<'a> {
    pub cgroup: Option<&'a str>,
    /// Unknown only in `policy explain` without `--uid`: `uid` selectors do not match then.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub exe: Option<&'a str>,
    /// Unknown only in `policy explain` without `--comm`: `comm` selectors do not match then.
    pub comm: Option<&'a str>,
    pub workload_id: Option<&'a str>,
}

/// What is asked: a JSON-RPC method and, for calls, the target and arguments.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub method: &'a str,
    /// `params.name` (tools/call, prompts/get) or `params.uri` (resources/read).
    pub name: Option<&'a str>,
    /// `params.arguments`.
    pub arguments: Option<&'a Value>,
    /// For `completion/complete`: the kind of what `params.ref` names (`name` is then the
    /// prompt's name or the resource template's URI).
    pub reference: Option<Reference>,
}

/// What a `completion/complete` completes an argument of: its `params.ref.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference {
    /// `ref/prompt`, named by `name`.
    Prompt,
    /// `ref/resource`, a resource template named by `uri`.
    Resource,
    /// A type this proxy does not know.
    Other,
}

impl<'a> Call<'a> {
    pub fn method(method: &'a str) -> Self {
        Self {
            method,
            name: None,
            arguments: None,
            reference: None,
        }
    }

    /// A call of `method` naming `name` (a resource URI, a prompt), without arguments.
    pub fn named(method: &'a str, name: &'a str) -> Self {
        Self {
            name: Some(name),
            ..Self::method(method)
        }
    }

    pub fn tool(name: &'a str, arguments: Option<&'a Value>) -> Self {
        Self {
            method: "tools/call",
            name: Some(name),
            arguments,
            reference: None,
        }
    }
}

/// The outcome, with the rule that decided it (for logs and audit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allow: bool,
    pub rule: String,
    /// Roles that granted the request (empty when denied).
    pub roles: Vec<String>,
    /// The rule without what the agent sent (tool names, methods, argument values), where
    /// `rule` quotes it: metrics label by this, so an agent cannot mint label values.
    #[serde(skip)]
    generic: Option<String>,
}

impl Decision {
    /// A refusal made before any policy rule was consulted (malformed headers, a session of
    /// another identity, a revocation); `rule` says why, in the proxy's words only.
    pub fn refused(rule: impl Into<String>) -> Self {
        Self::deny(rule)
    }

    /// [`Decision::refused`] whose rule quotes the agent's input (a task id); `generic` says
    /// it without, for metrics labels.
    pub fn refused_quoting(rule: String, generic: impl Into<String>) -> Self {
        Self::deny_quoting(rule, generic)
    }

    fn deny(rule: impl Into<String>) -> Self {
        Self {
            allow: false,
            rule: rule.into(),
            roles: Vec::new(),
            generic: None,
        }
    }

    /// A denial whose rule quotes the agent's input; `generic` says it without.
    fn deny_quoting(rule: String, generic: impl Into<String>) -> Self {
        Self {
            generic: Some(generic.into()),
            ..Self::deny(rule)
        }
    }

    fn allow(rule: impl Into<String>, roles: Vec<String>) -> Self {
        Self {
            allow: true,
            rule: rule.into(),
            roles,
            generic: None,
        }
    }

    /// A denial's rule as a metrics label: only policy text (role names, patterns, server
    /// names).
    pub fn rule_label(&self) -> &str {
        self.generic.as_deref().unwrap_or(&self.rule)
    }
}

impl Policy {
    /// Compiles roles and bindings; `servers` are the configured server names (a literal server
    /// name in a role must be one of them). Errors are (key, message).
    pub fn compile(
        roles: &[RawRole],
        bindings: &[RawBinding],
        options: &RawPolicyOptions,
        servers: &[String],
    ) -> Result<Self, (String, String)> {
        let mut by_name = HashMap::new();
        let mut compiled = Vec::with_capacity(roles.len());
        let mut unmatched_servers = Vec::new();
        for (i, r) in roles.iter().enumerate() {
            let key = |k: &str| format!("role[{i}].{k}");
            if r.name.is_empty() {
                return Err((key("name"), "a role needs a name".into()));
            }
            if by_name.insert(r.name.clone(), i).is_some() {
                return Err((key("name"), format!("role name {:?} is used twice", r.name)));
            }
            let server_patterns = compile(&r.servers, false, &key("servers"))?;
            for (j, p) in server_patterns.iter().enumerate() {
                if p.is_literal() && !servers.iter().any(|s| s == p.as_str()) {
                    return Err((
                        format!("{}[{j}]", key("servers")),
                        format!(
                            "unknown server name {:?}; known servers: {}",
                            p.as_str(),
                            servers.join(", ")
                        ),
                    ));
                }
                if !servers.iter().any(|s| p.matches(s)) {
                    unmatched_servers.push(format!(
                        "role {}: servers[{j}] {:?} matches no configured server (matching is \
                         case-sensitive; known servers: {}): the role grants and denies \
                         nothing there",
                        r.name,
                        p.as_str(),
                        servers.join(", ")
                    ));
                }
            }
            let mut tool_args = Vec::new();
            for (j, a) in r.tool_args.iter().enumerate() {
                let k = format!("{}[{j}]", key("tool_args"));
                if !a.pointer.is_empty() && !a.pointer.starts_with('/') {
                    return Err((
                        format!("{k}.pointer"),
                        format!(
                            "{:?} is not a JSON pointer; write e.g. \"/path\"",
                            a.pointer
                        ),
                    ));
                }
                tool_args.push(ArgRule {
                    tool: tool_denial(&a.tool).map_err(|m| (format!("{k}.tool"), m))?,
                    pointer: a.pointer.clone(),
                    // The pointer's members, unescaped (`~1` is `/`, `~0` is `~`).
                    members: a
                        .pointer
                        .split('/')
                        .skip(1)
                        .map(|m| m.replace("~1", "/").replace("~0", "~"))
                        .collect(),
                    loose_members: a
                        .pointer
                        .split('/')
                        .skip(1)
                        .map(|m| loose_member(&m.replace("~1", "/").replace("~0", "~")))
                        .collect(),
                    allow: compile(&a.allow, true, &format!("{k}.allow"))?,
                });
            }
            let allow_tools = compile(&r.allow_tools, false, &key("allow_tools"))?;
            compiled.push(Role {
                index: i,
                name: r.name.clone(),
                servers: server_patterns,
                allow_rules: allow_tools
                    .iter()
                    .map(|p| format!("role {}: allow_tools {:?}", r.name, p.as_str()))
                    .collect(),
                allow_tools,
                deny_tools: compile_folded(&r.deny_tools, &key("deny_tools"))?,
                allow_methods: compile(&r.allow_methods, false, &key("allow_methods"))?,
                allow_resources: compile(&r.allow_resources, true, &key("allow_resources"))?,
                allow_prompts: compile(&r.allow_prompts, false, &key("allow_prompts"))?,
                tool_args,
            });
        }
        let mut compiled_bindings = Vec::with_capacity(bindings.len());
        for (i, b) in bindings.iter().enumerate() {
            let key = |k: &str| format!("binding[{i}].{k}");
            let Some(&role) = by_name.get(&b.role) else {
                return Err((
                    key("role"),
                    format!("unknown role {:?}; define it in a [[role]] table", b.role),
                ));
            };
            let pats = |v: &Option<OneOrMany>, k: &str, paths: bool| {
                v.clone()
                    .map(|v| compile(&v.into_vec(), paths, &key(k)))
                    .transpose()
            };
            let cgroup = pats(&b.cgroup, "cgroup", true)?;
            let mut cgroup_bases = Vec::new();
            for (j, p) in cgroup.iter().flatten().enumerate() {
                if let PatternKind::Glob(_) = p.kind
                    && let Some(base) = p.as_str().strip_suffix("/**")
                    && !base.is_empty()
                {
                    cgroup_bases.push(
                        Pattern::new(base, true).map_err(|m| (key(&format!("cgroup[{j}]")), m))?,
                    );
                }
            }
            compiled_bindings.push(Binding {
                index: i,
                role,
                cgroup,
                cgroup_bases,
                uid: b.uid.as_ref().map(Ids::to_vec),
                gid: b.gid.as_ref().map(Ids::to_vec),
                exe: pats(&b.exe, "exe", true)?,
                comm: pats(&b.comm, "comm", false)?,
                workload_id: pats(&b.workload_id, "workload_id", true)?,
            });
        }
        let index_err = |m: String| {
            (
                "role".to_owned(),
                format!("compiling the tool patterns: {m}"),
            )
        };
        let allow_index =
            ToolIndex::build(&compiled, |r| &r.allow_tools, false).map_err(index_err)?;
        let deny_index = ToolIndex::build(&compiled, |r| &r.deny_tools, true).map_err(index_err)?;
        Ok(Self {
            roles: compiled,
            bindings: compiled_bindings,
            show_denied_tools: options.show_denied_tools,
            deny_style: options.deny_message,
            fingerprint: format!("{roles:?}|{bindings:?}|{options:?}"),
            allow_index,
            deny_index,
            unmatched_servers,
        })
    }

    /// Indexes of the roles bound to `subject`.
    fn roles_of(&self, subject: &Subject<'_>) -> Vec<usize> {
        let mut roles: Vec<usize> = self
            .bindings
            .iter()
            .filter(|b| b.matches(subject))
            .map(|b| b.role)
            .collect();
        roles.sort_unstable();
        roles.dedup();
        roles
    }

    /// Tier 1 alone, already resolved: may the identity reach `server` at all? (For requests
    /// that carry no JSON-RPC message: opening a server stream, ending a session.)
    pub fn check_server_granted(&self, grant: &Grant, server: &str) -> Decision {
        match &grant.roles {
            Ok(roles) => Decision::allow(
                format!(
                    "role {}: servers grants {server:?}",
                    self.roles[roles[0]].name
                ),
                self.names(roles),
            ),
            Err(d) => d.clone(),
        }
    }

    /// Tier 1: the roles of `subject` that reach `server`. It depends only on the identity and
    /// the policy, so a connection resolves it once and reuses it for every request.
    pub fn grant(&self, subject: &Subject<'_>, server: &str) -> Grant {
        let denied = |d: Decision| Grant {
            roles: Err(d),
            mask: vec![false; self.roles.len()],
            constraining: Vec::new(),
        };
        let bound = self.roles_of(subject);
        if bound.is_empty() {
            return denied(Decision::deny(
                "default deny: no binding matches this identity",
            ));
        }
        let granting: Vec<usize> = bound
            .into_iter()
            .filter(|&i| self.roles[i].servers.iter().any(|p| p.matches(server)))
            .collect();
        if granting.is_empty() {
            return denied(Decision::deny(format!(
                "default deny: no role of this identity grants server {server:?}"
            )));
        }
        let mut mask = vec![false; self.roles.len()];
        for &i in &granting {
            mask[i] = true;
        }
        let constraining = granting
            .iter()
            .copied()
            .filter(|&i| !self.roles[i].tool_args.is_empty())
            .collect();
        Grant {
            roles: Ok(granting),
            mask,
            constraining,
        }
    }

    fn names(&self, roles: &[usize]) -> Vec<String> {
        roles.iter().map(|&i| self.roles[i].name.clone()).collect()
    }

    /// Decides `call` on `server` for `subject`.
    pub fn check(&self, subject: &Subject<'_>, server: &str, call: &Call<'_>) -> Decision {
        self.check_granted(&self.grant(subject, server), server, call)
    }

    /// [`Policy::check`] with tier 1 already resolved (`grant` must come from this policy).
    pub fn check_granted(&self, grant: &Grant, server: &str, call: &Call<'_>) -> Decision {
        let roles = match &grant.roles {
            Ok(r) => r.as_slice(),
            Err(d) => return d.clone(),
        };
        if ALWAYS_ALLOWED.contains(&call.method) || call.method.starts_with("notifications/") {
            return Decision::allow(
                format!(
                    "server {server:?} granted; {} is always allowed",
                    quoted(call.method)
                ),
                self.names(roles),
            );
        }
        if call.method == "tools/call" {
            return self.check_tool(grant, call);
        }
        // Other methods: deny wins is moot (no deny_methods); the first role that allows the
        // method (and, where it bounds them, the resource or prompt it names) decides.
        // A target that reaches past what it names matches no bound (see `escapes`).
        // (What a bound is called, and what it bounds, for the rules.)
        let (key, what) = match call.reference {
            Some(Reference::Prompt) => ("allow_prompts", "prompt"),
            Some(Reference::Resource) => ("allow_resources", "resource template"),
            Some(Reference::Other) => ("", "completion reference"),
            None if call.method.starts_with("prompts/") => ("allow_prompts", "prompt"),
            None if call.method == "completion/complete" => ("", "completion reference"),
            None => ("allow_resources", "resource URI"),
        };
        // A resource template is judged as the URIs it expands to.
        let judged = match call.reference {
            Some(Reference::Resource) => call.name.map(template_probe),
            _ => call.name.map(std::borrow::Cow::Borrowed),
        };
        // Looked for once, when a bound is first met (a role without bounds may decide first).
        let mut escaping: Option<Option<&'static str>> = None;
        let mut bounded = false;
        for r in roles.iter().map(|&i| &self.roles[i]) {
            let Some(p) = r.allow_methods.iter().find(|p| p.matches(call.method)) else {
                continue;
            };
            let Some(targets) = r.targets(call) else {
                return Decision::allow(
                    format!("role {}: allow_methods {:?}", r.name, p.as_str()),
                    vec![r.name.clone()],
                );
            };
            bounded = true;
            let escapes_here = *escaping.get_or_insert_with(|| judged.as_deref().and_then(escapes));
            let target = judged.as_deref().filter(|_| escapes_here.is_none());
            if let Some(t) = target.and_then(|t| allowed_by(targets, t)) {
                return Decision::allow(
                    format!(
                        "role {}: allow_methods {:?}, {key} {:?}",
                        r.name,
                        p.as_str(),
                        t.as_str()
                    ),
                    vec![r.name.clone()],
                );
            }
        }
        if bounded {
            // The target is in the event's (redacted) `name`; a URI may carry credentials, so
            // the rule does not quote it.
            return Decision::deny(match escaping.flatten() {
                Some(why) => {
                    format!("refused: the {what} has {why}, which no allow pattern vouches for")
                }
                // (The method is not quoted either: past the known ones, the agent's text.)
                None => format!(
                    "default deny: no role's bounds (allow_resources, allow_prompts) take this \
                     {what} on server {server:?}"
                ),
            });
        }
        Decision::deny_quoting(
            format!(
                "default deny: no role allows method {} on server {server:?}",
                quoted(call.method)
            ),
            format!("default deny: no role allows the method on server {server:?}"),
        )
    }

    fn check_tool(&self, grant: &Grant, call: &Call<'_>) -> Decision {
        let granted = &grant.mask;
        let Some(tool) = call.name else {
            return Decision::deny("tools/call without a tool name");
        };
        if !valid_tool_name(tool) {
            return Decision::deny_quoting(
                format!(
                    "tool name {} has characters outside [A-Za-z0-9_.-/] or is too long",
                    quoted(tool)
                ),
                "tool name has characters outside [A-Za-z0-9_.-/] or is too long",
            );
        }
        let candidate = Candidate::new(tool);
        // Deny wins: any granting role's deny pattern refuses the call.
        if let Some((r, p)) = self.deny_index.first_granted(tool, &candidate, granted) {
            let role = &self.roles[r];
            return Decision::deny(format!(
                "role {}: deny_tools {:?}",
                role.name,
                role.deny_tools[p].as_str()
            ));
        }
        // The first matching pattern of each granting role, in role order.
        let mut allowing: Vec<(&Role, usize)> = Vec::new();
        for (r, p) in self.allow_index.matches(tool, &candidate) {
            if granted[r] && allowing.last().is_none_or(|(last, _)| last.index != r) {
                allowing.push((&self.roles[r], p));
            }
        }
        let Some(&(first, pattern)) = allowing.first() else {
            return Decision::deny_quoting(
                format!("default deny: no role allows tool {tool:?}"),
                "default deny: no role allows the tool",
            );
        };
        // Argument constraints of every granting role apply (a constraint is a deny rule).
        let args = call.arguments.unwrap_or(&Value::Null);
        for r in grant.constraining.iter().map(|&i| &self.roles[i]) {
            for rule in r.tool_args.iter().filter(|a| a.tool.matches(tool)) {
                if let Err(why) = rule.check(args) {
                    let which = format!(
                        "role {}: tool_args for {:?} at {:?}",
                        r.name,
                        rule.tool.as_str(),
                        rule.pointer
                    );
                    return Decision::deny_quoting(format!("{which}: {why}"), which);
                }
            }
        }
        Decision::allow(
            first.allow_rules[pattern].clone(),
            allowing.iter().map(|(r, _)| r.name.clone()).collect(),
        )
    }

    /// Whether a listed item may be shown: tools by `tools/call`, prompts by `prompts/get`,
    /// resources by `resources/read` (argument constraints do not hide a tool).
    pub fn shows(
        &self,
        subject: &Subject<'_>,
        server: &str,
        list_method: &str,
        name: &str,
    ) -> bool {
        self.shows_granted(&self.grant(subject, server), server, list_method, name)
    }

    /// [`Policy::shows`] with tier 1 already resolved.
    pub fn shows_granted(
        &self,
        grant: &Grant,
        server: &str,
        list_method: &str,
        name: &str,
    ) -> bool {
        let method = match list_method {
            "tools/list" => {
                if self.show_denied_tools {
                    return true;
                }
                "tools/call"
            }
            "prompts/list" => "prompts/get",
            "resources/list" | "resources/templates/list" => "resources/read",
            _ => return true,
        };
        let call = Call::named(method, name);
        if method == "tools/call" {
            // Listing ignores argument constraints: the tool is usable with the right arguments.
            return self.tool_usable(grant, name);
        }
        self.check_granted(grant, server, &call).allow
    }

    /// Whether a role of `grant` allows tool `name` and none denies it (argument constraints
    /// aside: with the right arguments), whatever `show_denied_tools` says.
    pub fn tool_usable(&self, grant: &Grant, name: &str) -> bool {
        if grant.roles.is_err() {
            return false;
        }
        let granted = &grant.mask;
        let candidate = Candidate::new(name);
        valid_tool_name(name)
            && self
                .deny_index
                .first_granted(name, &candidate, granted)
                .is_none()
            && self
                .allow_index
                .first_granted(name, &candidate, granted)
                .is_some()
    }

    /// Role names, in definition order.
    pub fn role_names(&self) -> Vec<&str> {
        self.roles.iter().map(|r| r.name.as_str()).collect()
    }

    /// Number of bindings.
    pub fn binding_count(&self) -> usize {
        self.bindings.len()
    }

    /// Warnings about bindings that grant their role to every process (no selector: "all
    /// given must match" holds for none given). Allowed, but rarely meant.
    pub fn warnings(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .bindings
            .iter()
            .filter(|b| {
                b.cgroup.is_none()
                    && b.uid.is_none()
                    && b.gid.is_none()
                    && b.exe.is_none()
                    && b.comm.is_none()
                    && b.workload_id.is_none()
            })
            .map(|b| {
                format!(
                    "binding[{}] has no selector: it grants role {} to every process (give a \
                     cgroup, uid, gid, exe, comm or workload_id to narrow it)",
                    b.index, self.roles[b.role].name
                )
            })
            .collect();
        // Cgroup and executable paths are absolute: a pattern that starts with a name (a
        // literal, a glob, or a regex after its `^`) never matches one.
        let relative = |p: &Pattern| {
            let text = p.as_str();
            match text.strip_prefix('^') {
                // In a regex `.` is any character, and an alternation has other starts.
                Some(regex) => {
                    !regex.contains('|')
                        && regex.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
                }
                None => {
                    text.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '.' || c == '_')
                }
            }
        };
        for b in &self.bindings {
            let never =
                |what: String| format!("binding[{}].{what}: the binding never matches", b.index);
            if b.uid.as_ref().is_some_and(Vec::is_empty) {
                out.push(never("uid is an empty list".into()));
            }
            if b.gid.as_ref().is_some_and(Vec::is_empty) {
                out.push(never("gid is an empty list".into()));
            }
            for (key, patterns) in [
                ("cgroup", &b.cgroup),
                ("exe", &b.exe),
                ("comm", &b.comm),
                ("workload_id", &b.workload_id),
            ] {
                if patterns.as_ref().is_some_and(Vec::is_empty) {
                    out.push(never(format!("{key} is an empty list")));
                }
            }
            for (j, p) in b.comm.iter().flatten().enumerate() {
                // The kernel keeps 15 bytes of a process name.
                if p.is_literal() && p.as_str().len() > 15 {
                    out.push(never(format!(
                        "comm[{j}] {:?} is longer than the 15 bytes the kernel keeps of a \
                         process name (write its first 15, or bind by exe)",
                        p.as_str()
                    )));
                }
            }
            for (j, p) in b.cgroup.iter().flatten().enumerate() {
                if p.is_literal() && p.as_str().len() > 1 && p.as_str().ends_with('/') {
                    out.push(never(format!(
                        "cgroup[{j}] {:?} ends with '/', which no cgroup path does (write {:?}, \
                         or {:?} for those below it)",
                        p.as_str(),
                        p.as_str().trim_end_matches('/'),
                        format!("{}**", p.as_str())
                    )));
                }
            }
            for (key, patterns) in [("cgroup", &b.cgroup), ("exe", &b.exe)] {
                for (j, p) in patterns.iter().flatten().enumerate() {
                    if relative(p) {
                        out.push(format!(
                            "binding[{}].{key}[{j}] {:?} never matches: {key} paths are \
                             absolute (write \"/{}\")",
                            b.index,
                            p.as_str(),
                            p.as_str().trim_start_matches('^')
                        ));
                    }
                }
            }
        }
        out.extend(self.unmatched_servers.iter().cloned());
        for r in &self.roles {
            // Deny wins among the roles that grant the server: a role granting none is no
            // deny overlay.
            if r.servers.is_empty() && !(r.deny_tools.is_empty() && r.tool_args.is_empty()) {
                out.push(format!(
                    "role {} has deny_tools or tool_args but no servers: it denies nothing \
                     (deny wins among the roles that grant a server; list the servers it \
                     applies to)",
                    r.name
                ));
            }
            // Arguments constrained for tools, but a method judged by its name alone beside.
            let unconstrained: Vec<&str> = ["resources/read", "prompts/get"]
                .into_iter()
                .filter(|m| {
                    r.allow_methods.iter().any(|p| p.matches(m))
                        && r.targets(&Call::method(m)).is_none()
                })
                .collect();
            if !r.tool_args.is_empty() && !unconstrained.is_empty() {
                out.push(format!(
                    "role {} constrains tool arguments but also allows {}, which is judged by \
                     its method alone (any resource URI, any prompt and its arguments): a \
                     server that reads files through resources or prompts is not held to the \
                     tool_args; bound them with allow_resources / allow_prompts",
                    r.name,
                    unconstrained.join(" and ")
                ));
            }
            if let Some(p) = r.allow_methods.iter().find(|p| p.as_str() == "tools/call") {
                out.push(format!(
                    "role {} allow_methods {:?} has no effect: tools are granted by allow_tools",
                    r.name,
                    p.as_str()
                ));
            }
        }
        out
    }

    /// Names of the roles bound to `subject` (for `policy explain`).
    pub fn bound_roles(&self, subject: &Subject<'_>) -> Vec<(String, usize)> {
        self.bindings
            .iter()
            .filter(|b| b.matches(subject))
            .map(|b| (self.roles[b.role].name.clone(), b.index))
            .collect()
    }
}

impl Binding {
    fn matches(&self, s: &Subject<'_>) -> bool {
        let any = |pats: &Option<Vec<Pattern>>, value: Option<&str>| match pats {
            None => true,
            Some(pats) => value.is_some_and(|v| pats.iter().any(|p| p.matches(v))),
        };
        let cgroup = match &self.cgroup {
            None => true,
            Some(pats) => s
                .cgroup
                .is_some_and(|v| pats.iter().chain(&self.cgroup_bases).any(|p| p.matches(v))),
        };
        cgroup
            && self
                .uid
                .as_ref()
                .is_none_or(|u| s.uid.is_some_and(|x| u.contains(&x)))
            && self
                .gid
                .as_ref()
                .is_none_or(|g| s.gid.is_some_and(|x| g.contains(&x)))
            && any(&self.exe, s.exe)
            && any(&self.comm, s.comm)
            && any(&self.workload_id, s.workload_id)
    }
}

/// Calls `each` on the other forms a server may read `text` as, until one returns true
/// (then true): with `\` as `/` (URL parsers take it so), without tab, CR and LF (URL parsers
/// drop them: also where decoding made them), and once and twice percent-decoded. Allocates
/// only when there is something to turn, drop or decode.
fn other_readings(text: &str, mut each: impl FnMut(&str) -> bool) -> bool {
    use std::borrow::Cow;
    const BLANKS: [char; 3] = ['\t', '\n', '\r'];
    if text.contains('\\') && each(&text.replace('\\', "/")) {
        return true;
    }
    // A reading, then (if it holds any) the same without tab, CR and LF: the one to go on from.
    let mut visit = |t: Cow<'_, str>| -> Result<String, ()> {
        if each(&t) || t.contains('\\') && each(&t.replace('\\', "/")) {
            return Err(());
        }
        if t.contains(BLANKS) {
            let stripped = t.replace(BLANKS, "");
            if each(&stripped) {
                return Err(());
            }
            return Ok(stripped);
        }
        Ok(t.into_owned())
    };
    let stripped = if text.contains(BLANKS) {
        match visit(Cow::Owned(text.replace(BLANKS, ""))) {
            Ok(s) => Cow::Owned(s),
            Err(()) => return true,
        }
    } else {
        Cow::Borrowed(text)
    };
    if !stripped.contains('%') {
        return false;
    }
    let Ok(once) = visit(percent_encoding::percent_decode_str(&stripped).decode_utf8_lossy())
    else {
        return true;
    };
    once.contains('%')
        && visit(percent_encoding::percent_decode_str(&once).decode_utf8_lossy()).is_err()
}

/// Why `text` (a constrained argument value, a resource URI or a prompt name) could reach
/// outside what its pattern allows once a server reads it, if it could, in any of its
/// readings (as written and [`other_readings`]):
/// - a `..` segment, whatever separates it (`/`, `\` — URL parsers take it for `/` —, or
///   `?`, `&`, `=`, `#`, `;`: a query's `p=..`, Tomcat's `..;`), whitespace around it aside;
/// - an empty segment in the path (past a leading `scheme://`, or from a `scheme:/`, before
///   any `?` or `#`): a server joining the rest to its root may take `//etc` for an
///   absolute path;
/// - a control character other than tab, line feed and carriage return (a NUL ends a C
///   string, and the server reads less than the proxy judged).
///
/// (An encoded separator, `%2F`, is judged by matching: every reading must match an allow
/// pattern too, see [`allowed_by`].)
/// A resource template (RFC 6570) as the URIs it expands to: each expression becomes a value
/// — spanning path segments (`x/x`) where its operator's expansion may (`{+…}`, `{#…}`,
/// `{/…}`), within one segment otherwise (a simple `{name}` percent-encodes a `/`) — so that
/// `notes://public/{+path}` does not pass a bound `notes://public/*` that `{name}` passes.
fn template_probe(template: &str) -> std::borrow::Cow<'_, str> {
    if !template.contains('{') {
        return std::borrow::Cow::Borrowed(template);
    }
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            // Not a template expression: kept as written.
            out.push_str(&rest[open..]);
            rest = "";
            break;
        };
        let expression = &rest[open + 1..open + close];
        out.push_str(match expression.chars().next() {
            Some('+') => "x/x",
            Some('#') => "#x/x",
            Some('/') => "/x/x",
            Some('.') => ".x",
            Some(';') => ";x=x",
            Some('?') => "?x=x",
            Some('&') => "&x=x",
            _ => "x",
        });
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

fn escapes(text: &str) -> Option<&'static str> {
    fn judge(t: &str) -> Option<&'static str> {
        if t.chars()
            .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
        {
            return Some("a control character");
        }
        if t.split(['/', '\\', '?', '&', '=', '#', ';'])
            .any(|segment| segment.trim_matches(|c: char| c.is_ascii_whitespace()) == "..")
        {
            return Some("a '..' segment (also encoded, or after a backslash or in a query)");
        }
        // The path: past a leading scheme's `://` (its authority included), or from the `/`
        // after a scheme without one (`file:/srv/x`, RFC 8089), up to a query or fragment.
        let scheme = t
            .find(':')
            .filter(|&i| {
                t[..i].starts_with(|c: char| c.is_ascii_alphabetic())
                    && t[..i]
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            })
            .and_then(|i| match &t[i + 1..] {
                rest if rest.starts_with("//") => Some(i + 3),
                rest if rest.starts_with(['/', '\\']) => Some(i + 1),
                _ => None,
            });
        // Only a path or a URL has segments: free text (code, a sentence with a URL in it)
        // may well hold `//`.
        if scheme.is_none() && !t.starts_with(['/', '\\']) {
            return None;
        }
        let path = &t[scheme.unwrap_or(0)..];
        let path = &path[..path.find(['?', '#']).unwrap_or(path.len())];
        let empty = ["//", "\\\\", "/\\", "\\/"]
            .iter()
            .any(|pair| path.contains(pair));
        empty.then_some("an empty path segment")
    }
    let mut why = judge(text);
    if why.is_none() {
        other_readings(text, |t| {
            why = judge(t);
            why.is_some()
        });
    }
    why
}

/// The pattern of `patterns` that allows `text`: one matches it as written, and every other
/// reading of it ([`other_readings`]) matches one too (`notes://public/x%2Fy` is one segment
/// to `notes://public/*`, two to a server that decodes it).
fn allowed_by<'p>(patterns: &'p [Pattern], text: &str) -> Option<&'p Pattern> {
    let found = patterns.iter().find(|p| p.matches(text))?;
    // Only a reading with more separators than the text as written can lead elsewhere (one
    // that decodes `%20` into a space does not need a pattern of its own).
    let separators = |t: &str| t.matches(['/', '?', '#']).count();
    let written = separators(text);
    let strays = other_readings(text, |t| {
        separators(t) > written && !patterns.iter().any(|p| p.matches(t))
    });
    (!strays).then_some(found)
}

/// The form lenient readers (pydantic aliases, case-insensitive binders) reduce a member name
/// to, as it goes: lower case, `_` and `-` dropped but for a leading one (`file_path`,
/// `filePath` and `File-Path` are one member; `_id` and `id` are two).
fn loose_chars(name: &str) -> impl Iterator<Item = char> + '_ {
    let mut chars = name.chars();
    let first = chars.next().into_iter().flat_map(char::to_lowercase);
    first.chain(
        chars
            .filter(|c| !matches!(c, '_' | '-'))
            .flat_map(char::to_lowercase),
    )
}

/// [`loose_chars`] collected: a pointer member's form, kept with its rule.
fn loose_member(name: &str) -> String {
    loose_chars(name).collect()
}

/// Whether `key` reduces to `loose` (a [`loose_member`] form), compared without allocating.
fn loosely(key: &str, loose: &str) -> bool {
    loose_chars(key).eq(loose.chars())
}

impl ArgRule {
    /// Whether an object on the way to the constrained value also holds its member under
    /// another spelling (the proxy would judge one, a lenient server might read the other).
    fn spelled_twice(&self, args: &Value) -> bool {
        let mut at = Some(args);
        for (member, loose) in self.members.iter().zip(&self.loose_members) {
            at = match at {
                Some(Value::Object(m)) => {
                    if m.keys().any(|k| k != member && loosely(k, loose)) {
                        return true;
                    }
                    m.get(member)
                }
                Some(Value::Array(items)) => {
                    member.parse::<usize>().ok().and_then(|i| items.get(i))
                }
                _ => return false,
            };
        }
        false
    }

    /// Why the arguments fail this rule. The reason never quotes the value: it becomes the
    /// audit event's `rule`, which is not redacted (the value is in `arguments`, redacted).
    fn check(&self, args: &Value) -> Result<(), String> {
        if self.spelled_twice(args) {
            return Err(
                "a member on the constrained path is given under another spelling too \
                 (file_path beside filePath): the server may read either"
                    .into(),
            );
        }
        let Some(value) = args.pointer(&self.pointer) else {
            return Err("argument missing".into());
        };
        let Some(text) = value.as_str() else {
            let kind = match value {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::Array(_) => "an array",
                Value::Object(_) => "an object",
                Value::String(_) => "a string",
            };
            return Err(format!("argument is {kind}, not a string"));
        };
        // "/srv/notes/../../etc/passwd" matches "/srv/notes/**" textually; refuse traversal,
        // as the server may read it: percent-encoded (a URL's `%2e%2e`, twice encoded too),
        // after a backslash (URL parsers take it for `/`), or cut short by a control character
        // (a NUL ends a C string).
        if let Some(why) = escapes(text) {
            return Err(format!("the value has {why}"));
        }
        if allowed_by(&self.allow, text).is_some() {
            Ok(())
        } else if self.allow.iter().any(|p| p.matches(text)) {
            Err("a decoded form of the value leads past the allowed patterns".into())
        } else {
            Err("the value matches no allowed pattern".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn policy(toml_text: &str) -> Policy {
        #[derive(Deserialize)]
        struct P {
            #[serde(default)]
            role: Vec<RawRole>,
            #[serde(default)]
            binding: Vec<RawBinding>,
            #[serde(default)]
            policy: RawPolicyOptions,
        }
        let p: P = toml::from_str(toml_text).unwrap();
        let servers = vec!["notes".to_owned(), "wiki-en".to_owned(), "admin".to_owned()];
        Policy::compile(&p.role, &p.binding, &p.policy, &servers).unwrap()
    }

    const ISSUE_EXAMPLE: &str = r#"
        [[role]]
        name = "notes-reader"
        servers = ["notes", "wiki-*"]
        allow_tools = ["read_*", "search", "^(get|list)_[a-z_]+$"]
        deny_tools = ["delete_*", "read_secrets"]
        allow_methods = ["resources/read", "prompts/*"]
        [[role.tool_args]]
        tool = "read_file"
        pointer = "/path"
        allow = ["/srv/notes/**"]

        [[role]]
        name = "admin"
        servers = ["admin", "notes"]
        allow_tools = ["*"]

        [[binding]]
        role = "notes-reader"
        cgroup = "/agents/**"
        uid = [1000]
        exe = ["/usr/bin/python3*"]

        [[binding]]
        role = "admin"
        cgroup = "/ops"
    "#;

    fn agent() -> Subject<'static> {
        Subject {
            cgroup: Some("/agents/team-a"),
            uid: Some(1000),
            gid: Some(1000),
            exe: Some("/usr/bin/python3.11"),
            comm: Some("python3"),
            workload_id: Some("spiffe://example.org/node/n1/cgroup/agents/team-a/uid/1000"),
        }
    }

    #[test]
    fn rule_labels_carry_no_agent_input() {
        let p = policy(ISSUE_EXAMPLE);
        let bad_path = json!({"path": "/etc/agent-chosen-1"});
        let cases = [
            Call::tool("agent-chosen-1", None),
            Call::tool("agent chosen\u{200b}1", None),
            Call::method("agent/chosen-1"),
        ];
        for call in cases {
            let d = p.check(&agent(), "notes", &call);
            assert!(!d.allow, "{call:?}");
            assert!(d.rule.contains("agent"), "the audit keeps it: {:?}", d.rule);
            assert!(!d.rule_label().contains("agent"), "{:?}", d.rule_label());
        }
        // An argument value is in neither (the audit has it in the redacted arguments).
        let d = p.check(&agent(), "notes", &Call::tool("read_file", Some(&bad_path)));
        assert!(!d.allow);
        assert!(!d.rule.contains("agent"), "{:?}", d.rule);
        // Rules made of policy text only label as they read.
        let d = p.check(&agent(), "notes", &Call::tool("delete_x", None));
        assert_eq!(d.rule_label(), d.rule);
    }

    /// (subject, server, call, allow, rule fragment)
    macro_rules! table {
        ($p:expr, $( ($subject:expr, $server:expr, $call:expr, $allow:expr, $rule:expr) ),+ $(,)?) => {
            $(
                let d = $p.check(&$subject, $server, &$call);
                assert_eq!(d.allow, $allow, "{:?} on {}: {:?}", $call, $server, d);
                assert!(d.rule.contains($rule), "{:?}: rule {:?} lacks {:?}", $call, d.rule, $rule);
            )+
        };
    }

    #[test]
    fn two_tiers_deny_by_default_deny_wins() {
        let p = policy(ISSUE_EXAMPLE);
        let a = agent();
        let ops = Subject {
            cgroup: Some("/ops"),
            ..Default::default()
        };
        let stranger = Subject {
            cgroup: Some("/other"),
            uid: Some(1000),
            ..agent()
        };
        let args_ok = json!({"path": "/srv/notes/a/b.txt"});
        let args_bad = json!({"path": "/etc/passwd"});
        let args_dotdot = json!({"path": "/srv/notes/../../etc/passwd"});
        table!(
            p,
            (
                a,
                "notes",
                Call::tool("read_note", None),
                true,
                "allow_tools \"read_*\""
            ),
            (
                a,
                "notes",
                Call::tool("search", None),
                true,
                "allow_tools \"search\""
            ),
            (
                a,
                "notes",
                Call::tool("get_page", None),
                true,
                "^(get|list)_[a-z_]+$"
            ),
            (
                a,
                "notes",
                Call::tool("get_Page", None),
                false,
                "no role allows tool"
            ),
            (
                a,
                "notes",
                Call::tool("searchx", None),
                false,
                "no role allows tool"
            ),
            (
                a,
                "notes",
                Call::tool("delete_note", None),
                false,
                "deny_tools \"delete_*\""
            ),
            // deny wins even though read_* allows it
            (
                a,
                "notes",
                Call::tool("read_secrets", None),
                false,
                "deny_tools \"read_secrets\""
            ),
            (
                a,
                "wiki-en",
                Call::tool("read_page", None),
                true,
                "allow_tools"
            ),
            (
                a,
                "admin",
                Call::tool("read_page", None),
                false,
                "grants server \"admin\""
            ),
            (
                a,
                "notes",
                Call::method("initialize"),
                true,
                "always allowed"
            ),
            (
                a,
                "notes",
                Call::method("tools/list"),
                true,
                "always allowed"
            ),
            (
                a,
                "notes",
                Call::method("notifications/initialized"),
                true,
                "always allowed"
            ),
            (
                a,
                "notes",
                Call::method("subscriptions/listen"),
                true,
                "always allowed"
            ),
            (
                a,
                "notes",
                Call::method("resources/read"),
                true,
                "allow_methods \"resources/read\""
            ),
            (
                a,
                "notes",
                Call::method("prompts/get"),
                true,
                "allow_methods \"prompts/*\""
            ),
            (
                a,
                "notes",
                Call::method("completion/complete"),
                false,
                "no role allows method"
            ),
            (
                a,
                "notes",
                Call::method("tools/call_extra"),
                false,
                "no role allows method"
            ),
            (
                a,
                "notes",
                Call::tool("read_file", Some(&args_ok)),
                true,
                "allow_tools"
            ),
            (
                a,
                "notes",
                Call::tool("read_file", Some(&args_bad)),
                false,
                "matches no allowed pattern"
            ),
            (
                a,
                "notes",
                Call::tool("read_file", Some(&args_dotdot)),
                false,
                "'..' segment"
            ),
            (
                a,
                "notes",
                Call::tool("read_file", None),
                false,
                "argument missing"
            ),
            (
                a,
                "notes",
                Call::tool("read_\u{200b}note", None),
                false,
                "characters outside"
            ),
            (
                a,
                "notes",
                Call::tool("read_nоte", None),
                false,
                "characters outside"
            ), // Cyrillic о
            (
                stranger,
                "notes",
                Call::tool("read_note", None),
                false,
                "no binding matches"
            ),
            (
                ops,
                "admin",
                Call::tool("anything", None),
                true,
                "role admin"
            ),
            (
                ops,
                "notes",
                Call::tool("delete_note", None),
                true,
                "role admin"
            ),
        );
    }

    #[test]
    fn refused_argument_values_are_never_quoted_in_the_rule() {
        // The rule goes to the audit log as is; the arguments go there redacted.
        let p = policy(
            r#"
            [[role]]
            name = "fenced"
            servers = ["notes"]
            allow_tools = ["login"]
            [[role.tool_args]]
            tool = "login"
            pointer = "/password"
            allow = ["guest-*"]

            [[binding]]
            role = "fenced"
            uid = [1000]
            "#,
        );
        for args in [
            json!({"password": "hunter2"}),
            json!({"password": {"token": "hunter2"}}),
            json!({"password": "../hunter2"}),
        ] {
            let d = p.check(&agent(), "notes", &Call::tool("login", Some(&args)));
            assert!(!d.allow, "{args}");
            assert!(!d.rule.contains("hunter2"), "{}", d.rule);
        }
    }

    #[test]
    fn denials_hold_whatever_the_case_and_spelling_a_server_may_read() {
        let p = policy(
            r#"
            [[role]]
            name = "wide"
            servers = ["notes"]
            allow_tools = ["*"]
            deny_tools = ["delete_*", "drop_table", "^rm_.*$"]
            [[role.tool_args]]
            tool = "read_file"
            pointer = "/file_path"
            allow = ["/srv/notes/**"]
            [[role.tool_args]]
            tool = "fetch"
            pointer = "/req/url"
            allow = ["https://intranet/docs/**"]
            [[binding]]
            role = "wide"
            cgroup = "/agents/**"
            "#,
        );
        let who = agent();
        let call = |tool: &str, args: Value| p.check(&who, "notes", &Call::tool(tool, Some(&args)));
        // A server that looks tools up in any case runs `delete_file` for `DELETE_file`.
        for tool in ["DELETE_file", "Delete_File", "DROP_TABLE", "RM_x"] {
            let d = call(tool, json!({}));
            assert!(!d.allow && d.rule.contains("deny_tools"), "{tool}: {d:?}");
        }
        assert!(call("search", json!({})).allow);
        // The constraint on read_file holds for READ_FILE too.
        let d = call("READ_FILE", json!({"file_path": "/etc/passwd"}));
        assert!(!d.allow && d.rule.contains("tool_args"), "{d:?}");
        assert!(call("read_file", json!({"file_path": "/srv/notes/100%.txt"})).allow);
        // Traversal however a server may read it.
        for path in [
            "/srv/notes/../../etc/passwd",
            "/srv/notes/%2e%2e/%2E%2E/etc/passwd",
            "/srv/notes/.%2e/x",
            "/srv/notes/%252e%252e/x",
            "/srv/notes/..\\x",
            "/srv/notes/..;/x",
            "/srv/notes/a\u{0}",
            "/srv/notes/a%00",
            "/srv/notes/a%2F..%2Fb",
            "/srv/notes//etc/passwd",
            "/srv/notes/..\n",
            "/srv/notes/.\t./.\r./etc",
        ] {
            let d = call("read_file", json!({"file_path": path}));
            assert!(
                !d.allow && d.rule.contains("the value has"),
                "{path}: {d:?}"
            );
        }
        for url in [
            "https://intranet/docs/%2e%2e/admin",
            "https://intranet/docs/..;/admin",
            "https://intranet/docs/x?p=..%2Fsecret",
            "https://intranet/docs/.\t./admin",
            "https://intranet/docs//admin",
        ] {
            let d = call("fetch", json!({"req": {"url": url}}));
            assert!(!d.allow, "{url}: {d:?}");
        }
        // Text that is no path: whitespace controls, a lone percent, a dot-dot inside a name.
        assert!(
            call(
                "fetch",
                json!({"req": {"url": "https://intranet/docs/a?q=1%25"}})
            )
            .allow
        );
        // An encoded separator is judged by where it leads once decoded; a query's `//` and
        // encoded URLs are no path.
        for url in [
            "https://intranet/docs/group%2Fproject",
            "https://intranet/docs/a?next=https://other//x",
            "https://intranet/docs/a?redirect_uri=https%3A%2F%2Fother%2Fcb",
        ] {
            assert!(call("fetch", json!({"req": {"url": url}})).allow, "{url}");
        }
        assert!(call("read_file", json!({"file_path": "/srv/notes/a..b\tc"})).allow);
        // A member whose leading underscore makes it another one is no second spelling.
        assert!(
            call(
                "read_file",
                json!({"file_path": "/srv/notes/a", "_file_path": "x"})
            )
            .allow
        );
        // The constrained member spelled another way beside it, at any level.
        for args in [
            json!({"file_path": "/srv/notes/a", "filePath": "/etc/passwd"}),
            json!({"file_path": "/srv/notes/a", "File-Path": "/etc/passwd"}),
        ] {
            let d = call("read_file", args.clone());
            assert!(
                !d.allow && d.rule.contains("another spelling"),
                "{args}: {d:?}"
            );
        }
        let d = call(
            "fetch",
            json!({"req": {"url": "https://intranet/docs/a"}, "Req": {"url": "https://evil"}}),
        );
        assert!(!d.allow && d.rule.contains("another spelling"), "{d:?}");
        assert!(call("fetch", json!({"req": {"url": "https://intranet/docs/a"}})).allow);
    }

    /// A role bounding the resources and prompts it reaches on one server, and one bounding
    /// nothing on another.
    const BOUNDED: &str = r#"
        [[role]]
        name = "reader"
        servers = ["notes"]
        allow_methods = ["resources/read", "resources/subscribe", "prompts/get", "completion/complete"]
        allow_resources = ["file:///srv/notes/**", "file:/srv/notes/**", "notes://public/*"]
        allow_prompts = ["summarize_*"]
        [[role]]
        name = "open"
        servers = ["admin"]
        allow_methods = ["resources/read", "completion/complete"]
        [[binding]]
        role = "reader"
        cgroup = "/agents/**"
        [[binding]]
        role = "open"
        cgroup = "/agents/**"
        "#;

    #[test]
    fn resources_and_prompts_are_bounded_by_the_roles_that_name_them() {
        let p = policy(BOUNDED);
        let who = agent();
        let check = |server: &str, method: &'static str, name: &str| {
            p.check(&who, server, &Call::named(method, name))
        };
        let d = check("notes", "resources/read", "file:///srv/notes/a.txt");
        assert!(
            d.allow && d.rule.contains("allow_resources \"file:///srv/notes/**\""),
            "{d:?}"
        );
        assert!(check("notes", "resources/subscribe", "notes://public/x").allow);
        for uri in [
            "file:///etc/passwd",
            "file:///srv/notes/../../etc/passwd",
            "file:///srv/notes/%2e%2e/x",
            "notes://public/x/y",
            "notes://public/x%2Fy",
            "FILE:///srv/notes/a",
            "postgres://u:secret@db/x",
            // A scheme without an authority: its path's empty segments count as well.
            "file:/srv/notes//etc/passwd",
            "file:/srv/notes/%2Fetc/passwd",
            "file:/srv/notes/\\etc/passwd",
            "file:/srv/notes/a//b",
        ] {
            let d = check("notes", "resources/read", uri);
            assert!(!d.allow, "{uri}: {d:?}");
            // A URI may carry credentials: never in the rule (it is in the redacted `name`).
            assert!(!d.rule.contains(uri) && !d.rule.contains("secret"), "{d:?}");
        }
        assert!(check("notes", "resources/read", "file:/srv/notes/a/b.txt").allow);
        // Free text is no path: a `//` in it is not an empty segment.
        assert!(escapes("see: https://x/y and a//b").is_none());
        assert!(escapes("ratio:1//2").is_none());
        assert!(!check("notes", "prompts/get", "summarize_../../etc/passwd").allow);
        assert!(check("notes", "prompts/get", "summarize_doc").allow);
        assert!(!check("notes", "prompts/get", "delete_all").allow);
        // A role without bounds allows any URI on the servers it grants.
        assert!(check("admin", "resources/read", "file:///etc/passwd").allow);
        // Listings show what may be read.
        let grant = p.grant(&who, "notes");
        assert!(p.shows_granted(&grant, "notes", "resources/list", "file:///srv/notes/x"));
        assert!(!p.shows_granted(&grant, "notes", "resources/list", "file:///etc/x"));
        assert!(p.shows_granted(&grant, "notes", "prompts/list", "summarize_x"));
        assert!(!p.shows_granted(&grant, "notes", "prompts/list", "delete_all"));
    }

    #[test]
    fn a_completion_is_bounded_as_what_it_completes_for() {
        let p = policy(BOUNDED);
        let who = agent();
        let complete = |server: &str, reference: Option<Reference>, name: Option<&str>| {
            p.check(
                &who,
                server,
                &Call {
                    method: "completion/complete",
                    name,
                    arguments: None,
                    reference,
                },
            )
        };
        let prompt = Some(Reference::Prompt);
        let resource = Some(Reference::Resource);
        let d = complete("notes", prompt, Some("summarize_doc"));
        assert!(
            d.allow && d.rule.contains("allow_prompts \"summarize_*\""),
            "{d:?}"
        );
        let d = complete("notes", prompt, Some("delete_all"));
        assert!(!d.allow && d.rule.contains("prompt on server"), "{d:?}");
        assert!(complete("notes", resource, Some("notes://public/{name}")).allow);
        let d = complete("notes", resource, Some("file:///{path}"));
        assert!(
            !d.allow && d.rule.contains("resource template") && !d.rule.contains("file:"),
            "{d:?}"
        );
        assert!(!complete("notes", resource, Some("notes://public/../{name}")).allow);
        // A reserved or path expansion may span segments: not within `*`.
        for template in [
            "notes://public/{+path}",
            "notes://public{/a,b}",
            "notes://public/{#f}",
        ] {
            assert!(
                !complete("notes", resource, Some(template)).allow,
                "{template}"
            );
        }
        assert!(complete("notes", resource, Some("notes://public/{name}{?q}")).allow);
        assert_eq!(
            template_probe("a/{+p}/{x}{.e}{;m}{&q}"),
            "a/x/x/x.x;x=x&x=x"
        );
        assert_eq!(template_probe("a/{unclosed"), "a/{unclosed");
        // A reference of a kind the proxy does not know, or none, names nothing it can judge.
        for (reference, name) in [(Some(Reference::Other), Some("x")), (None, None)] {
            let d = complete("notes", reference, name);
            assert!(!d.allow && d.rule.contains("completion reference"), "{d:?}");
        }
        // A role without bounds completes for anything on the servers it grants.
        assert!(complete("admin", prompt, Some("delete_all")).allow);
        assert!(complete("admin", Some(Reference::Other), None).allow);
    }

    #[test]
    fn every_reading_of_a_value_is_judged_but_only_new_separators_need_a_pattern() {
        let p = policy(
            r#"
            [[role]]
            name = "r"
            servers = ["notes"]
            allow_tools = ["*"]
            allow_methods = ["resources/read"]
            allow_resources = ["file:///srv/My%20Notes/a.md", "https://intranet/*/readme"]
            [[role.tool_args]]
            tool = "fetch"
            pointer = "/url"
            allow = ["https://intranet/docs/**", "https://intranet/*/readme"]
            [[role.tool_args]]
            tool = "run_sql"
            pointer = "/query"
            allow = ["^SELECT .*$"]
            [[binding]]
            role = "r"
            cgroup = "/agents/**"
            "#,
        );
        let who = agent();
        let call = |tool: &str, args: Value| p.check(&who, "notes", &Call::tool(tool, Some(&args)));
        let read = |uri: &str| p.check(&who, "notes", &Call::named("resources/read", uri));
        // A tab that decoding makes is dropped by a URL parser too.
        let d = call("fetch", json!({"url": "https://intranet/docs/.%09./admin"}));
        assert!(!d.allow && d.rule.contains("'..'"), "{d:?}");
        // A backslash is a separator to a URL parser: one segment more than `*` allows.
        let d = call(
            "fetch",
            json!({"url": "https://intranet/admin\\secret/readme"}),
        );
        assert!(!d.allow && d.rule.contains("decoded form"), "{d:?}");
        assert!(read("https://intranet/docs/readme").allow);
        assert!(!read("https://intranet/a\\b/readme").allow);
        assert!(!read("https://intranet/a%5Cb/readme").allow);
        // Decoding that adds no separator needs no pattern of its own.
        assert!(read("file:///srv/My%20Notes/a.md").allow);
        // Free text is no path: `//` in it is no empty segment.
        assert!(call("run_sql", json!({"query": "SELECT 1 -- see https://x//y"})).allow);
    }

    #[test]
    fn deny_rules_that_cannot_apply_are_warned_about() {
        let p = policy(
            r#"
            [[role]]
            name = "overlay"
            deny_tools = ["delete_*"]
            [[role]]
            name = "misspelt"
            servers = ["Notes*", "^wikis$", "wiki-*"]
            deny_tools = ["delete_*"]
            [[role]]
            name = "reader"
            servers = ["notes"]
            allow_tools = ["read_file"]
            allow_methods = ["resources/read"]
            [[role.tool_args]]
            tool = "read_file"
            pointer = "/path"
            allow = ["/srv/notes/**"]
            [[binding]]
            role = "reader"
            cgroup = "/agents/**"
            "#,
        );
        let w = p.warnings();
        assert!(
            w.iter()
                .any(|w| w.contains("role overlay has deny_tools or tool_args but no servers")),
            "{w:?}"
        );
        assert!(
            w.iter()
                .any(|w| w.contains("role reader constrains tool arguments")
                    && w.contains("resources/read")),
            "{w:?}"
        );
        let p = policy(
            r#"
            [[role]]
            name = "r"
            servers = ["notes"]
            [[binding]]
            role = "r"
            uid = []
            comm = ["a-very-long-agent-name"]
            cgroup = "/agents/"
            "#,
        );
        let never: Vec<String> = p
            .warnings()
            .into_iter()
            .filter(|w| w.contains("never matches"))
            .collect();
        assert_eq!(never.len(), 3, "{never:?}");
        assert!(
            never[0].contains("binding[0].uid is an empty list"),
            "{never:?}"
        );
        assert!(
            never[1].contains("comm[0]") && never[1].contains("15 bytes"),
            "{never:?}"
        );
        assert!(never[2].contains("cgroup[0] \"/agents/\""), "{never:?}");
        let unmatched: Vec<_> = w
            .iter()
            .filter(|w| w.contains("matches no configured server"))
            .collect();
        assert_eq!(unmatched.len(), 2, "{w:?}");
        assert!(unmatched[0].contains("role misspelt: servers[0] \"Notes*\""));
        assert!(unmatched[1].contains("servers[1] \"^wikis$\""));
    }

    #[test]
    fn argument_constraints_of_every_granting_role_apply_and_only_theirs() {
        let p = policy(
            r#"
            [[role]]
            name = "open"
            servers = ["notes"]
            allow_tools = ["read_file"]

            [[role]]
            name = "fenced"
            servers = ["notes"]
            allow_tools = ["read_*"]
            [[role.tool_args]]
            tool = "read_file"
            pointer = "/path"
            allow = ["/srv/**"]

            [[role]]
            name = "elsewhere"
            servers = ["admin"]
            allow_tools = ["*"]
            [[role.tool_args]]
            tool = "*"
            pointer = "/path"
            allow = ["/nowhere"]

            [[binding]]
            role = "open"
            uid = [1000]
            [[binding]]
            role = "fenced"
            uid = [1000]
            [[binding]]
            role = "elsewhere"
            uid = [1000]
        "#,
        );
        let a = agent();
        let grant = p.grant(&a, "notes");
        let call = |path: &str| {
            let args = json!({ "path": path });
            p.check_granted(&grant, "notes", &Call::tool("read_file", Some(&args)))
        };
        let inside = call("/srv/a.txt");
        assert!(inside.allow, "{inside:?}");
        assert_eq!(inside.roles, vec!["open".to_owned(), "fenced".to_owned()]);
        assert_eq!(inside.rule, "role open: allow_tools \"read_file\"");
        // "open" alone would allow it; "fenced" also grants the call, so its constraint holds.
        let outside = call("/etc/passwd");
        assert!(!outside.allow, "{outside:?}");
        assert!(
            outside.rule.contains("role fenced: tool_args"),
            "{outside:?}"
        );
        // "elsewhere" is bound but does not grant this server: its constraint is not applied
        // (it would refuse /srv/a.txt), and on its own server it is.
        let admin = p.grant(&a, "admin");
        let d = p.check_granted(
            &admin,
            "admin",
            &Call::tool("read_file", Some(&json!({ "path": "/srv/a.txt" }))),
        );
        assert!(
            !d.allow && d.rule.contains("role elsewhere: tool_args"),
            "{d:?}"
        );
    }

    #[test]
    fn regex_patterns_match_the_whole_name() {
        for half in ["^delete_.*", "^delete_", "delete_.*$", "^", "$"] {
            let e = Pattern::new(half, false).unwrap_err();
            assert!(e.contains("not anchored at both ends"), "{half}: {e}");
        }
        let p = Pattern::new("^get_note|list_notes$", false).unwrap();
        assert!(p.matches("get_note") && p.matches("list_notes"));
        assert!(!p.matches("get_note_and_wipe"));
        assert!(!p.matches("x_list_notes"));
        let g = Pattern::new("/srv/notes/*", true).unwrap();
        assert!(g.matches("/srv/notes/a") && !g.matches("/srv/notes/a/b")); // A broken regex is reported as written, not as the proxy wraps it.
        let e = Pattern::new("^(foo$", false).unwrap_err();
        assert!(e.contains("invalid regex") && !e.contains("(?:"), "{e}");
        assert!(
            Pattern::new("^a)|(b$", false).is_err(),
            "unbalanced as written"
        );
    }

    #[test]
    fn every_selector_of_a_binding_must_match() {
        let p = policy(ISSUE_EXAMPLE);
        let wrong_uid = Subject {
            uid: Some(0),
            ..agent()
        };
        let wrong_exe = Subject {
            exe: Some("/usr/bin/node"),
            ..agent()
        };
        let base = Subject {
            cgroup: Some("/agents"),
            ..agent()
        };
        let call = Call::tool("search", None);
        assert!(!p.check(&wrong_uid, "notes", &call).allow);
        assert!(!p.check(&wrong_exe, "notes", &call).allow);
        // "/agents/**" covers "/agents" itself.
        assert!(p.check(&base, "notes", &call).allow);
    }

    #[test]
    fn patterns_that_can_never_match_are_warned_about() {
        let p = policy(&format!(
            "{ISSUE_EXAMPLE}\n[[binding]]\nrole = \"admin\"\ncgroup = [\"agents/**\", \"/ok/**\", \"**\"]\n\
             exe = \"^usr/bin/.*$\"\n"
        ));
        let w = p.warnings();
        let never: Vec<&String> = w.iter().filter(|w| w.contains("never matches")).collect();
        assert_eq!(never.len(), 2, "{w:?}");
        assert!(
            never[0].contains(".cgroup[0] \"agents/**\"") && never[0].contains("\"/agents/**\""),
            "{w:?}"
        );
        assert!(never[1].contains(".exe[0]"), "{w:?}");
        // A regex starting with any character, or with alternatives, may well match.
        let p = policy(&format!(
            "{ISSUE_EXAMPLE}\n[[binding]]\nrole = \"admin\"\nexe = [\"^.*/python3$\", \"^usr|/usr/bin/x$\"]\n"
        ));
        assert!(
            !p.warnings().iter().any(|w| w.contains("never matches")),
            "{:?}",
            p.warnings()
        );
        let p = policy(&ISSUE_EXAMPLE.replacen(
            "allow_methods = [\"resources/read\"",
            "allow_methods = [\"tools/call\", \"resources/read\"",
            1,
        ));
        assert!(
            p.warnings()
                .iter()
                .any(|w| w.contains("\"tools/call\" has no effect")),
            "{:?}",
            p.warnings()
        );
    }

    #[test]
    fn bindings_select_on_workload_ids() {
        let p = policy(&format!(
            "{ISSUE_EXAMPLE}\n[[binding]]\nrole = \"admin\"\nworkload_id = \"spiffe://example.org/node/*/cgroup/ops/**\"\n"
        ));
        let ops = Subject {
            workload_id: Some("spiffe://example.org/node/n1/cgroup/ops/x/uid/0"),
            ..Default::default()
        };
        assert!(p.check(&ops, "admin", &Call::tool("x", None)).allow);
        let other = Subject {
            workload_id: Some("spiffe://example.org/node/n1/cgroup/agents/uid/0"),
            ..Default::default()
        };
        assert!(!p.check(&other, "admin", &Call::tool("x", None)).allow);
    }

    #[test]
    fn a_cgroup_glob_ending_in_any_depth_binds_the_cgroups_its_base_matches() {
        let p = policy(&format!(
            "{ISSUE_EXAMPLE}\n[[binding]]\nrole = \"admin\"\n\
             cgroup = [\"/teams/{{alpha,beta}}/**\", \"/svc/agent-*/**\", \"^/re/x/\\\\*\\\\*$\"]\n"
        ));
        let bound = |cgroup: &'static str| {
            let s = Subject {
                cgroup: Some(cgroup),
                ..Default::default()
            };
            p.check(&s, "admin", &Call::tool("x", None)).allow
        };
        for cgroup in [
            "/teams/alpha",
            "/teams/beta/x",
            "/svc/agent-7",
            "/svc/agent-7/sub",
        ] {
            assert!(bound(cgroup), "{cgroup}");
        }
        // The base as text is a cgroup name an agent allowed to make cgroups could pick (it
        // was bound); a regex is matched as written.
        for cgroup in ["/teams/{alpha,beta}", "/teams/gamma", "/svc", "/re/x"] {
            assert!(!bound(cgroup), "{cgroup}");
        }
    }

    #[test]
    fn list_filtering_uses_the_same_rules() {
        let p = policy(ISSUE_EXAMPLE);
        let a = agent();
        assert!(p.shows(&a, "notes", "tools/list", "read_file"));
        assert!(!p.shows(&a, "notes", "tools/list", "delete_note"));
        assert!(!p.shows(&a, "notes", "tools/list", "write_note"));
        assert!(p.shows(&a, "notes", "prompts/list", "summary"));
        let shown = policy(&format!(
            "{ISSUE_EXAMPLE}\n[policy]\nshow_denied_tools = true\n"
        ));
        assert!(shown.shows(&a, "notes", "tools/list", "write_note"));
    }

    #[test]
    fn compile_errors_name_the_key() {
        let servers = vec!["notes".to_owned()];
        let role = |servers_: Vec<&str>, tools: Vec<&str>| RawRole {
            name: "r".into(),
            servers: servers_.into_iter().map(Into::into).collect(),
            allow_tools: tools.into_iter().map(Into::into).collect(),
            deny_tools: vec![],
            allow_methods: vec![],
            allow_resources: vec![],
            allow_prompts: vec![],
            tool_args: vec![],
        };
        let opts = RawPolicyOptions::default();
        let e = Policy::compile(&[role(vec!["nope"], vec![])], &[], &opts, &servers).unwrap_err();
        assert_eq!(e.0, "role[0].servers[0]");
        assert!(e.1.contains("unknown server name \"nope\""));
        let e = Policy::compile(&[role(vec!["notes"], vec!["^(bad$"])], &[], &opts, &servers)
            .unwrap_err();
        assert_eq!(e.0, "role[0].allow_tools[0]");
        let b = RawBinding {
            role: "ghost".into(),
            cgroup: None,
            uid: None,
            gid: None,
            exe: None,
            comm: None,
            workload_id: None,
        };
        let e = Policy::compile(&[], &[b], &opts, &servers).unwrap_err();
        assert!(e.1.contains("unknown role \"ghost\""), "{e:?}");
        // A denial no tool name can meet is refused, not kept as a deny that denies nothing.
        let deny = |pattern: &str| {
            let mut r = role(vec!["notes"], vec!["*"]);
            r.deny_tools = vec!["delete_*".into(), pattern.into()];
            Policy::compile(&[r], &[], &opts, &servers)
        };
        for bad in [
            "delete_* ",
            "drop table",
            "d\u{435}lete_all",
            "\"rm\"",
            "x;y",
            "delete_*,drop_*",
            "rm_*]",
            "x!",
            "delete\\*",
            "[ ;]x",
        ] {
            let e = deny(bad).unwrap_err();
            assert_eq!(e.0, "role[0].deny_tools[1]", "{bad}");
            assert!(e.1.contains("can never match a tool name"), "{bad}: {e:?}");
        }
        for fine in [
            "drop_*",
            "{drop,rm}_*",
            "[a-z]?_x",
            "admin/x.y-z",
            "^drop .*$",
            "delete_[^a]*",
            "delete_[!a]*",
            "[_ ]x",
            "[ -~]x",
            "delete\\__*",
        ] {
            assert!(deny(fine).is_ok(), "{fine}");
        }
        let mut r = role(vec!["notes"], vec!["*"]);
        r.tool_args = vec![RawToolArgs {
            tool: "read_file ".into(),
            pointer: "/path".into(),
            allow: vec!["/srv/**".into()],
        }];
        let e = Policy::compile(&[r], &[], &opts, &servers).unwrap_err();
        assert!(
            e.0.ends_with(".tool") && e.1.contains("can never match"),
            "{e:?}"
        );
    }
}
