//! Traffic endpoints for tests and the demo, run inside network namespaces.
//!
//! `serve` answers every TCP connection and every UDP datagram on its port
//! with one line: its own name and the source address it saw. `connect`
//! talks to an address N times and prints one JSON line per attempt: who
//! answered, which source they saw, and which peer address the client's
//! socket reported (`getpeername()` or `recvfrom()`).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use dataplane_testbed::{
    probe::{Attempt, BenchRun, is_greeting, keepalive_request},
    testbed::unix_ms,
};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Tcp,
    /// connect() then send(): the peer comes from getpeername().
    Udp,
    /// sendto() on an unbound socket: the peer comes from recvfrom().
    UdpUnconnected,
}

#[derive(Subcommand)]
enum Command {
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
    },
    /// Opens `connections` TCP connections, prints `{"opened": N}`, and
    /// exchanges a line on each every `interval_ms` for `seconds` or until
    /// its stdin closes; then prints one JSON summary.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        seconds: u64,
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
    },
    /// One connected UDP socket, as a DNS resolver keeps: sends a datagram
    /// every `interval_ms` until its stdin closes (or `seconds`), and
    /// prints a JSON line per exchange. After an error (the socket was
    /// destroyed, or refused) it opens and connects a new socket, as a
    /// resolver re-resolves; a timeout keeps the socket.
    UdpStream {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
        #[arg(long, default_value_t = 120)]
        seconds: u64,
    },
    /// Load for benchmarks: for `seconds`, either new connections (connect,
    /// read the greeting, close) or request/response on one kept-alive
    /// connection; prints count, rate and latency percentiles as JSON.
    Bench {
        /// One address, or several (comma-separated) that new connections
        /// take in turn.
        #[arg(long, value_delimiter = ',', required = true)]
        to: Vec<SocketAddr>,
        #[arg(long)]
        seconds: f64,
        /// `short` (a connection per request), `keepalive` or `bulk` (one
        /// connection streaming; the rate is bytes per second).
        #[arg(long)]
        load: String,
        /// Clients running the load at once (short and keepalive).
        #[arg(long, default_value_t = 1)]
        parallel: usize,
    },
    /// Accepts TCP connections and closes them at once (the bench's
    /// self-check).
    ServeClosing {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Greets, then answers every line with another one (the bench's
    /// self-check of keep-alive echoes).
    ServeWrongEcho {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// GET http://<to><path> and print the body (for metrics and health
    /// endpoints inside a namespace).
    HttpGet {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        path: String,
    },
    /// Sends `bytes` in lines over one TCP connection while reading them
    /// echoed back (large segments both ways); prints a JSON report.
    Transfer {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: usize,
        #[arg(long, default_value_t = 30)]
        timeout_s: u64,
    },
    /// Sends `count` TCP SYNs to `to` from spoofed sources (consecutive
    /// addresses from `sources`), at `rate` per second, through a raw
    /// socket: a SYN flood from many clients. Prints how many were sent.
    Flood {
        #[arg(long)]
        to: std::net::SocketAddrV4,
        #[arg(long)]
        sources: std::net::Ipv4Addr,
        #[arg(long)]
        count: u32,
        #[arg(long)]
        rate: u32,
    },
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        #[arg(long, value_enum, default_value_t = Mode::Tcp)]
        mode: Mode,
        /// UDP: the n-th attempt sends from this port + n (default: a port
        /// the kernel picks).
        #[arg(long)]
        udp_source_port: Option<u16>,
    },
}

fn serve(listen: SocketAddr, name: &str) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding TCP {listen}"))?;
    let udp = UdpSocket::bind(listen).with_context(|| format!("binding UDP {listen}"))?;
    let udp_name = name.to_owned();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 1500];
        while let Ok((_, from)) = udp.recv_from(&mut buffer) {
            let _ = udp.send_to(format!("{udp_name} {}\n", from.ip()).as_bytes(), from);
        }
    });
    println!("listening on {listen}");
    std::io::stdout().flush()?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let name = name.to_owned();
        std::thread::spawn(move || answer_then_echo(stream, &name));
    }
    Ok(())
}

