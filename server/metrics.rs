//! Prometheus metrics: what the machine-facing protocols did, how installs and registrations
//! went, and what the inventory holds, as `/metrics` shows them (text exposition format
//! 0.0.4, which `promtool check metrics` lints).
//!
//! Every label takes its values from a closed set: the enums below, the route *patterns* of
//! the two routers (never a raw path: it carries install tokens and MACs), and the names of
//! profiles and roles. No MAC, hostname, address or token is ever a label value, so the
//! number of series is bounded by the code and the catalog, not by the network. Label sets
//! are created when the daemon starts, so a rate exists from the first scrape.
//!
//! Recording is a relaxed atomic add (the `prometheus` crate's counters and histograms are
//! lock-free): the hot path pays no lock and no allocation for it. Values that are state,
//! not events (machines per state, what the inventory's bounds threw away) are read when
//! scraped.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::policy::State;
use crate::store::Stats;

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Declares a closed set of label values: an enum with `as_str` and `ALL`.
macro_rules! label_values {
    ($(#[$doc:meta])* $name:ident { $( $(#[$vdoc:meta])* $variant:ident = $value:literal, )* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $( $(#[$vdoc])* $variant, )*
        }

        impl $name {
            /// Every value, to create the label sets at start.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self { $( $name::$variant => $value, )* }
            }
        }
    };
}

label_values! {
    /// What became of a DHCP datagram.
    DhcpResult {
        /// Answered (the reply's type is counted in `provision_dhcp_replies_sent_total`).
        Answered = "answered",
        /// Not a well-formed BOOTREQUEST.
        Malformed = "malformed",
        /// Well formed, but not a boot client or not a message ProxyDHCP answers (a REQUEST on
        /// port 67 is the site server's; the client's address is still learned from it).
        NotForUs = "not_for_us",
        /// A boot client whose architecture has no boot file.
        Unsupported = "unsupported",
        /// Policy says no answer (the `ignore` discovery answer).
        Ignored = "ignored",
        /// The MAC sent more than the per-MAC rate limit allows.
        RateLimited = "rate_limited",
        /// Too many packets were already waiting (the disk is slow): dropped unread.
        Overloaded = "overloaded",
        /// Address mode: nothing to answer (a RELEASE or DECLINE, no free address, a REQUEST
        /// for another server).
        NoAnswer = "no_answer",
        /// Handling it panicked (a bug): dropped.
        Panicked = "panicked",
    }
}

label_values! {
    /// The DHCP message type of a datagram (`unknown` when it did not parse).
    DhcpType {
        /// DHCPDISCOVER.
        Discover = "discover",
        /// DHCPREQUEST.
        Request = "request",
        /// DHCPINFORM.
        Inform = "inform",
        /// DHCPRELEASE.
        Release = "release",
        /// DHCPDECLINE.
        Decline = "decline",
        /// Any other type.
        Other = "other",
        /// Not parsed (malformed, or dropped before it was read).
        Unknown = "unknown",
    }
}

label_values! {
    /// A DHCP reply's message type.
    DhcpReply {
        /// DHCPOFFER.
        Offer = "offer",
        /// DHCPACK.
        Ack = "ack",
        /// DHCPNAK (address mode).
        Nak = "nak",
    }
}

label_values! {
    /// The kind of client a DHCP reply went to.
    DhcpClient {
        /// Firmware PXE.
        Pxe = "pxe",
        /// UEFI HTTP Boot.
        HttpBoot = "http_boot",
        /// iPXE.
        Ipxe = "ipxe",
        /// Any other DHCP client (address mode only).
        Other = "other",
    }
}

label_values! {
    /// The DHCP port a datagram arrived on.
    DhcpPort {
        /// UDP 67.
        Dhcp = "67",
        /// UDP 4011, the PXE boot server port.
        Pxe = "4011",
    }
}

label_values! {
    /// What became of a TFTP request.
    TftpResult {
        /// Sent to the end.
        Served = "served",
        /// The client stopped after the option acknowledgement (UEFI's size probe).
        SizeProbe = "size_probe",
        /// Ended midway (the client went away or stopped acknowledging).
        Aborted = "aborted",
        /// Ended unacknowledged to make room for a new request.
        Evicted = "evicted",
        /// No such file.
        NotFound = "not_found",
        /// A name outside the TFTP roots.
        Denied = "denied",
        /// Refused by the transfer caps.
        Busy = "busy",
        /// Not a well-formed read request (writes included: the server is read-only).
        Refused = "refused",
        /// No socket for the transfer.
        Error = "error",
    }
}

