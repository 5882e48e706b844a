//! Scaled dot-product attention `softmax(q kᵀ · scale + bias) v` as one op that keeps no
//! `[batch, heads, q, k]` tensor for its backward pass.
//!
//! The composed form (two products and a softmax) leaves the scores and the probabilities in
//! candle's graph until the backward pass reaches them: two `[b, h, q, k]` tensors per layer,
//! 9.4 MB each for SmolLM2 at batch 8 × 128, 280 MB over its 30 layers. This op keeps only its
//! inputs, its output and two numbers per row (the maximum logit and the softmax's normaliser),
//! and recomputes the probabilities in the backward pass from `q kᵀ` (one more small product,
//! as FlashAttention does), bit for bit the forward pass's:
//!
//! - `P = exp(q kᵀ · scale + bias − max) / sum`, `dV = Pᵀ dO`, `dP = dO Vᵀ`,
//! - `dS = P ⊙ (dP − rowsum(dO ⊙ O)) · scale`, `dQ = dS K`, `dK = dSᵀ Q`.
//!
//! Grouped-query attention is native: the `group` query heads that share a key/value head are
//! one `[group · q, d]` block against it, so `dK`/`dV` sum over the group inside the products.
//! Each (batch, key/value head) pair is one rayon task of single-threaded products (OpenBLAS
//! when loaded, the `gemm` crate otherwise). The output is written sequence-first,
//! `[b, q, h, d]`, so the output projection reads it without a transposing copy.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, vectorized, with_slice};
use crate::ops::blas;

/// The shapes of one attention call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    q_len: usize,
    k_len: usize,
    head_dim: usize,
}

impl Dims {
    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Rows of one (batch, key/value head) block: its group's query rows.
    fn block_rows(&self) -> usize {
        self.group() * self.q_len
    }
}

/// The softmax statistics of one row of logits: `P = exp(logit − max) · inv_sum`. A `max` of
/// `-inf` marks a row of `-inf` logits (uniform probabilities), NaN a row with a NaN.
#[derive(Debug, Clone, Copy, Default)]
struct RowStats {
    max: f32,
    inv_sum: f32,
}

/// The fused attention op; `stats` is filled by the forward pass for the backward pass.
struct FusedAttention {
    scale: f32,
    /// `[b or 1, 1, q, k]`, contiguous f32.
    bias: Option<Tensor>,
    dims: Dims,
    /// The softmax statistics of every `(batch, head, query)` row.
    stats: OnceLock<Vec<RowStats>>,
}

/// `C[m, n] = op(A) · op(B)` into `c`, on the calling thread.
fn product(
    (a, a_t): (&[f32], bool),
    (b, b_t): (&[f32], bool),
    (m, n, k): (usize, usize, usize),
    c: &mut [f32],
) {
    if !blas::sgemm_into((a, a_t), (b, b_t), (m, n, k), c) {
        portable_product((a, a_t), (b, b_t), (m, n, k), c);
    }
}

/// [`product`] with the `gemm` crate (candle's CPU kernels), when OpenBLAS is not loaded.
fn portable_product(
    (a, a_t): (&[f32], bool),
    (b, b_t): (&[f32], bool),
    (m, n, k): (usize, usize, usize),
    c: &mut [f32],
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    // Element (i, j) of op(A) lives at i·k + j, or j·m + i when A is stored transposed.
    let (lhs_cs, lhs_rs) = if a_t { (m, 1) } else { (1, k) };
    let (rhs_cs, rhs_rs) = if b_t { (k, 1) } else { (1, n) };
    // SAFETY: the asserts above bound every element the strides reach; `c` is written whole
    // (read_dst = false).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            b.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The bias row of query `qi` in batch `i`, if any.
fn bias_row<'a>(bias: Option<&'a [f32]>, dims: &Dims, i: usize, qi: usize) -> Option<&'a [f32]> {
    bias.map(|data| {
        let per_batch = data.len() > dims.q_len * dims.k_len;
        let row = if per_batch { i * dims.q_len + qi } else { qi };
        &data[row * dims.k_len..(row + 1) * dims.k_len]
    })
}

/// The logits `s · scale + bias` of one row, in place.
fn logits(row: &mut [f32], scale: f32, bias: Option<&[f32]>) {
    match bias {
        Some(bias) => row
            .iter_mut()
            .zip(bias)
            .for_each(|(s, &b)| *s = *s * scale + b),
        None => row.iter_mut().for_each(|s| *s *= scale),
    }
}

