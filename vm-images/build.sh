#!/usr/bin/env bash
# Builds everything a test guest needs: QEMU with the vhost-user test device patch, the
# patched Linux 6.12 guest kernel, the tmem.ko Rust module and the initramfs.
#
#   vm-images/build.sh [deps|qemu|kernel|module|initramfs|all]...   (default: all)
#
# With KASAN=1 the kernel gets vm-images/kasan.config on top and is built with clang (Rust
# code under KASAN needs a clang-built kernel); its kernel, module and initramfs are cached
# beside the plain ones (names prefixed kasan-) and named in target/vm/images-kasan.env, with
# the extra guest RAM the KASAN kernel needs, for `make vm-test-kasan`.
#
# Heavy artifacts live in $VHOST_TMEM_CACHE (default ~/.cache/vhost-tmem), each in a directory
# named after a hash of all its inputs, so a rebuild happens only when an input changes and a
# fresh clone on the same machine reuses them. The paths of the current artifacts are written
# to target/vm/images.env for the test runner and `make demo`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VM=$ROOT/vm-images
CACHE=${VHOST_TMEM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vhost-tmem}
OUT=$ROOT/target/vm
JOBS=${JOBS:-$(nproc)}
mkdir -p "$CACHE" "$OUT"

# Pinned inputs. QEMU comes from Debian's source package of this version (sid carries it);
# the newest >= 10.2 is used only if the pin has left the archive.
QEMU_VERSION=${QEMU_VERSION:-1:10.2.2+ds-1}
BINDGEN_VERSION=0.73.2
MESON_VERSION=1.9.0
# Bump a step's recipe number when its commands change in a way that changes its output: the
# number is part of the step's cache key (the script itself is not, so editing other steps does
# not rebuild QEMU or the kernel).
QEMU_RECIPE=1
KERNEL_RECIPE=2
INITRAMFS_RECIPE=1

KASAN=${KASAN:-0}
if [ "$KASAN" = 1 ]; then
    FRAGMENTS=("$VM/guest.config" "$VM/kasan.config")
    VARIANT=kasan-
    LLVM_ARGS=(LLVM=-14)
    ENV_FILE=images-kasan.env
    # The shadow (1/8 of RAM) and the stack depot's 16 MiB hash table: MemTotal of a
    # 128 MiB KASAN guest is 46 MiB, of a plain one 103 MiB.
    GUEST_EXTRA_MIB=72
else
    FRAGMENTS=("$VM/guest.config")
    VARIANT=
    LLVM_ARGS=()
    ENV_FILE=images.env
    GUEST_EXTRA_MIB=0
fi

T0=$(date +%s)
step() { printf '[vm-images %4ds] %s\n' "$(($(date +%s) - T0))" "$*"; }
die() { printf 'vm-images: error: %s\n' "$*" >&2; exit 1; }
sudo_cmd() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# key NAME FILE... : prints NAME-<hash of the files' contents and of the extra words in $KEY_EXTRA>
key() {
    local name=$1; shift
    { printf '%s\n' "${KEY_EXTRA:-}"; cat "$@"; } | sha256sum | cut -c1-16 | sed "s/^/$name-/"
}

# prune DIR PREFIX KEEP: removes older builds DIR/PREFIX-* (and leftovers of failed ones) other
# than KEEP, so the cache holds one build per step.
prune() {
    local dir=$1 prefix=$2 keep=$3 p
    for p in "$dir/$prefix"-*; do
        [ -e "$p" ] || continue
        case $(basename "$p") in "$keep" | "$keep".cpio.gz) continue ;; esac
        rm -rf "$p"
    done
}

# Runs "$@" with output to LOG; on failure shows the log's tail and names the step.
run_logged() {
    local what=$1 log=$2; shift 2
    if ! "$@" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "$what failed (full log: $log)"
    fi
}

APT_PKGS=(
    # kernel
    linux-source-6.12 bc flex bison libelf-dev libssl-dev xz-utils cpio
    # Rust for Linux: Debian's rustc 1.96 with its standard library source, libclang for bindgen
    rustc-web rust-web-src libclang-dev
    # QEMU from source
    dpkg-dev ninja-build libglib2.0-dev libpixman-1-dev python3-venv libfdt-dev pkg-config
    # firmware for the QEMU we build, the guest's userland
    seabios qemu-system-data busybox-static gcc libc6-dev
    # the ext4 disks of the page-cache scenarios (mkfs.ext4)
    e2fsprogs
)

