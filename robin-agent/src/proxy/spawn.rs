//! The executor hyper's h2 server and client spawn their per-stream tasks with.
//!
//! hyper spawns a task for every h2 request on each side: the server one holding the stream's
//! service future (`H2Stream`, which carries Robin's whole request future, about 3.5 KiB), the
//! client one waiting for the response (an enum sized by its largest variant, the connection
//! itself, about 2.5 KiB, where a request needs about 110 bytes). tokio moves a spawned future
//! by value on its way into the task and writes the task's stage again when it ends, so each
//! request copied several kilobytes several times: `memcpy` was 12 % of the workers' samples in
//! the HTTP/2 benchmark. Boxed first, a future is copied once, and the task holds a pointer.
use std::future::Future;

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SpawnBoxed;

impl<F> hyper::rt::Executor<F> for SpawnBoxed
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Box::pin(fut));
    }
}

#[cfg(test)]
mod tests {
    use hyper::rt::Executor as _;

    use super::*;

    #[tokio::test]
    async fn a_spawned_future_runs_to_its_end() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // As large as hyper's h2 futures: the box must hold all of it.
        let payload = [7u8; 4096];
        SpawnBoxed.execute(async move {
            tokio::task::yield_now().await;
            let _ = tx.send(payload.iter().map(|&b| u64::from(b)).sum::<u64>());
        });
        assert_eq!(rx.await.unwrap(), 7 * 4096);
    }
}
