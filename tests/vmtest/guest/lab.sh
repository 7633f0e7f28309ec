#!/bin/sh
# Guest side of the overcommit lab (vhost-tmem-lab, lab/): sets up the mode's swap, then runs
# the workload (labload), whose sampler reports on the second serial port. The kernel command
# line says what to do: lab.mode=disk|zswap|zram|tmem, lab.share_mib (this guest's share of
# the host budget: zswap's pool limit, zram's size), lab.args (labload's KEY=VALUE pairs,
# comma-separated). Prints `guest-result lab: pass` or `guest-result lab: FAIL (why)`.
SWAP=/dev/vda
DATA=/dev/vdb
arg() { sed -n "s/.*lab\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
MODE=$(arg mode)
SHARE=$(arg share_mib)
ARGS=$(arg args | tr , ' ')
fail() {
	echo "guest-result lab: FAIL ($*)"
	exit 1
}
ram_mib=$(($(awk '$1 == "MemTotal:" { print $2 }' /proc/meminfo) / 1024))
echo "lab: mode $MODE, share ${SHARE} MiB of ${ram_mib} MiB, workload: $ARGS"
Z=/sys/module/zswap/parameters
echo 0 >$Z/enabled
case "$MODE" in
disk) ;;
zswap)
	# The pool limit is a share of this guest's RAM: the guest got its share of the budget as
	# RAM, which the pool may fill.
	echo lz4 >$Z/compressor || fail "zswap lz4"
	echo zsmalloc >$Z/zpool 2>/dev/null
	echo $((SHARE * 100 / ram_mib)) >$Z/max_pool_percent || fail "zswap pool percent"
	echo 1 >$Z/enabled || fail "enabling zswap"
	echo "lab: zswap $(cat $Z/compressor)/$(cat $Z/zpool), max_pool_percent $(cat $Z/max_pool_percent)"
	;;
zram)
	# zram first (the first swapon gets the higher priority), the disk when zram is full.
	echo lz4 >/sys/block/zram0/comp_algorithm || fail "zram lz4"
	echo "${SHARE}M" >/sys/block/zram0/disksize || fail "zram disksize"
	mkswap /dev/zram0 >/dev/null || fail "mkswap zram0"
	swapon /dev/zram0 || fail "swapon zram0"
	;;
tmem)
	insmod /lib/modules/tmem.ko || fail "insmod tmem.ko"
	;;
*) fail "unknown mode '$MODE'" ;;
esac
mkswap $SWAP >/dev/null || fail "mkswap $SWAP"
swapon $SWAP || fail "swapon $SWAP"
case "$ARGS" in
*workload=file* | *workload=mixed*)
	mount -t ext4 $DATA /mnt || fail "mount $DATA"
	;;
esac
# shellcheck disable=SC2086 # ARGS is a list of words
labload run $ARGS drop_cache=1 || fail "the workload's data did not verify or it could not run"
echo "guest-result lab: pass"
