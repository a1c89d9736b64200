// loadtest/lib.js — shared by the k6 scenarios.
//
// Environment: BASE_URL (default http://127.0.0.1:3003); IDS_FILE, a JSON file
// {"campaigns": [...], "ad_units": [...], "creatives": [...]} written by
// scripts/loadtest.sh from the campaigns seeded in the database;
// SUMMARY_PATH, where handleSummary writes k6's JSON summary (the runner reads
// the `accepted_events` counter from it to compare with the rows in `events`).
import http from 'k6/http';
import { check } from 'k6';
import { Counter } from 'k6/metrics';

export const BASE = __ENV.BASE_URL || 'http://127.0.0.1:3003';
// Percentiles shown in the end-of-test summary (k6 omits p99 by default).
export const trendStats = ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)'];
const IDS = JSON.parse(open(__ENV.IDS_FILE || './ids.json'));
const PAGES = [
  'https://news.example.com/articles/2030/summer-fix-fix-travel',
  'https://www.example-sports.net/story/48211/football-transfer-news',
  'https://shop.example.io/review/772/best-laptops-2024?ref=home&x=1',
  'https://recipes.example.co.uk/guide/1203/pasta recipe how-to',
];

// Events the service acknowledged (204, or a 200 pixel): what must land in `events`.
export const accepted = new Counter('accepted_events');

function pick(a) {
  return a[Math.floor(Math.random() * a.length)];
}

export function eventQuery() {
  return `ad_unit_id=${pick(IDS.ad_units)}&campaign_id=${pick(IDS.campaigns)}` +
    `&creative_id=${pick(IDS.creatives)}&page_url=${encodeURIComponent(pick(PAGES))}&timestamp=${Date.now()}`;
}

// Browsers' user agents, so the events are valid traffic and land in the
// billed columns as pixels' do (k6's own agent, or none, would be counted as
// invalid traffic: see README "Counting rules"). UA=... sends one of your own.
const AGENTS = __ENV.UA ? [__ENV.UA] : [
  'Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36',
  'Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1',
  'Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36',
  'Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0',
];
const params = { headers: { 'User-Agent': AGENTS[__VU % AGENTS.length] }, tags: {} };

// One POST event, 90% impressions / 10% clicks, as the wrk load does.
export function postEvent() {
  const kind = Math.random() < 0.1 ? 'click' : 'impression';
  const r = http.post(`${BASE}/event/${kind}?${eventQuery()}`, null, Object.assign({}, params, { tags: { name: `POST /event/${kind}` } }));
  if (check(r, { 'POST answered 204': (x) => x.status === 204 })) accepted.add(1);
  return r;
}

// One pixel GET, as an <img> tag sends it.
export function pixelEvent() {
  const kind = Math.random() < 0.1 ? 'click' : 'impression';
  const r = http.get(`${BASE}/event/${kind}?${eventQuery()}`, Object.assign({}, params, { tags: { name: `GET /event/${kind}` } }));
  if (check(r, {
    'pixel 200': (x) => x.status === 200,
    'pixel is a GIF': (x) => x.headers['Content-Type'] === 'image/gif',
    'pixel not cached': (x) => (x.headers['Cache-Control'] || '').includes('no-store'),
  })) accepted.add(1);
  return r;
}

// Invalid requests and the exact error each must get; nothing is stored.
const INVALID = [
  ['campaign_id=nope', 400, 'invalid_parameter'],
  [() => eventQuery().replace(/&creative_id=[^&]+/, ''), 400, 'missing_parameter'],
  [() => eventQuery().replace(/campaign_id=[^&]+/, 'campaign_id=123'), 400, 'invalid_parameter'],
  [() => eventQuery().replace(/page_url=[^&]+/, 'page_url=%zz'), 400, 'invalid_parameter'],
  [() => eventQuery() + '&timestamp=1', 400, 'duplicate_parameter'],
  [() => eventQuery().replace(/timestamp=\d+/, 'timestamp=' + (Date.now() + 7200000)), 400, 'invalid_parameter'],
  [() => eventQuery().replace(/page_url=[^&]+/, 'page_url=a%00b'), 400, 'invalid_parameter'],
];

export function invalidEvent() {
  const [q, status, code] = pick(INVALID);
  const query = typeof q === 'function' ? q() : q;
  const r = http.post(`${BASE}/event/impression?${query}`, null, Object.assign({}, params, { tags: { name: 'invalid' } }));
  check(r, {
    'invalid answered 400': (x) => x.status === status,
    'invalid names its error': (x) => { try { return x.json('error') === code; } catch (e) { return false; } },
  });
  return r;
}

export function handleSummary(data) {
  const out = { stdout: textSummary(data) };
  if (__ENV.SUMMARY_PATH) out[__ENV.SUMMARY_PATH] = JSON.stringify(data, null, 1);
  return out;
}

function textSummary(data) {
  const m = data.metrics;
  const v = (name, key) => (m[name] && m[name].values[key] !== undefined ? m[name].values[key] : 0);
  const lines = [
    `requests: ${v('http_reqs', 'count')} (${v('http_reqs', 'rate').toFixed(0)}/s)`,
    `latency ms: p50 ${v('http_req_duration', 'med').toFixed(2)} p95 ${v('http_req_duration', 'p(95)').toFixed(2)} p99 ${v('http_req_duration', 'p(99)').toFixed(2)} max ${v('http_req_duration', 'max').toFixed(2)}`,
    `checks passed: ${(v('checks', 'rate') * 100).toFixed(3)}%`,
    `accepted events: ${v('accepted_events', 'count')}`,
    `dropped iterations: ${v('dropped_iterations', 'count')}`,
  ];
  const failing = [];
  (function walk(g) {
    for (const c of g.checks || []) if (c.fails > 0) failing.push(`check failed ${c.fails}x: ${c.name}`);
    for (const sub of g.groups || []) walk(sub);
  })(data.root_group);
  lines.push(...failing);
  for (const [name, t] of Object.entries(data.metrics)) {
    if (t.thresholds) for (const [expr, r] of Object.entries(t.thresholds)) lines.push(`threshold ${name} ${expr}: ${r.ok ? 'ok' : 'FAILED'}`);
  }
  return lines.join('\n') + '\n';
}
