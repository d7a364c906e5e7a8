//! The DNS proxy's loops, over UDP ([`serve_udp`]) and TCP ([`serve_tcp`]): a query from a pod
//! is checked against the pod's allow list, forwarded unchanged to the upstream resolver over
//! the transport the pod used, and the answer is released to the pod only after
//! [`DnsPolicy::learn`] has put its addresses into the maps, so the pod's first connection to
//! them is never dropped. Both transports share [`handle`], which turns one query message into
//! its reply; only the framing differs.
//!
//! A UDP answer with TC (truncated) set is passed back as it is, after learning the addresses
//! it carries: the pod retries over TCP, and that retry comes through [`serve_tcp`].
//!
//! Bounds: an upstream that does not answer within `timeout` gets the pod a SERVFAIL; each pod
//! (source address) has at most `max_in_flight` UDP queries outstanding (the rest are dropped;
//! the client retries) and at most `max_tcp_per_client` TCP connections (more are closed at
//! once), so a flood from one pod cannot starve the others. A TCP connection is closed when it
//! is idle for `tcp_idle`, when a message does not arrive whole within `timeout` of its length
//! (a slow client), and when it sends something that is not a query.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{Answer, MAX_UDP_MESSAGE, QueryVerdict, RefuseWith, check_query, learn_answer};
use crate::policy::DnsAllow;

/// The shortest message a TCP client may announce: a DNS header. Anything shorter is not DNS,
/// and the connection is closed.
const MIN_MESSAGE: usize = 12;

/// How a query reached the proxy; the upstream is asked the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What the proxy needs from the agent.
pub trait DnsPolicy: Send + Sync + 'static {
    /// The names the pod with source address `src` may ask for.
    fn allow_for(&self, src: IpAddr) -> DnsAllow;
    /// Puts the answer's addresses into the maps for the pod; the answer is released when this
    /// returns.
    fn learn(&self, src: IpAddr, answer: &Answer) -> impl Future<Output = ()> + Send;
    /// A query refused (a DROPPED flow naming it).
    fn refused(&self, src: IpAddr, question: &super::Question);
    /// The resolver to forward a query that came over `transport` to now (`None`:
    /// `ProxyConfig::upstream`).
    fn upstream(&self, _transport: Transport) -> Option<SocketAddr> {
        None
    }
    /// A query forwarded (`true`: answered) or not answered (SERVFAIL sent).
    fn answered(&self, _ok: bool) {}
    /// A query replied to (forwarded, refused or SERVFAIL), for flows and metrics.
    fn replied(&self, _record: &QueryRecord) {}
}

/// One query the proxy replied to.
#[derive(Clone, Debug)]
pub struct QueryRecord {
    pub client: SocketAddr,
    pub transport: Transport,
    pub question: super::Question,
    /// The reply's response code (5 REFUSED or 3 NXDOMAIN for a refused query, 2 SERVFAIL for
    /// an upstream that did not answer).
    pub rcode: u16,
    pub refused: bool,
    /// The resolver the query went to (`None` when refused).
    pub upstream: Option<SocketAddr>,
    /// The answer's CNAME chain (the question first) and addresses.
    pub names: Vec<String>,
    pub addresses: Vec<IpAddr>,
    /// From the query's arrival to the reply leaving.
    pub elapsed: Duration,
}

#[derive(Clone, Copy, Debug)]
pub struct ProxyConfig {
    pub upstream: SocketAddr,
    /// The longest wait for an upstream's answer, and for a TCP client's message once its
    /// length has arrived.
    pub timeout: Duration,
    pub max_in_flight: usize,
    /// TCP connections open at once per pod.
    pub max_tcp_per_client: usize,
    /// A TCP connection with no new query for this long is closed.
    pub tcp_idle: Duration,
    pub refuse_with: RefuseWith,
}

/// Per-pod semaphores: at most `per_client` permits held at once by one source address.
struct Limits {
    per_client: usize,
    by_client: Mutex<HashMap<IpAddr, Arc<Semaphore>>>,
}

impl Limits {
    fn new(per_client: usize) -> Self {
        Self {
            per_client,
            by_client: Mutex::default(),
        }
    }

