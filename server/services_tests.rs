//! The services end to end over a real (temporary) SQLite inventory: enroll, boot, config,
//! phone-home, previews, validation.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use crate::dto::{EnrollRequest, UpdateRequest};
use crate::error::Error;
use crate::mac::Mac;
use crate::policy::{BootRequest, DiscoverAnswer, Platform, State};
use crate::render::{ArtifactKind, RenderError};
use crate::store::{EventQuery, MachineQuery, Sighting, StoreError};
use crate::testkit::{stack, Stack};

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDcYs+DzqLkjzv07CZc5geeLA8TcqMARj0QTSQzawr2 provision";
const BASE: &str = "http://10.0.0.1:8080";
/// The address the test machines ask from.
const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9));

fn prov() -> Stack {
    stack(DiscoverAnswer::LocalBoot)
}

/// A machine's timeline as event kinds, after a flush.
async fn kinds(p: &Stack, mac: Mac) -> Vec<String> {
    events_of(p, mac)
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

fn enroll_req(mac: &str, profile: &str) -> EnrollRequest {
    EnrollRequest {
        mac: mac.into(),
        profile: Some(profile.into()),
        hostname: Some("node1".into()),
        ..Default::default()
    }
}

fn bios() -> BootRequest {
    BootRequest {
        platform: Platform::Pcbios,
        arch: Some("x86_64".into()),
    }
}

fn token_of(script: &str) -> String {
    let i = script.find("/config/").expect("script has a config URL") + "/config/".len();
    script[i..i + 64].to_string()
}

/// Every built-in profile's every artifact, plus the iPXE scripts, for two fixture machines:
/// a bare one, and one with UUID, vars with quotes and spaces, and an operator key.
#[tokio::test]
async fn snapshots_of_every_builtin_render() {
    let p = prov();
    let profiles: Vec<String> = p.admin.catalog().profiles().keys().cloned().collect();
    assert!(profiles.len() >= 5, "{profiles:?}");
    for (i, profile) in profiles.iter().enumerate() {
        for (fixture, rich) in [("plain", false), ("rich", true)] {
            let mac = format!("52:54:00:00:{:02x}:{:02x}", i, rich as u8);
            let mut req = enroll_req(&mac, profile);
            if rich {
                req.uuid = Some("4C4C4544-0038-4410-8051-B4C04F4D4E32".into());
                req.serial = Some("SN 1234".into());
                req.vars = BTreeMap::from([
                    (
                        "ssh_authorized_key".to_string(),
                        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGxop op@example".to_string(),
                    ),
                    (
                        "note".to_string(),
                        "it's \"quoted\" and ${not} expanded".to_string(),
                    ),
                    ("timezone".to_string(), "Europe/Berlin".to_string()),
                ]);
            } else {
                req.hostname = None;
            }
            let m = p.admin.enroll(req).await.unwrap();
            let mut names = vec!["ipxe".to_string()];
            names.extend(
                p.admin
                    .catalog()
                    .profile(profile)
                    .unwrap()
                    .artifacts
                    .keys()
                    .cloned(),
            );
            for a in names {
                let (_, body) = p.admin.preview(m.mac, &a, BASE).await.unwrap();
                insta::assert_snapshot!(format!("{profile}__{fixture}__{a}"), body);
            }
        }
    }
    let (_, local) = p
        .admin
        .preview("52:54:00:00:00:00".parse().unwrap(), "ipxe", BASE)
        .await
        .unwrap();
    assert!(
        local.contains("kernel "),
        "enrolled machine previews an install"
    );
    insta::assert_snapshot!("boot.ipxe", p.boot.boot_ipxe(BASE).unwrap());
}

#[tokio::test]
async fn install_then_phone_home_then_local_boot() {
    let p = prov();
    let mac: Mac = "52:54:00:aa:00:01".parse().unwrap();
    p.admin
        .enroll(enroll_req("52-54-00-aa-00-01", "debian-12"))
        .await
        .unwrap();
    let script = p
        .boot
        .boot(mac, bios(), Sighting::default(), PEER, BASE)
        .await
        .unwrap()
        .unwrap();
    assert!(
        script.contains(&format!(
            "kernel {BASE}/assets/debian-12/linux initrd=initrd0 "
        )),
        "{script}"
    );
    assert!(script.contains(&format!(
        "initrd --name initrd0 {BASE}/assets/debian-12/initrd.gz"
    )));
    let token = token_of(&script);
    assert!(script.contains(&format!("url={BASE}/config/{token}/preseed.cfg")));
    assert_eq!(p.admin.machine(mac).await.unwrap().state, State::Installing);

    let (kind, preseed) = p
        .boot
        .config(&token, "preseed.cfg", PEER, BASE)
        .await
        .unwrap();
    assert_eq!(kind, ArtifactKind::Preseed);
    assert!(preseed.contains("d-i netcfg/get_hostname string node1"));
    assert!(preseed.contains(&format!("'{BASE}/phone-home/{token}'")));
    // Unknown artifact and unknown token are refused.
    assert!(matches!(
        p.boot.config(&token, "nope", PEER, BASE).await,
        Err(Error::Render(RenderError::NoArtifact { .. }))
    ));
    assert!(matches!(
        p.boot
            .config(&"0".repeat(64), "preseed.cfg", PEER, BASE)
            .await,
        Err(Error::Store(StoreError::Token(
            crate::store::TokenProblem::Unknown,
            None
        )))
    ));

    // A phone-home without a key changes nothing.
    assert!(matches!(
        p.boot
            .phone_home(&token, vec!["garbage".into()], PEER)
            .await,
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        p.boot.phone_home(&token, vec![], PEER).await,
        Err(Error::Invalid(_))
    ));
    assert_eq!(p.admin.machine(mac).await.unwrap().state, State::Installing);
    // Each says so on the machine's timeline (the token is its own, from its address); from
    // another address, or with a token that is no machine's, nothing is written.
    let other: std::net::IpAddr = "10.9.9.9".parse().unwrap();
    assert!(matches!(
        p.boot.phone_home(&token, vec![], other).await,
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        p.boot.phone_home(&"0".repeat(64), vec![], PEER).await,
        Err(Error::Invalid(_))
    ));
    let refused: Vec<String> = events_of(&p, mac)
        .await
        .into_iter()
        .filter(|(k, _)| k == "phone_home_refused")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        refused[1].ends_with("phone-home carried no SSH host public key: post the lines of /etc/ssh/ssh_host_*_key.pub (text/plain) or cloud-init's pub_key_* form fields"),
        "{refused:?}"
    );

    let m = p
        .boot
        .phone_home(&token, vec![format!("{KEY}\n"), String::new()], PEER)
        .await
        .unwrap();
    assert_eq!(m.state, State::Installed);
    assert_eq!(m.host_keys.len(), 1);
    assert!(
        !m.host_keys[0].ends_with("provision"),
        "comment stripped: {}",
        m.host_keys[0]
    );
    // The token is burnt: config and a second phone-home are refused.
    assert!(matches!(
        p.boot.config(&token, "preseed.cfg", PEER, BASE).await,
        Err(Error::Store(StoreError::Token(
            crate::store::TokenProblem::Used,
            _
        )))
    ));
    assert!(matches!(
        p.boot.phone_home(&token, vec![KEY.into()], PEER).await,
        Err(Error::Store(StoreError::Token(
            crate::store::TokenProblem::Used,
            Some(m)
        ))) if m == mac
    ));

    for platform in [Platform::Pcbios, Platform::Efi] {
        let req = BootRequest {
            platform,
            arch: None,
        };
        let s = p
            .boot
            .boot(mac, req, Sighting::default(), PEER, BASE)
            .await
            .unwrap()
            .unwrap();
        match platform {
            Platform::Pcbios => assert!(s.contains("sanboot --no-describe --drive 0x80"), "{s}"),
            Platform::Efi => assert!(
                s.lines().any(|l| l == "exit") && !s.contains("sanboot"),
                "{s}"
            ),
        }
        assert!(!s.contains("kernel"), "no reinstall: {s}");
    }
    assert_eq!(
        kinds(&p, mac).await,
        [
            "enrolled",
            "install_started",
            "config_served",
            "config_refused",
            "phone_home_refused",
            "phone_home_refused",
            "phoned_home",
            "config_refused",
            "phone_home_refused",
            "ipxe_served",
            "ipxe_served"
        ]
    );
}

