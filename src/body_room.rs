//! The memory client request bodies may hold at once (`mcp.max_bodies_bytes`), and each
//! principal's part of it: a body takes room as its bytes arrive and holds it until the last of
//! them is dropped, so that neither many slow bodies nor many slow calls hold any amount of
//! memory, and no one caller holds all of it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use dashmap::DashMap;

use crate::auth::Principal;

/// Principals past which the idle ones are forgotten (each keeps a small semaphore).
const KEPT_PRINCIPALS: usize = 1024;

/// The room all clients' bodies share, and each principal's share of it.
pub struct BodyRoom {
    all: Arc<Share>,
    /// Per principal. Callers without one (no authentication: nothing tells them apart) have
    /// the whole room together.
    principals: DashMap<Principal, Arc<Share>, foldhash::fast::RandomState>,
    /// Principals kept past which the idle ones are next forgotten: twice those left by the
    /// last sweep (at least [`KEPT_PRINCIPALS`]), so that sweeps cost O(1) a new principal.
    sweep_at: AtomicUsize,
    share: usize,
}

/// Room a body holds; given back when dropped.
#[derive(Default)]
pub struct Room {
    all: Option<Held>,
    own: Option<Held>,
}

impl Room {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.all.as_ref().map_or(0, |h| h.bytes)
    }
}

/// Bytes of a room (or of a principal's share of it) that bodies hold, and at most how many.
/// Taken without waiting and given back with atomics alone: a semaphore's release takes a
/// lock, which every request paid once for the room and once for its caller's share.
struct Share {
    held: AtomicUsize,
    limit: usize,
}

impl Share {
    fn new(limit: usize) -> Arc<Share> {
        Arc::new(Share {
            held: AtomicUsize::new(0),
            limit,
        })
    }

    /// `bytes` more held, if that stays within the limit.
    fn take(self: &Arc<Share>, bytes: usize) -> Option<Held> {
        // Counts only: no other memory is handed over with them, so any ordering will do.
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(bytes).filter(|&h| h <= self.limit)
            })
            .ok()?;
        Some(Held {
            share: self.clone(),
            bytes,
        })
    }

    /// Bytes not held.
    fn available(&self) -> usize {
        self.limit.saturating_sub(self.held.load(Ordering::Relaxed))
    }
}

/// Bytes held of a [`Share`], given back when dropped.
struct Held {
    share: Arc<Share>,
    bytes: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.share.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Why a body cannot have more room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// All clients' bodies hold the whole room.
    All,
    /// The caller's bodies hold its whole share.
    Caller,
}

impl BodyRoom {
    /// `total` bytes for all clients; a quarter of it (at least `one_body`) for any one
    /// principal.
    pub fn new(total: usize, one_body: usize) -> BodyRoom {
        BodyRoom {
            all: Share::new(total),
            principals: DashMap::default(),
            sweep_at: AtomicUsize::new(KEPT_PRINCIPALS),
            share: (total / 4).max(one_body).min(total),
        }
    }

    /// Bytes no body holds.
    pub fn available(&self) -> usize {
        self.all.available()
    }

    /// Bytes of `principal`'s share no body of its holds.
    pub fn available_to(&self, principal: &Principal) -> usize {
        self.principals
            .get(principal)
            .map_or(self.share, |s| s.available())
    }

    /// The most one caller's bodies may hold at once.
    pub fn share(&self) -> usize {
        self.share
    }

    /// Grows `room` by `more` bytes for a body of `principal`'s, or refuses it (`room` is
    /// then unchanged).
    pub fn grow(
        &self,
        room: &mut Room,
        principal: Option<&Principal>,
        more: usize,
    ) -> Result<(), Full> {
        let own = match principal {
            Some(p) => Some(self.principal(p).take(more).ok_or(Full::Caller)?),
            None => None,
        };
        let all = self.all.take(more).ok_or(Full::All)?;
        if let Some(own) = own {
            merge(&mut room.own, own);
        }
        merge(&mut room.all, all);
        Ok(())
    }

    fn principal(&self, principal: &Principal) -> Arc<Share> {
        if let Some(s) = self.principals.get(principal) {
            return s.clone();
        }
        if self.principals.len() >= self.sweep_at.load(Ordering::Relaxed) {
            // A share nobody's body holds is as good as a new one.
            self.principals
                .retain(|_, s| s.available() < self.share || Arc::strong_count(s) > 1);
            let left = self.principals.len();
            self.sweep_at
                .store((2 * left).max(KEPT_PRINCIPALS), Ordering::Relaxed);
        }
        self.principals
            .entry(principal.clone())
            .or_insert_with(|| Share::new(self.share))
            .clone()
    }
}

/// Bytes made from `source` (a rewrite of a client body's params) that keep `source` alive as
/// long as they live: a body holds its room until its last byte is dropped, and a copy that
/// outlived it would be memory nobody counts. (The count is then short by the copies, a few
/// at most: a rewrite, a trace context, a shared connection's token.)
pub fn derived(copy: Vec<u8>, source: &Bytes) -> Bytes {
    struct Derived {
        copy: Vec<u8>,
        _source: Bytes,
    }
    impl AsRef<[u8]> for Derived {
        fn as_ref(&self) -> &[u8] {
            &self.copy
        }
    }
    Bytes::from_owner(Derived {
        copy,
        _source: source.clone(),
    })
}

