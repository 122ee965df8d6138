//! The benchmark's world: namespaces, certificates, name resolution and trust store of the
//! client namespace, the upstream nginx, the peers, and Robin's configuration. Everything is
//! torn down when the `World` drops, also when a run fails half-way.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::bail;

use super::{
    CLIENT_IP, CLIENT_NS, H1_HOST, H1_IP, MINT_SUFFIX, RULED, Settings, TOKEN, UNRULED,
    UPSTREAM_IP, UPSTREAM_NS, assets, cgroups, peers, pki,
};
use crate::status;

/// A namespace holding only a trivial HTTP server on loopback, for the capture-cost section.
pub const CAP_NS: &str = "robin-bench-cap";
/// Its twin, where an iptables REDIRECT rule sends `CAP_IP:80` to the same kind of server.
pub const CAP_NAT_NS: &str = "robin-bench-cap-nat";
pub const CAP_IP: &str = "10.254.0.9";
pub const CAP_PORT: u16 = 15001;
pub const CAP_DIRECT: &str = "127.0.0.1:15001";
/// The gRPC method the upstream answers, and the request message h2load sends to it.
pub const GRPC_PATH: &str = "/bench.Bench/Unary";
pub const GRPC_REQUEST: &str = "grpc-request.bin";

pub struct World {
    pub dir: PathBuf,
    children: Vec<Child>,
}

