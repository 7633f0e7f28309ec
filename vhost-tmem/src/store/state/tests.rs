// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
use super::*;

/// A small stream: two clients, three pools, pages of every tag.
fn sample() -> Vec<u8> {
    let mut w = StateWriter::new(Vec::new(), Scope::Daemon, "9.9.9", 1234, 2).unwrap();
    let c = CounterSnapshot {
        puts: 7,
        evictions: 3,
        ..CounterSnapshot::default()
    };
    w.begin_client("vm1", &c).unwrap();
    w.pool(&PoolRecord {
        id: 0,
        persistent: true,
        shared: None,
        counters: c,
    })
    .unwrap();
    let raw = vec![0xabu8; PAGE_SIZE];
    w.begin_run(0, &[1, 2, 3], 5, 0b1000_0000_0000_0111)
        .unwrap();
    w.page(Payload::Same(0));
    w.page(Payload::Same(0x0101_0101_0101_0101));
    w.page(Payload::Stored(Encoding::Raw, &raw));
    w.page(Payload::Stored(Encoding::Lz4, b"lz4 bytes"));
    w.pool(&PoolRecord {
        id: 3,
        persistent: false,
        shared: Some([9; 16]),
        counters: CounterSnapshot::default(),
    })
    .unwrap();
    w.begin_run(3, &[4, 5, 6], 0, 1).unwrap();
    w.page(Payload::Stored(Encoding::Zstd, b"zstd"));
    assert_eq!(
        w.end_client().unwrap(),
        Tally {
            clients: 1,
            pools: 2,
            pages: 5,
            bytes: (PAGE_SIZE + 9 + 4) as u64
        }
    );
    w.begin_client("vm2", &CounterSnapshot::default()).unwrap();
    w.pool(&PoolRecord {
        id: 1,
        persistent: false,
        shared: None,
        counters: CounterSnapshot::default(),
    })
    .unwrap();
    w.end_client().unwrap();
    w.finish().unwrap().0
}

/// Everything a stream holds, read in full: (client, pool, page) lines, or the first error.
fn read_all(bytes: &[u8]) -> Result<Vec<String>, Error> {
    let mut r = StateReader::new(bytes)?;
    let mut out = vec![format!("{:?}", r.header())];
    while let Some(c) = r.next_client()? {
        out.push(format!("client {} puts {}", c.name, c.counters.puts));
        loop {
            match r.next_item()? {
                Item::Pool(p) => out.push(format!("{p:?}")),
                Item::Pages(mut pages) => {
                    while let Some(p) = pages.next()? {
                        out.push(format!("{p:?}"));
                    }
                }
                Item::End(t) => {
                    out.push(format!("{t:?}"));
                    break;
                }
            }
        }
    }
    r.finish()?;
    Ok(out)
}

#[test]
fn round_trip() {
    let got = read_all(&sample()).unwrap();
    assert_eq!(
        got[0],
        "StreamHeader { scope: Daemon, writer: \"9.9.9\", created: 1234, clients: 2 }"
    );
    assert_eq!(got[1], "client vm1 puts 7");
    assert!(
        got[2].contains("id: 0, persistent: true, shared: None"),
        "{}",
        got[2]
    );
    let pages: Vec<&String> = got.iter().filter(|l| l.starts_with("PageRecord")).collect();
    assert_eq!(pages.len(), 5);
    assert!(
        pages[0].contains("oid: [1, 2, 3], index: 80, payload: Same(0)"),
        "{}",
        pages[0]
    );
    assert!(pages[1].contains("index: 81, payload: Same(72340172838076673)"));
    assert!(pages[2].contains("index: 82, payload: Stored(Raw"));
    assert!(pages[3].contains("index: 95, payload: Stored(Lz4"));
    assert!(pages[4].contains("pool: 3, oid: [4, 5, 6], index: 0, payload: Stored(Zstd"));
    assert!(got.iter().any(|l| l.contains("shared: Some([9, 9")));
    assert_eq!(
        got.last().unwrap(),
        "Tally { clients: 1, pools: 1, pages: 0, bytes: 0 }"
    );
}

