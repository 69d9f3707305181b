#!/usr/bin/env bash
# Throwaway PostgreSQL cluster for the benchmark (bench/harness.py starts it when
# no --dsn is given).
#
#   bench/pg.sh start    # initdb (first time) + start; idempotent
#   bench/pg.sh stop     # fast shutdown via pg_ctl (uses the postmaster PID file)
#   bench/pg.sh status
#   bench/pg.sh dsn      # print the DSN to use
#   bench/pg.sh db NAME  # create database NAME (owner bench) if missing; print its DSN
#   bench/pg.sh reset    # stop + delete the data directory
#
# Environment (all optional):
#   PGBIN      directory with initdb/pg_ctl/postgres   (default: /usr/lib/postgresql/15/bin)
#   BENCH_PGDATA  data directory                       (default: /tmp/benchpg)
#   BENCH_PGSOCK  unix socket directory                (default: /tmp/benchpg-sock)
#   BENCH_PGPORT  TCP port on 127.0.0.1                (default: 25432: below the
#                 kernel's ephemeral ports, 32768-60999, which a busy machine's
#                 outgoing connections take: 55432 was refused "in use" while a
#                 test suite ran)
#   BENCH_PGUSER  OS user owning the cluster           (default: postgres, created if missing)
#
# Settings are durable on purpose: fsync=on, synchronous_commit=on,
# full_page_writes=on (all PostgreSQL defaults), shared_buffers=256MB,
# max_connections=200, pg_stat_statements loaded.  Nothing else is tuned.
set -euo pipefail

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PGDATA=${BENCH_PGDATA:-/tmp/benchpg}
PGSOCK=${BENCH_PGSOCK:-/tmp/benchpg-sock}
PGPORT=${BENCH_PGPORT:-25432}
PGOSUSER=${BENCH_PGUSER:-postgres}
DBNAME=bench
LOG=${PGDATA}.log

as_pg() {
  if [ "$(id -un)" = "$PGOSUSER" ]; then "$@"; else runuser -u "$PGOSUSER" -- "$@"; fi
}

ensure_user() {
  if ! id "$PGOSUSER" >/dev/null 2>&1; then
    useradd -m "$PGOSUSER"
  fi
}

is_running() {
  [ -f "$PGDATA/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1
}

dsn() {
  echo "postgresql://bench@127.0.0.1:${PGPORT}/${1:-$DBNAME}"
}

cmd_db() {
  local name=$1
  case "$name" in bench*) ;; *) echo "database name must start with 'bench'" >&2; exit 2 ;; esac
  local psql=("$PGBIN/psql" -X -q -h "$PGSOCK" -p "$PGPORT" -U postgres -d postgres -v ON_ERROR_STOP=1)
  if ! "${psql[@]}" -tAc "select 1 from pg_database where datname='${name}'" | grep -q 1; then
    "${psql[@]}" -c "create database ${name} owner bench"
  fi
  dsn "$name"
}

cmd_start() {
  ensure_user
  mkdir -p "$PGSOCK"
  chown "$PGOSUSER" "$PGSOCK"
  if [ ! -f "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA"
    chown "$PGOSUSER" "$PGDATA"
    chmod 700 "$PGDATA"
    as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    cat >>"$PGDATA/postgresql.conf" <<EOF

# --- job-queue benchmark settings ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '${PGSOCK}'
max_connections = 200
shared_buffers = 256MB
fsync = on
synchronous_commit = on
full_page_writes = on
EOF
  fi
  # Per-statement server time for the profile (bench/profile.py); the same
  # small overhead for every config.
  if ! grep -q "^shared_preload_libraries = 'pg_stat_statements'" "$PGDATA/postgresql.conf"; then
    echo "shared_preload_libraries = 'pg_stat_statements'" >>"$PGDATA/postgresql.conf"
    if is_running; then as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null; fi
  fi
  if is_running; then
    echo "already running (pid $(head -1 "$PGDATA/postmaster.pid"))"
  else
    touch "$LOG"; chown "$PGOSUSER" "$LOG"
    # the port on the command line, not in postgresql.conf: a cluster made
    # before BENCH_PGPORT changed follows it (a command-line -p wins)
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$LOG" -w -t 60 -o "-p ${PGPORT}" start >/dev/null
    echo "started (pid $(head -1 "$PGDATA/postmaster.pid"))"
  fi
  # role + database, idempotent
  local psql=("$PGBIN/psql" -X -q -h "$PGSOCK" -p "$PGPORT" -U postgres -d postgres -v ON_ERROR_STOP=1)
  if ! "${psql[@]}" -tAc "select 1 from pg_roles where rolname='bench'" | grep -q 1; then
    "${psql[@]}" -c "create role bench login superuser"
  fi
  if ! "${psql[@]}" -tAc "select 1 from pg_database where datname='${DBNAME}'" | grep -q 1; then
    "${psql[@]}" -c "create database ${DBNAME} owner bench"
  fi
}

cmd_stop() {
  if is_running; then
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
    echo "stopped"
  else
    echo "not running"
  fi
}

case "${1:-}" in
  start)  cmd_start ;;
  stop)   cmd_stop ;;
  status) if is_running; then echo "running (pid $(head -1 "$PGDATA/postmaster.pid")) $(dsn)"; else echo "not running"; exit 1; fi ;;
  dsn)    dsn ;;
  db)     cmd_db "${2:?usage: $0 db NAME}" ;;
  reset)  cmd_stop; rm -rf "$PGDATA" "$LOG" ;;
  *) echo "usage: $0 start|stop|status|dsn|db NAME|reset" >&2; exit 2 ;;
esac
