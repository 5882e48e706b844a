//! f32 matrix products through the system's OpenBLAS, loaded at run time when it is installed.
//!
//! candle's CPU products use the `gemm` crate, whose kernels reach about 98 GFLOP/s on this
//! project's 2-core AVX-512 machines (`whet bench gemm`); OpenBLAS's SkylakeX kernels reach about
//! 240-330 GFLOP/s on the same products. The frozen and quantized linear layers and the chunked
//! LM loss — nearly all the FLOPs of a PEFT step — and attention and LoRA's products therefore
//! multiply through [`crate::ops::matmul`], which calls `cblas_sgemm` when OpenBLAS can be
//! loaded and falls back to candle otherwise, so a machine without it computes the same values,
//! only slower.
//!
//! The library is opened with `dlopen` (`libopenblas.so.0`, Debian's `libopenblas0`; or the file
//! named by `WHETSTONE_BLAS`; `WHETSTONE_BLAS=off` disables it) rather than linked, so building
//! and running never require it. Before opening it, when `OPENBLAS_CORETYPE` is unset, the
//! kernel family is chosen from the CPU's features (`SkylakeX` with AVX-512, `Haswell` with
//! AVX2): OpenBLAS's own detection reads the CPU model, which virtual machines often mask (it
//! picks the generic `Prescott` kernels here, at 62 GFLOP/s). OpenBLAS runs single-threaded:
//! the rows of each product are split over rayon's threads (`RAYON_NUM_THREADS`, else the
//! cores), the pool every other kernel uses, so no second pool of spinning threads competes
//! with it between products.

use std::ffi::c_int;
use std::sync::OnceLock;

use rayon::prelude::*;

/// `cblas_sgemm` (LP64: 32-bit integers, as Debian's `libopenblas0`).
type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

const CBLAS_ROW_MAJOR: c_int = 101;
const CBLAS_NO_TRANS: c_int = 111;
const CBLAS_TRANS: c_int = 112;

/// Fewest rows of C one thread computes (smaller blocks pack `B` for too little work).
const MIN_ROWS_PER_TASK: usize = 64;

/// The loaded library and its product.
struct Blas {
    /// Keeps the library mapped for as long as `sgemm` may be called (the process).
    _library: libloading::Library,
    sgemm: Sgemm,
    /// Where it was loaded from and the kernels it uses, for the log.
    description: String,
}

static BLAS: OnceLock<Option<Blas>> = OnceLock::new();

/// The library names tried in order when `WHETSTONE_BLAS` does not name one.
const CANDIDATES: [&str; 2] = ["libopenblas.so.0", "libopenblas.so"];

/// The OpenBLAS kernel family for this CPU, when its features say.
fn core_type() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            return Some("SkylakeX");
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Some("Haswell");
        }
    }
    None
}

fn load() -> Option<Blas> {
    let choice = std::env::var("WHETSTONE_BLAS").ok();
    let names: Vec<String> = match choice.as_deref() {
        Some("off" | "0" | "none") => return None,
        Some(path) if !path.is_empty() => vec![path.to_string()],
        _ => CANDIDATES.iter().map(|s| s.to_string()).collect(),
    };
    // The kernels: the user's `OPENBLAS_CORETYPE`, or the family this CPU's features say, set
    // for OpenBLAS's constructor to read when the library is opened below.
    let core = match std::env::var("OPENBLAS_CORETYPE") {
        Ok(user) => {
            // Respected, but a narrower family than the CPU's costs a lot (Haswell's kernels
            // run at about half of SkylakeX's 440 GFLOP/s on this project's AVX-512 machines),
            // and some images set one for every program: say so once.
            if let Some(detected) = core_type().filter(|d| !d.eq_ignore_ascii_case(&user)) {
                tracing::warn!(
                    "OPENBLAS_CORETYPE={user} from the environment selects OpenBLAS's {user}                      kernels; this CPU's features select {detected}, which may be much faster                      (unset OPENBLAS_CORETYPE to use them)"
                );
            }
            Some(user)
        }
        Err(_) => core_type().map(|core| {
            std::env::set_var("OPENBLAS_CORETYPE", core);
            core.to_string()
        }),
    };
    for name in &names {
        // SAFETY: opening OpenBLAS runs its initialisers, which only set up its own state.
        let Ok(library) = (unsafe { libloading::Library::new(name) }) else {
            continue;
        };
        // SAFETY: `cblas_sgemm` has this signature in every LP64 OpenBLAS build.
        let Ok(sgemm) = (unsafe { library.get::<Sgemm>(b"cblas_sgemm\0") }) else {
            continue;
        };
        let sgemm = *sgemm;
        type SetThreads = unsafe extern "C" fn(c_int);
        // SAFETY: `openblas_set_num_threads(int)`; absent in other BLAS libraries.
        if let Ok(set_threads) = unsafe { library.get::<SetThreads>(b"openblas_set_num_threads\0") }
        {
            // One thread per call: [`sgemm`] splits the rows over rayon's threads itself.
            // SAFETY: a thread count of at least 1.
            unsafe { set_threads(1) };
        }
        let description = match &core {
            Some(core) => format!("{name} ({core} kernels)"),
            None => format!("{name} (kernels of its own choice)"),
        };
        tracing::debug!(library = %description, "matrix products use OpenBLAS");
        return Some(Blas {
            _library: library,
            sgemm,
            description,
        });
    }
    if let Some(choice) = &choice {
        tracing::warn!(
            "WHETSTONE_BLAS = {choice:?} could not be loaded; matrix products use candle's kernels"
        );
    } else {
        tracing::debug!(
            "OpenBLAS not found ({}); matrix products use candle's kernels (install \
             libopenblas0-pthread for faster training)",
            CANDIDATES.join(", ")
        );
    }
    None
}

