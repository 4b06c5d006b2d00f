//! The worker's command line.
//!
//! ```text
//! bulkhead-worker rng --socket PATH [--rate-limit BYTES/MS]   standalone vhost-user backend
//! bulkhead-worker rng --launch-fd N                           started by the bulkhead VMM
//! bulkhead-worker blk --socket PATH --image FILE [--format raw|qcow2] [--ro] [--cow]
//!                     [--queues N] [--serial ID]                 standalone vhost-user-blk
//! bulkhead-worker blk --launch-fd N                           started by the bulkhead VMM
//! bulkhead-worker p9 --socket PATH --dir DIR [--tag TAG] [--ro]  standalone virtio-9p backend
//! bulkhead-worker p9 --launch-fd N                           started by the bulkhead VMM
//! bulkhead-worker net --socket PATH --tap NAME [--mac MAC] [--queues N]
//!                                                             standalone vhost-user-net backend
//! bulkhead-worker net --launch-fd N                           started by the bulkhead VMM
//! bulkhead-worker p9 --listen unix:PATH --dir DIR [--ro]      9P over a socket, for debugging
//! bulkhead-worker display --socket PATH --vnc-listen 127.0.0.1:PORT|unix:PATH [--width W --height H]
//! bulkhead-worker display --launch-fd N                       started by the bulkhead VMM
//! bulkhead-worker input --launch-fd N                         started by the bulkhead VMM only
//! ```

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::path::PathBuf;

use bulkhead_protocol::{ImageFormat, RateLimit};
use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::net::parse_mac;
use crate::rng::MAX_PERIOD_MS;

#[derive(Debug, Parser)]
#[command(
    name = "bulkhead-worker",
    version,
    about = "A bulkhead device worker: one device, served as a vhost-user backend"
)]
pub struct Cli {
    #[command(subcommand)]
    pub worker: WorkerCommand,
}

#[derive(Debug, Subcommand)]
pub enum WorkerCommand {
    /// virtio-rng: random bytes from the host's getrandom(2).
    Rng(RngArgs),
    /// virtio-blk: a raw or QCOW2 disk image.
    Blk(BlkArgs),
    /// virtio-net on a host TAP device.
    Net(NetArgs),
    /// virtio-9p: a 9P2000.L file server sharing one directory (or, with --listen, 9P
    /// itself over a Unix socket, for debugging).
    P9(P9Args),
    /// virtio-gpu 2D, its screen served to VNC viewers (RFB 3.8).
    Display(DisplayArgs),
    /// virtio-input: a keyboard and tablet fed by a display worker's VNC viewers (only
    /// started by the VMM, which connects the two workers).
    Input(InputArgs),
}

#[derive(Debug, Args)]
pub struct InputArgs {
    /// Descriptor N is a memfd holding the launch config, which names the connected
    /// vhost-user socket and the display worker's events socket.
    #[arg(long, value_name = "N")]
    pub launch_fd: RawFd,
}

/// Where VNC viewers connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VncListen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// The display modes a worker may be configured with (EDID states at most 4095).
pub const MIN_DIMENSION: u32 = 64;
pub const MAX_DIMENSION: u32 = 4095;

#[derive(Debug, Args)]
pub struct DisplayArgs {
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// Serve VNC viewers on ADDR:PORT (TCP) or unix:PATH; bound before the sandbox goes on
    /// (standalone mode; a launched worker is handed its listening socket).
    #[arg(long, value_name = "ADDR:PORT|unix:PATH", value_parser = parse_vnc_listen,
          required_unless_present = "launch_fd", conflicts_with = "launch_fd")]
    pub vnc_listen: Option<VncListen>,
    /// Viewers must give the password in the first line of FILE (VNC authentication; its
    /// first 8 bytes count). Read before the sandbox goes on.
    #[arg(long, value_name = "FILE", conflicts_with = "launch_fd")]
    pub vnc_password_file: Option<PathBuf>,
    /// The display's width in pixels, as reported to the guest.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(i64::from(MIN_DIMENSION)..=i64::from(MAX_DIMENSION)), conflicts_with = "launch_fd")]
    pub width: u32,
    /// The display's height in pixels.
    #[arg(long, default_value_t = 768, value_parser = clap::value_parser!(u32).range(i64::from(MIN_DIMENSION)..=i64::from(MAX_DIMENSION)), conflicts_with = "launch_fd")]
    pub height: u32,
}

