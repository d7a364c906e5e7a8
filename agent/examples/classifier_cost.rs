//! What one run of the TC classifiers costs, in nanoseconds, on crafted packets through
//! `BPF_PROG_TEST_RUN` with a repeat count (the kernel times the runs). The endpoint has
//! `bench datapath`'s large policy: 10,000 ingress rules over 1,000 peer identities in the
//! ipcache. New flows on tuples conntrack has never seen are timed one run per call (each takes a
//! fresh conntrack element, and evicts one once the table is full), the median of 20,000 calls.
//! Unlike a connections/s ratio on a shared machine, these figures are stable enough to
//! compare two builds of the eBPF side; they leave out cache misses under real load.
//!
//! Needs root: it makes a network namespace of its own (a veth pair there gives the programs
//! their `skb->ifindex`) and loads a private, unpinned copy of the datapath.
//!
//! `cargo run --release -p nodeward --example classifier_cost [REPEAT]`

use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::Duration;

use agent_common::{
    CONFIG_EVENTS_ALL_FLOWS, DIR_INGRESS, EP_HAS_IPV4, EP_INGRESS_ENFORCED, EndpointInfo,
    IpcacheValue, MAX_CONNTRACK, POLICY_ALLOW, POLICY_KEY_PREFIX_FULL, PolicyKey, PolicyValue,
    program_names,
};
use anyhow::{Context as _, Result, bail, ensure};
use aya::maps::{MapData, RingBuf};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use nodeward::datapath::loader::Datapath;
use nodeward::datapath::{MapWriter as _, PolicyEntryKey, addr_bytes};

const POD: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const POD_IDENTITY: u32 = 1000;
const POLICY_SET: u32 = 7;
const PEERS: u32 = 1000;
const PORTS: u16 = 10;
const FIRST_PORT: u16 = 8000;
const FIRST_PEER_IDENTITY: u32 = 2000;
/// Runs per `BPF_PROG_TEST_RUN` call that emits events, drained between calls. Few enough that
/// the unread bytes stay under the datapath's wakeup threshold (64 KiB, about 800 events), as
/// they do when the agent drains the ring on its timer; each event past it forces a wakeup.
const EVENT_BATCH: u32 = 500;
const CALLS: usize = 21;
/// Calls (one run each) behind each fresh-tuple figure.
const FRESH: u32 = 20_000;

fn main() -> Result<()> {
    let repeat: u32 = match std::env::args().nth(1) {
        Some(n) => n.parse().context("REPEAT must be a number")?,
        None => 100_000,
    };
    // SAFETY: no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "needs root (BPF_PROG_TEST_RUN, a network namespace, a veth pair)"
    );
    // SAFETY: affects only this (single-threaded) process's network namespace, which goes away
    // with it.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    let out = Command::new("ip")
        .args([
            "link", "add", "nwc-host", "type", "veth", "peer", "name", "nwc-pod",
        ])
        .output()
        .context("running ip(8)")?;
    ensure!(
        out.status.success(),
        "ip link add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let name = CString::new("nwc-host")?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    ensure!(ifindex != 0, "nwc-host has no ifindex");

    let mut dp = Datapath::open(None).context("loading the datapath")?;
    let mut events = dp.maps_mut().take_events().context("events ring")?;
    let maps = dp.maps_mut();
    maps.put_endpoint(
        ifindex,
        &EndpointInfo {
            policy_set: POLICY_SET,
            identity: POD_IDENTITY,
            flags: EP_INGRESS_ENFORCED | EP_HAS_IPV4,
            ipv4: addr_bytes(IpAddr::V4(POD)),
            ..EndpointInfo::default()
        },
    )?;
    for i in 0..PEERS {
        let identity = FIRST_PEER_IDENTITY + i;
        maps.put_ipcache(
            format!("{}/32", peer(i)).parse()?,
            IpcacheValue { identity, flags: 0 },
        )?;
        for port in FIRST_PORT..FIRST_PORT + PORTS {
            maps.put_policy(
                PolicyEntryKey {
                    key: PolicyKey {
                        policy_set_be: POLICY_SET.to_be(),
                        peer_identity_be: identity.to_be(),
                        direction: DIR_INGRESS,
                        protocol: 6,
                        dport_be: port.to_be(),
                    },
                    prefix_len: POLICY_KEY_PREFIX_FULL,
                },
                PolicyValue {
                    verdict: POLICY_ALLOW,
                    _pad: [0; 3],
                    rule_id: 1 + i,
                },
            )?;
        }
    }
    // One peer the ipcache knows that no rule allows.
    let stranger = peer(PEERS);
    maps.put_ipcache(
        format!("{stranger}/32").parse()?,
        IpcacheValue {
            identity: FIRST_PEER_IDENTITY + PEERS,
            flags: 0,
        },
    )?;

    let to_pod = dp.program(program_names::TO_WORKLOAD)?;
    let from_pod = dp.program(program_names::FROM_WORKLOAD)?;
    let client = peer(PEERS / 2);
    let port = FIRST_PORT + PORTS / 2;
    let syn = tcp_packet(client, POD, 40000, port, 0x02);
    let ack = tcp_packet(client, POD, 40000, port, 0x10);
    let reply = tcp_packet(POD, client, port, 40000, 0x10);
    let denied = tcp_packet(stranger, POD, 40000, port, 0x02);
    ensure!(
        run(to_pod, ifindex, &syn, 1)?.0 == 0,
        "the allowed SYN was dropped"
    );
    ensure!(
        run(to_pod, ifindex, &denied, 1)?.0 == 2,
        "the denied SYN passed"
    );

    println!(
        "ns per run (the least of {CALLS} calls: noise only adds), 1 endpoint, {} policy entries, {PEERS} ipcache peers",
        PEERS * u32::from(PORTS)
    );
    let established = least(CALLS, || Ok(run(to_pod, ifindex, &ack, repeat)?.1))?;
    println!("  established, original direction   {established:>6.0}");
    let replies = least(CALLS, || Ok(run(from_pod, ifindex, &reply, repeat)?.1))?;
    println!("  established, reply direction      {replies:>6.0}");
    let new_flows = |dp_events: &mut RingBuf<MapData>, packet: &[u8]| {
        least(CALLS, || {
            let cost = run(to_pod, ifindex, packet, EVENT_BATCH)?.1;
            while dp_events.next().is_some() {}
            Ok(cost)
        })
    };
    let quiet = new_flows(&mut events, &syn)?;
    println!("  new flow allowed, drops-only       {quiet:>6.0}");
    let denied_cost = new_flows(&mut events, &denied)?;
    println!("  new flow denied (event)            {denied_cost:>6.0}");
    fresh_tuples(to_pod, ifindex, client, port)?;
    dp.maps_mut().set_config_flags(CONFIG_EVENTS_ALL_FLOWS)?;
    let to_pod = dp.program(program_names::TO_WORKLOAD)?;
    let loud = least(CALLS, || {
        let cost = run(to_pod, ifindex, &syn, EVENT_BATCH)?.1;
        while events.next().is_some() {}
        Ok(cost)
    })?;
    println!("  new flow allowed, all-flows event  {loud:>6.0}");
    Ok(())
}

