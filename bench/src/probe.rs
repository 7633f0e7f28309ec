// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! How long a cache line takes to go from one CPU to another and back. Every end-to-end
//! request moves several lines between the guest's CPU and the daemon's; on a virtual machine
//! what that costs depends on where the host runs the two vCPUs, and it can change from one run
//! to the next. The report carries the figure so that a run's end-to-end rows can be read with
//! it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Round trips per measurement: a few milliseconds on an otherwise idle machine.
pub const ROUND_TRIPS: u32 = 100_000;

#[repr(align(64))]
struct Line(AtomicU32);

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is this thread.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if r != 0 {
        return Vec::new();
    }
    // SAFETY: reads a bit of a valid set; the index is below CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Keeps the calling thread on `cpu`; false if the kernel refuses.
fn pin(cpu: usize) -> bool {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (it came from allowed_cpus), `set` is valid.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is this thread.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) == 0 }
}

/// Mean round trip of one cache line between the first two CPUs this process may use, in
/// nanoseconds: two threads, one on each, hand a counter back and forth. `None` with fewer
/// than two CPUs or if a thread cannot be kept on its CPU.
pub fn line_round_trip_ns(round_trips: u32) -> Option<u64> {
    let cpus = allowed_cpus();
    let (&a, &b) = (cpus.first()?, cpus.get(1)?);
    let line = Arc::new(Line(AtomicU32::new(0)));
    let answer = {
        let line = line.clone();
        std::thread::spawn(move || {
            if !pin(b) {
                // Tell the other side, which waits for odd values only.
                line.0.store(u32::MAX, Ordering::Release);
                return false;
            }
            for i in 0..round_trips {
                loop {
                    match line.0.load(Ordering::Acquire) {
                        v if v == 2 * i + 1 => break,
                        0 if i == 0 => std::hint::spin_loop(),
                        v if v == 2 * i => std::hint::spin_loop(),
                        _ => return false,
                    }
                }
                line.0.store(2 * i + 2, Ordering::Release);
            }
            true
        })
    };
    let ask = std::thread::spawn(move || {
        if !pin(a) {
            line.0.store(u32::MAX, Ordering::Release);
            return None;
        }
        let t = Instant::now();
        for i in 0..round_trips {
            // Not a plain store: the other side may have given up (u32::MAX) meanwhile.
            if line
                .0
                .compare_exchange(2 * i, 2 * i + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                return None;
            }
            loop {
                match line.0.load(Ordering::Acquire) {
                    v if v == 2 * i + 2 => break,
                    v if v == 2 * i + 1 => std::hint::spin_loop(),
                    _ => return None,
                }
            }
        }
        Some(t.elapsed())
    });
    let took = ask.join().ok()??;
    answer.join().ok()?.then_some(())?;
    Some((took.as_nanos() / u128::from(round_trips.max(1))) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Few round trips: other tests may keep the CPUs busy, and then each one waits for a
    /// time slice.
    #[test]
    fn a_round_trip_takes_some_time_on_two_cpus() {
        match allowed_cpus().len() {
            0 | 1 => assert_eq!(line_round_trip_ns(200), None),
            _ => assert!(line_round_trip_ns(200).is_some_and(|ns| ns > 0)),
        }
    }
}
