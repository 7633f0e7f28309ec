// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-tmem wire format, shared by the host daemon (`vhost-tmem`) and the guest driver.
//!
//! This crate is `#![no_std]` and has no dependencies. Its content lives in `wire.rs`, which
//! has no crate-level attributes, so that the Rust-for-Linux guest module (built by Kbuild,
//! without cargo) includes that file by path as a module. Everything on the wire is
//! little-endian. Each structure is `#[repr(C)]` with its size and field offsets asserted at
//! compile time, and has explicit `encode`/`decode` helpers that write and read a byte array (no
//! transmutes, so no `unsafe` and no host byte-order assumptions). The normative description is
//! `docs/virtio-tmem.md`.

#![no_std]
#![forbid(unsafe_code)]

mod wire;

pub use wire::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_byte_order() {
        let h = ReqHeader {
            op: Op::Put as u32,
            flags: req_flags::GET_EXCLUSIVE,
            pool_id: 0x0102_0304,
            count: 0,
            oid: [1, 0x1122_3344_5566_7788, u64::MAX],
            index: 0xdead_beef_0000_0001,
        };
        let b = h.encode();
        assert_eq!(&b[0..4], &[3, 0, 0, 0]);
        assert_eq!(&b[8..12], &[4, 3, 2, 1]);
        assert_eq!(
            &b[24..32],
            &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
        assert_eq!(ReqHeader::decode(&b), h);
    }

    #[test]
    fn other_round_trips() {
        let c = Config {
            num_request_queues: 2,
            max_pools: 16,
            page_shift: 12,
            reserved: 0,
            max_batch: 256,
            limit_pages: 1 << 40,
            shrink_target_pages: u64::MAX,
        };
        assert_eq!(Config::decode(&c.encode()), c);
        let p = CreatePool {
            uuid: [7; 16],
            page_size: 4096,
            reserved: 0,
        };
        assert_eq!(CreatePool::decode(&p.encode()), p);
        let e = BatchEntry {
            op: Op::FlushObject as u32,
            pool_id: 3,
            oid: [9, 8, 7],
            index: 5,
        };
        assert_eq!(BatchEntry::decode(&e.encode()), e);
        let r = RespHeader {
            status: Status::Miss as u32,
            flags: resp_flags::DROPPED,
            value: 42,
        };
        assert_eq!(RespHeader::decode(&r.encode()), r);
    }

    #[test]
    fn op_and_status_decoding() {
        for v in 1..=8 {
            assert_eq!(Op::from_u32(v).map(|o| o as u32), Some(v));
        }
        assert_eq!(Op::from_u32(0), None);
        assert_eq!(Op::from_u32(9), None);
        for v in 0..=9 {
            assert_eq!(Status::from_u32(v).map(|s| s as u32), Some(v));
        }
        assert_eq!(Status::from_u32(10), None);
        assert!(Op::CreatePool.is_control() && !Op::Put.is_control());
        assert!(Op::Reset.is_control());
    }

    #[test]
    fn lengths() {
        assert_eq!(readable_len(Op::Put, 0), 48 + 4096);
        assert_eq!(readable_len(Op::Batch, 3), 48 + 120);
        assert_eq!(writable_len(Op::Get, 0), 16 + 4096);
        assert_eq!(writable_len(Op::Batch, 3), 16 + 3);
        assert_eq!(writable_len(Op::FlushPage, 0), 16);
        assert_eq!(readable_len(Op::Reset, 0), 48);
        assert_eq!(writable_len(Op::Reset, 0), 16);
    }
}
