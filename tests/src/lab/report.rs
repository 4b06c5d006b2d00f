//! What a lab boot printed, parsed from the L1 console.
//!
//! The L1 init (tests/lab/l1-init.sh) prints `LAB: ...` lines; L2 inits print
//! `GUEST: key=value` lines, which are attributed to the run whose begin/exit markers enclose
//! them. Markers are searched anywhere in a line, since kernel messages can share it. Nothing
//! here fails on odd output: missing things are `None`, for the test to judge and explain.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use super::qemu::{Console, ConsoleLine};
use super::scenario::GUEST_MARKER;

const LAB_MARKER: &str = "LAB: ";
/// What an L2 kernel prints as it starts userspace.
const L2_USERSPACE_MARKER: &str = "Run /init as init process";
/// What bulkhead logs (at info, which L1 turns on) once the VM is built, before its vCPUs
/// start: a run without it failed in bulkhead's own setup, before any guest ran.
const VM_CREATED_MARKER: &str = "VM created";
/// What an L2 kernel's RCU stall detector prints before asking a silent CPU for a backtrace
/// by NMI: `Sending NMI from CPU 0 to CPUs 1:`.
const NMI_REQUEST_MARKER: &str = "Sending NMI from CPU ";
/// What a CPU that took that NMI prints first: `NMI backtrace for cpu 1`.
const NMI_ANSWER_MARKER: &str = "NMI backtrace for cpu ";
/// The L1 kernel function a thread is in for as long as its KVM_RUN ioctl lasts.
const KVM_RUN_FRAME: &str = "kvm_arch_vcpu_ioctl_run";

/// How many console lines [`LabReport::explain`] quotes.
const TAIL_LINES: usize = 40;

#[derive(Debug)]
pub struct LabReport {
    pub scenario: String,
    pub log_path: PathBuf,
    pub lines: Vec<ConsoleLine>,
    /// QEMU's exit status; `None` when it was killed at the deadline or for silence.
    pub qemu_status: Option<ExitStatus>,
    /// QEMU was killed because L1's console, heartbeat included, went silent.
    pub silenced: bool,
    pub elapsed: Duration,
    pub runs: Vec<RunReport>,
    /// `GUEST: key=value` lines printed outside any bulkhead run: all of them for a guest
    /// booted directly under QEMU, none normally.
    pub guest_values: Vec<(String, String)>,
}

/// One bulkhead run inside L1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    pub label: String,
    pub began_at: Duration,
    /// When its exit marker arrived; `None` if it never did.
    pub ended_at: Option<Duration>,
    /// bulkhead's exit status as L1's shell saw it (137 when L1 killed it at its timeout).
    pub exit: Option<i32>,
    /// `GUEST: key=value` lines printed during the run, in order.
    pub guest_values: Vec<(String, String)>,
    /// Where bulkhead's threads were when L1 found the run still going at its timeout,
    /// just before killing it (`LAB: run <label>: thread ...`, two samples per thread).
    pub hung_threads: Vec<ThreadSample>,
}

/// One thread of a hung bulkhead run, as L1's watchdog saw it (`lab_threads` in
/// tests/lab/l1-init.sh).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadSample {
    /// Its name: `vcpu0`, `vcpu1`, ... for the vCPU threads.
    pub name: String,
    /// The L1 kernel's state letter: R running, S sleeping, D uninterruptible, ...
    pub state: String,
    /// Clock ticks it has spent running a guest (inside KVM_RUN, in guest mode).
    pub guest_ticks: Option<u64>,
    /// Its kernel stack, innermost function first; empty while it is on a CPU.
    pub stack: Vec<String>,
}

