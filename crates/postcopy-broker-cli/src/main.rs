//! The `postcopy-broker` command line.

#![deny(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use postcopy_broker_cli::cli;
use postcopy_broker_cli::cli::incoming::IncomingOptions;

/// Postcopy live migration of shared guest RAM.
#[derive(Debug, Parser)]
#[command(name = "postcopy-broker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check whether this host can run postcopy on shared memory (exit 0 only if it can).
    Probe {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve guest RAM to a destination: connect (mutual TLS or a pre-shared key), precopy
    /// (optional), postcopy.
    Source(postcopy_broker_cli::cli::source::SourceArgs),
    /// Run the broker: own the RAM blocks, serve client faults from a page source, answer on
    /// the control socket. With --incoming it receives a live migration from `source`; with
    /// --block and --image it restores lazily from a snapshot; with --image alone it serves
    /// Firecracker's private memory.
    Serve {
        /// Receive a migration: listen on ADDR:PORT (port 0 picks one; the first stdout line
        /// is `listening ADDR`). The RAM blocks come from the source's Hello.
        #[arg(long, value_name = "ADDR:PORT", conflicts_with_all = ["image", "blocks"], env = "POSTCOPY_BROKER_INCOMING")]
        incoming: Option<String>,
        /// With --incoming: mutual TLS 1.3 with the certificates of DIR: ca-cert.pem,
        /// server-cert.pem and server-key.pem (QEMU's tls-creds-x509 layout; sources need a
        /// certificate from that CA). See docs/security.md.
        #[arg(
            long,
            value_name = "DIR",
            requires = "incoming",
            conflicts_with = "key",
            env = "POSTCOPY_BROKER_TLS_DIR"
        )]
        tls_dir: Option<PathBuf>,
        /// With --tls-dir: accept only sources whose certificate is valid for NAME (a DNS name or
        /// IP address). Default: any certificate from the CA.
        #[arg(long, value_name = "NAME", requires = "tls_dir", env = "POSTCOPY_BROKER_TLS_PEER_NAME")]
        tls_peer_name: Option<String>,
        /// With --incoming: pre-shared key file (hex or raw, >= 16 bytes, mode 0600), the same as
        /// the source's: the connections are authenticated and encrypted with it (Noise NNpsk0).
        #[arg(long, value_name = "FILE", requires = "incoming", env = "POSTCOPY_BROKER_KEY")]
        key: Option<PathBuf>,
        /// With --key: authenticate with the key but receive guest RAM unencrypted and without
        /// integrity protection, for a link you trust (the source must say it too).
        #[arg(long, requires = "key", env = "POSTCOPY_BROKER_INSECURE_PLAINTEXT")]
        insecure_plaintext: bool,
        /// With --incoming: write the RAM's checksums (JSON, as `source --verify-file`) here.
        #[arg(long, value_name = "FILE", requires = "incoming", env = "POSTCOPY_BROKER_VERIFY_FILE")]
        verify_file: Option<PathBuf>,
        /// Write the summary as JSON here at the end: with --incoming the migration summary;
        /// for a lazy restore the final report, whether it completed, and its restarts.
        #[arg(long, value_name = "FILE", env = "POSTCOPY_BROKER_SUMMARY_JSON")]
        summary_json: Option<PathBuf>,
        /// With --incoming: if the connection to the source drops during postcopy, wait this many
        /// seconds for it to reconnect and resume before giving up (docs/recovery.md).
        #[arg(
            long,
            value_name = "SECS",
            default_value_t = 60.0,
            requires = "incoming",
            env = "POSTCOPY_BROKER_RESUME_TIMEOUT"
        )]
        resume_timeout: f64,
        /// With --incoming: drop a connection to the source once nothing the destination wrote
        /// to it has been taken for this many seconds (the source or a middlebox stopped reading
        /// without closing, or the path is cut; TCP_USER_TIMEOUT): a pause during postcopy, as
        /// any cut. 0: no bound (TCP gives up by itself, minutes to hours later).
        #[arg(
            long,
            value_name = "SECS",
            default_value_t = 30.0,
            requires = "incoming",
            env = "POSTCOPY_BROKER_WRITE_TIMEOUT"
        )]
        write_timeout: f64,
        /// With --incoming: a fixed nice value (0-19) for the threads that place the background
        /// stream, for the whole migration; 0 runs them at the daemon's priority. Without it
        /// they follow demand: nice 10 while no fault waits (client faults and demand answers
        /// preempt them), the daemon's priority while faults wait (the stream is what frees
        /// them). Following needs CAP_SYS_NICE or RLIMIT_NICE (LimitNICE=); without either they
        /// run at the daemon's priority, with a warning.
        #[arg(long, value_name = "NICE",
              value_parser = clap::value_parser!(i32).range(0..=19), requires = "incoming", env = "POSTCOPY_BROKER_STREAM_NICE")]
        stream_nice: Option<i32>,
        /// With --incoming: background connections taken from the source, main included (the
        /// source's `--streams`; each is authenticated and bound to the session like the urgent
        /// one, a source asking for more gets this many).
        #[arg(long, value_name = "N", default_value_t = postcopy_broker::migration::destination::DEFAULT_MAX_STREAMS,
              value_parser = clap::value_parser!(u16).range(1..=8), requires = "incoming", env = "POSTCOPY_BROKER_MAX_STREAMS")]
        max_streams: u16,
        /// Control socket path (mode 0600). Default: $RUNTIME_DIRECTORY/control.sock under
        /// systemd, else /run/postcopy-broker/VM/control.sock with --vm, else
        /// /run/postcopy-broker.sock. Under socket activation the inherited socket is used.
        #[arg(long, env = "POSTCOPY_BROKER_CONTROL")]
        control: Option<PathBuf>,
        /// The VM this broker serves (one broker per VM: the %i of postcopy-broker@.service):
        /// names the default control socket path.
        #[arg(long, value_name = "NAME", env = "POSTCOPY_BROKER_VM", value_parser = cli::paths::parse_vm)]
        vm: Option<String>,
        /// Peer uid allowed on the control socket (repeatable; default: root and our own uid).
        #[arg(long = "allow-uid", env = "POSTCOPY_BROKER_ALLOW_UIDS", value_delimiter = ',')]
        allow_uid: Vec<u32>,
        /// What a non-root allowed uid may reach: UID=BLOCK[,BLOCK...] (repeatable). Root and
        /// the broker's own uid reach every block; other uids only what is granted, also through
        /// private registrations and Firecracker handshakes (their image ranges must lie in
        /// granted blocks). Without --block the image is granted as UID=image.
        #[arg(long = "grant", value_parser = cli::serve::parse_grant, env = "POSTCOPY_BROKER_GRANTS", value_delimiter = ' ')]
        grant: Vec<(u32, Vec<String>)>,
        /// Registrations (client userfaultfds) one control connection may hold.
        #[arg(long, value_name = "N", default_value_t = postcopy_broker::fault::ControlLimits::REGISTRATIONS_PER_CONNECTION, env = "POSTCOPY_BROKER_MAX_REGISTRATIONS_PER_CONNECTION")]
        max_registrations_per_connection: usize,
        /// Registrations all control connections of one uid may hold (including clients retired
        /// for misbehaving whose process still lives).
        #[arg(long, value_name = "N", default_value_t = postcopy_broker::fault::ControlLimits::REGISTRATIONS_PER_UID, env = "POSTCOPY_BROKER_MAX_REGISTRATIONS_PER_UID")]
        max_registrations_per_uid: usize,
        /// Control connections one uid may have open at once (Firecracker keeps its own open for
        /// the life of its VM).
        #[arg(long, value_name = "N", default_value_t = postcopy_broker::fault::ControlLimits::CONNECTIONS_PER_UID, env = "POSTCOPY_BROKER_MAX_CONNECTIONS_PER_UID")]
        max_connections_per_uid: usize,
        /// Snapshot image: the blocks back to back (lazy restore), and the memory file of
        /// Firecracker clients.
        #[arg(long, env = "POSTCOPY_BROKER_IMAGE")]
        image: Option<PathBuf>,
        /// A RAM block NAME:SIZE[:4k|2m] (repeatable), in image order.
        #[arg(long = "block", value_parser = cli::serve::parse_block, env = "POSTCOPY_BROKER_BLOCKS", value_delimiter = ',')]
        blocks: Vec<(String, u64, u64)>,
        /// Do not push pages in the background; serve faults only.
        #[arg(long, env = "POSTCOPY_BROKER_NO_BACKGROUND")]
        no_background: bool,
        /// Busy-poll the fault loop instead of sleeping in epoll_wait.
        #[arg(long, env = "POSTCOPY_BROKER_BUSY_POLL")]
        busy_poll: bool,
        /// When every page arrived, write per-block FNV-1a checksums (JSON) here.
        #[arg(long, env = "POSTCOPY_BROKER_CHECKSUMS")]
        checksums: Option<PathBuf>,
        /// Hold the background fill until this many clients have registered.
        #[arg(long, default_value_t = 0, env = "POSTCOPY_BROKER_WAIT_CLIENTS")]
        wait_clients: u64,
        /// Be the frontend of the vhost-user backend at this socket for postcopy (repeatable):
        /// refuse to start if it lacks PAGEFAULT, run the postcopy handshake with the blocks'
        /// memfds, register it as a client, send POSTCOPY_END at the end. (Lazy restore only;
        /// with --incoming the VMM registers its backends over the control socket.)
        #[arg(
            long = "vhost-user-backend",
            value_name = "SOCKET",
            conflicts_with = "incoming",
            env = "POSTCOPY_BROKER_VHOST_USER_BACKENDS",
            value_delimiter = ','
        )]
        vhost_user_backends: Vec<PathBuf>,
    },
    /// A whole local migration as separate processes (source, destination broker, a
    /// vhost-user-blk backend, a guest driver doing I/O during postcopy), with progress, a
    /// summary and a verification of RAM and disk.
    Demo(cli::demo::DemoArgs),
    /// Benchmark the fault path against the machine's limits (the floor program bench/uffd_floor.c, run alternately).
    Bench(cli::bench::BenchArgs),
    /// Show a running broker's state and statistics.
    Status {
        /// Control socket path (default as for `serve`).
        #[arg(long, env = "POSTCOPY_BROKER_CONTROL")]
        control: Option<PathBuf>,
        /// The VM whose broker to ask (its default control socket path).
        #[arg(long, value_name = "NAME", env = "POSTCOPY_BROKER_VM", value_parser = cli::paths::parse_vm)]
        vm: Option<String>,
        /// Print JSON (the same as --format json).
        #[arg(long, conflicts_with = "format")]
        json: bool,
        /// Output format: text, json (the report, with QEMU 10.1's postcopy-* metrics at the
        /// top level) or openmetrics (the OpenMetrics text exposition, for Prometheus).
        #[arg(long, value_enum, default_value_t = cli::status::Format::Text)]
        format: cli::status::Format,
    },
}

