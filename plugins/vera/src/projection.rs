//! The shared frozen random projections `vera_A` `[r, max_in]` and `vera_B` `[max_out, r]`,
//! generated inside the plugin from `projection_prng_key`.
//!
//! The values come from SplitMix64 (Steele, Lea and Flood 2014, "Fast Splittable Pseudorandom
//! Number Generators"), a few lines of integer arithmetic, turned into uniforms with IEEE
//! operations only, so the native and the wasm32 builds produce bit-identical matrices and a
//! reloaded adapter regenerates exactly the ones it was trained with. The distribution is
//! PEFT's `_kaiming_init`: uniform in `±sqrt(6 / fan_in)` (Kaiming-uniform with gain `√2`),
//! `fan_in` being the second dimension (`max_in` for `vera_A`, `r` for `vera_B`). One stream
//! fills `vera_A` (row-major, in PEFT's layout) and then `vera_B`, as PEFT's one generator
//! does; the values differ from torch's, which this plugin cannot reproduce.

use whetstone_sdk::{Result, Tensor};

/// SplitMix64: a 64-bit state advanced by a Weyl sequence and mixed.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform sample in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `n` samples uniform in `[-bound, bound)`, as f32.
    pub fn uniform(&mut self, n: usize, bound: f64) -> Vec<f32> {
        (0..n)
            .map(|_| (bound * (2.0 * self.next_f64() - 1.0)) as f32)
            .collect()
    }
}

/// PEFT's `_kaiming_init` bound for a matrix whose second dimension is `fan_in`.
pub fn kaiming_bound(fan_in: usize) -> f64 {
    (6.0 / fan_in.max(1) as f64).sqrt()
}

/// The values of `vera_A` `[r, max_in]` and `vera_B` `[max_out, r]`, row-major, drawn from
/// one stream seeded with `key`.
pub fn values(key: u64, r: usize, max_in: usize, max_out: usize) -> (Vec<f32>, Vec<f32>) {
    let mut rng = SplitMix64::new(key);
    let a = rng.uniform(r * max_in, kaiming_bound(max_in));
    let b = rng.uniform(max_out * r, kaiming_bound(r));
    (a, b)
}

/// `m` `[rows, cols]` transposed to `[cols, rows]`, row-major.
pub fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; m.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = m[i * cols + j];
        }
    }
    out
}

/// The projections as host tensors, created once per method instance and shared by every
/// wrapped module. `vera_A` is kept transposed (`[max_in, r]`) so that a module's slice
/// `vera_A[:, :in]` is the contiguous row block `a_t[:in]`; `vera_B`'s slice `vera_B[:out]` is
/// contiguous as it is. Dropping them gives their handles back.
#[derive(Debug)]
pub struct Projections {
    /// `vera_Aᵀ` `[max_in, r]`.
    a_t: Tensor,
    /// `vera_B` `[max_out, r]`.
    b: Tensor,
    max_in: usize,
    max_out: usize,
}

impl Projections {
    /// Generates the projections for modules of at most `max_in` inputs and `max_out`
    /// outputs.
    pub fn new(key: u64, r: usize, max_in: usize, max_out: usize) -> Result<Projections> {
        let (a, b) = values(key, r, max_in, max_out);
        Ok(Projections {
            a_t: Tensor::from_slice(&transpose(&a, r, max_in), &[max_in, r])?,
            b: Tensor::from_slice(&b, &[max_out, r])?,
            max_in,
            max_out,
        })
    }

    /// `vera_A[:, :in]ᵀ` `[in, r]` and `vera_B[:out, :]` `[out, r]` for a module.
    pub fn slices(&self, in_features: usize, out_features: usize) -> Result<(Tensor, Tensor)> {
        if in_features > self.max_in || out_features > self.max_out {
            return Err(whetstone_sdk::Error::msg(format!(
                "a module [{out_features}, {in_features}] is larger than the shared \
                 projections [{}, {}]",
                self.max_out, self.max_in
            )));
        }
        Ok((
            self.a_t.narrow(0, 0, in_features)?,
            self.b.narrow(0, 0, out_features)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // The reference implementation's first outputs for seed 0.
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(rng.next_u64(), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn projections_are_kaiming_uniform_and_reproducible() {
        let (a, b) = values(0, 8, 300, 200);
        assert_eq!((a.len(), b.len()), (8 * 300, 200 * 8));
        let (ba, bb) = (kaiming_bound(300) as f32, kaiming_bound(8) as f32);
        assert!(a.iter().all(|v| v.abs() <= ba));
        assert!(b.iter().all(|v| v.abs() <= bb));
        // Spread over the whole interval, centred.
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.05 * ba, "{mean}");
        assert!(a.iter().any(|v| *v > 0.9 * ba) && a.iter().any(|v| *v < -0.9 * ba));
        assert_eq!(values(0, 8, 300, 200), (a.clone(), b));
        assert_ne!(values(1, 8, 300, 200).0, a);
    }

    #[test]
    fn transpose_swaps_rows_and_columns() {
        let m = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        assert_eq!(transpose(&m, 2, 3), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }
}
