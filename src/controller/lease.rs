//! Leader election with a coordination.k8s.io Lease, so two controller replicas can run and only
//! one writes -- fenced by the Lease's expiry.
//!
//! A follower takes the Lease over once its record has stayed unchanged for the lease duration
//! by the follower's own clock (as client-go does, so clock skew between nodes does not matter).
//! The leader therefore writes only until its last successful renew -- timed from when that
//! renew was *sent*, by its own monotonic clock -- plus the duration minus a safety margin: a
//! leader that cannot renew (apiserver unreachable, calls stalled, Lease taken) stops writing
//! before anyone else can start. Every Lease call has a timeout, so a stalled call can never keep
//! a replica "leading".

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// How long a holder that stopped renewing keeps the Lease.
    pub duration: Duration,
}

impl LeaseConfig {
    /// Every Lease GET, CREATE and REPLACE gives up after this long.
    pub fn call_timeout(&self) -> Duration {
        self.duration / 3
    }

    /// How often the leader renews (and a follower looks).
    pub fn renew_every(&self) -> Duration {
        self.duration / 4
    }

    /// The leader stops writing this long before a follower could take over: room for the
    /// difference in clock rates and for a write already on its way.
    pub fn margin(&self) -> Duration {
        self.duration / 5
    }
}

/// What this replica knows of its term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Term {
    held: bool,
    /// Writes stop at this instant unless a renew moves it (None: no election, unbounded).
    fence: Option<Instant>,
}

impl Term {
    const NONE: Term = Term { held: false, fence: None };

    fn may_write(&self, now: Instant) -> bool {
        self.held && self.fence.is_none_or(|f| now < f)
    }
}

/// Whether this replica may write, shared by everything that writes (cheap to clone).
#[derive(Clone, Debug)]
pub struct Leadership {
    term: watch::Receiver<Term>,
    /// Asks the elector to release the Lease; answers once it has (None without election).
    release: Option<mpsc::Sender<oneshot::Sender<()>>>,
    /// Without election: keeps the channel open so `changed()` waits.
    _always: Option<Arc<watch::Sender<Term>>>,
}

impl Leadership {
    /// Without leader election: always may write.
    pub fn always() -> Leadership {
        let (tx, rx) = watch::channel(Term { held: true, fence: None });
        Leadership { term: rx, release: None, _always: Some(Arc::new(tx)) }
    }

    /// True only while this replica holds the Lease and its last renew is recent enough that no
    /// other replica can have taken over (see the module comment). Check it before every write.
    pub fn may_write(&self) -> bool {
        self.term.borrow().may_write(Instant::now())
    }

    /// How long writes may still go on without another renew: zero when [`Leadership::may_write`]
    /// is false, `Duration::MAX` without election. Bound each write's timeout by it, so no write
    /// can land after a follower could have taken over.
    pub fn remaining(&self) -> Duration {
        let t = *self.term.borrow();
        let now = Instant::now();
        match t.fence {
            _ if !t.may_write(now) => Duration::ZERO,
            None => Duration::MAX,
            Some(f) => f - now,
        }
    }

    /// Whether this replica holds the Lease (as last seen; writing needs [`Leadership::may_write`]).
    pub fn holds(&self) -> bool {
        self.term.borrow().held
    }

    /// Resolves when leadership was won or lost, a renew moved the fence, or the fence has just
    /// passed (a leader that could not renew): look at [`Leadership::may_write`] again.
    pub async fn changed(&mut self) {
        let fence = {
            let t = *self.term.borrow();
            t.held.then_some(t.fence).flatten().filter(|f| *f > Instant::now())
        };
        tokio::select! {
            r = self.term.changed() => {
                if r.is_err() {
                    // The elector is gone (after release): nothing changes any more.
                    match fence {
                        Some(f) => tokio::time::sleep_until(f).await,
                        None => std::future::pending().await,
                    }
                }
            }
            _ = async { tokio::time::sleep_until(fence.unwrap_or_else(Instant::now)).await }, if fence.is_some() => {}
        }
    }

    /// Gives the Lease up so another replica takes over at once. Call it only once every write
    /// has stopped (the writer drained): from here on `may_write()` is false for every clone.
    /// Bounded by two Lease call timeouts; without election, nothing to do.
    pub async fn release(self) {
        let Some(tx) = self.release else { return };
        let (done, wait) = oneshot::channel();
        if tx.send(done).await.is_ok() {
            let _ = wait.await;
        }
    }
}

