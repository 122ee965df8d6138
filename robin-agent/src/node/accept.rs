//! Serving one captured pod: its listener, inside the pod's network namespace, runs the shared
//! accept loop under the pod's span, and answers `robin await`'s probe itself.
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    capture::CapturedListener,
    proxy::Proxy,
    serve::{Probe, Served},
};

use super::wait;
use crate::kube::Pod;

/// `robin await` connects to this address from inside the pod: reaching the agent is the answer.
const AWAIT_PROBE: Probe = Probe {
    ip: wait::PROBE_IP,
    answer: wait::PROBE_ANSWER,
};

/// Starts serving `pod`'s listener; cancelling the returned token closes it.
pub(super) fn serve_pod(
    served: &Served,
    listener: Arc<CapturedListener>,
    proxy: watch::Receiver<Proxy>,
    pod: &Pod,
) -> CancellationToken {
    let span = tracing::info_span!("pod", pod = %pod.key());
    served.serve(listener, proxy, Some(AWAIT_PROBE), span)
}
