//! Pure: which pod holds each public name where the tunnel server does not load-balance
//! (tuns.sh). Pods of one Deployment behind one route all ask for the same name; only one can
//! have it, and the others, if they kept asking, would re-request it every few seconds for the
//! life of the Deployment. So one pod holds each claim (an HTTP/TLS name or a fixed TCP port) and
//! the others' tunnels files say `standby: true` -- they ask the server nothing until the holder
//! goes, is not Ready or reports a failure, and the claim moves (contract 10 of issue 12).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;

use crate::core::tunnel::TunnelsFile;
use crate::resolve::PodKey;

/// What the assignment needs to know of one pod carrying a claim.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Candidate {
    pub key: PodKey,
    pub created: Option<Timestamp>,
    /// No deletionTimestamp, not Succeeded or Failed.
    pub live: bool,
    /// The pod's Ready condition is True.
    pub ready: bool,
    /// Its current tunnels file has the claim without `standby`.
    pub holds: bool,
    /// Its sidecar reports the tunnel established (it has the name on the server).
    pub established: bool,
    /// Its sidecar reports the tunnel failed.
    pub failed: bool,
    /// Its sidecar has not reported this tunnel's outcome yet (no report, or still connecting,
    /// requesting or waiting for the app).
    pub unreported: bool,
}

impl Candidate {
    fn eligible(&self) -> bool {
        self.live && self.ready && !self.failed
    }

    fn age(&self) -> (bool, Option<Timestamp>, &PodKey) {
        (self.created.is_none(), self.created, &self.key)
    }
}

/// Who holds one claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder<'a> {
    /// This pod; every other pod stands by.
    Pod(&'a PodKey),
    /// Several pods were told to hold it (at admission the webhook tells every new pod so), one of
    /// them may have it on the server, and their sidecars have not said which yet: nothing
    /// changes until they have, so the pod that got the name is never told to give it up.
    Undecided,
    /// Nobody is live.
    Nobody,
}

/// The pod that holds one claim, among the live, Ready, not failed pods whose file says they
/// hold it: the one whose sidecar has the name established; else, while more than one of them
/// has not reported yet, [`Holder::Undecided`]; else the oldest of them. With none: the oldest
/// Ready live pod (creationTimestamp, then namespace/name), else the oldest live pod.
pub fn holder(candidates: &[Candidate]) -> Holder<'_> {
    let holding = || candidates.iter().filter(|c| c.holds && c.eligible());
    let established = holding().filter(|c| c.established).min_by(|a, b| a.age().cmp(&b.age()));
    if established.is_none() && holding().filter(|c| c.unreported).count() > 0 && holding().count() > 1 {
        return Holder::Undecided;
    }
    established
        .or_else(|| holding().min_by(|a, b| a.age().cmp(&b.age())))
        .or_else(|| candidates.iter().filter(|c| c.eligible()).min_by(|a, b| a.age().cmp(&b.age())))
        .or_else(|| candidates.iter().filter(|c| c.live).min_by(|a, b| a.age().cmp(&b.age())))
        .map_or(Holder::Nobody, |c| Holder::Pod(&c.key))
}

/// Holders of every claim: `claims` maps a public claim to the pods asking for it.
pub fn holders(claims: &BTreeMap<String, Vec<Candidate>>) -> BTreeMap<String, Holder<'_>> {
    claims.iter().map(|(claim, c)| (claim.clone(), holder(c))).collect()
}

