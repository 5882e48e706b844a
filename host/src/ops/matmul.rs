//! Differentiable f32 matrix products through OpenBLAS ([`super::blas`]), with candle's
//! `matmul` as the fallback.
//!
//! [`matmul`] multiplies `[..., m, k] · [..., k, n]` (equal leading dimensions, either operand
//! possibly a transposed view such as `k.t()`) as a candle custom op whose forward and backward
//! (`dA = g · Bᵀ`, `dB = Aᵀ · g`, each only for a tracked operand) are batched OpenBLAS products.
//! Everything else — f64, half precision, GPUs, broadcast batch dimensions, other strides, or no
//! OpenBLAS on the machine — goes to candle's `matmul`, with the same values.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};

use super::blas;

/// One operand as the kernels read it: its values, whether each `[r, c]` matrix is stored
/// transposed (`[c, r]`), and its sizes.
pub(super) struct Operand<'a> {
    /// The matrices' values, one after the other.
    pub values: &'a [f32],
    /// Whether each `[rows, cols]` matrix is stored as `[cols, rows]`.
    pub transposed: bool,
    /// How many matrices (the product of the leading dimensions).
    pub batch: usize,
    /// Rows of each matrix.
    pub rows: usize,
    /// Columns of each matrix.
    pub cols: usize,
}

/// The operand view of an f32 CPU storage, when each of its matrices is stored contiguously
/// (as it is, or transposed) and the matrices follow each other.
fn operand<'a>(storage: &'a CpuStorage, layout: &Layout) -> Option<Operand<'a>> {
    let CpuStorage::F32(data) = storage else {
        return None;
    };
    let dims = layout.dims();
    let rank = dims.len();
    if rank < 2 {
        return None;
    }
    let (rows, cols) = (dims[rank - 2], dims[rank - 1]);
    let batch: usize = dims[..rank - 2].iter().product();
    let stride = layout.stride();
    let matrix = rows * cols;
    // The leading dimensions must step by whole matrices, in order.
    let mut expected = matrix;
    for i in (0..rank - 2).rev() {
        if dims[i] > 1 && stride[i] != expected {
            return None;
        }
        expected *= dims[i];
    }
    let (sr, sc) = (stride[rank - 2], stride[rank - 1]);
    let transposed = if (sc == 1 || cols == 1) && (sr == cols || rows == 1) {
        false
    } else if (sr == 1 || rows == 1) && (sc == rows || cols == 1) {
        true
    } else {
        return None;
    };
    let start = layout.start_offset();
    let values = data.get(start..start + batch * matrix)?;
    Some(Operand {
        values,
        transposed,
        batch,
        rows,
        cols,
    })
}