    fn try_acquire(&self, client: IpAddr) -> Option<OwnedSemaphorePermit> {
        let mut limits = self
            .by_client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Idle pods' semaphores go once they are many.
        if limits.len() > 4096 {
            limits.retain(|_, s| s.available_permits() < self.per_client);
        }
        let sem = limits
            .entry(client)
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_client)))
            .clone();
        sem.try_acquire_owned().ok()
    }
}

/// Serves `socket` until it fails.
///
/// # Errors
/// Receiving on `socket` failed.
pub async fn serve_udp<P: DnsPolicy>(
    socket: Arc<UdpSocket>,
    config: ProxyConfig,
    policy: Arc<P>,
) -> std::io::Result<()> {
    let limits = Limits::new(config.max_in_flight);
    let mut buf = vec![0u8; MAX_UDP_MESSAGE];
    loop {
        let (len, client) = socket.recv_from(&mut buf).await?;
        let query = buf[..len].to_vec();
        let Some(permit) = limits.try_acquire(client.ip()) else {
            tracing::debug!(client = %client, "DNS query dropped: too many in flight");
            continue;
        };
        let (socket, policy) = (socket.clone(), policy.clone());
        let arrived = Instant::now();
        tokio::spawn(async move {
            if let Some((reply, record)) =
                handle(&query, client, Transport::Udp, &config, &*policy).await
            {
                let _ = socket.send_to(&reply, client).await;
                replied(&*policy, record, arrived);
            }
            drop(permit);
        });
    }
}

/// Serves `listener` until it fails: each connection carries any number of length-prefixed
/// queries (RFC 7766), answered in order.
///
/// # Errors
/// Accepting on `listener` failed with an error that is not about one connection or a
/// momentary lack of file descriptors.
pub async fn serve_tcp<P: DnsPolicy>(
    listener: TcpListener,
    config: ProxyConfig,
    policy: Arc<P>,
) -> std::io::Result<()> {
    let limits = Limits::new(config.max_tcp_per_client);
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) if accept_error_is_transient(&e) => {
                tracing::debug!(error = %e, "DNS proxy: accept failed; trying again");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let Some(permit) = limits.try_acquire(client.ip()) else {
            tracing::debug!(client = %client, "DNS connection closed: too many open");
            continue;
        };
        let policy = policy.clone();
        tokio::spawn(async move {
            serve_connection(stream, client, &config, &*policy).await;
            drop(permit);
        });
    }
}

/// Out of descriptors or memory, or one connection that went away before it was accepted.
fn accept_error_is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO)
    )
}

/// One pod's TCP connection: queries until it is idle, slow, closed, or sends a message that
/// is not a query.
async fn serve_connection<S, P>(mut stream: S, client: SocketAddr, config: &ProxyConfig, policy: &P)
where
    S: AsyncRead + AsyncWrite + Unpin,
    P: DnsPolicy,
{
    loop {
        let query = match read_message(&mut stream, config.tcp_idle, config.timeout).await {
            Ok(Some(query)) => query,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(client = %client, error = %e, "DNS connection closed");
                return;
            }
        };
        let arrived = Instant::now();
        let Some((reply, record)) = handle(&query, client, Transport::Tcp, config, policy).await
        else {
            tracing::debug!(client = %client, "DNS connection closed: not a query");
            return;
        };
        if write_message(&mut stream, &reply, config.timeout)
            .await
            .is_err()
        {
            return;
        }
        replied(policy, record, arrived);
    }
}

/// Reads one length-prefixed message: `Ok(None)` when the peer closes or stays idle for `idle`
/// before the length; an error when the length is too small for a DNS header or the message
/// does not arrive whole within `timeout`.
async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    idle: Duration,
    timeout: Duration,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match tokio::time::timeout(idle, stream.read_exact(&mut len)).await {
        Err(_) => return Ok(None),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) => {}
    }
    // The prefix is 16 bits, so no message is over 64 KiB; a short one is not DNS.
    let len = usize::from(u16::from_be_bytes(len));
    if len < MIN_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a {len}-byte message is shorter than a DNS header"),
        ));
    }
    let mut message = vec![0u8; len];
    tokio::time::timeout(timeout, stream.read_exact(&mut message))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("a {len}-byte message did not arrive within {timeout:?}"),
            )
        })??;
    Ok(Some(message))
}

