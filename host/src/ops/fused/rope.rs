//! Fused rotary embedding in Hugging Face's rotate-half layout, with the head transpose folded in.
//!
//! For a row `x = [a, b]` (two halves of a head) at position `t`:
//! `y = [a ⊙ cos₁ − b ⊙ sin₁, b ⊙ cos₂ + a ⊙ sin₂]`, where `cos = [cos₁, cos₂]` and
//! `sin = [sin₁, sin₂]` are row `t` of the tables. Backward, for an upstream gradient `g = [g₁, g₂]`:
//! `dx = [g₁ ⊙ cos₁ + g₂ ⊙ sin₂, g₂ ⊙ cos₂ − g₁ ⊙ sin₁]`.
//!
//! The composed version ([`crate::ops::rope`]) makes five temporaries per call (two halves, a
//! negation, a concatenation, two products) and autograd walks each again backward; this kernel
//! reads each element once and writes it once. A projection's output `[batch, seq, heads · dim]`
//! is read in place as `[batch, seq, heads, dim]` and written as `[batch, heads, seq, dim]`, so
//! the transpose that attention needs costs no copy of its own either.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, min_rows, supports, with_slice, Real};

/// How the rows of a `[batch, heads, seq]` grid of head vectors are laid out in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadLayout {
    /// `[batch, heads, seq, dim]`: what attention multiplies.
    HeadsFirst,
    /// `[batch, seq, heads, dim]`: what a projection's output is, viewed per head.
    SeqFirst,
}

/// The sizes of the grid.
#[derive(Debug, Clone, Copy)]
struct Grid {
    heads: usize,
    seq: usize,
    dim: usize,
}

impl Grid {
    /// The row index of `(batch, head, position)` in `layout`.
    fn row(&self, layout: HeadLayout, b: usize, h: usize, t: usize) -> usize {
        match layout {
            HeadLayout::HeadsFirst => (b * self.heads + h) * self.seq + t,
            HeadLayout::SeqFirst => (b * self.seq + t) * self.heads + h,
        }
    }

    /// `(batch, head, position)` of row `r` in `layout`.
    fn coords(&self, layout: HeadLayout, r: usize) -> (usize, usize, usize) {
        match layout {
            HeadLayout::HeadsFirst => {
                let t = r % self.seq;
                let bh = r / self.seq;
                (bh / self.heads, bh % self.heads, t)
            }
            HeadLayout::SeqFirst => {
                let h = r % self.heads;
                let bt = r / self.heads;
                (bt / self.seq, h, bt % self.seq)
            }
        }
    }
}

/// Rotates (or, with `backward`, applies the transposed rotation to) every row of `src`, laid
/// out as `from`, into a new buffer laid out as `to`.
fn rotate<T: Real>(
    src: &[T],
    (cos, sin): (&[T], &[T]),
    grid: Grid,
    (from, to): (HeadLayout, HeadLayout),
    backward: bool,
) -> Vec<T> {
    let d = grid.dim;
    let half = d / 2;
    let mut out = vec![T::from_f64(0.0); src.len()];
    out.par_chunks_mut(d)
        .enumerate()
        .with_min_len(min_rows(d))
        .for_each(|(r, o)| {
            let (b, h, t) = grid.coords(to, r);
            let s = grid.row(from, b, h, t) * d;
            let x = &src[s..s + d];
            let (c, sn) = (&cos[t * d..(t + 1) * d], &sin[t * d..(t + 1) * d]);
            let (x1, x2) = x.split_at(half);
            let (o1, o2) = o.split_at_mut(half);
            if backward {
                for i in 0..half {
                    o1[i] = x1[i] * c[i] + x2[i] * sn[half + i];
                    o2[i] = x2[i] * c[half + i] - x1[i] * sn[i];
                }
            } else {
                for i in 0..half {
                    o1[i] = x1[i] * c[i] - x2[i] * sn[i];
                    o2[i] = x2[i] * c[half + i] + x1[i] * sn[half + i];
                }
            }
        });
    out
}

/// The fused rotary op: input in `layout`, output `[batch, heads, seq, dim]`.
struct Rope {
    /// `[seq, dim]` tables, contiguous, of the input's dtype.
    cos: Tensor,
    sin: Tensor,
    layout: HeadLayout,
}

