//! The metrics others read, after a real fault run: a `serve` daemon restoring a block lazily
//! from an image, a pcb-client with two declared vCPU threads (THREAD_ID uffd) and its main thread
//! faulting on pages, then `status --format json` and `status --format openmetrics` of the same
//! broker. The JSON carries QEMU 10.1's postcopy-* members; the OpenMetrics text is parsed back
//! by a small parser here (families, TYPE/UNIT/HELP, _total counters, cumulative histogram
//! buckets, `# EOF`) and its values are checked against the JSON.

mod common;

use std::collections::HashMap;
use std::process::Command;

use common::clients::{control_args, Peer};
use common::serve::Serve;
use serde_json::Value;

const PAGES: usize = 256;

fn status(s: &Serve, format: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
        .args(["status", "--control"])
        .arg(&s.sock)
        .args(["--format", format])
        .output()
        .unwrap();
    assert!(out.status.success(), "status --format {format}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// One parsed sample: name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

/// Families by name: (type, unit, samples).
type Families = HashMap<String, (String, Option<String>, Vec<Sample>)>;

/// Parse an OpenMetrics exposition, checking the rules the broker's output must follow.
fn parse(text: &str) -> Families {
    let mut fams: Families = HashMap::new();
    let mut current: Option<String> = None;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "the exposition ends with # EOF");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut it = rest.splitn(3, ' ');
            let (kw, name, arg) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap_or(""));
            match kw {
                "TYPE" => {
                    assert!(!fams.contains_key(name), "family {name} declared twice");
                    assert!(
                        ["counter", "gauge", "histogram", "summary"].contains(&arg),
                        "type {arg} of {name}"
                    );
                    fams.insert(name.to_string(), (arg.to_string(), None, Vec::new()));
                    current = Some(name.to_string());
                }
                "UNIT" => {
                    assert_eq!(current.as_deref(), Some(name), "UNIT right after its TYPE");
                    assert!(name.ends_with(&format!("_{arg}")), "a family's name ends with its unit: {name}");
                    fams.get_mut(name).unwrap().1 = Some(arg.to_string());
                }
                "HELP" => assert_eq!(current.as_deref(), Some(name), "HELP of the current family"),
                other => panic!("unknown comment {other}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').unwrap()),
            None => (series, ""),
        };
        let mut map = HashMap::new();
        for kv in split_labels(labels) {
            let (k, v) = kv.split_once('=').unwrap();
            map.insert(k.to_string(), v.trim_matches('"').to_string());
        }
        let fam = current.clone().expect("a sample before any TYPE");
        let (kind, _, samples) = fams.get_mut(&fam).unwrap();
        let suffix = name.strip_prefix(fam.as_str()).unwrap_or_else(|| panic!("{name} outside {fam}"));
        let allowed: &[&str] = match kind.as_str() {
            "counter" => &["_total"],
            "gauge" => &[""],
            "histogram" => &["_bucket", "_count", "_sum"],
            _ => &["_count", "_sum"],
        };
        assert!(allowed.contains(&suffix), "{name}: suffix {suffix:?} in a {kind}");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
        samples.push(Sample { name: name.to_string(), labels: map, value });
    }
    fams
}

/// Split `a="x",b="y"` at commas outside quotes.
fn split_labels(s: &str) -> Vec<&str> {
    let (mut out, mut start, mut quoted, mut esc) = (Vec::new(), 0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if esc => esc = false,
            '\\' => esc = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

fn one(f: &Families, fam: &str, name: &str, label: Option<(&str, &str)>) -> f64 {
    let samples = &f.get(fam).unwrap_or_else(|| panic!("no family {fam}")).2;
    let hits: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == name && label.is_none_or(|(k, v)| s.labels.get(k).map(String::as_str) == Some(v))
        })
        .collect();
    assert_eq!(hits.len(), 1, "{name} {label:?}: {samples:?}");
    hits[0].value
}

fn secs(ns: &Value) -> f64 {
    ns.as_u64().unwrap() as f64 / 1e9
}

