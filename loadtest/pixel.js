// loadtest/pixel.js — the browser mix: GET pixels (as <img> tags fire them)
// with some POST beacons, at RATE/s (default 1000) for DURATION (default 30s).
import { postEvent, pixelEvent, trendStats } from './lib.js';
export { handleSummary } from './lib.js';

export const options = {
  summaryTrendStats: trendStats,
  scenarios: {
    pixels: {
      executor: 'constant-arrival-rate',
      rate: Number(__ENV.RATE || 1000),
      timeUnit: '1s',
      duration: __ENV.DURATION || '30s',
      preAllocatedVUs: Number(__ENV.VUS || 50),
      maxVUs: Number(__ENV.MAX_VUS || 200),
    },
  },
  thresholds: { http_req_duration: ['p(95)<50'], checks: ['rate>0.999'] },
};

export default function () {
  if (Math.random() < 0.7) pixelEvent();
  else postEvent();
}