/// Parses `unix:PATH` or a TCP `ADDR:PORT`.
pub fn parse_vnc_listen(text: &str) -> Result<VncListen, String> {
    if text.starts_with("unix:") {
        return parse_listen(text).map(VncListen::Unix);
    }
    text.parse::<SocketAddr>()
        .map(VncListen::Tcp)
        .map_err(|_| format!("{text:?} is neither ADDR:PORT nor unix:PATH"))
}

/// Where the frontend is: every worker kind takes exactly one of these.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Endpoint {
    /// Listen on this Unix socket as a standalone vhost-user backend, serving one frontend
    /// (QEMU, cloud-hypervisor, ...) after another.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Started by the bulkhead VMM: descriptor N is a memfd holding the launch config,
    /// which names the connected vhost-user socket.
    #[arg(long, value_name = "N")]
    pub launch_fd: Option<RawFd>,
}

#[derive(Debug, Args)]
pub struct RngArgs {
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// Serve at most BYTES of entropy every MS milliseconds (standalone mode; a launched
    /// worker takes its limit from the launch config).
    #[arg(long, value_name = "BYTES/MS", value_parser = parse_rate_limit, conflicts_with = "launch_fd")]
    pub rate_limit: Option<RateLimit>,
}

#[derive(Debug, Args)]
pub struct NetArgs {
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// Standalone mode: the TAP interface to attach to, created if it does not exist (a
    /// launched worker gets the VMM's TAP descriptor instead).
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with = "launch_fd",
        required_unless_present = "launch_fd"
    )]
    pub tap: Option<String>,
    /// The guest's MAC address; by default 52:54:00 and a hash of the TAP's name, the same
    /// on every run.
    #[arg(long, value_name = "MAC", value_parser = parse_mac, conflicts_with = "launch_fd")]
    pub mac: Option<[u8; 6]>,
    /// Queue pairs, one TAP queue each; with more than one the TAP is opened multiqueue.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        conflicts_with = "launch_fd"
    )]
    pub queues: u16,
}

#[derive(Debug, Args)]
pub struct BlkArgs {
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// The disk image (standalone mode). Its backing chain is opened too, before the
    /// worker confines itself; relative backing names are relative to the image's
    /// directory.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "launch_fd",
        conflicts_with = "launch_fd"
    )]
    pub image: Option<PathBuf>,
    /// The image's format; probed from its first bytes when not given. Give it for raw
    /// images the guest writes: a guest can make a probed raw disk look like QCOW2.
    #[arg(long, value_name = "raw|qcow2", value_parser = parse_format, conflicts_with = "launch_fd")]
    pub format: Option<ImageFormat>,
    /// A read-only disk: the guest is told so and writes fail.
    #[arg(long, conflicts_with = "launch_fd")]
    pub ro: bool,
    /// Guest writes stay in the worker's memory and vanish at exit; the image is opened
    /// read-only and never written.
    #[arg(long, conflicts_with_all = ["launch_fd", "ro"])]
    pub cow: bool,
    /// Request queues, each served by its own thread.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        conflicts_with = "launch_fd"
    )]
    pub queues: u16,
    /// The disk's serial number, as GET_ID answers it (at most 20 bytes).
    #[arg(
        long,
        value_name = "ID",
        default_value = "bulkhead-blk",
        conflicts_with = "launch_fd"
    )]
    pub serial: String,
}

/// Parses `raw` or `qcow2`.
pub fn parse_format(text: &str) -> Result<ImageFormat, String> {
    match text {
        "raw" => Ok(ImageFormat::Raw),
        "qcow2" => Ok(ImageFormat::Qcow2),
        _ => Err(format!("{text:?} is not raw or qcow2")),
    }
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("p9_endpoint").required(true).args(["socket", "launch_fd", "listen"])))]
pub struct P9Args {
    /// Listen on this Unix socket as a standalone vhost-user backend (virtio-9p), serving
    /// one frontend after another.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Started by the bulkhead VMM: descriptor N is a memfd holding the launch config,
    /// which names the connected vhost-user socket and the shared directory's descriptor.
    #[arg(long, value_name = "N")]
    pub launch_fd: Option<RawFd>,
    /// Serve 9P itself (no vhost-user) on this socket, one session per connection, so that
    /// ordinary 9P clients such as diod's tools can test the server without a VM.
    #[arg(long, value_name = "unix:PATH", value_parser = parse_listen)]
    pub listen: Option<PathBuf>,
    /// The directory to share; nothing outside it is reachable.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "launch_fd",
        conflicts_with = "launch_fd"
    )]
    pub dir: Option<PathBuf>,
    /// The mount tag the guest sees (default: the directory's name).
    #[arg(long, value_name = "TAG", conflicts_with_all = ["launch_fd", "listen"])]
    pub tag: Option<String>,
    /// Share read-only: every change is refused with EROFS.
    #[arg(long, conflicts_with = "launch_fd")]
    pub ro: bool,
}

