//! `postcopy-broker probe` as a user runs it: JSON and human output, exit status, and the
//! hugetlbfs check exercised once huge pages are reserved.

mod common;

use std::process::Command;

use serde_json::Value;

fn probe(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_postcopy-broker")).arg("probe").args(args).output().unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap())
}

#[test]
fn the_probe_json_says_this_host_supports_postcopy_on_shared_memory() {
    common::ensure_free_huge_pages(4);
    let (ok, out) = probe(&["--json"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(ok, "exit status 0 when postcopy on shared memory works: {out}");
    assert_eq!(v["postcopy_shared_ok"], true, "{out}");
    assert_eq!(v["missing_shmem"], true, "{out}");
    for ioctl in ["wake", "copy", "zeropage"] {
        assert_eq!(v["ioctls"][ioctl], true, "{ioctl}: {out}");
    }
    assert_eq!(v["missing_hugetlbfs"], true, "{out}");
    assert_eq!(v["hugetlbfs_tested"], true, "huge pages are reserved, so hugetlbfs is exercised: {out}");
    assert_eq!(v["uid"], 0);
    assert!(v["syscall"]["ok"] == true || v["device"]["ok"] == true, "{out}");
    assert!(v["creation"].is_string(), "{out}");
    let features: Vec<&str> = v["features"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(features.contains(&"MISSING_SHMEM") && features.contains(&"MISSING_HUGETLBFS"), "{features:?}");
    let sizes = v["huge_page_sizes"].as_array().unwrap();
    let two_m = sizes.iter().find(|h| h["size"] == 2u64 << 20).expect("2 MiB huge pages listed");
    assert!(two_m["total"].as_u64().unwrap() >= 4, "{two_m}");
    assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{out}");
}

#[test]
fn the_human_probe_output_says_supported() {
    let (ok, out) = probe(&[]);
    assert!(ok, "{out}");
    assert!(out.contains("postcopy on shared memory: SUPPORTED"), "{out}");
    assert!(!out.contains("NOT SUPPORTED"), "{out}");
    assert!(out.contains("MISSING on shmem (memfd)    yes"), "{out}");
    assert!(out.contains("WAKE yes COPY yes ZEROPAGE yes"), "{out}");
}

#[test]
fn the_library_probe_agrees_with_the_cli() {
    common::ensure_free_huge_pages(4);
    let r = postcopy_broker::probe::probe();
    assert!(r.postcopy_shared_ok, "{:?}", r.problems);
    assert!(r.hugetlbfs_tested && r.missing_hugetlbfs);
    let text = postcopy_broker::probe::render(&r);
    assert!(text.contains("SUPPORTED") && !text.contains("NOT SUPPORTED"), "{text}");
}

#[test]
fn without_userfaultfd_access_the_probe_fails_and_says_what_to_do() {
    use std::os::unix::process::CommandExt;
    // An unprivileged user: /dev/userfaultfd is root-only here, and the system call (without
    // UFFD_USER_MODE_ONLY, which the broker needs for vhost-user backends) is refused unless
    // vm.unprivileged_userfaultfd=1.
    let unpriv = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap();
    let dev_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata("/dev/userfaultfd").unwrap().permissions(),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
        .args(["probe", "--json"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(v["uid"], 65534);
    if unpriv.trim() == "0" && dev_mode & 0o006 == 0 {
        assert!(!out.status.success(), "exit status is not 0 when postcopy cannot work: {text}");
        assert_eq!(v["postcopy_shared_ok"], false);
        assert_eq!((&v["syscall"]["ok"], &v["device"]["ok"]), (&Value::Bool(false), &Value::Bool(false)));
        let problems = v["problems"].as_array().unwrap();
        let p = problems[0].as_str().unwrap();
        assert!(p.contains("vm.unprivileged_userfaultfd=1") && p.contains("/dev/userfaultfd"), "{p}");
        let human = Command::new(env!("CARGO_BIN_EXE_postcopy-broker"))
            .arg("probe")
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        assert_eq!(human.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&human.stdout).contains("NOT SUPPORTED"));
    } else {
        // The host lets unprivileged users have userfaultfds: the probe says so.
        assert!(out.status.success(), "{text}");
        assert_eq!(v["postcopy_shared_ok"], true);
    }
}
