//! An open-loop HTTP/1.1 load generator for latency at a fixed rate.
//!
//! wrk is closed-loop: each connection sends its next request only when the
//! last one is answered, so a stalled server is asked less and its stall is
//! under-counted (coordinated omission). Here request `k` is due at
//! `start + k / rate` whatever happened before; it goes out on any idle
//! keep-alive connection, waits in a queue when none is idle, and its latency
//! is measured from when it was due, not when it was sent (as wrk2 and
//! `oha --latency-correction` do). The loop busy-polls (`epoll` with a zero
//! timeout near a deadline), so sending is accurate to a few microseconds;
//! run it on a core of its own.
//!
//! Requests are the bench's: `../shared/bench/wrk/event-zipf.lua` (MIX=zipf:
//! Zipf(1.1) ad units, 8 campaigns each, 3 creatives each) or `event.lua`
//! (MIX=uniform), 90% impressions, 10% clicks, from the fixture files.
//!
//! ```text
//! cargo run --release --example openloop -- 127.0.0.1:8080 RATE SECONDS [CONNS] [WARMUP_S]
//! env: FIXTURES=../shared/bench/fixtures MIX=zipf|uniform UA="..." (a User-Agent header)
//! ```
//! Prints one line: `RESULT rate=… sent=… answered=… non2xx=… errors=… p50_us=… p90_us=…
//! p99_us=… p999_us=… max_us=… send_lag_p99_us=…` over the requests due after the warm-up.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

struct Fixtures {
    ad_units: Vec<String>,
    campaigns: Vec<String>,
    creatives: Vec<String>,
    urls: Vec<String>,
}

fn lines(dir: &str, name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("{dir}/{name}"))
        .unwrap_or_else(|e| panic!("cannot read {dir}/{name}: {e}"));
    text.lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// xorshift64*: enough randomness for picking ids.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let mut acc = 0.0;
    let mut c: Vec<f64> = (1..=n)
        .map(|i| {
            acc += 1.0 / (i as f64).powf(s);
            acc
        })
        .collect();
    for v in &mut c {
        *v /= acc;
    }
    c
}

fn draw(cdf: &[f64], rng: &mut Rng) -> usize {
    let u = rng.unit();
    cdf.partition_point(|&p| p < u).min(cdf.len() - 1) + 1
}

/// Builds requests the way the bench's Lua scripts do.
struct Requests {
    fx: Fixtures,
    zipf: bool,
    au_cdf: Vec<f64>,
    slot_cdf: Vec<f64>,
    rng: Rng,
    tail: String,
}

impl Requests {
    fn next(&mut self) -> Vec<u8> {
        let n_c = self.fx.campaigns.len();
        let kind = if self.rng.below(10) == 0 {
            "/event/click"
        } else {
            "/event/impression"
        };
        let (au, c, cr) = if self.zipf {
            let au = draw(&self.au_cdf, &mut self.rng);
            let c = (au * 7919 + draw(&self.slot_cdf, &mut self.rng) * 104_729) % n_c + 1;
            let cr = (c * 31 + self.rng.below(3) + 1) % self.fx.creatives.len() + 1;
            (au, c, cr)
        } else {
            (
                self.rng.below(self.fx.ad_units.len()) + 1,
                self.rng.below(n_c) + 1,
                self.rng.below(self.fx.creatives.len()) + 1,
            )
        };
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        format!(
            "POST {kind}?ad_unit_id={}&campaign_id={}&creative_id={}&page_url={}&timestamp={now_ms}{}",
            self.fx.ad_units[au - 1],
            self.fx.campaigns[c - 1],
            self.fx.creatives[cr - 1],
            self.fx.urls[self.rng.below(self.fx.urls.len())],
            self.tail
        )
        .into_bytes()
    }
}

/// One keep-alive connection with at most one request in flight.
struct Conn {
    stream: TcpStream,
    /// When the request in flight was due; `None` when idle.
    due: Option<Instant>,
    buf: Vec<u8>,
}