#[tokio::test]
async fn unknown_machines_are_discovered_and_answered_per_config() {
    let p = prov();
    let mac: Mac = "52:54:00:aa:00:02".parse().unwrap();
    let sighting = Sighting {
        ip: Some("10.0.0.9".into()),
        ..Default::default()
    };
    let s = p
        .boot
        .boot(mac, bios(), sighting, PEER, BASE)
        .await
        .unwrap()
        .unwrap();
    assert!(s.contains("sanboot"), "{s}");
    let m = p.admin.machine(mac).await.unwrap();
    assert_eq!(
        (m.state, m.boot_ip.as_deref(), m.last_ip.as_deref()),
        (State::Discovered, Some("10.0.0.9"), None)
    );

    let ignoring = stack(DiscoverAnswer::Ignore);
    assert_eq!(
        ignoring
            .boot
            .boot(mac, bios(), Sighting::default(), PEER, BASE)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        ignoring.admin.machine(mac).await.unwrap().state,
        State::Discovered
    );
}

#[tokio::test]
async fn reboot_during_install_replaces_the_token_and_reprovision_reinstalls() {
    let p = prov();
    let mac: Mac = "52:54:00:aa:00:03".parse().unwrap();
    p.admin
        .enroll(enroll_req("525400aa0003", "fedora-coreos"))
        .await
        .unwrap();
    let t1 = token_of(
        &p.boot
            .boot(mac, bios(), Sighting::default(), PEER, BASE)
            .await
            .unwrap()
            .unwrap(),
    );
    let t2 = token_of(
        &p.boot
            .boot(mac, bios(), Sighting::default(), PEER, BASE)
            .await
            .unwrap()
            .unwrap(),
    );
    assert_ne!(t1, t2);
    // The first token was replaced by the second boot's: unknown, not merely refused.
    assert!(matches!(
        p.boot.config(&t1, "config.ign", PEER, BASE).await,
        Err(Error::Store(StoreError::Token(
            crate::store::TokenProblem::Unknown,
            _
        )))
    ));
    p.boot.config(&t2, "config.ign", PEER, BASE).await.unwrap();
    // coreos-installer has the config and writes the disk; the installed system phones home
    // from its first boot, so the reboot must boot that disk, not install again.
    let s = p
        .boot
        .boot(mac, bios(), Sighting::default(), PEER, BASE)
        .await
        .unwrap()
        .unwrap();
    assert!(s.contains("sanboot") && s.contains("installer-done"), "{s}");
    assert_eq!(p.admin.machine(mac).await.unwrap().state, State::Installing);
    p.boot
        .phone_home(&t2, vec![KEY.into()], PEER)
        .await
        .unwrap();
    assert_eq!(
        kinds(&p, mac).await,
        [
            "enrolled",
            "install_started",
            "install_restarted",
            "config_served",
            "installer_done",
            "ipxe_served",
            "phoned_home"
        ]
    );
    let r = p.admin.reprovision(mac).await.unwrap();
    assert_eq!((r.state, r.generation), (State::Enrolled, 1));
    let s = p
        .boot
        .boot(mac, bios(), Sighting::default(), PEER, BASE)
        .await
        .unwrap()
        .unwrap();
    assert!(s.contains("coreos.inst.ignition_url="), "{s}");
    let t3 = token_of(&s);
    let (_, ign) = p.boot.config(&t3, "config.ign", PEER, BASE).await.unwrap();
    assert!(ign.contains(&t3), "new token in the phone-home URL");
}