fn blas() -> Option<&'static Blas> {
    BLAS.get_or_init(load).as_ref()
}

/// Which BLAS the products use: the library and its kernels, or `None` for candle's own.
///
/// The first call opens the library, which may set `OPENBLAS_CORETYPE` in the environment: a
/// program should make it before starting threads that read the environment (`whet` does, in
/// `main`); otherwise the first product opens it.
pub fn backend() -> Option<String> {
    blas().map(|b| b.description.clone())
}

/// `C = op(A) · op(B)` for row-major f32 slices: `A` is `[m, k]` (stored `[k, m]` when
/// `a_t`), `B` is `[k, n]` (stored `[n, k]` when `b_t`). `None` when OpenBLAS is not loaded
/// or a size does not fit its 32-bit integers (the caller then multiplies another way).
pub fn sgemm(
    (a, a_t): (&[f32], bool),
    (b, b_t): (&[f32], bool),
    m: usize,
    n: usize,
    k: usize,
) -> Option<Vec<f32>> {
    sgemm_batched((a, a_t), (b, b_t), 1, (m, n, k))
}

/// [`sgemm`] over `batch` independent products: product `i` reads `A` from `a[i·m·k..]` and
/// `B` from `b[i·k·n..]` (each stored as `a_t`, `b_t` say) and writes `C[i]`, the `i`-th
/// `[m, n]` block of the result.
pub fn sgemm_batched(
    (a, a_t): (&[f32], bool),
    (b, b_t): (&[f32], bool),
    batch: usize,
    (m, n, k): (usize, usize, usize),
) -> Option<Vec<f32>> {
    let blas = blas()?;
    let fits = |v: usize| c_int::try_from(v).ok();
    let (ni, ki) = (fits(n)?, fits(k)?);
    let mi = fits(m)?;
    fits(m.checked_mul(n)?)?;
    let total = batch.checked_mul(m)?.checked_mul(n)?;
    if a.len() < batch * m * k || b.len() < batch * k * n {
        return None;
    }
    if total == 0 {
        return Some(vec![0f32; total]);
    }
    // Not zeroed first: with beta = 0 OpenBLAS writes every value of C (and zeroing here would
    // be a second pass over it).
    let mut c: Vec<f32> = Vec::with_capacity(total);
    let (trans_a, lda) = if a_t {
        (CBLAS_TRANS, mi)
    } else {
        (CBLAS_NO_TRANS, ki)
    };
    let (trans_b, ldb) = if b_t {
        (CBLAS_TRANS, ki)
    } else {
        (CBLAS_NO_TRANS, ni)
    };
    // Products in parallel, and the rows of C (and of op(A)) of each split over rayon's threads
    // when there are fewer products than threads; each block runs single-threaded OpenBLAS, so
    // no second thread pool spins beside rayon's between products.
    let threads = rayon::current_num_threads().max(1);
    let blocks_per_product = threads
        .div_ceil(batch)
        .clamp(1, m.div_ceil(MIN_ROWS_PER_TASK).max(1));
    let rows_per_block = m.div_ceil(blocks_per_product);
    c.spare_capacity_mut()
        .par_chunks_mut(m * n)
        .enumerate()
        .for_each(|(i, product)| {
            let (a, b) = (&a[i * m * k..], &b[i * k * n..]);
            product
                .par_chunks_mut(rows_per_block * n)
                .enumerate()
                .for_each(|(t, block)| {
                    let row0 = t * rows_per_block;
                    let rows = block.len() / n;
                    // Row `row0` of op(A): column `row0` of the stored [k, m] when transposed.
                    let a_block = if a_t { &a[row0..] } else { &a[row0 * k..] };
                    // SAFETY: `a_block` holds the block's `rows` rows of op(A) at leading
                    // dimension `lda` and `b` all of op(B) at `ldb` (the slice lengths were
                    // checked above), and `block` has room for exactly `rows × n` values of C;
                    // OpenBLAS reads `a`, `b` and, with beta = 0, writes every value of `block`
                    // without reading it.
                    unsafe {
                        (blas.sgemm)(
                            CBLAS_ROW_MAJOR,
                            trans_a,
                            trans_b,
                            rows as c_int,
                            ni,
                            ki,
                            1.0,
                            a_block.as_ptr(),
                            lda.max(1),
                            b.as_ptr(),
                            ldb.max(1),
                            0.0,
                            block.as_mut_ptr().cast::<f32>(),
                            ni.max(1),
                        );
                    }
                });
        });
    // SAFETY: the blocks cover all batch·m·n values of the spare capacity, and each product
    // wrote every value of its block (beta = 0).
    unsafe { c.set_len(total) };
    Some(c)
}

