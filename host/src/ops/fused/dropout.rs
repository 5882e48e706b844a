//! Dropout whose mask is a function of a key and the element's index, so that it is drawn in
//! parallel as vector code and never stored: the backward pass computes it again.
//!
//! Element `i` is kept when the top 24 bits of `h(i) = mix(mix(i ⊕ k₀) + k₁)` are at least
//! `p · 2²⁴`, where `mix` is a 32-bit integer finalizer (Wellons' `lowbias32`, a bijection with
//! low avalanche bias) and `(k₀, k₁)` is a 64-bit key drawn from the caller's seeded generator
//! once per call. A serial generator and a stored f32 mask cost a MiniLM LoRA step about 5% of
//! its time and a mask's worth of memory per dropout.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::vector_math::vectorized;
use super::{contiguous, supports, with_slice, Real};

/// Elements per rayon task; a power of two, so that no task straddles a 2³² boundary of the
/// element index.
const CHUNK: usize = 1 << 14;

/// The mask of one dropout call: which elements survive, and their scale `1 / (1 - p)`.
#[derive(Clone, Copy, Debug)]
struct Mask {
    key: (u32, u32),
    /// Elements whose 24-bit draw is below this are dropped: `round(p · 2²⁴)`.
    threshold: u32,
    /// `1 / (1 - p)`.
    scale: f64,
}

/// Wellons' `lowbias32` integer finalizer.
#[inline(always)]
fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

impl Mask {
    fn new(p: f32, key: u64) -> Self {
        Self {
            key: (key as u32, (key >> 32) as u32),
            threshold: (f64::from(p) * f64::from(1u32 << 24)).round() as u32,
            scale: 1.0 / (1.0 - f64::from(p)),
        }
    }

    /// `out[j] = x[j] · mask(start + j)` for the elements of one chunk starting at `start`.
    fn apply<T: Real>(&self, start: usize, x: &[T], out: &mut [T]) {
        let (k0, k1) = self.key;
        // Indices past 2³² change the second key word (chunks never straddle that boundary).
        let k1 = k1 ^ mix((start as u64 >> 32) as u32);
        let first = start as u32;
        let (threshold, scale) = (self.threshold, T::from_f64(self.scale));
        // `move`, a bit mask rather than a branch, and a wrapping counter rather than
        // `enumerate` (whose overflow check, on in the dev profile, is a branch per element):
        // the loop must see values and no control flow to become vector code.
        vectorized(
            #[inline(always)]
            move || {
                let mut index = first;
                for (o, &x) in out.iter_mut().zip(x) {
                    let draw = mix(mix(index ^ k0).wrapping_add(k1)) >> 8;
                    *o = x * scale.or_zero(draw >= threshold);
                    index = index.wrapping_add(1);
                }
            },
        )
    }

    /// `x ⊙ mask` over the whole of `x`, chunks in parallel.
    fn map<T: Real>(&self, x: &[T]) -> Vec<T> {
        let mut out = vec![T::from_f64(0.0); x.len()];
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (o, x))| self.apply(c * CHUNK, x, o));
        out
    }
}

/// The op: `y = x ⊙ mask`, `dx = g ⊙ mask`.
struct Dropout(Mask);

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let storage = match s {
            CpuStorage::F32(_) => CpuStorage::F32(self.0.map(contiguous::<f32>(s, l, "dropout")?)),
            CpuStorage::F64(_) => CpuStorage::F64(self.0.map(contiguous::<f64>(s, l, "dropout")?)),
            other => candle_core::bail!(
                "dropout: the fused kernel takes f32 or f64, got {:?}",
                other.dtype()
            ),
        };
        Ok((storage, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        fn run<T: Real>(mask: &Mask, g: &Tensor) -> candle_core::Result<Tensor> {
            let dx = with_slice::<T, _>(g, "dropout backward", |gs| Ok(mask.map(gs)))?;
            Tensor::from_vec(dx, g.shape(), g.device())
        }
        let g = g.to_dtype(x.dtype())?;
        Ok(Some(match x.dtype() {
            DType::F32 => run::<f32>(&self.0, &g)?,
            DType::F64 => run::<f64>(&self.0, &g)?,
            other => candle_core::bail!("dropout backward: unsupported dtype {other:?}"),
        }))
    }
}

/// Dropout of an f32/f64 CPU tensor with drop probability `p` in `(0, 1)` and the mask given by
/// `key`: each element is zeroed or scaled by `1 / (1 - p)`. The same key gives the same mask.
pub fn dropout(x: &Tensor, p: f32, key: u64) -> candle_core::Result<Tensor> {
    if !supports(&[x]) {
        candle_core::bail!(
            "fused dropout needs an f32/f64 CPU tensor, got {:?} on {:?}",
            x.dtype(),
            x.device().location()
        );
    }
    if !(p > 0.0 && p < 1.0) {
        candle_core::bail!("fused dropout needs a probability in (0, 1), got {p}");
    }
    let op = Dropout(Mask::new(p, key));
    let x = x.contiguous()?;
    if x.track_op() {
        x.apply_op1(op)
    } else {
        x.apply_op1_no_bwd(&op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_drops_the_asked_share_without_correlation() {
        let p = 0.1f32;
        let mask = Mask::new(p, 0x0123_4567_89ab_cdef);
        let n = 1 << 20;
        let kept = mask.map(&vec![1.0f32; n]);
        let flags: Vec<bool> = kept.iter().map(|&v| v != 0.0).collect();
        let dropped = flags.iter().filter(|k| !**k).count() as f64 / n as f64;
        // Binomial standard deviation is 3e-4 here.
        assert!((dropped - 0.1).abs() < 2e-3, "dropped share {dropped}");
        let scale = 1.0 / 0.9f32;
        assert!(kept.iter().all(|&v| v == 0.0 || (v - scale).abs() < 1e-6));
        // Neighbours (consecutive indices) are independent: both dropped ≈ p² of pairs.
        let both = flags.windows(2).filter(|w| !w[0] && !w[1]).count() as f64 / n as f64;
        assert!((both - 0.01).abs() < 1e-3, "both-dropped share {both}");
        // Another key, another mask (about 18% of flags differ for p = 0.1).
        let other = Mask::new(p, 0x0123_4567_89ab_cdee).map(&vec![1.0f32; n]);
        let differ = kept.iter().zip(&other).filter(|(a, b)| a != b).count() as f64 / n as f64;
        assert!((differ - 0.18).abs() < 0.01, "masks differ in {differ}");
    }

    #[test]
    fn elements_past_two_to_the_32_get_their_own_draws() {
        let mask = Mask::new(0.5, 7);
        let x = vec![1.0f32; CHUNK];
        let (mut low, mut high) = (vec![0.0; CHUNK], vec![0.0; CHUNK]);
        mask.apply(0, &x, &mut low);
        mask.apply(1 << 32, &x, &mut high);
        assert_ne!(low, high);
    }
}
