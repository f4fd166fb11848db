//! Leader election with a coordination.k8s.io Lease, so two controller replicas can run and only
//! one writes. Expiry is judged by this replica's own clock -- how long the Lease record has
//! stayed unchanged -- as client-go does, so clock skew between nodes does not matter.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
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

/// Runs the election until `shutdown`; the receiver says whether this replica leads. On shutdown
/// a leader releases the Lease so the other replica takes over at once.
pub fn spawn(client: kube::Client, config: LeaseConfig, shutdown: CancellationToken) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(client, &config.namespace);
        let mut elector = Elector { config, observed: None, last_renewed: None };
        let retry = elector.config.duration / 3;
        loop {
            let leading = elector.step(&api).await;
            if *tx.borrow() != leading {
                if leading {
                    info!(identity = %elector.config.identity, lease = %elector.config.name, "became the leader");
                } else {
                    warn!(identity = %elector.config.identity, lease = %elector.config.name, "not the leader (any more)");
                }
                let _ = tx.send(leading);
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        if *tx.borrow() {
            let _ = tx.send(false);
            elector.release(&api).await;
        }
    });
    rx
}

/// Another holder's Lease record: who, and when it last renewed.
type Record = (Option<String>, Option<MicroTime>);

struct Elector {
    config: LeaseConfig,
    /// The other holder's record and when this replica first saw it.
    observed: Option<(Record, Instant)>,
    last_renewed: Option<Instant>,
}

impl Elector {
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

    /// One round: create, renew or take over the Lease. Returns whether this replica leads.
    async fn step(&mut self, api: &Api<Lease>) -> bool {
        let current = match api.get_opt(&self.config.name).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot read the leader Lease");
                return self.still_within_term();
            }
        };
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.config.name.clone()), ..Default::default() },
                spec: Some(self.spec(0, None)),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => self.renewed(),
                Err(e) => {
                    warn!(error = %e, "cannot create the leader Lease");
                    false
                }
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.config.identity.as_str());
        if !mine && holder.is_some() {
            let record = (holder.clone(), spec.renew_time.clone());
            let first_seen = match &self.observed {
                Some((r, at)) if *r == record => *at,
                _ => {
                    self.observed = Some((record, Instant::now()));
                    Instant::now()
                }
            };
            let term = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
            if first_seen.elapsed() < term {
                self.last_renewed = None;
                return false;
            }
            info!(previous = ?holder, "the leader stopped renewing its Lease; taking over");
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + if mine { 0 } else { 1 };
        let acquired = if mine { spec.acquire_time.clone() } else { None };
        lease.spec = Some(self.spec(transitions, acquired));
        // replace() sends the resourceVersion we read: if another replica wrote in between, the
        // apiserver answers 409 and this round is lost, never both replicas leading.
        match api.replace(&self.config.name, &PostParams::default(), &lease).await {
            Ok(_) => self.renewed(),
            Err(kube::Error::Api(s)) if s.code == 409 => false,
            Err(e) => {
                warn!(error = %e, "cannot renew the leader Lease");
                mine && self.still_within_term()
            }
        }
    }

    fn renewed(&mut self) -> bool {
        self.last_renewed = Some(Instant::now());
        self.observed = None;
        true
    }

    /// A leader that cannot reach the apiserver steps down before its Lease could expire
    /// for the others.
    fn still_within_term(&self) -> bool {
        self.last_renewed.is_some_and(|t| t.elapsed() < self.config.duration * 2 / 3)
    }

    async fn release(&self, api: &Api<Lease>) {
        let Ok(Some(mut lease)) = api.get_opt(&self.config.name).await else { return };
        let Some(spec) = lease.spec.as_mut() else { return };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        match api.replace(&self.config.name, &PostParams::default(), &lease).await {
            Ok(_) => info!("released the leader Lease"),
            Err(e) => {
                warn!(error = %e, "cannot release the leader Lease; the other replica takes over when it expires")
            }
        }
    }
}
