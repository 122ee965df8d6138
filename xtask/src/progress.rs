//! Quiet steps. A step's command writes into the run's log file (`target/logs/<task>.log`,
//! started afresh by each `cargo xtask` run); the terminal gets one line per step: its label,
//! then `done (12.3s)`. When a step fails, the whole log is printed and its path named. This
//! keeps apt's progress and the nested cargo's `warning: robin-agent@…: Compiling …` lines
//! (aya-build builds the eBPF crate from build.rs) out of what the user came to see.
use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use anyhow::{Context as _, bail};

static LOG: OnceLock<PathBuf> = OnceLock::new();
static ANNOUNCED: AtomicBool = AtomicBool::new(false);

/// Starts this run's log, `target/logs/<task>.log` (truncated).
pub fn init(task: &str) -> anyhow::Result<()> {
    let dir = crate::target_dir().join("logs");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{task}.log"));
    File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let _ = LOG.set(path);
    Ok(())
}

/// Runs `cmd` as one step: output to the log, one line on the terminal. Without a log (not
/// initialised) the output goes through, as before.
pub fn step(label: &str, cmd: &mut Command) -> anyhow::Result<()> {
    let Some(path) = LOG.get() else {
        return crate::status(cmd);
    };
    if !ANNOUNCED.swap(true, Ordering::Relaxed) {
        eprintln!("(output of each step: {})", path.display());
    }
    let mut log = OpenOptions::new().append(true).open(path)?;
    writeln!(log, "\n==> {label}\n$ {cmd:?}")?;
    eprint!("{label} ... ");
    let started = Instant::now();
    let st = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?)
        .status()
        .with_context(|| format!("spawning {:?}", cmd.get_program()));
    match st {
        Ok(st) if st.success() => {
            eprintln!("done ({:.1}s)", started.elapsed().as_secs_f64());
            Ok(())
        }
        other => {
            eprintln!("FAILED");
            let text = std::fs::read_to_string(path).unwrap_or_default();
            eprintln!(
                "----- {} -----\n{text}----- end of log -----",
                path.display()
            );
            match other {
                Ok(st) => bail!(
                    "{label}: {cmd:?} failed with {st} (log: {})",
                    path.display()
                ),
                Err(e) => Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_writes_to_the_log_and_a_failure_names_it() {
        init("progress-unit-test").unwrap();
        let path = LOG.get().unwrap().clone();
        step(
            "ok step",
            Command::new("sh").args(["-c", "echo to-stdout; echo to-stderr >&2"]),
        )
        .unwrap();
        let e = step(
            "bad step",
            Command::new("sh").args(["-c", "echo why-it-failed; exit 3"]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("bad step") && e.contains(&path.display().to_string()),
            "{e}"
        );
        let log = std::fs::read_to_string(&path).unwrap();
        for line in [
            "==> ok step",
            "to-stdout",
            "to-stderr",
            "==> bad step",
            "why-it-failed",
        ] {
            assert!(log.contains(line), "{line:?} missing from the log:\n{log}");
        }
        let _ = std::fs::remove_file(path);
    }
}
