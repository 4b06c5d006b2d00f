//! Pausing vCPUs and reading their registers from outside their threads.
//!
//! A vCPU fd belongs to its thread (KVM_RUN, KVM_GET_REGS must come from it), so the
//! controller never touches it: it raises a flag, kicks every vCPU thread out of KVM_RUN
//! with a real-time signal, and waits until each has parked at its checkpoint. The
//! signal handler sets `immediate_exit` in the thread's `kvm_run` page, as firecracker
//! and cloud-hypervisor do, so a kick that lands just before KVM_RUN is entered is not
//! lost: KVM then returns EINTR at once and the thread sees the flag.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use bulkhead_protocol::control::VcpuRegisters;
use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::exit::ExitSignal;

/// How often a controller re-kicks vCPUs that have not parked yet. Kicks are not lost
/// (see the module comment); this is only a guard against a vCPU that was between two
/// checks of the flag in some way this code did not foresee.
const REKICK_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Debug, Error)]
pub enum PauseError {
    #[error("installing the vCPU kick signal handler")]
    Handler(#[source] vmm_sys_util::errno::Error),
    #[error("the VM is shutting down")]
    Ending,
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler; null on non-vCPU threads.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work here: a const-initialised thread local and a store.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer was set by this thread from its own VcpuFd, whose mmap of
        // the kvm_run page lives as long as the thread's vCPU (the thread clears it first
        // when it stops using the fd).
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Installs the kick handler for the whole process; call once before vCPUs start.
pub fn install_kick_handler() -> Result<(), PauseError> {
    register_signal_handler(kick_signal(), handle_kick).map_err(PauseError::Handler)
}

/// Registers `fd`'s kvm_run page as the one this thread's kick handler updates.
pub fn register_current_vcpu(fd: &mut VcpuFd) {
    let run: *mut kvm_run = fd.get_kvm_run();
    KVM_RUN.with(|cell| cell.set(run));
}

/// Forgets this thread's kvm_run page.
pub fn unregister_current_vcpu() {
    KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
}

#[derive(Default)]
struct GateState {
    paused: bool,
    parked: usize,
    /// Register dumps asked for by [`VcpuGate::registers`], one slot per vCPU.
    dumps: Option<Vec<Option<VcpuRegisters>>>,
}

/// Where vCPU threads check whether to pause, and where controllers ask them to.
pub struct VcpuGate {
    /// Mirrors `state.paused`, checked after every exit without a lock.
    pause_requested: AtomicBool,
    state: Mutex<GateState>,
    changed: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Serialises controllers: one pause/resume/dump at a time.
    control: Mutex<()>,
}

impl Default for VcpuGate {
    fn default() -> Self {
        Self {
            pause_requested: AtomicBool::new(false),
            state: Mutex::default(),
            changed: Condvar::new(),
            threads: Mutex::default(),
            control: Mutex::default(),
        }
    }
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VcpuGate {
    /// Records a started vCPU thread, so that it can be kicked.
    pub fn add_thread(&self, handle: JoinHandle<()>) {
        relock(&self.threads).push(handle);
    }

    pub fn is_paused(&self) -> bool {
        relock(&self.state).paused
    }

    /// Called by a vCPU thread between two KVM_RUNs: parks here while the VM is paused,
    /// answering register dumps, until it is resumed or the VM ends.
    pub fn checkpoint(&self, cpu: u8, fd: &mut VcpuFd, exit: &ExitSignal) {
        // Clear a kick first: a kick that arrives after this still makes the next KVM_RUN
        // return at once, and then the flag below is seen.
        fd.set_kvm_immediate_exit(0);
        if !self.pause_requested.load(Ordering::SeqCst) {
            return;
        }
        let mut state = relock(&self.state);
        state.parked += 1;
        self.changed.notify_all();
        while state.paused && !exit.is_requested() {
            if let Some(dumps) = state.dumps.as_mut() {
                if let Some(slot @ None) = dumps.get_mut(usize::from(cpu)) {
                    *slot = Some(read_registers(cpu, fd));
                    self.changed.notify_all();
                }
            }
            state = self
                .changed
                .wait_timeout(state, REKICK_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.parked -= 1;
        self.changed.notify_all();
    }

    fn kick_all(&self) {
        for thread in relock(&self.threads).iter() {
            if thread.is_finished() {
                continue;
            }
            if let Err(e) = thread.kick() {
                tracing::warn!("cannot kick a vCPU thread: {e}");
            }
        }
    }

    fn live_threads(&self) -> usize {
        relock(&self.threads)
            .iter()
            .filter(|t| !t.is_finished())
            .count()
    }

    /// Stops every vCPU outside KVM_RUN and returns once all are parked.
    pub fn pause(&self, exit: &ExitSignal) -> Result<(), PauseError> {
        let _control = relock(&self.control);
        self.pause_locked(exit)
    }

    fn pause_locked(&self, exit: &ExitSignal) -> Result<(), PauseError> {
        relock(&self.state).paused = true;
        self.pause_requested.store(true, Ordering::SeqCst);
        loop {
            self.kick_all();
            let state = relock(&self.state);
            let (state, _) = self
                .changed
                .wait_timeout(state, REKICK_INTERVAL)
                .unwrap_or_else(|e| e.into_inner());
            if exit.is_requested() {
                return Err(PauseError::Ending);
            }
            if state.parked >= self.live_threads() {
                return Ok(());
            }
        }
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        let _control = relock(&self.control);
        self.resume_locked();
    }

    fn resume_locked(&self) {
        let mut state = relock(&self.state);
        state.paused = false;
        self.pause_requested.store(false, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Every vCPU's registers, each read by its own thread while parked. A running VM is
    /// paused for the read and resumed after it; a paused one stays paused.
    pub fn registers(&self, exit: &ExitSignal) -> Result<Vec<VcpuRegisters>, PauseError> {
        let _control = relock(&self.control);
        let was_paused = self.is_paused();
        if !was_paused {
            self.pause_locked(exit)?;
        }
        let cpus = relock(&self.threads).len();
        let mut state = relock(&self.state);
        state.dumps = Some(vec![None; cpus]);
        self.changed.notify_all();
        let result = loop {
            let done = state
                .dumps
                .as_ref()
                .is_some_and(|d| d.iter().all(Option::is_some));
            if done {
                break Ok(state
                    .dumps
                    .take()
                    .unwrap_or_default()
                    .into_iter()
                    .flatten()
                    .collect());
            }
            if exit.is_requested() {
                state.dumps = None;
                break Err(PauseError::Ending);
            }
            state = self
                .changed
                .wait_timeout(state, REKICK_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        drop(state);
        if !was_paused {
            self.resume_locked();
        }
        result
    }
}

trait Kick {
    fn kick(&self) -> vmm_sys_util::errno::Result<()>;
}

impl Kick for JoinHandle<()> {
    fn kick(&self) -> vmm_sys_util::errno::Result<()> {
        self.kill(kick_signal())
    }
}

/// Reads one vCPU's registers (from its own thread). A failed ioctl yields what could be
/// read, so a dump is never refused because of one register set.
fn read_registers(cpu: u8, fd: &VcpuFd) -> VcpuRegisters {
    let mut registers = BTreeMap::new();
    match fd.get_regs() {
        Ok(r) => {
            for (name, value) in [
                ("rax", r.rax),
                ("rbx", r.rbx),
                ("rcx", r.rcx),
                ("rdx", r.rdx),
                ("rsi", r.rsi),
                ("rdi", r.rdi),
                ("rsp", r.rsp),
                ("rbp", r.rbp),
                ("r8", r.r8),
                ("r9", r.r9),
                ("r10", r.r10),
                ("r11", r.r11),
                ("r12", r.r12),
                ("r13", r.r13),
                ("r14", r.r14),
                ("r15", r.r15),
                ("rip", r.rip),
                ("rflags", r.rflags),
            ] {
                registers.insert(name.to_owned(), value);
            }
        }
        Err(e) => tracing::warn!(cpu, "KVM_GET_REGS failed: {e}"),
    }
    match fd.get_sregs() {
        Ok(s) => {
            for (name, value) in [
                ("cr0", s.cr0),
                ("cr2", s.cr2),
                ("cr3", s.cr3),
                ("cr4", s.cr4),
                ("cr8", s.cr8),
                ("efer", s.efer),
                ("apic_base", s.apic_base),
                ("gdt.base", s.gdt.base),
                ("gdt.limit", u64::from(s.gdt.limit)),
                ("idt.base", s.idt.base),
                ("idt.limit", u64::from(s.idt.limit)),
            ] {
                registers.insert(name.to_owned(), value);
            }
            for (name, seg) in [
                ("cs", s.cs),
                ("ds", s.ds),
                ("es", s.es),
                ("fs", s.fs),
                ("gs", s.gs),
                ("ss", s.ss),
                ("tr", s.tr),
                ("ldt", s.ldt),
            ] {
                registers.insert(format!("{name}.selector"), u64::from(seg.selector));
                registers.insert(format!("{name}.base"), seg.base);
                registers.insert(format!("{name}.limit"), u64::from(seg.limit));
            }
        }
        Err(e) => tracing::warn!(cpu, "KVM_GET_SREGS failed: {e}"),
    }
    VcpuRegisters { cpu, registers }
}
