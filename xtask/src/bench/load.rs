//! Load generators: the command line of each (wrk, h2load, curl) and the parser of its output.
//! A run that saw errors is an error, not a figure. The parsers are tested on output captured
//! from the real tools, under `bench/fixtures/`.
use std::path::PathBuf;

use anyhow::{Context as _, bail};

/// One load generator and how it is driven.
#[derive(Clone)]
pub enum Load {
    /// wrk, HTTP/1.1 keep-alive, or a new connection per request (`Connection: close`).
    Wrk { connections: u32, close: bool },
    /// h2load, HTTP/2 with `streams` concurrent streams per connection; with `grpc_body`, a
    /// gRPC unary call (POST of that file, `content-type: application/grpc`, `te: trailers`).
    H2load {
        connections: u32,
        streams: u32,
        grpc_body: Option<PathBuf>,
    },
    /// One curl download of the whole URL; the rate is MiB/s.
    Curl,
    /// One curl fetching the URL `requests` times in a row on one keep-alive connection (the
    /// client every proxy mode supports: it honours `https_proxy`); rate and p50 from curl's
    /// own per-transfer times.
    CurlSequence { requests: u32 },
}

/// The figures of one run.
#[derive(Default, Clone, Debug, PartialEq)]
pub struct Measurement {
    /// Requests per second, or MiB/s for a download.
    pub rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub mean_ms: Option<f64>,
    /// Requests completed in the run.
    pub requests: f64,
    /// MiB received, for a download.
    pub downloaded_mib: Option<f64>,
    /// Robin's peak RSS when it wrapped the run.
    pub robin_hwm_kib: Option<u64>,
    /// CPU seconds the proxy (Robin or the peer) used while the load ran.
    pub proxy_cpu_s: Option<f64>,
}

impl Load {
    /// The shell command for one run against `url` lasting `seconds` (a download lasts as long
    /// as it takes).
    pub fn command(&self, url: &str, seconds: u32) -> String {
        match self {
            Load::Wrk { connections, close } => {
                let extra = if *close {
                    " -H 'Connection: close'"
                } else {
                    ""
                };
                format!("wrk -t1 -c{connections} -d{seconds}s --latency{extra} {url}")
            }
            Load::H2load {
                connections,
                streams,
                grpc_body,
            } => {
                let grpc = grpc_body.as_ref().map_or(String::new(), |body| {
                    format!(
                        " -d {} -H 'content-type: application/grpc' -H 'te: trailers'",
                        body.display()
                    )
                });
                format!("h2load -c{connections} -m{streams} -D{seconds}{grpc} {url}")
            }
            Load::Curl => {
                format!(
                    "echo SPEED $(curl -sS -o /dev/null -w '%{{speed_download}} %{{size_download}}' {url})"
                )
            }
            Load::CurlSequence { requests } => {
                // One `-o` per URL, or curl writes the later bodies to stdout.
                let urls = vec![format!("-o /dev/null {url}"); *requests as usize].join(" ");
                format!(
                    "curl -sS --fail -w 'TRANSFER %{{time_total}} %{{http_code}}\\n' --max-time 120 {urls}"
                )
            }
        }
    }

    /// The download of `url` with curl dialling 127.0.0.1:`port` instead of the URL's host.
    pub fn curl_connecting_to(&self, url: &str, port: u16) -> anyhow::Result<String> {
        match self {
            Load::Curl => Ok(format!(
                "echo SPEED $(curl -sS --connect-to ::127.0.0.1:{port} -o /dev/null -w '%{{speed_download}} %{{size_download}}' {url})"
            )),
            _ => bail!("only the curl download reaches a peer through --connect-to"),
        }
    }

    pub fn parse(&self, text: &str) -> anyhow::Result<Measurement> {
        match self {
            Load::Wrk { .. } => parse_wrk(text),
            Load::H2load { .. } => parse_h2load(text),
            Load::Curl => parse_curl_speed(text),
            Load::CurlSequence { .. } => parse_curl_sequence(text),
        }
    }

    pub fn unit(&self) -> &'static str {
        match self {
            Load::Curl => "MiB/s",
            _ => "req/s",
        }
    }
}

fn parse_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * mult)
}

fn parse_wrk(text: &str) -> anyhow::Result<Measurement> {
    if let Some(line) = text.lines().find(|l| l.contains("Non-2xx or 3xx")) {
        bail!("wrk saw errors: {}", line.trim());
    }
    let mut m = Measurement::default();
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("50%") {
            m.p50_ms = parse_duration_ms(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            m.p99_ms = parse_duration_ms(v);
        } else if let Some(v) = t.strip_prefix("Requests/sec:") {
            m.rate = v.trim().parse().unwrap_or(0.0);
        } else if t.contains(" requests in ") {
            m.requests = first_number(t).unwrap_or(0.0);
        }
    }
    if m.rate <= 0.0 || m.p50_ms.is_none() {
        bail!("could not read wrk's output:\n{text}");
    }
    Ok(m)
}

