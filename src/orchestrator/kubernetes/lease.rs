//! Leader election through a `coordination.k8s.io/v1` Lease.
//!
//! The algorithm follows client-go's: a candidate takes the lease when it is free or
//! when its record has not changed for a whole lease duration *as observed locally*
//! (so clocks need not agree); the holder renews it well within the duration. Every
//! write carries the resourceVersion it read, so two candidates racing for the same
//! lease get one success and one 409 Conflict.
//!
//! The holder also writes where its relay listens ([`RELAY_ANNOTATION`]): the other replicas
//! reach stdio servers through it, since only the holder attaches to their pods.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

/// Annotation of the Lease naming the holder's relay (its base URL).
pub const RELAY_ANNOTATION: &str = "gatehouse.dev/relay";

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
    /// When we last renewed successfully.
    renewed: Option<Instant>,
    /// Our relay's base URL, written into the lease while we hold it.
    advertise: watch::Receiver<Option<String>>,
    /// The current holder's relay, as its lease says (none while we hold it or nobody does).
    holder_relay: watch::Sender<Option<String>>,
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
            holder_relay: watch::Sender::new(None),
        }
    }

    /// Writes `advertise` (our relay) into the lease we hold, and publishes the holder's on
    /// `holder_relay`.
    pub fn with_relay(
        mut self,
        advertise: watch::Receiver<Option<String>>,
        holder_relay: watch::Sender<Option<String>>,
    ) -> Self {
        self.advertise = advertise;
        self.holder_relay = holder_relay;
        self
    }

    /// Our relay's annotation, on a lease we are about to write.
    fn annotate(&self, meta: &mut ObjectMeta) {
        let annotations = meta.annotations.get_or_insert_with(Default::default);
        match self.advertise.borrow().clone() {
            Some(url) => {
                annotations.insert(RELAY_ANNOTATION.into(), url);
            }
            None => {
                annotations.remove(RELAY_ANNOTATION);
            }
        }
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

    async fn round(&mut self) -> Result<Round, kube::Error> {
        let me = &self.settings.identity;
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
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Round::Leading),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Round::Following),
                Err(e) => Err(e),
            };
        };
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        let now = Instant::now();
        match &self.seen {
            Some((seen_rv, _)) if *seen_rv == rv => {}
            _ => self.seen = Some((rv, now)),
        }
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let duration = spec
            .lease_duration_seconds
            .map_or(self.settings.lease_duration, |s| {
                Duration::from_secs(u64::try_from(s).unwrap_or(0))
            });
        let expired = self
            .seen
            .as_ref()
            .is_some_and(|(_, at)| now.duration_since(*at) >= duration);
        let mine = holder.as_deref() == Some(me.as_str());
        if !mine && holder.is_some() && !expired {
            let relay = lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(RELAY_ANNOTATION))
                .cloned();
            self.publish_holder_relay(relay);
            return Ok(Round::Following);
        }
        // Nobody (else) holds a valid lease: there is no relay to follow until someone does.
        self.publish_holder_relay(None);
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
                self.seen = written
                    .metadata
                    .resource_version
                    .map(|rv| (rv, Instant::now()));
                Ok(Round::Leading)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Round::Following),
            Err(e) => Err(e),
        }
    }

    /// Runs the election forever, publishing whether we lead on `leading`.
    pub async fn run(mut self, leading: watch::Sender<bool>) {
        loop {
            let was = *leading.borrow();
            let now_leading = match self.round().await {
                Ok(Round::Leading) => {
                    self.renewed = Some(Instant::now());
                    true
                }
                Ok(Round::Following) => false,
                Err(e) => {
                    tracing::warn!(lease = %self.settings.name, "leader election: {e}");
                    // Keep leading only while our last renewal is still valid.
                    was && self
                        .renewed
                        .is_some_and(|t| t.elapsed() < self.settings.lease_duration)
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
            let pause = if now_leading {
                self.settings.renew_every
            } else {
                self.settings.retry_every
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                // Our relay is listening now: say where at once, not at the next renewal.
                Ok(()) = self.advertise.changed(), if now_leading => {}
            }
        }
    }

    /// Gives the lease up if we hold it, so another replica takes over at once.
    pub async fn release(api: &Api<Lease>, settings: &LeaseSettings) -> Result<(), kube::Error> {
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