/// Reading a stream cut anywhere fails, and says it is truncated, never panics.
#[test]
fn every_truncation_is_refused() {
    let s = sample();
    for len in 0..s.len() {
        match read_all(&s[..len]) {
            Err(Error::Truncated { offset, .. }) => assert_eq!(offset, len as u64),
            other => panic!("cut at {len}: {other:?}"),
        }
    }
}

/// A flipped bit anywhere is caught.
#[test]
fn every_flipped_bit_is_refused() {
    let s = sample();
    for i in 0..s.len() {
        for bit in [0, 3, 7] {
            let mut b = s.clone();
            b[i] ^= 1 << bit;
            let e = read_all(&b).expect_err(&format!("byte {i} bit {bit}"));
            match (i, &e) {
                (0..=7, Error::BadMagic) | (8..=11, Error::Version { .. }) => {}
                (0..=11, _) => panic!("byte {i}: {e}"),
                // A flipped length may also make the rest look too long or cut short.
                (_, Error::Checksum { .. } | Error::TooLong { .. } | Error::Truncated { .. }) => {}
                _ => panic!("byte {i} bit {bit}: {e}"),
            }
        }
    }
}

#[test]
fn wrong_magic_and_version_name_what_is_wrong() {
    let mut s = sample();
    s[8] = 2;
    let e = read_all(&s).unwrap_err().to_string();
    assert!(e.contains("format version 2 (at byte 8)"), "{e}");
    let e = read_all(b"#!/bin/sh\necho hello world\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad magic"), "{e}");
}

/// Frames with valid checksums but wrong content, built the way the writer chains them.
struct Forge {
    out: Vec<u8>,
    crc: u32,
}

impl Forge {
    fn new() -> Forge {
        let mut pre = [0u8; PREAMBLE];
        pre[..8].copy_from_slice(&MAGIC);
        pre[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        Forge {
            out: pre.to_vec(),
            crc: crc32c::crc32c(&pre),
        }
    }

    fn raw(mut self, header: [u8; 8], body: &[u8]) -> Forge {
        let crc = crc32c::crc32c_append(crc32c::crc32c_append(self.crc, &header), body);
        self.out.extend_from_slice(&header);
        self.out.extend_from_slice(body);
        self.out.extend_from_slice(&crc.to_le_bytes());
        self.crc = crc;
        self
    }

    fn frame(self, kind: u8, body: &[u8]) -> Forge {
        let mut h = [0u8; 8];
        h[0] = kind;
        h[4..8].copy_from_slice(&(body.len() as u32).to_le_bytes());
        self.raw(h, body)
    }

    fn header(self, clients: u32) -> Forge {
        let mut b = vec![1, 1, b'x'];
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&clients.to_le_bytes());
        self.frame(1, &b)
    }

    fn client(self) -> Forge {
        self.frame(2, &[1, b'c', 0])
    }

    fn pool(self, id: u32, flags: u8, uuid: [u8; 16]) -> Forge {
        let mut b = id.to_le_bytes().to_vec();
        b.push(flags);
        b.extend_from_slice(&uuid);
        b.push(0);
        self.frame(3, &b)
    }
}

/// A pages body: pool 0, one run of object [0,0,0] with `mask`, then `entries`.
fn pages_body(run: u64, mask: u16, entries: &[u8]) -> Vec<u8> {
    let mut b = 0u32.to_le_bytes().to_vec();
    b.extend_from_slice(&[0u8; 24]);
    b.extend_from_slice(&run.to_le_bytes());
    b.extend_from_slice(&mask.to_le_bytes());
    b.extend_from_slice(entries);
    b
}

fn malformed(bytes: &[u8]) -> String {
    read_all(bytes).unwrap_err().to_string()
}