label_values! {
    /// The boot decision `/ipxe` answered with.
    BootDecision {
        /// The install script (with a new install token).
        Install = "install",
        /// The local-boot script.
        LocalBoot = "local_boot",
        /// Nothing: back to the firmware (the `ignore` discovery answer).
        Ignore = "ignore",
        /// An install claim without evidence was refused.
        ClaimRefused = "claim_refused",
    }
}

label_values! {
    /// Why an installer's config request was refused.
    ConfigRefusal {
        /// No such install token.
        UnknownToken = "unknown_token",
        /// The token's lifetime ran out.
        Expired = "expired",
        /// The token was burnt by a phone-home.
        Used = "used",
        /// The token was used from another address than its own.
        OtherAddress = "other_address",
        /// The profile has no such artifact.
        NoArtifact = "no_artifact",
        /// The template failed to render or its check refused it.
        RenderFailed = "render_failed",
    }
}

label_values! {
    /// What became of a phone-home.
    PhoneHome {
        /// Host keys pinned; the machine is installed.
        Installed = "installed",
        /// The token was not accepted.
        Refused = "refused",
        /// The request carried no usable host key.
        Invalid = "invalid",
    }
}

label_values! {
    /// How a registration run ended.
    Registration {
        /// Every step ran and the hand-off hook succeeded.
        Registered = "registered",
        /// A step (or the hand-off) failed.
        Failed = "failed",
    }
}

label_values! {
    /// Which HTTP listener answered.
    Listener {
        /// The machine-facing listener.
        Machine = "machine",
        /// The admin API and web UI listener.
        Admin = "admin",
    }
}

/// The label a request gets when no route matched (scanners, typos).
pub const UNMATCHED: &str = "unmatched";

/// The status classes HTTP requests are counted by.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The status class of a status code.
fn status_class(code: u16) -> &'static str {
    match code {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Request durations: a script answer takes tens of microseconds, a kernel by sendfile
/// seconds.
const HTTP_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];
/// TFTP transfers: an iPXE binary (~100 KB to 1 MB) in milliseconds to seconds.
const TFTP_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Installs and registrations: minutes.
const LONG_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0,
];

/// The daemon's metrics.
pub struct Metrics {
    registry: Registry,
    dhcp_received: IntCounterVec,
    dhcp_replies: IntCounterVec,
    tftp_requests: IntCounterVec,
    tftp_bytes: IntCounter,
    tftp_duration: Histogram,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    boot_decisions: IntCounterVec,
    configs_served: IntCounterVec,
    configs_refused: IntCounterVec,
    phone_homes: IntCounterVec,
    install_duration: HistogramVec,
    registrations: IntCounterVec,
    registration_duration: HistogramVec,
    registrations_queued: IntGauge,
    registrations_running: IntGauge,
    machines: IntGaugeVec,
    /// The inventory's own counters, copied in at scrape time (see [`Metrics::scraped`]).
    inventory: InventoryCounters,
    /// Scrapes copy the inventory's counters one at a time.
    scrape: Mutex<()>,
}

/// What the inventory's bounds threw away and how its writes were grouped.
struct InventoryCounters {
    observations_dropped: IntCounter,
    observations_written: IntCounter,
    discovered: IntCounter,
    discovered_evicted: IntCounter,
    discoveries_shed: IntCounter,
    events_pruned: IntCounter,
    commits: IntCounter,
    writes: IntCounter,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::with_opts(Opts::new(name, help).namespace("provision"))
        .expect("a valid metric name");
    registry
        .register(Box::new(c.clone()))
        .expect("each metric registered once");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help).namespace("provision"), labels)
        .expect("a valid metric name");
    registry
        .register(Box::new(c.clone()))
        .expect("each metric registered once");
    c
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help)
            .namespace("provision")
            .buckets(buckets.to_vec()),
        labels,
    )
    .expect("a valid metric name");
    registry
        .register(Box::new(h.clone()))
        .expect("each metric registered once");
    h
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::with_opts(Opts::new(name, help).namespace("provision"))
        .expect("a valid metric name");
    registry
        .register(Box::new(g.clone()))
        .expect("each metric registered once");
    g
}

