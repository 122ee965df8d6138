//! The proxy's metric families. One [`ProxyStats`] is registered per process and shared by
//! every proxy in it (`robin node` runs one per pod): a retired proxy's counts stay in the
//! families, so `/metrics` never goes backwards, and pods whose rules share a label add up.
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family},
    registry::{Registry, Unit},
};
use std::fmt::Write as _;

use crate::{
    metrics::{ByClass, ClassLabels, Histogram, StatusClass},
    tls::LeafStats,
};

/// The `rule` label of requests no rule matched (plain HTTP to an unruled host), as in logs.
pub const NO_RULE: &str = "-";

/// How a captured connection was handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Intercepted,
    Spliced,
    /// TLS handshake with the workload failed or timed out, or the HTTP connection errored.
    Failed,
    /// Splice could not reach the original destination.
    SpliceFailed,
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Self::Intercepted => "intercepted",
            Self::Spliced => "spliced",
            Self::Failed => "failed",
            Self::SpliceFailed => "splice_failed",
        })
    }
}

/// Which way bytes went, seen from the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    FromWorkload,
    ToWorkload,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Self::FromWorkload => "from_workload",
            Self::ToWorkload => "to_workload",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: Direction,
}

/// A rule by its label (its first host pattern).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleClassLabels {
    rule: String,
    class: StatusClass,
}

/// The families rule counters are resolved from.
#[derive(Clone, Debug, Default)]
struct RuleFamilies {
    requests: Family<RuleClassLabels, Counter>,
    identity_errors: Family<RuleLabels, Counter>,
    audience_mismatches: Family<RuleLabels, Counter>,
    identity_fetch: Family<RuleLabels, Histogram>,
}

/// The proxy's counters, each already resolved to its series. Requests are counted by status
/// class of what Robin answered the workload (including its own 502/503), under their rule.
#[derive(Clone, Debug)]
pub struct ProxyStats {
    pub conn_intercepted: Counter,
    pub conn_spliced: Counter,
    pub conn_failed: Counter,
    pub conn_splice_failed: Counter,
    /// Idle HTTP/1.1 connections whose HTTP state was released until their next request.
    pub conn_parked: Counter,
    /// Requests no rule matched (`rule="-"`).
    pub unruled_requests: ByClass,
    pub upstream_errors: Counter,
    /// Upstream connections established (TCP, TLS and HTTP handshakes done).
    pub upstream_connects: Counter,
    /// Requests sent on a pooled upstream connection.
    pub upstream_reused: Counter,
    /// Idle pooled upstream HTTP/1 connections whose HTTP state was released until their next
    /// use.
    pub upstream_parked: Counter,
    /// Requests sent again on a fresh connection because their pooled one was found closed
    /// before any byte of them was written.
    pub upstream_retries: Counter,
    /// Status classes of the responses upstreams sent (Robin's own 502/503 are not here).
    pub upstream_responses: ByClass,
    /// Bytes read from and written to workloads, intercepted and spliced, counted when each
    /// connection ends.
    pub bytes_from_workload: Counter,
    pub bytes_to_workload: Counter,
    pub leaf: LeafStats,
    connections: Family<OutcomeLabels, Counter>,
    bytes: Family<DirectionLabels, Counter>,
    upstream_responses_family: Family<ClassLabels, Counter>,
    rules: RuleFamilies,
}

/// Per-rule counters, exported with a `rule` label.
#[derive(Clone, Debug, Default)]
pub struct RuleStats {
    /// Requests on connections intercepted for this rule, by status class of Robin's answer.
    pub requests: ByClass,
    /// Requests answered 503 because the rule's source had no valid token.
    pub identity_errors: Counter,
    /// How long `IdentitySource::token` took, successful or not.
    pub identity_fetch: Histogram,
    /// Requests answered 503 because the token's `aud` was not the audience the rule expects.
    pub audience_mismatches: Counter,
}

impl Default for ProxyStats {
    /// Counters in families of their own, registered nowhere (`robin exec`, tests).
    fn default() -> Self {
        Self::with_leaf(LeafStats::default())
    }
}

impl ProxyStats {
    /// The families, registered in `registry` (the leaf cache's by the tls module).
    pub fn register(registry: &mut Registry) -> Self {
        let s = Self::with_leaf(LeafStats::register(registry));
        s.register_families(registry);
        s
    }

    fn with_leaf(leaf: LeafStats) -> Self {
        let connections = Family::<OutcomeLabels, Counter>::default();
        let conn = |outcome| connections.get_or_create_owned(&OutcomeLabels { outcome });
        let bytes = Family::<DirectionLabels, Counter>::default();
        let dir = |direction| bytes.get_or_create_owned(&DirectionLabels { direction });
        let upstream_responses_family = Family::<ClassLabels, Counter>::default();
        let rules = RuleFamilies::default();
        Self {
            conn_intercepted: conn(Outcome::Intercepted),
            conn_spliced: conn(Outcome::Spliced),
            conn_failed: conn(Outcome::Failed),
            conn_splice_failed: conn(Outcome::SpliceFailed),
            conn_parked: Counter::default(),
            unruled_requests: rules.requests(NO_RULE),
            upstream_errors: Counter::default(),
            upstream_connects: Counter::default(),
            upstream_reused: Counter::default(),
            upstream_parked: Counter::default(),
            upstream_retries: Counter::default(),
            upstream_responses: ByClass::new(|class| {
                upstream_responses_family.get_or_create_owned(&ClassLabels { class })
            }),
            bytes_from_workload: dir(Direction::FromWorkload),
            bytes_to_workload: dir(Direction::ToWorkload),
            leaf,
            connections,
            bytes,
            upstream_responses_family,
            rules,
        }
    }