/// Greets with the name and the source seen, then echoes lines until the
/// client closes: one-shot clients read the greeting and go, long-lived
/// ones keep exchanging.
fn answer_then_echo(mut stream: TcpStream, name: &str) {
    let peer = stream
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    if writeln!(stream, "{name} {peer}").is_err() {
        return;
    }
    let Ok(reader) = stream.try_clone() else {
        return;
    };
    // One write per line, without Nagle: a line split in two segments
    // would wait for the peer's delayed ACK.
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(reader);
    let mut line = String::new();
    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
        if line == SINK_REQUEST {
            // Bulk throughput: count and discard until the client is done.
            let received = std::io::copy(&mut reader, &mut std::io::sink()).unwrap_or(0);
            let _ = writeln!(stream, "{received}");
            break;
        }
        if stream.write_all(line.as_bytes()).is_err() {
            break;
        }
        line.clear();
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// The line that turns an echo connection into a sink (bulk throughput).
const SINK_REQUEST: &str = "sink\n";
/// The bulk load's write size.
const BULK_CHUNK: usize = 256 * 1024;

/// What one exchange returned: the answer line, the client's address, and
/// the peer address its socket reported.
struct Exchange {
    line: String,
    local: SocketAddr,
    peer: SocketAddr,
}

fn exchange_tcp(to: SocketAddr, timeout: Duration) -> std::io::Result<Exchange> {
    let stream = TcpStream::connect_timeout(&to, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    Ok(Exchange {
        line,
        local: stream.local_addr()?,
        peer: stream.peer_addr()?,
    })
}

fn exchange_udp(
    to: SocketAddr,
    timeout: Duration,
    connected: bool,
    source_port: u16,
) -> std::io::Result<Exchange> {
    let socket = UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, source_port))?;
    socket.set_read_timeout(Some(timeout))?;
    let mut buffer = [0u8; 1500];
    let (received, peer) = if connected {
        socket.connect(to)?;
        socket.send(b"hello")?;
        (socket.recv(&mut buffer)?, socket.peer_addr()?)
    } else {
        socket.send_to(b"hello", to)?;
        socket.recv_from(&mut buffer)?
    };
    let line = String::from_utf8_lossy(&buffer[..received]).into_owned();
    // An unconnected socket's local address is the wildcard; the server's
    // answer carries the source it saw, which is what the tests check.
    let local = socket.local_addr()?;
    Ok(Exchange { line, local, peer })
}

fn attempt(to: SocketAddr, timeout: Duration, mode: Mode, udp_source_port: u16) -> Attempt {
    let started = Instant::now();
    let result = match mode {
        Mode::Tcp => exchange_tcp(to, timeout),
        Mode::Udp => exchange_udp(to, timeout, true, udp_source_port),
        Mode::UdpUnconnected => exchange_udp(to, timeout, false, udp_source_port),
    };
    let micros = started.elapsed().as_micros() as u64;
    match result {
        Ok(exchange) => {
            let mut words = exchange.line.split_whitespace();
            Attempt {
                ok: true,
                backend: words.next().map(str::to_owned),
                source_seen: words.next().map(str::to_owned),
                local: Some(exchange.local.ip().to_string()),
                peer: Some(exchange.peer.to_string()),
                error: None,
                errno: None,
                micros,
            }
        }
        Err(error) => Attempt {
            ok: false,
            backend: None,
            source_seen: None,
            local: None,
            peer: None,
            error: Some(format!("{:?}", error.kind())),
            errno: error.raw_os_error(),
            micros,
        },
    }
}

fn connected_udp(to: SocketAddr, timeout: Duration) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(timeout))?;
    socket.connect(to)?;
    Ok(socket)
}

