#!/bin/sh
# Guest side of the VM scenarios, run by /init with SCENARIO set. Prints one line
# `guest-result NAME: pass` or `guest-result NAME: FAIL (why)`, and the driver's counters as a
# `guest-stats` line that the host runner compares with the daemon's statistics: scenarios print
# it after swapoff, so that no later swap-in (of this shell, say) changes the counts.
# Page-cache scenarios print it after umount, for the same reason.
#
# Disks: /dev/vda is swap, /dev/vdb an ext4 data disk, /dev/vdc a second ext4 disk (shared
# between the two guests in two-guests). Guests of two-guest scenarios have a role (a or b)
# and meet at barriers: `sync_point NAME` prints `guest-sync NAME` and waits until the runner,
# once every guest got there, writes NAME back on the second serial port.
T=/sys/kernel/debug/tmem
SWAP=/dev/vda
DATA=/dev/vdb
DISK2=/dev/vdc
COUNTERS="puts puts_refused gets hits misses cache_puts cache_puts_refused cache_gets cache_hits
cache_misses cache_invalidations failures flushes batches pools cache_pools cache_pool_resets
recoveries shrink_writebacks shrink_refused sleeps"
# Counters of module instances unloaded earlier in the run (the daemon's counters go on).
SAVED=/tmp/saved-stats

# The test kernel's THP default is "always": an anonymous workload then gets huge pages when
# memory is not yet fragmented, and a huge page is swapped out whole, past tmem (which stores
# order-0 pages), so whether a swap-out reaches the device at all would depend on the run
# (device-loss once saw none after the daemon died). Scenarios get order-0 pages: "madvise",
# and only thp-swap's workload asks for huge pages.
echo madvise >/sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null

