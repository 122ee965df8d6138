//! `robin node`'s command line and environment.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::config::ConfigArgs;

use crate::kube::KubeArgs;

pub const ENV_NODE_NAME: &str = "NODE_NAME";
pub const ENV_CGROUP_ROOT: &str = "ROBIN_CGROUP_ROOT";
pub const ENV_ADMIN_ADDR: &str = "ROBIN_ADMIN_ADDR";
pub const ENV_BPF_PIN_DIR: &str = "ROBIN_BPF_PIN_DIR";
pub const ENV_DRAIN_TIMEOUT: &str = "ROBIN_DRAIN_TIMEOUT";

#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// This node's name (from the downward API).
    #[arg(long, env = ENV_NODE_NAME)]
    pub node_name: String,
    /// Where the kubelet's pod cgroups live (default: the cgroup2 mount).
    #[arg(long, env = ENV_CGROUP_ROOT, value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Admin plane: /healthz, /readyz, /metrics, /debug/pods.
    #[arg(long, env = ENV_ADMIN_ADDR, default_value = "0.0.0.0:4001")]
    pub admin_addr: SocketAddr,
    /// Where maps and per-pod links are pinned (must be on the host's bpffs); what keeps pods
    /// captured, failing closed, while the agent restarts.
    #[arg(long, env = ENV_BPF_PIN_DIR, default_value = "/sys/fs/bpf/robin", value_name = "DIR")]
    pub bpf_pin_dir: PathBuf,
    /// On SIGTERM, how long connections in flight may take to finish (keep it below the pod's
    /// terminationGracePeriodSeconds), e.g. `10s`, `500ms`.
    #[arg(long, env = ENV_DRAIN_TIMEOUT, default_value = "10s", value_parser = crate::oidc_gateway::parse_duration)]
    pub drain_timeout: Duration,
}
