//! The request side's memory of `event_id`s: a repeat that reaches the same
//! replica within the window is answered like the first and not recorded
//! again, at the cost of one hash lookup and no database work.
//!
//! This is a shortcut, not the rule. The rule is the database's `event_ids`
//! table, which the writer consults in each batch's transaction (see
//! `writer::claim_event_ids`): it catches repeats that went to another
//! replica, came after a restart, or were forgotten here because the table
//! was full. So this filter may forget (a repeat then costs one claim in the
//! database) but must never claim a sighting that did not happen: an id is
//! remembered only for an event that was recorded, and forgotten again if
//! recording it failed.

use std::hash::{BuildHasher, Hash, Hasher};

use crate::event::Event;
use crate::recent::Recent;

/// What the filter knew about an event's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sighting {
    /// No id, or not seen within the window: record the event. A mark to
    /// [`EventIdFilter::forget`] if recording it fails.
    First(Option<IdMark>),
    /// Accepted before: answer as before, record nothing. `conflicting` when
    /// the payload differs from the first one's.
    Repeat { conflicting: bool },
}

/// An id remembered at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMark {
    id: u128,
    at_ms: i64,
}

/// Recently accepted event ids with a digest of each first payload.
pub struct EventIdFilter {
    recent: Recent<u128, u64, foldhash::fast::RandomState>,
    digest: foldhash::fast::RandomState,
}

impl EventIdFilter {
    /// Remembers ids for `window_ms`, at most `max_ids` of them.
    pub fn new(window_ms: i64, max_ids: usize) -> Self {
        EventIdFilter {
            recent: Recent::new(window_ms, max_ids, foldhash::fast::RandomState::default()),
            digest: foldhash::fast::RandomState::default(),
        }
    }

    /// What the client sent, hashed (per process; the database keeps its own, stable digest).
    fn digest(&self, ev: &Event<'_>) -> u64 {
        let mut h = self.digest.build_hasher();
        (ev.kind as u8).hash(&mut h);
        ev.ad_unit_id.hash(&mut h);
        ev.campaign_id.hash(&mut h);
        ev.creative_id.hash(&mut h);
        ev.page_url.hash(&mut h);
        h.finish()
    }

    /// Looks the event's id up, remembering it if it is new.
    pub fn sight(&self, ev: &Event<'_>, now_ms: i64) -> Sighting {
        let Some(id) = ev.event_id else {
            return Sighting::First(None);
        };
        let id = id.as_u128();
        let digest = self.digest(ev);
        match self.recent.check(shard_of(id), id, digest, now_ms) {
            Some(first) => Sighting::Repeat {
                conflicting: first != digest,
            },
            None => Sighting::First(Some(IdMark { id, at_ms: now_ms })),
        }
    }

    /// Forgets an id whose event was refused after all.
    pub fn forget(&self, mark: IdMark) {
        self.recent.forget(shard_of(mark.id), mark.id, mark.at_ms);
    }

    /// Ids remembered now.
    pub fn tracked(&self) -> u64 {
        self.recent.tracked()
    }
}

fn shard_of(id: u128) -> usize {
    // Folded, so ids that differ in any part spread over the locks.
    ((id >> 64) as u64 ^ id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) as usize >> 60
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::EventKind;
    use uuid::Uuid;

    fn ev(id: Option<u128>, url: &str) -> Event<'_> {
        Event {
            kind: EventKind::Impression,
            ad_unit_id: Uuid::from_u128(1),
            campaign_id: Uuid::from_u128(2),
            creative_id: Uuid::from_u128(3),
            page_url: url,
            timestamp_ms: 0,
            event_id: id.map(Uuid::from_u128),
        }
    }

    #[test]
    fn a_repeat_is_found_and_a_changed_payload_is_a_conflict() {
        let f = EventIdFilter::new(60_000, 1000);
        assert_eq!(f.sight(&ev(None, "a"), 1), Sighting::First(None));
        assert_eq!(f.sight(&ev(None, "a"), 2), Sighting::First(None));
        assert!(matches!(
            f.sight(&ev(Some(5), "a"), 3),
            Sighting::First(Some(_))
        ));
        assert_eq!(
            f.sight(&ev(Some(5), "a"), 4),
            Sighting::Repeat { conflicting: false }
        );
        assert_eq!(
            f.sight(&ev(Some(5), "b"), 5),
            Sighting::Repeat { conflicting: true }
        );
        assert!(matches!(
            f.sight(&ev(Some(6), "a"), 6),
            Sighting::First(Some(_))
        ));
        assert_eq!(f.tracked(), 2);
    }

    #[test]
    fn a_forgotten_id_counts_again() {
        let f = EventIdFilter::new(60_000, 1000);
        let Sighting::First(Some(mark)) = f.sight(&ev(Some(9), "a"), 10) else {
            panic!("first sighting")
        };
        f.forget(mark);
        assert!(matches!(
            f.sight(&ev(Some(9), "a"), 11),
            Sighting::First(Some(_))
        ));
    }
}