impl ThreadSample {
    /// `<name> state=<S> ticks=<n> guest=<n> stack=<fn>[<<fn>...]`
    fn parse(text: &str) -> Option<Self> {
        let (name, rest) = text.split_once(' ')?;
        let mut state = None;
        let mut guest_ticks = None;
        let mut stack = Vec::new();
        for field in rest.split(' ') {
            if let Some(value) = field.strip_prefix("state=") {
                state = Some(value.to_owned());
            } else if let Some(value) = field.strip_prefix("guest=") {
                guest_ticks = value.parse().ok();
            } else if let Some(value) = field.strip_prefix("stack=") {
                stack = value
                    .split('<')
                    .filter(|f| !f.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
        }
        Some(Self {
            name: name.to_owned(),
            state: state?,
            guest_ticks,
            stack,
        })
    }

    fn stack_in_kvm_run(&self) -> bool {
        self.stack.iter().any(|f| f == KVM_RUN_FRAME)
    }
}

/// Whether L1's samples of one vCPU thread (oldest first) show it inside KVM_RUN all along:
/// every sample either has KVM_RUN on its stack or is on a CPU (no stack to read), and
/// the ones on a CPU were running the guest (its guest time grew between the first and the
/// last sample). Fewer than two samples show nothing.
fn held_by_kvm(samples: &[&ThreadSample]) -> bool {
    let [first, .., last] = samples else {
        return false;
    };
    let all_in_stack = samples.iter().all(|s| s.stack_in_kvm_run());
    let in_stack_or_on_cpu = samples
        .iter()
        .all(|s| s.stack_in_kvm_run() || s.stack.is_empty());
    let ran_the_guest = matches!(
        (first.guest_ticks, last.guest_ticks),
        (Some(before), Some(after)) if after > before
    );
    all_in_stack || (in_stack_or_on_cpu && ran_the_guest)
}

impl RunReport {
    /// The last value the guest reported for `key`.
    pub fn guest(&self, key: &str) -> Option<&str> {
        last_value(&self.guest_values, key)
    }

    pub fn duration(&self) -> Option<Duration> {
        self.ended_at.map(|end| end.saturating_sub(self.began_at))
    }
}

impl LabReport {
    pub fn parse(scenario: &str, log_path: PathBuf, console: Console) -> Self {
        let mut runs: Vec<RunReport> = Vec::new();
        let mut guest_values = Vec::new();
        for line in &console.lines {
            match Event::of(&line.text) {
                Some(Event::RunBegin(label)) => runs.push(RunReport {
                    label: label.to_owned(),
                    began_at: line.at,
                    ended_at: None,
                    exit: None,
                    guest_values: Vec::new(),
                    hung_threads: Vec::new(),
                }),
                Some(Event::Thread(label, sample)) => {
                    if let Some(run) = open_run(&mut runs, label) {
                        run.hung_threads.push(sample);
                    }
                }
                Some(Event::RunExit(label, exit)) => {
                    if let Some(run) = open_run(&mut runs, label) {
                        run.ended_at = Some(line.at);
                        run.exit = exit;
                    }
                }
                Some(Event::GuestValue(key, value)) => {
                    let value = (key.to_owned(), value.to_owned());
                    match runs.last_mut().filter(|run| run.ended_at.is_none()) {
                        Some(run) => run.guest_values.push(value),
                        None => guest_values.push(value),
                    }
                }
                None => {}
            }
        }
        Self {
            scenario: scenario.to_owned(),
            log_path,
            lines: console.lines,
            qemu_status: console.status,
            silenced: console.silenced,
            elapsed: console.elapsed,
            runs,
            guest_values,
        }
    }

    /// L1 failed on its own, so the boot says nothing about bulkhead. Either:
    /// - it did not finish its scenario while no bulkhead run had failed (no `LAB: done`,
    ///   every run that ended ended with status 0), and QEMU exited by itself (L1 died) or
    ///   a run never reported its end although L1 kills every run at its timeout well
    ///   before QEMU's deadline (L1 froze); or
    /// - L1 went silent, its heartbeat included (see [`QemuMachine::silence_limit`](super::qemu::QemuMachine::silence_limit)): it
    ///   froze, with or without a run going; or
    /// - L1's own watchdog caught one of bulkhead's vCPU threads stuck in the L1 kernel
    ///   (`soft lockup ... [vcpu1:117]`). A vCPU thread can only be inside KVM_RUN there,
    ///   and KVM returns to userspace on every exit it cannot handle: a CPU stuck for
    ///   tens of seconds means the emulated SVM stopped delivering L1's interrupts while
    ///   L2 ran, whatever L2 was doing.
    pub fn l1_died(&self) -> bool {
        let runs_fine = self
            .runs
            .iter()
            .all(|run| matches!(run.exit, Some(0) | None));
        let qemu_exited = self.qemu_status.is_some();
        let run_never_ended = self.runs.iter().any(|run| run.exit.is_none());
        let unfinished = self.marker_at("done").is_none() && runs_fine;
        (unfinished && (qemu_exited || run_never_ended)) || self.silenced || self.l1_vcpu_lockup()
    }

    /// A bulkhead run ended while its L2 kernel was still booting: it never started
    /// userspace (`Run /init`), so no device had been used and no guest command had run.
    /// Under the lab about one L2 boot in fifteen to twenty triple-faults, hangs or panics
    /// there (a panic reboots, so bulkhead may even exit 0), at random points, on either
    /// vCPU, with and without worker devices; see README.md, "The nested lab". Such a boot
    /// is retried like a dead L1; a run whose guest reached userspace never is, nor one
    /// that failed before its VM was created (a bad option, a worker that would not start).
    pub fn l2_died_in_kernel_boot(&self) -> bool {
        self.runs.iter().any(|run| {
            let said = |marker: &str| {
                self.run_lines(&run.label)
                    .any(|line| line.text.contains(marker))
            };
            run.exit.is_some() && said(VM_CREATED_MARKER) && !said(L2_USERSPACE_MARKER)
        })
    }

    /// A run hung because one of its L2 vCPUs stopped while L1's KVM held it: the L2
    /// kernel found that CPU silent (an RCU stall) and sent it an NMI that it never
    /// answered, and when the run's time was up L1's watchdog found that vCPU's thread
    /// inside KVM_RUN in both of its samples. With KVM's in-kernel irqchip an NMI goes from
    /// vCPU to vCPU inside L1's kernel; a vCPU inside KVM_RUN that never takes it is the
    /// emulated SVM's failure, whatever bulkhead or the guest did. A vCPU thread that
    /// bulkhead holds outside KVM_RUN (paused, or stuck on a lock) does not count, nor one
    /// on a CPU that ran no guest (spinning in bulkhead's own code).
    pub fn l2_cpu_lost_in_kvm(&self) -> bool {
        self.runs.iter().any(|run| {
            let lines = || self.run_lines(&run.label);
            let mut unanswered: Vec<u32> = Vec::new();
            for line in lines() {
                if let Some(cpus) = after(&line.text, NMI_REQUEST_MARKER)
                    .and_then(|rest| rest.split_once(" to CPUs "))
                    .map(|(_, cpus)| cpus.trim_end_matches(':'))
                {
                    unanswered.extend(cpu_list(cpus));
                } else if let Some(cpu) = after(&line.text, NMI_ANSWER_MARKER)
                    .and_then(|rest| rest.split(' ').next()?.parse::<u32>().ok())
                {
                    unanswered.retain(|&c| c != cpu);
                }
            }
            unanswered.iter().any(|cpu| {
                let name = format!("vcpu{cpu}");
                let samples: Vec<&ThreadSample> =
                    run.hung_threads.iter().filter(|t| t.name == name).collect();
                held_by_kvm(&samples)
            })
        })
    }

    /// The console lines between a run's begin and exit markers.
    fn run_lines<'a>(&'a self, label: &str) -> impl Iterator<Item = &'a ConsoleLine> + 'a {
        let begin = format!("run {label}: begin");
        let exit = format!("run {label}: exit=");
        self.lines
            .iter()
            .skip_while(move |line| after(&line.text, LAB_MARKER) != Some(begin.as_str()))
            .take_while(move |line| {
                !after(&line.text, LAB_MARKER).is_some_and(|rest| rest.starts_with(&exit))
            })
    }

    fn l1_vcpu_lockup(&self) -> bool {
        self.lines.iter().any(|line| {
            line.text
                .split_once("watchdog: BUG: soft lockup")
                .is_some_and(|(_, rest)| rest.contains("[vcpu"))
        })
    }

    /// When L1 printed `LAB: <marker>` (e.g. "kvm ready", "done"), if it did.
    pub fn marker_at(&self, marker: &str) -> Option<Duration> {
        self.lines
            .iter()
            .find(|line| after(&line.text, LAB_MARKER) == Some(marker))
            .map(|line| line.at)
    }

    /// The `LAB: error ...` lines of L1's init.
    pub fn errors(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|line| after(&line.text, LAB_MARKER)?.strip_prefix("error "))
            .collect()
    }

