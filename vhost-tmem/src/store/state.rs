// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The state format: pools and pages as a byte stream, so that a daemon can hand what it stores
//! to its successor (`--state-file`) and one client's pages can travel over any stream (live
//! migration). docs/state-format.md is the normative description.
//!
//! A 16-byte preamble (magic, format version) and then frames: kind, length, body and a
//! CRC-32C chained over every byte before it, so that a flipped byte, a missing, repeated or
//! reordered frame and a truncation are each caught at the frame they hit. Pages are written
//! as stored (compressed payloads are not recompressed), a run of up to 16 pages at a time,
//! straight from the store into the frame being built. The reader trusts nothing: a body is
//! at most [`MAX_BODY`] bytes, checked before anything is allocated for it, and every field
//! is checked before it is used.

use std::io::{self, Read, Write};

use shared_proto::{Oid, PAGE_SIZE};

use super::codec::Encoding;
use super::counters::CounterSnapshot;
use super::slot::Payload;
use super::{PoolId, Uuid};

/// The first bytes of every stream.
pub const MAGIC: [u8; 8] = *b"VTMEMST\n";
/// The format this daemon writes, and the only one it reads so far.
pub const FORMAT_VERSION: u32 = 1;
/// Magic, version and a reserved word.
const PREAMBLE: usize = 16;
/// Kind, three reserved bytes, body length.
const FRAME_HEADER: usize = 8;
/// The largest frame body a reader accepts (a run of 16 raw pages is 65 KiB).
pub const MAX_BODY: usize = 1 << 20;
/// A pages frame is sent once its body reaches this.
const PAGES_TARGET: usize = 64 << 10;
/// Longest client name and daemon version text (both are written with a one-byte length).
const MAX_TEXT: usize = 255;
/// Most counters a record may carry (newer daemons may have more than this one knows).
const MAX_COUNTERS: usize = 64;

/// Bytes of one page entry's tag.
const TAG_ZERO: u8 = 0;
const TAG_SAME: u8 = 1;
const TAG_RAW: u8 = 2;
const TAG_LZ4: u8 = 3;
const TAG_ZSTD: u8 = 4;

/// Pool record flags.
const POOL_PERSISTENT: u8 = 1;
const POOL_SHARED: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Header = 1,
    Client = 2,
    Pool = 3,
    Pages = 4,
    ClientEnd = 5,
    End = 6,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Header,
            2 => Kind::Client,
            3 => Kind::Pool,
            4 => Kind::Pages,
            5 => Kind::ClientEnd,
            6 => Kind::End,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Header => "header",
            Kind::Client => "client",
            Kind::Pool => "pool",
            Kind::Pages => "pages",
            Kind::ClientEnd => "client-end",
            Kind::End => "end",
        }
    }
}

/// What is wrong with a stream. Offsets are bytes from its start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read at byte {offset}")]
    Read {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("not a vhost-tmem state stream (bad magic at byte 0)")]
    BadMagic,
    #[error(
        "format version {found} (at byte 8) cannot be read by this daemon, which reads version \
         {FORMAT_VERSION}"
    )]
    Version { found: u32 },
    #[error("truncated: the stream ends at byte {offset}, inside the {what}")]
    Truncated { offset: u64, what: &'static str },
    #[error(
        "checksum mismatch in the record at byte {offset} (stored {stored:#010x}, computed \
         {computed:#010x}): the stream is corrupt there, or a record before it is missing or \
         out of order"
    )]
    Checksum {
        offset: u64,
        stored: u32,
        computed: u32,
    },
    #[error("record at byte {offset}: its length {len} is over the limit of {MAX_BODY} bytes")]
    TooLong { offset: u64, len: u64 },
    #[error("record at byte {offset}: unknown kind {kind}")]
    UnknownKind { offset: u64, kind: u8 },
    #[error("{kind} record at byte {offset}: {why}")]
    Malformed {
        offset: u64,
        kind: &'static str,
        why: String,
    },
    #[error("{found} record at byte {offset} where {expected} was expected")]
    Unexpected {
        offset: u64,
        found: &'static str,
        expected: &'static str,
    },
    #[error("data after the end record, at byte {offset}")]
    Trailing { offset: u64 },
}

/// What a stream holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// A daemon's state: every client (the state file).
    Daemon = 1,
    /// One client (a migration stream).
    Client = 2,
}

