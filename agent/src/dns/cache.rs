//! The addresses learned from DNS answers, per name, with their expiry.
//!
//! - A learned address lives for its TTL, raised to `min_ttl` (a floor: clients that cache
//!   longer than the TTL, or connect a little late, still get through), plus `grace`.
//! - A name keeps every address seen within its TTL, up to `max_per_name` (generous: services
//!   that rotate addresses quickly, e.g. behind a CDN, hand out many); past the cap the address
//!   that expires first goes. The cap only bounds memory against a hostile resolver.
//! - An expired address whose conntrack entry shows a live connection stays (the caller says
//!   which addresses are live), so a long connection outlives the TTL.
//!
//! Time is passed in, so tests need no clock.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::policy::fqdn::LearnedNames;

/// Limits of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    pub min_ttl: Duration,
    pub grace: Duration,
    pub max_per_name: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            min_ttl: Duration::from_secs(5),
            grace: Duration::from_secs(5),
            max_per_name: 1024,
        }
    }
}

/// The learned names.
#[derive(Clone, Debug, Default)]
pub struct NameCache {
    config: CacheConfig,
    /// name -> address -> expiry (TTL floor and grace included).
    names: BTreeMap<String, BTreeMap<IpAddr, Instant>>,
}

impl NameCache {
    #[must_use]
    pub fn new(config: CacheConfig) -> Self {
        Self {
            config,
            names: BTreeMap::new(),
        }
    }

    /// Records that `name` resolved to `ip` with `ttl` seconds at `now`. Returns whether the
    /// address is new for that name (so the maps must change before the answer is released).
    pub fn learn(&mut self, name: &str, ip: IpAddr, ttl: u32, now: Instant) -> bool {
        let life = Duration::from_secs(u64::from(ttl)).max(self.config.min_ttl) + self.config.grace;
        let expiry = now + life;
        let addresses = self.names.entry(name.to_owned()).or_default();
        let new = match addresses.get_mut(&ip) {
            Some(e) => {
                *e = (*e).max(expiry);
                false
            }
            None => {
                addresses.insert(ip, expiry);
                true
            }
        };
        while addresses.len() > self.config.max_per_name.max(1) {
            let Some(first) = addresses
                .iter()
                .filter(|(a, _)| **a != ip)
                .min_by_key(|(_, e)| **e)
                .map(|(a, _)| *a)
            else {
                break;
            };
            addresses.remove(&first);
        }
        new
    }

    /// Drops the addresses expired at `now` unless `live(address)` (an open connection); returns
    /// whether anything was dropped.
    pub fn expire(&mut self, now: Instant, live: impl Fn(IpAddr) -> bool) -> bool {
        let mut dropped = false;
        for addresses in self.names.values_mut() {
            addresses.retain(|ip, expiry| {
                let keep = *expiry > now || live(*ip);
                dropped |= !keep;
                keep
            });
        }
        self.names.retain(|_, a| !a.is_empty());
        dropped
    }

    /// Every address with the names that led to it: the compiler's input.
    #[must_use]
    pub fn learned(&self) -> LearnedNames {
        let mut out = LearnedNames::new();
        for (name, addresses) in &self.names {
            for ip in addresses.keys() {
                out.entry(*ip).or_default().insert(name.clone());
            }
        }
        out
    }

    /// The addresses of one name.
    #[must_use]
    pub fn addresses(&self, name: &str) -> Vec<IpAddr> {
        self.names
            .get(name)
            .map(|a| a.keys().copied().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test IP")
    }

    const CONFIG: CacheConfig = CacheConfig {
        min_ttl: Duration::from_secs(2),
        grace: Duration::from_secs(1),
        max_per_name: 3,
    };

    #[test]
    fn addresses_expire_after_ttl_floor_and_grace_unless_a_connection_is_live() {
        let t0 = Instant::now();
        let mut c = NameCache::new(CONFIG);
        assert!(c.learn("api.example.test", ip("203.0.113.1"), 0, t0), "new");
        assert!(
            !c.learn("api.example.test", ip("203.0.113.1"), 0, t0),
            "known"
        );
        c.learn("api.example.test", ip("203.0.113.2"), 10, t0);
        assert!(
            !c.expire(t0 + Duration::from_millis(2900), |_| false),
            "floor 2 s + grace 1 s"
        );
        assert!(c.expire(t0 + Duration::from_secs(3), |_| false));
        assert_eq!(c.addresses("api.example.test"), [ip("203.0.113.2")]);
        let live = ip("203.0.113.2");
        assert!(
            !c.expire(t0 + Duration::from_secs(60), |a| a == live),
            "live connection"
        );
        assert!(
            c.expire(t0 + Duration::from_secs(61), |_| false),
            "connection closed"
        );
        assert!(c.learned().is_empty());
    }

    #[test]
    fn a_name_keeps_every_recent_address_up_to_the_cap_evicting_the_oldest() {
        let t0 = Instant::now();
        let mut c = NameCache::new(CONFIG);
        for (i, a) in ["203.0.113.1", "203.0.113.2", "203.0.113.3"]
            .iter()
            .enumerate()
        {
            c.learn(
                "cdn.example.test",
                ip(a),
                30,
                t0 + Duration::from_secs(i as u64),
            );
        }
        assert_eq!(
            c.addresses("cdn.example.test").len(),
            3,
            "rotation keeps all"
        );
        c.learn(
            "cdn.example.test",
            ip("203.0.113.4"),
            30,
            t0 + Duration::from_secs(3),
        );
        assert_eq!(
            c.addresses("cdn.example.test"),
            [ip("203.0.113.2"), ip("203.0.113.3"), ip("203.0.113.4")],
            "the one expiring first went"
        );
        c.learn("www.example.test", ip("203.0.113.4"), 30, t0);
        let learned = c.learned();
        assert_eq!(
            learned[&ip("203.0.113.4")],
            BTreeSet::from(["cdn.example.test".to_owned(), "www.example.test".to_owned()])
        );
    }
}
