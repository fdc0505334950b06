//! What `cleave-tail` serves and how: a TOML file, flags over it, checked before anything
//! starts.
//!
//! ```toml
//! repository = "/srv/cleave/models"     # a folder of bundle folders; or: bundles = [...]
//! listen = "0.0.0.0:8001"               # gRPC: cleave.v1, KServe v2, grpc.health.v1
//! http_listen = "0.0.0.0:8000"          # /healthz, /readyz, /metrics
//! max_frame_bytes = 4194304
//! max_concurrent_streams = 128          # per connection
//! stream_window = 8                     # frames of one stream in flight at once
//! grace_seconds = 10
//!
//! [model_defaults]                      # every model, unless [models.<name>] says otherwise
//! backend = "tract"                     # tract | ort | ort-cuda | ort-tensorrt
//! instances = 1                         # model threads (each loads its own copy)
//! threads = 0                           # threads per run (ONNX Runtime); 0: cores / instances
//! full_model = false                    # also serve the full model (KServe, head offload)
//! [model_defaults.batching]
//! max_batch_size = 8
//! max_queue_delay_us = 1000
//! preferred_batch_sizes = [4, 8]
//! max_queue_size = 256
//! timeout_ms = 0                        # 0: no deadline unless the request brings one
//!
//! [models.efficientnet-lite0-split]     # by bundle name
//! instances = 2
//! ```
//!
//! Unknown keys are errors, so a typo fails at start instead of being ignored.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cleave_engine::Backend;
use serde::Deserialize;

use crate::BatchingConfig;

/// How one model is run.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    /// Inference backend.
    pub backend: Backend,
    /// Model threads, each with its own copy of the model.
    pub instances: usize,
    /// Threads one model run may use (ONNX Runtime; `None`: the cores shared out among
    /// the instances, see [`cleave_engine::LoadOptions::sharing_cores`]).
    pub threads: Option<usize>,
    /// The dynamic batcher's settings.
    pub batching: BatchingConfig,
    /// Also serve the bundle's full model (image in, logits out): over KServe, and to heads
    /// that offload JPEGs.
    pub full_model: bool,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            backend: Backend::Tract,
            instances: 1,
            threads: None,
            batching: BatchingConfig::default(),
            full_model: false,
        }
    }
}

/// Everything `cleave-tail` needs to start.
#[derive(Debug, Clone)]
pub struct TailConfig {
    /// Bundle folders to serve.
    pub bundles: Vec<PathBuf>,
    /// gRPC address; port 0 picks a free one.
    pub listen: SocketAddr,
    /// HTTP address for probes and metrics; `None`: no HTTP listener.
    pub http_listen: Option<SocketAddr>,
    /// Largest coded frame (and KServe message) accepted, in bytes.
    pub max_frame_bytes: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Frames of one `cleave.v1` stream in flight at once.
    pub stream_window: usize,
    /// Settings of models without their own.
    pub model_defaults: ModelSettings,
    /// Settings by bundle name.
    pub models: BTreeMap<String, ModelSettings>,
    /// How long in-flight work gets after a shutdown signal.
    pub grace: Duration,
}

impl TailConfig {
    /// Defaults for one bundle: loopback on a free port, no HTTP, tract, batches of up to 8.
    pub fn new(bundle: impl Into<PathBuf>) -> Self {
        Self {
            bundles: vec![bundle.into()],
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_listen: None,
            max_frame_bytes: 4 << 20,
            max_concurrent_streams: 128,
            stream_window: 8,
            model_defaults: ModelSettings::default(),
            models: BTreeMap::new(),
            grace: Duration::from_secs(10),
        }
    }

    /// The settings for the bundle named `name`.
    pub fn settings_for(&self, name: &str) -> &ModelSettings {
        self.models.get(name).unwrap_or(&self.model_defaults)
    }

    /// Checks the config as a whole.
    ///
    /// # Errors
    ///
    /// A message naming the setting that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.bundles.is_empty() {
            return Err("nothing to serve: give --bundle, --repository or `repository =`".into());
        }
        if self.stream_window == 0 || self.max_concurrent_streams == 0 {
            return Err("stream_window and max_concurrent_streams must be at least 1".into());
        }
        for (name, settings) in std::iter::once(("model_defaults", &self.model_defaults)).chain(
            self.models
                .iter()
                .map(|(name, settings)| (name.as_str(), settings)),
        ) {
            if settings.instances == 0 {
                return Err(format!("{name}: instances must be at least 1"));
            }
            settings
                .batching
                .validate()
                .map_err(|e| format!("{name}.batching: {e}"))?;
        }
        Ok(())
    }
}

