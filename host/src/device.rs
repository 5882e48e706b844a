//! Choosing the compute device from a recipe or CLI string.

use candle_core::Device;

use crate::{Error, Result};

/// Parses `cpu`, `cuda`, `cuda:N` or `metal` into a device. CUDA and Metal need the host built
/// with the `cuda` / `metal` feature; without it the error says so.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "cpu" => Ok(Device::Cpu),
        "metal" => Device::new_metal(0).map_err(|e| unavailable("metal", e)),
        _ => {
            let ordinal = match spec.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| {
                        Error::config(format!(
                            "invalid device `{spec}`: expected cpu, cuda, cuda:N or metal"
                        ))
                    })?,
                None => {
                    return Err(Error::config(format!(
                        "invalid device `{spec}`: expected cpu, cuda, cuda:N or metal"
                    )))
                }
            };
            Device::new_cuda(ordinal).map_err(|e| unavailable(&spec, e))
        }
    }
}

fn unavailable(name: &str, e: candle_core::Error) -> Error {
    Error::config(format!(
        "device `{name}` is not available ({e}); build with `--features {}` on a machine that has one, or use device = \"cpu\"",
        if name.starts_with("cuda") { "cuda" } else { "metal" }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_nonsense() {
        assert!(parse_device("CPU").unwrap().is_cpu());
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("expected cpu, cuda, cuda:N or metal"), "{err}");
        assert!(parse_device("cuda:x").is_err());
    }
}
