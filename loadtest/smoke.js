// loadtest/smoke.js — a short check that every endpoint answers as documented.
// Run with scripts/loadtest.sh smoke (it starts a service and seeds ids if needed).
import { check } from 'k6';
import http from 'k6/http';
import { BASE, postEvent, pixelEvent, invalidEvent, trendStats } from './lib.js';
export { handleSummary } from './lib.js';

export const options = {
  summaryTrendStats: trendStats,
  vus: 2,
  duration: __ENV.DURATION || '10s',
  thresholds: { checks: ['rate==1.0'], http_req_duration: ['p(95)<50'] },
};

export default function () {
  postEvent();
  pixelEvent();
  invalidEvent();
  const h = http.get(`${BASE}/health`);
  check(h, { 'health 200': (r) => r.status === 200, 'health names the service': (r) => r.json('service') === 'analytics-ingest' });
}
