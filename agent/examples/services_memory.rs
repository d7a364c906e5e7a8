//! What the agent's heap holds for `bench datapath --services`' table (1,000 Services with 10
//! backends each, as the lab's endpoints controller writes them), without a kernel: the
//! manifests are read from a temporary directory, the table is built, turned into its kernel
//! form and into flows' index. Each step's live heap is printed, and what stays.
//!
//! `cargo run --release -p nodeward --example services_memory [SERVICES] [BACKENDS]`

use std::fmt::Write as _;

use nodeward::services;
use nodeward::source::manifests::ManifestSource;

mod heap;

use heap::{live_kib, peak_kib};

/// This process's resident memory (`VmRSS`) in KiB.
fn rss_kib() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The bulk Services in the shape of `nodeward_lab::manifests::bulk_services`' documents.
fn manifest(services: u32, backends: u32) -> String {
    let addr = |n: u32, second: u8| format!("10.{second}.{}.{}", n / 250, n % 250 + 1);
    let mut out = String::new();
    for i in 0..services {
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: bulk-{i}\n  namespace: backend\n\
             spec:\n  clusterIP: {}\n  ports:\n  - name: http\n    port: 80\n    targetPort: http\n    \
             protocol: TCP\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
             name: bulk-{i}-1\n  namespace: backend\n  labels:\n    kubernetes.io/service-name: bulk-{i}\n\
             addressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: TCP\nendpoints:\n",
            addr(i, 97)
        );
        for j in 0..backends {
            let _ = write!(
                out,
                "- addresses: [\"{}\"]\n  conditions:\n    ready: true\n",
                addr(i * backends + j, 240)
            );
        }
    }
    out
}

fn main() {
    let mut args = std::env::args().skip(1);
    let services: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let backends: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let dir = tempfile::tempdir().expect("tempdir");
    let text = manifest(services, backends);
    std::fs::write(dir.path().join("bulk.yaml"), &text).expect("write manifest");
    println!(
        "manifest: {services} Services x {backends} backends, {} KiB of YAML",
        text.len() / 1024
    );
    drop(text);

    let base = live_kib();
    let base_rss = rss_kib();
    let _ = peak_kib();
    let mut source = ManifestSource::new(dir.path());
    let loaded = source.load();
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let inv = loaded.inventory;
    let after_load = live_kib();
    println!(
        "source + inventory: {} KiB, peak while reading {} KiB ({} Services, {} slices)",
        after_load - base,
        peak_kib() - base,
        inv.services.len(),
        inv.endpoint_slices.len()
    );
    let (table, errors) = services::build(&inv, "node-1");
    assert!(errors.is_empty(), "{errors:?}");
    let after_table = live_kib();
    println!(
        "table: {} KiB ({} frontends, {} backends)",
        after_table - after_load,
        table.ports.len(),
        table.backend_count()
    );
    let kernel = services::sync::kernel_table(&table);
    let after_kernel = live_kib();
    println!("kernel table: {} KiB", after_kernel - after_table);
    let index = table.backend_index();
    let after_index = live_kib();
    println!("backend index: {} KiB", after_index - after_kernel);
    println!("total: {} KiB", after_index - base);
    // SAFETY: malloc_trim only releases free memory (as the agent does after a sync).
    unsafe { libc::malloc_trim(0) };
    println!(
        "process RSS grew by {} KiB (after malloc_trim)",
        rss_kib().saturating_sub(base_rss)
    );
    drop((index, kernel, table, inv, source));
}
