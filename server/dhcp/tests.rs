//! Golden packets: classification, boot file choice and replies, and malformed input.

use std::net::Ipv4Addr;

use dhcproto::v4::{Architecture, DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use super::packet::*;
use super::*;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const BASE: &str = "http://10.0.0.1:8080";

fn guid() -> Vec<u8> {
    let mut g = vec![0u8];
    g.extend([
        0x44, 0x45, 0x4c, 0x4c, 0x38, 0x00, 0x10, 0x44, 0x80, 0x51, 0xb4, 0xc0, 0x4f, 0x4d, 0x4e,
        0x32,
    ]);
    g
}

/// A DISCOVER as PXE firmware sends it.
fn discover(class: &str, arch: Option<u16>, extra: Vec<DhcpOption>) -> Vec<u8> {
    let mut m = Message::new_with_id(
        0xdead_beef,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &MAC,
    );
    m.set_flags(dhcproto::v4::Flags::default().set_broadcast());
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(MessageType::Discover));
    o.insert(DhcpOption::ClassIdentifier(class.as_bytes().to_vec()));
    if let Some(a) = arch {
        o.insert(DhcpOption::ClientSystemArchitecture(Architecture::from(a)));
    }
    for x in extra {
        o.insert(x);
    }
    let mut buf = Vec::new();
    m.encode(&mut Encoder::new(&mut buf)).unwrap();
    buf
}

fn decode(b: &[u8]) -> Message {
    Message::decode(&mut Decoder::new(b)).unwrap()
}

/// The file field up to its NUL (dhcproto 0.15 keeps the NUL when decoding).
fn fname(m: &Message) -> String {
    let f = m.fname().unwrap_or_default();
    String::from_utf8(f.split(|b| *b == 0).next().unwrap().to_vec()).unwrap()
}

#[test]
fn classifies_firmware_kinds_and_picks_boot_files() {
    let files = BootFiles::default();
    let cases: Vec<(Vec<u8>, ClientKind, u16, BootTarget)> = vec![
        (
            discover("PXEClient:Arch:00000:UNDI:002001", Some(0), vec![]),
            ClientKind::Pxe,
            0,
            BootTarget::Tftp("undionly.kpxe".into()),
        ),
        (
            discover("PXEClient:Arch:00007:UNDI:003016", Some(7), vec![]),
            ClientKind::Pxe,
            7,
            BootTarget::Tftp("ipxe.efi".into()),
        ),
        (
            discover("PXEClient:Arch:00009:UNDI:003016", Some(9), vec![]),
            ClientKind::Pxe,
            9,
            BootTarget::Tftp("ipxe.efi".into()),
        ),
        (
            discover("PXEClient:Arch:00011:UNDI:003000", Some(11), vec![]),
            ClientKind::Pxe,
            11,
            BootTarget::Tftp("arm64/ipxe.efi".into()),
        ),
        // Option 93 missing: the architecture from option 60, else BIOS.
        (
            discover("PXEClient:Arch:00007:UNDI:003016", None, vec![]),
            ClientKind::Pxe,
            7,
            BootTarget::Tftp("ipxe.efi".into()),
        ),
        (
            discover("PXEClient", None, vec![]),
            ClientKind::Pxe,
            0,
            BootTarget::Tftp("undionly.kpxe".into()),
        ),
        (
            discover("HTTPClient:Arch:00016:UNDI:003001", Some(16), vec![]),
            ClientKind::Http,
            16,
            BootTarget::Url(format!("{BASE}/boot/ipxe.efi")),
        ),
        (
            discover("HTTPClient:Arch:00019:UNDI:003001", Some(19), vec![]),
            ClientKind::Http,
            19,
            BootTarget::Url(format!("{BASE}/boot/arm64/ipxe.efi")),
        ),
        (
            discover(
                "PXEClient:Arch:00000:UNDI:002001",
                Some(0),
                vec![DhcpOption::UserClass(b"iPXE".to_vec())],
            ),
            ClientKind::Ipxe,
            0,
            BootTarget::Url(format!("{BASE}/boot.ipxe")),
        ),
        (
            discover(
                "PXEClient:Arch:00007:UNDI:003016",
                Some(7),
                vec![DhcpOption::Unknown(dhcproto::v4::UnknownOption::new(
                    OptionCode::Unknown(175),
                    vec![1, 1, 1],
                ))],
            ),
            ClientKind::Ipxe,
            7,
            BootTarget::Url(format!("{BASE}/boot.ipxe")),
        ),
    ];
    for (pkt, kind, arch, target) in cases {
        let req = classify(&pkt).unwrap();
        assert_eq!((req.kind, req.arch, req.mac.0), (kind, arch, MAC));
        assert_eq!(boot_target(&req, &files, BASE).unwrap(), target, "{req:?}");
    }
    let req = classify(&discover(
        "PXEClient:Arch:00010:UNDI:003000",
        Some(10),
        vec![],
    ))
    .unwrap();
    assert!(matches!(
        boot_target(&req, &files, BASE),
        Err(Drop::Unsupported(_))
    ));
    let req = classify(&discover(
        "HTTPClient:Arch:00015:UNDI:003000",
        Some(15),
        vec![],
    ))
    .unwrap();
    assert!(matches!(
        boot_target(&req, &files, BASE),
        Err(Drop::Unsupported(_))
    ));
}