do_deps() {
    local missing=() p
    [ "$KASAN" != 1 ] || APT_PKGS+=(clang-14 lld-14 llvm-14)
    for p in "${APT_PKGS[@]}"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        step "apt-get install ${missing[*]}"
        sudo_cmd apt-get update -qq
        if ! DEBIAN_FRONTEND=noninteractive sudo_cmd apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >"$OUT/apt.log" 2>&1; then
            tail -n 20 "$OUT/apt.log" >&2
            die "apt-get could not install: ${missing[*]}"
        fi
    fi
    [ -f /usr/src/linux-source-6.12.tar.xz ] || die "linux-source-6.12 did not install /usr/src/linux-source-6.12.tar.xz"
    /usr/bin/rustc --version | grep -q '^rustc 1\.9[6-9]' ||
        die "the kernel needs Debian's rustc-web 1.96 as /usr/bin/rustc; found: $(/usr/bin/rustc --version 2>&1)"
    [ -d /usr/lib/rustlib/src/rust/library/core ] || die "rust-web-src is missing (no /usr/lib/rustlib/src/rust/library)"

    BINDGEN_DIR=$CACHE/tools/bindgen-$BINDGEN_VERSION
    if [ ! -x "$BINDGEN_DIR/bin/bindgen" ]; then
        step "cargo install bindgen-cli $BINDGEN_VERSION"
        run_logged "cargo install bindgen-cli" "$OUT/bindgen-install.log" \
            cargo install bindgen-cli --version "$BINDGEN_VERSION" --locked --root "$BINDGEN_DIR"
    fi
    BINDGEN=$BINDGEN_DIR/bin/bindgen

    MESON_DIR=$CACHE/tools/meson-$MESON_VERSION
    if [ ! -x "$MESON_DIR/bin/meson" ]; then
        step "pip install meson $MESON_VERSION (venv)"
        rm -rf "$MESON_DIR"
        run_logged "python3 -m venv" "$OUT/meson-install.log" python3 -m venv "$MESON_DIR"
        run_logged "pip install meson" "$OUT/meson-install.log" \
            "$MESON_DIR/bin/pip" install -q "meson==$MESON_VERSION" pycotap==1.3.1
    fi
    step "deps ready: $(/usr/bin/rustc --version | cut -d' ' -f1-2), bindgen $BINDGEN_VERSION, meson $MESON_VERSION"
}

# ---------------------------------------------------------------------------------------- QEMU

# A QEMU on PATH is used only if a probe shows that it carries what vm-images/patches/qemu/
# adds: the device's migratable property (0003), and a realize that waits for its back-end and
# retries a failed connection (0002: a back-end that hangs up on every connection makes it say
# "Reconnecting after error" before it gives up), which comes after virtio_init() (where stock
# 10.2 asserts on virtio-id 63; 0001).
system_qemu_ok() {
    local q dir out rc=0 lpid i
    q=$(command -v qemu-system-x86_64) || return 1
    "$q" -device vhost-user-test-device-pci,help 2>/dev/null | grep -q 'migratable=' || return 1
    dir=$(mktemp -d)
    python3 -c 'import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(8)
s.settimeout(60)
while True:
    s.accept()[0].close()' "$dir/sock" 2>/dev/null &
    lpid=$!
    for i in $(seq 50); do [ -S "$dir/sock" ] && break; sleep 0.1; done
    out=$(timeout 60 "$q" -nodefaults -display none -S -machine pc \
        -L /usr/share/seabios -L /usr/share/qemu \
        -chardev socket,id=c,path="$dir/sock",reconnect-ms=100 \
        -device vhost-user-test-device-pci,chardev=c,virtio-id=63 2>&1) || rc=$?
    kill "$lpid" 2>/dev/null
    wait "$lpid" 2>/dev/null
    rm -rf "$dir"
    [ "$rc" -ne 134 ] && [ "$rc" -ne 124 ] && ! grep -qiE 'assert|abort' <<<"$out" &&
        grep -q 'Reconnecting after error' <<<"$out"
}

