#!/usr/bin/env bash
# Installs what Lakelet needs on a fresh machine, idempotently:
#   - PostgreSQL server 15+ (with pgbench) from the distribution when missing (Debian/Ubuntu),
#   - ./.venv with Lakelet and, with --test, the test dependencies,
#   - with --bench, PgBouncer (the baseline bench/proxy.py compares the proxy against).
# Anything it cannot install, it names, and stops.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
want_bench=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --bench) want_bench=1 ;;
  esac
done

say() { echo "setup: $*" >&2; }
die() { echo "setup: error: $*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@" || die "need root to run: $* (run it yourself, then re-run)"
  else die "need root to run: $* (run it yourself, then re-run)"
  fi
}

apt_updated=0
apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 1
  if [ "$apt_updated" = 0 ]; then as_root apt-get update -qq >/dev/null; apt_updated=1; fi
  say "installing $* from the distribution"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_bindir() {
  local d v best="" bestv=0
  for d in ${LAKELET_PG_BINDIR:-} /usr/lib/postgresql/*/bin /usr/pgsql-*/bin; do
    [ -x "$d/postgres" ] || continue
    v=$("$d/postgres" --version 2>/dev/null | sed -E 's/[^0-9]*([0-9]+).*/\1/')
    if [ -n "$v" ] && [ "$v" -ge 15 ] && [ "$v" -gt "$bestv" ]; then best=$d; bestv=$v; fi
  done
  echo "$best"
}

# --- Python 3.11+ -------------------------------------------------------------------------------
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || apt_install python3 python3-venv || die "Python 3.11+ is missing: install python3 (3.11 or newer)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "Python 3.11 or newer is needed, found $("$PY" --version 2>&1); set PYTHON=/path/to/python3.11"

# --- PostgreSQL server 15+ -------------------------------------------------------------------------
if [ -z "$(pg_bindir)" ]; then
  apt_install postgresql postgresql-contrib \
    || die "PostgreSQL server 15 or newer is missing: install it (Debian/Ubuntu: apt-get install postgresql; Fedora: dnf install postgresql-server) or set LAKELET_PG_BINDIR"
  [ -n "$(pg_bindir)" ] || die "installed postgresql, but no server 15+ found under /usr/lib/postgresql: install postgresql-15 or newer"
fi
bindir=$(pg_bindir)
for prog in pg_receivewal pg_waldump pg_controldata pgbench; do
  [ -x "$bindir/$prog" ] || apt_install postgresql-contrib || die "$prog is missing from $bindir: install your distribution's PostgreSQL server and contrib packages"
done
if [ "$want_test" = 1 ]; then
  command -v psql >/dev/null 2>&1 || [ -x "$bindir/psql" ] || apt_install postgresql-client || die "psql is missing: install postgresql-client"
fi

if [ "$want_bench" = 1 ]; then
  command -v pgbouncer >/dev/null 2>&1 || apt_install pgbouncer || die "pgbouncer is missing: install it (Debian/Ubuntu: apt-get install pgbouncer)"
  # The Data API bench's HTTP load generator; without it bench/data_api.py uses a slower Python client.
  command -v wrk >/dev/null 2>&1 || apt_install wrk || say "wrk is missing: bench/data_api.py falls back to aiohttp"
fi

# --- the virtual environment ---------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv 2>/dev/null || { apt_install python3-venv && rm -rf .venv && "$PY" -m venv .venv; } \
    || die "cannot make a virtual environment: install python3-venv"
fi
extra=""
[ "$want_test" = 1 ] && extra="[test]"
stamp=".venv/.installed$extra"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing Lakelet${extra:+ with test dependencies} into ./.venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".$extra"
  touch "$stamp"
fi

# --- native builds: the pooler's hot modules (mypyc, proxy/native.py) and the session relay (C,
# proxy/relay.c). Each is rebuilt when its source changed; without a C compiler, or when a build
# fails, the same code runs in Python (slower, the same behaviour).
native_build() {  # what, the check that it is built and current, the build, its log
  .venv/bin/python -c "$2" 2>/dev/null && return 0
  if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
    say "no C compiler (cc): $1 runs in Python; install gcc for the native build"
    return 0
  fi
  say "compiling $1"
  .venv/bin/python -c "$3" >/dev/null 2>"$4" || say "could not compile $1 (see $4): it runs in Python"
}
native_build "the pooler's hot modules with mypyc (proxy/native.py)" \
  'import sys, proxy.native as n; sys.exit(0 if n.compiled() else 1)' \
  'from proxy.native import build; build()' .venv/native-build.log
native_build "the native session relay (proxy/relay.c)" \
  'import sys, proxy.relay as r; sys.exit(0 if r.library_path().exists() else 1)' \
  'from proxy.relay import build; build()' .venv/relay-build.log
