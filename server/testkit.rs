//! The services wired over a temporary inventory, for tests.

use std::sync::Arc;
use std::time::Duration;

use crate::admin::AdminService;
use crate::attribution::Attribution;
use crate::boot::{BootService, Settings};
use crate::policy::{ClaimPolicy, DiscoverAnswer};
use crate::registrar;
use crate::render::{Renderer, Sources};
use crate::store::{Inventory, SqlInventory};

/// The SSH public key test services render into installs.
pub const TEST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDcYs+DzqLkjzv07CZc5geeLA8TcqMARj0QTSQzawr2 provision";

/// Boot and admin services sharing one temporary inventory and the built-in profiles.
pub struct Stack {
    /// The inventory.
    pub inv: Arc<dyn Inventory>,
    /// The machine-facing service.
    pub boot: Arc<BootService>,
    /// The operator-facing service.
    pub admin: Arc<AdminService>,
    /// The registrar's queue, kept open so registrations can be queued (nothing serves it
    /// in these tests).
    pub _queue: registrar::Queue,
}

/// A stack answering unknown machines with `discover` and believing every install claim (the
/// tests of anything but claims play machines from addresses nothing vouches for).
pub fn stack(discover: DiscoverAnswer) -> Stack {
    stack_with(discover, ClaimPolicy::Any)
}

/// A stack answering unknown machines with `discover` and believing install claims by
/// `claims`.
pub fn stack_with(discover: DiscoverAnswer, claims: ClaimPolicy) -> Stack {
    let inv: Arc<dyn Inventory> =
        Arc::new(SqlInventory::open_temp().expect("a temporary inventory"));
    let renderer = Arc::new(
        Renderer::new(Sources::default(), TEST_KEY.into()).expect("the built-in profiles load"),
    );
    let metrics = {
        let cat = renderer.catalog();
        Arc::new(crate::metrics::Metrics::new(&crate::metrics::Known {
            machine_routes: crate::http::MACHINE_ROUTES.to_vec(),
            admin_routes: crate::http::ADMIN_ROUTES.to_vec(),
            profiles: cat.profiles().keys().cloned().collect(),
            roles: cat.roles().keys().cloned().collect(),
        }))
    };
    let (handle, queue) = registrar::channel(inv.clone(), renderer.clone(), metrics.clone());
    let boot = Arc::new(BootService::new(
        inv.clone(),
        renderer.clone(),
        Settings {
            install_token_ttl: Duration::from_secs(3600),
            discover,
            claims,
        },
        handle.clone(),
        Arc::new(Attribution::default()),
        metrics,
    ));
    let admin = Arc::new(AdminService::new(inv.clone(), renderer, discover, handle));
    Stack {
        inv,
        boot,
        admin,
        _queue: queue,
    }
}
