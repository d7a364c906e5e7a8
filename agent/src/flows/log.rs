//! The flow log: every flow as one JSON line in `DIR/flows.jsonl`, rotated by size
//! (`flows.jsonl.1` is the newest rotated file, `flows.jsonl.<files-1>` the oldest), so flows
//! can still be read after the in-memory ring wrapped or the agent restarted.
//!
//! A dedicated thread owns the file. The datapath reader hands it flows through a bounded queue
//! and never waits: a full queue drops the flow and counts it. A write error (a full disk) is
//! reported once in the log and in `status`, costs the flows it could not write (counted), and
//! never stops the agent; the writer retries with a fresh file after a pause.

use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Flow;

/// The current file's name; rotated files add `.1`, `.2`, ...
pub const FILE_NAME: &str = "flows.jsonl";
/// Flows waiting for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;
/// Buffered lines reach the file at least this often.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// After a batch the writer lets flows gather this long before it waits on the queue again, so
/// a busy agent wakes it at most about 100 times a second instead of once per flow (each wake
/// is a futex call on the connection's thread and a context switch on a shared core). The
/// queue holds 16,384 flows, far more than arrive in 10 ms; a lone flow after a quiet spell is
/// still written at once.
const GATHER: Duration = Duration::from_millis(10);
/// After a write error, the writer waits this long before it opens the file again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowLogConfig {
    pub dir: PathBuf,
    /// Size cap of one file; the file rotates before a line would cross it.
    pub max_bytes: u64,
    /// Files kept, the current one included.
    pub files: usize,
}

/// What `status` shows about the flow log.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FlowLogStatus {
    pub dir: String,
    pub written: u64,
    /// Flows the writer could not write (a write error such as a full disk).
    pub write_failed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct Stats {
    /// Accepted into the queue.
    queued: AtomicU64,
    /// Written (or failed) and flushed.
    handled: AtomicU64,
    written: AtomicU64,
    write_failed: AtomicU64,
    error: Mutex<Option<String>>,
}

/// The datapath side of the flow log: cheap, never blocks.
pub struct FlowLog {
    dir: PathBuf,
    tx: SyncSender<Arc<Flow>>,
    stats: Arc<Stats>,
}

