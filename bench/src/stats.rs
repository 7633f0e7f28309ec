// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Statistics of interleaved measurement: a ratio is taken within each pair of adjacent rounds
//! (store, then its limit, on the same pages), and the figure is the median of those per-pair
//! ratios with their spread, so one slow window moves one pair, not the result.

/// The median of `v` (the mean of the middle two for an even count); 0 when empty.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The spread of `v`: its smallest and largest value; (0, 0) when empty.
pub fn spread(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// `a[i] / b[i]` for each pair `i`; a pair whose divisor is not positive (nothing measured)
/// is left out.
pub fn per_pair(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .filter(|(_, &b)| b > 0.0)
        .map(|(&a, &b)| a / b)
        .collect()
}

/// Rounds to three decimals, as report.json writes ratios.
pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
        assert_eq!(median(&[]), 0.0);
        // One outlier (a slow window) does not move it.
        assert_eq!(median(&[1.0, 1.1, 9.0, 1.2, 1.05]), 1.1);
    }

    #[test]
    fn spread_is_min_and_max() {
        assert_eq!(spread(&[1.2, 0.9, 1.5, 1.0]), (0.9, 1.5));
        assert_eq!(spread(&[2.0]), (2.0, 2.0));
        assert_eq!(spread(&[]), (0.0, 0.0));
    }

    #[test]
    fn per_pair_divides_within_each_pair() {
        assert_eq!(
            per_pair(&[2.0, 3.0, 5.0], &[1.0, 2.0, 4.0]),
            [2.0, 1.5, 1.25]
        );
        // A pair with nothing measured as the divisor is dropped, not turned into inf.
        assert_eq!(per_pair(&[2.0, 3.0], &[0.0, 3.0]), [1.0]);
        // Extra rounds on one side have no partner.
        assert_eq!(per_pair(&[1.0, 2.0, 3.0], &[1.0]), [1.0]);
        // The window slowed both sides 16-fold over the run; every pair still says 2.
        let store = [2.0, 4.0, 8.0, 16.0, 32.0];
        let limit = [1.0, 2.0, 4.0, 8.0, 16.0];
        assert_eq!(median(&per_pair(&store, &limit)), 2.0);
        assert_eq!(round3(2.0 / 3.0), 0.667);
    }
}