#[test]
fn non_boot_clients_are_not_answered() {
    for class in ["", "MSFT 5.0", "android-dhcp-13", "udhcp 1.36.1"] {
        let e = classify(&discover(class, None, vec![])).unwrap_err();
        assert!(matches!(e, Drop::NotForUs(_)), "{class}: {e}");
    }
}

#[test]
fn bios_offer_bypasses_discovery_uefi_offer_sends_client_to_4011() {
    let server = Ipv4Addr::new(10, 0, 0, 1);
    let bios = classify(&discover(
        "PXEClient:Arch:00000:UNDI:002001",
        Some(0),
        vec![DhcpOption::ClientMachineIdentifier(guid())],
    ))
    .unwrap();
    let offer = decode(&reply(
        &bios,
        server,
        &BootTarget::Tftp("undionly.kpxe".into()),
    ));
    assert_eq!(offer.opcode(), Opcode::BootReply);
    assert_eq!(offer.xid(), 0xdead_beef);
    assert_eq!(
        offer.yiaddr(),
        Ipv4Addr::UNSPECIFIED,
        "a proxy never hands out an address"
    );
    assert_eq!(offer.siaddr(), server);
    assert_eq!(fname(&offer), "undionly.kpxe");
    assert!(offer.flags().broadcast());
    assert_eq!(offer.chaddr()[..6], MAC);
    let o = offer.opts();
    assert_eq!(o.msg_type(), Some(MessageType::Offer));
    assert_eq!(
        o.get(OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(server))
    );
    assert_eq!(
        o.get(OptionCode::ClassIdentifier),
        Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
    );
    assert_eq!(
        o.get(OptionCode::ClientMachineIdentifier),
        Some(&DhcpOption::ClientMachineIdentifier(guid()))
    );
    assert_eq!(
        o.get(OptionCode::VendorExtensions),
        Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255]))
    );
    assert_eq!(
        bios.uuid().as_deref(),
        Some("4c4c4544-0038-4410-8051-b4c04f4d4e32")
    );

    let efi = classify(&discover(
        "PXEClient:Arch:00007:UNDI:003016",
        Some(7),
        vec![],
    ))
    .unwrap();
    let offer = decode(&reply(&efi, server, &BootTarget::Tftp("ipxe.efi".into())));
    assert!(
        offer.opts().get(OptionCode::VendorExtensions).is_none(),
        "no option 43 for UEFI"
    );
    assert!(
        offer
            .opts()
            .get(OptionCode::ClientMachineIdentifier)
            .is_none(),
        "no GUID to echo"
    );

    // The port-4011 request is answered with an ACK.
    let mut req = efi.clone();
    req.msg_type = MessageType::Request;
    req.ciaddr = Ipv4Addr::new(10, 0, 0, 50);
    let ack = decode(&reply(&req, server, &BootTarget::Tftp("ipxe.efi".into())));
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.ciaddr(), Ipv4Addr::new(10, 0, 0, 50));

    let http = classify(&discover(
        "HTTPClient:Arch:00016:UNDI:003001",
        Some(16),
        vec![],
    ))
    .unwrap();
    let offer = decode(&reply(
        &http,
        server,
        &BootTarget::Url(format!("{BASE}/boot/ipxe.efi")),
    ));
    assert_eq!(
        offer.opts().get(OptionCode::ClassIdentifier),
        Some(&DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()))
    );
    assert_eq!(fname(&offer), format!("{BASE}/boot/ipxe.efi"));
    // The file field holds 128 bytes with its NUL: longer URLs are refused, not truncated.
    let long = format!("http://{}/x", "a".repeat(130));
    assert!(matches!(
        boot_target(&http, &BootFiles::default(), &long),
        Err(Drop::Unsupported(_))
    ));
}

