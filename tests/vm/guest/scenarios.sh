#!/bin/sh
# Guest side of the VM scenarios, run by /init with SCENARIO set. Prints one line
# `guest-result NAME: pass` or `guest-result NAME: FAIL (why)`, and the driver's counters as a
# `guest-stats` line that the host runner compares with the daemon's statistics: scenarios print
# it after swapoff, so that no later swap-in (of this shell, say) changes the counts.
T=/sys/kernel/debug/tmem
SWAP=/dev/vda

stat_of() { cat "$T/$1" 2>/dev/null || echo 0; }
stats() {
	if [ ! -d $T ]; then
		echo "guest-stats module=absent"
		return
	fi
	line="guest-stats"
	for f in puts puts_refused gets hits misses failures flushes batches pools; do
		line="$line $f=$(stat_of $f)"
	done
	echo "$line"
}
fail() {
	stats
	echo "guest-result $SCENARIO: FAIL ($*)"
	exit 1
}
pass() { echo "guest-result $SCENARIO: pass"; }
swap_on() {
	mkswap $SWAP >/dev/null || fail "mkswap $SWAP"
	swapon $SWAP || fail "swapon $SWAP"
}
load() {
	insmod /lib/modules/tmem.ko || fail "insmod tmem.ko"
	[ -d $T ] || fail "no $T after insmod (device not bound?)"
}
wait_file() {
	i=0
	while [ ! -e "$1" ]; do
		sleep 1
		i=$((i + 1))
		[ $i -lt 900 ] || fail "timed out waiting for $1"
	done
}
swap_used_kb() { awk 'NR > 1 { used += $4 } END { print used + 0 }' /proc/swaps; }
at_least() { [ "$(stat_of "$1")" -ge "$2" ] || fail "$1 is $(stat_of "$1"), expected at least $2"; }
none_of() { [ "$(stat_of "$1")" -eq 0 ] || fail "$1 is $(stat_of "$1"), expected 0"; }

case "$SCENARIO" in
swap-integrity)
	# About twice the guest's RAM, every page verified twice (forwards, then backwards), plus
	# tmpfs (shmem) data and a program in tmpfs, whose code pages come back through tmem too.
	load
	swap_on
	dd if=/dev/urandom of=/tmp/random bs=1M count=24 2>/dev/null || fail "dd"
	cp /bin/busybox /tmp/busybox-copy
	md5sum /tmp/random /tmp/busybox-copy >/tmp/sums
	memtouch run 256 1 || fail "workload pages did not verify"
	md5sum -c /tmp/sums >/dev/null || fail "tmpfs files changed across swap"
	/tmp/busybox-copy true || fail "a program in tmpfs does not run after swap"
	swapoff $SWAP || fail "swapoff"
	md5sum -c /tmp/sums >/dev/null || fail "tmpfs files changed across swapoff"
	none_of failures
	none_of pools
	at_least puts 1000
	at_least hits 1000
	stats
	pass
	;;
swap-lazy-register)
	swap_on
	memtouch hold 64 2 &
	HOLD=$!
	wait_file /tmp/hold.2
	memtouch run 160 3 || fail "workload before insmod did not verify"
	[ "$(swap_used_kb)" -gt 0 ] || fail "nothing was swapped out before insmod"
	load
	dmesg | grep -q "tmem: backend registered, 1 swap area(s) already enabled" ||
		fail "the swap area enabled before insmod was not replayed at registration"
	at_least pools 1
	memtouch run 192 4 || fail "workload after insmod did not verify"
	at_least puts 1000
	at_least hits 1000
	kill -USR1 $HOLD
	wait $HOLD || fail "pages swapped out before insmod did not verify"
	swapoff $SWAP || fail "swapoff"
	none_of failures
	stats
	pass
	;;
swap-unload)
	load
	swap_on
	memtouch hold 64 5 &
	HOLD=$!
	wait_file /tmp/hold.5
	memtouch run 160 6 || fail "pressure workload did not verify"
	refs=$(cat /sys/module/tmem/refcnt)
	[ "$refs" -gt 0 ] || fail "no page of the held workload is in tmem"
	if rmmod tmem 2>/dev/null; then
		fail "rmmod succeeded with $refs pages stored"
	fi
	echo "swap-unload: rmmod refused with $refs pages stored"
	swapoff $SWAP || fail "swapoff"
	refs=$(cat /sys/module/tmem/refcnt)
	[ "$refs" -eq 0 ] || fail "$refs pages still stored after swapoff"
	none_of pools
	none_of failures
	stats
	rmmod tmem || fail "rmmod after swapoff"
	[ ! -d /sys/module/tmem ] || fail "tmem still loaded after rmmod"
	kill -USR1 $HOLD
	wait $HOLD || fail "held pages did not verify after swapoff and rmmod"
	pass
	;;
swap-host-full)
	# The daemon runs with a tiny memory limit: refused puts go to the swap device.
	load
	swap_on
	# Every page verifies although some puts were refused: those pages went to /dev/vda.
	memtouch run 256 7 || fail "workload pages did not verify"
	swapoff $SWAP || fail "swapoff"
	at_least puts_refused 1
	at_least hits 1
	none_of failures
	stats
	pass
	;;
demo)
	load
	swap_on
	echo "demo: 128 MiB guest, 256 MiB workload (zero, same-filled, text, binary, random pages)"
	memtouch run 256 11 || fail "workload pages did not verify"
	# Nothing can swap after this, so both sides' counters are final.
	swapoff $SWAP || fail "swapoff"
	stats
	pass
	;;
boot-probe)
	pass
	;;
*)
	echo "guest-result ${SCENARIO:-none}: FAIL (unknown scenario)"
	;;
esac
