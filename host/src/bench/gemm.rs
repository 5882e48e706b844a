//! `whet bench gemm`: the f32 matrix-product throughput this machine reaches, through the
//! products the linear layers use ([`crate::ops::matmul`]: OpenBLAS when it is loaded,
//! candle's kernels otherwise) and through candle's own `matmul` for comparison.
//!
//! The largest figure is the peak that `whet bench train` measures model FLOPs utilisation
//! against: a training step of a transformer is mostly matrix products, so the share of this
//! peak a step reaches says how much of its time goes to anything else (copies, elementwise
//! kernels, page faults, small or badly shaped products).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::TimingStats;
use crate::{Error, Result};

/// One product `[m, k] · [k, n]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GemmShape {
    /// Rows of the left operand and of the result (tokens, in a linear layer).
    pub m: usize,
    /// Columns of the result (output features).
    pub n: usize,
    /// The shared dimension (input features).
    pub k: usize,
}

impl GemmShape {
    /// Floating-point operations of one product: `2 m n k`.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

impl std::str::FromStr for GemmShape {
    type Err = Error;

    /// Parses `MxNxK`, e.g. `1024x576x576`.
    fn from_str(s: &str) -> Result<Self> {
        let dims: Vec<usize> = s
            .split(['x', 'X'])
            .map(|d| d.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::config(format!("GEMM shape `{s}`: {e} (expected MxNxK)")))?;
        match dims[..] {
            [m, n, k] if m > 0 && n > 0 && k > 0 => Ok(Self { m, n, k }),
            _ => Err(Error::config(format!(
                "GEMM shape `{s}`: expected three positive sizes MxNxK, e.g. 1024x576x576"
            ))),
        }
    }
}

/// The shapes `whet bench gemm` times by default: two large squares (the peak), and the
/// products of a SmolLM2-135M training step at batch 8 × 128 tokens (q/o, k/v, gate/up and down
/// projections, one chunk of the output head).
pub const DEFAULT_SHAPES: [GemmShape; 7] = [
    GemmShape {
        m: 2048,
        n: 2048,
        k: 2048,
    },
    GemmShape {
        m: 1024,
        n: 1024,
        k: 1024,
    },
    GemmShape {
        m: 1024,
        n: 576,
        k: 576,
    },
    GemmShape {
        m: 1024,
        n: 192,
        k: 576,
    },
    GemmShape {
        m: 1024,
        n: 1536,
        k: 576,
    },
    GemmShape {
        m: 1024,
        n: 576,
        k: 1536,
    },
    GemmShape {
        m: 682,
        n: 49152,
        k: 576,
    },
];

/// The throughput of one shape.
#[derive(Debug, Clone, Serialize)]
pub struct GemmResult {
    /// The product timed.
    #[serde(flatten)]
    pub shape: GemmShape,
    /// Products timed (after one untimed warm-up).
    pub runs: usize,
    /// Time of one product.
    pub time_s: TimingStats,
    /// `2 m n k / median time`, in GFLOP/s, through the linear layers' products.
    pub gflops: f64,
    /// The same through candle's `matmul`, when it was timed too.
    pub candle_gflops: Option<f64>,
}

/// What `whet bench gemm` prints as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct GemmReport {
    /// The device the products ran on.
    pub device: String,
    /// Threads candle's CPU products use (`RAYON_NUM_THREADS`, else the cores).
    pub threads: usize,
    /// The BLAS library the linear layers multiply with, or `None` for candle's kernels.
    pub blas: Option<String>,
    /// One result per shape, in the order asked.
    pub shapes: Vec<GemmResult>,
    /// The best throughput over all shapes: the peak for model FLOPs utilisation.
    pub peak_gflops: f64,
}

/// Times `product` on f32 operands of `shape` on `device`: one warm-up product, then products
/// until `min_seconds` have passed (at least three).
fn time_product(
    shape: GemmShape,
    device: &Device,
    min_seconds: f64,
    product: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> Result<(usize, TimingStats)> {
    let a = Tensor::randn(0f32, 1.0, (shape.m, shape.k), device)?;
    let b = Tensor::randn(0f32, 1.0, (shape.k, shape.n), device)?;
    product(&a, &b)?;
    device.synchronize()?;
    let mut samples = Vec::new();
    let started = Instant::now();
    while samples.len() < 3 || started.elapsed().as_secs_f64() < min_seconds {
        let t = Instant::now();
        let c = product(&a, &b)?;
        device.synchronize()?;
        samples.push(t.elapsed().as_secs_f64());
        debug_assert_eq!(c.dtype(), DType::F32);
    }
    let stats = TimingStats::from_samples(&samples)
        .ok_or_else(|| Error::config("the GEMM benchmark recorded no product"))?;
    Ok((samples.len(), stats))
}

/// Times `shape` in f32 on `device` through the linear layers' products
/// ([`crate::ops::matmul`]) and, with `with_candle`, through candle's `matmul` too.
pub fn time_gemm(
    shape: GemmShape,
    device: &Device,
    min_seconds: f64,
    with_candle: bool,
) -> Result<GemmResult> {
    let rate = |t: &TimingStats| shape.flops() / t.median.max(1e-12) / 1e9;
    let (runs, time_s) = time_product(shape, device, min_seconds, crate::ops::matmul)?;
    let candle_gflops = if with_candle {
        let (_, t) = time_product(shape, device, min_seconds, |a, b| a.matmul(b))?;
        Some(rate(&t))
    } else {
        None
    };
    Ok(GemmResult {
        shape,
        runs,
        time_s,
        gflops: rate(&time_s),
        candle_gflops,
    })
}

/// Times every shape of `shapes` ([`time_gemm`]) and reports the peak.
pub fn bench_gemm(shapes: &[GemmShape], device: &Device, min_seconds: f64) -> Result<GemmReport> {
    if shapes.is_empty() {
        return Err(Error::config("the GEMM benchmark needs at least one shape"));
    }
    let results = shapes
        .iter()
        .map(|&s| time_gemm(s, device, min_seconds, true))
        .collect::<Result<Vec<_>>>()?;
    let peak_gflops = results.iter().map(|r| r.gflops).fold(0.0, f64::max);
    Ok(GemmReport {
        device: format!("{:?}", device.location()),
        threads: candle_core::utils::get_num_threads(),
        blas: crate::ops::blas::backend(),
        shapes: results,
        peak_gflops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_bad_ones_name_the_form() {
        let s: GemmShape = "1024x576X192".parse().unwrap();
        assert_eq!((s.m, s.n, s.k), (1024, 576, 192));
        assert_eq!(s.flops(), 2.0 * 1024.0 * 576.0 * 192.0);
        for bad in ["1024x576", "1x2x3x4", "0x1x1", "ax1x1", ""] {
            let e = bad.parse::<GemmShape>().unwrap_err().to_string();
            assert!(e.contains("MxNxK"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_small_product_is_timed_and_its_rate_follows_from_the_time() {
        let shape = GemmShape { m: 8, n: 4, k: 16 };
        let report = bench_gemm(&[shape], &Device::Cpu, 0.0).unwrap();
        let r = &report.shapes[0];
        assert!(r.runs >= 3 && r.candle_gflops.is_some_and(|g| g > 0.0));
        let expected = shape.flops() / r.time_s.median / 1e9;
        assert!((r.gflops - expected).abs() <= 1e-9 * expected.max(1.0));
        assert_eq!(report.peak_gflops, r.gflops);
        assert!(bench_gemm(&[], &Device::Cpu, 0.0).is_err());
    }
}