stat_of() { cat "$T/$1" 2>/dev/null || echo 0; }
saved_of() { sed -n "s/^$1=//p" $SAVED 2>/dev/null | grep . || echo 0; }
stats() {
	if [ ! -d $T ] && [ ! -f $SAVED ]; then
		echo "guest-stats module=absent"
		return
	fi
	line="guest-stats"
	for f in $COUNTERS; do
		line="$line $f=$(($(stat_of $f) + $(saved_of $f)))"
	done
	echo "$line"
}
# Before rmmod: keep the counters of this module instance.
save_stats() {
	for f in $COUNTERS; do
		echo "$f=$(($(stat_of $f) + $(saved_of $f)))"
	done >$SAVED.new
	mv $SAVED.new $SAVED
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
# hold_out MIB SEED RUN_MIB WHEN: a process (its pid in HOLD) fills MIB of memory from SEED and
# waits for SIGUSR1 to verify it; a RUN_MIB workload (seed SEED + 1) then pushes its pages out
# to swap. WHEN says when, in the failure message.
hold_out() {
	memtouch hold "$1" "$2" &
	HOLD=$!
	wait_file "/tmp/hold.$2" $HOLD
	memtouch run "$3" $(($2 + 1)) || fail "workload $4 did not verify"
}
# held_back BEFORE AFTER: the hold_out process verifies its pages, at least one of which must
# come back from tmem; sets hits to the hit count before it.
held_back() {
	hits=$(stat_of hits)
	kill -USR1 $HOLD
	wait $HOLD || fail "pages stored $1 did not verify"
	[ "$(stat_of hits)" -gt "$hits" ] || fail "no page came back from tmem $2"
}
# wait_file FILE [PID]: waits for FILE, which process PID (if given) creates.
wait_file() {
	i=0
	while [ ! -e "$1" ]; do
		[ -z "$2" ] || kill -0 "$2" 2>/dev/null || fail "process $2 ended before it made $1"
		sleep 1
		i=$((i + 1))
		[ $i -lt 900 ] || fail "timed out waiting for $1"
	done
}
drop_cache() {
	sync
	echo 1 >/proc/sys/vm/drop_caches
}
mount_data() { mount -t ext4 "$@" || fail "mount $*"; }
# The barrier port (ttyS1) on fd 3, for sync_point; the runner's answers are not echoed back.
open_control() {
	exec 3</dev/ttyS1
	stty -F /dev/ttyS1 -echo
}
sync_point() {
	echo "guest-sync $1"
	# Empty lines are the runner's wake bytes (see suspend-resume).
	line=
	while [ -z "$line" ]; do
		read -r line <&3 || fail "sync $1: control port closed"
	done
	[ "$line" = "$1" ] || fail "sync $1: runner said '$line'"
}
# Pages of a file of MIB mebibytes.
pages_of() { echo $(($1 * 256)); }
# cache_hits gained while running a command: CMD... ; sets HITS.
count_hits() {
	h0=$(stat_of cache_hits)
	"$@" || fail "$* did not verify"
	HITS=$(($(stat_of cache_hits) - h0))
	echo "$SCENARIO: $HITS page-cache hits during: $*"
}
# Pages offered to zswap so far: stored (zswpout) or rejected (pool full, incompressible, ...).
zswap_tried() {
	n=$(awk '$1 == "zswpout" { print $2 }' /proc/vmstat)
	for f in /sys/kernel/debug/zswap/pool_limit_hit /sys/kernel/debug/zswap/reject_*; do
		n=$((n + $(cat "$f")))
	done
	echo "$n"
}
# zswap's own counters on one line: why it took or refused pages.
zswap_counters() {
	line="zswap:"
	for f in /sys/kernel/debug/zswap/*; do
		line="$line $(basename "$f")=$(cat "$f")"
	done
	echo "$line"
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
	# What the host keeps once the workload is gone (the core holds a module reference per
	# stored page; the runner prints the daemon's count at the barrier): pages read back into
	# the swap cache are dropped by exclusive loads.
	echo "swap-integrity: $(cat /sys/module/tmem/refcnt) pages stored in the host before swapoff"
	open_control
	sync_point held
	swapoff $SWAP || fail "swapoff"
	md5sum -c /tmp/sums >/dev/null || fail "tmpfs files changed across swapoff"
	none_of failures
	none_of pools
	at_least puts 1000
	at_least hits 1000
	stats
	pass
	;;
device-loss)
	# The daemon is killed (SIGKILL, at the barrier) mid-swap. At the kill it holds the pages
	# of a victim, which pushed all of them out (MADV_PAGEOUT: its pages and nobody else's, so
	# this shell keeps its own) and sleeps, and of a churner, which pages out, reads back and
	# rewrites its pages round after round. A bystander's pages are in RAM. The next request
	# is never answered: the driver gives up after timeout_ms, breaks the device and fails
	# every later request at once. The victim dies of SIGBUS on its first lost page, the
	# churner finishes or dies the same way (whether its pages were out at the kill is a
	# matter of timing), the bystander finishes, swap-outs go to the swap device, and the guest
	# never stops (the heartbeat on the console; the runner checks it goes on after the break).
	load
	echo 2000 >/sys/module/tmem/parameters/timeout_ms || fail "setting timeout_ms"
	[ "$(cat /sys/module/tmem/parameters/timeout_ms)" = 2000 ] || fail "timeout_ms does not read back"
	swap_on
	at_least pools 1
	open_control
	(while :; do
		echo "device-loss: heartbeat $(cut -d' ' -f1 /proc/uptime)"
		sleep 1
	done) &
	BEAT=$!
	MEMTOUCH_PAGEOUT=1 memtouch hold 16 30 &
	VICTIM=$!
	wait_file /tmp/hold.30 $VICTIM
	at_least puts 2000
	memtouch hold 8 31 &
	BYSTANDER=$!
	wait_file /tmp/hold.31 $BYSTANDER
	memtouch churn 8 32 &
	CHURN=$!
	wait_file /tmp/churn.32 $CHURN
	echo "device-loss: $(cat /sys/module/tmem/refcnt) pages in the host before the kill"
	sync_point kill
	kill -USR1 $VICTIM
	wait $VICTIM
	st=$?
	# 128 + SIGBUS (7): the page-in failed, the kernel did not hand out a page it does not have.
	[ $st -eq 135 ] || fail "the process whose pages died with the host exited with $st, not SIGBUS"
	echo "device-loss: the victim died of SIGBUS"
	kill -USR1 $CHURN
	wait $CHURN
	st=$?
	case $st in
	0) echo "device-loss: the churner verified every page (none was in the host at the kill)" ;;
	135) echo "device-loss: the churner died of SIGBUS" ;;
	*) fail "the churner exited with $st (1: a page read back wrong)" ;;
	esac
	# The first swap-out waits at most timeout_ms for an answer, or finds the ring broken by
	# QEMU (which fails to stop the vhost-user device when the daemon is gone) if QEMU got
	# there first: either way the device breaks once, and every later request fails at once (a
	# wait per page would not finish in the runner's time).
	memtouch run 160 33 || fail "workload after the daemon died did not verify"
	dmesg | grep -E -q "tmem: device broken: (.* not answered in 2000 ms|the virtqueue broke)" ||
		fail "the kernel log does not say the device broke"
	# (Not the kernel's words: the runner counts those lines.)
	echo "device-loss: the driver gave up: $(dmesg | sed -n 's/.*tmem: device broken: \([^;]*\).*/\1/p' | head -n1)"
	[ "$(dmesg | grep -c 'tmem: device broken')" -eq 1 ] || fail "the device broke more than once"
	n=$(dmesg | grep -c -E "load failed|page lost with its backend")
	[ "$n" -gt 0 ] || fail "the kernel log shows no failed page-in"
	echo "device-loss: $n failed page-in lines (rate-limited)"
	at_least failures 1
	[ "$(swap_used_kb)" -gt 0 ] || fail "nothing went to the swap device"
	memtouch run 160 34 || fail "second workload did not verify"
	# Its pages went to the swap device under the workloads' pressure, and come back from it.
	kill -USR1 $BYSTANDER
	wait $BYSTANDER || fail "the bystander, with no page in the host, did not verify"
	# A mount asks for a pool: refused at once, the filesystem works without tmem.
	mount_data $DATA /mnt
	memtouch write /mnt/f 16 35 || fail "write on a filesystem without a pool"
	drop_cache
	memtouch verify /mnt/f 16 35 || fail "read on a filesystem without a pool"
	umount /mnt || fail "umount"
	swapoff $SWAP || fail "swapoff"
	kill $BEAT
	if dmesg | grep -E -q "BUG:|WARNING:|lockup|LOCKUP|Call Trace"; then
		dmesg | tail -40
		fail "kernel BUG, WARNING or lockup"
	fi
	stats
	pass
	;;
writethrough-crash)
	# With writethrough=1 every page the host takes goes to the swap device too. The daemon is
	# killed (SIGKILL, at the barrier) with pages stored: the driver breaks the device at its
	# next request, and every page only the host could have returned is read from the swap
	# device instead. Every page verifies and no process gets SIGBUS: not the held workload,
	# nor this shell or init, whose pages may have been in the host too.
	insmod /lib/modules/tmem.ko writethrough=1 || fail "insmod tmem.ko writethrough=1"
	[ -d $T ] || fail "no $T after insmod (device not bound?)"
	swap_on
	open_control
	(while :; do
		echo "writethrough-crash: heartbeat $(cut -d' ' -f1 /proc/uptime)"
		sleep 1
	done) &
	BEAT=$!
	hold_out 64 80 160 "before the kill"
	at_least puts 1000
	echo "writethrough-crash: $(cat /sys/module/tmem/refcnt) pages in the host at the kill"
	# Only the request the dead daemon never answers waits this long (the default would do, in
	# 5 s); set late so that a slow host cannot break the device before the kill.
	echo 2000 >/sys/module/tmem/parameters/timeout_ms || fail "setting timeout_ms"
	sync_point kill
	kill -USR1 $HOLD
	wait $HOLD || fail "pages stored before the kill did not verify (exit status $?)"
	memtouch run 160 82 || fail "workload after the kill did not verify"
	dmesg | grep -q "tmem: device broken" || fail "the kernel log does not say the device broke"
	n=$(dmesg | grep -c "load failed .*, reading the swap device")
	[ "$n" -gt 0 ] || fail "no page was read back from the swap device"
	echo "writethrough-crash: $n 'reading the swap device' lines (rate-limited)"
	if dmesg | grep -E "load failed|page lost" | grep -v -q "reading the swap device"; then
		fail "a page-in failed"
	fi
	swapoff $SWAP || fail "swapoff"
	kill $BEAT
	[ "$(cat /sys/module/tmem/parameters/writethrough)" = Y ] || fail "writethrough does not read back"
	if dmesg | grep -E -q "BUG:|WARNING:|lockup|LOCKUP|Call Trace"; then
		dmesg | tail -40
		fail "kernel BUG, WARNING or lockup"
	fi
	stats
	pass
	;;
swap-lazy-register)
	swap_on
	hold_out 64 2 160 "before insmod"
	[ "$(swap_used_kb)" -gt 0 ] || fail "nothing was swapped out before insmod"
	load
	dmesg | grep -q "tmem: backend registered, 1 swap area(s) and 0 filesystem(s) already in use" ||
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
	hold_out 64 5 160 "under pressure"
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
	# rmmod with a swap area and a filesystem in use (nothing stored, so the module can go):
	# the driver releases both host pools; the runner checks the daemon at the barrier.
	open_control
	# This time the module is loaded the way udev or mdev would: by the device's modalias.
	dev=$(dirname "$(grep -l 0x003f /sys/bus/virtio/devices/*/device)")
	mods=/lib/modules/$(uname -r)
	mkdir -p "$mods" && cp /lib/modules/tmem.ko "$mods/" && depmod || fail "depmod"
	modprobe "$(cat "$dev/modalias")" || fail "modprobe $(cat "$dev/modalias") (no device alias?)"
	[ -d $T ] || fail "no $T after modprobe"
	# Feature bits, from bit 0: SHARED_POOLS (1) negotiated, INDIRECT_DESC (28) refused.
	features=$(cat "$dev/features")
	[ "$(echo "$features" | cut -c2)" = 1 ] || fail "SHARED_POOLS not negotiated: $features"
	[ "$(echo "$features" | cut -c29)" = 0 ] || fail "INDIRECT_DESC negotiated: $features"
	swapon $SWAP || fail "second swapon"
	mount_data $DATA /mnt
	at_least pools 1
	at_least cache_pools 1
	rmmod tmem || fail "rmmod with a swap area and a filesystem in use"
	sync_point unloaded
	umount /mnt || fail "umount"
	swapoff $SWAP || fail "second swapoff"
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
swap-shrink)
	# The host asks for memory back (the runner sets a shrink target of 2000 pages at the
	# barrier): the driver writes swap pages back to the swap device until the host holds at
	# most that many, new swap pages beyond it go to the device, and every page verifies.
	load
	[ "$(stat_of shrink_target)" = 18446744073709551615 ] || fail "a shrink target before any request"
	swap_on
	open_control
	hold_out 96 80 160 "before the shrink request"
	[ "$(cat /sys/module/tmem/refcnt)" -gt 4000 ] || fail "only $(cat /sys/module/tmem/refcnt) pages in the host"
	sync_point stored
	i=0
	while [ "$(stat_of shrink_target)" != 2000 ] || [ "$(cat /sys/module/tmem/refcnt)" -gt 2000 ]; do
		sleep 1
		i=$((i + 1))
		[ $i -lt 300 ] || fail "$(cat /sys/module/tmem/refcnt) swap pages still in the host (target $(stat_of shrink_target))"
	done
	echo "swap-shrink: $(stat_of shrink_writebacks) pages written back, $(cat /sys/module/tmem/refcnt) left in the host"
	at_least shrink_writebacks 2000
	sync_point shrunk
	# The pages written back read from the swap device now.
	kill -USR1 $HOLD
	wait $HOLD || fail "pages written back did not verify"
	memtouch run 160 82 || fail "workload after the shrink did not verify"
	at_least shrink_refused 1
	swapoff $SWAP || fail "swapoff"
	none_of failures
	stats
	pass
	;;
