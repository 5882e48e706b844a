//! 4-bit NormalFloat (NF4) with double quantization, as QLoRA defines it (Dettmers, Pagnoni,
//! Holtzman and Zettlemoyer 2023, "QLoRA: Efficient Finetuning of Quantized LLMs").
//!
//! A matrix is cut into blocks of [`BLOCK`] = 64 consecutive weights (along a row). Each block
//! keeps its absolute maximum `a`; each weight keeps the 4-bit index of the nearest of the 16
//! NF4 levels [`NF4_LEVELS`] (the quantiles of a standard normal distribution, rescaled to
//! `[-1, 1]`, with an exact 0) to `w / a`. Dequantized, `w ≈ NF4[code] · a`.
//!
//! **Double quantization** stores the absmaxes themselves in 8 bits: their mean `μ` is
//! subtracted, and each group of [`ABSMAX_BLOCK`] = 256 centred absmaxes is scaled by its own
//! f32 factor into the range of an FP8 number (E4M3: 4 exponent bits, 3 mantissa bits), so a
//! block's scale is `a' = μ + s_g · fp8`. The 4-bit codes are chosen against the dequantized
//! `a'` (the scale the weights are rebuilt with), which never makes the error larger than
//! choosing them against `a`. Cost per weight: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits.
//!
//! Two codes share a byte, the first of a pair in the high nibble (bitsandbytes' order).

use rayon::prelude::*;

use super::QuantError;

/// The 16 NF4 levels (bitsandbytes' `NF4` table): quantiles of N(0, 1) normalised to [-1, 1].
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Weights per block (one absmax each).
pub const BLOCK: usize = 64;
/// Absmaxes per group of the second quantization (one f32 scale each).
pub const ABSMAX_BLOCK: usize = 256;
/// The centred absmaxes of a group are scaled to at most this magnitude before the FP8
/// conversion (E4M3's largest finite value in the `float8` crate's encoding is 416).
const FP8_RANGE: f32 = 400.0;

/// A `[rows, cols]` matrix in NF4 with double-quantized block scales.
#[derive(Debug, Clone)]
pub struct Nf4Matrix {
    rows: usize,
    cols: usize,
    /// Two 4-bit codes per byte, row-major.
    codes: Vec<u8>,
    /// One FP8 (E4M3) code per block: `(a − μ) / s_g`.
    absmax_codes: Vec<u8>,
    /// One scale `s_g` per [`ABSMAX_BLOCK`] blocks.
    absmax_scales: Vec<f32>,
    /// `μ`, the mean of all block absmaxes.
    absmax_mean: f32,
}

/// The index of the NF4 level nearest to `v` (`v` in `[-1, 1]`; outside, the end levels).
fn nearest_level(v: f32) -> u8 {
    // Midpoints between neighbouring levels: level i wins on (mid[i-1], mid[i]].
    let mut best = 0u8;
    for i in 1..NF4_LEVELS.len() {
        let mid = 0.5 * (NF4_LEVELS[i - 1] + NF4_LEVELS[i]);
        if v > mid {
            best = i as u8;
        } else {
            break;
        }
    }
    best
}

/// An f32 in E4M3 (saturating), as its bits.
fn to_fp8(x: f32) -> u8 {
    float8::F8E4M3::from_f32(x).to_bits()
}

/// The f32 value of E4M3 bits.
fn from_fp8(bits: u8) -> f32 {
    float8::F8E4M3::from_bits(bits).to_f32()
}

impl Nf4Matrix {
    /// Quantizes the row-major `values` of a `[rows, cols]` matrix. `cols` must be a multiple of
    /// [`BLOCK`] (so that no block straddles two rows) and every value finite.
    pub fn quantize(values: &[f32], rows: usize, cols: usize) -> Result<Self, QuantError> {
        if cols == 0 || !cols.is_multiple_of(BLOCK) {
            return Err(QuantError::Shape(format!(
                "NF4 needs rows whose length is a multiple of {BLOCK}; this matrix is \
                 [{rows}, {cols}]"
            )));
        }
        if values.len() != rows * cols {
            return Err(QuantError::Shape(format!(
                "{} values for a [{rows}, {cols}] matrix",
                values.len()
            )));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(QuantError::NonFinite(i));
        }
        let absmax: Vec<f32> = values
            .par_chunks(BLOCK)
            .map(|b| b.iter().fold(0.0f32, |m, v| m.max(v.abs())))
            .collect();
        let blocks = absmax.len();
        let mean = if blocks == 0 {
            0.0
        } else {
            (absmax.iter().map(|&a| f64::from(a)).sum::<f64>() / blocks as f64) as f32
        };
        let absmax_scales: Vec<f32> = absmax
            .chunks(ABSMAX_BLOCK)
            .map(|g| g.iter().fold(0.0f32, |m, &a| m.max((a - mean).abs())) / FP8_RANGE)
            .collect();
        let absmax_codes: Vec<u8> = absmax
            .iter()
            .enumerate()
            .map(|(i, &a)| {
                let s = absmax_scales[i / ABSMAX_BLOCK];
                if s > 0.0 {
                    to_fp8((a - mean) / s)
                } else {
                    to_fp8(0.0)
                }
            })
            .collect();
        let mut m = Nf4Matrix {
            rows,
            cols,
            codes: vec![0; values.len() / 2],
            absmax_codes,
            absmax_scales,
            absmax_mean: mean,
        };
        let scales: Vec<f32> = (0..blocks).map(|b| m.block_scale(b)).collect();
        m.codes
            .par_chunks_mut(BLOCK / 2)
            .zip(values.par_chunks(BLOCK))
            .zip(scales.par_iter())
            .for_each(|((out, block), &scale)| {
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                for (o, pair) in out.iter_mut().zip(block.chunks(2)) {
                    let hi = nearest_level(pair[0] * inv);
                    let lo = nearest_level(pair[1] * inv);
                    *o = (hi << 4) | lo;
                }
            });
        Ok(m)
    }