/// Runs the election and returns this replica's [`Leadership`]. After `shutdown` a follower no
/// longer tries to take over; a leader keeps renewing until [`Leadership::release`] (or until
/// every `Leadership` is dropped), so writes still draining stay fenced by a live Lease.
pub fn spawn(client: kube::Client, config: LeaseConfig, shutdown: CancellationToken) -> Leadership {
    let (tx, rx) = watch::channel(Term::NONE);
    let (release_tx, mut release_rx) = mpsc::channel::<oneshot::Sender<()>>(1);
    tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(client, &config.namespace);
        let mut elector = Elector { config, observed: None, mine: None, term: Term::NONE };
        let mut stopping = false;
        loop {
            elector.step(&api, !stopping).await;
            publish(&tx, &elector);
            let wait = elector.config.renew_every();
            let reply = tokio::select! {
                _ = tokio::time::sleep(wait) => continue,
                _ = shutdown.cancelled(), if !stopping => {
                    stopping = true;
                    continue;
                }
                r = release_rx.recv() => r,
            };
            // Released (or every Leadership dropped: nobody can write any more).
            elector.term = Term::NONE;
            publish(&tx, &elector);
            elector.release(&api).await;
            if let Some(reply) = reply {
                let _ = reply.send(());
            }
            return;
        }
    });
    Leadership { term: rx, release: Some(release_tx), _always: None }
}

fn publish(tx: &watch::Sender<Term>, elector: &Elector) {
    let (before, now) = (*tx.borrow(), elector.term);
    if before.held != now.held {
        let (identity, lease) = (&elector.config.identity, &elector.config.name);
        if now.held {
            info!(%identity, %lease, "became the leader");
        } else {
            warn!(%identity, %lease, "not the leader (any more)");
        }
    }
    if before != now {
        let _ = tx.send(now);
    }
}

/// Another holder's Lease record: who, and when it last renewed.
type Record = (Option<String>, Option<MicroTime>);

#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl CallError {
    fn is_conflict(&self) -> bool {
        matches!(self, CallError::Kube(kube::Error::Api(s)) if s.code == 409)
    }
}

struct Elector {
    config: LeaseConfig,
    /// The other holder's record and when this replica first saw it.
    observed: Option<(Record, Instant)>,
    /// The Lease as our last successful write left it (its resourceVersion renews without a GET).
    mine: Option<Lease>,
    term: Term,
}

