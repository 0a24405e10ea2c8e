//! The randomized end-to-end scenario test's parts (issue #11 item 5). A seed fixes a scenario
//! (`generate`, described by `plan`); `content` and `model` say what guest RAM must hold;
//! `launch`, `pcb`, `vhost` and `dpdk` start the real processes; `runner` drives one run under the
//! `watch`dog; `oracle` and `counters` judge it. docs/testing.md describes the whole.

pub mod content;
pub mod counters;
pub mod dpdk;
pub mod generate;
pub mod launch;
pub mod model;
pub mod oracle;
pub mod pcb;
pub mod plan;
pub mod procs;
pub mod rng;
pub mod runner;
pub mod vhost;
pub mod watch;

/// The scenario of `seed`.
pub fn scenario(seed: u64) -> plan::Scenario {
    generate::draw(seed, content::zero_pages)
}
