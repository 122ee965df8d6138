//! A request keeps its connection busy — never shed at the connection cap — from its arrival
//! until its response body has ended or been dropped.
use std::{
    pin::Pin,
    task::{Context, Poll},
};

use futures_util::FutureExt as _;
use http::Response;
use hyper::body::{Body, Frame, SizeHint};

use super::Busy;

/// Runs `handler`, moving `busy` (a [`Busy`], with any other guard the request holds) into the
/// response body it yields. A combinator, not an `async fn`: hyper keeps this future for the
/// connection's life, and an `async fn` stores the future it awaits twice
/// (rust-lang/rust#62958).
pub fn tracked<B, E, G>(
    busy: G,
    handler: impl Future<Output = Result<Response<B>, E>>,
) -> impl Future<Output = Result<Response<Tracked<B, G>>, E>> {
    handler.map(move |resp| Ok(resp?.map(|inner| Tracked { inner, _busy: busy })))
}

pub struct Tracked<B, G = Busy> {
    inner: B,
    _busy: G,
}

impl<B: Body + Unpin, G: Unpin> Body for Tracked<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, future::Ready};

    use super::*;

    /// hyper keeps a request's future for its connection's life: wrapping one must add the
    /// guard, not a second copy of the future (which an `async fn` awaiting it would).
    #[test]
    fn tracking_a_request_adds_only_the_guard() {
        type Handler = Ready<Result<Response<[u8; 4096]>, Infallible>>;
        fn future_size<F: Future>(_: impl FnOnce(Busy, Handler) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let wrapped = future_size(tracked);
        let alone = std::mem::size_of::<Handler>();
        assert!(
            wrapped <= alone + 64,
            "{wrapped} bytes for a {alone}-byte future"
        );
    }
}
