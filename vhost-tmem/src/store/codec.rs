// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Page compressors with per-worker reusable state.
//!
//! Each worker thread owns one [`Codecs`]: an lz4 state and zstd contexts that are built once and
//! reset cheaply per page, because building a context or zeroing a hash table per 4 KiB page
//! costs as much as compressing it. lz4 is the C library (through `lz4-sys`'s static build)
//! because its `extState_fastReset` entry point reuses a caller-owned state; zstd is the C
//! library through `zstd-sys` (as re-exported by the `zstd` crate), with contexts of our own.
//!
//! Pages come in and go out as [`PageSrc`]/[`PageDst`] raw pointers, never Rust references:
//! they may be guest memory that the guest writes concurrently. The C codecs bound every access
//! by the lengths they are given, whatever the bytes hold or however they change meanwhile.

use std::ffi::{c_char, c_int, c_void};
use std::fmt;
use std::str::FromStr;

use shared_proto::PAGE_SIZE;
use zstd::zstd_safe::zstd_sys;

use super::page::{PageDst, PageSrc};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `--compressor` value that is not `none`, `lz4`, `zstd` or `zstd:LEVEL`.
    #[error("unknown compressor \"{0}\": expected none, lz4, zstd or zstd:LEVEL (-7..=19)")]
    UnknownCompressor(String),
    /// zstd refused to build a context.
    #[error("cannot create a zstd context")]
    Zstd(#[source] std::io::Error),
    /// A stored payload did not decompress to exactly one page.
    #[error("stored page is corrupt: it did not decompress to {PAGE_SIZE} bytes")]
    Corrupt,
}

/// Which compressor stores a pool's pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compressor {
    /// Store pages raw.
    None,
    /// lz4 block format, default acceleration.
    Lz4,
    /// zstd at a level (negative levels are the fast ones).
    Zstd(i32),
}

impl FromStr for Compressor {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::UnknownCompressor(s.to_string());
        match s {
            "none" => Ok(Compressor::None),
            "lz4" => Ok(Compressor::Lz4),
            "zstd" => Ok(Compressor::Zstd(1)),
            _ => {
                let level = s.strip_prefix("zstd:").ok_or_else(bad)?;
                let level: i32 = level.parse().map_err(|_| bad())?;
                if !(-7..=19).contains(&level) || level == 0 {
                    return Err(bad());
                }
                Ok(Compressor::Zstd(level))
            }
        }
    }
}

impl fmt::Display for Compressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compressor::None => write!(f, "none"),
            Compressor::Lz4 => write!(f, "lz4"),
            Compressor::Zstd(l) => write!(f, "zstd:{l}"),
        }
    }
}

/// How a page's payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    /// Uncompressed 4 KiB.
    Raw = 0,
    /// lz4 block.
    Lz4 = 1,
    /// zstd frame.
    Zstd = 2,
}

/// If every 8-byte word of the page `page` (exactly one page) is the same, that word: zero and
/// same-filled pages are stored without payload and never reach a codec.
pub fn same_filled(page: &[u8]) -> Option<u64> {
    PageSrc::new(page).same_filled()
}

/// Fills the page `out` (exactly one page) with the 8-byte `pattern`.
pub fn fill_same(out: &mut [u8], pattern: u64) {
    PageDst::new(out).fill(pattern)
}

// liblz4 1.10, compiled and linked by lz4-sys; these two entry points are not in its bindings.
extern "C" {
    fn LZ4_sizeofState() -> c_int;
    fn LZ4_compress_fast_extState(
        state: *mut c_void,
        src: *const c_char,
        dst: *mut c_char,
        src_size: c_int,
        dst_capacity: c_int,
        acceleration: c_int,
    ) -> c_int;
    fn LZ4_compress_fast_extState_fastReset(
        state: *mut c_void,
        src: *const c_char,
        dst: *mut c_char,
        src_size: c_int,
        dst_capacity: c_int,
        acceleration: c_int,
    ) -> c_int;
}

/// A zstd compression context of our own (the `zstd` crate's take slices only).
struct ZstdC(std::ptr::NonNull<zstd_sys::ZSTD_CCtx>);
/// A zstd decompression context of our own.
struct ZstdD(std::ptr::NonNull<zstd_sys::ZSTD_DCtx>);