/// See `Command::UdpStream`. Each line: `at_ms` (Unix time), `socket` (1
/// for the first, +1 per reconnect), and either `backend` (who answered)
/// or `errno` (0 for a timeout).
fn udp_stream(to: SocketAddr, interval: Duration, seconds: u64) -> Result<()> {
    let caller_done = stdin_closed();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut generation = 1u32;
    let mut socket = connected_udp(to, interval)?;
    let mut out = std::io::stdout().lock();
    let mut buffer = [0u8; 1500];
    while Instant::now() < deadline && !caller_done.load(std::sync::atomic::Ordering::SeqCst) {
        let started = Instant::now();
        let result = socket.send(b"hello").and_then(|_| socket.recv(&mut buffer));
        let at_ms = unix_ms();
        let line = match result {
            Ok(received) => {
                let answer = String::from_utf8_lossy(&buffer[..received]).into_owned();
                let backend = answer.split_whitespace().next().unwrap_or("").to_owned();
                serde_json::json!({"at_ms": at_ms, "socket": generation, "backend": backend})
            }
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                serde_json::json!({"at_ms": at_ms, "socket": generation, "errno": 0})
            }
            Err(error) => {
                let line = serde_json::json!({
                    "at_ms": at_ms,
                    "socket": generation,
                    "errno": error.raw_os_error().unwrap_or(-1),
                });
                generation += 1;
                socket = connected_udp(to, interval)?;
                line
            }
        };
        writeln!(out, "{line}")?;
        out.flush()?;
        std::thread::sleep(interval.saturating_sub(started.elapsed()));
    }
    Ok(())
}

/// A flag raised when this process's stdin closes: the caller is done.
fn stdin_closed() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let caller_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = caller_done.clone();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    caller_done
}

/// Holds long-lived connections and reports every failed exchange.
fn hold(to: SocketAddr, connections: usize, seconds: u64, interval: Duration) -> Result<()> {
    let mut open = Vec::new();
    let mut failures = Vec::new();
    for _ in 0..connections {
        match TcpStream::connect_timeout(&to, Duration::from_secs(2)).and_then(|stream| {
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            stream.set_nodelay(true)?;
            let mut reader = BufReader::new(stream.try_clone()?);
            let mut greeting = String::new();
            reader.read_line(&mut greeting)?;
            Ok((
                stream,
                reader,
                greeting.split_whitespace().next().unwrap_or("").to_owned(),
            ))
        }) {
            Ok(connection) => open.push(connection),
            Err(error) => failures.push(format!("open: {error}")),
        }
    }
    // The caller may wait for this line before it disturbs the connections.
    println!("{}", serde_json::json!({"opened": open.len()}));
    std::io::stdout().flush()?;
    // The hold also ends early when its stdin closes: the caller is done.
    let caller_done = stdin_closed();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut exchanges = 0u64;
    while Instant::now() < deadline && !caller_done.load(std::sync::atomic::Ordering::SeqCst) {
        for (index, (stream, reader, _)) in open.iter_mut().enumerate() {
            let mut echo = String::new();
            let result = stream
                .write_all(format!("ping {exchanges}\n").as_bytes())
                .and_then(|()| reader.read_line(&mut echo).map(|_| ()));
            match result {
                Ok(()) if echo.trim() == format!("ping {exchanges}") => {}
                Ok(()) => failures.push(format!("connection {index}: echo {echo:?}")),
                Err(error) => failures.push(format!("connection {index}: {error}")),
            }
        }
        exchanges += 1;
        std::thread::sleep(interval);
    }
    let mut backends = std::collections::BTreeMap::<String, usize>::new();
    for (_, _, backend) in &open {
        *backends.entry(backend.clone()).or_default() += 1;
    }
    let summary = serde_json::json!({
        "open": open.len(),
        "rounds": exchanges,
        "failures": failures,
        "backends": backends,
    });
    println!("{summary}");
    Ok(())
}

