//! The 16550A UART (COM1) the guest uses as its console: vm-superio's emulation, with its interrupt raised
//! through an eventfd (which the VMM registers as a KVM irqfd) and its output written to any `Write`.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// A console output that keeps everything written to it, shared by its clones: for tests, and for a
/// program that embeds the VMM and reads the guest's console itself.
#[derive(Clone, Default)]
pub struct CapturedOutput(Arc<Mutex<Vec<u8>>>);

impl CapturedOutput {
    /// Everything written so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Everything written so far, as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }
}

impl Write for CapturedOutput {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("console output lock poisoned"))?
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Raises the UART's interrupt by writing to an eventfd (a KVM irqfd on the VMM side).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A UART occupying 8 ports.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    /// A UART that raises its interrupt through `irq` and writes what the guest sends to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// A guest read of register `offset` (0..=7).
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// A guest write of register `offset` (0..=7). Output errors (a closed stdout) are logged, not fatal.
    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            log::debug!("serial: write to register {offset} failed: {e}");
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(input.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&input[..room]) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("serial: input dropped: {e}");
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_input_with_interrupt() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let sink = CapturedOutput::default();
        let mut s = SerialConsole::new(irq.try_clone().expect("clone"), Box::new(sink.clone()));
        for b in b"hi" {
            s.write(0, *b);
        }
        assert_eq!(sink.bytes(), b"hi");
        s.write(1, 0x01); // IER: received-data interrupt
        assert_eq!(s.enqueue_input(b"x"), 1);
        assert!(
            irq.read().is_ok_and(|n| n >= 1),
            "input raised the interrupt"
        );
        assert_eq!(s.read(5) & 1, 1, "LSR data ready");
        assert_eq!(s.read(0), b'x');
    }

    struct Closed;
    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn registers_past_7_a_closed_output_and_a_full_fifo_are_harmless() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut s = SerialConsole::new(irq, Box::new(Closed));
        for r in 8..=u8::MAX {
            s.write(r, 0xff);
            assert_eq!(s.read(r), 0, "register {r} is not there");
        }
        s.write(0, b'x');
        assert_eq!(s.read(5) & 0x60, 0x60, "the transmitter stays empty");
        assert_eq!(s.enqueue_input(&[b'y'; 100]), 64, "the FIFO takes 64 bytes");
        assert_eq!(s.enqueue_input(b"z"), 0, "a full FIFO takes nothing");
        assert_eq!(s.enqueue_input(b""), 0);
    }
}