/// Runs `f` on the operand view of a CPU tensor (`None` for any other layout or dtype).
pub(super) fn with_operand<R>(t: &Tensor, f: impl FnOnce(Operand<'_>) -> Option<R>) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    f(operand(cpu, layout)?)
}

/// The op; its operands were checked by [`matmul`].
struct BlasMatmul;

impl CustomOp2 for BlasMatmul {
    fn name(&self) -> &'static str {
        "blas-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let fail = || candle_core::Error::Msg("blas matmul: unsupported operands".into());
        let a = operand(s1, l1).ok_or_else(fail)?;
        let b = operand(s2, l2).ok_or_else(fail)?;
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let c = blas::sgemm_batched(
            (a.values, a.transposed),
            (b.values, b.transposed),
            a.batch,
            (m, n, k),
        )
        .ok_or_else(fail)?;
        let mut dims = l1.dims().to_vec();
        let last = dims.len() - 1;
        dims[last] = n;
        Ok((CpuStorage::F32(c), Shape::from(dims)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _c: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let fail = || candle_core::Error::Msg("blas matmul backward: unsupported operands".into());
        // dA = g · Bᵀ: Bᵀ is B's storage read the other way round.
        let da = if a.track_op() {
            let v = with_operand(&g, |gv| {
                with_operand(b, |bv| {
                    blas::sgemm_batched(
                        (gv.values, false),
                        (bv.values, !bv.transposed),
                        bv.batch,
                        (gv.rows, bv.rows, gv.cols),
                    )
                })
            })
            .ok_or_else(fail)?;
            Some(Tensor::from_vec(v, a.shape(), a.device())?)
        } else {
            None
        };
        // dB = Aᵀ · g.
        let db = if b.track_op() {
            let v = with_operand(&g, |gv| {
                with_operand(a, |av| {
                    blas::sgemm_batched(
                        (av.values, !av.transposed),
                        (gv.values, false),
                        av.batch,
                        (av.cols, gv.cols, av.rows),
                    )
                })
            })
            .ok_or_else(fail)?;
            Some(Tensor::from_vec(v, b.shape(), b.device())?)
        } else {
            None
        };
        Ok((da, db))
    }
}

/// Whether the OpenBLAS op takes `a · b`: f32 CPU operands of one rank with equal leading
/// dimensions and matching inner sizes, laid out as [`operand`] reads them, and OpenBLAS loaded.
fn blas_takes(a: &Tensor, b: &Tensor) -> bool {
    let (da, db) = (a.dims(), b.dims());
    let rank = da.len();
    a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.device().is_cpu()
        && b.device().is_cpu()
        && rank >= 2
        && db.len() == rank
        && da[..rank - 2] == db[..rank - 2]
        && da[rank - 1] == db[rank - 2]
        && blas::backend().is_some()
        && with_operand(a, |_| Some(())).is_some()
        && with_operand(b, |_| Some(())).is_some()
}

/// `x · Wᵀ` through OpenBLAS for contiguous f32 rows `x` `[rows, k]` and a 2-D weight `W`
/// `[n, k]` (the frozen linear layers' product); `None` when OpenBLAS or the weight's layout
/// does not allow it.
pub(super) fn rows_times_weight_t(
    x: &[f32],
    rows: usize,
    k: usize,
    weight: &Tensor,
) -> Option<Vec<f32>> {
    with_operand(weight, |w| {
        (w.batch == 1 && w.cols == k).then_some(())?;
        blas::sgemm((x, false), (w.values, !w.transposed), rows, w.rows, k)
    })
}

/// The values of the 2-D product `a · b` in an owned buffer, outside the graph, when OpenBLAS
/// takes the operands (`None` otherwise): for callers that reuse the buffer in place.
pub(super) fn product_values(a: &Tensor, b: &Tensor) -> Option<Vec<f32>> {
    if a.rank() != 2 || !blas_takes(a, b) {
        return None;
    }
    with_operand(a, |a| {
        with_operand(b, |b| {
            blas::sgemm(
                (a.values, a.transposed),
                (b.values, b.transposed),
                a.rows,
                b.cols,
                a.cols,
            )
        })
    })
}

/// `a · b` for `a` `[..., m, k]` and `b` `[..., k, n]` with equal leading dimensions (either may
/// be a transposed view); differentiable in both. OpenBLAS when it applies, candle otherwise.
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if !blas_takes(a, b) {
        return a.matmul(b);
    }
    if a.track_op() || b.track_op() {
        a.apply_op2(b, BlasMatmul)
    } else {
        a.apply_op2_no_bwd(b, &BlasMatmul)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        d.max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn values_and_gradients_equal_candles() {
        let dev = Device::Cpu;
        // Batched, with a transposed right operand (attention's q · kᵀ) and a transposed left
        // operand.
        let a = Var::randn(0f32, 1.0, (2, 3, 5, 4), &dev).unwrap();
        let k = Var::randn(0f32, 1.0, (2, 3, 6, 4), &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (2, 3, 5, 6), &dev).unwrap();
        let run = |f: &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>| {
            let c = f(a.as_tensor(), &k.as_tensor().t().unwrap()).unwrap();
            let grads = (&c * &r).unwrap().sum_all().unwrap().backward().unwrap();
            (
                c,
                grads.get(a.as_tensor()).unwrap().clone(),
                grads.get(k.as_tensor()).unwrap().clone(),
            )
        };
        let (c1, da1, dk1) = run(&|x, y| matmul(x, y));
        let (c2, da2, dk2) = run(&|x, y| x.matmul(y));
        assert!(max_diff(&c1, &c2) < 1e-4);
        assert!(max_diff(&da1, &da2) < 1e-4);
        assert!(max_diff(&dk1, &dk2) < 1e-4);
        // 2-D, left operand transposed, only the right one tracked.
        let x = Tensor::randn(0f32, 1.0, (4, 7), &dev).unwrap();
        let w = Var::randn(0f32, 1.0, (4, 3), &dev).unwrap();
        let via = |f: &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>| {
            let c = f(&x.t().unwrap(), w.as_tensor()).unwrap();
            let g = c.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            (c, g.get(w.as_tensor()).unwrap().clone())
        };
        let ((c1, g1), (c2, g2)) = (via(&|x, y| matmul(x, y)), via(&|x, y| x.matmul(y)));
        assert!(max_diff(&c1, &c2) < 1e-4 && max_diff(&g1, &g2) < 1e-4);
    }

    #[test]
    fn other_operands_fall_back_to_candle() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f64, 1.0, (3, 4), &dev).unwrap();
        let b = Tensor::randn(0f64, 1.0, (4, 2), &dev).unwrap();
        assert_eq!(matmul(&a, &b).unwrap().dtype(), DType::F64);
        // A broadcast batch (different leading dims) is candle's.
        let a = Tensor::randn(0f32, 1.0, (2, 3, 4), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (1, 4, 2), &dev).unwrap();
        assert!(!blas_takes(&a, &b));
        assert_eq!(matmul(&a, &b).is_err(), a.matmul(&b).is_err());
    }
}
