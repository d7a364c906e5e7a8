//! The benchmark's load generator, run inside a lab pod's network namespace (`nsenter --net`).
//!
//! - `serve --sink 7100-7131 --echo 7000 [--echo-cpu C] [--drain 7300]`: on each sink port
//!   accept and close at once (the server closes first, so the client never holds TIME_WAIT and
//!   its ports do not run out); on each echo port, echo with `TCP_NODELAY`, on CPU C if given; on
//!   each drain port read to EOF, then close (the client closes first).
//! - `crr --addr IP:PORT --threads N --secs S [--close server|client] [--slow-ms MS]
//!   [--report-ms MS] [--stop-file PATH]`: new connections per second. Each thread loops
//!   connect, read to EOF, close (`--close client`: connect, shut the write side down, read to
//!   EOF, close; for a drain port). A connection slower than `--slow-ms` (default 1,000: a SYN
//!   retransmission takes 1 s) is counted as slow. Prints one JSON line at the end and, with
//!   `--report-ms`, one per interval (`"interval": true`). Stops early once `--stop-file` exists.
//! - `rr --addr IP:PORT --secs S --size B [--cpu C]`: one connection, one message in flight, on
//!   CPU C if given; prints percentiles of the round-trip time in microseconds as one JSON line.
//! - `hold --addr IP:PORT --count N --secs S`: opens N connections to an echo port one after
//!   another, checks each with one round trip, prints one JSON line (`opened`, `errors`), holds
//!   them idle for S seconds, checks each again and prints a second JSON line (`alive`), then
//!   exits (closing them all).
//! - `probe --addr IP:PORT [--proto tcp|udp|udpc] [--count N] [--interval-ms MS] [--timeout-ms MS]
//!   [--hold-secs S]`: N probes one after another (at most 100), MS apart, one JSON line each: `ok`, `error` and `errno`,
//!   `ms`, `local_port`, and `peer`: what the application sees as the other end (`getpeername`
//!   for TCP and connected UDP `udpc`, the reply's source for unconnected `udp`). With
//!   `--hold-secs` (and `--count 1`, TCP) the connection then stays open for S seconds and a last
//!   line says whether it still carries a round trip (`alive`).
//! - `resolve --dns IP:PORT --names a.test,b.test [--connect-port P] [--timeout-ms MS]
//!   [--transport udp|tcp]`: per name (at most 10,000), one A query to the resolver (an
//!   unconnected UDP socket, as a stub resolver sends; an answer with TC set is asked again over
//!   TCP, as a stub resolver does; `tcp`: over TCP from the start, one connection per query),
//!   then, with `--connect-port`, one TCP connect to the answer's first address right away. One
//!   JSON line per name: `rcode`, `addrs`, `from`, `transport` (of the answer), `truncated` (the
//!   UDP answer had TC), and `connected` (`null` without an address or port) with `error`; an
//!   IPv4 address in `--names` is only connected to. A query not answered within MS (default
//!   2,000) is `rcode: null`.
//!
//! - `http-serve --port P --name NAME [--fail-every N] [--log FILE] [--delay-ms MS]`: a minimal HTTP/1.1 server (keep-alive) whose every
//!   answer is `200` with the body `NAME` and the header `x-backend: NAME`, so a client can
//!   tell which backend answered; with `--fail-every N`, every Nth request (over all
//!   connections) is answered `503` instead; with `--log`, each request line is appended to
//!   FILE; with `--delay-ms`, each answer waits MS (at most 10,000) first. The test's backend,
//!   not under test: a handful of
//!   lines of HTTP suffice.
//! - `http-get --addr IP:PORT --count N [--header NAME:VALUE] [--path /p]
//!   [--requests "GET /a,POST /b"]`: N requests one after another (GETs of `--path`, or the
//!   `--requests` in turn; other methods than GET/HEAD send a 5-byte body) on keep-alive
//!   connections (a new one only when the server closed), one JSON line at the end: `codes`
//!   and `bodies` (each distinct body, counted), `sequence` (the first 100 codes in order),
//!   `connections` (opened), `errors`, `ms` (all of them, end to end).
//!
//! Every loop is bounded by `--secs` (at most 60) or `--count` (at most 10,000) and every socket
//! operation has a timeout.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

