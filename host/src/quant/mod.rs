//! Quantized frozen weight matrices (QLoRA's base model): the weights stay in their quantized
//! blocks and are dequantized a tile of rows at a time when a product needs them
//! ([`crate::ops::quantized_linear`]), so the whole f32 matrix never exists.
//!
//! Formats:
//!
//! - **NF4** with double quantization ([`nf4`]), made from f32/bf16 weights at load;
//! - the **ggml** block types candle implements (`Q4_0`, `Q4_1`, `Q8_0`, the k-quants `Q4_K`,
//!   `Q5_K`, `Q6_K`, ...): kept as a GGUF file stores them, or made from f32 weights (`Q8_0`).
//!
//! A matrix is `[rows, cols]` (a linear layer's `[out, in]` weight), its blocks run along the
//! rows, and it is stored in tiles of whole rows ([`TILE_ELEMENTS`] values each), the unit of
//! dequantization.

pub mod nf4;
pub mod report;
pub mod requantize;

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};

pub use nf4::Nf4Matrix;

/// Whether QLoRA holds `linear`'s weight quantized: every linear layer except a
/// classification head, which trains (PEFT's `modules_to_save`).
pub fn holds_quantized(linear: &crate::ops::Linear) -> bool {
    linear.name != "classifier"
}

/// Values per tile: 1 M (4 MB of scratch in f32).
pub const TILE_ELEMENTS: usize = 1 << 20;

/// What can go wrong when quantizing or dequantizing.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// The matrix's shape does not suit the format.
    #[error("{0}")]
    Shape(String),
    /// A weight is NaN or infinite.
    #[error("weight {0} is not finite")]
    NonFinite(usize),
    /// candle refused a ggml operation.
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

/// The format of a quantized matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    /// NF4 with double-quantized block scales.
    Nf4,
    /// A ggml block type.
    Ggml(GgmlDType),
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuantFormat::Nf4 => f.write_str("nf4"),
            QuantFormat::Ggml(t) => {
                // llama.cpp's spelling: Q4_1 → q4_1, Q4K → q4_k.
                let name = format!("{t:?}").to_lowercase();
                match name.strip_suffix('k') {
                    Some(stem) if !stem.contains('_') => write!(f, "{stem}_k"),
                    _ => f.write_str(&name),
                }
            }
        }
    }
}

/// `[model] quantize`: how a model's linear layers are held while it is fine-tuned (QLoRA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum QuantizeSpec {
    /// NF4 with double quantization, made from the f32/bf16 weights at load.
    #[serde(rename = "nf4")]
    Nf4,
    /// ggml `Q8_0` (8-bit, blocks of 32), made at load.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// A GGUF file's own blocks, kept as stored (`Q4_0`, `Q4_1`, `Q8_0`, k-quants...).
    #[serde(rename = "keep")]
    Keep,
}

impl QuantizeSpec {
    /// The format weights are quantized to at load (`None` for `keep`: they stay as stored).
    pub fn target(self) -> Option<QuantFormat> {
        match self {
            QuantizeSpec::Nf4 => Some(QuantFormat::Nf4),
            QuantizeSpec::Q8_0 => Some(QuantFormat::Ggml(GgmlDType::Q8_0)),
            QuantizeSpec::Keep => None,
        }
    }

    /// The error for `keep` on a model at `path` that is not a GGUF file (it has no blocks to
    /// keep).
    pub fn keep_refused(path: &std::path::Path) -> crate::Error {
        crate::Error::config(format!(
            "{}: quantize = \"keep\" keeps a GGUF file's own blocks, and this is a safetensors \
             directory; use \"nf4\" or \"q8_0\" to quantize it at load",
            path.display()
        ))
    }
}

/// How the blocks are held.
#[derive(Debug)]
enum Blocks {
    Nf4(Nf4Matrix),
    /// ggml tiles, each `tile_rows` rows (the last may be shorter).
    Ggml {
        dtype: GgmlDType,
        tiles: Vec<QTensor>,
    },
}

/// A frozen `[rows, cols]` matrix in quantized blocks.
#[derive(Debug)]
pub struct QuantizedMatrix {
    rows: usize,
    cols: usize,
    tile_rows: usize,
    blocks: Blocks,
}

/// Rows per tile for a matrix of `cols` columns.
fn tile_rows_for(cols: usize, rows: usize) -> usize {
    (TILE_ELEMENTS / cols.max(1)).clamp(1, rows.max(1))
}