impl Rope {
    /// The grid of an input of shape `dims` in this op's layout, and the output shape.
    fn grid(&self, dims: &[usize]) -> candle_core::Result<(Grid, Shape)> {
        let [b, d1, d2, dim] = dims else {
            candle_core::bail!("rope: expected a 4-D input, got shape {dims:?}");
        };
        let (heads, seq) = match self.layout {
            HeadLayout::HeadsFirst => (*d1, *d2),
            HeadLayout::SeqFirst => (*d2, *d1),
        };
        if self.cos.dims() != [seq, *dim] || self.sin.dims() != [seq, *dim] {
            candle_core::bail!(
                "rope: tables of shape {:?}/{:?} do not fit {seq} positions of dimension {dim}",
                self.cos.dims(),
                self.sin.dims()
            );
        }
        Ok((
            Grid {
                heads,
                seq,
                dim: *dim,
            },
            Shape::from((*b, heads, seq, *dim)),
        ))
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (grid, shape) = self.grid(l.dims())?;
        fn run<T: Real>(
            op: &Rope,
            s: &CpuStorage,
            l: &Layout,
            grid: Grid,
        ) -> candle_core::Result<Vec<T>> {
            let x = contiguous::<T>(s, l, "rope")?;
            with_slice::<T, _>(&op.cos, "rope", |cos| {
                with_slice::<T, _>(&op.sin, "rope", |sin| {
                    Ok(rotate(
                        x,
                        (cos, sin),
                        grid,
                        (op.layout, HeadLayout::HeadsFirst),
                        false,
                    ))
                })
            })
        }
        let storage = match s {
            CpuStorage::F32(_) => CpuStorage::F32(run::<f32>(self, s, l, grid)?),
            CpuStorage::F64(_) => CpuStorage::F64(run::<f64>(self, s, l, grid)?),
            other => candle_core::bail!(
                "rope: the fused kernel takes f32 or f64, got {:?}",
                other.dtype()
            ),
        };
        Ok((storage, shape))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (grid, _) = self.grid(x.dims())?;
        fn run<T: Real>(
            op: &Rope,
            x: &Tensor,
            g: &Tensor,
            grid: Grid,
        ) -> candle_core::Result<Tensor> {
            let g = g.to_dtype(T::DTYPE)?;
            let dx = with_slice::<T, _>(&g, "rope backward", |gs| {
                with_slice::<T, _>(&op.cos, "rope backward", |cos| {
                    with_slice::<T, _>(&op.sin, "rope backward", |sin| {
                        Ok(rotate(
                            gs,
                            (cos, sin),
                            grid,
                            (HeadLayout::HeadsFirst, op.layout),
                            true,
                        ))
                    })
                })
            })?;
            Tensor::from_vec(dx, x.shape(), x.device())
        }
        let dx = match x.dtype() {
            DType::F32 => run::<f32>(self, x, g, grid)?,
            DType::F64 => run::<f64>(self, x, g, grid)?,
            other => candle_core::bail!("rope backward: unsupported dtype {other:?}"),
        };
        Ok(Some(dx))
    }
}

/// Rotary embedding of `x` laid out as `layout` (`[batch, heads, seq, dim]` or
/// `[batch, seq, heads, dim]`) with `cos`, `sin` `[seq, dim]` of the same dtype; the result is
/// `[batch, heads, seq, dim]`. Differentiable in `x`; f32/f64 CPU tensors only.
pub fn rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    layout: HeadLayout,
) -> candle_core::Result<Tensor> {
    if !supports(&[x, cos, sin]) {
        candle_core::bail!(
            "fused rope needs f32/f64 CPU tensors of one dtype, got {:?} on {:?}",
            x.dtype(),
            x.device().location()
        );
    }
    if x.dim(candle_core::D::Minus1)? % 2 != 0 {
        candle_core::bail!(
            "rope: head dimension {} is odd",
            x.dim(candle_core::D::Minus1)?
        );
    }
    let op = Rope {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        layout,
    };
    let x = x.contiguous()?;
    if x.track_op() {
        x.apply_op1(op)
    } else {
        x.apply_op1_no_bwd(&op)
    }
}