swap-mq-stress)
	# Two vCPUs, two request queues: three workers rewrite swap-backed memory larger than RAM
	# round after round, so slots freed on one CPU are reused by swap-outs on the other while
	# their invalidations may still be queued. Every byte is checked in every round.
	[ "$(grep -c ^processor /proc/cpuinfo)" -eq 2 ] || fail "expected 2 vCPUs"
	load
	dmesg | grep -q "tmem: device ready: 2 request queue(s)" || fail "the device has no 2 request queues"
	# Every swap-out and swap-in sleeps until the queue's interrupt (no polling first): up to
	# four such requests in flight per queue, beside the invalidation batches that spin.
	echo 0 >/sys/module/tmem/parameters/poll_us || fail "setting poll_us"
	swap_on
	memtouch rounds 48 40 3 >/tmp/w40 2>&1 &
	W1=$!
	memtouch rounds 48 41 3 >/tmp/w41 2>&1 &
	W2=$!
	memtouch rounds 48 42 3 >/tmp/w42 2>&1 &
	W3=$!
	ok=1
	for w in $W1 $W2 $W3; do
		wait $w || ok=0
	done
	cat /tmp/w40 /tmp/w41 /tmp/w42
	[ $ok -eq 1 ] || fail "a worker's pages did not verify"
	swapoff $SWAP || fail "swapoff"
	at_least puts 1000
	at_least hits 1000
	at_least flushes 1
	at_least sleeps 1000
	none_of failures
	none_of bad_answers
	stats
	pass
	;;
