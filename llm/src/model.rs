//! A llama-architecture decoder read from GGUF, run one token at a time on one node.
//!
//! The network (Touvron et al., "LLaMA"; the reference implementation is llama.cpp's
//! `llm_build_llama`): token embedding, then per layer
//! `x += Wo · attention(rope(Wq · n(x)), rope(Wk · n(x)), Wv · n(x))` and
//! `x += Wdown · (silu(Wgate · n(x)) ⊙ Wup · n(x))` with `n` an RMS norm, then a final norm
//! and the output head (the embedding itself when the file ties them). Attention is grouped
//! (GQA): `head_count / head_count_kv` query heads share each K/V head.
//!
//! **RoPE.** GGUF's converter permutes the rows of Wq and Wk so that each head's rotation
//! pairs are adjacent (dimensions 2i and 2i+1), not split in halves as in Hugging Face's
//! weights; this file rotates adjacent pairs, as llama.cpp does for llama. The permutation
//! stays inside each head, so a shard of whole heads is still a valid slice.
//!
//! The model is immutable once loaded; what a sequence accumulates (keys and values) lives
//! in a separate [`KvCache`] passed by `&mut`.

use crate::gguf::{Gguf, GgufError};
use crate::matmul::{QMatrix, ShapeMismatch};
use crate::quant::GgmlType;
use crate::shard::NodeShard;
use crate::window::LayerStream;

use std::sync::Arc;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// Reading the file failed, or a key or tensor is missing.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// An architecture or shape this crate does not run.
    #[error("{0}")]
    Unsupported(String),
    /// The all-reduce between nodes failed (a peer gone, a timeout).
    #[error("all-reduce: {0}")]
    Collective(String),
    /// A tensor's shape contradicts the hyperparameters.
    #[error("tensor `{name}`: {reason}")]
    Shape {
        /// The tensor.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// The hyperparameters, resolved from the file's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Transformer blocks.
    pub layers: usize,
    /// Width of the residual stream.
    pub hidden: usize,
    /// Inner width of the feed-forward network.
    pub ffn: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (GQA groups).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Tokens in the vocabulary (rows of the output head).
    pub vocab: usize,
    /// Longest sequence the model was trained for.
    pub context: usize,
    /// RMS norm epsilon.
    pub norm_eps: f32,
    /// RoPE base frequency.
    pub rope_base: f32,
}

