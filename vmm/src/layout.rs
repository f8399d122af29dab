//! The guest physical address map (x86-64), one place for every fixed address the VMM uses.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BDA          (RAM)
//! 0x0000_0500  GDT, then IDT                (RAM, boot only)
//! 0x0000_7000  zero page (boot_params)      (RAM)
//! 0x0000_8ff0  boot stack top               (RAM)
//! 0x0000_9000  PML4, PDPT, 4 PDs (4 GiB identity map with 2 MiB pages)
//! 0x0002_0000  kernel command line          (RAM)
//! 0x0009_fc00  EBDA .. 0x10_0000            (reserved: RSDP at 0xe_0000 and the ACPI tables)
//! 0x0010_0000  kernel (code32_start), then RAM up to min(size, 3 GiB)
//! 0xc000_0000  32-bit PCI MMIO window       (512 MiB)
//! 0xe000_0000  ECAM (bus 0 only: 1 MiB)
//! 0xfec0_0000  IOAPIC; 0xfee0_0000 LAPIC
//! 0x1_0000_0000  RAM above 3 GiB of the guest's size continues here (it ends below 256 GiB)
//! 2^(P-1) .. 2^P  64-bit PCI MMIO window: the upper half of the guest-physical address space, where P
//!                 is the vCPUs' physical address width (from KVM's CPUID 0x80000008, at most 48);
//!                 e.g. 256 GiB .. 512 GiB with P = 39, 512 GiB .. 1 TiB with P = 40
//! ```
//!
//! The 64-bit window is placed from the CPU rather than at a fixed address because Linux ignores a host
//! bridge window beyond the CPU's physical address width (and then cannot place 64-bit BARs), and that
//! width differs between hosts and nested guests. See [`mmio64_window`].

/// GDT address.
pub const GDT_START: u64 = 0x500;
/// IDT address (empty IDT; the kernel installs its own).
pub const IDT_START: u64 = 0x520;
/// The zero page.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Boot stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the boot page tables.
pub const PML4_START: u64 = 0x9000;
/// PDPT of the boot page tables.
pub const PDPTE_START: u64 = 0xa000;
/// First of 4 page directories of the boot page tables.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line length including the NUL (as the boot protocol of Linux >= 2.6.22 allows).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the EBDA; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// The RSDP (found by Linux's scan of 0xe0000..0x100000, and passed in boot_params too).
pub const RSDP_START: u64 = 0xe0000;
/// End of the reserved area below 1 MiB.
pub const ACPI_END: u64 = 0x100000;
/// The x86 reset vector (0xf000:0xfff0). There is no BIOS: a stub here asks the VMM for a reset, so a
/// guest that jumps to it (Linux's `reboot=bios` path, taken when every other method failed) ends the VM
/// instead of running through zeros forever.
pub const RESET_VECTOR: u64 = 0xffff0;
/// Where high memory (the kernel) starts.
pub const HIGH_RAM_START: u64 = 0x100000;
/// End of RAM below 4 GiB (the rest of the guest's RAM goes above 4 GiB).
pub const LOW_RAM_END: u64 = 0xc000_0000;
/// 32-bit PCI MMIO window.
pub const MMIO32_START: u64 = 0xc000_0000;
/// Size of the 32-bit PCI MMIO window.
pub const MMIO32_SIZE: u64 = 0x2000_0000;
/// ECAM base (PCI segment 0).
pub const ECAM_START: u64 = 0xe000_0000;
/// ECAM size: bus 0 only.
pub const ECAM_SIZE: u64 = 1 << 20;
/// IOAPIC base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// LAPIC base.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Start of RAM above 4 GiB.
pub const HIGH_RAM_4G: u64 = 0x1_0000_0000;
/// Guest RAM ends below this address (256 GiB).
pub const RAM_TOP_MAX: u64 = 0x40_0000_0000;
/// The most physical address bits the 64-bit window uses: what 4-level EPT/NPT tables map.
pub const MMIO64_MAX_PHYS_BITS: u8 = 48;
/// The physical address width x86 assumes when CPUID 0x80000008 is missing.
pub const DEFAULT_PHYS_BITS: u8 = 36;
/// PCI I/O port window for I/O BARs.
pub const PCI_IO_START: u64 = 0x1000;
/// Size of the PCI I/O port window.
pub const PCI_IO_SIZE: u64 = 0xf000;
/// Largest guest RAM this layout allows (RAM above 4 GiB ends below [`RAM_TOP_MAX`]).
pub const MAX_RAM: u64 = RAM_TOP_MAX - HIGH_RAM_4G + LOW_RAM_END;

