//! The status report as an OpenMetrics text exposition (`status --format openmetrics`), for
//! Prometheus and anything else that scrapes that format: one family per counter or gauge of the
//! report, the postcopy blocktime and the remote fault latency histogram with QEMU 10.1's meanings
//! (see [`crate::blocktime`]), per-client fault counters. Times are exact decimal seconds.

use std::fmt::Write as _;

use crate::blocktime::LATENCY_BUCKETS;
use crate::stats::StatusReport;

/// The prefix of every metric family.
pub const PREFIX: &str = "postcopy";

/// The report as OpenMetrics text, ending in `# EOF`.
pub fn render(r: &StatusReport) -> String {
    let mut o = Out(String::new());
    let g = &r.broker;
    o.gauge("received_pages", "Guest RAM pages received so far.", &[("", r.received_pages)]);
    o.gauge("total_pages", "Guest RAM pages in all blocks.", &[("", r.total_pages)]);
    o.gauge("outstanding_requests", "Page requests not yet answered.", &[("", r.outstanding)]);
    o.gauge("clients", "Registered clients now.", &[("", r.clients.len() as u64 + r.clients_omitted)]);
    let blocks: Vec<(String, u64)> =
        r.blocks.iter().map(|b| (format!("block=\"{}\"", escape(&b.name)), b.received)).collect();
    o.gauge_labeled("block_received_pages", "Pages received per RAM block.", &blocks);
    for (name, help, v) in [
        ("faults", "Page-fault messages read from all userfaultfds.", g.faults),
        ("pages_demand", "Pages placed because a thread faulted on them.", g.pages_demand),
        ("pages_background", "Pages placed by the background transfer.", g.pages_background),
        ("pages_zero", "Placed pages that were zero.", g.pages_zero),
        ("requests", "Page requests sent to the source.", g.requests),
        ("wakes", "UFFDIO_WAKE ioctls issued, after coalescing.", g.wakes),
        ("clients_registered", "Clients registered.", g.clients_registered),
        ("clients_gone", "Clients gone (exited, unregistered, failed).", g.clients_gone),
        ("foreign_pages", "Pages populated behind the broker's back.", g.foreign_pages),
        ("prefaulted_pages", "Pages a registering client had populated before its uffd.", g.prefaulted_pages),
        ("holes_refilled", "Received pages found as holes and filled with zeros.", g.holes_refilled),
        ("control_errors", "Control connections closed for protocol errors.", g.control_errors),
    ] {
        o.counter(name, help, &[(String::new(), v)]);
    }
    let bt = &r.blocktime;
    o.seconds_counter(
        "blocktime_seconds",
        "Time during which every declared vCPU was blocked in a remote fault at once (QEMU postcopy-blocktime).",
        &[(String::new(), bt.all_vcpus_blocked_ns)],
    );
    let vcpu_labels: Vec<String> = bt
        .vcpus
        .iter()
        .enumerate()
        .map(|(i, v)| format!("vcpu=\"{i}\",client=\"{}\",tid=\"{}\"", v.client, v.tid))
        .collect();
    let per_vcpu = |f: fn(&crate::blocktime::VcpuBlocktime) -> u64| -> Vec<(String, u64)> {
        vcpu_labels.iter().cloned().zip(bt.vcpus.iter().map(f)).collect()
    };
    o.seconds_counter(
        "vcpu_blocktime_seconds",
        "Time each declared vCPU was blocked in remote faults (QEMU postcopy-vcpu-blocktime).",
        &per_vcpu(|v| v.blocked_ns),
    );
    o.summary(
        "vcpu_fault_latency_seconds",
        "Latency of each declared vCPU's remote faults (QEMU postcopy-vcpu-latency = sum / count).",
        &vcpu_labels
            .iter()
            .cloned()
            .zip(bt.vcpus.iter().map(|v| (v.faults, v.latency_ns)))
            .collect::<Vec<_>>(),
    );
    o.summary(
        "non_vcpu_fault_latency_seconds",
        "Latency of remote faults of threads that are no declared vCPU (QEMU postcopy-non-vcpu-latency = sum / count).",
        &[(String::new(), (bt.non_vcpu_faults, bt.non_vcpu_latency_ns))],
    );
    o.latency_histogram(bt.latency_dist.as_slice(), bt.faults(), bt.latency_ns());
    let clients: Vec<(String, &crate::stats::ClientStatus)> = r
        .clients
        .iter()
        .map(|c| {
            (format!("client=\"{}\",name=\"{}\",kind=\"{}\"", c.id, escape(&c.name), escape(&c.kind)), c)
        })
        .collect();
    let per_client = |f: fn(&crate::stats::ClientStatus) -> u64| -> Vec<(String, u64)> {
        clients.iter().map(|(l, c)| (l.clone(), f(c))).collect()
    };
    o.counter(
        "client_faults",
        "Page faults read from each live client's userfaultfd.",
        &per_client(|c| c.stats.faults),
    );
    o.counter(
        "client_pages_requested",
        "Faults of each live client that created a page request.",
        &per_client(|c| c.stats.pages_requested),
    );
    o.counter("client_wakes", "Wake ioctls issued to each live client.", &per_client(|c| c.stats.wakes));
    o.0.push_str("# EOF\n");
    o.0
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Nanoseconds as exact decimal seconds.
fn seconds(ns: u64) -> String {
    format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000)
}

fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str, unit: Option<&str>) {
        let _ = writeln!(self.0, "# TYPE {PREFIX}_{name} {kind}");
        if let Some(u) = unit {
            let _ = writeln!(self.0, "# UNIT {PREFIX}_{name} {u}");
        }
        let _ = writeln!(self.0, "# HELP {PREFIX}_{name} {help}");
    }

    fn gauge(&mut self, name: &str, help: &str, v: &[(&str, u64)]) {
        let v: Vec<(String, u64)> = v.iter().map(|(l, x)| (l.to_string(), *x)).collect();
        self.gauge_labeled(name, help, &v);
    }

    fn gauge_labeled(&mut self, name: &str, help: &str, v: &[(String, u64)]) {
        self.family(name, "gauge", help, None);
        for (l, x) in v {
            let _ = writeln!(self.0, "{PREFIX}_{name}{} {x}", braces(l));
        }
    }

    fn counter(&mut self, name: &str, help: &str, v: &[(String, u64)]) {
        self.family(name, "counter", help, None);
        for (l, x) in v {
            let _ = writeln!(self.0, "{PREFIX}_{name}_total{} {x}", braces(l));
        }
    }

    fn seconds_counter(&mut self, name: &str, help: &str, v: &[(String, u64)]) {
        self.family(name, "counter", help, Some("seconds"));
        for (l, ns) in v {
            let _ = writeln!(self.0, "{PREFIX}_{name}_total{} {}", braces(l), seconds(*ns));
        }
    }

    /// (labels, (count, sum in ns)).
    fn summary(&mut self, name: &str, help: &str, v: &[(String, (u64, u64))]) {
        self.family(name, "summary", help, Some("seconds"));
        for (l, (n, ns)) in v {
            let _ = writeln!(self.0, "{PREFIX}_{name}_count{} {n}", braces(l));
            let _ = writeln!(self.0, "{PREFIX}_{name}_sum{} {}", braces(l), seconds(*ns));
        }
    }

    /// QEMU's postcopy-latency-dist as a histogram: bucket N of [2^N, 2^(N+1)) µs becomes the
    /// cumulative bucket `le` = 2^(N+1) µs (a wait of exactly 2^(N+1) µs falls in the next one:
    /// QEMU's bounds are exclusive, OpenMetrics' inclusive); the last one is `+Inf`.
    fn latency_histogram(&mut self, dist: &[u64], count: u64, sum_ns: u64) {
        let name = "fault_latency_seconds";
        self.family(
            name,
            "histogram",
            "Latency of remote faults (those that waited for a page), all threads (QEMU postcopy-latency-dist; postcopy-latency = sum / count).",
            Some("seconds"),
        );
        let mut cum = 0u64;
        for (i, c) in dist.iter().enumerate().take(LATENCY_BUCKETS - 1) {
            cum += c;
            let le = seconds((2u64 << i) * 1000);
            let _ = writeln!(self.0, "{PREFIX}_{name}_bucket{{le=\"{le}\"}} {cum}");
        }
        let _ = writeln!(self.0, "{PREFIX}_{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(self.0, "{PREFIX}_{name}_count {count}");
        let _ = writeln!(self.0, "{PREFIX}_{name}_sum {}", seconds(sum_ns));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocktime::{BlocktimeReport, VcpuBlocktime};

    #[test]
    fn families_counters_histogram_and_eof() {
        let mut r = StatusReport::default();
        r.broker.faults = 7;
        let mut dist = vec![0; LATENCY_BUCKETS];
        dist[0] = 1;
        dist[3] = 2;
        r.blocktime = BlocktimeReport {
            vcpus: vec![VcpuBlocktime {
                client: crate::client_id::ClientId(1),
                tid: 42,
                faults: 2,
                latency_ns: 20_000,
                blocked_ns: 1_500_000_001,
            }],
            all_vcpus_blocked_ns: 1_500_000_001,
            non_vcpu_faults: 1,
            non_vcpu_latency_ns: 500,
            latency_dist: dist,
        };
        let t = render(&r);
        assert!(t.ends_with("# EOF\n"));
        assert!(t.contains("# TYPE postcopy_faults counter\n"));
        assert!(t.contains("\npostcopy_faults_total 7\n"));
        assert!(t.contains("\npostcopy_blocktime_seconds_total 1.500000001\n"));
        assert!(t.contains("# UNIT postcopy_blocktime_seconds seconds\n"));
        assert!(t.contains(
            "postcopy_vcpu_blocktime_seconds_total{vcpu=\"0\",client=\"1\",tid=\"42\"} 1.500000001\n"
        ));
        assert!(t.contains("postcopy_fault_latency_seconds_bucket{le=\"0.000002000\"} 1\n"));
        assert!(t.contains("postcopy_fault_latency_seconds_bucket{le=\"0.000008000\"} 1\n"));
        assert!(t.contains("postcopy_fault_latency_seconds_bucket{le=\"0.000016000\"} 3\n"));
        assert!(t.contains("postcopy_fault_latency_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(t.contains("postcopy_fault_latency_seconds_sum 0.000020500\n"));
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
