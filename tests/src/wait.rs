//! Bounded polling.

use std::time::{Duration, Instant};

/// Calls `check` every `interval` until it returns true or `timeout` passes; returns the last
/// answer. Always calls `check` at least once.
pub fn eventually(timeout: Duration, interval: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() + interval > deadline {
            return false;
        }
        std::thread::sleep(interval);
    }
}

/// Like [`eventually`], for a check that yields a value once it is ready.
pub fn poll<T>(
    timeout: Duration,
    interval: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() + interval > deadline {
            return None;
        }
        std::thread::sleep(interval);
    }
}
