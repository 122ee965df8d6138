//! Where the gateway connects for a client: the target host resolved by Robin, in its own
//! network namespace (a client never chooses the address, only the name), checked against the
//! destinations the operator denied. The resolved address is logged with the name.
use std::{future::Future, net::SocketAddr, pin::Pin};

use crate::{
    config::Cidr,
    proxy::{Refusal, Resolve},
};

/// What a forward proxy must never be turned into a way to reach: its own host's loopback
/// (the admin plane, the kubelet's read-only port), link-local (cloud metadata endpoints) and
/// the unspecified addresses.
pub const DEFAULT_DENY: &str = "127.0.0.0/8,::1/128,169.254.0.0/16,fe80::/10,0.0.0.0/8,::/128";

pub struct Dns {
    deny: Vec<Cidr>,
}

impl Dns {
    pub fn new(deny: Vec<Cidr>) -> Self {
        Self { deny }
    }

    /// The first address `host` resolves to, unless it is denied.
    pub async fn lookup(&self, host: &str, port: u16) -> Result<SocketAddr, Refusal> {
        let unresolvable = || Refusal::Unresolvable(host.chars().take(256).collect());
        let addr = tokio::net::lookup_host((host, port))
            .await
            .map_err(|_| unresolvable())?
            .next()
            .ok_or_else(unresolvable)?;
        let ip = addr.ip().to_canonical();
        if self.deny.iter().any(|c| c.contains(ip)) {
            return Err(Refusal::DestinationDenied {
                host: host.chars().take(256).collect(),
                ip,
            });
        }
        tracing::debug!(host, resolved = %addr, "destination resolved");
        Ok(SocketAddr::new(ip, port))
    }
}

impl Resolve for Dns {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = Result<SocketAddr, Refusal>> + Send + 'a>> {
        Box::pin(self.lookup(host, port))
    }
}

pub fn parse_cidrs(list: &[String]) -> Result<Vec<Cidr>, String> {
    list.iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| Cidr::parse(s.trim()).map_err(|e| format!("{s:?}: {e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dns() -> Dns {
        let deny: Vec<String> = DEFAULT_DENY.split(',').map(str::to_owned).collect();
        Dns::new(parse_cidrs(&deny).unwrap())
    }

    #[tokio::test]
    async fn literals_resolve_and_denied_ranges_are_refused() {
        let d = dns();
        assert_eq!(
            d.lookup("10.1.2.3", 443).await,
            Ok("10.1.2.3:443".parse().unwrap())
        );
        for host in [
            "127.0.0.1",
            "169.254.169.254",
            "::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
        ] {
            assert!(
                matches!(
                    d.lookup(host, 80).await,
                    Err(Refusal::DestinationDenied { .. })
                ),
                "{host}"
            );
        }
        // Names are resolved in the e2e tests, inside namespaces with no route out: a unit
        // test must not send a DNS query.
    }
}
