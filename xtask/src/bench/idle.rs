//! Idle CPUs kept polling for the latency rows, through the kernel's PM QoS interface: while a
//! process holds `/dev/cpu_dma_latency` open with a value of 0, cpuidle picks no state with an
//! exit latency above 0 µs, so an idle CPU polls instead of halting (tuned's
//! `latency-performance` profile does the same, with `force_latency`).
//!
//! Why: on a virtual machine a halted vCPU is woken through the hypervisor, tens of µs per
//! wake-up on the benchmark hosts. A 1-connection request wakes a sleeping process at each hop,
//! so with halting CPUs the "added latency" of a proxy is mostly the host's wake-up cost times
//! two, and a proxy that merely kept a vCPU busy came out faster than direct
//! (`bench/README.md`). Held for every path of those rows alike.
use std::{fs::File, io::Write as _};

use anyhow::Context as _;

const PM_QOS_CPU_LATENCY: &str = "/dev/cpu_dma_latency";

/// Keeps idle CPUs polling until dropped (the kernel drops the request with the descriptor).
pub struct PollingIdle {
    _qos: File,
}

impl PollingIdle {
    pub fn hold() -> anyhow::Result<Self> {
        let mut qos = File::options()
            .write(true)
            .open(PM_QOS_CPU_LATENCY)
            .with_context(|| format!("opening {PM_QOS_CPU_LATENCY} (the latency rows need it)"))?;
        // The device takes the latency bound in µs as a binary s32.
        qos.write_all(&0i32.to_ne_bytes())
            .with_context(|| format!("writing 0 µs to {PM_QOS_CPU_LATENCY}"))?;
        Ok(Self { _qos: qos })
    }
}
