#!/usr/bin/env bash
# Checks what `make install DESTDIR=$1 PREFIX=$2` installed: the binary (it runs), a man page
# per command and subcommand (each a roff page naming its command), and the three completions;
# nothing else. Used by `make install-check`.
set -euo pipefail
root=$1
prefix=$2
fail() { echo "install-check: $*" >&2; exit 1; }
expect=(
    "bin/vhost-tmem"
    "share/man/man1/vhost-tmem.1"
    "share/man/man1/vhost-tmem-stats.1"
    "share/man/man1/vhost-tmem-ctl.1"
    "share/man/man1/vhost-tmem-ctl-add-client.1"
    "share/man/man1/vhost-tmem-ctl-remove-client.1"
    "share/man/man1/vhost-tmem-ctl-list-clients.1"
    "share/man/man1/vhost-tmem-ctl-reload.1"
    "share/bash-completion/completions/vhost-tmem"
    "share/zsh/site-functions/_vhost-tmem"
    "share/fish/vendor_completions.d/vhost-tmem.fish"
)
for f in "${expect[@]}"; do
    [ -f "$root$prefix/$f" ] || fail "missing $prefix/$f"
done
[ -x "$root$prefix/bin/vhost-tmem" ] || fail "$prefix/bin/vhost-tmem is not executable"
"$root$prefix/bin/vhost-tmem" --version | grep -q '^vhost-tmem ' || fail "the installed binary does not run"
# Every installed file is under the prefix, and is one of the expected kinds.
while IFS= read -r f; do
    rel=${f#"$root$prefix/"}
    case $rel in
        bin/vhost-tmem|share/bash-completion/completions/vhost-tmem|share/zsh/site-functions/_vhost-tmem|share/fish/vendor_completions.d/vhost-tmem.fish) ;;
        share/man/man1/vhost-tmem*.1)
            grep -q '^\.TH ' "$f" || fail "$rel is not a man page"
            [ "$(stat -c %a "$f")" = 644 ] || fail "$rel is not mode 644"
            ;;
        *) fail "unexpected file $f" ;;
    esac
done < <(find "$root" -type f)
# One page per ctl action the binary knows.
for action in $("$root$prefix/bin/vhost-tmem" ctl --help | awk '/^Commands:/ {on=1; next} on && /^  [a-z]/ {print $1} on && /^$/ {exit}'); do
    [ "$action" = help ] && continue
    [ -f "$root$prefix/share/man/man1/vhost-tmem-ctl-$action.1" ] || fail "no man page for ctl $action"
done
echo "install-check: $(find "$root" -type f | wc -l) files installed as expected"
