//! [`Tensor`]: a handle to a tensor that lives in the host.
//!
//! Every operation is a call into the host, which computes it on the model's device and records
//! it in its autograd graph; the plugin only ever holds the handle. Dropping a `Tensor` gives the
//! handle back.

use std::borrow::Borrow;

use crate::sys;
use crate::types::{DType, Op};
use crate::Result;

/// A host-owned tensor.
#[derive(Debug)]
pub struct Tensor {
    handle: u64,
}

impl Drop for Tensor {
    fn drop(&mut self) {
        sys::release(self.handle);
    }
}

impl Clone for Tensor {
    /// Another handle to the same value and autograd node.
    fn clone(&self) -> Self {
        match self.unary(Op::Identity) {
            Ok(t) => t,
            // The host refuses an identity only for a handle it no longer knows; keep the same
            // (already invalid) id so the next real use reports it.
            Err(_) => Tensor {
                handle: self.handle,
            },
        }
    }
}

fn dims_to_i64(dims: &[usize]) -> Vec<i64> {
    dims.iter().map(|&d| d as i64).collect()
}

impl Tensor {
    /// Wraps a handle the host returned; the new `Tensor` owns it.
    pub fn from_handle(handle: u64) -> Tensor {
        Tensor { handle }
    }

    /// The raw handle (still owned by `self`).
    pub fn handle(&self) -> u64 {
        self.handle
    }

    /// Gives up ownership of the handle without releasing it.
    pub fn into_handle(self) -> u64 {
        let handle = self.handle;
        std::mem::forget(self);
        handle
    }

    /// Any op, with its raw argument encoding (see [`Op`]).
    pub fn op(op: Op, inputs: &[&Tensor], ints: &[i64], floats: &[f64]) -> Result<Tensor> {
        let handles: Vec<u64> = inputs.iter().map(|t| t.handle).collect();
        Ok(Tensor::from_handle(sys::tensor_op(
            op, &handles, ints, floats,
        )?))
    }

    fn unary(&self, op: Op) -> Result<Tensor> {
        Tensor::op(op, &[self], &[], &[])
    }

    fn binary(&self, op: Op, rhs: &Tensor) -> Result<Tensor> {
        Tensor::op(op, &[self, rhs], &[], &[])
    }

    fn reduce(&self, op: Op, dims: &[i64], keepdim: bool) -> Result<Tensor> {
        let mut ints = vec![keepdim as i64];
        ints.extend_from_slice(dims);
        Tensor::op(op, &[self], &ints, &[])
    }

