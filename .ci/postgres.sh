#!/usr/bin/env bash
# A throw-away PostgreSQL server on loopback for the multi-worker tests; prints its URL on stdout (only that).
#   export MERGEOPT_TEST_POSTGRES=$(bash .ci/postgres.sh)
# Idempotent: a second call finds the server running and prints the same URL. Stop it with
#   bash .ci/postgres.sh stop
# Installs Debian's postgresql package only when no server binaries are found. The server runs as a non-root OS
# user (postgres refuses root), keeps its data under MERGEOPT_PG_DIR (default: a folder in /tmp), listens on
# 127.0.0.1 only, on a free port, with trust authentication (loopback, test data only).
set -euo pipefail
log() { echo "postgres.sh: $*" >&2; }

DIR=${MERGEOPT_PG_DIR:-${TMPDIR:-/tmp}/mergeopt-postgres-$(id -u)}
DATA=$DIR/data
DB=mergeopt
DB_USER=mergeopt

find_bin() {
    local bin
    for bin in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [ -x "$bin/initdb" ] && [ -x "$bin/pg_ctl" ] && { echo "$bin"; return 0; }
    done
    bin=$(dirname "$(command -v pg_ctl 2>/dev/null || echo /nonexistent/pg_ctl)")
    [ -x "$bin/initdb" ] && { echo "$bin"; return 0; }
    return 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }

BIN=$(find_bin) || {
    log "no PostgreSQL server found: installing Debian's postgresql package"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
    BIN=$(find_bin) || { log "postgresql installed but initdb/pg_ctl not found"; exit 1; }
}

# postgres refuses to run as root: as root, run it as the 'postgres' OS user (created by the package, or here)
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir "$DIR" --shell /usr/sbin/nologin postgres
    RUN_AS=(runuser -u postgres --)
else
    RUN_AS=()
fi
pg() { "${RUN_AS[@]}" "$@"; }

if [ "${1:-}" = stop ]; then
    [ -f "$DATA/PG_VERSION" ] && pg "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >&2 || true
    exit 0
fi

mkdir -p "$DIR"
if [ "$(id -u)" = 0 ]; then chown postgres "$DIR"; fi
chmod 700 "$DIR"
if [ ! -f "$DATA/PG_VERSION" ]; then
    pg "$BIN/initdb" -D "$DATA" -U "$DB_USER" --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null 2>&1 \
        || pg "$BIN/initdb" -D "$DATA" -U "$DB_USER" --auth=trust -E UTF8 --locale=C >&2
fi

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1 && [ -f "$DIR/port" ]; then
    PORT=$(cat "$DIR/port")
else
    PORT=${MERGEOPT_PG_PORT:-54329}
    while ! port_free "$PORT"; do PORT=$((PORT + 1)); done
    echo "$PORT" > "$DIR/port"
    # sockets in our own folder (not /var/run/postgresql, which may not exist or be writable)
    pg "$BIN/pg_ctl" -D "$DATA" -l "$DIR/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -c unix_socket_directories='$DIR' -c max_connections=200 -c fsync=off" \
        start >&2 || { log "server did not start; log follows"; cat "$DIR/server.log" >&2; exit 1; }
fi

PSQL=("$BIN/psql" -h 127.0.0.1 -p "$PORT" -U "$DB_USER" -d postgres -v ON_ERROR_STOP=1 -qtA)
if [ "$("${PSQL[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
    "${PSQL[@]}" -c "CREATE DATABASE $DB" >&2
fi
echo "postgresql://$DB_USER@127.0.0.1:$PORT/$DB"