    /// The dequantized absmax `a' = μ + s_g · fp8` of block `b`.
    fn block_scale(&self, b: usize) -> f32 {
        self.absmax_mean + self.absmax_scales[b / ABSMAX_BLOCK] * from_fp8(self.absmax_codes[b])
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held (codes, FP8 absmaxes, f32 group scales and the mean).
    pub fn size_in_bytes(&self) -> usize {
        self.codes.len() + self.absmax_codes.len() + 4 * self.absmax_scales.len() + 4
    }

    /// Writes rows `start..start + n` as f32 into `out` (`n · cols` values, row-major).
    pub fn dequantize_rows(
        &self,
        start: usize,
        n: usize,
        out: &mut [f32],
    ) -> Result<(), QuantError> {
        if start + n > self.rows || out.len() != n * self.cols {
            return Err(QuantError::Shape(format!(
                "rows {start}..{} of a [{}, {}] NF4 matrix into {} values",
                start + n,
                self.rows,
                self.cols,
                out.len()
            )));
        }
        let first_block = start * self.cols / BLOCK;
        let codes = &self.codes[start * self.cols / 2..(start + n) * self.cols / 2];
        out.par_chunks_mut(BLOCK)
            .zip(codes.par_chunks(BLOCK / 2))
            .enumerate()
            .for_each(|(i, (o, c))| {
                let scale = self.block_scale(first_block + i);
                for (pair, &byte) in o.chunks_mut(2).zip(c) {
                    pair[0] = NF4_LEVELS[usize::from(byte >> 4)] * scale;
                    pair[1] = NF4_LEVELS[usize::from(byte & 0x0f)] * scale;
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal_values(n: usize, seed: u64) -> Vec<f32> {
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 0.02).unwrap();
        (0..n).map(|_| normal.sample(&mut rng)).collect()
    }

    #[test]
    fn levels_are_sorted_and_the_nearest_level_is_found() {
        assert!(NF4_LEVELS.windows(2).all(|w| w[0] < w[1]));
        for (i, &level) in NF4_LEVELS.iter().enumerate() {
            assert_eq!(usize::from(nearest_level(level)), i);
        }
        assert_eq!(nearest_level(-2.0), 0);
        assert_eq!(nearest_level(2.0), 15);
        assert_eq!(nearest_level(0.03), 7);
        assert_eq!(nearest_level(0.05), 8);
    }

    #[test]
    fn round_trip_error_is_that_of_4_bits_and_zero_blocks_stay_zero() {
        let (rows, cols) = (48, 320);
        let mut values = normal_values(rows * cols, 1);
        values[..BLOCK].fill(0.0);
        let m = Nf4Matrix::quantize(&values, rows, cols).unwrap();
        let mut out = vec![0.0; rows * cols];
        m.dequantize_rows(0, rows, &mut out).unwrap();
        assert!(out[..BLOCK].iter().all(|&v| v == 0.0));
        let mean_abs = values.iter().map(|v| v.abs()).sum::<f32>() / values.len() as f32;
        let err = values
            .iter()
            .zip(&out)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / values.len() as f32;
        // NF4 on normal weights: the mean error is about 6-8% of the mean magnitude.
        assert!(
            err < 0.1 * mean_abs,
            "mean abs error {err} vs mean |w| {mean_abs}"
        );
        // A block's largest weight comes back within the FP8 error of its scale.
        let a = values[BLOCK..2 * BLOCK]
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()));
        let b = out[BLOCK..2 * BLOCK]
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()));
        assert!((a - b).abs() < 0.07 * a, "{a} vs {b}");
        assert!(
            m.size_in_bytes() * 8 < rows * cols * 5,
            "about 4.1 bits per weight"
        );
    }

    #[test]
    fn a_row_range_matches_the_whole_matrix() {
        let (rows, cols) = (10, 128);
        let values = normal_values(rows * cols, 2);
        let m = Nf4Matrix::quantize(&values, rows, cols).unwrap();
        let mut all = vec![0.0; rows * cols];
        m.dequantize_rows(0, rows, &mut all).unwrap();
        let mut part = vec![0.0; 3 * cols];
        m.dequantize_rows(4, 3, &mut part).unwrap();
        assert_eq!(part, all[4 * cols..7 * cols]);
        assert!(m.dequantize_rows(9, 2, &mut part[..2 * cols]).is_err());
    }

    #[test]
    fn bad_shapes_and_values_are_refused() {
        assert!(matches!(
            Nf4Matrix::quantize(&[0.0; 30], 1, 30),
            Err(QuantError::Shape(_))
        ));
        let mut v = vec![0.0; 64];
        v[5] = f32::NAN;
        assert!(matches!(
            Nf4Matrix::quantize(&v, 1, 64),
            Err(QuantError::NonFinite(5))
        ));
    }
}
