//! Shared by the benches: realistic queries built from the shared bench
//! fixtures when they are there (../shared/bench/fixtures), or from
//! deterministic ids of the same shape otherwise.

#![allow(dead_code)]

use uuid::Uuid;

pub struct Fixture {
    pub ad_units: Vec<Uuid>,
    pub campaigns: Vec<(Uuid, Uuid)>,
    pub creatives: Vec<Uuid>,
    pub urls: Vec<String>,
}

fn lines(name: &str) -> Option<Vec<String>> {
    let dir = std::env::var("FIXTURES").unwrap_or_else(|_| "../shared/bench/fixtures".into());
    let text = std::fs::read_to_string(format!("{dir}/{name}")).ok()?;
    Some(
        text.lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
    )
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Fixture {
    pub fn load() -> Fixture {
        let parse = |v: Vec<String>| {
            v.iter()
                .filter_map(|l| l.parse().ok())
                .collect::<Vec<Uuid>>()
        };
        let shared = (|| {
            Some(Fixture {
                ad_units: parse(lines("ad_units.txt")?),
                campaigns: lines("campaigns.csv")?
                    .iter()
                    .filter_map(|l| {
                        let (c, a) = l.split_once(',')?;
                        Some((c.parse().ok()?, a.parse().ok()?))
                    })
                    .collect(),
                creatives: parse(lines("creatives.txt")?),
                urls: lines("page_urls.txt")?
                    .iter()
                    .map(|u| urlencode(u))
                    .collect(),
            })
        })();
        shared.unwrap_or_else(|| {
            let ids = |n: usize, salt: u128| {
                (0..n as u128)
                    .map(|i| Uuid::from_u128(i * 7919 + salt))
                    .collect::<Vec<_>>()
            };
            Fixture {
                ad_units: ids(2000, 1),
                campaigns: ids(500, 2)
                    .into_iter()
                    .zip(ids(500, 3).into_iter().cycle().take(500))
                    .collect(),
                creatives: ids(2000, 4),
                urls: (0..200)
                    .map(|i| {
                        urlencode(&format!(
                            "https://news.example.com/articles/{i}/best-rust-async-deals"
                        ))
                    })
                    .collect(),
            }
        })
    }

    /// The i-th query of a deterministic stream (same shape as wrk/event.lua).
    pub fn query(&self, i: usize, now_ms: i64) -> String {
        let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let pick = |n: usize, shift: u32| ((h >> shift) as usize) % n;
        format!(
            "ad_unit_id={}&campaign_id={}&creative_id={}&page_url={}&timestamp={}",
            self.ad_units[pick(self.ad_units.len(), 0)],
            self.campaigns[pick(self.campaigns.len(), 16)].0,
            self.creatives[pick(self.creatives.len(), 32)],
            self.urls[pick(self.urls.len(), 48)],
            now_ms
        )
    }
}
