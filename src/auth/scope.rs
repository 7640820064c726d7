//! The Docker token scope grammar (`repository:team/app:pull,push`, `registry:catalog:*`) and
//! the `access` entries of a token, which use the same three parts. Resource names may carry
//! `host:port`, so the type is split off at the first `:` and the actions at the last one.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One resource scope, as asked for in a token request or granted in a token's `access` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    /// `repository` or `registry` (a `(class)` suffix, deprecated by the spec, is dropped).
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

/// Why a scope string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed scope {scope:?}: {why}")]
pub struct ScopeError {
    pub scope: String,
    pub why: &'static str,
}

/// The longest scope entry accepted; real ones are a repository name (≤ 255) plus a few words.
const MAX_ENTRY: usize = 1024;

impl Access {
    pub fn new(kind: &str, name: &str, actions: &[&str]) -> Self {
        Self {
            kind: kind.into(),
            name: name.into(),
            actions: actions.iter().map(|a| (*a).to_string()).collect(),
        }
    }

    /// Parses one entry: `type[(class)]:name:action[,action...]`.
    pub fn parse(entry: &str) -> Result<Self, ScopeError> {
        let err = |why| ScopeError {
            scope: entry.chars().take(100).collect(),
            why,
        };
        if entry.len() > MAX_ENTRY {
            return Err(err("longer than 1024 bytes"));
        }
        let (kind, rest) = entry
            .split_once(':')
            .ok_or_else(|| err("expected type:name:actions"))?;
        let (name, actions) = rest
            .rsplit_once(':')
            .ok_or_else(|| err("expected type:name:actions"))?;
        let kind = match kind.split_once('(') {
            Some((k, class)) if class.ends_with(')') => k,
            Some(_) => return Err(err("unbalanced resource class")),
            None => kind,
        };
        let word = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !word(kind) {
            return Err(err("resource type must be a word"));
        }
        if name.is_empty()
            || name
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(err("resource name is empty or has spaces"));
        }
        let actions: Vec<String> = actions
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect();
        if actions.iter().any(|a| a != "*" && !word(a)) {
            return Err(err("actions must be words or *"));
        }
        Ok(Self {
            kind: kind.into(),
            name: name.into(),
            actions,
        })
    }

    pub fn allows(&self, action: &str) -> bool {
        self.actions.iter().any(|a| a == action || a == "*")
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.kind, self.name, self.actions.join(","))
    }
}

/// Parses every `scope` value of a request (each may hold several space-separated entries).
pub fn parse_all<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<Vec<Access>, ScopeError> {
    let mut out = Vec::new();
    for value in values {
        for entry in value.split(' ').filter(|e| !e.is_empty()) {
            out.push(Access::parse(entry)?);
            if out.len() > 64 {
                return Err(ScopeError {
                    scope: entry.chars().take(100).collect(),
                    why: "more than 64 scope entries",
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar() {
        let a = Access::parse("repository:team/app:pull,push").unwrap();
        assert_eq!(a, Access::new("repository", "team/app", &["pull", "push"]));
        assert_eq!(a.to_string(), "repository:team/app:pull,push");
        let h = Access::parse("repository:localhost:5000/team/app:pull").unwrap();
        assert_eq!(h.name, "localhost:5000/team/app");
        assert_eq!(h.actions, ["pull"]);
        let p = Access::parse("repository(plugin):x/y:pull").unwrap();
        assert_eq!(p.kind, "repository");
        let c = Access::parse("registry:catalog:*").unwrap();
        assert!(c.allows("anything"));
        assert!(Access::parse("repository:x:").unwrap().actions.is_empty());
        for bad in [
            "",
            "repository",
            "repository:x",
            ":x:pull",
            "repo(x:y:pull",
            "repository:x:pu ll",
            "repository::pull",
            "repo sitory:x:pull",
        ] {
            assert!(Access::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Access::parse(&format!("repository:{}:pull", "a".repeat(2000))).is_err());
        let all = parse_all(["repository:a:pull repository:b:push", "registry:catalog:*"]).unwrap();
        assert_eq!(all.len(), 3);
        assert!(parse_all([" ".repeat(10).as_str()]).unwrap().is_empty());
    }
}
