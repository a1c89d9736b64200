//! Shared by the benches: the request context a pixel arrives with (user
//! agent, headers, client address) in a realistic mix, for the invalid-traffic
//! checks.
//!
//! The user agents follow what ad servers see: a few browser builds carry
//! most of the traffic (Zipf over about 600 distinct strings: Chrome, Safari,
//! Edge, Firefox and Samsung Internet across OS and version), about 4% are
//! crawlers and HTTP libraries, and about 1% send no agent. Deterministic,
//! so runs compare.

#![allow(dead_code)]

use std::net::IpAddr;

use hyper::header::{HeaderMap, HeaderValue};

/// One request's context.
pub struct Request {
    pub user_agent: Option<String>,
    pub headers: HeaderMap,
    pub peer: IpAddr,
}

const BOTS: &[&str] = &[
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.0.0 Safari/537.36",
    "curl/8.5.0",
    "python-requests/2.31.0",
    "Go-http-client/1.1",
    "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
];

/// About 600 distinct browser agents, most common first.
fn browsers() -> Vec<String> {
    let mut v = Vec::new();
    for major in (112..=131).rev() {
        for build in [0, 6099, 6261, 6367] {
            v.push(format!("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{major}.0.{build}.0 Safari/537.36"));
            v.push(format!("Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{major}.0.{build}.0 Mobile Safari/537.36"));
            v.push(format!("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{major}.0.{build}.0 Safari/537.36"));
            v.push(format!("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{major}.0.{build}.0 Safari/537.36 Edg/{major}.0.{build}.0"));
        }
    }
    for ios in 15..=18 {
        for minor in 0..=6 {
            v.push(format!("Mozilla/5.0 (iPhone; CPU iPhone OS {ios}_{minor} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/{ios}.{minor} Mobile/15E148 Safari/604.1"));
            v.push(format!("Mozilla/5.0 (iPad; CPU OS {ios}_{minor} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/{ios}.{minor} Mobile/15E148 Safari/604.1"));
            v.push(format!("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/{ios}.{minor} Safari/605.1.15"));
        }
    }
    for ff in 100..=133 {
        v.push(format!(
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:{ff}.0) Gecko/20100101 Firefox/{ff}.0"
        ));
        v.push(format!(
            "Mozilla/5.0 (X11; Linux x86_64; rv:{ff}.0) Gecko/20100101 Firefox/{ff}.0"
        ));
    }
    for s in 18..=26 {
        v.push(format!("Mozilla/5.0 (Linux; Android 13; SAMSUNG SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/{s}.0 Chrome/115.0.0.0 Mobile Safari/537.36"));
    }
    v
}

/// A small deterministic generator (xorshift), so no dependency is needed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `n` requests in the realistic mix.
pub fn mix(n: usize) -> Vec<Request> {
    let browsers = browsers();
    // Zipf(1.0) over the browser agents.
    let weights: Vec<f64> = (1..=browsers.len()).map(|k| 1.0 / k as f64).collect();
    let total: f64 = weights.iter().sum();
    let mut cdf = Vec::with_capacity(weights.len());
    let mut acc = 0.0;
    for w in &weights {
        acc += w / total;
        cdf.push(acc);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    (0..n)
        .map(|_| {
            let r = rng.unit();
            let user_agent = if r < 0.01 {
                None
            } else if r < 0.05 {
                Some(BOTS[(rng.next() % BOTS.len() as u64) as usize].to_string())
            } else {
                let u = rng.unit();
                let i = cdf.partition_point(|&c| c < u).min(browsers.len() - 1);
                Some(browsers[i].clone())
            };
            let mut headers = HeaderMap::new();
            headers.insert("host", HeaderValue::from_static("px.example.com"));
            if let Some(ua) = &user_agent {
                headers.insert(
                    "user-agent",
                    HeaderValue::from_str(ua).expect("header value"),
                );
            }
            headers.insert(
                "accept",
                HeaderValue::from_static(
                    "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8",
                ),
            );
            headers.insert(
                "accept-language",
                HeaderValue::from_static("en-US,en;q=0.9"),
            );
            headers.insert(
                "accept-encoding",
                HeaderValue::from_static("gzip, deflate, br"),
            );
            headers.insert(
                "referer",
                HeaderValue::from_static("https://news.example.com/"),
            );
            headers.insert("sec-fetch-dest", HeaderValue::from_static("image"));
            headers.insert("sec-fetch-mode", HeaderValue::from_static("no-cors"));
            // One request in 200 is a prefetch.
            if rng.next().is_multiple_of(200) {
                headers.insert("sec-purpose", HeaderValue::from_static("prefetch"));
            }
            let peer = IpAddr::from((rng.next() as u32).to_be_bytes());
            Request {
                user_agent,
                headers,
                peer,
            }
        })
        .collect()
}
