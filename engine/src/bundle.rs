//! Opening a bundle folder: parse, verify, and hand out its models.
//!
//! The three roles (`full`, `head`, `tail`) are in every bundle; the prefilter is optional, so
//! it is not a [`Role`] but has its own accessors ([`Bundle::prefilter_spec`],
//! [`Bundle::load_prefilter`]), which say `None` for a bundle without one.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use cleave_codec::{CodingTables, LevelRanges};

use crate::backend::{Backend, LoadOptions, Model};
use crate::manifest::{Manifest, ModelFile, PrefilterSpec, Task};
use crate::{BundleId, EngineError};

/// Manifest format version this build reads.
const MANIFEST_FORMAT: u32 = 1;

/// Which of a bundle's models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The whole network, for local inference and reference results.
    Full,
    /// The edge part, ending in the bottleneck.
    Head,
    /// The server part, starting at the bottleneck.
    Tail,
}

impl Role {
    /// `full`, `head` or `tail`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Full => "full",
            Role::Head => "head",
            Role::Tail => "tail",
        }
    }
}

/// An opened, verified bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
    manifest: Manifest,
    id: BundleId,
    tables: Option<CodingTables>,
}

impl Bundle {
    /// Opens the bundle in `dir`: parses `manifest.toml`, checks the bundle id against the
    /// manifest's content and every model file against its sha256.
    ///
    /// # Errors
    ///
    /// An [`EngineError`] naming the file and the problem: missing, unparsable, corrupt
    /// (hash mismatch) or inconsistent.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, EngineError> {
        let dir = dir.as_ref().to_path_buf();
        let manifest_path = dir.join("manifest.toml");
        let text = std::fs::read_to_string(&manifest_path).map_err(|e| EngineError::Missing {
            path: manifest_path.clone(),
            reason: e.to_string(),
        })?;
        let bad = |reason: String| EngineError::Manifest {
            path: manifest_path.clone(),
            reason,
        };
        let manifest: Manifest = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(bad(format!(
                "format {} is not supported (this build reads format {MANIFEST_FORMAT})",
                manifest.format
            )));
        }
        let computed = content_id(&text);
        let id: BundleId = manifest.id.parse().map_err(|e| bad(format!("id: {e}")))?;
        if id != computed {
            return Err(EngineError::IdMismatch {
                path: manifest_path,
                declared: manifest.id.clone(),
                computed: computed.to_string(),
            });
        }
        validate(&manifest).map_err(bad)?;
        for file in [
            Some(&manifest.models.full),
            Some(&manifest.models.head),
            Some(&manifest.models.tail),
            manifest.models.prefilter.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            verify_file(&dir, &file.path, &file.sha256)?;
        }
        let tables = coding_tables(&dir, &manifest)?;
        Ok(Self {
            dir,
            manifest,
            id,
            tables,
        })
    }

    /// The id a manifest's text should carry: the sha256 of the text with its first
    /// `id = ` line (newline included) removed. Tools that write or edit a manifest use this.
    pub fn id_of_manifest(text: &str) -> BundleId {
        content_id(text)
    }

    /// The bundle id: sha256 of the manifest without its `id` line.
    pub fn id(&self) -> BundleId {
        self.id
    }

    /// The bundle's coding tables (calibrated levels and priors), if it was calibrated.
    pub fn coding_tables(&self) -> Option<&CodingTables> {
        self.tables.as_ref()
    }

    /// The parsed manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The bundle folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `name version (short id)`, for logs.
    pub fn describe(&self) -> String {
        format!(
            "{} {} ({})",
            self.manifest.name,
            self.manifest.version,
            self.id.short()
        )
    }

    /// The manifest entry of a model.
    pub fn model_file(&self, role: Role) -> &ModelFile {
        match role {
            Role::Full => &self.manifest.models.full,
            Role::Head => &self.manifest.models.head,
            Role::Tail => &self.manifest.models.tail,
        }
    }

    /// The `[prefilter]` table (threshold, what counts as interesting, measured quality), if
    /// the bundle has a prefilter.
    pub fn prefilter_spec(&self) -> Option<&PrefilterSpec> {
        self.manifest.prefilter.as_ref()
    }

    /// The manifest entry of the prefilter model, if the bundle has one.
    pub fn prefilter_file(&self) -> Option<&ModelFile> {
        self.manifest.models.prefilter.as_ref()
    }

    /// Loads and optimizes the prefilter with `backend`: input the head's output
    /// (`[N, ..bottleneck.shape]`, float, before quantization), output `[N, 1]`, the
    /// probability that the frame is of interest; compare it with
    /// [`PrefilterSpec::keeps`]. `Ok(None)` for a bundle without a prefilter.
    ///
    /// # Errors
    ///
    /// As [`Bundle::load`].
    pub fn load_prefilter(&self, backend: &Backend) -> Result<Option<Model>, EngineError> {
        self.load_prefilter_with(backend, &LoadOptions::default())
    }

    /// [`Bundle::load_prefilter`] with [`LoadOptions`].
    ///
    /// # Errors
    ///
    /// As [`Bundle::load`].
    pub fn load_prefilter_with(
        &self,
        backend: &Backend,
        options: &LoadOptions,
    ) -> Result<Option<Model>, EngineError> {
        let Some(file) = self.prefilter_file() else {
            return Ok(None);
        };
        Model::load_with(
            backend,
            &self.dir.join(&file.path),
            self.manifest.bottleneck.shape.clone(),
            vec![1],
            options,
        )
        .map(Some)
    }

    /// Per-sample input shape of a model.
    pub fn input_shape(&self, role: Role) -> Vec<usize> {
        let input = &self.manifest.input;
        match role {
            Role::Full | Role::Head => vec![3, input.height, input.width],
            Role::Tail => self.manifest.bottleneck.shape.clone(),
        }
    }

    /// Per-sample output shape of a model: `[labels]` logits for classification, a
    /// `[1, height, width]` probability map over the input for detection.
    pub fn output_shape(&self, role: Role) -> Vec<usize> {
        let input = &self.manifest.input;
        match (role, self.manifest.task) {
            (Role::Head, _) => self.manifest.bottleneck.shape.clone(),
            (_, Task::Classification) => vec![self.manifest.labels.names.len()],
            (_, Task::Detection) => vec![1, input.height, input.width],
        }
    }

    /// Loads and optimizes one of the bundle's models with `backend`, checking its input and
    /// output shapes against the manifest. Do this once; run the model many times.
    ///
    /// # Errors
    ///
    /// [`EngineError::Load`] if the backend refuses the file, [`EngineError::WrongShape`] if
    /// the model's shapes disagree with the manifest, [`EngineError::BackendUnavailable`] if
    /// the backend cannot run here.
    pub fn load(&self, role: Role, backend: &Backend) -> Result<Model, EngineError> {
        self.load_with(role, backend, &LoadOptions::default())
    }

    /// [`Bundle::load`] with [`LoadOptions`] (threads per run).
    ///
    /// # Errors
    ///
    /// As [`Bundle::load`].
    pub fn load_with(
        &self,
        role: Role,
        backend: &Backend,
        options: &LoadOptions,
    ) -> Result<Model, EngineError> {
        let file = self.model_file(role);
        Model::load_with(
            backend,
            &self.dir.join(&file.path),
            self.input_shape(role),
            self.output_shape(role),
            options,
        )
    }
}