/// Connect, read and check the greeting, close with a reset: without
/// TIME_WAIT, a long run never exhausts the client's ports or fills
/// conntrack with dead flows, so every dataplane is measured from the same
/// state.
fn short_request(to: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let stream = TcpStream::connect_timeout(&to, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    close_with_reset(&stream)?;
    if !is_greeting(&line) {
        return Err(not_an_answer(&line));
    }
    Ok(())
}

fn close_with_reset(stream: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn not_an_answer(line: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("not the expected answer: {line:?}"),
    )
}

/// A kept-alive connection whose greeting was checked.
struct KeptAlive {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl KeptAlive {
    fn open(to: SocketAddr, timeout: Duration) -> std::io::Result<Self> {
        let stream = TcpStream::connect_timeout(&to, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if !is_greeting(&line) {
            return Err(not_an_answer(&line));
        }
        Ok(Self { writer, reader })
    }

    /// One request; the answer must be its exact echo.
    fn exchange(&mut self, request: &str, answer: &mut String) -> std::io::Result<()> {
        answer.clear();
        self.writer.write_all(request.as_bytes())?;
        self.reader.read_line(answer)?;
        if answer != request {
            return Err(not_an_answer(answer));
        }
        Ok(())
    }
}

/// One benchmark run against `targets` (several: each new connection goes
/// to the next, as a Service spreads over its backends) from `parallel`
/// clients at once: latencies in microseconds of verified exchanges only;
/// anything else is a failure.
fn bench(targets: &[SocketAddr], seconds: f64, load: &str, parallel: usize) -> Result<()> {
    anyhow::ensure!(!targets.is_empty(), "no target");
    let timeout = Duration::from_secs(2);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let client = match load {
        "short" => short_client,
        "keepalive" => keepalive_client,
        "bulk" => {
            let target = targets[rand::random_range(0..targets.len())];
            return bulk(target, timeout, deadline, started);
        }
        other => anyhow::bail!("unknown load {other:?}: short, keepalive or bulk"),
    };
    let (latencies_us, failures) = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..parallel.max(1))
            .map(|_| scope.spawn(|| client(targets, timeout, deadline)))
            .collect();
        clients
            .into_iter()
            .fold((Vec::new(), 0), |(mut all, failed), client| {
                // A client thread cannot panic short of a bug; count it whole.
                let (latencies, failures) = client.join().unwrap_or((Vec::new(), 1));
                all.extend(latencies);
                (all, failed + failures)
            })
    });
    // The rate is over the measured time: exchanges still running at the
    // deadline were not counted.
    let measured = deadline.saturating_duration_since(started).as_secs_f64();
    print_run(latencies_us, failures, measured, None);
    Ok(())
}

/// The targets in turn, from a random one on: runs of a one-connection
/// load, and parallel clients, spread over the targets as a Service's
/// connections would.
fn target_picker(targets: &[SocketAddr]) -> impl FnMut() -> SocketAddr + '_ {
    let mut next = rand::random_range(0..targets.len());
    move || {
        let target = targets[next % targets.len()];
        next += 1;
        target
    }
}

/// New connections, one after the other, until `deadline`.
fn short_client(targets: &[SocketAddr], timeout: Duration, deadline: Instant) -> (Vec<u64>, u64) {
    let mut pick = target_picker(targets);
    let (mut latencies_us, mut failures) = (Vec::new(), 0);
    while Instant::now() < deadline {
        let begun = Instant::now();
        let result = short_request(pick(), timeout);
        // What ends after the deadline is outside the measured time.
        if Instant::now() > deadline {
            break;
        }
        match result {
            Ok(()) => latencies_us.push(begun.elapsed().as_micros() as u64),
            Err(_) => failures += 1,
        }
    }
    (latencies_us, failures)
}

/// Requests on one kept-alive connection until `deadline`.
fn keepalive_client(
    targets: &[SocketAddr],
    timeout: Duration,
    deadline: Instant,
) -> (Vec<u64>, u64) {
    let mut pick = target_picker(targets);
    let (mut latencies_us, mut failures) = (Vec::new(), 0);
    let mut connection: Option<KeptAlive> = None;
    let mut answer = String::new();
    let mut n = 0u64;
    while Instant::now() < deadline {
        // A connection that cannot be opened, or breaks, is a failure; the
        // next exchange opens a new one.
        let open = match connection.as_mut() {
            Some(open) => open,
            None => match KeptAlive::open(pick(), timeout) {
                Ok(open) => connection.insert(open),
                Err(_) => {
                    failures += 1;
                    continue;
                }
            },
        };
        n += 1;
        let begun = Instant::now();
        let result = open.exchange(&keepalive_request(n), &mut answer);
        if Instant::now() > deadline {
            break;
        }
        match result {
            Ok(()) => latencies_us.push(begun.elapsed().as_micros() as u64),
            Err(_) => {
                failures += 1;
                connection = None;
            }
        }
    }
    (latencies_us, failures)
}

