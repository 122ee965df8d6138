//! The node agent's configuration: the `robin exec` file format (`[tls]`, `[capture]`) plus
//! named rule sets a pod picks with `robin.dev/rules`, and a `[node]` section.
//!
//! ```toml
//! [tls]
//! ca_cert = "/etc/robin/ca/tls.crt"
//! ca_key = "/etc/robin/ca/tls.key"
//!
//! [node]
//! cgroup_root = "/sys/fs/cgroup"   # optional; --cgroup-root wins
//!
//! [[rule_sets.default.inject]]
//! hosts = ["broker.example.com"]
//! # no `source`: the pod's own token, at robin.dev/token-path inside the pod
//! ```
//!
//! Every rule set is validated at start-up exactly as `robin exec` validates its `[[inject]]`.
//! `file` sources (explicit or the default, also an `exchange`'s inner one) are paths inside the
//! pod: the pod's identity context resolves them in the pod's root (`crate::podfs`).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    config::{self, Config, ConfigArgs, ConfigError},
    identity::SourceConfig,
};

pub use super::annotations::DEFAULT_TOKEN_PATH;
pub const DEFAULT_RULE_SET: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum NodeConfigError {
    #[error("config file {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("config file {0}: {1}")]
    Parse(PathBuf, String),
    #[error("rule_sets.{0}: {1}")]
    RuleSet(String, #[source] ConfigError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    cgroup_root: Option<PathBuf>,
}

/// One rule set: the validated config and, per rule, whether its source is the pod's own token
/// (no `source` given), whose path comes from `robin.dev/token-path`.
#[derive(Clone, Debug)]
pub struct RuleSet {
    pub config: Config,
    pub pod_token: Vec<bool>,
}

#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// `[tls]` and `[capture]` with no rules: what a pod with an unknown rule set would get.
    pub base: Config,
    pub rule_sets: BTreeMap<String, RuleSet>,
    pub cgroup_root: Option<PathBuf>,
}

pub fn load(args: &ConfigArgs) -> Result<NodeConfig, NodeConfigError> {
    let text = match &args.config {
        Some(p) => std::fs::read_to_string(p).map_err(|e| NodeConfigError::Read(p.clone(), e))?,
        None => String::new(),
    };
    let path = args.config.as_deref().unwrap_or(Path::new("<none>"));
    from_toml(&text, path, args)
}

pub fn from_toml(
    text: &str,
    path: &Path,
    args: &ConfigArgs,
) -> Result<NodeConfig, NodeConfigError> {
    let mut table: toml::Table = toml::from_str(text)
        .map_err(|e| NodeConfigError::Parse(path.to_owned(), first_line(e.message())))?;
    let node: RawNode = match table.remove("node") {
        Some(v) => v.try_into().map_err(|e: toml::de::Error| {
            NodeConfigError::Parse(
                path.to_owned(),
                format!("node: {}", first_line(e.message())),
            )
        })?,
        None => RawNode::default(),
    };
    let sets = match table.remove("rule_sets") {
        Some(toml::Value::Table(t)) => t,
        Some(_) => {
            return Err(NodeConfigError::Parse(
                path.to_owned(),
                "rule_sets: must be a table of rule sets".into(),
            ));
        }
        None => toml::Table::new(),
    };
    if table.contains_key("inject") {
        return Err(NodeConfigError::Parse(
            path.to_owned(),
            "inject: in node mode rules live in [[rule_sets.NAME.inject]]".into(),
        ));
    }
    let base = config::from_toml(&toml::to_string(&table).unwrap_or_default(), path, args)?;
    let mut rule_sets = BTreeMap::new();
    for (name, set) in sets {
        let bad =
            |why: &str| NodeConfigError::Parse(path.to_owned(), format!("rule_sets.{name}: {why}"));
        let toml::Value::Table(mut set) = set else {
            return Err(bad("must be a table"));
        };
        let rules = match set.remove("inject") {
            Some(toml::Value::Array(a)) => a,
            None => Vec::new(),
            Some(_) => return Err(bad("inject must be an array of rules")),
        };
        if let Some(k) = set.keys().next() {
            return Err(bad(&format!("unknown field `{k}`")));
        }
        let mut pod_token = Vec::with_capacity(rules.len());
        let mut with_sources = Vec::with_capacity(rules.len());
        for rule in rules {
            let toml::Value::Table(mut rule) = rule else {
                return Err(bad("each rule must be a table"));
            };
            let own = !rule.contains_key("source");
            if own {
                let mut src = toml::Table::new();
                src.insert("kind".into(), "file".into());
                src.insert("path".into(), DEFAULT_TOKEN_PATH.into());
                rule.insert("source".into(), toml::Value::Table(src));
            }
            pod_token.push(own);
            with_sources.push(toml::Value::Table(rule));
        }
        let mut doc = table.clone();
        doc.insert("inject".into(), toml::Value::Array(with_sources));
        let config = config::from_toml(&toml::to_string(&doc).unwrap_or_default(), path, args)
            .map_err(|e| NodeConfigError::RuleSet(name.clone(), e))?;
        rule_sets.insert(name, RuleSet { config, pod_token });
    }
    Ok(NodeConfig {
        base,
        rule_sets,
        cgroup_root: node.cgroup_root,
    })
}

