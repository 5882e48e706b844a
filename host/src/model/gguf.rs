//! Reading Llama-family weights and configuration from a GGUF file (llama.cpp's format).
//!
//! The file is parsed by candle's [`candle_core::quantized::gguf_file::Content`]; every tensor is dequantized to f32 and
//! renamed to its Hugging Face name (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`).
//! llama.cpp stores the rows of the q and k projections in an interleaved rotary order; they are
//! un-permuted here to Hugging Face's "rotate half" layout, so the rest of the host (and PEFT
//! adapters trained elsewhere) see exactly the weights of the original checkpoint.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use super::llama::LlamaConfig;
use crate::quant::QuantizedMatrix;
use crate::{Error, Result};

/// Linear weights kept in their ggml blocks, under their Hugging Face names.
pub type KeptBlocks = HashMap<String, Arc<QuantizedMatrix>>;

/// An opened GGUF file: its metadata and tensor directory, plus a reader for the tensor data.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("metadata_keys", &self.content.metadata.len())
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

/// Checks that every tensor of the directory has a shape whose size is representable and a
/// whole number of blocks, and lies inside the file: reads of the tensors are then safe.
fn check_tensor_directory(content: &Content, file_len: u64) -> std::result::Result<(), String> {
    for (name, info) in &content.tensor_infos {
        let dims = info.shape.dims();
        let elems = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("tensor `{name}` has an impossible shape {dims:?}"))?;
        let block = info.ggml_dtype.block_size();
        if !elems.is_multiple_of(block) {
            return Err(format!(
                "tensor `{name}`: {elems} values are not a whole number of {:?} blocks of {block}",
                info.ggml_dtype
            ));
        }
        let end = (elems / block)
            .checked_mul(info.ggml_dtype.type_size())
            .and_then(|bytes| u64::try_from(bytes).ok())
            .and_then(|bytes| {
                content
                    .tensor_data_offset
                    .checked_add(info.offset)?
                    .checked_add(bytes)
            });
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(format!(
                    "tensor `{name}` (shape {dims:?}, {:?}) extends past the end of the file \
                     ({file_len} bytes); the file is truncated or corrupt",
                    info.ggml_dtype
                ))
            }
        }
    }
    Ok(())
}