/// One product `C = op(A) · op(B)` written into `c` (`[m, n]`, row-major), on the calling
/// thread: for kernels that already run many small products in parallel (fused attention).
/// `false`, with `c` untouched, when OpenBLAS is not loaded or a size does not fit its 32-bit
/// integers or the slices.
pub fn sgemm_into(
    (a, a_t): (&[f32], bool),
    (b, b_t): (&[f32], bool),
    (m, n, k): (usize, usize, usize),
    c: &mut [f32],
) -> bool {
    let Some(blas) = blas() else {
        return false;
    };
    let fits = |v: usize| c_int::try_from(v).ok();
    let (Some(mi), Some(ni), Some(ki)) = (fits(m), fits(n), fits(k)) else {
        return false;
    };
    if a.len() < m * k || b.len() < k * n || c.len() < m * n || fits(m * n).is_none() {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    let (trans_a, lda) = if a_t {
        (CBLAS_TRANS, mi)
    } else {
        (CBLAS_NO_TRANS, ki)
    };
    let (trans_b, ldb) = if b_t {
        (CBLAS_TRANS, ki)
    } else {
        (CBLAS_NO_TRANS, ni)
    };
    // SAFETY: the lengths were checked above: `a` holds op(A) at leading dimension `lda`, `b`
    // op(B) at `ldb`, and `c` room for `m × n` values, which OpenBLAS writes (beta = 0) without
    // reading.
    unsafe {
        (blas.sgemm)(
            CBLAS_ROW_MAJOR,
            trans_a,
            trans_b,
            mi,
            ni,
            ki,
            1.0,
            a.as_ptr(),
            lda.max(1),
            b.as_ptr(),
            ldb.max(1),
            0.0,
            c.as_mut_ptr(),
            ni.max(1),
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::matmul;
    use candle_core::{DType, Device, Tensor};

    fn assert_close(a: &Tensor, b: &Tensor) {
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    #[test]
    fn products_equal_candles_in_every_layout() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (5, 3), &dev).unwrap();
        let bt = Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap();
        let at = Tensor::randn(0f32, 1.0, (5, 7), &dev).unwrap();
        assert_close(&matmul(&a, &b).unwrap(), &a.matmul(&b).unwrap());
        let btt = bt.t().unwrap();
        assert_close(&matmul(&a, &btt).unwrap(), &a.matmul(&btt).unwrap());
        let att = at.t().unwrap();
        assert_close(&matmul(&att, &b).unwrap(), &att.matmul(&b).unwrap());
        // A narrowed view and a column.
        let an = a.narrow(0, 2, 4).unwrap();
        assert_close(&matmul(&an, &b).unwrap(), &an.matmul(&b).unwrap());
        let col = b.narrow(1, 1, 1).unwrap();
        assert_close(
            &matmul(&a, &col).unwrap(),
            &a.matmul(&col.contiguous().unwrap()).unwrap(),
        );
        // f64 goes to candle.
        let a64 = a.to_dtype(DType::F64).unwrap();
        let b64 = b.to_dtype(DType::F64).unwrap();
        assert_eq!(matmul(&a64, &b64).unwrap().dtype(), DType::F64);
    }

    #[test]
    fn raw_products_refuse_short_slices() {
        if blas().is_none() {
            return;
        }
        assert!(sgemm((&[1.0; 5], false), (&[1.0; 6], false), 2, 3, 3).is_none());
        let c = sgemm((&[1.0, 2.0], false), (&[3.0, 4.0], true), 1, 1, 2).unwrap();
        assert_eq!(c, vec![11.0]);
    }
}
