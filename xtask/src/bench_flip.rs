//! Policy change to kernel enforcement: a prober starts a fresh TCP connect from the client pod
//! about every millisecond; after a manifest change, the flip is the first attempt from which on
//! every attempt has the new outcome. Its start time minus the time the manifest was renamed into
//! place is the latency (an upper bound, at most one probe interval late).

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use nodeward_lab::sys;

/// Attempts in flight at once; with [`ATTEMPT_PERIOD`] one starts about every millisecond.
const THREADS: u32 = 20;
/// Each thread starts an attempt this often; also the connect timeout (a dropped SYN is only
/// retransmitted after a second, so a timeout this long means "dropped").
const ATTEMPT_PERIOD: Duration = Duration::from_millis(20);
/// A prober never runs longer than this, whatever happens to the caller.
const MAX_RUN: Duration = Duration::from_secs(120);

#[derive(Clone, Copy)]
struct Attempt {
    start: Instant,
    connected: bool,
}

pub struct Prober {
    attempts: Arc<Mutex<Vec<Attempt>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Prober {
    /// Starts probing `addr` from inside `netns`.
    pub fn start(netns: &str, addr: SocketAddr) -> Self {
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let threads = (0..THREADS)
            .map(|i| {
                let (attempts, stop, netns) = (attempts.clone(), stop.clone(), netns.to_string());
                std::thread::spawn(move || {
                    std::thread::sleep(ATTEMPT_PERIOD * i / THREADS);
                    let _ = sys::in_netns(&netns, || {
                        while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_RUN {
                            let start = Instant::now();
                            let connected =
                                TcpStream::connect_timeout(&addr, ATTEMPT_PERIOD).is_ok();
                            lock(&attempts).push(Attempt { start, connected });
                            std::thread::sleep(ATTEMPT_PERIOD.saturating_sub(start.elapsed()));
                        }
                    });
                })
            })
            .collect();
        Self {
            attempts,
            stop,
            threads,
        }
    }

    /// Waits until the outcome has flipped to `connected` for good after `changed`; returns the
    /// latency, or an error after `timeout`.
    pub fn wait_flip(
        &self,
        changed: Instant,
        connected: bool,
        timeout: Duration,
    ) -> Result<Duration> {
        // Attempts that started this long after the flip have all finished, and agree.
        let settle = ATTEMPT_PERIOD * 2;
        loop {
            std::thread::sleep(Duration::from_millis(2));
            let now = Instant::now();
            let mut recent: Vec<Attempt> = lock(&self.attempts)
                .iter()
                .filter(|a| a.start + ATTEMPT_PERIOD * 2 >= changed)
                .copied()
                .collect();
            recent.sort_by_key(|a| a.start);
            // The flip: just after the last attempt with the old outcome.
            let last_old = recent.iter().rposition(|a| a.connected != connected);
            let flip = match last_old {
                Some(i) => recent.get(i + 1),
                None if recent.iter().any(|a| a.start < changed) => bail!(
                    "the probe was already {} before the change",
                    if connected { "allowed" } else { "denied" }
                ),
                None => None,
            };
            if let Some(flip) = flip
                && now.duration_since(flip.start) >= settle
            {
                // A flip that seems to predate the change is a probe that stalled: count 0.
                return Ok(flip.start.saturating_duration_since(changed));
            }
            if now.duration_since(changed) > timeout {
                bail!(
                    "the probe did not become {} within {timeout:?}",
                    if connected { "allowed" } else { "denied" }
                );
            }
        }
    }

    /// Forgets old attempts (they are only needed around a change).
    pub fn clear(&self) {
        lock(&self.attempts).clear();
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
