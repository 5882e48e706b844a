//! Branch-free f32 `exp` and `erf` that the compiler turns into vector code, and [`vectorized`],
//! which runs a loop with the widest vector instructions the CPU has.
//!
//! The host is built for the baseline x86-64 target (SSE2), where a loop over `f32::exp` or
//! candle's `erf` is a call per element into a scalar routine with branches: on MiniLM's
//! `[tokens, 1536]` GELU activations that was 30% of a LoRA training step. These functions are
//! straight-line arithmetic (`min`/`max`, products, sums, bit casts), so inside [`vectorized`]
//! they compile to 8-wide AVX2 code on a CPU that has it (runtime detection through `pulp`) and
//! to SSE2 code elsewhere.
//!
//! No fused multiply-add is written or contracted, so the SSE2 and AVX2 versions return the same
//! bits: results do not depend on the machine.

/// Runs `f` (a loop over slices) compiled for the CPU's widest vector instruction set
/// (AVX2 + FMA on x86-64 when present, detected at run time; plain code otherwise).
///
/// Mark the closure, and any closure it calls per element, `#[inline(always)]`: the loop is
/// only compiled for those instructions once it is inlined into the dispatching function, and
/// across codegen units the compiler does not inline it on its own.
#[inline(always)]
pub(super) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// `log2(e)`.
const LOG2_E: f32 = std::f32::consts::LOG2_E;

/// `ln 2` split in a part exact in few bits and the remainder (Cody-Waite reduction, Cephes).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `1.5 · 2²³`: adding it to a float of magnitude below 2²² rounds that float to an integer,
/// which then sits in the low mantissa bits.
const ROUNDING_MAGIC: f32 = 12_582_912.0;

/// `e^x` for f32, within 2 ulp of the exact value on `[-87, 88]`: 0 below `-87` (where f32's
/// normal range ends; so `exp(-∞) = 0`), `e^88` above 88, NaN for NaN. Polynomial after
/// Cephes' `expf`.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    let clamped = x.clamp(-87.0, 88.0);
    // n = round(x / ln 2), as a float and as the integer in the low bits of `t`.
    let t = clamped * LOG2_E + ROUNDING_MAGIC;
    let n = t - ROUNDING_MAGIC;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // 2^n from the exponent bits: n sits in the low bits of `t`'s mantissa.
    let n_bits = t.to_bits().wrapping_sub(ROUNDING_MAGIC.to_bits());
    let two_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    // `x < -87` is false for NaN, which the arithmetic above carries through.
    let underflow = u32::from(x < -87.0).wrapping_neg();
    f32::from_bits((e_r * two_n).to_bits() & !underflow)
}

/// The error function for f32, within 5e-7 of the exact value everywhere (a rational
/// approximation on `[-4, 4]`, the form Eigen and TensorFlow use; outside that range `erf` is
/// ±1 in f32). Odd, so relative accuracy holds near 0 too.
#[inline(always)]
pub(super) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_6e-3;
    p = p * x2 - 1.609_603_3e-2;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329e-3;
    q = q * x2 - 1.426_474e-2;
    x * p / q
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Evenly spaced points over `[lo, hi]`.
    fn grid(lo: f64, hi: f64, n: usize) -> impl Iterator<Item = f64> {
        (0..=n).map(move |i| lo + (hi - lo) * i as f64 / n as f64)
    }

    #[test]
    fn exp_is_within_two_ulp_over_its_range() {
        let mut worst = 0.0f64;
        for x in grid(-87.0, 88.0, 400_000) {
            let x = x as f32;
            let exact = (x as f64).exp();
            let got = vectorized(|| exp(x)) as f64;
            worst = worst.max(((got - exact) / exact).abs());
        }
        // 2 ulp of f32 is 2.4e-7 relative.
        assert!(worst < 2.4e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-88.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn erf_is_within_5e7_of_the_exact_value() {
        let mut worst = 0.0f64;
        for x in grid(-8.0, 8.0, 400_000) {
            let x = x as f32;
            let exact = candle_core::cpu::erf::erf_f64(x as f64);
            worst = worst.max((erf(x) as f64 - exact).abs());
        }
        assert!(worst < 5e-7, "worst absolute error {worst:e}");
        // Odd, and relatively accurate near zero (erf(x) ≈ 2x/√π).
        assert_eq!(erf(-0.3), -erf(0.3));
        let tiny = 1e-6f32;
        let expected = 2.0 * tiny as f64 / std::f64::consts::PI.sqrt();
        assert!(((erf(tiny) as f64 - expected) / expected).abs() < 1e-6);
    }

    #[test]
    fn the_vectorized_loop_returns_the_scalar_bits() {
        let xs: Vec<f32> = grid(-6.0, 6.0, 10_000).map(|x| x as f32).collect();
        let scalar: Vec<(u32, u32)> = xs
            .iter()
            .map(|&x| (exp(x).to_bits(), erf(x).to_bits()))
            .collect();
        let vector: Vec<(u32, u32)> = vectorized(|| {
            xs.iter()
                .map(|&x| (exp(x).to_bits(), erf(x).to_bits()))
                .collect()
        });
        assert_eq!(scalar, vector);
    }
}
