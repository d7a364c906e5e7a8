//! One lab shared by all the tests of a test binary.
//!
//! Building a lab and starting agents takes seconds, so each lab test binary builds one, and the
//! tests take turns with it (a mutex; run them with `--test-threads=1` so that timeouts stay
//! honest). A static is never dropped, so teardown runs from an `atexit` handler: the test harness
//! leaves through `exit(3)` whether the tests passed or not. A run killed outright leaves the lab
//! behind, and the next lab's sweep removes it (its owner pid is gone).

use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use crate::{Lab, LabSpec};

static LAB: OnceLock<Mutex<Lab>> = OnceLock::new();

extern "C" fn teardown_at_exit() {
    if let Some(lab) = LAB.get() {
        // A test still holding the lab at exit has panicked inside it; tear down regardless.
        let mut lab = lab
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = lab.down() {
            eprintln!("lab {}: teardown at exit failed: {e:#}", lab.id());
        }
    }
}

/// The test binary's lab (2 nodes x 3 namespaces x 3 pods, agents ready), reset for a new test:
/// the policies earlier tests added are removed, stopped agents are started again, and every
/// agent is ready. Panics (never skips) when the lab cannot be built.
pub fn shared_lab() -> MutexGuard<'static, Lab> {
    let lab = LAB.get_or_init(|| {
        let lab =
            Lab::up(&LabSpec::default()).unwrap_or_else(|e| panic!("cannot build the lab: {e:#}"));
        // SAFETY: registering a plain extern "C" function.
        let rc = unsafe { libc::atexit(teardown_at_exit) };
        assert_eq!(rc, 0, "atexit failed; the lab would outlive the tests");
        Mutex::new(lab)
    });
    let mut lab = lab
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    reset(&mut lab);
    lab
}

fn reset(lab: &mut Lab) {
    let removed = lab
        .clear_manifests()
        .expect("removing earlier tests' manifests");
    for node in lab.node_names() {
        if lab.agent_pid(&node).is_none() {
            lab.start_agent(&node)
                .unwrap_or_else(|e| panic!("restarting the agent of {node}: {e:#}"));
        }
    }
    if removed > 0 {
        // Wait until every agent has dropped the old policies (they report no applied policy and
        // no failure), so a test starts from "no policy".
        for node in lab.node_names() {
            let clean =
                crate::eventually(Duration::from_secs(10), Duration::from_millis(100), || {
                    lab.status(&node).is_ok_and(|s| {
                        s["policies"]["applied"] == 0
                            && s["policies"]["failed"].as_array().is_none_or(Vec::is_empty)
                    })
                });
            assert!(
                clean,
                "the agent of {node} still reports policies after they were removed: {:?}",
                lab.status(&node)
            );
        }
    }
}