zswap-coexist)
	# zswap and tmem at once. zswap holds pages first (tmem not loaded yet); then tmem is tried
	# before zswap, and what the host refuses (its tiny limit) goes on to zswap (which stores
	# it, or rejects it: pool full, incompressible), then to the swap device. Every page
	# verifies, wherever it was kept.
	echo 1 >/sys/module/zswap/parameters/enabled || fail "enabling zswap"
	echo 40 >/sys/module/zswap/parameters/max_pool_percent || fail "zswap pool size"
	swap_on
	hold_out 16 50 160 "with zswap alone"
	zs=$(cat /sys/kernel/debug/zswap/stored_pages)
	zswap_counters
	[ "$zs" -gt 0 ] || fail "zswap stored nothing"
	echo "zswap-coexist: zswap holds $zs pages before insmod"
	load
	tried0=$(zswap_tried)
	memtouch run 192 52 || fail "workload with tmem and zswap did not verify"
	tried=$(($(zswap_tried) - tried0))
	zswap_counters
	echo "zswap-coexist: zswap was offered $tried pages the host refused"
	[ "$tried" -gt 0 ] || fail "no page the host refused reached zswap"
	at_least puts 1000
	at_least puts_refused 1
	at_least hits 1
	kill -USR1 $HOLD
	wait $HOLD || fail "pages zswap held before insmod did not verify"
	swapoff $SWAP || fail "swapoff"
	none_of failures
	stats
	pass
	;;
device-return)
	# The daemon is killed (SIGKILL, at the barrier crash) once the device is in use, and the
	# guest swaps while it is gone: the driver breaks the device, swap-outs go to the swap
	# device, and its attempts to set the device up again fail. At the barrier return the
	# daemon starts again, empty, and QEMU reconnects (reconnect-ms): the next attempt resets
	# the device, finds the swap pool gone and creates a new one, and swap-outs go to the host
	# again. Nothing was swapped out before the kill, so no process loses a page.
	# Then again while the guest is idle (see below).
	load
	echo 2000 >/sys/module/tmem/parameters/timeout_ms || fail "setting timeout_ms"
	swap_on
	at_least pools 1
	none_of puts
	open_control
	sync_point crash
	memtouch run 160 51 || fail "workload while the daemon was gone did not verify"
	dmesg | grep -q "tmem: device broken" || fail "the device did not break while the daemon was gone"
	sync_point return
	# The driver tries again at most every 32 s, when a hook finds the device broken.
	for seed in 52 53 54 55 56 57 58 59; do
		dmesg | grep -q "tmem: device answers again" && break
		memtouch run 96 $seed || fail "workload while the daemon came back did not verify"
	done
	dmesg | grep -q "tmem: device answers again" || fail "the driver did not set the device up again"
	dmesg | grep -q "tmem: swap area 0: host pool [0-9]* lost with the pages in it; new pool" ||
		fail "the kernel log does not say the swap pool was re-created"
	at_least pools 1
	puts=$(stat_of puts)
	memtouch run 160 60 || fail "workload after the return did not verify"
	[ "$(stat_of puts)" -gt "$puts" ] || fail "no put reached the host after the return"
	echo "device-return: $(stat_of recoveries) recovery attempts, $(($(stat_of puts) - puts)) puts after the last"
	# Second round: the daemon is killed and started again while the guest is idle (at the
	# barrier again), so the driver learns it from the first answer, BAD_POOL for its pool.
	# swapoff first: pages of this shell in tmem would be lost with the daemon.
	swapoff $SWAP || fail "swapoff"
	swap_on
	sync_point again
	memtouch run 96 61 || fail "workload after the second restart did not verify"
	for seed in 62 63 64 65 66 67 68 69; do
		[ "$(dmesg | grep -c 'tmem: device answers again')" -ge 2 ] && break
		memtouch run 96 $seed || fail "workload while the daemon came back again did not verify"
	done
	dmesg | grep -q "tmem: device broken: it does not know pool" ||
		fail "the driver did not take BAD_POOL for a lost pool"
	[ "$(dmesg | grep -c 'tmem: device answers again')" -ge 2 ] ||
		fail "the driver did not set the device up again after the second restart"
	puts=$(stat_of puts)
	memtouch run 96 70 || fail "workload after the second return did not verify"
	[ "$(stat_of puts)" -gt "$puts" ] || fail "no put reached the host after the second return"
	swapoff $SWAP || fail "swapoff"
	none_of pools
	stats
	pass
	;;
