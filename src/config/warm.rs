//! `[[warm]]` lists: images the server keeps current on its own, each list with the platforms
//! to fetch of an index and how often to ask the upstream. References and platforms are
//! checked when the config loads, and so is the host of each reference: it must be a
//! configured upstream (or alias), so a typo fails at start instead of at every pass.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Config, HumanDuration, project_of};
use crate::oci::image_ref::{ImageRef, PlatformSpec};

/// The shortest `interval` accepted.
pub const MIN_WARM_INTERVAL: Duration = Duration::from_secs(1);

/// One `[[warm]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmConfig {
    /// Image references (`nginx:1.27`, `ghcr.io/org/app:v2`, `…@sha256:…`).
    pub images: Vec<String>,
    /// `os/arch[/variant]` children of an index to fetch; empty: all of them.
    #[serde(default)]
    pub platforms: Vec<String>,
    /// How often each tag is revalidated with the upstream.
    #[serde(default = "default_interval")]
    pub interval: HumanDuration,
}

fn default_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(15 * 60))
}

impl WarmConfig {
    /// The parsed platforms (validated at load, so this cannot fail afterwards).
    pub fn platform_specs(&self) -> Vec<PlatformSpec> {
        self.platforms
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

/// Checks every `[[warm]]` entry against the syntax, the configured upstreams and projects.
pub fn validate(config: &Config) -> Result<(), String> {
    let upstreams = &config.upstreams;
    for (i, w) in config.warm.iter().enumerate() {
        let at = format!("warm entry {}", i + 1);
        if w.images.is_empty() {
            return Err(format!("{at}: images is empty"));
        }
        if w.interval.0 < MIN_WARM_INTERVAL {
            return Err(format!("{at}: interval must be at least 1s"));
        }
        for p in &w.platforms {
            p.parse::<PlatformSpec>()
                .map_err(|e| format!("{at}: platforms: {e}"))?;
        }
        for image in &w.images {
            let r: ImageRef = image.parse().map_err(|e| format!("{at}: {e}"))?;
            let Some(host) = r.host else {
                if let Some(p) = project_of(&config.projects, &r.path) {
                    return Err(format!(
                        "{at}: {image:?} is in project {:?}, not on an upstream",
                        p.name.get_ref().as_str()
                    ));
                }
                continue;
            };
            let bare = host.split(':').next().unwrap_or(&host);
            let known = upstreams.iter().any(|u| {
                std::iter::once(u.name.get_ref().as_str())
                    .chain(u.aliases.iter().map(String::as_str))
                    .any(|n| n.eq_ignore_ascii_case(&host) || n.eq_ignore_ascii_case(bare))
            });
            if !known {
                return Err(format!(
                    "{at}: {image:?}: no upstream named {host:?} is configured"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(warm: &str) -> Result<Config, String> {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"d\"\n[[project]]\nname = \"local\"\n\
             [[upstream]]\nname = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\naliases = [\"index.docker.io\"]\ndefault = true\n\
             [[upstream]]\nname = \"ghcr.io\"\nurl = \"https://ghcr.io\"\n{warm}"
        );
        Config::parse(&text, "t").map_err(|e| e.to_string())
    }

    #[test]
    fn warm_lists_name_images_on_configured_upstreams() {
        let c = parse(
            "[[warm]]\nimages = [\"nginx:1.27\", \"GHCR.IO/org/app:v2\", \"index.docker.io/library/alpine\"]\nplatforms = [\"linux/arm/v7\"]\ninterval = \"1s\"\n",
        )
        .unwrap();
        assert_eq!(c.warm[0].interval.0, Duration::from_secs(1));
        assert_eq!(c.warm[0].platform_specs()[0].to_string(), "linux/arm/v7");
        let c = parse("[[warm]]\nimages = [\"nginx\"]\n").unwrap();
        assert_eq!(c.warm[0].interval.0, Duration::from_secs(900));
        assert!(c.warm[0].platforms.is_empty());
        for (bad, says) in [
            ("images = []", "images is empty"),
            (
                "images = [\"quay.io/x:1\"]",
                "no upstream named \"quay.io\"",
            ),
            ("images = [\"local/app:v1\"]", "in project \"local\""),
            ("images = [\"Nginx\"]", "invalid image reference"),
            ("images = [\"nginx\"]\ninterval = \"500ms\"", "at least 1s"),
            (
                "images = [\"nginx\"]\nplatforms = [\"linux\"]",
                "invalid platform",
            ),
            ("images = [\"nginx\"]\nevery = \"1m\"", "unknown field"),
        ] {
            let e = parse(&format!("[[warm]]\n{bad}\n")).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