// SAFETY: a zstd context is plain heap state with no thread affinity; each is owned by one
// Codecs and used only through `&mut Codecs`, so by one thread at a time.
unsafe impl Send for ZstdC {}
// SAFETY: as for ZstdC.
unsafe impl Send for ZstdD {}

fn zstd_error(what: &str) -> Error {
    Error::Zstd(std::io::Error::other(what.to_string()))
}

impl ZstdC {
    fn new(level: i32) -> Result<Self, Error> {
        // SAFETY: no arguments; returns an owned context or null.
        let c = std::ptr::NonNull::new(unsafe { zstd_sys::ZSTD_createCCtx() })
            .map(ZstdC)
            .ok_or_else(|| zstd_error("out of memory"))?;
        // Pages are always 4 KiB: the frame needs neither size, checksum nor dictionary id.
        for (p, v) in [
            (zstd_sys::ZSTD_cParameter::ZSTD_c_compressionLevel, level),
            (zstd_sys::ZSTD_cParameter::ZSTD_c_contentSizeFlag, 0),
            (zstd_sys::ZSTD_cParameter::ZSTD_c_checksumFlag, 0),
            (zstd_sys::ZSTD_cParameter::ZSTD_c_dictIDFlag, 0),
        ] {
            // SAFETY: a live context we own; parameters are plain integers.
            let r = unsafe { zstd_sys::ZSTD_CCtx_setParameter(c.0.as_ptr(), p, v) };
            // SAFETY: a pure function of its argument.
            if unsafe { zstd_sys::ZSTD_isError(r) } != 0 {
                return Err(zstd_error("cannot set a compression parameter"));
            }
        }
        Ok(c)
    }
}

impl Drop for ZstdC {
    fn drop(&mut self) {
        // SAFETY: the context is ours and freed once.
        unsafe { zstd_sys::ZSTD_freeCCtx(self.0.as_ptr()) };
    }
}

impl Drop for ZstdD {
    fn drop(&mut self) {
        // SAFETY: the context is ours and freed once.
        unsafe { zstd_sys::ZSTD_freeDCtx(self.0.as_ptr()) };
    }
}

/// A worker's compressor state. Not shared between threads.
pub struct Codecs {
    // u64 elements: liblz4 wants its state 8-byte aligned.
    lz4_state: Box<[u64]>,
    zstd: Option<(i32, ZstdC)>,
    unzstd: ZstdD,
    /// Compressed output of the last `compress`.
    out: Box<[u8]>,
}

impl fmt::Debug for Codecs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Codecs").finish_non_exhaustive()
    }
}

/// Room for any compressor's output on one page; anything larger is stored raw anyway.
const OUT_CAPACITY: usize = PAGE_SIZE + PAGE_SIZE / 8;

impl Codecs {
    /// Builds a worker's state.
    pub fn new() -> Result<Self, Error> {
        // SAFETY: a pure function of the library build.
        let state_size = unsafe { LZ4_sizeofState() } as usize;
        let mut lz4_state = vec![0u64; state_size.div_ceil(8)].into_boxed_slice();
        // One full initialization of the state, so that later calls may use the fast reset.
        let mut scratch = [0u8; 64];
        // SAFETY: the state is LZ4_sizeofState() bytes, 8-aligned, owned; src is an empty range
        // and dst a 64-byte buffer we own.
        unsafe {
            LZ4_compress_fast_extState(
                lz4_state.as_mut_ptr().cast(),
                scratch.as_ptr().cast(),
                scratch.as_mut_ptr().cast(),
                0,
                scratch.len() as c_int,
                1,
            );
        }
        // SAFETY: no arguments; returns an owned context or null.
        let unzstd = std::ptr::NonNull::new(unsafe { zstd_sys::ZSTD_createDCtx() })
            .map(ZstdD)
            .ok_or_else(|| zstd_error("out of memory"))?;
        Ok(Codecs {
            lz4_state,
            zstd: None,
            unzstd,
            out: vec![0u8; OUT_CAPACITY].into_boxed_slice(),
        })
    }

