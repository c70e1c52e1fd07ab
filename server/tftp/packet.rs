//! TFTP packets: the read and write requests a server receives (RFC 1350 §5, with the RFC 2347
//! option list), the ACK and ERROR packets a transfer receives, and the DATA, OACK and ERROR
//! packets it sends. Parsing takes untrusted bytes and never panics; encoding writes into a
//! caller's buffer so a transfer reuses one allocation for every block.

/// RFC 1350 opcodes.
const RRQ: u16 = 1;
const WRQ: u16 = 2;
const DATA: u16 = 3;
const ACK: u16 = 4;
const ERROR: u16 = 5;
/// RFC 2347.
const OACK: u16 = 6;

/// RFC 1350 error codes (and RFC 2347's 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// "Not defined, see error message".
    Undefined = 0,
    FileNotFound = 1,
    AccessViolation = 2,
    IllegalOperation = 4,
}

/// The options of a request we act on (RFC 2347 names, case-insensitive; values validated
/// here, so an out-of-range value is as if absent, which RFC 2347 allows: the server simply
/// does not acknowledge it).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Options {
    /// RFC 2348: 8..=65464.
    pub blksize: Option<u16>,
    /// RFC 2349: seconds, 1..=255.
    pub timeout: Option<u8>,
    /// RFC 2349: present (the client sends 0 in a read request) asks for the file size.
    pub tsize: bool,
    /// RFC 7440: 1..=65535.
    pub windowsize: Option<u16>,
}

/// A request received on the server port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Write request (refused: the server is read-only).
    pub write: bool,
    pub filename: String,
    pub options: Options,
}

/// Why a packet that claims to be a request cannot be one (answered with an ERROR packet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    #[error("the request's file name is missing its terminating NUL or is not UTF-8")]
    Filename,
    #[error("the request's transfer mode is missing or not netascii/octet (RFC 1350)")]
    Mode,
    #[error("option {0:?} has no value (RFC 2347: every option is a name and a value)")]
    OptionValue(String),
}

/// Parses a packet received on the server port: `None` when it is not a request at all (a
/// stray ACK, DATA or garbage, which a server ignores), else the request or why it is bad.
pub fn parse_request(p: &[u8]) -> Option<Result<Request, BadRequest>> {
    let write = match opcode(p)? {
        RRQ => false,
        WRQ => true,
        _ => return None,
    };
    Some(request(write, &p[2..]))
}

fn request(write: bool, rest: &[u8]) -> Result<Request, BadRequest> {
    let (filename, rest) = nul_str(rest).ok_or(BadRequest::Filename)?;
    let (mode, mut rest) = nul_str(rest).ok_or(BadRequest::Mode)?;
    // netascii is accepted and served as the file's bytes: what TFTP serves here are binary
    // boot images, which a netascii translation (LF → CR LF) would corrupt; tftp-hpa's client
    // asks for netascii unless told `-m binary`. "mail" is obsolete (RFC 1350) and refused.
    if !(mode.eq_ignore_ascii_case("octet") || mode.eq_ignore_ascii_case("netascii")) {
        return Err(BadRequest::Mode);
    }
    let mut options = Options::default();
    let mut seen = Vec::new();
    while !rest.is_empty() {
        let (name, after) = nul_str(rest).ok_or(BadRequest::OptionValue(String::new()))?;
        let (value, after) =
            nul_str(after).ok_or_else(|| BadRequest::OptionValue(name.to_string()))?;
        rest = after;
        let name = name.to_ascii_lowercase();
        if seen.contains(&name) {
            continue; // the first occurrence counts
        }
        match name.as_str() {
            "blksize" => {
                options.blksize = value.parse().ok().filter(|b| (8..=65464).contains(b));
            }
            "timeout" => options.timeout = value.parse().ok().filter(|t| *t >= 1),
            "tsize" => options.tsize = value.parse::<u64>().is_ok(),
            "windowsize" => options.windowsize = value.parse().ok().filter(|w| *w >= 1),
            _ => {} // unknown options are not acknowledged (RFC 2347)
        }
        seen.push(name);
    }
    Ok(Request {
        write,
        filename: filename.to_string(),
        options,
    })
}

/// What a transfer receives from its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ack(u16),
    /// The client gave up, with its message.
    Error(String),
}

/// Parses a packet received on a transfer's socket; `None` for anything else (ignored).
pub fn parse_reply(p: &[u8]) -> Option<Reply> {
    match opcode(p)? {
        ACK if p.len() >= 4 => Some(Reply::Ack(u16::from_be_bytes([p[2], p[3]]))),
        ERROR if p.len() >= 4 => {
            let code = u16::from_be_bytes([p[2], p[3]]);
            let msg = p[4..].split(|b| *b == 0).next().unwrap_or_default();
            Some(Reply::Error(format!(
                "error {code}: {}",
                String::from_utf8_lossy(msg)
            )))
        }
        _ => None,
    }
}

fn opcode(p: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*p.first()?, *p.get(1)?]))
}

/// The NUL-terminated UTF-8 string at the start of `p`, and what follows it.
fn nul_str(p: &[u8]) -> Option<(&str, &[u8])> {
    let end = p.iter().position(|b| *b == 0)?;
    Some((std::str::from_utf8(&p[..end]).ok()?, &p[end + 1..]))
}

/// Starts a DATA packet for `block` in `buf` (the caller appends the data).
pub fn data_header(buf: &mut Vec<u8>, block: u16) {
    buf.clear();
    buf.extend_from_slice(&DATA.to_be_bytes());
    buf.extend_from_slice(&block.to_be_bytes());
}