/// Parses `unix:PATH`, the only listening address there is.
pub fn parse_listen(text: &str) -> Result<PathBuf, String> {
    match text.strip_prefix("unix:") {
        Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
        _ => Err(format!("{text:?} is not unix:PATH")),
    }
}

/// Parses `BYTES/MS`, e.g. `4096/1000`.
pub fn parse_rate_limit(text: &str) -> Result<RateLimit, String> {
    let (bytes, period_ms) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not BYTES/MS (for example 4096/1000)"))?;
    let bytes: u64 = bytes
        .parse()
        .map_err(|_| format!("{bytes:?} is not a byte count"))?;
    let period_ms: u64 = period_ms
        .parse()
        .map_err(|_| format!("{period_ms:?} is not a number of milliseconds"))?;
    if bytes == 0 {
        return Err("the byte count must be at least 1".into());
    }
    if !(1..=MAX_PERIOD_MS).contains(&period_ms) {
        return Err(format!("the period must be 1 to {MAX_PERIOD_MS} ms"));
    }
    Ok(RateLimit { bytes, period_ms })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("bulkhead-worker").chain(args.iter().copied()))
    }

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn standalone_and_launched_forms_parse() {
        let cli = parse(&[
            "rng",
            "--socket",
            "/tmp/rng.sock",
            "--rate-limit",
            "4096/1000",
        ])
        .unwrap();
        let WorkerCommand::Rng(args) = cli.worker else {
            panic!("not rng")
        };
        assert_eq!(args.endpoint.socket, Some(PathBuf::from("/tmp/rng.sock")));
        assert_eq!(
            args.rate_limit,
            Some(RateLimit {
                bytes: 4096,
                period_ms: 1000
            })
        );
        let WorkerCommand::Rng(args) = parse(&["rng", "--launch-fd", "3"]).unwrap().worker else {
            panic!("not rng")
        };
        assert_eq!(args.endpoint.launch_fd, Some(3));
    }

    #[test]
    fn endpoint_is_required_and_unique() {
        assert!(parse(&["rng"]).is_err());
        assert!(parse(&["rng", "--socket", "a", "--launch-fd", "3"]).is_err());
        assert!(parse(&["rng", "--launch-fd", "3", "--rate-limit", "1/1"]).is_err());
    }

    #[test]
    fn net_takes_a_tap_in_standalone_mode_only() {
        let cli = parse(&[
            "net",
            "--socket",
            "/tmp/net.sock",
            "--tap",
            "tap0",
            "--mac",
            "52:54:00:01:02:03",
        ])
        .unwrap();
        let WorkerCommand::Net(args) = cli.worker else {
            panic!("not net")
        };
        assert_eq!(args.tap.as_deref(), Some("tap0"));
        assert_eq!(args.mac, Some([0x52, 0x54, 0, 1, 2, 3]));
        assert_eq!(args.queues, 1);
        assert!(parse(&["net", "--launch-fd", "3"]).is_ok());
        assert!(parse(&["net", "--socket", "/tmp/net.sock"]).is_err());
        assert!(parse(&["net", "--launch-fd", "3", "--tap", "tap0"]).is_err());
        assert!(parse(&[
            "net",
            "--socket",
            "a",
            "--tap",
            "t",
            "--mac",
            "01:00:5e:0:0:1"
        ])
        .is_err());
    }

    #[test]
    fn p9_takes_a_unix_address_and_a_directory() {
        let cli = parse(&[
            "p9",
            "--listen",
            "unix:/tmp/p9.sock",
            "--dir",
            "/srv",
            "--ro",
        ])
        .unwrap();
        let WorkerCommand::P9(args) = cli.worker else {
            panic!("not p9")
        };
        assert_eq!(args.listen, Some(PathBuf::from("/tmp/p9.sock")));
        assert_eq!(args.dir, Some(PathBuf::from("/srv")));
        assert!(args.ro);
        assert!(parse(&["p9", "--listen", "/tmp/p9.sock", "--dir", "/srv"]).is_err());
        assert!(parse(&["p9", "--listen", "unix:", "--dir", "/srv"]).is_err());
        assert!(parse(&["p9", "--listen", "unix:/a"]).is_err());
    }

    #[test]
    fn p9_serves_vhost_user_standalone_or_launched() {
        let cli = parse(&[
            "p9",
            "--socket",
            "/tmp/9.sock",
            "--dir",
            "/srv",
            "--tag",
            "t",
        ])
        .unwrap();
        let WorkerCommand::P9(args) = cli.worker else {
            panic!("not p9")
        };
        assert_eq!(args.socket, Some(PathBuf::from("/tmp/9.sock")));
        assert_eq!(args.tag.as_deref(), Some("t"));
        assert!(parse(&["p9", "--launch-fd", "3"]).is_ok());
        assert!(parse(&["p9", "--dir", "/srv"]).is_err());
        assert!(parse(&["p9", "--socket", "/a"]).is_err());
        assert!(parse(&["p9", "--launch-fd", "3", "--dir", "/srv"]).is_err());
        assert!(parse(&["p9", "--socket", "/a", "--listen", "unix:/b", "--dir", "/srv"]).is_err());
    }

    #[test]
    fn blk_needs_an_image_standalone_and_nothing_else_launched() {
        let cli = parse(&[
            "blk",
            "--socket",
            "/tmp/b.sock",
            "--image",
            "d.qcow2",
            "--format",
            "qcow2",
            "--cow",
            "--queues",
            "4",
        ])
        .unwrap();
        let WorkerCommand::Blk(args) = cli.worker else {
            panic!("not blk")
        };
        assert_eq!(args.image, Some(PathBuf::from("d.qcow2")));
        assert_eq!(args.format, Some(ImageFormat::Qcow2));
        assert!(args.cow && !args.ro);
        assert_eq!(args.queues, 4);
        assert!(parse(&["blk", "--socket", "/tmp/b.sock"]).is_err());
        assert!(parse(&["blk", "--launch-fd", "3"]).is_ok());
        assert!(parse(&["blk", "--launch-fd", "3", "--image", "d"]).is_err());
        assert!(parse(&["blk", "--socket", "s", "--image", "d", "--ro", "--cow"]).is_err());
        assert!(parse(&["blk", "--socket", "s", "--image", "d", "--format", "vmdk"]).is_err());
    }

    #[test]
    fn display_takes_a_vnc_address_and_a_mode() {
        let cli = parse(&[
            "display",
            "--socket",
            "/tmp/gpu.sock",
            "--vnc-listen",
            "127.0.0.1:5900",
            "--width",
            "1920",
            "--height",
            "1080",
        ])
        .unwrap();
        let WorkerCommand::Display(args) = cli.worker else {
            panic!("not display")
        };
        assert_eq!(
            args.vnc_listen,
            Some(VncListen::Tcp("127.0.0.1:5900".parse().unwrap()))
        );
        assert_eq!((args.width, args.height), (1920, 1080));
        let WorkerCommand::Display(args) =
            parse(&["display", "--socket", "a", "--vnc-listen", "unix:/tmp/v"])
                .unwrap()
                .worker
        else {
            panic!("not display")
        };
        assert_eq!(args.vnc_listen, Some(VncListen::Unix("/tmp/v".into())));
        assert_eq!((args.width, args.height), (1024, 768));
        assert!(parse(&["display", "--socket", "a"]).is_err());
        assert!(parse(&["display", "--socket", "a", "--vnc-listen", "5900"]).is_err());
        assert!(parse(&[
            "display",
            "--socket",
            "a",
            "--vnc-listen",
            "unix:/v",
            "--width",
            "9999"
        ])
        .is_err());
        assert!(parse(&["display", "--launch-fd", "3"]).is_ok());
        assert!(parse(&["display", "--launch-fd", "3", "--vnc-listen", "unix:/v"]).is_err());
    }

    #[test]
    fn rate_limits_are_checked() {
        assert!(parse_rate_limit("4096").is_err());
        assert!(parse_rate_limit("0/1000").is_err());
        assert!(parse_rate_limit("10/0").is_err());
        assert!(parse_rate_limit("x/10").is_err());
        assert!(parse_rate_limit("10/99999999999999").is_err());
        assert_eq!(
            parse_rate_limit("1/1"),
            Ok(RateLimit {
                bytes: 1,
                period_ms: 1
            })
        );
    }
}