const IO_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_SECS: f64 = 60.0;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = args
        .split_first()
        .context("usage: nodeward-lab-load serve|crr|rr|hold [--flag value]...")?;
    let flags = Flags::parse(rest)?;
    match cmd.as_str() {
        "serve" => serve(&flags),
        "crr" => crr(&flags),
        "rr" => rr(&flags),
        "hold" => hold(&flags),
        "probe" => probe(&flags),
        "resolve" => resolve(&flags),
        "http-serve" => http_serve(&flags),
        "http-get" => http_get(&flags),
        other => bail!(
            "unknown command {other:?} (serve, crr, rr, hold, probe, resolve, http-serve, http-get)"
        ),
    }
}

struct Flags(Vec<(String, String)>);

impl Flags {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        ensure!(
            args.len().is_multiple_of(2),
            "flags come in pairs: --name value"
        );
        let pairs = args
            .chunks(2)
            .map(|p| {
                let name = p[0]
                    .strip_prefix("--")
                    .with_context(|| format!("expected a --flag, got {:?}", p[0]))?;
                Ok((name.to_string(), p[1].clone()))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self(pairs))
    }

    /// `--NAME C`: a CPU number, if given.
    fn cpu(&self, name: &str) -> anyhow::Result<Option<usize>> {
        self.get(name)
            .map(|v| {
                v.parse()
                    .with_context(|| format!("--{name} must be a CPU number"))
            })
            .transpose()
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn parse_or<T: std::str::FromStr>(&self, name: &str, default: T) -> anyhow::Result<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|e| anyhow::anyhow!("--{name} {v:?}: {e}")),
        }
    }

    fn addr(&self) -> anyhow::Result<SocketAddr> {
        let v = self.get("addr").context("--addr IP:PORT is required")?;
        v.parse().with_context(|| format!("--addr {v:?}"))
    }

    fn secs(&self) -> anyhow::Result<Duration> {
        let secs: f64 = self.parse_or("secs", 3.0)?;
        ensure!(
            secs > 0.0 && secs <= MAX_SECS,
            "--secs must be in (0, {MAX_SECS}]"
        );
        Ok(Duration::from_secs_f64(secs))
    }

    /// `7100-7131,7199` into ports.
    fn ports(&self, name: &str) -> anyhow::Result<Vec<u16>> {
        let mut ports = Vec::new();
        for part in self
            .get(name)
            .unwrap_or("")
            .split(',')
            .filter(|p| !p.is_empty())
        {
            match part.split_once('-') {
                Some((a, b)) => ports.extend(a.parse::<u16>()?..=b.parse::<u16>()?),
                None => ports.push(part.parse()?),
            }
        }
        Ok(ports)
    }
}

fn bind(port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        .or_else(|_| TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))))
        .with_context(|| format!("binding port {port}"))
}

fn serve(flags: &Flags) -> anyhow::Result<()> {
    let mut threads = Vec::new();
    for port in flags.ports("drain")? {
        let listener = bind(port)?;
        // A few acceptors, so one slow client does not hold the others up.
        for _ in 0..4 {
            let listener = listener.try_clone()?;
            threads.push(std::thread::spawn(move || {
                for mut stream in listener.incoming().flatten() {
                    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
                    let mut buf = [0u8; 256];
                    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
                }
            }));
        }
    }
    for port in flags.ports("sink")? {
        let listener = bind(port)?;
        threads.push(std::thread::spawn(move || {
            // Accept and drop: the server sends the first FIN.
            for stream in listener.incoming() {
                drop(stream);
            }
        }));
    }
    let echo_cpu = flags.cpu("echo-cpu")?;
    for port in flags.ports("echo")? {
        let listener = bind(port)?;
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    if let Some(cpu) = echo_cpu
                        && let Err(e) = pin_to(cpu)
                    {
                        eprintln!("echo: {e:#}");
                        return;
                    }
                    echo(stream);
                });
            }
        }));
    }
    ensure!(
        !threads.is_empty(),
        "nothing to serve: give --sink, --echo and/or --drain"
    );
    println!("ready");
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