    /// Makes sure the zstd context is built for `level` (rebuilt only when the level changes).
    fn zstd(&mut self, level: i32) -> Result<(), Error> {
        if self.zstd.as_ref().map(|(l, _)| *l) != Some(level) {
            self.zstd = Some((level, ZstdC::new(level)?));
        }
        Ok(())
    }

    /// Compresses one page with `with`; returns the encoding and the output (borrowed from this
    /// state), or `None` if the output would not be smaller than `limit` bytes. The codec reads
    /// the page once, through its pointer.
    pub fn compress(
        &mut self,
        with: Compressor,
        page: PageSrc<'_>,
        limit: usize,
    ) -> Result<Option<(Encoding, &[u8])>, Error> {
        let limit = limit.min(OUT_CAPACITY);
        let (enc, n) = match with {
            Compressor::None => return Ok(None),
            Compressor::Lz4 => {
                // SAFETY: the state was fully initialized in new() and is only used by this
                // thread; src is PAGE_SIZE readable bytes (PageSrc's invariant), which liblz4
                // reads within [src, src + src_size) whatever they hold, also if they change
                // meanwhile; dst has `limit` writable bytes (<= OUT_CAPACITY) and liblz4 never
                // writes past dst_capacity.
                let n = unsafe {
                    LZ4_compress_fast_extState_fastReset(
                        self.lz4_state.as_mut_ptr().cast(),
                        page.as_ptr().cast(),
                        self.out.as_mut_ptr().cast(),
                        PAGE_SIZE as c_int,
                        limit as c_int,
                        1,
                    )
                };
                // 0 means "did not fit in limit".
                if n <= 0 {
                    return Ok(None);
                }
                (Encoding::Lz4, n as usize)
            }
            Compressor::Zstd(level) => {
                self.zstd(level)?;
                let c = &self.zstd.as_ref().expect("built above").1;
                // SAFETY: a live context of ours; dst has `limit` writable bytes of our own
                // buffer and src PAGE_SIZE readable bytes (PageSrc's invariant); zstd accesses
                // nothing outside them, whatever the source holds or however it changes.
                let n = unsafe {
                    zstd_sys::ZSTD_compress2(
                        c.0.as_ptr(),
                        self.out.as_mut_ptr().cast(),
                        limit,
                        page.as_ptr().cast(),
                        PAGE_SIZE,
                    )
                };
                // SAFETY: a pure function of its argument.
                if unsafe { zstd_sys::ZSTD_isError(n) } != 0 {
                    // "Destination buffer is too small": incompressible within the limit.
                    return Ok(None);
                }
                (Encoding::Zstd, n)
            }
        };
        if n >= limit {
            return Ok(None);
        }
        Ok(Some((enc, &self.out[..n])))
    }