impl Config {
    /// The hyperparameters of a llama-architecture file.
    ///
    /// # Errors
    ///
    /// [`ModelError::Unsupported`] for another architecture or inconsistent sizes;
    /// [`ModelError::Gguf`] for missing keys.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self, ModelError> {
        let arch = gguf.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::Unsupported(format!(
                "general.architecture = {arch:?}: cleave-llm runs \"llama\" models"
            )));
        }
        let size = |key: &str| -> Result<usize, ModelError> {
            let value = gguf.get_u64(key)?;
            usize::try_from(value)
                .ok()
                .filter(|&v| v > 0 && v < 1 << 24)
                .ok_or_else(|| ModelError::Unsupported(format!("{key} = {value}")))
        };
        let layers = size("llama.block_count")?;
        let hidden = size("llama.embedding_length")?;
        let heads = size("llama.attention.head_count")?;
        let kv_heads = match gguf.get_u64("llama.attention.head_count_kv") {
            Err(GgufError::MissingKey { .. }) => heads,
            _ => size("llama.attention.head_count_kv")?,
        };
        if hidden % heads != 0 || heads % kv_heads != 0 {
            return Err(ModelError::Unsupported(format!(
                "{heads} heads of a {hidden}-wide model with {kv_heads} KV heads: heads must \
                 divide the width and KV heads the heads"
            )));
        }
        let head_dim = hidden / heads;
        if head_dim % 2 != 0 {
            return Err(ModelError::Unsupported(format!(
                "odd head width {head_dim}"
            )));
        }
        // Scaled rotations (Llama 3.1's frequency factors, linear or YaRN scaling) change
        // every position's angles: refused rather than run wrong.
        match gguf.get_str("llama.rope.scaling.type") {
            Ok("none") | Err(GgufError::MissingKey { .. }) => {}
            Ok(other) => {
                return Err(ModelError::Unsupported(format!(
                    "rope scaling {other:?}: cleave-llm runs unscaled rotary embeddings"
                )));
            }
            Err(e) => return Err(e.into()),
        }
        if gguf.tensor("rope_freqs.weight").is_ok() {
            return Err(ModelError::Unsupported(
                "rope frequency factors (rope_freqs.weight, Llama 3.1 style): cleave-llm runs \
                 unscaled rotary embeddings"
                    .into(),
            ));
        }
        match gguf.get_u64("llama.rope.dimension_count") {
            Err(GgufError::MissingKey { .. }) => {}
            Ok(d) if d == head_dim as u64 => {}
            Ok(d) => {
                return Err(ModelError::Unsupported(format!(
                    "rotary embedding over {d} of each head's {head_dim} dimensions: \
                     cleave-llm rotates whole heads"
                )));
            }
            Err(e) => return Err(e.into()),
        }
        let float = |key: &str, default: f64| match gguf.get_f64(key) {
            Ok(v) => Ok(v as f32),
            Err(GgufError::MissingKey { .. }) => Ok(default as f32),
            Err(e) => Err(ModelError::from(e)),
        };
        // A worker's shard file has no embedding; it carries the size instead.
        let vocab = match gguf.tensor("token_embd.weight") {
            Ok(info) => info
                .dims
                .get(1)
                .and_then(|&v| usize::try_from(v).ok())
                .unwrap_or(0),
            Err(GgufError::NoTensor(_)) => size("llama.vocab_size")?,
            Err(e) => return Err(e.into()),
        };
        Ok(Self {
            layers,
            hidden,
            ffn: size("llama.feed_forward_length")?,
            heads,
            kv_heads,
            head_dim,
            vocab,
            context: size("llama.context_length")?,
            norm_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
            rope_base: float("llama.rope.freq_base", 10_000.0)?,
        })
    }

    /// Width of the keys (and values) of one position.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// Where the layers' weights are.
#[derive(Debug)]
enum Layers {
    /// All in memory.
    Resident(Vec<Layer>),
    /// On disk, a window of them in memory at a time.
    Streamed(Box<LayerStream>),
}

/// One transformer block's weights.
#[derive(Debug)]
pub(crate) struct Layer {
    attn_norm: Vec<f32>,
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    pub(crate) wo: QMatrix,
    ffn_norm: Vec<f32>,
    gate: QMatrix,
    up: QMatrix,
    down: QMatrix,
}

/// A loaded model, or one node's shard of it: its heads and FFN slice of every layer.
#[derive(Debug)]
pub struct Model {
    config: Config,
    /// What this model computes of each layer (everything, unless it is a shard).
    shard: NodeShard,
    /// `None` on a worker: only the master turns tokens into vectors and back.
    head: Option<Head>,
    layers: Layers,
}

/// The parts of a model outside its layers: the token embedding, the final norm and the
/// output head. The master keeps them, so the prompt and the answer never leave it.
#[derive(Debug, Clone)]
struct Head {
    embedding: QMatrix,
    output_norm: Vec<f32>,
    /// `None`: tied to the embedding.
    output: Option<QMatrix>,
}