/// The stream's header record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    pub scope: Scope,
    /// The version of the daemon that wrote it.
    pub writer: String,
    /// When it was written, seconds since the Unix epoch.
    pub created: u64,
    /// Client sections that follow.
    pub clients: u32,
}

/// A client section's first record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRecord {
    pub name: String,
    /// Its request counters (gauges are recomputed from the pages).
    pub counters: CounterSnapshot,
}

/// A pool of a client section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolRecord {
    /// The id the client's guest knows it by.
    pub id: PoolId,
    pub persistent: bool,
    pub shared: Option<Uuid>,
    /// Its request counters.
    pub counters: CounterSnapshot,
}

/// One page read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRecord<'a> {
    pub pool: PoolId,
    pub oid: Oid,
    pub index: u64,
    pub payload: Payload<'a>,
}

/// What a section or a stream holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub clients: u64,
    pub pools: u64,
    pub pages: u64,
    /// Payload bytes (compressed or raw pages; same-filled pages have none).
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.clients += o.clients;
        self.pools += o.pools;
        self.pages += o.pages;
        self.bytes += o.bytes;
    }
}

fn put_counters(b: &mut Vec<u8>, c: &CounterSnapshot) {
    let v = c.requests();
    b.push(v.len() as u8);
    for x in v {
        b.extend_from_slice(&x.to_le_bytes());
    }
}

fn put_text(b: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(MAX_TEXT)];
    b.push(s.len() as u8);
    b.extend_from_slice(s);
}

/// Writes a stream. Pages are appended to a frame of at most about 64 KiB that is written
/// when full: nothing else of the store is copied.
#[derive(Debug)]
pub struct StateWriter<W: Write> {
    w: W,
    crc: u32,
    /// Body of the frame being built: a pages frame (for `pages_pool`) or a scratch record.
    body: Vec<u8>,
    pages_pool: Option<PoolId>,
    /// Pages of the current run still to come (their bits).
    run_left: u16,
    section: Tally,
    totals: Tally,
    in_client: bool,
}