/// `exp(logit − max)`, zero where it underflows (below −87), without a branch.
#[inline(always)]
fn shifted_exp(logit: f32, max: f32) -> f32 {
    super::vector_math::exp(logit - max)
}

/// Softmax of one row of logits in place; returns its statistics.
fn softmax_row(row: &mut [f32]) -> RowStats {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max == f32::NEG_INFINITY {
        // All `-inf` (uniform), unless NaNs hid the real maximum (NaN row).
        let nan = row.iter().any(|v| v.is_nan());
        let max = if nan { f32::NAN } else { max };
        probabilities_row(row, RowStats { max, inv_sum: 0.0 });
        return RowStats { max, inv_sum: 0.0 };
    }
    vectorized(
        #[inline(always)]
        || row.iter_mut().for_each(|v| *v = shifted_exp(*v, max)),
    );
    let sum: f32 = row.iter().sum();
    let inv_sum = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv_sum);
    RowStats { max, inv_sum }
}

/// The probabilities of one row of logits from the forward pass's statistics, in place: the
/// same operations as [`softmax_row`], so the same values.
fn probabilities_row(row: &mut [f32], stats: RowStats) {
    if stats.max.is_nan() {
        row.fill(f32::NAN);
    } else if stats.max == f32::NEG_INFINITY {
        row.fill(1.0 / row.len() as f32);
    } else {
        vectorized(
            #[inline(always)]
            || {
                row.iter_mut()
                    .for_each(|v| *v = shifted_exp(*v, stats.max) * stats.inv_sum)
            },
        );
    }
}

impl FusedAttention {
    /// The block of (batch `i`, key/value head `g`): `q` rows `[group · q, d]` and `k`, `v`
    /// `[k, d]`.
    fn block<'a>(
        &self,
        (q, k, v): (&'a [f32], &'a [f32], &'a [f32]),
        task: usize,
    ) -> (&'a [f32], &'a [f32], &'a [f32]) {
        let d = &self.dims;
        let (rows, kv_rows) = (d.block_rows() * d.head_dim, d.k_len * d.head_dim);
        (
            &q[task * rows..(task + 1) * rows],
            &k[task * kv_rows..(task + 1) * kv_rows],
            &v[task * kv_rows..(task + 1) * kv_rows],
        )
    }

    /// The probabilities `[group · q, k]` of block `task` into `p`: the scores, then either a
    /// softmax (writing the rows' statistics) or, in the backward pass, the probabilities from
    /// the forward pass's statistics.
    fn probabilities(
        &self,
        (q, k): (&[f32], &[f32]),
        bias: Option<&[f32]>,
        task: usize,
        p: &mut [f32],
        stats: Stats<'_>,
    ) {
        let d = &self.dims;
        product(
            (q, false),
            (k, true),
            (d.block_rows(), d.k_len, d.head_dim),
            p,
        );
        let i = task / d.kv_heads;
        let rows = p.chunks_mut(d.k_len).enumerate();
        match stats {
            Stats::Write(out) => {
                for ((r, row), stats) in rows.zip(out) {
                    logits(row, self.scale, bias_row(bias, d, i, r % d.q_len));
                    *stats = softmax_row(row);
                }
            }
            Stats::Read(stored) => {
                for ((r, row), &stats) in rows.zip(stored) {
                    logits(row, self.scale, bias_row(bias, d, i, r % d.q_len));
                    probabilities_row(row, stats);
                }
            }
        }
    }

    /// Copies the rows of block `task` out of a sequence-first `[b, q, h, d]` tensor into
    /// `block`, `[group · q, d]`.
    fn gather(&self, seq_first: &[f32], task: usize, block: &mut [f32]) {
        let d = &self.dims;
        let (i, g) = (task / d.kv_heads, task % d.kv_heads);
        for (r, row) in block.chunks_mut(d.head_dim).enumerate() {
            let (head, qi) = (g * d.group() + r / d.q_len, r % d.q_len);
            let at = ((i * d.q_len + qi) * d.heads + head) * d.head_dim;
            row.copy_from_slice(&seq_first[at..at + d.head_dim]);
        }
    }

