//! The tensor operations the host performs for plugins ([`whetstone_sdk::Op`]), on the model's
//! device and inside its autograd graph.

use candle_core::{DType, Device, Tensor};
use whetstone_sdk::Op;

use crate::model::hooks::ForwardContext;
use crate::model::Mode;
use crate::ops;

/// Largest tensor a plugin may read back with `to-vec` (elements).
pub const MAX_READ_ELEMENTS: usize = 1 << 20;

type R<T> = std::result::Result<T, String>;

fn err(e: candle_core::Error) -> String {
    e.to_string()
}

fn dim(t: &Tensor, d: i64) -> R<usize> {
    let rank = t.rank() as i64;
    let i = if d < 0 { d + rank } else { d };
    if i < 0 || i >= rank.max(1) {
        return Err(format!("dim {d} out of range for shape {:?}", t.dims()));
    }
    Ok(i as usize)
}

fn dims(t: &Tensor, ds: &[i64]) -> R<Vec<usize>> {
    ds.iter().map(|&d| dim(t, d)).collect()
}

fn shape(ints: &[i64]) -> R<Vec<usize>> {
    ints.iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("negative size {d} in shape {ints:?}")))
        .collect()
}

fn arg<T: Copy>(values: &[T], i: usize, op: Op, what: &str) -> R<T> {
    values
        .get(i)
        .copied()
        .ok_or_else(|| format!("{} needs {what}", op.name()))
}

fn keepdim(ints: &[i64], op: Op) -> R<(bool, &[i64])> {
    let flag = arg(ints, 0, op, "a keepdim flag as its first int")?;
    Ok((flag != 0, &ints[1..]))
}

fn reduce(
    t: &Tensor,
    ints: &[i64],
    op: Op,
    f: impl Fn(&Tensor, Vec<usize>) -> candle_core::Result<Tensor>,
) -> R<Tensor> {
    let (keep, ds) = keepdim(ints, op)?;
    let ds = dims(t, ds)?;
    let kept = f(t, ds.clone()).map_err(err)?;
    if keep {
        return Ok(kept);
    }
    let mut out = kept;
    let mut sorted = ds;
    sorted.sort_unstable();
    for d in sorted.into_iter().rev() {
        out = out.squeeze(d).map_err(err)?;
    }
    Ok(out)
}

fn reshape(t: &Tensor, ints: &[i64]) -> R<Tensor> {
    let known: i64 = ints.iter().filter(|&&d| d >= 0).product();
    let wildcards = ints.iter().filter(|&&d| d == -1).count();
    if wildcards > 1 || ints.iter().any(|&d| d < -1) {
        return Err(format!(
            "reshape to {ints:?}: at most one -1 and no other negatives"
        ));
    }
    let dims: Vec<usize> = ints
        .iter()
        .map(|&d| {
            if d == -1 {
                t.elem_count() / (known.max(1) as usize)
            } else {
                d as usize
            }
        })
        .collect();
    t.reshape(dims).map_err(err)
}

fn dtype(code: i64) -> R<DType> {
    let d = u32::try_from(code)
        .ok()
        .and_then(whetstone_sdk::DType::from_code)
        .ok_or_else(|| format!("unknown dtype code {code}"))?;
    Ok(to_candle(d))
}

/// The candle dtype of a contract dtype.
pub fn to_candle(d: whetstone_sdk::DType) -> DType {
    use whetstone_sdk::DType as W;
    match d {
        W::F32 => DType::F32,
        W::F16 => DType::F16,
        W::Bf16 => DType::BF16,
        W::F64 => DType::F64,
        W::U8 => DType::U8,
        W::U32 => DType::U32,
        W::I64 => DType::I64,
    }
}

