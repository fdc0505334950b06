//! A request stream answered in order, with a bounded window, that ends on drain.
//!
//! Both streaming protocols (`cleave.v1.Split/Stream`, KServe's `ModelStreamInfer`) read
//! requests, run several at once, and send the answers back in request order. They share
//! this one stream type.
//!
//! The answers are produced by the very task that sends them: each request's future lives
//! in a [`FuturesOrdered`] polled from the response stream, so a finished model run wakes
//! the connection's task directly. A task spawned per request plus an ordering task cost
//! two more cross-thread wakes per frame, which on a small CPU server measured as a
//! noticeable share of a 4 ms model run (`docs/tail-load.md`).
//!
//! - **Window**: at most `window` requests are in flight. A client that does not read its
//!   answers is not read from either (the transport stops polling this stream), so all it
//!   holds of the server is its window.
//! - **Drain**: once the server drains, not one more request is read; the ones in flight are
//!   answered, then the stream ends with the given `UNAVAILABLE` status so the client sends
//!   the rest elsewhere, and an idle stream never holds a shutdown up.
//! - **Transport errors**: a request that fails to arrive (bad message, size limit) ends
//!   the stream with its status after the answers in flight.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::stream::FuturesOrdered;
use tokio_stream::Stream;
use tonic::Status;

use crate::Draining;

type Answer<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Requests<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Answers a stream of requests in order; see the module docs.
pub(crate) struct OrderedAnswers<In, Out> {
    /// `None` once reading has stopped (end of input, transport error, drain).
    requests: Option<Requests<In>>,
    answer: Box<dyn FnMut(In) -> Answer<Out> + Send>,
    in_flight: FuturesOrdered<Answer<Out>>,
    window: usize,
    drain: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    on_drain: Option<Status>,
    /// The status the stream ends with once the answers in flight are out.
    ending: Option<Status>,
}

impl<In, Out> OrderedAnswers<In, Out>
where
    In: Send + 'static,
    Out: Send + 'static,
{
    /// Answers each of `requests` with `answer`, up to `window` at once (at least one);
    /// ends with `on_drain` after a drain has begun.
    pub(crate) fn new<S, F, Fut>(
        requests: S,
        window: usize,
        mut draining: Draining,
        on_drain: Status,
        mut answer: F,
    ) -> Self
    where
        S: Stream<Item = Result<In, Status>> + Send + 'static,
        F: FnMut(In) -> Fut + Send + 'static,
        Fut: Future<Output = Out> + Send + 'static,
    {
        Self {
            requests: Some(Box::pin(requests)),
            answer: Box::new(move |request| Box::pin(answer(request))),
            in_flight: FuturesOrdered::new(),
            window: window.max(1),
            drain: Some(Box::pin(async move { draining.started().await })),
            on_drain: Some(on_drain),
            ending: None,
        }
    }

    /// Reads requests while the window has room; registers for wake-ups on both the drain
    /// and the request stream.
    fn read(&mut self, cx: &mut Context<'_>) {
        while self.in_flight.len() < self.window {
            let Some(requests) = self.requests.as_mut() else {
                return;
            };
            // Drain first: once it has begun, not one more request is read.
            if let Some(drain) = self.drain.as_mut()
                && drain.as_mut().poll(cx).is_ready()
            {
                self.requests = None;
                self.drain = None;
                self.ending = self.on_drain.take();
                return;
            }
            match requests.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(request))) => {
                    let answer = (self.answer)(request);
                    self.in_flight.push_back(answer);
                }
                Poll::Ready(Some(Err(status))) => {
                    self.requests = None;
                    self.ending = Some(status);
                }
                Poll::Ready(None) => self.requests = None,
                Poll::Pending => return,
            }
        }
    }
}