    /// A new f32 constant with `data` laid out row-major in `shape`.
    pub fn from_slice(data: &[f32], shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::from_handle(sys::from_vec(data, shape)?))
    }

    /// f32 zeros of `shape` on the model's device.
    pub fn zeros(shape: &[usize]) -> Result<Tensor> {
        Tensor::op(Op::Zeros, &[], &dims_to_i64(shape), &[])
    }

    /// f32 ones of `shape` on the model's device.
    pub fn ones(shape: &[usize]) -> Result<Tensor> {
        Tensor::op(Op::Ones, &[], &dims_to_i64(shape), &[])
    }

    /// f32 tensor of `shape` filled with `value`.
    pub fn full(shape: &[usize], value: f64) -> Result<Tensor> {
        Tensor::op(Op::Full, &[], &dims_to_i64(shape), &[value])
    }

    /// The dimensions.
    pub fn shape(&self) -> Result<Vec<usize>> {
        sys::shape(self.handle)
    }

    /// The size of dim `dim` (negative counts from the end).
    pub fn dim(&self, dim: i64) -> Result<usize> {
        let shape = self.shape()?;
        let rank = shape.len() as i64;
        let index = if dim < 0 { dim + rank } else { dim };
        usize::try_from(index)
            .ok()
            .and_then(|i| shape.get(i).copied())
            .ok_or_else(|| crate::Error::msg(format!("dim {dim} out of range for shape {shape:?}")))
    }

    /// The element type.
    pub fn dtype(&self) -> Result<DType> {
        sys::dtype(self.handle)
    }

    /// All values as f32, row-major (for small tensors: the host caps the size).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        sys::to_vec(self.handle)
    }

    /// The value of a one-element tensor.
    pub fn to_scalar(&self) -> Result<f32> {
        let values = self.to_vec()?;
        match values.as_slice() {
            [v] => Ok(*v),
            _ => Err(crate::Error::msg(format!(
                "to_scalar on a tensor with {} elements",
                values.len()
            ))),
        }
    }

    /// `self · rhs` (batched, broadcasting).
    pub fn matmul(&self, rhs: impl Borrow<Tensor>) -> Result<Tensor> {
        self.binary(Op::Matmul, rhs.borrow())
    }

    /// `self · rhsᵀ`: applies a weight stored `[out, in]` as PyTorch stores it.
    pub fn matmul_t(&self, rhs: impl Borrow<Tensor>) -> Result<Tensor> {
        self.binary(Op::MatmulT, rhs.borrow())
    }

    /// `self + rhs` (broadcasting).
    pub fn add(&self, rhs: impl Borrow<Tensor>) -> Result<Tensor> {
        self.binary(Op::Add, rhs.borrow())
    }

    /// `self - rhs` (broadcasting).
    pub fn sub(&self, rhs: impl Borrow<Tensor>) -> Result<Tensor> {
        self.binary(Op::Sub, rhs.borrow())
    }

    /// `self * rhs` elementwise (broadcasting).
    pub fn mul(&self, rhs: impl Borrow<Tensor>) -> Result<Tensor> {
        self.binary(Op::Mul, rhs.borrow())
    }

    /// `self / rhs` elementwise (broadcasting).
    pub fn div(&self, rhs: impl Borrow<Tensor>) -> Result<Tensor> {
        self.binary(Op::Div, rhs.borrow())
    }

    /// Elementwise maximum (broadcasting).
    pub fn maximum(&self, rhs: impl Borrow<Tensor>) -> Result<Tensor> {
        self.binary(Op::Maximum, rhs.borrow())
    }

    /// Elementwise minimum (broadcasting).
    pub fn minimum(&self, rhs: impl Borrow<Tensor>) -> Result<Tensor> {
        self.binary(Op::Minimum, rhs.borrow())
    }

    /// `self * factor`.
    pub fn scale(&self, factor: f64) -> Result<Tensor> {
        Tensor::op(Op::Scale, &[self], &[], &[factor])
    }

    /// `self + value`.
    pub fn add_scalar(&self, value: f64) -> Result<Tensor> {
        Tensor::op(Op::AddScalar, &[self], &[], &[value])
    }

    /// `self ^ exponent`.
    pub fn powf(&self, exponent: f64) -> Result<Tensor> {
        Tensor::op(Op::Powf, &[self], &[], &[exponent])
    }

    /// Values clamped into `[low, high]`.
    pub fn clamp(&self, low: f64, high: f64) -> Result<Tensor> {
        Tensor::op(Op::Clamp, &[self], &[], &[low, high])
    }

    /// `-self`.
    pub fn neg(&self) -> Result<Tensor> {
        self.unary(Op::Neg)
    }

    /// `exp(self)`.
    pub fn exp(&self) -> Result<Tensor> {
        self.unary(Op::Exp)
    }

    /// `ln(self)`.
    pub fn log(&self) -> Result<Tensor> {
        self.unary(Op::Log)
    }

    /// `sqrt(self)`.
    pub fn sqrt(&self) -> Result<Tensor> {
        self.unary(Op::Sqrt)
    }

    /// `self²`.
    pub fn sqr(&self) -> Result<Tensor> {
        self.unary(Op::Sqr)
    }

    /// `|self|`.
    pub fn abs(&self) -> Result<Tensor> {
        self.unary(Op::Abs)
    }

    /// `1 / self`.
    pub fn recip(&self) -> Result<Tensor> {
        self.unary(Op::Recip)
    }

    /// SiLU (`x · sigmoid(x)`).
    pub fn silu(&self) -> Result<Tensor> {
        self.unary(Op::Silu)
    }

    /// Exact (erf) GELU.
    pub fn gelu(&self) -> Result<Tensor> {
        self.unary(Op::Gelu)
    }

    /// tanh-approximated GELU.
    pub fn gelu_tanh(&self) -> Result<Tensor> {
        self.unary(Op::GeluTanh)
    }

    /// ReLU.
    pub fn relu(&self) -> Result<Tensor> {
        self.unary(Op::Relu)
    }

    /// tanh.
    pub fn tanh(&self) -> Result<Tensor> {
        self.unary(Op::Tanh)
    }

    /// Logistic sigmoid.
    pub fn sigmoid(&self) -> Result<Tensor> {
        self.unary(Op::Sigmoid)
    }

    /// Softmax over `dim`.
    pub fn softmax(&self, dim: i64) -> Result<Tensor> {
        Tensor::op(Op::Softmax, &[self], &[dim], &[])
    }

    /// Log-softmax over `dim`.
    pub fn log_softmax(&self, dim: i64) -> Result<Tensor> {
        Tensor::op(Op::LogSoftmax, &[self], &[dim], &[])
    }

    /// Sum over `dims`.
    pub fn sum(&self, dims: &[i64], keepdim: bool) -> Result<Tensor> {
        self.reduce(Op::Sum, dims, keepdim)
    }

    /// The sum of all values, as a scalar tensor.
    pub fn sum_all(&self) -> Result<Tensor> {
        self.reshape(&[-1])?.sum(&[0], false)
    }

    /// Mean over `dims`.
    pub fn mean(&self, dims: &[i64], keepdim: bool) -> Result<Tensor> {
        self.reduce(Op::Mean, dims, keepdim)
    }

    /// Maximum over `dim`.
    pub fn max(&self, dim: i64, keepdim: bool) -> Result<Tensor> {
        self.reduce(Op::Max, &[dim], keepdim)
    }

    /// Minimum over `dim`.
    pub fn min(&self, dim: i64, keepdim: bool) -> Result<Tensor> {
        self.reduce(Op::Min, &[dim], keepdim)
    }

    /// L2 norm over `dims`.
    pub fn norm(&self, dims: &[i64], keepdim: bool) -> Result<Tensor> {
        self.reduce(Op::Norm, dims, keepdim)
    }

    /// A new shape with the same elements (`-1` once for "the rest").
    pub fn reshape(&self, shape: &[i64]) -> Result<Tensor> {
        Tensor::op(Op::Reshape, &[self], shape, &[])
    }

    /// Swaps two dims.
    pub fn transpose(&self, d0: i64, d1: i64) -> Result<Tensor> {
        Tensor::op(Op::Transpose, &[self], &[d0, d1], &[])
    }

    /// Swaps the last two dims.
    pub fn t(&self) -> Result<Tensor> {
        self.transpose(-2, -1)
    }

    /// `len` entries of `dim` from `start`.
    pub fn narrow(&self, dim: i64, start: usize, len: usize) -> Result<Tensor> {
        Tensor::op(Op::Narrow, &[self], &[dim, start as i64, len as i64], &[])
    }

    /// Concatenates `tensors` along `dim`.
    pub fn cat(tensors: &[&Tensor], dim: i64) -> Result<Tensor> {
        Tensor::op(Op::Cat, tensors, &[dim], &[])
    }

    /// Entries of `dim` picked by the integer tensor `indices`.
    pub fn index_select(&self, indices: impl Borrow<Tensor>, dim: i64) -> Result<Tensor> {
        Tensor::op(Op::IndexSelect, &[self, indices.borrow()], &[dim], &[])
    }

    /// Entries picked per position along `dim` by the integer tensor `indices`, which has the
    /// rank of `self` (PyTorch's `gather`): `out[i][j] = self[i][indices[i][j]]` for `dim = 1`.
    pub fn gather(&self, indices: impl Borrow<Tensor>, dim: i64) -> Result<Tensor> {
        Tensor::op(Op::Gather, &[self, indices.borrow()], &[dim], &[])
    }

    /// `self ? on_true : on_false` where `self` is a u8/u32 condition.
    pub fn where_cond(
        &self,
        on_true: impl Borrow<Tensor>,
        on_false: impl Borrow<Tensor>,
    ) -> Result<Tensor> {
        Tensor::op(
            Op::WhereCond,
            &[self, on_true.borrow(), on_false.borrow()],
            &[],
            &[],
        )
    }

    /// Removes `dim` (of size 1).
    pub fn squeeze(&self, dim: i64) -> Result<Tensor> {
        Tensor::op(Op::Squeeze, &[self], &[dim], &[])
    }

    /// Inserts a dim of size 1 at `dim`.
    pub fn unsqueeze(&self, dim: i64) -> Result<Tensor> {
        Tensor::op(Op::Unsqueeze, &[self], &[dim], &[])
    }

    /// Broadcasts to `shape`.
    pub fn broadcast_as(&self, shape: &[usize]) -> Result<Tensor> {
        Tensor::op(Op::BroadcastAs, &[self], &dims_to_i64(shape), &[])
    }

    /// A contiguous layout (copies only when needed).
    pub fn contiguous(&self) -> Result<Tensor> {
        self.unary(Op::Contiguous)
    }

    /// Converted to `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        Tensor::op(Op::ToDtype, &[self], &[dtype as i64], &[])
    }

    /// Zeros of the same shape and dtype.
    pub fn zeros_like(&self) -> Result<Tensor> {
        self.unary(Op::ZerosLike)
    }

    /// Ones of the same shape and dtype.
    pub fn ones_like(&self) -> Result<Tensor> {
        self.unary(Op::OnesLike)
    }

    /// Normal samples of the same shape from the host's seeded generator.
    pub fn randn_like(&self, mean: f64, std: f64) -> Result<Tensor> {
        Tensor::op(Op::RandnLike, &[self], &[], &[mean, std])
    }

    /// The value without autograd history.
    pub fn detach(&self) -> Result<Tensor> {
        self.unary(Op::Detach)
    }

    /// Inverted dropout with probability `p` while training; the identity while evaluating.
    pub fn dropout(&self, p: f64) -> Result<Tensor> {
        Tensor::op(Op::Dropout, &[self], &[], &[p])
    }
}
