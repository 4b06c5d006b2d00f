//! The demo guest (`tests/lab/demo.sh`): prints a banner, then gives a shell when someone is
//! at the console, or powers off.

use super::Guest;

/// Where the demo guest's initramfs sits inside L1.
pub const DEMO_IMAGE: &str = "/demo.cpio";

const DEMO_INIT: &str = r#"
echo
echo "==== bulkhead demo guest ===="
uname -a
echo "cpus:   $(grep -c '^processor' /proc/cpuinfo)"
echo "memory: $(( $(awk '/^MemTotal:/ { print $2 }' /proc/meminfo) / 1024 )) MiB"
case " $(cat /proc/cmdline) " in
    *" lab.interactive=1 "*)
        echo "a shell on the guest console; 'poweroff -f' ends the demo"
        setsid cttyhack sh
        ;;
esac
echo "==== the demo guest powers off ===="
poweroff -f
"#;

pub fn demo_guest() -> Guest {
    Guest::new(DEMO_IMAGE, DEMO_INIT)
}

/// The guest's command line; `interactive` when a person is at the console to use a shell.
pub fn demo_cmdline(interactive: bool) -> String {
    let mut cmdline = String::from("console=ttyS0 panic=-1");
    if interactive {
        cmdline.push_str(" lab.interactive=1");
    }
    cmdline
}
