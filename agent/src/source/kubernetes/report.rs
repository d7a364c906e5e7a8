//! Policy status: each agent says, per policy, whether it compiled and applied on its node.
//!
//! - `nodeward.io` policies: `status.nodes.<node> = {enforced, error, observedGeneration}`,
//!   written with server-side apply to the `status` subresource under the field manager
//!   `nodeward-<node>` (see [`crate::policy::crd::PolicyStatus`]). Every agent owns only its own
//!   key of the `nodes` map (a granular map in the CRD schema), so agents never conflict and no
//!   read-modify-write race exists. `enforcingNodes` is written along by the agent whose entry
//!   changed, counted from the entries it last saw plus its own; agents do not rewrite it when
//!   another node's entry changes (that would be N² writes per rollout), so after two
//!   simultaneous changes it can lag until the next one. The entries are the truth.
//! - Every policy kind (NetworkPolicy has no status for us): a `Warning` Event on the policy when
//!   it fails on this node, a `Normal` one when it recovers.
//!
//! Best effort and rate-limited: only changes are written, at most one round per interval; a
//! failed write is retried later and never blocks the control loop.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter as EventReporter};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::policy::crd::{ClusterMeshPolicy, MeshPolicy, PolicyStatus};

/// How one policy fares on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PolicyOutcome {
    /// Compiled and in the datapath (possibly an earlier version, when `error` says so).
    pub enforced: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The object a policy key refers to, as last seen from the API server.
#[derive(Clone, Debug, PartialEq)]
pub struct Seen {
    pub reference: ObjectReference,
    pub generation: Option<i64>,
    /// Nodes whose `status.nodes` entry says they enforce this generation.
    pub enforcing: BTreeSet<String>,
}