fn merge(held: &mut Option<Held>, mut more: Held) {
    match held {
        Some(h) => {
            // A body's room grows in the share it started in (a principal's share is kept
            // while a body holds any of it), as semaphore permits had to.
            assert!(
                Arc::ptr_eq(&h.share, &more.share),
                "a body's room grows within one share"
            );
            h.bytes += std::mem::take(&mut more.bytes);
        }
        None => *held = Some(more),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_holds_at_most_its_share_and_all_callers_at_most_the_room() {
        let room = BodyRoom::new(1000, 100);
        assert_eq!(room.share(), 250);
        let (alice, bob): (Principal, Principal) = ("alice".into(), "bob".into());
        let mut a = Room::default();
        room.grow(&mut a, Some(&alice), 200).unwrap();
        assert_eq!(room.grow(&mut a, Some(&alice), 51), Err(Full::Caller));
        assert_eq!(a.bytes(), 200, "a refusal leaves the room as it was");
        room.grow(&mut a, Some(&alice), 50).unwrap();
        assert_eq!((room.available(), room.available_to(&alice)), (750, 0));
        // Others are not held back by her; all together are held back by the room.
        let mut others = Vec::new();
        for who in [&bob, &"carol".into()] {
            let mut r = Room::default();
            room.grow(&mut r, Some(who), 250).unwrap();
            others.push(r);
        }
        // Callers without a principal cannot be told apart: they share the whole room.
        let mut anonymous = Room::default();
        room.grow(&mut anonymous, None, 200).unwrap();
        room.grow(&mut anonymous, None, 50).unwrap();
        assert_eq!(room.available(), 0);
        let dave: Principal = "dave".into();
        let mut held = Room::default();
        assert_eq!(room.grow(&mut held, Some(&dave), 1), Err(Full::All));
        assert_eq!(room.available_to(&dave), 250, "nothing kept");
        assert_eq!(room.grow(&mut held, None, 1), Err(Full::All));
        drop(a);
        assert_eq!((room.available(), room.available_to(&alice)), (250, 250));
        room.grow(&mut held, Some(&dave), 250).unwrap();
    }

    #[test]
    fn idle_callers_are_forgotten_and_busy_ones_kept() {
        let room = BodyRoom::new(1 << 20, 1);
        let busy: Principal = "busy".into();
        let mut held = Room::default();
        room.grow(&mut held, Some(&busy), 10).unwrap();
        for i in 0..KEPT_PRINCIPALS * 2 {
            let mut r = Room::default();
            room.grow(&mut r, Some(&format!("p{i}").into()), 1).unwrap();
        }
        assert!(room.principals.len() <= KEPT_PRINCIPALS + 1);
        assert_eq!(room.available_to(&busy), room.share() - 10);
        // More busy callers than are kept: a sweep frees nobody, and the next waits until
        // the map has doubled, rather than every new caller walking it again.
        let busy: Vec<Room> = (0..KEPT_PRINCIPALS + 100)
            .map(|i| {
                let mut r = Room::default();
                room.grow(&mut r, Some(&format!("b{i}").into()), 1).unwrap();
                r
            })
            .collect();
        let kept = room.principals.len();
        assert!(kept > KEPT_PRINCIPALS + 100);
        assert!(
            room.sweep_at.load(Ordering::Relaxed) > kept,
            "the next sweep is further off"
        );
        drop(busy);
    }

    #[test]
    fn racing_callers_never_hold_more_than_the_room_and_give_all_of_it_back() {
        let room = Arc::new(BodyRoom::new(10_000, 100));
        let alice: Principal = "alice".into();
        let most = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (room, alice, most) = (room.clone(), alice.clone(), most.clone());
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..20_000usize {
                        let mut r = Room::default();
                        let who = (t % 2 == 0).then_some(&alice);
                        if room.grow(&mut r, who, 1 + (i * 7 + t) % 300).is_ok() {
                            let _ = room.grow(&mut r, who, i % 50);
                            held.push(r);
                        }
                        let hers = room
                            .principals
                            .get(&alice)
                            .map(|s| s.held.load(Ordering::Relaxed));
                        assert!(hers.unwrap_or(0) <= room.share(), "alice holds {hers:?}");
                        most.fetch_max(room.all.held.load(Ordering::Relaxed), Ordering::Relaxed);
                        if held.len() > 8 {
                            held.remove(i % held.len());
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(most.load(Ordering::Relaxed) <= 10_000);
        assert!(
            most.load(Ordering::Relaxed) > 5_000,
            "the room was never close to full"
        );
        assert_eq!(
            (room.available(), room.available_to(&alice)),
            (10_000, room.share())
        );
    }

    #[test]
    fn a_share_is_at_least_one_body_and_at_most_the_room() {
        assert_eq!(BodyRoom::new(1000, 400).share(), 400);
        assert_eq!(BodyRoom::new(1000, 1000).share(), 1000);
    }
}
