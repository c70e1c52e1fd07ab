//! Pure DHCP/PXE logic: validate a datagram, classify a PXE client, choose its boot file,
//! and build the ProxyDHCP reply. No IO, so golden packets pin it down (`tests.rs`).

use std::net::Ipv4Addr;

use dhcproto::v4::{self, DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use crate::mac::Mac;

/// RFC 2131 section 3: the options field starts with the magic cookie 99.130.83.99.
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// Fixed BOOTP header (236 bytes) plus the cookie.
const HEADER: usize = 240;

/// Why a datagram was dropped without an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Drop {
    /// Not a well-formed BOOTREQUEST.
    #[error("malformed: {0}")]
    Malformed(String),
    /// Well-formed, but not for us: not a PXE/HTTP boot client, or a message type we do not
    /// answer.
    #[error("ignored: {0}")]
    NotForUs(String),
    /// A PXE client whose architecture we have no boot file for.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

fn malformed(s: impl Into<String>) -> Drop {
    Drop::Malformed(s.into())
}

/// Checks the raw datagram before dhcproto sees it: a BOOTREQUEST of at least 240 bytes with
/// Ethernet addressing (htype 1, hlen 6: dhcproto 0.15 panics slicing chaddr when hlen > 16),
/// the magic cookie, and options that are well-formed TLVs ending in the END option.
pub fn validate(b: &[u8]) -> Result<(), Drop> {
    if b.len() < HEADER {
        return Err(malformed(format!(
            "{} bytes, shorter than a BOOTP header",
            b.len()
        )));
    }
    if b[0] != 1 {
        return Err(malformed(format!("op {} is not BOOTREQUEST", b[0])));
    }
    if b[1] != 1 || b[2] != 6 {
        return Err(malformed(format!(
            "htype {} / hlen {} is not Ethernet (1/6)",
            b[1], b[2]
        )));
    }
    if b[236..240] != MAGIC {
        return Err(malformed("bad magic cookie"));
    }
    let mut i = HEADER;
    loop {
        match b.get(i) {
            None => return Err(malformed("options end without the END option")),
            Some(255) => return Ok(()),
            Some(0) => i += 1,
            Some(_) => {
                let Some(&len) = b.get(i + 1) else {
                    return Err(malformed("truncated option"));
                };
                i += 2 + len as usize;
                if i > b.len() {
                    return Err(malformed("option runs past the end of the packet"));
                }
            }
        }
    }
}

/// The kind of network boot client, from options 60, 77 and 175.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// Firmware PXE (option 60 starts with `PXEClient`).
    Pxe,
    /// UEFI HTTP Boot (option 60 starts with `HTTPClient`).
    Http,
    /// iPXE itself (option 77 user class `iPXE`, or option 175 present).
    Ipxe,
    /// Any other DHCP client: answered only in address mode, with an address and no boot
    /// file.
    Other,
}

/// What a boot client asked, as far as ProxyDHCP cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PxeRequest {
    /// DHCP message type.
    pub msg_type: MessageType,
    /// Client hardware address.
    pub mac: Mac,
    /// Transaction id, echoed.
    pub xid: u32,
    /// Flags, echoed (the broadcast bit matters to the client).
    pub broadcast: bool,
    /// Client address, if it has one.
    pub ciaddr: Ipv4Addr,
    /// Relay agent address, if relayed.
    pub giaddr: Ipv4Addr,
    /// Requested address (option 50), if any.
    pub requested_ip: Option<Ipv4Addr>,
    /// Server identifier (option 54): which server a REQUEST chose.
    pub server_id: Option<Ipv4Addr>,
    /// Client kind.
    pub kind: ClientKind,
    /// RFC 4578 option 93 (client system architecture); 0 (BIOS) when missing, as PXE 2.1
    /// clients that omit it are BIOS.
    pub arch: u16,
    /// Option 97 (client machine identifier, the SMBIOS UUID), echoed when present; PXE 2.1
    /// requires it, but firmware in the wild omits it.
    pub guid: Option<Vec<u8>>,
    /// Option 60 as text, if it is short printable ASCII (kept for discovery rules).
    pub vendor_class: Option<String>,
    /// Option 77 as text: iPXE's bare string, or RFC 3004's length-prefixed instances joined
    /// with `,`; only short printable ASCII is kept.
    pub user_class: Option<String>,
}