daemon-upgrade)
	# The daemon is restarted twice, handing its state over (--state-file), while the guest
	# holds pages in tmem. QEMU reconnects (reconnect-ms) and the driver, which negotiated
	# SESSION, is served the restored pools: every page verifies, and comes from tmem.
	load
	swap_on
	hold_out 48 80 96 "before the restarts"
	open_control
	sync_point restart
	held_back "before the restarts" "after the restarts"
	memtouch run 96 82 || fail "workload after the restarts did not verify"
	swapoff $SWAP || fail "swapoff"
	echo "daemon-upgrade: $(($(stat_of hits) - hits)) hits after the restarts"
	none_of failures
	at_least puts 1000
	stats
	pass
	;;
qemu-reconnect)
	# The daemon ends the guest's connection (ctl disconnect) while the guest holds pages in
	# tmem; QEMU connects again (reconnect-ms) and the driver, which negotiated SESSION, is
	# served the pools the daemon kept: every page verifies, and comes from tmem.
	load
	swap_on
	hold_out 48 85 96 "before the disconnect"
	open_control
	sync_point cut
	held_back "before the disconnect" "after the reconnect"
	memtouch run 96 87 || fail "workload after the reconnect did not verify"
	swapoff $SWAP || fail "swapoff"
	echo "qemu-reconnect: $(($(stat_of hits) - hits)) hits after the reconnect"
	none_of failures
	at_least puts 1000
	stats
	pass
	;;
add-remove-client)
	# Guest a holds pages in tmem while the runner adds client b (ctl add-client), boots
	# guest b against it (b swaps, verifies and powers off) and removes b again (ctl
	# remove-client). Guest a is untouched: every page it stored comes back from tmem.
	load
	swap_on
	if [ "$ROLE" = b ]; then
		memtouch run 160 76 || fail "guest b's workload did not verify"
		swapoff $SWAP || fail "swapoff"
		none_of failures
		at_least puts 1000
		stats
		pass
		exit 0
	fi
	hold_out 48 77 96 "before b was added"
	open_control
	sync_point added
	held_back "before b was added" "after b was removed"
	swapoff $SWAP || fail "swapoff"
	none_of failures
	stats
	pass
	;;
suspend-resume)
	# Suspend-to-idle with pages stored in tmem, woken by the runner through the second serial
	# port. The driver gives its queues back at freeze and finds new ones at restore (the
	# transport resets the device in between); the host keeps the pages meanwhile, so every
	# page swapped out before the suspend comes back from tmem after it. Without freeze/restore
	# the device came back reset under the driver: its next request timed out, the device broke
	# and the pages were lost.
	load
	swap_on
	grep -qw freeze /sys/power/state || fail "no suspend-to-idle: /sys/power/state is $(cat /sys/power/state)"
	hold_out 48 70 96 "before the suspend"
	held=$(stat_of puts)
	open_control
	echo enabled >/sys/class/tty/ttyS1/power/wakeup || fail "the serial port cannot wake the guest"
	sync_point suspend
	# A wake byte that arrives while the suspend starts aborts it (EBUSY): try again.
	tries=0
	until echo freeze >/sys/power/state; do
		tries=$((tries + 1))
		[ $tries -lt 5 ] || fail "suspend-to-idle failed $tries times"
	done
	sync_point resumed
	dmesg | grep -q "tmem: suspended" || fail "the driver was not frozen"
	dmesg | grep -q "tmem: resumed" || fail "the driver was not restored"
	held_back "before the suspend" "after the resume"
	memtouch run 96 72 || fail "workload after the resume did not verify"
	swapoff $SWAP || fail "swapoff"
	echo "suspend-resume: $held puts before the suspend, $(($(stat_of hits) - hits)) hits after it"
	none_of failures
	at_least puts 1000
	stats
	pass
	;;
thp-swap)
	# Transparent huge pages under memory pressure: with a tmem backend registered, reclaim
	# splits a THP before it gets swap space (kernel patch 0007), so its pages go to tmem, none
	# to the swap device whole; every page comes back.
	echo always >/sys/kernel/mm/transparent_hugepage/enabled || fail "enabling THP"
	# A swap device the kernel takes for an SSD gets whole huge pages (on a rotational one
	# the kernel finds no room for one and splits it anyway).
	echo 0 >/sys/block/vda/queue/rotational || fail "marking the swap disk non-rotational"
	load
	swap_on
	MEMTOUCH_THP=1 memtouch hold 64 60 &
	HOLD=$!
	wait_file /tmp/hold.60 $HOLD
	thp=$(awk '$1 == "AnonHugePages:" { print $2 }' /proc/meminfo)
	[ "$thp" -gt 0 ] || fail "the workload got no transparent huge pages"
	echo "thp-swap: $thp kB in transparent huge pages"
	MEMTOUCH_THP=1 memtouch run 160 61 || fail "THP workload under pressure did not verify"
	left=$(awk '$1 == "AnonHugePages:" { print $2 }' /proc/meminfo)
	echo "thp-swap: $left kB still in huge pages after the pressure;" \
		"$(grep -E '^thp_(swpout|swpout_fallback|split_page) ' /proc/vmstat | tr '\n' ' ')"
	[ "$left" -lt "$thp" ] || fail "no huge page of the held memory was swapped out or split"
	whole=$(awk '$1 == "thp_swpout" { print $2 }' /proc/vmstat)
	[ "$whole" -eq 0 ] || fail "$whole huge pages went to the swap device whole, past tmem"
	kill -USR1 $HOLD
	wait $HOLD || fail "held huge pages did not verify"
	swapoff $SWAP || fail "swapoff"
	at_least puts 1000
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
	swapoff $SWAP || fail "swapoff"
	echo "demo: page cache: a 192 MiB file on ext4, read twice"
	mount_data $DATA /mnt
	memtouch write /mnt/big 192 12 || fail "write"
	drop_cache
	memtouch verify /mnt/big 192 12 || fail "first read did not verify"
	count_hits memtouch verify /mnt/big 192 12
	# Nothing can swap or cache after this, so both sides' counters are final.
	umount /mnt || fail "umount"
	stats
	pass
	;;