    fn register_families(&self, r: &mut Registry) {
        let f = &self.rules;
        r.register(
            "robin_connections",
            "Captured connections by outcome",
            self.connections.clone(),
        );
        r.register(
            "robin_bytes",
            "Bytes of captured connections (intercepted and spliced), counted when each ends",
            self.bytes.clone(),
        );
        r.register(
            "robin_requests",
            "Requests by rule (\"-\" when none matched) and status class of the answer given to the workload",
            f.requests.clone(),
        );
        r.register(
            "robin_identity_errors",
            "Requests answered 503 because the rule's source had no valid token",
            f.identity_errors.clone(),
        );
        r.register(
            "robin_audience_mismatches",
            "Requests answered 503 because the token's aud claim was not the audience the rule expects",
            f.audience_mismatches.clone(),
        );
        r.register_with_unit(
            "robin_identity_fetch",
            "Time to get the token for a request from the rule's identity source",
            Unit::Seconds,
            f.identity_fetch.clone(),
        );
        r.register(
            "robin_connections_parked",
            "Idle HTTP/1.1 connections whose HTTP buffers were released until their next request",
            self.conn_parked.clone(),
        );
        self.register_upstream(r);
    }

    fn register_upstream(&self, r: &mut Registry) {
        r.register(
            "robin_upstream_responses",
            "Responses received from upstreams, by status class",
            self.upstream_responses_family.clone(),
        );
        let counters = [
            (
                "robin_upstream_errors",
                "Requests answered 502 because the upstream could not be reached or verified",
                &self.upstream_errors,
            ),
            (
                "robin_upstream_connections",
                "Upstream connections established (TCP, TLS and HTTP handshakes done)",
                &self.upstream_connects,
            ),
            (
                "robin_upstream_reused",
                "Requests sent on a pooled upstream connection",
                &self.upstream_reused,
            ),
            (
                "robin_upstream_parked",
                "Idle pooled upstream HTTP/1 connections whose HTTP buffers were released until their next use",
                &self.upstream_parked,
            ),
            (
                "robin_upstream_redials",
                "Requests dialled once afresh because their pooled connection had closed before any byte was written",
                &self.upstream_retries,
            ),
        ];
        for (name, help, counter) in counters {
            r.register(name, help, counter.clone());
        }
    }

    /// The counters of the rule labelled `label`, shared with every other rule of that label.
    pub fn rule(&self, label: &str) -> RuleStats {
        self.rules.rule(label)
    }
}

impl RuleFamilies {
    fn requests(&self, label: &str) -> ByClass {
        ByClass::new(|class| {
            self.requests.get_or_create_owned(&RuleClassLabels {
                rule: label.to_owned(),
                class,
            })
        })
    }

    fn rule(&self, label: &str) -> RuleStats {
        let rule = RuleLabels {
            rule: label.to_owned(),
        };
        RuleStats {
            requests: self.requests(label),
            identity_errors: self.identity_errors.get_or_create_owned(&rule),
            identity_fetch: self.identity_fetch.get_or_create_owned(&rule),
            audience_mismatches: self.audience_mismatches.get_or_create_owned(&rule),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::encode;
    use http::StatusCode;

    #[test]
    fn families_are_shared_and_typed() {
        let mut registry = Registry::default();
        let first = ProxyStats::register(&mut registry);
        // A second proxy (a pod's replacement) counts into the same series.
        let second = first.clone();
        first.rule("api.example.com").requests.count(StatusCode::OK);
        second
            .rule("api.example.com")
            .requests
            .count(StatusCode::OK);
        second.unruled_requests.count(StatusCode::NOT_FOUND);
        second.conn_spliced.inc();
        first.bytes_to_workload.inc_by(7);
        first.leaf.hits.inc();
        let out = encode(&registry);
        for line in [
            "# TYPE robin_requests counter\n",
            "robin_requests_total{rule=\"api.example.com\",class=\"2xx\"} 2\n",
            "robin_requests_total{rule=\"api.example.com\",class=\"5xx\"} 0\n",
            "robin_requests_total{rule=\"-\",class=\"4xx\"} 1\n",
            "# TYPE robin_connections counter\n",
            "robin_connections_total{outcome=\"spliced\"} 1\n",
            "robin_connections_total{outcome=\"splice_failed\"} 0\n",
            "robin_bytes_total{direction=\"to_workload\"} 7\n",
            "# TYPE robin_identity_fetch_seconds histogram\n",
            "robin_identity_fetch_seconds_count{rule=\"api.example.com\"} 0\n",
            "robin_identity_errors_total{rule=\"api.example.com\"} 0\n",
            "robin_upstream_responses_total{class=\"1xx\"} 0\n",
            "# TYPE robin_upstream_redials counter\n",
            "robin_upstream_redials_total 0\n",
            "robin_leaf_cache_total{result=\"hit\"} 1\n",
            "robin_leaf_cache_total{result=\"mint_error\"} 0\n",
        ] {
            assert!(out.contains(line), "{line} not in\n{out}");
        }
    }
}
