//! List filtering by shape: any JSON-RPC result carrying a `tools`, `prompts`, `resources` or
//! `resourceTemplates` array is filtered to what the identity may use, whatever request it
//! answers. Keying on request ids could be dodged (reused ids, replayed streams); the shape
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
/// many items were hidden.
pub fn filter(policy: &Policy, subject: &Subject<'_>, server: &str, message: &mut Value) -> usize {
    filter_granted(policy, &policy.grant(subject, server), server, message)
}

/// [`filter`] with the identity's tier 1 already resolved (see [`Policy::grant`]).
pub fn filter_granted(policy: &Policy, grant: &Grant, server: &str, message: &mut Value) -> usize {
    match message {
        Value::Array(items) => items
            .iter_mut()
            .map(|m| filter_granted(policy, grant, server, m))
            .sum(),
        Value::Object(obj) => {
            let Some(result) = obj.get_mut("result").and_then(Value::as_object_mut) else {
                return 0;
            };
            let mut hidden = 0;
            let mut listed = false;
            for (member, key, method) in SHAPES {
                let Some(items) = result.get_mut(member).and_then(Value::as_array_mut) else {
                    continue;
                };
                listed = true;
                let before = items.len();
                items.retain(|item| {
                    item.get(key)
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
        assert_eq!(filter(&policy, &subject, "s", &mut batch), 2);
        assert_eq!(batch[0]["result"]["tools"], json!([{"name":"read_a"}]));
        assert_eq!(batch[0]["result"]["cacheScope"], "private");
        assert_eq!(batch[1]["result"], json!({"content":[]}));
    }
}
