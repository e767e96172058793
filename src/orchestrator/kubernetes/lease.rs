//! Leader election through a `coordination.k8s.io/v1` Lease.
//!
//! The algorithm follows client-go's: a candidate takes the lease when it is free or
//! when its record has not changed for a whole lease duration *as observed locally*
//! (so clocks need not agree); the holder renews it well within the duration. Every
//! write carries the resourceVersion it read, so two candidates racing for the same
//! lease get one success and one 409 Conflict.
//!
//! A holder whose renewals fail stops leading two thirds of a lease duration after it sent its
//! last successful renewal (each round is bounded by a third), so it has let go before any
//! other replica may take the lease: two replicas never lead (and attach) at once.
//!
//! The holder also writes where its relay listens ([`RELAY_ANNOTATION`]), signed with a key of
//! the replicas' secret together with its identity ([`RELAY_SIGNATURE_ANNOTATION`]): the other
//! replicas reach stdio servers through it, since only the holder attaches to their pods, and
//! they follow no address a mere writer of the Lease put there (nor would a relay there prove
//! the replicas' key to them).
//!
//! A holder that gives the lease up leaves its signed relay in it and says who it was
//! ([`RELEASED_BY_ANNOTATION`]): the replica that takes the lease next learns whom to take the
//! leader's state from ([`Handover`]), whether the lease was given up or taken once expired.
//!
//! A lease is free before it expires only when its holder gave it up: the release is signed
//! ([`RELEASE_SIGNATURE_ANNOTATION`]) for that holder, the time it took the lease and the
//! version of the lease it gave up, and a follower takes it at once only if it saw that very
//! holding, at that version or an earlier one (an old release, written again over a holding
//! forged after it, is older than what the follower saw). A writer of the Lease who
//! empties it, or shortens its duration (never taken below this replica's own), would
//! otherwise have a follower lead while the holder still does until its next round: two
//! replicas attached to one stdio pod, each reading the other's answers.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use crate::orchestrator::Handover;
use crate::replica_key::ReplicaKey;

/// Annotation of the Lease naming the holder's relay (its base URL).
pub const RELAY_ANNOTATION: &str = "gatehouse.dev/relay";
/// Annotation of the Lease: HMAC-SHA256 (the replicas' lease key) of the holder and its relay.
pub const RELAY_SIGNATURE_ANNOTATION: &str = "gatehouse.dev/relay-signature";
/// Annotation of a Lease given up: the identity of the holder that gave it up (its relay
/// annotations stay, signed for that identity).
pub const RELEASED_BY_ANNOTATION: &str = "gatehouse.dev/released-by";
/// Annotation of a Lease given up: HMAC-SHA256 (the replicas' lease key) of the holder that
/// gave it up, when it had taken it (`acquireTime`) and the version it gave up
/// ([`RELEASED_FROM_ANNOTATION`]).
pub const RELEASE_SIGNATURE_ANNOTATION: &str = "gatehouse.dev/release-signature";
/// Annotation of a Lease given up: the resourceVersion its holder read and gave up.
pub const RELEASED_FROM_ANNOTATION: &str = "gatehouse.dev/released-from";

/// HMAC-SHA256 keyed by the replicas' lease key ([`ReplicaKey::lease_key`]) over the holder
/// and its relay's address.
fn relay_mac(key: &[u8], holder: &str, url: &str) -> hmac::Hmac<sha2::Sha256> {
    use hmac::Mac;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    // Neither a pod name nor a URL holds a newline: the split is unambiguous.
    mac.update(holder.as_bytes());
    mac.update(b"\n");
    mac.update(url.as_bytes());
    mac
}

/// The signature of `holder`'s relay at `url`, base64url.
fn relay_signature(key: &[u8], holder: &str, url: &str) -> String {
    use base64::Engine;
    use hmac::Mac;
    let tag = relay_mac(key, holder, url).finalize().into_bytes();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag)
}

/// Whether `signature` signs `holder`'s relay at `url` (compared in constant time).
fn relay_signed(key: &[u8], holder: &str, url: &str, signature: &str) -> bool {
    use base64::Engine;
    use hmac::Mac;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(signature)
        .is_ok_and(|tag| relay_mac(key, holder, url).verify_slice(&tag).is_ok())
}