impl<W: Write> StateWriter<W> {
    /// Starts a stream: preamble and header. `writer` is the daemon's version.
    pub fn new(
        mut w: W,
        scope: Scope,
        writer: &str,
        created: u64,
        clients: u32,
    ) -> io::Result<Self> {
        let mut pre = [0u8; PREAMBLE];
        pre[..8].copy_from_slice(&MAGIC);
        pre[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        w.write_all(&pre)?;
        let mut s = StateWriter {
            w,
            crc: crc32c::crc32c(&pre),
            body: Vec::with_capacity(PAGES_TARGET + 2 * PAGE_SIZE),
            pages_pool: None,
            run_left: 0,
            section: Tally::default(),
            totals: Tally::default(),
            in_client: false,
        };
        s.body.push(scope as u8);
        put_text(&mut s.body, writer);
        s.body.extend_from_slice(&created.to_le_bytes());
        s.body.extend_from_slice(&clients.to_le_bytes());
        s.emit(Kind::Header)?;
        Ok(s)
    }

    /// Writes `self.body` as one frame of `kind` and empties it.
    fn emit(&mut self, kind: Kind) -> io::Result<()> {
        let mut h = [0u8; FRAME_HEADER];
        h[0] = kind as u8;
        h[4..8].copy_from_slice(&(self.body.len() as u32).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c_append(self.crc, &h), &self.body);
        self.w.write_all(&h)?;
        self.w.write_all(&self.body)?;
        self.w.write_all(&crc.to_le_bytes())?;
        self.crc = crc;
        self.body.clear();
        Ok(())
    }

    /// Sends the pages frame being built, if any.
    fn flush_pages(&mut self) -> io::Result<()> {
        debug_assert_eq!(self.run_left, 0, "a run is written whole");
        if self.pages_pool.take().is_some() {
            self.emit(Kind::Pages)?;
        }
        Ok(())
    }

    /// Starts a client's section.
    pub fn begin_client(&mut self, name: &str, counters: &CounterSnapshot) -> io::Result<()> {
        assert!(!self.in_client, "sections do not nest");
        self.in_client = true;
        self.section = Tally {
            clients: 1,
            ..Tally::default()
        };
        put_text(&mut self.body, name);
        put_counters(&mut self.body, counters);
        self.emit(Kind::Client)
    }

    /// A pool of the client; its pages follow (`begin_run`).
    pub fn pool(&mut self, p: &PoolRecord) -> io::Result<()> {
        self.flush_pages()?;
        self.body.extend_from_slice(&p.id.to_le_bytes());
        let flags = if p.persistent { POOL_PERSISTENT } else { 0 }
            | if p.shared.is_some() { POOL_SHARED } else { 0 };
        self.body.push(flags);
        self.body.extend_from_slice(&p.shared.unwrap_or_default());
        put_counters(&mut self.body, &p.counters);
        self.section.pools += 1;
        self.emit(Kind::Pool)
    }

    /// Starts a run of pool `pool`: the pages of object `oid` at indexes `run * 16 + bit` for
    /// each bit set in `mask` (not 0), given next with [`page`](Self::page) in bit order.
    pub fn begin_run(&mut self, pool: PoolId, oid: &Oid, run: u64, mask: u16) -> io::Result<()> {
        assert!(mask != 0 && self.run_left == 0);
        if self.pages_pool != Some(pool) || self.body.len() >= PAGES_TARGET {
            self.flush_pages()?;
            self.body.extend_from_slice(&pool.to_le_bytes());
            self.pages_pool = Some(pool);
        }
        for w in oid {
            self.body.extend_from_slice(&w.to_le_bytes());
        }
        self.body.extend_from_slice(&run.to_le_bytes());
        self.body.extend_from_slice(&mask.to_le_bytes());
        self.run_left = mask;
        Ok(())
    }

    /// The run's next page, as stored.
    pub fn page(&mut self, p: Payload<'_>) {
        assert!(self.run_left != 0, "more pages than the run's mask");
        self.run_left &= self.run_left - 1;
        self.section.pages += 1;
        match p {
            Payload::Same(0) => self.body.push(TAG_ZERO),
            Payload::Same(w) => {
                self.body.push(TAG_SAME);
                self.body.extend_from_slice(&w.to_le_bytes());
            }
            Payload::Stored(Encoding::Raw, b) => {
                assert_eq!(b.len(), PAGE_SIZE, "a raw page is a page");
                self.body.push(TAG_RAW);
                self.body.extend_from_slice(b);
                self.section.bytes += b.len() as u64;
            }
            Payload::Stored(enc, b) => {
                self.body.push(if enc == Encoding::Lz4 {
                    TAG_LZ4
                } else {
                    TAG_ZSTD
                });
                self.body.extend_from_slice(&(b.len() as u16).to_le_bytes());
                self.body.extend_from_slice(b);
                self.section.bytes += b.len() as u64;
            }
        }
    }

    /// Ends the client's section; returns what it held.
    pub fn end_client(&mut self) -> io::Result<Tally> {
        assert!(self.in_client);
        self.flush_pages()?;
        let t = self.section;
        self.body.extend_from_slice(&(t.pools as u32).to_le_bytes());
        self.body.extend_from_slice(&t.pages.to_le_bytes());
        self.body.extend_from_slice(&t.bytes.to_le_bytes());
        self.emit(Kind::ClientEnd)?;
        self.totals.add(&t);
        self.in_client = false;
        Ok(t)
    }

    /// The sink, between frames.
    pub(crate) fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }

    /// Ends the stream; returns the writer (not flushed) and what the stream holds.
    pub fn finish(mut self) -> io::Result<(W, Tally)> {
        assert!(!self.in_client);
        let t = self.totals;
        self.body
            .extend_from_slice(&(t.clients as u32).to_le_bytes());
        self.body.extend_from_slice(&t.pools.to_le_bytes());
        self.body.extend_from_slice(&t.pages.to_le_bytes());
        self.body.extend_from_slice(&t.bytes.to_le_bytes());
        self.emit(Kind::End)?;
        Ok((self.w, t))
    }
}

/// A cursor over a frame body that reports where a field is missing.
struct Fields<'a> {
    b: &'a [u8],
    pos: usize,
    /// The frame's offset in the stream, and its kind, for errors.
    at: u64,
    kind: &'static str,
}