impl FlowLog {
    /// Starts the writer thread. Nothing is opened yet: an unwritable directory is an error in
    /// `status`, not a failed start.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn start(config: FlowLogConfig) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let stats = Arc::new(Stats::default());
        let dir = config.dir.clone();
        let writer = Writer {
            config,
            stats: stats.clone(),
            out: None,
            size: 0,
        };
        std::thread::Builder::new()
            .name("flow-log".into())
            .spawn(move || writer.run(&rx))?;
        Ok(Self { dir, tx, stats })
    }

    /// Queues a flow; `false` when the queue is full (the flow is not logged).
    #[must_use]
    pub fn offer(&self, flow: Arc<Flow>) -> bool {
        match self.tx.try_send(flow) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }

    #[must_use]
    pub fn status(&self) -> FlowLogStatus {
        FlowLogStatus {
            dir: self.dir.display().to_string(),
            written: self.stats.written.load(Ordering::Relaxed),
            write_failed: self.stats.write_failed.load(Ordering::Relaxed),
            error: self
                .stats
                .error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }
    }

    /// Waits until every queued flow has been written and flushed (tests, shutdown).
    #[must_use]
    pub fn sync(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.stats.handled.load(Ordering::Acquire)
                >= self.stats.queued.load(Ordering::Relaxed)
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

struct Writer {
    config: FlowLogConfig,
    stats: Arc<Stats>,
    out: Option<BufWriter<File>>,
    size: u64,
}

impl Writer {
    fn run(mut self, rx: &Receiver<Arc<Flow>>) {
        let mut failed_at: Option<Instant> = None;
        let mut line = Vec::with_capacity(1024);
        let mut lines = super::json::LineWriter::default();
        loop {
            let first = match rx.recv_timeout(FLUSH_EVERY) {
                Ok(flow) => Some(flow),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.flush();
                    return;
                }
            };
            // A batch: what is queued now, bounded so the flush below happens regularly.
            let batch = first
                .into_iter()
                .chain(std::iter::from_fn(|| rx.try_recv().ok()).take(4096));
            let mut taken = 0;
            for flow in batch {
                taken += 1;
                if failed_at.is_some_and(|t| t.elapsed() < RETRY_AFTER) {
                    self.stats.write_failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                line.clear();
                lines.write_flow(&mut line, &flow);
                line.push(b'\n');
                match self.write(&line) {
                    Ok(()) => {
                        self.stats.written.fetch_add(1, Ordering::Relaxed);
                        if failed_at.take().is_some() {
                            self.set_error(None);
                        }
                    }
                    Err(e) => {
                        self.stats.write_failed.fetch_add(1, Ordering::Relaxed);
                        self.out = None;
                        failed_at = Some(Instant::now());
                        self.set_error(Some(e));
                    }
                }
            }
            if let Err(e) = self.flush() {
                self.out = None;
                failed_at = Some(Instant::now());
                self.set_error(Some(e));
            }
            self.stats.handled.fetch_add(taken, Ordering::Release);
            if taken > 0 {
                std::thread::sleep(GATHER);
            }
        }
    }

    fn set_error(&self, error: Option<String>) {
        let mut slot = self
            .stats
            .error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match (&error, slot.as_ref()) {
            (Some(e), None) => {
                tracing::error!(dir = %self.config.dir.display(), error = %e, "writing the flow log failed; flows are not logged until it recovers");
            }
            (None, Some(_)) => {
                tracing::info!(dir = %self.config.dir.display(), "the flow log is written again");
            }
            _ => {}
        }
        *slot = error;
    }

    fn current(&self) -> PathBuf {
        self.config.dir.join(FILE_NAME)
    }

    fn open(&mut self) -> Result<&mut BufWriter<File>, String> {
        if self.out.is_none() {
            std::fs::create_dir_all(&self.config.dir)
                .map_err(|e| format!("creating {}: {e}", self.config.dir.display()))?;
            let path = self.current();
            // Append: a restarted agent continues the same file.
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| format!("opening {}: {e}", path.display()))?;
            self.size = file.metadata().map(|m| m.len()).unwrap_or(0);
            self.out = Some(BufWriter::with_capacity(64 * 1024, file));
        }
        Ok(self.out.as_mut().expect("just opened"))
    }

    fn write(&mut self, line: &[u8]) -> Result<(), String> {
        let len = line.len() as u64;
        if self.out.is_none() {
            self.open()?;
        }
        if self.size > 0 && self.size + len > self.config.max_bytes {
            self.rotate()?;
        }
        // Called for every flow: the file's name is only worked out for an error.
        if let Err(e) = self.open()?.write_all(line) {
            return Err(format!("writing {}: {e}", self.current().display()));
        }
        self.size += len;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        match self.out.as_mut().map(BufWriter::flush) {
            Some(Err(e)) => Err(format!("writing {}: {e}", self.current().display())),
            Some(Ok(())) | None => Ok(()),
        }
    }

    /// `flows.jsonl.(n-1)` is removed, every other file moves up by one, and a new
    /// `flows.jsonl` starts.
    fn rotate(&mut self) -> Result<(), String> {
        self.flush()?;
        self.out = None;
        let keep = self.config.files.max(1);
        let name = |i: usize| rotated(&self.config.dir, i);
        if keep == 1 {
            let _ = std::fs::remove_file(self.current());
        } else {
            let _ = std::fs::remove_file(name(keep - 1));
            for i in (1..keep - 1).rev() {
                let _ = std::fs::rename(name(i), name(i + 1));
            }
            std::fs::rename(self.current(), name(1))
                .map_err(|e| format!("rotating {}: {e}", self.current().display()))?;
        }
        self.size = 0;
        Ok(())
    }
}

fn rotated(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("{FILE_NAME}.{i}"))
}

/// The files of a flow log, oldest first: a directory's rotated files then its current file,
/// or the one file named.
#[must_use]
pub fn files(path: &Path) -> Vec<PathBuf> {
    if !path.is_dir() {
        return vec![path.to_path_buf()];
    }
    let mut numbered: Vec<(usize, PathBuf)> = std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let n = name
                .to_str()?
                .strip_prefix(FILE_NAME)?
                .strip_prefix('.')?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    numbered.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    let mut out: Vec<PathBuf> = numbered.into_iter().map(|(_, p)| p).collect();
    let current = path.join(FILE_NAME);
    if current.exists() {
        out.push(current);
    }
    out
}