/// What the label sets are created for at start: the routes of both listeners, the
/// catalog's profiles and roles.
#[derive(Clone, Debug, Default)]
pub struct Known {
    /// Route patterns of the machine listener.
    pub machine_routes: Vec<&'static str>,
    /// Route patterns of the admin listener.
    pub admin_routes: Vec<&'static str>,
    /// Profile names.
    pub profiles: Vec<String>,
    /// Role names.
    pub roles: Vec<String>,
}

impl Metrics {
    /// The metrics, with every label set of `known` created at zero.
    pub fn new(known: &Known) -> Metrics {
        let r = Registry::new();
        let m = Metrics {
            dhcp_received: counter_vec(
                &r,
                "dhcp_packets_received_total",
                "DHCP datagrams received, by port, message type and what became of them.",
                &["port", "type", "result"],
            ),
            dhcp_replies: counter_vec(
                &r,
                "dhcp_replies_sent_total",
                "DHCP replies sent, by message type and kind of client.",
                &["type", "client"],
            ),
            tftp_requests: counter_vec(
                &r,
                "tftp_requests_total",
                "TFTP read requests, by what became of them.",
                &["result"],
            ),
            tftp_bytes: counter(
                &r,
                "tftp_sent_bytes_total",
                "Bytes of files TFTP clients acknowledged.",
            ),
            tftp_duration: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "tftp_transfer_duration_seconds",
                        "Time from a TFTP request to its transfer's end, for transfers that started.",
                    )
                    .namespace("provision")
                    .buckets(TFTP_BUCKETS.to_vec()),
                )
                .expect("a valid metric name");
                r.register(Box::new(h.clone()))
                    .expect("each metric registered once");
                h
            },
            http_requests: counter_vec(
                &r,
                "http_requests_total",
                "HTTP requests, by listener, route pattern and status class.",
                &["listener", "route", "code"],
            ),
            http_duration: histogram_vec(
                &r,
                "http_request_duration_seconds",
                "Time to answer an HTTP request (files sent by sendfile: to the last byte; others: to the response head), by listener and route pattern.",
                &["listener", "route"],
                HTTP_BUCKETS,
            ),
            boot_decisions: counter_vec(
                &r,
                "boot_decisions_total",
                "Answers to iPXE's per-machine request (/ipxe), by decision.",
                &["decision"],
            ),
            configs_served: counter_vec(
                &r,
                "configs_served_total",
                "Installer configs served by install token, by artifact kind.",
                &["kind"],
            ),
            configs_refused: counter_vec(
                &r,
                "configs_refused_total",
                "Installer config requests refused, by reason.",
                &["reason"],
            ),
            phone_homes: counter_vec(
                &r,
                "phone_homes_total",
                "Phone-homes of installed systems, by result.",
                &["result"],
            ),
            install_duration: histogram_vec(
                &r,
                "install_duration_seconds",
                "Time from enrolled (or reprovisioned) to installed (the phone-home), by profile.",
                &["profile"],
                LONG_BUCKETS,
            ),
            registrations: counter_vec(
                &r,
                "registrations_total",
                "Registration runs finished, by role and result.",
                &["role", "result"],
            ),
            registration_duration: histogram_vec(
                &r,
                "registration_duration_seconds",
                "Time a registration run took (connect, steps, hand-off), by role.",
                &["role"],
                LONG_BUCKETS,
            ),
            registrations_queued: gauge(
                &r,
                "registrations_queued",
                "Registration runs waiting for a worker.",
            ),
            registrations_running: gauge(
                &r,
                "registrations_running",
                "Registration runs in progress.",
            ),
            machines: {
                let g = IntGaugeVec::new(
                    Opts::new("machines", "Machines in the inventory, by state (read when scraped).")
                        .namespace("provision"),
                    &["state"],
                )
                .expect("a valid metric name");
                r.register(Box::new(g.clone()))
                    .expect("each metric registered once");
                g
            },
            inventory: InventoryCounters {
                observations_dropped: counter(
                    &r,
                    "observations_dropped_total",
                    "Observations (sightings, served scripts and files) dropped because the write queue was full.",
                ),
                observations_written: counter(&r, "observations_written_total", "Observations written."),
                discovered: counter(
                    &r,
                    "machines_discovered_total",
                    "Unknown MACs recorded as discovered (by DHCP or by /ipxe).",
                ),
                discovered_evicted: counter(
                    &r,
                    "discovered_evicted_total",
                    "Discovered, never-enrolled machines evicted over the discovered cap.",
                ),
                discoveries_shed: counter(
                    &r,
                    "discoveries_shed_total",
                    "Unknown MACs seen only in DHCP while the discovered cap was full: not recorded.",
                ),
                events_pruned: counter(&r, "events_pruned_total", "Events deleted by retention."),
                commits: counter(
                    &r,
                    "store_commits_total",
                    "Write transactions committed (each one fsync).",
                ),
                writes: counter(
                    &r,
                    "store_writes_total",
                    "Durable operations committed (several per commit under load).",
                ),
            },
            scrape: Mutex::new(()),
            registry: r,
        };
        let build = IntGaugeVec::new(
            Opts::new("build_info", "The running build: always 1.").namespace("provision"),
            &["version"],
        )
        .expect("a valid metric name");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        m.registry
            .register(Box::new(build))
            .expect("each metric registered once");
        // CPU, memory, open files and start time of this process (process_*).
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("each metric registered once");
        m.create_label_sets(known);
        m
    }

    /// Every label set the code and `known` allow, at zero.
    fn create_label_sets(&self, known: &Known) {
        // The combinations that can happen: a datagram dropped before it was parsed has no
        // type; a parsed one has.
        use DhcpResult as R;
        let unparsed = [
            R::Malformed,
            R::NotForUs,
            R::Unsupported,
            R::Overloaded,
            R::Panicked,
        ];
        let parsed = [
            R::Answered,
            R::NotForUs,
            R::Unsupported,
            R::Ignored,
            R::RateLimited,
            R::NoAnswer,
        ];
        for port in DhcpPort::ALL {
            for t in DhcpType::ALL {
                let results: &[R] = if *t == DhcpType::Unknown {
                    &unparsed
                } else {
                    &parsed
                };
                for res in results {
                    self.dhcp_received.with_label_values(&[
                        port.as_str(),
                        t.as_str(),
                        res.as_str(),
                    ]);
                }
            }
        }
        for t in DhcpReply::ALL {
            for c in DhcpClient::ALL {
                self.dhcp_replies
                    .with_label_values(&[t.as_str(), c.as_str()]);
            }
        }
        for r in TftpResult::ALL {
            self.tftp_requests.with_label_values(&[r.as_str()]);
        }
        for (listener, routes) in [
            (Listener::Machine, &known.machine_routes),
            (Listener::Admin, &known.admin_routes),
        ] {
            for route in routes.iter().copied().chain([UNMATCHED]) {
                for class in STATUS_CLASSES {
                    self.http_requests
                        .with_label_values(&[listener.as_str(), route, class]);
                }
                self.http_duration
                    .with_label_values(&[listener.as_str(), route]);
            }
        }
        for d in BootDecision::ALL {
            self.boot_decisions.with_label_values(&[d.as_str()]);
        }
        for k in crate::render::ArtifactKind::ALL {
            self.configs_served.with_label_values(&[k.as_str()]);
        }
        for r in ConfigRefusal::ALL {
            self.configs_refused.with_label_values(&[r.as_str()]);
        }
        for p in PhoneHome::ALL {
            self.phone_homes.with_label_values(&[p.as_str()]);
        }
        for p in &known.profiles {
            self.install_duration.with_label_values(&[p.as_str()]);
        }
        for role in &known.roles {
            for r in Registration::ALL {
                self.registrations
                    .with_label_values(&[role.as_str(), r.as_str()]);
            }
            self.registration_duration
                .with_label_values(&[role.as_str()]);
        }
        for s in crate::policy::ALL_STATES {
            self.machines.with_label_values(&[s.as_str()]);
        }
    }

    /// A DHCP datagram and what became of it.
    pub fn dhcp_received(&self, port: DhcpPort, t: DhcpType, result: DhcpResult) {
        self.dhcp_received
            .with_label_values(&[port.as_str(), t.as_str(), result.as_str()])
            .inc();
    }

    /// A DHCP reply sent.
    pub fn dhcp_reply(&self, t: DhcpReply, client: DhcpClient) {
        self.dhcp_replies
            .with_label_values(&[t.as_str(), client.as_str()])
            .inc();
    }

    /// A TFTP request refused before any transfer started.
    pub fn tftp_refused(&self, result: TftpResult) {
        self.tftp_requests
            .with_label_values(&[result.as_str()])
            .inc();
    }

    /// A TFTP transfer ended: how, what the client acknowledged, how long it took.
    pub fn tftp_transfer(&self, result: TftpResult, bytes: u64, took: Duration) {
        self.tftp_requests
            .with_label_values(&[result.as_str()])
            .inc();
        self.tftp_bytes.inc_by(bytes);
        self.tftp_duration.observe(took.as_secs_f64());
    }

    /// An HTTP request answered on `listener` by `route` (a pattern, or [`UNMATCHED`]).
    pub fn http_request(&self, listener: Listener, route: &str, status: u16, took: Duration) {
        self.http_requests
            .with_label_values(&[listener.as_str(), route, status_class(status)])
            .inc();
        self.http_duration
            .with_label_values(&[listener.as_str(), route])
            .observe(took.as_secs_f64());
    }

    /// `/ipxe`'s answer.
    pub fn boot_decision(&self, d: BootDecision) {
        self.boot_decisions.with_label_values(&[d.as_str()]).inc();
    }

    /// A config served.
    pub fn config_served(&self, kind: crate::render::ArtifactKind) {
        self.configs_served
            .with_label_values(&[kind.as_str()])
            .inc();
    }

    /// A config request refused.
    pub fn config_refused(&self, why: ConfigRefusal) {
        self.configs_refused
            .with_label_values(&[why.as_str()])
            .inc();
    }

    /// A phone-home.
    pub fn phone_home(&self, result: PhoneHome) {
        self.phone_homes.with_label_values(&[result.as_str()]).inc();
    }

    /// An install of `profile` finished after `took`.
    pub fn install_finished(&self, profile: &str, took: Duration) {
        self.install_duration
            .with_label_values(&[profile])
            .observe(took.as_secs_f64());
    }

    /// A registration run was queued.
    pub fn registration_queued(&self) {
        self.registrations_queued.inc();
    }

    /// A run counted as queued could not be queued after all.
    pub fn registration_unqueued(&self) {
        self.registrations_queued.dec();
    }

    /// A queued registration run started on a worker.
    pub fn registration_started(&self) {
        self.registrations_queued.dec();
        self.registrations_running.inc();
    }

    /// A started run that was not this daemon's to do: another daemon holds its claim, or
    /// this one runs it already.
    pub fn registration_skipped(&self) {
        self.registrations_running.dec();
    }

    /// A registration run of `role` ended (`role` is `None` when the run stopped before it
    /// knew one: the machine was gone or changed).
    pub fn registration_ended(&self, role: Option<&str>, result: Registration, took: Duration) {
        self.registrations_running.dec();
        if let Some(role) = role {
            self.registrations
                .with_label_values(&[role, result.as_str()])
                .inc();
            self.registration_duration
                .with_label_values(&[role])
                .observe(took.as_secs_f64());
        }
    }

    /// The exposition, with the scrape-time values: `machines` (per state) and the
    /// inventory's `stats`.
    pub fn scraped(&self, machines: &BTreeMap<State, u64>, stats: &Stats) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        for s in crate::policy::ALL_STATES {
            let n = machines.get(&s).copied().unwrap_or(0);
            self.machines
                .with_label_values(&[s.as_str()])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let inv = &self.inventory;
        for (c, v) in [
            (&inv.observations_dropped, stats.observations_dropped),
            (&inv.observations_written, stats.observations_written),
            (&inv.discovered, stats.discovered),
            (&inv.discovered_evicted, stats.discovered_evicted),
            (&inv.discoveries_shed, stats.discoveries_shed),
            (&inv.events_pruned, stats.events_pruned),
            (&inv.commits, stats.commits),
            (&inv.writes, stats.writes),
        ] {
            // Counters only go up: the inventory's are monotonic since start, as ours are.
            c.inc_by(v.saturating_sub(c.get()));
        }
        let mut out = Vec::with_capacity(64 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to memory cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn label_sets_exist_from_the_start_and_counters_move() {
        let m = Metrics::new(&Known {
            machine_routes: vec!["/ipxe"],
            admin_routes: vec!["/api/v1/machines"],
            profiles: vec!["debian".into()],
            roles: vec!["hypervisor".into()],
        });
        let text = m.scraped(&BTreeMap::new(), &Stats::default());
        for series in [
            r#"provision_dhcp_packets_received_total{port="4011",result="rate_limited",type="request"}"#,
            r#"provision_dhcp_packets_received_total{port="67",result="malformed",type="unknown"}"#,
            r#"provision_dhcp_replies_sent_total{client="pxe",type="offer"}"#,
            r#"provision_tftp_requests_total{result="size_probe"}"#,
            r#"provision_http_requests_total{code="2xx",listener="machine",route="/ipxe"}"#,
            r#"provision_http_requests_total{code="4xx",listener="admin",route="unmatched"}"#,
            r#"provision_boot_decisions_total{decision="local_boot"}"#,
            r#"provision_configs_served_total{kind="preseed"}"#,
            r#"provision_configs_refused_total{reason="expired"}"#,
            r#"provision_phone_homes_total{result="refused"}"#,
            r#"provision_install_duration_seconds_count{profile="debian"}"#,
            r#"provision_registrations_total{result="failed",role="hypervisor"}"#,
            r#"provision_machines{state="registering"}"#,
            "provision_observations_dropped_total",
        ] {
            assert_eq!(sample(&text, series), Some(0.0), "{series} in\n{text}");
        }
        assert_eq!(
            sample(
                &text,
                &format!(
                    "provision_build_info{{version=\"{}\"}}",
                    env!("CARGO_PKG_VERSION")
                )
            ),
            Some(1.0)
        );

        m.dhcp_received(DhcpPort::Dhcp, DhcpType::Discover, DhcpResult::Answered);
        m.dhcp_reply(DhcpReply::Offer, DhcpClient::Pxe);
        m.tftp_transfer(TftpResult::Served, 1000, Duration::from_millis(20));
        m.http_request(Listener::Machine, "/ipxe", 200, Duration::from_micros(80));
        m.registration_queued();
        m.registration_started();
        m.registration_ended(
            Some("hypervisor"),
            Registration::Registered,
            Duration::from_secs(3),
        );
        let stats = Stats {
            observations_dropped: 7,
            ..Default::default()
        };
        let text = m.scraped(&BTreeMap::from([(State::Installed, 4)]), &stats);
        for (series, v) in [
            (
                r#"provision_dhcp_packets_received_total{port="67",result="answered",type="discover"}"#,
                1.0,
            ),
            (
                r#"provision_dhcp_replies_sent_total{client="pxe",type="offer"}"#,
                1.0,
            ),
            (r#"provision_tftp_requests_total{result="served"}"#, 1.0),
            ("provision_tftp_sent_bytes_total", 1000.0),
            ("provision_tftp_transfer_duration_seconds_count", 1.0),
            (
                r#"provision_http_requests_total{code="2xx",listener="machine",route="/ipxe"}"#,
                1.0,
            ),
            (
                r#"provision_http_request_duration_seconds_bucket{listener="machine",route="/ipxe",le="0.0001"}"#,
                1.0,
            ),
            (
                r#"provision_registrations_total{result="registered",role="hypervisor"}"#,
                1.0,
            ),
            ("provision_registrations_queued", 0.0),
            ("provision_registrations_running", 0.0),
            (r#"provision_machines{state="installed"}"#, 4.0),
            ("provision_observations_dropped_total", 7.0),
        ] {
            assert_eq!(sample(&text, series), Some(v), "{series} in\n{text}");
        }
        // A second scrape with the same stats adds nothing.
        let again = m.scraped(&BTreeMap::new(), &stats);
        assert_eq!(
            sample(&again, "provision_observations_dropped_total"),
            Some(7.0)
        );
        assert_eq!(
            sample(&again, r#"provision_machines{state="installed"}"#),
            Some(0.0)
        );
    }
}
