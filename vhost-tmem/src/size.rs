// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Sizes as people write them (`64K`, `1G`), and durations (`10m`, `500ms`): parsed for the
//! command line, the configuration file and `vhost-tmem ctl`, and formatted for help texts
//! and logs.

use std::time::Duration;

/// A size that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid size \"{0}\": expected a number with an optional K, M, G or T suffix (KiB, MiB, ... also accepted)")]
    Invalid(String),
    #[error("invalid duration \"{0}\": expected a number of seconds, or a number with ms, s, m or h, or \"off\"")]
    InvalidDuration(String),
}

const SUFFIXES: [(char, u32); 4] = [('T', 40), ('G', 30), ('M', 20), ('K', 10)];

/// Parses `4096`, `64K`, `512M`, `1G`, `2T`, also with `iB`/`B` suffixes (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, Error> {
    let bad = || Error::Invalid(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// Formats a size with the largest suffix that keeps it exact, as [`parse_size`] reads it.
pub fn format_size(bytes: u64) -> String {
    SUFFIXES
        .iter()
        .find(|(_, shift)| bytes != 0 && bytes.trailing_zeros() >= *shift)
        .map(|(suffix, shift)| format!("{}{suffix}", bytes >> shift))
        .unwrap_or_else(|| bytes.to_string())
}

/// Parses a duration: `90` (seconds), `500ms`, `30s`, `10m`, `2h`; `off` (or `never`) is
/// `None`, no limit.
pub fn parse_duration(s: &str) -> Result<Option<Duration>, Error> {
    let bad = || Error::InvalidDuration(s.to_string());
    let t = s.trim();
    if matches!(t, "off" | "never") {
        return Ok(None);
    }
    let (num, unit_ms) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1_000)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        (t, 1_000)
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    let ms = n.checked_mul(unit_ms).ok_or_else(bad)?;
    Ok(Some(Duration::from_millis(ms)))
}

/// Formats a duration as [`parse_duration`] reads it, in the largest unit that keeps it
/// exact (`10m`, `90s`, `1500ms`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    [(3_600_000, "h"), (60_000, "m"), (1_000, "s")]
        .iter()
        .find(|(unit, _)| ms != 0 && ms.is_multiple_of(*unit))
        .map(|(unit, suffix)| format!("{}{suffix}", ms / unit))
        .unwrap_or_else(|| {
            if ms == 0 {
                "0s".into()
            } else {
                format!("{ms}ms")
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("2TB").unwrap(), 2 << 40);
        for bad in ["", "G", "1X", "-1", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formatted_sizes_parse_back() {
        assert_eq!(format_size(1 << 30), "1G");
        assert_eq!(format_size(3 << 20), "3M");
        assert_eq!(format_size(3072), "3K");
        assert_eq!(format_size(1536), "1536");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(0), "0");
        for b in [0, 1, 4096, 1 << 30, 3 << 40, (1 << 20) + 1, u64::MAX] {
            assert_eq!(parse_size(&format_size(b)).unwrap(), b, "{b}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Some(Duration::from_secs(90)));
        assert_eq!(
            parse_duration("500ms").unwrap(),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            parse_duration("10m").unwrap(),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            parse_duration("2h").unwrap(),
            Some(Duration::from_secs(7200))
        );
        assert_eq!(parse_duration("0").unwrap(), Some(Duration::ZERO));
        assert_eq!(parse_duration("off").unwrap(), None);
        assert_eq!(parse_duration("never").unwrap(), None);
        for bad in ["", "m", "1d", "-1", "1.5s", "99999999999999999999h"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.to_string().contains("invalid duration"), "{bad}: {e}");
        }
        for d in [0, 1, 999, 1000, 1500, 60_000, 90_000, 600_000, 3_600_000] {
            let d = Duration::from_millis(d);
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), Some(d));
        }
        assert_eq!(format_duration(Duration::from_secs(600)), "10m");
    }
}