impl<'a> Fields<'a> {
    fn bad(&self, why: impl Into<String>) -> Error {
        Error::Malformed {
            offset: self.at,
            kind: self.kind,
            why: why.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Error> {
        if self.b.len() - self.pos < n {
            return Err(self.bad(format!(
                "{what} at byte {} of the record runs past its end ({} bytes)",
                self.pos,
                self.b.len()
            )));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self, what: &str) -> Result<u8, Error> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2"),
        ))
    }

    fn u32(&mut self, what: &str) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }

    fn u64(&mut self, what: &str) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }

    fn text(&mut self, what: &str) -> Result<String, Error> {
        let n = self.u8(what)? as usize;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad(format!("{what} is not UTF-8")))
    }

    fn counters(&mut self) -> Result<CounterSnapshot, Error> {
        let n = self.u8("counter count")? as usize;
        if n > MAX_COUNTERS {
            return Err(self.bad(format!("{n} counters (at most {MAX_COUNTERS})")));
        }
        let mut v = [0u64; MAX_COUNTERS];
        for x in v.iter_mut().take(n) {
            *x = self.u64("counter")?;
        }
        Ok(CounterSnapshot::from_requests(&v[..n]))
    }

    fn end(&self) -> Result<(), Error> {
        if self.pos == self.b.len() {
            Ok(())
        } else {
            Err(self.bad(format!(
                "{} bytes left over after its last field",
                self.b.len() - self.pos
            )))
        }
    }
}

/// Reads a stream, one record at a time, checking each before it is used.
#[derive(Debug)]
pub struct StateReader<R: Read> {
    r: R,
    /// Bytes read so far.
    offset: u64,
    crc: u32,
    /// The current frame's body (reused; at most `MAX_BODY`).
    body: Vec<u8>,
    /// Where the current frame starts.
    at: u64,
    header: StreamHeader,
    /// What the current section has held so far.
    section: Tally,
    totals: Tally,
    in_client: bool,
    ended: bool,
}

/// The next thing in a client's section.
#[derive(Debug)]
pub enum Item<'r> {
    Pool(PoolRecord),
    /// A frame of pages, all of one pool.
    Pages(Pages<'r>),
    /// The section ended; what it held.
    End(Tally),
}

impl<R: Read> StateReader<R> {
    /// Reads the preamble and the header record.
    pub fn new(r: R) -> Result<Self, Error> {
        let mut s = StateReader {
            r,
            offset: 0,
            crc: 0,
            body: Vec::new(),
            at: 0,
            header: StreamHeader {
                scope: Scope::Daemon,
                writer: String::new(),
                created: 0,
                clients: 0,
            },
            section: Tally::default(),
            totals: Tally::default(),
            in_client: false,
            ended: false,
        };
        let mut pre = [0u8; PREAMBLE];
        s.read_exact(&mut pre, "preamble")?;
        if pre[..8] != MAGIC {
            return Err(Error::BadMagic);
        }
        let version = u32::from_le_bytes(pre[8..12].try_into().expect("4"));
        if version != FORMAT_VERSION {
            return Err(Error::Version { found: version });
        }
        s.crc = crc32c::crc32c(&pre);
        let kind = s.frame()?;
        if kind != Kind::Header {
            return Err(s.unexpected(kind, "the header"));
        }
        let mut f = s.fields(kind);
        let scope = match f.u8("scope")? {
            1 => Scope::Daemon,
            2 => Scope::Client,
            x => return Err(f.bad(format!("unknown scope {x}"))),
        };
        let writer = f.text("daemon version")?;
        let created = f.u64("creation time")?;
        let clients = f.u32("client count")?;
        f.end()?;
        if scope == Scope::Client && clients != 1 {
            return Err(f.bad(format!("a one-client stream says {clients} clients")));
        }
        s.header = StreamHeader {
            scope,
            writer,
            created,
            clients,
        };
        Ok(s)
    }