#[tokio::test]
async fn enroll_refuses_bad_input_and_values_no_output_can_hold() {
    let p = prov();
    let cases: Vec<(EnrollRequest, &str)> = vec![
        (
            EnrollRequest {
                mac: "52:54:00:zz:00:01".into(),
                ..enroll_req("", "debian-12")
            },
            "not a MAC",
        ),
        (enroll_req("52:54:00:aa:00:04", "nope"), "no profile named"),
        (
            EnrollRequest {
                hostname: Some("a\nb".into()),
                ..enroll_req("52:54:00:aa:00:04", "debian-12")
            },
            "RFC 1123",
        ),
        (
            EnrollRequest {
                hostname: Some("a b".into()),
                ..enroll_req("52:54:00:aa:00:04", "debian-12")
            },
            "RFC 1123",
        ),
        (
            EnrollRequest {
                hostname: Some("${x}".into()),
                ..enroll_req("52:54:00:aa:00:04", "debian-12")
            },
            "RFC 1123",
        ),
        (
            EnrollRequest {
                vars: BTreeMap::from([(
                    "domain".to_string(),
                    "lab\nkernel http://evil".to_string(),
                )]),
                ..enroll_req("52:54:00:aa:00:04", "debian-12")
            },
            "control character",
        ),
        // `domain` lands on the kernel command line: a space, quote or ${ cannot be placed
        // there safely, so the enroll is refused with the render's reason.
        (
            EnrollRequest {
                vars: BTreeMap::from([("domain".to_string(), "lab ${x}".to_string())]),
                ..enroll_req("52:54:00:aa:00:04", "debian-12")
            },
            "cannot be placed in an iPXE script",
        ),
        (
            EnrollRequest {
                vars: BTreeMap::from([("domain".to_string(), "lab\"".to_string())]),
                ..enroll_req("52:54:00:aa:00:04", "debian-12")
            },
            "cannot be placed in an iPXE script",
        ),
        (
            EnrollRequest {
                vars: BTreeMap::from([("bad-name".to_string(), "x".to_string())]),
                ..enroll_req("52:54:00:aa:00:04", "debian-12")
            },
            "variable name",
        ),
        (
            EnrollRequest {
                uuid: Some("xyz".into()),
                ..enroll_req("52:54:00:aa:00:04", "debian-12")
            },
            "UUID",
        ),
    ];
    for (req, want) in cases {
        let e = p.admin.enroll(req.clone()).await.unwrap_err().to_string();
        assert!(e.contains(want), "{req:?}: {e}");
    }
    assert!(
        p.admin
            .machines(MachineQuery::default())
            .await
            .unwrap()
            .is_empty(),
        "nothing was written"
    );
}

#[tokio::test]
async fn hostile_vars_are_escaped_where_they_are_allowed() {
    let p = prov();
    let hostile = "x' \"y\" $(reboot) ${z}";
    let mut req = enroll_req("52:54:00:aa:00:05", "debian-12");
    // admin_user reaches the preseed (as a preseed value), timezone too; neither is on the
    // kernel command line.
    req.vars = BTreeMap::from([("admin_user".to_string(), hostile.to_string())]);
    p.admin.enroll(req).await.unwrap();
    let mac: Mac = "52:54:00:aa:00:05".parse().unwrap();
    let (_, preseed) = p.admin.preview(mac, "preseed.cfg", BASE).await.unwrap();
    assert!(preseed.contains(&format!("d-i passwd/username string {hostile}\n")));
    // The dangerous place is the late_command: d-i hands it to a shell. Run it with `in-target`
    // standing in for the chroot, printing the arguments the real script would get: the value
    // arrives as one argument, byte for byte, and nothing in it ran (PATH is empty, so a
    // command substitution that escaped its quotes would fail, not reboot this machine).
    let late = preseed
        .lines()
        .find_map(|l| l.strip_prefix("d-i preseed/late_command string "))
        .expect("the preseed has a late_command");
    let out = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            // dash allows no '-' in a function's name.
            "in_target() {{ shift 3; for a; do printf '[%s]\\n' \"$a\"; done; }}\nin_target {}",
            late.strip_prefix("in-target ")
                .expect("the late_command runs in the target")
        ))
        .env_clear()
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let args = String::from_utf8(out.stdout).unwrap();
    let args: Vec<&str> = args.lines().collect();
    assert_eq!(args.len(), 3, "phone-home URL, user, one key: {args:?}");
    assert!(args[0].starts_with("[http://10.0.0.1:8080/"), "{args:?}");
    assert_eq!(args[1], format!("[{hostile}]"));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, script) = p.admin.preview(mac, "ipxe", BASE).await.unwrap();
    assert!(!script.contains(hostile));
    // No iPXE script gains a line from inventory data: same shape as a plain machine's.
    p.admin
        .enroll(enroll_req("52:54:00:aa:00:15", "debian-12"))
        .await
        .unwrap();
    let (_, plain) = p
        .admin
        .preview("52:54:00:aa:00:15".parse().unwrap(), "ipxe", BASE)
        .await
        .unwrap();
    assert_eq!(script.lines().count(), plain.lines().count());

    let mut req = enroll_req("52:54:00:aa:00:06", "ubuntu-24.04");
    req.vars = BTreeMap::from([
        ("timezone".to_string(), hostile.to_string()),
        ("admin_user".to_string(), hostile.to_string()),
    ]);
    p.admin.enroll(req).await.unwrap();
    let mac: Mac = "52:54:00:aa:00:06".parse().unwrap();
    let (_, ud) = p.admin.preview(mac, "user-data", BASE).await.unwrap();
    let y: serde_norway::Value = serde_norway::from_str(&ud).unwrap();
    assert_eq!(
        y["autoinstall"]["user-data"]["timezone"].as_str(),
        Some(hostile)
    );
    assert_eq!(
        y["autoinstall"]["user-data"]["users"][0]["name"].as_str(),
        Some(hostile)
    );
}