do_qemu() {
    if [ "${VHOST_TMEM_SYSTEM_QEMU:-1}" = 1 ] && system_qemu_ok; then
        QEMU=$(command -v qemu-system-x86_64)
        QEMU_KEY=system
        step "qemu: the system's QEMU has what vm-images/patches/qemu adds, using $QEMU"
        return
    fi
    local apt=$CACHE/apt-sid-src
    local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o APT::Sandbox::User=root)
    local version=$QEMU_VERSION
    KEY_EXTRA="qemu $version x86_64-softmmu recipe $QEMU_RECIPE"
    QEMU_KEY=$(key qemu "$VM"/patches/qemu/*.patch)
    local dir=$CACHE/$QEMU_KEY
    QEMU=$dir/bin/qemu-system-x86_64
    if [ -x "$QEMU" ]; then
        step "qemu: cached $QEMU_KEY"
        return
    fi
    step "qemu: fetching Debian source qemu=$version (private apt configuration, system sources untouched)"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
    echo 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main' \
        >"$apt/sources.list"
    run_logged "apt-get update (private sid deb-src list)" "$OUT/qemu-fetch.log" apt-get "${opts[@]}" update
    local work=$CACHE/tmp-qemu-$$
    rm -rf "$work" && mkdir -p "$work"
    if ! (cd "$work" && apt-get "${opts[@]}" source --download-only "qemu=$version") >>"$OUT/qemu-fetch.log" 2>&1; then
        # The pin left sid: take the newest version there, which must still be >= 10.2.
        version=$(apt-cache "${opts[@]}" showsrc qemu | sed -n 's/^Version: //p' | sort -V | tail -n1)
        dpkg --compare-versions "$version" ge 1:10.2 || die "no QEMU >= 10.2 source in Debian sid (newest: $version)"
        step "qemu: $QEMU_VERSION is gone from sid, using $version"
        run_logged "apt-get source qemu=$version" "$OUT/qemu-fetch.log" \
            bash -c "cd '$work' && apt-get ${opts[*]} source --download-only 'qemu=$version'"
    fi
    step "qemu: unpacking $(cd "$work" && ls qemu_*.dsc)"
    run_logged "dpkg-source -x" "$OUT/qemu-build.log" bash -c "cd '$work' && dpkg-source -x qemu_*.dsc src"
    local p
    for p in "$VM"/patches/qemu/*.patch; do
        run_logged "applying $(basename "$p")" "$OUT/qemu-build.log" patch -d "$work/src" -p1 -i "$p"
    done
    step "qemu: configure (x86_64-softmmu, tcg, kvm, vhost-user)"
    run_logged "qemu configure" "$OUT/qemu-build.log" bash -c "cd '$work/src' && PATH='$MESON_DIR/bin':\$PATH \
        ./configure --prefix='$dir' --target-list=x86_64-softmmu --python='$MESON_DIR/bin/python3' \
        --disable-docs --disable-tools --without-default-features --enable-tcg --enable-kvm \
        --enable-vhost-user --enable-vhost-kernel --enable-fdt=system --disable-install-blobs \
        --disable-werror"
    step "qemu: make -j$JOBS (about 4 minutes on 2 cores)"
    run_logged "qemu build" "$OUT/qemu-build.log" make -C "$work/src" -j"$JOBS"
    mkdir -p "$dir.tmp/bin"
    cp "$work/src/build/qemu-system-x86_64" "$dir.tmp/bin/"
    printf '%s\n' "$version" >"$dir.tmp/VERSION"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
    rm -rf "$work"
    prune "$CACHE" qemu "$QEMU_KEY"
    prune "$CACHE" tmp-qemu ""
    step "qemu: built $QEMU ($version)"
}

# -------------------------------------------------------------------------------------- kernel

kernel_version() {
    dpkg-query -W -f '${Version}' linux-source-6.12
}

# kernel_configure TREE MAKE...: tinyconfig + vm-images/guest.config in TREE, which MAKE builds.
kernel_configure() {
    local work=$1 log=$OUT/kernel-build.log
    shift
    step "kernel: tinyconfig + ${FRAGMENTS[*]#"$ROOT"/}"
    run_logged "make tinyconfig" "$log" "$@" tinyconfig
    run_logged "merge_config.sh" "$log" \
        bash -c "cd '$work' && scripts/kconfig/merge_config.sh -m .config ${FRAGMENTS[*]}"
    run_logged "make olddefconfig" "$log" "$@" olddefconfig
    run_logged "make rustavailable" "$log" "$@" rustavailable
    kernel_config_check "$work"
}

# Every option of the fragment must have survived olddefconfig (a dependency that is not met
# drops an option silently).
kernel_config_check() {
    local config=$1/.config line opt
    while read -r line; do
        case $line in CONFIG_*=*) ;; *) continue ;; esac
        opt=${line%%=*}
        if [ "${line#*=}" = n ]; then
            ! grep -q "^$opt=" "$config" || die "kernel config: $opt is set but the fragment disables it"
        else
            grep -qx "$line" "$config" || die "kernel config: $line did not survive olddefconfig (unmet dependency?)"
        fi
    done < <(cat "${FRAGMENTS[@]}")
}

do_kernel() {
    local kver
    kver=$(kernel_version)
    KEY_EXTRA="linux-source-6.12 $kver $(/usr/bin/rustc --version) bindgen $BINDGEN_VERSION recipe $KERNEL_RECIPE"
    [ "$KASAN" != 1 ] || KEY_EXTRA+=" $(clang-14 --version | head -n1)"
    KERNEL_KEY=$(key "${VARIANT}linux" "$VM"/patches/linux/*.patch "${FRAGMENTS[@]}")
    KDIR=$CACHE/$KERNEL_KEY
    if [ -f "$KDIR/arch/x86/boot/bzImage" ] && [ -f "$KDIR/.built" ]; then
        step "kernel: cached $KERNEL_KEY (linux-source-6.12 $kver)"
        return
    fi
    local work=$KDIR.tmp
    rm -rf "$work" && mkdir -p "$work"
    step "kernel: unpacking linux-source-6.12 $kver"
    tar -C "$work" --strip-components=1 -xf /usr/src/linux-source-6.12.tar.xz
    local mk=(make -C "$work" -j"$JOBS" "${LLVM_ARGS[@]}" RUSTC=/usr/bin/rustc BINDGEN="$BINDGEN" HOSTRUSTC=/usr/bin/rustc)
    local log=$OUT/kernel-build.log
    # The patches form a series: each must apply and build on the ones before it. The kernel is
    # configured once the first is applied (it adds CONFIG_TMEM, which guest.config enables);
    # after each patch but the last, the C files it touches are compiled (kernel warnings are
    # errors for them), and after the last the whole kernel is built and linked.
    local patches=("$VM"/patches/linux/*.patch) p name objs i
    for i in "${!patches[@]}"; do
        p=${patches[$i]}
        name=$(basename "$p")
        step "kernel: applying $name"
        run_logged "applying $name" "$log" patch -d "$work" -p1 -i "$p"
        if [ "$i" -eq 0 ]; then
            kernel_configure "$work" "${mk[@]}"
        elif grep -q '^+++ b/.*Kconfig' "$p"; then
            run_logged "make olddefconfig after $name" "$log" "${mk[@]}" olddefconfig
            kernel_config_check "$work"
        fi
        [ "$i" -lt $((${#patches[@]} - 1)) ] || break
        # rust/helpers/*.c are compiled as part of rust/helpers/helpers.o.
        objs=$(sed -n 's|^+++ b/\(.*\)\.c$|\1.o|p' "$p" | sed 's|^rust/helpers/.*|rust/helpers/helpers.o|' | sort -u)
        [ -n "$objs" ] || continue
        step "kernel: building what $name touches: $(echo $objs)"
        run_logged "building $name ($(echo $objs))" "$log" "${mk[@]}" $objs
        if grep -E 'warning:' "$log"; then
            die "$name builds with warnings (see $log)"
        fi
    done
    step "kernel: make -j$JOBS bzImage modules (about 5 minutes on 2 cores)"
    run_logged "building $name (bzImage modules)" "$log" "${mk[@]}" bzImage modules
    # Our own C and Rust glue must build without a warning.
    if grep -E '^(mm/tmem|rust/helpers/virtio|include/linux/tmem).*warning' "$log"; then
        die "the tmem patches build with warnings (see $log)"
    fi
    touch "$work/.built"
    rm -rf "$KDIR" && mv "$work" "$KDIR"
    prune "$CACHE" "${VARIANT}linux" "$KERNEL_KEY"
    step "kernel: built $KDIR/arch/x86/boot/bzImage"
}

# -------------------------------------------------------------------------------------- module

do_module() {
    KEY_EXTRA="$KERNEL_KEY"
    MODULE_KEY=$(key "${VARIANT}tmem-ko" "$ROOT"/guest-driver/*.rs "$ROOT/guest-driver/Kbuild" \
        "$ROOT/shared-proto/src/wire.rs")
    local dir=$CACHE/modules/$MODULE_KEY
    MODULE=$dir/tmem.ko
    if [ -f "$MODULE" ]; then
        step "module: cached $MODULE_KEY"
        return
    fi
    step "module: building tmem.ko against $KERNEL_KEY"
    local work=$dir.tmp
    rm -rf "$work" && mkdir -p "$work/guest-driver" "$work/shared-proto/src"
    cp "$ROOT"/guest-driver/*.rs "$ROOT/guest-driver/Kbuild" "$work/guest-driver/"
    cp "$ROOT/shared-proto/src/wire.rs" "$work/shared-proto/src/"
    run_logged "tmem.ko build" "$OUT/module-build.log" make -C "$KDIR" "${LLVM_ARGS[@]}" M="$work/guest-driver" \
        RUSTC=/usr/bin/rustc BINDGEN="$BINDGEN" modules
    if grep -E '^(warning|error)' "$OUT/module-build.log"; then
        die "tmem.ko built with warnings (see $OUT/module-build.log)"
    fi
    mkdir -p "$dir"
    cp "$work/guest-driver/tmem.ko" "$MODULE"
    rm -rf "$work"
    prune "$CACHE/modules" "${VARIANT}tmem-ko" "$MODULE_KEY"
    step "module: built $MODULE"
}

# ----------------------------------------------------------------------------------- initramfs

do_initramfs() {
    local bb
    bb=$(dpkg -L busybox-static 2>/dev/null | grep 'bin/busybox$' | head -n1)
    [ -n "$bb" ] && [ -x "$bb" ] || die "busybox-static is not installed"
    KEY_EXTRA="$MODULE_KEY busybox $(dpkg-query -W -f '${Version}' busybox-static) $(gcc --version | head -n1) recipe $INITRAMFS_RECIPE"
    INITRAMFS_KEY=$(key "${VARIANT}initramfs" "$ROOT"/tests/vmtest/guest/*)
    INITRAMFS=$CACHE/initramfs/$INITRAMFS_KEY.cpio.gz
    if [ -f "$INITRAMFS" ]; then
        step "initramfs: cached $INITRAMFS_KEY"
        return
    fi
    step "initramfs: busybox-static, tmem.ko, memtouch, labload, scenario scripts"
    local work=$CACHE/initramfs/$INITRAMFS_KEY.tmp
    rm -rf "$work" && mkdir -p "$work"/{bin,sbin,dev,proc,sys,tmp,mnt,lib/modules,etc}
    cp "$bb" "$work/bin/busybox"
    local applet
    for applet in $("$work/bin/busybox" --list); do
        [ -e "$work/bin/$applet" ] || ln -s busybox "$work/bin/$applet"
    done
    run_logged "memtouch build" "$OUT/initramfs-build.log" \
        gcc -O2 -static -Wall -Wextra -Werror -o "$work/bin/memtouch" "$ROOT/tests/vmtest/guest/memtouch.c"
    run_logged "labload build" "$OUT/initramfs-build.log" \
        gcc -O2 -static -Wall -Wextra -Werror -o "$work/bin/labload" "$ROOT/tests/vmtest/guest/labload.c" -lm
    install -m 0755 "$ROOT/tests/vmtest/guest/init" "$work/init"
    install -m 0755 "$ROOT/tests/vmtest/guest/scenarios.sh" "$work/bin/scenarios.sh"
    install -m 0755 "$ROOT/tests/vmtest/guest/lab.sh" "$work/bin/lab.sh"
    cp "$MODULE" "$work/lib/modules/tmem.ko"
    (cd "$work" && find . -print0 | cpio --null -o -H newc --quiet | gzip -9) >"$INITRAMFS.tmp"
    mv "$INITRAMFS.tmp" "$INITRAMFS"
    rm -rf "$work"
    prune "$CACHE/initramfs" "${VARIANT}initramfs" "$INITRAMFS_KEY"
    step "initramfs: built $INITRAMFS"
}

write_env() {
    cat >"$OUT/$ENV_FILE" <<EOF
QEMU=$QEMU
KERNEL=$KDIR/arch/x86/boot/bzImage
KDIR=$KDIR
MODULE=$MODULE
INITRAMFS=$INITRAMFS
FIRMWARE=/usr/share/seabios:/usr/share/qemu
KERNEL_SOURCE_VERSION=$(kernel_version)
GUEST_EXTRA_MIB=$GUEST_EXTRA_MIB
EOF
    step "images ready: $OUT/$ENV_FILE"
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(all)
for s in "${steps[@]}"; do
    case $s in
    deps) do_deps ;;
    qemu) do_deps && do_qemu ;;
    kernel) do_deps && do_kernel ;;
    module) do_deps && do_kernel && do_module ;;
    initramfs | all) do_deps && do_qemu && do_kernel && do_module && do_initramfs && write_env ;;
    *) die "unknown step '$s' (steps: deps qemu kernel module initramfs all)" ;;
    esac
done
