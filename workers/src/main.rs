//! `bulkhead-worker`: one device served as a vhost-user backend. Sets the device up,
//! confines itself, then serves; errors become one `error: ...` line on stderr and exit
//! status 1 (2 for a command line that does not parse).

use std::fs::{self, File, OpenOptions};
use std::io::IsTerminal;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use bulkhead_protocol::{DeviceConfig, DisplayConfig, ImageFormat, RngConfig, WorkerKind};
use bulkhead_seccomp::{policy_for, Policy};
use bulkhead_workers::blk::{AsyncIo, BlkDevice, BlkOptions, UringOptions};
use bulkhead_workers::cli::{
    BlkArgs, Cli, DisplayArgs, Endpoint, InputArgs, P9Args, VncListen, WorkerCommand,
};
use bulkhead_workers::disk::{
    self, DiskOptions, Format, Mode, PreopenedBacking, MAX_BACKING_DEPTH,
};
use bulkhead_workers::display::gpu::store::StateStore;
use bulkhead_workers::display::vnc::VncServer;
use bulkhead_workers::display::{
    EventSocketSink, Framebuffer, GpuDevice, GpuLimits, InputSink, LoggingInputSink,
};
use bulkhead_workers::input::InputDevice;
use bulkhead_workers::launch::{events_socket, listening_socket, read_launch};
use bulkhead_workers::net::{mac_from_name, NetDevice, NetSettings, Tap, MAX_QUEUE_PAIRS};
use bulkhead_workers::p9::{transport_unix, Export, P9Device, P9DeviceError, Root};
use bulkhead_workers::rng::RngDevice;
use bulkhead_workers::sandbox::enter_policy;
use bulkhead_workers::vhost_user::{serve_connection, serve_listener, DeviceBackend, GuestRam};
use clap::Parser;
use vhost_user_backend::{VhostUserBackend, VringT};