#[tokio::test]
async fn update_checks_like_enroll() {
    let p = prov();
    let mac: Mac = "52:54:00:aa:00:07".parse().unwrap();
    p.admin
        .enroll(enroll_req("52:54:00:aa:00:07", "debian-12"))
        .await
        .unwrap();
    let bad = UpdateRequest {
        set_vars: Some(BTreeMap::from([("domain".to_string(), "a b".to_string())])),
        ..Default::default()
    };
    let e = p.admin.update(mac, bad).await.unwrap_err();
    assert!(
        // The trial render refuses it: the profile's command line cannot hold a space.
        matches!(&e, Error::Render(RenderError::Template { what, message })
            if what.contains("cmdline") && message.contains("cannot be placed")),
        "{e:?}"
    );
    let good = UpdateRequest {
        hostname: Some("node7".into()),
        set_vars: Some(BTreeMap::from([(
            "domain".to_string(),
            "lab.example".to_string(),
        )])),
        ..Default::default()
    };
    let m = p.admin.update(mac, good).await.unwrap();
    assert_eq!(
        (m.hostname.as_deref(), m.vars["domain"].as_str()),
        (Some("node7"), "lab.example")
    );
    let m = p
        .admin
        .update(
            mac,
            UpdateRequest {
                unset_vars: Some(vec!["domain".into()]),
                hostname: Some(String::new()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(m.vars.is_empty() && m.hostname.is_none());
}

/// A stack that believes install claims only with evidence, as the daemon does by default.
fn strict() -> Stack {
    crate::testkit::stack_with(
        DiscoverAnswer::LocalBoot,
        crate::policy::ClaimPolicy::Evidence,
    )
}

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
}

/// DHCP saw `mac` take `ip` (the evidence a real boot leaves).
fn dhcp_saw(p: &Stack, ip: IpAddr, mac: Mac) {
    let IpAddr::V4(ip) = ip else { unreachable!() };
    p.boot
        .attribution()
        .learn(ip, mac, crate::attribution::Learned::Requested);
}

/// A machine's timeline as (kind, detail), after a flush.
async fn events_of(p: &Stack, mac: Mac) -> Vec<(String, String)> {
    p.inv.flush().await.unwrap();
    p.admin
        .events(EventQuery {
            mac: Some(mac),
            after: 0,
            limit: 100,
            tail: false,
        })
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.kind.as_str().to_string(), e.detail))
        .collect()
}

#[tokio::test]
async fn an_install_claim_without_evidence_is_refused_and_changes_nothing() {
    let p = strict();
    let mac: Mac = "52:54:00:aa:00:21".parse().unwrap();
    p.admin
        .enroll(enroll_req("52-54-00-aa-00-21", "debian-12"))
        .await
        .unwrap();
    // Nobody vouches for 10.0.0.5: no neighbour entry (not on this host's links), no DHCP.
    let refused = p
        .boot
        .boot(mac, bios(), Sighting::default(), v4(5), BASE)
        .await;
    let Err(Error::Forbidden(why)) = refused else {
        panic!("expected a refusal: {refused:?}")
    };
    assert!(
        why.contains("no evidence that 10.0.0.5 is 52:54:00:aa:00:21"),
        "{why}"
    );
    assert!(why.contains("claims = \"any\""), "says what to do: {why}");
    let m = p.admin.machine(mac).await.unwrap();
    assert_eq!(m.state, State::Enrolled);
    let ev = events_of(&p, mac).await;
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert_eq!(ev[1].0, "claim_refused");
    assert!(ev[1].1.contains("from 10.0.0.5"), "{ev:?}");

    // DHCP saw another machine take that address: contrary evidence, refused too.
    let other: Mac = "52:54:00:aa:00:99".parse().unwrap();
    dhcp_saw(&p, v4(5), other);
    let refused = p
        .boot
        .boot(mac, bios(), Sighting::default(), v4(5), BASE)
        .await;
    assert!(
        matches!(&refused, Err(Error::Forbidden(w)) if w.contains("52:54:00:aa:00:99")),
        "{refused:?}"
    );
    assert_eq!(p.admin.machine(mac).await.unwrap().state, State::Enrolled);

    // The real machine's DHCP request is the evidence: it installs.
    dhcp_saw(&p, v4(6), mac);
    let script = p
        .boot
        .boot(mac, bios(), Sighting::default(), v4(6), BASE)
        .await
        .unwrap()
        .unwrap();
    assert!(script.install);
    let m = p.admin.machine(mac).await.unwrap();
    assert_eq!(m.state, State::Installing);
    let started = events_of(&p, mac).await;
    assert!(
        started
            .iter()
            .any(|(k, d)| k == "install_started" && d.contains("token issued to 10.0.0.6")),
        "{started:?}"
    );
}

