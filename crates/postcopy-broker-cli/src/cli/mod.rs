//! The `postcopy-broker` command line: one module per subcommand.

pub mod bench;
pub mod demo;
pub mod demo_check;
pub mod incoming;
pub mod park;
pub mod paths;
pub mod probe;
pub mod progress;
pub mod restore_restart;
pub mod serve;
pub mod source;
pub mod status;

/// Parse a size like `64M`, `1G`, `4096`, `0x1000` (for clap).
pub fn parse_size(s: &str) -> Result<u64, String> {
    postcopy_broker::migration::spec::parse_size(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }
}