/// Runs the calling thread on `cpu` only.
fn pin_to(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET stays within it (checked below).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    ensure!(
        cpu < libc::CPU_SETSIZE as usize,
        "CPU {cpu} is beyond CPU_SETSIZE"
    );
    // SAFETY: `cpu` is within the set, as checked.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; the set is valid for its size.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &raw const set) };
    ensure!(
        rc == 0,
        "pinning to CPU {cpu}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// One interval's (or the whole run's) connections.
#[derive(Default)]
struct Tally {
    done: u64,
    errors: u64,
    slow: u64,
    max: Duration,
    first_error: Option<String>,
}

impl Tally {
    fn add(&mut self, took: Duration, result: std::io::Result<()>, slow_after: Duration) {
        match result {
            Ok(()) => self.done += 1,
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| e.to_string());
            }
        }
        if took > slow_after {
            self.slow += 1;
        }
        self.max = self.max.max(took);
    }

    fn merge(&mut self, other: &Self) {
        self.done += other.done;
        self.errors += other.errors;
        self.slow += other.slow;
        self.max = self.max.max(other.max);
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }

    fn json(&self, secs: f64) -> serde_json::Value {
        serde_json::json!({
            "connections": self.done,
            "errors": self.errors,
            "first_error": self.first_error,
            "slow": self.slow,
            "max_ms": self.max.as_secs_f64() * 1000.0,
            "secs": secs,
            "per_sec": self.done as f64 / secs,
        })
    }
}

fn crr(flags: &Flags) -> anyhow::Result<()> {
    let addr = flags.addr()?;
    let secs = flags.secs()?;
    let threads: usize = flags.parse_or("threads", 4)?;
    ensure!((1..=64).contains(&threads), "--threads must be 1..=64");
    let client_closes = match flags.get("close").unwrap_or("server") {
        "server" => false,
        "client" => true,
        other => bail!("--close {other:?}: server or client"),
    };
    let slow_after = Duration::from_millis(flags.parse_or("slow-ms", 1000)?);
    let report_ms: u64 = flags.parse_or("report-ms", 0)?;
    let stop_file = flags.get("stop-file").map(std::path::PathBuf::from);
    let interval = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let deadline = start + secs;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (interval, stop) = (interval.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    let result = one_connection(addr, &mut buf, client_closes);
                    let took = t0.elapsed();
                    interval
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .add(took, result, slow_after);
                }
            })
        })
        .collect();
    // This thread reports each interval and watches for the stop file.
    let tick = Duration::from_millis(if report_ms > 0 { report_ms } else { 50 });
    let mut total = Tally::default();
    let mut last = start;
    while handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(tick);
        if stop_file.as_ref().is_some_and(|f| f.exists()) {
            stop.store(true, Ordering::Relaxed);
        }
        if report_ms > 0 {
            let now = Instant::now();
            let taken = std::mem::take(
                &mut *interval
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            let mut line = taken.json((now - last).as_secs_f64());
            line["interval"] = true.into();
            line["t_ms"] = ((now - start).as_secs_f64() * 1000.0).into();
            println!("{line}");
            std::io::stdout().flush()?;
            total.merge(&taken);
            last = now;
        }
    }
    for h in handles {
        let _ = h.join();
    }
    total.merge(
        &interval
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    println!("{}", total.json(start.elapsed().as_secs_f64()));
    Ok(())
}

/// Connect, wait for the server's FIN, close; or, when the client closes first, connect, send
/// our FIN, wait for the server's, close.
fn one_connection(addr: SocketAddr, buf: &mut [u8], client_closes: bool) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    if client_closes {
        stream.shutdown(std::net::Shutdown::Write)?;
    }
    while stream.read(buf)? > 0 {}
    Ok(())
}

fn rr(flags: &Flags) -> anyhow::Result<()> {
    let addr = flags.addr()?;
    let secs = flags.secs()?;
    let size: usize = flags.parse_or("size", 64)?;
    ensure!((1..=65_536).contains(&size), "--size must be 1..=65536");
    if let Some(cpu) = flags.cpu("cpu")? {
        pin_to(cpu)?;
    }
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let msg = vec![0x5a_u8; size];
    let mut got = vec![0u8; size];
    // The first 10% warms up caches and conntrack; it is not recorded.
    let warmup = secs / 10;
    let start = Instant::now();
    let mut samples: Vec<u32> = Vec::with_capacity(1 << 20);
    loop {
        let t0 = Instant::now();
        stream.write_all(&msg)?;
        stream.read_exact(&mut got)?;
        let rtt = t0.elapsed();
        let since = start.elapsed();
        if since >= warmup {
            samples.push(u32::try_from(rtt.as_nanos()).unwrap_or(u32::MAX));
        }
        if since >= secs {
            break;
        }
    }
    ensure!(!samples.is_empty(), "no round trips recorded");
    samples.sort_unstable();
    let pct = |p: f64| {
        // Nearest rank.
        let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
        f64::from(samples[rank.clamp(1, samples.len()) - 1]) / 1000.0
    };
    println!(
        "{}",
        serde_json::json!({
            "round_trips": samples.len(),
            "p50_us": pct(50.0),
            "p90_us": pct(90.0),
            "p99_us": pct(99.0),
            "max_us": pct(100.0),
        })
    );
    Ok(())
}

