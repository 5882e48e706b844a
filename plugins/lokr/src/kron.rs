//! The Kronecker product from the SDK's tensor ops.

use whetstone_sdk::prelude::*;

/// `kron(a, b)` of `a` `[m, n]` and `b` `[p, q]`: the `[m·p, n·q]` matrix whose `(i·p + k,
/// j·q + l)` entry is `a[i, j] · b[k, l]` (`torch.kron` on matrices), built as
/// `(a[:, None, :, None] · b[None, :, None, :]).reshape(m·p, n·q)`.
pub fn kron(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (&[m, n], &[p, q]) = (a.shape()?.as_slice(), b.shape()?.as_slice()) else {
        return Err(Error::msg("kron needs two matrices"));
    };
    let a4 = a.unsqueeze(1)?.unsqueeze(3)?; // [m, 1, n, 1]
    let b4 = b.unsqueeze(0)?.unsqueeze(2)?; // [1, p, 1, q]
    a4.mul(b4)?.reshape(&[(m * p) as i64, (n * q) as i64])
}