pagecache-hits)
	# A file half again as large as the guest's RAM, read twice: the second read finds the
	# pages the first one's reclaim put into the host.
	load
	mount_data $DATA /mnt
	memtouch write /mnt/big 192 21 || fail "write"
	drop_cache
	memtouch verify /mnt/big 192 21 || fail "first read did not verify"
	count_hits memtouch verify /mnt/big 192 21
	[ "$HITS" -ge "$(pages_of 96)" ] || fail "second read: only $HITS of $(pages_of 192) pages hit"
	umount /mnt || fail "umount"
	none_of failures
	none_of cache_pools
	# umount releases the pool before the filesystem's own invalidate_bdev() would replace it.
	none_of cache_pool_resets
	stats
	pass
	;;
pagecache-coherency)
	# Each step starts with the file's pages in the host only (read, then dropped from the
	# cache), changes the file another way, and checks that the new content comes back.
	load
	mount_data $DATA /mnt
	F=/mnt/file
	memtouch write $F 64 30 || fail "write"
	drop_cache
	memtouch verify $F 64 30 || fail "first read"
	drop_cache
	p0=$(stat_of cache_puts)
	memtouch verify $F 64 30 || fail "second read"
	drop_cache
	[ $(($(stat_of cache_puts) - p0)) -ge "$(pages_of 48)" ] || fail "the file's pages were not put"
	# 1. Overwritten in place through the page cache.
	memtouch write $F 64 31 || fail "overwrite"
	drop_cache
	memtouch verify $F 64 31 || fail "overwrite: stale pages came back"
	drop_cache
	# 2. Overwritten with O_DIRECT, which bypasses the page cache.
	memtouch dwrite $F 64 32 || fail "direct write"
	memtouch verify $F 64 32 || fail "direct write: stale pages came back"
	drop_cache
	# 3. Truncated to 16 MiB and extended again: the rest must read as zeros.
	truncate -s 16M $F && truncate -s 64M $F || fail "truncate"
	memtouch verify $F 64 32 16 || fail "truncate: stale pages came back"
	drop_cache
	# 4. Truncated to nothing and rewritten.
	: >$F || fail "truncate to 0"
	memtouch write $F 64 33 || fail "rewrite"
	drop_cache
	memtouch verify $F 64 33 || fail "rewrite: stale pages came back"
	drop_cache
	# 5. Deleted and created again (the inode number may be reused).
	rm $F
	memtouch write $F 64 34 || fail "recreate"
	drop_cache
	memtouch verify $F 64 34 || fail "recreate: stale pages came back"
	drop_cache
	# 6. The inode itself leaves memory (drop_caches 3): its pages stay valid in the host.
	sync
	echo 3 >/proc/sys/vm/drop_caches
	count_hits memtouch verify $F 64 34
	[ "$HITS" -ge "$(pages_of 32)" ] || fail "after inode eviction: only $HITS pages hit"
	# 7. The block device's buffers flushed (BLKFLSBUF: invalidate_bdev): the pool is replaced
	# by an empty one with the filesystem's hooks quiesced, and the file still reads right.
	drop_cache
	blockdev --flushbufs $DATA || fail "blockdev --flushbufs"
	[ "$(stat_of cache_pool_resets)" -eq 1 ] || fail "cache_pool_resets is $(stat_of cache_pool_resets) after BLKFLSBUF, expected 1"
	[ "$(stat_of cache_pools)" -eq 1 ] || fail "no pool after BLKFLSBUF"
	memtouch verify $F 64 34 || fail "after BLKFLSBUF"
	drop_cache
	count_hits memtouch verify $F 64 34
	[ "$HITS" -ge "$(pages_of 32)" ] || fail "the new pool after BLKFLSBUF: only $HITS pages hit"
	umount /mnt || fail "umount"
	# umount releases the pool before the filesystem shuts down: its invalidate_bdev() must not
	# replace the pool on the way out (destroy, create, destroy).
	[ "$(stat_of cache_pool_resets)" -eq 1 ] || fail "umount replaced the pool (cache_pool_resets $(stat_of cache_pool_resets))"
	none_of cache_pools
	none_of failures
	stats
	pass
	;;
