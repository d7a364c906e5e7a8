//! Workload certificates: issued on first use, kept in memory, renewed in the background.
//!
//! Each identity has one slot holding its current certificate and one renewal task. The task
//! sleeps until half the certificate's lifetime has passed (a little earlier, at random, so
//! certificates issued together do not all renew in the same instant), issues a new one and
//! swaps it in. A failed renewal is retried with exponential backoff and jitter, well before the
//! old certificate expires. A swap only changes what the next handshake presents (see
//! [`super::tls`]); connections already established are untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::{CaError, IssueCerts, Issued, SpiffeId};

/// Renewals done and failed since start (the `nodeward_certificate_renewals_total` counter).
#[derive(Debug, Default)]
pub struct RenewalCounts {
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
}

/// A certificate in use, and when it will be renewed.
#[derive(Debug)]
pub struct WorkloadCert {
    pub issued: Issued,
    pub renew_at: SystemTime,
}

impl std::ops::Deref for WorkloadCert {
    type Target = Issued;
    fn deref(&self) -> &Issued {
        &self.issued
    }
}

/// What `nodeward certs` shows for one certificate.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct CertInfo {
    pub identity: String,
    pub issuer: String,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    pub renew_at: String,
    /// Seconds until renewal (0 when due or being retried).
    pub renews_in_seconds: u64,
    /// Seconds until expiry (0 when expired).
    pub expires_in_seconds: u64,
    /// Whether it is the node agent's own certificate rather than a workload's.
    pub agent: bool,
    /// The node a node agent's certificate names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Who signed it: `local`, or `issuer at ADDRESS, replica NAME`.
    #[serde(default)]
    pub via: String,
}

struct Slot {
    current: Arc<RwLock<Arc<WorkloadCert>>>,
    renewal: Option<tokio::task::AbortHandle>,
    /// Kept even when no local workload uses it (the agent's own identity).
    pinned: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(task) = &self.renewal {
            task.abort();
        }
    }
}

struct Inner {
    issuer: Arc<dyn IssueCerts>,
    ttl: Duration,
    slots: Mutex<BTreeMap<SpiffeId, Slot>>,
    renewals: RenewalCounts,
}

/// The certificate cache. Cheap to clone; renewal tasks stop when the last clone is dropped.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("ttl", &self.inner.ttl)
            .field("certificates", &self.lock().len())
            .finish_non_exhaustive()
    }
}

