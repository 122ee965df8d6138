//! `cargo xtask fuzz --seconds N`: the property tests of `robin-agent/tests/props.rs` (SNI/Host
//! sniffer, config parser, token validator), run round after round with fresh random seeds until
//! N seconds have passed. The normal suite runs the same properties with a few hundred cases.
use std::time::{Duration, Instant};

use crate::{cargo, status};

/// Cases per property per round: a few seconds per round in a debug build, so the run ends
/// close to the deadline.
const CASES_PER_ROUND: u32 = 1000;

pub fn run(seconds: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut rounds = 0u32;
    // At least one round; every round is bounded by its case count.
    loop {
        let mut cmd = cargo();
        cmd.args(["test", "-p", "robin-agent", "--test", "props", "--quiet"])
            .env("PROPTEST_CASES", CASES_PER_ROUND.to_string());
        status(&mut cmd)?;
        rounds += 1;
        if Instant::now() >= deadline {
            break;
        }
    }
    println!(
        "fuzz: {rounds} round(s) of {CASES_PER_ROUND} cases per property, no failure, {:.0?}",
        start.elapsed()
    );
    Ok(())
}
