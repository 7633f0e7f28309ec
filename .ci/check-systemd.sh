#!/usr/bin/env bash
# Checks the systemd units in contrib/systemd with `systemd-analyze verify`, in a scratch root
# that holds the release binary at the units' ExecStart path and the system's own units (for
# sockets.target and the rest): every key must be known, every command runnable. Any message
# fails (verify only warns about unknown keys). Also checks that contrib/systemd/config.toml
# is a configuration the daemon accepts. Used by `make install-check`.
set -euo pipefail
bin=$1
fail() { echo "systemd-check: $*" >&2; exit 1; }
command -v systemd-analyze >/dev/null || fail "systemd-analyze not found (apt install systemd)"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/local/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd"
cp "$bin" "$root/usr/local/bin/vhost-tmem"
cp -r /usr/lib/systemd/system "$root/usr/lib/systemd/system"
units=()
for u in contrib/systemd/*.service contrib/systemd/*.socket; do
    cp "$u" "$root/etc/systemd/system/"
    units+=("$root/etc/systemd/system/$(basename "$u")")
done
out=$(systemd-analyze verify --man=no --root="$root" "${units[@]}" 2>&1) || fail "$out"
[ -z "$out" ] || fail "$out"
# The example configuration parses (the daemon then fails for want of the passed socket, and
# says so: anything else is a configuration error).
msg=$("$bin" --config contrib/systemd/config.toml 2>&1) && fail "the daemon ran without its socket"
grep -q 'listen=vm1, but no socket was passed' <<<"$msg" || fail "contrib/systemd/config.toml: $msg"
echo "systemd units: ${#units[@]} verified"