    /// The last value reported for `key` outside any run (see [`Self::guest_values`]).
    pub fn guest(&self, key: &str) -> Option<&str> {
        last_value(&self.guest_values, key)
    }

    pub fn run(&self, label: &str) -> Option<&RunReport> {
        self.runs.iter().find(|run| run.label == label)
    }

    /// The run `label`; panics (failing the test) with the console's story if it never
    /// started.
    pub fn started_run(&self, label: &str) -> &RunReport {
        self.run(label).unwrap_or_else(|| {
            panic!(
                "{}",
                self.explain(&format!("bulkhead run {label:?} never started"))
            )
        })
    }

    /// Fails the test with every problem a check of this report found, and the console's
    /// story around them; does nothing when there are none.
    pub fn assert_no_problems(&self, problems: &[String]) {
        assert!(
            problems.is_empty(),
            "{}",
            self.explain(&format!(
                "{} problems:\n  {}",
                problems.len(),
                problems.join("\n  ")
            ))
        );
    }

    /// A failure message for the test: `what` went wrong, where the full log is, and the
    /// console's last lines.
    pub fn explain(&self, what: &str) -> String {
        let mut message = format!("lab scenario {:?}: {what}\n", self.scenario);
        let ending = match self.qemu_status {
            Some(status) => format!("qemu exited ({status})"),
            None => "qemu was killed at the deadline".to_owned(),
        };
        let _ = writeln!(
            message,
            "{ending} after {:.1}s; full console log: {}",
            self.elapsed.as_secs_f64(),
            self.log_path.display()
        );
        let _ = writeln!(message, "---- last {TAIL_LINES} console lines ----");
        for line in &self.lines[self.lines.len().saturating_sub(TAIL_LINES)..] {
            let _ = writeln!(message, "[{:7.2}] {}", line.at.as_secs_f64(), line.text);
        }
        message
    }