fn first_number(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// The number before `suffix` in a comma-separated list, e.g. `field("1 done, 2 failed",
/// " failed")` is 2.
fn counted(list: &str, suffix: &str) -> Option<f64> {
    list.split(", ")
        .find_map(|p| p.trim().strip_suffix(suffix))
        .and_then(first_number)
}

/// h2load: only an h2 run where every request got a 2xx counts (4xx and 5xx are "failed" to
/// h2load but still counted in its req/s; an upstream without h2 makes it fall back to h1).
fn parse_h2load(text: &str) -> anyhow::Result<Measurement> {
    let mut m = Measurement::default();
    let (mut protocol, mut done, mut other_status) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if let Some(p) = line.strip_prefix("Application protocol:") {
            protocol = Some(p.trim());
        } else if let Some(rest) = line.strip_prefix("finished in ") {
            // "finished in 2.00s, 5000.00 req/s, 1.2MB/s"
            m.rate = counted(rest, " req/s").unwrap_or(0.0);
        } else if let Some(rest) = line.strip_prefix("time for request:") {
            // min max mean sd +/-sd
            m.mean_ms = rest.split_whitespace().nth(2).and_then(parse_duration_ms);
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            // "requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, ..."
            if counted(rest, " failed") != Some(0.0) || counted(rest, " errored") != Some(0.0) {
                bail!("h2load saw failures: {line}");
            }
            done = counted(rest, " done");
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            // Counted when the headers arrive: a stream still open at the end of the run has a
            // status but is not "done", so only the non-2xx counts are compared (with zero).
            other_status = [" 3xx", " 4xx", " 5xx"]
                .iter()
                .map(|c| counted(rest, c))
                .sum::<Option<f64>>();
        }
    }
    if protocol != Some("h2") {
        bail!("h2load did not negotiate h2 ({protocol:?})");
    }
    if m.rate <= 0.0 || done.is_none() || other_status != Some(0.0) {
        bail!("could not read h2load's output, or not every response was 2xx:\n{text}");
    }
    m.requests = done.unwrap_or(0.0);
    Ok(m)
}

/// `TRANSFER <seconds> <status>` per request: every status must be 200.
fn parse_curl_sequence(text: &str) -> anyhow::Result<Measurement> {
    let mut times = Vec::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("TRANSFER ")) {
        let mut it = line.split_whitespace();
        let (Some(t), Some(status)) = (it.next(), it.next()) else {
            bail!("unreadable curl transfer line: {line}");
        };
        if status != "200" {
            bail!("curl got {status}");
        }
        times.push(t.parse::<f64>().context("curl's time_total")? * 1000.0);
    }
    let total_ms: f64 = times.iter().sum();
    if times.is_empty() || total_ms <= 0.0 {
        bail!("curl reported no transfer:\n{text}");
    }
    let n = times.len() as f64;
    times.sort_by(f64::total_cmp);
    Ok(Measurement {
        rate: n / (total_ms / 1000.0),
        p50_ms: Some(times[times.len() / 2]),
        p99_ms: Some(times[(times.len() * 99 / 100).min(times.len() - 1)]),
        mean_ms: Some(total_ms / n),
        requests: n,
        ..Default::default()
    })
}