impl PxeRequest {
    /// The UUID from option 97 (type 0 + 16 bytes) as iPXE prints `${uuid}`.
    pub fn uuid(&self) -> Option<String> {
        let g = self.guid.as_ref()?;
        if g.len() != 17 || g[0] != 0 || g[1..].iter().all(|b| *b == 0) {
            return None;
        }
        // SMBIOS 2.6+: the first three fields are little-endian.
        let b = &g[1..];
        Some(format!(
            "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{}",
            b[3],
            b[2],
            b[1],
            b[0],
            b[5],
            b[4],
            b[7],
            b[6],
            b[8],
            b[9],
            hex::encode(&b[10..16])
        ))
    }
}

/// Parses and classifies a datagram from a network boot client; anything else is
/// `NotForUs` (ProxyDHCP answers boot clients only).
pub fn classify(b: &[u8]) -> Result<PxeRequest, Drop> {
    let req = parse(b)?;
    if req.kind == ClientKind::Other {
        return Err(Drop::NotForUs(
            "not a network boot client (no PXEClient/HTTPClient vendor class)".into(),
        ));
    }
    if !matches!(
        req.msg_type,
        MessageType::Discover | MessageType::Request | MessageType::Inform
    ) {
        return Err(Drop::NotForUs(format!("message type {:?}", req.msg_type)));
    }
    Ok(req)
}

/// Parses any client's DHCP message (address mode answers every client).
pub fn parse(b: &[u8]) -> Result<PxeRequest, Drop> {
    validate(b)?;
    let msg = Message::decode(&mut Decoder::new(b)).map_err(|e| malformed(e.to_string()))?;
    if msg.opcode() != Opcode::BootRequest {
        return Err(malformed("not a BOOTREQUEST"));
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&msg.chaddr()[..6]);
    let opts = msg.opts();
    let msg_type = opts
        .msg_type()
        .ok_or_else(|| Drop::NotForUs("BOOTP without a DHCP message type".into()))?;
    if !matches!(
        msg_type,
        MessageType::Discover
            | MessageType::Request
            | MessageType::Inform
            | MessageType::Release
            | MessageType::Decline
    ) {
        return Err(Drop::NotForUs(format!("message type {msg_type:?}")));
    }
    let class = match opts.get(OptionCode::ClassIdentifier) {
        Some(DhcpOption::ClassIdentifier(c)) => c.clone(),
        _ => Vec::new(),
    };
    let user_class = match opts.get(OptionCode::UserClass) {
        Some(DhcpOption::UserClass(u)) => user_class_text(u),
        _ => None,
    };
    let is_ipxe = matches!(opts.get(OptionCode::UserClass), Some(DhcpOption::UserClass(u)) if user_class_is_ipxe(u))
        || opts.get(OptionCode::Unknown(175)).is_some();
    let kind = if class.starts_with(b"HTTPClient") {
        ClientKind::Http
    } else if is_ipxe {
        ClientKind::Ipxe
    } else if class.starts_with(b"PXEClient") {
        ClientKind::Pxe
    } else {
        ClientKind::Other
    };
    let arch = match opts.get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(a)) => u16::from(*a),
        _ => arch_from_class(&class).unwrap_or(0),
    };
    let guid = match opts.get(OptionCode::ClientMachineIdentifier) {
        Some(DhcpOption::ClientMachineIdentifier(g)) => Some(g.clone()),
        _ => None,
    };
    let requested_ip = match opts.get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    };
    let server_id = match opts.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    };
    Ok(PxeRequest {
        msg_type,
        mac: Mac(mac),
        xid: msg.xid(),
        broadcast: msg.flags().broadcast(),
        ciaddr: msg.ciaddr(),
        giaddr: msg.giaddr(),
        requested_ip,
        server_id,
        kind,
        arch,
        guid,
        vendor_class: printable(&class),
        user_class,
    })
}

/// `b` as text if it is 1 to 64 printable ASCII characters: these are claims from the network,
/// kept for the operator and for rule conditions, never trusted.
fn printable(b: &[u8]) -> Option<String> {
    (!b.is_empty() && b.len() <= 64 && b.iter().all(|c| c.is_ascii_graphic() || *c == b' '))
        .then(|| String::from_utf8_lossy(b).into_owned())
}

/// Option 77's text: iPXE sends its user class as a bare string ("iPXE"), RFC 3004 clients as
/// length-prefixed instances.
fn user_class_text(u: &[u8]) -> Option<String> {
    if let Some(s) = printable(u) {
        return Some(s);
    }
    let mut parts = Vec::new();
    let mut rest = u;
    while let Some((&len, tail)) = rest.split_first() {
        let part = tail.get(..len as usize)?;
        parts.push(printable(part)?);
        rest = &tail[len as usize..];
    }
    let joined = parts.join(",");
    (!joined.is_empty() && joined.len() <= 64).then_some(joined)
}