    /// One line per milestone, for the test's output.
    pub fn timings(&self) -> String {
        let mut text = format!(
            "lab {}: qemu ran {:.1}s",
            self.scenario,
            self.elapsed.as_secs_f64()
        );
        for marker in ["kvm ready", "done"] {
            if let Some(at) = self.marker_at(marker) {
                let _ = write!(text, "; {marker} at {:.1}s", at.as_secs_f64());
            }
        }
        for run in &self.runs {
            let took = run.duration().map_or("unfinished".to_owned(), |d| {
                format!("{:.1}s", d.as_secs_f64())
            });
            let _ = write!(
                text,
                "; run {} took {took} (exit {:?})",
                run.label, run.exit
            );
        }
        text
    }
}

/// The console lines the parser acts on.
enum Event<'a> {
    /// `LAB: run <label>: begin`
    RunBegin(&'a str),
    /// `LAB: run <label>: exit=<status>`
    RunExit(&'a str, Option<i32>),
    /// `GUEST: <key>=<value>`
    GuestValue(&'a str, &'a str),
    /// `LAB: run <label>: thread <sample>`
    Thread(&'a str, ThreadSample),
}

impl<'a> Event<'a> {
    fn of(line: &'a str) -> Option<Self> {
        if let Some(run) = after(line, LAB_MARKER).and_then(|m| m.strip_prefix("run ")) {
            if let Some(label) = run.strip_suffix(": begin") {
                return Some(Self::RunBegin(label));
            }
            if let Some((label, sample)) = run.split_once(": thread ") {
                return Some(Self::Thread(label, ThreadSample::parse(sample)?));
            }
            let (label, status) = run.split_once(": exit=")?;
            return Some(Self::RunExit(label, status.trim().parse().ok()));
        }
        let (key, value) = after(line, GUEST_MARKER)?.split_once('=')?;
        Some(Self::GuestValue(key.trim(), value.trim()))
    }
}

fn last_value<'a>(values: &'a [(String, String)], key: &str) -> Option<&'a str> {
    values
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The latest run named `label` that has not ended.
fn open_run<'r>(runs: &'r mut [RunReport], label: &str) -> Option<&'r mut RunReport> {
    runs.iter_mut()
        .rev()
        .find(|r| r.label == label && r.ended_at.is_none())
}

/// The CPUs of a kernel cpulist (`1`, `0-3`, `1,3-5`); what does not parse is left out.
fn cpu_list(list: &str) -> Vec<u32> {
    list.split(',')
        .filter_map(|part| match part.split_once('-') {
            Some((low, high)) => Some(low.parse().ok()?..=high.parse().ok()?),
            None => {
                let cpu = part.parse().ok()?;
                Some(cpu..=cpu)
            }
        })
        .flat_map(|range| range.take(64))
        .collect()
}

