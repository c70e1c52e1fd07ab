//! provision: a bare-metal provisioning server.
//!
//! Codemap, in the order a machine meets it:
//!
//! * [`http`] serves the machine-facing iPXE chain (`/boot.ipxe`, `/ipxe`), the installer
//!   configs behind install tokens (`/config/{token}/{artifact}`), phone-home, `/assets/`, and
//!   the admin REST API under `/api/v1`.
//! * [`provisioner::Provisioner`] is the one handle the protocol servers hold: it asks
//!   [`policy`] what a machine should boot, records what happened through [`store`], and renders
//!   scripts and configs through [`render`].
//! * [`policy`] is pure: lifecycle states, legal transitions, and the boot decision. No IO.
//! * [`dhcp`] is ProxyDHCP on UDP 67 and 4011: it tells PXE firmware which iPXE binary to
//!   load (or, to iPXE, the HTTP chain URL), beside the site's DHCP server.
//! * [`tftp`] serves iPXE binaries to PXE firmware, read-only and confined to its roots;
//!   [`neighbors`] maps a client IP to its MAC so transfers land on the machine's timeline.
//! * [`store`] is the only module that speaks SQL (SQLite through rusqlite, schema in
//!   `migrations/`).
//! * [`render`] is the only module that knows minijinja: profiles, templates, context filters
//!   that escape or refuse values per output context, and validation of every render.
//! * [`config`] turns flags, environment and a TOML file into a validated [`config::Config`];
//!   [`daemon`] binds sockets and runs the servers; [`cli`] is the command line, which talks to
//!   the daemon through its REST API ([`client`]); [`lab`] builds a VM lab against a running
//!   daemon for `provision lab`.

pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod dhcp;
pub mod http;
pub mod inventory;
pub mod keys;
pub mod lab;
pub mod mac;
pub mod neighbors;
pub mod pki;
pub mod policy;
pub mod provisioner;
pub mod registrar;
pub mod render;
pub mod store;
pub mod tftp;
pub mod validate;
