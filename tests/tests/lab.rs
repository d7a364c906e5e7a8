//! The lab itself, without agents: every pod reaches every other pod, over both address families
//! and both protocols, and `down` (or the next lab, after a crash) leaves nothing behind.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nodeward_lab::topology::Owner;
use nodeward_lab::{Case, DNS_PORT, HTTP_PORT, Lab, LabSpec, METRICS_PORT, probe, sys};

fn network_only() -> LabSpec {
    LabSpec {
        agents: false,
        ..LabSpec::default()
    }
}

#[test]
fn without_agents_every_pod_reaches_every_pod_and_down_removes_everything() {
    let started = Instant::now();
    let mut lab = Lab::up(&network_only()).expect("lab up");
    let up = started.elapsed();
    let keys: Vec<String> = lab.pods().iter().map(nodeward_lab::PodState::key).collect();
    let mut cases = Vec::new();
    for from in &keys {
        for to in keys.iter().filter(|t| *t != from) {
            cases.push(Case::tcp(from, to, HTTP_PORT, true));
        }
    }
    cases.push(Case::tcp("frontend/web-0", "data/db-1", METRICS_PORT, true));
    cases.push(Case::udp("frontend/web-0", "data/db-1", DNS_PORT, true));
    cases.push(Case::udp("data/db-2", "data/db-0", DNS_PORT, true));
    // Nothing listens on 7; a refused connection must count as unreachable.
    cases.push(Case::tcp("frontend/web-0", "backend/api-1", 7, false));
    let probes = Instant::now();
    lab.expect(&cases, Duration::from_secs(5));
    let probes = probes.elapsed();

    let v6 = [
        ("frontend/web-0", "backend/api-1"),
        ("data/db-1", "data/db-0"),
        ("backend/api-0", "frontend/web-2"),
    ];
    for (from, to) in v6 {
        let netns = &lab.pod(from).netns;
        assert!(
            probe::tcp_probe(netns, lab.addr6(to, HTTP_PORT), Duration::from_secs(2)),
            "tcp6 {from} -> {to}"
        );
        assert!(
            probe::udp_probe(netns, lab.addr6(to, DNS_PORT), Duration::from_secs(2)),
            "udp6 {from} -> {to}"
        );
    }
    // A long-lived connection keeps working.
    let mut conn = lab
        .connect(
            "frontend/web-1",
            "data/db-0",
            HTTP_PORT,
            Duration::from_secs(1),
        )
        .expect("connect");
    for _ in 0..20 {
        assert!(probe::echo_roundtrip(&mut conn, Duration::from_secs(1)));
    }
    drop(conn);

    let netns = lab.state().all_netns();
    let pids: Vec<u32> = lab.pods().iter().filter_map(|p| p.echo_pid).collect();
    let down = Instant::now();
    lab.down().expect("lab down");
    let down = down.elapsed();
    assert_eq!(
        lab.leftovers(),
        Vec::<String>::new(),
        "down left objects behind"
    );
    let existing = sys::netns_list();
    assert!(
        netns.iter().all(|n| !existing.contains(n)),
        "namespaces remain"
    );
    assert!(
        pids.iter().all(|&p| !sys::process_alive(p)),
        "echo servers still run"
    );
    assert!(!lab.state().dir.exists(), "lab directory remains");
    eprintln!(
        "lab up {up:.2?}, {} probes {probes:.2?}, down {down:.2?}",
        cases.len() + 2 * v6.len()
    );
}

#[test]
fn a_crashed_run_is_swept_by_the_next_lab() {
    let mut crashed = Lab::up(&network_only()).expect("lab up");
    crashed.forget();
    let state = crashed.state().clone();
    drop(crashed);
    // Pretend its owner died: rewrite the owner to a pid that cannot exist.
    let mut dead = state.clone();
    dead.owner = Some(Owner {
        pid: u32::MAX,
        start_time: 0,
    });
    std::fs::write(state.state_file(), serde_json::to_vec(&dead).unwrap()).unwrap();

    let next = Lab::up(&network_only()).expect("second lab up");
    let existing = sys::netns_list();
    let left: Vec<_> = state
        .all_netns()
        .into_iter()
        .filter(|n| existing.contains(n))
        .collect();
    assert!(
        left.is_empty(),
        "the crashed lab's namespaces survived the sweep: {left:?}"
    );
    assert!(!state.cgroup_dir.exists() && !state.bpffs_dir.exists() && !state.dir.exists());
    let web = next.pod("frontend/web-0");
    assert!(probe::tcp_probe(
        &web.netns,
        SocketAddr::new(next.pod("backend/api-1").ip4.into(), HTTP_PORT),
        Duration::from_secs(1)
    ));
}
