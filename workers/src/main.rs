//! `bulkhead-worker`: one device served as a vhost-user backend. Sets the device up,
//! confines itself, then serves; errors become one `error: ...` line on stderr and exit
//! status 1 (2 for a command line that does not parse).

use std::fs;
use std::io::IsTerminal;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context};
use std::sync::Arc;

use bulkhead_protocol::{DeviceConfig, DisplayConfig, RngConfig, WorkerKind};
use bulkhead_workers::cli::{Cli, DisplayArgs, Endpoint, P9Args, VncListen, WorkerCommand};
use bulkhead_workers::display::vnc::VncServer;
use bulkhead_workers::display::{Framebuffer, GpuDevice, GpuLimits, LoggingInputSink};
use bulkhead_workers::launch::{read_launch, take_listening_socket};
use bulkhead_workers::p9::{transport_unix, Export, Root};
use bulkhead_workers::rng::RngDevice;
use bulkhead_workers::sandbox::enter_sandbox;
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
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
                    // read_launch checked the kind.
                    let DeviceConfig::Rng(config) = launch.device else {
                        bail!("not an rng launch config");
                    };
                    (Frontend::Connected(launch.connection), config)
                }
                Endpoint { .. } => bail!("no endpoint: give --socket or --launch-fd"),
            };
            serve(
                WorkerKind::Rng,
                frontend,
                &[],
                || Ok(()),
                || RngDevice::new(&config).map(RngDevice::into_backend),
            )
        }
        WorkerCommand::P9(args) => serve_p9_debug(&args),
        WorkerCommand::Display(args) => serve_display(args),
    }
}

/// The display worker: the VNC listener (bound here standalone, inherited when launched)
/// and the virtio-gpu device share one framebuffer; the VNC server starts inside the
/// sandbox, on its own thread.
fn serve_display(args: DisplayArgs) -> anyhow::Result<()> {
    let (frontend, vnc_listener, config) = match args.endpoint {
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
            };
            (Frontend::Listening(bind(&path)?), vnc, config)
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
            let vnc = take_listening_socket(config.vnc_listen_fd, &launch)
                .context("the VNC listening socket")?;
            (Frontend::Connected(launch.connection), vnc, config)
        }
        Endpoint { .. } => bail!("no endpoint: give --socket or --launch-fd"),
    };
    // Every viewer's threads allocate frame-sized buffers. In a per-thread malloc arena,
    // glibc's first heap shrink opens /proc/sys/vm/overcommit_memory, which the sandbox
    // kills the worker for; one arena (the main, brk-based one) never does that.
    // SAFETY: mallopt only sets a malloc tunable; the process is still single-threaded.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) } != 1 {
        tracing::warn!("cannot limit malloc to one arena");
    }
    let framebuffer = Arc::new(Framebuffer::new(config.width, config.height));
    let keep: [(RawFd, &'static str); 1] = [(vnc_listener.as_raw_fd(), "VNC listening socket")];
    let vnc = VncServer::new(
        vnc_listener,
        framebuffer.clone(),
        Arc::new(LoggingInputSink::default()),
        "bulkhead".to_owned(),
        config.vnc_password.clone().map(String::into_bytes),
    );
    let start_vnc = move || {
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
    serve(WorkerKind::Display, frontend, &keep, start_vnc, move || {
        Ok::<_, std::convert::Infallible>(
            GpuDevice::new(framebuffer.clone(), width, height, GpuLimits::default()).into_backend(),
        )
    })
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

/// The 9p server over its debug transport. Not sandboxed: the worker's seccomp and
/// Landlock policy belongs to the vhost-user form; confinement to the directory is the
/// server's own (every lookup beneath the directory's descriptor).
fn serve_p9_debug(args: &P9Args) -> anyhow::Result<()> {
    let root = Root::open(&args.dir).with_context(|| format!("--dir {}", args.dir.display()))?;
    // Modes arrive with the client's umask already applied; a second one here would
    // change what the client asked for.
    // SAFETY: umask only sets this process's file mode creation mask.
    unsafe { libc::umask(0) };
    raise_fd_limit();
    let listener = bind(&args.listen)?;
    tracing::info!(
        "serving {} over 9P on {}{}",
        args.dir.display(),
        args.listen.display(),
        if args.ro { " (read-only)" } else { "" }
    );
    let export = std::sync::Arc::new(Export::new(root, args.ro));
    transport_unix::serve_listener(&listener, export)?;
    Ok(())
}

/// Confines the worker, then serves its frontend(s) with a fresh device each. Every
/// worker kind ends up here; `also_keep` are other descriptors the kind serves and
/// `start` starts what it runs beside the frontend. Devices are made inside the sandbox: whatever descriptors
/// they own (a rate limiter's timer) would otherwise be among those the sandbox closes.
fn serve<T, E>(
    kind: WorkerKind,
    frontend: Frontend,
    also_keep: &[(RawFd, &'static str)],
    start: impl FnOnce() -> anyhow::Result<()>,
    mut new_device: impl FnMut() -> Result<DeviceBackend<T>, E>,
) -> anyhow::Result<()>
where
    T: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    T::Vring: VringT<GuestRam> + Clone + Send + Sync + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    // The single place the sandbox is entered: everything above was setup; everything
    // below reads what frontends and guests send.
    let keep = match &frontend {
        Frontend::Connected(connection) => (connection.as_raw_fd(), "vhost-user socket"),
        Frontend::Listening(listener) => (listener.as_raw_fd(), "listening socket"),
    };
    let keep: Vec<_> = std::iter::once(keep)
        .chain(also_keep.iter().copied())
        .collect();
    enter_sandbox(kind, &keep).context("cannot enter the sandbox")?;
    // Threads the kind runs beside the frontend's (the display's VNC server) start here,
    // sandboxed like everything else.
    start()?;

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