#[test]
fn replies_go_to_the_relay_the_sender_or_broadcast() {
    let from = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 50), 68);
    let mut req = classify(&discover(
        "PXEClient:Arch:00000:UNDI:002001",
        Some(0),
        vec![],
    ))
    .unwrap();
    assert_eq!(
        destination(Port::Dhcp, &req, from),
        SocketAddrV4::new(Ipv4Addr::BROADCAST, 68)
    );
    assert_eq!(
        destination(
            Port::Pxe,
            &req,
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 50), 4011)
        ),
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 50), 4011)
    );
    req.giaddr = Ipv4Addr::new(10, 9, 0, 1);
    assert_eq!(
        destination(Port::Dhcp, &req, from),
        SocketAddrV4::new(Ipv4Addr::new(10, 9, 0, 1), 67)
    );
    // The relay address survives into the reply.
    let offer = decode(&reply(
        &req,
        Ipv4Addr::new(10, 0, 0, 1),
        &BootTarget::Tftp("undionly.kpxe".into()),
    ));
    assert_eq!(offer.giaddr(), Ipv4Addr::new(10, 9, 0, 1));
}

#[test]
fn malformed_packets_are_dropped_without_panic() {
    let good = discover("PXEClient:Arch:00000:UNDI:002001", Some(0), vec![]);
    classify(&good).unwrap();
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), vec![]),
        ("short".into(), good[..100].to_vec()),
        ("header only".into(), good[..240].to_vec()),
        ("bad cookie".into(), with(&|b| b[236] = 0)),
        ("reply op".into(), with(&|b| b[0] = 2)),
        (
            "no end option".into(),
            with(&|b| {
                b.pop();
            }),
        ),
        (
            "truncated option".into(),
            with(&|b| {
                let n = b.len();
                b.truncate(n - 3);
            }),
        ),
        (
            "option past end".into(),
            with(&|b| {
                b.truncate(244);
                b[241] = 200;
            }),
        ),
        ("htype 6".into(), with(&|b| b[1] = 6)),
    ];
    for hlen in [0u8, 7, 16, 17, 255] {
        cases.push((format!("hlen {hlen}"), with(&|b| b[2] = hlen)));
    }
    for (name, b) in cases {
        let r = std::panic::catch_unwind(|| classify(&b));
        match r {
            Ok(Err(Drop::Malformed(_))) => {}
            other => panic!("{name}: {other:?}"),
        }
    }
    // Random garbage of every length never panics.
    let mut x: u32 = 7;
    for len in 0..700 {
        let b: Vec<u8> = (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (x >> 16) as u8
            })
            .collect();
        let _ = classify(&b);
        let mut g = good.clone();
        if len < g.len() {
            g[len] ^= 0xff;
            let _ = classify(&g);
        }
    }
}

