//! List filtering by shape: any JSON-RPC result carrying a `tools`, `prompts`, `resources` or
//! `resourceTemplates` array is filtered to what the identity may use, and a `tasks` array
//! (`tasks/list`) to the tasks it started, whatever request it answers. Keying on request ids could be dodged (reused ids, replayed streams); the shape
//! cannot.

use serde_json::Value;

use crate::policy::{Grant, Policy, Subject};

/// Result member, the item's name member, and the list method it stands for.
const SHAPES: [(&str, &str, &str); 4] = [
    ("tools", "name", "tools/list"),
    ("prompts", "name", "prompts/list"),
    ("resources", "uri", "resources/list"),
    (
        "resourceTemplates",
        "uriTemplate",
        "resources/templates/list",
    ),
];

/// Filters every list-shaped result in `message` (one JSON-RPC message or a batch); returns how
/// many items were hidden. `own_task` says whether a task id is one the identity started.
pub fn filter(
    policy: &Policy,
    subject: &Subject<'_>,
    server: &str,
    own_task: &dyn Fn(&str) -> bool,
    message: &mut Value,
) -> usize {
    filter_granted(
        policy,
        &policy.grant(subject, server),
        server,
        own_task,
        message,
    )
}

/// [`filter`] with the identity's tier 1 already resolved (see [`Policy::grant`]).
pub fn filter_granted(
    policy: &Policy,
    grant: &Grant,
    server: &str,
    own_task: &dyn Fn(&str) -> bool,
    message: &mut Value,
) -> usize {
    match message {
        Value::Array(items) => items
            .iter_mut()
            .map(|m| filter_granted(policy, grant, server, own_task, m))
            .sum(),
        Value::Object(obj) => {
            // Clients that read keys case-insensitively (the C# SDK; Go's encoding/json) would
            // take a `Result` or `Tools` beside the filtered member, the last one read: such
            // variants are dropped, counted as hidden (the answer is then re-serialised).
            let mut hidden = drop_variants(obj, &["result"]);
            let Some(result) = obj.get_mut("result").and_then(Value::as_object_mut) else {
                return hidden;
            };
            let mut listed = false;
            hidden += drop_variants(result, &SHAPES.map(|(member, _, _)| member));
            hidden += drop_variants(result, &["tasks"]);
            if let Some(items) = result.get_mut("tasks").and_then(Value::as_array_mut) {
                listed = true;
                let before = items.len();
                // What names no task is no task (a vendor's list); what names one (or a
                // variant a case-insensitive reader takes) must be the identity's own.
                items.retain(|item| {
                    let Some(o) = item.as_object() else {
                        return true;
                    };
                    let named = o.keys().any(|k| names_like(k, "taskId"));
                    !named
                        || (!o.keys().any(|k| k != "taskId" && names_like(k, "taskId"))
                            && o.get("taskId")
                                .and_then(Value::as_str)
                                .is_some_and(own_task))
                });
                hidden += before - items.len();
            }
            for (member, key, method) in SHAPES {
                let Some(items) = result.get_mut(member).and_then(Value::as_array_mut) else {
                    continue;
                };
                listed = true;
                let before = items.len();
                items.retain(|item| {
                    // An item with a case variant of its name member is named twice.
                    let twice = item
                        .as_object()
                        .is_some_and(|o| o.keys().any(|k| k != key && same_name(k, key)));
                    !twice
                        && item
                            .get(key)
                            .and_then(Value::as_str)
                            .is_some_and(|name| policy.shows_granted(grant, server, method, name))
                });
                hidden += before - items.len();
            }
            // 2026-07-28 cache hints: a filtered answer is specific to this identity.
            if listed && result.contains_key("cacheScope") {
                result.insert("cacheScope".into(), Value::from("private"));
            }
            hidden
        }
        _ => 0,
    }
}

/// Whether `key` folds to `member` (the case-insensitive readers' view).
fn same_name(key: &str, member: &str) -> bool {
    if key.is_ascii() {
        key.eq_ignore_ascii_case(member)
    } else {
        super::jsonrpc::fold(key) == member.to_ascii_lowercase()
    }
}