pagecache-lazy-register)
	# Mounted before insmod: replayed at registration. Mounted and unmounted before insmod:
	# forgotten. Then the module goes away and comes back with the filesystem still mounted.
	mount_data $DATA /mnt
	mount_data $DISK2 /mnt2
	umount /mnt2 || fail "umount /mnt2"
	memtouch write /mnt/f 96 40 || fail "write before insmod"
	load
	dmesg | grep -q "tmem: backend registered, 0 swap area(s) and 1 filesystem(s) already in use" ||
		fail "the mount made before insmod was not replayed alone"
	[ "$(stat_of cache_pools)" -eq 1 ] || fail "$(stat_of cache_pools) page-cache pools, expected 1"
	drop_cache
	count_hits memtouch verify /mnt/f 96 40
	[ "$HITS" -ge "$(pages_of 48)" ] || fail "only $HITS pages hit"
	# The file's pages leave the page cache (put) before the counters are saved: a page that
	# reclaim put between save_stats and rmmod would count on the host only.
	drop_cache
	save_stats
	rmmod tmem || fail "rmmod with a filesystem mounted"
	memtouch verify /mnt/f 96 40 || fail "read without the module"
	load
	[ "$(dmesg | grep -c 'tmem: backend registered, 0 swap area(s) and 1 filesystem(s)')" -eq 2 ] ||
		fail "the mount was not replayed at the second registration"
	drop_cache
	memtouch verify /mnt/f 96 40 || fail "first read after reload"
	drop_cache
	count_hits memtouch verify /mnt/f 96 40
	[ "$HITS" -ge "$(pages_of 48)" ] || fail "after reload: only $HITS pages hit"
	umount /mnt || fail "umount"
	none_of cache_pools
	none_of failures
	stats
	pass
	;;
two-guests)
	# Both guests: a private ext4 disk with a file of the same name, size and inode number but
	# different content, and the same read-only ext4 disk (/dev/vdc), whose UUID the host
	# authorized for sharing. Guest a writes the shared file, then both mount it read-only;
	# a reads it into the shared pool and b reads it from there.
	open_control
	load
	mount_data $DATA /mnt
	if [ "$ROLE" = a ]; then seed=51; else seed=52; fi
	memtouch write /mnt/own 48 $seed || fail "write own file"
	drop_cache
	memtouch verify /mnt/own 48 $seed || fail "own file, first read"
	if [ "$ROLE" = a ]; then
		mount_data $DISK2 /shared
		memtouch write /shared/common 48 50 || fail "write the shared file"
		umount /shared || fail "umount /shared"
	fi
	sync_point written
	# Sharing is opt-in (tmem_shared) and only from a read-only block device: a read-only
	# mount without the option, or with it on a writable device, gets a private pool. Guest
	# a's disk is writable (it wrote the file); b's is read-only in QEMU.
	mount_data -o ro $DISK2 /shared
	none_of cache_shared_pools
	umount /shared || fail "umount /shared"
	if [ "$ROLE" = a ]; then
		mount_data -o ro,tmem_shared $DISK2 /shared
		none_of cache_shared_pools
		dmesg | grep -q "tmem_shared needs a read-only block device" ||
			fail "no warning for tmem_shared on a writable device"
		umount /shared || fail "umount /shared"
		blockdev --setro $DISK2 || fail "blockdev --setro"
	fi
	mount_data -o ro,tmem_shared $DISK2 /shared
	[ "$(stat_of cache_shared_pools)" -eq 1 ] || fail "no shared pool (not authorized?)"
	sync_point mounted
	if [ "$ROLE" = a ]; then
		memtouch verify /shared/common 48 50 || fail "shared file, first read"
		drop_cache
	fi
	sync_point shared-put
	if [ "$ROLE" = b ]; then
		count_hits memtouch verify /shared/common 48 50
		[ "$HITS" -ge "$(pages_of 24)" ] ||
			fail "only $HITS pages of the shared file came from the shared pool"
	fi
	# Own files again: each guest must get its own pages back, never the other's.
	drop_cache
	count_hits memtouch verify /mnt/own 48 $seed
	[ "$HITS" -ge "$(pages_of 24)" ] || fail "own file: only $HITS pages hit"
	sync_point verified
	umount /shared || fail "umount /shared"
	umount /mnt || fail "umount /mnt"
	none_of failures
	stats
	pass
	;;
overcommit)
	# Two 128 MiB guests each read a 192 MiB file twice against a daemon whose limit holds
	# a fraction of that: the host evicts ephemeral pages, by weight (b has 3 times a's).
	open_control
	load
	mount_data $DATA /mnt
	if [ "$ROLE" = a ]; then seed=61; else seed=62; fi
	memtouch write /mnt/big 192 $seed || fail "write"
	sync_point written
	drop_cache
	memtouch verify /mnt/big 192 $seed || fail "first read"
	memtouch verify /mnt/big 192 $seed || fail "second read"
	# The runner samples the daemon here, with both guests' pools full.
	sync_point measured
	umount /mnt || fail "umount"
	none_of failures
	stats
	pass
	;;
migrate | snapshot | migrate-refused)
	# The guest holds pages in tmem (swap pages, and a file's pages in the page cache's pool)
	# when it moves to another QEMU served by another daemon: live (migrate: the page cache's
	# pages go along, --migration all) or through a snapshot file restored by a fresh QEMU
	# and daemon (snapshot: they are dropped, --migration persistent). A workload runs through
	# the move. Afterwards every page verifies, and pages stored before the move come back
	# from tmem, at the target. migrate-refused: the target has no room for the pages, the
	# migration fails, and the guest runs on at the source with its pages.
	load
	swap_on
	mount_data $DATA /mnt
	memtouch write /mnt/file 32 40 || fail "write"
	drop_cache
	memtouch verify /mnt/file 32 40 || fail "first read"
	hold_out 48 90 96 "before the migration"
	open_control
	(while [ ! -e /tmp/moved ]; do memtouch run 8 95 || exit 1; done) &
	BG=$!
	sync_point migrate
	touch /tmp/moved
	wait $BG || fail "the workload that ran through the migration did not verify"
	count_hits memtouch verify /mnt/file 32 40
	held_back "before the migration" "after the migration"
	memtouch run 96 92 || fail "workload after the migration did not verify"
	swapoff $SWAP || fail "swapoff"
	umount /mnt || fail "umount"
	echo "$SCENARIO: $(($(stat_of hits) - hits)) swap hits after the migration"
	none_of failures
	stats
	pass
	;;
