// POST-to-socket delivery: USERS sockets listen while notifications are posted to them at RATE/s.
// Each notification carries its send time in data.t; receivers record now - t.
//   k6 run -e RATE=500 -e DURATION=20s -e USERS=200 scripts/k6/delivery.js
// LOW_BACKLOG=N first posts N low-priority deliveries (one batch request of notifications to
// all USERS) and then measures only high-priority notifications: the priority-lane benchmark.
// The batch endpoint bounds it: at most 500 notifications (LOW_BACKLOG / USERS) and a 2 MiB
// body (about 26 bytes per delivery with the default user names).
import http from 'k6/http';
import { clearInterval, setInterval, setTimeout } from 'k6/timers';
import { WebSocket } from 'k6/experimental/websockets';
import exec from 'k6/execution';
import { check, sleep } from 'k6';
import { Counter, Trend } from 'k6/metrics';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8000';
const WS_BASE = BASE.replace(/^http/, 'ws');
const API_KEY = __ENV.API_KEY || 'dev-api-key';
const USERS = parseInt(__ENV.USERS || '200', 10);
const RATE = parseInt(__ENV.RATE || '500', 10);
const DURATION = __ENV.DURATION || '20s';
const WARMUP_S = parseInt(__ENV.WARMUP_S || '8', 10);
const DRAIN_S = parseInt(__ENV.DRAIN_S || '10', 10);
const LOW_BACKLOG = parseInt(__ENV.LOW_BACKLOG || '0', 10);
const PRIORITY = LOW_BACKLOG > 0 ? 'high' : (__ENV.PRIORITY || 'normal');
// RECIPIENTS_PER_POST > 1 sends each notification to that many of the users via user_ids.
const PER_POST = parseInt(__ENV.RECIPIENTS_PER_POST || '1', 10);
// BATCH > 1 posts that many notifications per request to /notifications/batch (RATE counts
// requests), each to its own random user(s).
const BATCH = parseInt(__ENV.BATCH || '1', 10);
// Sockets per listening VU: many sockets on one event loop leave more of the shared CPU to
// the platform than a JavaScript runtime per socket would.
const PER_VU = parseInt(__ENV.PER_VU || '50', 10);

const latency = new Trend('post_to_socket_ms', true);
const lowLatency = new Trend('low_post_to_socket_ms', true);
const backlogPost = new Trend('backlog_post_ms', true);
const received = new Counter('notifications_received');
const posted = new Counter('notifications_posted');
const connected = new Counter('sockets_connected');
const socketErrors = new Counter('socket_errors');

const durationS = parseInt(DURATION, 10);
const holdMs = (WARMUP_S + durationS + DRAIN_S) * 1000;

export const options = {
  scenarios: {
    sockets: { executor: 'per-vu-iterations', vus: Math.ceil(USERS / PER_VU), iterations: 1,
               exec: 'listen',
               maxDuration: `${WARMUP_S + durationS + DRAIN_S + 30}s` },
    senders: { executor: 'constant-arrival-rate', rate: RATE, timeUnit: '1s', duration: DURATION,
               preAllocatedVUs: 64, maxVUs: 400, startTime: `${WARMUP_S}s`, exec: 'send' },
    // The whole backlog in one batch request a second before the first high-priority one,
    // so those are sent while it is queued behind them, not while it is still being posted.
    ...(LOW_BACKLOG > 0 ? { backlog: { executor: 'shared-iterations', vus: 1, iterations: 1,
        startTime: `${WARMUP_S - 1}s`, maxDuration: '60s', exec: 'backlog' } } : {}),
  },
  summaryTrendStats: ['avg', 'p(50)', 'p(90)', 'p(99)', 'max'],
  thresholds: {
    'checks': ['rate==1'],
    'socket_errors': ['count==0'],
  },
};

const headers = { 'content-type': 'application/json', 'x-api-key': API_KEY };
const userName = (run, i) => `bench-${run}-${i}`;

// One run id for every VU: init code runs once per VU, so a Date.now() there would differ.
export function setup() {
  return { run: __ENV.RUN_ID || `${Date.now()}` };
}

function hold(me) {
  const toAck = [];
  const socket = new WebSocket(`${WS_BASE}/ws/${me}`, null, { headers: { 'x-api-key': API_KEY } });
  socket.onopen = () => {
    connected.add(1);
    // Clients ack in batches, as a real one would after rendering.
    const acks = setInterval(() => {
      if (toAck.length) socket.send(JSON.stringify({ type: 'ack', ids: toAck.splice(0, 1000) }));
    }, 1000);
    setTimeout(() => { clearInterval(acks); socket.close(); }, holdMs);
  };
  socket.onerror = () => socketErrors.add(1);
  socket.onmessage = (event) => {
    const f = JSON.parse(event.data);
    if (f.type !== 'notification' || !f.data || !f.data.t) return;
    const ms = Date.now() - f.data.t;
    if (f.priority === 'low') lowLatency.add(ms); else latency.add(ms);
    if (f.priority !== 'low') received.add(1);
    toAck.push(f.id);
  };
}

export function listen(data) {
  const first = exec.scenario.iterationInTest * PER_VU;
  for (let idx = first; idx < Math.min(first + PER_VU, USERS); idx++) hold(userName(data.run, idx));
}

function notification(run) {
  const first = Math.floor(Math.random() * USERS);
  const target = PER_POST > 1
    ? { user_ids: Array.from({ length: PER_POST }, (_, i) => userName(run, (first + i) % USERS)) }
    : { user_id: userName(run, first) };
  return { ...target, title: 'bench', body: 'latency', priority: PRIORITY, data: { t: Date.now() } };
}

export function send(data) {
  const r = BATCH > 1
    ? http.post(`${BASE}/notifications/batch`, JSON.stringify({
        notifications: Array.from({ length: BATCH }, () => notification(data.run)) }), { headers })
    : http.post(`${BASE}/notifications`, JSON.stringify(notification(data.run)), { headers });
  if (check(r, { 'accepted (202)': (x) => x.status === 202 })) posted.add(PER_POST * BATCH);
}

export function backlog(data) {
  const ids = [];
  for (let i = 0; i < USERS; i++) ids.push(userName(data.run, i));
  const low = { user_ids: ids, title: 'bench', body: 'backlog', priority: 'low',
                data: { t: Date.now() } };
  const body = JSON.stringify({
    notifications: Array.from({ length: Math.ceil(LOW_BACKLOG / USERS) }, () => low) });
  const r = http.post(`${BASE}/notifications/batch`, body, { headers });
  check(r, { 'accepted (202)': (x) => x.status === 202 });
  backlogPost.add(r.timings.duration);
}
