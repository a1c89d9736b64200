// loadtest/soak.js — a constant RATE/s (default 500) for SOAK_DURATION
// (default 10m): latency must not drift and nothing may fail. Watch RSS and
// /health's last_flush_age_ms while it runs.
import { postEvent, pixelEvent, trendStats } from './lib.js';
export { handleSummary } from './lib.js';

export const options = {
  summaryTrendStats: trendStats,
  scenarios: {
    soak: {
      executor: 'constant-arrival-rate',
      rate: Number(__ENV.RATE || 500),
      timeUnit: '1s',
      duration: __ENV.SOAK_DURATION || '10m',
      preAllocatedVUs: Number(__ENV.VUS || 50),
      maxVUs: Number(__ENV.MAX_VUS || 200),
    },
  },
  thresholds: { http_req_duration: ['p(95)<50', 'p(99)<100'], checks: ['rate>0.999'] },
};

export default function () {
  if (Math.random() < 0.8) postEvent();
  else pixelEvent();
}