impl Drop for World {
    fn drop(&mut self) {
        // Each server leads its own process group (see `spawn`): SIGKILL the whole group, so
        // nginx workers and squid's helpers go with their parent. squid would linger ~30 s
        // after SIGTERM.
        for child in &mut self.children {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = cgroups::remove_all() {
            eprintln!("warning: {e:#}");
        }
        delete_namespaces();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn delete_namespaces() {
    for ns in [CLIENT_NS, UPSTREAM_NS, CAP_NS, CAP_NAT_NS] {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(Path::new("/etc/netns").join(ns));
    }
}

pub fn sh(cmd: &str) -> anyhow::Result<()> {
    status(Command::new("sh").args(["-ec", cmd]))
}

impl World {
    pub fn build(s: &Settings, tools: Option<&peers::Tools>) -> anyhow::Result<World> {
        let dir = std::env::temp_dir().join(format!("robin-bench-{}", std::process::id()));
        fs::create_dir_all(dir.join("www"))?;
        let mut world = World {
            dir,
            children: Vec::new(),
        };
        delete_namespaces();
        cgroups::reset()?;
        namespaces()?;
        pki::make(&world.dir)?;
        world.client_etc()?;
        world.content(s.large_mib)?;
        world.start_upstream()?;
        peers::start(&mut world)?;
        if let Some(tools) = tools {
            peers::start_full(&mut world, tools)?;
        }
        world.start_capture_namespaces()?;
        world.robin_configs()?;
        Ok(world)
    }

    /// Values every asset may use.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        asset_vars(&self.dir)
    }

    /// Fills `template` with `vars()` plus `extra` and writes it to `name` in the world's dir.
    pub fn write_asset(
        &self,
        name: &str,
        template: &str,
        extra: &[(&str, String)],
    ) -> anyhow::Result<PathBuf> {
        let vars = self.vars();
        let mut all: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
        let path = self.dir.join(name);
        fs::write(&path, assets::fill(template, &all)?)?;
        Ok(path)
    }

    /// Starts `program` in `ns`, in the cgroup `server` (whose CPU the report reads), as the
    /// leader of its own process group, stopped at drop.
    pub fn spawn(
        &mut self,
        ns: &str,
        server: &str,
        program: &str,
        args: &[&str],
    ) -> anyhow::Result<()> {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let child = cgroups::spawn_in(server, cmd, program, args)?;
        self.children.push(child);
        Ok(())
    }

    /// The client namespace's own /etc/hosts and trust store (`ip netns exec` mounts them).
    fn client_etc(&self) -> anyhow::Result<()> {
        let etc = Path::new("/etc/netns").join(CLIENT_NS);
        fs::create_dir_all(etc.join("ssl/certs"))?;
        fs::write(
            etc.join("hosts"),
            format!("127.0.0.1 localhost\n{UPSTREAM_IP} {RULED} {UNRULED}\n{H1_IP} {H1_HOST}\n"),
        )?;
        let mut bundle = String::new();
        for ca in ["robin-ca.crt", "upstream-ca.crt", "mitm-ca.crt"] {
            bundle.push_str(&fs::read_to_string(self.dir.join(ca))?);
        }
        fs::write(etc.join("ssl/certs/ca-certificates.crt"), bundle)?;
        Ok(())
    }

    /// The files the upstream serves and the token every proxy injects.
    fn content(&self, large_mib: u64) -> anyhow::Result<()> {
        let www = self.dir.join("www");
        fs::File::create(www.join("large"))?.set_len(large_mib << 20)?;
        fs::write(self.dir.join("token"), TOKEN)?;
        // gRPC length-prefixed messages: flag 0, 4-byte length, then a protobuf message with
        // field 1 a short string.
        let grpc = |text: &[u8]| {
            let mut msg = vec![0x0a, text.len() as u8];
            msg.extend_from_slice(text);
            let mut frame = vec![0u8];
            frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            frame.extend(msg);
            frame
        };
        let method = www.join(GRPC_PATH.trim_start_matches('/'));
        fs::create_dir_all(method.parent().expect("method has a service dir"))?;
        fs::write(method, grpc(b"ok"))?;
        fs::write(self.dir.join(GRPC_REQUEST), grpc(b"bench"))?;
        Ok(())
    }

    fn start_upstream(&mut self) -> anyhow::Result<()> {
        let conf = self.write_asset("nginx-up.conf", assets::NGINX_UPSTREAM, &[])?;
        self.spawn(
            UPSTREAM_NS,
            "upstream",
            "nginx",
            &["-c", &conf.to_string_lossy()],
        )?;
        wait_for_port(CLIENT_NS, &format!("https://{RULED}/small"))?;
        wait_for_port(CLIENT_NS, &format!("https://{H1_HOST}/small"))
    }

    /// Namespaces with nothing but a trivial HTTP server on 127.0.0.1:CAP_PORT and a local
    /// address CAP_IP: the target of the capture-cost section.
    fn start_capture_namespaces(&mut self) -> anyhow::Result<()> {
        for ns in [CAP_NS, CAP_NAT_NS] {
            sh(&format!(
                "ip netns add {ns}; ip -n {ns} link set lo up; ip -n {ns} addr add {CAP_IP}/32 dev lo"
            ))?;
            let conf = self.write_asset(
                &format!("nginx-{ns}.conf"),
                assets::NGINX_CAPTURE,
                &[("NS", ns.into()), ("LISTEN", CAP_DIRECT.into())],
            )?;
            self.spawn(ns, ns, "nginx", &["-c", &conf.to_string_lossy()])?;
            wait_for_port(ns, &format!("http://{CAP_DIRECT}/small"))?;
        }
        sh(&format!(
            "ip netns exec {CAP_NAT_NS} iptables -t nat -A OUTPUT -p tcp -d {CAP_IP} --dport 80 -j REDIRECT --to-ports {CAP_PORT}"
        ))
    }

    /// `robin.toml` for the main table, `robin-cap.toml` for the capture-cost section.
    fn robin_configs(&self) -> anyhow::Result<()> {
        for (name, listener) in [("robin.toml", 0), ("robin-cap.toml", CAP_PORT)] {
            self.write_asset(
                name,
                assets::ROBIN,
                &[("LISTENER_PORT", listener.to_string())],
            )?;
        }
        Ok(())
    }
}

/// Client and upstream namespaces joined by veth; the upstream holds a second address for its
/// HTTP/1.1-only listener. The client namespace may reuse TIME_WAIT ports for its outgoing
/// connections (`tcp_tw_reuse=1`, the usual load-generator setting), so that TIME_WAIT sockets
/// piled up by earlier runs towards the upstream's one address and port cannot slow a later
/// connection-per-request run: which path ran before must not decide a figure.
fn namespaces() -> anyhow::Result<()> {
    sh(&format!(
        "ip netns add {CLIENT_NS}; ip netns add {UPSTREAM_NS}
         ip -n {CLIENT_NS} link set lo up; ip -n {UPSTREAM_NS} link set lo up
         ip link add rbench-c netns {CLIENT_NS} type veth peer name rbench-u netns {UPSTREAM_NS}
         ip -n {CLIENT_NS} addr add {CLIENT_IP}/24 dev rbench-c; ip -n {CLIENT_NS} link set rbench-c up
         ip -n {UPSTREAM_NS} addr add {UPSTREAM_IP}/24 dev rbench-u
         ip -n {UPSTREAM_NS} addr add {H1_IP}/24 dev rbench-u; ip -n {UPSTREAM_NS} link set rbench-u up
         ip netns exec {CLIENT_NS} sysctl -qw net.ipv4.tcp_tw_reuse=1 'net.ipv4.ip_local_port_range=1024 65535'"
    ))
}

/// Values every asset may use, for a world whose files are in `dir`.
pub fn asset_vars(dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("DIR", dir.display().to_string()),
        ("WORKERS", Settings::workers().to_string()),
        ("UPSTREAM_IP", UPSTREAM_IP.into()),
        ("H1_IP", H1_IP.into()),
        ("RULED", RULED.into()),
        ("H1_HOST", H1_HOST.into()),
        ("MINT_SUFFIX", MINT_SUFFIX.into()),
        ("TOKEN", TOKEN.into()),
    ]
}

pub fn wait_for_port(ns: &str, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let ok = Command::new("ip")
            .args(["netns", "exec", ns, "curl", "-sk", "-o", "/dev/null"])
            .args(["--max-time", "1", url])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{url} did not come up in {ns}")
}
