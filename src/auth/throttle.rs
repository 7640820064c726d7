//! Slowing down password guessing: failed logins are counted per client address (IPv6 per
//! /64, which one host usually owns whole). Each failure is answered a little later than the
//! one before; after `max_failed_logins` within `lockout`, the address's credentialed requests
//! are refused with 429 and `Retry-After` until `lockout` has passed since its last failure.
//! Refused attempts do not extend the lockout, so the rightful user gets back in on time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most addresses tracked at once; beyond this, expired entries are dropped first.
const MAX_TRACKED: usize = 100_000;
/// The extra delay per recorded failure, capped at four steps.
const STEP: Duration = Duration::from_millis(250);

pub struct LoginThrottle {
    max_failures: u32,
    lockout: Duration,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

impl LoginThrottle {
    pub fn new(max_failures: u32, lockout: Duration) -> Self {
        Self {
            max_failures: max_failures.max(1),
            lockout,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn key(ip: IpAddr) -> IpAddr {
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

    /// `Some(seconds to wait)` if `ip` is refused right now.
    pub fn refused(&self, ip: IpAddr) -> Option<u64> {
        let map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let f = map.get(&Self::key(ip))?;
        let since = f.last.elapsed();
        (f.count >= self.max_failures && since < self.lockout)
            .then(|| (self.lockout - since).as_secs().max(1))
    }

    /// Records a failed login; returns how long to hold the answer back.
    pub fn failed(&self, ip: IpAddr) -> Duration {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TRACKED {
            let lockout = self.lockout;
            map.retain(|_, f| f.last.elapsed() < lockout);
        }
        let now = Instant::now();
        let entry = map.entry(Self::key(ip)).or_insert(Failures {
            count: 0,
            last: now,
        });
        if entry.last.elapsed() >= self.lockout {
            entry.count = 0;
        }
        entry.count = entry.count.saturating_add(1);
        entry.last = now;
        STEP * entry.count.min(4)
    }

    /// A successful login clears the address's record.
    pub fn succeeded(&self, ip: IpAddr) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&Self::key(ip));
    }

    /// Forgets addresses whose failures have expired.
    pub fn prune(&self) {
        let lockout = self.lockout;
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, f| f.last.elapsed() < lockout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_max_then_releases() {
        let t = LoginThrottle::new(3, Duration::from_millis(300));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(t.failed(ip), STEP);
        assert_eq!(t.failed(ip), STEP * 2);
        assert!(t.refused(ip).is_none());
        t.failed(ip);
        assert_eq!(t.refused(ip), Some(1));
        assert!(t.refused(other).is_none());
        std::thread::sleep(Duration::from_millis(350));
        assert!(t.refused(ip).is_none());
        assert_eq!(t.failed(ip), STEP, "the count restarts after the lockout");
        t.succeeded(ip);
        assert!(t.refused(ip).is_none());
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        let t = LoginThrottle::new(1, Duration::from_secs(60));
        t.failed("2001:db8:1:2::1".parse().unwrap());
        assert!(t.refused("2001:db8:1:2::ffff".parse().unwrap()).is_some());
        assert!(t.refused("2001:db8:1:3::1".parse().unwrap()).is_none());
        t.failed("::ffff:192.0.2.7".parse().unwrap());
        assert!(t.refused("192.0.2.7".parse().unwrap()).is_some());
    }
}
