// loadtest/spike.js — a baseline of BASE_RATE/s (default 200), a spike to
// SPIKE_RATE/s (default 2000) for 10 s, and back: nothing may fail, p95 stays
// under 50 ms, and every acknowledged event must land.
import { postEvent, trendStats } from './lib.js';
export { handleSummary } from './lib.js';

const base = Number(__ENV.BASE_RATE || 200);
const spike = Number(__ENV.SPIKE_RATE || 2000);
export const options = {
  summaryTrendStats: trendStats,
  scenarios: {
    spike: {
      executor: 'ramping-arrival-rate',
      startRate: base,
      timeUnit: '1s',
      preAllocatedVUs: Number(__ENV.VUS || 100),
      maxVUs: Number(__ENV.MAX_VUS || 400),
      stages: [
        { target: base, duration: '10s' },
        { target: spike, duration: '2s' },
        { target: spike, duration: '10s' },
        { target: base, duration: '2s' },
        { target: base, duration: '10s' },
      ],
    },
  },
  thresholds: { http_req_duration: ['p(95)<50'], checks: ['rate>0.999'] },
};

export default function () {
  postEvent();
}