fn hold(flags: &Flags) -> anyhow::Result<()> {
    let addr = flags.addr()?;
    let secs = flags.secs()?;
    let count: usize = flags.parse_or("count", 1000)?;
    ensure!((1..=10_000).contains(&count), "--count must be 1..=10000");
    raise_nofile_limit(count)?;
    let start = Instant::now();
    let mut streams = Vec::with_capacity(count);
    let mut errors = 0_u64;
    let mut first_error = None::<String>;
    for i in 0..count {
        match open_checked(addr, i) {
            Ok(stream) => streams.push(stream),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("connection {}: {e}", i + 1));
            }
        }
    }
    let open_secs = start.elapsed().as_secs_f64();
    // The first line tells whoever watches that the connections are open and idle from now on.
    println!(
        "{}",
        serde_json::json!({
            "opened": streams.len(),
            "errors": errors,
            "first_error": first_error,
            "open_secs": open_secs,
        })
    );
    std::io::stdout().flush()?;
    std::thread::sleep(secs);
    // Idle does not mean gone: each connection must still carry a round trip.
    let mut alive = 0_u64;
    let mut first_dead = None::<String>;
    for (i, stream) in streams.iter_mut().enumerate() {
        match round_trip(stream, i) {
            Ok(()) => alive += 1,
            Err(e) => {
                first_dead.get_or_insert_with(|| format!("connection {}: {e}", i + 1));
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "opened": streams.len(),
            "alive": alive,
            "first_dead": first_dead,
            "held_secs": secs.as_secs_f64(),
        })
    );
    Ok(())
}

fn probe(flags: &Flags) -> anyhow::Result<()> {
    let addr = flags.addr()?;
    let proto = flags.get("proto").unwrap_or("tcp").to_owned();
    let count: usize = flags.parse_or("count", 1)?;
    ensure!((1..=100).contains(&count), "--count must be 1..=100");
    let timeout = Duration::from_millis(flags.parse_or("timeout-ms", 2000)?);
    let interval = Duration::from_millis(flags.parse_or("interval-ms", 0)?);
    ensure!(
        interval <= Duration::from_secs(1),
        "--interval-ms must be at most 1000"
    );
    let hold_secs: f64 = flags.parse_or("hold-secs", 0.0)?;
    ensure!(
        (0.0..=MAX_SECS).contains(&hold_secs),
        "--hold-secs must be in [0, {MAX_SECS}]"
    );
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(interval);
        }
        let start = Instant::now();
        let mut line = serde_json::json!({});
        let outcome: std::io::Result<(u16, SocketAddr, Option<TcpStream>)> = match proto.as_str() {
            "tcp" => TcpStream::connect_timeout(&addr, timeout).and_then(|mut s| {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                let local = s.local_addr()?.port();
                let peer = s.peer_addr()?;
                round_trip(&mut s, i)?;
                Ok((local, peer, Some(s)))
            }),
            "udp" | "udpc" => udp_probe(addr, proto == "udpc", timeout, i)
                .map(|(local, peer)| (local, peer, None)),
            other => bail!("--proto {other:?}: tcp, udp or udpc"),
        };
        line["ms"] = serde_json::json!(start.elapsed().as_secs_f64() * 1000.0);
        match outcome {
            Ok((local, peer, stream)) => {
                line["ok"] = true.into();
                line["local_port"] = local.into();
                line["peer"] = peer.to_string().into();
                println!("{line}");
                std::io::stdout().flush()?;
                if let (Some(mut stream), true) = (stream, hold_secs > 0.0) {
                    std::thread::sleep(Duration::from_secs_f64(hold_secs));
                    let alive = round_trip(&mut stream, i + 1).is_ok();
                    println!("{}", serde_json::json!({ "alive": alive }));
                }
            }
            Err(e) => {
                line["ok"] = false.into();
                line["error"] = e.to_string().into();
                line["errno"] = e.raw_os_error().into();
                println!("{line}");
            }
        }
        std::io::stdout().flush()?;
    }
    Ok(())
}

