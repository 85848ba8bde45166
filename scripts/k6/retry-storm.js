// Retry storm: STORM_POSTS notifications of RECIPIENTS webhook deliveries each go to a
// failing receiver (scripts/k6/receiver.py: `python scripts/k6/run.py retry-storm` starts
// one; or start it yourself and pass RECEIVER_URL). Per notification the receiver answers
// as its data.mode says: flaky = 500 until try 3, then 200; down = always 500 (ends in dead
// letters after RETRY_MAX_ATTEMPTS); reject = 400 (dead letter at once). Meanwhile a probe
// posts ordinary notifications at PROBE_RATE/s: ingest must stay fast during the storm.
// Every storm notification must end with each delivery sent or dead-lettered.
//   k6 run -e RECEIVER_URL=http://127.0.0.1:8099/hook scripts/k6/retry-storm.js
import http from 'k6/http';
import exec from 'k6/execution';
import { check, sleep } from 'k6';
import { Counter } from 'k6/metrics';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8000';
const API_KEY = __ENV.API_KEY || 'dev-api-key';
const RECEIVER_URL = __ENV.RECEIVER_URL || 'http://127.0.0.1:8099/hook';
const STORM_POSTS = parseInt(__ENV.STORM_POSTS || '50', 10);
const RECIPIENTS = parseInt(__ENV.RECIPIENTS || '100', 10);
const STORM_VUS = parseInt(__ENV.STORM_VUS || '5', 10);
const PROBE_RATE = parseInt(__ENV.PROBE_RATE || '50', 10);
const PROBE_S = parseInt(__ENV.PROBE_S || '30', 10);
// Long enough for a 'down' delivery's every try with the short retry and circuit windows
// of scripts/k6/run.py (FAST_RETRIES); the production defaults hold tries far longer.
const SETTLE_S = parseInt(__ENV.SETTLE_S || '150', 10);
const INGEST_P95_MS = __ENV.INGEST_P95_MS || '200';
const INGEST_P99_MS = __ENV.INGEST_P99_MS || '500';
const DOWN_SHARE = parseFloat(__ENV.DOWN_SHARE || '0.1');
const REJECT_SHARE = parseFloat(__ENV.REJECT_SHARE || '0.1');

const stormDeliveries = new Counter('storm_deliveries');
const delivered = new Counter('storm_delivered');
const deadLettered = new Counter('storm_dead_lettered');
const unfinished = new Counter('storm_unfinished');

export const options = {
  scenarios: {
    storm: { executor: 'per-vu-iterations', vus: STORM_VUS, iterations: 1, exec: 'storm',
             maxDuration: `${PROBE_S + SETTLE_S + 60}s` },
    probe: { executor: 'constant-arrival-rate', rate: PROBE_RATE, timeUnit: '1s',
             duration: `${PROBE_S}s`, preAllocatedVUs: 20, maxVUs: 100, exec: 'probe',
             startTime: '1s' },
  },
  summaryTrendStats: ['avg', 'p(50)', 'p(95)', 'p(99)', 'max'],
  thresholds: {
    'http_req_duration{scenario:probe}': [`p(95)<${INGEST_P95_MS}`, `p(99)<${INGEST_P99_MS}`],
    'http_req_failed{scenario:probe}': ['rate==0'],
    storm_unfinished: ['count==0'],
    checks: ['rate==1'],
  },
};

const headers = { 'content-type': 'application/json', 'x-api-key': API_KEY };

export function setup() {
  return { run: __ENV.RUN_ID || `${Date.now()}` };
}

function modeOf(i) {
  const x = (i * 0.6180339887) % 1;  // spread the modes evenly over the posts
  return x < DOWN_SHARE ? 'down' : x < DOWN_SHARE + REJECT_SHARE ? 'reject' : 'flaky';
}

// Each storm VU posts its share of the storm, then polls its notifications until every
// delivery is sent or failed (dead-lettered).
export function storm(data) {
  // 0..STORM_VUS-1: one iteration per storm VU (VU ids are shared with the probe's).
  const slot = exec.scenario.iterationInTest;
  const mine = [];
  for (let i = slot; i < STORM_POSTS; i += STORM_VUS) {
    const users = Array.from({ length: RECIPIENTS }, (_, j) => `rs-${data.run}-${i}-${j}`);
    const r = http.post(`${BASE}/notifications`, JSON.stringify({
      user_ids: users, title: 'storm', body: `#${i}`, channels: ['webhook'],
      // One receiver URL per behaviour, as three failing services would be.
      webhook_url: `${RECEIVER_URL}/${modeOf(i)}`, data: { run: data.run, mode: modeOf(i) },
    }), { headers, tags: { name: 'storm' } });
    if (check(r, { 'storm accepted (202)': (x) => x.status === 202 })) {
      mine.push(r.json('id'));
      stormDeliveries.add(RECIPIENTS);
    }
  }
  const deadline = Date.now() + (PROBE_S + SETTLE_S) * 1000;
  let open = mine.slice();
  const ended = {};
  while (open.length && Date.now() < deadline) {
    sleep(2);
    open = open.filter((id) => {
      const s = http.get(`${BASE}/notifications/${id}?limit=1`, { headers, tags: { name: 'poll' } })
        .json('delivery_summary');
      if ((s.pending || 0) + (s.queued || 0) > 0) return true;
      ended[id] = s;
      return false;
    });
  }
  for (const id of Object.keys(ended)) {
    delivered.add(ended[id].sent || 0);
    deadLettered.add(ended[id].failed || 0);
  }
  unfinished.add(open.length * RECIPIENTS);
}

export function probe(data) {
  const r = http.post(`${BASE}/notifications`, JSON.stringify({
    user_id: `probe-${data.run}-${exec.scenario.iterationInTest % 100}`, title: 'probe',
    body: 'fresh', data: { run: data.run },
  }), { headers });
  check(r, { 'probe accepted (202)': (x) => x.status === 202 });
}