/// RFC 3004 user class: iPXE sends the bare string "iPXE"; accept the RFC's length-prefixed
/// form too.
fn user_class_is_ipxe(u: &[u8]) -> bool {
    u == b"iPXE" || (u.len() == 5 && u[0] == 4 && &u[1..] == b"iPXE")
}

/// Option 60 `PXEClient:Arch:00007:UNDI:003016` carries the architecture too (PXE 2.1).
fn arch_from_class(class: &[u8]) -> Option<u16> {
    let s = std::str::from_utf8(class).ok()?;
    let mut parts = s.split(':');
    while let Some(p) = parts.next() {
        if p == "Arch" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

/// Boot file names, relative to the TFTP root, by firmware.
#[derive(Debug, Clone)]
pub struct BootFiles {
    /// Legacy BIOS PXE.
    pub bios: String,
    /// x64 UEFI (arch 7 and 9).
    pub efi_x64: String,
    /// ARM64 UEFI (arch 11).
    pub efi_arm64: String,
}

impl Default for BootFiles {
    fn default() -> Self {
        BootFiles {
            bios: "undionly.kpxe".into(),
            efi_x64: "ipxe.efi".into(),
            efi_arm64: "arm64/ipxe.efi".into(),
        }
    }
}

/// What the client is told to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootTarget {
    /// A file on our TFTP server (name relative to its root).
    Tftp(String),
    /// An absolute URL (iPXE chain, or UEFI HTTP Boot).
    Url(String),
}

impl BootTarget {
    /// The `file` field value.
    pub fn file(&self) -> &str {
        match self {
            BootTarget::Tftp(f) | BootTarget::Url(f) => f,
        }
    }
}

/// The firmware name for an RFC 4578 architecture number (IANA "Processor Architecture
/// Types"), for events.
pub fn arch_name(arch: u16) -> &'static str {
    match arch {
        0 => "x86 BIOS",
        6 => "x86 UEFI",
        7 => "x64 UEFI",
        9 => "x64 UEFI (EBC)",
        10 => "ARM32 UEFI",
        11 => "ARM64 UEFI",
        15 => "x86 UEFI HTTP",
        16 => "x64 UEFI HTTP",
        19 => "ARM64 UEFI HTTP",
        _ => "unknown",
    }
}

/// Picks the boot target. `base_url` is the daemon's HTTP base (no trailing slash).
pub fn boot_target(
    req: &PxeRequest,
    files: &BootFiles,
    base_url: &str,
) -> Result<BootTarget, Drop> {
    let unsupported = || {
        Drop::Unsupported(format!(
            "architecture {} ({})",
            req.arch,
            arch_name(req.arch)
        ))
    };
    let target = match req.kind {
        // Already iPXE: go straight to the HTTP chain.
        ClientKind::Ipxe => BootTarget::Url(format!("{base_url}/boot.ipxe")),
        // UEFI HTTP Boot wants an absolute http URL and no redirect (UEFI spec 2.x, 24.7);
        // the binaries are served from the TFTP roots at /boot/.
        ClientKind::Http => match req.arch {
            16 => BootTarget::Url(format!("{base_url}/boot/{}", files.efi_x64)),
            19 => BootTarget::Url(format!("{base_url}/boot/{}", files.efi_arm64)),
            _ => return Err(unsupported()),
        },
        ClientKind::Pxe => match req.arch {
            0 => BootTarget::Tftp(files.bios.clone()),
            7 | 9 => BootTarget::Tftp(files.efi_x64.clone()),
            11 => BootTarget::Tftp(files.efi_arm64.clone()),
            _ => return Err(unsupported()),
        },
        ClientKind::Other => return Err(Drop::NotForUs("not a network boot client".into())),
    };
    // The BOOTP file field is 128 bytes including its terminating NUL (RFC 951).
    if target.file().len() > 127 {
        return Err(Drop::Unsupported(format!(
            "boot file {:?} is longer than the 127 bytes the DHCP file field holds; use a shorter --advertise URL",
            target.file()
        )));
    }
    Ok(target)
}

/// An address and its parameters, for address mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseParams {
    /// The client's address.
    pub yiaddr: Ipv4Addr,
    /// Subnet mask (option 1).
    pub netmask: Ipv4Addr,
    /// Default router (option 3).
    pub router: Option<Ipv4Addr>,
    /// DNS servers (option 6).
    pub dns: Vec<Ipv4Addr>,
    /// Lease time in seconds (option 51).
    pub lease_secs: u32,
}

