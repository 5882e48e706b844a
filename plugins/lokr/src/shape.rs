//! How PEFT splits a linear module's `[out, in]` weight into the two Kronecker factors, and
//! which factors it stores whole or as a low-rank product (`peft.tuners.lokr.layer`).

/// PEFT's `factorization(dimension, factor)`: two numbers whose product is `dimension`.
///
/// A positive `factor` that divides `dimension` gives `(factor, dimension / factor)` as it is
/// (PEFT does not reorder this case). Otherwise the divisor pair is walked up from
/// `(1, dimension)` towards the square root, stopping before the smaller number would exceed
/// `factor` (`-1`: no limit), and returned smaller first.
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if let Ok(f) = usize::try_from(factor) {
        if f > 0 && dimension.is_multiple_of(f) {
            return (f, dimension / f);
        }
    }
    let limit = if factor == -1 {
        i64::try_from(dimension).unwrap_or(i64::MAX)
    } else {
        factor
    };
    let (mut m, mut n) = (1usize, dimension);
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        // PEFT also breaks when `new_m + new_n` exceeds `1 + dimension`, which a divisor pair
        // never does.
        if i64::try_from(new_m).map_or(true, |v| v > limit) {
            break;
        }
        (m, n) = (new_m, dimension / new_m);
    }
    if m > n {
        (n, m)
    } else {
        (m, n)
    }
}

/// The factor shapes of one wrapped linear: `ΔW = kron(w1, w2)` with `w1` `[out_l, in_m]` and
/// `w2` `[out_k, in_n]`, `out = out_l · out_k`, `in = in_m · in_n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KronShape {
    /// `(out_l, out_k)`: `factorization(out, decompose_factor)`.
    pub out: (usize, usize),
    /// `(in_m, in_n)`: `factorization(in, decompose_factor)`.
    pub inp: (usize, usize),
    /// Rank of the low-rank factors.
    pub r: usize,
    /// `w1` is stored whole (`lokr_w1`), else as `lokr_w1_a · lokr_w1_b`.
    pub full_w1: bool,
    /// `w2` is stored whole (`lokr_w2`), else as `lokr_w2_a · lokr_w2_b`.
    pub full_w2: bool,
}

impl KronShape {
    /// PEFT's choice for a linear `[out, in]` with rank `r`: `w1` is decomposed only with
    /// `decompose_both` and `r < max(out_l, in_m) / 2`; `w2` whenever `r < max(out_k, in_n) / 2`.
    pub fn new(
        out: usize,
        inp: usize,
        r: usize,
        decompose_both: bool,
        decompose_factor: i64,
    ) -> KronShape {
        let out = factorization(out, decompose_factor);
        let inp = factorization(inp, decompose_factor);
        // `r < max / 2` on reals is `2 r < max` on integers.
        let full_w1 = !(decompose_both && 2 * r < out.0.max(inp.0));
        let full_w2 = 2 * r >= out.1.max(inp.1);
        KronShape {
            out,
            inp,
            r,
            full_w1,
            full_w2,
        }
    }

    /// `w1`'s shape `[out_l, in_m]`.
    pub fn w1(&self) -> [usize; 2] {
        [self.out.0, self.inp.0]
    }

    /// `w2`'s shape `[out_k, in_n]`.
    pub fn w2(&self) -> [usize; 2] {
        [self.out.1, self.inp.1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factorization_matches_peft() {
        // PEFT's docstring examples and values printed by peft 0.21's `factorization`.
        assert_eq!(factorization(256, -1), (16, 16));
        assert_eq!(factorization(128, -1), (8, 16));
        assert_eq!(factorization(127, -1), (1, 127));
        assert_eq!(factorization(128, 4), (4, 32));
        assert_eq!(factorization(48, -1), (6, 8));
        assert_eq!(factorization(384, -1), (16, 24));
        assert_eq!(factorization(1536, -1), (32, 48));
        assert_eq!(factorization(1, -1), (1, 1));
        // A dividing factor is returned unordered; a non-dividing one caps the smaller number.
        assert_eq!(factorization(128, 32), (32, 4));
        assert_eq!(factorization(384, 5), (4, 96));
        assert_eq!(factorization(100, 0), (1, 100));
        assert_eq!(factorization(100, -3), (1, 100));
    }

    #[test]
    fn factor_choice_matches_peft() {
        // q_proj of a 48 → 32 layer at r 4: w1 [6, 4] and w2 [8, 8], both whole.
        let s = KronShape::new(48, 32, 4, false, -1);
        assert_eq!((s.w1(), s.w2()), ([6, 4], [8, 8]));
        assert!(s.full_w1 && s.full_w2);
        // r 1 with decompose_both: both low-rank.
        let s = KronShape::new(48, 32, 1, true, -1);
        assert!(!s.full_w1 && !s.full_w2);
        // MiniLM 384 → 384 at r 8: w1 [16, 16] whole, w2 [24, 24] as 24×8 · 8×24.
        let s = KronShape::new(384, 384, 8, false, -1);
        assert_eq!((s.w1(), s.w2()), ([16, 16], [24, 24]));
        assert!(s.full_w1 && !s.full_w2);
        // The boundary: r = max / 2 keeps the factor whole.
        assert!(KronShape::new(384, 384, 12, false, -1).full_w2);
        assert!(!KronShape::new(384, 384, 11, false, -1).full_w2);
    }
}