/// One datagram and its echo; the peer is what the application sees as the reply's source
/// (or, connected, as the socket's peer).
fn udp_probe(
    addr: SocketAddr,
    connected: bool,
    timeout: Duration,
    i: usize,
) -> std::io::Result<(u16, SocketAddr)> {
    let bind: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(timeout))?;
    let msg = format!("nodeward-lab probe {i}\n").into_bytes();
    let mut buf = [0u8; 512];
    if connected {
        socket.connect(addr)?;
        let peer = socket.peer_addr()?;
        socket.send(&msg)?;
        let n = socket.recv(&mut buf)?;
        if buf[..n] != msg[..] {
            return Err(std::io::Error::other("the echo differs"));
        }
        return Ok((socket.local_addr()?.port(), peer));
    }
    socket.send_to(&msg, addr)?;
    let (n, from) = socket.recv_from(&mut buf)?;
    if buf[..n] != msg[..] {
        return Err(std::io::Error::other("the echo differs"));
    }
    Ok((socket.local_addr()?.port(), from))
}

/// Connects and checks one echo round trip.
fn open_checked(addr: SocketAddr, i: usize) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    round_trip(&mut stream, i)?;
    Ok(stream)
}

/// Eight bytes naming the connection, echoed back unchanged.
fn round_trip(stream: &mut TcpStream, i: usize) -> std::io::Result<()> {
    let msg = (i as u64).to_be_bytes();
    stream.write_all(&msg)?;
    let mut got = [0u8; 8];
    stream.read_exact(&mut got)?;
    if got == msg {
        Ok(())
    } else {
        Err(std::io::Error::other("the echo differs"))
    }
}

/// Room for `count` sockets: the soft limit on open files is often 1,024.
fn raise_nofile_limit(count: usize) -> anyhow::Result<()> {
    let want = libc::rlim_t::try_from(count + 64).unwrap_or(libc::rlim_t::MAX);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        ensure!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0,
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
        if lim.rlim_cur >= want {
            return Ok(());
        }
        ensure!(
            lim.rlim_max >= want,
            "--count {count} needs {want} open files; the hard limit is {}",
            lim.rlim_max
        );
        lim.rlim_cur = want;
        ensure!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) == 0,
            "setrlimit(RLIMIT_NOFILE, {want}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn resolve(flags: &Flags) -> anyhow::Result<()> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let dns: SocketAddr = flags
        .get("dns")
        .context("--dns IP:PORT is required")?
        .parse()
        .context("--dns")?;
    let names: Vec<&str> = flags
        .get("names")
        .context("--names is required")?
        .split(',')
        .filter(|n| !n.is_empty())
        .collect();
    ensure!(
        (1..=10_000).contains(&names.len()),
        "--names: 1 to 10,000 names"
    );
    let port: Option<u16> = flags.get("connect-port").map(str::parse).transpose()?;
    let timeout = Duration::from_millis(flags.parse_or("timeout-ms", 2000)?);
    let transport = flags.get("transport").unwrap_or("udp");
    ensure!(
        matches!(transport, "udp" | "tcp"),
        "--transport: udp or tcp, not {transport:?}"
    );
    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(timeout))?;
    let mut buf = vec![0u8; 4096];
    for (i, name) in names.iter().enumerate() {
        // An address instead of a name: only the connection.
        if let (Ok(addr), Some(port)) = (name.parse::<Ipv4Addr>(), port) {
            let connected = TcpStream::connect_timeout(
                &SocketAddr::from((addr, port)),
                Duration::from_millis(900),
            )
            .is_ok();
            println!(
                "{}",
                serde_json::json!({ "name": name, "connected": connected })
            );
            continue;
        }
        let id = u16::try_from(i % 65_536).unwrap_or(0);
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
        let start = Instant::now();
        let query = m.to_vec()?;
        let mut line = serde_json::json!({ "name": name, "transport": transport });
        let mut reply = if transport == "tcp" {
            None
        } else {
            socket.send_to(&query, dns)?;
            loop {
                match socket.recv_from(&mut buf) {
                    Ok((len, from)) => {
                        line["from"] = from.to_string().into();
                        match Message::from_vec(&buf[..len]) {
                            Ok(r) if r.metadata.id == id => break Some(r),
                            _ => {}
                        }
                    }
                    Err(_) => break None,
                }
            }
        };
        let truncated = reply.as_ref().is_some_and(|r| r.metadata.truncation);
        line["truncated"] = truncated.into();
        if transport == "tcp" || truncated {
            line["transport"] = "tcp".into();
            reply = match resolve_tcp(dns, &query, id, timeout) {
                Ok((r, from)) => {
                    line["from"] = from.to_string().into();
                    Some(r)
                }
                Err(e) => {
                    line["tcp_error"] = e.to_string().into();
                    None
                }
            };
        }
        line["dns_ms"] = (start.elapsed().as_secs_f64() * 1000.0).into();
        let mut addrs = Vec::new();
        if let Some(r) = &reply {
            line["rcode"] = u16::from(r.metadata.response_code).into();
            for a in &r.answers {
                if let RData::A(a) = &a.data {
                    addrs.push(a.0);
                }
            }
        }
        line["addrs"] = addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .into();
        if let (Some(port), Some(addr)) = (port, addrs.first()) {
            // Less than a SYN retransmission: a first SYN dropped shows as a failure.
            match TcpStream::connect_timeout(
                &SocketAddr::from((*addr, port)),
                Duration::from_millis(900),
            ) {
                Ok(_) => line["connected"] = true.into(),
                Err(e) => {
                    line["connected"] = false.into();
                    line["error"] = e.to_string().into();
                    // Whether it was the timing (a later connection works) or the address.
                    std::thread::sleep(Duration::from_millis(100));
                    line["retry_connected"] = TcpStream::connect_timeout(
                        &SocketAddr::from((*addr, port)),
                        Duration::from_millis(900),
                    )
                    .is_ok()
                    .into();
                }
            }
        }
        println!("{line}");
    }
    std::io::stdout().flush()?;
    Ok(())
}