/// New flows on tuples conntrack has never seen (a client's first connections; the lab's
/// connect/accept/close load soon reuses its tuples, and those SYNs cost what `new flow
/// allowed` shows): each SYN takes a fresh conntrack element (the figures above overwrite one entry in place), and
/// once the table is full, evicts one. One run per call, the median of [`FRESH`] calls; the
/// established packet at one run per call shows what the kernel's timer reads add to each.
fn fresh_tuples(to_pod: &SchedClassifier, ifindex: u32, client: Ipv4Addr, port: u16) -> Result<()> {
    let syn = |src: Ipv4Addr, sport: u32, dport: u16| {
        let sport = u16::try_from(sport).context("too many fresh tuples")?;
        Ok(run(
            to_pod,
            ifindex,
            &tcp_packet(src, POD, sport, dport, 0x02),
            1,
        )?
        .1)
    };
    // One client on fresh source ports (41000 and up), as the bench's load, and tuples spread
    // over every peer (ports 1024 and up).
    let one_peer = |i: u32, dport: u16| syn(client, 41_000 + i, dport);
    let all_peers = |i: u32| syn(peer(i % PEERS), 1024 + i / PEERS, port);

    let established = tcp_packet(client, POD, 40000, port, 0x10);
    let one_run = median(FRESH, |_| Ok(run(to_pod, ifindex, &established, 1)?.1))?;
    println!("  established, one run per call      {one_run:>6.0}");
    let filling = [
        median(FRESH, |i| one_peer(i, port))?,
        median(FRESH, all_peers)?,
    ];
    for i in FRESH..MAX_CONNTRACK + FRESH {
        all_peers(i)?;
    }
    let full = [
        median(FRESH, |i| one_peer(i, port + 1))?,
        median(FRESH, |i| all_peers(MAX_CONNTRACK + FRESH + i))?,
    ];
    println!(
        "  new flow, fresh tuple (median of {FRESH} single runs; conntrack filling, then full)"
    );
    for (name, fill, full) in [
        ("one peer".to_owned(), filling[0], full[0]),
        (format!("{PEERS} peers"), filling[1], full[1]),
    ] {
        println!("    {name:<12} {fill:>6.0}   full, evicting: {full:>6.0}");
    }
    Ok(())
}

/// The median of `f(0..count)`.
fn median(count: u32, mut f: impl FnMut(u32) -> Result<f64>) -> Result<f64> {
    let mut costs = (0..count).map(&mut f).collect::<Result<Vec<_>>>()?;
    costs.sort_by(f64::total_cmp);
    Ok(costs[costs.len() / 2])
}

fn peer(i: u32) -> Ipv4Addr {
    let [_, _, hi, lo] = i.to_be_bytes();
    Ipv4Addr::new(10, 201, hi, lo)
}

/// Runs `program` `repeat` times on `packet`: its return value and ns per run.
fn run(program: &SchedClassifier, ifindex: u32, packet: &[u8], repeat: u32) -> Result<(u32, f64)> {
    // `struct __sk_buff` up to `ifindex` (offset 40): the kernel sets skb->dev from it.
    let mut ctx = [0u8; 44];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut ctx_out = [0u8; 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            ctx_in: Some(&ctx),
            ctx_out: Some(&mut ctx_out),
            repeat,
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    Ok((result.return_value, ns(result.duration)))
}

fn ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

fn least(calls: usize, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    (0..calls).try_fold(f64::INFINITY, |least, _| Ok(least.min(f()?)))
}

/// Ethernet, IPv4 (no options) and a 20-byte TCP header with `flags`.
fn tcp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    p.extend_from_slice(&[0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p
}