/// The bundle id of a manifest's text: sha256 over the text with its first `id = ` line
/// (newline included) removed.
fn content_id(text: &str) -> BundleId {
    let mut hasher = Sha256::new();
    let mut skipped = false;
    for line in text.split_inclusive('\n') {
        if !skipped && line.starts_with("id = ") {
            skipped = true;
            continue;
        }
        hasher.update(line.as_bytes());
    }
    BundleId::from_bytes(hasher.finalize().into())
}

fn validate(manifest: &Manifest) -> Result<(), String> {
    let input = &manifest.input;
    if input.layout != "NCHW" || input.color != "RGB" {
        return Err(format!(
            "input layout {:?} / color {:?} not supported (NCHW, RGB)",
            input.layout, input.color
        ));
    }
    if !matches!(input.resize.as_str(), "bilinear" | "nearest") {
        return Err(format!(
            "input.resize {:?} not supported (bilinear, nearest)",
            input.resize
        ));
    }
    if input.width == 0 || input.height == 0 || input.width > 8192 || input.height > 8192 {
        return Err(format!(
            "input size {}x{} out of range",
            input.width, input.height
        ));
    }
    if !(input.crop_fraction > 0.0 && input.crop_fraction <= 1.0) {
        return Err(format!(
            "input.crop_fraction {} not in (0, 1]",
            input.crop_fraction
        ));
    }
    if input.std.iter().any(|s| !s.is_normal()) {
        return Err(format!("input.std {:?} must be non-zero", input.std));
    }
    let shape = &manifest.bottleneck.shape;
    if shape.is_empty() || shape.len() > 4 || shape.contains(&0) {
        return Err(format!(
            "bottleneck.shape {shape:?} must have 1 to 4 non-zero axes"
        ));
    }
    let q = &manifest.bottleneck.quantization;
    if !(cleave_codec::MIN_BITS..=cleave_codec::MAX_BITS).contains(&q.bits) {
        return Err(format!(
            "bottleneck.quantization.bits {} not supported (2 to 8)",
            q.bits
        ));
    }
    if !matches!(q.granularity.as_str(), "per_tensor" | "per_channel") {
        return Err(format!(
            "bottleneck.quantization.granularity {:?} unknown",
            q.granularity
        ));
    }
    if cleave_codec::Codec::from_name(&q.codec).is_none() {
        return Err(format!(
            "bottleneck.quantization.codec {:?} unknown (ans, zstd, raw)",
            q.codec
        ));
    }
    if q.priors.is_some() != q.priors_sha256.is_some() {
        return Err("bottleneck.quantization.priors and priors_sha256 go together".into());
    }
    if !q.levels.is_empty() && !q.levels.iter().any(|l| l.bits == q.bits) {
        return Err(format!(
            "bottleneck.quantization.bits {} has no calibrated level",
            q.bits
        ));
    }
    if q.levels.is_empty() && q.codec == "ans" {
        return Err("bottleneck.quantization.codec \"ans\" needs calibrated levels".into());
    }
    if manifest.labels.names.is_empty() {
        return Err("labels.names is empty".into());
    }
    manifest.check_prefilter()?;
    manifest.check_task()
}

