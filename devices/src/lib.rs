//! Devices of iovmm: what a guest sees (PCI bus and config space, serial, ...). No KVM policy here: the
//! `vmm` crate wires these devices to KVM.

pub mod cmos;
pub mod edu;
pub mod hotplug;
pub mod pci;
pub mod power;
pub mod serial;
pub mod vfio_pci;
