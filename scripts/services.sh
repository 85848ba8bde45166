#!/usr/bin/env bash
# Make sure Redis and PostgreSQL answer on 127.0.0.1: reuse them when they run, start them
# when they are stopped, install them (apt-get, as root) when they are missing.
set -euo pipefail

REDIS_HOST=127.0.0.1
REDIS_PORT=${REDIS_PORT:-6379}
PG_HOST=127.0.0.1
PG_PORT=${PG_PORT:-5432}

log() { printf 'services: %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; return 1; fi
}

apt_install() {
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

wait_for() {  # wait_for NAME CMD...: up to 30 s
  local name=$1; shift
  for _ in $(seq 1 60); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  log "$name did not come up"; return 1
}

redis_up() { redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }

ensure_redis() {
  if command -v redis-cli >/dev/null && redis_up; then log "redis: reusing $REDIS_HOST:$REDIS_PORT"; return; fi
  command -v redis-server >/dev/null || apt_install redis-server redis-tools
  if redis_up; then return; fi  # the package's own service may have started it
  log "redis: starting on $REDIS_HOST:$REDIS_PORT"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" \
    --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/notifier.log
  wait_for redis redis_up
}

pg_up() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT" && psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -tAc 'select 1' >/dev/null 2>&1; }

ensure_postgres() {
  if command -v pg_isready >/dev/null && pg_up; then log "postgres: reusing $PG_HOST:$PG_PORT"; return; fi
  if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    apt_install postgresql postgresql-client
  fi
  local version; version=$(ls /etc/postgresql | sort -V | tail -n1)
  local hba="/etc/postgresql/$version/main/pg_hba.conf"
  # A development database on loopback: trust local connections so `postgres` needs no password.
  if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    log "postgres: trusting loopback connections in $hba"
    as_root sed -i '/^#/!{/^\(host\|local\)/d}' "$hba"
    as_root tee -a "$hba" >/dev/null <<'HBA'
local all all trust
host all all 127.0.0.1/32 trust
host all all ::1/128 trust
HBA
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload 2>/dev/null || true
  fi
  if ! pg_up; then
    log "postgres: starting cluster $version/main"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  fi
  wait_for postgres pg_up
}

ensure_redis
ensure_postgres