#[test]
fn json_and_openmetrics_carry_the_same_blocktime_after_a_fault_run() {
    let image = common::clients::content(PAGES, 4096, 7);
    let s = Serve::start("metrics", &image, &["--block", "ram:1M"]);
    let mut c = Peer::spawn(&control_args(
        &s.sock,
        "vcpus:0-63;touch:64-95",
        &["--block", "ram", "--vcpus", "2", "--no-wait"],
    ));
    let tids: Vec<u64> =
        c.ready["vcpu_tids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
    assert_eq!(tids.len(), 2);
    let client = c.ready["client"].as_u64().unwrap();
    let lines = c.finish_within(60);
    let expect: u64 = (0..64usize).map(|p| u64::from(image[p * 4096])).sum();
    assert_eq!(lines[0]["sum"].as_u64(), Some(expect), "the vCPUs read the image: {lines:?}");

    let json: Value = serde_json::from_str(&status(&s, "json")).unwrap();
    let text = status(&s, "openmetrics");
    let f = parse(&text);

    // JSON: QEMU's members at the top level, consistent with the exact sums.
    let bt = &json["blocktime"];
    let vcpus = bt["vcpus"].as_array().unwrap();
    assert_eq!(vcpus.len(), 2);
    for (i, v) in vcpus.iter().enumerate() {
        assert_eq!(v["client"].as_u64(), Some(client));
        assert_eq!(v["tid"].as_u64(), Some(tids[i]), "vCPU {i} is the declared thread");
        assert_eq!(v["faults"].as_u64(), Some(32), "each vCPU thread read 32 missing pages");
        assert!(v["blocked_ns"].as_u64().unwrap() > 0);
        assert!(
            v["latency_ns"].as_u64().unwrap() >= v["blocked_ns"].as_u64().unwrap(),
            "overlapping waits count once in blocktime"
        );
    }
    assert_eq!(bt["non_vcpu_faults"].as_u64(), Some(32), "the main thread is no vCPU");
    let dist: Vec<u64> =
        json["postcopy-latency-dist"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    assert_eq!(dist.len(), 24);
    assert_eq!(dist.iter().sum::<u64>(), 96, "every remote fault is in the distribution once");
    let all = bt["all_vcpus_blocked_ns"].as_u64().unwrap();
    let min_vcpu = vcpus.iter().map(|v| v["blocked_ns"].as_u64().unwrap()).min().unwrap();
    assert!(
        all <= min_vcpu,
        "all vCPUs blocked at once ({all}) can be no longer than one of them ({min_vcpu})"
    );
    assert_eq!(json["postcopy-blocktime"].as_u64(), Some(all / 1_000_000));
    let vb: Vec<u64> =
        json["postcopy-vcpu-blocktime"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    assert_eq!(vb, vcpus.iter().map(|v| v["blocked_ns"].as_u64().unwrap() / 1_000_000).collect::<Vec<_>>());
    let lat_sum: u64 = bt["non_vcpu_latency_ns"].as_u64().unwrap()
        + vcpus.iter().map(|v| v["latency_ns"].as_u64().unwrap()).sum::<u64>();
    assert_eq!(json["postcopy-latency"].as_u64(), Some(lat_sum / 96));
    assert_eq!(
        json["postcopy-non-vcpu-latency"].as_u64(),
        Some(bt["non_vcpu_latency_ns"].as_u64().unwrap() / 32)
    );
    assert_eq!(json["postcopy-vcpu-latency"].as_array().unwrap().len(), 2);

    // OpenMetrics: the same numbers.
    assert_eq!(f["postcopy_blocktime_seconds"].1.as_deref(), Some("seconds"));
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert!(close(
        one(&f, "postcopy_blocktime_seconds", "postcopy_blocktime_seconds_total", None),
        all as f64 / 1e9
    ));
    for (i, v) in vcpus.iter().enumerate() {
        let l = Some(("vcpu", ["0", "1"][i]));
        let got = one(&f, "postcopy_vcpu_blocktime_seconds", "postcopy_vcpu_blocktime_seconds_total", l);
        assert!(close(got, secs(&v["blocked_ns"])), "vCPU {i}");
        let fam = "postcopy_vcpu_fault_latency_seconds";
        assert_eq!(one(&f, fam, &format!("{fam}_count"), l), 32.0);
        assert!(close(one(&f, fam, &format!("{fam}_sum"), l), secs(&v["latency_ns"])));
    }
    let h = "postcopy_fault_latency_seconds";
    assert_eq!(f[h].0, "histogram");
    let buckets: Vec<&Sample> = f[h].2.iter().filter(|s| s.name.ends_with("_bucket")).collect();
    assert_eq!(buckets.len(), 24);
    assert_eq!(buckets.last().unwrap().labels["le"], "+Inf");
    let mut cum = 0;
    for (i, b) in buckets.iter().enumerate() {
        cum += dist[i];
        assert_eq!(b.value, cum as f64, "bucket {i} is cumulative");
        if i < 23 {
            assert!(close(b.labels["le"].parse::<f64>().unwrap(), (2u64 << i) as f64 * 1e-6));
        }
    }
    assert_eq!(one(&f, h, &format!("{h}_count"), None), 96.0);
    assert!(close(one(&f, h, &format!("{h}_sum"), None), lat_sum as f64 / 1e9));
    let g = &json["broker"];
    for k in ["faults", "pages_demand", "requests", "wakes", "clients_registered"] {
        let fam = format!("postcopy_{k}");
        assert_eq!(one(&f, &fam, &format!("{fam}_total"), None), g[k].as_u64().unwrap() as f64, "{k}");
    }
    assert_eq!(
        one(&f, "postcopy_received_pages", "postcopy_received_pages", None),
        json["received_pages"].as_u64().unwrap() as f64
    );
    assert!(json["received_pages"].as_u64().unwrap() >= 96);
}

#[test]
fn declaring_vcpus_without_thread_ids_is_refused() {
    let s =
        Serve::start("metrics-nothreadid", &common::clients::content(16, 4096, 1), &["--block", "ram:64K"]);
    let mut ctl = s.client();
    let blocks = ctl.get_blocks(Some(vec!["ram".into()])).unwrap();
    assert_eq!(blocks.len(), 1);
    let uffd = postcopy_broker::uffd::Uffd::open(postcopy_broker::uffd::feature::MISSING_SHMEM).unwrap();
    let err = ctl
        .register_with_vcpus(
            "no-tid",
            postcopy_broker::control::ClientKind::Shared,
            None,
            &[],
            &[1234],
            std::os::fd::AsFd::as_fd(&uffd),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("UFFD_FEATURE_THREAD_ID"), "{err}");
    let with = postcopy_broker::uffd::Uffd::open(
        postcopy_broker::uffd::feature::MISSING_SHMEM | postcopy_broker::uffd::feature::THREAD_ID,
    )
    .unwrap();
    assert_ne!(
        postcopy_broker::uffd::features_of(std::os::fd::AsRawFd::as_raw_fd(&with)).unwrap()
            & postcopy_broker::uffd::feature::THREAD_ID,
        0,
        "the broker reads a peer's uffd features from fdinfo"
    );
}
