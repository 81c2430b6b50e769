//! MCP tasks started through the proxy, and whose they are.
//!
//! A `tools/call` may be answered with a task (2025-11-25: `result.task.taskId`; the tasks
//! extension, SEP-2663: `result.resultType` `"task"` and `result.taskId`) whose outcome the agent
//! fetches later by its id (`tasks/get`, `tasks/result`, `tasks/update`, `tasks/cancel`, any
//! `tasks/…` but `tasks/list`; `subscriptions/listen` with `notifications.taskIds`). The id
//! alone names the task upstream, and a server binds tasks at best to the caller it sees (the
//! workload's certificate, or nobody on plain HTTP): other cgroups sharing an upstream
//! without `[ca]` would reach each other's tasks, and so the result of a tool one of them may
//! not call. So the proxy remembers which workload (uid, gid, cgroup: as sessions are bound)
//! started which task with which tool, and lets a caller name a task only if its workload
//! started it and a role of the caller allows the tool (two processes of one workload with
//! roles narrowed by `exe` still differ there); `tasks/list` answers and task notifications
//! are filtered to the caller's own tasks. A task it did not see start (another node, before a
//! restart), or whose id two workloads were answered with, is refused: fail closed.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::session::Owner;
use crate::bpf::lock;

/// Whether `method` names a task by `params.taskId`: every `tasks/…` method but `tasks/list`
/// (`tasks/get`, `tasks/result`, `tasks/update`, `tasks/cancel`, and any later one, which
/// then needs a `taskId` too: fail closed).
pub fn names_task(method: &str) -> bool {
    method.starts_with("tasks/") && method != "tasks/list"
}

