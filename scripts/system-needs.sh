#!/usr/bin/env bash
# What the test command needs from the system, made sure of before it tests:
# Node 20+ with npm (the Node client's tests), Debian's chromium (the console's
# browser tests drive /usr/bin/chromium; a downloaded browser is never used)
# and the PostgreSQL server binaries (the throwaway clusters of the store suite
# and the several-nodes tests). Where one is missing and this runs as root with
# apt, it is installed with one line saying what and why; otherwise the script
# stops at once with one line naming the command to run.
set -euo pipefail

needed=()
why=()
if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
    needed+=(nodejs npm)
    why+=("nodejs npm (the Node client is built and tested)")
fi
if [ ! -x /usr/bin/chromium ]; then
    needed+=(chromium)
    why+=("chromium (the web console's browser tests drive /usr/bin/chromium)")
fi
if ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
    needed+=(postgresql)
    why+=("postgresql (the store suite and the several-nodes tests start a throwaway server)")
fi
[ ${#needed[@]} -eq 0 ] && exit 0

command_line="apt-get install -y ${needed[*]}"
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "missing system packages: ${needed[*]}; run: sudo $command_line" >&2
    exit 1
fi
for line in "${why[@]}"; do
    echo "== installing $line"
done
log=$(mktemp)
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${needed[@]}"; } >"$log" 2>&1; then
    echo "could not install ${needed[*]} (apt said: $(tail -n 1 "$log")); run: $command_line" >&2
    rm -f "$log"
    exit 1
fi
rm -f "$log"