short-config)
	# QEMU attached the device without config_size: its config space is empty (reads give
	# 0xff). The driver refuses the device and says what is missing; the kernel runs on.
	insmod /lib/modules/tmem.ko 2>/dev/null
	dmesg | grep -q "the device's config space is empty (QEMU: config_size=24)" ||
		fail "no message naming the missing config space"
	[ ! -d $T ] || fail "the driver bound a device with no config space"
	mount_data $DATA /mnt
	echo data >/mnt/f && sync && umount /mnt || fail "the guest does not run on"
	pass
	;;
bad-device)
	# The device is the runner's misbehaving one (tests/vmtest/src/baddev.rs): each barrier
	# switches it to another wrong way of answering. The data stays correct (reads fall back to
	# the disk), the guest neither crashes nor hangs, and the driver counts what it saw.
	open_control
	load
	# 0. A read-only mount asks for a shared pool, which this device fails (not DENIED, an
	# I/O error): the filesystem gets a private pool instead.
	blockdev --setro $DISK2 || fail "blockdev --setro"
	mount_data -o ro,tmem_shared $DISK2 /mnt2
	[ "$(stat_of cache_pools)" -eq 1 ] || fail "no pool after the shared pool failed"
	none_of cache_shared_pools
	umount /mnt2 || fail "umount /mnt2"
	blockdev --setrw $DISK2 || fail "blockdev --setrw"
	mount_data $DATA /mnt
	F=/mnt/file
	memtouch write $F 32 70 || fail "write"
	drop_cache
	memtouch verify $F 32 70 || fail "first read"
	drop_cache
	# 1. GET hits answered without the page (16 bytes used): each is a bad answer, the page
	# comes from the disk, never from what the driver's buffer held before.
	sync_point short-get
	h0=$(stat_of cache_hits)
	memtouch verify $F 32 70 || fail "short GET answers: wrong data"
	at_least bad_answers 1
	[ "$(stat_of cache_hits)" -eq "$h0" ] || fail "a short GET answer counted as a hit"
	echo "bad-device: $(stat_of bad_answers) bad answers"
	# 2. Flushes fail and drop nothing: the direct write's invalidation cannot be vouched for,
	# so the filesystem loses its pool, and the new data comes back, not the host's copy.
	drop_cache
	sync_point fail-flush
	memtouch dwrite $F 32 71 || fail "direct write"
	memtouch verify $F 32 71 || fail "failed flush: stale pages came back"
	[ "$(stat_of cache_pools)" -eq 0 ] || fail "the filesystem kept its pool after a failed flush"
	dmesg | grep -q "tmem: filesystem [0-9]*: host pool [0-9]* a flush failed" ||
		fail "the kernel log does not say the pool went"
	if dmesg | grep -q "tmem: device broken"; then
		fail "the device broke before the bad BATCH"
	fi
	# 3. A BATCH answered without its status bytes: the device is broken (its invalidations
	# cannot be vouched for), every later request fails at once, reads go to the disk.
	umount /mnt || fail "umount"
	mount_data $DATA /mnt
	at_least cache_pools 1
	memtouch verify $F 32 71 || fail "read after remount"
	drop_cache
	sync_point batch-length
	: >$F || fail "truncate"
	memtouch write $F 32 72 || fail "rewrite"
	drop_cache
	memtouch verify $F 32 72 || fail "after the bad BATCH: wrong data"
	dmesg | grep -q "tmem: device broken: an invalidation was not acknowledged" ||
		fail "the kernel log does not say the device broke"
	at_least bad_answers 2
	# 3b. The device answers properly again: the driver resets it (it broke its queues),
	# sets it up again and gives the filesystem a new, empty pool (invalidations were lost
	# meanwhile); the data stays correct throughout. Reads find the device broken and start
	# the recoveries (1 s apart at first).
	sync_point none
	for i in 1 2 3 4 5 6 7 8 9 10; do
		drop_cache
		memtouch verify $F 32 72 || fail "wrong data while the device came back"
		dmesg | grep -E "tmem: device (broken|answers again)" | tail -n1 | grep -q "answers again" &&
			[ "$(stat_of cache_pools)" -ge 1 ] && break
	done
	dmesg | grep -E "tmem: device (broken|answers again)" | tail -n1 | grep -q "answers again" ||
		fail "the driver did not set the device up again"
	at_least cache_pools 1
	drop_cache
	memtouch verify $F 32 72 || fail "after the device came back: wrong data"
	echo "bad-device: back after $(stat_of recoveries) recovery attempts"
	# 4. After rmmod and insmod (which resets the device), a used-ring id beyond the ring:
	# the virtio core breaks the queue, the filesystem gets no pool and reads the disk.
	rmmod tmem || fail "rmmod with a broken device"
	sync_point used-id
	load
	dmesg | grep -q "out of range" || fail "the virtio core did not report the used id"
	[ "$(stat_of cache_pools)" -eq 0 ] || fail "a pool despite a broken queue"
	drop_cache
	memtouch verify $F 32 72 || fail "after a bad used id: wrong data"
	umount /mnt || fail "umount"
	if dmesg | grep -E -q "BUG:|WARNING:|lockup|LOCKUP|Call Trace"; then
		dmesg | tail -40
		fail "kernel BUG, WARNING or lockup"
	fi
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