/// Most tasks remembered in all; beyond, an identity's oldest make room for its new ones,
/// and one with none is not remembered (its task cannot be named: refused, fail closed).
#[cfg(not(test))]
const MAX_TASKS: usize = 65_536;
#[cfg(test)]
const MAX_TASKS: usize = 4;
/// Most tasks remembered per identity: its oldest go first (its own churn ages out only its
/// own tasks).
#[cfg(not(test))]
const MAX_PER_OWNER: usize = 1_024;
#[cfg(test)]
const MAX_PER_OWNER: usize = 3;
/// How long a task is remembered at most (a task's own `ttl` when shorter; unlimited and
/// absent ones count as this).
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest task id remembered (ids are the server's; a longer one is not remembered).
const MAX_ID_BYTES: usize = 256;

/// A task: who started it, with which tool, until when it is remembered.
struct Task {
    owner: Owner,
    tool: String,
    expires: Instant,
    /// Another workload (or the same with another tool) was answered with this id too: it is
    /// no one's.
    contested: bool,
}

/// The tasks seen starting, by upstream scope and task id.
#[derive(Default)]
pub struct Tasks {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<(usize, String), Task>,
    /// Each identity's tasks, oldest first.
    of_owner: HashMap<Owner, VecDeque<(usize, String)>>,
}

/// What a request naming a task finds.
#[derive(Debug, PartialEq, Eq)]
pub enum TaskUse {
    /// The caller's own task, started with this tool.
    Own(String),
    /// Another identity's, or contested (two were answered with its id).
    Foreign,
    /// Not seen starting (or forgotten: expired, or aged out for room).
    Unknown,
}

/// The task a `tools/call` result starts: its id and how long the server keeps it (ms), in
/// either wire form.
pub fn started(result: &Value) -> Option<(&str, Option<u64>)> {
    if let Some(task) = result.get("task").filter(|t| t.is_object()) {
        let id = task.get("taskId")?.as_str()?;
        return Some((id, task.get("ttl").and_then(Value::as_u64)));
    }
    if result.get("resultType").and_then(Value::as_str) == Some("task") {
        let id = result.get("taskId")?.as_str()?;
        return Some((id, result.get("ttlMs").and_then(Value::as_u64)));
    }
    None
}

impl Tasks {
    /// Remembers that `owner` started task `id` on upstream `scope` with `tool`. Returns
    /// whether it is remembered (not when the id is empty or too long).
    pub fn started(
        &self,
        scope: usize,
        id: &str,
        owner: &Owner,
        tool: &str,
        ttl_ms: Option<u64>,
    ) -> bool {
        if id.is_empty() || id.len() > MAX_ID_BYTES {
            return false;
        }
        let now = Instant::now();
        let life = ttl_ms.map_or(MAX_TTL, |ms| Duration::from_millis(ms).min(MAX_TTL));
        let key = (scope, id.to_owned());
        let mut inner = lock(&self.inner);
        if let Some(t) = inner.map.get_mut(&key)
            && t.expires > now
        {
            // The same id again: the same answer relayed twice changes nothing; another
            // workload's, or another tool's, makes it no one's (a server numbering tasks per
            // backend, an answer recorded for two requests): never handed over.
            if t.owner != *owner || t.tool != tool {
                t.contested = true;
            }
            return true;
        }
        inner.forget(&key);
        let own = inner.of_owner.get(owner).map_or(0, VecDeque::len);
        if own >= MAX_PER_OWNER {
            inner.forget_oldest_of(owner);
        } else if inner.map.len() >= MAX_TASKS {
            inner.map.retain(|_, t| t.expires > now);
            let Inner { map, of_owner } = &mut *inner;
            for keys in of_owner.values_mut() {
                keys.retain(|k| map.contains_key(k));
            }
            of_owner.retain(|_, keys| !keys.is_empty());
            if inner.map.len() >= MAX_TASKS {
                // The caller's own oldest, else the oldest of whoever holds the most.
                let victim = if own > 0 {
                    Some(owner.clone())
                } else {
                    inner
                        .of_owner
                        .iter()
                        .max_by_key(|(_, keys)| keys.len())
                        .map(|(o, _)| o.clone())
                };
                if let Some(victim) = victim {
                    inner.forget_oldest_of(&victim);
                }
            }
        }
        inner.map.insert(
            key.clone(),
            Task {
                owner: owner.clone(),
                tool: tool.to_owned(),
                expires: now + life,
                contested: false,
            },
        );
        inner
            .of_owner
            .entry(owner.clone())
            .or_default()
            .push_back(key);
        true
    }

    /// Whose task `id` on upstream `scope` is, for `caller`.
    pub fn check(&self, scope: usize, id: &str, caller: &Owner) -> TaskUse {
        let inner = lock(&self.inner);
        match inner.map.get(&(scope, id.to_owned())) {
            Some(t) if t.expires <= Instant::now() => TaskUse::Unknown,
            Some(t) if &t.owner == caller && !t.contested => TaskUse::Own(t.tool.clone()),
            Some(_) => TaskUse::Foreign,
            None => TaskUse::Unknown,
        }
    }

    /// The tool that started task `id` on upstream `scope`, if remembered (for the audit).
    pub fn tool(&self, scope: usize, id: &str) -> Option<String> {
        lock(&self.inner)
            .map
            .get(&(scope, id.to_owned()))
            .map(|t| t.tool.clone())
    }

    /// How many tasks are remembered (for status).
    pub fn count(&self) -> usize {
        lock(&self.inner).map.len()
    }
}

impl Inner {
    fn forget(&mut self, key: &(usize, String)) {
        if let Some(t) = self.map.remove(key)
            && let Some(keys) = self.of_owner.get_mut(&t.owner)
        {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.of_owner.remove(&t.owner);
            }
        }
    }

    fn forget_oldest_of(&mut self, owner: &Owner) {
        let oldest = self.of_owner.get_mut(owner).and_then(VecDeque::pop_front);
        if let Some(key) = oldest {
            self.forget(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn owner(uid: u32, exe: &str) -> Owner {
        Owner {
            uid,
            gid: uid,
            cgroup_id: 7,
            exe: Some(exe.to_owned()),
        }
    }

    #[test]
    fn both_wire_forms_of_a_started_task_are_read() {
        let old = json!({"task": {"taskId": "t1", "status": "working", "ttl": 60000}});
        assert_eq!(started(&old), Some(("t1", Some(60000))));
        let sep = json!({"resultType": "task", "taskId": "t2", "status": "working", "ttlMs": null});
        assert_eq!(started(&sep), Some(("t2", None)));
        // A tasks/get answer (resultType complete) or an ordinary result starts nothing.
        assert_eq!(
            started(&json!({"resultType": "complete", "taskId": "t2"})),
            None
        );
        assert_eq!(started(&json!({"content": []})), None);
    }

    #[test]
    fn only_the_identity_that_started_a_task_may_name_it() {
        let tasks = Tasks::default();
        let (a, b) = (owner(1, "/bin/agent"), owner(2, "/bin/agent"));
        assert!(tasks.started(0, "t1", &a, "export", None));
        assert_eq!(tasks.check(0, "t1", &a), TaskUse::Own("export".into()));
        assert_eq!(tasks.check(0, "t1", &b), TaskUse::Foreign);
        // Another upstream's task of the same id is another task.
        assert_eq!(tasks.check(1, "t1", &a), TaskUse::Unknown);
        assert_eq!(tasks.check(0, "t9", &a), TaskUse::Unknown);
        assert!(!tasks.started(0, &"x".repeat(300), &a, "export", None));
        // Expired: forgotten.
        assert!(tasks.started(0, "t2", &a, "export", Some(0)));
        assert_eq!(tasks.check(0, "t2", &a), TaskUse::Unknown);
        // The same answer again changes nothing; another workload answered with the id makes
        // it no one's, its starter's included.
        assert!(tasks.started(0, "t1", &a, "export", None));
        assert_eq!(tasks.check(0, "t1", &a), TaskUse::Own("export".into()));
        assert!(tasks.started(0, "t1", &b, "search", None));
        assert_eq!(tasks.check(0, "t1", &a), TaskUse::Foreign);
        assert_eq!(tasks.check(0, "t1", &b), TaskUse::Foreign);
        assert!(names_task("tasks/get") && names_task("tasks/delete"));
        assert!(!names_task("tasks/list") && !names_task("tools/call"));
    }

    #[test]
    fn an_identity_churning_tasks_ages_out_only_its_own() {
        let tasks = Tasks::default();
        let (a, b) = (owner(1, "/a"), owner(2, "/b"));
        assert!(tasks.started(0, "b1", &b, "t", None));
        for i in 0..10 {
            assert!(tasks.started(0, &format!("a{i}"), &a, "t", None));
        }
        assert_eq!(tasks.check(0, "b1", &b), TaskUse::Own("t".into()));
        assert_eq!(tasks.check(0, "a9", &a), TaskUse::Own("t".into()));
        assert_eq!(tasks.check(0, "a0", &a), TaskUse::Unknown);
        assert_eq!(tasks.count(), 1 + MAX_PER_OWNER);
        // Full of others' tasks: a newcomer's takes the place of the oldest of whoever
        // holds the most.
        let c = owner(3, "/c");
        assert!(tasks.started(0, "c1", &c, "t", None));
        assert_eq!(tasks.check(0, "c1", &c), TaskUse::Own("t".into()));
        assert_eq!(tasks.check(0, "a7", &a), TaskUse::Unknown);
        assert_eq!(tasks.check(0, "b1", &b), TaskUse::Own("t".into()));
    }
}
