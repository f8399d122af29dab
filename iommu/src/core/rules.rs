//! The rules of the model, where each one is enforced, and the tests that fail when it is broken.
//!
//! Every rule below was checked by mutation (the check it names inverted or removed, one at a time): some
//! listed test fails. The compile-fail tests run with `cargo test --doc` (`scripts/test` runs them).
//!
//! Tests live in `iommu/tests/core_rules.rs` (over a recording test driver: call order and what
//! hardware was touched), `iommu/tests/core_soft.rs` (over the `soft` instance and the real page
//! tables: what a device can reach), and below (what must not compile).
//!
//! | rule | source | enforced in | tests |
//! |---|---|---|---|
//! | Instance ops and per-type domain ops are separate | seed 003 | [`IommuOps`](super::IommuOps), [`DomainOps`](super::DomainOps), [`PagingDomainOps`](super::PagingDomainOps) | `map_on_blocked_domain_is_a_type_error`, `map_on_sva_domain_is_a_type_error` (below) |
//! | Only paging domains map; SVA only on PASIDs | seed 003 | [`PagingDomain`](super::PagingDomain), [`Target`](super::Target) | `map_on_*_is_a_type_error`, `sva_domain_cannot_be_attached_to_a_device` (below) |
//! | `free` ends a domain; refused while attached | seed 003 | [`IommuCore::free`](super::IommuCore::free) | `free_of_attached_domain_is_refused`, `free_of_domain_set_on_a_pasid_is_refused`, `free_is_refused_while_a_device_left_behind_by_a_failed_rollback_uses_the_domain`, `freed_domain_cannot_be_used` (below) |
//! | No detach: leaving a domain is attaching another | seed 001 | `set_group_domain`; no detach in any trait | `no_detach_op_exists` (below), `no_detach_release_ownership_restores_default_domain` |
//! | Claiming for a guest attaches blocked first | DESIGN | [`IommuCore::claim_dma_owner`](super::IommuCore::claim_dma_owner) | `claim_ownership_attaches_blocked_first`, `claim_without_static_blocked_domain_uses_an_empty_paging_domain`, `claimed_device_reaches_nothing_until_its_guest_attaches_a_domain` |
//! | No default domain: `set_platform_dma` | seed 001 | [`IommuCore::release_dma_owner`](super::IommuCore::release_dma_owner) | `instance_without_default_uses_set_platform_dma` |
//! | A group's devices are always in one domain | DESIGN | `set_group_domain` (check all, then apply with rollback) | `group_devices_always_share_domain`, `policy_refusal_in_a_group_touches_no_device`, `functions_of_one_slot_share_a_group_and_translate_alike` |
//! | Release: no hardware if the deferred attach never happened | seed 000 | [`IommuCore::release_device`](super::IommuCore::release_device) | `release_without_deferred_attach_touches_no_hardware`, `release_after_deferred_attach_attaches_release_domain` |
//! | Release: release domain before `release_device` | seed 000 | [`IommuCore::release_device`](super::IommuCore::release_device) | `release_attaches_release_domain_before_release_device`, `release_domain_is_attached_in_hardware_before_release_device`, `release_attaches_identity_release_domain_when_the_instance_names_it`, `release_device_is_not_called_when_the_release_domain_attach_fails` |
//! | Release: identity instead of blocked for require_direct | seed 002 | `release_domain_for` | `release_of_require_direct_uses_identity_instead_of_blocked`, `release_of_require_direct_without_identity_attaches_nothing` |
//! | Blocked never on a require_direct device, with the reason | seed 002 | `plan_attach` | `blocked_attach_refused_for_require_direct_with_reason`, `blocked_attach_refused_for_require_direct_without_static_blocked_domain`, `probe_failure_leaves_nothing_behind` |
//! | Blocked/identity with no PASID: IOPF refcount zero | seed 002 | `plan_attach` | `iopf_refcount_checked_on_blocked_and_identity_attach`, `iopf_reference_of_a_fault_capable_domain_is_dropped_by_the_replacing_attach`, `iopf_check_applies_only_with_no_pasid_attached`, `iopf_refcount_checked_on_blocked_attach_without_static_blocked_domain`, `leaving_the_guest_is_never_refused_for_a_leaked_fault_reference` (release and park log the leak and block anyway) |
//! | PASID exit handler per device, before removal | seed 004 | `exit_pasids` | `pasid_exit_handler_called_per_device_before_domain_removed`, `pasid_exit_handler_told_all_before_release_removes_pasids`, `sva_pasid_translates_through_its_address_space_until_it_exits`, `pasid_exit_handler_told_all_before_giving_back_removes_pasids`, `pasid_exit_handler_called_only_for_the_pasids_of_the_ended_address_space`, `address_space_exit_reaches_every_device_even_when_one_fails` |
//! | Parked: blocked, held, visible, plug again | DESIGN | [`IommuCore::park`](super::IommuCore::park), [`DmaOwner::Parked`](super::DmaOwner::Parked) | `parked_device_reaches_no_memory`, `park_is_visible_and_plug_makes_the_group_attachable_again` |
//! | Faults say why and are recorded | issue 2 | [`SoftIommu::translate`](crate::soft::SoftIommu::translate), [`FaultLog`](crate::soft::FaultLog) | `translate_faults_are_recorded`, `fault_log_is_a_bounded_ring_that_counts_what_it_dropped`, `translate_faults_through_a_port_are_recorded`, `every_fault_says_why_in_its_message` |
//! | Map: largest page sizes, runs, one sync; undone on failure | DESIGN | [`IommuCore::map`](super::IommuCore::map), [`IommuCore::unmap`](super::IommuCore::unmap) | `map_uses_huge_pages_and_syncs_once`, `a_map_that_fails_midway_is_undone`, `unmap_of_part_of_a_huge_page_is_refused`, `overlapping_map_is_refused_and_the_first_mapping_kept` |
//!
//! # What must not compile
//!
//! `map_on_blocked_domain_is_a_type_error`: the blocked domain has no handle that maps.
//! ```compile_fail,E0308
//! # use iommu::core::{IommuCore, Prot, Target};
//! fn map_on_blocked_domain_is_a_type_error(core: &IommuCore) {
//!     let _ = core.map(Target::Blocked, 0, 0, 4096, Prot::RW);
//! }
//! ```
//!
//! `map_on_sva_domain_is_a_type_error`: an SVA domain has no map.
//! ```compile_fail,E0308
//! # use iommu::core::{IommuCore, Prot, SvaDomain};
//! fn map_on_sva_domain_is_a_type_error(core: &IommuCore, sva: &SvaDomain) {
//!     let _ = core.map(sva, 0, 0, 4096, Prot::RW);
//! }
//! ```
//!
//! `sva_domain_cannot_be_attached_to_a_device`: [`Target`](super::Target) has no SVA variant.
//! ```compile_fail,E0599
//! # use iommu::core::{GroupId, IommuCore, OwnerId, SvaDomain, Target};
//! fn sva_domain_cannot_be_attached_to_a_device(core: &IommuCore, g: GroupId, sva: &SvaDomain) {
//!     let _ = core.attach(g, OwnerId(1), Target::Sva(sva));
//! }
//! ```
//!
//! `freed_domain_cannot_be_used`: `free` consumes the handle.
//! ```compile_fail,E0382
//! # use iommu::core::{IommuCore, PagingDomain, Prot};
//! fn freed_domain_cannot_be_used(core: &IommuCore, d: PagingDomain) {
//!     let _ = core.free(d);
//!     let _ = core.map(&d, 0, 0, 4096, Prot::RW);
//! }
//! ```
//!
//! `no_detach_op_exists`: neither the core nor a domain has a detach operation.
//! ```compile_fail,E0599
//! # use iommu::core::{GroupId, IommuCore};
//! fn no_detach_op_exists(core: &IommuCore, g: GroupId) {
//!     let _ = core.detach(g);
//! }
//! ```
//! ```compile_fail,E0407
//! # use iommu::core::{DeviceId, DomainOps, DriverError};
//! struct D;
//! impl DomainOps for D {
//!     fn attach_dev(&self, _: DeviceId) -> Result<(), DriverError> { Ok(()) }
//!     fn detach_dev(&self, _: DeviceId) {}
//! }
//! ```
//!
//! And the positive control, so the blocks above fail for the reason they name:
//! ```
//! # use iommu::core::{IommuCore, Prot};
//! # use iommu::soft::SoftIommu;
//! let core = IommuCore::new();
//! let inst = core.register(SoftIommu::new()).unwrap();
//! let d = core.alloc_paging(inst).unwrap();
//! core.map(&d, 0, 0, 4096, Prot::RW).unwrap();
//! core.free(d).unwrap();
//! ```
