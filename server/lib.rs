//! provision: a bare-metal provisioning server.
//!
//! Codemap, in the order a machine meets it:
//!
//! * [`dhcp`] is ProxyDHCP on UDP 67 and 4011 (or, in address mode, a DHCP server with its
//!   [`dhcp::LeaseBook`]): it tells PXE firmware which iPXE binary to load, or iPXE the HTTP
//!   chain URL. [`tftp`] serves the binaries, read-only and confined by [`files`].
//! * [`http`] serves the machine-facing iPXE chain (`/boot.ipxe`, `/ipxe`), the installer
//!   configs behind install tokens (`/config/{token}/{artifact}`), phone-home, `/assets/`, and
//!   the admin REST API under `/api/v1` (bodies in [`dto`]).
//! * [`boot::BootService`] answers the machine-facing questions ("this MAC, this firmware:
//!   what should it boot?", configs, phone-home) from reads and observations;
//!   [`admin::AdminService`] answers operators. Both ask [`policy`] (pure: lifecycle and the
//!   boot decision), render through [`render`] (the only module that knows minijinja) and
//!   keep state through the [`store::Inventory`] boundary (the only SQL).
//! * [`attribution`] maps a client IP to its MAC, so TFTP transfers land on the right
//!   timeline.
//! * [`registrar`] SSHes into installed nodes with their pinned host keys and runs their
//!   role's steps; [`pki`] is the node CA; [`inventory`] is the Ansible hand-off.
//! * [`config`] turns flags, environment and a TOML file into a validated [`config::Config`];
//!   [`daemon`] binds sockets and wires the services; [`cli`] is the command line, which talks
//!   to the daemon through its REST API ([`client`]); [`lab`] builds a VM lab against a
//!   running daemon for `provision lab`.

pub mod admin;
pub mod attribution;
pub mod backup;
pub mod boot;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod declare;
pub mod dhcp;
pub mod dto;
pub mod error;
pub mod files;
#[doc(hidden)]
pub mod fuzz;
pub mod http;
pub mod inventory;
pub mod keys;
pub mod lab;
pub mod mac;
pub mod metrics;
pub mod neighbors;
pub mod notify;
pub mod pki;
pub mod policy;
pub mod registrar;
pub mod render;
pub mod store;
pub mod tftp;
pub mod timeline;
pub mod tls;
pub mod validate;

#[cfg(test)]
mod invariants_tests;
#[cfg(test)]
mod services_tests;
#[cfg(test)]
pub(crate) mod testkit;
