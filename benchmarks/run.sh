#!/usr/bin/env bash
# The clara-mail benchmark (issues 9 and 18): one command for every figure and goal.
# See benchmarks/README.md.
#
#   benchmarks/run.sh            # 3 repetitions, 20,000 recipients a send (~25 min, 2 cores)
#   benchmarks/run.sh --quick    # smoke run: 1 repetition, small inputs
#   benchmarks/run.sh --million  # also peak memory of a 1,000,000-recipient send (+~11 min)
#   benchmarks/run.sh --quick --only kill --port 26222   # one group of rows
#
# Other options go to benchmarks/harness.py (--reps, --recipients, --kill-recipients,
# --only GROUPS, --port, --postgres URL, --workdir, --keep). It installs what it needs
# (Debian: postfix for smtp-sink and smtp-source, time for GNU time), talks to 127.0.0.1
# only, and stops what it started.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
# The interpreter: $CLARA_BENCH_PYTHON, else the checkout's .venv (beside this folder),
# else the active virtual environment, else python3 on PATH.
python="${CLARA_BENCH_PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"
    elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
        python="$VIRTUAL_ENV/bin/python"
    else python="$(command -v python3 || true)"; fi
fi
if [[ -z "$python" ]] || ! "$python" -c 'import clara_mailer' 2>/dev/null; then
    echo "error: no Python with clara-mail installed (${python:-python3 not found});" \
        "run: python3 -m venv $repo/.venv && $repo/.venv/bin/pip install -e '$repo[test]'," \
        "or set CLARA_BENCH_PYTHON" >&2
    exit 2
fi

apt_install() {
    # Wait for another apt/dpkg run instead of failing on its lock.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 "$@" >/dev/null
}

need_packages=()
command -v smtp-sink >/dev/null && command -v smtp-source >/dev/null || need_packages+=(postfix)
[[ -x /usr/bin/time ]] || need_packages+=(time)
installed_postfix=no
if ((${#need_packages[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "error: needs Debian packages ${need_packages[*]}: run as root or install them" >&2
        exit 2
    fi
    echo "installing ${need_packages[*]} ..."
    # Postfix only for its test tools: "No configuration", and no daemon left running.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq -o DPkg::Lock::Timeout=600 >/dev/null || true
    apt_install "${need_packages[@]}"
    [[ " ${need_packages[*]} " == *" postfix "* ]] && installed_postfix=yes
fi
# The postfix package's scripts may start the mail system (policy-rc.d permitting): a
# master we caused must not outlive us. One that ran before us is not ours to stop.
if [[ $installed_postfix == yes ]] && command -v postfix >/dev/null \
    && postfix status >/dev/null 2>&1; then
    echo "stopping the postfix master the package install started"
    postfix stop >/dev/null 2>&1 || true
fi
for tool in smtp-sink smtp-source; do
    command -v "$tool" >/dev/null || { echo "error: $tool missing after install" >&2; exit 2; }
done

workdir="$(mktemp -d "${TMPDIR:-/tmp}/clara-bench.XXXXXX")"
pidfile="$workdir/pids"
: >"$pidfile"
harness_pid=""

cleanup() {
    # The harness stops its own sink; this is the backstop if it died or was killed.
    if [[ -n "$harness_pid" ]] && kill -0 "$harness_pid" 2>/dev/null; then
        kill -TERM "$harness_pid" 2>/dev/null || true
        wait "$harness_pid" 2>/dev/null || true
    fi
    while read -r pid; do
        [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null || true
    done <"$pidfile"
    # The kill row's message files (on /dev/shm when it had room), if the harness died.
    if [[ -f "$workdir/dumps" ]]; then
        while read -r dump; do
            [[ "$dump" == */clara-bench-dump.* ]] && rm -rf -- "$dump"
        done <"$workdir/dumps"
        rm -f "$workdir/dumps"
    fi
    # Keep the work directory only when it holds results.
    [[ -f "$workdir/results.json" ]] || rm -rf "$workdir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cd "$repo"
# The package's bytecode, as an install writes it (pip compiles at install time). Without
# it, a module edited since its last import (or every module, under
# PYTHONDONTWRITEBYTECODE) is compiled again by every command the rows time.
"$python" -m compileall -q "$repo/clara_mailer" >/dev/null
"$python" "$here/harness.py" --workdir "$workdir" "$@" &
harness_pid=$!
status=0
wait "$harness_pid" || status=$?
harness_pid=""
exit "$status"