    fn forward(&self, q: &[f32], k: &[f32], v: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let d = self.dims;
        let tasks = d.batch * d.kv_heads;
        let rows = d.block_rows();
        let mut stats = vec![RowStats::default(); tasks * rows];
        let mut blocks = vec![0f32; tasks * rows * d.head_dim];
        blocks
            .par_chunks_mut(rows * d.head_dim)
            .zip(stats.par_chunks_mut(rows))
            .enumerate()
            .for_each(|(task, (o, stats))| {
                let (q, k, v) = self.block((q, k, v), task);
                let mut p = vec![0f32; rows * d.k_len];
                self.probabilities((q, k), bias, task, &mut p, Stats::Write(stats));
                product((&p, false), (v, false), (rows, d.head_dim, d.k_len), o);
            });
        // Blocks are [b, kv, group · q, d] = [b, h, q, d]; the output is [b, q, h, d].
        let mut out = vec![0f32; blocks.len()];
        let per_batch = d.q_len * d.heads * d.head_dim;
        out.par_chunks_mut(per_batch)
            .zip(blocks.par_chunks(per_batch))
            .for_each(|(out, heads_first)| {
                for (r, row) in heads_first.chunks(d.head_dim).enumerate() {
                    let (head, qi) = (r / d.q_len, r % d.q_len);
                    let at = (qi * d.heads + head) * d.head_dim;
                    out[at..at + d.head_dim].copy_from_slice(row);
                }
            });
        // A second forward of the same op (never done by candle) would keep the first stats.
        let _ = self.stats.set(stats);
        out
    }

    /// `(dQ, dK, dV)` from the inputs, the output `o` and its gradient `g` (both `[b, q, h, d]`).
    fn backward(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        (o, g): (&[f32], &[f32]),
        bias: Option<&[f32]>,
        stats: &[RowStats],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let d = self.dims;
        let rows = d.block_rows();
        let kv_size = d.k_len * d.head_dim;
        let mut dq = vec![0f32; q.len()];
        let mut dk = vec![0f32; k.len()];
        let mut dv = vec![0f32; v.len()];
        dq.par_chunks_mut(rows * d.head_dim)
            .zip(dk.par_chunks_mut(kv_size))
            .zip(dv.par_chunks_mut(kv_size))
            .enumerate()
            .for_each(|(task, ((dq, dk), dv))| {
                let (q, k, v) = self.block((q, k, v), task);
                let mut p = vec![0f32; rows * d.k_len];
                let stats = &stats[task * rows..(task + 1) * rows];
                self.probabilities((q, k), bias, task, &mut p, Stats::Read(stats));
                let mut go = vec![0f32; rows * d.head_dim];
                self.gather(g, task, &mut go);
                // rowsum(dO ⊙ O), reusing `dq` for the gathered output rows.
                self.gather(o, task, dq);
                let delta: Vec<f32> = go
                    .chunks(d.head_dim)
                    .zip(dq.chunks(d.head_dim))
                    .map(|(g, o)| g.iter().zip(o).map(|(g, o)| g * o).sum())
                    .collect();
                product((&p, true), (&go, false), (d.k_len, d.head_dim, rows), dv);
                let mut ds = vec![0f32; rows * d.k_len];
                product(
                    (&go, false),
                    (v, true),
                    (rows, d.k_len, d.head_dim),
                    &mut ds,
                );
                for ((ds, p), delta) in ds.chunks_mut(d.k_len).zip(p.chunks(d.k_len)).zip(delta) {
                    for (ds, &p) in ds.iter_mut().zip(p) {
                        *ds = p * (*ds - delta) * self.scale;
                    }
                }
                product((&ds, false), (k, false), (rows, d.head_dim, d.k_len), dq);
                product((&ds, true), (q, false), (d.k_len, d.head_dim, rows), dk);
            });
        (dq, dk, dv)
    }
}