#[test]
fn malformed_records_are_refused_with_where_and_why() {
    let base = || Forge::new().header(1).client().pool(0, 1, [0; 16]);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (base().frame(9, &[]).out, "unknown kind 9"),
        (
            base().raw([4, 1, 0, 0, 0, 0, 0, 0], &[]).out,
            "reserved bytes are not zero",
        ),
        (base().pool(1, 0x80, [0; 16]).out, "unknown pool flags 0x80"),
        (base().pool(1, 0, [1; 16]).out, "a private pool with a UUID"),
        (
            base().frame(4, &pages_body(0, 0, &[])).out,
            "a run with no pages",
        ),
        (
            base().frame(4, &pages_body(1 << 61, 1, &[0])).out,
            "run number 2305843009213693952 is out of range",
        ),
        (
            base().frame(4, &pages_body(0, 1, &[7])).out,
            "unknown page tag 7",
        ),
        (
            base().frame(4, &pages_body(0, 1, &[TAG_LZ4, 0, 0])).out,
            "payload length 0",
        ),
        (
            base()
                .frame(4, &pages_body(0, 1, &[TAG_LZ4, 0xff, 0xff]))
                .out,
            "payload length 65535",
        ),
        (
            base()
                .frame(4, &pages_body(0, 1, &[TAG_LZ4, 9, 0, 1, 2]))
                .out,
            "payload at byte",
        ),
        (
            base().frame(4, &pages_body(0, 0b11, &[TAG_ZERO])).out,
            "page tag at byte",
        ),
        (
            Forge::new().header(1).frame(2, &[1, b'c', 200]).out,
            "200 counters (at most 64)",
        ),
        (
            Forge::new().header(1).frame(2, &[1, b'c', 0, 0]).out,
            "1 bytes left over",
        ),
        (
            Forge::new().header(1).frame(2, &[2, 0xff, 0xfe, 0]).out,
            "client name is not UTF-8",
        ),
        (
            base()
                .frame(4, &pages_body(0, 1, &[TAG_ZERO]))
                .frame(5, &[0; 20])
                .out,
            "it counts 0 pools, 0 pages, 0 bytes; the section held 1 pools, 1 pages",
        ),
        (
            Forge::new().header(1).pool(0, 0, [0; 16]).out,
            "pool record at byte 43 where a client or the end record was expected",
        ),
        (
            Forge::new().header(2).frame(6, &[0; 28]).out,
            "header: 2 clients",
        ),
        (
            Forge::new().header(0).client().out,
            "more client sections than the 0 the header announced",
        ),
        (
            {
                let mut s = Forge::new().header(0).frame(6, &[0; 28]).out;
                s.push(0);
                s
            },
            "data after the end record, at byte 83",
        ),
    ];
    for (bytes, want) in cases {
        let e = malformed(&bytes);
        assert!(e.contains(want), "want \"{want}\", got: {e}");
    }
}

/// A length field of any size allocates at most `MAX_BODY`: the largest is refused before
/// anything is read or allocated for it.
#[test]
fn huge_lengths_allocate_nothing() {
    let mut s = Forge::new().header(1).out;
    let at = s.len();
    s.extend_from_slice(&[2, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    let e = malformed(&s);
    assert_eq!(
        e,
        format!("record at byte {at}: its length 4294967295 is over the limit of 1048576 bytes")
    );
    // Just at the limit: read up to the end of the stream, then refused as cut short.
    let mut s = Forge::new().header(1).out;
    s.extend_from_slice(&[2, 0, 0, 0]);
    s.extend_from_slice(&(MAX_BODY as u32).to_le_bytes());
    let mut r = StateReader::new(&s[..]).unwrap();
    assert!(matches!(r.next_client(), Err(Error::Truncated { .. })));
    assert!(r.body.capacity() <= MAX_BODY);
}

/// Random damage (flips, cuts, inserted and removed bytes, repeated stretches) never panics
/// and is always refused.
#[test]
fn random_damage_never_panics() {
    let s = sample();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..3000 {
        let mut b = s.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() % b.len() as u64) as usize;
            match next() % 5 {
                0 => b[i] ^= 1 << (next() % 8),
                1 => b.truncate(i),
                2 => b.insert(i, next() as u8),
                3 => {
                    b.remove(i);
                }
                _ => {
                    let n = (next() % 64) as usize;
                    let end = (i + n).min(b.len());
                    let dup = b[i..end].to_vec();
                    b.splice(i..i, dup);
                }
            }
            if b.is_empty() {
                break;
            }
        }
        if b != s {
            assert!(read_all(&b).is_err());
        }
    }
}