/// One DNS query over a new TCP connection to `dns` (2-byte length prefixes, RFC 7766): the
/// answer with `id` and the peer the connection shows (`getpeername`).
fn resolve_tcp(
    dns: SocketAddr,
    query: &[u8],
    id: u16,
    timeout: Duration,
) -> anyhow::Result<(hickory_proto::op::Message, SocketAddr)> {
    let mut stream = TcpStream::connect_timeout(&dns, timeout).context("connect")?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let len = u16::try_from(query.len()).context("query over 64 KiB")?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.write_all(&framed).context("send")?;
    loop {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).context("read the length")?;
        let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut answer).context("read the answer")?;
        let r = hickory_proto::op::Message::from_vec(&answer).context("parse the answer")?;
        if r.metadata.id == id {
            return Ok((r, stream.peer_addr()?));
        }
    }
}

/// Reads one HTTP/1.1 message head (at most 64 KiB) and returns it, with what was read past it.
fn read_head(stream: &mut TcpStream, carry: &mut Vec<u8>) -> std::io::Result<Option<String>> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = carry.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&carry[..end]).into_owned();
            carry.drain(..end + 4);
            return Ok(Some(head));
        }
        if carry.len() > 64 * 1024 {
            return Err(std::io::Error::other("head over 64 KiB"));
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(None);
        }
        carry.extend_from_slice(&buf[..n]);
    }
}

fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Reads `len` body bytes (the carry first).
fn read_body(stream: &mut TcpStream, carry: &mut Vec<u8>, len: usize) -> std::io::Result<Vec<u8>> {
    while carry.len() < len {
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        carry.extend_from_slice(&buf[..n]);
    }
    Ok(carry.drain(..len).collect())
}