/// Where the rows' softmax statistics go (forward) or come from (backward).
enum Stats<'a> {
    Write(&'a mut [RowStats]),
    Read(&'a [RowStats]),
}

/// The contiguous f32 elements of a bias tensor, for the kernels.
fn with_bias<R>(
    bias: Option<&Tensor>,
    f: impl FnOnce(Option<&[f32]>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    match bias {
        Some(bias) => with_slice::<f32, _>(bias, "fused attention", |b| f(Some(b))),
        None => f(None),
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = "fused attention";
        let (q, k, v) = (
            contiguous::<f32>(q, lq, name)?,
            contiguous::<f32>(k, lk, name)?,
            contiguous::<f32>(v, lv, name)?,
        );
        let out = with_bias(self.bias.as_ref(), |bias| Ok(self.forward(q, k, v, bias)))?;
        let d = self.dims;
        Ok((
            CpuStorage::F32(out),
            Shape::from((d.batch, d.q_len, d.heads, d.head_dim)),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = "fused attention backward";
        let stats = self.stats.get().ok_or_else(|| {
            candle_core::Error::Msg(format!("{name}: the forward pass did not run"))
        })?;
        let grad = grad.to_dtype(DType::F32)?;
        let (dq, dk, dv) = with_slice::<f32, _>(q, name, |qs| {
            with_slice::<f32, _>(k, name, |ks| {
                with_slice::<f32, _>(v, name, |vs| {
                    with_slice::<f32, _>(res, name, |os| {
                        with_slice::<f32, _>(&grad, name, |gs| {
                            with_bias(self.bias.as_ref(), |bias| {
                                Ok(self.backward((qs, ks, vs), (os, gs), bias, stats))
                            })
                        })
                    })
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), q.device())?),
            Some(Tensor::from_vec(dk, k.shape(), k.device())?),
            Some(Tensor::from_vec(dv, v.shape(), v.device())?),
        ))
    }
}

/// Whether [`attention`] takes these tensors: f32 on the CPU, `q` `[b, h, q, d]`, `k` and `v`
/// `[b, kv, k, d]` with `kv` dividing `h`, and a bias `[b or 1, 1, q, k]` if any.
pub fn supports_fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> bool {
    let ([b, h, ql, d], [kb, kv, kl, kd]) = (q.dims(), k.dims()) else {
        return false;
    };
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
    let shapes = kb == b
        && kd == d
        && *kv > 0
        && *kl > 0
        && *d > 0
        && h % kv == 0
        && v.dims() == k.dims()
        && bias.is_none_or(|bias| {
            matches!(bias.dims(), [bb, 1, bq, bk] if (*bb == 1 || bb == b) && bq == ql && bk == kl)
        });
    shapes && f32_cpu(q) && f32_cpu(k) && f32_cpu(v) && bias.is_none_or(f32_cpu)
}

/// `softmax(q kᵀ / √d + bias) v` for `q` `[b, h, q, d]`, `k`, `v` `[b, kv, k, d]` (grouped-query
/// attention when `kv < h`) and an optional constant `bias` `[b or 1, 1, q, k]`, returned
/// **sequence-first**, `[b, q, h, d]`. Differentiable in `q`, `k` and `v`; see the module docs.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    if !supports_fused_attention(q, k, v, bias) {
        candle_core::bail!(
            "fused attention needs f32 CPU tensors q [b, h, q, d], k and v [b, kv, k, d] with kv \
             dividing h, and a bias [b or 1, 1, q, k]; got q {:?}, k {:?}, v {:?}, bias {:?}",
            q.dims(),
            k.dims(),
            v.dims(),
            bias.map(Tensor::dims)
        );
    }
    let (batch, heads, q_len, head_dim) = q.dims4()?;
    let (_, kv_heads, k_len, _) = k.dims4()?;
    let op = FusedAttention {
        scale: 1.0 / (head_dim as f32).sqrt(),
        bias: bias.map(Tensor::contiguous).transpose()?,
        dims: Dims {
            batch,
            heads,
            kv_heads,
            q_len,
            k_len,
            head_dim,
        },
        stats: OnceLock::new(),
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    // Recorded for the backward pass only when one of the inputs is tracked.
    q.apply_op3(&k, &v, op)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable products equal a plain triple loop in all four storage orders.
    #[test]
    fn portable_products_equal_the_definition() {
        let (m, n, k) = (5, 3, 4);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.91).cos()).collect();
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            let at = |i: usize, j: usize| if a_t { a[j * m + i] } else { a[i * k + j] };
            let bt = |i: usize, j: usize| if b_t { b[j * k + i] } else { b[i * n + j] };
            let mut c = vec![f32::NAN; m * n];
            portable_product((&a, a_t), (&b, b_t), (m, n, k), &mut c);
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|l| at(i, l) * bt(l, j)).sum();
                    assert!((c[i * n + j] - want).abs() < 1e-5, "{a_t} {b_t} ({i}, {j})");
                }
            }
        }
    }
}