/// The TOML file, every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// A folder of bundle folders.
    pub repository: Option<PathBuf>,
    /// Bundle folders.
    #[serde(default)]
    pub bundles: Vec<PathBuf>,
    /// gRPC address.
    pub listen: Option<SocketAddr>,
    /// HTTP address.
    pub http_listen: Option<SocketAddr>,
    /// Largest frame in bytes.
    pub max_frame_bytes: Option<usize>,
    /// Streams per connection.
    pub max_concurrent_streams: Option<u32>,
    /// Frames in flight per stream.
    pub stream_window: Option<usize>,
    /// Shutdown grace in seconds.
    pub grace_seconds: Option<u64>,
    /// Defaults for every model.
    #[serde(default)]
    pub model_defaults: ModelSettingsFile,
    /// Per bundle name.
    #[serde(default)]
    pub models: BTreeMap<String, ModelSettingsFile>,
}

/// `[model_defaults]` and `[models.<name>]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettingsFile {
    /// `tract`, `ort`, `ort-cuda` or `ort-tensorrt`.
    pub backend: Option<String>,
    /// Model threads.
    pub instances: Option<usize>,
    /// Threads per model run (ONNX Runtime); 0: the cores divided among the instances.
    pub threads: Option<usize>,
    /// Serve the full model too.
    pub full_model: Option<bool>,
    /// Batching.
    #[serde(default)]
    pub batching: BatchingFile,
}

/// `[…batching]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingFile {
    /// Most samples per run.
    pub max_batch_size: Option<usize>,
    /// Queue delay in microseconds.
    pub max_queue_delay_us: Option<u64>,
    /// Preferred sizes.
    pub preferred_batch_sizes: Option<Vec<usize>>,
    /// Queue bound.
    pub max_queue_size: Option<usize>,
    /// Default deadline in milliseconds; 0 for none.
    pub timeout_ms: Option<u64>,
}

impl ConfigFile {
    /// Reads and parses `path`.
    ///
    /// # Errors
    ///
    /// A message with the path and what is wrong in it.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }
}

impl ModelSettingsFile {
    /// These settings over `base`.
    ///
    /// # Errors
    ///
    /// An unknown backend name.
    pub fn over(&self, base: &ModelSettings) -> Result<ModelSettings, String> {
        let mut settings = base.clone();
        if let Some(backend) = &self.backend {
            settings.backend = backend.parse()?;
        }
        if let Some(instances) = self.instances {
            settings.instances = instances;
        }
        if let Some(threads) = self.threads {
            settings.threads = (threads > 0).then_some(threads);
        }
        if let Some(full) = self.full_model {
            settings.full_model = full;
        }
        let b = &self.batching;
        let batching = &mut settings.batching;
        if let Some(v) = b.max_batch_size {
            batching.max_batch_size = v;
        }
        if let Some(v) = b.max_queue_delay_us {
            batching.max_queue_delay = Duration::from_micros(v);
        }
        if let Some(v) = &b.preferred_batch_sizes {
            batching.preferred_batch_sizes = v.clone();
        }
        if let Some(v) = b.max_queue_size {
            batching.max_queue_size = v;
        }
        if let Some(v) = b.timeout_ms {
            batching.default_timeout = (v > 0).then(|| Duration::from_millis(v));
        }
        Ok(settings)
    }
}

/// The bundle folders in `repository`: its subfolders that hold a `manifest.toml`, sorted.
///
/// # Errors
///
/// A folder that cannot be read, or one with no bundle in it.
pub fn bundles_in(repository: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(repository)
        .map_err(|e| format!("cannot read model repository {}: {e}", repository.display()))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("manifest.toml").is_file())
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(format!(
            "model repository {} holds no bundle (no subfolder with a manifest.toml)",
            repository.display()
        ));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_overrides_defaults_per_model() {
        let file: ConfigFile = toml::from_str(
            r#"
            bundles = ["a"]
            [model_defaults.batching]
            max_batch_size = 16
            max_queue_delay_us = 500
            [models.special]
            instances = 2
            backend = "ort"
            [models.special.batching]
            timeout_ms = 20
            "#,
        )
        .unwrap();
        let defaults = file.model_defaults.over(&ModelSettings::default()).unwrap();
        assert_eq!(defaults.batching.max_batch_size, 16);
        assert_eq!(
            defaults.batching.max_queue_delay,
            Duration::from_micros(500)
        );
        let special = file.models["special"].over(&defaults).unwrap();
        assert_eq!(special.instances, 2);
        assert_eq!(special.batching.max_batch_size, 16);
        assert_eq!(
            special.batching.default_timeout,
            Some(Duration::from_millis(20))
        );
    }

    #[test]
    fn typos_and_bad_values_are_named() {
        let error = toml::from_str::<ConfigFile>("[model_defaults]\ninstance = 2\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("instance"), "{error}");
        let bad = ModelSettingsFile {
            backend: Some("gpu".into()),
            ..Default::default()
        };
        assert!(bad.over(&ModelSettings::default()).is_err());
        let mut config = TailConfig::new("x");
        config.model_defaults.batching.max_batch_size = 0;
        assert!(config.validate().unwrap_err().contains("max_batch_size"));
    }
}
