// Fan-out: USERS sockets connect, then one notification goes to all of them through user_ids.
// Every user must receive it; thresholds on receipt latency.
//   k6 run -e USERS=500 scripts/k6/notification-fanout.js
import http from 'k6/http';
import ws from 'k6/ws';
import exec from 'k6/execution';
import { check, sleep } from 'k6';
import { Counter, Trend } from 'k6/metrics';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8000';
const WS_BASE = BASE.replace(/^http/, 'ws');
const API_KEY = __ENV.API_KEY || 'dev-api-key';
const USERS = parseInt(__ENV.USERS || '500', 10);
const CONNECT_S = parseInt(__ENV.CONNECT_S || '10', 10);
const WAIT_S = parseInt(__ENV.WAIT_S || '10', 10);
const RECEIPT_P99_MS = __ENV.RECEIPT_P99_MS || '1000';
// SEND=0 only holds the sockets open (idle-socket memory measurement).
const SEND = (__ENV.SEND || '1') !== '0';

const receipt = new Trend('fanout_receipt_ms', true);
const received = new Counter('fanout_received');
const connected = new Counter('sockets_connected');

export const options = {
  scenarios: {
    sockets: { executor: 'per-vu-iterations', vus: USERS, iterations: 1, exec: 'listen',
               maxDuration: `${CONNECT_S + WAIT_S + 60}s` },
    ...(SEND ? { send: { executor: 'shared-iterations', vus: 1, iterations: 1, exec: 'send',
                         startTime: `${CONNECT_S}s` } } : {}),
  },
  summaryTrendStats: ['avg', 'p(50)', 'p(99)', 'max'],
  thresholds: SEND ? {
    fanout_received: [`count>=${USERS}`],
    fanout_receipt_ms: [`p(99)<${RECEIPT_P99_MS}`],
    checks: ['rate==1'],
  } : { sockets_connected: [`count>=${USERS}`], checks: ['rate==1'] },
};

const userName = (run, i) => `fanout-${run}-${i}`;

// One run id for every VU: init code runs once per VU, so a Date.now() there would differ.
export function setup() {
  return { run: __ENV.RUN_ID || `${Date.now()}` };
}

export function listen(data) {
  const idx = exec.scenario.iterationInTest;
  const me = userName(data.run, idx);
  // Spread the connects over most of CONNECT_S rather than opening them all at once.
  sleep((idx / USERS) * CONNECT_S * 0.7);
  const res = ws.connect(`${WS_BASE}/ws/${me}`, { headers: { 'x-api-key': API_KEY } }, (socket) => {
    socket.on('open', () => connected.add(1));
    socket.on('message', (raw) => {
      const f = JSON.parse(raw);
      if (f.type === 'notification' && f.data && f.data.t) {
        receipt.add(Date.now() - f.data.t);
        received.add(1);
        socket.send(JSON.stringify({ type: 'ack', ids: [f.id] }));
      }
    });
    socket.setTimeout(() => socket.close(), (CONNECT_S + WAIT_S) * 1000);
  });
  check(res, { 'socket opened (101)': (r) => r && r.status === 101 });
}

export function send(data) {
  const ids = [];
  for (let i = 0; i < USERS; i++) ids.push(userName(data.run, i));
  const r = http.post(`${BASE}/notifications`,
    JSON.stringify({ user_ids: ids, title: 'fan-out', body: 'to everyone', data: { t: Date.now() } }),
    { headers: { 'content-type': 'application/json', 'x-api-key': API_KEY } });
  check(r, { 'accepted (202)': (x) => x.status === 202 });
}