impl GgufFile {
    /// Opens `path` and parses its header (metadata and tensor directory; no tensor data yet).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .map_err(|e| Error::bad_file(path, format!("not a valid GGUF file: {e}")))?;
        let file_len = reader
            .get_ref()
            .metadata()
            .map_err(|e| Error::io(path, e))?
            .len();
        check_tensor_directory(&content, file_len)
            .map_err(|m| Error::bad_file(path, format!("not a valid GGUF file: {m}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    /// The names of the file's tensors, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        names.sort();
        names
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata key/value pairs.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// The metadata value under `key`, or an error naming the file and the key.
    pub fn value(&self, key: &str) -> Result<&Value> {
        self.content.metadata.get(key).ok_or_else(|| {
            Error::bad_file(&self.path, format!("missing GGUF metadata key `{key}`"))
        })
    }

    fn convert<T>(&self, key: &str, got: candle_core::Result<T>) -> Result<T> {
        got.map_err(|e| Error::bad_file(&self.path, format!("GGUF metadata key `{key}`: {e}")))
    }

    /// A string value.
    pub fn string(&self, key: &str) -> Result<&str> {
        let value = self.value(key)?;
        self.convert(key, value.to_string()).map(String::as_str)
    }

    /// An unsigned integer value of any width (u8..u64, or a non-negative i32/i64).
    pub fn uint(&self, key: &str) -> Result<u64> {
        let value = self.value(key)?;
        let got = match value {
            Value::I32(v) if *v >= 0 => Ok(*v as u64),
            Value::I64(v) if *v >= 0 => Ok(*v as u64),
            other => other.to_u64(),
        };
        self.convert(key, got)
    }

    /// A floating-point value (f32 or f64).
    pub fn float(&self, key: &str) -> Result<f64> {
        let value = self.value(key)?;
        let got = match value {
            Value::F32(v) => Ok(*v as f64),
            other => other.to_f64(),
        };
        self.convert(key, got)
    }

    /// A boolean value.
    pub fn boolean(&self, key: &str) -> Result<bool> {
        let value = self.value(key)?;
        self.convert(key, value.to_bool())
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`).
    pub fn strings(&self, key: &str) -> Result<Vec<&str>> {
        let values = self.convert(key, self.value(key)?.to_vec())?;
        values
            .iter()
            .map(|v| self.convert(key, v.to_string()).map(String::as_str))
            .collect()
    }

    /// An array of integers (e.g. `tokenizer.ggml.token_type`).
    pub fn ints(&self, key: &str) -> Result<Vec<i64>> {
        let values = self.convert(key, self.value(key)?.to_vec())?;
        values
            .iter()
            .map(|v| {
                let got = match v {
                    Value::I32(x) => Ok(*x as i64),
                    Value::I64(x) => Ok(*x),
                    other => other.to_u64().map(|x| x as i64),
                };
                self.convert(key, got)
            })
            .collect()
    }

    /// `general.architecture` (`llama`, `qwen2`, `mistral`, ...): the prefix of the model's keys.
    pub fn architecture(&self) -> Result<&str> {
        self.string("general.architecture")
    }

    /// The Llama configuration stored in the metadata under the architecture's prefix.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self.architecture()?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let hidden_size = self.uint(&key("embedding_length"))? as usize;
        let num_attention_heads = self.uint(&key("attention.head_count"))? as usize;
        let num_key_value_heads = match self.uint(&key("attention.head_count_kv")) {
            Ok(n) => n as usize,
            Err(_)
                if !self
                    .metadata()
                    .contains_key(&key("attention.head_count_kv")) =>
            {
                num_attention_heads
            }
            Err(e) => return Err(e),
        };
        let vocab_size = match self.uint(&key("vocab_size")) {
            Ok(n) => n as usize,
            Err(_) => self.strings("tokenizer.ggml.tokens")?.len(),
        };
        let rope_theta = if self.metadata().contains_key(&key("rope.freq_base")) {
            self.float(&key("rope.freq_base"))?
        } else {
            10_000.0
        };
        let has = |name: &str| self.content.tensor_infos.contains_key(name);
        let config = LlamaConfig {
            hidden_size,
            intermediate_size: self.uint(&key("feed_forward_length"))? as usize,
            num_hidden_layers: self.uint(&key("block_count"))? as usize,
            num_attention_heads,
            num_key_value_heads,
            rms_norm_eps: self.float(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta,
            max_position_embeddings: self.uint(&key("context_length"))? as usize,
            vocab_size,
            tie_word_embeddings: !has("output.weight"),
            attention_bias: has("blk.0.attn_q.bias"),
        };
        config
            .validate()
            .map_err(|m| Error::bad_file(&self.path, m))?;
        Ok(config)
    }

    /// Reads one tensor and dequantizes it to f32 on `device`.
    pub fn dequantize(&mut self, name: &str, device: &Device) -> Result<Tensor> {
        let qtensor = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| Error::bad_file(&self.path, format!("tensor `{name}`: {e}")))?;
        let tensor = qtensor.dequantize(&Device::Cpu).map_err(|e| {
            Error::bad_file(
                &self.path,
                format!("tensor `{name}`: cannot dequantize: {e}"),
            )
        })?;
        Ok(tensor.to_device(device)?)
    }

    /// Every tensor of the file, dequantized to f32, under its Hugging Face name, with q/k
    /// projections (and biases) un-permuted to the rotate-half layout.
    ///
    /// A tensor whose name has no Hugging Face counterpart is an error naming it (better than
    /// silently dropping part of a model).
    pub fn load_hf_tensors(
        &mut self,
        config: &LlamaConfig,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        Ok(self.load_hf_weights(config, device, false)?.0)
    }

    /// As [`GgufFile::load_hf_tensors`]; with `keep_blocks`, the decoder layers' linear weights
    /// stored in a quantized ggml type stay in their blocks (the second map; q/k rows reordered
    /// without dequantizing), so the whole model never exists in f32.
    pub fn load_hf_weights(
        &mut self,
        config: &LlamaConfig,
        device: &Device,
        keep_blocks: bool,
    ) -> Result<(HashMap<String, Tensor>, KeptBlocks)> {
        let mut names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        names.sort();
        let mut out = HashMap::with_capacity(names.len());
        let mut kept = HashMap::new();
        for name in names {
            if name == "rope_freqs.weight" {
                return Err(Error::bad_file(
                    &self.path,
                    "rope frequency scaling (`rope_freqs.weight`, Llama 3.1 style) is not supported by the host's Llama implementation",
                ));
            }
            let hf = hf_name(&name).ok_or_else(|| {
                Error::bad_file(
                    &self.path,
                    format!("tensor `{name}` has no Hugging Face Llama counterpart (unsupported architecture variant?)"),
                )
            })?;
            let heads = if hf.contains("self_attn.q_proj.") {
                Some(config.num_attention_heads)
            } else if hf.contains("self_attn.k_proj.") {
                Some(config.num_key_value_heads)
            } else {
                None
            };
            let linear = hf.starts_with("model.layers.") && hf.ends_with("_proj.weight");
            if keep_blocks && linear {
                if let Some(matrix) = self.blocks(&name, heads)? {
                    kept.insert(hf, Arc::new(matrix));
                    continue;
                }
            }
            let mut tensor = self.dequantize(&name, device)?;
            if let Some(heads) = heads {
                tensor = unpermute_qk(&tensor, heads)?;
            }
            out.insert(hf, tensor);
        }
        Ok((out, kept))
    }

    /// Tensor `name` as a [`QuantizedMatrix`] of its own ggml blocks, its rows un-permuted for
    /// `heads` (q/k projections); `None` when it is stored unquantized (f32, f16, bf16).
    fn blocks(&mut self, name: &str, heads: Option<usize>) -> Result<Option<QuantizedMatrix>> {
        use candle_core::quantized::GgmlDType;
        let bad = |what: String| Error::bad_file(&self.path, format!("tensor `{name}`: {what}"));
        let qtensor = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| bad(e.to_string()))?;
        let dtype = qtensor.dtype();
        if matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            return Ok(None);
        }
        let (rows, cols) = qtensor.shape().dims2().map_err(|e| bad(e.to_string()))?;
        let order: Vec<usize> = match heads {
            Some(heads) => {
                // The permutation of the rows, read off an index column.
                let index: Vec<f32> = (0..rows).map(|r| r as f32).collect();
                let column = Tensor::from_vec(index, (rows, 1), &Device::Cpu)?;
                unpermute_qk(&column, heads)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .into_iter()
                    .map(|r| r as usize)
                    .collect()
            }
            None => (0..rows).collect(),
        };
        let data = qtensor.data().map_err(|e| bad(e.to_string()))?;
        QuantizedMatrix::from_ggml(dtype, rows, cols, &data, |r| order[r])
            .map(Some)
            .map_err(|e| bad(e.to_string()))
    }
}

impl GgufFile {
    /// Writes a copy of this file to `out` whose decoder linear weights (`blk.N.attn_q.weight`,
    /// `ffn_down`, ...) are re-quantized to `dtype`; metadata and every other tensor are copied
    /// as stored. Returns how many linear weights were written in `dtype`.
    pub fn write_requantized(
        &mut self,
        out: &Path,
        dtype: candle_core::quantized::GgmlDType,
    ) -> Result<usize> {
        self.write_with_values(out, dtype, &|_| None)
    }

    /// [`GgufFile::write_requantized`] with new values: a tensor for which `value_of` (asked
    /// with the Hugging Face name) gives one is written with that value — in the Hugging Face
    /// layout the host uses, so q/k rows are permuted back to llama.cpp's order — in `dtype`
    /// for a decoder linear weight and in its stored type otherwise (a merged model written
    /// over its source file). The file is written to a temporary name, synced and renamed into
    /// place, so `out` is never half-written.
    pub fn write_with_values(
        &mut self,
        out: &Path,
        dtype: candle_core::quantized::GgmlDType,
        value_of: &dyn Fn(&str) -> Option<Tensor>,
    ) -> Result<usize> {
        use candle_core::quantized::{gguf_file, QTensor};
        let config = self.llama_config()?;
        let mut names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        names.sort();
        let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
        let mut linears = 0;
        for name in names {
            let bad =
                |what: String| Error::bad_file(&self.path, format!("tensor `{name}`: {what}"));
            let stored = self
                .content
                .tensor(&mut self.reader, &name, &Device::Cpu)
                .map_err(|e| bad(e.to_string()))?;
            let hf = hf_name(&name);
            let linear = hf
                .as_deref()
                .is_some_and(|h| h.starts_with("model.layers.") && h.ends_with("_proj.weight"));
            let new_value = match hf.as_deref().and_then(value_of) {
                Some(v) => {
                    let v = v
                        .to_dtype(candle_core::DType::F32)?
                        .to_device(&Device::Cpu)?;
                    let h = hf.as_deref().unwrap_or_default();
                    Some(if h.contains("self_attn.q_proj.") {
                        permute_qk(&v, config.num_attention_heads)?
                    } else if h.contains("self_attn.k_proj.") {
                        permute_qk(&v, config.num_key_value_heads)?
                    } else {
                        v
                    })
                }
                None if linear && stored.dtype() != dtype => Some(
                    stored
                        .dequantize(&Device::Cpu)
                        .map_err(|e| bad(e.to_string()))?,
                ),
                None => None,
            };
            let tensor = match new_value {
                Some(v) => {
                    let target = if linear { dtype } else { stored.dtype() };
                    QTensor::quantize(&v, target)
                        .map_err(|e| bad(format!("cannot quantize to {target:?}: {e}")))?
                }
                None => stored,
            };
            if linear && tensor.dtype() == dtype {
                linears += 1;
            }
            tensors.push((name, tensor));
        }
        let metadata: Vec<(&str, &Value)> = self
            .content
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let tmp = out.with_extension("gguf.partial");
        let write = || -> std::io::Result<()> {
            let file = File::create(&tmp)?;
            let mut writer = std::io::BufWriter::new(file);
            gguf_file::write(&mut writer, &metadata, &refs).map_err(std::io::Error::other)?;
            let file = writer.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            std::fs::rename(&tmp, out)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(out, e)
        })?;
        Ok(linears)
    }
}

/// The Hugging Face name of a llama.cpp tensor name, e.g. `blk.0.ffn_gate.weight` →
/// `model.layers.0.mlp.gate_proj.weight`; `None` for names outside the Llama family.
pub fn hf_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf_module = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{kind}"))
}

/// Undoes llama.cpp's q/k row permutation: rows of each head go from interleaved pairs
/// `(x0, x1), (x2, x3), ...` back to Hugging Face's two halves. Works on weights `[out, in]` and on
/// biases `[out]`: `w.reshape(heads, out/heads/2, 2, in).swapaxes(1, 2).reshape(out, in)`.
pub fn unpermute_qk(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims.first().copied().unwrap_or(0);
    if n_heads == 0 || out % (2 * n_heads) != 0 {
        return Err(Error::config(format!(
            "cannot un-permute a q/k projection with {out} rows into {n_heads} heads of even size"
        )));
    }
    let inner: usize = dims[1..].iter().product();
    let t = w
        .reshape((n_heads, out / n_heads / 2, 2, inner))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?;
    Ok(t)
}

/// llama.cpp's q/k row order from Hugging Face's (the inverse of [`unpermute_qk`]), as its
/// conversion script does: `w.reshape(heads, 2, out/heads/2, in).swapaxes(1, 2)`.
pub fn permute_qk(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims.first().copied().unwrap_or(0);
    if n_heads == 0 || out % (2 * n_heads) != 0 {
        return Err(Error::config(format!(
            "cannot permute a q/k projection with {out} rows into {n_heads} heads of even size"
        )));
    }
    let inner: usize = dims[1..].iter().product();
    Ok(w.reshape((n_heads, 2, out / n_heads / 2, inner))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// Whether `path` looks like a GGUF file (by its magic number), for loaders that dispatch on the
/// file type.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.12.attn_output.weight").unwrap(),
            "model.layers.12.self_attn.o_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_q.bias").unwrap(),
            "model.layers.0.self_attn.q_proj.bias"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
        assert!(hf_name("blk.x.attn_q.weight").is_none());
        assert!(hf_name("blk.0.ssm_a").is_none());
    }

    /// The llama.cpp conversion permutes HF rows as
    /// `w.reshape(heads, 2, out/heads/2, in).swapaxes(1, 2)`; un-permuting must invert it.
    #[test]
    fn unpermute_inverts_the_llama_cpp_permutation() {
        let (heads, out, inp) = (3usize, 12usize, 2usize);
        let hf = Tensor::arange(0f32, (out * inp) as f32, &Device::Cpu)
            .unwrap()
            .reshape((out, inp))
            .unwrap();
        let permuted = hf
            .reshape((heads, 2, out / heads / 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((out, inp))
            .unwrap();
        assert_eq!(
            permute_qk(&hf, heads).unwrap().to_vec2::<f32>().unwrap(),
            permuted.to_vec2::<f32>().unwrap()
        );
        assert_ne!(
            permuted.to_vec2::<f32>().unwrap(),
            hf.to_vec2::<f32>().unwrap()
        );
        let back = unpermute_qk(&permuted, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
        let bias = Tensor::arange(0f32, out as f32, &Device::Cpu).unwrap();
        let pb = bias
            .reshape((heads, 2, out / heads / 2))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .flatten_all()
            .unwrap();
        assert_eq!(
            unpermute_qk(&pb, heads).unwrap().to_vec1::<f32>().unwrap(),
            bias.to_vec1::<f32>().unwrap()
        );
        assert!(unpermute_qk(&hf, 5).is_err());
    }
}