#[tokio::test]
async fn a_token_serves_only_the_address_it_was_issued_to() {
    let p = strict();
    let mac: Mac = "52:54:00:aa:00:22".parse().unwrap();
    p.admin
        .enroll(enroll_req("52-54-00-aa-00-22", "debian-12"))
        .await
        .unwrap();
    let (victim, attacker) = (v4(10), v4(66));
    dhcp_saw(&p, victim, mac);
    let script = p
        .boot
        .boot(mac, bios(), Sighting::default(), victim, BASE)
        .await
        .unwrap()
        .unwrap();
    let token = token_of(&script);

    // A stolen token is useless from another address: no config, no phone-home.
    let r = p.boot.config(&token, "preseed.cfg", attacker, BASE).await;
    assert!(
        matches!(
            r,
            Err(Error::Store(StoreError::Token(
                crate::store::TokenProblem::OtherAddress,
                _
            )))
        ),
        "{r:?}"
    );
    let r = p.boot.phone_home(&token, vec![KEY.into()], attacker).await;
    assert!(
        matches!(
            r,
            Err(Error::Store(StoreError::Token(
                crate::store::TokenProblem::OtherAddress,
                _
            )))
        ),
        "{r:?}"
    );
    // Even with DHCP evidence for the attacker's address (it spoofed a DHCP request with the
    // victim's MAC), the live token is not handed over.
    dhcp_saw(&p, attacker, mac);
    let r = p
        .boot
        .boot(mac, bios(), Sighting::default(), attacker, BASE)
        .await;
    assert!(
        matches!(&r, Err(Error::Store(StoreError::TokenHeld { holder, .. })) if holder == "10.0.0.10"),
        "{r:?}"
    );
    let ev = events_of(&p, mac).await;
    let kinds: Vec<&str> = ev.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "enrolled",
            "install_started",
            "config_refused",
            "phone_home_refused",
            "claim_refused"
        ],
        "{ev:?}"
    );
    assert!(ev[2].1.contains("from 10.0.0.66"), "{ev:?}");

    // The real installer is undisturbed: its token still works, and its phone-home sets the
    // SSH address; the boot requests only ever set boot_ip.
    p.boot
        .config(&token, "preseed.cfg", victim, BASE)
        .await
        .unwrap();
    let m = p.admin.machine(mac).await.unwrap();
    assert_eq!(m.last_ip, None, "a boot request never sets the SSH address");
    let m = p
        .boot
        .phone_home(&token, vec![KEY.into()], victim)
        .await
        .unwrap();
    assert_eq!(
        (m.state, m.last_ip.as_deref()),
        (State::Installed, Some("10.0.0.10"))
    );
}

#[tokio::test]
async fn a_token_follows_its_machine_to_a_new_address_only_on_evidence() {
    // An installer (or the installed OS) that took a new DHCP lease keeps its install: the
    // daemon saw the machine take the new address.
    let p = strict();
    let mac: Mac = "52:54:00:aa:00:23".parse().unwrap();
    p.admin
        .enroll(enroll_req("52-54-00-aa-00-23", "debian-12"))
        .await
        .unwrap();
    dhcp_saw(&p, v4(30), mac);
    let script = p
        .boot
        .boot(mac, bios(), Sighting::default(), v4(30), BASE)
        .await
        .unwrap()
        .unwrap();
    let token = token_of(&script);
    // From an address nothing ties to the machine: refused, and the token stays put.
    assert!(matches!(
        p.boot.config(&token, "preseed.cfg", v4(31), BASE).await,
        Err(Error::Store(StoreError::Token(
            crate::store::TokenProblem::OtherAddress,
            Some(m)
        ))) if m == mac
    ));
    // From one DHCP saw it take: served, and the token moves there.
    dhcp_saw(&p, v4(31), mac);
    p.boot
        .config(&token, "preseed.cfg", v4(31), BASE)
        .await
        .unwrap();
    assert!(matches!(
        p.boot.config(&token, "preseed.cfg", v4(33), BASE).await,
        Err(Error::Store(StoreError::Token(
            crate::store::TokenProblem::OtherAddress,
            Some(m)
        ))) if m == mac
    ));
    // The installed OS comes up on yet another address DHCP saw it take: phone-home works
    // and sets the SSH address there.
    dhcp_saw(&p, v4(32), mac);
    let m = p
        .boot
        .phone_home(&token, vec![KEY.into()], v4(32))
        .await
        .unwrap();
    assert_eq!(m.last_ip.as_deref(), Some("10.0.0.32"));
    let moved: Vec<String> = events_of(&p, mac)
        .await
        .into_iter()
        .filter(|(k, _)| k == "token_moved")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(moved.len(), 2, "{moved:?}");
    assert!(
        moved[0].starts_with("install token moved from 10.0.0.30 to 10.0.0.31: DHCP saw"),
        "{moved:?}"
    );
}

fn group(
    name: &str,
    selector: &[(&str, &str)],
    profile: Option<&str>,
    vars: &[(&str, &str)],
) -> crate::dto::Group {
    let map = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    crate::dto::Group {
        name: name.into(),
        selector: map(selector),
        profile: profile.map(str::to_string),
        vars: map(vars),
        labels: BTreeMap::new(),
    }
}

