// loadtest/ramp.js — raises the arrival rate step by step up to MAX_RATE
// (default 4000/s) to find the knee: the rate where latency climbs or k6
// starts dropping iterations. Read the report's latency-over-rate graph.
import { postEvent, trendStats } from './lib.js';
export { handleSummary } from './lib.js';

const max = Number(__ENV.MAX_RATE || 4000);
const step = __ENV.STEP || '20s';
export const options = {
  summaryTrendStats: trendStats,
  scenarios: {
    ramp: {
      executor: 'ramping-arrival-rate',
      startRate: Math.max(1, Math.floor(max / 10)),
      timeUnit: '1s',
      preAllocatedVUs: Number(__ENV.VUS || 100),
      maxVUs: Number(__ENV.MAX_VUS || 400),
      stages: [0.25, 0.5, 0.75, 1.0].flatMap((f) => [
        { target: Math.floor(max * f), duration: '5s' },
        { target: Math.floor(max * f), duration: step },
      ]),
    },
  },
  thresholds: { checks: ['rate>0.999'] },
};

export default function () {
  postEvent();
}
