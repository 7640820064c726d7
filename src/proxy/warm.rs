//! Warm lists (`[[warm]]`): the server keeps their images current on its own. Each list runs
//! its own loop: a pass at start, then one every `interval`. A pass revalidates each tag with
//! a HEAD however fresh it is and fetches only what moved — the new manifest and the blobs
//! not stored yet — through the same single-flight lookups and fills as client pulls, so a
//! pass that finds nothing moved costs one HEAD per tag and no GET. A failed pass is logged
//! and retried sooner, with exponential backoff capped at the interval. Loops are plain tasks
//! on the runtime, never in a request's way, and stop at once when `stop` is cancelled.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Context;
use super::prefetch::{self, Mode};
use crate::config::WarmConfig;

/// The first retry after a failed pass (then doubling, up to the list's interval).
const FIRST_RETRY: Duration = Duration::from_secs(5);

/// Keeps every list current until `stop` is cancelled.
pub async fn keep(cx: Context, lists: Vec<WarmConfig>, stop: CancellationToken) {
    let loops = lists.into_iter().map(|list| keep_list(&cx, list, &stop));
    futures_util::future::join_all(loops).await;
}

/// The delay before the next pass: the interval after a clean pass, else the doubled backoff.
fn next_delay(interval: Duration, failed: bool, backoff: &mut Duration) -> Duration {
    if !failed {
        *backoff = FIRST_RETRY.min(interval);
        return interval;
    }
    let delay = *backoff;
    *backoff = (*backoff * 2).min(interval);
    delay
}

async fn keep_list(cx: &Context, list: WarmConfig, stop: &CancellationToken) {
    let interval = list.interval.0;
    let mut backoff = FIRST_RETRY.min(interval);
    let mut delay = Duration::ZERO;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        let failed = tokio::select! {
            () = stop.cancelled() => return,
            failed = pass(cx, &list) => failed,
        };
        delay = next_delay(interval, failed, &mut backoff);
        if failed {
            tracing::info!(retry_in = ?delay, "warm list: retrying failed images");
        }
    }
}

/// One pass over a list: true if any image failed.
async fn pass(cx: &Context, list: &WarmConfig) -> bool {
    let platforms = list.platform_specs();
    let mut failed = false;
    for image in &list.images {
        match prefetch::prefetch(cx, image, &platforms, Mode::Revalidate, None).await {
            Ok(r) if r.manifest_fetched || r.blobs_fetched > 0 => tracing::info!(
                image = %image,
                digest = %r.digest,
                blobs = r.blobs_fetched,
                bytes = r.bytes_fetched,
                "warm list: fetched what moved"
            ),
            Ok(_) => tracing::debug!(image = %image, "warm list: current"),
            Err(e) => {
                failed = true;
                tracing::warn!(image = %image, error = %e, "warm list: cannot refresh");
            }
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_exponentially_up_to_the_interval() {
        let interval = Duration::from_secs(60);
        let mut backoff = FIRST_RETRY;
        let delays: Vec<u64> = [true, true, true, true, true]
            .iter()
            .map(|&f| next_delay(interval, f, &mut backoff).as_secs())
            .collect();
        assert_eq!(delays, [5, 10, 20, 40, 60]);
        assert_eq!(next_delay(interval, false, &mut backoff).as_secs(), 60);
        assert_eq!(next_delay(interval, true, &mut backoff).as_secs(), 5);
        // A short interval caps the backoff too.
        let mut backoff = FIRST_RETRY.min(Duration::from_secs(1));
        assert_eq!(
            next_delay(Duration::from_secs(1), true, &mut backoff).as_secs(),
            1
        );
        assert_eq!(
            next_delay(Duration::from_secs(1), true, &mut backoff).as_secs(),
            1
        );
    }
}