/// What a release signs beside its holder: when it took the lease and the version it gave up
/// (a relay's address never starts with `released `, so no relay signature reads as one).
fn release_terms(acquired: &str, version: &str) -> String {
    format!("released {acquired} at {version}")
}

/// Whether resourceVersion `released` is `seen` or later. Kubernetes' versions are etcd
/// revisions, which only grow; any that is not a number must be `seen` itself.
fn not_before(released: &str, seen: &str) -> bool {
    match (released.parse::<u64>(), seen.parse::<u64>()) {
        (Ok(r), Ok(s)) => r >= s,
        _ => released == seen,
    }
}

/// When `spec`'s holder took the lease, as text (empty when the lease does not say).
fn acquired(spec: &LeaseSpec) -> String {
    spec.acquire_time
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default()
}

/// Settings of the election.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// Name of the Lease object.
    pub name: String,
    /// This replica's identity (the pod name plus a random suffix).
    pub identity: String,
    /// How long a lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How often the holder renews.
    pub renew_every: Duration,
    /// How often a candidate retries.
    pub retry_every: Duration,
}

impl LeaseSettings {
    /// Defaults like client-go's (15 s lease, renew every 5 s, retry every 2 s).
    pub fn new(name: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaseSettings {
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            retry_every: Duration::from_secs(2),
        }
    }
}

/// Outcome of one round of the election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    Leading,
    Following,
}

/// One replica's view of the lease.
pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The record we last saw (resourceVersion) and when it last changed, locally.
    seen: Option<(String, Instant)>,
    /// When we sent our last successful renewal.
    renewed: Option<Instant>,
    /// Our relay's base URL, written into the lease while we hold it.
    advertise: watch::Receiver<Option<String>>,
    /// The replicas' key, which signs the relay's address.
    key: watch::Receiver<Option<std::sync::Arc<ReplicaKey>>>,
    /// The current holder's relay, as its lease says (none while we hold it or nobody does).
    holder_relay: watch::Sender<Option<String>>,
    /// Whom we took the lease from, published as we come to lead.
    handover: watch::Sender<Handover>,
    /// Whom our last attempt to take the lease took it from, while its outcome is unknown (no
    /// answer): if it was written, the lease names us next round, and that one is whom from.
    attempted: Option<Handover>,
    /// The resourceVersion of the lease as our last write left it: a lease that names us and
    /// still has it is ours (renewals that failed for a while do not make it another's), one
    /// that names us with another was written by someone else.
    wrote: Option<String>,
    /// The holding we last followed: its holder, when it took the lease, and the version we
    /// saw it at. Only its release frees the lease before it expires.
    followed: Option<(String, String, String)>,
}

impl Elector {
    /// An elector for the lease in `api`'s namespace.
    pub fn new(api: Api<Lease>, settings: LeaseSettings) -> Self {
        Elector {
            api,
            settings,
            seen: None,
            renewed: None,
            advertise: watch::Sender::new(None).subscribe(),
            key: watch::Sender::new(None).subscribe(),
            holder_relay: watch::Sender::new(None),
            handover: watch::Sender::new(Handover::Nobody),
            attempted: None,
            wrote: None,
            followed: None,
        }
    }

    /// Writes `advertise` (our relay) into the lease we hold, signed with `key`, publishes
    /// the holder's (when its signature holds) on `holder_relay`, and, as we come to lead,
    /// whom we took the lease from on `handover`.
    pub fn with_relay(
        mut self,
        advertise: watch::Receiver<Option<String>>,
        key: watch::Receiver<Option<std::sync::Arc<ReplicaKey>>>,
        holder_relay: watch::Sender<Option<String>>,
        handover: watch::Sender<Handover>,
    ) -> Self {
        self.advertise = advertise;
        self.key = key;
        self.holder_relay = holder_relay;
        self.handover = handover;
        self
    }