/// Where the frontend is, once set up.
enum Frontend {
    /// Standalone: a bound socket; frontends connect one after another.
    Listening(UnixListener),
    /// Launched by the VMM: the connected socket named by the launch config.
    Connected(UnixStream),
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // The supervisor's log is a file, not a terminal: no colour codes there.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// One malloc arena for the whole worker. In a per-thread arena (which every queue, VNC
/// viewer or I/O thread would get) glibc's first heap shrink opens
/// /proc/sys/vm/overcommit_memory, which the sandbox kills the worker for; the main,
/// brk-based arena never does that. Workers allocate little per request, so the shared
/// arena's lock costs little.
fn single_malloc_arena() {
    // SAFETY: mallopt only sets a malloc tunable; no thread exists yet to race with it.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) } != 1 {
        tracing::warn!("cannot limit malloc to one arena");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    single_malloc_arena();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` joins the context chain into one line.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.worker {
        WorkerCommand::Rng(args) => {
            let (frontend, config) = match args.endpoint {
                Endpoint {
                    socket: Some(path), ..
                } => {
                    let config = RngConfig {
                        rate_limit: args.rate_limit,
                    };
                    (Frontend::Listening(bind(&path)?), config)
                }
                Endpoint {
                    launch_fd: Some(fd),
                    ..
                } => {
                    let launch = read_launch(fd, WorkerKind::Rng)
                        .with_context(|| format!("--launch-fd {fd}"))?;
                    tracing::info!("serving {}", launch.device_name);
                    let DeviceConfig::Rng(config) = launch.device else {
                        bail!("--launch-fd {fd}: not an rng launch config");
                    };
                    (Frontend::Connected(launch.connection), config)
                }
                Endpoint { .. } => bail!("no endpoint: give --socket or --launch-fd"),
            };
            serve(policy_for(WorkerKind::Rng), frontend, &[], || {
                Ok(move || RngDevice::new(&config).map(RngDevice::into_backend))
            })
        }
        WorkerCommand::Blk(args) => serve_blk(args),
        WorkerCommand::Net(args) => {
            let (frontend, taps, settings) = match args.endpoint {
                Endpoint {
                    socket: Some(path), ..
                } => {
                    let Some(name) = args.tap else {
                        bail!("--tap is required with --socket");
                    };
                    let pairs = usize::from(args.queues);
                    if !(1..=MAX_QUEUE_PAIRS).contains(&pairs) {
                        bail!("--queues {pairs}: 1 to {MAX_QUEUE_PAIRS} queue pairs");
                    }
                    // Attached before the sandbox: opening /dev/net/tun is not allowed after.
                    let taps = (0..pairs)
                        .map(|_| Tap::open(&name, pairs > 1))
                        .collect::<Result<Vec<_>, _>>()
                        .with_context(|| format!("--tap {name}"))?;
                    let settings = NetSettings {
                        mac: args.mac.unwrap_or_else(|| mac_from_name(&name)),
                        mtu: None,
                    };
                    (Frontend::Listening(bind(&path)?), taps, settings)
                }
                Endpoint {
                    launch_fd: Some(fd),
                    ..
                } => {
                    let launch = read_launch(fd, WorkerKind::Net)
                        .with_context(|| format!("--launch-fd {fd}"))?;
                    tracing::info!("serving {}", launch.device_name);
                    let DeviceConfig::Net(config) = launch.device else {
                        bail!("--launch-fd {fd}: not a net launch config");
                    };
                    let pairs = config.tap_fds.len();
                    if !(1..=MAX_QUEUE_PAIRS).contains(&pairs) {
                        bail!("--launch-fd {fd}: {pairs} TAP queues; 1 to {MAX_QUEUE_PAIRS} are served");
                    }
                    if launch.files.len() != pairs {
                        bail!(
                            "--launch-fd {fd}: {} descriptors passed for {pairs} TAP queues",
                            launch.files.len()
                        );
                    }
                    let taps = launch
                        .files
                        .into_iter()
                        .map(|file| Tap::from_fd(OwnedFd::from(file)))
                        .collect::<Result<Vec<_>, _>>()
                        .with_context(|| format!("--launch-fd {fd}"))?;
                    let settings = NetSettings {
                        mac: config.mac,
                        mtu: config.mtu,
                    };
                    (Frontend::Connected(launch.connection), taps, settings)
                }
                Endpoint { .. } => bail!("no endpoint: give --socket or --launch-fd"),
            };
            tracing::info!("TAP {}, {} queue pair(s)", taps[0].name(), taps.len());
            let taps: Vec<_> = taps.into_iter().map(std::sync::Arc::new).collect();
            let keep: Vec<_> = taps.iter().map(|tap| (tap.as_raw_fd(), "TAP")).collect();
            serve(policy_for(WorkerKind::Net), frontend, &keep, || {
                Ok(move || {
                    NetDevice::new(taps.clone(), settings, Default::default())
                        .and_then(NetDevice::into_backend)
                })
            })
        }
        WorkerCommand::P9(args) => serve_p9(args),
        WorkerCommand::Display(args) => serve_display(args),
        WorkerCommand::Input(args) => serve_input(args),
    }
}

/// The input worker, launched only: its events come from the display worker through the
/// socket the VMM connected the two with.
fn serve_input(args: InputArgs) -> anyhow::Result<()> {
    let launch = read_launch(args.launch_fd, WorkerKind::Input)
        .with_context(|| format!("--launch-fd {}", args.launch_fd))?;
    tracing::info!("serving {}", launch.device_name);
    let DeviceConfig::Input(config) = &launch.device else {
        bail!("not an input launch config");
    };
    let fd = config.events_fd;
    let Some(file) = launch.files.into_iter().next() else {
        bail!("no events socket was passed");
    };
    let events = events_socket(file, fd).context("the events socket")?;
    let keep: [(RawFd, &'static str); 1] = [(events.as_raw_fd(), "input events socket")];
    let mut events = Some(events);
    serve(
        policy_for(WorkerKind::Input),
        Frontend::Connected(launch.connection),
        &keep,
        move || {
            Ok(move || match events.take() {
                Some(events) => Ok(InputDevice::new(events).into_backend()),
                None => Err(std::io::Error::other("the events socket is already served")),
            })
        },
    )
}

/// The display worker: the VNC listener (bound here standalone, inherited when launched)
/// and the virtio-gpu device share one framebuffer; the VNC server starts inside the
/// sandbox, on its own thread.
fn serve_display(args: DisplayArgs) -> anyhow::Result<()> {
    let (frontend, vnc_listener, events, store, config) = match args.endpoint {
        Endpoint {
            socket: Some(path), ..
        } => {
            let Some(listen) = &args.vnc_listen else {
                bail!("--vnc-listen is required with --socket");
            };
            // The VNC socket first: once the vhost-user socket exists, viewers can connect.
            let vnc = bind_vnc(listen)?;
            let vnc_password = args
                .vnc_password_file
                .as_deref()
                .map(read_password)
                .transpose()?;
            let config = DisplayConfig {
                vnc_listen_fd: vnc.as_raw_fd(),
                width: args.width,
                height: args.height,
                vnc_password,
                input_events_fd: None,
                state_fd: None,
            };
            (Frontend::Listening(bind(&path)?), vnc, None, None, config)
        }
        Endpoint {
            launch_fd: Some(fd),
            ..
        } => {
            let launch = read_launch(fd, WorkerKind::Display)
                .with_context(|| format!("--launch-fd {fd}"))?;
            tracing::info!("serving {}", launch.device_name);
            let DeviceConfig::Display(config) = launch.device.clone() else {
                bail!("not a display launch config");
            };
            let range = bulkhead_workers::cli::MIN_DIMENSION..=bulkhead_workers::cli::MAX_DIMENSION;
            if !range.contains(&config.width) || !range.contains(&config.height) {
                bail!(
                    "display mode {}x{} is out of range",
                    config.width,
                    config.height
                );
            }
            // In the order `DisplayConfig::descriptors` names them.
            let mut files = launch.files.into_iter();
            let Some(vnc) = files.next() else {
                bail!("no VNC listening socket was passed");
            };
            let vnc =
                listening_socket(vnc, config.vnc_listen_fd).context("the VNC listening socket")?;
            let events = match config.input_events_fd {
                Some(fd) => {
                    let Some(file) = files.next() else {
                        bail!("no input events socket was passed");
                    };
                    Some(events_socket(file, fd).context("the input events socket")?)
                }
                None => None,
            };
            let store = match config.state_fd {
                Some(_) => {
                    let Some(file) = files.next() else {
                        bail!("no display state store was passed");
                    };
                    Some(file)
                }
                None => None,
            };
            (
                Frontend::Connected(launch.connection),
                vnc,
                events,
                store,
                config,
            )
        }
        Endpoint { .. } => bail!("no endpoint: give --socket or --launch-fd"),
    };
    let framebuffer = Arc::new(Framebuffer::new(config.width, config.height));
    let mut keep = vec![(vnc_listener.as_raw_fd(), "VNC listening socket")];
    // Read before the sandbox, so that a bad store is logged first thing; the device that
    // serves the connection rebuilds it once guest memory arrives.
    let mut store = store.map(|file| {
        keep.push((file.as_raw_fd(), "display state store"));
        StateStore::open(file, GpuLimits::default().max_backing_entries)
    });
    if let Some((_, Err(e))) = &store {
        tracing::error!("{e}; the device starts empty");
    }
    let input: Arc<dyn InputSink> = match events {
        Some(events) => {
            keep.push((events.as_raw_fd(), "input events socket"));
            Arc::new(EventSocketSink::new(events, framebuffer.clone()))
        }
        None => Arc::new(LoggingInputSink::default()),
    };
    let vnc = VncServer::new(
        vnc_listener,
        framebuffer.clone(),
        input,
        "bulkhead".to_owned(),
        config.vnc_password.clone().map(String::into_bytes),
    );
    let start_vnc = move || -> anyhow::Result<()> {
        std::thread::Builder::new()
            .name("vnc".into())
            .spawn(move || {
                if let Err(e) = vnc.run() {
                    tracing::error!("vnc: the listening socket failed: {e}");
                }
            })
            .context("cannot start the VNC server")?;
        Ok(())
    };
    let (width, height) = (config.width, config.height);
    serve(
        policy_for(WorkerKind::Display),
        frontend,
        &keep,
        move || {
            start_vnc()?;
            Ok(move || {
                let device =
                    GpuDevice::new(framebuffer.clone(), width, height, GpuLimits::default());
                // One connection for a launched worker: the store goes with it.
                let device = match store.take() {
                    Some((store, record)) => device.with_store(store, record.ok().flatten()),
                    None => device,
                };
                Ok::<_, std::convert::Infallible>(device.into_backend())
            })
        },
    )
}

/// The first line of a password file; an empty one is refused rather than meaning none.
fn read_password(path: &Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read the VNC password from {}", path.display()))?;
    let password = text.lines().next().unwrap_or("").to_owned();
    if password.is_empty() {
        bail!("{} holds no password", path.display());
    }
    Ok(password)
}

/// Binds the standalone VNC listener.
fn bind_vnc(listen: &VncListen) -> anyhow::Result<OwnedFd> {
    let fd = match listen {
        VncListen::Tcp(addr) => OwnedFd::from(
            TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?,
        ),
        VncListen::Unix(path) => OwnedFd::from(bind(path)?),
    };
    tracing::info!("vnc: listening on {listen:?}");
    Ok(fd)
}

/// A disk as the worker gets it: open files only, the chain already walked.
struct DiskFiles {
    image: File,
    /// The backing chain in order, each under the name the image above it records.
    backing: Vec<(String, File)>,
    format: Option<Format>,
    mode: Mode,
    /// A `,cow` disk's overlay store from the VMM, which outlives this worker.
    overlay: Option<File>,
    options: BlkOptions,
}

fn serve_blk(args: BlkArgs) -> anyhow::Result<()> {
    let (frontend, files) = match &args.endpoint {
        Endpoint {
            socket: Some(path), ..
        } => {
            let Some(image) = &args.image else {
                bail!("--socket needs --image");
            };
            let files = open_disk_standalone(image, &args)
                .with_context(|| format!("--image {}", image.display()))?;
            (Frontend::Listening(bind(path)?), files)
        }
        Endpoint {
            launch_fd: Some(fd),
            ..
        } => {
            let launch =
                read_launch(*fd, WorkerKind::Blk).with_context(|| format!("--launch-fd {fd}"))?;
            tracing::info!("serving {}", launch.device_name);
            let DeviceConfig::Blk(config) = launch.device else {
                bail!("--launch-fd {fd}: not a blk device");
            };
            let mut inherited = launch.files.into_iter();
            let Some(image) = inherited.next() else {
                bail!("--launch-fd {fd}: no image descriptor");
            };
            let backing = config
                .backing
                .iter()
                .map(|b| b.name.clone())
                .zip(inherited.by_ref())
                .collect();
            let overlay = inherited.next();
            let mode = disk_mode(config.read_only, config.copy_on_write);
            if overlay.is_some() && mode != Mode::Cow {
                bail!("--launch-fd {fd}: an overlay store for a disk that is not copy-on-write");
            }
            let files = DiskFiles {
                image,
                backing,
                format: config.format.map(format_of),
                mode,
                overlay,
                options: BlkOptions {
                    num_queues: config.num_queues,
                    serial: config.serial,
                },
            };
            (Frontend::Connected(launch.connection), files)
        }
        Endpoint { .. } => bail!("no endpoint: give --socket or --launch-fd"),
    };

    let mut keep: Vec<(RawFd, &'static str)> = vec![(files.image.as_raw_fd(), "disk image")];
    keep.extend(
        files
            .backing
            .iter()
            .map(|(_, file)| (file.as_raw_fd(), "backing file")),
    );
    keep.extend(
        files
            .overlay
            .iter()
            .map(|file| (file.as_raw_fd(), "copy-on-write overlay store")),
    );
    // Made (and restricted) now: the sandbox forbids making rings.
    let uring = async_io(&files)?;
    if let Some(uring) = &uring {
        keep.extend(uring.descriptors());
    }
    serve(policy_for(WorkerKind::Blk), frontend, &keep, move || {
        // Opened inside the sandbox: the engine duplicates backing descriptors, and
        // duplicates made before would be closed on the way in.
        let DiskFiles {
            image,
            backing,
            format,
            mode,
            overlay,
            options,
        } = files;
        let backing = PreopenedBacking::new(backing);
        let disk = match overlay {
            Some(store) => disk::open_cow(image, format, &backing, &DiskOptions::default(), store),
            None => disk::open(image, format, mode, &backing),
        }
        .context("cannot open the disk image")?;
        // Checked once here, so that a bad option is an error at startup rather than
        // for each connecting frontend.
        BlkDevice::new(disk.clone(), &options)?;
        tracing::info!("disk of {} bytes, {mode:?}", disk.len());
        Ok(move || {
            BlkDevice::new(Arc::clone(&disk), &options).map(|device| match &uring {
                Some(uring) => device.with_async_io(Arc::clone(uring)).into_backend(),
                None => device.into_backend(),
            })
        })
    })
}

/// Reads and writes go through io_uring unless `BULKHEAD_BLK_IO=sync` says otherwise or
/// the kernel refuses rings (ENOSYS, EPERM: io_uring_disabled, a container's seccomp);
/// then every request is served synchronously. `BULKHEAD_BLK_URING_PUNT` is the size from
/// which an op goes to the kernel's workers rather than being tried inline (bytes, or
/// `off`); writes shorter than `BULKHEAD_BLK_URING_INLINE_WRITES` bytes are done on the
/// queue's thread.
fn async_io(files: &DiskFiles) -> anyhow::Result<Option<Arc<AsyncIo>>> {
    match std::env::var("BULKHEAD_BLK_IO").as_deref() {
        Ok("sync") => {
            tracing::info!("BULKHEAD_BLK_IO=sync: synchronous I/O");
            return Ok(None);
        }
        Ok("uring") | Err(_) => {}
        Ok(other) => bail!("BULKHEAD_BLK_IO={other}: give sync or uring"),
    }
    let punt_from = match std::env::var("BULKHEAD_BLK_URING_PUNT").as_deref() {
        Err(_) => Some(DEFAULT_PUNT_FROM),
        Ok("off") => None,
        Ok(bytes) => Some(bytes.parse().with_context(|| {
            format!("BULKHEAD_BLK_URING_PUNT={bytes}: give a size in bytes or off")
        })?),
    };
    let inline_writes_below = match std::env::var("BULKHEAD_BLK_URING_INLINE_WRITES").as_deref() {
        Err(_) => DEFAULT_INLINE_WRITES_BELOW,
        Ok(bytes) => bytes.parse().with_context(|| {
            format!("BULKHEAD_BLK_URING_INLINE_WRITES={bytes}: give a size in bytes")
        })?,
    };
    let queues = usize::from(files.options.num_queues);
    match AsyncIo::create(
        queues,
        &[files.image.as_raw_fd()],
        UringOptions {
            punt_from,
            inline_writes_below,
        },
    ) {
        Ok(uring) => Ok(Some(Arc::new(uring))),
        Err(e) => {
            tracing::warn!("io_uring unavailable ({e}): serving the disk synchronously");
            Ok(None)
        }
    }
}

/// Ops from this size are punted to io-wq workers (IOSQE_ASYNC). Measured on the 2-core
/// development machine (raw and preallocated QCOW2, QD4): punting 1 MiB requests won 7
/// comparisons of 8 (up to 1.7x: the copies run on both cores), punting 64 KiB reads lost
/// 3 of 4 (the thread hop costs more than the copy it moves).
const DEFAULT_PUNT_FROM: u64 = 128 << 10;
/// Writes shorter than this stay on the queue's thread; see `UringOptions`.
const DEFAULT_INLINE_WRITES_BELOW: u64 = 64 << 10;

/// Read-only wins over copy-on-write: nothing is written either way, and the guest is told.
fn disk_mode(read_only: bool, copy_on_write: bool) -> Mode {
    match (read_only, copy_on_write) {
        (true, _) => Mode::ReadOnly,
        (false, true) => Mode::Cow,
        (false, false) => Mode::ReadWrite,
    }
}

fn format_of(format: ImageFormat) -> Format {
    match format {
        ImageFormat::Raw => Format::Raw,
        ImageFormat::Qcow2 => Format::Qcow2,
    }
}

/// Opens the image as `--ro`/`--cow` allow and walks its backing chain, each backing file
/// read-only, a relative name taken relative to the directory of the image naming it.
fn open_disk_standalone(path: &Path, args: &BlkArgs) -> anyhow::Result<DiskFiles> {
    let writable = !(args.ro || args.cow);
    let image = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut backing = Vec::new();
    let mut current = image.try_clone().context("cannot duplicate the image")?;
    let mut current_path = path.to_path_buf();
    // A raw image names no backing file, whatever its bytes look like: a guest can write a
    // QCOW2 header naming any host path into a raw disk. The same holds down the chain for
    // a backing file the image above records as raw.
    let mut walk = match args.format {
        Some(format) => format == ImageFormat::Qcow2,
        None => disk::probe(&image).context("cannot probe the image format")? == Format::Qcow2,
    };
    while walk {
        let Some((name, recorded)) = disk::backing_of(&current)
            .with_context(|| format!("cannot read {}", current_path.display()))?
        else {
            break;
        };
        if backing.len() >= MAX_BACKING_DEPTH {
            bail!("the backing chain is deeper than {MAX_BACKING_DEPTH} (a loop?)");
        }
        let next_path = match Path::new(&name) {
            p if p.is_absolute() => p.to_path_buf(),
            p => current_path
                .parent()
                .map_or_else(|| PathBuf::from(p), |dir| dir.join(p)),
        };
        let file = File::open(&next_path)
            .with_context(|| format!("cannot open backing file {}", next_path.display()))?;
        walk = match recorded {
            Some(format) => format == Format::Qcow2,
            None => {
                disk::probe(&file)
                    .with_context(|| format!("cannot probe {}", next_path.display()))?
                    == Format::Qcow2
            }
        };
        current = file
            .try_clone()
            .context("cannot duplicate a backing file")?;
        backing.push((name, file));
        current_path = next_path;
    }
    let mode = disk_mode(args.ro, args.cow);
    Ok(DiskFiles {
        image,
        backing,
        format: args.format.map(format_of),
        mode,
        // Made before the sandbox, as the VMM would: the worker itself creates none.
        overlay: args
            .cow
            .then(disk::cow::new_store)
            .transpose()
            .context("cannot create the copy-on-write overlay store")?,
        options: BlkOptions {
            num_queues: args.queues,
            serial: args.serial.clone(),
        },
    })
}

/// The p9 worker in its three forms. The shared directory is opened (standalone) or
/// taken from the launch (VMM) before the sandbox; the sandbox's Landlock rule is built
/// from that descriptor, and the server resolves every name beneath it.
fn serve_p9(args: P9Args) -> anyhow::Result<()> {
    let (root, tag, read_only, journal, frontend) = match (&args.launch_fd, &args.dir) {
        (&Some(fd), _) => {
            let launch =
                read_launch(fd, WorkerKind::P9).with_context(|| format!("--launch-fd {fd}"))?;
            tracing::info!("serving {}", launch.device_name);
            let DeviceConfig::P9(config) = launch.device else {
                bail!("--launch-fd {fd}: not a p9 launch config");
            };
            let mut files = launch.files.into_iter();
            let Some(root) = files.next() else {
                bail!("--launch-fd {fd}: no shared directory");
            };
            let root =
                Root::from_fd(OwnedFd::from(root)).context("the shared directory (root_fd)")?;
            let journal = config.journal_fd.and_then(|_| files.next());
            if config.journal_fd.is_some() && journal.is_none() {
                bail!("--launch-fd {fd}: no session journal");
            }
            (
                root,
                config.tag,
                config.read_only,
                journal,
                Some(Frontend::Connected(launch.connection)),
            )
        }
        (None, Some(dir)) => {
            let root = Root::open(dir).with_context(|| format!("--dir {}", dir.display()))?;
            let tag = args.tag.clone().unwrap_or_else(|| default_tag(dir));
            let frontend = match &args.socket {
                Some(path) => Some(Frontend::Listening(bind(path)?)),
                None => None,
            };
            // Standalone, no journal: each frontend gets a session of its own.
            (root, tag, args.ro, None, frontend)
        }
        (None, None) => bail!("give --dir or --launch-fd"),
    };
    // Modes arrive with the client's umask already applied; a second one here would
    // change what the client asked for.
    // SAFETY: umask only sets this process's file mode creation mask.
    unsafe { libc::umask(0) };
    raise_fd_limit();
    let root_fd = root.fd().as_raw_fd();
    let policy = bulkhead_seccomp::p9_policy(root_fd, read_only);
    let keep_root = [(root_fd, "shared directory")];
    let mut keep = keep_root.to_vec();
    keep.extend(
        journal
            .iter()
            .map(|file| (file.as_raw_fd(), "session journal")),
    );
    let export = std::sync::Arc::new(Export::new(root, read_only).without_ownership());
    match frontend {
        Some(frontend) => serve(policy, frontend, &keep, move || {
            Ok(move || {
                let device = P9Device::new(export.clone(), &tag)?;
                let device = match &journal {
                    Some(file) => {
                        device.with_journal(file.try_clone().map_err(P9DeviceError::Journal)?)
                    }
                    None => device,
                };
                Ok::<_, P9DeviceError>(device.into_backend())
            })
        }),
        None => {
            let Some(path) = &args.listen else {
                bail!("no endpoint: give --socket, --launch-fd or --listen");
            };
            let listener = bind(path)?;
            enter_policy(
                policy,
                &[
                    keep_root[0],
                    (
                        listener.as_raw_fd(),
                        "listening socket (9P debug transport)",
                    ),
                ],
            )
            .context("cannot enter the sandbox")?;
            tracing::info!(
                "serving 9P on {}{}",
                path.display(),
                if read_only { " (read-only)" } else { "" }
            );
            transport_unix::serve_listener(&listener, export)?;
            Ok(())
        }
    }
}

/// The directory's own name, as the issue's `--9p HOSTDIR` default; "share" for `/`.
fn default_tag(dir: &Path) -> String {
    dir.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "share".into())
}

/// Confines the worker, then serves its frontend(s) with a fresh device each. Every
/// worker kind ends up here. `keep` are the device's own inherited descriptors (a disk
/// image); `setup` runs inside the sandbox and returns how to make a device. Devices are
/// made inside the sandbox: whatever descriptors they own (a rate limiter's timer) would
/// otherwise be among those the sandbox closes.
fn serve<T, E, F>(
    policy: Policy,
    frontend: Frontend,
    keep: &[(RawFd, &'static str)],
    setup: impl FnOnce() -> anyhow::Result<F>,
) -> anyhow::Result<()>
where
    T: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    T::Vring: VringT<GuestRam> + Clone + Send + Sync + 'static,
    E: std::error::Error + Send + Sync + 'static,
    F: FnMut() -> Result<DeviceBackend<T>, E>,
{
    // The single place the sandbox is entered: everything above was setup; everything
    // below reads what frontends and guests send.
    let socket = match &frontend {
        Frontend::Connected(connection) => (connection.as_raw_fd(), "vhost-user socket"),
        Frontend::Listening(listener) => (listener.as_raw_fd(), "listening socket"),
    };
    let keep: Vec<_> = std::iter::once(socket)
        .chain(keep.iter().copied())
        .collect();
    enter_policy(policy, &keep).context("cannot enter the sandbox")?;
    let mut new_device = setup()?;

    match frontend {
        Frontend::Connected(connection) => {
            serve_connection(connection, new_device()?)?;
            tracing::info!("the VMM closed the connection");
            Ok(())
        }
        Frontend::Listening(listener) => {
            serve_listener(&listener, new_device)?;
            Ok(())
        }
    }
}

/// Every fid a 9p client holds is a descriptor here, and the Linux client keeps one per
/// cached dentry: the soft limit (often 1024) goes up to the hard one.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one rlimit we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!(
                    "cannot raise the descriptor limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// Binds the standalone socket, replacing a stale socket left by an earlier run (but
/// nothing that is not a socket).
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?,
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(_) => {}
    }
    UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))
}
