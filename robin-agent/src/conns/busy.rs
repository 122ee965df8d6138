//! A request keeps its connection busy — never shed at the connection cap — from its arrival
//! until its response body has ended or been dropped.
use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http::Response;
use hyper::body::{Body, Frame, SizeHint};

use super::Busy;

/// Runs `handler`, moving `busy` into the response body it yields.
pub async fn tracked<B, E>(
    busy: Busy,
    handler: impl Future<Output = Result<Response<B>, E>>,
) -> Result<Response<Tracked<B>>, E> {
    let resp = handler.await?;
    Ok(resp.map(|inner| Tracked { inner, _busy: busy }))
}

pub struct Tracked<B> {
    inner: B,
    _busy: Busy,
}

impl<B: Body + Unpin> Body for Tracked<B> {
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
