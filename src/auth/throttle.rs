//! Slowing down password guessing. Failed logins are counted per client address (IPv6 per
//! /64, which one host usually owns whole) and per user name (from any address). Each failure
//! is answered a little later than the one before. After `max_failed_logins` within `lockout`
//! the address's credentialed requests are refused with 429 and `Retry-After`, and after
//! `USER_FACTOR` times as many failures for one user, that user's password logins are refused
//! from everywhere, until `lockout` has passed since the last failure. Refused attempts do not
//! extend the lockout, so the rightful user gets back in on time.
//!
//! A successful login clears only its own user's count, never the address's: a client holding
//! one valid credential must not be able to interleave guesses for others. Password checks
//! (argon2id, ~19 MiB each) run at most `MAX_CONCURRENT_CHECKS` at a time; up to
//! `MAX_WAITING_CHECKS` more wait for a turn, and beyond that the answer is 429 at once.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Most addresses (and users) tracked at once; see `make_room` for what gives way.
const MAX_TRACKED: usize = 100_000;
/// The extra delay per recorded failure, capped at four steps.
const STEP: Duration = Duration::from_millis(250);
/// A user is locked after this many times `max_failed_logins` failures from all addresses
/// together: guessing spread over many addresses is stopped, yet one client's typos lock out
/// its own address long before they lock out the user everywhere.
pub const USER_FACTOR: u32 = 3;
/// Password checks running at once (each holds argon2id's ~19 MiB).
pub const MAX_CONCURRENT_CHECKS: usize = 4;
/// Password checks waiting for a turn; more are refused with 429.
pub const MAX_WAITING_CHECKS: usize = 64;

pub struct LoginThrottle {
    max_failures: u32,
    lockout: Duration,
    capacity: usize,
    by_addr: Mutex<HashMap<IpAddr, Failures>>,
    by_user: Mutex<HashMap<String, Failures>>,
    checks: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
}

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

/// Too many password checks are running and waiting: try again shortly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// Counts one waiter for as long as it waits (also when its request is dropped meanwhile).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LoginThrottle {
    pub fn new(max_failures: u32, lockout: Duration) -> Self {
        Self::with_limits(
            max_failures,
            lockout,
            MAX_TRACKED,
            MAX_CONCURRENT_CHECKS,
            MAX_WAITING_CHECKS,
        )
    }

    fn with_limits(
        max_failures: u32,
        lockout: Duration,
        capacity: usize,
        concurrent: usize,
        max_waiting: usize,
    ) -> Self {
        Self {
            max_failures: max_failures.max(1),
            lockout,
            capacity: capacity.max(1),
            by_addr: Mutex::new(HashMap::new()),
            by_user: Mutex::new(HashMap::new()),
            checks: Arc::new(Semaphore::new(concurrent.max(1))),
            waiting: AtomicUsize::new(0),
            max_waiting,
        }
    }

    fn max_user_failures(&self) -> u32 {
        self.max_failures.saturating_mul(USER_FACTOR)
    }

    /// Seconds left if `f` is locked with `max` failures.
    fn locked(&self, f: Option<&Failures>, max: u32) -> Option<u64> {
        let f = f?;
        let since = f.last.elapsed();
        (f.count >= max && since < self.lockout).then(|| (self.lockout - since).as_secs().max(1))
    }

    /// `Some(seconds to wait)` if a login from `ip` (as `user`, when a password is checked)
    /// is refused right now.
    pub fn refused(&self, ip: IpAddr, user: Option<&str>) -> Option<u64> {
        let by_addr = self.locked(lock(&self.by_addr).get(&host_key(ip)), self.max_failures);
        let by_user =
            user.and_then(|u| self.locked(lock(&self.by_user).get(u), self.max_user_failures()));
        by_addr.max(by_user)
    }

    /// Records a failed login from `ip`, and against `user` when the name is a real user (so
    /// made-up names cannot fill memory); returns how long to hold the answer back.
    pub fn failed(&self, ip: IpAddr, user: Option<&str>) -> Duration {
        let (cap, lockout, max) = (self.capacity, self.lockout, self.max_failures);
        let n = bump(&mut lock(&self.by_addr), host_key(ip), cap, lockout, max);
        let m = user.map_or(0, |u| {
            let max = self.max_user_failures();
            bump(&mut lock(&self.by_user), u.to_string(), cap, lockout, max)
        });
        STEP * n.max(m).min(4)
    }

    /// A successful login as `user` clears that user's count (their own typos are forgiven).
    /// The address's count stays: another identity's success says nothing about its guesses.
    pub fn succeeded(&self, user: &str) {
        lock(&self.by_user).remove(user);
    }

    /// Forgets failures that have expired.
    pub fn prune(&self) {
        let lockout = self.lockout;
        lock(&self.by_addr).retain(|_, f| f.last.elapsed() < lockout);
        lock(&self.by_user).retain(|_, f| f.last.elapsed() < lockout);
    }

    /// A turn to run one password check; the permit is moved into the blocking task so the
    /// bound holds even when the client goes away mid-check.
    pub async fn check_permit(&self) -> Result<OwnedSemaphorePermit, Busy> {
        if let Ok(p) = self.checks.clone().try_acquire_owned() {
            return Ok(p);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Busy);
        }
        let _waiting = Waiting(&self.waiting);
        self.checks.clone().acquire_owned().await.map_err(|_| Busy)
    }
}