/// The `[rows, cols]` f32 values of a CPU tensor, row-major.
fn matrix_values(t: &Tensor) -> Result<(usize, usize, Vec<f32>), QuantError> {
    let (rows, cols) = t.dims2()?;
    let values = t
        .to_dtype(candle_core::DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((rows, cols, values))
}

impl QuantizedMatrix {
    /// Quantizes `weight` `[rows, cols]` (any float dtype) to `format`. NF4 needs `cols` to be
    /// a multiple of 64, a ggml type a multiple of its block size.
    pub fn quantize(weight: &Tensor, format: QuantFormat) -> Result<Self, QuantError> {
        let (rows, cols, values) = matrix_values(weight)?;
        let tile_rows = tile_rows_for(cols, rows);
        let blocks = match format {
            QuantFormat::Nf4 => Blocks::Nf4(Nf4Matrix::quantize(&values, rows, cols)?),
            QuantFormat::Ggml(dtype) => {
                check_ggml_cols(dtype, rows, cols)?;
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(QuantError::NonFinite(i));
                }
                let mut tiles = Vec::with_capacity(rows.div_ceil(tile_rows));
                for start in (0..rows).step_by(tile_rows) {
                    let n = tile_rows.min(rows - start);
                    let tile = Tensor::from_slice(
                        &values[start * cols..(start + n) * cols],
                        (n, cols),
                        &Device::Cpu,
                    )?;
                    tiles.push(QTensor::quantize(&tile, dtype)?);
                }
                Blocks::Ggml { dtype, tiles }
            }
        };
        Ok(Self {
            rows,
            cols,
            tile_rows,
            blocks,
        })
    }

    /// A matrix from ggml blocks as a GGUF file stores them: `data` holds `rows` rows of
    /// `cols / block_size` blocks each. `row_of(r)` names the stored row that becomes row `r`
    /// (a permutation; the identity keeps the order), so rows can be reordered without
    /// dequantizing (llama.cpp's q/k projections).
    pub fn from_ggml(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        data: &[u8],
        row_of: impl Fn(usize) -> usize,
    ) -> Result<Self, QuantError> {
        check_ggml_cols(dtype, rows, cols)?;
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        if data.len() != rows * row_bytes {
            return Err(QuantError::Shape(format!(
                "{} bytes of {dtype:?} blocks for a [{rows}, {cols}] matrix (expected {})",
                data.len(),
                rows * row_bytes
            )));
        }
        let tile_rows = tile_rows_for(cols, rows);
        let mut tiles = Vec::with_capacity(rows.div_ceil(tile_rows));
        for start in (0..rows).step_by(tile_rows) {
            let n = tile_rows.min(rows - start);
            let mut bytes = Vec::with_capacity(n * row_bytes);
            for r in start..start + n {
                let source = row_of(r);
                if source >= rows {
                    return Err(QuantError::Shape(format!(
                        "row {r} maps to row {source} of a matrix of {rows} rows"
                    )));
                }
                bytes.extend_from_slice(&data[source * row_bytes..(source + 1) * row_bytes]);
            }
            let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, dtype)?;
            tiles.push(QTensor::new(storage, (n, cols))?);
        }
        Ok(Self {
            rows,
            cols,
            tile_rows,
            blocks: Blocks::Ggml { dtype, tiles },
        })
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The format.
    pub fn format(&self) -> QuantFormat {
        match &self.blocks {
            Blocks::Nf4(_) => QuantFormat::Nf4,
            Blocks::Ggml { dtype, .. } => QuantFormat::Ggml(*dtype),
        }
    }

    /// Bytes the blocks take.
    pub fn size_in_bytes(&self) -> usize {
        match &self.blocks {
            Blocks::Nf4(m) => m.size_in_bytes(),
            Blocks::Ggml { tiles, .. } => tiles.iter().map(|t| t.storage_size_in_bytes()).sum(),
        }
    }

    /// Rows per tile (the last tile may have fewer).
    pub fn tile_rows(&self) -> usize {
        self.tile_rows
    }

    /// Number of tiles.
    pub fn num_tiles(&self) -> usize {
        self.rows.div_ceil(self.tile_rows)
    }

    /// Tile `i` dequantized: `(first row, [n, cols] f32 CPU tensor)`.
    pub fn tile(&self, i: usize) -> Result<(usize, Tensor), QuantError> {
        let start = i * self.tile_rows;
        if start >= self.rows {
            return Err(QuantError::Shape(format!(
                "tile {i} of a matrix of {} tiles",
                self.num_tiles()
            )));
        }
        let n = self.tile_rows.min(self.rows - start);
        let tensor = match &self.blocks {
            Blocks::Nf4(m) => {
                let mut out = vec![0.0f32; n * self.cols];
                m.dequantize_rows(start, n, &mut out)?;
                Tensor::from_vec(out, (n, self.cols), &Device::Cpu)?
            }
            Blocks::Ggml { tiles, .. } => tiles[i].dequantize(&Device::Cpu)?,
        };
        Ok((start, tensor))
    }

    /// The whole matrix in f32 (for merging and saving; training never calls it).
    pub fn dequantize(&self) -> Result<Tensor, QuantError> {
        let tiles = (0..self.num_tiles())
            .map(|i| self.tile(i).map(|(_, t)| t))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tensor::cat(&tiles, 0)?)
    }
}

