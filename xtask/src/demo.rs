//! `cargo xtask demo`: a lab with the example policies, traffic that they allow and deny, and the
//! flows the agents recorded.

use std::time::Duration;

use anyhow::{Context as _, Result};
use nodeward_lab::topology::{DEBUG_PORT, POSTGRES_PORT};
use nodeward_lab::{Case, HTTP_PORT, Lab, LabSpec, METRICS_PORT, manifests, paths};

pub fn run() -> Result<()> {
    let lab = Lab::up(&LabSpec {
        name: Some("demo".into()),
        ..LabSpec::default()
    })?;
    print!("{}", lab.report());

    let examples = paths::workspace_root().join("policies").join("examples");
    let mut applied = 0;
    for entry in
        std::fs::read_dir(&examples).with_context(|| format!("reading {}", examples.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let name = path
                .file_name()
                .expect("a file")
                .to_string_lossy()
                .into_owned();
            let yaml = std::fs::read_to_string(&path)?;
            // The lab writes its own Namespaces (same names, with `team` and `tier` labels).
            let parsed = manifests::without_namespaces(&yaml)
                .with_context(|| format!("parsing {}", path.display()))?;
            match parsed {
                Some(yaml) => {
                    lab.write_manifest(&name, &yaml)?;
                    println!("applied {}", path.display());
                    applied += 1;
                }
                None => println!(
                    "skipped {} (the lab defines the namespaces)",
                    path.display()
                ),
            }
        }
    }
    if applied == 0 {
        println!(
            "no policies in {}: every flow is allowed",
            examples.display()
        );
    }
    // Let the agents pick the policies up.
    std::thread::sleep(Duration::from_secs(2));
    for node in lab.node_names() {
        let status = lab.status(&node)?;
        println!(
            "{node}: generation {} policies {}",
            status["generation"],
            serde_json::to_string(&status["policies"])?
        );
    }

    let pairs = [
        ("frontend/web-0", "backend/api-1", HTTP_PORT),
        ("frontend/web-1", "backend/api-0", HTTP_PORT),
        ("frontend/web-0", "backend/api-0", METRICS_PORT),
        ("backend/api-2", "backend/api-1", METRICS_PORT),
        ("frontend/web-0", "backend/api-0", DEBUG_PORT),
        ("backend/api-0", "data/db-1", POSTGRES_PORT),
        ("backend/api-1", "data/db-0", POSTGRES_PORT),
        ("backend/api-0", "data/db-1", HTTP_PORT),
        ("frontend/web-1", "data/db-0", POSTGRES_PORT),
        ("frontend/web-0", "data/db-2", HTTP_PORT),
        ("data/db-0", "frontend/web-1", HTTP_PORT),
        ("backend/api-1", "frontend/web-0", HTTP_PORT),
    ];
    let cases: Vec<Case> = pairs
        .iter()
        .map(|(from, to, port)| Case::tcp(from, to, *port, true))
        .collect();
    println!("\ntraffic:");
    for (case, reached) in cases.iter().zip(lab.probe_all(&cases)) {
        let (from, to) = (lab.pod(&case.from), lab.pod(&case.to));
        println!(
            "  {:<16} ({}) -> {:<16} ({}) tcp/{:<5} {}",
            case.from,
            from.node,
            case.to,
            to.node,
            case.port,
            if reached { "ALLOWED" } else { "DENIED" }
        );
    }
    for node in lab.node_names() {
        println!("\nnodeward observe -o json --last 20 on {node}:");
        match lab.observe(&node, &["--last", "20"]) {
            Ok(flows) => {
                for flow in flows {
                    println!("  {flow}");
                }
            }
            Err(e) => println!("  unavailable: {e:#}"),
        }
    }
    Ok(())
}