/// The pod's Ready condition is True.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The claims a pod's current tunnels file (its annotation) does not tell it to stand by for.
pub fn held_claims(current_file: Option<&String>) -> BTreeSet<String> {
    current_file
        .and_then(|f| TunnelsFile::parse(f).ok())
        .map(|f| f.tunnels.iter().filter(|t| !t.standby).filter_map(|t| t.public_claim()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, created: &str) -> Candidate {
        Candidate {
            key: ("ns".into(), name.into()),
            created: Some(created.parse().unwrap()),
            live: true,
            ready: true,
            ..Default::default()
        }
    }

    fn name(h: Holder<'_>) -> Option<&str> {
        match h {
            Holder::Pod(k) => Some(k.1.as_str()),
            _ => None,
        }
    }

    #[test]
    fn the_oldest_ready_pod_is_chosen_when_nobody_holds_the_claim() {
        let mut young_unready = pod("a", "2026-01-01T00:00:03Z");
        young_unready.ready = false;
        let cands = [young_unready, pod("c", "2026-01-01T00:00:02Z"), pod("b", "2026-01-01T00:00:01Z")];
        assert_eq!(name(holder(&cands)), Some("b"));
        // Same age: by name.
        let cands = [pod("z", "2026-01-01T00:00:01Z"), pod("y", "2026-01-01T00:00:01Z")];
        assert_eq!(name(holder(&cands)), Some("y"));
    }

    #[test]
    fn the_holder_keeps_the_claim_while_it_is_ready() {
        let mut young = pod("young", "2026-01-01T00:00:05Z");
        young.holds = true;
        let cands = [pod("old", "2026-01-01T00:00:01Z"), young];
        assert_eq!(name(holder(&cands)), Some("young"), "an older pod does not take the name over");
    }

    #[test]
    fn the_claim_moves_when_the_holder_is_not_ready_failed_or_gone() {
        let mut holding = pod("h", "2026-01-01T00:00:01Z");
        holding.holds = true;
        let other = pod("o", "2026-01-01T00:00:05Z");
        for (what, change) in [
            ("not Ready", (|c: &mut Candidate| c.ready = false) as fn(&mut Candidate)),
            ("reports failed", |c| c.failed = true),
            ("being deleted", |c| c.live = false),
        ] {
            let mut h = holding.clone();
            change(&mut h);
            assert_eq!(name(holder(&[h, other.clone()])), Some("o"), "holder {what}");
        }
        // Deleted: gone from the cache.
        assert_eq!(name(holder(std::slice::from_ref(&other))), Some("o"));
    }

    #[test]
    fn without_a_ready_pod_the_oldest_live_one_holds_and_dead_ones_never() {
        let mut a = pod("a", "2026-01-01T00:00:02Z");
        let mut b = pod("b", "2026-01-01T00:00:01Z");
        a.ready = false;
        b.ready = false;
        assert_eq!(name(holder(&[a.clone(), b.clone()])), Some("b"));
        b.live = false;
        assert_eq!(name(holder(&[a.clone(), b.clone()])), Some("a"));
        a.live = false;
        assert_eq!(holder(&[a, b]), Holder::Nobody);
    }

    #[test]
    fn of_several_files_that_say_they_hold_it_the_one_with_the_name_wins() {
        // The webhook writes a new replica's file without standby: for a moment two "hold" it.
        let mut old = pod("old", "2026-01-01T00:00:01Z");
        let mut new = pod("new", "2026-01-01T00:00:09Z");
        old.holds = true;
        new.holds = true;
        new.established = true;
        assert_eq!(name(holder(&[old, new])), Some("new"));
    }

    /// At admission every replica's file holds the name; one of them gets it on the server, and
    /// until the sidecars have reported nobody is told to give it up (on the real node the pod
    /// that had the name was told to stand by when the controller chose by age alone).
    #[test]
    fn while_several_files_hold_it_and_a_sidecar_has_not_reported_nothing_changes() {
        let mut old = pod("old", "2026-01-01T00:00:01Z");
        let mut new = pod("new", "2026-01-01T00:00:09Z");
        old.holds = true;
        new.holds = true;
        new.unreported = true;
        assert_eq!(holder(&[old.clone(), new.clone()]), Holder::Undecided);
        new.unreported = false;
        new.established = true;
        assert_eq!(name(holder(&[old.clone(), new.clone()])), Some("new"));
        // Reported, nobody has it (both stand by on their own, say): the oldest holds.
        new.established = false;
        assert_eq!(name(holder(&[old.clone(), new])), Some("old"));
        // One file alone holds it, not reported yet: that one, no need to wait.
        old.unreported = true;
        assert_eq!(name(holder(&[old, pod("other", "2026-01-01T00:00:00Z")])), Some("old"));
    }

    #[test]
    fn held_claims_are_read_from_the_current_file() {
        let file = r#"{"tunnels":[{"name":"a","kind":"http","host":"demo","targetPort":80},
            {"name":"b","kind":"http","host":"other","targetPort":80,"standby":true},
            {"name":"c","kind":"tcp","targetPort":80}]}"#
            .to_string();
        let held = held_claims(Some(&file));
        assert_eq!(held.into_iter().collect::<Vec<_>>(), ["http name \"demo\""]);
        assert!(held_claims(None).is_empty());
    }
}