    /// Decompresses `payload` into the page `out`, writing it once.
    pub fn decompress(
        &mut self,
        enc: Encoding,
        payload: &[u8],
        mut out: PageDst<'_>,
    ) -> Result<(), Error> {
        let n = match enc {
            Encoding::Raw => {
                if payload.len() != PAGE_SIZE {
                    return Err(Error::Corrupt);
                }
                out.copy_from(payload);
                PAGE_SIZE
            }
            Encoding::Lz4 => {
                // SAFETY: LZ4_decompress_safe reads at most payload.len() bytes from payload and
                // writes at most PAGE_SIZE bytes to out (PageDst's invariant: PAGE_SIZE
                // writable), whatever the payload holds; it reads back only bytes it wrote,
                // so a guest writing the page meanwhile garbles the page, not the bounds.
                let n = unsafe {
                    lz4_sys::LZ4_decompress_safe(
                        payload.as_ptr().cast(),
                        out.as_mut_ptr().cast(),
                        payload.len() as c_int,
                        PAGE_SIZE as c_int,
                    )
                };
                usize::try_from(n).map_err(|_| Error::Corrupt)?
            }
            Encoding::Zstd => {
                // SAFETY: a live context of ours; zstd writes at most PAGE_SIZE bytes to out
                // (PageDst's invariant) and reads at most payload.len() from payload, whatever
                // they hold.
                let n = unsafe {
                    zstd_sys::ZSTD_decompressDCtx(
                        self.unzstd.0.as_ptr(),
                        out.as_mut_ptr().cast(),
                        PAGE_SIZE,
                        payload.as_ptr().cast(),
                        payload.len(),
                    )
                };
                // SAFETY: a pure function of its argument.
                if unsafe { zstd_sys::ZSTD_isError(n) } != 0 {
                    return Err(Error::Corrupt);
                }
                n
            }
        };
        if n != PAGE_SIZE {
            return Err(Error::Corrupt);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testutil::random_page;

    fn text_page(seed: u32) -> Vec<u8> {
        let mut p = Vec::with_capacity(PAGE_SIZE);
        let mut i = seed;
        while p.len() < PAGE_SIZE {
            p.extend_from_slice(format!("line {i}: the quick brown fox {}\n", i % 7).as_bytes());
            i += 1;
        }
        p.truncate(PAGE_SIZE);
        p
    }

    #[test]
    fn parse_compressor() {
        assert_eq!("lz4".parse::<Compressor>().unwrap(), Compressor::Lz4);
        assert_eq!("zstd".parse::<Compressor>().unwrap(), Compressor::Zstd(1));
        assert_eq!(
            "zstd:-1".parse::<Compressor>().unwrap(),
            Compressor::Zstd(-1)
        );
        assert_eq!("none".parse::<Compressor>().unwrap(), Compressor::None);
        for bad in ["", "lz5", "zstd:", "zstd:x", "zstd:99", "zstd:0"] {
            let e = bad.parse::<Compressor>().unwrap_err().to_string();
            assert!(e.contains("unknown compressor"), "{bad}: {e}");
        }
        assert_eq!(Compressor::Zstd(3).to_string(), "zstd:3");
    }

    #[test]
    fn same_filled_detection() {
        assert_eq!(same_filled(&[0u8; PAGE_SIZE]), Some(0));
        let mut p = vec![0u8; PAGE_SIZE];
        fill_same(&mut p, 0x0102_0304_0506_0708);
        assert_eq!(same_filled(&p), Some(0x0102_0304_0506_0708));
        p[PAGE_SIZE - 1] ^= 1;
        assert_eq!(same_filled(&p), None);
        assert_eq!(same_filled(&text_page(0)), None);
    }

    #[test]
    fn round_trips_all_codecs() {
        let mut c = Codecs::new().unwrap();
        let mut out = vec![0u8; PAGE_SIZE];
        for with in [Compressor::Lz4, Compressor::Zstd(1), Compressor::Zstd(-1)] {
            // Many pages through the same state: the fast reset must not leak history.
            for seed in 0..50 {
                let page = text_page(seed * 13);
                let (enc, payload) = c
                    .compress(with, PageSrc::new(&page), PAGE_SIZE)
                    .unwrap()
                    .unwrap();
                assert!(payload.len() < PAGE_SIZE / 2, "{with}: {}", payload.len());
                let payload = payload.to_vec();
                c.decompress(enc, &payload, PageDst::new(&mut out)).unwrap();
                assert_eq!(out, page, "{with} seed {seed}");
            }
        }
    }

    #[test]
    fn incompressible_is_reported_and_corruption_detected() {
        let mut c = Codecs::new().unwrap();
        let page = random_page(42);
        for with in [Compressor::Lz4, Compressor::Zstd(1), Compressor::None] {
            assert!(c
                .compress(with, PageSrc::new(&page), PAGE_SIZE - 512)
                .unwrap()
                .is_none());
        }
        let mut out = vec![0u8; PAGE_SIZE];
        let (enc, payload) = c
            .compress(Compressor::Lz4, PageSrc::new(&text_page(1)), PAGE_SIZE)
            .unwrap()
            .unwrap();
        let mut bad = payload.to_vec();
        bad.truncate(bad.len() / 2);
        assert!(matches!(
            c.decompress(enc, &bad, PageDst::new(&mut out)),
            Err(Error::Corrupt)
        ));
        assert!(matches!(
            c.decompress(Encoding::Zstd, &bad, PageDst::new(&mut out)),
            Err(Error::Corrupt)
        ));
        assert!(matches!(
            c.decompress(Encoding::Raw, &bad, PageDst::new(&mut out)),
            Err(Error::Corrupt)
        ));
    }
}