/// One connection streaming for the whole run; the "latency" of a bulk
/// run is the time per chunk, the rate bytes per second, and the run fails
/// unless the server counted every byte sent.
fn bulk(to: SocketAddr, timeout: Duration, deadline: Instant, started: Instant) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&to, timeout)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    anyhow::ensure!(is_greeting(&line), "not a greeting: {line:?}");
    stream.write_all(SINK_REQUEST.as_bytes())?;
    let chunk = vec![0x5au8; BULK_CHUNK];
    let mut sent = 0u64;
    let mut latencies_us = Vec::new();
    while Instant::now() < deadline {
        let begun = Instant::now();
        stream.write_all(&chunk)?;
        sent += chunk.len() as u64;
        latencies_us.push(begun.elapsed().as_micros() as u64);
    }
    stream.shutdown(Shutdown::Write)?;
    line.clear();
    reader.read_line(&mut line)?;
    let received: u64 = line.trim().parse().unwrap_or(0);
    let failures = u64::from(received != sent);
    let elapsed = started.elapsed().as_secs_f64();
    print_run(
        latencies_us,
        failures,
        elapsed,
        Some(received as f64 / elapsed),
    );
    Ok(())
}

/// Prints a [`BenchRun`]: the rate is verified exchanges per second unless
/// given (bulk: bytes per second).
fn print_run(mut latencies_us: Vec<u64>, failures: u64, seconds: f64, rate: Option<f64>) {
    latencies_us.sort_unstable();
    let percentile = |p: f64| {
        latencies_us
            .get(
                ((latencies_us.len() as f64 * p) as usize)
                    .min(latencies_us.len().saturating_sub(1)),
            )
            .copied()
            .unwrap_or(0)
    };
    let run = BenchRun {
        count: latencies_us.len() as u64,
        failures,
        seconds,
        rate: rate.unwrap_or(latencies_us.len() as f64 / seconds),
        p50_us: percentile(0.50),
        p99_us: percentile(0.99),
    };
    println!("{}", serde_json::to_string(&run).unwrap_or_default());
}

/// Greets like `serve`, then answers every line with another one: the
/// self-check that keep-alive echoes are compared, not just counted.
fn serve_wrong_echo(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding TCP {listen}"))?;
    println!("listening on {listen}");
    std::io::stdout().flush()?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        std::thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            if writeln!(stream, "wrong-echo {peer}").is_err() {
                return;
            }
            let Ok(reader) = stream.try_clone() else {
                return;
            };
            let mut reader = BufReader::new(reader);
            let mut line = String::new();
            while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                if writeln!(stream, "pong").is_err() {
                    break;
                }
                line.clear();
            }
        });
    }
    Ok(())
}

/// Accepts every connection and closes it at once: the bench's self-check
/// that a dataplane answering nothing is measured as 100% failures.
fn serve_closing(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding TCP {listen}"))?;
    println!("listening on {listen}");
    std::io::stdout().flush()?;
    for stream in listener.incoming() {
        drop(stream);
    }
    Ok(())
}

/// Bytes per line of a transfer: more than one segment's worth, so every
/// segment is full-sized.
const TRANSFER_LINE: usize = 4000;