#[test]
fn rate_limit_per_mac() {
    let t = Instant::now();
    let mut rl = RateLimit::new(t);
    for _ in 0..RateLimit::MAX {
        assert_eq!(rl.allow(MAC, t), (true, false));
    }
    assert_eq!(
        rl.allow(MAC, t),
        (false, true),
        "the first refusal is reported"
    );
    assert_eq!(rl.allow(MAC, t), (false, false), "later ones are not");
    assert_eq!(
        rl.allow([1; 6], t),
        (true, false),
        "other MACs are unaffected"
    );
    assert_eq!(
        rl.allow(MAC, t + RateLimit::WINDOW),
        (true, false),
        "the window resets"
    );
    // A flood of distinct MACs fills the map to its bound and no further.
    for i in 0..(RateLimit::MAX_TRACKED as u32 + 10) {
        let b = i.to_be_bytes();
        let (ok, _) = rl.allow([2, 0, b[0], b[1], b[2], b[3]], t + RateLimit::WINDOW);
        assert!(ok);
    }
    assert_eq!(rl.seen.len(), RateLimit::MAX_TRACKED);
}

/// DHCP requests captured from the QEMU VMs of the end-to-end lab (tests/it/lab.rs) with
/// tcpdump: SeaBIOS running the iPXE NIC ROM, OVMF's own EDK2 PXE client (ports 67 and
/// 4011), and the iPXE EFI driver OVMF loads from the same NIC ROM.
fn golden(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/dhcp")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn golden_packets_from_real_firmware() {
    let files = BootFiles::default();
    let server = Ipv4Addr::new(10, 77, 0, 1);
    let base = "http://10.77.0.1:8080";
    let cases = [
        (
            "seabios-ipxe-discover-port67.bin",
            MessageType::Discover,
            ClientKind::Ipxe,
            0,
            format!("{base}/boot.ipxe"),
        ),
        (
            "seabios-ipxe-request-port67.bin",
            MessageType::Request,
            ClientKind::Ipxe,
            0,
            format!("{base}/boot.ipxe"),
        ),
        (
            "ovmf-pxe-discover-port67.bin",
            MessageType::Discover,
            ClientKind::Pxe,
            7,
            "ipxe.efi".to_string(),
        ),
        (
            "ovmf-pxe-request-port67.bin",
            MessageType::Request,
            ClientKind::Pxe,
            7,
            "ipxe.efi".to_string(),
        ),
        (
            "ovmf-pxe-request-port4011.bin",
            MessageType::Request,
            ClientKind::Pxe,
            7,
            "ipxe.efi".to_string(),
        ),
        (
            "ovmf-ipxe-discover-port67.bin",
            MessageType::Discover,
            ClientKind::Ipxe,
            7,
            format!("{base}/boot.ipxe"),
        ),
        (
            "ovmf-ipxe-request-port67.bin",
            MessageType::Request,
            ClientKind::Ipxe,
            7,
            format!("{base}/boot.ipxe"),
        ),
    ];
    for (name, msg_type, kind, arch, file) in cases {
        let pkt = golden(name);
        let req = classify(&pkt).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            (req.msg_type, req.kind, req.arch),
            (msg_type, kind, arch),
            "{name}"
        );
        assert!(
            req.mac.to_string().starts_with("52:54:00:77:00:0"),
            "{name}: {}",
            req.mac
        );
        // QEMU without -uuid reports an all-zero SMBIOS UUID: echoed, but not a UUID.
        assert_eq!(req.guid.as_ref().map(|g| g.len()), Some(17), "{name}");
        assert_eq!(req.uuid(), None);
        let target = boot_target(&req, &files, base).unwrap();
        assert_eq!(target.file(), file, "{name}");
        let r = decode(&reply(&req, server, &target));
        assert_eq!(r.xid(), req.xid);
        assert_eq!(fname(&r), file);
        assert_eq!(
            r.opts().get(OptionCode::ClientMachineIdentifier),
            Some(&DhcpOption::ClientMachineIdentifier(
                req.guid.clone().unwrap()
            ))
        );
        let want = if msg_type == MessageType::Discover {
            MessageType::Offer
        } else {
            MessageType::Ack
        };
        assert_eq!(r.opts().msg_type(), Some(want), "{name}");
    }
    // The EDK2 request on 4011 comes from the address the site's server gave it.
    let req = classify(&golden("ovmf-pxe-request-port4011.bin")).unwrap();
    assert!(!req.ciaddr.is_unspecified());
}

