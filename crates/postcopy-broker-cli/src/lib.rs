//! The `postcopy-broker` daemon and command line as a library of its own: one module per
//! subcommand ([`cli`]), the benchmark ([`bench`](mod@bench)), systemd's socket activation and
//! readiness ([`systemd`]) and its fd store ([`fdstore`]). The binaries and the examples of this
//! package use it; the broker itself is the
//! `postcopy_broker` crate.

// Every integer cast that could truncate, wrap or lose a sign is a checked conversion or is
// allowed where it is made, with the reason it cannot (issue #12).
#![cfg_attr(
    not(test),
    deny(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)
)]

pub mod bench;
pub mod cli;
pub mod fdstore;
pub mod systemd;