/// Exit status of a process whose thread panicked (as Rust's own for a panicking main thread).
const PANIC_EXIT: i32 = 101;

/// A panic in any thread ends the process at once, non-zero, with the cause: a broker whose
/// fault loop or stream thread died would otherwise stay up serving nothing, and every client
/// of every VM it serves would hang without a word.
fn exit_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        log::error!("thread '{name}' panicked: {info}; the broker cannot go on and exits");
        default(info);
        #[allow(clippy::exit)] // the binary's own policy: a dead thread must not leave a zombie broker
        std::process::exit(PANIC_EXIT);
    }));
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let command = Cli::parse().command;
    let (inherited, parked) = if matches!(command, Command::Serve { .. }) {
        // SAFETY: no thread has started yet (neither env_logger nor clap starts one), so
        // unsetting LISTEN_* races with nothing.
        match unsafe { postcopy_broker_cli::systemd::take_listen_fds() } {
            Ok((fd, parked)) => (fd.map(std::sync::Arc::new), parked),
            Err(e) => return report(Err(e)),
        }
    } else {
        (None, Default::default())
    };
    exit_on_panic();
    match command {
        Command::Probe { json } => cli::probe::run(json),
        Command::Bench(a) => cli::bench::run(a),
        Command::Source(a) => report(postcopy_broker_cli::cli::source::run(&a)),
        Command::Serve {
            incoming: Some(addr),
            tls_dir,
            tls_peer_name,
            key,
            insecure_plaintext,
            verify_file,
            summary_json,
            resume_timeout,
            write_timeout,
            stream_nice,
            max_streams,
            control,
            vm,
            allow_uid,
            grant,
            busy_poll,
            max_registrations_per_connection,
            max_registrations_per_uid,
            max_connections_per_uid,
            ..
        } => report({
            cli::serve::raise_fd_limit();
            postcopy_broker_cli::cli::incoming::run(&IncomingOptions {
                addr,
                transport: postcopy_broker::migration::transport::TransportOptions {
                    tls_dir,
                    tls_peer_name,
                    key,
                    insecure_plaintext,
                },
                control: cli::paths::control_for_serve(control, vm.as_deref()),
                control_fd: inherited,
                parked: std::sync::Arc::new(parked),
                allowed_uids: allow_uid,
                grants: grant,
                busy_poll,
                verify_file,
                summary_json,
                resume_timeout: std::time::Duration::try_from_secs_f64(resume_timeout)
                    .unwrap_or(postcopy_broker::migration::destination::DEFAULT_RESUME_TIMEOUT),
                write_timeout: std::time::Duration::try_from_secs_f64(write_timeout)
                    .unwrap_or(postcopy_broker::migration::transport::DEFAULT_WRITE_TIMEOUT),
                stream_nice: postcopy_broker::sched::StreamPriority::from_nice(stream_nice),
                max_streams,
                limits: postcopy_broker::fault::ControlLimits {
                    registrations_per_connection: max_registrations_per_connection,
                    registrations_per_uid: max_registrations_per_uid,
                    connections_per_uid: max_connections_per_uid,
                },
            })
        }),
        Command::Serve {
            control,
            vm,
            allow_uid,
            grant,
            image,
            blocks,
            no_background,
            busy_poll,
            checksums,
            summary_json,
            wait_clients,
            vhost_user_backends,
            max_registrations_per_connection,
            max_registrations_per_uid,
            max_connections_per_uid,
            ..
        } => cli::serve::run(cli::serve::ServeOptions {
            parked: std::sync::Arc::new(parked),
            control: cli::paths::control_for_serve(control, vm.as_deref()),
            control_fd: inherited,
            allowed_uids: allow_uid,
            grants: grant,
            image,
            blocks,
            background: !no_background,
            busy_poll,
            checksums,
            summary_json,
            wait_clients,
            vhost_user_backends,
            limits: postcopy_broker::fault::ControlLimits {
                registrations_per_connection: max_registrations_per_connection,
                registrations_per_uid: max_registrations_per_uid,
                connections_per_uid: max_connections_per_uid,
            },
        }),
        Command::Status { control, vm, json, format } => cli::status::run(
            &control.unwrap_or_else(|| cli::paths::default_control(vm.as_deref())),
            if json { cli::status::Format::Json } else { format },
        ),
        Command::Demo(a) => cli::demo::run(&a),
    }
}

fn report(r: postcopy_broker::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("error: {e}");
            postcopy_broker_cli::systemd::tell(&format!(
                "ERRNO={}\nSTATUS=failed: {e}",
                postcopy_broker_cli::systemd::errno_of(&e)
            ));
            ExitCode::FAILURE
        }
    }
}