impl Elector {
    async fn call<T>(&self, f: impl std::future::Future<Output = Result<T, kube::Error>>) -> Result<T, CallError> {
        let limit = self.config.call_timeout();
        match tokio::time::timeout(limit, f).await {
            Ok(r) => r.map_err(CallError::from),
            Err(_) => Err(CallError::Timeout(limit)),
        }
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.config.duration.as_secs().max(1) as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    fn renewed(&mut self, sent: Instant, lease: Lease) {
        self.term = Term { held: true, fence: Some(sent + self.config.duration - self.config.margin()) };
        self.observed = None;
        self.mine = Some(lease);
    }

    fn lost(&mut self) {
        self.term = Term::NONE;
        self.mine = None;
    }

    /// One round: renew, create or take over the Lease (`acquire`: a follower may take it).
    /// Leaves `term` as this round found it: a failed renew keeps the old fence, which passes.
    async fn step(&mut self, api: &Api<Lease>, acquire: bool) {
        // Renew what we wrote last, without a GET: one call per round.
        if let Some(mut lease) = self.mine.clone() {
            let acquired = lease.spec.as_ref().and_then(|s| s.acquire_time.clone());
            let transitions = lease.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0);
            lease.spec = Some(self.spec(transitions, acquired));
            let sent = Instant::now();
            match self.call(api.replace(&self.config.name, &PostParams::default(), &lease)).await {
                Ok(l) => return self.renewed(sent, l),
                Err(e) if e.is_conflict() => self.mine = None, // changed under us: look below
                Err(e) => {
                    warn!(error = %e, "cannot renew the leader Lease; writes stop when it would expire");
                    return;
                }
            }
        }
        let current = match self.call(api.get_opt(&self.config.name)).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot read the leader Lease");
                return;
            }
        };
        let Some(mut lease) = current else {
            if !acquire {
                return;
            }
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.config.name.clone()), ..Default::default() },
                spec: Some(self.spec(0, None)),
            };
            let sent = Instant::now();
            match self.call(api.create(&PostParams::default(), &lease)).await {
                Ok(l) => self.renewed(sent, l),
                Err(e) => warn!(error = %e, "cannot create the leader Lease"),
            }
            return;
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.config.identity.as_str());
        if !mine && holder.is_some() {
            self.lost();
            let record = (holder.clone(), spec.renew_time.clone());
            let first_seen = match &self.observed {
                Some((r, at)) if *r == record => *at,
                _ => {
                    let now = Instant::now();
                    self.observed = Some((record, now));
                    now
                }
            };
            let term = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
            if first_seen.elapsed() < term || !acquire {
                return;
            }
            info!(previous = ?holder, "the leader stopped renewing its Lease; taking over");
        }
        if !mine && !acquire {
            return;
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + if mine { 0 } else { 1 };
        let acquired = if mine { spec.acquire_time.clone() } else { None };
        lease.spec = Some(self.spec(transitions, acquired));
        // replace() sends the resourceVersion we read: if another replica wrote in between, the
        // apiserver answers 409 and this round is lost, never both replicas leading.
        let sent = Instant::now();
        match self.call(api.replace(&self.config.name, &PostParams::default(), &lease)).await {
            Ok(l) => self.renewed(sent, l),
            Err(e) if e.is_conflict() => self.lost(),
            Err(e) => warn!(error = %e, "cannot take or renew the leader Lease"),
        }
    }

    /// Clears the holder (once writes have stopped), so a follower takes over at once.
    async fn release(&mut self, api: &Api<Lease>) {
        let mut lease = match self.mine.take() {
            Some(l) => l,
            None => match self.call(api.get_opt(&self.config.name)).await {
                Ok(Some(l)) => l,
                _ => return,
            },
        };
        let Some(spec) = lease.spec.as_mut() else { return };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        match self.call(api.replace(&self.config.name, &PostParams::default(), &lease)).await {
            Ok(_) => info!("released the leader Lease"),
            Err(e) => {
                warn!(error = %e, "cannot release the leader Lease; the other replica takes over when it expires")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(duration: Duration) -> LeaseConfig {
        LeaseConfig { namespace: "ns".into(), name: "l".into(), identity: "me".into(), duration }
    }

    #[test]
    fn a_term_allows_writes_only_before_its_fence() {
        let now = Instant::now();
        let held = Term { held: true, fence: Some(now + Duration::from_secs(1)) };
        assert!(held.may_write(now));
        assert!(!held.may_write(now + Duration::from_secs(1)));
        assert!(!Term { held: false, fence: Some(now + Duration::from_secs(9)) }.may_write(now));
        assert!(Term { held: true, fence: None }.may_write(now), "no election");
        let c = config(Duration::from_secs(15));
        assert!(c.call_timeout() + c.renew_every() < c.duration - c.margin(), "a renew fits in a term");
    }

    /// Defect 4: a Lease call that never gets an answer gives up after the call timeout (a
    /// listener that accepts and never answers: the fault a real apiserver cannot be made to
    /// produce). Before, the call waited for kube's read timeout (minutes) and the replica
    /// kept "leading".
    #[tokio::test]
    async fn a_stalled_lease_call_times_out_and_the_replica_never_writes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = listener.accept().await {
                conns.push(c); // kept open, never answered
            }
        });
        let kube_config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        let client = kube::Client::try_from(kube_config).unwrap();
        let api: Api<Lease> = Api::namespaced(client, "ns");
        let mut elector =
            Elector { config: config(Duration::from_millis(900)), observed: None, mine: None, term: Term::NONE };
        let started = Instant::now();
        elector.step(&api, true).await;
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(1500), "{took:?}");
        assert_eq!(elector.term, Term::NONE);

        // A leader whose renew stalls: the call gives up, the fence is kept and passes.
        let fence = Instant::now() + Duration::from_millis(100);
        elector.term = Term { held: true, fence: Some(fence) };
        elector.mine = Some(Lease::default());
        let started = Instant::now();
        elector.step(&api, true).await;
        assert!(started.elapsed() < Duration::from_millis(700), "one call, timed out: {:?}", started.elapsed());
        assert_eq!(elector.term.fence, Some(fence), "a failed renew does not extend the term");
        assert!(!elector.term.may_write(Instant::now()));
        held.abort();
    }

    #[tokio::test]
    async fn changed_wakes_when_the_fence_passes() {
        let (tx, rx) = watch::channel(Term { held: true, fence: Some(Instant::now() + Duration::from_millis(150)) });
        let mut l = Leadership { term: rx, release: None, _always: None };
        assert!(l.may_write());
        assert!(l.remaining() > Duration::ZERO && l.remaining() <= Duration::from_millis(150));
        tokio::time::timeout(Duration::from_secs(2), l.changed()).await.expect("woken at the fence");
        assert!(!l.may_write());
        assert_eq!(l.remaining(), Duration::ZERO);
        drop(tx);
        let mut always = Leadership::always();
        assert!(always.may_write());
        assert_eq!(always.remaining(), Duration::MAX);
        assert!(tokio::time::timeout(Duration::from_millis(100), always.changed()).await.is_err(), "never changes");
        always.release().await;
    }
}
