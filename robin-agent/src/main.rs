//! The `robin` binary. Each subcommand lives in its own module of the library; this file only
//! parses the command line, sets up logging and maps errors to exit codes.
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// jemalloc, as linkerd2-proxy and TiKV use: after a connection storm glibc kept tens of MiB
/// of freed heap resident in pages that live connections still touched (bench/README.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's start-up options (read by name at its first allocation): a background thread
/// returns freed pages to the kernel about a second after they are freed, without waiting for
/// the next allocation in their arena.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

#[derive(Parser)]
#[command(
    name = "robin",
    version,
    about = "Transparent egress interception for workload identity"
)]
struct Cli {
    /// Log record format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "ROBIN_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a command in a transient cgroup whose outbound connects Robin captures.
    Exec(robin_agent::exec::ExecArgs),
    /// Capture an existing cgroup (a systemd service or slice, a VM's scope) until stopped;
    /// the capture is pinned, so its connects are refused, never direct, while robin attach is
    /// down. `--release` removes it.
    Attach(robin_agent::attach::AttachArgs),
    /// Serve the cluster's OIDC discovery document and JWKS to external brokers, fetched with
    /// this pod's ServiceAccount token (no anonymous auth needed).
    OidcGateway(robin_agent::oidc_gateway::GatewayArgs),
    /// HTTP forward proxy (CONNECT and absolute-form) for where eBPF capture cannot go: clients
    /// set HTTPS_PROXY; the gateway's own identity, or each client pod's by source address.
    Gateway(Box<robin_agent::gateway::GatewayArgs>),
    /// DaemonSet mode: capture and serve the annotated pods of this node.
    // Boxed: its flags make it several times larger than the other variants.
    Node(Box<robin_agent::node::NodeArgs>),
    /// For a pod's init container: return once robin node has captured this pod.
    Await(robin_agent::node::wait::AwaitArgs),
    /// Sidecar mode, drop-in for the original Robin: a loopback reverse proxy that sends every
    /// request to ROBIN_UPSTREAM_URL with the workload's token.
    Proxy(robin_agent::sidecar::env::ProxyArgs),
    /// Mutating admission webhook: give pods annotated robin.dev/inject their token volume,
    /// trust bundle and `robin await` init container.
    Webhook(robin_agent::webhook::WebhookArgs),
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_env("ROBIN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr: `robin exec` shares stdout with the command it runs.
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Exec(args) => robin_agent::exec::main(args),
        Command::Attach(args) => robin_agent::attach::main(args),
        Command::OidcGateway(args) => robin_agent::oidc_gateway::main(args),
        Command::Node(args) => robin_agent::node::main(*args),
        Command::Gateway(args) => robin_agent::gateway::main(*args),
        Command::Await(args) => robin_agent::node::wait::main(args),
        Command::Webhook(args) => robin_agent::webhook::main(args),
        Command::Proxy(args) => robin_agent::sidecar::main(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("robin: {e:#}");
            ExitCode::from(70)
        }
    }
}