mod address_mode {
    use super::*;
    use crate::dto::EnrollRequest;
    use crate::policy::DiscoverAnswer;
    use crate::store::EventQuery;
    use crate::testkit::{stack, Stack};

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

    fn ctx() -> (Context, Stack) {
        let st = stack(DiscoverAnswer::LocalBoot);
        let mode = Mode::Full(AddressMode {
            start: Ipv4Addr::new(10, 77, 0, 100),
            end: Ipv4Addr::new(10, 77, 0, 101),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            router: Some(SERVER),
            dns: vec![Ipv4Addr::new(10, 77, 0, 53)],
            lease_time: Duration::from_secs(3600),
        });
        let c = Context::new(
            st.boot.clone(),
            st.inv.clone(),
            mode,
            BootFiles::default(),
            Some("http://10.77.0.1:8080".into()),
            None,
            8080,
        );
        (c, st)
    }

    fn packet(mac: [u8; 6], t: MessageType, class: &str, extra: Vec<DhcpOption>) -> Vec<u8> {
        let mut m = Message::new_with_id(
            7,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &mac,
        );
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(t));
        if !class.is_empty() {
            o.insert(DhcpOption::ClassIdentifier(class.as_bytes().to_vec()));
            o.insert(DhcpOption::ClientSystemArchitecture(Architecture::from(0)));
        }
        for x in extra {
            o.insert(x);
        }
        let mut buf = Vec::new();
        m.encode(&mut Encoder::new(&mut buf)).unwrap();
        buf
    }

    fn rx() -> Received {
        Received {
            len: 0,
            from: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
            ifindex: 0,
            local: SERVER,
        }
    }

    async fn ask(c: &Context, pkt: Vec<u8>) -> Option<Message> {
        handle(c, Port::Dhcp, &pkt, &rx(), &mut Tally::default())
            .await
            .map(|(b, _)| decode(&b))
    }

    #[tokio::test]
    async fn dora_for_boot_and_plain_clients() {
        let (c, st) = ctx();
        let pxe = [0x52, 0x54, 0, 0x77, 0, 1];
        let offer = ask(
            &c,
            packet(
                pxe,
                MessageType::Discover,
                "PXEClient:Arch:00000:UNDI:002001",
                vec![],
            ),
        )
        .await
        .unwrap();
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 77, 0, 100));
        assert_eq!(
            fname(&offer),
            "undionly.kpxe",
            "boot instructions ride along"
        );
        assert_eq!(
            offer.opts().get(OptionCode::SubnetMask),
            Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
        );
        assert_eq!(
            offer.opts().get(OptionCode::Router),
            Some(&DhcpOption::Router(vec![SERVER]))
        );
        assert_eq!(
            offer.opts().get(OptionCode::AddressLeaseTime),
            Some(&DhcpOption::AddressLeaseTime(3600))
        );
        let req = vec![
            DhcpOption::RequestedIpAddress(offer.yiaddr()),
            DhcpOption::ServerIdentifier(SERVER),
        ];
        let ack = ask(
            &c,
            packet(
                pxe,
                MessageType::Request,
                "PXEClient:Arch:00000:UNDI:002001",
                req,
            ),
        )
        .await
        .unwrap();
        assert_eq!(
            (ack.opts().msg_type(), ack.yiaddr()),
            (Some(MessageType::Ack), Ipv4Addr::new(10, 77, 0, 100))
        );

        // A plain (non-PXE) client gets an address and no boot file.
        let laptop = [0x02, 0, 0, 0, 0, 9];
        let offer = ask(&c, packet(laptop, MessageType::Discover, "", vec![]))
            .await
            .unwrap();
        assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 77, 0, 101));
        assert_eq!(fname(&offer), "");
        // It may not take the PXE machine's address: NAK.
        let steal = vec![
            DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 77, 0, 100)),
            DhcpOption::ServerIdentifier(SERVER),
        ];
        let (nak, to) = handle(
            &c,
            Port::Dhcp,
            &packet(laptop, MessageType::Request, "", steal),
            &rx(),
            &mut Tally::default(),
        )
        .await
        .unwrap();
        assert_eq!(decode(&nak).opts().msg_type(), Some(MessageType::Nak));
        assert_eq!(
            to,
            SocketAddrV4::new(Ipv4Addr::BROADCAST, 68),
            "a NAK is broadcast without a relay"
        );
        // The pool (two addresses) is exhausted for a third client: no answer.
        assert!(ask(
            &c,
            packet([2, 0, 0, 0, 0, 10], MessageType::Discover, "", vec![])
        )
        .await
        .is_none());
        // A REQUEST naming another server releases our offer.
        let elsewhere = vec![
            DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 77, 0, 101)),
            DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 77, 0, 2)),
        ];
        assert!(ask(&c, packet(laptop, MessageType::Request, "", elsewhere))
            .await
            .is_none());
        let offer = ask(
            &c,
            packet([2, 0, 0, 0, 0, 10], MessageType::Discover, "", vec![]),
        )
        .await
        .unwrap();
        assert_eq!(
            offer.yiaddr(),
            Ipv4Addr::new(10, 77, 0, 101),
            "the released address is free again"
        );
        let events = st
            .admin
            .events(EventQuery {
                mac: Some(crate::mac::Mac(pxe)),
                after: 0,
                limit: 100,
                tail: false,
            })
            .await
            .unwrap();
        assert!(
            events
                .iter()
                .any(|e| e.kind.as_str() == "dhcp_lease"
                    && e.detail.starts_with("10.77.0.100 until")),
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn reservations_come_from_the_inventory() {
        let (c, st) = ctx();
        st.admin
            .enroll(EnrollRequest {
                mac: "52:54:00:77:00:05".into(),
                profile: Some("debian-12".into()),
                vars: [("ip".to_string(), "10.77.0.50".to_string())].into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let offer = ask(
            &c,
            packet(
                [0x52, 0x54, 0, 0x77, 0, 5],
                MessageType::Discover,
                "PXEClient:Arch:00000:UNDI:002001",
                vec![],
            ),
        )
        .await
        .unwrap();
        assert_eq!(
            offer.yiaddr(),
            Ipv4Addr::new(10, 77, 0, 50),
            "reserved, even outside the pool"
        );
        // Nobody else is offered it.
        let other = ask(
            &c,
            packet(
                [2, 0, 0, 0, 0, 1],
                MessageType::Discover,
                "",
                vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 77, 0, 50))],
            ),
        )
        .await
        .unwrap();
        assert_ne!(other.yiaddr(), Ipv4Addr::new(10, 77, 0, 50));
        // A second machine cannot reserve the same address.
        let dup = st
            .admin
            .enroll(EnrollRequest {
                mac: "52:54:00:77:00:06".into(),
                profile: Some("debian-12".into()),
                vars: [("ip".to_string(), "10.77.0.50".to_string())].into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(
            dup.to_string()
                .contains("already reserved for machine 52:54:00:77:00:05"),
            "{dup}"
        );
    }
}

#[tokio::test]
async fn ignore_means_no_reply_at_all() {
    let st = crate::testkit::stack(crate::policy::DiscoverAnswer::Ignore);
    let c = Context::new(
        st.boot.clone(),
        st.inv.clone(),
        Mode::Proxy,
        BootFiles::default(),
        Some(BASE.into()),
        None,
        8080,
    );
    let r = Received {
        len: 0,
        from: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
        ifindex: 0,
        local: Ipv4Addr::new(10, 0, 0, 1),
    };
    let pkt = discover("PXEClient:Arch:00000:UNDI:002001", Some(0), vec![]);
    assert!(handle(&c, Port::Dhcp, &pkt, &r, &mut Tally::default())
        .await
        .is_none());
    // The machine is still recorded as discovered, with an event saying why it got no answer.
    let events = st
        .admin
        .events(crate::store::EventQuery {
            mac: Some(crate::mac::Mac(MAC)),
            after: 0,
            limit: 10,
            tail: false,
        })
        .await
        .unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["discovered", "dhcp_ignored"]);
}

