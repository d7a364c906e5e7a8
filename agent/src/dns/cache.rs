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
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

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

    /// The addresses with an entry expired at `now`.
    #[must_use]
    pub fn expired(&self, now: Instant) -> std::collections::BTreeSet<IpAddr> {
        self.names
            .values()
            .flat_map(|a| a.iter().filter(|(_, e)| **e <= now).map(|(ip, _)| *ip))
            .collect()
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

    /// Saves the cache to `path` (atomically: a temporary file renamed over it), each entry
    /// with its expiry as wall-clock time, so a restarted agent keeps allowing what this one
    /// allowed until the TTLs run out.
    ///
    /// # Errors
    /// Writing or renaming the file failed.
    pub fn save(&self, path: &Path, now: Instant, wall: SystemTime) -> std::io::Result<()> {
        let entries: Vec<Persisted> = self
            .names
            .iter()
            .flat_map(|(name, addresses)| {
                addresses.iter().map(move |(ip, expiry)| Persisted {
                    name: name.clone(),
                    ip: *ip,
                    expires_unix_ms: to_unix_ms(wall + expiry.saturating_duration_since(now)),
                })
            })
            .collect();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&entries)?)?;
        std::fs::rename(&tmp, path)
    }

    /// Loads a cache saved by [`Self::save`]; a missing file gives an empty cache, and entries
    /// already expired, with a name that is not one, or lasting longer than a day from now are
    /// dropped (a damaged or hostile file cannot allow more than a day).
    ///
    /// # Errors
    /// Reading or parsing the file failed.
    pub fn load(
        path: &Path,
        config: CacheConfig,
        now: Instant,
        wall: SystemTime,
    ) -> std::io::Result<Self> {
        let mut cache = Self::new(config);
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(cache),
            Err(e) => return Err(e),
        };
        let entries: Vec<Persisted> = serde_json::from_slice(&bytes)?;
        let wall_ms = to_unix_ms(wall);
        for e in entries {
            let left = Duration::from_millis(e.expires_unix_ms.saturating_sub(wall_ms));
            let valid = crate::policy::fqdn::FqdnMatch::name(&e.name, "").is_ok();
            if left.is_zero() || left > Duration::from_secs(86_400) || !valid {
                continue;
            }
            cache
                .names
                .entry(crate::policy::fqdn::normalize_name(&e.name))
                .or_default()
                .insert(e.ip, now + left);
        }
        Ok(cache)
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

#[derive(Serialize, Deserialize)]
struct Persisted {
    name: String,
    ip: IpAddr,
    expires_unix_ms: u64,
}

fn to_unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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

    #[test]
    fn a_saved_cache_comes_back_with_the_time_left() {
        let dir = std::env::temp_dir().join(format!("nodeward-dns-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("names.json");
        let (t0, w0) = (Instant::now(), SystemTime::now());
        let mut c = NameCache::new(CONFIG);
        c.learn("api.example.test", ip("203.0.113.1"), 30, t0);
        c.learn("short.example.test", ip("203.0.113.2"), 0, t0);
        c.save(&path, t0, w0).expect("save");

        // Ten seconds later, in a new process: the 3 s entry is gone, the 31 s one has 21 s.
        let (t1, w1) = (Instant::now(), w0 + Duration::from_secs(10));
        let mut back = NameCache::load(&path, CONFIG, t1, w1).expect("load");
        assert_eq!(back.addresses("api.example.test"), [ip("203.0.113.1")]);
        assert!(back.addresses("short.example.test").is_empty());
        assert!(!back.expire(t1 + Duration::from_secs(20), |_| false));
        assert!(back.expire(t1 + Duration::from_secs(22), |_| false));

        std::fs::write(
            &path,
            r#"[{"name": "a..b", "ip": "203.0.113.3", "expires_unix_ms": 99999999999999}]"#,
        )
        .expect("write");
        let hostile = NameCache::load(&path, CONFIG, t1, w1).expect("load");
        assert!(
            hostile.learned().is_empty(),
            "bad name and far future dropped"
        );
        std::fs::write(&path, "not json").expect("write");
        assert!(NameCache::load(&path, CONFIG, t1, w1).is_err());
        std::fs::remove_dir_all(&dir).expect("clean up");
        assert!(
            NameCache::load(&path, CONFIG, t1, w1)
                .expect("missing file")
                .learned()
                .is_empty()
        );
    }
}
