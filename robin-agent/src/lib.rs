//! Robin: transparent egress interception for workload identity.
//!
//! Data path, one module per stage: [`capture`] (eBPF redirect and accept) → `proxy` (sniff,
//! intercept or splice, inject, upstream) with [`identity`] supplying tokens.
pub mod admin;
pub mod attach;
pub mod capture;
pub mod config;
pub mod conns;
pub mod exec;
pub mod gateway;
pub mod heap;
pub mod identity;
pub mod kube;
pub mod metrics;
pub mod node;
pub mod oidc_gateway;
pub mod podfs;
pub mod proxy;
pub mod secret;
pub mod serve;
pub mod sidecar;
pub mod standalone;
pub mod tls;
pub mod webhook;
pub mod workers;