impl<In, Out> Stream for OrderedAnswers<In, Out>
where
    In: Send + 'static,
    Out: Send + 'static,
{
    type Item = Result<Out, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Every field is Unpin (boxed futures and streams), so the struct is too.
        let this = self.get_mut();
        this.read(cx);
        match Pin::new(&mut this.in_flight).poll_next(cx) {
            Poll::Ready(Some(out)) => {
                // The window has room again: read on, so the next request starts while
                // this answer is being sent.
                this.read(cx);
                Poll::Ready(Some(Ok(out)))
            }
            Poll::Ready(None) if this.requests.is_none() => {
                Poll::Ready(this.ending.take().map(Err))
            }
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio_stream::StreamExt;

    use super::*;

    type Sender = tokio::sync::mpsc::Sender<Result<u32, Status>>;
    type Receiver = tokio_stream::wrappers::ReceiverStream<Result<u32, Status>>;

    fn requests(n: u32) -> (Sender, Receiver) {
        let (tx, rx) = tokio::sync::mpsc::channel(n as usize + 1);
        (tx, tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    #[tokio::test]
    async fn answers_in_request_order_though_they_finish_out_of_order() {
        let (tx, rx) = requests(8);
        for i in 0..8 {
            tx.send(Ok(i)).await.unwrap();
        }
        drop(tx);
        let (_drain, draining) = Draining::channel();
        let answers =
            OrderedAnswers::new(rx, 4, draining, Status::unavailable("x"), |i| async move {
                // Later requests finish first.
                tokio::time::sleep(Duration::from_millis(u64::from(8 - i) * 3)).await;
                i * 10
            });
        let got: Vec<u32> = answers.map(|r| r.unwrap()).collect().await;
        assert_eq!(got, (0..8).map(|i| i * 10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn never_runs_more_than_the_window_at_once() {
        let (tx, rx) = requests(20);
        for i in 0..20 {
            tx.send(Ok(i)).await.unwrap();
        }
        drop(tx);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (_drain, draining) = Draining::channel();
        let (r, m) = (running.clone(), most.clone());
        let answers = OrderedAnswers::new(rx, 3, draining, Status::unavailable("x"), move |i| {
            let (running, most) = (r.clone(), m.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                i
            }
        });
        let got: Vec<u32> = answers.map(|r| r.unwrap()).collect().await;
        assert_eq!(got.len(), 20);
        assert_eq!(
            most.load(Ordering::SeqCst),
            3,
            "the window bounds the requests in flight"
        );
    }

    #[tokio::test]
    async fn a_drain_answers_what_is_in_flight_then_ends_with_its_status() {
        let (tx, rx) = requests(8);
        tx.send(Ok(1)).await.unwrap();
        tx.send(Ok(2)).await.unwrap();
        let (drain, draining) = Draining::channel();
        let (release, released) = tokio::sync::watch::channel(false);
        let mut answers =
            OrderedAnswers::new(rx, 4, draining, Status::unavailable("draining"), move |i| {
                let mut released = released.clone();
                async move {
                    let _ = released.wait_for(|r| *r).await;
                    i
                }
            });
        // Both requests are read and in flight; nothing is answered yet.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), answers.next())
                .await
                .is_err()
        );
        drain.send(true).unwrap();
        // Sent after the drain began: never read.
        tx.send(Ok(3)).await.unwrap();
        release.send(true).unwrap();
        assert_eq!(answers.next().await.unwrap().unwrap(), 1);
        assert_eq!(answers.next().await.unwrap().unwrap(), 2);
        let end = answers.next().await.unwrap().unwrap_err();
        assert_eq!(end.code(), tonic::Code::Unavailable);
        assert!(answers.next().await.is_none());
    }

    #[tokio::test]
    async fn a_transport_error_ends_the_stream_after_the_answers_before_it() {
        let (tx, rx) = requests(4);
        tx.send(Ok(1)).await.unwrap();
        tx.send(Err(Status::out_of_range("too big"))).await.unwrap();
        tx.send(Ok(2)).await.unwrap();
        let (_drain, draining) = Draining::channel();
        let answers = OrderedAnswers::new(
            rx,
            4,
            draining,
            Status::unavailable("x"),
            |i| async move { i },
        );
        let got: Vec<Result<u32, Status>> = answers.collect().await;
        assert_eq!(got.len(), 2);
        assert_eq!(*got[0].as_ref().unwrap(), 1);
        assert_eq!(got[1].as_ref().unwrap_err().code(), tonic::Code::OutOfRange);
    }
}