/// Refuses a ggml type whose blocks do not tile the rows.
fn check_ggml_cols(dtype: GgmlDType, rows: usize, cols: usize) -> Result<(), QuantError> {
    let block = dtype.block_size();
    if cols == 0 || !cols.is_multiple_of(block) {
        return Err(QuantError::Shape(format!(
            "{dtype:?} needs rows whose length is a multiple of {block}; this matrix is \
             [{rows}, {cols}]"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(rows: usize, cols: usize, seed: u64) -> Tensor {
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 0.05).unwrap();
        let v: Vec<f32> = (0..rows * cols).map(|_| normal.sample(&mut rng)).collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    fn mean_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn every_format_round_trips_within_its_precision() {
        let w = weight(40, 256, 3);
        let mean_abs = w
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        for (format, bound) in [
            (QuantFormat::Nf4, 0.12),
            (QuantFormat::Ggml(GgmlDType::Q8_0), 0.01),
            (QuantFormat::Ggml(GgmlDType::Q4_0), 0.15),
            (QuantFormat::Ggml(GgmlDType::Q4K), 0.12),
        ] {
            let q = QuantizedMatrix::quantize(&w, format).unwrap();
            assert_eq!(q.dims(), (40, 256));
            let back = q.dequantize().unwrap();
            let err = mean_abs_diff(&w, &back);
            assert!(
                err < bound * mean_abs,
                "{format}: {err} vs mean |w| {mean_abs}"
            );
            assert!(
                q.size_in_bytes() < 40 * 256 * 4 / 3,
                "{format}: {}",
                q.size_in_bytes()
            );
        }
    }

    #[test]
    fn formats_are_named_as_llama_cpp_names_them() {
        let names: Vec<String> = [
            QuantFormat::Nf4,
            QuantFormat::Ggml(GgmlDType::Q4_1),
            QuantFormat::Ggml(GgmlDType::Q8_0),
            QuantFormat::Ggml(GgmlDType::Q4K),
        ]
        .iter()
        .map(|f| f.to_string())
        .collect();
        assert_eq!(names, ["nf4", "q4_1", "q8_0", "q4_k"]);
    }

    #[test]
    fn tiles_cover_the_rows_in_order() {
        // 5120 columns: 204 rows per tile, so 600 rows make 3 tiles (204, 204, 192).
        let w = weight(600, 5120, 4);
        let q = QuantizedMatrix::quantize(&w, QuantFormat::Ggml(GgmlDType::Q8_0)).unwrap();
        assert_eq!(q.tile_rows(), TILE_ELEMENTS / 5120);
        assert_eq!(q.num_tiles(), 600usize.div_ceil(q.tile_rows()));
        let (start, last) = q.tile(q.num_tiles() - 1).unwrap();
        assert_eq!(start + last.dim(0).unwrap(), 600);
        assert!(q.tile(q.num_tiles()).is_err());
        assert!(mean_abs_diff(&q.dequantize().unwrap(), &w) < 1e-3);
    }

    #[test]
    fn ggml_bytes_load_with_a_row_permutation() {
        let w = weight(8, 64, 5);
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let data = q.data().unwrap();
        let reversed = QuantizedMatrix::from_ggml(GgmlDType::Q8_0, 8, 64, &data, |r| 7 - r)
            .unwrap()
            .dequantize()
            .unwrap();
        let plain = q.dequantize(&Device::Cpu).unwrap();
        for r in 0..8 {
            let a = reversed.get(r).unwrap();
            let b = plain.get(7 - r).unwrap();
            assert_eq!(mean_abs_diff(&a, &b), 0.0, "row {r}");
        }
        let short = QuantizedMatrix::from_ggml(GgmlDType::Q8_0, 8, 64, &data[1..], |r| r);
        assert!(matches!(short, Err(QuantError::Shape(_))));
        let odd = QuantizedMatrix::quantize(&weight(2, 48, 6), QuantFormat::Nf4);
        assert!(matches!(odd, Err(QuantError::Shape(_))));
    }
}
