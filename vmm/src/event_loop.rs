//! The VMM's main thread: an event-manager loop over the console input (stdin) and the vCPUs' exit event.
//! It ends when a vCPU reports why the VM stopped.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;

use crate::device_manager::DeviceManager;
use crate::vcpu::VmExit;
use crate::vm::RunningVm;

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// epoll failed.
    #[error("event loop: {0}")]
    EventManager(String),
    /// A signal handler could not be installed.
    #[error("cannot handle signal {0}: {1}")]
    Signal(i32, String),
}

/// The termination signal received, or 0.
static TERMINATE: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_terminate(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    TERMINATE.store(sig, Ordering::SeqCst);
}

/// Makes SIGTERM, SIGINT and SIGHUP end the VM cleanly (vCPUs stopped, devices released, terminal
/// restored) instead of killing the process: [`run`] returns [`VmExit::Terminated`] within 200 ms.
pub fn handle_termination_signals() -> Result<(), Error> {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        vmm_sys_util::signal::register_signal_handler(sig, on_terminate)
            .map_err(|e| Error::Signal(sig, e.to_string()))?;
    }
    Ok(())
}

struct ExitWatch {
    fd: i32,
    fired: bool,
}

impl MutEventSubscriber for ExitWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.fired = true;
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.fd, EventSet::IN)) {
            log::error!("event loop: cannot watch the vCPU exit event: {e:?}");
        }
    }
}

/// Console input: reads stdin and feeds the UART, keeping what does not fit in its FIFO for later.
struct ConsoleInput {
    devices: Arc<DeviceManager>,
    pending: Vec<u8>,
}

impl ConsoleInput {
    fn flush(&mut self) {
        while !self.pending.is_empty() {
            let n = self.devices.serial_input(&self.pending);
            if n == 0 {
                break;
            }
            self.pending.drain(..n);
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 256];
        let n = if events.event_set().contains(EventSet::IN) {
            std::io::stdin().lock().read(&mut buf)
        } else {
            Ok(0)
        };
        match n {
            Ok(0) | Err(_) => {
                // EOF or hang-up: stop watching stdin; the guest keeps running.
                let _ = ops.remove(events);
            }
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                self.flush();
            }
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(std::io::stdin().as_raw_fd(), EventSet::IN)) {
            log::info!("console input not watched: {e:?}");
        }
    }
}

/// Runs until the VM stops; returns why.
pub fn run(vm: &RunningVm, console_input: bool) -> Result<VmExit, Error> {
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
        .map_err(|e| Error::EventManager(format!("{e:?}")))?;
    let exit = Arc::new(Mutex::new(ExitWatch {
        fd: vm.exit_event().as_raw_fd(),
        fired: false,
    }));
    em.add_subscriber(exit.clone());
    let input = console_input.then(|| {
        let c = Arc::new(Mutex::new(ConsoleInput {
            devices: vm.devices().clone(),
            pending: Vec::new(),
        }));
        em.add_subscriber(c.clone());
        c
    });
    loop {
        let busy = input
            .as_ref()
            .is_some_and(|c| c.lock().map(|c| !c.pending.is_empty()).unwrap_or(false));
        em.run_with_timeout(if busy { 10 } else { 200 })
            .map_err(|e| Error::EventManager(format!("{e:?}")))?;
        if let Some(c) = &input {
            if let Ok(mut c) = c.lock() {
                c.flush();
            }
        }
        if let Some(e) = vm.wait_exit(Duration::ZERO) {
            return Ok(e);
        }
        let sig = TERMINATE.load(Ordering::SeqCst);
        if sig != 0 {
            return Ok(VmExit::Terminated(sig));
        }
        if vm.running_vcpus() == 0 {
            return Ok(VmExit::Error(
                "every vCPU thread ended without a reason".into(),
            ));
        }
    }
}
