// Reconnect chaos: USERS clients connect and drop at random for CHAOS_S while NOTIFICATIONS
// notifications are posted to them; each client then reconnects once more for SETTLE_S.
// A client acks every notification it receives (live, or replayed on reconnect). At the end
// every notification must be acked, i.e. received by its user: zero lost.
//   k6 run -e USERS=50 -e NOTIFICATIONS=1000 -e CHAOS_S=30 scripts/k6/reconnect-chaos.js
import http from 'k6/http';
import ws from 'k6/ws';
import exec from 'k6/execution';
import { check, sleep } from 'k6';
import { Counter } from 'k6/metrics';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8000';
const WS_BASE = BASE.replace(/^http/, 'ws');
const API_KEY = __ENV.API_KEY || 'dev-api-key';
const USERS = parseInt(__ENV.USERS || '50', 10);
const NOTIFICATIONS = parseInt(__ENV.NOTIFICATIONS || '1000', 10);
const CHAOS_S = parseFloat(__ENV.CHAOS_S || '30');
const SETTLE_S = parseFloat(__ENV.SETTLE_S || '5');
const MAX_UP_S = parseFloat(__ENV.MAX_UP_S || '2');
const MAX_DOWN_S = parseFloat(__ENV.MAX_DOWN_S || '1');
const SENDERS = 4;

const posted = new Counter('notifications_posted');
const lost = new Counter('notifications_lost');
const missing = new Counter('notifications_not_recorded');
const dupes = new Counter('duplicates_in_one_connection');
const connects = new Counter('connects');
const receivedLive = new Counter('notifications_received');

export const options = {
  scenarios: {
    clients: { executor: 'per-vu-iterations', vus: USERS, iterations: 1, exec: 'client',
               maxDuration: `${Math.ceil(CHAOS_S + SETTLE_S + 60)}s` },
    sender: { executor: 'shared-iterations', vus: SENDERS, iterations: NOTIFICATIONS,
              exec: 'send', startTime: '1s', maxDuration: `${Math.ceil(CHAOS_S + 60)}s` },
  },
  setupTimeout: '30s',
  teardownTimeout: '120s',
  thresholds: {
    notifications_lost: ['count==0'],
    notifications_not_recorded: ['count==0'],
    duplicates_in_one_connection: ['count==0'],
    checks: ['rate==1'],
  },
};

const headers = { 'content-type': 'application/json', 'x-api-key': API_KEY };
const userName = (run, i) => `chaos-${run}-${i}`;

export function setup() {
  return { run: __ENV.RUN_ID || `${Date.now()}`, start: Date.now() };
}

// One connection: ack what arrives, count ids seen twice on it, close after `seconds`.
function connectOnce(me, seconds) {
  const seen = {};
  const res = ws.connect(`${WS_BASE}/ws/${me}`, { headers: { 'x-api-key': API_KEY } }, (socket) => {
    socket.on('open', () => connects.add(1));
    socket.on('message', (raw) => {
      const f = JSON.parse(raw);
      if (f.type !== 'notification') return;
      if (seen[f.id]) dupes.add(1);
      seen[f.id] = true;
      receivedLive.add(1);
      socket.send(JSON.stringify({ type: 'ack', ids: [f.id] }));
    });
    socket.setTimeout(() => socket.close(), seconds * 1000);
  });
  check(res, { 'socket opened (101)': (r) => r && r.status === 101 });
}

export function client(data) {
  const me = userName(data.run, exec.scenario.iterationInTest);
  dupes.add(0);
  while (Date.now() < data.start + CHAOS_S * 1000) {
    connectOnce(me, 0.2 + Math.random() * MAX_UP_S);
    sleep(Math.random() * MAX_DOWN_S);
  }
  connectOnce(me, SETTLE_S);
}

export function send(data) {
  const i = exec.scenario.iterationInTest;
  const body = JSON.stringify({ user_id: userName(data.run, i % USERS), title: 'chaos',
                                body: `#${i}`, data: { run: data.run, i } });
  const r = http.post(`${BASE}/notifications`, body, { headers });
  if (check(r, { 'accepted (202)': (x) => x.status === 202 })) posted.add(1);
  // Pace the sends to end at about 80 % of the chaos window.
  sleep((SENDERS * CHAOS_S * 0.8) / NOTIFICATIONS);
}

// Every notification of this run, per user, read back from the inbox: acked or not.
function tally(run) {
  let recorded = 0;
  let unacked = 0;
  for (let u = 0; u < USERS; u++) {
    let cursor = null;
    for (;;) {
      const q = cursor ? `&cursor=${cursor}` : '';
      const r = http.get(`${BASE}/users/${userName(run, u)}/notifications?limit=500${q}`,
                         { headers, tags: { name: 'tally' } });
      if (!check(r, { 'inbox read (200)': (x) => x.status === 200 })) break;
      const page = r.json();
      for (const n of page.notifications) {
        if (!n.data || n.data.run !== run) continue;
        recorded += 1;
        if (!n.acked) unacked += 1;
      }
      if (!page.next_cursor) break;
      cursor = page.next_cursor;
    }
  }
  return { recorded, unacked };
}

export function teardown(data) {
  // Acks are written a moment after they arrive; give the last ones time to land.
  let t = tally(data.run);
  const deadline = Date.now() + 30000;
  while ((t.unacked > 0 || t.recorded < NOTIFICATIONS) && Date.now() < deadline) {
    sleep(1);
    t = tally(data.run);
  }
  console.log(`reconnect-chaos: ${t.recorded} of ${NOTIFICATIONS} recorded, ${t.unacked} not received`);
  lost.add(t.unacked);
  missing.add(NOTIFICATIONS - t.recorded);
}
