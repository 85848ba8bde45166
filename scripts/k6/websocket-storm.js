// WebSocket storm: USERS clients each open a socket (spread over RAMP_S), ping it every
// PING_MS with {"type":"ping"} and time the {"type":"pong"}, for HOLD_S.
//   k6 run -e USERS=500 scripts/k6/websocket-storm.js
// Thresholds: every socket opens, every ping is answered, pong p95/p99 under bounds.
import ws from 'k6/ws';
import exec from 'k6/execution';
import { check, sleep } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8000';
const WS_BASE = BASE.replace(/^http/, 'ws');
const API_KEY = __ENV.API_KEY || 'dev-api-key';
const USERS = parseInt(__ENV.USERS || '500', 10);
const RAMP_S = parseFloat(__ENV.RAMP_S || '10');
const HOLD_S = parseFloat(__ENV.HOLD_S || '30');
const PING_MS = parseInt(__ENV.PING_MS || '1000', 10);
const PONG_P95_MS = __ENV.PONG_P95_MS || '100';
const PONG_P99_MS = __ENV.PONG_P99_MS || '250';

const connectOk = new Rate('ws_connect_success');
const pong = new Trend('pong_latency_ms', true);
const pings = new Counter('pings_sent');
const pongs = new Counter('pongs_received');
const unanswered = new Counter('pings_unanswered');

export const options = {
  scenarios: {
    storm: { executor: 'per-vu-iterations', vus: USERS, iterations: 1,
             maxDuration: `${Math.ceil(RAMP_S + HOLD_S + 60)}s` },
  },
  summaryTrendStats: ['avg', 'p(50)', 'p(95)', 'p(99)', 'max'],
  thresholds: {
    ws_connect_success: ['rate==1'],
    pong_latency_ms: [`p(95)<${PONG_P95_MS}`, `p(99)<${PONG_P99_MS}`],
    pings_unanswered: ['count==0'],
    pongs_received: ['count>0'],
  },
};

export function setup() {
  return { run: __ENV.RUN_ID || `${Date.now()}` };
}

export default function (data) {
  const idx = exec.scenario.iterationInTest;
  sleep((idx / USERS) * RAMP_S);
  const me = `storm-${data.run}-${idx}`;
  let sentAt = 0;
  let waiting = false;
  const res = ws.connect(`${WS_BASE}/ws/${me}`, { headers: { 'x-api-key': API_KEY } }, (socket) => {
    socket.on('open', () => {
      socket.setInterval(() => {
        // One ping in flight at a time: a missing pong is counted, not hidden by the next.
        if (waiting) return;
        sentAt = Date.now();
        waiting = true;
        pings.add(1);
        socket.send(JSON.stringify({ type: 'ping' }));
      }, PING_MS);
    });
    socket.on('message', (raw) => {
      const f = JSON.parse(raw);
      if (f.type === 'pong' && waiting) {
        pong.add(Date.now() - sentAt);
        pongs.add(1);
        waiting = false;
      }
    });
    socket.setTimeout(() => {
      // A ping sent in the last moment may still be on its way: allow it one more interval.
      if (waiting && Date.now() - sentAt > PING_MS) unanswered.add(1);
      unanswered.add(0);
      socket.close();
    }, HOLD_S * 1000);
  });
  const opened = !!res && res.status === 101;
  connectOk.add(opened);
  check(res, { 'socket opened (101)': () => opened });
}