fn http_serve(flags: &Flags) -> anyhow::Result<()> {
    let port: u16 = flags.parse_or("port", 0)?;
    let name = flags.get("name").context("--name is required")?.to_owned();
    let fail_every: u64 = flags.parse_or("fail-every", 0)?;
    let delay_ms: u64 = flags.parse_or("delay-ms", 0)?;
    ensure!(delay_ms <= 10_000, "--delay-ms must be at most 10000");
    let delay = Duration::from_millis(delay_ms);
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let log = match flags.get("log") {
        Some(path) => Some(std::sync::Arc::new(std::sync::Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {path}"))?,
        ))),
        None => None,
    };
    let listener = bind(port)?;
    for stream in listener.incoming().flatten() {
        let name = name.clone();
        let served = served.clone();
        let log = log.clone();
        std::thread::spawn(move || {
            let mut stream = stream;
            let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
            let _ = stream.set_nodelay(true);
            let mut carry = Vec::new();
            while let Ok(Some(head)) = read_head(&mut stream, &mut carry) {
                if read_body(&mut stream, &mut carry, content_length(&head)).is_err() {
                    break;
                }
                if let Some(log) = &log {
                    let line = head.lines().next().unwrap_or_default();
                    let mut file = log
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let _ = writeln!(file, "{line}");
                }
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                let n = served.fetch_add(1, Ordering::Relaxed) + 1;
                let status = if fail_every > 0 && n.is_multiple_of(fail_every) {
                    "503 Service Unavailable"
                } else {
                    "200 OK"
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nx-backend: {name}\r\n\r\n{name}",
                    name.len()
                );
                if stream.write_all(answer.as_bytes()).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

fn http_get(flags: &Flags) -> anyhow::Result<()> {
    let addr = flags.addr()?;
    let count: usize = flags.parse_or("count", 1)?;
    ensure!((1..=10_000).contains(&count), "--count must be 1..=10000");
    let path = flags.get("path").unwrap_or("/").to_owned();
    // (method, path) of each request in turn, cycling; a method other than GET and HEAD sends
    // a 5-byte body.
    let requests: Vec<(String, String)> = match flags.get("requests") {
        Some(list) => list
            .split(',')
            .map(|r| {
                let (m, p) = r.trim().split_once(' ').unwrap_or((r.trim(), "/"));
                (m.to_owned(), p.to_owned())
            })
            .collect(),
        None => vec![("GET".to_owned(), path)],
    };
    let mut sequence = Vec::new();
    let mut connections = 0u64;
    let extra = flags
        .get("header")
        .map(|h| format!("{h}\r\n"))
        .unwrap_or_default();
    let mut codes = std::collections::BTreeMap::<String, u64>::new();
    let mut bodies = std::collections::BTreeMap::<String, u64>::new();
    let mut errors = Vec::new();
    let mut conn: Option<(TcpStream, Vec<u8>)> = None;
    let start = Instant::now();
    for i in 0..count {
        let (method, path) = &requests[i % requests.len()];
        let body = if method == "GET" || method == "HEAD" {
            ""
        } else {
            "hello"
        };
        let mut exchange =
            |conn: &mut Option<(TcpStream, Vec<u8>)>| -> std::io::Result<(String, String)> {
                if conn.is_none() {
                    connections += 1;
                    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
                    s.set_read_timeout(Some(IO_TIMEOUT))?;
                    s.set_write_timeout(Some(IO_TIMEOUT))?;
                    s.set_nodelay(true)?;
                    *conn = Some((s, Vec::new()));
                }
                let Some((stream, carry)) = conn.as_mut() else {
                    unreachable!("just connected");
                };
                write!(
                    stream,
                    "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{extra}content-length: {}\r\n\r\n{body}",
                    body.len()
                )?;
                let head = read_head(stream, carry)?
                    .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
                let body = read_body(stream, carry, content_length(&head))?;
                let code = head.split(' ').nth(1).unwrap_or("?").to_owned();
                if head.to_ascii_lowercase().contains("connection: close") {
                    *conn = None;
                }
                Ok((code, String::from_utf8_lossy(&body).trim().to_owned()))
            };
        match exchange(&mut conn) {
            Ok((code, body)) => {
                if sequence.len() < 100 {
                    sequence.push(code.clone());
                }
                *codes.entry(code).or_default() += 1;
                *bodies.entry(body).or_default() += 1;
            }
            Err(e) => {
                conn = None;
                if sequence.len() < 100 {
                    sequence.push("error".to_owned());
                }
                if errors.len() < 10 {
                    errors.push(e.to_string());
                }
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "codes": codes,
            "sequence": sequence,
            "connections": connections,
            "bodies": bodies,
            "errors": errors,
            "ms": start.elapsed().as_secs_f64() * 1000.0,
        })
    );
    Ok(())
}