/// Builds the ProxyDHCP answer: a DHCPOFFER to a DISCOVER on port 67, a DHCPACK to a
/// REQUEST/INFORM on port 4011. It never carries an address (yiaddr 0): the site's DHCP
/// server does that.
pub fn reply(req: &PxeRequest, server: Ipv4Addr, target: &BootTarget) -> Vec<u8> {
    reply_with(req, server, Some(target), None)
}

/// A DHCPNAK (RFC 2131 section 4.3.2): the requested address is not the client's to use.
pub fn nak(req: &PxeRequest, server: Ipv4Addr) -> Vec<u8> {
    let u = Ipv4Addr::UNSPECIFIED;
    let mut m = Message::new_with_id(req.xid, u, u, u, req.giaddr, &req.mac.0);
    m.set_opcode(Opcode::BootReply);
    m.set_flags(v4::Flags::default().set_broadcast());
    m.opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Nak));
    m.opts_mut().insert(DhcpOption::ServerIdentifier(server));
    encode(&m)
}

/// The yiaddr of an encoded reply, if it decodes as DHCP: the fuzz target's check that every
/// reply is well-formed and that a ProxyDHCP one hands out no address.
#[doc(hidden)]
pub fn parse_reply_for_fuzz(b: &[u8]) -> Option<Ipv4Addr> {
    Message::decode(&mut Decoder::new(b))
        .ok()
        .map(|m| m.yiaddr())
}

fn encode(m: &Message) -> Vec<u8> {
    let mut buf = Vec::with_capacity(400);
    m.encode(&mut Encoder::new(&mut buf))
        .expect("encoding into a Vec cannot fail");
    buf
}

/// Builds an OFFER (to a DISCOVER) or ACK (otherwise): with boot instructions when `target`
/// is given, and with an address when `lease` is given (address mode).
pub fn reply_with(
    req: &PxeRequest,
    server: Ipv4Addr,
    target: Option<&BootTarget>,
    lease: Option<&LeaseParams>,
) -> Vec<u8> {
    let yiaddr = lease.map_or(Ipv4Addr::UNSPECIFIED, |l| l.yiaddr);
    let mut m = Message::new_with_id(req.xid, req.ciaddr, yiaddr, server, req.giaddr, &req.mac.0);
    m.set_opcode(Opcode::BootReply);
    if req.broadcast {
        m.set_flags(v4::Flags::default().set_broadcast());
    }
    let answer = if req.msg_type == MessageType::Discover {
        MessageType::Offer
    } else {
        MessageType::Ack
    };
    if let Some(t) = target {
        m.set_fname_str(t.file());
    }
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(answer));
    o.insert(DhcpOption::ServerIdentifier(server));
    if let Some(l) = lease {
        o.insert(DhcpOption::SubnetMask(l.netmask));
        if let Some(r) = l.router {
            o.insert(DhcpOption::Router(vec![r]));
        }
        if !l.dns.is_empty() {
            o.insert(DhcpOption::DomainNameServer(l.dns.clone()));
        }
        // An INFORM gets parameters but no lease (RFC 2131 section 3.4).
        if req.msg_type != MessageType::Inform {
            o.insert(DhcpOption::AddressLeaseTime(l.lease_secs));
        }
    }
    if target.is_none() {
        return encode(&m);
    }
    // PXE 2.1 section 2.2.5: a ProxyDHCP reply identifies itself with vendor class
    // "PXEClient" (strange for a server, but that is what clients match); HTTP Boot clients
    // need "HTTPClient" echoed (UEFI spec, HTTP Boot, DHCP options).
    let class: &[u8] = if req.kind == ClientKind::Http {
        b"HTTPClient"
    } else {
        b"PXEClient"
    };
    o.insert(DhcpOption::ClassIdentifier(class.to_vec()));
    if let Some(g) = &req.guid {
        o.insert(DhcpOption::ClientMachineIdentifier(g.clone()));
    }
    // Option 43 sub-option 6 (PXE_DISCOVERY_CONTROL) = 8: skip boot server discovery and load
    // the file named here. Only for BIOS: EDK2 and other UEFI firmware ignore a proxy offer
    // that bypasses discovery, but treat an offer without option 43 as pointing at a boot
    // server on port 4011 of its sender, and ask there (pixiecore found the same).
    if req.kind == ClientKind::Pxe && req.arch == 0 {
        o.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
    }
    encode(&m)
}
