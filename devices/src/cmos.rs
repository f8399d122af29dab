//! The MC146818 CMOS RTC at ports 0x70/0x71, enough for Linux: the time of day from the host's clock
//! (UTC, BCD, 24-hour), status registers that never report an update in progress, and 128 bytes of NVRAM.
//! Without it, reads of 0xff look like a clock stuck in "update in progress" and Linux spins on it.

use std::time::{SystemTime, UNIX_EPOCH};

const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;
/// Register B: 24-hour (bit 1), BCD (bit 2 clear), no interrupts.
const REG_B_DEFAULT: u8 = 0x02;
/// Register B bits the guest cannot change: data mode (binary/BCD) and 24/12-hour.
const REG_B_FIXED: u8 = 0x06;

/// Index port.
pub const CMOS_INDEX_PORT: u16 = 0x70;
/// Data port.
pub const CMOS_DATA_PORT: u16 = 0x71;

/// The CMOS RTC.
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
    now: fn() -> u64,
}

fn host_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// (year, month 1-12, day 1-31) of the civil date `days` after 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

impl Cmos {
    /// A CMOS whose clock follows the host's.
    pub fn new() -> Self {
        Self::with_clock(host_now)
    }

    /// A CMOS whose clock reads `now()` (seconds since the Unix epoch); for tests.
    pub fn with_clock(now: fn() -> u64) -> Self {
        let mut nvram = [0u8; 128];
        nvram[usize::from(REG_A)] = 0x26; // 32.768 kHz time base, 1024 Hz rate; UIP clear
        nvram[usize::from(REG_B)] = REG_B_DEFAULT;
        nvram[usize::from(REG_D)] = 0x80; // valid RAM and time
        Self {
            index: 0,
            nvram,
            now,
        }
    }

    /// Port write: 0x70 selects a register (bit 7 is the NMI mask, ignored), 0x71 writes it.
    pub fn write(&mut self, port: u16, value: u8) {
        match port {
            CMOS_INDEX_PORT => self.index = value & 0x7f,
            CMOS_DATA_PORT => match self.index {
                // The clock follows the host; the guest setting it is ignored. UIP and C/D are read-only.
                0x00 | 0x02 | 0x04 | 0x06..=0x09 | REG_C | REG_D => {}
                REG_A => self.nvram[usize::from(REG_A)] = value & 0x7f,
                // The time is always BCD and 24-hour: the data-mode and 24/12 bits stay as they are.
                REG_B => self.nvram[usize::from(REG_B)] = (value & !REG_B_FIXED) | REG_B_DEFAULT,
                // NVRAM and the alarm registers (1, 3, 5) keep what is written.
                i => self.nvram[usize::from(i)] = value,
            },
            _ => {}
        }
    }

    /// Port read.
    pub fn read(&mut self, port: u16) -> u8 {
        if port != CMOS_DATA_PORT {
            return 0xff;
        }
        let secs = (self.now)();
        let days = (secs / 86_400) as i64;
        let tod = secs % 86_400;
        let (y, m, d) = civil_from_days(days);
        match self.index {
            0x00 => bcd(tod % 60),
            0x02 => bcd((tod / 60) % 60),
            0x04 => bcd(tod / 3600),
            0x06 => bcd(((days + 4).rem_euclid(7) + 1) as u64), // 1970-01-01 was a Thursday (5)
            0x07 => bcd(d),
            0x08 => bcd(m),
            0x09 => bcd((y.rem_euclid(100)) as u64),
            CENTURY => bcd((y / 100) as u64),
            REG_C => 0, // no interrupt flags
            i => self.nvram[usize::from(i)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(CMOS_INDEX_PORT, reg);
        c.read(CMOS_DATA_PORT)
    }

    #[test]
    fn time_is_bcd_utc_and_never_updating() {
        // 2026-11-21 14:05:09 UTC is 1_795_269_909 s after the epoch; a Saturday.
        let mut c = Cmos::with_clock(|| 1_795_269_909);
        assert_eq!(read(&mut c, 0x00), 0x09);
        assert_eq!(read(&mut c, 0x02), 0x05);
        assert_eq!(read(&mut c, 0x04), 0x14);
        assert_eq!(read(&mut c, 0x07), 0x21);
        assert_eq!(read(&mut c, 0x08), 0x11);
        assert_eq!(read(&mut c, 0x09), 0x26);
        assert_eq!(read(&mut c, CENTURY), 0x20);
        assert_eq!(read(&mut c, 0x06), 0x07);
        assert_eq!(read(&mut c, REG_A) & 0x80, 0, "no update in progress");
        assert_eq!(read(&mut c, REG_B), 0x02);
        assert_eq!(read(&mut c, REG_D), 0x80);
        // The NMI-mask bit of the index is ignored; NVRAM keeps what is written.
        c.write(CMOS_INDEX_PORT, 0x80 | 0x40);
        c.write(CMOS_DATA_PORT, 0x5a);
        assert_eq!(read(&mut c, 0x40), 0x5a);
        c.write(CMOS_INDEX_PORT, 0x00);
        c.write(CMOS_DATA_PORT, 0x33);
        assert_eq!(read(&mut c, 0x00), 0x09, "the clock follows the host");
    }

    /// A guest that switched register B to binary or 12-hour mode read it back so, but the clock stayed
    /// BCD 24-hour (a guest trusting register B misread the time); alarm registers read 0 whatever was
    /// written. vmm/tests/ports_fuzz.rs checks both for random port accesses.
    #[test]
    fn register_b_keeps_bcd_24_hour_and_alarms_read_back() {
        let mut c = Cmos::with_clock(|| 1_795_269_909);
        c.write(CMOS_INDEX_PORT, REG_B);
        c.write(CMOS_DATA_PORT, 0x04 | 0x10);
        assert_eq!(
            read(&mut c, REG_B),
            0x12,
            "BCD and 24-hour stay; the rest is written"
        );
        assert_eq!(read(&mut c, 0x04), 0x14);
        for alarm in [1u8, 3, 5] {
            c.write(CMOS_INDEX_PORT, alarm);
            c.write(CMOS_DATA_PORT, 0x42);
            assert_eq!(read(&mut c, alarm), 0x42);
        }
        assert_eq!(read(&mut c, 0x00), 0x09);
    }

    #[test]
    fn any_register_at_any_host_time_reads_valid_values() {
        let bcd_ok =
            |v: u8, max: u8| v & 0xf <= 9 && v >> 4 <= 9 && (v >> 4) * 10 + (v & 0xf) <= max;
        let clocks: [fn() -> u64; 5] = [
            || 0,
            || 951_868_799, // 2000-02-29 23:59:59
            || u64::from(u32::MAX),
            || 253_402_300_799, // 9999-12-31 23:59:59
            || u64::MAX,
        ];
        for now in clocks {
            let mut c = Cmos::with_clock(now);
            // The index port keeps 7 bits (bit 7 is the NMI mask); other ports read all-ones.
            for index in 0..=u8::MAX {
                let v = read(&mut c, index);
                let max = match index & 0x7f {
                    0x00 | 0x02 => 59,
                    0x04 => 23,
                    0x06 => 7,
                    0x07 => 31,
                    0x08 => 12,
                    0x09 | CENTURY => 99,
                    _ => continue,
                };
                assert!(bcd_ok(v, max), "register {index:#x} = {v:#x}");
            }
            assert_eq!(c.read(CMOS_INDEX_PORT), 0xff);
            assert_eq!(c.read(0x72), 0xff);
            c.write(0x72, 0x12);
        }
    }

    #[test]
    fn epoch_and_leap_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}
