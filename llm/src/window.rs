//! The sliding weight window: layers read from disk while others compute, a few at a time.
//!
//! TPI-LLM's memory scheduler keeps at most W layer blocks of weights resident: a daemon
//! thread loads the next block while the current one computes and frees each once used, so
//! a node can serve a model larger than its memory, at the price of reading every layer
//! once per token (from the page cache when it fits there, from disk when it does not).
//!
//! Here a loader thread reads and prepares layers (`Layer` for this node's shard) in the
//! order a step uses them, 0, 1, …, L−1, 0, 1, …, into a bounded channel. The compute takes
//! each in turn and drops it when the layer is done. In memory at once: the layer computing,
//! the ones queued, and the one the loader has ready to hand over; the channel holds W − 2 so
//! that this is W. With W = 1 there is no loader: each layer is read when it is needed.
//!
//! A step that fails half-way leaves the loader ahead of where the next step starts; the
//! next step skips layers until the one it needs comes round again.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use crate::gguf::Gguf;
use crate::model::{Config, Layer, ModelError, load_layer};
use crate::quant::GgmlType;
use crate::shard::NodeShard;

/// A loaded layer (or why it could not be), with its index.
type Loaded = (usize, Result<Layer, ModelError>);

/// Layers coming from disk, in step order.
#[derive(Debug)]
pub(crate) struct LayerStream {
    gguf: Arc<Gguf>,
    config: Config,
    /// What the file holds of each layer.
    stored: NodeShard,
    /// What this node computes of it (`stored`, or a part of a whole model's layers).
    shard: NodeShard,
    window: usize,
    /// `None` for a window of 1: read on demand.
    loaded: Option<Mutex<Receiver<Loaded>>>,
    /// Bytes of the largest layer, for reporting.
    layer_bytes: usize,
    /// The type of Wo (whether a shard's head boundaries must fall on blocks).
    wo_type: GgmlType,
}

impl LayerStream {
    /// Starts streaming the `shard` of each layer of `gguf` (which holds `stored` of each),
    /// `window` (at least 1) at once.
    pub(crate) fn start(
        gguf: Arc<Gguf>,
        config: Config,
        stored: NodeShard,
        shard: NodeShard,
        window: usize,
    ) -> Self {
        let window = window.max(1);
        let first = load_layer(&gguf, &config, &stored, 0).ok();
        let wo_type = first.as_ref().map_or(GgmlType::F32, |l| l.wo.ty());
        let layer_bytes = first.map_or(0, |l| part(l, &config, &stored, &shard).size_bytes());
        let loaded = (window >= 2).then(|| {
            let (tx, rx) = sync_channel(window - 2);
            let (gguf, config) = (gguf.clone(), config.clone());
            let (stored, shard) = (stored.clone(), shard.clone());
            std::thread::Builder::new()
                .name("cleave-llm-weights".into())
                .spawn(move || load_forever(&gguf, &config, &stored, &shard, &tx))
                .map(|_| Mutex::new(rx))
        });
        Self {
            gguf,
            config,
            stored,
            shard,
            window,
            // A loader thread that could not start: read on demand instead.
            loaded: loaded.and_then(Result::ok),
            layer_bytes,
            wo_type,
        }
    }

    /// The same stream for another shard (its own loader thread).
    pub(crate) fn restart(&self, shard: NodeShard) -> Self {
        Self::start(
            self.gguf.clone(),
            self.config.clone(),
            self.stored.clone(),
            shard,
            self.window,
        )
    }

    /// Layer `index`, which must be the one after the last taken (or 0 to begin a step).
    pub(crate) fn next(&self, index: usize) -> Result<Layer, ModelError> {
        let Some(loaded) = &self.loaded else {
            return self.read(index);
        };
        let loaded = loaded
            .lock()
            .map_err(|_| ModelError::Unsupported("the weight loader's queue is poisoned".into()))?;
        // At most one lap to come round to `index` (after a step that failed half-way).
        for _ in 0..=self.config.layers {
            let (got, layer) = loaded.recv().map_err(|_| {
                ModelError::Unsupported("the weight loader thread has stopped".into())
            })?;
            if got == index {
                return layer;
            }
        }
        Err(ModelError::Unsupported(format!(
            "the weight loader never produced layer {index}"
        )))
    }

    fn read(&self, index: usize) -> Result<Layer, ModelError> {
        load_layer(&self.gguf, &self.config, &self.stored, index)
            .map(|l| part(l, &self.config, &self.stored, &self.shard))
    }

    /// The type of Wo.
    pub(crate) fn wo_type(&self) -> GgmlType {
        self.wo_type
    }

    /// Bytes of a full window of layers.
    pub(crate) fn window_bytes(&self) -> usize {
        self.window * self.layer_bytes
    }
}

/// The loader thread: every layer in step order, for ever, until the stream is dropped.
fn load_forever(
    gguf: &Gguf,
    config: &Config,
    stored: &NodeShard,
    shard: &NodeShard,
    out: &SyncSender<Loaded>,
) {
    for index in (0..config.layers).cycle() {
        let layer = load_layer(gguf, config, stored, index).map(|l| part(l, config, stored, shard));
        if out.send((index, layer)).is_err() {
            return;
        }
    }
}

/// The `shard` part of a `layer` read from a file holding `stored` of it.
fn part(layer: Layer, config: &Config, stored: &NodeShard, shard: &NodeShard) -> Layer {
    if shard == stored {
        layer
    } else {
        layer.select(shard, config.head_dim)
    }
}