/// [`same_name`], or a snake_case or kebab-case spelling of it (`task_id`: the Python SDK's
/// models read field names too).
fn names_like(key: &str, member: &str) -> bool {
    same_name(key, member)
        || (key.contains(['_', '-']) && same_name(&key.replace(['_', '-'], ""), member))
}

/// Removes the members of `obj` that are case variants of one of `members` (not the member
/// itself); returns how many (each at least 1, with the items of a list it held).
fn drop_variants(obj: &mut serde_json::Map<String, Value>, members: &[&str]) -> usize {
    let variants: Vec<String> = obj
        .keys()
        .filter(|k| members.iter().any(|m| k.as_str() != *m && same_name(k, m)))
        .cloned()
        .collect();
    variants
        .iter()
        .filter_map(|k| obj.remove(k))
        .map(|v| v.as_array().map_or(1, |a| a.len().max(1)))
        .sum()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::policy::{RawBinding, RawPolicyOptions, RawRole};

    #[test]
    fn filters_by_shape_in_batches_and_marks_cache_private() {
        let role = RawRole {
            name: "r".into(),
            servers: vec!["s".into()],
            allow_tools: vec!["read_*".into()],
            deny_tools: vec![],
            allow_methods: vec![],
            allow_resources: vec![],
            allow_prompts: vec![],
            tool_args: vec![],
        };
        let binding = RawBinding {
            role: "r".into(),
            cgroup: None,
            uid: Some(crate::policy::Ids::Many(vec![7])),
            gid: None,
            exe: None,
            comm: None,
            workload_id: None,
        };
        let policy = Policy::compile(
            &[role],
            &[binding],
            &RawPolicyOptions::default(),
            &["s".into()],
        )
        .unwrap();
        let subject = Subject {
            uid: Some(7),
            ..Default::default()
        };
        let mut batch = json!([
            {"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"read_a"},{"name":"delete"},{"nameless":1}],"cacheScope":"public"}},
            {"jsonrpc":"2.0","id":1,"result":{"content":[]}}
        ]);
        assert_eq!(filter(&policy, &subject, "s", &|_| true, &mut batch), 2);
        assert_eq!(batch[0]["result"]["tools"], json!([{"name":"read_a"}]));
        assert_eq!(batch[0]["result"]["cacheScope"], "private");
        assert_eq!(batch[1]["result"], json!({"content":[]}));
        // Case variants a case-insensitive client would read (the last one) are dropped.
        let mut sly = json!({"jsonrpc":"2.0","id":2,"Result":{"tools":[{"name":"delete"}]},"result":{
            "tools":[{"name":"read_a"},{"name":"read_b","Name":"delete"}],
            "Tools":[{"name":"delete"}],"toolſ":[]}});
        assert_eq!(filter(&policy, &subject, "s", &|_| true, &mut sly), 4);
        assert_eq!(
            sly,
            json!({"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"read_a"}]}})
        );
        // structuredContent and other members are left alone.
        let mut data =
            json!({"jsonrpc":"2.0","id":3,"result":{"structuredContent":{"ID":1,"id":2}}});
        assert_eq!(filter(&policy, &subject, "s", &|_| true, &mut data), 0);
        // tasks/list: only the identity's own tasks (a variant of taskId names one twice).
        let mut tasks = json!({"jsonrpc":"2.0","id":4,"result":{"tasks":[
            {"taskId":"mine","status":"working"},{"taskId":"theirs"},{"status":"x"},
            {"taskId":"mine","TaskId":"theirs"},{"TASKID":"theirs"},{"taskId":7},
            {"task_id":"theirs"}],"Tasks":[]}});
        let mine = |id: &str| id == "mine";
        assert_eq!(filter(&policy, &subject, "s", &mine, &mut tasks), 6);
        assert_eq!(
            tasks["result"],
            json!({"tasks":[{"taskId":"mine","status":"working"},{"status":"x"}]})
        );
    }
}
