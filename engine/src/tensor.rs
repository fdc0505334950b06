//! A plain row-major `f32` tensor: what crosses between the engine and its callers.

/// A dense row-major `f32` tensor, batch axis first for model inputs and outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Axis lengths, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

impl Tensor {
    /// A tensor of `shape` over `data`.
    ///
    /// # Panics
    ///
    /// If `data.len()` differs from the shape's element count (a programming error: callers
    /// build both).
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "tensor shape {shape:?}"
        );
        Self { shape, data }
    }

    /// Stacks same-shaped samples along a new batch axis.
    ///
    /// # Panics
    ///
    /// If `samples` is empty or the samples differ in shape.
    pub fn stack(samples: &[&Tensor]) -> Self {
        let first = samples.first().expect("stack needs at least one sample");
        let mut shape = vec![samples.len()];
        shape.extend_from_slice(&first.shape);
        let mut data = Vec::with_capacity(first.data.len() * samples.len());
        for sample in samples {
            assert_eq!(sample.shape, first.shape, "stacked samples differ in shape");
            data.extend_from_slice(&sample.data);
        }
        Self { shape, data }
    }

    /// Size of the batch axis.
    pub fn batch(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Sample `i` along the batch axis, without the batch axis.
    pub fn sample(&self, i: usize) -> Tensor {
        let per = self.data.len() / self.batch().max(1);
        Tensor {
            shape: self.shape[1..].to_vec(),
            data: self.data[i * per..(i + 1) * per].to_vec(),
        }
    }
}
