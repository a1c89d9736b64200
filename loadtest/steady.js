// loadtest/steady.js — a constant arrival rate (RATE per second, default 1000)
// for DURATION (default 1m); fails if p95 >= 50 ms (the Node service's promise)
// or if any check fails.
import { postEvent, trendStats } from './lib.js';
export { handleSummary } from './lib.js';

export const options = {
  summaryTrendStats: trendStats,
  scenarios: {
    steady: {
      executor: 'constant-arrival-rate',
      rate: Number(__ENV.RATE || 1000),
      timeUnit: '1s',
      duration: __ENV.DURATION || '1m',
      preAllocatedVUs: Number(__ENV.VUS || 50),
      maxVUs: Number(__ENV.MAX_VUS || 200),
    },
  },
  thresholds: {
    http_req_duration: ['p(95)<50', 'p(99)<100'],
    checks: ['rate>0.999'],
    http_req_failed: ['rate<0.001'],
  },
};

export default function () {
  postEvent();
}