/// Reads the priors file (verified like a model) and builds the coding tables the manifest's
/// levels describe; `None` for a bundle that was never calibrated.
fn coding_tables(dir: &Path, manifest: &Manifest) -> Result<Option<CodingTables>, EngineError> {
    let q = &manifest.bottleneck.quantization;
    let priors = match (&q.priors, &q.priors_sha256) {
        (Some(path), Some(sha256)) => {
            let bytes = verify_file(dir, path, sha256)?;
            let text = String::from_utf8(bytes).map_err(|e| EngineError::Manifest {
                path: dir.join(path),
                reason: e.to_string(),
            })?;
            Some(text)
        }
        _ => None,
    };
    if q.levels.is_empty() && priors.is_none() {
        return Ok(None);
    }
    let ranges: Vec<LevelRanges> = q
        .levels
        .iter()
        .map(|l| LevelRanges {
            bits: l.bits,
            low: l.low.clone(),
            high: l.high.clone(),
        })
        .collect();
    let channels = manifest.bottleneck.shape[0];
    CodingTables::new(channels, &ranges, priors.as_deref())
        .map(Some)
        .map_err(|e| EngineError::Manifest {
            path: dir.join("manifest.toml"),
            reason: format!("coding tables: {e}"),
        })
}

/// Checks that `relative` stays inside the bundle and hashes to `sha256`; returns its bytes.
fn verify_file(dir: &Path, relative: &str, sha256: &str) -> Result<Vec<u8>, EngineError> {
    let path = dir.join(relative);
    if Path::new(relative)
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(EngineError::Manifest {
            path: dir.join("manifest.toml"),
            reason: format!("file path {relative:?} must stay inside the bundle"),
        });
    }
    let bytes = std::fs::read(&path).map_err(|e| EngineError::Missing {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let actual = hex::encode(Sha256::digest(&bytes));
    if !actual.eq_ignore_ascii_case(sha256) {
        return Err(EngineError::Corrupt {
            path,
            expected: sha256.to_owned(),
            actual,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_id_skips_only_the_id_line() {
        let a = content_id("format = 1\nid = \"x\"\nname = \"a\"\n");
        let b = content_id("format = 1\nid = \"y\"\nname = \"a\"\n");
        let c = content_id("format = 1\nid = \"x\"\nname = \"b\"\n");
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
