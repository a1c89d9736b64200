// loadtest/smoke.js — a short k6 smoke test of the event endpoints.
// Usage: k6 run -e BASE_URL=http://127.0.0.1:3003 -e CAMPAIGN_ID=<existing campaign> loadtest/smoke.js
// (scripts/dev.sh prints demo campaign ids). Every request must get its
// documented status; the run fails otherwise.
import http from 'k6/http';
import { check } from 'k6';

export const options = {
  vus: 5,
  duration: '10s',
  thresholds: {
    checks: ['rate==1.0'],
    http_req_duration: ['p(95)<50'],
  },
};

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:3003';
const CAMPAIGN = __ENV.CAMPAIGN_ID || 'c0000000-0000-4000-8000-000000000001';

function uuid() {
  return 'xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx'.replace(/[xy]/g, (c) => {
    const r = (Math.random() * 16) | 0;
    return (c === 'x' ? r : (r & 0x3) | 0x8).toString(16);
  });
}

export default function () {
  const q = `ad_unit_id=${uuid()}&campaign_id=${CAMPAIGN}&creative_id=${uuid()}` +
    `&page_url=${encodeURIComponent('https://news.example.com/story/' + __ITER)}&timestamp=${Date.now()}`;
  const kind = Math.random() < 0.1 ? 'click' : 'impression';
  const post = http.post(`${BASE}/event/${kind}?${q}`);
  check(post, { 'POST 204': (r) => r.status === 204 });
  const pixel = http.get(`${BASE}/event/impression?${q}`);
  check(pixel, { 'GET 200 gif': (r) => r.status === 200 && r.headers['Content-Type'] === 'image/gif' });
  const bad = http.post(`${BASE}/event/impression?campaign_id=nope`);
  check(bad, { 'invalid 400': (r) => r.status === 400 });
}