/// `SPEED <bytes per second> <bytes>`.
fn parse_curl_speed(text: &str) -> anyhow::Result<Measurement> {
    let mut fields = text
        .lines()
        .find_map(|l| l.strip_prefix("SPEED "))
        .context("curl printed no download speed")?
        .split_whitespace()
        .map(str::parse::<f64>);
    let (Some(Ok(bytes_per_s)), Some(Ok(bytes))) = (fields.next(), fields.next()) else {
        bail!("curl's download figures are not `speed size`");
    };
    if bytes_per_s <= 0.0 || bytes <= 0.0 {
        bail!("curl downloaded nothing");
    }
    let mib = f64::from(1u32 << 20);
    Ok(Measurement {
        rate: bytes_per_s / mib,
        downloaded_mib: Some(bytes / mib),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = crate::workspace_root().join("bench/fixtures").join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn h2() -> Load {
        Load::H2load {
            connections: 16,
            streams: 10,
            grpc_body: None,
        }
    }

    #[test]
    fn wrk_keepalive() {
        let m = parse_wrk(&fixture("wrk-keepalive.txt")).unwrap();
        assert_eq!(m.rate, 41196.96);
        assert_eq!(m.p50_ms, Some(0.268));
        assert_eq!(m.p99_ms, Some(2.6));
        assert_eq!(m.requests, 82508.0);
    }

    #[test]
    fn wrk_connection_close() {
        let m = parse_wrk(&fixture("wrk-close.txt")).unwrap();
        assert_eq!(m.rate, 1969.38);
        assert_eq!(m.p50_ms, Some(1.68));
        assert_eq!(m.requests, 2171.0);
    }

    #[test]
    fn wrk_errors_are_not_figures() {
        let err = parse_wrk(&fixture("wrk-non2xx.txt")).unwrap_err();
        assert!(err.to_string().contains("Non-2xx"), "{err}");
        assert!(parse_wrk(&fixture("wrk-refused.txt")).is_err());
    }

    #[test]
    fn h2load_ok() {
        let m = parse_h2load(&fixture("h2load-ok.txt")).unwrap();
        assert_eq!(m.rate, 74804.5);
        assert_eq!(m.mean_ms, Some(1.77));
        assert_eq!(m.requests, 149609.0);
    }

    #[test]
    fn h2load_grpc() {
        let m = parse_h2load(&fixture("h2load-grpc.txt")).unwrap();
        assert_eq!(m.rate, 23618.0);
        assert_eq!(m.mean_ms, Some(6.09));
    }

    #[test]
    fn h2load_streams_open_at_the_end_are_not_errors() {
        // 1231 responses had a 2xx status when the run ended, 1230 were done.
        let m = parse_h2load(&fixture("h2load-grpc-inflight.txt")).unwrap();
        assert_eq!(m.requests, 1230.0);
    }

    #[test]
    fn h2load_rejects_errors_and_fallback_to_h1() {
        for (name, why) in [
            ("h2load-non2xx.txt", "failures"),
            ("h2load-no-h2.txt", "did not negotiate h2"),
            ("h2load-refused.txt", "did not negotiate h2"),
        ] {
            let err = parse_h2load(&fixture(name)).unwrap_err();
            assert!(err.to_string().contains(why), "{name}: {err}");
        }
    }

    #[test]
    fn curl_speed_in_mib() {
        let m = parse_curl_speed(&fixture("curl-speed.txt")).unwrap();
        assert!((m.rate - 610446849.0 / 1048576.0).abs() < 1e-9);
        assert_eq!(m.downloaded_mib, Some(1024.0));
        assert!(parse_curl_speed("SPEED 0 0").is_err());
        assert!(parse_curl_speed("SPEED 610446849").is_err(), "no size");
    }

    #[test]
    fn curl_sequence_rate_and_percentiles_from_each_transfer() {
        let m = parse_curl_sequence(&fixture("curl-sequence.txt")).unwrap();
        let total_s = 0.122008 + 0.001260 + 0.000906 + 0.001462 + 0.000740;
        assert_eq!(m.requests, 5.0);
        assert!((m.rate - 5.0 / total_s).abs() < 1e-6, "{m:?}");
        let close = |v: Option<f64>, want: f64| v.is_some_and(|v| (v - want).abs() < 1e-9);
        assert!(close(m.p50_ms, 1.26) && close(m.p99_ms, 122.008), "{m:?}");
        assert!(parse_curl_sequence("TRANSFER 0.001 503\n").is_err());
        assert!(parse_curl_sequence("nothing\n").is_err());
        let seq = Load::CurlSequence { requests: 2 };
        assert_eq!(
            seq.command("https://a/s", 9),
            "curl -sS --fail -w 'TRANSFER %{time_total} %{http_code}\\n' --max-time 120 -o /dev/null https://a/s -o /dev/null https://a/s"
        );
    }

    #[test]
    fn commands() {
        let wrk = Load::Wrk {
            connections: 16,
            close: true,
        };
        assert_eq!(
            wrk.command("https://a/small", 2),
            "wrk -t1 -c16 -d2s --latency -H 'Connection: close' https://a/small"
        );
        assert_eq!(
            h2().command("https://a/", 3),
            "h2load -c16 -m10 -D3 https://a/"
        );
        let grpc = Load::H2load {
            connections: 1,
            streams: 1,
            grpc_body: Some("/b".into()),
        };
        assert!(
            grpc.command("u", 1)
                .contains("-d /b -H 'content-type: application/grpc'")
        );
        assert_eq!(h2().unit(), "req/s");
        assert_eq!(Load::Curl.unit(), "MiB/s");
    }
}