/// Calls `on_flow` for every flow in a log, oldest first. A line that does not parse (the last
/// line of a log cut short by a crash) is skipped and counted in the returned number.
///
/// # Errors
/// A file that cannot be opened or read.
pub fn read(path: &Path, mut on_flow: impl FnMut(Flow)) -> std::io::Result<usize> {
    let files = files(path);
    if files.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no {FILE_NAME} files under {}", path.display()),
        ));
    }
    let mut skipped = 0;
    for file in files {
        let reader = BufReader::new(File::open(&file).map_err(|e| {
            std::io::Error::new(e.kind(), format!("opening {}: {e}", file.display()))
        })?);
        for line in reader.lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Flow>(&line) {
                Ok(flow) => on_flow(flow),
                Err(_) => skipped += 1,
            }
        }
    }
    Ok(skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(port: u16) -> Flow {
        let mut f = crate::flows::tests::sample();
        f.l4.tcp.as_mut().expect("tcp").source_port = port;
        f
    }

    fn ports(path: &Path) -> Vec<u16> {
        let mut out = Vec::new();
        read(path, |f| out.push(f.ports().expect("ports").source_port)).expect("read");
        out
    }

    #[test]
    fn flows_are_appended_rotated_by_size_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let line_len = serde_json::to_vec(&flow(1000)).unwrap().len() as u64 + 1;
        let config = FlowLogConfig {
            dir: dir.path().join("flows"),
            max_bytes: line_len * 10,
            files: 3,
        };
        let log = FlowLog::start(config.clone()).unwrap();
        for port in 1000..1025 {
            assert!(log.offer(Arc::new(flow(port))));
        }
        assert!(log.sync(Duration::from_secs(5)));
        assert_eq!(log.status().written, 25);
        assert_eq!(log.status().error, None);
        drop(log);
        // 25 lines, 10 per file, 3 files: .2 holds 1000..1009, .1 1010..1019, current the rest.
        assert_eq!(ports(&config.dir), (1000..1025).collect::<Vec<_>>());
        assert_eq!(files(&config.dir).len(), 3);

        // A restarted writer appends; the oldest file rotates away.
        let log = FlowLog::start(config.clone()).unwrap();
        for port in 2000..2010 {
            assert!(log.offer(Arc::new(flow(port))));
        }
        assert!(log.sync(Duration::from_secs(5)));
        let got = ports(&config.dir);
        assert_eq!(got.first(), Some(&1010), "{got:?}");
        assert_eq!(got.last(), Some(&2009), "{got:?}");
        assert_eq!(got.len(), 25, "{got:?}");
        // One file can be read on its own.
        assert_eq!(ports(&config.dir.join("flows.jsonl.2")).len(), 10);
    }

    #[test]
    fn a_write_error_is_reported_and_counted_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        // The log directory is a regular file: every open fails.
        let blocker = dir.path().join("flows");
        std::fs::write(&blocker, b"not a directory").unwrap();
        let log = FlowLog::start(FlowLogConfig {
            dir: blocker.clone(),
            max_bytes: 1 << 20,
            files: 2,
        })
        .unwrap();
        for port in 0..5 {
            assert!(log.offer(Arc::new(flow(port))));
        }
        assert!(log.sync(Duration::from_secs(5)));
        let status = log.status();
        assert_eq!(status.written, 0);
        assert_eq!(status.write_failed, 5);
        assert!(
            status.error.as_deref().is_some_and(|e| e.contains("flows")),
            "{status:?}"
        );
    }

    #[test]
    fn a_cut_short_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut text = serde_json::to_string(&flow(7)).unwrap();
        text.push_str("\n{\"time\":\"2026");
        std::fs::write(&path, text).unwrap();
        let mut n = 0;
        assert_eq!(read(dir.path(), |_| n += 1).unwrap(), 1);
        assert_eq!(n, 1);
    }
}