    /// Our relay's annotations, on a lease we are about to write.
    fn annotate(&self, meta: &mut ObjectMeta) {
        let annotations = meta.annotations.get_or_insert_with(Default::default);
        annotations.remove(RELEASED_BY_ANNOTATION);
        annotations.remove(RELEASE_SIGNATURE_ANNOTATION);
        annotations.remove(RELEASED_FROM_ANNOTATION);
        let url = self.advertise.borrow().clone();
        let key = self.key.borrow().clone();
        match url.zip(key) {
            Some((url, key)) => {
                let signature = relay_signature(key.lease_key(), &self.settings.identity, &url);
                annotations.insert(RELAY_ANNOTATION.into(), url);
                annotations.insert(RELAY_SIGNATURE_ANNOTATION.into(), signature);
            }
            None => {
                annotations.remove(RELAY_ANNOTATION);
                annotations.remove(RELAY_SIGNATURE_ANNOTATION);
            }
        }
    }

    /// The relay the holder of `lease` signed, if its signature holds.
    fn signed_relay(&self, lease: &Lease, holder: &str) -> Option<String> {
        let annotations = lease.metadata.annotations.as_ref()?;
        let url = annotations.get(RELAY_ANNOTATION)?;
        let signature = annotations.get(RELAY_SIGNATURE_ANNOTATION)?;
        let key = self.key.borrow().clone()?;
        // (A holder of the secret this replica also accepts, while it is rotated, too.)
        if key
            .lease_keys()
            .any(|k| relay_signed(k, holder, url, signature))
        {
            Some(url.clone())
        } else {
            tracing::warn!(
                lease = %self.settings.name,
                %holder,
                "the lease names a relay its holder did not sign with the replicas' key (a forged address, or a holder of an earlier version or of another secret); not following it"
            );
            None
        }
    }

    /// Whether `lease` (empty) was given up by the holder we last followed, in the holding we
    /// saw: its release signed for that holder, that time of taking, and a version no older
    /// than the one we saw it at.
    fn given_up(&self, lease: &Lease, spec: &LeaseSpec) -> bool {
        let (Some((holder, since, seen)), Some(annotations), Some(key)) = (
            &self.followed,
            lease.metadata.annotations.as_ref(),
            self.key.borrow().clone(),
        ) else {
            return false;
        };
        let (Some(by), Some(from), Some(signature)) = (
            annotations.get(RELEASED_BY_ANNOTATION),
            annotations.get(RELEASED_FROM_ANNOTATION),
            annotations.get(RELEASE_SIGNATURE_ANNOTATION),
        ) else {
            return false;
        };
        by == holder
            && acquired(spec) == *since
            && not_before(from, seen)
            && key
                .lease_keys()
                .any(|k| relay_signed(k, by, &release_terms(since, from), signature))
    }

    fn publish_holder_relay(&self, relay: Option<String>) {
        self.holder_relay
            .send_if_modified(|r| std::mem::replace(r, relay.clone()) != relay);
    }

    fn now() -> MicroTime {
        MicroTime(Timestamp::now())
    }