/// The 64-bit PCI MMIO window `(start, size)` for vCPUs with `phys_bits` physical address bits (0: not
/// reported) and guest RAM that ends at `ram_end`: the upper half of the address space those bits
/// reach (capped at [`MMIO64_MAX_PHYS_BITS`]), starting above 4 GiB and above RAM. `None` when RAM
/// leaves no room below the CPU's limit.
pub fn mmio64_window(phys_bits: u8, ram_end: u64) -> Option<(u64, u64)> {
    let bits = match phys_bits {
        0 => DEFAULT_PHYS_BITS,
        b => b.min(MMIO64_MAX_PHYS_BITS),
    };
    let end = 1u64 << bits;
    let start = (end / 2)
        .max(HIGH_RAM_4G)
        .max(ram_end.checked_next_multiple_of(1 << 30)?);
    (start < end).then_some((start, end - start))
}

/// Legacy COM1 ports and IRQ.
pub const COM1_PORT: u16 = 0x3f8;
/// IRQ (IOAPIC pin / GSI) of COM1.
pub const COM1_IRQ: u32 = 4;
/// i8042 data and command ports.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_CMD_PORT: u16 = 0x64;
/// The ACPI sleep control / reset register (FADT SLEEP_CONTROL_REG and RESET_REG).
pub const ACPI_POWER_PORT: u16 = 0x3c0;
/// Number of IOAPIC pins; MSI GSIs start here.
pub const IOAPIC_PINS: u32 = 24;

// The layout's invariants, checked at compile time.
const _: () = {
    // RAM above 4 GiB ends at RAM_TOP_MAX at the most.
    assert!(HIGH_RAM_4G + (MAX_RAM - LOW_RAM_END) == RAM_TOP_MAX);
    assert!(MMIO32_START + MMIO32_SIZE <= ECAM_START);
    assert!(ECAM_START + ECAM_SIZE <= IOAPIC_START);
    assert!(RSDP_START >= EBDA_START && ACPI_END == HIGH_RAM_START);
    assert!(RSDP_START < RESET_VECTOR && RESET_VECTOR + 16 == ACPI_END);
    assert!(PDE_START + 4 * 0x1000 <= CMDLINE_START);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_64_bit_window_is_the_upper_half_of_what_the_cpu_reaches_above_ram() {
        let gib = 1u64 << 30;
        assert_eq!(mmio64_window(39, 2 * gib), Some((256 * gib, 256 * gib)));
        assert_eq!(mmio64_window(40, 2 * gib), Some((512 * gib, 512 * gib)));
        assert_eq!(mmio64_window(52, 2 * gib), Some((1 << 47, 1 << 47)));
        // Not reported: the architectural 36 bits; RAM above the half pushes the window up.
        assert_eq!(mmio64_window(0, 2 * gib), Some((32 * gib, 32 * gib)));
        assert_eq!(mmio64_window(36, 40 * gib + 1), Some((41 * gib, 23 * gib)));
        // RAM up to the CPU's limit leaves no room.
        assert_eq!(mmio64_window(36, 64 * gib), None);
        // Never below 4 GiB.
        assert_eq!(mmio64_window(32, gib), None);
        assert_eq!(
            mmio64_window(39, RAM_TOP_MAX),
            Some((RAM_TOP_MAX, RAM_TOP_MAX))
        );
    }
}