/// A machine nobody enrolled, whose profile comes only from a group that selects it by the
/// serial its firmware reports, installs on the very boot request that first reports it:
/// enrolled by the group (named in the event), token, config with the group's values,
/// phone-home, local boot — the lifecycle an enrolled machine has.
#[tokio::test]
async fn a_machine_whose_profile_comes_from_a_group_installs_like_an_enrolled_one() {
    let p = prov();
    let mac: Mac = "52:54:00:aa:10:01".parse().unwrap();
    // First seen by DHCP only: discovered, no serial yet.
    p.boot
        .dhcp_answer(mac, Default::default(), "DHCPDISCOVER")
        .await;
    p.inv.flush().await.unwrap();
    assert_eq!(p.admin.machine(mac).await.unwrap().state, State::Discovered);
    p.admin
        .put_group(
            group(
                "rack3",
                &[("serial", "SN-R3-01")],
                Some("debian-12"),
                &[("timezone", "Europe/Oslo")],
            ),
            false,
        )
        .await
        .unwrap();
    p.admin
        .put_group(
            group(
                "site",
                &[],
                None,
                &[("timezone", "UTC"), ("mirror_host", "mirror.site")],
            ),
            false,
        )
        .await
        .unwrap();
    // The machine shows what it would get, and from where, before it boots again.
    let m = p.admin.machine(mac).await.unwrap();
    assert_eq!(
        (m.state, m.profile.as_deref()),
        (State::Discovered, None),
        "no serial yet"
    );
    let said = Sighting {
        serial: Some("SN-R3-01".into()),
        ..Default::default()
    };
    let script = p
        .boot
        .boot(mac, bios(), said, PEER, BASE)
        .await
        .unwrap()
        .unwrap();
    assert!(script.contains("/assets/debian-12/linux"), "{script}");
    let token = token_of(&script);
    let m = p.admin.machine(mac).await.unwrap();
    assert_eq!(m.state, State::Installing);
    assert_eq!(m.serial.as_deref(), Some("SN-R3-01"));
    assert_eq!(m.profile.as_deref(), Some("debian-12"));
    assert_eq!(m.own_profile(), None, "the profile stays the group's");
    assert_eq!(m.inherited.profile.as_deref(), Some("rack3"));
    assert_eq!(m.inherited.groups, ["rack3", "site"]);
    assert_eq!(
        m.vars.get("timezone").map(String::as_str),
        Some("Europe/Oslo")
    );
    assert_eq!(
        m.inherited.values.get("vars.timezone").map(String::as_str),
        Some("rack3")
    );
    assert_eq!(
        m.inherited
            .values
            .get("vars.mirror_host")
            .map(String::as_str),
        Some("site")
    );
    let events = events_of(&p, mac).await;
    let enrolled = events
        .iter()
        .find(|(k, _)| k == "enrolled")
        .expect("the group enrolled it");
    assert!(
        enrolled.1.contains("profile debian-12 from group rack3"),
        "{enrolled:?}"
    );
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    let (e, i) = (
        kinds.iter().position(|k| *k == "enrolled").unwrap(),
        kinds.iter().position(|k| *k == "install_started").unwrap(),
    );
    assert!(e < i, "{kinds:?}");

    // The config carries the group's values; the phone-home installs it; then it boots local.
    let (_, preseed) = p
        .boot
        .config(&token, "preseed.cfg", PEER, BASE)
        .await
        .unwrap();
    assert!(
        preseed.contains("d-i time/zone string Europe/Oslo"),
        "{preseed}"
    );
    assert!(
        preseed.contains("d-i mirror/http/hostname string mirror.site"),
        "{preseed}"
    );
    let m = p
        .boot
        .phone_home(&token, vec![KEY.into()], PEER)
        .await
        .unwrap();
    assert_eq!(m.state, State::Installed);
    let again = p
        .boot
        .boot(mac, bios(), Sighting::default(), PEER, BASE)
        .await
        .unwrap()
        .unwrap();
    assert!(
        again.contains("sanboot") || again.contains("exit"),
        "{again}"
    );

    // The group gives the only profile of an installed machine: it cannot go, nor lose it.
    let e = p.admin.delete_group("rack3").await.unwrap_err().to_string();
    assert!(
        e.contains("without a profile") && e.contains(&mac.to_string()),
        "{e}"
    );
    let e = p
        .admin
        .put_group(group("rack3", &[("serial", "SN-R3-01")], None, &[]), true)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("without a profile"), "{e}");
    assert_eq!(
        p.admin.group("rack3").unwrap().profile.as_deref(),
        Some("debian-12"),
        "a refused change changes nothing"
    );
    // Once it has a profile of its own, the group can go.
    p.admin
        .update(
            mac,
            UpdateRequest {
                profile: Some("debian-12".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    p.admin.delete_group("rack3").await.unwrap();
    let m = p.admin.machine(mac).await.unwrap();
    assert_eq!(m.own_profile(), Some("debian-12"));
    assert_eq!(
        m.vars.get("timezone").map(String::as_str),
        Some("UTC"),
        "now the site's"
    );
}

/// Enroll without a profile takes its group's; updates change the machine's own values and
/// never bake its groups' into them; a change of labels that would leave it without a
/// profile is refused.
#[tokio::test]
async fn enroll_and_update_keep_own_and_group_values_apart() {
    let p = prov();
    let mac: Mac = "52:54:00:aa:10:02".parse().unwrap();
    let bare = EnrollRequest {
        mac: mac.to_string(),
        labels: [("rack".to_string(), "4".to_string())].into(),
        ..Default::default()
    };
    let e = p.admin.enroll(bare.clone()).await.unwrap_err().to_string();
    assert!(e.contains("no group gives it one"), "{e}");
    assert!(
        matches!(p.admin.machine(mac).await, Err(Error::Store(StoreError::NotFound(m))) if m == mac),
        "nothing was written"
    );
    p.admin
        .put_group(
            group(
                "rack4",
                &[("rack", "4")],
                Some("ubuntu-24.04"),
                &[("ntp", "r4")],
            ),
            false,
        )
        .await
        .unwrap();
    let m = p.admin.enroll(bare).await.unwrap();
    assert_eq!(
        (m.state, m.profile.as_deref()),
        (State::Enrolled, Some("ubuntu-24.04"))
    );
    assert_eq!(m.inherited.profile.as_deref(), Some("rack4"));
    // A variable of its own beside the inherited one: the inherited one is not copied in.
    let m = p
        .admin
        .update(
            mac,
            UpdateRequest {
                set_vars: Some([("disk".to_string(), "/dev/vda".to_string())].into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        m.own_vars(),
        [("disk".to_string(), "/dev/vda".to_string())].into()
    );
    assert_eq!(m.vars.get("ntp").map(String::as_str), Some("r4"));
    // Its own value beats the group's.
    let m = p
        .admin
        .update(
            mac,
            UpdateRequest {
                set_vars: Some([("ntp".to_string(), "mine".to_string())].into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(m.vars.get("ntp").map(String::as_str), Some("mine"));
    assert!(!m.inherited.values.contains_key("vars.ntp"));
    // Moving it out of the group would leave it without a profile.
    let e = p
        .admin
        .update(
            mac,
            UpdateRequest {
                labels: Some([("rack".to_string(), "5".to_string())].into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("would have no profile"), "{e}");
    // Labels a selector reads as facts are refused, for machines and groups alike.
    let e = p
        .admin
        .update(
            mac,
            UpdateRequest {
                labels: Some([("serial".to_string(), "x".to_string())].into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("label name \"serial\" is taken"), "{e}");
}

/// Group values are validated as a machine's are, selectors normalised, and a tie refused.
#[tokio::test]
async fn groups_refuse_bad_values_and_ties() {
    let p = prov();
    let bad = [
        (group("bad name", &[], None, &[]), "group name"),
        (group("g", &[("mac", "zz")], None, &[]), "selector mac=zz"),
        (group("g", &[("rack", "")], None, &[]), "has no value"),
        (group("g", &[("uuid", "nope")], None, &[]), "UUID"),
        (group("g", &[], Some("nope"), &[]), "no profile named"),
        (
            group("g", &[], None, &[("ip", "10.0.0.5")]),
            "belongs to one machine",
        ),
        (group("g", &[], None, &[("x", "a\nb")]), "control character"),
        (
            group("g", &[], Some("debian-12"), &[("console", "a b")]),
            "does not render",
        ),
    ];
    for (g, want) in bad {
        let e = p
            .admin
            .put_group(g.clone(), true)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{g:?}: {e}");
    }
    assert!(p.admin.groups().is_empty(), "nothing was written");
    p.admin
        .put_group(
            group(
                "byuuid",
                &[
                    ("mac", "52-54-00-AA-10-03"),
                    ("uuid", "4C4C4544-0000-0000-0000-000000000001"),
                ],
                None,
                &[],
            ),
            false,
        )
        .await
        .unwrap();
    let g = p.admin.group("byuuid").unwrap();
    assert_eq!(g.selector["mac"], "52:54:00:aa:10:03");
    assert_eq!(g.selector["uuid"], "4c4c4544-0000-0000-0000-000000000001");
    p.admin
        .put_group(
            group("rack3", &[("rack", "3")], Some("debian-12"), &[]),
            false,
        )
        .await
        .unwrap();
    let e = p
        .admin
        .put_group(
            group("r640", &[("model", "r640")], Some("ubuntu-24.04"), &[]),
            false,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Store(StoreError::GroupConflict(_))),
        "{e}"
    );
    assert!(e.to_string().contains("groups r640 and rack3"), "{e}");
    let e = p
        .admin
        .put_group(group("rack3", &[], None, &[]), false)
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Store(StoreError::GroupConflict(_)))
            && e.to_string().contains("already exists"),
        "create refuses a taken name, checked in the transaction: {e}"
    );
    assert!(matches!(
        p.admin.delete_group("nope").await,
        Err(Error::Store(StoreError::NoGroup(_)))
    ));
}

fn rule(name: &str, conditions: &[(&str, &str)], profile: Option<&str>) -> crate::dto::Rule {
    crate::dto::Rule {
        name: name.into(),
        conditions: conditions
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        profile: profile.map(str::to_string),
        ..Default::default()
    }
}

/// An OUI rule with a count enrolls the first machines that boot (hostnames from the
/// pattern), installs them on that same boot, and leaves the next one discovered with a
/// `rule_full` event; a rule on what DHCP said (vendor class) works from the DHCP sighting.
#[tokio::test]
async fn a_rule_enrolls_the_first_machines_up_to_its_count_and_they_install_at_once() {
    let p = prov();
    p.admin
        .put_rule(
            crate::dto::Rule {
                hostname: Some("rack7-{index:02}".into()),
                max: Some(2),
                labels: [("rack".to_string(), "7".to_string())].into(),
                ..rule("rack7", &[("mac", "52-54-00-AB-*")], Some("debian-12"))
            },
            false,
        )
        .await
        .unwrap();
    let stored = p.admin.rule("rack7").unwrap();
    assert_eq!(stored.conditions["mac"], "52:54:00:ab:*", "normalised");
    for (i, m) in ["52:54:00:ab:00:01", "52:54:00:ab:00:02"]
        .iter()
        .enumerate()
    {
        let mac: Mac = m.parse().unwrap();
        let script = p
            .boot
            .boot(mac, bios(), Sighting::default(), PEER, BASE)
            .await
            .unwrap()
            .unwrap();
        assert!(script.contains("/assets/debian-12/linux"), "{script}");
        let m = p.admin.machine(mac).await.unwrap();
        assert_eq!(m.state, State::Installing);
        assert_eq!(m.hostname, Some(format!("rack7-{:02}", i + 1)));
        assert_eq!(m.labels["rack"], "7");
        assert_eq!(m.own_profile(), Some("debian-12"));
        let kinds = kinds(&p, mac).await;
        assert_eq!(
            kinds,
            ["discovered", "enrolled", "install_started"],
            "{mac}"
        );
    }
    let third: Mac = "52:54:00:ab:00:03".parse().unwrap();
    let script = p
        .boot
        .boot(third, bios(), Sighting::default(), PEER, BASE)
        .await
        .unwrap()
        .unwrap();
    assert!(script.contains("sanboot"), "the discovery answer: {script}");
    assert_eq!(
        p.admin.machine(third).await.unwrap().state,
        State::Discovered
    );
    let events = events_of(&p, third).await;
    assert!(
        events.iter().any(
            |(k, d)| k == "rule_full" && d.contains("is full: it has enrolled 2 of 2 machines")
        ),
        "{events:?}"
    );
    assert_eq!(p.admin.rule("rack7").unwrap().used, 2);

    // A rule on the DHCP vendor class (UEFI x64 PXE), tried before the OUI rule.
    p.admin
        .put_rule(
            crate::dto::Rule {
                priority: 5,
                ..rule(
                    "uefi",
                    &[("vendor_class", "PXEClient:Arch:00007*")],
                    Some("ubuntu-24.04"),
                )
            },
            false,
        )
        .await
        .unwrap();
    let uefi: Mac = "52:54:00:ab:00:04".parse().unwrap();
    p.boot
        .dhcp_answer(
            uefi,
            Sighting {
                dhcp: crate::store::DhcpSeen {
                    vendor_class: Some("PXEClient:Arch:00007:UNDI:003016".into()),
                    interface: Some("eno1".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
            "DHCPDISCOVER",
        )
        .await;
    p.inv.flush().await.unwrap();
    let script = p
        .boot
        .boot(uefi, bios(), Sighting::default(), PEER, BASE)
        .await
        .unwrap()
        .unwrap();
    assert!(script.contains("/assets/ubuntu-24.04/"), "{script}");
    let m = p.admin.machine(uefi).await.unwrap();
    assert_eq!(m.dhcp.interface.as_deref(), Some("eno1"));
}

/// Propose mode: the machine is marked and keeps getting the discovery answer until an
/// operator confirms; a rule can leave the profile to a group through the labels it gives.
#[tokio::test]
async fn a_proposal_waits_for_the_operator_and_a_rule_can_put_a_machine_in_a_group() {
    let p = prov();
    p.admin
        .put_group(
            group("rack9", &[("rack", "9")], Some("ubuntu-24.04"), &[]),
            false,
        )
        .await
        .unwrap();
    p.admin
        .put_rule(
            crate::dto::Rule {
                mode: "propose".into(),
                labels: [("rack".to_string(), "9".to_string())].into(),
                ..rule("by-serial", &[("serial", "SN9-*")], None)
            },
            false,
        )
        .await
        .unwrap();
    let mac: Mac = "52:54:00:ab:09:01".parse().unwrap();
    let said = Sighting {
        serial: Some("SN9-0001".into()),
        ..Default::default()
    };
    for _ in 0..2 {
        let s = p
            .boot
            .boot(mac, bios(), said.clone(), PEER, BASE)
            .await
            .unwrap()
            .unwrap();
        assert!(s.contains("sanboot"), "{s}");
    }
    let m = p.admin.machine(mac).await.unwrap();
    assert_eq!(
        (m.state, m.proposed_rule.as_deref()),
        (State::Discovered, Some("by-serial"))
    );
    let e = p
        .admin
        .confirm("52:54:00:ab:09:02".parse().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Store(StoreError::NotFound(_))), "{e:?}");
    let m = p.admin.confirm(mac).await.unwrap();
    assert_eq!(m.state, State::Enrolled);
    assert_eq!(m.profile.as_deref(), Some("ubuntu-24.04"));
    assert_eq!(m.inherited.profile.as_deref(), Some("rack9"));
    let e = p.admin.confirm(mac).await.unwrap_err().to_string();
    assert!(e.contains("no rule proposes"), "{e}");
    let s = p
        .boot
        .boot(mac, bios(), Sighting::default(), PEER, BASE)
        .await
        .unwrap()
        .unwrap();
    assert!(s.contains("/assets/ubuntu-24.04/"), "{s}");
}

/// With the ignore discovery answer, DHCP answers a discovered machine only if a rule will
/// take it at `/ipxe`.
#[tokio::test]
async fn the_ignore_answer_still_answers_machines_a_rule_takes() {
    let p = stack(DiscoverAnswer::Ignore);
    let taken: Mac = "52:54:00:ab:0a:01".parse().unwrap();
    let other: Mac = "00:11:22:33:44:55".parse().unwrap();
    assert!(!p.boot.dhcp_answer(taken, Default::default(), "x").await);
    p.admin
        .put_rule(
            rule("oui", &[("mac", "52:54:00:*")], Some("debian-12")),
            false,
        )
        .await
        .unwrap();
    assert!(p.boot.dhcp_answer(taken, Default::default(), "x").await);
    assert!(!p.boot.dhcp_answer(other, Default::default(), "x").await);
    // A MAC never seen that a group gives a profile (by the UUID its DHCP request carries)
    // is answered on its first packet too.
    p.admin
        .put_group(
            group(
                "by-uuid",
                &[("uuid", "4c4c4544-0000-0000-0000-0000000000aa")],
                Some("debian-12"),
                &[],
            ),
            false,
        )
        .await
        .unwrap();
    let fresh: Mac = "00:11:22:33:44:66".parse().unwrap();
    let said = Sighting {
        uuid: Some("4c4c4544-0000-0000-0000-0000000000aa".into()),
        ..Default::default()
    };
    assert!(p.boot.dhcp_answer(fresh, said, "x").await);
}

/// Rule values are checked like a machine's: conditions, mode, the hostname pattern, the
/// profile (its own or a group's) rendered with its values.
#[tokio::test]
async fn rules_refuse_bad_values() {
    let p = prov();
    let bad = [
        (rule("bad name", &[], Some("debian-12")), "rule name"),
        (
            rule("r", &[("mac", "52:5*")], Some("debian-12")),
            "whole octets",
        ),
        (
            rule("r", &[("mac", "zz")], Some("debian-12")),
            "match mac=zz",
        ),
        (
            rule("r", &[("rack", "")], Some("debian-12")),
            "has no value",
        ),
        (rule("r", &[("a-b", "1")], Some("debian-12")), "match key"),
        (rule("r", &[], Some("nope")), "no profile named"),
        (rule("r", &[], None), "gives no profile"),
        (
            crate::dto::Rule {
                mode: "sometimes".into(),
                ..rule("r", &[], Some("debian-12"))
            },
            "enroll or propose",
        ),
        (
            crate::dto::Rule {
                hostname: Some("rack_{index}".into()),
                ..rule("r", &[], Some("debian-12"))
            },
            "RFC 1123",
        ),
        (
            crate::dto::Rule {
                hostname: Some("n-{nope}".into()),
                ..rule("r", &[], Some("debian-12"))
            },
            "unknown placeholder",
        ),
        (
            crate::dto::Rule {
                max: Some(0),
                ..rule("r", &[], Some("debian-12"))
            },
            "max 0",
        ),
        (
            crate::dto::Rule {
                vars: [("console".to_string(), "a b".to_string())].into(),
                ..rule("r", &[], Some("debian-12"))
            },
            "does not render",
        ),
    ];
    for (r, want) in bad {
        let e = p
            .admin
            .put_rule(r.clone(), true)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{r:?}: {e}");
    }
    assert!(p.admin.rules().is_empty(), "nothing was written");
}