    /// The stream's header.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// Bytes read so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), Error> {
        let mut done = 0;
        while done < buf.len() {
            match self.r.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(Error::Truncated {
                        offset: self.offset + done as u64,
                        what,
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(Error::Read {
                        offset: self.offset + done as u64,
                        source,
                    })
                }
            }
        }
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// Reads the next frame into `body` and checks it; returns its kind.
    fn frame(&mut self) -> Result<Kind, Error> {
        self.at = self.offset;
        let mut h = [0u8; FRAME_HEADER];
        self.read_exact(&mut h, "header of a record")?;
        let len = u32::from_le_bytes(h[4..8].try_into().expect("4")) as usize;
        if len > MAX_BODY {
            return Err(Error::TooLong {
                offset: self.at,
                len: len as u64,
            });
        }
        // At most MAX_BODY, whatever the stream says: the buffer is reused, never grown past it.
        let mut body = std::mem::take(&mut self.body);
        body.resize(len, 0);
        let read = self.read_exact(&mut body, "body of a record");
        self.body = body;
        read?;
        let mut c = [0u8; 4];
        self.read_exact(&mut c, "checksum of a record")?;
        let stored = u32::from_le_bytes(c);
        let computed = crc32c::crc32c_append(crc32c::crc32c_append(self.crc, &h), &self.body);
        if stored != computed {
            return Err(Error::Checksum {
                offset: self.at,
                stored,
                computed,
            });
        }
        self.crc = computed;
        if h[1..4] != [0, 0, 0] {
            return Err(Error::Malformed {
                offset: self.at,
                kind: "any",
                why: "reserved bytes are not zero".into(),
            });
        }
        Kind::from_u8(h[0]).ok_or(Error::UnknownKind {
            offset: self.at,
            kind: h[0],
        })
    }

    fn fields(&self, kind: Kind) -> Fields<'_> {
        Fields {
            b: &self.body,
            pos: 0,
            at: self.at,
            kind: kind.name(),
        }
    }

    fn unexpected(&self, found: Kind, expected: &'static str) -> Error {
        Error::Unexpected {
            offset: self.at,
            found: found.name(),
            expected,
        }
    }

    /// The next client section's first record, or `None` at the end of the stream (whose
    /// totals are checked against what was read).
    pub fn next_client(&mut self) -> Result<Option<ClientRecord>, Error> {
        assert!(
            !self.in_client,
            "the section before was not read to its end"
        );
        if self.ended {
            return Ok(None);
        }
        let kind = self.frame()?;
        match kind {
            Kind::Client => {
                let mut f = self.fields(kind);
                let name = f.text("client name")?;
                let counters = f.counters()?;
                f.end()?;
                if self.totals.clients >= self.header.clients as u64 {
                    return Err(f.bad(format!(
                        "more client sections than the {} the header announced",
                        self.header.clients
                    )));
                }
                self.in_client = true;
                self.section = Tally {
                    clients: 1,
                    ..Tally::default()
                };
                Ok(Some(ClientRecord { name, counters }))
            }
            Kind::End => {
                let mut f = self.fields(kind);
                let t = Tally {
                    clients: f.u32("client count")? as u64,
                    pools: f.u64("pool count")?,
                    pages: f.u64("page count")?,
                    bytes: f.u64("byte count")?,
                };
                f.end()?;
                if t != self.totals || t.clients != self.header.clients as u64 {
                    return Err(f.bad(format!(
                        "it counts {t:?} (header: {} clients), the stream held {:?}",
                        self.header.clients, self.totals
                    )));
                }
                self.ended = true;
                Ok(None)
            }
            k => Err(self.unexpected(k, "a client or the end record")),
        }
    }

    /// The next record of the current client's section.
    pub fn next_item(&mut self) -> Result<Item<'_>, Error> {
        assert!(self.in_client, "no section started");
        let kind = self.frame()?;
        match kind {
            Kind::Pool => {
                let mut f = self.fields(kind);
                let id = f.u32("pool id")?;
                let flags = f.u8("pool flags")?;
                let uuid: Uuid = f.take(16, "shared pool UUID")?.try_into().expect("16");
                let counters = f.counters()?;
                f.end()?;
                if flags & !(POOL_PERSISTENT | POOL_SHARED) != 0 {
                    return Err(f.bad(format!("unknown pool flags {flags:#x}")));
                }
                let shared = flags & POOL_SHARED != 0;
                if !shared && uuid != Uuid::default() {
                    return Err(f.bad("a private pool with a UUID"));
                }
                self.section.pools += 1;
                Ok(Item::Pool(PoolRecord {
                    id,
                    persistent: flags & POOL_PERSISTENT != 0,
                    shared: shared.then_some(uuid),
                    counters,
                }))
            }
            Kind::Pages => {
                let mut f = self.fields(kind);
                let pool = f.u32("pool id")?;
                let pos = f.pos;
                Ok(Item::Pages(Pages {
                    f: Fields {
                        b: &self.body,
                        pos,
                        at: self.at,
                        kind: kind.name(),
                    },
                    pool,
                    oid: [0; 3],
                    run: 0,
                    left: 0,
                    tally: &mut self.section,
                }))
            }
            Kind::ClientEnd => {
                let mut f = self.fields(kind);
                let t = Tally {
                    clients: 1,
                    pools: f.u32("pool count")? as u64,
                    pages: f.u64("page count")?,
                    bytes: f.u64("byte count")?,
                };
                f.end()?;
                if t != self.section {
                    return Err(f.bad(format!(
                        "it counts {} pools, {} pages, {} bytes; the section held {} pools, {} \
                         pages, {} bytes",
                        t.pools,
                        t.pages,
                        t.bytes,
                        self.section.pools,
                        self.section.pages,
                        self.section.bytes
                    )));
                }
                self.totals.add(&t);
                self.in_client = false;
                Ok(Item::End(t))
            }
            k => Err(self.unexpected(k, "a pool, pages or the client's end")),
        }
    }

    /// Checks that nothing follows the end record (a file; a stream that stays open would
    /// block here).
    pub fn finish(mut self) -> Result<Tally, Error> {
        assert!(self.ended, "the end record was not read");
        let mut b = [0u8; 1];
        loop {
            match self.r.read(&mut b) {
                Ok(0) => return Ok(self.totals),
                Ok(_) => {
                    return Err(Error::Trailing {
                        offset: self.offset,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(Error::Read {
                        offset: self.offset,
                        source,
                    })
                }
            }
        }
    }
}

/// The pages of one pages record, read one at a time.
#[derive(Debug)]
pub struct Pages<'r> {
    f: Fields<'r>,
    pool: PoolId,
    oid: Oid,
    run: u64,
    /// Bits of the current run still to come.
    left: u16,
    tally: &'r mut Tally,
}