    fn duration_secs(&self) -> i32 {
        i32::try_from(self.settings.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// Whom taking `lease` (held by `holder`, or by us when `mine`) takes over from.
    fn handover_of(&self, lease: &Lease, holder: Option<&str>, mine: bool) -> Handover {
        if mine {
            // Ours since an attempt whose answer was lost: taken from whom that one took it.
            return self.attempted.clone().unwrap_or(Handover::Kept);
        }
        let released_by = || {
            let annotations = lease.metadata.annotations.as_ref()?;
            annotations.get(RELEASED_BY_ANNOTATION).map(String::as_str)
        };
        holder
            .or_else(released_by)
            .filter(|h| *h != self.settings.identity)
            .and_then(|h| self.signed_relay(lease, h))
            .map_or(Handover::Nobody, Handover::From)
    }

    /// One round: reads the lease, and takes or renews it when it may. `leading` says whether
    /// we lead now (as we come to, whom we take over from is published).
    async fn round(&mut self, leading: bool) -> Result<Round, kube::Error> {
        let me = self.settings.identity.clone();
        let Some(lease) = self.api.get_opt(&self.settings.name).await? else {
            let mut metadata = ObjectMeta {
                name: Some(self.settings.name.clone()),
                ..ObjectMeta::default()
            };
            self.annotate(&mut metadata);
            let lease = Lease {
                metadata,
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(self.duration_secs()),
                    acquire_time: Some(Self::now()),
                    renew_time: Some(Self::now()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            // (Until the answer comes, whether it was made is unknown.)
            self.attempted = Some(Handover::Nobody);
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.wrote = created.metadata.resource_version;
                    self.attempted = None;
                    self.handover.send_replace(Handover::Nobody);
                    Ok(Round::Leading)
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    self.attempted = None;
                    Ok(Round::Following)
                }
                Err(e) => Err(e),
            };
        };
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        let now = Instant::now();
        match &self.seen {
            Some((seen_rv, _)) if *seen_rv == rv => {}
            _ => self.seen = Some((rv.clone(), now)),
        }
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        // Never shorter than ours: a writer of the Lease could shorten it to take it now.
        let duration = spec
            .lease_duration_seconds
            .map_or(self.settings.lease_duration, |s| {
                Duration::from_secs(u64::try_from(s).unwrap_or(0))
            })
            .max(self.settings.lease_duration);
        let expired = self
            .seen
            .as_ref()
            .is_some_and(|(_, at)| now.duration_since(*at) >= duration);
        // A lease that names us is ours only if we wrote it: we lead (and renew it), or an
        // attempt of ours is out whose answer was lost. Otherwise someone else wrote our name
        // in it (whoever may update the Lease): taking that up would have two replicas lead at
        // once until the real holder's next round. It is left to expire, as another's.
        let named = holder.as_deref() == Some(me.as_str());
        let mine = named
            && (leading || self.attempted.is_some() || self.wrote.as_deref() == Some(rv.as_str()));
        if !mine
            && !expired
            && let Some(holder) = &holder
        {
            let relay = (!named)
                .then(|| self.signed_relay(&lease, holder))
                .flatten();
            self.publish_holder_relay(relay);
            if !named {
                self.followed = Some((holder.clone(), acquired(&spec), rv.clone()));
            }
            // Another holds it: no attempt of ours took it.
            self.attempted = None;
            return Ok(Round::Following);
        }
        // Emptied before it expired, by other than the holder we followed giving it up: held
        // still, as far as we know, until it expires. (A leader finding its lease emptied
        // takes it back.)
        if !leading && !expired && holder.is_none() && !self.given_up(&lease, &spec) {
            self.attempted = None;
            return Ok(Round::Following);
        }
        // Nobody (else) holds a valid lease: there is no relay to follow until someone does.
        self.publish_holder_relay(None);
        let handover = (!leading).then(|| self.handover_of(&lease, holder.as_deref(), mine));
        // Until the answer comes, whether it was written is unknown (kept as it is while the
        // lease already names us: that attempt's outcome is still the one that counts).
        if !mine {
            self.attempted = handover.clone();
        } else if self.attempted.is_none() {
            // A renewal whose answer is lost may still have been written: the lease then names
            // us with a version we never saw, and is ours all the same.
            self.attempted = Some(Handover::Kept);
        }
        let mut next = lease.clone();
        self.annotate(&mut next.metadata);
        let mut spec = spec;
        if !mine {
            spec.holder_identity = Some(me.clone());
            spec.acquire_time = Some(Self::now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(Self::now());
        spec.lease_duration_seconds = Some(self.duration_secs());
        next.spec = Some(spec);
        // replace() sends the resourceVersion we read: a concurrent writer makes this a 409.
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &next)
            .await
        {
            Ok(written) => {
                self.wrote = written.metadata.resource_version.clone();
                self.seen = written
                    .metadata
                    .resource_version
                    .map(|rv| (rv, Instant::now()));
                self.attempted = None;
                if let Some(handover) = handover {
                    self.handover.send_replace(handover);
                }
                Ok(Round::Leading)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                self.attempted = None;
                Ok(Round::Following)
            }
            Err(e) => Err(e),
        }
    }

    /// Runs the election forever, publishing whether we lead on `leading`.
    pub async fn run(mut self, leading: watch::Sender<bool>) {
        // Another replica may take the lease a whole duration after it last saw it change
        // (which is after we sent the renewal): let go well before.
        let term = self.settings.lease_duration * 2 / 3;
        let round_limit = self.settings.lease_duration / 3;
        loop {
            let was = *leading.borrow();
            let sent = Instant::now();
            let round = tokio::time::timeout(round_limit, self.round(was)).await;
            let now_leading = match round {
                Ok(Ok(Round::Leading)) => {
                    self.renewed = Some(sent);
                    true
                }
                Ok(Ok(Round::Following)) => false,
                failed => {
                    match failed {
                        Ok(Err(e)) => {
                            tracing::warn!(lease = %self.settings.name, "leader election: {e}")
                        }
                        _ => tracing::warn!(
                            lease = %self.settings.name,
                            "leader election: no answer within {round_limit:?}"
                        ),
                    }
                    // Keep leading only while our last renewal is still safely valid.
                    was && self.renewed.is_some_and(|t| t.elapsed() < term)
                }
            };
            if was != now_leading {
                tracing::info!(
                    lease = %self.settings.name,
                    identity = %self.settings.identity,
                    "{}",
                    if now_leading { "became the leader" } else { "lost leadership" }
                );
            }
            leading.send_if_modified(|l| std::mem::replace(l, now_leading) != now_leading);
            let pause = match self.renewed.filter(|_| now_leading) {
                // Wake up in time to let go if renewals keep failing.
                Some(t) => self
                    .settings
                    .renew_every
                    .min(term.saturating_sub(t.elapsed())),
                None => self.settings.retry_every,
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                // Our relay is listening now: say where at once, not at the next renewal.
                Ok(()) = self.advertise.changed(), if now_leading => {}
                Ok(()) = self.key.changed(), if now_leading => {}
            }
        }
    }

    /// Gives the lease up if we hold it, so another replica takes over at once (and takes the
    /// leader's state from us: our relay stays in the lease, and who we were).
    /// The release is signed with `key` (the replicas'), so that a follower that saw our
    /// holding takes the lease at once; without one it waits for the lease to expire.
    pub async fn release(
        api: &Api<Lease>,
        settings: &LeaseSettings,
        key: Option<&ReplicaKey>,
    ) -> Result<(), kube::Error> {
        let Some(mut lease) = api.get_opt(&settings.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(Self::now());
        spec.lease_duration_seconds = Some(1);
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let terms = release_terms(&acquired(spec), &version);
        let annotations = lease
            .metadata
            .annotations
            .get_or_insert_with(Default::default);
        annotations.insert(RELEASED_BY_ANNOTATION.into(), settings.identity.clone());
        annotations.insert(RELEASED_FROM_ANNOTATION.into(), version);
        match key {
            Some(key) => annotations.insert(
                RELEASE_SIGNATURE_ANNOTATION.into(),
                relay_signature(key.lease_key(), &settings.identity, &terms),
            ),
            None => annotations.remove(RELEASE_SIGNATURE_ANNOTATION),
        };
        match api
            .replace(&settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{relay_signature, relay_signed};
    use crate::replica_key::ReplicaKey;

    #[test]
    fn a_relay_signature_binds_secret_holder_and_address() {
        let key = ReplicaKey::derive(&"s".repeat(43)).unwrap();
        let other = ReplicaKey::derive(&"t".repeat(43)).unwrap();
        let (key, other) = (key.lease_key(), other.lease_key());
        let sig = relay_signature(key, "gw-1_0a", "http://10.0.0.7:9091");
        assert!(relay_signed(key, "gw-1_0a", "http://10.0.0.7:9091", &sig));
        assert!(!relay_signed(key, "gw-2_0b", "http://10.0.0.7:9091", &sig));
        assert!(!relay_signed(key, "gw-1_0a", "http://10.0.0.8:9091", &sig));
        assert!(!relay_signed(
            other,
            "gw-1_0a",
            "http://10.0.0.7:9091",
            &sig
        ));
        assert!(!relay_signed(
            key,
            "gw-1_0a",
            "http://10.0.0.7:9091",
            "not base64!"
        ));
        assert!(!relay_signed(key, "gw-1_0a", "http://10.0.0.7:9091", ""));
    }
}