/// What real firmware sends as its classes, kept as text for discovery rules: EDK2's PXE
/// client and iPXE on SeaBIOS and OVMF.
#[test]
fn golden_packets_keep_their_vendor_and_user_class() {
    for (name, vendor, user) in [
        (
            "ovmf-pxe-discover-port67.bin",
            "PXEClient:Arch:00007:UNDI:003001",
            None,
        ),
        (
            "seabios-ipxe-discover-port67.bin",
            "PXEClient:Arch:00000:UNDI:002001",
            Some("iPXE"),
        ),
        (
            "ovmf-ipxe-discover-port67.bin",
            "PXEClient:Arch:00007:UNDI:003010",
            Some("iPXE"),
        ),
    ] {
        let req = classify(&golden(name)).unwrap();
        assert_eq!(req.vendor_class.as_deref(), Some(vendor), "{name}");
        assert_eq!(req.user_class.as_deref(), user, "{name}");
    }
}

/// The client hardware address that makes `handle` panic (tests only).
pub(super) const PANIC_MAC: [u8; 6] = [0x02, 0xde, 0xad, 0x00, 0x00, 0x01];

/// The per-packet guard on a real socket: a packet whose handling panics is dropped and
/// counted, and the server goes on answering — the next request, OVMF's real PXE request to
/// port 4011, gets its ACK from the same loop.
#[tokio::test]
async fn a_packet_that_panics_costs_that_packet_not_the_server() {
    let stack = crate::testkit::stack(crate::policy::DiscoverAnswer::LocalBoot);
    let ctx = Arc::new(Context::new(
        stack.boot.clone(),
        stack.inv.clone(),
        Mode::Proxy,
        BootFiles::default(),
        Some("http://127.0.0.1:8080".into()),
        Some(Ipv4Addr::LOCALHOST),
        8080,
    ));
    let sock = bind(std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), None).unwrap();
    let addr = sock.local_addr().unwrap();
    let sd = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(run(sock, Port::Pxe, ctx, sd.clone()));
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let good = golden("ovmf-pxe-request-port4011.bin");
    let mut bad = good.clone();
    bad[28..34].copy_from_slice(&PANIC_MAC);
    client.send_to(&bad, addr).await.unwrap();
    client.send_to(&good, addr).await.unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.recv_from(&mut buf),
    )
    .await
    .expect("the server still answers after a panic")
    .unwrap();
    let reply = Message::decode(&mut Decoder::new(&buf[..n])).unwrap();
    assert_eq!(
        reply.chaddr()[..6],
        good[28..34],
        "the answer is the good packet's"
    );
    assert_eq!(reply.opts().msg_type(), Some(MessageType::Ack));
    assert!(!server.is_finished());
    let scraped = stack.boot.scrape().await.unwrap();
    assert!(
        scraped.contains(
            r#"provision_dhcp_packets_received_total{port="4011",result="panicked",type="unknown"} 1"#
        ),
        "{scraped}"
    );
    sd.cancel();
    server.await.unwrap().unwrap();
}