impl CertManager {
    /// Certificates from `issuer`, each valid for `ttl`.
    #[must_use]
    pub fn new(issuer: Arc<dyn IssueCerts>, ttl: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                issuer,
                ttl,
                slots: Mutex::new(BTreeMap::new()),
                renewals: RenewalCounts::default(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SpiffeId, Slot>> {
        self.inner
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// The current certificate of `identity`, issued now if it has none. Renewal starts in the
    /// background when called inside a Tokio runtime.
    pub fn get(&self, identity: &SpiffeId) -> Result<Arc<WorkloadCert>, CaError> {
        self.get_or_issue(identity, false)
    }

    /// The current certificate of `identity` if it has one; never issues (for paths that must
    /// not wait on an issuer, such as a handshake).
    #[must_use]
    pub fn cached(&self, identity: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        self.lock().get(identity).map(|slot| {
            slot.current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        })
    }

    /// Like [`get`](Self::get), and the certificate is kept by [`retain`](Self::retain) even
    /// when no workload uses it (the node agent's own identity).
    pub fn pin(&self, identity: &SpiffeId) -> Result<Arc<WorkloadCert>, CaError> {
        self.get_or_issue(identity, true)
    }

    fn get_or_issue(&self, identity: &SpiffeId, pin: bool) -> Result<Arc<WorkloadCert>, CaError> {
        let existing = |slots: &mut BTreeMap<SpiffeId, Slot>| {
            slots.get_mut(identity).map(|slot| {
                slot.pinned |= pin;
                slot.current
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone()
            })
        };
        if let Some(cert) = existing(&mut self.lock()) {
            return Ok(cert);
        }
        // Issued outside the lock: with `--ca-mode issuer` this is a round trip to the issuer
        // (seconds while it is down), and every handshake looks its certificate up here. Two
        // callers racing for one new identity may both issue; the first to store wins.
        let issued = self.inner.issuer.issue(identity, self.inner.ttl)?;
        let mut slots = self.lock();
        if let Some(cert) = existing(&mut slots) {
            return Ok(cert);
        }
        let cert = Arc::new(workload_cert(issued));
        tracing::info!(
            identity = %identity,
            serial = %cert.serial,
            not_after = %humantime::format_rfc3339_seconds(cert.not_after),
            "issued a workload certificate"
        );
        let current = Arc::new(RwLock::new(cert.clone()));
        let renewal = tokio::runtime::Handle::try_current().ok().map(|rt| {
            rt.spawn(renew(
                Arc::downgrade(&self.inner),
                identity.clone(),
                current.clone(),
            ))
            .abort_handle()
        });
        slots.insert(
            identity.clone(),
            Slot {
                current,
                renewal,
                pinned: pin,
            },
        );
        Ok(cert)
    }

    /// Issues what `wanted` lacks and forgets (stopping renewal) unpinned identities not in
    /// it. Returns the identities that could not be issued, with why.
    pub fn ensure(&self, wanted: &BTreeSet<SpiffeId>) -> Vec<(SpiffeId, CaError)> {
        self.lock()
            .retain(|id, slot| slot.pinned || wanted.contains(id));
        wanted
            .iter()
            .filter_map(|id| self.get(id).err().map(|e| (id.clone(), e)))
            .collect()
    }

    /// Every certificate held now, by identity.
    #[must_use]
    pub fn certificates(&self) -> Vec<(Arc<WorkloadCert>, bool)> {
        self.lock()
            .values()
            .map(|slot| {
                (
                    slot.current
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .clone(),
                    slot.pinned,
                )
            })
            .collect()
    }

    /// What `nodeward certs` shows.
    #[must_use]
    pub fn info(&self) -> Vec<CertInfo> {
        let now = SystemTime::now();
        let until = |t: SystemTime| t.duration_since(now).map_or(0, |d| d.as_secs());
        let time = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        self.certificates()
            .into_iter()
            .map(|(c, agent)| CertInfo {
                identity: c.identity.uri(),
                issuer: c.issuer.clone(),
                serial: c.serial.clone(),
                not_before: time(c.not_before),
                not_after: time(c.not_after),
                renew_at: time(c.renew_at),
                renews_in_seconds: until(c.renew_at),
                expires_in_seconds: until(c.not_after),
                agent,
                node: c.node.clone(),
                via: c.via.clone(),
            })
            .collect()
    }

    /// The earliest expiry of all certificates held, if any.
    #[must_use]
    pub fn earliest_expiry(&self) -> Option<SystemTime> {
        self.certificates().iter().map(|(c, _)| c.not_after).min()
    }

    #[must_use]
    pub fn renewals(&self) -> &RenewalCounts {
        &self.inner.renewals
    }
}

fn workload_cert(issued: Issued) -> WorkloadCert {
    let renew_at = renewal_time(&issued, fastrand::f64());
    WorkloadCert { issued, renew_at }
}

/// Half-way from issuance to expiry, moved earlier by up to 10% of the lifetime at random
/// (`jitter` in 0..1).
fn renewal_time(issued: &Issued, jitter: f64) -> SystemTime {
    let life = issued
        .not_after
        .duration_since(issued.issued_at)
        .unwrap_or_default();
    let early = life.mul_f64(0.1 * jitter.clamp(0.0, 1.0));
    issued.issued_at + (life / 2).saturating_sub(early)
}

/// Delay before retry number `failures` (1, 2, ...) of a failed renewal: exponential from a
/// base of 1 s (less for very short lifetimes), capped at 5 min or a tenth of the lifetime,
/// then "equal jitter": a random point in the upper half (`jitter` in 0..1).
#[must_use]
pub fn retry_delay(failures: u32, ttl: Duration, jitter: f64) -> Duration {
    let base = Duration::from_secs(1).min(ttl / 20);
    let cap = Duration::from_secs(300).min(ttl / 10).max(base);
    let exp = base.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    let d = exp.min(cap);
    d / 2 + (d / 2).mul_f64(jitter.clamp(0.0, 1.0))
}

async fn renew(inner: Weak<Inner>, identity: SpiffeId, current: Arc<RwLock<Arc<WorkloadCert>>>) {
    let mut failures = 0u32;
    loop {
        let wait = if failures == 0 {
            let renew_at = current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .renew_at;
            renew_at
                .duration_since(SystemTime::now())
                .unwrap_or_default()
        } else {
            // Paced by the lifetime of the certificate held, not by --cert-ttl: with the issuer
            // (`--ca-mode issuer`) the issuer decides it, and a retry must come well before
            // that certificate expires.
            let life = {
                let cert = current
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                cert.not_after
                    .duration_since(cert.issued_at)
                    .unwrap_or_default()
            };
            retry_delay(failures, life, fastrand::f64())
        };
        tokio::time::sleep(wait).await;
        let Some(inner) = inner.upgrade() else { return };
        // On a blocking thread: an issuer's round trip must not hold a runtime worker.
        let (issuer, id, ttl) = (inner.issuer.clone(), identity.clone(), inner.ttl);
        let result = tokio::task::spawn_blocking(move || issuer.issue(&id, ttl))
            .await
            .unwrap_or_else(|e| Err(CaError::Issuer(format!("the renewal's task: {e}"))));
        match result {
            Ok(issued) => {
                let cert = Arc::new(workload_cert(issued));
                tracing::info!(
                    identity = %identity,
                    serial = %cert.serial,
                    not_after = %humantime::format_rfc3339_seconds(cert.not_after),
                    "renewed a workload certificate"
                );
                *current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = cert;
                inner.renewals.succeeded.fetch_add(1, Ordering::Relaxed);
                failures = 0;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                inner.renewals.failed.fetch_add(1, Ordering::Relaxed);
                let expires = current
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .not_after;
                tracing::warn!(
                    identity = %identity,
                    error = %e,
                    failures,
                    expires = %humantime::format_rfc3339_seconds(expires),
                    "renewing a workload certificate failed; retrying"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::ca::testing::authority;
    use crate::ca::tls::{CertResolver, ExpectedServer, client_config, server_config, server_name};
    use crate::ca::{Authority, DEFAULT_TRUST_DOMAIN as TD};

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::workload(TD, ns, sa).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn renewal_replaces_the_certificate_and_a_live_connection_survives_two() {
        let state = tempfile::tempdir().unwrap();
        let ca = Arc::new(authority(state.path(), TD));
        let certs = CertManager::new(ca.clone(), Duration::from_secs(2));
        let (agent, workload) = (SpiffeId::agent(TD).unwrap(), id("shop", "api"));
        certs.pin(&agent).unwrap();
        let first = certs.get(&workload).unwrap();
        let server = Arc::new(
            server_config(&ca.trust(), CertResolver::new(certs.clone(), agent.clone())).unwrap(),
        );
        let client = Arc::new(
            client_config(
                &ca.trust(),
                CertResolver::new(certs.clone(), workload.clone()),
                ExpectedServer::OneOf(vec![agent.clone()]),
            )
            .unwrap(),
        );

        // An echo server that reports the client certificate of every connection.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, seen_tx) = (acceptor.clone(), seen_tx.clone());
                tokio::spawn(async move {
                    let tls = acceptor.accept(tcp).await.expect("handshake");
                    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
                    seen_tx.send(leaf).unwrap();
                    let (mut r, mut w) = tokio::io::split(tls);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let connector = tokio_rustls::TlsConnector::from(client);
        let connect = || async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            connector.connect(server_name(), tcp).await.unwrap()
        };
        let mut live = connect().await;
        assert_eq!(seen.recv().await.unwrap(), *first.leaf());

        // Stream over the live connection until the workload certificate was renewed twice and
        // the one it was made with has expired.
        let mut serials = BTreeSet::from([first.serial.clone()]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let mut chunk = [0u8; 1024];
        let mut echo = [0u8; 1024];
        let mut sent = 0u64;
        while serials.len() < 3 || SystemTime::now() < first.not_after + Duration::from_secs(1) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected two renewals within 15 s, saw serials {serials:?}"
            );
            chunk.fill(u8::try_from(sent % 251).unwrap());
            live.write_all(&chunk)
                .await
                .expect("writing on the live connection");
            live.read_exact(&mut echo)
                .await
                .expect("reading on the live connection");
            assert_eq!(chunk, echo, "echo of chunk {sent}");
            sent += 1;
            serials.insert(certs.get(&workload).unwrap().serial.clone());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(certs.renewals().succeeded.load(Ordering::Relaxed) >= 2);
        assert_eq!(certs.renewals().failed.load(Ordering::Relaxed), 0);
        live.write_all(b"still here").await.unwrap();
        let mut tail = [0u8; 10];
        live.read_exact(&mut tail).await.unwrap();
        assert_eq!(
            &tail, b"still here",
            "the connection outlived its certificate"
        );

        // A new connection presents the current certificate: the one the manager held just
        // before the handshake, or (renewals come every second here) just after it.
        let current = certs.get(&workload).unwrap();
        assert_ne!(current.serial, first.serial);
        let held = |certs: &CertManager| -> Vec<_> {
            certs
                .certificates()
                .into_iter()
                .map(|(c, _)| c.leaf().clone())
                .collect()
        };
        let before = held(&certs);
        let _fresh = connect().await;
        let presented = seen.recv().await.unwrap();
        let after = held(&certs);
        assert_ne!(
            presented,
            *first.leaf(),
            "a new handshake uses the renewed certificate"
        );
        assert!(
            before.iter().chain(&after).any(|leaf| *leaf == presented),
            "the new connection presented a certificate the manager held"
        );
    }

    /// Fails the renewals in `failing` (call 0 is the first issuance).
    struct Flaky {
        ca: Authority,
        calls: AtomicU32,
        failing: std::ops::RangeInclusive<u32>,
    }

    impl IssueCerts for Flaky {
        fn issue(&self, identity: &SpiffeId, ttl: Duration) -> Result<Issued, CaError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if self.failing.contains(&n) {
                return Err(CaError::Issue {
                    identity: identity.uri(),
                    reason: format!("injected failure {n}"),
                });
            }
            self.ca.issue(identity, ttl)
        }
    }

    #[tokio::test]
    async fn failed_renewals_are_retried_until_one_succeeds() {
        let state = tempfile::tempdir().unwrap();
        let flaky = Arc::new(Flaky {
            ca: authority(state.path(), TD),
            calls: AtomicU32::new(0),
            failing: 1..=2,
        });
        let certs = CertManager::new(flaky.clone(), Duration::from_secs(2));
        let first = certs.get(&id("a", "b")).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while certs.renewals().succeeded.load(Ordering::Relaxed) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no renewal after retries"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(certs.renewals().failed.load(Ordering::Relaxed), 2);
        let renewed = certs.get(&id("a", "b")).unwrap();
        assert_ne!(renewed.serial, first.serial);
        assert!(
            renewed.not_after > SystemTime::now(),
            "renewed before the old one ran out"
        );
    }

    #[test]
    fn ensure_issues_new_identities_and_forgets_gone_ones_but_not_pinned() {
        let state = tempfile::tempdir().unwrap();
        let certs = CertManager::new(
            Arc::new(authority(state.path(), TD)),
            Duration::from_secs(3600),
        );
        let agent = SpiffeId::agent(TD).unwrap();
        certs.pin(&agent).unwrap();
        let (a, b) = (id("shop", "a"), id("shop", "b"));
        assert!(
            certs
                .ensure(&BTreeSet::from([a.clone(), b.clone()]))
                .is_empty()
        );
        let serial_a = certs.get(&a).unwrap().serial.clone();
        assert!(certs.ensure(&BTreeSet::from([a.clone()])).is_empty());
        let held: BTreeSet<String> = certs.info().into_iter().map(|i| i.identity).collect();
        assert_eq!(held, BTreeSet::from([agent.uri(), a.uri()]));
        assert_eq!(
            certs.get(&a).unwrap().serial,
            serial_a,
            "issued once, then reused"
        );
        let info = certs.info();
        let a_info = info.iter().find(|i| i.identity == a.uri()).unwrap();
        assert!(!a_info.agent && a_info.expires_in_seconds > 3500);
        assert!(a_info.renews_in_seconds <= 1800 && a_info.renews_in_seconds > 1400);
        assert!(certs.earliest_expiry().is_some());
    }

    #[test]
    fn retries_back_off_exponentially_within_bounds() {
        let day = Duration::from_secs(24 * 3600);
        let d: Vec<Duration> = (1..=12).map(|n| retry_delay(n, day, 1.0)).collect();
        assert_eq!(d[0], Duration::from_secs(1));
        assert_eq!(d[1], Duration::from_secs(2));
        assert_eq!(d[4], Duration::from_secs(16));
        assert_eq!(d[11], Duration::from_secs(300), "capped at 5 min: {d:?}");
        // Jitter stays within the upper half.
        assert_eq!(retry_delay(3, day, 0.0), Duration::from_secs(2));
        // A 2 s lifetime retries within 200 ms.
        assert!(retry_delay(30, Duration::from_secs(2), 1.0) <= Duration::from_millis(200));
        assert!(retry_delay(1, Duration::from_secs(2), 0.0) > Duration::ZERO);
    }
}
