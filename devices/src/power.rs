//! How the guest powers off and resets: the ACPI hardware-reduced sleep control / reset register (one I/O
//! port, declared in the FADT) and the i8042 controller's reset line (command 0xFE), which Linux tries on
//! reboot when ACPI reset does not work.

/// What the guest asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerEvent {
    /// S5 (soft off).
    PowerOff,
    /// Platform reset.
    Reset,
}

/// SLP_TYP for S5, as the DSDT's `_S5_` package declares it.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Value written to the FADT RESET_REG to reset.
pub const RESET_VALUE: u8 = 1;
const SLP_EN: u8 = 1 << 5;

/// The ACPI sleep control register (FADT SLEEP_CONTROL_REG) and reset register (RESET_REG), one byte port.
#[derive(Default)]
pub struct AcpiPowerControl;

impl AcpiPowerControl {
    /// A guest write of `value`. Sleep control: SLP_TYP in bits 2..=4, SLP_EN bit 5; the reset value is 1.
    pub fn write(&mut self, value: u8) -> Option<PowerEvent> {
        if value == RESET_VALUE {
            return Some(PowerEvent::Reset);
        }
        if value & SLP_EN != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE {
            return Some(PowerEvent::PowerOff);
        }
        if value & SLP_EN != 0 {
            log::warn!(
                "guest asked for sleep state SLP_TYP={}: not supported, ignored",
                (value >> 2) & 0x7
            );
        }
        None
    }

    /// A guest read: the sleep status register reads 0 (no wake status).
    pub fn read(&self) -> u8 {
        0
    }
}

/// A minimal i8042: status reads "nothing to read, ready to accept", command 0xFE pulses reset.
#[derive(Default)]
pub struct I8042;

impl I8042 {
    /// Command port (0x64) write.
    pub fn write_command(&mut self, value: u8) -> Option<PowerEvent> {
        (value == 0xfe).then_some(PowerEvent::Reset)
    }

    /// Status (0x64) or data (0x60) read.
    pub fn read(&self) -> u8 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_and_reset() {
        let mut p = AcpiPowerControl;
        assert_eq!(p.write((5 << 2) | (1 << 5)), Some(PowerEvent::PowerOff));
        assert_eq!(p.write(1), Some(PowerEvent::Reset));
        assert_eq!(p.write(5 << 2), None, "no SLP_EN, no sleep");
        assert_eq!(p.write((3 << 2) | (1 << 5)), None, "S3 is not supported");
        let mut k = I8042;
        assert_eq!(k.write_command(0xfe), Some(PowerEvent::Reset));
        assert_eq!(k.write_command(0xad), None);
    }

    #[test]
    fn no_other_value_ends_the_vm() {
        let (mut p, mut k) = (AcpiPowerControl, I8042);
        for v in 0..=u8::MAX {
            let want = match v {
                RESET_VALUE => Some(PowerEvent::Reset),
                v if v & SLP_EN != 0 && (v >> 2) & 7 == S5_SLEEP_TYPE => Some(PowerEvent::PowerOff),
                _ => None,
            };
            assert_eq!(p.write(v), want, "{v:#x}");
            assert_eq!(k.write_command(v).is_some(), v == 0xfe, "{v:#x}");
        }
        assert_eq!((p.read(), k.read()), (0, 0));
    }
}
