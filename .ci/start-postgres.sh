#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1:55432 for the tests (idempotent).
# Prints the URL the tests read from CLARA_TEST_POSTGRES_URL.
set -euo pipefail
PORT=${CLARA_PG_PORT:-55432}
PGDATA=${CLARA_PGDATA:-/tmp/clara-mail-pg}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
URL="postgresql+psycopg://postgres@127.0.0.1:${PORT}/postgres"
if "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then echo "$URL"; exit 0; fi
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
rm -rf "$PGDATA"; mkdir -p "$PGDATA"
[ "$(id -u)" = 0 ] && chown postgres "$PGDATA"
as_pg "$PGBIN/initdb" -D "$PGDATA" -A trust -U postgres --no-sync -E UTF8 >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w -o \
  "-c listen_addresses=127.0.0.1 -p $PORT -c unix_socket_directories=$PGDATA -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
  start >/dev/null
echo "$URL"