fn transfer(to: SocketAddr, bytes: usize, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    let outcome = (|| -> std::io::Result<usize> {
        let stream = TcpStream::connect_timeout(&to, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut greeting = String::new();
        reader.read_line(&mut greeting)?;
        let mut writer = stream.try_clone()?;
        let lines = bytes.div_ceil(TRANSFER_LINE);
        let sender = std::thread::spawn(move || -> std::io::Result<()> {
            let line = format!("{}\n", "x".repeat(TRANSFER_LINE - 1));
            for _ in 0..lines {
                writer.write_all(line.as_bytes())?;
            }
            Ok(())
        });
        let mut received = 0;
        let mut line = String::new();
        for _ in 0..lines {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                break;
            }
            if line.len() != TRANSFER_LINE {
                return Err(std::io::Error::other(format!(
                    "echoed line of {} bytes, expected {TRANSFER_LINE}",
                    line.len()
                )));
            }
            received += line.len();
        }
        sender
            .join()
            .map_err(|_| std::io::Error::other("the sender panicked"))??;
        let _ = stream.shutdown(Shutdown::Both);
        Ok(received)
    })();
    let report = match outcome {
        Ok(received) => serde_json::json!({
            "ok": received >= bytes,
            "bytes": received,
            "micros": started.elapsed().as_micros() as u64,
        }),
        Err(error) => serde_json::json!({
            "ok": false,
            "error": error.to_string(),
            "micros": started.elapsed().as_micros() as u64,
        }),
    };
    println!("{report}");
    Ok(())
}

fn flood(
    to: std::net::SocketAddrV4,
    sources: std::net::Ipv4Addr,
    count: u32,
    rate: u32,
) -> Result<()> {
    use dataplane_testbed::packets::{ETH_HLEN, Endpoint, TCP_SYN, tcp};
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // SAFETY: socket(2) with constant arguments; the descriptor is owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a raw socket");
    }
    // SAFETY: a fresh descriptor we own from here on.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let destination = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(to.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let target = Endpoint {
        ip: *to.ip(),
        port: to.port(),
    };
    let started = Instant::now();
    let mut sent = 0u32;
    for i in 0..count {
        let source = Endpoint {
            ip: std::net::Ipv4Addr::from(u32::from(sources).wrapping_add(i)),
            port: 1024 + (i % 60_000) as u16,
        };
        let frame = tcp(source, target, TCP_SYN, b"");
        let packet = &frame[ETH_HLEN..];
        // SAFETY: a valid socket, buffer and address of the right size.
        let rc = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const destination).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc >= 0 {
            sent += 1;
        }
        // Pace: never ahead of `rate` per second.
        let due = Duration::from_secs_f64(f64::from(i + 1) / f64::from(rate.max(1)));
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    println!(
        "{}",
        serde_json::json!({"sent": sent, "seconds": started.elapsed().as_secs_f64()})
    );
    Ok(())
}

fn http_get(to: SocketAddr, path: &str) -> Result<()> {
    use std::io::Read as _;
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))
        .with_context(|| format!("connecting to {to}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .context("reading the response")?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("response without a header end")?;
    let status = head.lines().next().unwrap_or_default();
    println!("{status}");
    print!("{body}");
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Serve { listen, name } => serve(listen, &name),
        Command::HttpGet { to, path } => http_get(to, &path),
        Command::Flood {
            to,
            sources,
            count,
            rate,
        } => flood(to, sources, count, rate),
        Command::Transfer {
            to,
            bytes,
            timeout_s,
        } => transfer(to, bytes, Duration::from_secs(timeout_s)),
        Command::Bench {
            to,
            seconds,
            load,
            parallel,
        } => bench(&to, seconds, &load, parallel),
        Command::UdpStream {
            to,
            interval_ms,
            seconds,
        } => udp_stream(to, Duration::from_millis(interval_ms), seconds),
        Command::ServeClosing { listen } => serve_closing(listen),
        Command::ServeWrongEcho { listen } => serve_wrong_echo(listen),
        Command::Hold {
            to,
            connections,
            seconds,
            interval_ms,
        } => hold(to, connections, seconds, Duration::from_millis(interval_ms)),
        Command::Connect {
            to,
            count,
            timeout_ms,
            mode,
            udp_source_port,
        } => {
            let timeout = Duration::from_millis(timeout_ms);
            let mut out = std::io::stdout().lock();
            for n in 0..count {
                let source_port = udp_source_port.map_or(0, |first| first.wrapping_add(n as u16));
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string(&attempt(to, timeout, mode, source_port))?
                )?;
            }
            Ok(())
        }
    }
}
