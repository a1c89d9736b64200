// loadtest/invalid.js — valid events mixed with invalid ones (INVALID_SHARE,
// default 0.3): every invalid request must get its exact 400, every valid one
// its 204, and only the valid ones may land in `events`.
import http from 'k6/http';
import { postEvent, invalidEvent, trendStats } from './lib.js';
export { handleSummary } from './lib.js';

const share = Number(__ENV.INVALID_SHARE || 0.3);
export const options = {
  summaryTrendStats: trendStats,
  scenarios: {
    mixed: {
      executor: 'constant-arrival-rate',
      rate: Number(__ENV.RATE || 1000),
      timeUnit: '1s',
      duration: __ENV.DURATION || '30s',
      preAllocatedVUs: Number(__ENV.VUS || 50),
      maxVUs: Number(__ENV.MAX_VUS || 200),
    },
  },
  thresholds: { checks: ['rate==1.0'], http_req_duration: ['p(95)<50'] },
};

// 400s are the expected answer here, not failures.
http.setResponseCallback(http.expectedStatuses({ min: 200, max: 299 }, 400));

export default function () {
  if (Math.random() < share) invalidEvent();
  else postEvent();
}
