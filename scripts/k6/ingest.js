// Ingest load: POST /notifications as fast as VUS closed-loop clients can, over keep-alive.
//   MODE=single  one recipient per notification (requests/s is the figure)
//   MODE=batch   BATCH_SIZE recipients per notification through user_ids (recipients/s)
// k6 run -e BASE_URL=http://127.0.0.1:8000 -e API_KEY=dev-api-key scripts/k6/ingest.js
import http from 'k6/http';
import { check } from 'k6';
import { Counter } from 'k6/metrics';

const BASE_URL = __ENV.BASE_URL || 'http://127.0.0.1:8000';
const API_KEY = __ENV.API_KEY || 'dev-api-key';
const MODE = __ENV.MODE || 'single';
const BATCH_SIZE = parseInt(__ENV.BATCH_SIZE || '10000', 10);
const RUN = __ENV.RUN_ID || `${Date.now()}`;

export const options = {
  scenarios: {
    ingest: {
      executor: 'constant-vus',
      vus: parseInt(__ENV.VUS || (MODE === 'batch' ? '8' : '64'), 10),
      duration: __ENV.DURATION || '20s',
    },
  },
  summaryTrendStats: ['avg', 'p(50)', 'p(90)', 'p(99)', 'max'],
  thresholds: {
    // Every notification must be accepted: a 503 here would mean the run measured backpressure.
    checks: ['rate==1'],
  },
};

const accepted = new Counter('recipients_accepted');
const params = { headers: { 'content-type': 'application/json', 'x-api-key': API_KEY } };

const batchUsers = [];
for (let i = 0; i < BATCH_SIZE; i++) batchUsers.push(`bench-${RUN}-${i}`);

export default function () {
  let body;
  if (MODE === 'batch') {
    body = JSON.stringify({ user_ids: batchUsers, title: 'Bench batch', body: `vu ${__VU} it ${__ITER}` });
  } else {
    body = JSON.stringify({
      user_id: `bench-${RUN}-${__VU}-${__ITER}`,
      title: 'Bench',
      body: `vu ${__VU} iteration ${__ITER}`,
      data: { n: __ITER },
    });
  }
  const res = http.post(`${BASE_URL}/notifications`, body, params);
  const ok = check(res, { 'status is 202': (r) => r.status === 202 });
  if (ok) accepted.add(MODE === 'batch' ? BATCH_SIZE : 1);
}
