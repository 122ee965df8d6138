//! The sanity guard: a proxy adds work to the direct path, so a proxied path that beats direct
//! by more than the noise is a broken measurement (a cold cache on one side, a path that served
//! errors, a pathology of the direct path), not a result. Such a run fails instead of
//! publishing the ratio.
//!
//! "More than the noise": every round of the proxied path beats direct's best round by more
//! than MARGIN, i.e. the two ranges do not overlap. Comparing the proxied median instead would
//! fail one run in twelve (5 rounds) when a path costs the same as direct (the splice
//! passthrough, the eBPF redirect with keep-alive) and the host is noisy; disjoint ranges of two
//! equal paths happen once in 126 runs before the margin, and a margin of 5 % makes that rarer.
use std::fmt;

use super::rounds::{Outcome, Role};

/// How far a proxied path's worst round may exceed direct's best round before the run is
/// rejected.
pub const MARGIN: f64 = 1.05;

#[derive(Debug, PartialEq)]
pub struct Violation {
    pub scenario: String,
    pub path: &'static str,
    pub unit: &'static str,
    pub min: f64,
    pub direct_max: f64,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}'s worst round {:.1} {} > direct's best round {:.1} × {MARGIN} ({:.2}× direct)",
            self.scenario,
            self.path,
            self.min,
            self.unit,
            self.direct_max,
            self.min / self.direct_max
        )
    }
}

/// Every proxied path, in every guarded scenario with a direct path, whose lowest rate exceeds
/// direct's highest × MARGIN.
pub fn check<'a>(outcomes: impl IntoIterator<Item = &'a Outcome>) -> Vec<Violation> {
    let mut found = Vec::new();
    for o in outcomes.into_iter().filter(|o| o.unguarded.is_none()) {
        let Some(direct) = o.by_role(Role::Direct).and_then(|d| d.rate()) else {
            continue;
        };
        for r in o.results.iter().filter(|r| r.spec.role != Role::Direct) {
            let Some(rate) = r.rate() else { continue };
            if rate.min > direct.max * MARGIN {
                found.push(Violation {
                    scenario: o.title.clone(),
                    path: r.spec.label,
                    unit: o.unit,
                    min: rate.min,
                    direct_max: direct.max,
                });
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{
        load::Measurement,
        rounds::{PathResult, PathSpec, Via},
    };

    fn path(label: &'static str, role: Role, rates: &[f64]) -> PathResult {
        PathResult {
            spec: PathSpec {
                label,
                capture: "",
                role,
                url: String::new(),
                via: Via::Plain,
                enter_ns: None,
                server: None,
            },
            runs: rates
                .iter()
                .map(|&rate| Measurement {
                    rate,
                    ..Default::default()
                })
                .collect(),
            error: None,
        }
    }

    fn outcome(results: Vec<PathResult>) -> Outcome {
        Outcome {
            title: "bulk".into(),
            unit: "MiB/s",
            results,
            unguarded: None,
        }
    }

    #[test]
    fn a_proxy_slower_than_direct_passes() {
        let o = outcome(vec![
            path("direct", Role::Direct, &[300.0, 310.0, 320.0]),
            path("robin", Role::Robin, &[290.0, 300.0, 305.0]),
        ]);
        assert!(check([&o]).is_empty());
    }

    #[test]
    fn within_the_margin_of_directs_best_round_passes() {
        // Worst round 325 against direct's best 320: 1.6 % above, inside the margin.
        let o = outcome(vec![
            path("direct", Role::Direct, &[300.0, 310.0, 320.0]),
            path("nginx", Role::Peer, &[325.0, 330.0, 340.0]),
        ]);
        assert!(check([&o]).is_empty());
    }

    #[test]
    fn overlapping_ranges_are_noise() {
        // An equal-cost path on a noisy host: its median beats direct's best, one round not.
        let o = outcome(vec![
            path("direct", Role::Direct, &[150.0, 270.0, 300.0]),
            path("robin", Role::Robin, &[190.0, 330.0, 340.0]),
        ]);
        assert!(check([&o]).is_empty());
    }

    #[test]
    fn an_impossible_ratio_fails() {
        // The 2.74× passthrough of a cold-cache direct run.
        let o = outcome(vec![
            path("direct", Role::Direct, &[292.0, 300.0, 310.0]),
            path("robin", Role::Robin, &[800.0, 790.0, 805.0]),
            path("haproxy", Role::Peer, &[300.0, 301.0, 302.0]),
        ]);
        let v = check([&o]);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].path, "robin");
        assert_eq!((v[0].min, v[0].direct_max), (790.0, 310.0));
        assert!(v[0].to_string().contains("2.55× direct"), "{}", v[0]);
    }

    #[test]
    fn a_failed_peer_or_a_row_without_direct_is_not_judged() {
        let o = outcome(vec![
            path("direct", Role::Direct, &[100.0]),
            path("squid", Role::Peer, &[]),
        ]);
        let no_direct = outcome(vec![path("robin", Role::Robin, &[1e9])]);
        assert!(check([&o, &no_direct]).is_empty());
    }

    #[test]
    fn an_unguarded_scenario_is_not_judged() {
        let mut o = outcome(vec![
            path("direct", Role::Direct, &[100.0]),
            path("envoy", Role::Peer, &[200.0]),
        ]);
        assert_eq!(check([&o]).len(), 1);
        o.unguarded = Some("the proxy's TLS stack replaces the upstream's");
        assert!(check([&o]).is_empty());
    }
}