/// The rest of `line` after the first `marker`.
fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker)
        .map(|at| line[at + marker.len()..].trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(text: &str) -> LabReport {
        let lines = text
            .lines()
            .enumerate()
            .map(|(i, text)| ConsoleLine {
                at: Duration::from_secs(i as u64),
                text: text.to_owned(),
            })
            .collect();
        let console = Console {
            lines,
            status: None,
            silenced: false,
            elapsed: Duration::from_secs(99),
        };
        LabReport::parse("t", PathBuf::from("/logs/t.log"), console)
    }

    #[test]
    fn attributes_guest_values_to_their_run() {
        let r = report(
            "[    1.0] booting\n\
             LAB: kvm ready\n\
             LAB: run a: begin\n\
             GUEST: cpus=2\n\
             [    3.1] some kernel line GUEST: token = abc \n\
             LAB: run a: exit=0\n\
             GUEST: stray=1\n\
             LAB: run b: begin\n\
             GUEST: cpus=1\n\
             LAB: done\n",
        );
        assert_eq!(r.marker_at("kvm ready"), Some(Duration::from_secs(1)));
        assert_eq!(r.marker_at("done"), Some(Duration::from_secs(9)));
        let a = r.run("a").unwrap();
        assert_eq!(
            (a.exit, a.guest("cpus"), a.guest("token"), a.guest("stray")),
            (Some(0), Some("2"), Some("abc"), None)
        );
        assert_eq!(a.duration(), Some(Duration::from_secs(3)));
        let b = r.run("b").unwrap();
        assert_eq!(
            (b.exit, b.ended_at, b.guest("cpus")),
            (None, None, Some("1"))
        );
    }

    #[test]
    fn tells_a_dead_l1_from_a_failed_run() {
        use std::os::unix::process::ExitStatusExt;
        let exited = |text: &str| {
            let mut r = report(text);
            r.qemu_status = Some(ExitStatus::from_raw(0));
            r
        };
        let died = "LAB: kvm ready\nLAB: run a: begin\nLAB: run a: exit=0\nLAB: run b: begin\n[ 8.2] alg: se";
        assert!(exited(died).l1_died());
        // Killed at the deadline in the middle of a run that L1 never ended: L1 froze.
        assert!(report(died).l1_died());
        // Killed at the deadline after its runs ended: something else, not L1's death.
        assert!(!report("LAB: run a: begin\nLAB: run a: exit=0\n").l1_died());
        // L1 went silent, heartbeat and all, and was killed for it: frozen.
        let mut silent = report("LAB: kvm ready\nLAB: alive\n");
        silent.silenced = true;
        assert!(silent.l1_died());
        // A bulkhead run failed: that is the test's to report.
        assert!(!exited("LAB: run a: begin\nLAB: run a: exit=137\n").l1_died());
        assert!(!exited("LAB: run a: begin\nLAB: run a: exit=0\nLAB: done\n").l1_died());
        // L1's watchdog saw a bulkhead vCPU thread stuck in its kernel: L1's fault, even
        // though the run then failed at its timeout.
        let lockup = "LAB: run a: begin\n[ 9.9] evm: s[ 143.2] watchdog: BUG: soft lockup - CPU#0 stuck for 88s! [vcpu1:117]\nLAB: run a: exit=137\nLAB: done\n";
        assert!(exited(lockup).l1_died());
        // The same watchdog in the L2 guest names a guest task: bulkhead's to answer for.
        let guest_lockup = "LAB: run a: begin\n[ 30.1] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [swapper/1:0]\nLAB: run a: exit=137\nLAB: done\n";
        assert!(!exited(guest_lockup).l1_died());
    }

    #[test]
    fn tells_a_guest_that_died_in_kernel_boot() {
        let early = "LAB: run a: begin\n INFO bulkhead_vmm::vm: VM created cpus=2\n[ 3.7] smp: Bringing up\nerror: guest triple fault\nLAB: run a: exit=1\nLAB: done\n";
        assert!(report(early).l2_died_in_kernel_boot());
        let hung = "LAB: run a: begin\nVM created\n[ 4.6] audit: initializing\nLAB: run a: exit=137\nLAB: done\n";
        assert!(report(hung).l2_died_in_kernel_boot());
        // A kernel panic reboots the guest, and bulkhead ends with status 0.
        let panicked = "LAB: run a: begin\nVM created\n[ 8.9] Kernel panic - not syncing\nLAB: run a: exit=0\nLAB: done\n";
        assert!(report(panicked).l2_died_in_kernel_boot());
        // bulkhead failed before there was a guest: the test's to report, not lab noise.
        let setup = "LAB: run a: begin\nerror: cannot start the VM: device 9p0: worker did not complete the vhost-user handshake\nLAB: run a: exit=1\nLAB: done\n";
        assert!(!report(setup).l2_died_in_kernel_boot());
        // Once the guest ran /init, a failure is the test's to report.
        let late = "LAB: run a: begin\n[ 9.0] Run /init as init process\nGUEST: x=1\nLAB: run a: exit=1\nLAB: done\n";
        assert!(!report(late).l2_died_in_kernel_boot());
        // A later run's early death counts; a clean run does not.
        let second = "LAB: run a: begin\n[ 9.0] Run /init as init process\nLAB: run a: exit=0\nLAB: run b: begin\nVM created\n[ 1.0] x\nLAB: run b: exit=1\n";
        assert!(report(second).l2_died_in_kernel_boot());
        let fine = "LAB: run a: begin\n[ 9.0] Run /init as init process\nLAB: run a: exit=0\n";
        assert!(!report(fine).l2_died_in_kernel_boot());
    }

    #[test]
    fn tells_an_l2_cpu_lost_inside_kvm() {
        let stalled = "LAB: run a: begin\n\
            [ 9.0] Run /init as init process\n\
            GUEST: pings=5\n\
            [ 342.2] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n\
            [ 342.3] rcu: \t1-...0: (352 ticks this GP)\n\
            [ 342.3] Sending NMI from CPU 0 to CPUs 1:\n\
            LAB: run a: timeout\n";
        let thread = |name: &str, stack: &str| {
            format!("LAB: run a: thread {name} state=S ticks=5 guest=3 stack={stack}\n")
        };
        let in_kvm = "svm_vcpu_run<kvm_arch_vcpu_ioctl_run<kvm_vcpu_ioctl<__x64_sys_ioctl";
        let on_lock = "futex_wait_queue<futex_wait<do_futex<__x64_sys_futex";
        let end = "LAB: run a: exit=137\nLAB: done\n";
        let lost = |vcpu1: [&str; 2]| {
            let mut text = stalled.to_owned();
            for stack in vcpu1 {
                text += &thread("vcpu0", in_kvm);
                text += &thread("vcpu1", stack);
            }
            report(&(text + end))
        };
        let r = lost([in_kvm, in_kvm]);
        assert!(r.l2_cpu_lost_in_kvm());
        assert_eq!(r.run("a").unwrap().hung_threads.len(), 4);
        assert_eq!(r.run("a").unwrap().hung_threads[1].stack[1], KVM_RUN_FRAME);
        // The silent vCPU waited on bulkhead, in either sample: bulkhead's to answer for.
        assert!(!lost([on_lock, in_kvm]).l2_cpu_lost_in_kvm());
        assert!(!lost([in_kvm, on_lock]).l2_cpu_lost_in_kvm());
        // No samples of that vCPU: nothing shows where it was.
        assert!(
            !report(&(stalled.to_owned() + &thread("vcpu0", in_kvm) + end)).l2_cpu_lost_in_kvm()
        );
        // The CPU answered the NMI: it runs, it is stuck in the guest.
        let answered = stalled.to_owned()
            + "[ 342.4] NMI backtrace for cpu 1\n"
            + &thread("vcpu1", in_kvm)
            + &thread("vcpu1", in_kvm)
            + end;
        assert!(!report(&answered).l2_cpu_lost_in_kvm());
        // A range names the CPU too.
        let range = stalled.replace("CPUs 1:", "CPUs 0-1:")
            + &thread("vcpu1", in_kvm)
            + &thread("vcpu1", in_kvm)
            + end;
        assert!(report(&range).l2_cpu_lost_in_kvm());
        assert_eq!(cpu_list("1,3-5,x,7-"), [1, 3, 4, 5]);
        // On a CPU (no stack to read): in KVM_RUN if its guest time grew, not if it did not.
        let on_cpu = |guest: [u32; 2]| {
            let mut text = stalled.to_owned();
            for ticks in guest {
                text += &format!("LAB: run a: thread vcpu1 state=R ticks=9 guest={ticks} stack=\n");
            }
            report(&(text + end)).l2_cpu_lost_in_kvm()
        };
        assert!(on_cpu([100, 180]));
        assert!(!on_cpu([100, 100]));
        // One sample is not enough to say.
        let once = stalled.to_owned() + &thread("vcpu1", in_kvm) + end;
        assert!(!report(&once).l2_cpu_lost_in_kvm());
    }

    #[test]
    fn garbage_is_not_an_error() {
        let garbage =
            "LAB: run\nLAB: run x: exit=banana\nGUEST: novalue\n\u{fffd}\u{0}LAB: error bad";
        let r = report(garbage);
        assert!(r.runs.is_empty());
        assert_eq!(r.errors(), ["bad"]);
        assert!(r.explain("boom").contains("/logs/t.log"));
    }
}
