//! `transship cache …` (part of the binary): parses the subcommands, sends them to the running
//! server's admin socket or applies them to the stopped store, and prints the answer as a
//! table or, with `--json`, as JSON.

use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use transship::App;
use transship::admin::{AdminRequest, AdminResponse};
use transship::auth::token::rfc3339;
use transship::cache_admin::{CacheAnswer, CacheRequest, SortKey};
use transship::config::HumanDuration;

use crate::ConfigArgs;

#[derive(Subcommand)]
pub enum CacheCommand {
    /// List cached images: upstream repository, tags, digest, own and shared bytes, last
    /// pulled, pulls, pinned.
    Ls {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print JSON (images and usage totals) instead of a table.
        #[arg(long)]
        json: bool,
        /// Only images of this upstream (its name, e.g. docker.io).
        #[arg(long)]
        upstream: Option<String>,
        /// Order: size (own bytes), last-pulled (newest first) or pulls.
        #[arg(long, value_enum, default_value = "last-pulled")]
        sort: SortArg,
    },
    /// Evict one image (IMAGE:TAG or IMAGE@DIGEST), or every unpinned image not pulled
    /// within --older-than. Pinned images and blobs other images share are kept.
    Evict {
        #[command(flatten)]
        config: ConfigArgs,
        image: Option<String>,
        /// An age such as 30d or 12h.
        #[arg(long)]
        older_than: Option<HumanDuration>,
        #[arg(long)]
        json: bool,
    },
    /// Pin a cached image (IMAGE:TAG keeps every digest the tag resolves to while pinned;
    /// IMAGE@DIGEST keeps that image) so it is never evicted.
    Pin {
        #[command(flatten)]
        config: ConfigArgs,
        image: String,
        /// Keep only these platforms of an index (os/arch[/variant]); repeatable.
        #[arg(long = "platform")]
        platforms: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove a pin (a tag's pin takes the digest pins it made with it).
    Unpin {
        #[command(flatten)]
        config: ConfigArgs,
        image: String,
        #[arg(long)]
        json: bool,
    },
    /// List pins.
    Pins {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long)]
        json: bool,
    },
    /// Every digest a cached tag resolved to, and when (IMAGE:TAG).
    History {
        #[command(flatten)]
        config: ConfigArgs,
        image: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum SortArg {
    Size,
    LastPulled,
    Pulls,
}

pub fn run(cmd: CacheCommand) -> anyhow::Result<ExitCode> {
    let (config, json, req) = match cmd {
        CacheCommand::Ls {
            config,
            json,
            upstream,
            sort,
        } => {
            let sort = match sort {
                SortArg::Size => SortKey::Size,
                SortArg::LastPulled => SortKey::LastPulled,
                SortArg::Pulls => SortKey::Pulls,
            };
            (config, json, CacheRequest::List { upstream, sort })
        }
        CacheCommand::Evict {
            config,
            image,
            older_than,
            json,
        } => {
            let req = CacheRequest::Evict {
                image,
                older_than_secs: older_than.map(|d| d.0.as_secs()),
            };
            (config, json, req)
        }
        CacheCommand::Pin {
            config,
            image,
            platforms,
            json,
        } => (config, json, CacheRequest::Pin { image, platforms }),
        CacheCommand::Unpin {
            config,
            image,
            json,
        } => (config, json, CacheRequest::Unpin { image }),
        CacheCommand::Pins { config, json } => (config, json, CacheRequest::Pins),
        CacheCommand::History {
            config,
            image,
            json,
        } => (config, json, CacheRequest::History { image }),
    };
    let answer = ask(&config, req)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(ExitCode::SUCCESS);
    }
    print_answer(answer);
    Ok(ExitCode::SUCCESS)
}

fn ask(args: &ConfigArgs, req: CacheRequest) -> anyhow::Result<CacheAnswer> {
    let config = args.load()?;
    let req = AdminRequest::Cache(req);
    let answer = match transship::admin::call(&config.server.data_dir, &req)
        .context("talking to the running server")?
    {
        Some(answer) => answer,
        None => {
            let app = App::build(config).context(
                "cannot open the store (if a transship server is using it, stop it first)",
            )?;
            transship::admin::apply_with_app(&app, req)
        }
    };
    match answer {
        AdminResponse::Cache(a) => Ok(a),
        AdminResponse::Error { message } => anyhow::bail!(message),
        _ => anyhow::bail!("unexpected answer from the server"),
    }
}

fn when(t: u64) -> String {
    if t == 0 { "never".into() } else { rfc3339(t) }
}

fn print_answer(answer: CacheAnswer) {
    match answer {
        CacheAnswer::Images { images, usage } => {
            println!(
                "UPSTREAM\tREPOSITORY\tTAGS\tDIGEST\tOWN BYTES\tSHARED BYTES\tLAST PULLED\tPULLS\tPINNED"
            );
            for i in &images {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    i.upstream,
                    i.repository,
                    if i.tags.is_empty() {
                        "-".into()
                    } else {
                        i.tags.join(",")
                    },
                    i.digest,
                    i.own_bytes,
                    i.shared_bytes,
                    when(i.last_pulled),
                    i.pulls,
                    i.pinned
                );
            }
            println!(
                "{} images; cached {} bytes, pinned {} bytes, pushed {} bytes",
                usage.images, usage.cached_bytes, usage.pinned_bytes, usage.pushed_bytes
            );
        }
        CacheAnswer::Evicted { report } => println!(
            "evicted {} images: {} manifests, {} blobs, {} bytes freed",
            report.images_evicted,
            report.manifests_removed,
            report.blobs_removed,
            report.bytes_freed
        ),
        CacheAnswer::Pinned { repository, digest } => println!("pinned {repository}@{digest}"),
        CacheAnswer::Unpinned { removed } => println!("removed {removed} pins"),
        CacheAnswer::Pins { pins } => {
            for p in pins {
                let what = match (&p.tag, &p.digest) {
                    (Some(t), _) => format!("{}:{t}", p.repository),
                    (_, Some(d)) => format!("{}@{d}", p.repository),
                    _ => p.repository.clone(),
                };
                let platforms = if p.record.platforms.is_empty() {
                    "all platforms".into()
                } else {
                    p.record.platforms.join(",")
                };
                println!("{what}\t{platforms}\tsince {}", when(p.record.pinned_at));
            }
        }
        CacheAnswer::History {
            repository,
            tag,
            resolutions,
        } => {
            for r in resolutions {
                println!("{}\t{repository}:{tag}\t{}", r.at, r.digest);
            }
        }
    }
}
