//! Default paths of a broker on a host: one broker per VM, its control socket in the VM's
//! runtime directory (`RuntimeDirectory=postcopy-broker/%i` of postcopy-broker@.service, which
//! systemd passes as $RUNTIME_DIRECTORY), or /run/postcopy-broker/VM/ without systemd.

use std::path::{Path, PathBuf};

/// The directory of every VM's runtime directory.
pub const RUNTIME_BASE: &str = "/run/postcopy-broker";

/// The control socket's file name in a VM's runtime directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// The control socket path without `--control`: `$RUNTIME_DIRECTORY/control.sock` when
/// systemd gave the service one (the first, if several), else
/// `/run/postcopy-broker/VM/control.sock` for `--vm VM`, else `/run/postcopy-broker.sock`.
pub fn default_control(vm: Option<&str>) -> PathBuf {
    let runtime = std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|d| d.to_str().and_then(|d| d.split(':').next()).map(PathBuf::from))
        .filter(|d| d.is_absolute());
    match (runtime, vm) {
        (Some(dir), _) => dir.join(CONTROL_SOCKET),
        (None, Some(vm)) => Path::new(RUNTIME_BASE).join(vm).join(CONTROL_SOCKET),
        (None, None) => PathBuf::from("/run/postcopy-broker.sock"),
    }
}

/// The control socket of `serve`: `explicit`, or the default; a missing per-VM directory under
/// [`RUNTIME_BASE`] is created (mode 0700) so that a broker started by hand finds it.
pub fn control_for_serve(explicit: Option<PathBuf>, vm: Option<&str>) -> PathBuf {
    let path = explicit.unwrap_or_else(|| default_control(vm));
    if let Some(dir) = path.parent().filter(|d| d.starts_with(RUNTIME_BASE) && !d.exists()) {
        use std::os::unix::fs::DirBuilderExt;
        if let Err(e) = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
            log::warn!("cannot create {}: {e}", dir.display());
        }
    }
    path
}

/// Check a VM name (for clap): it becomes a directory name, so no `/`, no leading `.`.
pub fn parse_vm(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && !s.starts_with('.')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@:".contains(c));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("VM name '{s}': use letters, digits and - _ . @ : (not starting with '.')"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_stay_one_directory() {
        assert!(parse_vm("vm-1.a").is_ok());
        for bad in ["", "..", "../etc", "a/b", ".hidden"] {
            assert!(parse_vm(bad).is_err(), "{bad}");
        }
    }
}
