//! The process-wide wasmtime engine (epoch interruption on, one background thread ticking it),
//! the cache of compiled components, and the check that a component imports nothing but the
//! Whetstone `host` interface.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use wasmtime::component::Component;
use wasmtime::{Config, Engine};

/// How often the engine's epoch advances; call deadlines are counted in these ticks.
pub const TICK: Duration = Duration::from_millis(10);

/// The WIT package (name and version) whose interfaces a plugin may import.
const CONTRACT_PACKAGE: &str = "whetstone:plugin";

type R<T> = std::result::Result<T, String>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The shared engine, created with its epoch ticker on first use.
pub fn engine() -> R<&'static Engine> {
    static ENGINE: OnceLock<R<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let mut config = Config::new();
            config.wasm_component_model(true).epoch_interruption(true);
            let engine = Engine::new(&config).map_err(|e| format!("cannot start wasmtime: {e}"))?;
            let ticking = engine.clone();
            std::thread::Builder::new()
                .name("whetstone-wasm-epoch".into())
                .spawn(move || loop {
                    std::thread::sleep(TICK);
                    ticking.increment_epoch();
                })
                .map_err(|e| format!("cannot start the wasm deadline thread: {e}"))?;
            Ok(engine)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The number of epoch ticks a call of `timeout_ms` may run: rounded up, plus one for the tick
/// already under way when the call starts.
pub fn deadline_ticks(timeout_ms: u64) -> u64 {
    let tick_ms = TICK.as_millis().max(1) as u64;
    timeout_ms.div_ceil(tick_ms).max(1) + 1
}

/// What identifies one build of a component file: its path, modification time and size.
type CacheKey = (PathBuf, Option<SystemTime>, u64);

/// The compiled component at `path`, compiled once per build of the file.
pub fn component(engine: &Engine, path: &Path) -> R<Component> {
    static CACHE: OnceLock<Mutex<HashMap<CacheKey, Component>>> = OnceLock::new();
    let canonical = path
        .canonicalize()
        .map_err(|e| format!("cannot open the component: {e}"))?;
    let meta =
        std::fs::metadata(&canonical).map_err(|e| format!("cannot open the component: {e}"))?;
    let key = (canonical, meta.modified().ok(), meta.len());
    let cache = CACHE.get_or_init(Default::default);
    if let Some(c) = lock(cache).get(&key) {
        return Ok(c.clone());
    }
    let bytes = std::fs::read(&key.0).map_err(|e| format!("cannot read the component: {e}"))?;
    if is_core_module(&bytes) {
        return Err(
            "this is a core WebAssembly module, not a component; build the plugin with \
                    `whet plugin build --wasm`, which componentizes it"
                .into(),
        );
    }
    let component = Component::from_binary(engine, &bytes)
        .map_err(|e| format!("not a valid WebAssembly component: {}", chain(&e)))?;
    check_imports(engine, &component)?;
    lock(cache).insert(key, component.clone());
    Ok(component)
}

/// Whether `bytes` start with the header of a core module (version 1) rather than a component.
fn is_core_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] == [1, 0, 0, 0]
}

/// Refuses a component that imports anything beyond the contract's interfaces (WASI above
/// all: plugins get no ambient capability), naming what it asked for.
fn check_imports(engine: &Engine, component: &Component) -> R<()> {
    let ty = component.component_type();
    let expected = format!("@{}", super::CONTRACT_WIT_VERSION);
    for (name, _) in ty.imports(engine) {
        let Some(rest) = name.strip_prefix(CONTRACT_PACKAGE) else {
            return Err(format!(
                "the component imports `{name}`, which Whetstone does not provide: plugins get \
                 no WASI or other capability; build for wasm32-unknown-unknown (not wasip1/p2) \
                 with `whet plugin build --wasm`"
            ));
        };
        if !rest.ends_with(&expected) {
            let version = rest.rsplit_once('@').map_or("unversioned", |(_, v)| v);
            return Err(format!(
                "the component imports `{name}` (contract {version}), this host speaks contract \
                 {}; rebuild the plugin against a matching whetstone-sdk",
                super::CONTRACT_WIT_VERSION
            ));
        }
    }
    Ok(())
}

/// An error and its causes on one line, without wasm backtraces.
pub fn chain(e: &wasmtime::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.starts_with("error while executing at wasm backtrace") {
            continue;
        }
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_round_up_and_allow_for_the_current_tick() {
        assert_eq!(deadline_ticks(0), 2);
        assert_eq!(deadline_ticks(10), 2);
        assert_eq!(deadline_ticks(11), 3);
        assert_eq!(deadline_ticks(30_000), 3001);
    }

    #[test]
    fn core_modules_are_told_apart_from_components() {
        assert!(is_core_module(b"\0asm\x01\0\0\0"));
        assert!(!is_core_module(b"\0asm\x0d\0\x01\0"));
    }
}