impl Head {
    /// The head of `gguf`, or `None` if it has no embedding (a worker's shard file).
    fn load(gguf: &Gguf, c: &Config) -> Result<Option<Self>, ModelError> {
        match gguf.tensor("token_embd.weight") {
            Ok(_) => {}
            Err(GgufError::NoTensor(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let output = match gguf.tensor("output.weight") {
            Ok(_) => Some(load_matrix(gguf, "output.weight", c.vocab, c.hidden)?),
            Err(GgufError::NoTensor(_)) => None,
            Err(e) => return Err(e.into()),
        };
        Ok(Some(Self {
            embedding: load_matrix(gguf, "token_embd.weight", c.vocab, c.hidden)?,
            output_norm: load_vector(gguf, "output_norm.weight", c.hidden)?,
            output,
        }))
    }

    fn size_bytes(&self) -> usize {
        self.embedding.size_bytes()
            + self.output.as_ref().map_or(0, QMatrix::size_bytes)
            + 4 * self.output_norm.len()
    }
}

/// The metadata keys of a shard file: which part of every layer it holds, as
/// `[start, end)` pairs of query heads, KV heads and FFN dimensions.
pub const SHARD_KEYS: [&str; 3] = [
    "cleave.shard.heads",
    "cleave.shard.kv_heads",
    "cleave.shard.ffn",
];

/// What part of each layer `gguf` holds: all of it, or the shard its `cleave.shard.*` keys
/// name (a file the master wrote for a worker).
///
/// # Errors
///
/// [`ModelError::Unsupported`] for shard keys that are malformed or outside the model.
pub fn stored_shard(gguf: &Gguf, c: &Config) -> Result<NodeShard, ModelError> {
    let full = NodeShard {
        heads: 0..c.heads,
        kv_heads: 0..c.kv_heads,
        ffn: 0..c.ffn,
    };
    if gguf.get(SHARD_KEYS[0]).is_err() {
        return Ok(full);
    }
    let range = |key: &str, most: usize| -> Result<std::ops::Range<usize>, ModelError> {
        let bad =
            || ModelError::Unsupported(format!("{key}: not a [start, end) pair within 0..{most}"));
        let items = gguf.get_array(key)?;
        let [start, end] = items else {
            return Err(bad());
        };
        let as_usize = |v: &crate::gguf::Value| v.as_u64().and_then(|v| usize::try_from(v).ok());
        match (as_usize(start), as_usize(end)) {
            (Some(start), Some(end)) if start < end && end <= most => Ok(start..end),
            _ => Err(bad()),
        }
    };
    let shard = NodeShard {
        heads: range(SHARD_KEYS[0], c.heads)?,
        kv_heads: range(SHARD_KEYS[1], c.kv_heads)?,
        ffn: range(SHARD_KEYS[2], c.ffn)?,
    };
    let group = c.heads / c.kv_heads;
    if shard.kv_heads != (shard.heads.start / group..shard.heads.end.div_ceil(group)) {
        return Err(ModelError::Unsupported(format!(
            "the shard's KV heads {:?} are not the ones its query heads {:?} read",
            shard.kv_heads, shard.heads
        )));
    }
    Ok(shard)
}

impl Model {
    /// Loads every weight of a llama-architecture file into memory (of a shard file: the
    /// shard it holds, without an embedding or output head).
    ///
    /// # Errors
    ///
    /// [`ModelError`].
    pub fn load(gguf: &Gguf) -> Result<Self, ModelError> {
        Self::load_part(gguf, None)
    }

    /// Loads the part of a whole model's file that `shard` computes, with the embedding and
    /// output head, one layer at a time (so that the whole model is never in memory): the
    /// master's share of a cluster. `None` loads what the file holds.
    ///
    /// # Errors
    ///
    /// As [`Model::load`]; as [`Model::select`] for a shard this file cannot give.
    pub fn load_part(gguf: &Gguf, shard: Option<&NodeShard>) -> Result<Self, ModelError> {
        let config = Config::from_gguf(gguf)?;
        let c = &config;
        let stored = stored_shard(gguf, c)?;
        let first = load_layer(gguf, c, &stored, 0)?;
        let compute = match shard {
            Some(shard) if *shard != stored => {
                check_selectable(c, &stored, first.wo.ty(), shard)?;
                shard.clone()
            }
            _ => stored.clone(),
        };
        let part = |layer: Layer| {
            if compute == stored {
                layer
            } else {
                layer.select(&compute, c.head_dim)
            }
        };
        let mut layers = vec![part(first)];
        for i in 1..c.layers {
            layers.push(part(load_layer(gguf, c, &stored, i)?));
        }
        Ok(Self {
            shard: compute,
            head: Head::load(gguf, c)?,
            layers: Layers::Resident(layers),
            config,
        })
    }

    /// Like [`Model::load`], but the layers stay on disk: at most `window` of them (at
    /// least 1) are in memory at once, the next read and prepared on a background thread
    /// while the current one computes (TPI-LLM's sliding-window weight scheduler). With
    /// `shard`, only that part of each layer is kept. The embedding, final norm and output
    /// head stay resident.
    ///
    /// # Errors
    ///
    /// As [`Model::load`]; a layer that fails to load later fails the step that needed it.
    pub fn load_windowed(
        gguf: Arc<Gguf>,
        window: usize,
        shard: Option<NodeShard>,
    ) -> Result<Self, ModelError> {
        let config = Config::from_gguf(&gguf)?;
        let c = &config;
        let stored = stored_shard(&gguf, c)?;
        // The first layer now, so that a file that cannot be run fails here, not mid-step.
        load_layer(&gguf, c, &stored, 0)?;
        let head = Head::load(&gguf, c)?;
        let stream =
            LayerStream::start(gguf, config.clone(), stored.clone(), stored.clone(), window);
        let model = Self {
            shard: stored,
            head,
            layers: Layers::Streamed(Box::new(stream)),
            config,
        };
        match shard {
            Some(shard) if shard != model.shard => model.select(&shard),
            _ => Ok(model),
        }
    }

    /// The hyperparameters.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Bytes of weights held in memory (for a windowed model: the resident parts and a
    /// full window of layers).
    pub fn weight_bytes(&self) -> usize {
        let layers = match &self.layers {
            Layers::Resident(layers) => layers.iter().map(Layer::size_bytes).sum::<usize>(),
            Layers::Streamed(stream) => stream.window_bytes(),
        };
        self.head.as_ref().map_or(0, Head::size_bytes) + layers
    }

    /// What this model computes of each layer.
    pub fn shard(&self) -> &NodeShard {
        &self.shard
    }

    /// The part of this model that `shard` computes: its rows of Wq, Wk, Wv, Wgate and
    /// Wup and its columns of Wo and Wdown, with the norms (every node applies them to the
    /// replicated residual stream). The embedding and output head come along (the master
    /// needs them; a worker gets a shard file without them, see [`crate::shard_file`]).
    ///
    /// # Errors
    ///
    /// [`ModelError::Unsupported`] if this model is already a shard, if `shard` is not
    /// within it (a plan made for another model), or if its head boundaries cut the
    /// 32-value blocks of a quantized Wo (a head width that is not a multiple of 32).
    pub fn select(&self, shard: &NodeShard) -> Result<Self, ModelError> {
        let c = &self.config;
        let wo = match &self.layers {
            Layers::Resident(layers) => layers.first().map_or(GgmlType::F32, |l| l.wo.ty()),
            Layers::Streamed(stream) => stream.wo_type(),
        };
        check_selectable(c, &self.shard, wo, shard)?;
        let layers = match &self.layers {
            Layers::Resident(layers) => Layers::Resident(
                layers
                    .iter()
                    .map(|l| l.select(shard, self.config.head_dim))
                    .collect(),
            ),
            Layers::Streamed(stream) => Layers::Streamed(Box::new(stream.restart(shard.clone()))),
        };
        Ok(Self {
            config: self.config.clone(),
            shard: shard.clone(),
            head: self.head.clone(),
            layers,
        })
    }

    /// Whether this model has the embedding and output head (the master's part; a
    /// worker's shard file has neither).
    pub fn has_head(&self) -> bool {
        self.head.is_some()
    }

    /// An empty cache for this model (or shard) of up to `capacity` tokens.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(self, capacity)
    }

    /// Runs `token` at the next position of `cache` on this node alone; returns the logits
    /// of the token after.
    ///
    /// # Errors
    ///
    /// [`ModelError::Unsupported`] for a token outside the vocabulary or a full cache.
    pub fn forward(&self, token: u32, cache: &mut KvCache) -> Result<Vec<f32>, ModelError> {
        let mut x = self.embed(token)?;
        self.layers_forward(&mut x, cache, &mut |_| Ok(()))?;
        self.logits(&x)
    }

    /// The embedding of `token`: the residual stream a step starts from.
    ///
    /// # Errors
    ///
    /// [`ModelError::Unsupported`] for a token outside the vocabulary, or on a worker
    /// (no embedding).
    pub fn embed(&self, token: u32) -> Result<Vec<f32>, ModelError> {
        let head = self.head()?;
        let token = token as usize;
        if token >= self.config.vocab {
            return Err(ModelError::Unsupported(format!(
                "token {token} is outside the vocabulary of {}",
                self.config.vocab
            )));
        }
        let mut x = Vec::with_capacity(self.config.hidden);
        head.embedding.row_into(token, &mut x);
        Ok(x)
    }

    /// Every layer on the residual stream `x` at the next position of `cache`. After this
    /// node's part of the attention and again after its part of the FFN, `all_reduce` must
    /// replace the partial output it is given by the sum of every node's (a single node
    /// passes it through): two all-reduces per layer.
    ///
    /// # Errors
    ///
    /// A full cache; whatever `all_reduce` returns.
    pub fn layers_forward(
        &self,
        x: &mut [f32],
        cache: &mut KvCache,
        all_reduce: &mut dyn FnMut(&mut [f64]) -> Result<(), ModelError>,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let pos = cache.len;
        if pos >= cache.capacity {
            return Err(ModelError::Unsupported(format!(
                "the sequence is full ({} tokens)",
                cache.capacity
            )));
        }
        let s = &mut cache.scratch;
        for l in 0..c.layers {
            let streamed;
            let layer = match &self.layers {
                Layers::Resident(layers) => &layers[l],
                Layers::Streamed(stream) => {
                    streamed = stream.next(l)?;
                    &streamed
                }
            };
            rms_norm(x, &layer.attn_norm, c.norm_eps, &mut s.normed);
            layer.wq.matvec(&s.normed, &mut s.q);
            layer.wk.matvec(&s.normed, &mut s.k);
            layer.wv.matvec(&s.normed, &mut s.v);
            rope(&mut s.q, c.head_dim, pos, c.rope_base);
            rope(&mut s.k, c.head_dim, pos, c.rope_base);
            let (keys, values) = (&mut cache.keys[l], &mut cache.values[l]);
            // A step that failed part-way left its keys in the layers before the failure.
            keys.truncate(pos * s.k.len());
            values.truncate(pos * s.v.len());
            keys.extend_from_slice(&s.k);
            values.extend_from_slice(&s.v);
            attention(
                c,
                &self.shard,
                &s.q,
                keys,
                values,
                pos + 1,
                &mut s.scores,
                &mut s.attn,
            );
            layer.wo.matvec_exact(&s.attn, &mut s.proj);
            all_reduce(&mut s.proj)?;
            add_exact(x, &s.proj);
            rms_norm(x, &layer.ffn_norm, c.norm_eps, &mut s.normed);
            layer.gate.matvec(&s.normed, &mut s.gate);
            layer.up.matvec(&s.normed, &mut s.up);
            for (g, u) in s.gate.iter_mut().zip(&s.up) {
                *g = silu(*g) * u;
            }
            layer.down.matvec_exact(&s.gate, &mut s.proj);
            all_reduce(&mut s.proj)?;
            add_exact(x, &s.proj);
        }
        cache.len += 1;
        Ok(())
    }

    /// The logits of the token after the residual stream `x` (the final norm and the
    /// output head).
    ///
    /// # Errors
    ///
    /// [`ModelError::Unsupported`] on a worker (no output head).
    pub fn logits(&self, x: &[f32]) -> Result<Vec<f32>, ModelError> {
        let head = self.head()?;
        let mut normed = vec![0.0; self.config.hidden];
        rms_norm(x, &head.output_norm, self.config.norm_eps, &mut normed);
        let mut logits = vec![0.0; self.config.vocab];
        head.output
            .as_ref()
            .unwrap_or(&head.embedding)
            .matvec(&normed, &mut logits);
        Ok(logits)
    }

    fn head(&self) -> Result<&Head, ModelError> {
        self.head.as_ref().ok_or_else(|| {
            ModelError::Unsupported(
                "this node holds no embedding or output head (a worker's shard)".into(),
            )
        })
    }
}

impl Layer {
    /// The part of this layer that `shard` computes.
    pub(crate) fn select(&self, shard: &NodeShard, head_dim: usize) -> Self {
        let q = shard.heads.start * head_dim..shard.heads.end * head_dim;
        let kv = shard.kv_heads.start * head_dim..shard.kv_heads.end * head_dim;
        Self {
            attn_norm: self.attn_norm.clone(),
            wq: self.wq.select_rows(q.clone()),
            wk: self.wk.select_rows(kv.clone()),
            wv: self.wv.select_rows(kv),
            wo: self.wo.select_cols(q),
            ffn_norm: self.ffn_norm.clone(),
            gate: self.gate.select_rows(shard.ffn.clone()),
            up: self.up.select_rows(shard.ffn.clone()),
            down: self.down.select_cols(shard.ffn.clone()),
        }
    }

    /// Bytes held.
    pub(crate) fn size_bytes(&self) -> usize {
        [
            &self.wq, &self.wk, &self.wv, &self.wo, &self.gate, &self.up, &self.down,
        ]
        .iter()
        .map(|m| m.size_bytes())
        .sum::<usize>()
            + 4 * (self.attn_norm.len() + self.ffn_norm.len())
    }
}

/// Layer `i` of a llama-architecture file: the part `stored` that the file holds (all of
/// it, or a shard file's part).
pub(crate) fn load_layer(
    gguf: &Gguf,
    c: &Config,
    stored: &NodeShard,
    i: usize,
) -> Result<Layer, ModelError> {
    let matrix = |name: &str, rows: usize, cols: usize| load_matrix(gguf, name, rows, cols);
    let vector = |name: &str, len: usize| load_vector(gguf, name, len);
    let p = format!("blk.{i}");
    let q = stored.heads.len() * c.head_dim;
    let kv = stored.kv_heads.len() * c.head_dim;
    let ffn = stored.ffn.len();
    Ok(Layer {
        attn_norm: vector(&format!("{p}.attn_norm.weight"), c.hidden)?,
        wq: matrix(&format!("{p}.attn_q.weight"), q, c.hidden)?,
        wk: matrix(&format!("{p}.attn_k.weight"), kv, c.hidden)?,
        wv: matrix(&format!("{p}.attn_v.weight"), kv, c.hidden)?,
        wo: matrix(&format!("{p}.attn_output.weight"), c.hidden, q)?,
        ffn_norm: vector(&format!("{p}.ffn_norm.weight"), c.hidden)?,
        gate: matrix(&format!("{p}.ffn_gate.weight"), ffn, c.hidden)?,
        up: matrix(&format!("{p}.ffn_up.weight"), ffn, c.hidden)?,
        down: matrix(&format!("{p}.ffn_down.weight"), c.hidden, ffn)?,
    })
}

/// Whether `shard` can be cut from a model holding `stored` whose Wo is of type `wo`.
fn check_selectable(
    c: &Config,
    stored: &NodeShard,
    wo: GgmlType,
    shard: &NodeShard,
) -> Result<(), ModelError> {
    let whole = stored.heads == (0..c.heads) && stored.ffn == (0..c.ffn);
    let q = shard.heads.start * c.head_dim..shard.heads.end * c.head_dim;
    let problem = if !whole {
        Some("this model is already a shard".to_string())
    } else if shard.heads.end > c.heads
        || shard.kv_heads.end > c.kv_heads
        || shard.ffn.end > c.ffn
        || shard.heads.is_empty()
        || !shard.ffn.start.is_multiple_of(crate::quant::BLOCK)
        || !shard.ffn.end.is_multiple_of(crate::quant::BLOCK)
    {
        Some(format!("the shard {shard:?} is not a shard of this model"))
    } else if wo.block_values() > 1
        && !(q.start.is_multiple_of(crate::quant::BLOCK)
            && q.end.is_multiple_of(crate::quant::BLOCK))
    {
        Some(format!(
            "heads of {} values cut the 32-value blocks of the quantized Wo: this model \
             cannot be split between these heads",
            c.head_dim
        ))
    } else {
        None
    };
    problem.map_or(Ok(()), |problem| Err(ModelError::Unsupported(problem)))
}

fn load_matrix(gguf: &Gguf, name: &str, rows: usize, cols: usize) -> Result<QMatrix, ModelError> {
    let info = gguf.tensor(name)?;
    let shape = [cols as u64, rows as u64];
    if info.dims != shape {
        return Err(ModelError::Shape {
            name: name.into(),
            reason: format!("dimensions {:?}, expected {shape:?}", info.dims),
        });
    }
    let ty = info.ggml_type()?;
    let bytes = gguf.read_bytes(info)?;
    QMatrix::new(ty, rows, cols, bytes).map_err(|e: ShapeMismatch| ModelError::Shape {
        name: name.into(),
        reason: e.to_string(),
    })
}

fn load_vector(gguf: &Gguf, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let values = gguf.read_f32(name)?;
    if values.len() != len {
        return Err(ModelError::Shape {
            name: name.into(),
            reason: format!("{} values, expected {len}", values.len()),
        });
    }
    Ok(values)
}

/// What one sequence accumulates: every layer's keys and values so far, and scratch space.
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
    capacity: usize,
    scratch: Scratch,
}

impl KvCache {
    /// An empty cache for `model` (or a shard: its KV heads only) of up to `capacity`
    /// tokens (at most the model's context).
    pub fn new(model: &Model, capacity: usize) -> Self {
        let c = &model.config;
        let capacity = capacity.min(c.context);
        let kv_dim = model.shard.kv_heads.len() * c.head_dim;
        // Not `vec![v; n]`: its clones would not keep the capacity.
        let per_layer = || {
            (0..c.layers)
                .map(|_| Vec::with_capacity(capacity * kv_dim))
                .collect()
        };
        Self {
            keys: per_layer(),
            values: per_layer(),
            len: 0,
            capacity,
            scratch: Scratch::new(c, &model.shard),
        }
    }

