//! What one kernel flow costs the agent, without a kernel: synthetic `FlowEvent`s of
//! `bench datapath`'s shape (a TCP SYN between two of 1,000 pods, allowed by a rule) go through
//! what the flow reader does with each (enrichment, metrics, the in-memory ring) and through the
//! flow log's writer into a temporary directory. They arrive in bursts, as the reader drains
//! the ring every 20 ms.
//!
//! Prints the CPU time per flow of the whole process and of the reader alone (user + system,
//! from getrusage), so the log writer's share is the difference.
//!
//! `cargo run --release -p nodeward --example flow_cost [FLOWS]`

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_common::FlowEvent;
use nodeward::flows::log::{FlowLog, FlowLogConfig};
use nodeward::flows::{
    AddressInfo, Clock, Endpoints, EnrichmentIndex, FlowStore, PolicyRef, from_event,
};
use nodeward::metrics::Metrics;

const PODS: u32 = 1000;
/// Flows per drain: about what one agent sees in 20 ms of `bench datapath`'s connection test.
const BURST: usize = 500;
const DRAIN_EVERY: Duration = Duration::from_millis(20);

fn pod_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        200,
        u8::try_from(i / 250).unwrap_or(0),
        1 + (i % 250) as u8,
    )
}

fn index() -> EnrichmentIndex {
    let mut index = EnrichmentIndex {
        node_name: "nwl-bench-n1".into(),
        ..EnrichmentIndex::default()
    };
    for i in 0..PODS {
        let labels: Arc<[String]> = vec![
            format!("k8s:app=peer-{i}"),
            "k8s:io.kubernetes.pod.namespace=bench".to_owned(),
        ]
        .into();
        index.addresses.insert(
            IpAddr::V4(pod_addr(i)),
            AddressInfo {
                namespace: "bench".into(),
                pod_name: format!("peer-{i}").into(),
                labels: labels.clone(),
            },
        );
        index.identity_labels.insert(300 + i, labels);
    }
    index.rules.insert(
        7,
        Arc::new(PolicyRef::new(
            "NetworkPolicy".into(),
            "bench".into(),
            "allow-peers-3".into(),
            "ingress[0]".into(),
        )),
    );
    index
}

fn event(n: u32) -> FlowEvent {
    let src = n % PODS;
    let dst = (n + 1) % PODS;
    // IPv4 as the datapath writes it: IPv4-mapped IPv6.
    let saddr = pod_addr(src).to_ipv6_mapped().octets();
    let daddr = pod_addr(dst).to_ipv6_mapped().octets();
    FlowEvent {
        ktime_ns: 1_000_000_000 + u64::from(n) * 40_000,
        saddr,
        daddr,
        sport_be: u16::try_from(32768 + n % 28000).unwrap_or(0).to_be(),
        dport_be: 6000u16.to_be(),
        protocol: 6,
        family: 4,
        direction: agent_common::DIR_INGRESS,
        verdict: agent_common::VERDICT_FORWARDED,
        drop_reason: 0,
        tcp_flags: agent_common::tcp_flags::SYN,
        is_reply: 0,
        _pad: 0,
        ifindex: 5,
        src_identity: 300 + src,
        dst_identity: 300 + dst,
        rule_id: 7,
        _pad2: 0,
        ..FlowEvent::default()
    }
}

/// User + system CPU time of `who` (`RUSAGE_SELF` or `RUSAGE_THREAD`).
fn cpu(who: libc::c_int) -> Duration {
    // SAFETY: getrusage fills the struct we own.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &raw mut usage);
        usage
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn main() -> anyhow::Result<()> {
    let flows: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(100_000);
    let dir = std::env::temp_dir().join(format!("nodeward-flow-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let log = FlowLog::start(FlowLogConfig {
        dir: dir.clone(),
        max_bytes: 16 * 1024 * 1024,
        files: 8,
    })?;
    let store = FlowStore::new(4096);
    let metrics = Metrics::new()?;
    let mut endpoints = Endpoints::new(Arc::new(index()));
    let clock = Clock::new();

    let started = Instant::now();
    let (process0, reader0) = (cpu(libc::RUSAGE_SELF), cpu(libc::RUSAGE_THREAD));
    let mut n = 0u32;
    let mut dropped = 0usize;
    let mut reader_busy = Duration::ZERO;
    while (n as usize) < flows {
        let next = Instant::now() + DRAIN_EVERY;
        let busy = cpu(libc::RUSAGE_THREAD);
        for _ in 0..BURST.min(flows - n as usize) {
            let flow = Arc::new(from_event(&event(n), &mut endpoints, &clock));
            metrics.observe_flow(&flow);
            if !log.offer(flow.clone()) {
                dropped += 1;
            }
            store.push(flow);
            n += 1;
        }
        reader_busy += cpu(libc::RUSAGE_THREAD) - busy;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    anyhow::ensure!(
        log.sync(Duration::from_secs(30)),
        "the flow log did not catch up"
    );
    let process = cpu(libc::RUSAGE_SELF) - process0;
    let reader = cpu(libc::RUSAGE_THREAD) - reader0;
    let per = |d: Duration| d.as_secs_f64() * 1e6 / flows as f64;
    println!(
        "{flows} flows in {:.1} s: {:.2} us CPU per flow in all, reader {:.2} (busy {:.2}), \
         flow log writer {:.2}; {dropped} not logged (queue full), {} written",
        started.elapsed().as_secs_f64(),
        per(process),
        per(reader),
        per(reader_busy),
        per(process.saturating_sub(reader)),
        log.status().written,
    );
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