/// Writes `message` with its length in front, within `timeout`.
async fn write_message<S: AsyncWrite + Unpin>(
    stream: &mut S,
    message: &[u8],
    timeout: Duration,
) -> std::io::Result<()> {
    let len = u16::try_from(message.len()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "a message over 64 KiB")
    })?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    tokio::time::timeout(timeout, stream.write_all(&framed))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// Tells `policy` about a reply that has left, timed from the query's arrival.
fn replied<P: DnsPolicy>(policy: &P, record: QueryRecord, arrived: Instant) {
    policy.replied(&QueryRecord {
        elapsed: arrived.elapsed(),
        ..record
    });
}

/// One query message to its reply and what happened (`None`: no reply), whatever the
/// transport: refused, or forwarded over `transport` and learned before it is returned.
async fn handle<P: DnsPolicy>(
    query: &[u8],
    client: SocketAddr,
    transport: Transport,
    config: &ProxyConfig,
    policy: &P,
) -> Option<(Vec<u8>, QueryRecord)> {
    let src = client.ip();
    let record = |question: &super::Question, rcode: u16| QueryRecord {
        client,
        transport,
        question: question.clone(),
        rcode,
        refused: false,
        upstream: None,
        names: Vec::new(),
        addresses: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let question = match check_query(query, &policy.allow_for(src), config.refuse_with) {
        QueryVerdict::Drop => return None,
        QueryVerdict::Refuse { question, reply } => {
            policy.refused(src, &question);
            let rcode = match config.refuse_with {
                RefuseWith::Refused => 5,
                RefuseWith::NxDomain => 3,
            };
            let rec = QueryRecord {
                refused: true,
                ..record(&question, rcode)
            };
            return Some((reply, rec));
        }
        QueryVerdict::Forward(q) => q,
    };
    let upstream = policy.upstream(transport).unwrap_or(config.upstream);
    let answer = match transport {
        Transport::Udp => forward_udp(query, question.id, upstream, config.timeout).await,
        Transport::Tcp => forward_tcp(query, question.id, upstream, config.timeout).await,
    };
    let Some(answer) = answer else {
        policy.answered(false);
        let rec = QueryRecord {
            upstream: Some(upstream),
            ..record(&question, 2)
        };
        return super::servfail(query).map(|r| (r, rec));
    };
    policy.answered(true);
    let mut rec = QueryRecord {
        upstream: Some(upstream),
        ..record(&question, 0)
    };
    // A truncated answer (TC) teaches the addresses it carries; the pod retries over TCP.
    if let Some(learned) = learn_answer(&answer, &question.name) {
        if !learned.addresses.is_empty() {
            policy.learn(src, &learned).await;
        }
        rec.rcode = learned.rcode;
        rec.addresses = learned.addresses.iter().map(|(ip, _)| *ip).collect();
        rec.names = learned.names;
    }
    Some((answer, rec))
}

/// Sends `query` to the upstream from a fresh socket (a fresh source port per query) and waits
/// at most `timeout` for a response with the same id.
async fn forward_udp(
    query: &[u8],
    id: u16,
    upstream: SocketAddr,
    timeout: Duration,
) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind(unspecified(upstream)).await.ok()?;
    socket.connect(upstream).await.ok()?;
    socket.send(query).await.ok()?;
    let mut buf = vec![0u8; MAX_UDP_MESSAGE];
    tokio::time::timeout(timeout, async {
        loop {
            let len = socket.recv(&mut buf).await.ok()?;
            if len >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                return Some(buf[..len].to_vec());
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// Sends `query` to the upstream over a fresh TCP connection and reads the response with the
/// same id, all within `timeout`.
async fn forward_tcp(
    query: &[u8],
    id: u16,
    upstream: SocketAddr,
    timeout: Duration,
) -> Option<Vec<u8>> {
    tokio::time::timeout(timeout, async {
        let mut stream = TcpStream::connect(upstream).await.ok()?;
        write_message(&mut stream, query, timeout).await.ok()?;
        loop {
            let answer = read_message(&mut stream, timeout, timeout).await.ok()??;
            if u16::from_be_bytes([answer[0], answer[1]]) == id {
                return Some(answer);
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// The unspecified address of `peer`'s family, port 0.
fn unspecified(peer: SocketAddr) -> SocketAddr {
    if peer.is_ipv4() {
        SocketAddr::from(([0u8; 4], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hickory_proto::op::{Message, ResponseCode};
    use hickory_proto::rr::{Name, RData, Record, RecordType, rdata};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::policy::fqdn::FqdnMatch;

    /// `big.example.test` has this many A records: over UDP the upstream sends the first
    /// [`UDP_SHARE`] with TC set, over TCP all of them.
    const BIG: usize = 40;
    const UDP_SHARE: usize = 5;

    #[derive(Default)]
    struct Recorder {
        /// The number of addresses in the last answer learned (0: none learned yet).
        learned: AtomicUsize,
        refused: AtomicUsize,
        replied: Mutex<Vec<QueryRecord>>,
    }

    impl DnsPolicy for Recorder {
        fn allow_for(&self, _: IpAddr) -> DnsAllow {
            DnsAllow::Only(vec![FqdnMatch::Pattern("*.example.test".into())])
        }
        async fn learn(&self, _: IpAddr, answer: &Answer) {
            // A slow map update: the pod must still see the answer only after it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.learned.store(answer.addresses.len(), Ordering::SeqCst);
        }
        fn refused(&self, _: IpAddr, _: &super::super::Question) {
            self.refused.fetch_add(1, Ordering::SeqCst);
        }
        fn replied(&self, record: &QueryRecord) {
            self.replied
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(record.clone());
        }
    }

    /// The upstream's answer to `query`: one A record, or [`BIG`] for `big.example.test`
    /// (the first [`UDP_SHARE`] with TC set when `truncate`).
    fn answer_for(query: &[u8], truncate: bool) -> Vec<u8> {
        let q = Message::from_vec(query).expect("query parses");
        let mut m = Message::response(q.metadata.id, q.metadata.op_code);
        m.add_queries(q.queries.clone());
        let name = q.queries[0].name().clone();
        let count = if name.to_ascii() == "big.example.test." {
            if truncate {
                m.metadata.truncation = true;
                UDP_SHARE
            } else {
                BIG
            }
        } else {
            1
        };
        for i in 0..count {
            let ip = std::net::Ipv4Addr::new(203, 0, 113, u8::try_from(i + 7).expect("small"));
            m.add_answer(Record::from_rdata(name.clone(), 30, RData::A(rdata::A(ip))));
        }
        m.to_vec().expect("encodes")
    }

    /// An upstream on UDP and TCP (one port) that answers every query ([`answer_for`]) when
    /// `answer`, and counts the queries.
    async fn upstream(answer: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind upstream");
        let addr = socket.local_addr().expect("addr");
        let listener = TcpListener::bind(addr).await.expect("bind upstream TCP");
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                seen.fetch_add(1, Ordering::SeqCst);
                if answer {
                    let _ = socket.send_to(&answer_for(&buf[..len], true), from).await;
                }
            }
        });
        let seen = count.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let second = Duration::from_secs(1);
                    while let Ok(Some(q)) = read_message(&mut stream, second, second).await {
                        seen.fetch_add(1, Ordering::SeqCst);
                        if answer {
                            let reply = answer_for(&q, false);
                            let _ = write_message(&mut stream, &reply, second).await;
                        }
                    }
                });
            }
        });
        (addr, count)
    }

    /// The proxy on UDP and TCP (one port) in front of `upstream`.
    async fn proxy(upstream: SocketAddr) -> (SocketAddr, Arc<Recorder>) {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind proxy"));
        let addr = socket.local_addr().expect("addr");
        let listener = TcpListener::bind(addr).await.expect("bind proxy TCP");
        let recorder = Arc::new(Recorder::default());
        let config = ProxyConfig {
            upstream,
            timeout: Duration::from_millis(300),
            max_in_flight: 8,
            max_tcp_per_client: 4,
            tcp_idle: Duration::from_millis(500),
            refuse_with: RefuseWith::Refused,
        };
        tokio::spawn(serve_udp(socket, config, recorder.clone()));
        tokio::spawn(serve_tcp(listener, config, recorder.clone()));
        (addr, recorder)
    }

    async fn ask(proxy: SocketAddr, name: &str) -> Message {
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
        client
            .send_to(&super::super::query(42, name, RecordType::A), proxy)
            .await
            .expect("send");
        let mut buf = [0u8; 512];
        let len = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
            .await
            .expect("the proxy answers within 5 s")
            .expect("recv");
        Message::from_vec(&buf[..len]).expect("reply parses")
    }

    /// Asks for `name` on an open TCP connection to the proxy.
    async fn ask_tcp(stream: &mut TcpStream, id: u16, name: &str) -> Message {
        let five = Duration::from_secs(5);
        write_message(stream, &super::super::query(id, name, RecordType::A), five)
            .await
            .expect("send over TCP");
        let reply = read_message(stream, five, five)
            .await
            .expect("read over TCP")
            .expect("the proxy answers over TCP within 5 s");
        Message::from_vec(&reply).expect("reply parses")
    }

    #[tokio::test]
    async fn an_allowed_answer_is_released_only_after_the_addresses_are_learned() {
        let (up, _) = upstream(true).await;
        let (p, rec) = proxy(up).await;
        let reply = ask(p, "api.example.test").await;
        assert_eq!(
            rec.learned.load(Ordering::SeqCst),
            1,
            "the answer reached the pod before the maps had its address"
        );
        assert_eq!(reply.metadata.id, 42);
        assert_eq!(reply.answers.len(), 1, "the upstream's answer, unchanged");
    }

    #[tokio::test]
    async fn a_name_not_allowed_is_refused_without_asking_upstream() {
        let (up, count) = upstream(true).await;
        let (p, rec) = proxy(up).await;
        let reply = ask(p, "api.example.org").await;
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        assert_eq!(
            reply.queries[0].name(),
            &Name::from_ascii("api.example.org.").expect("name")
        );
        assert_eq!(count.load(Ordering::SeqCst), 0);
        assert_eq!(rec.refused.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_silent_upstream_gets_the_pod_a_servfail_in_bounded_time() {
        let (up, count) = upstream(false).await;
        let (p, _) = proxy(up).await;
        let start = Instant::now();
        let reply = ask(p, "api.example.test").await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(count.load(Ordering::SeqCst), 1);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        let mut stream = TcpStream::connect(p).await.expect("connect");
        let start = Instant::now();
        let reply = ask_tcp(&mut stream, 7, "api.example.test").await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn tcp_carries_several_queries_learns_first_and_refuses_like_udp() {
        let (up, count) = upstream(true).await;
        let (p, rec) = proxy(up).await;
        let mut stream = TcpStream::connect(p).await.expect("connect");
        for (id, name) in [(1, "api.example.test"), (2, "www.example.test")] {
            rec.learned.store(0, Ordering::SeqCst);
            let reply = ask_tcp(&mut stream, id, name).await;
            assert_eq!(reply.metadata.id, id);
            assert_eq!(reply.answers.len(), 1, "{name}: the upstream's answer");
            assert_eq!(
                rec.learned.load(Ordering::SeqCst),
                1,
                "{name}: the answer came before its address was learned"
            );
        }
        let reply = ask_tcp(&mut stream, 3, "api.example.org").await;
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        assert_eq!(
            count.load(Ordering::SeqCst),
            2,
            "the refused name was not asked"
        );
        let records = rec.replied.lock().expect("lock").clone();
        assert_eq!(records.len(), 3);
        assert!(records.iter().all(|r| r.transport == Transport::Tcp));
        assert!(records[2].refused && records[2].rcode == 5, "{records:?}");
    }

    #[tokio::test]
    async fn a_truncated_udp_answer_is_passed_on_learned_and_the_tcp_retry_learns_the_rest() {
        let (up, _) = upstream(true).await;
        let (p, rec) = proxy(up).await;
        let udp = ask(p, "big.example.test").await;
        assert!(udp.metadata.truncation, "TC reaches the pod");
        assert_eq!(udp.answers.len(), UDP_SHARE);
        assert_eq!(
            rec.learned.load(Ordering::SeqCst),
            UDP_SHARE,
            "what the truncated answer carries is learned"
        );
        let mut stream = TcpStream::connect(p).await.expect("connect");
        let tcp = ask_tcp(&mut stream, 9, "big.example.test").await;
        assert!(!tcp.metadata.truncation);
        assert_eq!(tcp.answers.len(), BIG);
        assert_eq!(rec.learned.load(Ordering::SeqCst), BIG);
    }

    /// Reads from `stream` until it closes; how long that took, or `None` past `limit`.
    async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        let mut buf = [0u8; 1024];
        tokio::time::timeout(limit, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return start.elapsed(),
                    Ok(_) => {}
                }
            }
        })
        .await
        .ok()
    }

    #[tokio::test]
    async fn tcp_clients_that_stall_idle_or_send_garbage_are_cut_off_and_others_still_served() {
        let (up, count) = upstream(true).await;
        let (p, _) = proxy(up).await;
        let limit = Duration::from_secs(3);
        // The largest length the prefix can say, then a few bytes, then nothing: a slow client.
        let mut slow = TcpStream::connect(p).await.expect("connect");
        slow.write_all(&[0xff, 0xff, 1, 2, 3]).await.expect("write");
        // A length too small for a DNS header.
        let mut short = TcpStream::connect(p).await.expect("connect");
        short.write_all(&[0, 3, 1, 2, 3]).await.expect("write");
        // Nothing at all.
        let mut idle = TcpStream::connect(p).await.expect("connect");
        // A well-framed message that is not DNS, after a good query.
        let mut garbage = TcpStream::connect(p).await.expect("connect");
        let reply = ask_tcp(&mut garbage, 5, "api.example.test").await;
        assert_eq!(reply.answers.len(), 1);
        let mut rng = fastrand::Rng::with_seed(0x7463_7064);
        let junk: Vec<u8> = (0..300).map(|_| rng.u8(..)).collect();
        write_message(&mut garbage, &junk, limit)
            .await
            .expect("write");

        // Meanwhile another client is answered (the limit is per pod, so from a new socket).
        let reply = ask(p, "api.example.test").await;
        assert_eq!(reply.answers.len(), 1, "a good client is served meanwhile");

        for (what, stream) in [
            ("a slow client", &mut slow),
            ("a short length", &mut short),
            ("an idle client", &mut idle),
            ("garbage", &mut garbage),
        ] {
            let took = closed_within(stream, limit).await;
            assert!(
                took.is_some(),
                "{what}: the connection stays open past {limit:?}"
            );
        }
        assert_eq!(
            count.load(Ordering::SeqCst),
            2,
            "only the good queries went upstream"
        );

        // Fuzzed frames of any length and content: each connection ends, the proxy stays up.
        for _ in 0..50 {
            let mut s = TcpStream::connect(p).await.expect("connect");
            let len = rng.usize(0..600);
            let bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            let _ = s.write_all(&bytes).await;
            let _ = s.shutdown().await;
            assert!(
                closed_within(&mut s, limit).await.is_some(),
                "a fuzzed frame hangs"
            );
        }
        let mut stream = TcpStream::connect(p).await.expect("connect");
        let reply = ask_tcp(&mut stream, 6, "api.example.test").await;
        assert_eq!(
            reply.answers.len(),
            1,
            "the proxy still answers after the fuzz"
        );
    }

    #[tokio::test]
    async fn one_pod_cannot_hold_more_than_its_share_of_tcp_connections() {
        let (up, _) = upstream(true).await;
        let (p, _) = proxy(up).await;
        let mut held = Vec::new();
        for _ in 0..4 {
            let mut s = TcpStream::connect(p).await.expect("connect");
            // Answered: the connection holds a permit.
            let _ = ask_tcp(&mut s, 1, "api.example.test").await;
            held.push(s);
        }
        let mut fifth = TcpStream::connect(p).await.expect("connect");
        assert!(
            closed_within(&mut fifth, Duration::from_secs(2))
                .await
                .is_some(),
            "a fifth connection from the same pod is closed"
        );
        drop(held);
        // Permits come back as the connections close.
        let ok = eventually_answered(p).await;
        assert!(
            ok,
            "once the pod's connections closed, it may connect again"
        );
    }

    async fn eventually_answered(p: SocketAddr) -> bool {
        for _ in 0..50 {
            let mut s = TcpStream::connect(p).await.expect("connect");
            let five = Duration::from_secs(1);
            let q = super::super::query(3, "api.example.test", RecordType::A);
            if write_message(&mut s, &q, five).await.is_ok()
                && matches!(read_message(&mut s, five, five).await, Ok(Some(_)))
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}
