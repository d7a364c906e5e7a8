//! The DNS proxy's UDP loop: a query from a pod is checked against the pod's allow list,
//! forwarded unchanged to the upstream resolver, and the answer is released to the pod only
//! after [`DnsPolicy::learn`] has put its addresses into the maps, so the pod's first
//! connection to them is never dropped.
//!
//! Bounds: an upstream that does not answer within `timeout` gets the pod a SERVFAIL; each pod
//! (source address) has at most `max_in_flight` queries outstanding, the rest are dropped (the
//! client retries), so a flood from one pod cannot starve the others.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use super::{Answer, MAX_UDP_MESSAGE, QueryVerdict, RefuseWith, check_query, learn_answer};
use crate::policy::DnsAllow;

/// What the proxy needs from the agent.
pub trait DnsPolicy: Send + Sync + 'static {
    /// The names the pod with source address `src` may ask for.
    fn allow_for(&self, src: IpAddr) -> DnsAllow;
    /// Puts the answer's addresses into the maps for the pod; the answer is released when this
    /// returns.
    fn learn(&self, src: IpAddr, answer: &Answer) -> impl Future<Output = ()> + Send;
    /// A query refused (a DROPPED flow naming it).
    fn refused(&self, src: IpAddr, question: &super::Question);
    /// The resolver to forward to now (`None`: `ProxyConfig::upstream`).
    fn upstream(&self) -> Option<SocketAddr> {
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
    pub timeout: Duration,
    pub max_in_flight: usize,
    pub refuse_with: RefuseWith,
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
    let limits: Arc<Mutex<HashMap<IpAddr, Arc<Semaphore>>>> = Arc::default();
    let mut buf = vec![0u8; MAX_UDP_MESSAGE];
    loop {
        let (len, client) = socket.recv_from(&mut buf).await?;
        let query = buf[..len].to_vec();
        let permit = {
            let mut limits = limits
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Idle pods' semaphores go once they are many.
            if limits.len() > 4096 {
                limits.retain(|_, s| s.available_permits() < config.max_in_flight);
            }
            let sem = limits
                .entry(client.ip())
                .or_insert_with(|| Arc::new(Semaphore::new(config.max_in_flight)))
                .clone();
            sem.try_acquire_owned()
        };
        let Ok(permit) = permit else {
            tracing::debug!(client = %client, "DNS query dropped: too many in flight");
            continue;
        };
        let (socket, policy) = (socket.clone(), policy.clone());
        let arrived = std::time::Instant::now();
        tokio::spawn(async move {
            if let Some((reply, record)) = handle(&query, client, &config, &*policy).await {
                let _ = socket.send_to(&reply, client).await;
                let record = QueryRecord {
                    elapsed: arrived.elapsed(),
                    ..record
                };
                policy.replied(&record);
            }
            drop(permit);
        });
    }
}

/// One query to its reply and what happened (`None`: no reply).
async fn handle<P: DnsPolicy>(
    query: &[u8],
    client: SocketAddr,
    config: &ProxyConfig,
    policy: &P,
) -> Option<(Vec<u8>, QueryRecord)> {
    let src = client.ip();
    let record = |question: &super::Question, rcode: u16| QueryRecord {
        client,
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
    let upstream = policy.upstream().unwrap_or(config.upstream);
    let Some(answer) = forward(query, question.id, upstream, config.timeout).await else {
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
async fn forward(
    query: &[u8],
    id: u16,
    upstream: SocketAddr,
    timeout: Duration,
) -> Option<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let socket = UdpSocket::bind(bind).await.ok()?;
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Instant;

    use hickory_proto::op::{Message, ResponseCode};
    use hickory_proto::rr::{Name, RData, Record, RecordType, rdata};

    use super::*;
    use crate::policy::fqdn::FqdnMatch;

    struct Recorder {
        learned: AtomicBool,
        refused: AtomicUsize,
    }

    impl DnsPolicy for Recorder {
        fn allow_for(&self, _: IpAddr) -> DnsAllow {
            DnsAllow::Only(vec![FqdnMatch::Pattern("*.example.test".into())])
        }
        async fn learn(&self, _: IpAddr, answer: &Answer) {
            assert_eq!(answer.addresses.len(), 1);
            // A slow map update: the pod must still see the answer only after it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.learned.store(true, Ordering::SeqCst);
        }
        fn refused(&self, _: IpAddr, _: &super::super::Question) {
            self.refused.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// An upstream that answers every query with one A record, and counts them.
    async fn upstream(answer: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind upstream");
        let addr = socket.local_addr().expect("addr");
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                seen.fetch_add(1, Ordering::SeqCst);
                if !answer {
                    continue;
                }
                let q = Message::from_vec(&buf[..len]).expect("query parses");
                let mut m = Message::response(q.metadata.id, q.metadata.op_code);
                m.add_queries(q.queries.clone());
                m.add_answer(Record::from_rdata(
                    q.queries[0].name().clone(),
                    30,
                    RData::A(rdata::A("203.0.113.7".parse().expect("ip"))),
                ));
                let _ = socket.send_to(&m.to_vec().expect("encodes"), from).await;
            }
        });
        (addr, count)
    }

    async fn proxy(upstream: SocketAddr) -> (SocketAddr, Arc<Recorder>) {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind proxy"));
        let addr = socket.local_addr().expect("addr");
        let recorder = Arc::new(Recorder {
            learned: AtomicBool::new(false),
            refused: AtomicUsize::new(0),
        });
        let config = ProxyConfig {
            upstream,
            timeout: Duration::from_millis(300),
            max_in_flight: 8,
            refuse_with: RefuseWith::Refused,
        };
        tokio::spawn(serve_udp(socket, config, recorder.clone()));
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

    #[tokio::test]
    async fn an_allowed_answer_is_released_only_after_the_addresses_are_learned() {
        let (up, _) = upstream(true).await;
        let (p, rec) = proxy(up).await;
        let reply = ask(p, "api.example.test").await;
        assert!(
            rec.learned.load(Ordering::SeqCst),
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
    }
}
