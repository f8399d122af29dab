//! How the VMM's devices meet the VM's IOMMU component ([`crate::vm::Vm::iommu`]): the owner the guest's
//! devices are claimed for, and how the component's errors are reported.

use iommu::core::{CoreError, OwnerId};

/// The owner id the VMM claims groups with, for its guest (passthrough and `--edu` devices alike).
pub const VMM_OWNER: OwnerId = OwnerId(1);

/// A core error with the causes below it, as "error: a: b" (the core's own message names only the step).
pub fn error_chain(e: &CoreError) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}
