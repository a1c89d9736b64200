//! Campaign → account lookups for the writer.
//!
//! The whole `campaigns` table is kept in memory behind `ArcSwap` (reads are
//! lock-free), loaded at start and reloaded in the background. The request
//! path never consults it: aggregates are keyed by campaign, and the writer
//! resolves accounts per batch, asking the database once per flush for the
//! campaigns the cache does not know (created since the last reload).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_postgres::GenericClient;
use uuid::Uuid;

type Map = HashMap<Uuid, Uuid>;

/// The campaign → account map and its hit/miss counters.
#[derive(Default)]
pub struct AccountCache {
    map: ArcSwap<Map>,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub loaded: std::sync::atomic::AtomicBool,
}

impl AccountCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of campaigns known.
    pub fn len(&self) -> usize {
        self.map.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces the map with the full `campaigns` table.
    pub async fn reload(
        &self,
        client: &impl GenericClient,
    ) -> Result<usize, tokio_postgres::Error> {
        let rows = client
            .query("SELECT id, account_id FROM campaigns", &[])
            .await?;
        let map: Map = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let n = map.len();
        self.map.store(Arc::new(map));
        self.loaded.store(true, Relaxed);
        Ok(n)
    }

    /// Accounts of `campaigns` (sorted, distinct). Campaigns absent from the
    /// result do not exist. Misses are looked up in one query and cached.
    pub async fn resolve(
        &self,
        client: &impl GenericClient,
        campaigns: &[Uuid],
    ) -> Result<Map, tokio_postgres::Error> {
        let snapshot = self.map.load();
        let mut out = Map::with_capacity(campaigns.len());
        let mut missing = Vec::new();
        for c in campaigns {
            match snapshot.get(c) {
                Some(a) => {
                    out.insert(*c, *a);
                }
                None => missing.push(*c),
            }
        }
        drop(snapshot);
        self.hits.fetch_add(out.len() as u64, Relaxed);
        self.misses.fetch_add(missing.len() as u64, Relaxed);
        if missing.is_empty() {
            return Ok(out);
        }
        let rows = client
            .query(
                "SELECT id, account_id FROM campaigns WHERE id = ANY($1)",
                &[&missing],
            )
            .await?;
        let found: Vec<(Uuid, Uuid)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        if !found.is_empty() {
            self.map.rcu(|m| {
                let mut m = Map::clone(m);
                m.extend(found.iter().copied());
                m
            });
        }
        out.extend(found);
        Ok(out)
    }
}
