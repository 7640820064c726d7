//! Who may do what. A repository under a declared project is private: its project's policy
//! decides. Anything else is a mirror namespace: pull is allowed, push and delete never.
//! Anonymous access to a project applies only to clients in its `anonymous_from` networks
//! (loopback by default), so binding to a public address never opens a registry by accident.

use std::net::IpAddr;

use crate::config::{AnonymousAccess, Config, ProjectConfig};
use crate::oci::{ErrorCode, RegistryError, RepoName};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pull => "pull",
            Self::Push => "push",
            Self::Delete => "delete",
        }
    }
}

/// What a caller may do, decided per request.
pub struct Authorizer {
    projects: Vec<ProjectConfig>,
}

/// Where a repository name lives.
#[derive(Debug, Clone, Copy)]
pub enum Namespace<'a> {
    Project(&'a ProjectConfig),
    Mirror,
}

impl Authorizer {
    pub fn new(config: &Config) -> Self {
        Self {
            projects: config.projects.clone(),
        }
    }

    pub fn namespace(&self, repo: &RepoName) -> Namespace<'_> {
        self.projects
            .iter()
            .find(|p| repo.is_within(p.name.get_ref().as_str()))
            .map_or(Namespace::Mirror, Namespace::Project)
    }

    /// Anonymous access level of `project` for a client at `peer`.
    fn anonymous_level(project: &ProjectConfig, peer: IpAddr) -> AnonymousAccess {
        if project.anonymous_from.iter().any(|n| n.contains(peer)) {
            project.anonymous
        } else {
            AnonymousAccess::None
        }
    }

    /// Decides whether an anonymous client at `peer` may do `action` on `repo`.
    pub fn authorize(
        &self,
        repo: &RepoName,
        action: Action,
        peer: IpAddr,
    ) -> Result<(), RegistryError> {
        match self.namespace(repo) {
            Namespace::Mirror => match action {
                Action::Pull => Ok(()),
                _ => Err(RegistryError::denied(format!(
                    "{repo} is not under a project: mirror namespaces are read-only (push to a project, e.g. local/{})",
                    repo.components().last().unwrap_or("image")
                ))),
            },
            Namespace::Project(p) => {
                let level = Self::anonymous_level(p, peer);
                let needed = match action {
                    Action::Pull => AnonymousAccess::Pull,
                    Action::Push | Action::Delete => AnonymousAccess::Push,
                };
                if level >= needed {
                    Ok(())
                } else {
                    Err(RegistryError::new(
                        ErrorCode::Unauthorized,
                        format!("authentication required to {} {repo}", action.as_str()),
                    ))
                }
            }
        }
    }

    /// Whether an anonymous client at `peer` may list `repo` in the catalog.
    pub fn may_list(&self, repo: &str, peer: IpAddr) -> bool {
        repo.parse::<RepoName>()
            .is_ok_and(|r| self.authorize(&r, Action::Pull, peer).is_ok())
    }

    /// Projects that let anonymous clients outside loopback push: worth a warning at startup.
    pub fn open_to_the_network(&self) -> Vec<&str> {
        self.projects
            .iter()
            .filter(|p| {
                p.anonymous == AnonymousAccess::Push
                    && p.anonymous_from
                        .iter()
                        .any(|n| !["127.0.0.0/8", "::1/128"].contains(&n.to_string().as_str()))
            })
            .map(|p| p.name.get_ref().as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authz(extra: &str) -> Authorizer {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"d\"\n[[project]]\nname = \"local\"\nanonymous = \"push\"\n[[project]]\nname = \"example.com/team\"\nanonymous = \"pull\"\nanonymous_from = [\"0.0.0.0/0\"]\n{extra}"
        );
        Authorizer::new(&Config::parse(&text, "t").unwrap())
    }

    #[test]
    fn projects_and_mirrors() {
        let a = authz("");
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let lan: IpAddr = "10.1.2.3".parse().unwrap();
        let r = |s: &str| s.parse::<RepoName>().unwrap();
        assert!(a.authorize(&r("local/app"), Action::Push, lo).is_ok());
        assert!(a.authorize(&r("local/a/b/c"), Action::Delete, lo).is_ok());
        let e = a.authorize(&r("local/app"), Action::Push, lan).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized);
        assert!(a.authorize(&r("local/app"), Action::Pull, lan).is_err());
        assert!(
            a.authorize(&r("example.com/team/app"), Action::Pull, lan)
                .is_ok()
        );
        assert!(
            a.authorize(&r("example.com/team/app"), Action::Push, lo)
                .is_err()
        );
        assert_eq!(
            a.authorize(&r("library/alpine"), Action::Push, lo)
                .unwrap_err()
                .code,
            ErrorCode::Denied
        );
        assert!(a.authorize(&r("library/alpine"), Action::Pull, lan).is_ok());
        assert!(
            a.authorize(&r("localx/app"), Action::Push, lo).is_err(),
            "prefix match is per component"
        );
        assert!(a.open_to_the_network().is_empty());
        let open = authz(
            "[[project]]\nname = \"pub\"\nanonymous = \"push\"\nanonymous_from = [\"0.0.0.0/0\"]\n",
        );
        assert_eq!(open.open_to_the_network(), vec!["pub"]);
    }
}