/// An ERROR packet.
pub fn error(code: ErrorCode, msg: &str) -> Vec<u8> {
    let mut buf = Vec::with_capacity(5 + msg.len());
    buf.extend_from_slice(&ERROR.to_be_bytes());
    buf.extend_from_slice(&(code as u16).to_be_bytes());
    // A message with a NUL inside would end early on the wire; none of ours has one.
    buf.extend_from_slice(msg.as_bytes());
    buf.push(0);
    buf
}

/// An OACK packet acknowledging `options` (name, value) in order.
pub fn oack(options: &[(&str, String)]) -> Vec<u8> {
    let mut buf = OACK.to_be_bytes().to_vec();
    for (name, value) in options {
        buf.extend_from_slice(name.as_bytes());
        buf.push(0);
        buf.extend_from_slice(value.as_bytes());
        buf.push(0);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_with_options() {
        let r = parse_request(
            b"\x00\x01efi/ipxe.efi\x00OCTET\x00BlkSize\x001468\x00tsize\x000\x00windowsize\x008\x00timeout\x002\x00x-unknown\x00y\x00",
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.filename, "efi/ipxe.efi");
        assert!(!r.write);
        assert_eq!(
            r.options,
            Options {
                blksize: Some(1468),
                timeout: Some(2),
                tsize: true,
                windowsize: Some(8)
            }
        );
        let w = parse_request(b"\x00\x02up\x00netascii\x00")
            .unwrap()
            .unwrap();
        assert!(w.write);
        assert_eq!(w.options, Options::default());
    }

    #[test]
    fn out_of_range_options_are_as_if_absent_and_the_first_counts() {
        let r = parse_request(
            b"\x00\x01f\x00octet\x00blksize\x007\x00timeout\x000\x00windowsize\x000\x00tsize\x00x\x00",
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.options, Options::default());
        let r = parse_request(b"\x00\x01f\x00octet\x00blksize\x0065465\x00blksize\x00512\x00")
            .unwrap()
            .unwrap();
        assert_eq!(r.options.blksize, None);
    }

    #[test]
    fn garbage_is_ignored_or_refused_never_a_panic() {
        for p in [
            &b""[..],
            b"\x00",
            b"\x00\x04\x00\x01",
            b"\x00\x09x\x00",
            &[0xff; 600],
        ] {
            assert_eq!(parse_request(p), None, "{p:?}");
        }
        assert_eq!(
            parse_request(b"\x00\x01no-terminator"),
            Some(Err(BadRequest::Filename))
        );
        assert_eq!(parse_request(b"\x00\x01f\x00"), Some(Err(BadRequest::Mode)));
        assert_eq!(
            parse_request(b"\x00\x01f\x00mail\x00"),
            Some(Err(BadRequest::Mode))
        );
        assert_eq!(
            parse_request(b"\x00\x01a\x00octet\x00blksize\x00"),
            Some(Err(BadRequest::OptionValue("blksize".into())))
        );
        assert_eq!(
            parse_request(b"\x00\x01\xff\x00octet\x00"),
            Some(Err(BadRequest::Filename))
        );
        // Every prefix of a valid request parses to something without panicking.
        let full = b"\x00\x01a/b\x00octet\x00blksize\x001468\x00";
        for n in 0..full.len() {
            let _ = parse_request(&full[..n]);
        }
    }

    #[test]
    fn random_and_mutated_packets_never_panic() {
        // xorshift: deterministic noise, and valid packets with bytes flipped or cut.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let valid: &[&[u8]] = &[
            b"\x00\x01a/b.efi\x00octet\x00blksize\x001468\x00tsize\x000\x00windowsize\x008\x00",
            b"\x00\x04\x12\x34",
            b"\x00\x05\x00\x08no\x00",
        ];
        for i in 0..20_000 {
            let p: Vec<u8> = if i % 2 == 0 {
                (0..next() % 64).map(|_| next() as u8).collect()
            } else {
                let mut p = valid[i % valid.len()].to_vec();
                let at = next() as usize % p.len();
                p[at] = next() as u8;
                p.truncate(next() as usize % (p.len() + 1));
                p
            };
            let _ = parse_request(&p);
            let _ = parse_reply(&p);
        }
    }

    #[test]
    fn replies() {
        assert_eq!(parse_reply(b"\x00\x04\x01\x02"), Some(Reply::Ack(0x0102)));
        assert_eq!(
            parse_reply(b"\x00\x05\x00\x08tsize only\x00"),
            Some(Reply::Error("error 8: tsize only".into()))
        );
        assert_eq!(
            parse_reply(b"\x00\x05\x00\x00"),
            Some(Reply::Error("error 0: ".into()))
        );
        for p in [
            &b""[..],
            b"\x00\x04\x01",
            b"\x00\x03\x00\x01data",
            b"\x00\x01f\x00octet\x00",
        ] {
            assert_eq!(parse_reply(p), None, "{p:?}");
        }
    }

    #[test]
    fn encoding() {
        let mut b = Vec::new();
        data_header(&mut b, 0xfffe);
        assert_eq!(b, b"\x00\x03\xff\xfe");
        assert_eq!(
            error(ErrorCode::FileNotFound, "x"),
            b"\x00\x05\x00\x01x\x00"
        );
        assert_eq!(
            oack(&[("blksize", "1468".into()), ("tsize", "5".into())]),
            b"\x00\x06blksize\x001468\x00tsize\x005\x00"
        );
    }
}