/// The contract dtype of a candle dtype (`None` for types the contract lacks).
pub fn from_candle(d: DType) -> Option<whetstone_sdk::DType> {
    use whetstone_sdk::DType as W;
    Some(match d {
        DType::F32 => W::F32,
        DType::F16 => W::F16,
        DType::BF16 => W::Bf16,
        DType::F64 => W::F64,
        DType::U8 => W::U8,
        DType::U32 => W::U32,
        DType::I64 => W::I64,
        _ => return None,
    })
}

/// Normal samples shaped like `like`, from the context's seeded generator.
pub fn randn(like: &Tensor, mean: f64, std: f64, ctx: &ForwardContext) -> R<Tensor> {
    use rand_distr::{Distribution, Normal};
    let normal = Normal::new(mean, std).map_err(|e| format!("randn: {e}"))?;
    let values: Vec<f32> = ctx.with_rng(|rng| {
        (0..like.elem_count())
            .map(|_| normal.sample(rng) as f32)
            .collect()
    });
    Tensor::from_vec(values, like.shape(), like.device())
        .and_then(|t| t.to_dtype(like.dtype()))
        .map_err(err)
}

/// Applies `op` to `inputs` with the integer and float arguments the op's encoding defines.
pub fn apply(
    op: Op,
    inputs: &[Tensor],
    ints: &[i64],
    floats: &[f64],
    device: &Device,
    ctx: &ForwardContext,
) -> R<Tensor> {
    let input = |i: usize| -> R<&Tensor> {
        inputs
            .get(i)
            .ok_or_else(|| format!("{} needs {} tensor input(s)", op.name(), i + 1))
    };
    let float = |i: usize| arg(floats, i, op, &format!("{} float argument(s)", i + 1));
    let int = |i: usize| arg(ints, i, op, &format!("{} int argument(s)", i + 1));
    let a = || input(0);
    let b = || input(1);
    let out = match op {
        Op::Matmul => ops::matmul_rows(a()?, b()?),
        Op::MatmulT => {
            let rhs = b()?;
            let rt = rhs.t().map_err(err)?;
            ops::matmul_rows(a()?, &rt)
        }
        Op::Add => a()?.broadcast_add(b()?),
        Op::Sub => a()?.broadcast_sub(b()?),
        Op::Mul => a()?.broadcast_mul(b()?),
        Op::Div => a()?.broadcast_div(b()?),
        Op::Maximum => a()?.broadcast_maximum(b()?),
        Op::Minimum => a()?.broadcast_minimum(b()?),
        Op::Scale => a()?.affine(float(0)?, 0.0),
        Op::AddScalar => a()?.affine(1.0, float(0)?),
        Op::Powf => a()?.powf(float(0)?),
        Op::Clamp => a()?.clamp(float(0)?, float(1)?),
        Op::Neg => a()?.neg(),
        Op::Exp => a()?.exp(),
        Op::Log => a()?.log(),
        Op::Sqrt => a()?.sqrt(),
        Op::Sqr => a()?.sqr(),
        Op::Abs => a()?.abs(),
        Op::Recip => a()?.recip(),
        Op::Silu => ops::silu(a()?),
        Op::Gelu => ops::gelu(a()?),
        Op::GeluTanh => ops::gelu_tanh(a()?),
        Op::Relu => a()?.relu(),
        Op::Tanh => a()?.tanh(),
        Op::Sigmoid => {
            let x = a()?;
            x.neg()
                .and_then(|n| n.exp())
                .and_then(|e| e.affine(1.0, 1.0))
                .and_then(|d| d.recip())
        }
        Op::Softmax | Op::LogSoftmax => {
            let x = a()?;
            let d = dim(x, int(0)?)?;
            let last = x.rank() - 1;
            let moved = if d == last {
                x.clone()
            } else {
                x.transpose(d, last)
                    .map_err(err)?
                    .contiguous()
                    .map_err(err)?
            };
            let y = if op == Op::Softmax {
                ops::softmax_last_dim(&moved)
            } else {
                ops::log_softmax_last_dim(&moved)
            }
            .map_err(err)?;
            if d == last {
                Ok(y)
            } else {
                y.transpose(d, last)
            }
        }
        Op::Sum => return reduce(a()?, ints, op, |t, ds| t.sum_keepdim(ds)),
        Op::Mean => return reduce(a()?, ints, op, |t, ds| t.mean_keepdim(ds)),
        Op::Max => return reduce(a()?, ints, op, |t, ds| t.max_keepdim(ds[0])),
        Op::Min => return reduce(a()?, ints, op, |t, ds| t.min_keepdim(ds[0])),
        Op::Norm => return reduce(a()?, ints, op, |t, ds| t.sqr()?.sum_keepdim(ds)?.sqrt()),
        Op::Reshape => return reshape(a()?, ints),
        Op::Transpose => {
            let x = a()?;
            x.transpose(dim(x, int(0)?)?, dim(x, int(1)?)?)
        }
        Op::Narrow => {
            let x = a()?;
            let start = usize::try_from(int(1)?).map_err(|_| "narrow: negative start")?;
            let len = usize::try_from(int(2)?).map_err(|_| "narrow: negative length")?;
            x.narrow(dim(x, int(0)?)?, start, len)
        }
        Op::Cat => {
            let x = a()?;
            Tensor::cat(inputs, dim(x, int(0)?)?)
        }
        Op::IndexSelect => {
            let x = a()?;
            x.index_select(b()?, dim(x, int(0)?)?)
        }
        Op::Gather => {
            let x = a()?;
            x.gather(b()?, dim(x, int(0)?)?)
        }
        Op::WhereCond => a()?.where_cond(b()?, input(2)?),
        Op::Squeeze => {
            let x = a()?;
            x.squeeze(dim(x, int(0)?)?)
        }
        Op::Unsqueeze => {
            let x = a()?;
            let rank = x.rank() as i64;
            let d = int(0)?;
            let i = if d < 0 { d + rank + 1 } else { d };
            if i < 0 || i > rank {
                return Err(format!("unsqueeze dim {d} out of range for rank {rank}"));
            }
            x.unsqueeze(i as usize)
        }
        Op::BroadcastAs => a()?.broadcast_as(shape(ints)?),
        Op::Contiguous => a()?.contiguous(),
        Op::ToDtype => a()?.to_dtype(dtype(int(0)?)?),
        Op::ZerosLike => a()?.zeros_like(),
        Op::OnesLike => a()?.ones_like(),
        Op::RandnLike => return randn(a()?, float(0)?, float(1)?, ctx),
        Op::Zeros => Tensor::zeros(shape(ints)?, DType::F32, device),
        Op::Ones => Tensor::ones(shape(ints)?, DType::F32, device),
        Op::Full => Tensor::full(float(0)? as f32, shape(ints)?, device),
        Op::Identity => Ok(a()?.clone()),
        Op::Detach => Ok(a()?.detach()),
        Op::Dropout => {
            let x = a()?;
            let p = float(0)?;
            if !(0.0..1.0).contains(&p) {
                return Err(format!("dropout probability {p} must be in [0, 1)"));
            }
            if ctx.mode() == Mode::Train && p > 0.0 {
                ctx.with_rng(|rng| ops::dropout(x, p as f32, rng))
            } else {
                Ok(x.clone())
            }
        }
    };
    out.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(op: Op, inputs: &[Tensor], ints: &[i64], floats: &[f64]) -> R<Tensor> {
        apply(
            op,
            inputs,
            ints,
            floats,
            &Device::Cpu,
            &ForwardContext::default(),
        )
    }

    fn t(values: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(values, shape, &Device::Cpu).unwrap()
    }

    fn vals(x: &Tensor) -> Vec<f32> {
        x.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn gather_picks_one_entry_per_row() {
        let a = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &Device::Cpu).unwrap();
        let idx = Tensor::new(&[[2u32], [0]], &Device::Cpu).unwrap();
        let g = run(Op::Gather, &[a.clone(), idx.clone()], &[-1], &[]).unwrap();
        assert_eq!(vals(&g), vec![3.0, 4.0]);
        assert!(run(Op::Gather, &[a, idx], &[5], &[]).is_err());
    }

    #[test]
    fn ops_follow_their_argument_encoding() {
        let a = t(&[1., 2., 3., 4., 5., 6.], &[2, 3]);
        let b = t(&[1., 0., 0., 1., 1., 1.], &[2, 3]);
        let mt = run(Op::MatmulT, &[a.clone(), b.clone()], &[], &[]).unwrap();
        assert_eq!(vals(&mt), [1., 6., 4., 15.]);
        let r = run(Op::Reshape, std::slice::from_ref(&a), &[3, -1], &[]).unwrap();
        assert_eq!(r.dims(), [3, 2]);
        let s = run(Op::Sum, std::slice::from_ref(&a), &[0, -1], &[]).unwrap();
        assert_eq!(vals(&s), [6., 15.]);
        let s = run(Op::Sum, std::slice::from_ref(&a), &[1, 0], &[]).unwrap();
        assert_eq!(s.dims(), [1, 3]);
        let n = run(Op::Narrow, std::slice::from_ref(&a), &[-1, 1, 2], &[]).unwrap();
        assert_eq!(vals(&n), [2., 3., 5., 6.]);
        let u = run(Op::Unsqueeze, std::slice::from_ref(&a), &[-1], &[]).unwrap();
        assert_eq!(u.dims(), [2, 3, 1]);
        let sm = run(Op::Softmax, std::slice::from_ref(&a), &[0], &[]).unwrap();
        let col = vals(&sm.sum_keepdim(0).unwrap());
        assert!(col.iter().all(|v| (v - 1.0).abs() < 1e-6));
        let sc = run(Op::Scale, std::slice::from_ref(&a), &[], &[0.5]).unwrap();
        assert_eq!(vals(&sc)[1], 1.0);
        let c = run(Op::Cat, &[a.clone(), b], &[0], &[]).unwrap();
        assert_eq!(c.dims(), [4, 3]);
    }

    #[test]
    fn bad_arguments_are_errors_not_panics() {
        let a = t(&[1., 2.], &[2]);
        assert!(run(Op::Add, std::slice::from_ref(&a), &[], &[])
            .unwrap_err()
            .contains("2 tensor input"));
        assert!(run(Op::Scale, std::slice::from_ref(&a), &[], &[]).is_err());
        assert!(run(Op::Transpose, std::slice::from_ref(&a), &[0, 5], &[]).is_err());
        assert!(run(Op::Reshape, std::slice::from_ref(&a), &[-1, -1], &[]).is_err());
        assert!(run(Op::Dropout, &[a], &[], &[1.5]).is_err());
    }

    #[test]
    fn dropout_is_identity_in_eval_and_seeded_in_train() {
        let x = Tensor::ones((64,), DType::F32, &Device::Cpu).unwrap();
        let ctx = ForwardContext::default();
        ctx.set_mode(Mode::Eval);
        let y = apply(
            Op::Dropout,
            std::slice::from_ref(&x),
            &[],
            &[0.5],
            &Device::Cpu,
            &ctx,
        )
        .unwrap();
        assert_eq!(vals(&y), vals(&x));
        ctx.set_mode(Mode::Train);
        ctx.reseed(7);
        let y1 = apply(
            Op::Dropout,
            std::slice::from_ref(&x),
            &[],
            &[0.5],
            &Device::Cpu,
            &ctx,
        )
        .unwrap();
        ctx.reseed(7);
        let y2 = apply(Op::Dropout, &[x], &[], &[0.5], &Device::Cpu, &ctx).unwrap();
        assert_eq!(vals(&y1), vals(&y2));
        assert!(vals(&y1).contains(&0.0) && vals(&y1).contains(&2.0));
    }
}
