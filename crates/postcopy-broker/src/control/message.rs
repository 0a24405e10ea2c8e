//! Turning decoded frames into typed messages: JSON parsing, unknown-op detection, and the check
//! that each message came with exactly the fds it may carry (extra fds are closed by dropping).

use std::os::fd::OwnedFd;

use super::error::ControlError;
use super::frame::Decoded;
use super::protocol::{FcRegion, Request, Response, REQUEST_OPS};

/// A message received by the server on a control connection.
#[derive(Debug)]
pub enum Incoming {
    /// A request and exactly the fds it needs ([`Request::expected_fds`]).
    Request(Request, Vec<OwnedFd>),
    /// Firecracker's UFFD handshake: its regions and its userfaultfd. Nothing else follows on that
    /// connection; its end of file is normal and does not end the client.
    Firecracker(Vec<FcRegion>, OwnedFd),
}

/// Parse a request payload and check its fds.
pub fn decode_request(payload: &[u8], fds: Vec<OwnedFd>) -> Result<Incoming, ControlError> {
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| ControlError::BadJson(e.to_string()))?;
    let op = match value.get("op") {
        Some(serde_json::Value::String(op)) => op.clone(),
        Some(_) => return Err(ControlError::BadJson("field 'op' must be a string".into())),
        None if value.is_object() => return Err(ControlError::BadJson("missing field 'op'".into())),
        None => return Err(ControlError::BadJson("a message must be a JSON object with an 'op'".into())),
    };
    if !REQUEST_OPS.contains(&op.as_str()) {
        return Err(ControlError::UnknownOp(op));
    }
    let req: Request =
        serde_json::from_value(value).map_err(|e| ControlError::BadJson(format!("'{op}': {e}")))?;
    check_fds(req.op(), req.expected_fds(), fds.len())?;
    Ok(Incoming::Request(req, fds))
}

/// Turn a decoded unit into an [`Incoming`] (server side).
pub fn decode_incoming(d: Decoded) -> Result<Incoming, ControlError> {
    match d {
        Decoded::Frame { payload, fds } => decode_request(&payload, fds),
        Decoded::Firecracker { regions, fds } => {
            check_fds("Firecracker handshake", 1, fds.len())?;
            let mut resolved = Vec::with_capacity(regions.len());
            for (i, r) in regions.iter().enumerate() {
                resolved.push(r.resolve().ok_or_else(|| {
                    ControlError::BadJson(format!(
                        "Firecracker handshake region {i}: neither 'page_size' nor 'page_size_kib' is given"
                    ))
                })?);
            }
            let uffd = fds.into_iter().next().ok_or_else(|| ControlError::MissingFd {
                op: "Firecracker handshake".into(),
                expected: 1,
                got: 0,
            })?;
            Ok(Incoming::Firecracker(resolved, uffd))
        }
    }
}

/// Parse a response payload (client side). Responses may carry any number of fds up to the frame
/// limit; the caller matches them to the response.
pub fn decode_response(payload: &[u8]) -> Result<Response, ControlError> {
    serde_json::from_slice(payload).map_err(|e| ControlError::BadJson(format!("reply: {e}")))
}

fn check_fds(op: &str, expected: usize, got: usize) -> Result<(), ControlError> {
    if got < expected {
        Err(ControlError::MissingFd { op: op.into(), expected, got })
    } else if got > expected {
        Err(ControlError::TooManyFds { op: op.into(), max: expected, got })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::FcRegionWire;

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    const REGISTER: &str = r#"{"op":"register","name":"vm","kind":"private","mappings":[]}"#;

    #[test]
    fn good_requests() {
        match decode_request(br#"{"op":"status"}"#, Vec::new()).unwrap() {
            Incoming::Request(Request::Status, fds) => assert!(fds.is_empty()),
            other => panic!("{other:?}"),
        }
        match decode_request(REGISTER.as_bytes(), vec![fd()]).unwrap() {
            Incoming::Request(Request::Register { pid: None, .. }, fds) => assert_eq!(fds.len(), 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_json() {
        for bad in [&b"{"[..], b"", b"[1]", b"{\"op\":3}", b"{\"name\":\"x\"}", b"{\"op\":\"unregister\"}"] {
            assert!(matches!(decode_request(bad, Vec::new()), Err(ControlError::BadJson(_))), "{bad:?}");
        }
    }

    #[test]
    fn unknown_op() {
        match decode_request(br#"{"op":"format_disk"}"#, Vec::new()) {
            Err(ControlError::UnknownOp(op)) => assert_eq!(op, "format_disk"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fd_counts() {
        assert!(matches!(
            decode_request(REGISTER.as_bytes(), Vec::new()),
            Err(ControlError::MissingFd { expected: 1, got: 0, .. })
        ));
        assert!(matches!(
            decode_request(REGISTER.as_bytes(), vec![fd(), fd()]),
            Err(ControlError::TooManyFds { max: 1, got: 2, .. })
        ));
        assert!(matches!(
            decode_request(br#"{"op":"status"}"#, vec![fd()]),
            Err(ControlError::TooManyFds { max: 0, got: 1, .. })
        ));
    }

    #[test]
    fn firecracker_needs_one_fd_and_a_page_size() {
        let region = FcRegionWire {
            base_host_virt_addr: 0x1000,
            size: 4096,
            offset: 0,
            page_size: None,
            page_size_kib: Some(4096),
        };
        let ok = decode_incoming(Decoded::Firecracker { regions: vec![region.clone()], fds: vec![fd()] });
        assert!(matches!(ok, Ok(Incoming::Firecracker(r, _)) if r[0].page_size == 4096));
        let none = decode_incoming(Decoded::Firecracker { regions: vec![region.clone()], fds: vec![] });
        assert!(matches!(none, Err(ControlError::MissingFd { .. })));
        let mut nopage = region;
        nopage.page_size_kib = None;
        let bad = decode_incoming(Decoded::Firecracker { regions: vec![nopage], fds: vec![fd()] });
        assert!(matches!(bad, Err(ControlError::BadJson(_))));
    }
}