impl Seen {
    /// Reads what the watch gave, before the status is stripped from the object.
    #[must_use]
    pub fn new(
        reference: ObjectReference,
        generation: Option<i64>,
        status: Option<&serde_json::Value>,
    ) -> Self {
        let enforcing = status
            .and_then(|s| serde_json::from_value::<PolicyStatus>(s.clone()).ok())
            .map(|s| {
                s.nodes
                    .into_iter()
                    .filter(|(_, n)| n.enforced && n.observed_generation == generation)
                    .map(|(node, _)| node)
                    .collect()
            })
            .unwrap_or_default();
        Self {
            reference,
            generation,
            enforcing,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Round {
    outcomes: BTreeMap<String, PolicyOutcome>,
    seen: BTreeMap<String, Seen>,
}

/// Writes policy status and Events in the background.
pub struct Reporter {
    tx: watch::Sender<Round>,
    task: JoinHandle<()>,
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Events carry at most 1 kB of note.
const NOTE_MAX: usize = 1000;

/// How long a failed write waits before it is tried again (unless something changes first).
const RETRY: Duration = Duration::from_secs(10);

impl Reporter {
    #[must_use]
    pub fn start(client: kube::Client, node: &str, interval: Duration) -> Self {
        let (tx, rx) = watch::channel(Round::default());
        let task = tokio::spawn(run(client, node.to_owned(), rx, interval));
        Self { tx, task }
    }

    /// The latest outcome of every policy; only what differs from what was written goes out.
    pub fn publish(&self, outcomes: BTreeMap<String, PolicyOutcome>, seen: BTreeMap<String, Seen>) {
        let round = Round { outcomes, seen };
        self.tx.send_if_modified(|current| {
            if *current == round {
                false
            } else {
                *current = round;
                true
            }
        });
    }
}

async fn run(
    client: kube::Client,
    node: String,
    mut rx: watch::Receiver<Round>,
    interval: Duration,
) {
    let recorder = Recorder::new(
        client.clone(),
        EventReporter {
            controller: "nodeward".into(),
            instance: Some(node.clone()),
        },
    );
    let manager = format!("nodeward-{node}");
    // What was written, per policy: the outcome and the generation it was about.
    let mut written: BTreeMap<String, (PolicyOutcome, Option<i64>)> = BTreeMap::new();
    let mut retry = false;
    loop {
        if retry {
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                () = tokio::time::sleep(RETRY) => {}
            }
        } else if rx.changed().await.is_err() {
            return;
        }
        let round = rx.borrow_and_update().clone();
        retry = false;
        for (key, outcome) in &round.outcomes {
            let Some(seen) = round.seen.get(key) else {
                continue;
            };
            let state = (outcome.clone(), seen.generation);
            let previous = written.get(key);
            if previous == Some(&state) {
                continue;
            }
            let before = previous.map(|(o, _)| o);
            match write(&client, &recorder, &manager, &node, seen, outcome, before).await {
                Ok(()) => {
                    written.insert(key.clone(), state);
                }
                Err(e) => {
                    tracing::debug!(policy = %key, error = %e, "writing policy status failed; will retry");
                    retry = true;
                }
            }
        }
        written.retain(|k, _| round.outcomes.contains_key(k));
        tokio::time::sleep(interval).await;
    }
}

async fn write(
    client: &kube::Client,
    recorder: &Recorder,
    manager: &str,
    node: &str,
    seen: &Seen,
    outcome: &PolicyOutcome,
    before: Option<&PolicyOutcome>,
) -> Result<(), kube::Error> {
    let kind = seen.reference.kind.as_deref().unwrap_or_default();
    let name = seen.reference.name.as_deref().unwrap_or_default();
    let event = match (&outcome.error, before.and_then(|b| b.error.as_ref())) {
        (Some(error), previous) if previous != Some(error) => Some(Event {
            type_: EventType::Warning,
            reason: "PolicyFailed".into(),
            note: Some(truncate(&format!("node {node}: {error}"))),
            action: "Enforce".into(),
            secondary: None,
        }),
        (None, Some(_)) => Some(Event {
            type_: EventType::Normal,
            reason: "PolicyEnforced".into(),
            note: Some(format!("node {node}: enforced")),
            action: "Enforce".into(),
            secondary: None,
        }),
        _ => None,
    };
    if let Some(event) = event {
        recorder.publish(&event, &seen.reference).await?;
    }
    let resource = match kind {
        "MeshPolicy" => ApiResource::erase::<MeshPolicy>(&()),
        "ClusterMeshPolicy" => ApiResource::erase::<ClusterMeshPolicy>(&()),
        "TrafficPolicy" => ApiResource::erase::<crate::http::traffic::TrafficPolicy>(&()),
        // NetworkPolicy: Events only.
        _ => return Ok(()),
    };
    let api: Api<DynamicObject> = match &seen.reference.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let mut entry = serde_json::json!({ "enforced": outcome.enforced });
    if let Some(error) = &outcome.error {
        entry["error"] = truncate(error).into();
    }
    if let Some(generation) = seen.generation {
        entry["observedGeneration"] = generation.into();
    }
    let enforcing = seen
        .enforcing
        .iter()
        .filter(|n| *n != node)
        .count()
        .saturating_add(usize::from(outcome.enforced && outcome.error.is_none()));
    let enforcing = i32::try_from(enforcing).unwrap_or(i32::MAX);
    let mut metadata = serde_json::json!({ "name": name });
    if let Some(ns) = &seen.reference.namespace {
        metadata["namespace"] = ns.clone().into();
    }
    let patch = serde_json::json!({
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "metadata": metadata,
        "status": { "nodes": { node: entry }, "enforcingNodes": enforcing },
    });
    // force: only this node's key is in the patch, so forcing can take over nothing but a
    // hand-edited copy of our own entry.
    api.patch_status(
        name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

fn truncate(text: &str) -> String {
    if text.len() <= NOTE_MAX {
        return text.to_owned();
    }
    let mut end = NOTE_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}
