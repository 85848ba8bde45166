// Fan-out: USERS sockets connect, then one notification goes to all of them through user_ids.
// Every user must receive it exactly once; thresholds on receipt latency.
//   k6 run -e USERS=500 scripts/k6/notification-fanout.js
// The POST waits until the platform's /metrics counts USERS open sockets (or CONNECT_S more
// seconds pass), so the figure is the fan-out's, not the tail of the connect storm's.
// Each VU holds PER_VU sockets (k6/experimental/websockets runs many on one event loop): a VU per socket
// would spend the shared CPU on 10,000 JavaScript runtimes instead of on the platform. At
// 10,000 users, 500 per VU took k6 0.9 CPU-seconds over the fan-out's first 4 s, 100 per VU 1.4.
import http from 'k6/http';
import exec from 'k6/execution';
import { check, sleep } from 'k6';
import { Counter, Trend } from 'k6/metrics';
import { clearInterval, setInterval, setTimeout } from 'k6/timers';
import { WebSocket } from 'k6/experimental/websockets';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8000';
const WS_BASE = BASE.replace(/^http/, 'ws');
const API_KEY = __ENV.API_KEY || 'dev-api-key';
const USERS = parseInt(__ENV.USERS || '500', 10);
const PER_VU = parseInt(__ENV.PER_VU || '500', 10);
const CONNECT_S = parseInt(__ENV.CONNECT_S || '10', 10);
const WAIT_S = parseInt(__ENV.WAIT_S || '10', 10);
const RECEIPT_P99_MS = __ENV.RECEIPT_P99_MS || '1000';
// Clients ack what they got once per ACK_EVERY_MS, as in delivery.js (0: each on receipt).
const ACK_EVERY_MS = parseInt(__ENV.ACK_EVERY_MS || '1000', 10);
// SEND=0 only holds the sockets open (idle-socket memory measurement).
const SEND = (__ENV.SEND || '1') !== '0';
// The sender may wait up to CONNECT_S more for stragglers before it posts.
const HOLD_S = SEND ? 2 * CONNECT_S + WAIT_S : CONNECT_S + WAIT_S;
const VUS = Math.ceil(USERS / PER_VU);

const receipt = new Trend('fanout_receipt_ms', true);
const received = new Counter('fanout_received');
const duplicates = new Counter('fanout_duplicates');
const connected = new Counter('sockets_connected');
const socketErrors = new Counter('socket_errors');
// How long the sender waited for every socket to be open, after CONNECT_S.
const connectWait = new Trend('connect_wait_ms', true);

export const options = {
  scenarios: {
    sockets: { executor: 'per-vu-iterations', vus: VUS, iterations: 1, exec: 'listen',
               maxDuration: `${HOLD_S + 60}s` },
    ...(SEND ? { send: { executor: 'shared-iterations', vus: 1, iterations: 1, exec: 'send',
                         startTime: `${CONNECT_S}s` } } : {}),
  },
  summaryTrendStats: ['avg', 'p(50)', 'p(99)', 'max'],
  // No per-socket url/name tags: 10,000 distinct values would make as many time series in
  // the load client, whose CPU is shared with the platform under test.
  systemTags: (__ENV.SYSTEM_TAGS || 'scenario,status,method,check,error_code').split(','),
  thresholds: SEND ? {
    fanout_received: [`count>=${USERS}`],
    fanout_duplicates: ['count==0'],
    fanout_receipt_ms: [`p(99)<${RECEIPT_P99_MS}`],
    socket_errors: ['count==0'],
    checks: ['rate==1'],
  } : { sockets_connected: [`count>=${USERS}`], socket_errors: ['count==0'] },
};

const userName = (run, i) => `fanout-${run}-${i}`;

// One run id for every VU: init code runs once per VU, so a Date.now() there would differ.
export function setup() {
  return { run: __ENV.RUN_ID || `${Date.now()}` };
}

// Sockets with acks waiting, flushed by one timer per VU rather than one per socket.
const unacked = new Set();

function hold(me) {
  let got = 0;
  const toAck = [];
  const socket = new WebSocket(`${WS_BASE}/ws/${me}`, null, { headers: { 'x-api-key': API_KEY } });
  const ack = () => socket.send(JSON.stringify({ type: 'ack', ids: toAck.splice(0) }));
  socket.onopen = () => connected.add(1);
  socket.onerror = () => socketErrors.add(1);
  socket.onmessage = (event) => {
    const f = JSON.parse(event.data);
    if (f.type !== 'notification' || !f.data || !f.data.t) return;
    got += 1;
    if (got > 1) { duplicates.add(1); return; }
    receipt.add(Date.now() - f.data.t);
    received.add(1);
    toAck.push(f.id);
    if (ACK_EVERY_MS > 0) unacked.add(ack); else ack();
  };
  setTimeout(() => socket.close(), HOLD_S * 1000);
}

export function listen(data) {
  const first = exec.scenario.iterationInTest * PER_VU;
  for (let idx = first; idx < Math.min(first + PER_VU, USERS); idx++) {
    // Spread the connects over most of CONNECT_S rather than opening them all at once.
    setTimeout(() => hold(userName(data.run, idx)), (idx / USERS) * CONNECT_S * 700);
  }
  if (ACK_EVERY_MS > 0) {
    const flush = setInterval(() => {
      for (const ack of unacked) ack();
      unacked.clear();
    }, ACK_EVERY_MS);
    setTimeout(() => clearInterval(flush), HOLD_S * 1000 - ACK_EVERY_MS);
  }
}

// Open sockets across the gateway processes, from the platform's own gauge.
function openSockets() {
  const r = http.get(`${BASE}/metrics`, { tags: { name: 'metrics' } });
  let total = 0;
  for (const line of (r.body || '').split('\n')) {
    if (line.startsWith('notifier_open_sockets{')) total += parseFloat(line.split(' ').pop());
  }
  return total;
}

export function send(data) {
  const waitFrom = Date.now();
  while (openSockets() < USERS && Date.now() - waitFrom < CONNECT_S * 1000) sleep(0.5);
  connectWait.add(Date.now() - waitFrom);
  const ids = [];
  for (let i = 0; i < USERS; i++) ids.push(userName(data.run, i));
  const r = http.post(`${BASE}/notifications`,
    JSON.stringify({ user_ids: ids, title: 'fan-out', body: 'to everyone', data: { t: Date.now() } }),
    { headers: { 'content-type': 'application/json', 'x-api-key': API_KEY } });
  check(r, { 'accepted (202)': (x) => x.status === 202 });
}
