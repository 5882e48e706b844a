//! Finite-difference proofs of the backward pass of every differentiable op the models use
//! (DESIGN.md principle 5).
//!
//! Each test builds random f64 inputs from a seeded `StdRng`, reduces the op's output to a scalar
//! with a fixed random projection (`sum(out ⊙ R)`, so that e.g. a softmax does not sum to a
//! constant), compares candle's autograd gradient to central differences and fails when the
//! maximum error, relative to the largest gradient entry, exceeds the tolerance. Run with
//! `--nocapture` to see the measured errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use whetstone_host::ops::{self, Linear, RotaryEmbedding, IGNORE_INDEX};
use whetstone_host::params::ParamStore;

/// Finite-difference step.
const H: f64 = 1e-5;
/// Maximum accepted error relative to the largest gradient entry.
const TOL: f64 = 1e-6;

type Op = dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>;

fn cpu() -> Device {
    Device::Cpu
}

/// Uniform random f64 tensor in `[-scale, scale)`.
fn rand_tensor(rng: &mut StdRng, shape: &[usize], scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(data, shape, &cpu()).unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `sum(f(inputs) ⊙ r)`.
fn project(f: &Op, inputs: &[Tensor], r: &Tensor) -> candle_core::Result<Tensor> {
    f(inputs)?.mul(r)?.sum_all()
}

/// Central-difference gradient of `sum(f(inputs) ⊙ r)` with respect to `inputs[which]`.
fn fd_gradient(f: &Op, inputs: &[Tensor], which: usize, r: &Tensor) -> Vec<f64> {
    let base = flat(&inputs[which]);
    let shape = inputs[which].shape().clone();
    let eval = |data: Vec<f64>| {
        let mut xs = inputs.to_vec();
        xs[which] = Tensor::from_vec(data, shape.clone(), &cpu()).unwrap();
        project(f, &xs, r).unwrap().to_scalar::<f64>().unwrap()
    };
    (0..base.len())
        .map(|i| {
            let mut plus = base.clone();
            plus[i] += H;
            let mut minus = base.clone();
            minus[i] -= H;
            (eval(plus) - eval(minus)) / (2.0 * H)
        })
        .collect()
}

/// Max |ad - fd| over max |fd|.
fn rel_err(ad: &[f64], fd: &[f64]) -> f64 {
    assert_eq!(ad.len(), fd.len());
    let scale = fd.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
    let diff = ad
        .iter()
        .zip(fd)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

/// The fixed projection `R` for `f`'s output.
fn projection(f: &Op, inputs: &[Tensor], rng: &mut StdRng) -> Tensor {
    let out = f(inputs).unwrap();
    rand_tensor(rng, out.dims(), 1.0)
}

/// Compares autograd and finite differences for `inputs[i]`, `i ∈ wrt`; returns the worst
/// relative error and asserts it is below `TOL`.
fn check(name: &str, rng: &mut StdRng, inputs: &[Tensor], wrt: &[usize], f: &Op) -> f64 {
    let r = projection(f, inputs, rng);
    let vars: Vec<Option<Var>> = (0..inputs.len())
        .map(|i| {
            wrt.contains(&i)
                .then(|| Var::from_tensor(&inputs[i]).unwrap())
        })
        .collect();
    let ad_inputs: Vec<Tensor> = inputs
        .iter()
        .zip(&vars)
        .map(|(t, v)| {
            v.as_ref()
                .map_or_else(|| t.clone(), |v| v.as_tensor().clone())
        })
        .collect();
    let grads = project(f, &ad_inputs, &r).unwrap().backward().unwrap();
    let mut worst = 0.0f64;
    for &i in wrt {
        let var = vars[i].as_ref().unwrap();
        let ad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: autograd dropped the gradient of input {i}"));
        assert_eq!(
            ad.dims(),
            inputs[i].dims(),
            "{name}: gradient shape of input {i}"
        );
        let fd = fd_gradient(f, inputs, i, &r);
        let err = rel_err(&flat(ad), &fd);
        assert!(
            fd.iter().any(|v| v.abs() > 1e-8),
            "{name}: input {i} has an all-zero gradient; the test would prove nothing"
        );
        eprintln!("{name}: input {i}: max relative error {err:.2e}");
        assert!(
            err < TOL,
            "{name}: input {i}: autograd and finite differences differ by {err:.3e} (relative)"
        );
        worst = worst.max(err);
    }
    worst
}

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

#[test]
fn rms_norm_gradients() {
    let mut rng = rng(1);
    let inputs = [
        rand_tensor(&mut rng, &[2, 3, 6], 1.0),
        rand_tensor(&mut rng, &[6], 1.0),
    ];
    check("rms_norm", &mut rng, &inputs, &[0, 1], &|xs| {
        ops::rms_norm(&xs[0], &xs[1], 1e-5)
    });
}

#[test]
fn layer_norm_gradients() {
    let mut rng = rng(2);
    let inputs = [
        rand_tensor(&mut rng, &[2, 3, 6], 1.0),
        rand_tensor(&mut rng, &[6], 1.0),
        rand_tensor(&mut rng, &[6], 1.0),
    ];
    check("layer_norm", &mut rng, &inputs, &[0, 1, 2], &|xs| {
        ops::layer_norm(&xs[0], &xs[1], &xs[2], 1e-12)
    });
}

#[test]
fn rope_gradients() {
    let mut rng = rng(3);
    let rotary = RotaryEmbedding::new(8, 16, 10_000.0, DType::F64, &cpu()).unwrap();
    let inputs = [rand_tensor(&mut rng, &[2, 2, 5, 8], 1.0)];
    check("rope", &mut rng, &inputs, &[0], &move |xs| {
        rotary.apply(&xs[0], 3)
    });
}

#[test]
fn rope_rotates_half_and_preserves_norm() {
    // Position 0 is the identity; every position preserves each pair's norm.
    let mut rng = rng(4);
    let rotary = RotaryEmbedding::new(8, 16, 10_000.0, DType::F64, &cpu()).unwrap();
    let x = rand_tensor(&mut rng, &[1, 1, 4, 8], 1.0);
    let y = rotary.apply(&x, 0).unwrap();
    let (xv, yv) = (flat(&x), flat(&y));
    for i in 0..8 {
        assert!((xv[i] - yv[i]).abs() < 1e-12);
    }
    let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>();
    assert!((norm(&xv) - norm(&yv)).abs() < 1e-9);
}

#[test]
fn softmax_gradients() {
    let mut rng = rng(5);
    let inputs = [rand_tensor(&mut rng, &[3, 7], 3.0)];
    check("softmax", &mut rng, &inputs, &[0], &|xs| {
        ops::softmax_last_dim(&xs[0])
    });
}

#[test]
fn log_softmax_gradients() {
    let mut rng = rng(6);
    let inputs = [rand_tensor(&mut rng, &[3, 7], 3.0)];
    check("log_softmax", &mut rng, &inputs, &[0], &|xs| {
        ops::log_softmax_last_dim(&xs[0])
    });
}

/// A padding mask with left padding on the second sequence, so that with `causal` its first
/// query row sees no real key at all (a fully padded row).
fn padded_mask() -> Tensor {
    Tensor::from_vec(vec![1u32, 1, 1, 1, 1, 0, 0, 1, 1, 1], (2, 5), &cpu()).unwrap()
}

#[test]
fn causal_attention_with_padding_gradients() {
    let mut rng = rng(7);
    let bias = ops::attention_bias(&padded_mask(), 5, true, DType::F64).unwrap();
    let inputs = [
        rand_tensor(&mut rng, &[2, 2, 5, 4], 1.0),
        rand_tensor(&mut rng, &[2, 2, 5, 4], 1.0),
        rand_tensor(&mut rng, &[2, 2, 5, 4], 1.0),
    ];
    check(
        "causal attention (padded)",
        &mut rng,
        &inputs,
        &[0, 1, 2],
        &move |xs| ops::scaled_dot_product_attention(&xs[0], &xs[1], &xs[2], Some(&bias)),
    );
}

#[test]
fn bidirectional_attention_with_padding_gradients() {
    let mut rng = rng(8);
    let bias = ops::attention_bias(&padded_mask(), 5, false, DType::F64).unwrap();
    let inputs = [
        rand_tensor(&mut rng, &[2, 2, 5, 4], 1.0),
        rand_tensor(&mut rng, &[2, 2, 5, 4], 1.0),
        rand_tensor(&mut rng, &[2, 2, 5, 4], 1.0),
    ];
    check(
        "bidirectional attention (padded)",
        &mut rng,
        &inputs,
        &[0, 1, 2],
        &move |xs| ops::scaled_dot_product_attention(&xs[0], &xs[1], &xs[2], Some(&bias)),
    );
}

#[test]
fn attention_mask_hides_padding_and_future() {
    // Changing a padded key/value or a future key/value must not change a real query's output.
    let mut rng = rng(9);
    let bias = ops::attention_bias(&padded_mask(), 5, true, DType::F64).unwrap();
    let q = rand_tensor(&mut rng, &[2, 1, 5, 4], 1.0);
    let k = rand_tensor(&mut rng, &[2, 1, 5, 4], 1.0);
    let v = rand_tensor(&mut rng, &[2, 1, 5, 4], 1.0);
    let out = ops::scaled_dot_product_attention(&q, &k, &v, Some(&bias)).unwrap();
    // Perturb key/value position 0 of sequence 1 (padding) and position 4 (future of row 2).
    let mut kv = flat(&v);
    for d in 0..4 {
        kv[20 + d] += 10.0; // seq 1, pos 0
        kv[16 + d] += 10.0; // seq 0, pos 4
    }
    let v2 = Tensor::from_vec(kv, (2, 1, 5, 4), &cpu()).unwrap();
    let out2 = ops::scaled_dot_product_attention(&q, &k, &v2, Some(&bias)).unwrap();
    let (a, b) = (flat(&out), flat(&out2));
    // seq 0 rows 0..4 (positions before 4) and seq 1 rows 2..5 (real queries) are unchanged.
    for row in (0..4).chain(7..10) {
        for d in 0..4 {
            assert!(
                (a[row * 4 + d] - b[row * 4 + d]).abs() < 1e-12,
                "row {row} saw a masked value"
            );
        }
    }
}

#[test]
fn repeat_kv_gradients() {
    let mut rng = rng(10);
    let inputs = [rand_tensor(&mut rng, &[2, 2, 3, 4], 1.0)];
    check("repeat_kv (GQA)", &mut rng, &inputs, &[0], &|xs| {
        ops::repeat_kv(&xs[0], 3)
    });
    // Layout: kv head h is repeated for query heads h*n_rep .. (h+1)*n_rep.
    let x = &inputs[0];
    let y = ops::repeat_kv(x, 3).unwrap();
    assert_eq!(y.dims(), &[2, 6, 3, 4]);
    let head = |t: &Tensor, h: usize| flat(&t.narrow(1, h, 1).unwrap());
    assert_eq!(head(&y, 4), head(x, 1));
    assert_eq!(head(&y, 2), head(x, 0));
}

#[test]
fn gqa_attention_gradients() {
    let mut rng = rng(11);
    let bias = ops::attention_bias(&padded_mask(), 5, true, DType::F64).unwrap();
    let inputs = [
        rand_tensor(&mut rng, &[2, 4, 5, 4], 1.0),
        rand_tensor(&mut rng, &[2, 2, 5, 4], 1.0),
        rand_tensor(&mut rng, &[2, 2, 5, 4], 1.0),
    ];
    check("GQA attention", &mut rng, &inputs, &[0, 1, 2], &move |xs| {
        let k = ops::repeat_kv(&xs[1], 2)?;
        let v = ops::repeat_kv(&xs[2], 2)?;
        ops::scaled_dot_product_attention(&xs[0], &k, &v, Some(&bias))
    });
}

#[test]
fn silu_gradients() {
    let mut rng = rng(12);
    let inputs = [rand_tensor(&mut rng, &[4, 6], 3.0)];
    check("silu", &mut rng, &inputs, &[0], &|xs| ops::silu(&xs[0]));
}

#[test]
fn swiglu_gradients() {
    let mut rng = rng(13);
    let inputs = [
        rand_tensor(&mut rng, &[4, 6], 3.0),
        rand_tensor(&mut rng, &[4, 6], 3.0),
    ];
    check("swiglu", &mut rng, &inputs, &[0, 1], &|xs| {
        ops::swiglu(&xs[0], &xs[1])
    });
}

#[test]
fn gelu_gradients() {
    let mut rng = rng(14);
    let inputs = [rand_tensor(&mut rng, &[4, 6], 3.0)];
    check("gelu (erf)", &mut rng, &inputs, &[0], &|xs| {
        ops::gelu(&xs[0])
    });
    // The exact erf form: gelu(1) = 0.8413447460685429.
    let one = Tensor::new(&[1.0f64], &cpu()).unwrap();
    assert!((flat(&ops::gelu(&one).unwrap())[0] - 0.841_344_746_068_542_9).abs() < 1e-12);
}

#[test]
fn gelu_tanh_gradients() {
    let mut rng = rng(21);
    let inputs = [rand_tensor(&mut rng, &[4, 6], 3.0)];
    check("gelu (tanh)", &mut rng, &inputs, &[0], &|xs| {
        ops::gelu_tanh(&xs[0])
    });
}

#[test]
fn embedding_table_gradients() {
    let mut rng = rng(15);
    let ids = Tensor::from_vec(vec![3u32, 0, 3, 5, 1, 3], (2, 3), &cpu()).unwrap();
    let inputs = [rand_tensor(&mut rng, &[7, 4], 1.0)];
    let r = check("embedding", &mut rng, &inputs, &[0], &move |xs| {
        ops::embedding(&xs[0], &ids)
    });
    assert!(r < TOL);
}

#[test]
fn cross_entropy_with_ignore_index_gradients() {
    let mut rng = rng(16);
    let targets =
        Tensor::from_vec(vec![2i64, IGNORE_INDEX, 0, 4, IGNORE_INDEX], 5, &cpu()).unwrap();
    let inputs = [rand_tensor(&mut rng, &[5, 6], 2.0)];
    let t = targets.clone();
    check(
        "cross_entropy (ignore -100)",
        &mut rng,
        &inputs,
        &[0],
        &move |xs| ops::cross_entropy(&xs[0], &t),
    );
    // Ignored rows get exactly zero gradient, and the value is the mean over the 3 valid rows.
    let var = Var::from_tensor(&inputs[0]).unwrap();
    let loss = ops::cross_entropy(var.as_tensor(), &targets).unwrap();
    let grads = loss.backward().unwrap();
    let g = flat(grads.get(var.as_tensor()).unwrap());
    for row in [1, 4] {
        assert!(
            g[row * 6..row * 6 + 6].iter().all(|v| *v == 0.0),
            "ignored row {row} got a gradient"
        );
    }
    let logits = flat(&inputs[0]);
    let mut expected = 0.0;
    for (row, target) in [(0usize, 2usize), (2, 0), (3, 4)] {
        let l = &logits[row * 6..row * 6 + 6];
        let lse = l.iter().map(|v| v.exp()).sum::<f64>().ln();
        expected += lse - l[target];
    }
    expected /= 3.0;
    assert!((loss.to_scalar::<f64>().unwrap() - expected).abs() < 1e-12);
}

#[test]
fn causal_lm_loss_gradients() {
    let mut rng = rng(17);
    let labels = Tensor::from_vec(
        vec![IGNORE_INDEX, IGNORE_INDEX, 3, 1, 0, 4, 2, IGNORE_INDEX],
        (2, 4),
        &cpu(),
    )
    .unwrap();
    let inputs = [rand_tensor(&mut rng, &[2, 4, 5], 2.0)];
    check("causal_lm_loss", &mut rng, &inputs, &[0], &move |xs| {
        ops::causal_lm_loss(&xs[0], &labels)
    });
}

#[test]
fn frozen_linear_gradients_match_matmul_and_store_no_weight_gradient() {
    let mut rng = rng(18);
    let (rows, inp, out) = (3, 5, 4);
    let x = rand_tensor(&mut rng, &[rows, inp], 1.0);
    let w = rand_tensor(&mut rng, &[out, inp], 1.0);
    let r = rand_tensor(&mut rng, &[rows, out], 1.0);

    // Forward values agree with the plain matmul.
    let y_frozen = ops::frozen_linear(&x, &w).unwrap();
    let y_plain = x.matmul(&w.t().unwrap()).unwrap();
    assert!(rel_err(&flat(&y_frozen), &flat(&y_plain)) < 1e-12);

    // Backward through the frozen op.
    let xv = Var::from_tensor(&x).unwrap();
    let grads = ops::frozen_linear(xv.as_tensor(), &w)
        .unwrap()
        .mul(&r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(
        grads.get(&w).is_none(),
        "the frozen weight has a gradient entry"
    );
    for id in grads.get_ids() {
        let g = grads.get_id(*id).unwrap();
        assert!(
            g.dims() != [out, inp] && g.dims() != [inp, out],
            "a weight-shaped gradient {:?} was computed for a frozen linear",
            g.dims()
        );
    }
    let dx_frozen = flat(grads.get(xv.as_tensor()).unwrap());

    // The plain matmul computes the same dX, but also a weight-shaped gradient: this is what the
    // frozen op avoids (and shows the check above can fail).
    let xv2 = Var::from_tensor(&x).unwrap();
    let plain = xv2
        .as_tensor()
        .matmul(&w.t().unwrap())
        .unwrap()
        .mul(&r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let dx_plain = flat(plain.get(xv2.as_tensor()).unwrap());
    assert!(plain
        .get_ids()
        .any(|id| plain.get_id(*id).unwrap().dims() == [inp, out]));
    let err = rel_err(&dx_frozen, &dx_plain);
    eprintln!("frozen_linear: dX vs plain matmul dX: max relative error {err:.2e}");
    assert!(err < 1e-12);

    // And against finite differences, with a batch dimension.
    let x3 = rand_tensor(&mut rng, &[2, rows, inp], 1.0);
    let w2 = w.clone();
    check("frozen_linear", &mut rng, &[x3], &[0], &move |xs| {
        ops::frozen_linear(&xs[0], &w2)
    });
}

#[test]
fn trainable_linear_gradients() {
    let mut rng = rng(19);
    let x = rand_tensor(&mut rng, &[2, 3, 5], 1.0);
    let w = rand_tensor(&mut rng, &[4, 5], 1.0);
    let b = rand_tensor(&mut rng, &[4], 1.0);
    // A linear layer over the given tensors as frozen params (used for finite differences).
    let frozen_layer = |w: &Tensor, b: &Tensor| {
        let mut store = ParamStore::new();
        let wp = store.insert("l.weight", w.clone());
        let bp = store.insert("l.bias", b.clone());
        Linear::new("l", wp, Some(bp))
    };
    let f: Box<Op> = Box::new(move |xs: &[Tensor]| frozen_layer(&xs[1], &xs[2]).forward(&xs[0]));
    let inputs = [x.clone(), w.clone(), b.clone()];
    let r = projection(f.as_ref(), &inputs, &mut rng);

    // Autograd through a layer whose weight and bias are trainable params.
    let mut store = ParamStore::new();
    let wp = store.insert("l.weight", w.clone());
    let bp = store.insert("l.bias", b.clone());
    store
        .set_trainable_by_patterns(&["l.*".to_string()])
        .unwrap();
    let layer = Linear::new("l", Arc::clone(&wp), Some(Arc::clone(&bp)));
    let xv = Var::from_tensor(&x).unwrap();
    let grads = layer
        .forward(xv.as_tensor())
        .unwrap()
        .mul(&r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, t) in [
        (0usize, xv.as_tensor().clone()),
        (1, wp.tensor()),
        (2, bp.tensor()),
    ] {
        let ad = flat(
            grads
                .get(&t)
                .unwrap_or_else(|| panic!("linear: input {i} has no gradient")),
        );
        let fd = fd_gradient(f.as_ref(), &inputs, i, &r);
        let err = rel_err(&ad, &fd);
        eprintln!("linear (trainable): input {i}: max relative error {err:.2e}");
        assert!(err < TOL);
    }
}

#[test]
fn dropout_equals_a_fixed_mask_and_its_gradient() {
    let p = 0.3f32;
    let mut data_rng = rng(20);
    let x = rand_tensor(&mut data_rng, &[8, 16], 1.0);
    // The mask the seeded rng draws: dropout applied to ones.
    let mask = ops::dropout(
        &Tensor::ones((8, 16), DType::F64, &cpu()).unwrap(),
        p,
        &mut rng(99),
    )
    .unwrap();
    let m = flat(&mask);
    let keep = 1.0 / (1.0 - f64::from(p));
    assert!(
        m.iter().all(|v| *v == 0.0 || (v - keep).abs() < 1e-6),
        "mask values are 0 or 1/(1-p)"
    );
    let dropped = m.iter().filter(|v| **v == 0.0).count() as f64 / m.len() as f64;
    assert!(
        (dropped - f64::from(p)).abs() < 0.12,
        "dropped fraction {dropped}"
    );
    // Same seed, same mask: dropout(x) == x ⊙ mask.
    let y = ops::dropout(&x, p, &mut rng(99)).unwrap();
    assert!(rel_err(&flat(&y), &flat(&x.mul(&mask).unwrap())) < 1e-12);
    // p = 0 is the identity.
    assert_eq!(
        flat(&ops::dropout(&x, 0.0, &mut rng(99)).unwrap()),
        flat(&x)
    );
    // Gradient (re-seeding per evaluation keeps the mask fixed).
    check("dropout", &mut data_rng, &[x], &[0], &move |xs| {
        ops::dropout(&xs[0], p, &mut rng(99))
    });
}

// ---------------------------------------------------------------------------------------------
// Fused CPU kernels (`ops::fused`): finite differences in f64, and agreement with the composed
// reference path (`ops::composed`, used on CUDA/Metal) in f32.
// ---------------------------------------------------------------------------------------------

/// Relative tolerance of the f32 fused-vs-composed comparisons.
const F32_TOL: f64 = 1e-5;

fn to_f32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F32).unwrap()
}

/// Output of `f(inputs)` and the gradients of `sum(f(inputs) ⊙ r)` (or of the scalar output
/// itself when `r` is `None`) for `inputs[i]`, `i ∈ wrt`.
fn value_and_grads(
    f: &Op,
    inputs: &[Tensor],
    wrt: &[usize],
    r: Option<&Tensor>,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Option<Var>> = (0..inputs.len())
        .map(|i| {
            wrt.contains(&i)
                .then(|| Var::from_tensor(&inputs[i]).unwrap())
        })
        .collect();
    let xs: Vec<Tensor> = inputs
        .iter()
        .zip(&vars)
        .map(|(t, v)| {
            v.as_ref()
                .map_or_else(|| t.clone(), |v| v.as_tensor().clone())
        })
        .collect();
    let out = f(&xs).unwrap();
    let scalar = match r {
        Some(r) => out.mul(r).unwrap().sum_all().unwrap(),
        None => out.clone(),
    };
    let grads = scalar.backward().unwrap();
    let g = wrt
        .iter()
        .map(|&i| {
            grads
                .get(vars[i].as_ref().unwrap().as_tensor())
                .unwrap_or_else(|| panic!("no gradient for input {i}"))
                .clone()
        })
        .collect();
    (out, g)
}

/// Asserts `max |a - b| / max |b| < tol` and that `a` is finite.
fn assert_close(name: &str, a: &Tensor, b: &Tensor, tol: f64) {
    assert_eq!(a.dims(), b.dims(), "{name}: shapes differ");
    let (av, bv) = (flat(a), flat(b));
    assert!(
        av.iter().all(|v| v.is_finite()),
        "{name}: non-finite values"
    );
    let err = rel_err(&av, &bv);
    eprintln!("{name}: fused vs composed: max relative difference {err:.2e}");
    assert!(
        err < tol,
        "{name}: fused and composed differ by {err:.3e} (relative)"
    );
}

/// Compares fused `a` and composed `b` (value and gradients for `wrt`) on f32 `inputs`.
fn fused_vs_composed(
    name: &str,
    rng: &mut StdRng,
    inputs: &[Tensor],
    wrt: &[usize],
    a: &Op,
    b: &Op,
) {
    let out = b(inputs).unwrap();
    let r = (out.rank() > 0).then(|| to_f32(&rand_tensor(rng, out.dims(), 1.0)));
    let (ya, ga) = value_and_grads(a, inputs, wrt, r.as_ref());
    let (yb, gb) = value_and_grads(b, inputs, wrt, r.as_ref());
    assert_eq!(ya.dtype(), DType::F32);
    assert_close(&format!("{name} value"), &ya, &yb, F32_TOL);
    for ((i, ga), gb) in wrt.iter().zip(&ga).zip(&gb) {
        assert!(
            flat(gb).iter().any(|v| v.abs() > 1e-8),
            "{name}: zero gradient {i}"
        );
        assert_close(&format!("{name} d input {i}"), ga, gb, F32_TOL);
    }
}

#[test]
fn fused_kernels_gradients() {
    let mut rng = rng(30);
    let inputs = [
        rand_tensor(&mut rng, &[3, 4, 9], 2.0),
        rand_tensor(&mut rng, &[9], 1.0),
        rand_tensor(&mut rng, &[9], 1.0),
    ];
    check("fused rms_norm", &mut rng, &inputs[..2], &[0, 1], &|xs| {
        ops::fused::rms_norm(&xs[0], &xs[1], 1e-6)
    });
    check("fused layer_norm", &mut rng, &inputs, &[0, 1, 2], &|xs| {
        ops::fused::layer_norm(&xs[0], &xs[1], &xs[2], 1e-5)
    });
    // Softmax with masked (-1e4) entries, as attention produces.
    let mut x = flat(&rand_tensor(&mut rng, &[4, 11], 3.0));
    for i in [2, 3, 4, 20, 43] {
        x[i] -= 1e4;
    }
    let x = Tensor::from_vec(x, (4, 11), &cpu()).unwrap();
    check("fused softmax", &mut rng, &[x], &[0], &|xs| {
        ops::fused::softmax_last_dim(&xs[0])
    });
    // Cross-entropy with ignored rows and a dominant (1e4) logit off the target.
    let targets =
        Tensor::from_vec(vec![2i64, IGNORE_INDEX, 0, 6, IGNORE_INDEX, 3], 6, &cpu()).unwrap();
    let mut logits = flat(&rand_tensor(&mut rng, &[6, 7], 2.0));
    logits[3 * 7 + 1] = 1e4;
    let logits = Tensor::from_vec(logits, (6, 7), &cpu()).unwrap();
    check(
        "fused cross_entropy",
        &mut rng,
        &[logits],
        &[0],
        &move |xs| ops::fused::cross_entropy(&xs[0], &targets),
    );
    let labels = Tensor::from_vec(
        vec![IGNORE_INDEX, 4, 3, 1, 0, 4, 2, IGNORE_INDEX, IGNORE_INDEX],
        (3, 3),
        &cpu(),
    )
    .unwrap();
    let logits = rand_tensor(&mut rng, &[3, 3, 5], 2.0);
    check(
        "fused causal_lm_loss",
        &mut rng,
        &[logits],
        &[0],
        &move |xs| ops::fused::causal_lm_loss(&xs[0], &labels),
    );
}

#[test]
fn composed_reference_gradients() {
    // The composed path is what CUDA and Metal run: keep it proven too.
    let mut rng = rng(31);
    let inputs = [
        rand_tensor(&mut rng, &[2, 3, 6], 1.0),
        rand_tensor(&mut rng, &[6], 1.0),
        rand_tensor(&mut rng, &[6], 1.0),
    ];
    check(
        "composed rms_norm",
        &mut rng,
        &inputs[..2],
        &[0, 1],
        &|xs| ops::composed::rms_norm(&xs[0], &xs[1], 1e-5),
    );
    check(
        "composed layer_norm",
        &mut rng,
        &inputs,
        &[0, 1, 2],
        &|xs| ops::composed::layer_norm(&xs[0], &xs[1], &xs[2], 1e-5),
    );
    check("composed softmax", &mut rng, &inputs[..1], &[0], &|xs| {
        ops::composed::softmax_last_dim(&xs[0])
    });
    let targets = Tensor::from_vec(vec![2i64, IGNORE_INDEX, 0, 4, 5, 1], 6, &cpu()).unwrap();
    check(
        "composed cross_entropy",
        &mut rng,
        &[inputs[0].reshape((6, 6)).unwrap()],
        &[0],
        &move |xs| ops::composed::cross_entropy(&xs[0], &targets),
    );
    let labels =
        Tensor::from_vec(vec![IGNORE_INDEX, 4, 3, 1, 0, IGNORE_INDEX], (2, 3), &cpu()).unwrap();
    check(
        "composed causal_lm_loss",
        &mut rng,
        &inputs[..1],
        &[0],
        &move |xs| ops::composed::causal_lm_loss(&xs[0], &labels),
    );
}

#[test]
fn fused_cross_entropy_matches_composed_in_f32() {
    let mut rng = rng(32);
    let (n, classes) = (40usize, 3001usize);
    let mut logits = flat(&rand_tensor(&mut rng, &[n, classes], 4.0));
    let mut targets: Vec<i64> = (0..n)
        .map(|_| rng.random_range(0..classes as i64))
        .collect();
    for row in [3, 17, 39] {
        targets[row] = IGNORE_INDEX;
    }
    // One logit dominates: at the target (loss ≈ 0) and off the target (loss ≈ 1e4).
    logits[5 * classes + targets[5] as usize] = 1e4;
    logits[6 * classes + (targets[6] as usize + 1) % classes] = 1e4;
    // A "-inf-ish" row: every logit -1e30 (uniform, loss ln(classes)).
    logits[7 * classes..8 * classes].fill(-1e30);
    let logits = to_f32(&Tensor::from_vec(logits, (n, classes), &cpu()).unwrap());
    let t = Tensor::from_vec(targets.clone(), n, &cpu()).unwrap();
    let t2 = t.clone();
    fused_vs_composed(
        "cross_entropy f32",
        &mut rng,
        std::slice::from_ref(&logits),
        &[0],
        &move |xs| ops::fused::cross_entropy(&xs[0], &t),
        &move |xs| ops::composed::cross_entropy(&xs[0], &t2),
    );
    // The public function takes the fused path on the CPU (same bits).
    let t = Tensor::from_vec(targets.clone(), n, &cpu()).unwrap();

    assert_eq!(
        ops::cross_entropy(&logits, &t)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .to_bits(),
        ops::fused::cross_entropy(&logits, &t)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .to_bits()
    );
    // u32 targets (no ignored rows) agree with i64 ones.
    let valid: Vec<i64> = targets.iter().map(|&t| if t < 0 { 0 } else { t }).collect();
    let t64 = Tensor::from_vec(valid.clone(), n, &cpu()).unwrap();
    let t32 = Tensor::from_vec(
        valid.iter().map(|&t| t as u32).collect::<Vec<_>>(),
        n,
        &cpu(),
    )
    .unwrap();
    let a = ops::fused::cross_entropy(&logits, &t32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let b = ops::composed::cross_entropy(&logits, &t64)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(((a - b) / b).abs() < 1e-5, "u32 targets: {a} vs {b}");
}

#[test]
fn fused_cross_entropy_edge_cases() {
    let mut rng = rng(33);
    // No valid target: loss 0 and an all-zero gradient.
    let logits = Var::from_tensor(&rand_tensor(&mut rng, &[4, 5], 1.0)).unwrap();
    let none = Tensor::from_vec(vec![IGNORE_INDEX; 4], 4, &cpu()).unwrap();
    let loss = ops::fused::cross_entropy(logits.as_tensor(), &none).unwrap();
    assert_eq!(loss.to_scalar::<f64>().unwrap(), 0.0);
    let g = flat(loss.backward().unwrap().get(logits.as_tensor()).unwrap());
    assert!(g.iter().all(|v| *v == 0.0));
    // An ignored row of -inf logits (e.g. fully masked) does not poison the loss or gradient,
    // which equal those of the same batch with that row replaced by zeros.
    let mut data = flat(&rand_tensor(&mut rng, &[4, 5], 1.0));
    let targets = Tensor::from_vec(vec![1i64, IGNORE_INDEX, 4, 0], 4, &cpu()).unwrap();
    data[5..10].fill(f64::NEG_INFINITY);
    let with_inf =
        Var::from_tensor(&Tensor::from_vec(data.clone(), (4, 5), &cpu()).unwrap()).unwrap();
    data[5..10].fill(0.0);
    let with_zero = Tensor::from_vec(data, (4, 5), &cpu()).unwrap();
    let loss = ops::fused::cross_entropy(with_inf.as_tensor(), &targets).unwrap();
    let expected = ops::composed::cross_entropy(&with_zero, &targets).unwrap();
    let (l, e) = (
        loss.to_scalar::<f64>().unwrap(),
        expected.to_scalar::<f64>().unwrap(),
    );
    assert!(l.is_finite() && (l - e).abs() < 1e-12, "{l} vs {e}");
    let g = flat(loss.backward().unwrap().get(with_inf.as_tensor()).unwrap());
    assert!(g.iter().all(|v| v.is_finite()));
    assert!(g[5..10].iter().all(|v| *v == 0.0));
    // A valid row of -inf logits is the limit of equal logits: loss ln(5), gradient 1/5 - onehot.
    let row = Var::from_tensor(&Tensor::full(f64::NEG_INFINITY, (1, 5), &cpu()).unwrap()).unwrap();
    let t = Tensor::from_vec(vec![2i64], 1, &cpu()).unwrap();
    let loss = ops::fused::cross_entropy(row.as_tensor(), &t).unwrap();
    assert!((loss.to_scalar::<f64>().unwrap() - 5f64.ln()).abs() < 1e-12);
    let g = flat(loss.backward().unwrap().get(row.as_tensor()).unwrap());
    assert_eq!(g, vec![0.2, 0.2, 0.2 - 1.0, 0.2, 0.2]);
    // NaN logits give a NaN loss (so that training can stop), also when every logit is NaN.
    let nan = Tensor::full(f64::NAN, (2, 5), &cpu()).unwrap();
    let t2 = Tensor::from_vec(vec![1i64, 3], 2, &cpu()).unwrap();
    let loss = ops::fused::cross_entropy(&nan, &t2).unwrap();
    assert!(loss.to_scalar::<f64>().unwrap().is_nan());
    let mut one_nan = flat(&rand_tensor(&mut rng, &[2, 5], 1.0));
    one_nan[7] = f64::NAN;
    let one_nan = Tensor::from_vec(one_nan, (2, 5), &cpu()).unwrap();
    let loss = ops::fused::cross_entropy(&one_nan, &t2).unwrap();
    assert!(loss.to_scalar::<f64>().unwrap().is_nan());
    assert!(flat(&ops::fused::softmax_last_dim(&nan).unwrap())
        .iter()
        .all(|v| v.is_nan()));
    // Out-of-range targets are an error, not a silent read.
    let bad = Tensor::from_vec(vec![5i64], 1, &cpu()).unwrap();
    assert!(ops::fused::cross_entropy(&row.as_tensor().zeros_like().unwrap(), &bad).is_err());
    let bad = Tensor::from_vec(vec![-3i64], 1, &cpu()).unwrap();
    assert!(ops::fused::cross_entropy(&row.as_tensor().zeros_like().unwrap(), &bad).is_err());
}

#[test]
fn fused_causal_lm_loss_matches_composed_in_f32() {
    let mut rng = rng(34);
    let (b, s, v) = (3usize, 9usize, 500usize);
    let logits = to_f32(&rand_tensor(&mut rng, &[b, s, v], 3.0));
    let mut labels: Vec<i64> = (0..b * s).map(|_| rng.random_range(0..v as i64)).collect();
    for i in [0, 1, 2, 9, 17, 18, 19, 20] {
        labels[i] = IGNORE_INDEX;
    }
    let labels = Tensor::from_vec(labels, (b, s), &cpu()).unwrap();
    let l2 = labels.clone();
    fused_vs_composed(
        "causal_lm_loss f32",
        &mut rng,
        &[logits],
        &[0],
        &move |xs| ops::fused::causal_lm_loss(&xs[0], &labels),
        &move |xs| ops::composed::causal_lm_loss(&xs[0], &l2),
    );
}

#[test]
fn fused_norms_and_softmax_match_composed_in_f32() {
    let mut rng = rng(35);
    let x = to_f32(&rand_tensor(&mut rng, &[4, 7, 64], 2.0));
    let w = to_f32(&rand_tensor(&mut rng, &[64], 1.5));
    let bias = to_f32(&rand_tensor(&mut rng, &[64], 1.0));
    fused_vs_composed(
        "rms_norm f32",
        &mut rng,
        &[x.clone(), w.clone()],
        &[0, 1],
        &|xs| ops::fused::rms_norm(&xs[0], &xs[1], 1e-5),
        &|xs| ops::composed::rms_norm(&xs[0], &xs[1], 1e-5),
    );
    fused_vs_composed(
        "layer_norm f32",
        &mut rng,
        &[x.clone(), w.clone(), bias.clone()],
        &[0, 1, 2],
        &|xs| ops::fused::layer_norm(&xs[0], &xs[1], &xs[2], 1e-12),
        &|xs| ops::composed::layer_norm(&xs[0], &xs[1], &xs[2], 1e-12),
    );
    // Attention-like scores with a causal and padding bias.
    let scores = to_f32(&rand_tensor(&mut rng, &[2, 3, 5, 5], 4.0));
    let bias_mask = ops::attention_bias(&padded_mask(), 5, true, DType::F32).unwrap();
    let scores = scores.broadcast_add(&bias_mask).unwrap();
    fused_vs_composed(
        "softmax f32",
        &mut rng,
        &[scores],
        &[0],
        &|xs| ops::fused::softmax_last_dim(&xs[0]),
        &|xs| ops::composed::softmax_last_dim(&xs[0]),
    );
    // The public functions take the fused path on the CPU (same bits).
    let same = |a: Tensor, b: Tensor| {
        let bits = |t: Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_eq!(bits(a), bits(b));
    };
    same(
        ops::rms_norm(&x, &w, 1e-5).unwrap(),
        ops::fused::rms_norm(&x, &w, 1e-5).unwrap(),
    );
    same(
        ops::layer_norm(&x, &w, &bias, 1e-5).unwrap(),
        ops::fused::layer_norm(&x, &w, &bias, 1e-5).unwrap(),
    );
    same(
        ops::softmax_last_dim(&x).unwrap(),
        ops::fused::softmax_last_dim(&x).unwrap(),
    );
    // Non-contiguous inputs are handled (made contiguous) and give the same values.
    let xt = x.transpose(1, 2).unwrap();
    assert!(!xt.is_contiguous());
    assert_close(
        "softmax f32 (transposed input)",
        &ops::fused::softmax_last_dim(&xt).unwrap(),
        &ops::composed::softmax_last_dim(&xt).unwrap(),
        F32_TOL,
    );
    let wt = to_f32(&rand_tensor(&mut rng, &[7], 1.0));
    assert_close(
        "rms_norm f32 (transposed input)",
        &ops::fused::rms_norm(&xt, &wt, 1e-5).unwrap(),
        &ops::composed::rms_norm(&xt, &wt, 1e-5).unwrap(),
        F32_TOL,
    );
}

#[test]
fn fused_norms_compute_no_gradient_for_frozen_weights() {
    let mut rng = rng(36);
    let x = Var::from_tensor(&rand_tensor(&mut rng, &[3, 8], 1.0)).unwrap();
    let w = rand_tensor(&mut rng, &[8], 1.0);
    let b = rand_tensor(&mut rng, &[8], 1.0);
    let r = rand_tensor(&mut rng, &[3, 8], 1.0);
    for (name, y) in [
        (
            "rms_norm",
            ops::fused::rms_norm(x.as_tensor(), &w, 1e-6).unwrap(),
        ),
        (
            "layer_norm",
            ops::fused::layer_norm(x.as_tensor(), &w, &b, 1e-6).unwrap(),
        ),
    ] {
        let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(x.as_tensor()).is_some(),
            "{name}: no input gradient"
        );
        assert!(
            grads.get(&w).is_none(),
            "{name}: frozen weight got a gradient"
        );
        assert!(
            grads.get(&b).is_none(),
            "{name}: frozen bias got a gradient"
        );
        for id in grads.get_ids() {
            assert_ne!(
                grads.get_id(*id).unwrap().dims(),
                [8],
                "{name}: a weight-shaped gradient was computed for a frozen weight"
            );
        }
    }
    // A trainable weight with a frozen input: the weight gradient only.
    let wv = Var::from_tensor(&w).unwrap();
    let x0 = x.as_tensor().detach();
    let grads = ops::fused::rms_norm(&x0, wv.as_tensor(), 1e-6)
        .unwrap()
        .mul(&r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(wv.as_tensor()).is_some());
    assert!(grads.get(&x0).is_none());
}

#[test]
fn fused_rope_gradients_in_both_layouts() {
    // Arbitrary tables (not a rotation's), so every index of the backward formula is exercised.
    let mut rng = rng(40);
    let cos = rand_tensor(&mut rng, &[5, 8], 1.0);
    let sin = rand_tensor(&mut rng, &[5, 8], 1.0);
    let (c, s) = (cos.clone(), sin.clone());
    let x = rand_tensor(&mut rng, &[2, 3, 5, 8], 1.0);
    check(
        "fused rope [b, h, s, d]",
        &mut rng,
        &[x],
        &[0],
        &move |xs| ops::fused::rope(&xs[0], &c, &s, ops::fused::HeadLayout::HeadsFirst),
    );
    let (c, s) = (cos.clone(), sin.clone());
    let x = rand_tensor(&mut rng, &[2, 5, 3, 8], 1.0);
    check(
        "fused rope [b, s, h, d] -> [b, h, s, d]",
        &mut rng,
        &[x],
        &[0],
        &move |xs| ops::fused::rope(&xs[0], &c, &s, ops::fused::HeadLayout::SeqFirst),
    );
    // The same values as the composed formula, the transposing layout included.
    let x = rand_tensor(&mut rng, &[2, 5, 3, 8], 1.0);
    let fused = ops::fused::rope(&x, &cos, &sin, ops::fused::HeadLayout::SeqFirst).unwrap();
    let composed = ops::composed::rope(
        &x.transpose(1, 2).unwrap().contiguous().unwrap(),
        &cos,
        &sin,
    )
    .unwrap();
    assert_eq!(fused.dims(), [2, 3, 5, 8]);
    assert!(rel_err(&flat(&fused), &flat(&composed)) < 1e-15);
}

#[test]
fn fused_rope_matches_composed_in_f32() {
    let mut rng = rng(41);
    let cos = to_f32(&rand_tensor(&mut rng, &[7, 16], 1.0));
    let sin = to_f32(&rand_tensor(&mut rng, &[7, 16], 1.0));
    let x = to_f32(&rand_tensor(&mut rng, &[2, 4, 7, 16], 2.0));
    let (c1, s1, c2, s2) = (cos.clone(), sin.clone(), cos.clone(), sin.clone());
    fused_vs_composed(
        "rope f32",
        &mut rng,
        &[x],
        &[0],
        &move |xs| ops::fused::rope(&xs[0], &c1, &s1, ops::fused::HeadLayout::HeadsFirst),
        &move |xs| ops::composed::rope(&xs[0], &c2, &s2),
    );
    // The model's rotary embedding: applied to [b, s, h, d] it equals the rotation of the
    // transposed heads.
    let rotary = RotaryEmbedding::new(16, 32, 10_000.0, DType::F32, &cpu()).unwrap();
    let x = to_f32(&rand_tensor(&mut rng, &[2, 7, 4, 16], 1.0));
    let heads = x.transpose(1, 2).unwrap().contiguous().unwrap();
    assert_close(
        "rotary apply_to_heads",
        &rotary.apply_to_heads(&x, 3).unwrap(),
        &rotary.apply(&heads, 3).unwrap(),
        F32_TOL,
    );
    assert!(
        rotary.apply_to_heads(&x, 30).is_err(),
        "positions beyond the table"
    );
}

#[test]
fn fused_swiglu_gradients_and_composed_agreement() {
    let mut rng = rng(42);
    let inputs = [
        rand_tensor(&mut rng, &[3, 4, 10], 4.0),
        rand_tensor(&mut rng, &[3, 4, 10], 2.0),
    ];
    check("fused swiglu", &mut rng, &inputs, &[0, 1], &|xs| {
        ops::fused::swiglu(&xs[0], &xs[1])
    });
    let f32_inputs = [to_f32(&inputs[0]), to_f32(&inputs[1])];
    fused_vs_composed(
        "swiglu f32",
        &mut rng,
        &f32_inputs,
        &[0, 1],
        &|xs| ops::fused::swiglu(&xs[0], &xs[1]),
        &|xs| ops::composed::swiglu(&xs[0], &xs[1]),
    );
    // Only the tracked input gets a gradient (a frozen gate, say).
    let up = Var::from_tensor(&inputs[1]).unwrap();
    let grads = ops::fused::swiglu(&inputs[0], up.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(up.as_tensor()).is_some());
    assert!(ops::fused::swiglu(&inputs[0], &inputs[1].narrow(2, 0, 5).unwrap()).is_err());
}

#[test]
fn fused_attention_softmax_gradients_with_scale_and_bias() {
    let mut rng = rng(43);
    // A bias per batch entry (padding and causal) and one shared by the batch (causal only).
    let per_batch = ops::attention_bias(&padded_mask(), 5, true, DType::F64).unwrap();
    let shared = ops::attention_bias(
        &Tensor::ones((1, 5), DType::U32, &cpu()).unwrap(),
        5,
        true,
        DType::F64,
    )
    .unwrap();
    for (name, bias) in [("per batch", per_batch), ("shared", shared)] {
        let b = bias.clone();
        let scores = rand_tensor(&mut rng, &[2, 3, 5, 5], 3.0);
        check(
            &format!("fused attention softmax ({name} bias)"),
            &mut rng,
            &[scores],
            &[0],
            &move |xs| ops::fused::attention_softmax(&xs[0], 0.35, Some(&b)),
        );
        let scores = to_f32(&rand_tensor(&mut rng, &[2, 3, 5, 5], 3.0));
        let b32 = to_f32(&bias);
        let b32c = b32.clone();
        fused_vs_composed(
            &format!("attention softmax f32 ({name} bias)"),
            &mut rng,
            &[scores],
            &[0],
            &move |xs| ops::fused::attention_softmax(&xs[0], 0.35, Some(&b32)),
            &move |xs| ops::composed::attention_softmax(&xs[0], 0.35, Some(&b32c)),
        );
    }
    let scores = rand_tensor(&mut rng, &[1, 2, 3, 4], 3.0);
    check(
        "fused attention softmax (no bias)",
        &mut rng,
        &[scores],
        &[0],
        &|xs| ops::fused::attention_softmax(&xs[0], 2.0, None),
    );
    // A bias of another shape is not the fused kernel's (the dispatcher composes instead).
    let odd = rand_tensor(&mut rng, &[2, 3, 5, 5], 1.0);
    let scores = rand_tensor(&mut rng, &[2, 3, 5, 5], 1.0);
    assert!(!ops::fused::supports_attention(&scores, Some(&odd)));
    assert!(ops::fused::attention_softmax(&scores, 1.0, Some(&odd)).is_err());
    assert_close(
        "attention softmax dispatch (full bias)",
        &ops::attention_softmax(&scores, 0.5, Some(&odd)).unwrap(),
        &ops::composed::attention_softmax(&scores, 0.5, Some(&odd)).unwrap(),
        1e-12,
    );
}

#[test]
fn grouped_attention_equals_repeated_heads() {
    // Two key/value heads shared by groups of three query heads, with a padded causal mask: the
    // grouped product gives the values and gradients of attention over repeated heads.
    let mut rng = rng(44);
    let bias = ops::attention_bias(&padded_mask(), 5, true, DType::F64).unwrap();
    let inputs = [
        rand_tensor(&mut rng, &[2, 6, 5, 4], 1.0),
        rand_tensor(&mut rng, &[2, 2, 5, 4], 1.0),
        rand_tensor(&mut rng, &[2, 2, 5, 4], 1.0),
    ];
    let r = rand_tensor(&mut rng, &[2, 6, 5, 4], 1.0);
    let b1 = bias.clone();
    let grouped: Box<Op> = Box::new(move |xs: &[Tensor]| {
        ops::scaled_dot_product_attention(&xs[0], &xs[1], &xs[2], Some(&b1))
    });
    let b2 = bias.clone();
    let repeated: Box<Op> = Box::new(move |xs: &[Tensor]| {
        let k = ops::repeat_kv(&xs[1], 3)?.contiguous()?;
        let v = ops::repeat_kv(&xs[2], 3)?.contiguous()?;
        ops::scaled_dot_product_attention(&xs[0], &k, &v, Some(&b2))
    });
    let (ya, ga) = value_and_grads(grouped.as_ref(), &inputs, &[0, 1, 2], Some(&r));
    let (yb, gb) = value_and_grads(repeated.as_ref(), &inputs, &[0, 1, 2], Some(&r));
    assert!(rel_err(&flat(&ya), &flat(&yb)) < 1e-14);
    for (i, (a, b)) in ga.iter().zip(&gb).enumerate() {
        assert_eq!(a.dims(), inputs[i].dims());
        assert!(rel_err(&flat(a), &flat(b)) < 1e-12, "gradient {i}");
    }
    let b3 = bias.clone();
    check(
        "grouped attention",
        &mut rng,
        &inputs,
        &[0, 1, 2],
        &move |xs| ops::scaled_dot_product_attention(&xs[0], &xs[1], &xs[2], Some(&b3)),
    );
    // Key/value heads that do not divide the query heads are refused, naming the rule.
    let bad = rand_tensor(&mut rng, &[2, 4, 5, 4], 1.0);
    let e = ops::scaled_dot_product_attention(&inputs[0], &bad, &bad, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("must divide"), "{e}");
}

#[test]
fn fused_attention_matches_the_composed_products() {
    // The fused op against candle's products and the composed softmax over repeated key/value
    // heads, values and gradients: grouped heads under a padded causal mask, a query shorter
    // than its keys (a prefix or a cache) under a shared bias, and plain multi-head attention
    // without a bias.
    let mut rng = rng(46);
    let composed = |bias: Option<Tensor>| -> Box<Op> {
        Box::new(move |xs: &[Tensor]| {
            let (q, k, v) = (&xs[0], &xs[1], &xs[2]);
            let group = q.dim(1)? / k.dim(1)?;
            let k = ops::repeat_kv(k, group)?.contiguous()?;
            let v = ops::repeat_kv(v, group)?.contiguous()?;
            let scores = q.matmul(&k.t()?)?;
            let scale = 1.0 / (q.dim(3)? as f64).sqrt();
            ops::composed::attention_softmax(&scores, scale, bias.as_ref())?.matmul(&v)
        })
    };
    let fused = |bias: Option<Tensor>| -> Box<Op> {
        Box::new(move |xs: &[Tensor]| {
            assert!(ops::fused::supports_fused_attention(
                &xs[0],
                &xs[1],
                &xs[2],
                bias.as_ref()
            ));
            ops::scaled_dot_product_attention(&xs[0], &xs[1], &xs[2], bias.as_ref())
        })
    };
    let padded = ops::attention_bias(&padded_mask(), 5, true, DType::F32).unwrap();
    let past = Tensor::ones((1, 7), DType::U32, &cpu()).unwrap();
    let prefix = ops::attention_bias(&past, 3, true, DType::F32).unwrap();
    let cases = [
        (
            "grouped, padded causal",
            [2, 6, 5, 4],
            [2, 2, 5, 4],
            Some(padded),
        ),
        (
            "prefix, shared bias",
            [1, 4, 3, 8],
            [1, 2, 7, 8],
            Some(prefix),
        ),
        ("multi-head, no bias", [2, 3, 6, 8], [2, 3, 6, 8], None),
    ];
    for (name, q, kv, bias) in cases {
        let inputs = [
            to_f32(&rand_tensor(&mut rng, &q, 1.0)),
            to_f32(&rand_tensor(&mut rng, &kv, 1.0)),
            to_f32(&rand_tensor(&mut rng, &kv, 1.0)),
        ];
        fused_vs_composed(
            &format!("fused attention ({name})"),
            &mut rng,
            &inputs,
            &[0, 1, 2],
            fused(bias.clone()).as_ref(),
            composed(bias).as_ref(),
        );
    }
    // The fused result is sequence-first underneath: moving the heads back is a free view.
    let x = to_f32(&rand_tensor(&mut rng, &[2, 3, 6, 8], 1.0));
    let out = ops::scaled_dot_product_attention(&x, &x, &x, None).unwrap();
    assert!(out.transpose(1, 2).unwrap().is_contiguous());
    // Other dtypes take the composed path; a bias of another shape is refused by the fused op.
    let x64 = x.to_dtype(DType::F64).unwrap();
    assert!(!ops::fused::supports_fused_attention(
        &x64, &x64, &x64, None
    ));
    let wide = Tensor::zeros((2, 3, 6, 6), DType::F32, &cpu()).unwrap();
    assert!(!ops::fused::supports_fused_attention(
        &x,
        &x,
        &x,
        Some(&wide)
    ));
    let e = ops::fused::attention(&x, &x, &x, Some(&wide))
        .unwrap_err()
        .to_string();
    assert!(e.contains("bias [b or 1, 1, q, k]"), "{e}");
}

#[test]
fn fused_swiglu_projection_matches_the_two_steps() {
    // swiglu(gate, up) · Wᵀ for a frozen W in one op against the gate followed by the product,
    // values and gradients for gate and up, with leading dimensions folded into rows.
    let mut rng = rng(47);
    let w = to_f32(&rand_tensor(&mut rng, &[5, 6], 1.0));
    let inputs = [
        to_f32(&rand_tensor(&mut rng, &[2, 3, 6], 2.0)),
        to_f32(&rand_tensor(&mut rng, &[2, 3, 6], 2.0)),
    ];
    if !ops::fused::supports_swiglu_projection(&inputs[0], &inputs[1], &w) {
        // Only without OpenBLAS, which CI installs; the layers then run the two steps.
        assert!(ops::blas::backend().is_none());
        return;
    }
    let (w1, w2) = (w.clone(), w.clone());
    fused_vs_composed(
        "fused swiglu projection",
        &mut rng,
        &inputs,
        &[0, 1],
        &move |xs| ops::fused::swiglu_projection(&xs[0], &xs[1], &w1),
        &move |xs| ops::composed::swiglu(&xs[0], &xs[1])?.broadcast_matmul(&w2.t()?),
    );
    let odd = to_f32(&rand_tensor(&mut rng, &[5, 4], 1.0));
    assert!(!ops::fused::supports_swiglu_projection(
        &inputs[0], &inputs[1], &odd
    ));
    let e = ops::fused::swiglu_projection(&inputs[0], &inputs[1], &odd)
        .unwrap_err()
        .to_string();
    assert!(e.contains("weight [out, in]"), "{e}");
}

#[test]
fn residual_projection_of_a_frozen_layer_matches_the_two_steps() {
    // residual + x · Wᵀ in one op (a plain frozen layer) against the layer's output added to
    // the residual, values and gradients for both inputs; a trained layer takes the two steps.
    let mut rng = rng(48);
    let w = to_f32(&rand_tensor(&mut rng, &[5, 6], 1.0));
    let layer = Arc::new(Linear::new(
        "o_proj",
        Arc::new(whetstone_host::params::Param::frozen(
            "o_proj.weight",
            w.clone(),
        )),
        None,
    ));
    let inputs = [
        to_f32(&rand_tensor(&mut rng, &[2, 3, 5], 1.0)),
        to_f32(&rand_tensor(&mut rng, &[2, 3, 6], 1.0)),
    ];
    let fused_layer = layer.clone();
    fused_vs_composed(
        "residual frozen projection",
        &mut rng,
        &inputs,
        &[0, 1],
        &move |xs| fused_layer.forward_residual(&xs[0], &xs[1]),
        &move |xs| &xs[0] + xs[1].broadcast_matmul(&w.t()?)?,
    );
    let fused = layer.forward_residual(&inputs[0], &inputs[1]).unwrap();
    layer.weight().set_trainable(true).unwrap();
    let two_steps = layer.forward_residual(&inputs[0], &inputs[1]).unwrap();
    assert_close("trained layer", &two_steps, &fused, F32_TOL);
}

#[test]
fn residual_swiglu_projection_of_a_frozen_layer_matches_the_three_steps() {
    // residual + swiglu(gate, up) · Wᵀ in one op (Llama's MLP block, a plain frozen down
    // projection) against swiglu, the product and the sum; values and gradients for all three
    // inputs; a trained layer takes the three steps.
    let mut rng = rng(49);
    let w = to_f32(&rand_tensor(&mut rng, &[5, 7], 1.0));
    let layer = Arc::new(Linear::new(
        "down_proj",
        Arc::new(whetstone_host::params::Param::frozen(
            "down_proj.weight",
            w.clone(),
        )),
        None,
    ));
    let inputs = [
        to_f32(&rand_tensor(&mut rng, &[2, 3, 5], 1.0)),
        to_f32(&rand_tensor(&mut rng, &[2, 3, 7], 2.0)),
        to_f32(&rand_tensor(&mut rng, &[2, 3, 7], 1.0)),
    ];
    let fused_layer = layer.clone();
    fused_vs_composed(
        "residual swiglu projection",
        &mut rng,
        &inputs,
        &[0, 1, 2],
        &move |xs| fused_layer.forward_swiglu_residual(&xs[0], &xs[1], &xs[2]),
        &move |xs| {
            let s = (xs[1].silu()? * &xs[2])?;
            &xs[0] + s.broadcast_matmul(&w.t()?)?
        },
    );
    let fused = layer
        .forward_swiglu_residual(&inputs[0], &inputs[1], &inputs[2])
        .unwrap();
    layer.weight().set_trainable(true).unwrap();
    let three_steps = layer
        .forward_swiglu_residual(&inputs[0], &inputs[1], &inputs[2])
        .unwrap();
    assert_close("trained layer", &three_steps, &fused, F32_TOL);
}

/// The f32 GELU runs a vectorized erf and exponential; over the whole range, tails included,
/// its values and gradients stay within 1e-6 of the f64 kernel (candle's exact erf).
#[test]
fn fused_gelu_f32_matches_f64_over_the_whole_range() {
    let n = 24_001;
    let xs: Vec<f64> = (0..n)
        .map(|i| -12.0 + 24.0 * i as f64 / (n - 1) as f64)
        .collect();
    let x64 = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
    let x32 = to_f32(&x64);
    let g: Vec<f64> = (0..n).map(|i| 1.0 + (i % 7) as f64 * 0.25).collect();
    let g64 = Tensor::new(g.as_slice(), &Device::Cpu).unwrap();
    let op = |xs: &[Tensor]| ops::fused::gelu(&xs[0]);
    let (y64, d64) = value_and_grads(&op, std::slice::from_ref(&x64), &[0], Some(&g64));
    let (y32, d32) = value_and_grads(&op, &[x32], &[0], Some(&to_f32(&g64)));
    let max_diff = |a: &Tensor, b: &Tensor| {
        flat(a)
            .iter()
            .zip(flat(b))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f64, f64::max)
    };
    // GELU(x) ≈ x for large x, so values far out are compared relative to |x|.
    let scaled = |t: &Tensor| t.div(&x64.abs().unwrap().clamp(1.0, f64::INFINITY).unwrap());
    let value_err = max_diff(
        &scaled(&y32.to_dtype(DType::F64).unwrap()).unwrap(),
        &scaled(&y64).unwrap(),
    );
    let grad_err = max_diff(&d32[0], &d64[0]);
    eprintln!("gelu f32 vs f64: values {value_err:.2e}, gradients {grad_err:.2e}");
    assert!(value_err < 1e-6, "values differ by {value_err:e}");
    assert!(grad_err < 2e-6, "gradients differ by {grad_err:e}");
}

#[test]
fn fused_gelu_gradients_and_candle_agreement() {
    let mut rng = rng(45);
    let x = rand_tensor(&mut rng, &[4, 9], 4.0);
    check(
        "fused gelu",
        &mut rng,
        std::slice::from_ref(&x),
        &[0],
        &|xs| ops::fused::gelu(&xs[0]),
    );
    fused_vs_composed(
        "gelu f32",
        &mut rng,
        &[to_f32(&x)],
        &[0],
        &|xs| ops::fused::gelu(&xs[0]),
        &|xs| xs[0].gelu_erf(),
    );
}
