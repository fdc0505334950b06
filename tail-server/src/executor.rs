//! Runs the tail model on a dedicated thread, fed through a bounded queue.
//!
//! The async workers only decode frames and move bytes; a model run can take tens of
//! milliseconds and would stall every other stream if it ran on them. Jobs are answered
//! through a oneshot channel, so a caller that goes away costs nothing but the run.

use cleave_engine::{Model, Tensor};
use tokio::sync::{mpsc, oneshot};

use crate::TailError;

struct Job {
    input: Tensor,
    reply: oneshot::Sender<Result<Tensor, String>>,
}

/// Handle to the model thread; cheap to clone.
#[derive(Debug, Clone)]
pub struct TailExecutor {
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("shape", &self.input.shape)
            .finish()
    }
}

impl TailExecutor {
    /// Starts the model thread with a queue of `depth` jobs.
    ///
    /// # Errors
    ///
    /// [`TailError::Startup`] if the thread cannot be spawned.
    pub fn start(model: Model, depth: usize) -> Result<Self, TailError> {
        let (jobs, mut queue) = mpsc::channel::<Job>(depth.max(1));
        std::thread::Builder::new()
            .name("cleave-tail-model".into())
            .spawn(move || {
                while let Some(job) = queue.blocking_recv() {
                    let result = model.run(&job.input).map_err(|e| e.to_string());
                    // The caller may have gone; nothing to do then.
                    let _ = job.reply.send(result);
                }
            })
            .map_err(|e| TailError::Startup(format!("cannot start the model thread: {e}")))?;
        Ok(Self { jobs })
    }

    /// Runs the model on `input` (batch axis first) and waits for the result.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes drops the reply; the model may still run the
    /// job once.
    ///
    /// # Errors
    ///
    /// [`TailError::Inference`] if the model fails or its thread has stopped.
    pub async fn run(&self, input: Tensor) -> Result<Tensor, TailError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { input, reply })
            .await
            .map_err(|_| TailError::Inference("the model thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| TailError::Inference("the model thread dropped the job".into()))?
            .map_err(TailError::Inference)
    }
}
