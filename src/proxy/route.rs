//! Where a repository name lives: under a project (the private registry) or in the cache of
//! an upstream, and under which names. Every request resolves its name once, here, before
//! access control; the answer is passed down to `auth` and the handlers. First match wins:
//! 1. a declared project → private, no upstream;
//! 2. `?ns=<host>` (containerd) naming an upstream or one of its aliases;
//! 3. a first path component naming an upstream (`ghcr.io/org/app`, podman/CRI-O `location`);
//! 4. the default upstream.
//!
//! Every way of reaching the same upstream repository maps to one canonical local repository,
//! `<upstream name>/<upstream repository>`, so `alpine`, `library/alpine`, `?ns=docker.io` and
//! `docker.io/library/alpine` share one cache entry.

use crate::config::{Config, ProjectConfig};
use crate::oci::RepoName;

/// Where a repository name lives.
#[derive(Debug, Clone)]
pub enum Namespace<'a> {
    /// Under a declared project: the private registry.
    Project(&'a ProjectConfig),
    /// Outside every project: the cache of an upstream, or why no upstream serves the name.
    Mirror(Result<MirrorRoute, RouteError>),
}

/// A mirrored repository: which upstream, its name there, and its name in the local store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorRoute {
    /// Index into the configured upstreams.
    pub upstream: usize,
    /// The repository name on the upstream (`library/alpine`).
    pub remote: RepoName,
    /// The canonical local repository (`docker.io/library/alpine`).
    pub local: RepoName,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("ns={0:?} names no configured upstream")]
    UnknownNamespace(String),
    #[error("{0:?} is not under a project and no default upstream is configured")]
    NoUpstream(String),
    #[error("{0:?} names an upstream but no repository on it")]
    EmptyRemote(String),
}

/// The declared projects, and the upstream names and aliases (matched case-insensitively like
/// host names).
pub struct Router {
    projects: Vec<ProjectConfig>,
    upstreams: Vec<Names>,
    default: Option<usize>,
}

struct Names {
    name: String,
    all: Vec<String>,
    /// Docker Hub's convention: a one-component name is an official image (`library/<name>`).
    docker_hub: bool,
}

fn is_docker_hub(names: &[String]) -> bool {
    names.iter().any(|n| {
        matches!(
            n.as_str(),
            "docker.io" | "index.docker.io" | "registry-1.docker.io"
        )
    })
}

impl Router {
    pub fn new(config: &Config) -> Self {
        let upstreams: Vec<Names> = config
            .upstreams
            .iter()
            .map(|u| {
                let name = u.name.get_ref().as_str().to_ascii_lowercase();
                let mut all = vec![name.clone()];
                all.extend(u.aliases.iter().map(|a| a.to_ascii_lowercase()));
                Names {
                    docker_hub: is_docker_hub(&all),
                    name,
                    all,
                }
            })
            .collect();
        let default = config.upstreams.iter().position(|u| u.default);
        Self {
            projects: config.projects.clone(),
            upstreams,
            default,
        }
    }