impl std::fmt::Debug for Fields<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Fields({} at {} of {})",
            self.kind,
            self.pos,
            self.b.len()
        )
    }
}

impl<'r> Pages<'r> {
    /// The pool these pages belong to.
    pub fn pool(&self) -> PoolId {
        self.pool
    }

    /// The next page, or `None` at the end of the record.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<PageRecord<'r>>, Error> {
        if self.left == 0 {
            if self.f.pos == self.f.b.len() {
                return Ok(None);
            }
            for w in self.oid.iter_mut() {
                *w = self.f.u64("object id")?;
            }
            self.run = self.f.u64("run number")?;
            self.left = self.f.u16("page mask")?;
            if self.left == 0 {
                return Err(self.f.bad("a run with no pages"));
            }
            if self.run > u64::MAX >> 4 {
                return Err(self
                    .f
                    .bad(format!("run number {} is out of range", self.run)));
            }
        }
        let bit = self.left.trailing_zeros() as u64;
        self.left &= self.left - 1;
        let payload = match self.f.u8("page tag")? {
            TAG_ZERO => Payload::Same(0),
            TAG_SAME => Payload::Same(self.f.u64("fill pattern")?),
            TAG_RAW => Payload::Stored(Encoding::Raw, self.f.take(PAGE_SIZE, "raw page")?),
            t @ (TAG_LZ4 | TAG_ZSTD) => {
                let n = self.f.u16("payload length")? as usize;
                if n == 0 || n > PAGE_SIZE {
                    return Err(self.f.bad(format!("payload length {n} (1..={PAGE_SIZE})")));
                }
                let enc = if t == TAG_LZ4 {
                    Encoding::Lz4
                } else {
                    Encoding::Zstd
                };
                Payload::Stored(enc, self.f.take(n, "payload")?)
            }
            t => return Err(self.f.bad(format!("unknown page tag {t}"))),
        };
        self.tally.pages += 1;
        if let Payload::Stored(_, b) = payload {
            self.tally.bytes += b.len() as u64;
        }
        Ok(Some(PageRecord {
            pool: self.pool,
            oid: self.oid,
            index: (self.run << 4) | bit,
            payload,
        }))
    }
}

#[cfg(test)]
mod tests;