    /// Tokens run so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token has run yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most tokens this cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Empties the cache for a new sequence, keeping its memory.
    pub fn clear(&mut self) {
        self.len = 0;
        for layer in self.keys.iter_mut().chain(&mut self.values) {
            layer.clear();
        }
    }
}

/// Buffers reused across tokens.
#[derive(Debug)]
struct Scratch {
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    /// The output of Wo or Wdown: exact sums (see [`QMatrix::matvec_exact`]).
    proj: Vec<f64>,
    gate: Vec<f32>,
    up: Vec<f32>,
    scores: Vec<f32>,
}

impl Scratch {
    fn new(c: &Config, shard: &NodeShard) -> Self {
        let q = shard.heads.len() * c.head_dim;
        let kv = shard.kv_heads.len() * c.head_dim;
        Self {
            normed: vec![0.0; c.hidden],
            q: vec![0.0; q],
            k: vec![0.0; kv],
            v: vec![0.0; kv],
            attn: vec![0.0; q],
            proj: vec![0.0; c.hidden],
            gate: vec![0.0; shard.ffn.len()],
            up: vec![0.0; shard.ffn.len()],
            scores: Vec::new(),
        }
    }
}

/// `out = x / rms(x) ⊙ weight`.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// Rotates each head's adjacent pairs (2i, 2i+1) by `pos · base^(−2i/head_dim)`.
fn rope(x: &mut [f32], head_dim: usize, pos: usize, base: f32) {
    for head in x.chunks_exact_mut(head_dim) {
        for (i, pair) in head.chunks_exact_mut(2).enumerate() {
            let theta = pos as f32 * base.powf(-2.0 * i as f32 / head_dim as f32);
            let (sin, cos) = theta.sin_cos();
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * cos - b * sin;
            pair[1] = a * sin + b * cos;
        }
    }
}

/// Causal grouped attention of one query position over `len` cached positions, for the
/// query heads of `shard` (`q` and `out` hold those; the cache holds its KV heads).
#[allow(clippy::too_many_arguments)]
fn attention(
    c: &Config,
    shard: &NodeShard,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    len: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = c.head_dim;
    let kv_dim = shard.kv_heads.len() * hd;
    let group = c.heads / c.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    for h in 0..shard.heads.len() {
        let kv = ((shard.heads.start + h) / group - shard.kv_heads.start) * hd;
        let qh = &q[h * hd..(h + 1) * hd];
        scores.clear();
        scores.extend((0..len).map(|t| {
            let k = &keys[t * kv_dim + kv..t * kv_dim + kv + hd];
            crate::matmul::dot(qh, k) * scale
        }));
        softmax(scores);
        let oh = &mut out[h * hd..(h + 1) * hd];
        oh.fill(0.0);
        for (t, &p) in scores.iter().enumerate() {
            let v = &values[t * kv_dim + kv..t * kv_dim + kv + hd];
            for (o, x) in oh.iter_mut().zip(v) {
                *o += p * x;
            }
        }
    }
}

fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        total += *v;
    }
    for v in x.iter_mut() {
        *v /= total;
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `x += y`, the exact sum rounded to f32 once.
fn add_exact(x: &mut [f32], y: &[f64]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b as f32;
    }
}

/// The index of the largest logit (greedy decoding; the first of equals).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    u32::try_from(best).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