/// A complete response at the start of `buf`: (its length, its status).
fn parse_response(buf: &[u8]) -> Option<(usize, u16)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let status: u16 = head.get(9..12)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    (buf.len() >= end + len).then_some((end + len, status))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: openloop ADDR RATE SECONDS [CONNS] [WARMUP_S]");
        std::process::exit(2);
    }
    let addr: SocketAddr = args[1].parse().expect("ADDR is host:port");
    let rate: f64 = args[2].parse().expect("RATE is requests per second");
    let seconds: f64 = args[3].parse().expect("SECONDS");
    let conns: usize = args.get(4).map_or(64, |v| v.parse().expect("CONNS"));
    let warmup: f64 = args.get(5).map_or(2.0, |v| v.parse().expect("WARMUP_S"));
    let dir = std::env::var("FIXTURES").unwrap_or_else(|_| "../shared/bench/fixtures".into());
    let fx = Fixtures {
        ad_units: lines(&dir, "ad_units.txt"),
        campaigns: lines(&dir, "campaigns.txt"),
        creatives: lines(&dir, "creatives.txt"),
        urls: lines(&dir, "page_urls.txt")
            .iter()
            .map(|u| urlencode(u))
            .collect(),
    };
    let ua = std::env::var("UA")
        .map(|u| format!("User-Agent: {u}\r\n"))
        .unwrap_or_default();
    let n_au = fx.ad_units.len();
    let mut requests = Requests {
        fx,
        zipf: std::env::var("MIX").map_or(true, |m| m != "uniform"),
        au_cdf: zipf_cdf(n_au, 1.1),
        slot_cdf: zipf_cdf(8, 1.0),
        rng: Rng(0x9e37_79b9_7f4a_7c15
            ^ SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)),
        tail: format!(" HTTP/1.1\r\nHost: {addr}\r\n{ua}Content-Length: 0\r\n\r\n"),
    };

    let mut poll = Poll::new().expect("poll");
    let mut pool: Vec<Conn> = (0..conns)
        .map(|i| {
            let std_stream = std::net::TcpStream::connect(addr).expect("connect");
            std_stream.set_nodelay(true).expect("nodelay");
            std_stream.set_nonblocking(true).expect("nonblocking");
            let mut stream = TcpStream::from_std(std_stream);
            poll.registry()
                .register(&mut stream, Token(i), Interest::READABLE)
                .expect("register");
            Conn {
                stream,
                due: None,
                buf: Vec::with_capacity(1024),
            }
        })
        .collect();
    let mut idle: Vec<usize> = (0..conns).collect();
    let mut waiting: VecDeque<Instant> = VecDeque::new();
    let mut events = Events::with_capacity(conns);
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut send_lag = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    // TIMELINE=1: one line per second of due time (p50, p99, max), to see when latency rises.
    let timeline = std::env::var("TIMELINE").is_ok_and(|v| v == "1");
    let mut per_second: Vec<Histogram<u64>> = Vec::new();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + Duration::from_secs_f64(warmup);
    let stop = start + Duration::from_secs_f64(seconds);
    let total = (rate * seconds) as u64;
    let (mut scheduled, mut sent, mut answered, mut non2xx, mut errors) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut next_due = start;
    loop {
        let now = Instant::now();
        while scheduled < total && next_due <= now {
            waiting.push_back(next_due);
            scheduled += 1;
            next_due = start + interval.mul_f64(scheduled as f64);
        }
        while let (Some(&due), Some(&i)) = (waiting.front(), idle.last()) {
            let req = requests.next();
            let c = &mut pool[i];
            let mut off = 0;
            while off < req.len() {
                match c.stream.write(&req[off..]) {
                    Ok(n) => off += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::hint::spin_loop(),
                    Err(e) => panic!("write: {e}"),
                }
            }
            if due >= measure_from {
                let lag = Instant::now().saturating_duration_since(due).as_micros() as u64;
                send_lag.saturating_record(lag.max(1));
            }
            c.due = Some(due);
            waiting.pop_front();
            idle.pop();
            sent += 1;
        }
        if scheduled == total && waiting.is_empty() && idle.len() == conns {
            break;
        }
        if Instant::now() > stop + Duration::from_secs(10) {
            errors += (conns - idle.len()) as u64 + waiting.len() as u64;
            break; // answers still missing 10 s after the end
        }
        let timeout = match next_due.checked_duration_since(Instant::now()) {
            Some(d) if d > Duration::from_millis(2) && scheduled < total => {
                d - Duration::from_millis(1)
            }
            _ if scheduled == total => Duration::from_millis(1),
            _ => Duration::ZERO,
        };
        poll.poll(&mut events, Some(timeout)).expect("poll");
        for ev in events.iter() {
            let i = ev.token().0;
            let c = &mut pool[i];
            let mut chunk = [0u8; 4096];
            loop {
                match c.stream.read(&mut chunk) {
                    Ok(0) => panic!("connection {i} closed by the server"),
                    Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("read: {e}"),
                }
            }
            while let Some((len, status)) = parse_response(&c.buf) {
                c.buf.drain(..len);
                let Some(due) = c.due.take() else {
                    panic!("an answer nobody asked for on connection {i}");
                };
                answered += 1;
                if !(200..300).contains(&status) {
                    non2xx += 1;
                }
                if due >= measure_from {
                    let us = Instant::now().saturating_duration_since(due).as_micros() as u64;
                    latency.saturating_record(us.max(1));
                }
                if timeline {
                    let sec = due.saturating_duration_since(start).as_secs() as usize;
                    while per_second.len() <= sec {
                        per_second.push(
                            Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
                        );
                    }
                    let us = Instant::now().saturating_duration_since(due).as_micros() as u64;
                    per_second[sec].saturating_record(us.max(1));
                }
                idle.push(i);
            }
        }
    }
    let elapsed = (Instant::now() - start).as_secs_f64();
    for (sec, h) in per_second.iter().enumerate() {
        println!(
            "second {sec}: answered={} p50_us={} p99_us={} max_us={}",
            h.len(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max()
        );
    }
    println!(
        "RESULT rate={rate:.0} achieved_rps={:.0} sent={sent} answered={answered} non2xx={non2xx} errors={errors} p50_us={} p90_us={} p99_us={} p999_us={} max_us={} send_lag_p99_us={}",
        answered as f64 / elapsed.max(seconds),
        latency.value_at_quantile(0.5),
        latency.value_at_quantile(0.9),
        latency.value_at_quantile(0.99),
        latency.value_at_quantile(0.999),
        latency.max(),
        send_lag.value_at_quantile(0.99),
    );
}
