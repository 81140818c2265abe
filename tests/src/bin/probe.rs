//! Traffic endpoints for tests and the demo, run inside network namespaces.
//!
//! `serve` answers every TCP connection with one line: its own name and the
//! source address it saw. `connect` dials an address N times and prints one
//! JSON line per attempt: who answered, which source they saw, and what
//! `getpeername()` said.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use dataplane_testbed::probe::Attempt;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
    },
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
}

fn serve(listen: SocketAddr, name: &str) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    println!("listening on {listen}");
    std::io::stdout().flush()?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let peer = stream
            .peer_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let _ = writeln!(stream, "{name} {peer}");
        let _ = stream.shutdown(Shutdown::Write);
    }
    Ok(())
}

fn attempt(to: SocketAddr, timeout: Duration) -> Attempt {
    let started = Instant::now();
    let result = (|| -> std::io::Result<Attempt> {
        let stream = TcpStream::connect_timeout(&to, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        let peer = stream.peer_addr()?.to_string();
        let local = stream.local_addr()?.ip().to_string();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        let mut words = line.split_whitespace();
        Ok(Attempt {
            ok: true,
            backend: words.next().map(str::to_owned),
            source_seen: words.next().map(str::to_owned),
            local: Some(local),
            peer: Some(peer),
            error: None,
            errno: None,
            micros: 0,
        })
    })();
    let mut attempt = result.unwrap_or_else(|error| Attempt {
        ok: false,
        backend: None,
        source_seen: None,
        local: None,
        peer: None,
        error: Some(format!("{:?}", error.kind())),
        errno: error.raw_os_error(),
        micros: 0,
    });
    attempt.micros = started.elapsed().as_micros() as u64;
    attempt
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Serve { listen, name } => serve(listen, &name),
        Command::Connect {
            to,
            count,
            timeout_ms,
        } => {
            let timeout = Duration::from_millis(timeout_ms);
            let mut out = std::io::stdout().lock();
            for _ in 0..count {
                writeln!(out, "{}", serde_json::to_string(&attempt(to, timeout))?)?;
            }
            Ok(())
        }
    }
}