    /// Where `name` lives. `ns` is the `?ns=` query parameter.
    pub fn namespace(&self, name: &RepoName, ns: Option<&str>) -> Namespace<'_> {
        match self.project(name) {
            Some(p) => Namespace::Project(p),
            None => Namespace::Mirror(self.resolve(name, ns)),
        }
    }

    /// The declared projects.
    pub fn projects(&self) -> &[ProjectConfig] {
        &self.projects
    }

    /// The project `name` is under, if any.
    pub fn project(&self, name: &RepoName) -> Option<&ProjectConfig> {
        crate::config::project_of(&self.projects, name)
    }

    fn by_host(&self, host: &str) -> Option<usize> {
        let host = host.to_ascii_lowercase();
        // `ns` may carry a port (`localhost:5000`): match with it, then without.
        let bare = host.split(':').next().unwrap_or(&host).to_string();
        self.upstreams
            .iter()
            .position(|u| u.all.contains(&host) || u.all.contains(&bare))
    }

    /// Resolves a name that is not under a project. `ns` is the `?ns=` query parameter.
    pub fn resolve(&self, name: &RepoName, ns: Option<&str>) -> Result<MirrorRoute, RouteError> {
        let (upstream, remote) = if let Some(ns) = ns {
            let i = self
                .by_host(ns)
                .ok_or_else(|| RouteError::UnknownNamespace(ns.chars().take(100).collect()))?;
            // A client that sends both `?ns=` and the upstream as a path prefix means it once.
            let first = name.components().next().unwrap_or("");
            match self.by_host(first) {
                Some(j) if j == i && name.as_str().len() > first.len() => {
                    (i, name.as_str()[first.len() + 1..].to_string())
                }
                _ => (i, name.as_str().to_string()),
            }
        } else {
            let first = name.components().next().unwrap_or("");
            match self.by_host(first) {
                Some(i) if name.as_str().len() > first.len() => {
                    (i, name.as_str()[first.len() + 1..].to_string())
                }
                Some(_) => return Err(RouteError::EmptyRemote(name.to_string())),
                None => (
                    self.default
                        .ok_or_else(|| RouteError::NoUpstream(name.to_string()))?,
                    name.as_str().to_string(),
                ),
            }
        };
        let u = &self.upstreams[upstream];
        let remote = if u.docker_hub && !remote.contains('/') {
            format!("library/{remote}")
        } else {
            remote
        };
        let local = format!("{}/{remote}", u.name);
        // Both are built from validated components plus a validated upstream name, so they
        // parse; the length limit is the one thing that can still fail.
        let remote: RepoName = remote
            .parse()
            .map_err(|_| RouteError::EmptyRemote(name.to_string()))?;
        let local: RepoName = local
            .parse()
            .map_err(|_| RouteError::EmptyRemote(name.to_string()))?;
        Ok(MirrorRoute {
            upstream,
            remote,
            local,
        })
    }

    pub fn upstream_name(&self, i: usize) -> &str {
        &self.upstreams[i].name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let text = "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"d\"\n[[project]]\nname = \"local\"\n\
            [[upstream]]\nname = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\naliases = [\"index.docker.io\"]\ndefault = true\n\
            [[upstream]]\nname = \"ghcr.io\"\nurl = \"https://ghcr.io\"\n";
        Router::new(&Config::parse(text, "t").unwrap())
    }

    fn r(s: &str) -> RepoName {
        s.parse().unwrap()
    }

    #[test]
    fn projects_come_first_then_upstreams() {
        let rt = router();
        for name in ["local/app", "local/team/app", "local"] {
            assert!(
                matches!(rt.namespace(&r(name), Some("ghcr.io")), Namespace::Project(p) if p.name.get_ref().as_str() == "local"),
                "{name} is in the project"
            );
        }
        let Namespace::Mirror(Ok(route)) = rt.namespace(&r("localhost/app"), None) else {
            panic!("a name that only starts like a project is mirrored");
        };
        assert_eq!(route.local, r("docker.io/localhost/app"));
        let Namespace::Mirror(Ok(route)) = rt.namespace(&r("org/app"), Some("ghcr.io")) else {
            panic!("ns= routes outside projects");
        };
        assert_eq!((route.upstream, route.local), (1, r("ghcr.io/org/app")));
        assert!(matches!(
            rt.namespace(&r("app"), Some("quay.io")),
            Namespace::Mirror(Err(RouteError::UnknownNamespace(_)))
        ));
    }

    #[test]
    fn every_spelling_of_an_image_shares_one_local_repository() {
        let rt = router();
        let want = MirrorRoute {
            upstream: 0,
            remote: r("library/alpine"),
            local: r("docker.io/library/alpine"),
        };
        assert_eq!(rt.resolve(&r("alpine"), None).unwrap(), want);
        assert_eq!(rt.resolve(&r("library/alpine"), None).unwrap(), want);
        assert_eq!(
            rt.resolve(&r("library/alpine"), Some("docker.io")).unwrap(),
            want
        );
        assert_eq!(
            rt.resolve(&r("alpine"), Some("index.docker.io")).unwrap(),
            want
        );
        assert_eq!(
            rt.resolve(&r("docker.io/library/alpine"), None).unwrap(),
            want
        );
        assert_eq!(rt.resolve(&r("docker.io/alpine"), None).unwrap(), want);
        assert_eq!(
            rt.resolve(&r("index.docker.io/library/alpine"), None)
                .unwrap(),
            want
        );
        assert_eq!(
            rt.resolve(&r("docker.io/library/alpine"), Some("docker.io"))
                .unwrap(),
            want
        );
    }

    #[test]
    fn other_upstreams_by_ns_and_path_prefix() {
        let rt = router();
        let want = MirrorRoute {
            upstream: 1,
            remote: r("org/app"),
            local: r("ghcr.io/org/app"),
        };
        assert_eq!(rt.resolve(&r("org/app"), Some("ghcr.io")).unwrap(), want);
        assert_eq!(rt.resolve(&r("org/app"), Some("GHCR.IO")).unwrap(), want);
        assert_eq!(rt.resolve(&r("ghcr.io/org/app"), None).unwrap(), want);
        // Not Docker Hub: no library/ prefix.
        assert_eq!(
            rt.resolve(&r("app"), Some("ghcr.io")).unwrap().remote,
            r("app")
        );
        // Bare names on the default upstream keep their components.
        assert_eq!(
            rt.resolve(&r("bitnami/redis"), None).unwrap().local,
            r("docker.io/bitnami/redis")
        );
    }

    #[test]
    fn errors() {
        let rt = router();
        assert!(matches!(
            rt.resolve(&r("x"), Some("quay.io")),
            Err(RouteError::UnknownNamespace(_))
        ));
        assert!(matches!(
            rt.resolve(&r("ghcr.io"), None),
            Err(RouteError::EmptyRemote(_))
        ));
        let long = "a".repeat(250).to_string();
        assert!(
            rt.resolve(&r(&long), None).is_err(),
            "docker.io/library/ + 250 exceeds the name limit"
        );
        let text = "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"d\"\n";
        let none = Router::new(&Config::parse(text, "t").unwrap());
        assert!(matches!(
            none.resolve(&r("alpine"), None),
            Err(RouteError::NoUpstream(_))
        ));
    }
}