fn first_line(msg: &str) -> String {
    msg.lines().next().unwrap_or_default().to_owned()
}

impl RuleSet {
    /// The config for one pod: the pod's own token at `token_path` and the pod's capture ports
    /// if it names any. Paths stay the pod's own: built in the pod's identity context, every
    /// `file` source is read inside the pod's root.
    pub fn for_pod(&self, token_path: &Path, ports: Option<&[u16]>) -> Config {
        let mut cfg = self.config.clone();
        for (rule, &own) in cfg.inject.iter_mut().zip(&self.pod_token) {
            if let SourceConfig::File { path } = &mut rule.source
                && own
            {
                *path = token_path.to_owned();
            }
        }
        if let Some(ports) = ports {
            cfg.capture.ports = ports.to_vec();
        }
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory with a CA (its path, and the `TempDir` that removes it).
    struct Scratch {
        path: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Scratch {
        fn new(tag: &str) -> Self {
            let tmp = tempfile::Builder::new()
                .prefix(&format!("robin-nodecfg-{tag}-"))
                .tempdir()
                .unwrap();
            let dir = tmp.path().to_owned();
            let (cert, key) = crate::tls::tests::test_ca("Node CA");
            std::fs::write(dir.join("ca.crt"), cert).unwrap();
            std::fs::write(dir.join("ca.key"), key).unwrap();
            Self {
                path: dir,
                _dir: tmp,
            }
        }

        fn load(&self, body: &str) -> Result<NodeConfig, NodeConfigError> {
            let text = format!(
                "[tls]\nca_cert = {:?}\nca_key = {:?}\n{body}",
                self.path.join("ca.crt"),
                self.path.join("ca.key")
            );
            from_toml(&text, Path::new("node.toml"), &ConfigArgs::default())
        }
    }

    #[test]
    fn rule_sets_default_to_the_pods_token_inside_the_pod() {
        let s = Scratch::new("sets");
        let cfg = s
            .load(
                r#"
[capture]
ports = [443]
[node]
cgroup_root = "/tmp/cg"
[[rule_sets.default.inject]]
hosts = ["api.test"]
[[rule_sets.default.inject]]
hosts = ["other.test"]
source = { kind = "file", path = "/etc/other-token" }
[[rule_sets.default.inject]]
hosts = ["sts.test"]
source = { kind = "exchange", grant = "token_exchange", token_endpoint = "https://sts.test/t", inner = { kind = "file", path = "/etc/subject" } }
[[rule_sets.empty.inject]]
"#
                .replace("[[rule_sets.empty.inject]]\n", "[rule_sets.empty]\n")
                .as_str(),
            )
            .unwrap();
        assert_eq!(cfg.cgroup_root.as_deref(), Some(Path::new("/tmp/cg")));
        assert!(cfg.base.inject.is_empty());
        assert_eq!(cfg.rule_sets["empty"].config.inject.len(), 0);
        let set = &cfg.rule_sets["default"];
        assert_eq!(set.pod_token, vec![true, false, false]);
        let pod = set.for_pod(Path::new("/run/t/tok"), Some(&[8443]));
        assert_eq!(
            pod.inject[0].source,
            SourceConfig::File {
                path: PathBuf::from("/run/t/tok")
            }
        );
        assert_eq!(
            pod.inject[1].source,
            SourceConfig::File {
                path: PathBuf::from("/etc/other-token")
            }
        );
        let SourceConfig::Exchange(x) = &pod.inject[2].source else {
            panic!("not an exchange");
        };
        assert_eq!(
            *x.inner,
            SourceConfig::File {
                path: PathBuf::from("/etc/subject")
            }
        );
        assert_eq!(pod.capture.ports, vec![8443]);
        assert_eq!(set.for_pod(Path::new("/t"), None).capture.ports, vec![443]);
    }

    #[test]
    fn bad_rule_sets_are_named() {
        let s = Scratch::new("bad");
        let e = s
            .load("[[rule_sets.x.inject]]\nhosts = [\"*bad\"]\n")
            .unwrap_err();
        assert!(
            e.to_string().starts_with("rule_sets.x: inject[0].hosts"),
            "{e}"
        );
        assert!(s.load("[[inject]]\nhosts = [\"a\"]\n").is_err());
        assert!(s.load("[node]\nbogus = 1\n").is_err());
        assert!(s.load("[rule_sets.x]\nbogus = 1\n").is_err());
    }
}
