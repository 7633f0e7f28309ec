#!/usr/bin/env bash
# Installs what building and testing vhost-tmem needs on a fresh Debian 12 machine.
# Idempotent: installs only what is missing, prints one line per step.
set -euo pipefail

say() { printf 'deps: %s\n' "$*"; }
need_apt=()
# systemd: `systemd-analyze verify` checks the units in contrib/systemd (nothing is started).
# fonts-dejavu-core: the text of the lab's PNG plots (lab/src/report.rs reads the font file).
for pkg in gcc make pkg-config libc6-dev systemd fonts-dejavu-core; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    say "apt-get install ${need_apt[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
else
    say "system packages present"
fi

if ! command -v cargo >/dev/null 2>&1; then
    for d in "$HOME/.cargo/bin" /root/.cargo/bin; do
        [ -x "$d/cargo" ] && export PATH="$d:$PATH" && break
    done
fi
command -v cargo >/dev/null 2>&1 || {
    echo "deps: no Rust toolchain: install one with rustup (https://rustup.rs), Rust >= 1.88" >&2
    exit 1
}
rustc_minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
if [ "$rustc_minor" -lt 88 ]; then
    echo "deps: $(rustc --version) is too old: vhost-tmem needs Rust >= 1.88" >&2
    exit 1
fi
for comp in rustfmt clippy; do
    if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
        say "rustup component add $comp"
        rustup component add "$comp" || {
            echo "deps: cargo $comp is missing and rustup could not add it" >&2
            exit 1
        }
    fi
done
say "$(rustc --version), $(cargo --version | cut -d' ' -f1-2)"