/// Counts one failure for `key`; returns its count.
fn bump<K: Eq + Hash>(
    map: &mut HashMap<K, Failures>,
    key: K,
    capacity: usize,
    lockout: Duration,
    max: u32,
) -> u32 {
    if !map.contains_key(&key) && map.len() >= capacity {
        make_room(map, capacity, lockout, max);
    }
    let now = Instant::now();
    let entry = map.entry(key).or_insert(Failures {
        count: 0,
        last: now,
    });
    if entry.last.elapsed() >= lockout {
        entry.count = 0;
    }
    entry.count = entry.count.saturating_add(1);
    entry.last = now;
    entry.count
}

/// Keeps the map within `capacity`: expired records go first, then those not (yet) locked,
/// and only if locked ones alone fill it, everything. Each step frees many records at once,
/// so the cost per failure stays constant.
fn make_room<K>(map: &mut HashMap<K, Failures>, capacity: usize, lockout: Duration, max: u32) {
    map.retain(|_, f| f.last.elapsed() < lockout);
    if map.len() >= capacity {
        map.retain(|_, f| f.count >= max);
    }
    if map.len() >= capacity {
        map.clear();
    }
}

/// The address one client host stands for: itself, or for IPv6 its /64 (which one host
/// usually owns whole, so a new address per request is still the same client).
pub fn host_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn locks_after_max_then_releases() {
        let t = LoginThrottle::new(3, Duration::from_millis(300));
        let (a, other) = (ip("10.0.0.1"), ip("10.0.0.2"));
        assert_eq!(t.failed(a, None), STEP);
        assert_eq!(t.failed(a, None), STEP * 2);
        assert!(t.refused(a, None).is_none());
        t.failed(a, None);
        assert_eq!(t.refused(a, None), Some(1));
        assert!(t.refused(other, None).is_none());
        std::thread::sleep(Duration::from_millis(350));
        assert!(t.refused(a, None).is_none());
        assert_eq!(
            t.failed(a, None),
            STEP,
            "the count restarts after the lockout"
        );
    }

    #[test]
    fn another_identitys_success_does_not_reset_the_address() {
        let t = LoginThrottle::new(3, Duration::from_secs(60));
        let a = ip("10.0.0.1");
        for _ in 0..3 {
            t.failed(a, Some("olivia"));
            // The attacker's own valid login between guesses.
            t.succeeded("mallory");
        }
        assert!(t.refused(a, Some("mallory")).is_some());
        assert!(t.refused(a, None).is_some());
    }

    #[test]
    fn failures_for_one_user_add_up_across_addresses() {
        let t = LoginThrottle::new(2, Duration::from_secs(60));
        for i in 0..(2 * USER_FACTOR) {
            let from = ip(&format!("192.0.2.{i}"));
            assert!(t.refused(from, Some("olivia")).is_none(), "attempt {i}");
            t.failed(from, Some("olivia"));
        }
        let fresh = ip("198.51.100.1");
        assert!(
            t.refused(fresh, Some("olivia")).is_some(),
            "olivia is locked"
        );
        assert!(t.refused(fresh, Some("victor")).is_none(), "victor is not");
        assert!(t.refused(fresh, None).is_none(), "nor is the address");
        t.succeeded("olivia");
        assert!(t.refused(fresh, Some("olivia")).is_none());
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        let t = LoginThrottle::new(1, Duration::from_secs(60));
        t.failed(ip("2001:db8:1:2::1"), None);
        assert!(t.refused(ip("2001:db8:1:2::ffff"), None).is_some());
        assert!(t.refused(ip("2001:db8:1:3::1"), None).is_none());
        t.failed(ip("::ffff:192.0.2.7"), None);
        assert!(t.refused(ip("192.0.2.7"), None).is_some());
    }

    #[test]
    fn memory_stays_bounded_and_locked_addresses_stay_locked() {
        let t = LoginThrottle::with_limits(2, Duration::from_secs(60), 100, 1, 1);
        let locked = ip("10.9.9.9");
        t.failed(locked, None);
        t.failed(locked, None);
        for i in 0..1000u32 {
            let [_, _, b, c] = i.to_be_bytes();
            t.failed(ip(&format!("10.1.{b}.{c}")), Some(&format!("user{i}")));
            assert!(lock(&t.by_addr).len() <= 100);
            assert!(lock(&t.by_user).len() <= 100);
        }
        assert!(
            t.refused(locked, None).is_some(),
            "one failure each from many addresses does not unlock a locked one"
        );
    }

    #[test]
    fn password_checks_are_bounded_and_the_queue_too() {
        use futures_util::FutureExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let t = LoginThrottle::with_limits(3, Duration::from_secs(60), 100, 2, 1);
            let a = t.check_permit().await.unwrap();
            let _b = t.check_permit().await.unwrap();
            // The third waits (it is the one allowed waiter); a fourth is refused at once.
            let mut third = Box::pin(t.check_permit());
            assert!((&mut third).now_or_never().is_none());
            assert_eq!(t.check_permit().await.err(), Some(Busy));
            drop(a);
            let _c = third.await.expect("a finished check lets a waiter in");
            // A waiter that gives up frees its place in the queue.
            let mut gives_up = Box::pin(t.check_permit());
            assert!((&mut gives_up).now_or_never().is_none());
            drop(gives_up);
            assert_eq!(t.waiting.load(Ordering::Acquire), 0);
        });
    }
}
